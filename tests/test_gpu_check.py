"""scripts/gpu_check.py without a GPU: the no-CUDA exit, and its plumbing on CPU with tiny shapes."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the source tree in front
    return module


def _rows(out_dir):
    return json.loads((Path(out_dir) / "gpu_check.json").read_text())["rows"]


def test_without_cuda_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no CUDA device, also on a machine that has one
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout.startswith("gpu_check: no CUDA device") and len(proc.stdout.splitlines()) == 1, proc.stdout
    assert not (tmp_path / "out").exists()


def test_tiny_run_on_cpu(gpu_check, tmp_path, capsys):
    """Environment, a checkpoint made by a child process, the train steps through the real CLI, each
    a pass with a finite loss (a broken LoRA, state or segmented step fails this test), FSDP
    skipped for want of GPUs, offload for want of one."""
    steps = ["install", "environment", "checkpoint", "lora", "state-tuning", "segmented", "fsdp", "offload"]
    rc = gpu_check.main(["--allow-cpu", "--tiny", "--no-install", "--out", str(tmp_path), "--only", *steps])
    printed = capsys.readouterr().out
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert list(rows) == steps, printed
    assert rc == 0, printed
    assert rows["environment"]["status"] == "pass" and rows["environment"]["info"]["torch"]
    assert rows["install"]["status"] == "skipped"
    assert rows["checkpoint"]["status"] == "pass", rows["checkpoint"]
    for step in ("lora", "state-tuning", "segmented"):
        row = rows[step]
        assert row["status"] == "pass", row
        assert math.isfinite(float(row["detail"].split("loss ")[1].split(";")[0]))
    assert rows["fsdp"]["status"] == "skipped" and "2 or more GPUs" in rows["fsdp"]["detail"]
    assert rows["offload"]["status"] == "skipped" and "needs a GPU" in rows["offload"]["detail"]
    assert all(gpu_check._format_row(r) in printed for r in rows.values())  # the printed table is the JSON's


def test_tiny_quantized_base_rows_on_cpu(gpu_check, tmp_path, capsys, monkeypatch):
    """The nf4 rows through the real CLI: two steps on the shared checkpoint (the last one's
    tokens/s reported), one step on each checkpoint made for a row of its own (deleted after it);
    the 2.9B offload row skipped for want of a GPU."""
    pytest.importorskip("bitsandbytes")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(gpu_check.tempfile, "mkdtemp", lambda **kw: str(work))
    monkeypatch.setattr(gpu_check.shutil, "rmtree", lambda *a, **kw: None)  # (to look at what is left)
    steps = ["checkpoint", "quant", "quant-big", "offload-2.9b"]
    rc = gpu_check.main(["--allow-cpu", "--tiny", "--no-install", "--out", str(tmp_path), "--only", *steps])
    printed = capsys.readouterr().out
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert list(rows) == ["checkpoint", "quant", "quant-7.2b", "quant-13.3b", "offload-2.9b"], printed
    assert rc == 0, printed
    for step in ("quant", "quant-7.2b", "quant-13.3b"):
        assert rows[step]["status"] == "pass" and "--base-dtype nf4" in rows[step]["detail"], rows[step]
        assert math.isfinite(float(rows[step]["detail"].split("loss ")[1].split(";")[0]))
    assert float(rows["quant"]["detail"].split("last step ")[1].split(" tokens/s")[0].replace(",", "")) > 0
    assert rows["quant"]["detail"].startswith("2 steps")
    assert rows["quant-7.2b"]["detail"].startswith("model_2x128.pth: 1 step")  # a checkpoint of its own ...
    assert rows["quant-13.3b"]["detail"].startswith("model_3x128.pth: 1 step")
    assert sorted(p.name for p in work.glob("*.pth")) == ["model_2x64.pth"]  # ... deleted after its row
    assert rows["offload-2.9b"]["status"] == "skipped" and "needs a GPU" in rows["offload-2.9b"]["detail"]


def test_a_failing_step_or_an_unknown_flag_does_not_stop_the_check(gpu_check, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    def unknown_flag(ctx):
        gpu_check._train_step(ctx, "new-feature", ["--no-such-flag", "3"], 8)

    def fine(ctx):
        ctx.report.add("fine", "pass", "ok")
    monkeypatch.setattr(gpu_check, "STEPS", {"broken": broken, "new-feature": unknown_flag, "fine": fine})
    rc = gpu_check.main(["--allow-cpu", "--tiny", "--no-install", "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    assert [(r["step"], r["status"]) for r in rows] == [("broken", "fail"), ("new-feature", "unavailable"),
                                                        ("fine", "pass")]
    assert "RuntimeError: boom" in rows[0]["detail"] and "--no-such-flag" in rows[1]["detail"]
    assert rc == 1  # something failed


def test_spent_budget_skips_the_remaining_steps(gpu_check, tmp_path):
    rc = gpu_check.main(["--allow-cpu", "--tiny", "--no-install", "--out", str(tmp_path), "--budget", "0"])
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(gpu_check.STEPS) and rc == 0
    assert all(r["status"] == "skipped" and "budget" in r["detail"] for r in rows)


def test_the_long_rows_run_only_when_named(gpu_check, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_check, "STEPS", {name: lambda ctx, name=name: ran.append(name) or
                                             ctx.report.add(name, "pass") for name in ("install", "quant-big")})
    assert gpu_check.main(["--allow-cpu", "--tiny", "--no-install", "--out", str(tmp_path)]) == 0
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert ran == ["install"] and rows["quant-big"]["status"] == "skipped" and "--only quant-big" in rows["quant-big"]["detail"]
    assert gpu_check.main(["--allow-cpu", "--tiny", "--no-install", "--out", str(tmp_path), "--only", "quant-big"]) == 0
    assert ran == ["install", "quant-big"]


def test_steps_cut_short_by_their_time_limit_keep_what_they_measured(gpu_check, tmp_path, monkeypatch):
    """A GPU run once lost the kernel timings and the test count to a timeout (fla compiling for
    minutes): the rows must say what was measured and how far the tests got."""
    printed = {
        "wkv-bench": "WKV-7  B=4 H=32 N=64\n  ... cuda      T= 4096 bf16 fwd            5.5 ms\n"
                     "  ... cuda      T= 4096 bf16 fwd+bwd       50.4 ms\n  ... fla       T= 4096 bf16 fwd            2.7 ms\n",
        "fla-tests": "tests/test_wkv7_gpu.py::test_fla_conversions_match_reference[True-True] PASSED [ 50%]\n"
                     "tests/test_wkv7_gpu.py::test_fla_matches[1-2-True-True-dtype0] FAILED [ 51%]\n"
                     "tests/test_wkv7_gpu.py::test_operator_under_autocast[fla] ",
    }
    monkeypatch.setattr(gpu_check.Context, "run", lambda self, step, cmd, limit: (None, printed[step], float(limit)))
    gpu_check.main(["--allow-cpu", "--tiny", "--no-install", "--out", str(tmp_path), "--only", "wkv-bench", "fla-tests"])
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert rows["wkv-bench"]["status"] == "fail"
    assert "cuda fwd 5.5 ms, cuda fwd+bwd 50.4 ms, fla fwd 2.7 ms" in rows["wkv-bench"]["detail"]
    assert rows["fla-tests"]["status"] == "fail"
    detail = rows["fla-tests"]["detail"]
    assert "test_operator_under_autocast[fla]" in detail and "1 passed, 1 failed" in detail, detail
