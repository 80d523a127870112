"""Small shared helpers."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from .errors import UserError


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never a partial file. The
    file gets the mode the umask gives, as open() would: mkstemp's is 0600 (owner only), and some
    writers (safetensors) replace the file they are given with another of that mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o077)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def refuse_overwrite(sources, target, overwrite: bool) -> None:
    """A command that writes `target` from `sources` never replaces one of them (the same file,
    also through a symbolic or hard link), and replaces another existing file only if asked."""
    target = Path(target)
    if not target.exists():
        return
    for source in sources:
        if source is not None and Path(source).exists() and os.path.samefile(source, target):
            raise UserError(f"{target}: is the input {source}; write the output to another file")
    if not overwrite:
        raise UserError(f"{target}: already exists; give --overwrite to replace it")


def set_heap_policy(low_memory: bool) -> bool:
    """How glibc treats the large blocks a CPU training step allocates and frees.

    Default (speed): keep freed blocks up to 512 MiB for reuse instead of returning them to the
    OS; every step allocates the same buffers (gradients of the embedding and head, chunks of
    logits), and a fresh mmap for each would pay page faults on tens of MB per step.
    low_memory: every block from 4 MiB up is its own mmap, returned on free. The heap then cannot
    fragment between activations of different sizes (a 2.9B LoRA run with activation
    checkpointing peaks several GiB higher without this), at the price of those page faults.
    Returns False where this is not glibc (nothing changes).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if low_memory:
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 4 << 20))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 512 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU when CUDA is available, else the CPU; one-line errors for a
    name torch does not know or a GPU that is not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r}: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
