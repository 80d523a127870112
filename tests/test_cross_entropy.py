"""linear_cross_entropy against its obviously-correct twin: F.cross_entropy over full logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rwkv_sft.ops import linear_cross_entropy
from rwkv_sft.ops import cross_entropy
from rwkv_sft.ops.cross_entropy import default_chunk_size, CHUNK_BYTES

# (N, V, C, chunk): chunks that divide N, that don't, one row per chunk, one chunk for all
SHAPES = [(12, 50, 8, 4), (37, 50, 16, 8), (37, 97, 5, 1), (64, 300, 32, 100), (5, 7, 3, 2)]


def make(n, v, c, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = torch.randn(v, c, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, reduction, seed=1):
    loss = fn(hidden, weight, targets, reduction)
    # a random upstream gradient checks the grad_output scaling, not just d(loss)/d(x) for ones
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)
    grads = torch.autograd.grad(loss, (hidden, weight), grad_out)
    return loss, grads


def full_logits(hidden, weight, targets, reduction):
    return F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)


def chunked(chunk, **kw):
    return lambda h, w, t, r: linear_cross_entropy(h, w, t, reduction=r, chunk_size=chunk, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,v,c,chunk", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_full_logits(n, v, c, chunk, reduction, dtype, tol):
    h, w, t = make(n, v, c, dtype)
    loss, (gh, gw) = loss_and_grads(chunked(chunk), h, w, t, reduction)
    ref, (rh, rw) = loss_and_grads(full_logits, h, w, t, reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gh, rh, rtol=tol, atol=tol)
    torch.testing.assert_close(gw, rw, rtol=tol, atol=tol)


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_close_to_fp32_reference(reduction):
    # bf16 logits carry ~3 significant digits: stated tolerance 1e-2 absolute on each row's loss
    # (logits up to ~4), 1e-2 relative (in norm) on the gradients (measured: 3e-3 on both).
    h, w, t = make(48, 200, 32, torch.bfloat16, scale=0.2)
    loss, (gh, gw) = loss_and_grads(chunked(16), h, w, t, reduction)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref, (rh, rw) = loss_and_grads(full_logits, h32, w32, t, reduction)
    assert loss.dtype == torch.float32
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-2)
    assert rel_err(gh, rh) < 1e-2 and rel_err(gw, rw) < 1e-2


def test_autocast_cpu_bf16_matches_explicit_bf16_inputs():
    h, w, t = make(20, 64, 16, torch.float32, scale=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_size=8)
        gh, gw = torch.autograd.grad(loss, (h, w))
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    ref = linear_cross_entropy(hb, wb, t, chunk_size=8)
    rh, rw = torch.autograd.grad(ref, (hb, wb))
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32  # fp32 params get fp32 grads
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(gh, rh.float(), rtol=0, atol=0)
    # the fp32 weight's gradient skips the final rounding to bf16 that the bf16 weight's gets
    torch.testing.assert_close(gw.bfloat16(), rw, rtol=0, atol=0)


def test_fp64_ignores_autocast():
    h, w, t = make(9, 30, 4, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk_size=4)
    torch.testing.assert_close(loss, full_logits(h, w, t, "mean"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_rows(dtype):
    h, w, t = make(0, 40, 8, dtype)
    for reduction in ("mean", "sum"):
        loss = linear_cross_entropy(h, w, t, reduction=reduction)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert loss.item() == 0.0  # "mean" over no rows is defined as 0, not NaN
        assert gh.shape == (0, 8) and gw.shape == w.shape and not gw.any()
    assert linear_cross_entropy(h, w, t, reduction="none").shape == (0,)


class L2Wrap(torch.autograd.Function):
    """Upstream RWKV-LM's L2Wrap with the factor passed in (upstream: 1e-4 / (B*T))."""

    @staticmethod
    def forward(ctx, loss, y, factor):
        ctx.save_for_backward(y)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        maxx, ids = torch.max(y, -1, keepdim=True)
        gy = torch.zeros_like(y)
        gy.scatter_(-1, ids, maxx * ctx.factor)
        return grad_output, gy, None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_l2wrap_matches_upstream(reduction):
    factor = 0.37  # large, so the L2Wrap term is not lost in the cross-entropy gradient
    h, w, t = make(23, 60, 8, torch.float64)

    def upstream(h, w, t, r):
        logits = h @ w.T
        return L2Wrap.apply(F.cross_entropy(logits, t, reduction=r), logits, factor)

    loss, (gh, gw) = loss_and_grads(chunked(5, l2wrap=factor), h, w, t, reduction)
    ref, (rh, rw) = loss_and_grads(upstream, h, w, t, reduction)
    plain, (ph, _) = loss_and_grads(chunked(5), h, w, t, reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)  # the loss value is unchanged
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    assert (gh - ph).abs().max() > 1e-3  # the term did something


