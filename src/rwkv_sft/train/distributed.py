"""torch.distributed plumbing: start/stop the process group, sums across processes, fail-fast.

Started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment, env://
rendezvous, so multi-node needs only torchrun's usual flags): gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import env
from ..utils import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # we started the process group, so we end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str, timeout_s: float, own_group: bool = False) -> Dist:
    """Join the process group when launched by torchrun (or one already started); else one process,
    in a process group of its own on a GPU when `own_group` (FSDP's CPU offload needs one)."""
    world, local_rank = env.world_size(), env.local_rank()
    dev = resolve_device(device, local_rank)
    if world <= 1 and not dist.is_initialized() and not (own_group and dev.type == "cuda"):
        return Dist(device=dev)
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend, timeout = "nccl" if dev.type == "cuda" else "gloo", datetime.timedelta(seconds=timeout_s)
        if world <= 1 and not env.rendezvous_given():  # no torchrun: a store in this process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def teardown(d: Dist, all_finished: bool = True) -> None:
    """End the process group. `all_finished`: every process got here the same way (not through
    an interruption), so they can meet once more first."""
    if d.owns_group and dist.is_initialized():
        if all_finished and d.device.type == "cpu":
            # gloo's worker threads drop their last finished collective after waking the caller,
            # and dropping a Python-visible tensor needs the GIL; a process group destroyed
            # meanwhile (joining those threads, GIL held) deadlocks, as seen at the end of
            # 2-process runs. A barrier, then a moment without the GIL, lets them finish first.
            dist.barrier()
            time.sleep(0.05)
        dist.destroy_process_group()


def all_sum(d: Dist, values: list[float], device=None) -> list[float]:
    """Element-wise sum of a few numbers over all processes (identity in one process)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or d.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def abort(d: Dist, exc: BaseException, exit_code: int) -> None:
    """A process failed: say so and exit at once, so that the others (blocked in a collective)
    see the connection drop and fail too instead of waiting for the timeout; torchrun then
    stops the rest of the job."""
    sys.stderr.write(f"rwkv-sft train [rank {d.rank}/{d.world_size}]: {type(exc).__name__}: {exc}\n")
    if not isinstance(exc, Exception) or type(exc).__name__ != "UserError":
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    if dist.is_initialized():  # a clean shutdown if it is quick; never wait long for it
        t = threading.Thread(target=dist.destroy_process_group, daemon=True)
        t.start()
        t.join(timeout=5.0)
    os._exit(exit_code)
