"""Two torchrun "nodes" on one machine, as on two machines (`--nnodes 2 --rdzv-backend c10d`): an
fsdp run whose second node is killed mid-run; both nodes started again with `--resume auto`
finish it with the losses of one uninterrupted process."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_dist import _free_port
from test_train_helpers import metric_lines

from rwkv_sft.cli import main

STEPS = 8


def _args(data, out):
    return ["train", "--data", str(data), "--out", str(out), "--n-layer", "2", "--n-embd", "64", "--max-len", "64",
            "--batch-tokens", "128", "--step-tokens", "48", "--max-steps", str(STEPS), "--save-every", "2",
            "--keep-last", "8", "--lr", "1e-3", "--precision", "fp32", "--no-progress", "--set", "export=[]",
            "--set", "dist_timeout_s=60"]


def _nodes(args, log_dir, tag):
    """Both nodes of one launch."""
    port, env = _free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for node in range(2):
        log = open(log_dir / f"{tag}_node{node}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", tag,
             "--max-restarts", "0", "-m", "rwkv_sft", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def _kill_node(pid):
    """SIGKILL torchrun and its worker (which runs in a session of its own), as a machine dies."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _wait(procs, limit_s=300):
    deadline = time.monotonic() + limit_s
    try:
        return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_node(p.pid)


def _logs(log_dir, tag):
    return "\n".join((log_dir / f"{tag}_node{node}.log").read_text()[-3000:] for node in range(2))


def _losses(out):
    return [m["loss"] for m in metric_lines(out) if m["kind"] == "train"]


@pytest.mark.slow
def test_two_nodes_one_killed_both_resumed(tmp_path):
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(60):
            f.write(json.dumps({"context": f"{i} + {2 * i} =", "completion": f" {3 * i}"}) + "\n")
    assert main(_args(data, tmp_path / "one")) == 0
    reference = _losses(tmp_path / "one")
    assert len(reference) == STEPS

    out = tmp_path / "two"
    procs = _nodes([*_args(data, out), "--parallel", "fsdp"], tmp_path, "first")
    first, deadline = out / "checkpoints" / "step_000002" / "COMPLETE", time.monotonic() + 300
    while not first.exists() and procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_node(procs[1].pid)
    codes = _wait(procs)
    assert codes[0] != 0 and first.exists(), (codes, _logs(tmp_path, "first"))
    assert not (out / "checkpoints" / f"step_{STEPS:06d}").exists()

    codes = _wait(_nodes([*_args(data, out), "--parallel", "fsdp", "--resume", "auto"], tmp_path, "again"))
    log = _logs(tmp_path, "again")
    assert codes == [0, 0], log
    assert "resuming from" in log
    assert _losses(out) == pytest.approx(reference, rel=1e-5)
