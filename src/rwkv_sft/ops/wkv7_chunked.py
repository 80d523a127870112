"""Chunked WKV-7 in pure PyTorch: the default backend on CPU, also usable on GPU.

Same contract as `wkv7_reference`. The sequence is cut into chunks of C tokens; inside a chunk
the recurrence is solved in closed form with C x C attention-like matrices (DESIGN.md §5.6),
vectorised over the chunks of a group of (batch, head) rows (see `_groups`). Between chunks only
a linear map remains, P_{n+1} = M_n P_n + c_n, which a short Python loop over chunks applies.
The backward is written by hand (`_intra_backward`), not left to autograd.

Orientation: internally P = S^T (key x value), so the rows of every matrix below index tokens.

Range: the intra-chunk products are factorised as e^{G_i - mid} e^{mid - G_j}; they stay finite in
fp32 while chunk_size * exp(w) is below ~80 (w <= 0.9 at the default 32). The model's w is
<= -0.5 (decay >= 0.545), far inside that; the float64 path (for gradcheck) has more room.
"""
from __future__ import annotations

import torch

CHUNK_SIZE = 32
GROUP_CHUNKS = 256  # chunks per group of rows, see `_groups`


def _prepare(r, w, k, v, a, b, resets, C):
    """[B,T,H,N] inputs -> [B*H,NC,C,N] in the compute dtype, padded so T divides into chunks.

    Padding uses log-decay 0 (d = 1) and zero k, v, a, b: the state passes through unchanged.
    Returns the chunked tensors (log-decay instead of w) and the segment ids of resets
    [B*H,NC,C] or None. Called on one group of rows at a time (B = 1, a slice of heads).
    """
    B, T, H, N = r.shape
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    pad = (-T) % C
    NC = (T + pad) // C

    def chunk(x):
        x = x.to(compute).transpose(1, 2)  # [B,H,T,N]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        # contiguous: elementwise results inherit their inputs' strides, and every batched
        # matmul on a [B,T,H,N]-strided operand would copy it first
        return x.reshape(B * H, NC, C, N).contiguous()

    logd = -torch.exp(w.to(compute))  # log of the decay, >= -0.6065 for the model's w <= -0.5
    r, logd, k, v, a, b = (chunk(x) for x in (r, logd, k, v, a, b))
    seg = None
    if resets is not None:
        rs = torch.nn.functional.pad(resets.to(torch.int32), (0, pad)).view(B, 1, NC, C)
        seg = rs.cumsum(-1).expand(B, H, NC, C).reshape(B * H, NC, C)  # 0 until the first reset
    return [r, logd, k, v, a, b], seg


