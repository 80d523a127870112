"""The demo, shortened: the whole command runs and the model clearly learns the held-out task."""
import pytest
import torch

from rwkv_sft.cli import main
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
