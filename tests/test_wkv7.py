"""WKV-7 backends against the per-token reference recurrence (itself checked against float64)."""
import json

import pytest
import torch
import torch.nn.functional as F

from rwkv_sft import RWKV7, RWKV7Config
from rwkv_sft.ops import resolve_backend, wkv7
from rwkv_sft.ops.wkv7_chunked import wkv7_chunked
from rwkv_sft.ops.wkv7_reference import wkv7_reference

# Tolerances, relative to the largest magnitude of the float64 answer, floored at 1e-2 (see `close`).
FP32_TOL = 2e-4   # y, final state and every gradient, fp32 backends vs float64
BF16_TOL = 2e-2   # bf16 inputs and outputs (8 bits of mantissa) vs the reference on the same inputs


def make_inputs(B, T, H, N, decay="mixed", seed=0, dtype=torch.float64):
    """Inputs shaped like the model's: w <= -0.5, a' = -kk, b' = kk * a, kk unit per head.

    decay "fast": every decay near its floor exp(-exp(-0.5)) = 0.545; "slow": near 1; "mixed": both.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(), rnd(), rnd()
    x = {"fast": 8 + rnd(), "slow": -8 + rnd(), "mixed": 4 * rnd()}[decay]
    w = -F.softplus(-x) - 0.5
    kk = F.normalize(rnd(), dim=-1)
    a = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (r, w, k, v, -kk, kk * a)]


def make_state(B, H, N, seed=1):
    return torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(fn, inputs, state, resets=None, seed=2, **kw):
    """y, final state and the gradients of a random linear function of both (for all 6 inputs + state)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    state = None if state is None else state.detach().clone().requires_grad_()
    y, s = fn(*inputs, state=state, resets=resets, **kw)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    ((y * gy).sum() + (s * gs).sum()).backward()
    grads = [x.grad for x in inputs] + ([] if state is None else [state.grad])
    return [y, s] + grads


NAMES = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate"]


def close(got, want, tol, what=""):
    for name, x, ref in zip(NAMES, got, want):
        # floor: a gradient that is exactly 0 in float64 (dw with no state at T=1) carries fp32
        # rounding noise of the O(1) terms that cancel in it
        scale = max(ref.abs().max().item(), 1e-2)
        err = (x.double() - ref.double()).abs().max().item()
        assert err <= tol * scale, f"{what} {name}: max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 63, 64, 65, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(T, with_state):
    B, H, N = 2, 2, 8
    for decay in ("fast", "slow", "mixed"):
        x64 = make_inputs(B, T, H, N, decay, seed=T)
        s64 = make_state(B, H, N) if with_state else None
        want = run(wkv7_reference, x64, s64)  # float64 reference
        x32 = [t.float() for t in x64]
        s32 = None if s64 is None else s64.float()
        if decay == "mixed":  # the twin itself, in fp32, is as close to float64 as we ask of the backend
            close(run(wkv7_reference, x32, s32), want, FP32_TOL, f"reference fp32 T={T} {decay}")
        close(run(wkv7_chunked, x32, s32), want, FP32_TOL, f"chunked T={T} {decay}")


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_chunk_size_does_not_change_results(chunk_size):
    x = make_inputs(2, 50, 2, 8, seed=3)
    s = make_state(2, 2, 8)
    close(run(wkv7_chunked, x, s, chunk_size=chunk_size), run(wkv7_reference, x, s), 1e-10)


def test_float64_runs_in_float64():
    x = make_inputs(1, 20, 1, 4, seed=4)
    y, s = wkv7_chunked(*x)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    y32, s32 = wkv7_chunked(*[t.float() for t in x])
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32


