"""Products with a frozen weight stored narrower than the compute (a compact or quantized base):
the weight is converted for one product at a time, into one reused buffer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_UPCAST_BUFFERS: dict = {}  # (device, dtype) -> the largest weight's worth of that dtype


def upcast(weight: torch.Tensor, dtype) -> torch.Tensor:
    """A frozen weight converted to `dtype` for one product, written into one buffer that every
    such call reuses. A fresh copy per call would allocate and free each layer's weight three
    times a step (forward, recompute, backward); on a CPU those copies fragment the C heap (and
    cost page faults when returned to the system). The result is valid until the next call:
    use it at once, never save it."""
    key, n = (weight.device, dtype), weight.numel()
    buffer = _UPCAST_BUFFERS.get(key)
    if buffer is None or buffer.numel() < n:
        _UPCAST_BUFFERS[key] = None  # (the old one freed before the larger one is made)
        _UPCAST_BUFFERS[key] = buffer = torch.empty(n, dtype=dtype, device=weight.device)
    return buffer[:n].view(weight.shape).copy_(weight)


class UpcastLinear(torch.autograd.Function):
    """x W^T with W stored in a lower precision than x: W is upcast for this call only and the
    backward keeps the stored copy, so no full-precision copy of a frozen base outlives a layer."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return F.linear(x, upcast(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ upcast(weight, grad.dtype), None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for a weight that may be stored narrower than x (then upcast per call)."""
    if weight.dtype == x.dtype or weight.requires_grad or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight)  # (autocast casts both operands itself)
    return UpcastLinear.apply(x, weight)
