"""Upstream RWKV-7 initialisation of a fresh model (BlinkDL/RWKV-LM RWKV-v7 train_temp)."""
from __future__ import annotations

import torch
import torch.nn as nn


def _orthogonal(t: torch.Tensor, gain: float) -> None:
    if gain == 0:
        nn.init.zeros_(t)
    else:
        nn.init.orthogonal_(t, gain=gain)


@torch.no_grad()
def init_rwkv7(model) -> None:
    cfg = model.config
    C, V, N, L = cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.n_layer
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / max(C - 1, 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / max((N - 1) / 2, 1e-9)
    zigzag = z * z.abs()
    as_vec = lambda t: t.reshape(1, 1, C)  # noqa: E731

    for l, block in enumerate(model.blocks):
        r0 = l / (L - 1) if L > 1 else 0.0  # 0 -> 1 across layers
        r1 = 1.0 - l / L                     # 1 -> almost 0
        att, ffn = block.att, block.ffn
        att.x_r.copy_(as_vec(1 - ddd ** (0.2 * r1)))
        att.x_w.copy_(as_vec(1 - ddd ** (0.9 * r1)))
        att.x_k.copy_(as_vec(1 - ddd ** (0.7 * r1)))
        att.x_v.copy_(as_vec(1 - ddd ** (0.7 * r1)))
        att.x_a.copy_(as_vec(1 - ddd ** (0.9 * r1)))
        att.x_g.copy_(as_vec(1 - ddd ** (0.2 * r1)))
        decay_speed = -6 + 6 * (n / max(C - 1, 1)) ** (1 + r0 ** 0.3)
        att.w0.copy_(as_vec(decay_speed + 0.5 + 2.5 * zigzag))  # 0.5 offsets the softplus
        att.a0.copy_(as_vec(-0.19 + 0.3 * zigzag + 0.4 * linear))
        att.k_k.copy_(as_vec(0.71 - 0.1 * linear))
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        lora = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
        if l > 0:
            att.v0.copy_(as_vec(0.73 - 0.4 * linear))
            lora.append((att.v1, att.v2))
        for down, up in lora:
            nn.init.zeros_(down)
            _orthogonal(up, 0.1)
        att.ln_x.weight.fill_(((1 + l) / L) ** 0.7)
        att.ln_x.bias.zero_()
        _orthogonal(att.receptance.weight, 1.0)
        _orthogonal(att.key.weight, 0.1)
        _orthogonal(att.value.weight, 1.0)
        nn.init.zeros_(att.output.weight)

        ffn.x_k.copy_(as_vec(1 - ddd ** (r1 ** 4)))
        _orthogonal(ffn.key.weight, 1.0)
        nn.init.zeros_(ffn.value.weight)
        if cfg.deep_embed:
            # small but non-zero, so every DeepEmbed tensor receives a gradient from step one
            nn.init.uniform_(ffn.s_emb.weight, -1e-4, 1e-4)
            nn.init.zeros_(ffn.s_emb_x.weight)
            _orthogonal(ffn.s1, 0.1)
            _orthogonal(ffn.s2, 0.1)
            ffn.s0.fill_(1.0)  # neutral: k * (0 + 1)

    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    _orthogonal(model.head.weight, 0.5 * (V / C) ** 0.5 if V > C else 0.5)
