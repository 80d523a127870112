"""Hugging Face layout of RWKV-7: a directory of config.json + safetensors, in two naming schemes.

- "fla": flash-linear-attention's `RWKV7ForCausalLM` (fla-hub's rwkv7-* repositories):
  `model.layers.{i}.attn.r_proj`, LoRA-style `w_lora.lora.{0,2}` holding w1ᵀ, w2ᵀ and w0 (bias),
  `model.embeddings`, `model.norm`, `lm_head`. This is what `transformers` loads (after `import fla`).
- "rwkv": BlinkDL's names under `model.layers.{i}.attention` / `.feed_forward` (w1/w2 in BlinkDL's
  orientation), `model.embeddings`, `model.pre_ln`, `model.ln_out`, `lm_head`.

llama.cpp's `convert_hf_to_gguf.py` reads both. Reading also accepts the variants that converter
knows (`blocks`/`layers`, `attn`/`attention`/`self_attn`, `ffn`/`feed_forward`, fused `x_x` [6, C],
a flattened `r_k`), so a downloaded directory loads whichever variant it uses. Tensors are read one
at a time from the (memory-mapped) safetensors files; values are never changed, only renamed,
transposed or reshaped, so `.pth` -> HF -> `.pth` is bit-identical.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError

SCHEMES = ("fla", "rwkv")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
VOCAB = "rwkv_vocab_v20230424.txt"
LERPS = ("r", "w", "k", "v", "a", "g")  # order of the fused x_x rows (fla's version-1 layout)
_LORA = {"1": "lora.0.weight", "2": "lora.2.weight", "0": "lora.2.bias"}  # BlinkDL X1/X2/X0 -> fla X_lora.*
_FLA_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_FLA_NORM = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_TOP = {"fla": {"emb": "model.embeddings", "ln_out": "model.norm", "head": "lm_head"},
        "rwkv": {"emb": "model.embeddings", "ln_out": "model.ln_out", "head": "lm_head"}}


def is_hf_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


# ---------------------------------------------------------------- BlinkDL key -> HF name (writing)

def hf_name(key: str, scheme: str) -> tuple[str, bool]:
    """(HF tensor name, whether the tensor is stored transposed) for a BlinkDL state-dict key."""
    top, _, rest = key.partition(".")
    if top in _TOP[scheme]:
        return f"{_TOP[scheme][top]}.{rest}", False
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", key)
    if not m:
        raise UserError(f"'{key}' has no place in the Hugging Face layout")
    i, part, rest = m.groups()
    if scheme == "rwkv":
        if part == "ln0":
            return f"model.pre_ln.{rest}", False
        sub = {"att": "attention", "ffn": "feed_forward"}.get(part, part)
        return f"model.layers.{i}.{sub}.{rest}", False
    if part in _FLA_NORM:
        return f"model.layers.{i}.{_FLA_NORM[part]}.{rest}", False
    if part == "att":
        name, _, suffix = rest.partition(".")
        if re.fullmatch(r"[wavg][012]", rest):
            return f"model.layers.{i}.attn.{rest[0]}_lora.{_LORA[rest[1]]}", rest[1] != "0"
        return f"model.layers.{i}.attn.{_FLA_PROJ.get(name, name)}{'.' + suffix if suffix else ''}", False
    return f"model.layers.{i}.{part}.{rest}", False


def _hf_tensor(key: str, t: torch.Tensor, scheme: str) -> tuple[str, torch.Tensor]:
    name, transposed = hf_name(key, scheme)
    if transposed:
        t = t.t()
    elif scheme == "fla" and t.dim() == 3 and ".attn.x_" not in name:
        t = t.reshape(-1)  # fla keeps only the att.x_* lerps as [1, 1, C]; k_k, k_a, ffn.x_k, w0 are [C]
    return name, t.contiguous()


def hf_config(config, scheme: str, dtype: torch.dtype) -> dict:
    """config.json with the fields fla's RWKV7Config and llama.cpp's converter read."""
    c = config
    common = {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7",
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer,
        "intermediate_size": c.dim_ffn, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if scheme == "rwkv":
        return {**common, "head_size": c.head_size, "layer_norm_epsilon": 1e-5,
                "lora_rank_decay": c.dim_w, "lora_rank_iclr": c.dim_a,
                "lora_rank_value_residual_mix": c.dim_v, "lora_rank_gate": c.dim_g}
    return {**common, "head_dim": c.head_size, "num_heads": c.n_head, "norm_eps": 1e-5, "norm_bias": True,
            "norm_first": True, "hidden_act": "sqrelu", "hidden_ratio": c.dim_ffn / c.n_embd,
            "decay_low_rank_dim": c.dim_w, "a_low_rank_dim": c.dim_a, "v_low_rank_dim": c.dim_v,
            "gate_low_rank_dim": c.dim_g, "value_dim": [c.n_embd] * c.n_layer}


def write_hf(sd: dict[str, torch.Tensor], path, config, scheme: str = "fla", overwrite: bool = False,
             shard_bytes: int = 5 << 30) -> Path:
    """Write BlinkDL-named tensors `sd` as a Hugging Face directory `path`: config.json, the World
    vocabulary, and model.safetensors (or shards of at most `shard_bytes` with an index).
    Built in a temporary directory beside `path` and renamed into place; an existing `path` is
    replaced only with `overwrite`."""
    from safetensors.torch import save_file

    from ..tokenizer import vocab_path

    if scheme not in SCHEMES:
        raise UserError(f"unknown Hugging Face naming scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if config.deep_embed:
        raise UserError("a DeepEmbed model (ffn.s_emb) has no Hugging Face RWKV-7 layout")
    state = [k for k in sd if k.endswith(".att.time_state")]
    if state:
        raise UserError(f"'{state[0]}' (a learned initial state) has no place in the Hugging Face layout; "
                        "keep it in its state.pth")
    path = check_target(path, overwrite)
    dtypes = {t.dtype for t in sd.values()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        shards, size = [{}], 0
        for key, t in sd.items():
            name, t = _hf_tensor(key, t, scheme)
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for n, shard in enumerate(shards, 1):
                fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
                total += sum(t.numel() * t.element_size() for t in shard.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n", encoding="utf-8")
        dtype = sd["emb.weight"].dtype if len(dtypes) > 1 else dtypes.pop()
        (tmp / CONFIG).write_text(json.dumps(hf_config(config, scheme, dtype), indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(vocab_path(), tmp / VOCAB)
        mode = 0o777 & ~_umask()
        os.chmod(tmp, mode)  # mkdtemp makes it 0700; give the directory the mode the umask gives
        for f in tmp.iterdir():
            os.chmod(f, mode & 0o666)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_target(path, overwrite: bool) -> Path:
    """One-line errors for an output directory that is there (without `overwrite`) or is a file."""
    path = Path(path)
    if path.is_dir() and not overwrite:
        raise UserError(f"{path}: already exists; give --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- HF name -> BlinkDL key (reading)

def _blink_key(name: str) -> tuple[str, str | None]:
    """(BlinkDL key, transform) for an HF tensor name in any known variant; transform is "t"
    (stored transposed), "x_x" (six fused lerps) or None. Unknown names come back unchanged."""
    n = re.sub(r"^(model|rwkv)\.", "", name)
    top = {"embeddings.weight": "emb.weight", "lm_head.weight": "head.weight", "head.weight": "head.weight"}
    if n in top:
        return top[n], None
    m = re.fullmatch(r"(norm|ln_out|pre_ln)\.(weight|bias)", n)
    if m:
        return ("ln_out." if m[1] != "pre_ln" else "blocks.0.ln0.") + m[2], None
    m = re.fullmatch(r"(?:layers|blocks)\.(\d+)\.(.+)", n)
    if not m:
        return name, None
    i, rest = m.groups()
    rest = rest.replace("time_mixer.", "")
    m = re.fullmatch(r"(pre_norm|pre_ln|ln0|attn_norm|attention_norm|ln1|ffn_norm|feed_forward_norm|ln2)\.(.+)", rest)
    if m:
        ln = {"pre": "ln0", "ln0": "ln0", "att": "ln1", "ln1": "ln1"}.get(m[1][:3], "ln2")
        return f"blocks.{i}.{ln}.{m[2]}", None
    m = re.fullmatch(r"(attn|attention|self_attn|ffn|feed_forward)\.(.+)", rest)
    if not m:
        return name, None
    part, rest = ("ffn" if m[1] in ("ffn", "feed_forward") else "att"), m[2]
    if part == "att":
        lora = re.fullmatch(r"([wavg])_lora\.(lora\.[02]\.weight|lora\.2\.bias)", rest)
        if lora:
            num = {v: k for k, v in _LORA.items()}[lora[2]]
            return f"blocks.{i}.att.{lora[1]}{num}", "t" if num != "0" else None
        if rest == "x_x":
            return f"blocks.{i}.att.x_x", "x_x"
        head, _, suffix = rest.partition(".")
        head = {v: k for k, v in _FLA_PROJ.items()}.get(head, head)
        rest = head + ("." + suffix if suffix else "")
    return f"blocks.{i}.{part}.{rest}", None


class _Shards:
    """The tensors of an HF directory, opened lazily one safetensors file at a time."""

    def __init__(self, path: Path):
        self.path = path
        index = path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                weight_map = None
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: not a safetensors index (expected a JSON object with a 'weight_map')")
            files = sorted(set(weight_map.values()))
        elif (path / WEIGHTS).is_file():
            weight_map, files = None, [WEIGHTS]
        else:
            raise UserError(f"{path}: a Hugging Face directory needs {WEIGHTS} or {INDEX} beside {CONFIG}")
        self.location = {}
        for fname in files:
            keys = self._open(fname).keys()
            for k in keys:
                if weight_map is not None and weight_map.get(k) != fname:
                    raise UserError(f"{path / fname}: holds '{k}', which {INDEX} " +
                                    (f"places in {weight_map[k]}" if k in weight_map else "does not list"))
                self.location[k] = fname
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self.location]
            if lost:
                raise UserError(f"{path / weight_map[lost[0]]}: lacks '{lost[0]}', which {INDEX} places there")

    def _open(self, fname):
        from safetensors import SafetensorError, safe_open
        f = self.path / fname
        if not f.is_file():
            raise UserError(f"{f}: missing (listed in {INDEX})")
        try:
            return safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f}: not a readable safetensors file, truncated or corrupt? ({_first_line(e)})") from None

    def tensors(self):
        from safetensors import SafetensorError
        for fname in sorted(set(self.location.values())):
            handle = self._open(fname)
            for k in handle.keys():
                try:
                    yield k, handle.get_tensor(k)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise UserError(f"{self.path / fname}: cannot read '{k}' ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def read_hf(path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, bool]]]:
    """(BlinkDL-named tensors, BlinkDL key -> (HF tensor name, stored transposed)) of the Hugging
    Face directory `path`. Shapes are checked against config.json here and against each other by
    the model loader, whose messages name the HF tensor in the file's orientation."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        cfg = None
    if not isinstance(cfg, dict):
        raise UserError(f"{path / CONFIG}: not a JSON object")
    if cfg.get("model_type") not in (None, "rwkv7"):
        raise UserError(f"{path / CONFIG}: model_type {cfg['model_type']!r}; rwkv-sft loads RWKV-7 (rwkv7) models only")
    sd, origin, flipped = {}, {}, set()
    for name, t in _Shards(path).tensors():
        key, how = _blink_key(name)
        if how == "x_x":
            if t.shape[0] != len(LERPS):
                raise UserError(f"{path}: '{name}' has shape {list(t.shape)}, expected [6, 1, 1, C] or [6, C]")
            for letter, row in zip(LERPS, t.reshape(len(LERPS), -1)):
                sd[key.replace("x_x", f"x_{letter}")] = row.reshape(1, 1, -1).clone()
                origin[key.replace("x_x", f"x_{letter}")] = name
            continue
        if how == "t":
            if t.dim() != 2:
                raise UserError(f"{path}: '{name}' has shape {list(t.shape)}, expected a matrix")
            t = t.t().contiguous()
            flipped.add(key)
        if key in sd:
            raise UserError(f"{path}: '{name}' and '{origin[key]}' are the same weight ({key})")
        sd[key], origin[key] = t, name
    _check_config(path, cfg, sd, origin)
    if "head.weight" not in sd and cfg.get("tie_word_embeddings") and "emb.weight" in sd:
        sd["head.weight"], origin["head.weight"] = sd["emb.weight"], origin["emb.weight"]
    return sd, {k: (name, k in flipped) for k, name in origin.items()}


