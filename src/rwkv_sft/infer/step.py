"""One decoding step of RWKV-7 (one token per row, no autograd) with as few operations as possible.

`Decoder` (infer/decoder.py) hands a [B,1] call made without gradients to `decode_step`. The math is that of
`Block` / `TimeMix` / `ChannelMix` and `wkv7_reference` for T = 1, written for a single token:
the six token-shift mixes in one op, the decay as exp(-e^-0.5 sigmoid(z)) (equal to
exp(-exp(-softplus(-z) - 0.5))), the two rank-1 state updates as in-place multiply-adds written
straight into the new state. Projections go through the modules, so wrapped or adapted Linear
layers keep working. tests/test_decode_step.py checks logits and state against the full forward.

An fp32 or bf16 model on the CPU takes `_step_with_kernels` instead: the same math with the
element-wise work of each layer, the time mix's low-rank products and (up to 8 rows) the
projections' matrix-vector products in C (ops/csrc/decode_cpu.c, built on first use by the system
compiler), activations in fp32. A step is then bound by streaming the weights from memory rather
than by ~40 small tensor ops per layer. Without a compiler, or with RWKV_SFT_DECODE_KERNELS=0, the
PyTorch path runs.

Weights are read as the modules hold them (the decoder's twin holds the wide fp32 ones transposed,
which the C products and F.linear read as they are); `stacks` maps a TimeMix to its receptance/key/value
as one [3, in, out] tensor, multiplied in one batched product.
"""
from __future__ import annotations

import ctypes
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import env
from ..model.rwkv7 import RWKV7State

NEG_EXP_HALF = -math.exp(-0.5)  # log(decay) = -exp(w) = -e^-0.5 sigmoid(z)


def decode_step(model, tokens: torch.Tensor, state: RWKV7State | None = None, full_output: bool = True,
                stacks: dict | None = None):
    """tokens [B,1] -> (logits [B,1,V], or [B,V] with full_output=False; the new state).
    stacks: TimeMix -> its [3, in, out] receptance/key/value stack (Decoder's layout), where it has one."""
    B = tokens.shape[0]
    if state is None:
        initial = getattr(model, "initial_state", None)
        state = initial(B) if initial is not None else model.zero_state(B, device=tokens.device)
    lib = _kernels_for(model)
    if lib is not None and state.wkv.dtype == torch.float32:
        try:
            logits, new_state = _step_with_kernels(lib, model, tokens, state, stacks)
            return (logits.unsqueeze(1) if full_output else logits), new_state
        except _NotForKernels:  # (a parameter the C code cannot read; nothing was changed)
            pass
    idx = tokens[:, 0]
    x = model.blocks[0].ln0(model.emb(idx))
    x_emb, v_first = x, None
    wkv = torch.empty_like(state.wkv)
    att_shifts, ffn_shifts = [], []
    for i, block in enumerate(model.blocks):
        xa = block.ln1(x)
        dx, v_first = _time_mix(block.att, xa, state.att_shift[i], state.wkv[i], v_first, wkv[i], _stack(stacks, block.att))
        att_shifts.append(xa)
        x = x + dx
        xf = block.ln2(x)
        ffn = block.ffn
        if ffn.deep_embed:
            dx = ffn(xf.unsqueeze(1), state.ffn_shift[i], None, tokens, x_emb.unsqueeze(1))[0][:, 0]
        else:
            k = torch.relu(ffn.key(torch.addcmul(xf, state.ffn_shift[i].to(xf.dtype) - xf, ffn.x_k[0])))
            dx = ffn.value(k * k)
        ffn_shifts.append(xf)
        x = x + dx
    logits = model.head(model.ln_out(x))
    new_state = RWKV7State(torch.stack(att_shifts), wkv, torch.stack(ffn_shifts))
    return (logits.unsqueeze(1) if full_output else logits), new_state


def _stack(stacks, att) -> torch.Tensor | None:
    """att's [3, in, out] receptance/key/value stack while its three weights are still views of it
    (a weight replaced since, e.g. by load_state_dict(assign=True), leaves it to the modules)."""
    rkv = stacks.get(att) if stacks else None
    if rkv is None or any(m.weight.data_ptr() != w.data_ptr() for m, w in zip((att.receptance, att.key, att.value), rkv)):
        return None
    return rkv


_WEIGHT_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # weight dtype -> the C functions' suffix


def _kernels_for(model):
    """The C kernels when this model's step can use them: an fp32 or bf16 model on the CPU, and not
    switched off with RWKV_SFT_DECODE_KERNELS=0 (the PyTorch path computes the same)."""
    if not env.decode_kernels():
        return None
    if not isinstance(model.head, nn.Linear):  # a quantized base: the PyTorch path
        return None
    emb, head = model.emb.weight, model.head.weight
    if emb.dtype not in _WEIGHT_TYPES or head.dtype != emb.dtype or head.device.type != "cpu":
        return None
    from ..ops.decode_cpu import kernels
    return kernels()


