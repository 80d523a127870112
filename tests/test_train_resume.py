"""Checkpoints: exact resume after SIGTERM (in-process and in a subprocess), atomic saves."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_helpers import metric_lines, tiny_config, tiny_data

from rwkv_sft.train import checkpoint as ckpt
from rwkv_sft.train import train

STEPS = 6
SETTINGS = dict(max_steps=STEPS, save_every=2, keep_last=2, wkv_backend="chunked")


def _sigterm_on_optimizer_step(n):
    """Patch AdamW.step so that its n-th call sends SIGTERM to this process (a kill mid-run)."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **k)
    return original, step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bit-identical needs the same reduction order in every run: one thread, so that a BLAS
    that adapts its thread count to the machine's load (MKL_DYNAMIC) cannot change it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("straight")
    return train(tiny_config(out, **SETTINGS), data=tiny_data())


def _assert_bit_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_after_sigterm_in_process_is_bit_identical(tmp_path, monkeypatch, straight_run):
    original, patched = _sigterm_on_optimizer_step(3)
    monkeypatch.setattr(torch.optim.AdamW, "step", patched)
    first = train(tiny_config(tmp_path, **SETTINGS), data=tiny_data())
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert first.interrupted and first.steps == 3
    assert first.checkpoint.name == "step_000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    second = train(tiny_config(tmp_path, resume="auto", **SETTINGS), data=tiny_data())
    assert second.steps == STEPS and not second.interrupted
    _assert_bit_identical(second.model, straight_run.model)
    # the log has one train line per step, the redone steps not duplicated
    steps = [m["step"] for m in metric_lines(tmp_path) if m["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))


_CHILD = '''
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_train_helpers import tiny_config, tiny_data
from rwkv_sft.train import train
original, calls = torch.optim.AdamW.step, [0]
def step(self, *a, **k):
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *a, **k)
torch.optim.AdamW.step = step
torch.set_num_threads(1)
r = train(tiny_config({out!r}, **{settings!r}), data=tiny_data())
print("STOPPED_AT", r.steps, r.interrupted)
'''


def test_resume_after_sigterm_in_subprocess_is_bit_identical(tmp_path, straight_run):
    code = _CHILD.format(tests=str(Path(__file__).parent), out=str(tmp_path), settings=SETTINGS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STOPPED_AT 4 True" in proc.stdout
    assert "SIGTERM" in proc.stdout  # the summary says how it stopped and how to continue
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_000002", "step_000004"]
    resumed = train(tiny_config(tmp_path, resume="auto", **SETTINGS), data=tiny_data())
    assert resumed.steps == STEPS
    _assert_bit_identical(resumed.model, straight_run.model)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, straight_run):
    original_save, calls = torch.save, {"n": 0}

    def crashing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half a file, then the process "dies"
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise KeyboardInterrupt("killed while saving")
        return original_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, **SETTINGS), data=tiny_data())
    monkeypatch.setattr(torch, "save", original_save)
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000002"]
    assert list(root.glob(".tmp_step_*")), "the interrupted save left its temporary directory"
    (root / "step_000099").mkdir()  # a partial directory from some other crash: no COMPLETE marker
    (root / "step_000099" / "state.pt").write_bytes(b"garbage")
    assert ckpt.load_checkpoint(root / "step_000002")["step"] == 2
    assert ckpt.find_resume("auto", root).name == "step_000002"
    resumed = train(tiny_config(tmp_path, resume="auto", **SETTINGS), data=tiny_data())
    assert resumed.steps == STEPS and not list(root.glob(".tmp_step_*"))
    _assert_bit_identical(resumed.model, straight_run.model)


def test_checkpoint_loads_with_weights_only_and_holds_everything(straight_run):
    root = straight_run.out_dir / "checkpoints"
    names = [p.name for p in ckpt.list_checkpoints(root)]
    assert names == ["step_000004", "step_000006"]  # keep_last=2
    state = torch.load(root / "step_000006" / "state.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "data", "config", "metrics"} <= state.keys()
    assert state["scheduler"]["step"] == STEPS
    json.dumps(state["config"])  # plain types only
    assert len(state["metrics"]["history"]) == STEPS