def _check_config(path: Path, cfg: dict, sd: dict, origin: dict) -> None:
    """config.json's dimensions agree with the tensors (and give r_k its [H, N] shape if flattened)."""
    emb = sd.get("emb.weight")
    if emb is None or emb.dim() != 2:
        return  # the loader names what is missing
    V, C = emb.shape
    layers = {int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    head = cfg.get("head_size") or cfg.get("head_dim") or (C // cfg["num_heads"] if cfg.get("num_heads") else 64)
    for field, value, what in (("hidden_size", C, f"'{origin['emb.weight']}' has {C} columns"),
                               ("vocab_size", V, f"'{origin['emb.weight']}' has {V} rows"),
                               ("num_hidden_layers", n_layer, f"the tensors hold {n_layer} layers")):
        if field in cfg and cfg[field] != value:
            raise UserError(f"{path / CONFIG}: {field} is {cfg[field]} but {what}")
    for key, t in sd.items():
        if key.endswith(".att.r_k") and t.dim() == 1:
            if t.numel() != C or C % head:
                raise UserError(f"{path}: '{origin[key]}' has shape {list(t.shape)}, expected [{C}] or [H, {head}]")
            sd[key] = t.reshape(C // head, head)


__all__ = ["SCHEMES", "hf_config", "hf_name", "is_hf_dir", "read_hf", "write_hf"]