class _NotForKernels(Exception):
    """A tensor the C kernels cannot read as it is; the step runs in PyTorch instead."""


def _ptr(t: torch.Tensor | None, dtype=torch.float32) -> int | None:
    """The address of a tensor's data, or NULL. C reads it as contiguous `dtype`, so that is
    checked; the caller keeps the tensor alive until the call returns."""
    if t is None:
        return None
    if not t.is_contiguous() or t.dtype != dtype or t.device.type != "cpu":
        raise _NotForKernels
    return t.data_ptr()


def _step_with_kernels(lib, model, tokens, state, stacks=None):
    """decode_step with the work of each layer in C (ops/csrc/decode_cpu.c): the residual, layer
    norm and token-shift mixes on the way into each mix; the time mix's low-rank products, WKV-7
    and group norm; the projections through `_project` (C for up to MATVEC_ROWS rows of a plain Linear).
    Activations are fp32 and weights are read as stored (fp32 or bf16); logits and token-shift
    states come back in the weights' dtype, as from the PyTorch path. Raises _NotForKernels,
    having changed nothing of the caller's, when a tensor is not as C reads it."""
    B, L, C, f32, dtype = tokens.shape[0], len(model.blocks), model.config.n_embd, torch.float32, model.emb.weight.dtype
    add_norm_mix, time_mix = (getattr(lib, f"{name}_{_WEIGHT_TYPES[dtype]}") for name in ("rwkv7_add_norm_mix", "rwkv7_time_mix"))
    weight = lambda t: _ptr(t, dtype)  # noqa: E731  (a parameter, as stored)
    new = RWKV7State(torch.empty(L, B, C, dtype=f32), torch.empty(state.wkv.shape, dtype=f32), torch.empty(L, B, C, dtype=f32))
    # the caller's state as C reads it (references held here, so the memory lives through each call)
    att_in, wkv_in, ffn_in = (t.to(f32).contiguous() for t in (state.att_shift, state.wkv, state.ffn_shift))

    def enter(x, dx, norm, normed, last, mixes, out):
        """x += dx; normed = norm(x); out[m] = normed + (last - normed) * mixes[m] (in one pass)."""
        mix_ptrs = (ctypes.c_void_p * max(len(mixes), 1))(*map(weight, mixes))
        add_norm_mix(B, C, _ptr(x), _ptr(dx), weight(norm.weight), weight(norm.bias), norm.eps, _ptr(normed),
                     _ptr(last), len(mixes), mix_ptrs, _ptr(out))

    x = torch.empty(B, C, dtype=f32)  # the residual stream, updated in place
    enter(model.emb(tokens[:, 0]).float(), None, model.blocks[0].ln0, x, None, (), None)
    x_emb = x.clone() if model.config.deep_embed else None
    dx = v_first = None
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        mixed = torch.empty(6, B, C, dtype=f32)  # r, k, v, w, a, g
        enter(x, dx, block.ln1, new.att_shift[i], att_in[i], (att.x_r, att.x_k, att.x_v, att.x_w, att.x_a, att.x_g), mixed)
        xr, xk, xv, xw, xa, xg = mixed
        rkv = _stack(stacks, att) if B > MATVEC_ROWS else None
        if rkv is not None:
            r, k, v = torch.bmm(mixed[:3], rkv)
        else:
            r, k, v = (_project(lib, m, xm, dtype) for m, xm in ((att.receptance, xr), (att.key, xk), (att.value, xv)))
        first = att.layer_id == 0  # it defines v_first, the others mix it in
        v_first = torch.empty(B, C, dtype=f32) if first else v_first
        low_rank = [(att.w1, att.w2), (att.a1, att.a2), (None, None) if first else (att.v1, att.v2), (att.g1, att.g2)]
        out, scratch = torch.empty(B, C, dtype=f32), torch.empty(4, B, C, dtype=f32)
        time_mix(
            B, att.n_head, att.head_size, int(first), *map(_ptr, (r, k, v, xw, xa, xv, xg)),
            *(arg for down, up in low_rank for arg in (weight(down), weight(up), 0 if down is None else down.shape[1])),
            *map(weight, (att.w0, att.a0, None if first else att.v0)), _ptr(v_first),
            *map(weight, (att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias)), att.ln_x.eps,
            _ptr(wkv_in[i]), _ptr(new.wkv[i]), _ptr(scratch), _ptr(out))
        dx = _project(lib, att.output, out, dtype)
        if ffn.deep_embed:
            enter(x, dx, block.ln2, new.ffn_shift[i], None, (), None)
            dx = ffn(new.ffn_shift[i].to(dtype).unsqueeze(1), state.ffn_shift[i], None, tokens,
                     x_emb.to(dtype).unsqueeze(1))[0][:, 0].float()
        else:
            mixed = torch.empty(B, C, dtype=f32)
            enter(x, dx, block.ln2, new.ffn_shift[i], ffn_in[i], (ffn.x_k,), mixed)
            k = _project(lib, ffn.key, mixed, dtype).contiguous()
            lib.rwkv7_relu_square(k.numel(), _ptr(k))
            dx = _project(lib, ffn.value, k, dtype)
    hidden = torch.empty(B, C, dtype=f32)
    enter(x, dx, model.ln_out, hidden, None, (), None)
    logits = _project(lib, model.head, hidden, dtype).to(dtype)
    return logits, RWKV7State(new.att_shift.to(dtype), new.wkv, new.ffn_shift.to(dtype))


