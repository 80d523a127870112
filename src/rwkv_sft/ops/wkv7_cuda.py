"""WKV-7 on the GPU with our own CUDA kernel (csrc/wkv7.cu), built on first use.

`cuda_kernel_usable(device)` builds the kernel and checks it against the reference once per
device; any failure (no nvcc, no ninja, no compiler, a compile error, a wrong result) warns once
and returns False, so `backend="auto"` falls back to the portable chunked backend.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from .. import env

CSRC = Path(__file__).parent / "csrc"
HEAD_SIZES = (64,)  # instantiated in wkv7.cu

_modules: dict[tuple[int, int], object] = {}  # (major, minor) -> built extension
_usable: dict[int, bool] = {}  # device index -> passed build and self-check


def build_dir(capability: tuple[int, int]) -> Path:
    """One build directory per torch version, CUDA version and GPU architecture."""
    tag = f"{torch.__version__}-cu{torch.version.cuda}-sm{capability[0]}{capability[1]}"
    return env.cache_home() / "torch_extensions" / tag.replace("+", "_")


def extension_name(capability: tuple[int, int], csrc: Path | None = None) -> str:
    """The module name of a build. torch numbers the builds of one name within a process (a second
    set of sources under it becomes name_v1), so sources other than ours get a name of their own."""
    name = f"rwkv_sft_wkv7_sm{capability[0]}{capability[1]}"
    if csrc is not None and Path(csrc).resolve() != CSRC.resolve():
        name += "_" + hashlib.sha1(str(Path(csrc).resolve()).encode()).hexdigest()[:10]
    return name


def missing_tools() -> list[str]:
    """What the JIT build needs and cannot find."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    missing = []
    if CUDA_HOME is None or shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin")) is None:
        missing.append("nvcc (install the CUDA toolkit matching torch's CUDA, or set CUDA_HOME)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    compiler = "cl" if os.name == "nt" else env.cxx_compiler()
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler}; on Windows run from a Visual Studio developer prompt)")
    return missing


@contextmanager
def _build_lock(directory: Path):
    """One build at a time per build folder. torch's own lock is a plain file: a build killed
    half-way (Ctrl-C, a timeout) leaves it behind, and every later process waits on it. An OS
    file lock dies with its holder, so whoever holds it knows that a torch lock file found is
    such debris."""
    with FileLock(directory / "build.flock"):  # waits while another process builds
        lock = directory / "lock"
        if lock.exists():
            warnings.warn(f"removing {lock}, left behind by a build that did not finish")
            lock.unlink(missing_ok=True)
        yield


