"""Chunked WKV-7 in pure PyTorch: the default backend on CPU, also usable on GPU.

Same contract as `wkv7_reference`. The sequence is cut into chunks of C tokens; inside a chunk
the recurrence is solved in closed form with C x C attention-like matrices (docs/rwkv7.md, "Chunked WKV-7"),
batched over every (batch, head) row and a range of chunks at a time (see `_chunk_groups`).
Between chunks only a linear map of the state remains (see `_WKV7Chunked`), which a short
Python loop over chunks applies to all rows at once. The backward is written by hand, not left
to autograd.

Layout: chunk-major, [chunk, row = batch * heads, token in chunk, channel]. Internally P = S^T
(key x value), so the rows of every matrix below index tokens. The r/a and k/b operands are
stacked ([.., 2, C, N]) so that the four interaction matrices come from one product of 2C x 2C,
and their gradients likewise.

Range: the intra-chunk products are factorised as e^{G_i - mid} e^{mid - G_j}; they stay finite in
fp32 while chunk_size * exp(w) is below ~80 (w <= 0.9 at the default 32). The model's w is
<= -0.5 (decay >= 0.545), far inside that; the float64 path (for gradcheck) has more room.
"""
from __future__ import annotations

import torch

from .amp import no_autocast

CHUNK_SIZE = 32
GROUP_CHUNKS = 256  # (row, chunk) pairs per group of intra-chunk work, see `_chunk_groups`


def _chunk_groups(NC, rows):
    """Ranges [n0, n1) of chunks, each taken over all rows: big enough that each op has real
    work, small enough that a group's dozens of temporaries are recycled by the allocator
    rather than freshly page-faulted (which dominated the time when done all at once)."""
    n_groups = min(NC, max(1, round(NC * rows / GROUP_CHUNKS)))
    bounds = [round(i * NC / n_groups) for i in range(n_groups + 1)]  # evenly sized
    return list(zip(bounds[:-1], bounds[1:]))


