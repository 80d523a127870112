"""What the training loop asks of the adapters: set a model up for a run, checkpoint what trains."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..settings import Quantized, choices
from . import adapter_state_dict, attach, freeze_base, load_adapter_state
from .files import AdapterSettings, base_info, fingerprint, save_adapter
from .lora import DEFAULT_TARGETS, LoRALayer, QuantLoRALinear, compact_frozen
from .quant import QuantLinear, replace_module

BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# adapter settings a resume may change, like lr: they act in training only (the adapter's tensors,
# their shapes and what they compute at inference do not depend on them)
TRAINING_ONLY = ("lora_dropout",)
QUANTIZED = choices(Quantized)  # projection matrices quantized (quant.py), the embedding in bf16


def settings_from(config) -> AdapterSettings | None:
    """The adapter settings of a TrainConfig, or None for full fine-tuning."""
    if not (config.lora_rank or config.state_tuning):
        return None
    alpha = None if not config.lora_rank else float(config.lora_rank if config.lora_alpha is None else config.lora_alpha)
    return AdapterSettings(lora_rank=config.lora_rank, lora_alpha=alpha,  # written out: nothing to retype later
                           lora_targets=list(config.lora_targets or DEFAULT_TARGETS),
                           lora_dropout=config.lora_dropout, lora_init=config.lora_init,
                           state_tuning=config.state_tuning)


def base_dtype(name: str, model) -> torch.dtype:
    """"auto": bf16 when the checkpoint came in bf16 (keeping it so loses nothing), else fp32."""
    if name == "auto":
        return torch.bfloat16 if model.emb.weight.dtype == torch.bfloat16 else torch.float32
    return torch.bfloat16 if name in QUANTIZED else BASE_DTYPES[name]


def prepare(model, settings: AdapterSettings | None, *, seed: int, initialize: bool) -> dict | None:
    """Add the adapters and freeze the base; returns the base's shape and fingerprint (None and
    nothing done for full fine-tuning). initialize=False: adapters start at zero (to be loaded)."""
    if settings is None:
        return None
    base = base_info(model)  # before the adapters: the fingerprint of the base alone
    torch.manual_seed(seed)  # the same LoRA initialisation for the same settings
    attach(model, settings, initialize=initialize)
    freeze_base(model)
    return base


def compact(model, dtype_name: str):
    """Trainable tensors in fp32, frozen matrices in the base dtype (however they were frozen);
    int8/nf4: frozen linear layers quantized (already at load when the base came from a file)."""
    if dtype_name in QUANTIZED:
        quantize_model(model, dtype_name)
    compact_frozen(model, base_dtype(dtype_name, model))
    return model


def checkpoint_entries(model, settings: AdapterSettings, base: dict) -> dict:
    """What a PEFT step checkpoint holds of the model: the adapter tensors only."""
    return {"model": adapter_state_dict(model), "adapter": {"settings": asdict(settings), "base": base}}


def write_outputs(out: Path, tensors: dict, settings: AdapterSettings, base: dict) -> dict[str, Path]:
    """OUT/adapter.safetensors from the adapter's `tensors` (checkpoint_entries' "model"), and
    OUT/state.pth (RWKV-Runner's layout) when a state is learned."""
    files = {"adapter": save_adapter(out / "adapter.safetensors", tensors, settings, base)}
    if settings.state_tuning:
        from .state import write_state
        write_state(tensors, out / "state.pth")
        files["state"] = out / "state.pth"
    return files


def restore(model, state: dict, settings: AdapterSettings | None, base: dict | None, source) -> None:
    """Load a step checkpoint's model tensors, refusing one from another kind of run or base."""
    saved = state.get("adapter")
    if (saved is None) != (settings is None):
        kind = lambda s: "a full fine-tuning run" if s is None else "a parameter-efficient run"  # noqa: E731
        raise UserError(f"{source}: checkpoint of {kind(saved)}, but this run is {kind(settings)}: "
                        f"resume with the settings it was started with")
    if settings is None:
        model.load_state_dict(state["model"])
        return
    if saved["base"]["fingerprint"] != base["fingerprint"]:
        raise UserError(f"{source}: checkpoint of a run on another base model (fingerprint "
                        f"{saved['base']['fingerprint']}, this base {base['fingerprint']})")
    was = {k: saved["settings"].get(k) for k, v in asdict(settings).items()
           if saved["settings"].get(k) != v and k not in TRAINING_ONLY}
    if was:
        raise UserError(f"{source}: checkpoint of a run with other adapter settings "
                        f"({', '.join(f'{k}={v!r}' for k, v in was.items())}); resume with those")
    load_adapter_state(model, state["model"], source)


def quantize_model(model: nn.Module, kind: str) -> None:
    """Replace every frozen nn.Linear (LoRA layers keep their adapter) by its quantized form, in
    place; the model keeps the fingerprint of its unquantized base."""
    if getattr(model, "base_fingerprint", None) is None:
        model.base_fingerprint = fingerprint(model.state_dict())
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module.weight.requires_grad or module.bias is not None:
            continue
        quant = QuantLinear.from_weight(module.weight, kind)
        if isinstance(module, LoRALayer):
            quant = QuantLoRALinear.from_layers(quant, module)
        replace_module(model, name, quant)
