"""The RWKV-7 ("x070") model: one class for training and inference.

Math as in BlinkDL/RWKV-LM RWKV-v7 and the `rwkv` package's RWKV_x070; parameter names and
shapes are BlinkDL's `.pth` layout, so `state_dict()` is a loadable checkpoint.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops import wkv7
from ..ops.amp import widened
from ..ops.frozen import frozen_linear
from .config import RWKV7Config
from .segments import forward_segments


@dataclass
class RWKV7State:
    """Recurrent state of every layer, batched. Feed it back to continue a sequence."""
    att_shift: torch.Tensor  # [L, B, C] last time-mix input (token shift)
    wkv: torch.Tensor        # [L, B, H, N, N] fp32, value x key
    ffn_shift: torch.Tensor  # [L, B, C] last channel-mix input

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    def detach(self) -> "RWKV7State":
        return RWKV7State(self.att_shift.detach(), self.wkv.detach(), self.ffn_shift.detach())

    def select(self, index) -> "RWKV7State":
        """The rows `index` of the batch (an int, slice or index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return RWKV7State(self.att_shift[:, index], self.wkv[:, index], self.ffn_shift[:, index])

    def repeat(self, n: int) -> "RWKV7State":
        """Each row repeated n times (to sample several continuations of one prompt)."""
        return RWKV7State(self.att_shift.repeat_interleave(n, 1), self.wkv.repeat_interleave(n, 1),
                          self.ffn_shift.repeat_interleave(n, 1))


def _token_shift(x, last, resets, restart=None):
    """x_{t-1} for every t: `last` before the first token; after a sequence reset `restart` (one
    per row) or zeros."""
    prev = last.unsqueeze(1).to(x.dtype)
    if x.shape[1] > 1:  # (a single decoding step needs no concatenation)
        prev = torch.cat([prev, x[:, :-1]], dim=1)
    if resets is not None and restart is None:
        prev = prev.masked_fill(resets.unsqueeze(-1), 0.0)
    elif resets is not None:
        prev = torch.where(resets.unsqueeze(-1), restart.unsqueeze(1).to(x.dtype), prev)
    return prev


def _mm(x, matrix):
    """x @ matrix, for a low-rank matrix that a compact base may store in bf16 while x is fp32
    (converted for this product only, as the base's linear layers are)."""
    return frozen_linear(x, matrix.mT)


def _plus(product, bias):
    """product + bias, added in place to the fresh product (a product's backward keeps its operands,
    not its output), in the dtype the sum would have."""
    return widened(product, bias).add_(bias)


class TimeMix(nn.Module):
    LOW_RANK = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")  # matrices used only through _mm

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        vec = lambda: nn.Parameter(torch.empty(1, 1, C))  # noqa: E731
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), nn.Parameter(torch.empty(C, cfg.dim_w)), nn.Parameter(torch.empty(cfg.dim_w, C))
        self.a0, self.a1, self.a2 = vec(), nn.Parameter(torch.empty(C, cfg.dim_a)), nn.Parameter(torch.empty(cfg.dim_a, C))
        if layer_id > 0:  # layer 0 defines v_first and never mixes it in
            self.v0, self.v1, self.v2 = vec(), nn.Parameter(torch.empty(C, cfg.dim_v)), nn.Parameter(torch.empty(cfg.dim_v, C))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, cfg.dim_g)), nn.Parameter(torch.empty(cfg.dim_g, C))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        # learned initial WKV state [H,N,N] fp32 (value x key), see RWKV7.enable_state_tuning
        self.register_parameter("time_state", None)

    def initial_wkv(self, batch_size: int, device=None) -> torch.Tensor:
        """Where this layer's WKV state starts, [B,H,N,N]: the learned state (differentiable; fp32,
        fp64 in a float64 model) or zeros (fp32)."""
        if self.time_state is None:
            return torch.zeros(batch_size, self.n_head, self.head_size, self.head_size, device=device,
                               dtype=torch.float32)
        s = self.time_state.to(device=device, dtype=torch.promote_types(torch.float32, self.time_state.dtype))
        return s.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()

    def forward(self, x, last_x, wkv_state, v_first, resets, backend, restart=None):
        """restart: (token shift, WKV state) rows that resets restart from (default: zeros and the
        learned initial state or zeros)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        if wkv_state is None:  # a sequence's start, made here, where a sharded model's weights are whole
            wkv_state = self.initial_wkv(B, x.device)
        xx = _token_shift(x, last_x, resets, None if restart is None else restart[0]) - x
        # Fewer [B,T,C] temporaries than the formulas written out: the six lerps in one product, and
        # in-place steps on fresh tensors whose producer's backward does not keep them. On a CPU each
        # fresh block of a few MiB costs page faults; on a GPU each is a kernel and a memory pass.
        mix = torch.stack((self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))  # [6,1,1,C]
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, mix).unbind(0)

        r = self.receptance(xr)
        # w = -softplus(-(w0 + tanh(xw w1) w2)) - 0.5: log(-log(decay)). In place: a product's and
        # a sum's backward keep no output; softplus's keeps its input, which the neg_ precedes.
        w = F.softplus(_plus(_mm(torch.tanh(_mm(xw, self.w1)), self.w2), self.w0).neg_()).neg_().sub_(0.5)
        k = self.key(xk)
        v = self.value(xv)
        a = _plus(_mm(_mm(xa, self.a1), self.a2), self.a0).sigmoid_()  # (sigmoid keeps its output)
        g = _mm(torch.sigmoid(_mm(xg, self.g1)), self.g2)

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * widened(a - 1, self.k_a).mul_(self.k_a).add_(1)  # k * (1 + (a - 1) k_a)
        if self.layer_id == 0:
            v_first = v
        else:  # v + (v_first - v) * sigmoid(v0 + xv v1 v2)
            v = torch.addcmul(v, v_first - v, _plus(_mm(_mm(xv, self.v1), self.v2), self.v0).sigmoid_())

        heads = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        y, wkv_state = wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a),
                            state=wkv_state, backend=backend, resets=resets,
                            reset_state=self.time_state if restart is None else restart[1])
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = widened(heads(r) * heads(k), self.r_k).mul_(self.r_k).sum(dim=-1, keepdim=True)  # per head
        y = torch.addcmul(heads(y), bonus, heads(v)).view(B, T, C)  # y + bonus v
        # the next token shift owns its [B,C]: a view would keep all of x alive to the forward's end
        return self.output(y * g), x[:, -1].clone(), wkv_state, v_first


class ChannelMix(nn.Module):
    LOW_RANK = ("s1", "s2")  # DeepEmbed's, used only through _mm

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        C, F_ = cfg.n_embd, cfg.dim_ffn
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)
        self.deep_embed = cfg.deep_embed
        if cfg.deep_embed:  # DeepEmbed: a per-token [D,D] matrix modulates the hidden activations
            D = cfg.deep_embed_dim
            self.s_emb = nn.Embedding(cfg.vocab_size, D * D)
            self.s_emb_x = nn.Linear(C, D * D, bias=False)
            self.s1 = nn.Parameter(torch.empty(C, D))
            self.s2 = nn.Parameter(torch.empty(D, F_))
            self.s0 = nn.Parameter(torch.empty(1, 1, F_))

    def forward(self, x, last_x, resets, tokens, x_emb, restart_x=None):
        xx = _token_shift(x, last_x, resets, restart_x) - x
        k = torch.relu(self.key(torch.addcmul(x, xx, self.x_k))) ** 2
        if self.deep_embed:
            B, T, _ = x.shape
            D = self.s1.shape[1]
            s = (self.s_emb(tokens) + self.s_emb_x(x_emb)).view(B, T, D, D)
            ss = (_mm(x, self.s1).unsqueeze(-2) @ s).squeeze(-2)
            k = k * (_mm(ss, self.s2) + self.s0)
        return self.value(k), x[:, -1].clone()  # (owns its [B,C], as in TimeMix)


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.layer_id = layer_id
        if layer_id == 0:  # the embedding's norm; applied here so every module runs in its own forward
            self.ln0 = nn.LayerNorm(C)
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)

    def forward(self, x, v_first, att_shift, wkv_state, ffn_shift, resets, tokens, x_emb, backend, restart=None):
        """Block 0 takes the raw embedding and defines x_emb (the normed embedding, DeepEmbed's
        input) and v_first; the others carry them along. restart: this layer's (att shift, WKV,
        ffn shift) rows that resets restart from (default: where a sequence starts)."""
        if self.layer_id == 0:
            x = x_emb = self.ln0(x)
        dx, att_shift, wkv_state, v_first = self.att(self.ln1(x), att_shift, wkv_state, v_first, resets, backend,
                                                     None if restart is None else restart[:2])
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift, resets, tokens, x_emb, None if restart is None else restart[2])
        return x + dx, v_first, x_emb, att_shift, wkv_state, ffn_shift


class RWKV7(nn.Module):
    """RWKV-7 language model.

    `model(tokens)` -> (logits [B,T,V], state); `forward_hidden` stops before the head.
    `wkv_backend` picks the WKV-7 operator ("auto", "chunked", "reference", "cuda", "fla").
    `activation_checkpointing` recomputes each block in the backward pass to save memory.
    """

    def __init__(self, config: RWKV7Config, *, init_weights: bool = True):
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.vocab_size
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        self.wkv_backend = "auto"
        self.activation_checkpointing = False
        if init_weights:
            from .init import init_rwkv7
            init_rwkv7(self)

    # The two file methods of the public contract are doors into rwkv_sft.weights, imported only when
    # called: nothing in the model's math reads or writes files, and no code of the package uses them.
    @classmethod
    def load(cls, path, dtype=None, device=None, adapter=None, quantize=None) -> "RWKV7":
        """rwkv_sft.weights.load_model: a BlinkDL `.pth`, `.safetensors`, Hugging Face directory
        or step checkpoint, with an optional adapter (and an int8/nf4 base)."""
        from ..weights import load_model
        return load_model(path, dtype=dtype, device=device, adapter=adapter, quantize=quantize)

    def save(self, path, dtype=None) -> None:
        """rwkv_sft.weights.save_model: `.pth` (BlinkDL layout) or `.safetensors`, atomically."""
        from ..weights import save_model
        save_model(self, path, dtype=dtype)

    # -- state -----------------------------------------------------------------------------------
    def enable_state_tuning(self) -> list[nn.Parameter]:
        """Give every layer a learned initial WKV state `blocks.{i}.att.time_state` [H,N,N] fp32
        (value x key), zeros as upstream; layers that have one keep it. Returns the parameters.
        Without this call the model has none and its state_dict is the plain checkpoint's."""
        cfg, weight = self.config, self.emb.weight
        dtype = torch.promote_types(torch.float32, weight.dtype)  # fp32 (fp64 in a float64 model)
        for block in self.blocks:
            if block.att.time_state is None:
                block.att.time_state = nn.Parameter(torch.zeros(
                    cfg.n_head, cfg.head_size, cfg.head_size, device=weight.device, dtype=dtype))
        return self.learned_state()

    def learned_state(self) -> list[nn.Parameter] | None:
        """Each layer's learned initial WKV state, or None when the model has none."""
        states = [block.att.time_state for block in self.blocks]
        return None if states[0] is None else states

    def initial_state(self, batch_size: int = 1, device=None, dtype=None) -> RWKV7State:
        """Where a sequence starts: the learned WKV state when the model has one (differentiable),
        zeros otherwise; token shifts start at zero either way."""
        state = self.zero_state(batch_size, device, dtype)
        if self.learned_state() is not None:
            state.wkv = torch.stack([block.att.initial_wkv(batch_size, state.wkv.device) for block in self.blocks])
        return state

    def zero_state(self, batch_size: int = 1, device=None, dtype=None) -> RWKV7State:
        cfg = self.config
        device = device or self.emb.weight.device
        dtype = dtype or self.emb.weight.dtype
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return RWKV7State(
            att_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32),
            ffn_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        )

    # -- forward ---------------------------------------------------------------------------------
    def forward_hidden(self, tokens: torch.Tensor, state: RWKV7State | None = None, resets=None,
                       segment_len: int | None = None, rows=None, embedded=None, restart: RWKV7State | None = None):
        """tokens [B,T] -> (hidden after ln_out [B,T,C], new state).

        state=None starts from `initial_state()`. resets: optional bool [B,T], True where a packed
        example starts: the recurrent state restarts there (token shift from zero, WKV from the
        learned initial state or zero), so examples do not see each other. restart: the state (one
        per row) resets restart from instead: a shared context's, for several continuations of it
        packed in a row.
        segment_len: run S tokens at a time with the state carried; same results and gradients,
        but under autograd only one segment's activations are alive at a time (model/segments.py).
        rows: optional bool [B,T]; returns hidden[rows] [N,C] instead, gathered segment by segment.
        embedded: emb(tokens) when already computed (segments compute it once for the whole row).
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [B,T] tensor, got shape {tuple(tokens.shape)}")
        if rows is not None or (segment_len is not None and segment_len < tokens.shape[1]):
            step = self.forward_hidden if restart is None else functools.partial(self.forward_hidden, restart=restart)
            return forward_segments(step, tokens, state, resets, segment_len, rows, self.emb)
        B = tokens.shape[0]
        if state is None:  # token shifts from zero; each layer starts its WKV state in its own forward
            zeros = torch.zeros(len(self.blocks), B, self.config.n_embd, device=tokens.device, dtype=self.emb.weight.dtype)
            att_in, wkv_in, ffn_in = zeros, [None] * len(self.blocks), zeros
        else:
            att_in, wkv_in, ffn_in = state.att_shift, state.wkv, state.ffn_shift
        x = self.emb(tokens) if embedded is None else embedded
        x_emb = v_first = None  # both defined by block 0
        att_shifts, wkvs, ffn_shifts = [], [], []
        for i, block in enumerate(self.blocks):
            args = (x, v_first, att_in[i], wkv_in[i], ffn_in[i], resets, tokens, x_emb, self.wkv_backend,
                    None if restart is None else (restart.att_shift[i], restart.wkv[i], restart.ffn_shift[i]))
            if self.activation_checkpointing and torch.is_grad_enabled():
                out = checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
            x, v_first, x_emb, att_shift, wkv_state, ffn_shift = out
            att_shifts.append(att_shift)
            wkvs.append(wkv_state)
            ffn_shifts.append(ffn_shift)
        new_state = RWKV7State(torch.stack(att_shifts), torch.stack(wkvs), torch.stack(ffn_shifts))
        return self.ln_out(x), new_state

    def forward(self, tokens: torch.Tensor, state: RWKV7State | None = None, full_output: bool = True,
                resets=None, segment_len: int | None = None):
        """tokens [B,T] -> (logits [B,T,V], state); with full_output=False only the last
        position's logits [B,V] (the head is applied to that one row). segment_len: as in
        `forward_hidden`."""
        rows = None
        if not full_output and segment_len is not None and segment_len < tokens.shape[-1]:
            rows = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
            rows[:, -1] = True  # keep only the last hidden row of a long prompt
        hidden, state = self.forward_hidden(tokens, state, resets=resets, segment_len=segment_len, rows=rows)
        if not full_output and rows is None:
            hidden = hidden[:, -1]
        return self.head(hidden), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["RWKV7", "RWKV7Config", "RWKV7State"]
