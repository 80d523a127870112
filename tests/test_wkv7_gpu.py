"""The CUDA and fla WKV-7 backends.

Without a GPU this file still checks what it can: the kernel source compiles for sm_80 and sm_90
(nvcc) and its binding against torch's headers (g++); a plain-PyTorch mirror of the kernel's
backward algorithm matches autograd in float64; the kernels' own code, compiled by g++ through a
shim (a std::thread per CUDA thread, a barrier per __syncthreads, shuffles through memory), matches the reference; the fla
convention conversions (state transpose, resets -> cu_seqlens) match the reference through a
stand-in for chunk_rwkv7; a failing build or a failing self-check disables the kernel with a clear
message. The comparisons on a GPU skip without one.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from rwkv_sft.ops import wkv7_cuda as cuda_mod
from rwkv_sft.ops import wkv7_fla as fla_mod
from rwkv_sft.ops.wkv7_cuda import example_inputs
from rwkv_sft.ops.wkv7_reference import wkv7_reference

NAMES = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_case(B, T, H, N, with_state=True, with_resets=True, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    inputs = example_inputs(B, T, H, N, device=device, dtype=dtype, seed=seed)
    state = (torch.randn(B, H, N, N, generator=g) * 0.2).to(device) if with_state else None
    resets = None
    if with_resets:
        resets = torch.rand(B, T, generator=g) < 0.1
        resets[0, 0] = True  # a reset on the first token discards the initial state
        resets = resets.to(device)
    return inputs, state, resets


def run_with_grads(fn, inputs, state, resets, seed=1):
    """y, final state and the gradients of a random linear function of both."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    state_dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    s0 = None if state is None else state.detach().to(state_dtype).requires_grad_()
    y, sT = fn(*xs, state=s0, resets=resets)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g).to(y)
    dsT = torch.randn(sT.shape, generator=g).to(sT)
    torch.autograd.backward((y, sT), (dy, dsT))
    grads = [x.grad for x in xs] + [None if s0 is None else s0.grad]
    return [y.detach(), sT.detach()] + grads, dy, dsT


# ---- a plain-PyTorch mirror of wkv7_backward_kernel (csrc/wkv7.cu), step for step ----

def backward_mirror(r, w, k, v, a, b, state, resets, dy, dstate, chunk=16, sub=8):
    """The kernel's backward algorithm: snapshots every `chunk` steps; for each chunk, last first,
    and each `sub` steps of it, last first, a recomputation from the snapshot that keeps P_t (the
    state a step starts from, after any reset) and sa_t of those steps; G kept twice (thread n's
    row, Grow[n, j] = G[n][j], and column, Gcol[n, j] = G[j][n]) with each reduction done the way
    the kernel does it. Batched over (B,H,n)."""
    B, T, H, N = r.shape
    ew = torch.exp(w)
    d = torch.exp(-ew)
    keep = torch.ones(B, T, dtype=r.dtype) if resets is None else (~resets).to(r.dtype)
    row = lambda x: x[:, :, None, :]  # x_t[j] seen by every thread n  # noqa: E731
    own = lambda x: x[:, :, :, None]  # x_t[n] of thread n  # noqa: E731

    def step(S, t):  # (P_t, sa_t, S_t)
        P = S * keep[:, t, None, None, None]
        sa = (P * row(a[:, t])).sum(-1)
        return P, sa, P * row(d[:, t]) + own(sa) * row(b[:, t]) + own(v[:, t]) * row(k[:, t])

    # forward kernel: the raw state before every chunk-th step
    S, snaps = state.clone(), []
    for t in range(T):
        if t % chunk == 0:
            snaps.append(S.clone())
        S = step(S, t)[2]

    Grow, Gcol = dstate.clone(), dstate.transpose(-1, -2).clone()
    grads = [torch.zeros_like(r) for _ in range(6)]  # dr, dw, dk, dv, da, db
    for c in reversed(range(len(snaps))):
        t0, t1 = c * chunk, min(T, c * chunk + chunk)
        for u0 in reversed(range(t0, t1, sub)):
            u1, S, kept = min(t1, u0 + sub), snaps[c], {}
            for t in range(t0, u1):
                P, sa, S = step(S, t)
                if t >= u0:
                    kept[t] = P, sa
            for t in reversed(range(u0, u1)):
                P, SA = kept[t]
                kp = keep[:, t, None, None]
                r_t, d_t, k_t, v_t, a_t, b_t, dy_t = (x[:, t] for x in (r, d, k, v, a, b, dy))
                Grow = Grow + own(dy_t) * row(r_t)
                dv = (Grow * row(k_t)).sum(-1)
                dsa = (Grow * row(b_t)).sum(-1)
                Gcol = Gcol + row(dy_t) * own(r_t)
                dk = (Gcol * row(v_t)).sum(-1)
                db = (Gcol * row(SA)).sum(-1)
                Pt = P.transpose(-1, -2)  # thread n: column n
                St = Pt * own(d_t) + row(SA) * own(b_t) + row(v_t) * own(k_t)  # column n of S_t
                dr = (row(dy_t) * St).sum(-1)
                dd = (Gcol * Pt).sum(-1)
                da = (row(dsa) * Pt).sum(-1)
                Grow = (Grow * row(d_t) + own(dsa) * row(a_t)) * kp[..., None]
                Gcol = (Gcol * own(d_t) + row(dsa) * own(a_t)) * kp[..., None]
                for grad, value in zip(grads, (dr, -dd * d_t * ew[:, t], dk, dv, da, db)):
                    grad[:, t] = value
    assert torch.allclose(Grow, Gcol.transpose(-1, -2)), "row and column copies of G diverged"
    return grads + [Grow]


