"""Hugging Face RWKV-7 directories: read in both naming schemes, written for transformers + fla and
llama.cpp's converter, `.pth` -> HF -> `.pth` bit-identical, one-line errors for broken directories."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from rwkv_sft import RWKV7
from rwkv_sft.weights import load_model, save_model
from rwkv_sft.cli import main
from rwkv_sft.errors import UserError
from rwkv_sft.tokenizer import vocab_path

from conftest import random_model

# Written out by hand from fla's RWKV7ForCausalLM (fla/models/rwkv7, fla/layers/rwkv7.py and its
# utils/convert_from_rwkv7.py) and from the names llama.cpp's converter maps for rwkv7: the test's
# own name map, independent of rwkv_sft.weights.hf. (BlinkDL suffix, HF name, layout)
# layouts: "=" same shape, "T" transposed, "C" flattened to [C]
FLA_LAYER = [
    ("ln0.weight", "pre_norm.weight", "="), ("ln0.bias", "pre_norm.bias", "="),
    ("ln1.weight", "attn_norm.weight", "="), ("ln1.bias", "attn_norm.bias", "="),
    ("ln2.weight", "ffn_norm.weight", "="), ("ln2.bias", "ffn_norm.bias", "="),
    *[(f"att.x_{c}", f"attn.x_{c}", "=") for c in "rwkvag"],
    *[(f"att.{c}0", f"attn.{c}_lora.lora.2.bias", "C") for c in "wav"],
    *[(f"att.{c}1", f"attn.{c}_lora.lora.0.weight", "T") for c in "wavg"],
    *[(f"att.{c}2", f"attn.{c}_lora.lora.2.weight", "T") for c in "wavg"],
    ("att.k_k", "attn.k_k", "C"), ("att.k_a", "attn.k_a", "C"), ("att.r_k", "attn.r_k", "="),
    ("att.receptance.weight", "attn.r_proj.weight", "="), ("att.key.weight", "attn.k_proj.weight", "="),
    ("att.value.weight", "attn.v_proj.weight", "="), ("att.output.weight", "attn.o_proj.weight", "="),
    ("att.ln_x.weight", "attn.g_norm.weight", "="), ("att.ln_x.bias", "attn.g_norm.bias", "="),
    ("ffn.x_k", "ffn.x_k", "C"), ("ffn.key.weight", "ffn.key.weight", "="), ("ffn.value.weight", "ffn.value.weight", "="),
]
RWKV_LAYER = [
    ("ln1.weight", "ln1.weight", "="), ("ln1.bias", "ln1.bias", "="),
    ("ln2.weight", "ln2.weight", "="), ("ln2.bias", "ln2.bias", "="),
    *[(f"att.{n}", f"attention.{n}", "=") for n in
      ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2",
       "k_k", "k_a", "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight",
       "ln_x.weight", "ln_x.bias")],
    *[(f"ffn.{n}", f"feed_forward.{n}", "=") for n in ("x_k", "key.weight", "value.weight")],
]
TOP = {"fla": {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
               "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"},
       "rwkv": {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.ln_out.weight",
                "ln_out.bias": "model.ln_out.bias", "head.weight": "lm_head.weight",
                "blocks.0.ln0.weight": "model.pre_ln.weight", "blocks.0.ln0.bias": "model.pre_ln.bias"}}


def by_hand(sd: dict, scheme: str) -> dict:
    """The HF tensors of BlinkDL state dict `sd`, from the table above."""
    out = {}
    for key, t in sd.items():
        if key in TOP[scheme]:
            out[TOP[scheme][key]] = t
            continue
        i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
        table = dict((a, (b, c)) for a, b, c in (FLA_LAYER if scheme == "fla" else RWKV_LAYER))
        name, layout = table[rest]
        out[f"model.layers.{i}.{name}"] = (t.t() if layout == "T" else t.reshape(-1) if layout == "C" else t).contiguous()
    return out


def hf_dir(path, tensors, config, shards=1):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def model():
    # distinct low-rank widths, so a swapped field or a missed transpose shows
    return random_model(seed=3, scale=0.2, n_layer=2, n_embd=128, vocab_size=300,
                        dim_w=32, dim_a=64, dim_v=96, dim_g=160).eval()


def logits(m):
    tokens = torch.tensor([[5, 17, 250, 3, 99, 0, 42]])
    with torch.no_grad():
        return m(tokens)[0]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("scheme", ["fla", "rwkv"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pth_to_hf_to_pth_is_bit_identical(tmp_path, model, scheme, dtype):
    src = tmp_path / "a.pth"
    save_model(model, src, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--hf-scheme", scheme]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "b.pth")]) == 0
    assert_same_weights(torch.load(src, weights_only=True), torch.load(tmp_path / "b.pth", weights_only=True))
    assert (tmp_path / "hf" / "rwkv_vocab_v20230424.txt").read_bytes() == vocab_path().read_bytes()


@pytest.mark.parametrize("scheme", ["fla", "rwkv"])
def test_writer_uses_the_known_names_and_shapes(tmp_path, model, scheme):
    from safetensors import safe_open
    save_model(model, tmp_path / "a.pth")
    main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "hf"), "--to", "hf", "--hf-scheme", scheme])
    expected = by_hand(torch.load(tmp_path / "a.pth", weights_only=True), scheme)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    assert_same_weights(expected, written)


def test_config_fields_as_the_converters_read_them(tmp_path, model):
    save_model(model, tmp_path / "a.pth")
    c = model.config
    for scheme in ("fla", "rwkv"):
        main(["convert", str(tmp_path / "a.pth"), str(tmp_path / scheme), "--to", "hf", "--hf-scheme", scheme])
    fla = json.loads((tmp_path / "fla" / "config.json").read_text())
    rwkv = json.loads((tmp_path / "rwkv" / "config.json").read_text())
    for cfg in (fla, rwkv):  # read by both fla's RWKV7Config and llama.cpp's Rwkv7Model
        assert cfg["model_type"] == "rwkv7" and "RWKV7ForCausalLM" in cfg["architectures"]
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]) == \
            (128, 2, 300, 512)
        assert cfg["tie_word_embeddings"] is False
    # fla's RWKV7Config (and llama.cpp's fallback branch)
    assert (fla["head_dim"], fla["num_heads"], fla["norm_eps"], fla["hidden_act"], fla["value_dim"]) == \
        (64, 2, 1e-5, "sqrelu", [128, 128])
    assert (fla["decay_low_rank_dim"], fla["a_low_rank_dim"], fla["v_low_rank_dim"], fla["gate_low_rank_dim"]) == \
        (c.dim_w, c.dim_a, c.dim_v, c.dim_g) == (32, 64, 96, 160)
    # llama.cpp's first branch: head_size + layer_norm_epsilon, lora_rank_*
    assert (rwkv["head_size"], rwkv["layer_norm_epsilon"]) == (64, 1e-5)
    assert (rwkv["lora_rank_decay"], rwkv["lora_rank_iclr"], rwkv["lora_rank_value_residual_mix"],
            rwkv["lora_rank_gate"]) == (32, 64, 96, 160)
    assert "head_size" not in fla and "lora_rank_decay" not in fla  # else llama.cpp takes the other branch


@pytest.mark.parametrize("scheme, shards, dtype", [("fla", 1, torch.float32), ("fla", 3, torch.bfloat16),
                                                   ("rwkv", 1, torch.bfloat16), ("rwkv", 2, torch.float32)])
def test_hand_written_hf_directory_loads_with_the_same_logits(tmp_path, model, scheme, shards, dtype):
    save_model(model, tmp_path / "a.pth", dtype=dtype)
    ref = load_model(tmp_path / "a.pth", dtype=torch.float32).eval()
    sd = torch.load(tmp_path / "a.pth", weights_only=True)
    path = hf_dir(tmp_path / "hf", by_hand(sd, scheme), {"model_type": "rwkv7", "hidden_size": 128}, shards)
    loaded = load_model(path, dtype=torch.float32).eval()
    assert torch.equal(logits(loaded), logits(ref))
    assert load_model(path).emb.weight.dtype == dtype  # the file's dtype unless asked otherwise


def test_fla_version1_fused_lerps_flat_r_k_and_layer0_value_lora(tmp_path, model):
    """x_x [6, C] (fla's first layout), r_k as [C], and unused v0/v1/v2 in layer 0 all load."""
    save_model(model, tmp_path / "a.pth")
    sd = torch.load(tmp_path / "a.pth", weights_only=True)
    hf = by_hand(sd, "fla")
    for i in range(2):
        rows = [hf.pop(f"model.layers.{i}.attn.x_{c}").reshape(-1) for c in "rwkvag"]
        hf[f"model.layers.{i}.attn.x_x"] = torch.stack(rows)
        hf[f"model.layers.{i}.attn.r_k"] = hf[f"model.layers.{i}.attn.r_k"].reshape(-1)
    for name, t in (("v_lora.lora.0.weight", sd["blocks.1.att.v1"].t()), ("v_lora.lora.2.weight", sd["blocks.1.att.v2"].t()),
                    ("v_lora.lora.2.bias", sd["blocks.1.att.v0"].reshape(-1).clone())):
        hf[f"model.layers.0.attn.{name}"] = t.contiguous()
    path = hf_dir(tmp_path / "hf", hf, {"model_type": "rwkv7", "head_dim": 64})
    assert torch.equal(logits(load_model(path).eval()), logits(load_model(tmp_path / "a.pth").eval()))


def _one_line_error(fn, *patterns):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for p in patterns:
        assert re.search(p, msg), msg
    return msg


def test_broken_directories_are_one_line_errors(tmp_path, model):
    save_model(model, tmp_path / "a.pth")
    tensors = by_hand(torch.load(tmp_path / "a.pth", weights_only=True), "fla")
    config = {"model_type": "rwkv7"}

    truncated = hf_dir(tmp_path / "truncated", tensors, config, shards=2)
    shard = truncated / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _one_line_error(lambda: load_model(truncated), r"model-00002-of-00002\.safetensors", "truncated")

    missing = hf_dir(tmp_path / "missing", tensors, config, shards=2)
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.attn.k_proj.weight"]
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_error(lambda: load_model(missing), "model.layers.1.attn.k_proj.weight", "does not list")

    lost = hf_dir(tmp_path / "lost", tensors, config, shards=2)
    index = json.loads((lost / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.attn.extra"] = "model-00001-of-00002.safetensors"
    (lost / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_error(lambda: load_model(lost), "model.layers.1.attn.extra", "lacks")

    gone = hf_dir(tmp_path / "gone", tensors, config, shards=2)
    (gone / "model-00001-of-00002.safetensors").unlink()
    _one_line_error(lambda: load_model(gone), r"model-00001-of-00002\.safetensors: missing")

    wrong = dict(tensors)
    wrong["model.layers.1.attn.g_lora.lora.2.weight"] = torch.zeros(128, 96)
    bad = hf_dir(tmp_path / "shape", wrong, config)
    _one_line_error(lambda: load_model(bad), r"'model.layers.1.attn.g_lora.lora.2.weight' has shape \[128, 96\], "
                    r"expected \[128, 160\]")

    short = {k: v for k, v in tensors.items() if k != "model.layers.1.ffn.x_k"}
    incomplete = hf_dir(tmp_path / "incomplete", short, config)
    _one_line_error(lambda: load_model(incomplete), "no tensor for blocks.1.ffn.x_k", "'model.layers.1.ffn.x_k'")

    mismatch = hf_dir(tmp_path / "config", tensors, {"model_type": "rwkv7", "num_hidden_layers": 3})
    _one_line_error(lambda: load_model(mismatch), "num_hidden_layers is 3", "2 layers")

    other = hf_dir(tmp_path / "llama", tensors, {"model_type": "llama"})
    _one_line_error(lambda: load_model(other), "model_type 'llama'")

    (missing / "model.safetensors.index.json").write_text("[]")
    _one_line_error(lambda: load_model(missing), "not a safetensors index")
    (missing / "config.json").write_text("{not json")
    _one_line_error(lambda: load_model(missing), r"config.json: not a JSON object")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    _one_line_error(lambda: load_model(tmp_path / "empty"), "needs model.safetensors")


def test_info_and_generate_take_a_directory(tmp_path, model, capsys):
    save_model(model, tmp_path / "a.pth")
    main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "hf"), "--to", "hf"])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["n_layer"], info["n_embd"], info["dim_g"]) == (2, 128, 160)


