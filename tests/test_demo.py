"""The demo, shortened: the whole command runs and the model clearly learns the held-out task."""
import pytest
import torch

from rwkv_sft.cli import main
from rwkv_sft.weights import save_model
from rwkv_sft.demo import QUICK_STEPS, STEPS
from rwkv_sft.train.metrics import read_metrics


@pytest.mark.slow
def test_quick_demo_learns(tmp_path, capsys):
    assert QUICK_STEPS < STEPS
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(tmp_path), "--samples", "3"]) == 0  # default: 1 thread
    assert torch.get_num_threads() == threads  # the session's setting is restored
    out = capsys.readouterr().out
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
