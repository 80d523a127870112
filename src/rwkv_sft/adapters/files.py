"""Adapter files: the trained tensors of a parameter-efficient run, its settings and its base.

`adapter.safetensors` holds the LoRA matrices (`blocks.{i}.att.key.lora_A` [r, in], `lora_B`
[out, r], PiSSA's starting `lora_A0`/`lora_B0`) and/or the learned initial states
(`blocks.{i}.att.time_state` [H, N, N]); its metadata holds the settings (rank, alpha, targets,
init, dropout), the base's shape and fingerprint, and a checksum of the tensors. So nothing has to
be retyped when the adapter is used or merged, and using it on another base, or a damaged file,
is a one-line error.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..settings import LoraAlpha, LoraDropout, LoraInit, NonNegativeInt, coerce_fields
from ..utils import atomic_write
from .lora import DEFAULT_TARGETS

FORMAT, VERSION = "rwkv-sft-adapter", 1
LORA_KEYS = ("lora_A", "lora_B", "lora_A0", "lora_B0")
STATE_KEY = "att.time_state"


def is_adapter_key(name: str) -> bool:
    """Tensors that belong to an adapter rather than to the base model."""
    return name.rsplit(".", 1)[-1] in LORA_KEYS or name.endswith("." + STATE_KEY)


@dataclass
class AdapterSettings:
    lora_rank: NonNegativeInt = 0       # 0: no LoRA
    lora_alpha: LoraAlpha | None = None  # None -> lora_rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # see lora.match_targets
    lora_dropout: LoraDropout = 0.0
    lora_init: LoraInit = "lora"
    state_tuning: bool = False

    def describe(self) -> str:
        parts = []
        if self.lora_rank:
            alpha = self.lora_rank if self.lora_alpha is None else self.lora_alpha
            parts.append(f"{'PiSSA' if self.lora_init == 'pissa' else 'LoRA'} rank {self.lora_rank}, alpha {alpha:g} "
                         f"on {', '.join(self.lora_targets)}")
        if self.state_tuning:
            parts.append("learned initial state")
        return " + ".join(parts)


def read_settings(d: dict, path) -> AdapterSettings:
    """The settings an adapter file holds, each checked against its type (errors name the file)."""
    if not isinstance(d, dict):
        raise UserError(f"{path}: corrupt adapter: unreadable settings in its metadata")
    return AdapterSettings(**coerce_fields(d, AdapterSettings, f"{path}: adapter settings"))


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of a base model: every name and shape plus 64 evenly spaced values of each
    tensor, rounded to bf16 so that the fp32 and bf16 copies of one model agree. Cheap on a
    memory-mapped multi-GB file (it reads a few pages per tensor)."""
    return fingerprint_of({k: fingerprint_sample(v) for k, v in state_dict.items() if not is_adapter_key(k)})


def fingerprint_sample(t: torch.Tensor) -> tuple[list[int], bytes]:
    """One tensor's part of the fingerprint (a loader that converts tensor by tensor takes it
    before converting)."""
    flat = t.detach().reshape(-1)
    n, k = flat.numel(), min(flat.numel(), 64)
    idx = torch.arange(k, device=flat.device) * (n - 1) // max(1, k - 1)
    return list(t.shape), flat[idx].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()


def fingerprint_of(samples: dict[str, tuple[list[int], bytes]]) -> str:
    h = hashlib.sha256()
    for key in sorted(samples):
        shape, values = samples[key]
        h.update(f"{key}:{shape};".encode())
        h.update(values)
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """The fingerprint of the model's base: a quantized base keeps the one of its original."""
    return getattr(model, "base_fingerprint", None) or fingerprint(model.state_dict())


