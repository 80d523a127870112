"""Stopping a multi-process run by a signal, through real processes: each worker (started as torchrun
starts it) finishes its step, saves, prints one summary and exits 128 + the signal; `rwkv-sft launch`
(torchrun's launcher) then exits with that code too, without torchrun's traceback."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from rwkv_sft.cli import main
from rwkv_sft.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"context": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(60)))
    return path


def _train_args(tmp_path, out):
    return ["train", "--data", str(_data(tmp_path)), "--n-layer", "1", "--n-embd", "64", "--out", str(out),
            "--max-steps", "1000", "--batch-tokens", "64", "--no-progress", "--set", "tensorboard=false",
            "--wkv-backend", "chunked"]


def _wait_for_steps(out, procs, timeout=240):
    """Until the run has logged a training step (then the workers are inside the loop)."""
    path, end = out / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and '"kind": "train"' in path.read_text():
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("a worker ended before training: " + "".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.2)
    pytest.fail("no training step logged")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_stopped_and_resumable(out, stdout, name):
    assert stdout.count("training interrupted") == 1 and f"by {name} after saving" in stdout
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert saved, "no checkpoint"
    step = int(saved[-1].name.split("_")[1])
    assert main(["train", "--config", str(out / "config.yaml"), "--resume", "auto", "--max-steps", str(step + 2)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, step + 3))


@pytest.mark.parametrize("signum, ranks", [(signal.SIGINT, [0, 1]), (signal.SIGTERM, [0, 1]), (signal.SIGINT, [1])])
def test_signalled_workers_save_and_exit_with_the_signal_code(tmp_path, signum, ranks):
    """What torchrun does on Ctrl-C / SIGTERM: it sends the signal to each worker (each in its own session).
    A signal to some of the processes (say, on one machine) stops all of them alike."""
    out, port = tmp_path / "run", _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "rwkv_sft", *_train_args(tmp_path, out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    try:
        _wait_for_steps(out, procs)
        for rank in ranks:
            os.killpg(procs[rank].pid, signum)
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 128 + signum, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
    assert "training interrupted" not in results[1][0]  # one summary, from the first process
    _assert_stopped_and_resumable(out, results[0][0], signal.Signals(signum).name)


def test_launch_exits_130_on_ctrl_c_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "rwkv_sft", "launch", "--nproc-per-node", "2",
                                 *_train_args(tmp_path, out)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(out, [launcher])
        launcher.send_signal(signal.SIGINT)  # Ctrl-C reaches the launcher (the workers run in sessions of their own)
        stdout, stderr = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 1000
    _assert_stopped_and_resumable(out, stdout, "SIGINT")