def test_gradcheck_fp64():
    h, w, t = make(6, 11, 3, torch.float64)
    for reduction in ("mean", "none"):
        fn = lambda h, w: linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=4)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (h, w))


def test_masked_batch_equals_masked_full_logits():
    B, T, C, V = 3, 17, 8, 45
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([[4, 9], [0, 17], [12, 15]])  # completion span [start, end) per row
    pos = torch.arange(T)
    mask = (pos >= lengths[:, :1]) & (pos < lengths[:, 1:])

    loss = linear_cross_entropy(hidden[mask], weight, targets[mask], chunk_size=5)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    per_token = F.cross_entropy((hidden @ weight.T).transpose(1, 2), targets, reduction="none")
    ref = (per_token * mask).sum() / mask.sum()
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    assert not gh[~mask].any()


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_materialises_all_logits(dtype):
    n, v, c, chunk = 96, 500, 4, 16
    h, w, t = make(n, v, c, dtype)
    with LargestTensor() as mode:
        loss = linear_cross_entropy(h, w, t, chunk_size=chunk, l2wrap=1e-4)
        loss.backward()
    assert mode.numel <= max(chunk * v, v * c) < n * v


class RowSource:
    """A frozen weight handed out a block of rows at a time, as a quantized head is."""

    def __init__(self, weight):
        self.weight, self.shape, self.blocks = weight, weight.shape, set()

    def rows(self, start, end, dtype):
        self.blocks.add((start, end))
        return self.weight[start:end].to(dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_a_weight_converted_block_by_block_matches_full_logits(monkeypatch, reduction):
    """Blocks of 7 vocabulary rows (targets and argmaxes in every block and on its edges), with
    L2Wrap: a row source (no weight gradient), and an fp32 weight under fp64 compute (which is
    converted by blocks too, and gets its gradient)."""
    factor = 0.37
    h, w, t = make(23, 60, 8, torch.float64)
    monkeypatch.setattr(cross_entropy, "BLOCK_BYTES", 7 * 8 * 8)

    def upstream(h, w, t, r):
        logits = h @ w.T
        return L2Wrap.apply(F.cross_entropy(logits, t, reduction=r), logits, factor)
    ref, (rh, rw) = loss_and_grads(upstream, h, w, t, reduction)
    source = RowSource(w.detach())
    loss = linear_cross_entropy(h, source, t, reduction=reduction, chunk_size=5, l2wrap=factor)
    (gh,) = torch.autograd.grad(loss, (h,), torch.randn(loss.shape, generator=torch.Generator().manual_seed(1),
                                                       dtype=torch.float64))
    assert sorted(source.blocks)[:2] == [(0, 7), (7, 14)] and (56, 60) in source.blocks
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    w32 = w.detach().float().requires_grad_()
    ref32, (rh32, rw32) = loss_and_grads(upstream, h, w32.double(), t, reduction)
    loss32, (gh32, gw32) = loss_and_grads(chunked(5, l2wrap=factor), h, w32, t, reduction)
    assert gw32.dtype == torch.float32
    torch.testing.assert_close(loss32, ref32, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh32, rh32, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw32, rw32.float(), rtol=1e-6, atol=1e-7)


def test_a_narrower_frozen_weight_is_never_widened_whole(monkeypatch):
    """A bf16 head under fp32 compute: no [V, C] fp32 copy of it exists, nor a [chunk, V] tensor of
    logits (each chunk's log-sum-exp is combined block by block)."""
    n, v, c, chunk = 96, 500, 64, 16
    h, w, t = make(n, v, c, torch.float32)
    w = w.detach().bfloat16()
    monkeypatch.setattr(cross_entropy, "BLOCK_BYTES", 100 * c * 4)
    with LargestTensor() as mode:
        loss = linear_cross_entropy(h, w, t, chunk_size=chunk, l2wrap=1e-4)
        loss.backward()
    assert mode.numel < v * c and mode.numel < chunk * v
    h2 = h.detach().requires_grad_()
    torch.testing.assert_close(loss, full_logits(h2, w.float(), t, "mean"), rtol=1e-5, atol=1e-5)


def test_default_chunk_size():
    for v in (7, 50277, 65536):
        k = default_chunk_size(v)
        assert k >= 1 and k * v * 4 <= max(CHUNK_BYTES, v * 4)
        assert (k + 1) * v * 4 > CHUNK_BYTES  # as large as the budget allows


def test_only_needed_gradients_and_int32_targets():
    h, w, t = make(10, 20, 4, torch.float64)
    loss = linear_cross_entropy(h.detach(), w, t.int(), chunk_size=3)
    (gw,) = torch.autograd.grad(loss, (w,))
    (rw,) = torch.autograd.grad(full_logits(h.detach(), w, t, "mean"), (w,))
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [
    dict(targets=torch.tensor([0, 20])),          # == V
    dict(targets=torch.tensor([-1, 3])),
    dict(targets=torch.tensor([0, 1, 2])),        # wrong length
    dict(targets=torch.tensor([0.0, 1.0])),       # not ids
    dict(reduction="avg"),
    dict(chunk_size=0),
    dict(weight=torch.randn(20, 5)),              # C mismatch
])
def test_rejects_bad_arguments(bad):
    args = dict(hidden=torch.randn(2, 4), weight=torch.randn(20, 4), targets=torch.tensor([0, 19]))
    args.update(bad)
    with pytest.raises(ValueError):
        linear_cross_entropy(**args)


