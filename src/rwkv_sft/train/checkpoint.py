"""Training checkpoints: one directory per step, written atomically, the last `keep_last` kept.

    out_dir/checkpoints/step_000100/state.pt   model, optimizer, schedule, RNG, data position,
                                               config, metrics so far (plain types and tensors,
                                               so torch.load(weights_only=True) reads it)
    out_dir/checkpoints/step_000100/shards/    an fsdp run's model and optimizer instead, one file per
                                               process (torch.distributed.checkpoint)
    out_dir/checkpoints/step_000100/adapter.safetensors, state.pth   a PEFT run's adapter (and learned
                                               state) of this step, as in out_dir (--adapter takes the folder)
    out_dir/checkpoints/step_000100/COMPLETE   written last, inside the temporary directory

A save writes into a hidden temporary directory, fsyncs every file, then renames it into place:
a crash at any moment leaves no directory named step_* that is incomplete, and loading also
insists on the COMPLETE marker (for file systems where rename is not atomic).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

from ..step_checkpoint import MARKER, SHARDS, STATE_FILE, is_checkpoint, load_checkpoint, model_weights  # noqa: F401 (reading)
_STEP_DIR = re.compile(r"step_(\d+)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(root, step: int) -> Path:
    """Where a save of `step` is written before it is renamed into place."""
    return Path(root) / f".tmp_step_{step:06d}_{os.getpid()}"


def save_checkpoint(root, step: int, payload: dict, keep_last: int, tmp: Path | None = None) -> Path:
    """Write `payload` as root/step_{step:06d}; delete all but the newest keep_last complete ones.
    `tmp`: a temp_dir() that already holds other files of this checkpoint (shards), kept with it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    if tmp is None:
        tmp = temp_dir(root, step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    torch.save(payload, tmp / STATE_FILE)
    if payload.get("adapter") is not None:  # a PEFT step: its own adapter (and state) file, usable as it is
        from ..adapters.files import AdapterSettings
        from ..adapters.training import write_outputs
        saved = payload["adapter"]
        write_outputs(tmp, payload["model"], AdapterSettings(**saved["settings"]), saved["base"])
    (tmp / MARKER).write_text(f"{step}\n")
    for f in sorted(tmp.rglob("*"), key=lambda f: f.name == MARKER) + [tmp]:  # every file, the marker last
        _fsync(f)
    if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_step_dir(name: str) -> bool:
    """The name of a checkpoint directory, step_N."""
    return _STEP_DIR.fullmatch(name) is not None


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoint directories under root, oldest first (partial ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / MARKER).is_file() and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def remove_partial(root) -> None:
    """Delete temporary directories that an interrupted save left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)


def find_resume(resume: str | None, root) -> Path | None:
    """"auto" -> newest complete checkpoint under root (None if there is none); a path -> that one."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_file():
        path = path.parent
    if not is_checkpoint(path):
        raise UserError(f"{resume}: not a complete training checkpoint (expected a directory with {STATE_FILE} and {MARKER})")
    return path


# -- random number generators, as tensors and plain types (weights_only-safe) ----------------------
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
