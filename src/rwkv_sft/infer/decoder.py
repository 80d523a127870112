"""Decoding with a model: `Decoder(model)` runs prompts through the model's forward and then one
token at a time through the fused step (infer/step.py), on weights laid out for it.

The layout: torch's CPU matrix-vector product streams a wide fp32 weight (out >= in) faster when it
is stored transposed (on 2 cores a 12 x 768 step: 30 against 37 ms), as the `rwkv` package's loader
arranges too; receptance, key and value then also sit in one [3, C, C] stack, multiplied in one
batched product. The C products of the step (ops/csrc/decode_cpu.c) read either layout and are no
faster transposed (22 against 24 ms), so by default (`layout=None`) only a decoder whose step runs in
PyTorch (no C compiler, RWKV_SFT_DECODE_KERNELS=0, a quantized base) lays out weights. It does so in
its own twin of the model: the same modules, sharing every tensor with the model except those
weights, which the twin holds transposed (same values). The model itself is never changed; the twin
is a snapshot of those weights, so build the decoder after training. A caller that hands over its
only reference (`Decoder(load_model(...))`, as the CLI does) frees the model's copies of them.
bf16 weights stay as stored (torch's bf16 product is ~10x slower transposed).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import UserError
from ..model.rwkv7 import RWKV7, RWKV7State
from ..ops.cross_entropy import check_ids
from .step import _kernels_for, decode_step


def is_whole(param) -> bool:
    """False for a sharded (FSDP / DTensor) parameter, which is whole only inside its module's forward."""
    return type(param.data) is torch.Tensor


class Decoder:
    """`decoder(tokens, state=None, full_output=True)` -> (logits, state), as `model(...)`: a [B,1]
    call takes the fused decoding step, a longer one the model's forward (prefill)."""

    def __init__(self, model: nn.Module, layout: bool | None = None):
        self.model = model
        self.stacks: dict[nn.Module, torch.Tensor] = {}  # TimeMix -> its [3, in, out] receptance/key/value
        # the fused step knows RWKV7's modules; a sharded model, or anything else called like one (a
        # wrapper), decodes through its forward. (A quantized head has no weight; its base still decodes.)
        self.fused = isinstance(model, RWKV7) and is_whole(model.blocks[0].ln1.weight)
        head = getattr(model.head, "weight", None) if self.fused else None
        if layout is None:  # only where the step runs in PyTorch
            layout = self.fused and _kernels_for(model) is None
        if layout and head is not None and head.device.type == "cpu":
            self.model = _twin(model, self.stacks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, tokens: torch.Tensor, state: RWKV7State | None = None, full_output: bool = True,
                 segment_len: int | None = None):
        config = getattr(self.model, "config", None)  # (a wrapper object without one: its forward decides)
        if config is not None and (tokens.shape[1] > 1 or tokens.device.type == "cpu"):  # a GPU step's token is the model's own
            check_token_ids(tokens, config.vocab_size)
        if tokens.shape[1] == 1 and self.fused and not torch.is_grad_enabled():
            return decode_step(self.model, tokens, state, full_output, self.stacks)
        return self.model(tokens, state=state, full_output=full_output, segment_len=segment_len)


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """A one-line error for a token id the model has no embedding for (a prompt tokenized with a
    larger vocabulary than the model's), where the lookup (or the C step's read) would fail."""
    try:
        check_ids(tokens, vocab_size, "token ids")
    except ValueError as e:
        raise UserError(f"a token id is outside the model's vocabulary of {vocab_size} tokens ({e}); "
                        "use a model with a larger vocabulary") from None


def as_decoder(model) -> Decoder:
    """A Decoder as it is; a model decoded on its own weights (nothing copied)."""
    return model if isinstance(model, Decoder) else Decoder(model, layout=False)


def _twin(model: nn.Module, stacks: dict) -> nn.Module:
    """The model's modules copied, every tensor shared, except the wide fp32 nn.Linear weights: those
    the twin holds transposed in memory (receptance/key/value as views of one stack, in `stacks`)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo=dict(shared))
    transposed = {}
    with torch.no_grad():
        for module in twin.modules():
            att = getattr(module, "att", None)
            rkv = (att.receptance, att.key, att.value) if att is not None else ()
            if rkv and all(_relaid(m) for m in rkv):
                stacks[att] = torch.stack([m.weight.t() for m in rkv])  # [3, in, out]
                transposed.update({m: w.t() for m, w in zip(rkv, stacks[att])})
        for module in twin.modules():
            if _relaid(module) and module.out_features >= module.in_features:  # a narrowing one streams better as it is
                w = transposed.get(module, module.weight.t().contiguous().t())
                module.weight = nn.Parameter(w, requires_grad=False)
    return twin


def _relaid(module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.float32


__all__ = ["Decoder", "as_decoder", "is_whole"]
