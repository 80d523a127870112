"""Command-line flags: one escape rule for text, one set of data flags, finite numbers, one-line
errors, and --help without torch."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rwkv_sft import Tokenizer
from rwkv_sft.weights import save_model
from rwkv_sft.cli import build_parser, main
from rwkv_sft.cli_args import data_config, unescape
from rwkv_sft.errors import UserError
from rwkv_sft.train.cli import build_config

from conftest import random_model

README = Path(__file__).resolve().parents[1] / "README.md"
DATA_FLAGS = {"--format", "--context-field", "--completion-field", "--max-len", "--end-marker",
              "--anchor-fraction", "--skip-invalid", "--allow-unused-fields", "--set"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small model with the World vocabulary, as a file."""
    model = random_model(seed=1, scale=0.3, n_layer=1, n_embd=64).eval()
    path = tmp_path_factory.mktemp("model") / "model.pth"
    save_model(model, path)
    return model, path


def one_line_error(capsys, argv, *patterns):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for p in patterns:
        assert re.search(p, err), err
    return err


def write_rows(path, rows, extra=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return str(path)


# -- --help and argument errors without torch ------------------------------------------------------

def test_help_and_argument_errors_do_not_import_torch():
    code = """
import runpy, sys
sys.argv = ["rwkv_sft", *sys.argv[1:]]
try:
    runpy.run_module("rwkv_sft", run_name="__main__")
except SystemExit as e:
    code = e.code
print(code, "torch" in sys.modules)
"""
    for argv, want in ((["--help"], 0), (["train", "--help"], 0), (["eval", "--help"], 0),
                       (["generate", "--model", "m.pth", "--temperature", "nan"], 2),
                       (["train", "--data", "x.jsonl", "--n-layer", "1", "--n-embd", "64", "--lr", "inf"], 2)):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert r.stdout.strip().splitlines()[-1] == f"{want} False", (argv, r.stdout[-500:], r.stderr[-500:])


# -- one escape rule for every text flag -----------------------------------------------------------

def test_escape_rule():
    assert unescape(r"a\nb\tc\r\\d") == "a\nb\tc\r\\d"
    assert unescape(r"\\n") == "\\n"           # a literal backslash-n
    assert unescape(r"C:\path\x") == r"C:\path\x"  # other backslashes stay


def test_text_flags_take_the_escapes(tmp_path):
    p = build_parser()
    g = p.parse_args(["generate", "--model", "m", "--prompt", r"a\nb\\n", "--stop", r"\n", "--stop", r"\\n"])
    assert g.prompt == "a\nb\\n" and g.stop == ["\n", "\\n"]
    # --end-marker in each of the three data commands, and a bare --set value
    t = build_config(p.parse_args(["train", "--data", "d.jsonl", "--n-layer", "1", "--n-embd", "64",
                                   "--end-marker", r"\n\n"]))
    assert t.data.end_marker == "\n\n"
    t = build_config(p.parse_args(["train", "--data", "d.jsonl", "--n-layer", "1", "--n-embd", "64",
                                   "--set", r"data.end_marker=\n\n"]))
    assert t.data.end_marker == "\n\n"
    for argv in (["eval", "--model", "m", "--data", "d.jsonl"], ["inspect-data", "d.jsonl"]):
        args = p.parse_args([*argv, "--end-marker", r"\n\n"])
        assert data_config(args, ["d.jsonl"]).end_marker == "\n\n"


def test_inspect_data_end_marker_is_the_newline_token(tmp_path, tok, capsys):
    """`--end-marker "\\n\\n"` as --help shows it: one token (261), not the four characters."""
    path = write_rows(tmp_path / "d.jsonl", [{"context": "Date: 1974-02-03\nIn words:", "completion": " 3 February 1974"}])
    assert main(["inspect-data", path, "--end-marker", r"\n\n", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert tok.encode("\n\n") == [261]
    assert stats["train"]["loss_tokens"] == len(tok.encode(" 3 February 1974")) + 1


def test_readme_generate_example_as_written(saved, tok, capsys):
    """The README's generate command, exactly as a POSIX shell passes it, prompts with a newline."""
    from rwkv_sft.infer.generate import generate
    model, path = saved
    line = next(l for l in README.read_text().splitlines() if l.startswith("rwkv-sft generate "))
    argv = shlex.split(line)[1:]
    argv[argv.index("--model") + 1] = str(path)
    assert main(argv) == 0
    out = capsys.readouterr().out
    prompt = argv[argv.index("--prompt") + 1]
    assert "\\n" in prompt  # the shell left a backslash and an n
    want = generate(model, tok, prompt.replace("\\n", "\n"), temperature=0).text
    literal = generate(model, tok, prompt, temperature=0, max_new_tokens=8).text
    assert not want.startswith(literal)  # otherwise this test could not tell them apart
    assert out == want + "\n"


# -- one set of data flags -------------------------------------------------------------------------

def test_train_eval_inspect_share_the_data_flags():
    p = build_parser()
    subs = p._subparsers._group_actions[0].choices
    for name in ("train", "eval", "inspect-data"):
        flags = {s for a in subs[name]._actions for s in a.option_strings}
        assert DATA_FLAGS <= flags, (name, DATA_FLAGS - flags)


def test_eval_reads_data_as_train_does(tmp_path, saved, tok, capsys):
    from rwkv_sft.data import DataConfig, prepare_data
    from rwkv_sft.eval.evaluate import evaluate
    model, path = saved
    rows = [{"q": f"Q{i}: {'ab' * i}?", "a": f" {i * 7}"} for i in range(1, 6)]
    data = write_rows(tmp_path / "qa.jsonl", rows, extra='{"q": "x", "a": 5}\n')
    flags = ["--context-field", "q", "--completion-field", "a", "--skip-invalid", "--set", "data.max_len=12",
             "--end-marker", r"\n\n"]
    assert main(["eval", "--model", str(path), "--data", data, *flags, "--exact-match", "0", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prepared = prepare_data(DataConfig([data], context_field="q", completion_field="a", skip_invalid=True, max_len=12,
                                       end_marker="\n\n"), tokenizer=tok, show_progress=False)
    want = evaluate(model, prepared.train, tok, exact_match_samples=0)
    assert got["examples"] == 5 and got["loss_tokens"] == want["loss_tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # the plain report: the examples are evaluation examples; --samples shows completions
    assert main(["eval", "--model", str(path), "--data", data, *flags, "--exact-match", "2", "--samples", "2"]) == 0
    out = capsys.readouterr()
    assert "5 eval examples" in out.err and "train examples" not in out.err
    assert out.out.count("\n--- ") == 2


# -- numbers: finite, in range, one-line errors ----------------------------------------------------

@pytest.mark.parametrize("argv, pattern", [
    (["generate", "--model", "m", "--prompt", "x", "--temperature", "nan"], r"--temperature: expected a finite"),
    (["generate", "--model", "m", "--prompt", "x", "--temperature", "inf"], r"--temperature: expected a finite"),
    (["generate", "--model", "m", "--prompt", "x", "--temperature", "-1"], r"--temperature: must be >= 0"),
    (["generate", "--model", "m", "--prompt", "x", "--top-p", "nan"], r"--top-p"),
    (["generate", "--model", "m", "--prompt", "x", "--top-p", "1.5"], r"--top-p: must be <= 1"),
    (["generate", "--model", "m", "--prompt", "x", "--top-k", "-1"], r"--top-k"),
    (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "-1"], r"--max-new-tokens"),
    (["generate", "--model", "m", "--prompt", "x", "--seed", "-1"], r"--seed"),
    (["eval", "--model", "m", "--data", "d", "--max-new-tokens", "0"], r"--max-new-tokens: must be >= 1"),
    (["eval", "--model", "m", "--data", "d", "--max-new-tokens", "-1"], r"--max-new-tokens: must be >= 1"),
    (["eval", "--model", "m", "--data", "d", "--samples", "2", "--exact-match", "0"], r"--samples 2 .*--exact-match"),
    (["eval", "--model", "m", "--data", "d", "--samples", "-1"], r"--samples"),
    (["eval", "--model", "m", "--data", "d", "--batch-tokens", "0"], r"--batch-tokens"),
    (["eval", "--model", "m", "--data", "d", "--anchor-fraction", "nan"], r"anchor.fraction"),
    (["inspect-data", "d", "--max-len", "1e3"], r"--max-len: expected an integer"),
    (["inspect-data", "d", "--show", "-1"], r"--show"),
    (["demo", "--steps", "0"], r"--steps"),
    (["demo", "--threads", "-2"], r"--threads"),
    (["eval", "--model", "m", "--data", "d", "--wkv-backend", "cuda", "--device", "cpu"], r"needs a CUDA GPU"),
    (["eval", "--model", "m", "--data", "d", "--wkv-backend", "fla", "--device", "cpu"], r"needs a CUDA GPU"),
])
def test_bad_numbers_and_backends_are_one_line_errors(capsys, argv, pattern):
    one_line_error(capsys, argv, pattern)


@pytest.mark.parametrize("flags, pattern", [
    (["--lr", "inf"], r"lr: expected a finite number"),
    (["--epochs", "inf"], r"epochs: expected a finite number"),
    (["--grad-clip", "inf"], r"grad_clip: expected a finite number"),
    (["--set", "eps=inf"], r"eps: expected a finite number"),
    (["--set", "betas=[.nan, 0.9]"], r"betas: expected a finite number"),
    (["--seed", "-1"], r"seed must be"),
    (["--eval-exact-match", "-1"], r"eval_exact_match must be >= 0"),
    (["--set", "loss_chunk_size=0"], r"loss_chunk_size must be >= 1"),
    (["--set", "dist_timeout_s=0"], r"dist_timeout_s must be >= 1"),
    (["--set", "data.seed=-1"], r"seed must be"),
])
def test_bad_train_numbers_are_user_errors(flags, pattern):
    args = build_parser().parse_args(["train", "--data", "d.jsonl", "--n-layer", "1", "--n-embd", "64", *flags])
    with pytest.raises(UserError, match=pattern):
        build_config(args)


def test_file_weight_must_be_finite():
    from rwkv_sft.data.config import parse_file_spec
    with pytest.raises(UserError, match="positive finite"):
        parse_file_spec("more.jsonl:1e400")


def test_train_backend_on_cpu_is_one_line_error(tmp_path, capsys):
    one_line_error(capsys, ["train", "--data", str(tmp_path / "d.jsonl"), "--n-layer", "1", "--n-embd", "64",
                            "--device", "cpu", "--wkv-backend", "cuda", "--out", str(tmp_path / "run")],
                   r"cuda WKV-7 backend needs a CUDA GPU")


def test_head_size_zero_is_a_value_error():
    from rwkv_sft import RWKV7Config
    with pytest.raises(ValueError, match="head_size must be positive"):
        RWKV7Config(n_layer=1, n_embd=64, head_size=0)


def test_tiny_temperature_is_greedy():
    from rwkv_sft.infer.generate import sample_next
    logits = torch.tensor([[30.0, 0.0, 29.0, -5.0], [1.0, 2.0, 1.5, 0.0]])
    for t in (1e-38, 1e-6):
        assert sample_next(logits, temperature=t).tolist() == [0, 1]


# -- config files ----------------------------------------------------------------------------------

def test_yaml_numbers_written_as_strings(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-4\nlr_final: '5e-6'\nmax_steps: 1e3\nmodel_config: {n_layer: 1, n_embd: 64}\n"
                   "data:\n  train_files: [a.jsonl]\n  max_len: '64'\n  anchor_fraction: 5e-1\n")
    assert yaml.safe_load(cfg.read_text())["lr"] == "1e-4"  # what YAML 1.1 gives
    c = build_config(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert (c.lr, c.lr_final, c.max_steps, c.data.max_len, c.data.anchor_fraction) == (1e-4, 5e-6, 1000, 64, 0.5)
    for text, pattern in (("lr: fast\n", r"lr: expected float"), ("lr: .nan\n", r"lr: expected a finite"),
                          ("max_steps: 2.5\n", r"max_steps: expected a whole number")):
        cfg.write_text(text + "model_config: {n_layer: 1, n_embd: 64}\ndata: {train_files: [a.jsonl]}\n")
        with pytest.raises(UserError, match=pattern):
            build_config(build_parser().parse_args(["train", "--config", str(cfg)]))


# -- data files ------------------------------------------------------------------------------------

def test_pretty_printed_json_object_names_the_fix(tmp_path, capsys):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"context": "a", "completion": "b"}, indent=2))
    for extra in ([], ["--skip-invalid"]):
        one_line_error(capsys, ["inspect-data", str(path), "--cache-dir", str(tmp_path / "c"), *extra],
                       re.escape(f"{path}: a JSON file must be an array of objects (or use JSON Lines"))


def test_evaluate_max_new_tokens_zero_is_an_error_not_the_default():
    from rwkv_sft.eval.evaluate import evaluate
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_new_tokens"):
            evaluate(None, None, None, max_new_tokens=bad)


def test_activation_checkpointing_defaults_on_for_peft_only():
    """PEFT runs recompute blocks by default (their memory is the frozen base's activations: 12.6 GiB
    for one LoRA step of a 1.5B model at T=1024 on a GPU without it); either way can be forced."""
    p = build_parser()
    base = ["train", "--data", "d.jsonl", "--n-layer", "1", "--n-embd", "64"]
    cases = [([], False), (["--lora-rank", "4"], True), (["--state-tuning"], True),
             (["--lora-rank", "4", "--no-activation-checkpointing"], False), (["--activation-checkpointing"], True),
             (["--state-tuning", "--set", "activation_checkpointing=false"], False)]
    for flags, want in cases:
        assert build_config(p.parse_args(base + flags)).activation_checkpointing is want, flags