MATVEC_ROWS = 8  # up to this many rows, C streams a weight once for all; above, torch's matrix product


def _project(lib, module, x, dtype):
    """module(x) for x [B,in] fp32, in fp32. A plain Linear without bias: for up to MATVEC_ROWS
    rows, C's matrix-vector products (on 2 cores ~20% faster than torch's in fp32; bf16 weights
    read as fp32); for more, F.linear. Other modules (LoRA) are called with x in the model's dtype."""
    if type(module) is not nn.Linear or module.bias is not None:
        return module(x.to(dtype)).float()
    w = module.weight
    if x.shape[0] <= MATVEC_ROWS and w.dtype in _WEIGHT_TYPES and (w.is_contiguous() or w.t().is_contiguous()):
        transposed = not w.is_contiguous()  # (stored [in, out], as the Decoder's twin holds a wide fp32 weight)
        y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        getattr(lib, "rwkv7_matvec_" + _WEIGHT_TYPES[w.dtype])(
            x.shape[0], _ptr(x), _ptr(w.t() if transposed else w, w.dtype), _ptr(y), w.shape[1], w.shape[0],
            int(transposed))
        return y
    return F.linear(x.to(w.dtype), w).float()


def _time_mix(att, x, last_x, S, v_first, S_out, rkv=None):
    """x [B,C] -> (output [B,C], v_first); writes the new WKV state [B,H,N,N] into S_out."""
    B, C = x.shape
    H, N = att.n_head, att.head_size
    xx = last_x.to(x.dtype) - x
    mix = torch.cat((att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g))  # [6,1,C]
    xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, mix)

    if rkv is not None and rkv.dtype == x.dtype:
        r, k, v = torch.bmm(torch.stack((xr, xk, xv)), rkv)
    else:
        r, k, v = att.receptance(xr), att.key(xk), att.value(xv)
    low = lambda m: m.to(x.dtype)  # noqa: E731  (a compact base stores the low-rank matrices in bf16)
    z = torch.addmm(att.w0[0], torch.tanh(xw @ low(att.w1)), low(att.w2))
    a = torch.sigmoid(torch.addmm(att.a0[0], xa @ low(att.a1), low(att.a2)))
    g = torch.sigmoid(xg @ low(att.g1)) @ low(att.g2)

    kk = F.normalize((k * att.k_k[0]).view(B, H, N), dim=-1, p=2.0, eps=1e-12)
    k = k * (1 + (a - 1) * att.k_a[0])
    if att.layer_id == 0:
        v_first = v
    else:
        v = torch.lerp(v, v_first, torch.sigmoid(torch.addmm(att.v0[0], xv @ low(att.v1), low(att.v2))))

    # WKV-7 for one token, fp32: S' = S diag(d) + (S a') b'^T + v k^T, y = S' r (a' = -kk, b' = kk a)
    f = lambda t: t.view(B, H, N).float()  # noqa: E731
    decay = torch.exp(torch.sigmoid(z.float()) * NEG_EXP_HALF).view(B, H, 1, N)
    kk = kk.float()
    # the two matrix-vector products per head as multiply-and-sum: ~2.5x faster than a batched
    # matmul of 64 x 64 blocks on the CPU
    sa = (S * kk.unsqueeze(-2)).sum(-1, keepdim=True).neg_()  # S a'
    torch.mul(S, decay, out=S_out)
    S_out.addcmul_(sa, (kk * f(a)).unsqueeze(-2))
    S_out.addcmul_(f(v).unsqueeze(-1), f(k).unsqueeze(-2))
    y = (S_out * f(r).unsqueeze(-2)).sum(-1).view(B, C).to(x.dtype)

    y = att.ln_x(y)
    bonus = (r.view(B, H, N) * k.view(B, H, N) * att.r_k).sum(dim=-1, keepdim=True) * v.view(B, H, N)
    return att.output((y + bonus.view(B, C)) * g), v_first