@pytest.mark.parametrize("T,chunk,sub", [(1, 16, 8), (15, 16, 8), (16, 16, 8), (17, 16, 8), (40, 16, 8), (23, 4, 4),
                                         (23, 6, 4)])
@pytest.mark.parametrize("with_state,with_resets", [(True, True), (False, False), (True, False)])
def test_backward_mirror_matches_autograd(T, chunk, sub, with_state, with_resets):
    B, H, N = 2, 2, 8
    inputs, state, resets = random_case(B, T, H, N, with_state, with_resets, seed=T)
    want, dy, dsT = run_with_grads(wkv7_reference, inputs, state, resets)
    s0 = state if state is not None else torch.zeros(B, H, N, N, dtype=torch.float64)
    got = backward_mirror(*inputs, s0, resets, dy, dsT, chunk=chunk, sub=sub)
    for name, g, w in zip(NAMES[2:], got, want[2:]):
        if w is None:
            continue
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"{name} T={T}")


# ---- the sources compile (here: no GPU needed, only nvcc / g++) ----

def _torch_includes():
    from torch.utils.cpp_extension import include_paths
    return [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.slow
def test_kernel_compiles_for_sm80_sm86_and_sm90(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the flags torch's JIT build adds
    cmd = ["nvcc", "-c", "-std=c++20", "-O3", *COMMON_NVCC_FLAGS, "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90,code=sm_90",
           str(cuda_mod.CSRC / "wkv7.cu"), "-o", str(tmp_path / "wkv7.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    symbols = subprocess.run(["nm", str(tmp_path / "wkv7.o")], capture_output=True, text=True).stdout
    for name in ["wkv7_forward_f32", "wkv7_forward_bf16", "wkv7_backward_f32", "wkv7_backward_bf16",
                 "wkv7_chunk_len"]:
        assert f" T {name}\n" in symbols, name  # the unmangled names the binding declares


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.slow
def test_binding_compiles_against_torch_headers():
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=wkv7_check",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *_torch_includes(), str(cuda_mod.CSRC / "wkv7_op.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- the kernels themselves, run on the CPU: wkv7.cu compiled by g++ through a shim ----

EMULATION_SHIM = r"""
// Runs the kernels of wkv7.cu on the CPU: one std::thread per CUDA thread, blocks one after
// another (so __shared__ can be a function-static), __syncthreads as a std::barrier, and a warp
// shuffle as an exchange through memory between two barriers of the lanes it mixes.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
using std::min;
struct dim3_ { int x = 0, y = 0, z = 0; };
static thread_local dim3_ emu_thread, emu_block;
static dim3_ blockDim;
static std::barrier<>* emu_barrier;
#define threadIdx emu_thread
#define blockIdx emu_block
#define __syncthreads() emu_barrier->arrive_and_wait()
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define WKV7_DYNAMIC_SHARED(name) static float name[1 << 16] __attribute__((aligned(16)))
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 x) { uint32_t u = uint32_t(x.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, like the device
    uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return {uint16_t(u >> 16)};
}
static float emu_lanes[1024];
static std::vector<std::unique_ptr<std::barrier<>>> emu_warps;  // one barrier per 32 lanes
inline float __shfl_xor_sync(unsigned, float x, int mask) {
    std::barrier<>& warp = *emu_warps[emu_thread.x / 32];
    emu_lanes[emu_thread.x] = x;
    warp.arrive_and_wait();
    const float other = emu_lanes[emu_thread.x ^ mask];
    warp.arrive_and_wait();
    return other;
}
#define WKV7_HOST_EMULATION
#include "wkv7.cu"

template <class K> static void run_blocks(int blocks, K kernel) {
    const int threads = 64 * ROW_THREADS;
    blockDim.x = threads;
    for (int b = 0; b < blocks; b++) {
        std::barrier<> barrier(threads);
        emu_barrier = &barrier;
        emu_warps.clear();
        for (int w = 0; w < threads / 32; w++) emu_warps.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; t++)
            pool.emplace_back([&, t] { emu_block.x = b; emu_thread.x = t; kernel(); });
        for (auto& th : pool) th.join();
    }
}

template <typename F> static void fwd(int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
    const void* a, const void* b, const float* s0, const uint8_t* resets, const float* s_reset, void* y, float* sT,
    float* snaps) {
    run_blocks(B * H, [&] { wkv7_forward_kernel<F, 64>(T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v,
        (const F*)a, (const F*)b, s0, resets, s_reset, (F*)y, sT, snaps); });
}
template <typename F, int SUB> static void bwd(int B, int T, int H, const void* r, const void* w, const void* k,
    const void* v, const void* a, const void* b, const void* dy, const float* dsT, const float* snaps,
    const uint8_t* resets, const float* s_reset, void* dr, void* dw, void* dk, void* dv, void* da, void* db, float* ds0,
    float* ds_reset) {
    run_blocks(B * H, [&] { wkv7_backward_kernel<F, 64, SUB>(T, H, (const F*)r, (const F*)w, (const F*)k, (const F*)v,
        (const F*)a, (const F*)b, (const F*)dy, dsT, snaps, resets, s_reset, (F*)dr, (F*)dw, (F*)dk,
        (F*)dv, (F*)da, (F*)db, ds0, ds_reset); });
}
#define EMU(SUFFIX, F, SUB)                                                                                     \
extern "C" void emu_forward_##SUFFIX(int B, int T, int H, const void* r, const void* w, const void* k,           \
    const void* v, const void* a, const void* b, const float* s0, const uint8_t* resets, const float* s_reset,  \
    void* y, float* sT, float* snaps) {                                                                         \
    fwd<F>(B, T, H, r, w, k, v, a, b, s0, resets, s_reset, y, sT, snaps); }                                     \
extern "C" void emu_backward_##SUFFIX(int B, int T, int H, const void* r, const void* w, const void* k,          \
    const void* v, const void* a, const void* b, const void* dy, const float* dsT, const float* snaps,          \
    const uint8_t* resets, const float* s_reset, void* dr, void* dw, void* dk, void* dv, void* da, void* db,     \
    float* ds0, float* ds_reset) {                                                                              \
    bwd<F, SUB>(B, T, H, r, w, k, v, a, b, dy, dsT, snaps, resets, s_reset, dr, dw, dk, dv, da, db, ds0, ds_reset); }
EMU(f32, float, 8)
EMU(bf16, __nv_bfloat16, 8)
EMU(f32_sub4, float, 4)  // the backward a GPU with 99 KB of shared memory per block runs
EMU(bf16_sub4, __nv_bfloat16, 4)
"""


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    directory = tmp_path_factory.mktemp("wkv7_emulation")
    (directory / "emu.cpp").write_text(EMULATION_SHIM)
    cmd = ["c++", "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", f"-I{cuda_mod.CSRC}",
           str(directory / "emu.cpp"), "-o", str(directory / "emu.so")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(directory / "emu.so"))


def run_emulated(lib, inputs, state, resets, dy, dsT, dtype, reset_state=None, sub=8):
    """The forward kernel, then the backward kernel from its snapshots (emulated_backend), for the
    given output gradients; with reset_state ([B,H,N,N]) its gradient comes last."""
    B, T, H, N = inputs[0].shape
    xs = [x.to(dtype).requires_grad_() for x in inputs]
    s0 = (state if state is not None else torch.zeros(B, H, N, N)).float().requires_grad_()
    restart = None if reset_state is None else reset_state.float().requires_grad_()
    y, sT = emulated_backend(lib, sub)(*xs, state=s0, resets=resets, reset_state=restart)
    torch.autograd.backward((y, sT), (dy.to(y.dtype), dsT.float()))
    return [y.detach(), sT.detach()] + [x.grad for x in xs] + [s0.grad] + ([] if restart is None else [restart.grad])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,B,with_state,with_resets",
                         [(1, 1, True, True), (16, 1, False, False), (37, 2, True, True)])
def test_kernel_code_on_cpu_matches_reference(emulated_kernels, T, B, with_state, with_resets, dtype):
    inputs, state, resets = random_case(B, T, 1, 64, with_state, with_resets, dtype=dtype, seed=T)
    want, dy, dsT = run_with_grads(wkv7_reference, [x.double() for x in inputs], state, resets)
    got = run_emulated(emulated_kernels, inputs, state, resets, dy, dsT, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the kernel's outputs are rounded
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            continue
        err = ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-6)).item()
        assert err < tol, f"{name}: relative error {err:.2e}"



@pytest.mark.slow
@pytest.mark.parametrize("dtype,sub", [(torch.float32, 8), (torch.bfloat16, 8), (torch.float32, 4)])
def test_kernel_code_on_cpu_with_heads_and_a_reset_state(emulated_kernels, dtype, sub):
    """Several heads (one block each) and resets that restart from a given state, whose gradient
    the backward accumulates: the paths the cases above leave out; sub=4: the backward of GPUs
    with 99 KB of shared memory per block (4 steps' states held at once instead of 8)."""
    B, T, H, N = 2, 26, 2, 64
    inputs, state, resets = random_case(B, T, H, N, True, True, dtype=dtype, seed=5)
    restart = torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(6)) * 0.2
    xs = [x.double().requires_grad_() for x in inputs + [state, restart]]
    y, sT = wkv7_reference(*xs[:6], state=xs[6], resets=resets, reset_state=xs[7])
    g = torch.Generator().manual_seed(7)
    dy, dsT = torch.randn(y.shape, generator=g).double(), torch.randn(sT.shape, generator=g).double()
    torch.autograd.backward((y, sT), (dy, dsT))
    want = [y.detach(), sT.detach()] + [x.grad for x in xs]
    got = run_emulated(emulated_kernels, inputs, state, resets, dy, dsT, dtype, reset_state=restart, sub=sub)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, gv, wv in zip(NAMES + ["dreset"], got, want):
        err = ((gv.double() - wv).abs().max() / wv.abs().max().clamp_min(1e-6)).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def emulated_backend(lib, sub=8):
    """A WKV-7 backend on the CPU that runs the kernels' code through the shim, with the operands
    wkv7_cuda hands the real ones (kernel_arguments), dy rounded to the inputs' dtype; sub: the
    backward's steps held in shared memory (8, or 4 as on GPUs with 99 KB per block)."""
    ptr = lambda t: ctypes.c_void_p(None if t is None or t.numel() == 0 else t.data_ptr())  # noqa: E731

    class Emulated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, r, w, k, v, a, b, state, flags, reset_state):
            B, T, H, N = r.shape
            suffix = "f32" if r.dtype == torch.float32 else "bf16"
            y, sT, snaps = torch.empty_like(r), torch.empty(B, H, N, N), torch.empty(B * H * -(-T // 16) * N * N)
            getattr(lib, f"emu_forward_{suffix}")(B, T, H, *map(ptr, (r, w, k, v, a, b, state, flags, reset_state)),
                                                  ptr(y), ptr(sT), ptr(snaps))
            ctx.save_for_backward(r, w, k, v, a, b, snaps, flags, reset_state)
            return y, sT

        @staticmethod
        def backward(ctx, dy, dsT):
            r, w, k, v, a, b, snaps, flags, reset_state = ctx.saved_tensors
            B, T, H, N = r.shape
            suffix = "f32" if r.dtype == torch.float32 else "bf16"
            dy, dsT = dy.to(r.dtype).contiguous(), dsT.float().contiguous()
            grads, ds0 = [torch.empty_like(r) for _ in range(6)], torch.empty(B, H, N, N)
            dreset = torch.zeros_like(reset_state)
            backward = getattr(lib, f"emu_backward_{suffix}" + ("" if sub == 8 else f"_sub{sub}"))
            backward(B, T, H, *map(ptr, (r, w, k, v, a, b, dy, dsT, snaps, flags, reset_state, *grads, ds0, dreset)))
            return *grads, ds0, None, dreset if reset_state.numel() else None

    def wkv7_emulated(r, w, k, v, a, b, state=None, resets=None, reset_state=None):
        xs, *state_flags_restart = cuda_mod.kernel_arguments(r, w, k, v, a, b, state, resets, reset_state)
        y, sT = Emulated.apply(*xs, *state_flags_restart)
        return y.to(r.dtype), sT
    return wkv7_emulated


@pytest.mark.slow
def test_kernel_code_trains_the_model_like_chunked(emulated_kernels, monkeypatch):
    """The whole model's training step with the kernels' code as its WKV: in fp32 the gradient is
    chunked's; under bf16 autocast it is no further from fp32 than chunked's own bf16 gradient.
    (The GPU twin, test_training_step_under_autocast_tracks_fp32, once failed on a criterion
    that compared two bf16 runs with each other; this reproduces its numbers on the CPU.)"""
    import types
    from rwkv_sft import ops
    module = types.ModuleType("wkv7_emulated_backend")
    module.wkv7_emulated = emulated_backend(emulated_kernels)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(ops._BACKENDS, "emulated", (module.__name__, "wkv7_emulated"))
    check_training_step_under_autocast("emulated", "cpu")

# ---- a failing build disables the kernel, with a message saying why ----

def test_missing_sources_are_named(tmp_path):
    with pytest.raises(RuntimeError, match="sources not found.*wkv7_op.cpp"):
        cuda_mod.build_extension((9, 0), csrc=tmp_path)


def test_missing_tools_are_named(monkeypatch):
    import torch.utils.cpp_extension as ext
    monkeypatch.setattr(ext, "CUDA_HOME", None)
    monkeypatch.setattr(ext, "is_ninja_available", lambda: False)
    monkeypatch.setenv("CXX", "no-such-compiler")
    missing = " ".join(cuda_mod.missing_tools())
    assert "nvcc" in missing and "ninja" in missing and "no-such-compiler" in missing


def test_compile_error_is_reported(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER
    (tmp_path / "wkv7_op.cpp").write_text("this is not C++\n")
    (tmp_path / "wkv7.cu").write_text("neither is this\n")
    (tmp_path / "wkv7.h").write_text("\n")
    monkeypatch.setattr(cuda_mod, "missing_tools", lambda: [])
    monkeypatch.setattr(cuda_mod, "build_dir", lambda cap: tmp_path / "build")
    ours = cuda_mod.extension_name((9, 0))
    version_before = JIT_EXTENSION_VERSIONER.get_version(ours)
    with pytest.raises(RuntimeError, match="building the WKV-7 CUDA kernel .* failed"):
        cuda_mod.build_extension((9, 0), csrc=tmp_path)
    # other sources build under another name: under ours, torch would count them as a change of
    # our kernel and build it as ours_v1, which every later process then rebuilds as plain ours
    assert JIT_EXTENSION_VERSIONER.get_version(ours) == version_before


def test_a_lock_file_left_by_a_killed_build_is_removed_at_once(tmp_path):
    """torch's lock file from a build that died (however recent) no longer blocks the next build,
    and while one build holds the folder another cannot take it."""
    from filelock import FileLock, Timeout
    (tmp_path / "lock").touch()  # fresh: an age rule would keep it and torch would wait
    with pytest.warns(UserWarning, match="left behind by a build that did not finish"):
        with cuda_mod._build_lock(tmp_path):
            assert not (tmp_path / "lock").exists()
            with pytest.raises(Timeout):
                FileLock(tmp_path / "build.flock", timeout=0).acquire()
    with FileLock(tmp_path / "build.flock", timeout=0):  # released afterwards
        pass


def test_usable_is_false_when_the_build_fails(tmp_path, monkeypatch):
    # pretend to have a GPU: the build fails before anything touches a device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda_mod, "CSRC", tmp_path)  # no sources there
    monkeypatch.setattr(cuda_mod, "_modules", {})
    monkeypatch.setattr(cuda_mod, "_usable", {})
    with pytest.warns(UserWarning, match="disabled on cuda:0.*sources not found"):
        assert cuda_mod.cuda_kernel_usable(torch.device("cuda", 0)) is False
    assert cuda_mod.cuda_kernel_usable(torch.device("cuda", 0)) is False  # decided once
    assert cuda_mod.cuda_kernel_usable("cpu") is False


def test_self_check_accepts_a_correct_kernel_and_rejects_a_wrong_one(monkeypatch):
    monkeypatch.setattr(cuda_mod, "_extension", lambda device: None)
    monkeypatch.setattr(cuda_mod, "wkv7_cuda", wkv7_reference)  # a correct "kernel", on the CPU
    with torch.no_grad():  # as when generation code is the first to ask
        cuda_mod._self_check(torch.device("cpu"))

    def wrong(*args, **kwargs):
        y, s = wkv7_reference(*args, **kwargs)
        return y, s * 1.01
    monkeypatch.setattr(cuda_mod, "wkv7_cuda", wrong)
    with pytest.raises(RuntimeError, match="self-check failed: state"):
        cuda_mod._self_check(torch.device("cpu"))


def _autocast_proof_kernel(r, w, k, v, a, b, state, resets, reset_state):
    """A correct fp32 stand-in for the kernel that autocast cannot reach, forward or backward
    (autocast leaves float64 alone)."""
    y, s = wkv7_reference(*(x.double() for x in (r, w, k, v, a, b)), state=state.double(), resets=resets,
                          reset_state=reset_state.double())
    return y.float(), s.float()


def test_self_check_is_not_fooled_by_the_callers_autocast(monkeypatch):
    """The first call comes from the model's forward under bf16 autocast, which also reaches the
    backward that the check runs: the reference must not be computed in bf16 there (it was, and a
    correct kernel was disabled in every bf16 training run on a GPU)."""
    monkeypatch.setattr(cuda_mod, "_extension", lambda device: None)
    monkeypatch.setattr(cuda_mod, "wkv7_cuda", _autocast_proof_kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cuda_mod._self_check(torch.device("cpu"))


def test_self_check_inside_activation_checkpointing(monkeypatch):
    """The first call from inside a checkpointed layer: the check's own tensors must not be counted
    as the layer's, or the recomputation in the backward fails (CheckpointError)."""
    from torch.utils.checkpoint import checkpoint
    monkeypatch.setattr(cuda_mod, "_extension", lambda device: None)
    monkeypatch.setattr(cuda_mod, "wkv7_cuda", _autocast_proof_kernel)
    checked = []

    def layer(x):
        if not checked:  # as cuda_kernel_usable: once, at the first forward, not in the recomputation
            cuda_mod._self_check(torch.device("cpu"))
            checked.append(True)
        return (x * x).sin() * x

    x = torch.randn(5, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    want = torch.autograd.grad(((x * x).sin() * x).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)


# ---- fla: the convention conversions, through a stand-in that follows fla's documented API ----

def fake_chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
                     cu_seqlens=None):
    """chunk_rwkv7's semantics from fla's docs and naive code: w is the log-decay, states are
    [N_seq,H,K,V] (key x value), cu_seqlens splits a B = 1 batch into sequences."""
    assert scale == 1.0
    B, T, H, N = r.shape
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    if cu_seqlens is not None:
        assert B == 1
    rows = range(B) if cu_seqlens is None else range(len(bounds) - 1)
    ys, states = [], []
    for i in rows:
        piece = (slice(None), slice(bounds[i], bounds[i + 1])) if cu_seqlens is not None else (slice(i, i + 1),)
        xs = [x[piece] for x in (r, w, k, v, a, b)]
        xs[1] = torch.log(-xs[1])  # back to our w
        s0 = None if initial_state is None else initial_state[i:i + 1].transpose(-1, -2)
        y, s = wkv7_reference(*xs, state=s0)
        ys.append(y)
        states.append(s.transpose(-1, -2))
    return torch.cat(ys, dim=1 if cu_seqlens is not None else 0), torch.cat(states)


@pytest.mark.parametrize("with_state,with_resets", [(True, True), (False, True), (True, False), (False, False)])
def test_fla_conversions_match_reference(monkeypatch, with_state, with_resets):
    monkeypatch.setattr(fla_mod, "_chunk_rwkv7", lambda device: fake_chunk_rwkv7)
    # float32, as fla holds its states; a wrong conversion shows as an O(1) error
    inputs, state, resets = random_case(3, 21, 2, 4, with_state, with_resets, dtype=torch.float32, seed=5)
    got, _, _ = run_with_grads(fla_mod.wkv7_fla, inputs, state, resets)
    want, _, _ = run_with_grads(wkv7_reference, inputs, state, resets)
    for name, g, w in zip(NAMES, got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_fla_refuses_cpu_tensors():
    inputs, _, _ = random_case(1, 3, 1, 4, False, False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fla_mod.wkv7_fla(*inputs)


# ---- on a GPU: both backends against the chunked backend (or the reference) ----

def _twin():
    try:
        from rwkv_sft.ops.wkv7_chunked import wkv7_chunked
        return wkv7_chunked
    except ImportError:
        return wkv7_reference


def _compare(fn, T, B, with_state, with_resets, dtype, fp32_tol=1e-3):
    inputs, state, resets = random_case(B, T, 2, 64, with_state, with_resets, dtype=dtype, device="cuda", seed=T)
    got, _, _ = run_with_grads(fn, inputs, state, resets)
    want, _, _ = run_with_grads(_twin(), [x.double() for x in inputs], state, resets)
    tol = fp32_tol if dtype == torch.float32 else 3e-2  # bf16 inputs and outputs, fp32 inside
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            continue
        assert g.dtype == (torch.float32 if name in ("state", "dstate") else dtype), name
        err = ((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-6)).item()
        assert err < tol, f"{name}: relative error {err:.2e} (T={T}, B={B}, {dtype})"


CASES = [(T, 2, True, True) for T in (1, 2, 15, 16, 17, 63, 64, 65, 300)] + [
    (65, 3, False, False), (65, 3, True, False), (33, 1, False, True)]
# fla's Triton kernels compile anew for each dtype, each state/resets combination and each kind of T
# (1, a multiple of 16, other), ~30 s each on an H100: the quick run keeps one combination and one T
# of each kind; the conversions of every combination are checked on the CPU above.
FLA_QUICK = {(1, 2, True, True), (16, 2, True, True), (17, 2, True, True), (300, 2, True, True)}
FLA_CASES = [c if c in FLA_QUICK else pytest.param(*c, marks=pytest.mark.slow) for c in CASES]
# fla's Triton dots take fp32 operands as tf32 (10-bit mantissa): 1.5e-3 was seen on an H100
FLA_FP32_TOL = 5e-3


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,B,with_state,with_resets", CASES)
def test_cuda_kernel_matches(T, B, with_state, with_resets, dtype):
    _compare(cuda_mod.wkv7_cuda, T, B, with_state, with_resets, dtype)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [17, 300])
def test_cuda_kernel_matches_with_the_backward_of_small_gpus(T, dtype, monkeypatch):
    """The backward that holds 4 steps' states (98 KB of shared memory), which GPUs allowing a
    block 99 KB run, on this GPU: the launcher reads the limit from the environment."""
    monkeypatch.setenv("RWKV_SFT_WKV7_SHARED_LIMIT", str(100 * 1024))
    _compare(cuda_mod.wkv7_cuda, T, 2, True, True, dtype)
    monkeypatch.setenv("RWKV_SFT_WKV7_SHARED_LIMIT", str(64 * 1024))  # too little for either
    inputs, state, resets = random_case(1, 5, 1, 64, dtype=dtype, device="cuda")
    with pytest.raises(RuntimeError, match="needs 98 KB of shared memory"):
        run_with_grads(cuda_mod.wkv7_cuda, inputs, state, resets)


@needs_gpu
@pytest.mark.gpu
def test_cuda_kernel_passes_its_self_check():
    assert cuda_mod.cuda_kernel_usable(torch.device("cuda"))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,B,with_state,with_resets", FLA_CASES)
def test_fla_matches(T, B, with_state, with_resets, dtype):
    pytest.importorskip("fla")
    _compare(fla_mod.wkv7_fla, T, B, with_state, with_resets, dtype, fp32_tol=FLA_FP32_TOL)


# ---- on a GPU: the precision policy under bf16 autocast (the CPU backends' twins: test_precision.py) ----

GPU_BACKENDS = ["cuda", "fla", "chunked"]
AUTOCAST_DTYPES = [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32]


def _usable(backend):
    if backend == "fla":
        pytest.importorskip("fla")
    if backend == "cuda" and not cuda_mod.cuda_kernel_usable(torch.device("cuda")):
        pytest.fail("the CUDA kernel did not build or failed its self-check")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_operator_under_autocast(backend):
    """Mixed dtypes as the time mix hands them under autocast: y in r's dtype, the state fp32,
    gradients in their inputs' dtypes, values within bf16 reach of float64."""
    from rwkv_sft.ops import wkv7
    _usable(backend)
    inputs, state, resets = random_case(2, 100, 2, 64, dtype=torch.float64, device="cuda", seed=5)
    mixed = [x.to(d) for x, d in zip(inputs, AUTOCAST_DTYPES)]

    def fn(*args, **kw):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return wkv7(*args, backend=backend, **kw)
    got, _, _ = run_with_grads(fn, mixed, state, resets)
    want, _, _ = run_with_grads(_twin(), [x.double() for x in mixed], state, resets)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert [g.dtype for g in got[2:8]] == AUTOCAST_DTYPES
    for name, g, w in zip(NAMES, got, want):
        err = ((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-6)).item()
        assert err < 3e-2, f"{backend} {name}: relative error {err:.2e}"


def training_step_gradients(backend, precision, device):
    """Loss and flat parameter gradient of one training step of a small random model (2 heads,
    packed rows with resets) with the given WKV backend and precision."""
    from conftest import random_model
    from rwkv_sft.train.step import accumulate_gradients
    from rwkv_sft.train.loss import CompletionLoss
    from test_train_helpers import random_batch
    batch = random_batch(B=2, T=80, vocab=256, seed=4, resets=True)
    model = random_model(seed=1, n_layer=2, n_embd=128, head_size=64, vocab_size=256).to(device)
    model.wkv_backend = backend
    loss = accumulate_gradients(CompletionLoss(model), [batch], device=device,
                                global_count=batch.num_loss_tokens, precision=precision)
    return loss, torch.cat([p.grad.flatten() for p in model.parameters()])


def check_training_step_under_autocast(backend, device):
    """fp32: the backend's gradient is chunked's. bf16 autocast: the loss within bf16 reach of fp32,
    and the gradient no further from the fp32 one than chunked's own under the same autocast (x2).
    (Two bf16 runs differ by rounding noise: on this model ~10% of the gradient's norm, so a
    backend is judged by its distance to fp32, not to another bf16 run.)"""
    fp32, exact = training_step_gradients("chunked", "fp32", device)
    if backend != "chunked":
        mine = training_step_gradients(backend, "fp32", device)[1]
        tol = 1e-2 if backend == "fla" else 1e-4  # fla: TF32 dots (FLA_FP32_TOL)
        assert ((mine - exact).norm() / exact.norm()).item() < tol
    (bf16, grads), (_, twin) = training_step_gradients(backend, "bf16", device), \
        training_step_gradients("chunked", "bf16", device)
    assert abs(bf16 - fp32) < 2e-2 * abs(fp32), (bf16, fp32)
    distance = lambda g: ((g - exact).norm() / exact.norm()).item()  # noqa: E731
    assert distance(grads) <= 2 * distance(twin) + 1e-3, (distance(grads), distance(twin))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_training_step_under_autocast_tracks_fp32(backend):
    _usable(backend)
    check_training_step_under_autocast(backend, "cuda")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("with_state", [False, True])
def test_auto_takes_the_fastest_measured_on_this_gpu(tmp_path, monkeypatch, with_state):
    """auto on a real GPU: each usable backend timed at the call's shape, the fastest recorded and
    returned (never one slower than another by the recorded timings)."""
    import json

    from rwkv_sft.ops import backend_choice, resolve_backend
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(backend_choice, "_memory", {})
    name = resolve_backend("auto", torch.device("cuda"), 512, 64, batch_heads=16 * 12, dtype=torch.bfloat16,
                           with_state=with_state)
    (entry,) = json.loads(backend_choice.cache_file().read_text()).values()
    seconds = entry["seconds"]
    assert "chunked" in seconds and all(t > 0 for t in seconds.values())
    assert entry["backend"] == name == min(seconds, key=seconds.get)
