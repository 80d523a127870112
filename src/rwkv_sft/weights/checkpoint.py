"""Checkpoint IO: BlinkDL `.pth` and `.safetensors` <-> RWKV7, dimensions inferred from shapes.

`.pth` files are untrusted data: read with `torch.load(weights_only=True)`, memory-mapped.
"""
from __future__ import annotations

import ctypes
import mmap
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserError
from ..utils import atomic_write
from ..model import RWKV7, RWKV7Config

_OLDER_RWKV_KEYS = {  # a key that only older architectures have -> what the file is
    "att.time_mix_k": "RWKV-4", "att.time_first": "RWKV-4/5/6", "att.time_maa_x": "RWKV-6",
    "att.time_decay": "RWKV-4/5/6", "ffn.receptance.weight": "RWKV-4/5/6",
}
_OPTIONAL_IN_LAYER0 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def read_state_dict(path, lazy: bool = False) -> dict[str, torch.Tensor]:
    """The raw tensors (BlinkDL names) of a `.pth` or `.safetensors` file or a Hugging Face
    directory, with one-line errors for bad files. lazy: a `.safetensors` file is read one tensor
    per access (a `.pth` is memory-mapped anyway)."""
    return _read(path, lazy)[0]


def _read(path, lazy: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, our key -> the file's own name where it differs)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    from .hf import is_hf_dir, read_hf
    if is_hf_dir(path):
        return read_hf(path)
    return _read_file(path, lazy), {}


def _read_file(path: Path, lazy: bool = False) -> dict[str, torch.Tensor]:
    if path.is_dir():  # a training checkpoint, OUT/checkpoints/step_N
        from ..step_checkpoint import model_weights
        return model_weights(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return _LazySafetensors(path) if lazy else load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a PyTorch checkpoint (not a zip archive; truncated download or wrong file?)")
    try:
        try:
            sd = _Mapped(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file holds objects other than tensors, which could run "
                        f"code ({_first_line(e, 'Weights only load failed')})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt? {_first_line(e)})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = _Mapped(sd["state_dict"]) if isinstance(sd, _Mapped) else sd["state_dict"]  # Lightning-style wrapper
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a model checkpoint (expected a mapping of tensor names to tensors)")
    return sd


class _Mapped(dict):
    """Tensors memory-mapped (privately, read-only in practice) from a file: see _release."""


class _LazySafetensors(Mapping):
    """A `.safetensors` file as a mapping that reads a tensor when it is asked for (and keeps no
    mapping of the file open between reads, so pages read once do not stay resident)."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            self._keys = list(f.keys())
        self.path = path

    def __getitem__(self, key):
        from safetensors import safe_open
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _release(t: torch.Tensor, sd) -> None:
    """Give the pages of a tensor memory-mapped from a file back to the OS (Linux): a loader that
    converts tensor by tensor then peaks near the converted size, not the file's. Safe because
    the mapping is private and unwritten: a later read (a tensor sharing the storage) fetches
    the pages from the file again. Memory of one's own would read back as zeros: not touched."""
    if sys.platform != "linux" or not isinstance(sd, _Mapped) or t.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def _first_line(e: Exception, default: str = "") -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else default or type(e).__name__


def infer_config(sd: dict[str, torch.Tensor], source="checkpoint") -> RWKV7Config:
    """RWKV7Config from tensor shapes alone; clear errors for other RWKV versions and missing keys."""
    for key in sd:
        for marker, version in _OLDER_RWKV_KEYS.items():
            if key.endswith(marker):
                raise UserError(f"{source}: this is an {version} checkpoint (has '{key}'); "
                                f"rwkv-sft loads RWKV-7 (x070) models only")
    for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise UserError(f"{source}: not an RWKV-7 checkpoint: missing '{key}'")
    V, C = sd["emb.weight"].shape
    if sd["blocks.0.att.r_k"].dim() != 2:
        raise UserError(f"{source}: 'blocks.0.att.r_k' has shape {tuple(sd['blocks.0.att.r_k'].shape)}, expected [H, N]")
    H, N = sd["blocks.0.att.r_k"].shape
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    v_layer = 1 if n_layer > 1 else 0  # layer 0 may omit v1/v2
    de = "blocks.0.ffn.s_emb.weight" in sd
    try:
        return RWKV7Config(
            n_layer=n_layer, n_embd=C, vocab_size=V, head_size=N,
            dim_w=sd["blocks.0.att.w1"].shape[1], dim_a=sd["blocks.0.att.a1"].shape[1],
            dim_v=sd[f"blocks.{v_layer}.att.v1"].shape[1] if f"blocks.{v_layer}.att.v1" in sd else None,
            dim_g=sd["blocks.0.att.g1"].shape[1], dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
            deep_embed=de, deep_embed_dim=sd["blocks.0.ffn.s1"].shape[-1] if de else 32,
        )
    except KeyError as e:
        raise UserError(f"{source}: missing key {e}") from None
    except ValueError as e:
        raise UserError(f"{source}: inconsistent shapes: {e}") from None


def state_dict_to_model(sd: dict[str, torch.Tensor], source="checkpoint", dtype=None, device=None, origin=None,
                        quantize=None):
    """`origin`: our key -> (the tensor's name in the file, whether it is stored transposed), for
    messages about Hugging Face directories. quantize "int8" | "nf4": every linear layer's weight
    stored quantized (adapters/quant.py), converted one tensor at a time, so the peak stays near
    the quantized model's size."""
    origin = origin or {}

    def name(key):
        return origin.get(key, (key,))[0]
    config = infer_config(sd, source)
    dtype = dtype or sd["emb.weight"].dtype
    if not dtype.is_floating_point:
        raise UserError(f"{source}: emb.weight has dtype {dtype}, expected a floating-point type")
    with torch.device("meta"):
        model = RWKV7(config, init_weights=False).to(dtype=dtype)
        if any(k.endswith(".att.time_state") for k in sd):  # saved from a model with a learned state
            model.enable_state_tuning()
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        if origin:  # a Hugging Face directory: say what the tensor is called there
            from .hf import hf_name
            raise UserError(f"{source}: no tensor for {missing[0]} ('{hf_name(missing[0], 'fla')[0]}' in fla's "
                            f"names, '{hf_name(missing[0], 'rwkv')[0]}' in BlinkDL's){more}")
        raise UserError(f"{source}: missing key '{missing[0]}'{more}")
    unexpected = [k for k in sd if k not in expected and k not in _OPTIONAL_IN_LAYER0]
    if unexpected:
        raise UserError(f"{source}: unexpected key '{name(unexpected[0])}' for an RWKV-7 model of {config.n_layer} layers"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if quantize:
        from ..adapters.files import fingerprint_of, fingerprint_sample, is_adapter_key
        from ..adapters.quant import QuantLinear, replace_module
        linears = {name + ".weight": name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        samples = {}
    tensors = {}
    for key, ref in expected.items():
        t = sd[key]
        if t.shape != ref.shape:
            if t.numel() != ref.numel() or ref.dim() == 2 and t.dim() == 2:
                got, want = list(t.shape), list(ref.shape)
                if origin.get(key, ("", False))[1]:
                    got, want = got[::-1], want[::-1]  # as the file stores it
                raise UserError(f"{source}: '{name(key)}' has shape {got}, expected {want}"
                                + (f" (for {key})" if name(key) != key else ""))
            t = t.reshape(ref.shape)  # e.g. a [C] vector stored for a [1,1,C] one
        if quantize and not is_adapter_key(key):
            samples[key] = fingerprint_sample(t)  # adapters name the original base
        if quantize and key in linears:
            replace_module(model, linears[key], QuantLinear.from_weight(t.to(device or "cpu"), quantize))
            _release(t, sd)
            continue
        tensors[key] = t.to(device=device or "cpu", dtype=ref.dtype)
    # assign: the parameters are the file's tensors where no conversion was needed (a `.pth` stays
    # memory-mapped, copy-on-write) instead of a second copy of the whole model
    model.load_state_dict(tensors, strict=True, assign=True)
    if quantize:
        model.base_fingerprint = fingerprint_of(samples)
    return model


def load_model(path, dtype=None, device=None, adapter=None, quantize=None) -> RWKV7:
    """Load a BlinkDL `.pth`, a `.safetensors` file, a Hugging Face directory or a training
    checkpoint; every dimension comes from the shapes. `adapter`: an adapter file of a
    parameter-efficient run on this base, added to the model. `quantize` "int8" | "nf4": linear
    layers stored quantized, frozen (adapters/quant.py)."""
    sd, origin = _read(path, lazy=bool(quantize))
    model = state_dict_to_model(sd, source=str(path), dtype=dtype, device=device, origin=origin, quantize=quantize)
    if adapter is not None:
        from ..adapters import apply_adapter
        apply_adapter(model, adapter)
    return model


def export_state_dict(model, dtype=None) -> dict[str, torch.Tensor]:
    """BlinkDL key names and shapes, contiguous CPU tensors that share no storage; LoRA adapters
    are folded into their weights."""
    from ..adapters import merged_state_dict
    out = {}
    for k, v in merged_state_dict(model, dtype):
        t = v.detach().to("cpu", dtype=dtype or v.dtype).contiguous()
        out[k] = t.clone() if t.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() else t
    return out


def save_model(model, path, dtype=None, hf_scheme=None, overwrite=True) -> None:
    """Write `.pth` (BlinkDL layout) or `.safetensors` (by extension), atomically; see write_state_dict."""
    write_state_dict(export_state_dict(model, dtype), path, model.config, hf_scheme=hf_scheme, overwrite=overwrite)


def write_state_dict(sd: dict[str, torch.Tensor], path, config, hf_scheme: str | None = None,
                     overwrite: bool = True) -> None:
    """`.pth` (BlinkDL layout) or `.safetensors` (by extension, with `config` as metadata), atomically;
    a Hugging Face directory with `hf_scheme` or for a path ending in `.hf` (a run's `model.hf`)."""
    path = Path(path)
    if hf_scheme or path.suffix == ".hf":
        from .hf import write_hf
        write_hf(sd, path, config, scheme=hf_scheme or "fla", overwrite=overwrite)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file
        metadata = {k: str(v) for k, v in config.to_dict().items()}
        with atomic_write(path) as tmp:
            save_file(sd, str(tmp), metadata=metadata)
    else:
        with atomic_write(path) as tmp:
            torch.save(sd, tmp)


__all__ = ["read_state_dict", "infer_config", "load_model", "save_model", "write_state_dict", "export_state_dict"]
