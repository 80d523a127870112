"""Parameter-efficient fine-tuning: LoRA / PiSSA on linear layers, learned initial states, a
frozen base in a compact dtype, adapter files, and merging an adapter into its base.

Everything that belongs to an adapter is named so that `is_adapter_key` recognises it
(`*.lora_A`, `*.lora_B`, PiSSA's `*.lora_A0`/`*.lora_B0`, `blocks.{i}.att.time_state`); the base
keeps BlinkDL's names and shapes.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .files import (LORA_KEYS, AdapterSettings, base_info, check_base, fingerprint, is_adapter_key, read_adapter,
                    save_adapter)
from .lora import DEFAULT_TARGETS, INITS, LoRALayer, LoRALinear, add_lora, compact_frozen, lora_modules, match_targets


def enable_learned_state(model) -> None:
    """Give every layer its learned initial WKV state `att.time_state` (the model's own)."""
    if not hasattr(model, "enable_state_tuning"):
        raise UserError("state tuning: this version of the model has no learned initial state")
    model.enable_state_tuning()


def attach(model, settings: AdapterSettings, initialize: bool = True) -> list[str]:
    """Add the adapters that `settings` describe; returns the names of the LoRA layers."""
    names = []
    if settings.lora_rank:
        names = add_lora(model, settings.lora_targets, settings.lora_rank, settings.lora_alpha,
                         settings.lora_dropout, settings.lora_init, initialize=initialize)
    if settings.state_tuning:
        enable_learned_state(model)
    return names


def freeze_base(model) -> int:
    """Only adapter tensors train; returns the number of frozen elements."""
    frozen = 0
    for name, p in model.named_parameters():
        train = is_adapter_key(name)
        p.requires_grad_(train)
        frozen += 0 if train else p.numel()
    return frozen


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def load_adapter_state(model, tensors: dict[str, torch.Tensor], source) -> None:
    """Copy saved adapter tensors into a model that has the same adapters (names and shapes)."""
    own = adapter_state_dict(model)
    missing = sorted(own.keys() - tensors.keys())
    extra = sorted(tensors.keys() - own.keys())
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which this model's adapters do not"
        raise UserError(f"{source}: the adapter does not fit: it {what} "
                        f"({len(missing)} missing, {len(extra)} extra tensors)")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise UserError(f"{source}: {k} has shape {list(v.shape)}, expected {list(own[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def apply_adapter(model, path) -> AdapterSettings:
    """Add the adapter stored at `path` to `model` (its base), in place; the model then computes what
    base + adapter computed in training. LoRA tensors take the dtype of the model's embedding;
    learned states stay fp32."""
    tensors, settings, base = read_adapter(path)
    check_base(path, base, model)
    attach(model, settings, initialize=False)
    dtype, device = model.emb.weight.dtype, model.emb.weight.device
    for m in lora_modules(model).values():
        for name in LORA_KEYS:
            t = getattr(m, name, None)
            if t is not None:
                t.data = t.data.to(device=device, dtype=dtype)
    load_adapter_state(model, tensors, path)
    return settings


def merged_state_dict(model, dtype=None):
    """(name, tensor) of the base's state_dict with every LoRA folded into its weight (W + scale
    (B A - B0 A0) in fp32, then `dtype` or the weight's own dtype), one weight at a time; LoRA
    tensors left out, learned states kept."""
    from .quant import is_quantized
    if is_quantized(model):
        raise UserError("a model with a quantized base cannot be exported: merge the adapter into the "
                        "original checkpoint (rwkv-sft merge --model ORIGINAL --adapter ...)")
    loras = {name + ".weight": m for name, m in lora_modules(model).items()}
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] in LORA_KEYS:
            continue
        if k in loras:
            with torch.no_grad():
                v = (v.float() + loras[k].delta_weight()).to(dtype or v.dtype)
        yield k, v


__all__ = ["AdapterSettings", "DEFAULT_TARGETS", "INITS", "LoRALayer", "LoRALinear", "add_lora", "adapter_state_dict",
           "apply_adapter", "attach", "base_info", "check_base", "compact_frozen", "enable_learned_state",
           "fingerprint", "freeze_base", "is_adapter_key", "load_adapter_state", "lora_modules",
           "match_targets", "merged_state_dict", "read_adapter", "save_adapter"]