def base_info(model) -> dict:
    c = model.config
    return {"fingerprint": model_fingerprint(model), "n_layer": c.n_layer, "n_embd": c.n_embd,
            "vocab_size": c.vocab_size, "head_size": c.head_size}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(path, tensors: dict[str, torch.Tensor], settings: AdapterSettings, base: dict) -> Path:
    """Write the adapter atomically; tensors are stored as they are (fp32 in training)."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "version": str(VERSION), "settings": json.dumps(asdict(settings)),
                "base": json.dumps(base), "sha256": _checksum(tensors)}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_adapter(path) -> tuple[dict[str, torch.Tensor], AdapterSettings, dict]:
    """(tensors, settings, base info) of an adapter file; one-line errors for anything wrong."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if path.is_dir():  # a step checkpoint of a PEFT run, OUT/checkpoints/step_N
        if (path / "adapter.safetensors").is_file():
            return read_adapter(path / "adapter.safetensors")
        return _checkpoint_adapter(path)
    if not path.is_file():
        raise UserError(f"{path}: no such adapter file")
    if zipfile.is_zipfile(path):  # torch.save's format: not an adapter, say what it is
        raise UserError(f"{path}: {_torch_file_kind(path)}, not an adapter (adapter.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable adapter file (truncated or corrupt? "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: not an rwkv-sft adapter (no adapter metadata; a model checkpoint goes to --model)")
    if metadata.get("version") != str(VERSION):
        raise UserError(f"{path}: adapter format version {metadata.get('version')!r}; this rwkv-sft reads version {VERSION}")
    if metadata.get("sha256") != _checksum(tensors):
        raise UserError(f"{path}: corrupt adapter: its tensors do not match the checksum written with them")
    try:
        settings = read_settings(json.loads(metadata["settings"]), path)
        base = json.loads(metadata["base"])
        assert isinstance(base, dict) and "fingerprint" in base
    except (KeyError, TypeError, ValueError, AssertionError):
        raise UserError(f"{path}: corrupt adapter: unreadable settings in its metadata") from None
    unknown = [k for k in tensors if not is_adapter_key(k)]
    if unknown:
        raise UserError(f"{path}: unexpected tensor {unknown[0]!r} in an adapter")
    return tensors, settings, base


def _checkpoint_adapter(path: Path) -> tuple[dict[str, torch.Tensor], AdapterSettings, dict]:
    """The adapter inside a training checkpoint that holds no adapter file (written before they did)."""
    from ..step_checkpoint import is_checkpoint, load_checkpoint
    if not is_checkpoint(path):
        raise UserError(f"{path}: a directory, neither an adapter file nor a training checkpoint")
    state = load_checkpoint(path)
    saved = state.get("adapter")
    if saved is None:
        raise UserError(f"{path}: a checkpoint of a full fine-tuning run holds a whole model, not an adapter: "
                        f"give it as --model")
    return state["model"], read_settings(saved["settings"], path), saved["base"]


def _torch_file_kind(path: Path) -> str:
    """What a torch.save file given as an adapter is: a learned state (--state) or a model (--model)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - only naming the kind of a wrong file
        return "a PyTorch file"
    if isinstance(sd, dict) and sd and all(re.fullmatch(r"blocks\.\d+\.att\.time_state", str(k)) for k in sd):
        return "a learned-state file (give it with --state)"
    return "a PyTorch checkpoint (a model goes to --model)"


def check_base(path, base: dict, model) -> None:
    """The adapter at `path` was trained on `base`; is `model` that base?"""
    c = model.config
    ours = {"n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size, "head_size": c.head_size}
    theirs = {k: base.get(k) for k in ours}
    if theirs != ours:
        shape = lambda d: f"{d['n_layer']} layers x {d['n_embd']}, vocabulary {d['vocab_size']}"  # noqa: E731
        raise UserError(f"{path}: adapter for a model of {shape(theirs)}; this base has {shape(ours)}")
    found = model_fingerprint(model)
    if found != base["fingerprint"]:
        raise UserError(f"{path}: adapter trained on another base (fingerprint {base['fingerprint']}, this base "
                        f"{found}); use the checkpoint it was trained from (a merged model already contains it)")
