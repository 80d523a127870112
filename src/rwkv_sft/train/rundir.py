"""The run directory (--out): one run per directory, locked while it trains.

A fresh run refuses a directory that holds another run (unless `overwrite`, which deletes that
run's files first); `resume` continues the run whose checkpoint it names, and refuses, in one
line and before anything is loaded, settings that a resume cannot change (see RESUME_FIXED).
The resolved settings are written to OUT/config.yaml only once the run is known to start.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import yaml
from filelock import FileLock, Timeout

from ..errors import UserError
from ..utils import atomic_write
from . import checkpoint as ckpt

LOCK_FILE = ".lock"
# what a run writes into its directory (--overwrite deletes these, and in the folders only its own files)
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.png", "tensorboard", "config.yaml", "model.pth",
             "model.safetensors", "model.hf", "wandb", "adapter.safetensors", "state.pth")
# settings a resume cannot change: the model's shape and its trainable parts, and the batches of every
# step (the data itself is compared by fingerprint; a --model file by its shapes when the checkpoint's
# weights load, or, for an adapter, by the base's fingerprint); everything else (epochs, max_steps,
# lr, schedule, evaluation, checkpoints, precision, device, ...) takes the new value
RESUME_FIXED = ("model_config", "freeze", "batch_tokens", "packing", "step_tokens", "seed", "objective", "beta",
                "simpo_gamma")


def make_out_dir(out: Path) -> None:
    """Create --out, with one-line errors for a path that cannot be a writable directory."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {out}: {'it' if p == out else p} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the directory is not writable")


@contextlib.contextmanager
def locked(out: Path, enabled: bool = True):
    """Hold OUT/.lock while the run trains; a second run is refused, naming the holder (written
    into the file). The OS releases the lock when its process dies, so a stale file never blocks."""
    if not enabled:
        yield
        return
    make_out_dir(out)
    path = out / LOCK_FILE
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"--out {out}: another run is training into this directory ({_holder(path)}); wait for "
                        f"it to end or choose another --out") from None
    except OSError as e:
        raise UserError(f"--out {out}: cannot create {LOCK_FILE} ({e.strerror})") from None
    try:
        with contextlib.suppress(OSError):  # the name of the holder is for people; the lock works without it
            path.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
        yield
    finally:
        lock.release()  # the file stays (removing it would race with the next run's lock)


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "another process"
    except OSError:  # Windows: the holder's lock keeps others from reading
        return "another process"


def _owned(folder: Path) -> list[Path]:
    """What a run wrote into one of its folders: checkpoints (and interrupted saves) in
    checkpoints/, TensorBoard's event files in tensorboard/; anything else there is the user's."""
    if not folder.is_dir():
        return []
    if folder.name == "checkpoints":
        return [p for p in folder.iterdir() if ckpt.is_step_dir(p.name) or p.name.startswith(".tmp_step_")]
    return list(folder.glob("events.out.tfevents.*"))


def run_files(out: Path) -> list[str]:
    """The files of a run present in `out`."""
    return [name for name in RUN_FILES if (out / name).is_file() or _owned(out / name)]


def _describe(out: Path, found: list[str]) -> str:
    newest = ckpt.list_checkpoints(out / "checkpoints")
    return f"checkpoints up to {newest[-1].name}" if newest else ", ".join(found)


def _clear(out: Path, found: list[str]) -> None:
    """Delete the run's own files, nothing a user put beside them (a folder goes once it is empty)."""
    for name in found:
        path = out / name
        if not path.is_dir():
            path.unlink()
            continue
        for p in _owned(path):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if not any(path.iterdir()):
            path.rmdir()


