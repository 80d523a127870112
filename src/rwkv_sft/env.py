"""Every environment variable rwkv-sft reads or sets, one function each (docs/environment.md lists
them for users). Each is read when its function is called, never at import, so that a test or a
caller that changes the environment is heard. No torch here: data/ imports this module.
(One more is read by the CUDA kernel itself: RWKV_SFT_WKV7_SHARED_LIMIT, a test knob.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

_OFF = ("0", "false", "no", "off")


# -- read by rwkv-sft ------------------------------------------------------------------------------

def cache_home() -> Path:
    """XDG_CACHE_HOME: rwkv-sft keeps what it builds and measures in $XDG_CACHE_HOME/rwkv_sft
    (default ~/.cache/rwkv_sft): the compiled kernels and the WKV-7 backend choices."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkv_sft"


def data_cache() -> str | None:
    """RWKV_SFT_CACHE: the folder of tokenized data files (default: cache_home()/data)."""
    return os.environ.get("RWKV_SFT_CACHE") or None


def decode_kernels() -> bool:
    """RWKV_SFT_DECODE_KERNELS: 0 (or false, no, off) decodes on the CPU with the plain-PyTorch
    step instead of the compiled C step (default on; both compute the same)."""
    return os.environ.get("RWKV_SFT_DECODE_KERNELS", "1").strip().lower() not in _OFF


def c_compiler() -> str | None:
    """CC: the C compiler for the CPU decoding kernels (default: the first of cc, gcc, clang)."""
    return os.environ.get("CC") or None


def cxx_compiler() -> str:
    """CXX: the C++ compiler torch builds the CUDA kernel's host code with (default c++)."""
    return os.environ.get("CXX", "c++")


def wandb_project() -> str:
    """WANDB_PROJECT: the Weights & Biases project of `--report-to wandb` (default rwkv-sft)."""
    return os.environ.get("WANDB_PROJECT") or "rwkv-sft"


def world_size() -> int:
    """WORLD_SIZE (set by torchrun): the number of processes of the run (default 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """LOCAL_RANK (set by torchrun): this process's index on its machine, its GPU (default 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rendezvous_given() -> bool:
    """MASTER_ADDR (set by torchrun): present, the process group meets there (torch reads it and
    the other rendezvous variables); absent, a one-process group keeps its store in the process."""
    return "MASTER_ADDR" in os.environ


def shutdown_timeout_given() -> bool:
    """TORCH_ELASTIC_SHUTDOWN_TIMEOUT: set, `rwkv-sft launch` leaves torchrun's wait for stopping
    workers to it (else launch waits up to 300 s, train/launch.py's SHUTDOWN_TIMEOUT_S)."""
    return "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in os.environ


# -- set for the libraries rwkv-sft uses (a value the user set is kept) ------------------------------

def default_huge_pages() -> None:
    """THP_MEM_ALLOC_ENABLE=1 unless set: PyTorch puts large CPU tensors on 2 MiB pages. PyTorch
    reads it once, before its first allocation, so only the command line sets it."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def default_fla_cache() -> None:
    """FLA_CACHE_RESULTS=1 unless set: fla keeps its Triton autotuning across runs."""
    os.environ.setdefault("FLA_CACHE_RESULTS", "1")


@contextlib.contextmanager
def cuda_arch_list(value: str):
    """TORCH_CUDA_ARCH_LIST=value while building the CUDA kernel (for this GPU only); the
    caller's value (or its absence) afterwards."""
    before = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = before