def _groups(B, H, NC):
    """(batch index, slice of heads) processed together: big enough that each op has real work,
    small enough that the dozens of temporaries stay in cache and are recycled by the allocator
    (fresh memory costs a page fault per 4 KiB, which dominated the time when done all at once)
    and that under no_grad only one group is in memory."""
    step = max(1, min(H, GROUP_CHUNKS // NC))
    return [(i, slice(h, min(h + step, H))) for i in range(B) for h in range(0, H, step)]


def _unchunk(x, T, out):
    """Chunked [h,NC,C,N] -> out [T,h,N] (a strided view of a [B,T,H,N] tensor), dropping padding."""
    out.copy_(x.view(x.shape[0], -1, x.shape[-1])[:, :T].transpose(0, 1))


def _ones(x):
    """[C,C] ones for the chunks of x [..., C, N]."""
    return torch.ones(x.shape[-2], x.shape[-2], dtype=x.dtype, device=x.device)


def _unit_lower_inverse(A):
    """(I - A)^{-1} for strictly lower triangular A [..., C, C].

    Doubling product (I + A)(I + A^2)(I + A^4)... (A is nilpotent): a few large batched matmuls,
    far faster on CPU than a batched `solve_triangular` of many small systems.
    """
    X, P = A + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device), A
    n = 2
    while n < A.shape[-1]:
        P = P @ P
        X = X + X @ P
        n *= 2
    return X


def _intra(r, logd, k, v, a, b, seg):
    """Everything inside each chunk that does not depend on the incoming state P0 [K,V].

    Per chunk (all batched): Y = R P0 + Yc and P_end = M P0 + c, with R [C,K], Yc [C,V],
    M [K,K], c [K,V]. A reset inside a chunk masks every interaction across it and cuts the
    rows after it off from P0. Returns a dict with those four and the intermediates the
    hand-written backward needs.
    """
    C = r.shape[-2]
    G = _ones(logd).tril() @ logd  # chunk-local inclusive log-decay sums (cumsum; a global sum
    # would overflow fp32); as a matmul, faster than cumsum along this axis
    mid = G[..., C // 2:C // 2 + 1, :].clone()  # centre the factorised exponents to keep them small
    eG = torch.exp(G - mid)
    eGx = eG * torch.exp(-logd)  # exclusive sums Gx = G - logd: a'_i meets P_{i-1}
    einv = torch.reciprocal(eG)
    rq, aq, kq, bq = r * eG, a * eGx, k * einv, b * einv
    # e^G = e^{G-mid} e^mid and e^{Gend-G} = e^{mid-G} e^{Gend-mid}: [.., 1, K] rows, no new exp
    to_P0 = torch.exp(mid)  # the rows' view of the incoming state
    to_end = torch.exp(G[..., -1:, :] - mid)  # decay from each token to the chunk end
    decay_all = torch.exp(G[..., -1:, :])  # [.., 1, K]

    ones = torch.ones(C, C, dtype=torch.bool, device=r.device)
    incl, strict = ones.tril(), ones.tril(-1)
    if seg is not None:
        same = seg[..., :, None] == seg[..., None, :]  # [rows,NC,C,C]
        incl, strict = incl & same, strict & same
        last = seg[..., -1:]
        to_P0 = to_P0 * (seg == 0).unsqueeze(-1).to(r.dtype)
        to_end = to_end * (seg == last).unsqueeze(-1).to(r.dtype)
        decay_all = decay_all * (last == 0).unsqueeze(-1).to(r.dtype)
    incl, strict = incl.to(r.dtype), strict.to(r.dtype)
    A_rk, A_rb = (rq @ kq.mT).mul_(incl), (rq @ bq.mT).mul_(incl)  # masked after the product: the
    A_ak, A_ab = (aq @ kq.mT).mul_(strict), (aq @ bq.mT).mul_(strict)  # upper triangle is finite

    rP, aP = rq * to_P0, aq * to_P0
    # U (rows a'_i^T P_{i-1}) = W P0 + Uc, from the unit lower triangular system (I - A_ab) U = ...
    X = _unit_lower_inverse(A_ab)
    W, Uc = X @ aP, X @ (A_ak @ v)
    R = (A_rb @ W).add_(rP)
    Yc = (A_rk @ v).add_(A_rb @ Uc)

    kd, bd = kq * to_end, bq * to_end
    M = bd.mT @ W
    M.diagonal(dim1=-2, dim2=-1).add_(decay_all.squeeze(-2))
    c = (kd.mT @ v).add_(bd.mT @ Uc)
    return dict(R=R, Yc=Yc, M=M, c=c, logd=logd, v=v, eG=eG, eGx=eGx, einv=einv, rq=rq, aq=aq,
                kq=kq, bq=bq, to_P0=to_P0, to_end=to_end, decay_all=decay_all, incl=incl,
                strict=strict, A_rk=A_rk, A_rb=A_rb, A_ak=A_ak, X=X, W=W, Uc=Uc, rP=rP, aP=aP,
                kd=kd, bd=bd)


def _scan(M, c, P, P0s):
    """Apply P_{n+1} = M_n P_n + c_n over chunks [rows,NC,..]; writes the incoming states into P0s
    [rows,NC,K,V] and returns the last."""
    for n in range(M.shape[1]):
        P0s[:, n] = P
        P = torch.baddbmm(c[:, n], M[:, n], P)
    return P


def _intra_backward(s, P0s, dY, dPend, out):
    """Writes the gradients of the chunk inputs (r, logd, k, v, a, b) into `out`, given dY and
    dP_end per chunk.

    With U = W P0 + Uc the a-rows' reads of the state, per chunk: S = aP P0 + A_ak v, U = X S,
    Y = rP P0 + A_rb U + A_rk v, P_end = D P0 + bd^T U + kd^T v, D = diag(decay_all).
    Since X = (I - A_ab)^{-1}: dS = X^T dU and dA_ab = dS U^T. Every product r_i k_j e^{G_i - G_j}
    depends on G only through differences, so the centring `mid` gets no gradient.
    """
    U = (s["W"] @ P0s).add_(s["Uc"])
    dU = (s["A_rb"].mT @ dY).add_(s["bd"] @ dPend)
    dS = s["X"].mT @ dU
    incl, strict = s["incl"], s["strict"]
    dA_rb, dA_rk = (dY @ U.mT).mul_(incl), (dY @ s["v"].mT).mul_(incl)
    dA_ak, dA_ab = (dS @ s["v"].mT).mul_(strict), (dS @ U.mT).mul_(strict)
    torch.matmul(s["kd"], dPend, out=out[3]).add_(s["A_rk"].mT @ dY).add_(s["A_ak"].mT @ dS)
    drP, daP = dY @ P0s.mT, dS @ P0s.mT
    dkd, dbd = s["v"] @ dPend.mT, U @ dPend.mT
    ddecay = (dPend * P0s).sum(-1).unsqueeze(-2)  # the diagonal of dPend P0^T
    rq, aq, kq, bq = s["rq"], s["aq"], s["kq"], s["bq"]
    drq = (dA_rk @ kq).add_(dA_rb @ bq)
    daq = (dA_ak @ kq).add_(dA_ab @ bq)
    dkq = (dA_rk.mT @ rq).add_(dA_ak.mT @ aq)
    dbq = (dA_rb.mT @ rq).add_(dA_ab.mT @ aq)
    # the log-decay sums: rq, rP grow with e^G; aq, aP with e^Gx; kq, bq, kd, bd shrink with e^-G
    dG = drq * rq
    dG.addcmul_(drP, s["rP"]).sub_(dkq * kq).sub_(dbq * bq)
    dend = dkd * s["kd"]
    dend.addcmul_(dbd, s["bd"])
    dG.sub_(dend)
    dGx = (daq * aq).addcmul_(daP, s["aP"])
    dG.add_(dGx)
    dG[..., -1:, :] += dend.sum(-2, keepdim=True).addcmul_(ddecay, s["decay_all"])
    # G = cumsum(logd), Gx = G - logd; the reverse cumsum as a matmul (faster than cumsum here)
    torch.matmul(_ones(dG).triu(), dG, out=out[1]).sub_(dGx)
    to_P0, to_end = s["to_P0"], s["to_end"]
    torch.mul(drP.mul_(to_P0).add_(drq), s["eG"], out=out[0])
    torch.mul(daP.mul_(to_P0).add_(daq), s["eGx"], out=out[4])
    torch.mul(dkd.mul_(to_end).add_(dkq), s["einv"], out=out[2])
    torch.mul(dbd.mul_(to_end).add_(dbq), s["einv"], out=out[5])


# What the backward keeps of `_intra`: no products it does not use, and nothing one cheap
# elementwise op re-derives (fresh memory for saved tensors costs page faults; recomputing a
# group's tensors in cache is cheaper)
_SAVED = ("R", "M", "logd", "v", "eG", "rq", "aq", "kq", "bq", "to_P0", "to_end", "decay_all",
          "incl", "strict", "A_rk", "A_rb", "A_ak", "X", "W", "Uc")


def _unsave(tensors):
    s = dict(zip(("P0s",) + _SAVED, tensors))
    s["einv"] = torch.reciprocal(s["eG"])
    s["eGx"] = torch.neg(s["logd"]).exp_().mul_(s["eG"])  # as in `_intra`
    s["rP"], s["aP"] = s["rq"] * s["to_P0"], s["aq"] * s["to_P0"]
    s["kd"], s["bd"] = s["kq"] * s["to_end"], s["bq"] * s["to_end"]
    return s


class _WKV7Chunked(torch.autograd.Function):
    """Works through groups of (batch, head) rows; keeps each group's intra-chunk intermediates
    and the states entering its chunks. The backward runs the chunk-to-chunk recurrence backwards
    and then the intra-chunk part, both by hand, group by group."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, resets, C, keep):
        B, T, H, N = r.shape
        NC = -(-T // C)
        y = torch.empty_like(r)
        Pend = r.new_empty(B, H, N, N, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)
        saved = []
        for i, hs in _groups(B, H, NC):
            xs, seg = _prepare(*(x[i:i + 1, :, hs] for x in (r, w, k, v, a, b)),
                               None if resets is None else resets[i:i + 1], C)
            s = _intra(*xs, seg)
            if state is None:
                P = xs[0].new_zeros(xs[0].shape[0], N, N)
            else:
                P = state[i, hs].to(xs[0].dtype).mT
            P0s = xs[0].new_empty(xs[0].shape[0], NC, N, N)
            Pend[i, hs] = _scan(s["M"], s["c"], P, P0s).mT
            _unchunk(torch.matmul(s["R"], P0s).add_(s["Yc"]), T, y[i, :, hs])
            if keep:
                saved += [P0s] + [s[name] for name in _SAVED]
        if keep:
            ctx.save_for_backward(*saved)
            ctx.dims, ctx.C = (B, T, H, N), C
            ctx.dtypes = [x.dtype for x in (r, w, k, v, a, b)]
            ctx.state_dtype = None if state is None else state.dtype
        return y, Pend

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dstate):
        B, T, H, N = ctx.dims
        C, NC, n_saved = ctx.C, -(-ctx.dims[1] // ctx.C), 1 + len(_SAVED)
        saved = ctx.saved_tensors
        grads = [dy.new_empty(B, T, H, N, dtype=dt) for dt in ctx.dtypes]
        dstate0 = torch.empty_like(dstate)
        for j, (i, hs) in enumerate(_groups(B, H, NC)):
            s = _unsave(saved[j * n_saved:(j + 1) * n_saved])
            R, M, P0s = s["R"], s["M"], s["P0s"]
            dY = dy[i:i + 1, :, hs].to(R.dtype).transpose(1, 2)
            if NC * C != T:
                dY = torch.nn.functional.pad(dY, (0, 0, 0, NC * C - T))
            dY = dY.reshape(-1, NC, C, N).contiguous()
            # the recurrence backwards: dP_n = R_n^T dY_n + M_n^T dP_{n+1}, from dP_end = dstate^T
            dP = dstate[i, hs].to(R.dtype).mT
            direct, dPend = R.mT @ dY, torch.empty_like(P0s)
            for n in reversed(range(NC)):
                dPend[:, n] = dP
                dP = torch.baddbmm(direct[:, n], M[:, n].mT, dP)
            dstate0[i, hs] = dP.mT
            got = [torch.empty_like(dY) for _ in range(6)]
            _intra_backward(s, P0s, dY, dPend, got)
            got[1].mul_(s["logd"])  # dw = dlogd * logd, as logd = -exp(w)
            for g, out, need in zip(got, grads, ctx.needs_input_grad):
                if need:
                    _unchunk(g, T, out[i, :, hs])
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
        dstate0 = dstate0.to(ctx.state_dtype) if ctx.needs_input_grad[6] else None
        return (*grads, dstate0, None, None, None)


def wkv7_chunked(r, w, k, v, a, b, state=None, resets=None, chunk_size=CHUNK_SIZE):
    """r, w, k, v, a, b: [B,T,H,N]; decay = exp(-exp(w)); state [B,H,N,N] (value x key), fp32.

    resets: optional bool [B,T]; where True the state is zeroed before that token.
    Returns y [B,T,H,N] in r's dtype and the final state [B,H,N,N] (fp32; fp64 for fp64 inputs).
    Memory: the backward keeps the intra-chunk intermediates (a few dozen [B,H,T,N]-sized
    tensors) and one [N,N] state per chunk, not per token; under no_grad only one group of
    (batch, head) rows is in memory at a time.
    """
    keep = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, state))
    return _WKV7Chunked.apply(r, w, k, v, a, b, state, resets, min(chunk_size, r.shape[1]), keep)
