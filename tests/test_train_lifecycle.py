"""A run's life: the step plan, the output directory (fresh, overwrite, resume, lock), resume with
changed settings, interruption, and one-line errors for settings that cannot work."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import random_model
from test_train_helpers import VOCAB, metric_lines, tiny_config, tiny_data, tiny_examples

from rwkv_sft.weights import load_model
from rwkv_sft.cli import main
from rwkv_sft.data import BatchLoader
from rwkv_sft.errors import UserError
from rwkv_sft.train import checkpoint as ckpt
from rwkv_sft.train import train
from rwkv_sft.train.optim import freeze, load_optimizer_state, make_optimizer
from rwkv_sft.train.plan import count_steps


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _announced_steps(text: str) -> int:
    return int(re.search(r"; (\d+) steps", text)[1])


def _slow_step_count(examples, *, world_size, step_tokens, epochs, batch_tokens=64):
    """Collate every global batch of the plan, as the processes do together, and group them into
    steps: in plan order until step_tokens loss tokens (or world_size batches without it)."""
    loader = BatchLoader(examples, batch_tokens=batch_tokens, packing=True, seed=0, rank=0, world_size=world_size)
    steps, pending, in_step = 0, 0, 0
    for epoch in range(math.ceil(epochs)):
        plan = loader.plan(epoch)
        limit = len(plan) if epoch + 1 <= epochs else int(len(plan) * (epochs - epoch))
        for rows in plan[:limit]:
            pending, in_step = pending + loader.collate(rows).num_loss_tokens, in_step + 1
            if (pending >= step_tokens) if step_tokens else in_step == world_size:
                steps, pending, in_step = steps + 1, 0, 0
    return steps + (in_step > 0)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("step_tokens, epochs", [(None, 1), (10, 1), (45, 1), (100, 2.5), (45, 0.5)])
def test_step_plan_matches_collated_batches(world_size, step_tokens, epochs):
    examples = tiny_data(40).train
    loader = BatchLoader(examples, batch_tokens=64, packing=True, seed=0, rank=0, world_size=world_size)
    assert count_steps(loader, epochs, step_tokens) == _slow_step_count(
        examples, world_size=world_size, step_tokens=step_tokens, epochs=epochs)


def test_step_tokens_run_announces_and_runs_the_plan_and_ends_at_lr_final(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=None, epochs=1, step_tokens=60, schedule="linear", lr=1e-3,
                         lr_final=1e-4, warmup_steps=0)
    r = train(config, data=tiny_data(24))
    announced = _announced_steps(capsys.readouterr().out)
    lines = [m for m in metric_lines(tmp_path) if m["kind"] == "train"]
    assert r.steps == announced == len(lines) > 1
    assert math.isclose(lines[-1]["lr"], 1e-4) and math.isclose(lines[0]["lr"], 1e-3)


def test_a_plan_without_steps_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no optimizer step"):
        train(tiny_config(tmp_path, max_steps=None, epochs=0.01), data=tiny_data())
    assert not (tmp_path / "model.pth").exists() and not (tmp_path / "checkpoints").exists()


# -- the output directory: one run per directory --------------------------------------------------

def _steps_logged(out):
    return [m["step"] for m in metric_lines(out) if m["kind"] == "train"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, _one_thread):
    """A finished 1-epoch run (4 steps), checkpoints after every step, the last two kept."""
    out = tmp_path_factory.mktemp("finished")
    r = train(tiny_config(out, max_steps=None, epochs=1, save_every=1, keep_last=2), data=tiny_data())
    return r


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run.out_dir, tmp_path / "run")
    return tmp_path / "run"


def _checkpoints(out):
    return [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]


def test_fresh_run_into_a_run_directory_is_refused_and_changes_nothing(run_copy):
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints up to step_\d+\).*--resume auto.*--overwrite"):
        train(tiny_config(run_copy, max_steps=2), data=tiny_data())
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"} == \
        {p: b for p, b in before.items() if p.name != ".lock"}


def test_overwrite_starts_clean_and_resume_continues_the_new_run(run_copy):
    r = train(tiny_config(run_copy, max_steps=2, save_every=1, overwrite=True), data=tiny_data(seed=3))
    assert r.steps == 2 and _checkpoints(run_copy) == ["step_000001", "step_000002"]
    assert _steps_logged(run_copy) == [1, 2]
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["overwrite"] is False  # re-running it is safe
    again = train(tiny_config(run_copy, max_steps=3, resume="auto"), data=tiny_data(seed=3))
    assert again.steps == 3 and _steps_logged(run_copy) == [1, 2, 3]


def test_resume_auto_without_checkpoint_starts_over(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 7, "loss": 1.0}\n')
    r = train(tiny_config(tmp_path, max_steps=2, resume="auto"), data=tiny_data())
    assert r.steps == 2 and _steps_logged(tmp_path) == [1, 2]


def test_a_locked_directory_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from rwkv_sft.train.rundir import locked\n"
                               f"with locked(Path({str(tmp_path)!r})):\n    print('LOCKED', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "LOCKED"
        with pytest.raises(UserError, match=rf"another run is training into this directory \(pid {child.pid} on "):
            train(tiny_config(tmp_path, max_steps=1), data=tiny_data())
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / ".lock").is_file()  # left behind by the dead process: no obstacle
    assert train(tiny_config(tmp_path, max_steps=1), data=tiny_data()).steps == 1


# -- resume with changed settings -------------------------------------------------------------------

def test_resume_honours_more_epochs_and_new_optimizer_settings(run_copy, finished_run):
    loader = BatchLoader(tiny_data().train, batch_tokens=64, packing=True, seed=0)
    assert finished_run.steps == count_steps(loader, 1, None)
    r = train(tiny_config(run_copy, max_steps=None, epochs=2, resume="auto", lr=5e-4, lr_final=5e-4), data=tiny_data())
    assert r.steps == count_steps(loader, 2, None) > finished_run.steps
    new = [m for m in metric_lines(run_copy) if m["kind"] == "train" and m["step"] > finished_run.steps]
    assert [m["step"] for m in new] == list(range(finished_run.steps + 1, r.steps + 1))
    assert all(math.isclose(m["lr"], 5e-4) for m in new)


def test_resumed_optimizer_keeps_this_runs_settings():
    model = random_model(0, n_layer=1, n_embd=64, vocab_size=VOCAB)
    old = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    model(torch.randint(0, VOCAB, (1, 4)))[0].sum().backward()
    old.step()
    new = make_optimizer(model, lr=1e-3, weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6)
    load_optimizer_state(new, old.state_dict())
    assert all((g["weight_decay"], g["betas"], g["eps"]) == (0.0, (0.8, 0.9), 1e-6) for g in new.param_groups)
    assert all(torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"]) for p in model.parameters())


@pytest.mark.parametrize("change, message", [
    (dict(model_config=dict(n_layer=2, n_embd=128, head_size=64, vocab_size=VOCAB)), r"model_config was .* now"),
    (dict(freeze=["emb"]), r"freeze was \[\] .* now \['emb'\]"),
    (dict(batch_tokens=96), r"batch_tokens was 64 .* now 96"),
    (dict(step_tokens=30), r"step_tokens was None .* now 30"),
    (dict(data=tiny_data(seed=1)), r"training data differs"),
])
def test_resume_refuses_what_it_cannot_change_before_writing_anything(run_copy, change, message):
    change = dict(change)
    data = change.pop("data", tiny_data())
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(UserError, match=message):
        train(tiny_config(run_copy, max_steps=None, epochs=2, resume="auto", **change), data=data)
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_resume_past_the_new_plan_is_an_error(run_copy):
    with pytest.raises(UserError, match=r"past the 2 steps this run plans; raise --max-steps"):
        train(tiny_config(run_copy, max_steps=2, resume="auto"), data=tiny_data())


# -- training checkpoints are models --------------------------------------------------------------

def test_a_training_checkpoint_is_a_model_everywhere(finished_run, tmp_path, capsys):
    step_dir = finished_run.checkpoint
    loaded = load_model(step_dir)  # what generate, eval and convert call
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), finished_run.model.state_dict().values()))
    assert main(["info", str(step_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_layer"] == 2
    r = train(tiny_config(tmp_path, model=str(step_dir), model_config=None, max_steps=1), data=tiny_data())
    assert r.steps == 1
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


# -- one-line errors -------------------------------------------------------------------------------

def test_token_ids_outside_the_vocabulary_are_an_error_for_fresh_and_loaded_models(finished_run, tmp_path):
    wide = SimpleNamespace(train=tiny_examples(24, vocab=VOCAB + 40), eval=None, report={})
    with pytest.raises(UserError, match=rf"shard0:\d+: token id \d+ is outside the model's vocabulary of {VOCAB}"):
        train(tiny_config(tmp_path / "a", max_steps=1), data=wide)
    with pytest.raises(UserError, match=rf"outside the model's vocabulary of {VOCAB}"):
        train(tiny_config(tmp_path / "b", model=str(finished_run.out_dir / "checkpoints" / finished_run.checkpoint.name),
                          model_config=None, max_steps=1), data=wide)


def test_out_that_cannot_be_a_directory_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        train(tiny_config(tmp_path / "file", max_steps=1), data=tiny_data())
    with pytest.raises(UserError, match="is a file, not a directory"):
        train(tiny_config(tmp_path / "file" / "run", max_steps=1), data=tiny_data())


def test_unwritable_data_cache_is_an_error(tmp_path):
    from rwkv_sft.data import DataConfig, prepare_data
    data = tmp_path / "d.jsonl"
    data.write_text('{"context": "a", "completion": "b"}\n')
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"data cache .*: cannot write there"):
        prepare_data(DataConfig(train_files=[str(data)]), cache_dir=str(tmp_path / "file" / "cache"), show_progress=False)


def test_freeze_range_past_the_last_block_is_an_error():
    model = random_model(0, n_layer=2, n_embd=64, vocab_size=VOCAB)
    with pytest.raises(UserError, match=r"'blocks.0-9' is not a range of this model's blocks \(it has blocks 0-1\)"):
        freeze(model, ["blocks.0-9"])
    assert freeze(random_model(0, n_layer=2, n_embd=64, vocab_size=VOCAB), ["blocks.0-1"]) > 0


# -- through the command line ----------------------------------------------------------------------

def test_cli_no_progress_keeps_the_data_report_and_a_signal_exits_143_with_the_checkpoint_as_model(
        tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"context": f"What is {i} plus one?", "completion": f" {i + 1}"}) + "\n" for i in range(6))
                    + '{"context": "no completion"}\nnot json\n')
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--skip-invalid", "--no-progress", "--n-layer", "1", "--n-embd", "64",
            "--out", str(out), "--max-steps", "3", "--batch-tokens", "32", "--set", "tensorboard=false",
            "--set", "export=[]"]
    assert main(args + ["--vocab-size", "100"]) == 2  # World token ids do not fit 100
    err = capsys.readouterr().err
    assert re.search(r"d.jsonl:1: token id \d+ is outside the model's vocabulary of 100", err), err
    assert not (out / "config.yaml").exists()
    original = torch.optim.AdamW.step

    def step_then_sigterm(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_sigterm)
    assert main(args) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert re.search(r"6 train examples .*skipped: 1 invalid JSON, 1 missing field", captured.err), captured.err  # the data report
    assert f"{out / 'checkpoints' / 'step_000001'} (the checkpoint; use it as --model)" in captured.out
