"""benchmarks/bench_gpu.py without a GPU: its own plumbing on CPU with tiny shapes (our trainer and
our WKV-7 kernels; fla's rows need a GPU)."""
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


def test_tiny_rows_on_cpu():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--trainers", "ours",
                           "--rows", "train-0.1B", "lora-1.5B", "wkv", "--steps", "1", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    train = {(r["row"], r["checkpointing"]): r for r in result["train"]}
    assert set(train) == {(row, ck) for row in ("train-0.1B", "lora-1.5B") for ck in (False, True)}
    for row in ("train-0.1B", "lora-1.5B"):
        off, on = train[row, False], train[row, True]
        assert "error" not in off and "error" not in on, (off, on)
        # the same weights and batch: the first loss is near log V, and recomputing blocks changes nothing
        assert abs(off["first_loss"] - math.log(65536)) < 0.5 and off["first_loss"] == on["first_loss"]
        assert off["tokens_per_s"] > 0 and off["flops_per_token"] > 0
    assert train["lora-1.5B", False]["flops_per_token"] < train["train-0.1B", False]["flops_per_token"]
    kernels = {(r["kernel"], r["state"]) for r in result["wkv"] if "ms" in r}
    assert kernels == {(k, s) for k in ("ours-auto", "ours-chunked") for s in (False, True)}, result["wkv"]