def test_convert_and_merge_refuse_an_existing_directory(tmp_path, model, capsys):
    save_model(model, tmp_path / "a.pth")
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "a.pth"), str(out), "--to", "hf"]) == 0
    (out / "keep").write_text("x")
    assert main(["convert", str(tmp_path / "a.pth"), str(out), "--to", "hf"]) == 2
    assert "already exists; give --overwrite" in capsys.readouterr().err
    assert (out / "keep").exists()
    assert main(["convert", str(tmp_path / "a.pth"), str(out), "--to", "hf", "--overwrite"]) == 0
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert main(["convert", str(out), str(out), "--to", "hf", "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "x.pth"), "--to", "hf"]) == 2
    assert "writes a directory" in capsys.readouterr().err
    assert main(["merge", "--model", str(tmp_path / "a.pth"), "--adapter", str(tmp_path / "none.safetensors"),
                 "--out", str(out), "--to", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_to_hf(tmp_path, model):
    from rwkv_sft import adapters
    save_model(model, tmp_path / "base.pth")
    m = load_model(tmp_path / "base.pth")
    settings = adapters.AdapterSettings(lora_rank=4, lora_alpha=8.0)
    info = adapters.base_info(m)
    adapters.attach(m, settings)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.1)
    adapter = adapters.save_adapter(tmp_path / "adapter.safetensors", adapters.adapter_state_dict(m), settings, info)
    assert main(["merge", "--model", str(tmp_path / "base.pth"), "--adapter", str(adapter),
                 "--out", str(tmp_path / "m.pth")]) == 0
    assert main(["merge", "--model", str(tmp_path / "base.pth"), "--adapter", str(adapter),
                 "--out", str(tmp_path / "mhf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "mhf"), str(tmp_path / "back.pth")]) == 0
    merged = torch.load(tmp_path / "m.pth", weights_only=True)
    assert_same_weights(merged, torch.load(tmp_path / "back.pth", weights_only=True))
    assert not torch.equal(merged["blocks.0.att.key.weight"], model.blocks[0].att.key.weight)  # the LoRA is in it


def _llama_cpp_names(names, n_layer):
    """The GGUF tensors llama.cpp's convert_hf_to_gguf.py (class Rwkv7Model) makes of these HF
    names: its name unification restated, then gguf's own TensorNameMap for RWKV7."""
    import gguf  # the test extra installs it
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.RWKV7, n_layer)
    out = set()
    for name in names:
        n = name.replace("blocks", "layers").replace("ffn", "feed_forward").replace("attn", "attention")
        n = n.replace("feed_forward_norm", "ln2").replace("g_norm", "ln_x")
        n = n.replace("_lora.lora.0.weight", "1.weight").replace("_lora.lora.2.weight", "2.weight")
        n = n.replace("_lora.lora.2.bias", "0.weight")
        bid = int(re.search(r"layers\.(\d+)\.", n)[1]) if "layers." in n else None
        if "attention.x_" in n:
            out.add(f"blk.{bid}.time_mix_lerp_fused")
            continue
        new = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        assert new is not None, f"llama.cpp has no GGUF name for {name}"
        out.add(re.sub(r"\.(weight|bias)$", "", new))
    return out


@pytest.mark.parametrize("scheme", ["fla", "rwkv"])
def test_every_tensor_llama_cpp_needs_has_a_source(tmp_path, model, scheme):
    import gguf
    from safetensors import safe_open
    save_model(model, tmp_path / "a.pth")
    main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "hf"), "--to", "hf", "--hf-scheme", scheme])
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        made = _llama_cpp_names(list(f.keys()), 2)
    made |= {"blk.0.time_mix_v0", "blk.0.time_mix_v1", "blk.0.time_mix_v2"}  # it copies layer 0's a0/a1/a2 there
    needed = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.RWKV7]
              for b in range(2)}
    assert needed <= made, sorted(needed - made)
