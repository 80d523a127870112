"""The demo, shortened: the whole command runs and the model clearly learns the held-out task."""
import contextlib
import io
import json

import pytest
import torch

from rwkv_sft.cli import main
from rwkv_sft.weights import save_model
from rwkv_sft.demo import QUICK_STEPS, STEPS
from rwkv_sft.train.metrics import read_metrics


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`rwkv-sft demo --quick` once: (its folder, what it printed); the dpo demo's base too."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--out", str(out), "--samples", "3"]) == 0  # default: 1 thread
    assert torch.get_num_threads() == threads  # the session's setting is restored
    return out, printed.getvalue()


@pytest.mark.slow
def test_quick_demo_learns(quick_demo):
    assert QUICK_STEPS < STEPS
    tmp_path, out = quick_demo
    assert "before training" in out and "after training" in out

    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == QUICK_STEPS
    assert first["exact_match_n"] == last["exact_match_n"] == 200
    # From scratch the loss starts near ln(65536) = 11.1; a model that learned nothing stays there.
    assert last["loss"] < 0.5 * first["loss"]
    assert last["exact_match"] >= first["exact_match"]
    assert last["token_accuracy"] > first["token_accuracy"] + 0.3
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (tmp_path / "model.pth").is_file()


@pytest.mark.slow
def test_dpo_demo_turns_the_held_out_preference(quick_demo, tmp_path, capsys):
    """The demo base, which writes its own style, comes to prefer the American one on held-out
    pairs from DPO on pairs alone (the base's own metrics.jsonl: before at step 0, after at the end)."""
    base = quick_demo[0] / "model.pth"
    steps = 20
    assert main(["demo", "--method", "dpo", "--base", str(base), "--out", str(tmp_path), "--steps", str(steps),
                 "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "before training  preference accuracy" in out and "after training   preference accuracy" in out
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == steps and first["pairs"] == last["pairs"] == 200
    assert first["preference_accuracy"] <= 0.1  # the base prefers the style it was trained on
    assert last["preference_accuracy"] >= 0.9, evals
    assert last["margin"] > 0 and last["reward_accuracy"] >= 0.9
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "metrics.png").is_file()


def test_bundled_pairs_are_the_demo_dates_in_two_styles():
    """The dpo demo's pairs: the dates of the demo's own files, rejected its style, chosen the
    LoRA demo's American one; no held-out date among the training pairs."""
    from rwkv_sft.demo import HELDOUT_FILE, TRAIN_FILE
    from rwkv_sft.demo.dpo import PAIRS_HELDOUT, PAIRS_TRAIN
    from rwkv_sft.demo.peft import american

    def rows(path):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for dates, pairs in ((TRAIN_FILE, PAIRS_TRAIN), (HELDOUT_FILE, PAIRS_HELDOUT)):
        pairs, dates = rows(pairs), rows(dates)
        assert 0 < len(pairs) <= len(dates)
        for p, d in zip(pairs, dates):
            assert p == {"prompt": d["context"], "chosen": american(d)["completion"], "rejected": d["completion"]}
    assert not {p["prompt"] for p in rows(PAIRS_TRAIN)} & {p["prompt"] for p in rows(PAIRS_HELDOUT)}


def test_stopped_demo_exits_with_the_signal_code(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the demo's training: the run saved and stopped, so there is no final evaluation to
    compare; the demo says so and exits 130 instead of failing on the missing result."""
    import signal
    from types import SimpleNamespace

    import rwkv_sft.train as train_pkg
    import rwkv_sft.eval.evaluate as evaluate_mod

    before = {"loss": 11.0, "token_accuracy": 0.0, "exact_match": 0.0, "exact_match_n": 1, "samples": []}
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **k: before)
    monkeypatch.setattr(train_pkg, "train", lambda *a, **k: SimpleNamespace(
        interrupted=True, signal=signal.SIGINT, eval=None, metrics_path=None, plot_path=None))
    from rwkv_sft import RWKV7, RWKV7Config
    from rwkv_sft.weights import save_model
    save_model(RWKV7(RWKV7Config(n_layer=1, n_embd=64, vocab_size=65536)), tmp_path / "base.pth")
    for extra in (["--method", "full"], ["--method", "state", "--base", str(tmp_path / "base.pth")]):
        assert main(["demo", "--quick", *extra, "--out", str(tmp_path / extra[1])]) == 130
        assert "stopped before the end of training" in capsys.readouterr().out