def build_extension(capability: tuple[int, int], csrc: Path | None = None, verbose: bool = False):
    """JIT-build (or load the cached build of) the kernel for one GPU architecture.

    Raises RuntimeError naming what is missing or what failed.
    """
    csrc = csrc or CSRC
    sources = [csrc / "wkv7_op.cpp", csrc / "wkv7.cu", csrc / "wkv7.h"]
    absent = [str(s) for s in sources if not s.is_file()]
    if absent:
        raise RuntimeError(f"WKV-7 CUDA sources not found: {', '.join(absent)}")
    missing = missing_tools()
    if missing:
        raise RuntimeError("cannot build the WKV-7 CUDA kernel, missing: " + "; ".join(missing))
    from torch.utils.cpp_extension import load
    directory = build_dir(capability)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with env.cuda_arch_list(f"{capability[0]}.{capability[1]}"), _build_lock(directory):  # this GPU only
            return load(name=extension_name(capability, csrc),
                        sources=[str(s) for s in sources[:2]], build_directory=str(directory),
                        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-Xptxas=-O3"], verbose=verbose)
    except Exception as e:
        # torch puts ninja's whole output in the message: keep the compiler's error lines
        lines = str(e).strip().splitlines() or [type(e).__name__]
        detail = " | ".join([ln.strip() for ln in lines if "error" in ln.lower()][:3] or lines[-1:])
        raise RuntimeError(f"building the WKV-7 CUDA kernel in {directory} failed: {detail} "
                           "(build_extension(..., verbose=True) shows the full output)") from e


def _extension(device: torch.device):
    capability = torch.cuda.get_device_capability(device)
    if capability not in _modules:
        _modules[capability] = build_extension(capability)
    return _modules[capability]


def example_inputs(B, T, H, N, device="cpu", dtype=torch.float32, seed=0):
    """Inputs shaped like the model's: decay in RWKV-7's range, a = -kk, b = kk * sigmoid(.)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(B, T, H, N, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rand(), rand() * 0.5, rand()
    w = -torch.nn.functional.softplus(-rand()) - 0.5
    kk = torch.nn.functional.normalize(rand(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rand())
    return [x.to(device=device, dtype=dtype) for x in (r, w, k, v, a, b)]


@torch.inference_mode(False)
@torch.enable_grad()  # the first call may come from generation code under no_grad
def _self_check(device: torch.device) -> None:
    """Forward and backward of the kernel against the float64 reference on a small ragged input.

    The first call comes from inside the model's forward, so it is shielded from what the caller
    has switched on there: autocast (which would run the reference's einsums in bf16), TF32
    matmuls (float64 has none) and activation checkpointing's saved-tensor hooks (which would
    count this check's tensors as the layer's and fail the recomputation)."""
    from .amp import no_autocast
    from .wkv7_reference import wkv7_reference
    _extension(device)  # a build failure says so before anything else
    B, T, H, N = 2, 37, 2, 64  # 37: two full chunks and a tail
    inputs = example_inputs(B, T, H, N, device=device)
    g = torch.Generator().manual_seed(1)
    state, dstate = (torch.randn(B, H, N, N, generator=g).to(device) for _ in range(2))
    dy = torch.randn(B, T, H, N, generator=g).to(device)
    resets = torch.zeros(B, T, dtype=torch.bool, device=device)
    resets[1, 20] = True
    resets[0, [3, 30]] = True
    restart = torch.randn(H, N, N, generator=g).to(device) * 0.1
    results = []
    with no_autocast(device.type), torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        for fn, dtype in ((wkv7_cuda, torch.float32), (wkv7_reference, torch.float64)):
            xs = [x.to(dtype).clone().requires_grad_() for x in inputs + [state * 0.1, restart]]
            y, s = fn(*xs[:6], state=xs[6], resets=resets, reset_state=xs[7])
            torch.autograd.backward((y, s), (dy.to(dtype), dstate.to(dtype)))
            results.append([t.detach() for t in [y, s] + [x.grad for x in xs]])  # compared off the graph
    names = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate", "dreset"]
    for name, got, want in zip(names, *results):
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        if not err < 1e-3:
            raise RuntimeError(f"self-check failed: {name} differs from the reference (relative error {err:.2e})")


def cuda_kernel_usable(device) -> bool:
    """True when the kernel builds for this GPU and matches the reference (checked once per device)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _usable:
        try:
            _self_check(torch.device("cuda", index))  # builds on the way
            _usable[index] = True
        except Exception as e:
            warnings.warn(f"WKV-7 CUDA kernel disabled on cuda:{index}, falling back to the chunked "
                          f"backend: {e}")
            _usable[index] = False
    return _usable[index]


class _WKV7(torch.autograd.Function):
    """Inputs already contiguous, of one dtype (fp32 or bf16); states fp32; resets uint8 or empty;
    reset_state [B,H,N,N] or empty (restart from zero).
    Autocast cannot reach it: the kernel is no autocast-aware op, the casts are explicit."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, resets, reset_state, keep_snapshots):
        ext = _extension(r.device)
        stream = torch.cuda.current_stream(r.device).cuda_stream
        y, state_out, snaps = ext.forward(r, w, k, v, a, b, state, resets, reset_state, keep_snapshots, stream)
        ctx.save_for_backward(r, w, k, v, a, b, snaps, resets, reset_state)
        return y, state_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dstate):
        r, w, k, v, a, b, snaps, resets, reset_state = ctx.saved_tensors
        ext = _extension(r.device)
        stream = torch.cuda.current_stream(r.device).cuda_stream
        with torch.cuda.device(r.device):
            *grads, dreset = ext.backward(r, w, k, v, a, b, dy.to(r.dtype).contiguous(),
                                          dstate.float().contiguous(), snaps, resets, reset_state, stream)
        return *grads, None, dreset if reset_state.numel() else None, None


def kernel_arguments(r, w, k, v, a, b, state=None, resets=None, reset_state=None):
    """The operands as the kernel reads them: the six inputs in one dtype (bf16 when r is, else
    fp32), the state fp32 (zeros when None), resets as uint8 and the reset state one per row, fp32
    (each empty when absent); all contiguous, on r's device."""
    B, T, H, N = r.shape
    dtype = torch.bfloat16 if r.dtype == torch.bfloat16 else torch.float32
    xs = [x.to(dtype).contiguous() for x in (r, w, k, v, a, b)]
    state = (torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device) if state is None
             else state.float().contiguous())
    flags = (torch.empty(0, dtype=torch.uint8, device=r.device) if resets is None
             else resets.to(device=r.device, dtype=torch.uint8).contiguous())
    if reset_state is None or resets is None:
        reset_state = torch.empty(0, dtype=torch.float32, device=r.device)
    else:  # one per row, as the kernel reads it; autograd sums a shared state's gradient
        reset_state = reset_state.float().expand(B, H, N, N).contiguous()
    return xs, state, flags, reset_state


def wkv7_cuda(r, w, k, v, a, b, state=None, resets=None, reset_state=None):
    """WKV-7 with the CUDA kernel; same contract as wkv7_reference (inputs on one GPU)."""
    B, T, H, N = r.shape
    if not r.is_cuda:
        raise ValueError("the cuda WKV-7 backend needs CUDA tensors; use backend='chunked' on CPU")
    if N not in HEAD_SIZES:
        raise ValueError(f"the cuda WKV-7 backend supports head size {HEAD_SIZES}, got {N}")
    xs, state, flags, reset_state = kernel_arguments(r, w, k, v, a, b, state, resets, reset_state)
    if T == 0:
        return r.new_zeros(r.shape), state
    # the snapshots for the backward cost memory: keep them only when a gradient can be asked for
    keep = torch.is_grad_enabled() and any(x.requires_grad for x in xs + [state, reset_state])
    with torch.cuda.device(r.device):
        y, state_out = _WKV7.apply(*xs, state, flags, reset_state, keep)
    return y.to(r.dtype), state_out