def random_resets(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    resets = torch.rand(B, T, generator=g) < 0.08
    resets[0, 0] = True            # a reset on the very first token drops the initial state
    resets[1, [16, 17, 40]] = True  # at a chunk boundary, twice in a row, mid-chunk
    resets[-1] = False             # a row with no reset at all
    return resets


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_resets_equal_separate_sequences(chunk_size):
    B, T, H, N = 3, 70, 2, 8
    x = make_inputs(B, T, H, N, seed=5)
    s = make_state(B, H, N)
    resets = random_resets(B, T, seed=6)
    # the obviously correct answer: each segment run on its own, from zero (or the given state)
    ys, finals = [], []
    for i in range(B):
        starts = [0] + [t for t in range(1, T) if resets[i, t]] + [T]
        state = None if resets[i, 0] else s[i:i + 1]
        for lo, hi in zip(starts[:-1], starts[1:]):
            y, state = wkv7_reference(*[t[i:i + 1, lo:hi] for t in x], state=state)
            ys.append(y)
            state_last = state
            state = None
        finals.append(state_last)
    want_y, want_s = torch.cat(ys, 1).view(B, T, H, N), torch.cat(finals)
    y, s_out = wkv7_chunked(*x, state=s, resets=resets, chunk_size=chunk_size)
    close([y, s_out], [want_y, want_s], 1e-10, "chunked with resets")
    # gradients against the reference with the same resets (the reference's resets = separate runs above)
    close(run(wkv7_chunked, x, s, resets, chunk_size=chunk_size), run(wkv7_reference, x, s, resets), 1e-10,
          "gradients with resets")
    y_ref, _ = wkv7_reference(*x, state=s, resets=resets)
    close([y_ref], [want_y], 1e-10, "reference with resets")


def test_bf16_inputs():
    B, T, H, N = 2, 40, 2, 16
    x = [t.bfloat16() for t in make_inputs(B, T, H, N, seed=7)]
    s = make_state(B, H, N).float()
    got, want = run(wkv7_chunked, x, s), run(wkv7_reference, x, s)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in got[2:8])
    close(got, want, BF16_TOL, "bf16")


def test_gradcheck_float64():
    x = [t.requires_grad_() for t in make_inputs(2, 7, 1, 3, seed=8)]
    s = make_state(2, 1, 3).requires_grad_()
    resets = torch.zeros(2, 7, dtype=torch.bool)
    resets[1, 3] = True
    fn = lambda *args: wkv7_chunked(*args[:6], state=args[6], resets=resets, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*x, s), fast_mode=True)  # checks random projections of the Jacobian


def test_dispatcher_uses_chunked_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    x = make_inputs(1, 9, 2, 4, seed=9)
    y, s = wkv7(*x, backend="chunked")
    y_ref, s_ref = wkv7_reference(*x)
    close([y, s], [y_ref, s_ref], 1e-10)