def _to_chunks(x, n0, n1, C, out, scale=None):
    """Chunks n0..n1-1 of x [B,T,H,N] -> out [n1-n0, B*H, C, N] (any strides along the first two
    dims, converting dtype), times `scale` (shaped like out) if given; zero past T. The scaling
    rides along with the change of layout: one pass over memory instead of two."""
    B, T, H, N = x.shape
    dst = out.unflatten(1, (B, H))  # [n,B,H,C,N]
    sc = None if scale is None else scale.unflatten(1, (B, H))
    full = min(n1 - n0, (T - n0 * C) // C)  # chunks entirely inside the sequence
    if full:
        _put(x[:, n0 * C:(n0 + full) * C].unflatten(1, (full, C)).permute(1, 0, 3, 2, 4), dst[:full],
             None if sc is None else sc[:full])
    if full < n1 - n0:  # the ragged last chunk
        tail = x[:, (n0 + full) * C:].permute(0, 2, 1, 3)  # [B,H,tail,N]
        t = tail.shape[2]
        dst[full].zero_()
        _put(tail, dst[full, :, :, :t], None if sc is None else sc[full, :, :, :t])


def _from_chunks(xc, n0, C, out, scale=None):
    """The inverse of `_to_chunks`: chunks [n, B*H, C, N] starting at chunk n0 (times `scale`,
    shaped like xc, if given) -> out [B,T,H,N]."""
    B, T, H, N = out.shape
    src = xc.unflatten(1, (B, H))
    sc = None if scale is None else scale.unflatten(1, (B, H))
    n = xc.shape[0]
    full = min(n, (T - n0 * C) // C)
    if full:
        _put(src[:full], out[:, n0 * C:(n0 + full) * C].unflatten(1, (full, C)).permute(1, 0, 3, 2, 4),
             None if sc is None else sc[:full])
    if full < n:
        tail = out[:, (n0 + full) * C:].permute(0, 2, 1, 3)
        t = tail.shape[2]
        _put(src[full, :, :, :t], tail, None if sc is None else sc[full, :, :, :t])


def _put(src, dst, scale):
    if scale is None:
        dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)


def _segments(resets, n0, n1, C, H):
    """Segment ids [g = (n1-n0)*B*H, C] inside each chunk: 0 until the chunk's first reset."""
    B, T = resets.shape
    rs = resets[:, n0 * C:n1 * C].to(torch.int32)
    rs = torch.nn.functional.pad(rs, (0, (n1 - n0) * C - rs.shape[1]))
    seg = rs.view(B, n1 - n0, C).cumsum(-1).transpose(0, 1)  # [n,B,C]
    return seg.unsqueeze(2).expand(-1, -1, H, -1).reshape(-1, C)


def _ones(C, like):
    return torch.ones(C, C, dtype=like.dtype, device=like.device)


def _unit_lower_inverse(A):
    """(I - A)^{-1} for strictly lower triangular A [g, C, C].

    Doubling product (I + A)(I + A^2)(I + A^4)... (A is nilpotent): a few large batched matmuls,
    far faster on CPU than a batched `solve_triangular` of many small systems. From C = 32 on,
    by halves: [[X1, 0], [X2 A21 X1, X2]] with X1, X2 the halves' inverses (a quarter the work).
    """
    C = A.shape[-1]
    if C >= 32 and C % 2 == 0:
        h = C // 2
        Xh = _unit_lower_inverse(torch.cat([A[:, :h, :h], A[:, h:, h:]]))
        X1, X2 = Xh[:A.shape[0]], Xh[A.shape[0]:]
        X = A.new_zeros(A.shape)
        X[:, :h, :h], X[:, h:, h:], X[:, h:, :h] = X1, X2, X2 @ A[:, h:, :h] @ X1
        return X
    X, P = A + torch.eye(C, dtype=A.dtype, device=A.device), A
    n = 2
    while n < C:
        P = P @ P
        X = X + X @ P
        n *= 2
    return X


def _intra(inputs, ew, seg, load, out, restart=None):
    """Everything inside each chunk that does not depend on the incoming state P0 [K,V].

    inputs: r, k, v, a, b as given ([B,T,H,N]); `load(x, dst, scale)` puts this group's chunks of
    x (times scale) into dst [g,C,N]. ew = exp(w) = -log(decay), chunked [g,C,N]. With
    Q = [rq; aq] and K = [kq; bq] the decay-scaled operands, A = Q K^T (masked) holds
    A_rk, A_rb / A_ak, A_ab. The a-rows' reads of the state, U = a'^T P, solve the unit lower
    triangular system (I - A_ab) U = aP P0 + A_ak v, so with X = (I - A_ab)^{-1}:
    U = W P0 + Bx v (W = X aP, Bx = X A_ak), Y = rP P0 + A_rk v + A_rb U and
    P_end = D P0 + kd^T v + bd^T U, D = diag(total decay). Writes what the chunk-to-chunk pass
    needs into `out` (rP, A_rb, W, bd, D as a column, U's part Bx v, Yc = A_rk v, c = kd^T v);
    returns what the backward keeps (see `_intra_backward`).
    A reset inside a chunk masks every interaction across it and cuts the rows after it off
    from P0. With `restart` (the state resets restart from, [g,K,V]) those rows read it instead,
    decayed from their segment's start: see `_restart`.
    """
    r, k, v_in, a, b = inputs
    g, C, N = ew.shape
    G = _ones(C, ew).tril().neg_() @ ew  # chunk-local inclusive log-decay sums (cumsum; a global
    # sum would overflow fp32); as a matmul, faster than cumsum along this axis
    mid = G[:, C // 2:C // 2 + 1].clone()  # centre the factorised exponents to keep them small
    E = ew.new_empty(g, 2, C, N)  # [e^{G-mid}; e^{Gx-mid}], Gx = G + ew: a'_i meets P_{i-1}
    torch.sub(G, mid, out=E[:, 0])
    torch.add(E[:, 0], ew, out=E[:, 1])
    E.exp_()
    einv = torch.reciprocal(E[:, 0])
    Q, K, v = torch.empty_like(E), torch.empty_like(E), torch.empty_like(ew)
    for x, dst, scale in ((r, Q[:, 0], E[:, 0]), (a, Q[:, 1], E[:, 1]), (k, K[:, 0], einv),
                          (b, K[:, 1], einv), (v_in, v, None)):
        load(x, dst, scale)
    # e^G = e^{G-mid} e^mid and e^{Gend-G} = e^{mid-G} e^{Gend-mid}: [g,1,K] rows, no new exp
    to_P0 = torch.exp(mid)  # the rows' view of the incoming state
    to_end = torch.exp(G[:, -1:] - mid)  # decay from each token to the chunk end
    decay_all = torch.exp(G[:, -1:])

    ones = torch.ones(C, C, dtype=torch.bool, device=ew.device)
    incl, strict = ones.tril(), ones.tril(-1)
    if seg is not None:
        same = seg[:, :, None] == seg[:, None, :]  # [g,C,C]
        incl, strict = incl & same, strict & same
        last = seg[:, -1:]
        to_P0 = to_P0 * (seg == 0).unsqueeze(-1).to(ew.dtype)
        to_end = to_end * (seg == last).unsqueeze(-1).to(ew.dtype)
        decay_all = decay_all * (last == 0).unsqueeze(-1).to(ew.dtype)
    # rows r then a, columns k then b; masked after the product (the upper triangle is finite)
    mask = torch.cat([torch.cat([incl, incl], -1), torch.cat([strict, strict], -1)], -2).to(ew.dtype)
    A = torch.bmm(Q.view(g, 2 * C, N), K.view(g, 2 * C, N).mT).mul_(mask)
    A_rk, A_rb, A_ak, A_ab = A[:, :C, :C], A[:, :C, C:], A[:, C:, :C], A[:, C:, C:]
    out["A_rb"].copy_(A_rb)
    out["D"].copy_(decay_all.mT)

    torch.mul(Q[:, 0], to_P0, out=out["rP"])
    X = _unit_lower_inverse(A_ab)
    torch.bmm(X, Q[:, 1] * to_P0, out=out["W"])
    torch.bmm(X @ A_ak, v, out=out["U"])
    torch.bmm(A_rk, v, out=out["Yc"])
    torch.mul(K[:, 1], to_end, out=out["bd"])
    kd = K[:, 0] * to_end
    torch.bmm(kd.mT, v, out=out["c"])
    saved = [Q, K, A, X, v, E, einv, kd, ew, to_P0, to_end, decay_all, mask]
    if restart is not None:
        saved += _restart(saved, seg, restart, out)
    return saved


def _restart(saved, seg, PR, out):
    """The rows after a reset start from PR [g,K,V] rather than zero. Row i of segment s > 0 reads
    PR through e^{Gs_i}, Gs = the log-decay summed from the segment's start (so Gs_i = G_i -
    G_{start-1}, but computed inside the segment, as the masked product incl @ ew); a-rows one
    step earlier (e^{Gs_i + ew_i}), and the chunk's end state through e^{Gs_last} when the last
    segment is not the first. PR is known before the chunk-to-chunk pass, so its share goes
    straight into U, Yc and c: U += X aR PR, Yc += rR PR, c += diag(DR) PR.
    Returns what `_restart_backward` needs: ERi = e^{Gs} * e^{mid-G} (so [rR; aR] = Q * ERi),
    DR and PR.
    """
    Q, X, einv, ew, mask = saved[0], saved[3], saved[6], saved[8], saved[12]
    C = ew.shape[1]
    Gs = torch.bmm(mask[:, :C, :C], ew).neg_()  # mask's first block: same segment, j <= i
    ER = Gs.exp_()
    DR = ER[:, -1:] * (seg[:, -1:] > 0).unsqueeze(-1).to(ew.dtype)
    ERi = ER.mul_((seg > 0).unsqueeze(-1).to(ew.dtype)).mul_(einv)
    QR = Q * ERi.unsqueeze(1)
    out["Yc"].baddbmm_(QR[:, 0], PR)
    out["U"].baddbmm_(X @ QR[:, 1], PR)
    out["c"].addcmul_(DR.mT, PR)
    return [ERi, DR, PR]


def _restart_backward(saved, restart_saved, dYS, dPend, dQ, dew, dPR):
    """`_restart`'s share of the gradients: adds to dQ (then scaled like Q's own), dew and dPR."""
    Q, mask = saved[0], saved[12]
    ERi, DR, PR = restart_saved
    g, _, C, N = Q.shape
    QR = Q * ERi.unsqueeze(1)
    dYS2 = dYS.view(g, 2 * C, N)
    dQR = torch.bmm(dYS2, PR.mT).view(g, 2, C, N)
    grow = dQR * QR
    dGs = grow.sum(1)
    dGs[:, -1] += DR.squeeze(1) * (dPend * PR).sum(-1)
    dew.add_(grow[:, 1]).sub_(mask[:, :C, :C].mT @ dGs)  # Gs = -(incl @ ew); a-rows: + ew
    dQ.addcmul_(dQR, ERi.unsqueeze(1))
    dPRg = torch.bmm(QR.view(g, 2 * C, N).mT, dYS2).addcmul_(DR.mT, dPend)
    dPR += dPRg.view(-1, *dPR.shape).sum(0)


def _intra_backward(saved, U, P0, dPend, dU, dYS, store, dPR=None):
    """The gradients of r, w, k, v, a, b for one group, given U, P0, dP_end [g,K,V], dU (from
    the chunk-to-chunk pass) and dYS [g,2,C,N] whose first half holds dY (the second is used
    for dS). `store(i, grad, scale)` writes input i's gradient (grad times scale) for the group.

    S = aP P0 + A_ak v and U = X S as in `_intra`; since X = (I - A_ab)^{-1}: dS = X^T dU and
    dA_ab = dS U^T, so [dY; dS] [v; U]^T is the gradient of all of A at once. Every product
    r_i k_j e^{G_i - G_j} depends on G only through differences, so `mid` gets no gradient.
    With a restart state, `_restart`'s share goes to dPR [rows,K,V] as well.
    """
    saved, restart_saved = saved[:13], saved[13:]
    Q, K, A, X, v, E, einv, kd, ew, to_P0, to_end, decay_all, mask = saved
    g, _, C, N = Q.shape
    dYS2 = dYS.view(g, 2 * C, N)
    # (bmm into a strided slice falls back to a slow path: products go to fresh memory and are copied)
    VU = torch.empty_like(Q)
    VU[:, 0] = v
    VU[:, 1] = U
    dYS[:, 1] = X.mT @ dU  # dS
    VU2 = VU.view(g, 2 * C, N)
    dA = torch.bmm(dYS2, VU2.mT).mul_(mask)
    dv = torch.baddbmm(kd @ dPend, A[:, :, :C].mT, dYS2)
    dQP = torch.bmm(dYS2, P0.mT).view(g, 2, C, N)  # [drP; daP]
    dKD = torch.bmm(VU2, dPend.mT).view(g, 2, C, N)  # [dkd; dbd]
    ddecay = (dPend * P0).sum(-1)  # the diagonal of dPend P0^T
    dQ = torch.bmm(dA, K.view(g, 2 * C, N)).view(g, 2, C, N)
    dK = torch.bmm(dA.mT, Q.view(g, 2 * C, N)).view(g, 2, C, N)
    # the log-decay sums: Q = [rq; aq] and QP = Q * to_P0 grow with e^G (r) and e^Gx (a), so their
    # share is (dQ + dQP * to_P0) * Q; K and KD = K * to_end shrink with e^-G, and KD grows with
    # the chunk's total (its last row)
    dQ = torch.addcmul(dQ, dQP, to_P0.unsqueeze(1))
    grow = dQ * Q
    dKD.mul_(to_end.unsqueeze(1))
    dend = (dKD * K).sum((1, 2))
    dK = dKD.add_(dK)
    dG = grow.sum(1).sub_((dK * K).sum(1))
    dG[:, -1] += dend.addcmul_(ddecay, decay_all.squeeze(1))
    # G = -cumsum(ew), Gx = G + ew; the reverse cumsum as a matmul (faster than cumsum here); and
    # dw = dew * ew
    dew = _ones(C, dG).triu() @ dG
    torch.sub(grow[:, 1], dew, out=dew)
    if restart_saved:
        _restart_backward(saved, restart_saved, dYS, dPend, dQ, dew, dPR)
    for i, grad, scale in ((0, dQ[:, 0], E[:, 0]), (4, dQ[:, 1], E[:, 1]), (2, dK[:, 0], einv),
                           (5, dK[:, 1], einv), (1, dew, ew), (3, dv, None)):
        store(i, grad, scale)


# what the chunk-to-chunk pass reads of each chunk, [NC, rows, ...] with these trailing shapes
_SCAN_SHAPES = dict(rP="CN", A_rb="CC", W="CN", bd="CN", D="N1", U="CN", Yc="CN", c="NN")


class _WKV7Chunked(torch.autograd.Function):
    """Forward: the intra-chunk work group by group, then the chunk-to-chunk recurrence for all
    rows at once. Backward: that recurrence backwards for all rows, then the intra-chunk
    gradients group by group. Keeps each group's intermediates and the states entering chunks.

    Per chunk n (see `_intra`): U_n = W_n P_n + (Bx v)_n, y_n = rP_n P_n + A_rb,n U_n + Yc_n and
    P_{n+1} = D_n P_n + bd_n^T U_n + c_n. Backwards: dU_n = A_rb,n^T dY_n + bd_n dP_{n+1} and
    dP_n = rP_n^T dY_n + D_n dP_{n+1} + W_n^T dU_n.
    """

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, resets, reset_state, C, keep):
        with no_autocast(r.device.type):  # its fp32 buffers take products of fp32 operands
            return _WKV7Chunked._forward(ctx, r, w, k, v, a, b, state, resets, reset_state, C, keep)

    @staticmethod
    def _forward(ctx, r, w, k, v, a, b, state, resets, reset_state, C, keep):
        B, T, H, N = r.shape
        rows, NC = B * H, -(-T // C)
        dt = torch.float64 if r.dtype == torch.float64 else torch.float32
        PR = None if reset_state is None else reset_state.to(dt).reshape(rows, N, N).mT
        new = lambda *shape: r.new_empty(*shape, dtype=dt)  # noqa: E731
        dims = dict(C=C, N=N, **{"1": 1})
        scan = {name: new(NC, rows, *(dims[d] for d in shape)) for name, shape in _SCAN_SHAPES.items()}
        saved = []
        for n0, n1 in _chunk_groups(NC, rows):
            n, g = n1 - n0, (n1 - n0) * rows
            ew = new(n, rows, C, N)
            _to_chunks(w, n0, n1, C, ew)
            ew.exp_()  # -log of the decay, <= 0.6065 for the model's w <= -0.5
            ew[-1, :, T - (n1 - 1) * C:] = 0  # padding past T: decay 1 (and zero r, k, v, a, b)

            def load(x, dst, scale, n0=n0, n1=n1):
                _to_chunks(x, n0, n1, C, dst.unflatten(0, (n1 - n0, rows)),
                           None if scale is None else scale.unflatten(0, (n1 - n0, rows)))
            seg = None if resets is None else _segments(resets, n0, n1, C, H)
            out = {name: x[n0:n1].flatten(0, 1) for name, x in scan.items()}
            restart = None if PR is None else PR.expand(n, rows, N, N).reshape(g, N, N)
            saved += _intra((r, k, v, a, b), ew.view(g, C, N), seg, load, out, restart)
            if not keep:
                saved = []
        rP, A_rb, W, bd, D, U, Yc, c = (scan[name] for name in _SCAN_SHAPES)
        P0s = new(NC + 1, rows, N, N)  # the state entering each chunk, and the final one
        if state is None:
            P0s[0].zero_()
        else:
            P0s[0].copy_(state.reshape(rows, N, N).mT)
        for n in range(NC):
            P = P0s[n]
            U[n].baddbmm_(W[n], P)
            Yc[n].baddbmm_(rP[n], P).baddbmm_(A_rb[n], U[n])
            torch.addcmul(c[n], D[n], P, out=P0s[n + 1]).baddbmm_(bd[n].mT, U[n])
        y = torch.empty_like(r)
        _from_chunks(Yc, 0, C, y)
        if keep:
            ctx.save_for_backward(rP, A_rb, W, bd, D, U, P0s, *saved)
            ctx.dims, ctx.C = (B, T, H, N), C
            ctx.dtypes = [x.dtype for x in (r, w, k, v, a, b)]  # inputs may mix dtypes
            ctx.state_dtype = None if state is None else state.dtype
            ctx.reset_state_dtype = None if reset_state is None else reset_state.dtype
        return y, P0s[NC].mT.reshape(B, H, N, N).clone(memory_format=torch.contiguous_format)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dstate):
        with no_autocast(dy.device.type):
            return _WKV7Chunked._backward(ctx, dy, dstate)

    @staticmethod
    def _backward(ctx, dy, dstate):
        B, T, H, N = ctx.dims
        C = ctx.C
        rows, NC = B * H, -(-T // C)
        rP, A_rb, W, bd, D, U, P0s, *saved = ctx.saved_tensors
        dYS = rP.new_empty(NC, rows, 2, C, N)  # [dY; dS] per chunk
        _to_chunks(dy, 0, NC, C, dYS[:, :, 0])
        dY = dYS[:, :, 0].flatten(0, 1)
        # the parts of the recurrence backwards that do not depend on dP, for all chunks at once
        dU = torch.bmm(A_rb.flatten(0, 1).mT, dY).view(NC, rows, C, N)
        dPs = rP.new_empty(NC + 1, rows, N, N)  # dP_n: the gradient of the state entering chunk n
        torch.bmm(rP.flatten(0, 1).mT, dY, out=dPs[:NC].flatten(0, 1))
        dPs[NC].copy_(dstate.reshape(rows, N, N).mT)
        for n in reversed(range(NC)):
            dU[n].baddbmm_(bd[n], dPs[n + 1])
            dPs[n].addcmul_(D[n], dPs[n + 1]).baddbmm_(W[n].mT, dU[n])
        need = ctx.needs_input_grad
        grads = [dy.new_empty(B, T, H, N, dtype=ctx.dtypes[i]) if need[i] else None for i in range(6)]
        groups = _chunk_groups(NC, rows)
        per_group = len(saved) // len(groups)
        dPR = None if ctx.reset_state_dtype is None else rP.new_zeros(rows, N, N)
        for j, (n0, n1) in enumerate(groups):
            flat = lambda x: x[n0:n1].flatten(0, 1)  # noqa: E731

            def store(i, grad, scale, n0=n0, n1=n1):
                if grads[i] is not None:
                    _from_chunks(grad.unflatten(0, (n1 - n0, rows)), n0, C, grads[i],
                                 None if scale is None else scale.unflatten(0, (n1 - n0, rows)))
            _intra_backward(saved[j * per_group:(j + 1) * per_group], flat(U), flat(P0s),
                            dPs[n0 + 1:n1 + 1].flatten(0, 1), flat(dU), flat(dYS), store, dPR)
        dstate0 = dPs[0].mT.reshape(B, H, N, N).to(ctx.state_dtype) if need[6] else None
        dreset = dPR.mT.reshape(B, H, N, N).to(ctx.reset_state_dtype) if need[8] else None
        return (*grads, dstate0, None, dreset, None, None)


def wkv7_chunked(r, w, k, v, a, b, state=None, resets=None, reset_state=None, chunk_size=CHUNK_SIZE):
    """r, w, k, v, a, b: [B,T,H,N]; decay = exp(-exp(w)); state [B,H,N,N] (value x key), fp32.

    resets: optional bool [B,T]; where True the state restarts before that token, from zero or
    from reset_state ([H,N,N] or [B,H,N,N], differentiable).
    The inputs may mix dtypes; all arithmetic is fp32 (fp64 when r is fp64), autocast or not.
    Returns y [B,T,H,N] in r's dtype and the final state [B,H,N,N] (fp32; fp64 for fp64 inputs).
    Memory: the backward keeps about 19 fp32 tensors of the inputs' size (the intra-chunk
    intermediates and one [N,N] state per chunk, not per token); under no_grad about 10.
    """
    B, T, H, N = r.shape
    if resets is None:
        reset_state = None  # nothing restarts
    elif reset_state is not None:
        reset_state = reset_state.expand(B, H, N, N)  # autograd sums a shared state's gradient
    keep = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, state, reset_state))
    return _WKV7Chunked.apply(r, w, k, v, a, b, state, resets, reset_state, min(chunk_size, T), keep)