def test_mixed_dtypes_compute_in_the_wider_one():
    h, w, t = make(10, 30, 4, torch.float32)
    hb = h.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, w, t, chunk_size=4)
    gh, gw = torch.autograd.grad(loss, (hb, w))
    h32 = hb.detach().float().requires_grad_()
    ref = full_logits(h32, w, t, "mean")
    rh, rw = torch.autograd.grad(ref, (h32, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gw, rw, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gh, rh.bfloat16(), rtol=2**-7, atol=1e-6)  # up to one bf16 rounding


@pytest.mark.parametrize("n,v,c,chunk", SHAPES)
def test_evaluation_pass_matches_full_logits(n, v, c, chunk):
    """loss_and_argmax (evaluate's loss and token accuracy) against F.cross_entropy and argmax over
    the full logits (scaled up: a tie within rounding between two logits is then unlikely)."""
    from rwkv_sft.ops.cross_entropy import loss_and_argmax
    hidden, weight, targets = (x.detach() for x in make(n, v, c, torch.float32, scale=3.0))
    loss, predicted = loss_and_argmax(hidden, weight, targets, chunk_size=chunk)
    logits = hidden @ weight.T
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction="none"), rtol=1e-5, atol=1e-5)
    assert torch.equal(predicted, logits.argmax(dim=-1))
    assert loss.dtype == torch.float32 and predicted.shape == (n,)
    with pytest.raises(ValueError, match="targets must lie in"):
        loss_and_argmax(hidden, weight, torch.full_like(targets, v), chunk_size=chunk)