def start(config, out: Path, is_main: bool) -> Path | None:
    """Decide fresh run or resume: the checkpoint to resume from, or None. Refuses to mix two runs
    in one directory; with `overwrite` deletes the old run's files (on the main process)."""
    root = out / "checkpoints"
    resume_from = ckpt.find_resume(config.resume, root)
    found = run_files(out) if out.is_dir() else []
    own = resume_from is not None and resume_from.resolve().parent == root.resolve()
    if found and not own:
        finished = any(name.startswith("model.") or name == "adapter.safetensors" for name in found)
        if config.overwrite and config.model and out.resolve() in Path(config.model).resolve().parents:
            raise UserError(f"--model {config.model} lies inside --out {out}, which --overwrite would delete: "
                            f"copy it elsewhere or choose another --out")
        if config.overwrite or (config.resume == "auto" and not finished):
            if is_main:  # overwrite, or a run stopped before its first checkpoint: start over
                if not config.overwrite:
                    print(f"rwkv-sft train: no checkpoint in {root}; starting over", flush=True)
                _clear(out, found)
        else:
            what = "nothing to resume there" if config.resume == "auto" else "continue it with --resume auto"
            raise UserError(f"--out {out} already holds a run ({_describe(out, found)}): {what}, or start over "
                            f"with --overwrite (deletes it), or choose another --out")
    if is_main:
        ckpt.remove_partial(root)
    return resume_from


def check_resume(saved: dict, config, source: Path) -> None:
    """Refuse a resume whose settings change what the checkpoint's run was (one line)."""
    now = config.to_dict()
    for key in RESUME_FIXED:
        if key in saved and saved[key] != now[key]:
            raise UserError(f"--resume: {key} was {saved[key]!r} in the run of {source}, now {now[key]!r}; a resume "
                            f"keeps the model, its frozen parts, the data and the batches (it may change epochs, "
                            f"max_steps, lr, the schedule, evaluation and checkpoints): undo the change, or start "
                            f"a new run (another --out, or --overwrite)")


def data_fingerprint(examples) -> str:
    """Hash of the training examples as the batches see them: tokens, loss flags, truncation, weights."""
    h = hashlib.blake2b(digest_size=16)
    for ids, flags in examples.shards:
        h.update(memoryview(np.ascontiguousarray(ids)).cast("B"))
        h.update(memoryview(np.ascontiguousarray(flags)).cast("B"))
    for array in (examples.shard, examples.begin, examples.end, examples.weights):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def check_resume_data(saved: str | None, fingerprint: str, source: Path) -> None:
    if saved is not None and saved != fingerprint:
        raise UserError(f"--resume: the training data differs from the run of {source} (files, contents, weights "
                        f"or truncation); a resume continues that run's batches: give the same data, or start a "
                        f"new run (another --out, or --overwrite)")


def check_resume_steps(step: int, total: int, source: Path, config, announce: bool = True) -> None:
    """A resume past the end of the new plan is an error; at its end, there is nothing to train."""
    more = "raise --max-steps (it overrides --epochs)" if config.max_steps else "raise --epochs or give --max-steps"
    if step > total:
        raise UserError(f"--resume: {source} is at step {step}, past the {total} steps this run plans; {more}")
    if step == total and announce:
        print(f"rwkv-sft train: {source} already finished all {total} steps; nothing to train ({more} to "
              f"continue)", flush=True)


def finished(out: Path, resume_from: Path, exports) -> bool:
    """Is a resume at the end of its plan one that has nothing to write? It resumes the newest
    checkpoint of `out` and the run's `exports` (model.pth, ...) are there; otherwise (an older
    checkpoint, an export that a signal prevented) it writes what the run's end writes."""
    newest = ckpt.list_checkpoints(out / "checkpoints")
    return (bool(newest) and newest[-1].resolve() == resume_from.resolve()
            and all((out / f"model.{kind}").is_file() for kind in exports))


def write_config(out: Path, config) -> None:
    """OUT/config.yaml: the resolved settings, themselves a valid --config (to resume, add --resume auto)."""
    d = config.to_dict()
    d["overwrite"] = False  # re-running the saved config must never delete its own run
    with atomic_write(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(d, sort_keys=False))
