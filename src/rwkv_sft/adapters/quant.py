"""A frozen base stored in 8 or 4 bits: the projection matrices of every block and the head.

LoRA and learned states train on top in fp32; a quantized layer computes `x W^T` with W
dequantized for that call only (and again in the backward, for the input's gradient), so no
full-precision copy of the base outlives one layer.

- int8: one fp32 scale per output row (absmax / 127), `q = round(W / scale)`. Written here: it is
  a conversion and a product; the scale is applied to the product's output columns rather than
  to the weight, so a call costs what a bf16 weight's upcast costs (benchmarks/bench_quant.py
  measures it against bitsandbytes' int8 layer and against the bf16 base).
- nf4: QLoRA's 4-bit NormalFloat, blocks of 64 values, with double quantization (the blocks'
  absmax stored in 8 bits, blocks of 256), from bitsandbytes (its CUDA kernels and its CPU
  backend): `pip install 'rwkv-sft[quant]'`.

The quantized tensors are non-persistent buffers: a quantized model's state_dict has no
projection weights, so nothing can save it as if it were the base. Adapters name the original
base (`model.base_fingerprint`, taken from the unquantized tensors) and merge into it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..ops.amp import widened
from ..ops.frozen import upcast
from ..settings import Quantized, choices

KINDS = choices(Quantized)
EXTRA = "pip install 'rwkv-sft[quant]'"
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # QLoRA's block sizes (weights; the first level's absmax)
ROW_BLOCK = 1024  # rows quantized at a time


def bitsandbytes():
    """bitsandbytes.functional, or a one-line error naming the extra that installs it."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # (also when a test hides it)
        raise UserError(f"base dtype nf4 needs the bitsandbytes library: {EXTRA}") from None
    return bnbf


def _row_blocks(weight: torch.Tensor, rows: int):
    """(start, end, the weight's rows [start, end) in fp32) for blocks of `rows` rows: a loader's
    transient copies stay one block's size, whatever the weight's."""
    for s in range(0, weight.shape[0], rows):
        yield s, min(s + rows, weight.shape[0]), weight[s:s + rows].float()


def quantize(weight: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """The stored form of a [out, in] weight, computed on the weight's device, ROW_BLOCK rows at a time."""
    out, cols = weight.shape
    if kind == "int8":
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(out, dtype=torch.float32, device=weight.device)
        for s, e, w in _row_blocks(weight, ROW_BLOCK):
            scale[s:e] = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
            q[s:e] = torch.round(w / scale[s:e, None])
        return {"q": q, "row_scale": scale}
    if kind == "nf4":
        if weight.numel() % (2 * NF4_BLOCK):
            raise UserError(f"nf4: a weight of shape {list(weight.shape)} is not a whole number of "
                            f"{NF4_BLOCK}-value blocks")
        bnbf = bitsandbytes()
        # bitsandbytes' 64-value blocks run over the flattened weight: a row block holds whole ones
        step = NF4_BLOCK // math.gcd(cols, NF4_BLOCK)
        q = torch.empty(weight.numel() // 2, 1, dtype=torch.uint8, device=weight.device)
        absmax = torch.empty(weight.numel() // NF4_BLOCK, dtype=torch.float32, device=weight.device)
        for s, e, w in _row_blocks(weight, -(-ROW_BLOCK // step) * step):
            packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
            q[s * cols // 2:e * cols // 2] = packed
            absmax[s * cols // NF4_BLOCK:e * cols // NF4_BLOCK] = state.absmax
        # the double quantization over all the blocks' absmax, as quantize_4bit(compress_statistics=True)
        # does it in one call on the whole weight (bit for bit: tests/test_quant.py)
        offset = absmax.mean()
        absmax8, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=NF4_BLOCK2)
        return {"q": q, "absmax": absmax8, "offset": offset.reshape(1), "code": state.code,
                "absmax2": state2.absmax, "code2": state2.code}
    raise ValueError(f"unknown quantization {kind!r}; choose from {', '.join(KINDS)}")


class _Matmul(torch.autograd.Function):
    """x W^T for a quantized layer; the backward dequantizes again for the input's gradient and
    saves nothing of W (the layer holds it)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.project(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.layer.project_back(grad), None


class QuantLinear(nn.Module):
    """A frozen Linear without bias whose weight is stored quantized (int8 or nf4)."""

    def __init__(self, in_features: int, out_features: int, kind: str, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kind: str) -> "QuantLinear":
        return cls(weight.shape[1], weight.shape[0], kind, quantize(weight.detach(), kind))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"

    def dequantize(self, dtype=torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The weight's rows [start, end) (all by default), [rows, in], as stored, in `dtype` (a new tensor)."""
        end = self.out_features if end is None else end
        if self.kind == "int8":
            return (self.q[start:end].to(torch.float32) * self.row_scale[start:end, None]).to(dtype)
        # nf4: the whole 64-value blocks that hold those rows, each block's absmax first decoded
        # from its 8-bit code (the double quantization), then bitsandbytes' 4-bit decoding
        first, last = start * self.in_features, end * self.in_features
        b0, b1 = first // NF4_BLOCK, -(-last // NF4_BLOCK)
        blocks = torch.arange(b0, b1, device=self.absmax.device)
        absmax = self.code2[self.absmax[b0:b1].long()] * self.absmax2[blocks // NF4_BLOCK2] + self.offset
        state = bitsandbytes().QuantState(absmax=absmax, shape=torch.Size(((b1 - b0) * NF4_BLOCK,)), code=self.code,
                                          blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
        flat = bitsandbytes().dequantize_4bit(self.q[b0 * NF4_BLOCK // 2:b1 * NF4_BLOCK // 2], state).reshape(-1)
        return flat[first - b0 * NF4_BLOCK:last - b0 * NF4_BLOCK].reshape(end - start, self.in_features).to(dtype)

    def project(self, x):
        if self.kind == "int8":  # the row scales applied to the output: the weight is only converted
            scale = self.row_scale.to(x.dtype)
            return widened(F.linear(x, upcast(self.q, x.dtype)), scale).mul_(scale)
        return F.linear(x, self.dequantize(x.dtype))

    def project_back(self, grad):
        if self.kind == "int8":
            return (grad * self.row_scale.to(grad.dtype)) @ upcast(self.q, grad.dtype)
        return grad @ self.dequantize(grad.dtype)

    def frozen_weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x):
        return _Matmul.apply(x, self)


class WeightRows:
    """A quantized layer's weight as ops.linear_cross_entropy reads a frozen head: `shape` [out, in]
    and `rows(start, end, dtype)`, dequantized a block of rows at a time (never all at once)."""

    def __init__(self, layer: QuantLinear):
        self.layer, self.shape = layer, torch.Size((layer.out_features, layer.in_features))

    def rows(self, start: int, end: int, dtype) -> torch.Tensor:
        return self.layer.dequantize(dtype, start, end)


def loss_weight(module: nn.Module):
    """The head's weight for the chunked loss: its tensor, or a quantized one's rows (WeightRows)."""
    return WeightRows(module) if isinstance(module, QuantLinear) else module.weight


def quantized_numel(model: nn.Module) -> int:
    """How many weights the model holds quantized."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
