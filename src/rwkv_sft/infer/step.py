"""One decoding step of RWKV-7 (one token per row, no autograd) with as few operations as possible.

`RWKV7.forward` hands a [B,1] call made without gradients to `decode_step`. The math is that of
`Block` / `TimeMix` / `ChannelMix` and `wkv7_reference` for T = 1, written for a single token:
the six token-shift mixes in one op, the decay as exp(-e^-0.5 sigmoid(z)) (equal to
exp(-exp(-softplus(-z) - 0.5))), the two rank-1 state updates as in-place multiply-adds written
straight into the new state. Projections go through the modules, so wrapped or adapted Linear
layers keep working. tests/test_decode_step.py checks logits and state against the full forward.

On the CPU the model is also switched to `decoding_layout()` (projection matrices transposed in
memory, same values): a matrix-vector product streams them faster that way. The next
forward with gradients switches back (`RWKV7.training_layout()`). The trainer turns this off
(`model.auto_decoding_layout = False`), so the generation of an evaluation during training
does not copy the weights twice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model.rwkv7 import RWKV7State, is_whole

NEG_EXP_HALF = -math.exp(-0.5)  # log(decay) = -exp(w) = -e^-0.5 sigmoid(z)


def _layout_switchable(model) -> bool:
    w = model.head.weight
    return w.device.type == "cpu" and is_whole(w)


def decode_step(model, tokens: torch.Tensor, state: RWKV7State | None = None, full_output: bool = True):
    """tokens [B,1] -> (logits [B,1,V], or [B,V] with full_output=False; the new state)."""
    if model.auto_decoding_layout and not getattr(model, "_decoding_layout", False) and _layout_switchable(model):
        with torch.inference_mode(False):  # the new weights must stay usable by autograd later
            model.decoding_layout()
    B = tokens.shape[0]
    if state is None:
        initial = getattr(model, "initial_state", None)
        state = initial(B) if initial is not None else model.zero_state(B, device=tokens.device)
    idx = tokens[:, 0]
    x = model.blocks[0].ln0(model.emb(idx))
    x_emb, v_first = x, None
    wkv = torch.empty_like(state.wkv)
    att_shifts, ffn_shifts = [], []
    for i, block in enumerate(model.blocks):
        xa = block.ln1(x)
        dx, v_first = _time_mix(block.att, xa, state.att_shift[i], state.wkv[i], v_first, wkv[i])
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


def _time_mix(att, x, last_x, S, v_first, S_out):
    """x [B,C] -> (output [B,C], v_first); writes the new WKV state [B,H,N,N] into S_out."""
    B, C = x.shape
    H, N = att.n_head, att.head_size
    xx = last_x.to(x.dtype) - x
    mix = torch.cat((att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g))  # [6,1,C]
    xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, mix)

    rkv = att.stacked_rkv()
    if rkv is not None and rkv.dtype == x.dtype:
        r, k, v = torch.bmm(torch.stack((xr, xk, xv)), rkv)
    else:
        r, k, v = att.receptance(xr), att.key(xk), att.value(xv)
    z = torch.addmm(att.w0[0], torch.tanh(xw @ att.w1), att.w2)
    a = torch.sigmoid(torch.addmm(att.a0[0], xa @ att.a1, att.a2))
    g = torch.sigmoid(xg @ att.g1) @ att.g2

    kk = F.normalize((k * att.k_k[0]).view(B, H, N), dim=-1, p=2.0, eps=1e-12)
    k = k * (1 + (a - 1) * att.k_a[0])
    if att.layer_id == 0:
        v_first = v
    else:
        v = torch.lerp(v, v_first, torch.sigmoid(torch.addmm(att.v0[0], xv @ att.v1, att.v2)))

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
