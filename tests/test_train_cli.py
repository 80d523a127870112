"""`rwkv-sft train` end to end on a tiny run, config files with overrides, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from rwkv_sft.weights import load_model
from rwkv_sft.cli import main
from rwkv_sft.errors import UserError
from rwkv_sft.train.cli import add_arguments, build_config


def _write_data(path, n, seed):
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"context": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return path


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    train_file, eval_file = _write_data(tmp_path / "train.jsonl", 24, 0), _write_data(tmp_path / "eval.jsonl", 4, 1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rwkv_sft", "train", "--data", str(train_file), "--eval-data", str(eval_file),
           "--n-layer", "1", "--n-embd", "64", "--out", str(out), "--max-steps", "3", "--batch-tokens", "96",
           "--lr", "1e-3", "--save-every", "2", "--eval-exact-match", "2", "--no-progress",
           "--set", "tensorboard=false", "--set", "data.max_len=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training finished" in proc.stdout and "exact match" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert any(r["kind"] == "eval" and r["step"] == 3 for r in records)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 1e-3 and saved["data"]["max_len"] == 32 and saved["data"]["train_files"] == [str(train_file)]
    model = load_model(out / "model.pth")
    assert model.config.n_layer == 1 and model.config.n_embd == 64
    assert (out / "model.safetensors").is_file() and (out / "metrics.png").is_file()


def _parse(argv):
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_config_file_then_flags_then_set(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('lr = 1e-4\nmax_steps = 10\nfreeze = ["emb"]\nmodel_config = {n_layer = 2, n_embd = 64}\n'
                   '[data]\ntrain_files = ["a.jsonl"]\nmax_len = 64\n')
    c = build_config(_parse(["--config", str(cfg), "--lr", "3e-4", "--set", "data.anchor_fraction=0.5",
                             "--set", "warmup_steps=0", "--set", "betas=[0.9, 0.95]"]))
    assert (c.lr, c.max_steps, c.freeze, c.warmup_steps, c.betas) == (3e-4, 10, ["emb"], 0, (0.9, 0.95))
    assert (c.data.train_files, c.data.max_len, c.data.anchor_fraction) == (["a.jsonl"], 64, 0.5)
    assert c.model_config == {"n_layer": 2, "n_embd": 64}
    # the resolved config a run writes is itself a valid --config
    out = tmp_path / "again.yaml"
    out.write_text(yaml.safe_dump(c.to_dict()))
    assert build_config(_parse(["--config", str(out)])) == c


def test_a_warmup_flag_replaces_the_files_warmup_of_the_other_kind(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("warmup_steps: 5\nmodel_config: {n_layer: 1, n_embd: 64}\ndata: {train_files: [a.jsonl]}\n")
    c = build_config(_parse(["--config", str(cfg), "--warmup-ratio", "0.1"]))
    assert (c.warmup_steps, c.warmup_ratio) == (None, 0.1)
    cfg.write_text("warmup_ratio: 0.2\nmodel_config: {n_layer: 1, n_embd: 64}\ndata: {train_files: [a.jsonl]}\n")
    c = build_config(_parse(["--config", str(cfg), "--set", "warmup_steps=3"]))
    assert (c.warmup_steps, c.warmup_ratio) == (3, None)
    with pytest.raises(SystemExit):  # both on one command line: argparse says they exclude each other
        _parse(["--warmup-steps", "3", "--warmup-ratio", "0.1"])
    with pytest.raises(UserError, match="warmup_ratio must be in"):
        build_config(_parse(["--config", str(cfg), "--warmup-ratio", "0.7"]))


@pytest.mark.parametrize("name, text, message", [
    ("bad.toml", "lr = 1e-4\nmax_steps = = 3\n", r"bad.toml:2: invalid TOML"),
    ("bad.yaml", "lr: 1e-4\ndata: [unclosed\n", r"bad.yaml:\d+: invalid YAML"),
    ("unknown.toml", "learning_rate = 1e-4\n[data]\ntrain_files = ['a']\n", r"unknown setting 'learning_rate'"),
    ("type.toml", "lr = 'fast'\n[data]\ntrain_files = ['a']\n", r"lr: expected float"),
    ("range.toml", "lr = -1.0\nmodel_config = {n_layer = 1, n_embd = 64}\n[data]\ntrain_files = ['a']\n",
     r"lr must be positive"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, name, text, message):
    import re
    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_missing_data_and_model_are_user_errors(capsys):
    assert main(["train", "--n-layer", "1", "--n-embd", "64"]) == 2
    assert "no data" in capsys.readouterr().err
    assert main(["train", "--data", "x.jsonl"]) == 2
    assert "no model" in capsys.readouterr().err


@pytest.mark.parametrize("item, message", [
    ("lr=abc", "--set lr: expected float | None, got 'abc'"),
    ("lrr=1", "--set lrr: unknown setting 'lrr' (did you mean 'lr'?)"),
    ("data.max_len=abc", "--set data.max_len: expected int, got 'abc'"),
    ("betas=[0.9, x]", "--set betas: expected float, got 'x'"),
])
def test_a_bad_set_value_is_blamed_on_set_not_on_the_config_file(tmp_path, capsys, item, message):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\ndata:\n  train_files: [a.jsonl]\nmodel_config: {n_layer: 1, n_embd: 64}\n")
    assert main(["train", "--config", str(path), "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rwkv-sft train: error: {message}"
