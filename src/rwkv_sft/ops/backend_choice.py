"""`--wkv-backend auto` on a GPU: the fastest WKV-7 backend installed, for the shape, by measurement.

Which kernel wins depends on the shape (a sequential kernel on short rows and few heads, a chunked
one on long rows), the GPU and the installed versions, so nothing here guesses: the first call in
a shape class times forward + backward of every usable backend on that call's own shape and keeps
the fastest. The result is cached per machine in `cache_home()/wkv7_choice.json` (keyed by GPU,
torch and fla versions) so later runs pay nothing, and the file is written under a lock while
measuring, so the processes of one run on one machine agree.

Shape classes: rows of 2^k tokens and 2^k batch x heads (the padded lengths of a training run
fall in a handful of classes), head size, dtype, and whether a state comes in or rows are packed.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

_memory: dict[str, str] = {}  # key -> backend, this process's view of the file


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def shape_key(device: torch.device, B: int, T: int, H: int, N: int, dtype: torch.dtype,
              with_state: bool, with_resets: bool) -> str:
    """The shape class of a call on `device`, with what decides the timings: GPU, torch and fla."""
    try:
        from importlib.metadata import version
        fla = version("flash-linear-attention")
    except Exception:
        fla = "none"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"{gpu}|torch {torch.__version__}|fla {fla}|{str(dtype).removeprefix('torch.')}"
            f"|N{N}|T{_pow2(T)}|BH{_pow2(B * H)}|state {int(with_state)}|resets {int(with_resets)}")


def cache_file() -> Path:
    from ..env import cache_home
    return cache_home() / "wkv7_choice.json"


def choose(key: str, candidates: list[str], measure: Callable[[str], float], path: Path | None = None) -> str:
    """The fastest of `candidates` for `key`: from this process's memory, else the cache file,
    else by calling `measure(name) -> seconds` for each (a candidate that raises is left out) and
    recording the winner. One candidate needs no measurement."""
    if len(candidates) == 1:
        return candidates[0]
    if key in _memory and _memory[key] in candidates:
        return _memory[key]
    from filelock import FileLock
    path = cache_file() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        table = _read(path)
        if table.get(key, {}).get("backend") not in candidates:
            timings = {}
            for name in candidates:
                try:
                    timings[name] = measure(name)
                except Exception as e:  # a backend that fails here is not chosen; say why once
                    import warnings
                    warnings.warn(f"WKV-7 backend {name} left out of `auto` for {key}: {e}")
            if not timings:
                raise RuntimeError(f"no WKV-7 backend ran for {key}")
            best = min(timings, key=timings.get)
            table[key] = {"backend": best, "seconds": timings}
            from ..utils import atomic_write
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        _memory[key] = table[key]["backend"]
    return _memory[key]


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):  # absent, or unreadable: measure again and rewrite it
        return {}


@torch.inference_mode(False)
@torch.enable_grad()
def measure_backend(name: str, B: int, T: int, H: int, N: int, dtype: torch.dtype, device: torch.device,
                    with_state: bool, with_resets: bool, repeats: int = 3) -> float:
    """Median seconds of forward + backward of backend `name` on random inputs of this shape, after one
    warm-up call (compilation, autotuning). Shielded from the caller's autocast and from
    activation checkpointing's saved-tensor hooks, like the CUDA kernel's self-check."""
    from .amp import no_autocast
    from .backends import load_backend
    from .wkv7_cuda import example_inputs
    fn = load_backend(name)
    xs = [x.requires_grad_() for x in example_inputs(B, T, H, N, device=device, dtype=dtype)]
    state = torch.zeros(B, H, N, N, device=device, requires_grad=True) if with_state else None
    resets = None
    if with_resets:
        resets = torch.zeros(B, T, dtype=torch.bool, device=device)
        resets[:, T // 2] = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with no_autocast(device.type), torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            y, s = fn(*xs, state=state, resets=resets)
            (y.float().sum() + s.sum()).backward()
            sync()
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