def test_model_chunked_matches_reference():
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=2, n_embd=64, vocab_size=50, head_size=32)).double()
    with torch.no_grad():  # move off the initialisation (zero output projections) so every path matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 50, (2, 45))
    resets = torch.zeros(2, 45, dtype=torch.bool)
    resets[0, 20] = True
    results = []
    for backend in ("reference", "chunked"):
        model.zero_grad()
        model.wkv_backend = backend
        logits, state = model(tokens, resets=resets)
        (logits.square().mean() + state.wkv.square().mean()).backward()
        results.append((logits.detach(), state.wkv.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l_ref, s_ref, g_ref), (l_ch, s_ch, g_ch) = results
    torch.testing.assert_close(l_ch, l_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s_ch, s_ref, rtol=1e-9, atol=1e-9)
    assert g_ref.keys() == g_ch.keys()
    for name in g_ref:
        torch.testing.assert_close(g_ch[name], g_ref[name], rtol=1e-7, atol=1e-9, msg=name)


def test_chunk_groups_do_not_change_results(monkeypatch):
    import rwkv_sft.ops.wkv7_chunked as chunked
    B, T, H, N = 3, 45, 3, 8
    x, s, resets = make_inputs(B, T, H, N, seed=10), make_state(B, H, N), random_resets(B, T, seed=11)
    monkeypatch.setattr(chunked, "GROUP_CHUNKS", 6)  # 9 rows: one chunk per group, 3 groups
    close(run(wkv7_chunked, x, s, resets, chunk_size=16), run(wkv7_reference, x, s, resets), 1e-10, "row groups")


def test_auto_backend_choice(monkeypatch):
    """auto: the kernel only where it exists (GPU, head size 64, self-check passed); the plain
    recurrence for single CPU steps; chunked otherwise."""
    import rwkv_sft.ops.wkv7_cuda as cuda_module
    monkeypatch.setattr(cuda_module, "cuda_kernel_usable", lambda device: True)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", gpu, 100, 64) == "cuda"
    assert resolve_backend("auto", gpu, 100, 32) == "chunked"
    assert resolve_backend("auto", cpu, 100, 64) == "chunked"
    assert resolve_backend("auto", cpu, 1, 64) == "reference"
    monkeypatch.setattr(cuda_module, "cuda_kernel_usable", lambda device: False)
    assert resolve_backend("auto", gpu, 100, 64) == "chunked"
    assert resolve_backend("reference", gpu, 100, 64) == "reference"


@pytest.mark.parametrize("C", [1, 2, 5, 16, 31, 32, 64])
def test_unit_lower_inverse(C):
    """The doubling product (and its by-halves form from C = 32) against a triangular solve."""
    from rwkv_sft.ops.wkv7_chunked import _unit_lower_inverse
    A = (0.3 * torch.randn(3, C, C, generator=torch.Generator().manual_seed(C), dtype=torch.float64)).tril(-1)
    eye = torch.eye(C, dtype=torch.float64).expand(3, C, C)
    want = torch.linalg.solve_triangular(eye - A, eye, upper=False, unitriangular=True)
    torch.testing.assert_close(_unit_lower_inverse(A), want, rtol=1e-10, atol=1e-10)


def test_chunked_creates_nothing_on_another_device():
    """On the meta device (shapes only) as a stand-in for a GPU: any tensor the op made on the CPU
    would meet a meta tensor and raise, in the forward or the backward."""
    B, T, H, N = 2, 70, 2, 8
    x = [torch.empty(B, T, H, N, device="meta", requires_grad=True) for _ in range(6)]
    s = torch.empty(B, H, N, N, device="meta", requires_grad=True)
    resets = torch.zeros(B, T, dtype=torch.bool, device="meta")
    y, s_out = wkv7_chunked(*x, state=s, resets=resets)
    (y.sum() + s_out.sum()).backward()
    assert y.device.type == s_out.device.type == "meta" and y.shape == (B, T, H, N)
    assert all(t.grad is not None and t.grad.device.type == "meta" for t in x + [s])


def test_auto_backend_is_the_measured_fastest(monkeypatch, tmp_path):
    """On a GPU with several backends, auto takes the fastest for the shape class by measurement
    (timings injected here), records it per machine, and later calls and processes measure
    nothing; a backend that fails to run is left out; a recorded backend no longer installed is
    measured again."""
    import rwkv_sft.ops as ops
    from rwkv_sft.ops import backend_choice
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(backend_choice, "_memory", {})
    monkeypatch.setattr(backend_choice.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    usable = {"cuda": True, "fla": True, "chunked": True}
    monkeypatch.setattr(ops, "_usable", lambda name, device, head_size:
                        usable[name] and (device.type == "cuda" or name == "chunked"))
    timings, calls = {"cuda": 0.30, "fla": 0.20, "chunked": 2.0}, []

    def fake_measure(name, B, T, H, N, dtype, device, with_state, with_resets):
        calls.append((name, T, H))
        if timings[name] is None:
            raise RuntimeError("no kernel image for this GPU")
        return timings[name]

    monkeypatch.setattr(backend_choice, "measure_backend", fake_measure)
    gpu = torch.device("cuda")
    pick = lambda T, BH=32, **kw: resolve_backend("auto", gpu, T, 64, batch_heads=BH,  # noqa: E731
                                                  dtype=torch.bfloat16, **kw)
    assert pick(4096) == "fla" and sorted(c[0] for c in calls) == ["chunked", "cuda", "fla"]
    assert calls[0][1:] == (4096, 32)  # timed on the call's own shape
    assert pick(3000) == "fla" and len(calls) == 3  # same class (T up to 4096): nothing measured
    timings["cuda"] = 0.1
    assert pick(512) == "cuda" and len(calls) == 6  # another class: measured
    assert pick(512, with_state=True) == "cuda" and len(calls) == 9  # a state coming in is another class
    recorded = json.loads(backend_choice.cache_file().read_text())
    assert len(recorded) == 3 and all(set(v["seconds"]) == set(usable) for v in recorded.values())

    backend_choice._memory.clear()  # a new process on this machine: read from the file, not measured
    assert pick(4096) == "fla" and pick(512) == "cuda" and len(calls) == 9
    usable["fla"] = False  # fla uninstalled: its class is measured again among the rest
    backend_choice._memory.clear()
    timings["cuda"] = 0.30
    assert pick(4096) == "cuda" and len(calls) == 11
    timings["cuda"] = None  # cuda fails at this shape: left out, with a warning
    with pytest.warns(UserWarning, match="cuda left out"):
        assert pick(64, BH=4) == "chunked"
    cpu = torch.device("cpu")  # the CPU measures nothing
    assert resolve_backend("auto", cpu, 512, 64, batch_heads=32, dtype=torch.float32) == "chunked"
