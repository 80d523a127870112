"""A quantized (int8 / nf4) frozen base under LoRA and state tuning."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model
from test_adapters import _cli_error, _losses, _straight_and_resumed
from test_train_helpers import VOCAB, tiny_config, tiny_data

from rwkv_sft import RWKV7
from rwkv_sft.weights import load_model, save_model
from rwkv_sft import adapters
from rwkv_sft.adapters.lora import FrozenLinear
from rwkv_sft.adapters.quant import QuantLinear
from rwkv_sft.ops.frozen import upcast
from rwkv_sft.adapters.training import quantize_model
from rwkv_sft.adapters.training import compact
from rwkv_sft.cli import main
from rwkv_sft.errors import UserError
from rwkv_sft.train import train

SHAPE = dict(n_layer=2, n_embd=64, vocab_size=VOCAB)
TOKENS = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(3))
RUN = dict(model_config=None, lora_rank=4, lora_alpha=8.0, state_tuning=True, max_steps=6, save_every=2,
           keep_last=2, wkv_backend="chunked", lr=1e-2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Bit-identical resume needs one reduction order."""


@pytest.fixture
def base_path(tmp_path):
    path = tmp_path / "base.pth"
    save_model(random_model(seed=1, **SHAPE), path)
    return path


def _logits(model):
    with torch.no_grad():
        return model(TOKENS)[0]


def _nf4_twin(layer: QuantLinear) -> torch.Tensor:
    """nf4 dequantized by hand from the stored tensors: two 4-bit codes per byte (high nibble
    first) looked up in the NormalFloat table, times their block's absmax, itself stored as an
    8-bit code times its own block's scale, plus the offset (double quantization)."""
    absmax = layer.code2[layer.absmax.long()] * layer.absmax2.repeat_interleave(256)[:layer.absmax.numel()]
    absmax = absmax + layer.offset
    q = layer.q.reshape(-1)
    codes = torch.stack([q >> 4, q & 15], dim=-1).reshape(-1).long()
    return (layer.code[codes] * absmax.repeat_interleave(64)).reshape(layer.out_features, layer.in_features)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_layer_matches_its_dequantized_weight_forward_and_input_gradient(kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    layer = QuantLinear.from_weight(w, kind)
    dense = layer.dequantize()
    if kind == "int8":  # round to nearest: at most half a step of the row's scale
        assert ((dense - w).abs() <= w.abs().amax(1, keepdim=True) / 254 * 1.0001).all()
    else:  # the slow twin, and 4 bits' worth of closeness
        torch.testing.assert_close(dense, _nf4_twin(layer), rtol=1e-6, atol=1e-7)
        assert (dense - w).abs().mean() < 0.1 * w.abs().mean()
    assert (dense != w).any()
    x = torch.randn(5, 7, 128, generator=g, requires_grad=True)
    y = layer(x)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, dense)
    y2.backward(grad)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert not list(layer.parameters()) and not layer.state_dict()  # frozen; nothing to save as a base
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the product in bf16, the scale
        y, y2 = layer(x), F.linear(x, layer.q.float()) * layer.row_scale if kind == "int8" else F.linear(x, dense)
    assert y.dtype == y2.dtype  # (int8: fp32, the bf16 product widened by the fp32 scale, as written)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


def test_layers_in_turn_upcast_into_one_buffer_each_getting_its_own_weight():
    """Frozen int8 and bf16 weights of different shapes, one after another, forward and backward:
    each product uses its own weight although all are converted into the same reused buffer."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(out, 64, generator=g) / 8 for out in (256, 96, 128)]
    layers = [QuantLinear.from_weight(weights[0], "int8"), FrozenLinear.around(torch.nn.Linear(64, 96, bias=False)),
              QuantLinear.from_weight(weights[2], "int8")]
    layers[1].weight = torch.nn.Parameter(weights[1].bfloat16(), requires_grad=False)
    dense = [layers[0].dequantize(), layers[1].weight.float(), layers[2].dequantize()]
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    expected = x.detach().clone().requires_grad_(True)
    h, e = x, expected
    for layer, w in zip(layers, dense):  # 256 -> 96 -> 128 wide: each reads the first 64 columns
        h, e = layer(h[..., :64]), F.linear(e[..., :64], w)
    h.sum().backward()
    e.sum().backward()
    torch.testing.assert_close(h, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected.grad, rtol=1e-5, atol=1e-5)
    first = upcast(layers[0].q, torch.float32)
    second = upcast(layers[2].q, torch.float32)
    assert second.data_ptr() == first.data_ptr()  # reused, not allocated again
    assert torch.equal(second, layers[2].q.float())


@pytest.mark.parametrize("shape", [(200, 128), (192, 40)])
def test_nf4_quantized_by_row_blocks_is_bit_identical_to_bitsandbytes_in_one_call(monkeypatch, shape):
    """Blocks of 12 rows (rounded up to 16 rows of 40 values, whole 64-value blocks): 17 or 12 row
    blocks, 400 or 120 absmax (two or one blocks of 256 in the double quantization). Every stored
    tensor equals bitsandbytes' one call on the whole fp32 weight, and nothing larger than the
    packed weight (half a byte a value) exists meanwhile: no fp32 copy of the whole."""
    import bitsandbytes.functional as bnbf
    from test_cross_entropy import LargestTensor
    from rwkv_sft.adapters import quant
    monkeypatch.setattr(quant, "ROW_BLOCK", 12)
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.05).bfloat16()
    w.view(-1)[128:192] = 0  # a block of zeros
    with LargestTensor() as mode:
        stored = quant.quantize(w, "nf4")
    assert mode.numel == w.numel() // 2
    q, state = bnbf.quantize_4bit(w.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = {"q": q, "absmax": state.absmax, "offset": state.offset.reshape(1), "code": state.code,
           "absmax2": state.state2.absmax, "code2": state.state2.code}
    assert stored.keys() == ref.keys()
    for name, t in ref.items():
        got = stored[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.view(torch.uint8) if got.is_floating_point() else got,
                           t.view(torch.uint8) if t.is_floating_point() else t), name  # bit for bit
    layer = QuantLinear(shape[1], shape[0], "nf4", stored)
    torch.testing.assert_close(layer.dequantize(), bnbf.dequantize_4bit(q, state).reshape(shape), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_head_scores_block_by_block_as_its_dequantized_weight_in_float64(monkeypatch, kind):
    """The loss reads a quantized head a block of rows at a time (blocks of 24 rows of 96 values:
    nf4's 64-value blocks straddle the row edges): loss and hidden gradient equal those of the
    dequantized head in float64, and no float tensor as large as the head exists meanwhile."""
    from test_cross_entropy import LargestTensor
    from rwkv_sft.ops import cross_entropy
    from rwkv_sft.train.loss import head_loss
    g = torch.Generator().manual_seed(4)
    V, C, N = 200, 96, 40
    head = QuantLinear.from_weight(torch.randn(V, C, generator=g) * 0.2, kind)
    dense = head.dequantize(torch.float64)
    for start, end in [(0, V), (1, 3), (5, 6), (24, 48), (199, 200)]:  # any rows equal the whole's
        torch.testing.assert_close(head.dequantize(torch.float64, start, end), dense[start:end], rtol=0, atol=0)
    rows = torch.randn(N, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    monkeypatch.setattr(cross_entropy, "BLOCK_BYTES", 24 * C * 4)
    with LargestTensor() as mode:
        loss = head_loss(head, rows, targets, chunk_size=16, l2wrap=1e-2)
        loss.backward()
    assert mode.numel < V * C
    twin = rows.detach().double().requires_grad_()
    ref = cross_entropy.linear_cross_entropy(twin, dense, targets, reduction="sum", chunk_size=N, l2wrap=1e-2)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.grad.double(), twin.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantizing_at_load_equals_quantizing_in_memory_and_keeps_the_fingerprint(base_path, kind):
    loaded = load_model(base_path, quantize=kind)
    model = load_model(base_path)
    fingerprint = adapters.base_info(model)["fingerprint"]
    adapters.freeze_base(model)  # (what quantize_model replaces: frozen linear layers)
    quantize_model(model, kind)
    assert adapters.base_info(loaded)["fingerprint"] == adapters.base_info(model)["fingerprint"] == fingerprint
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 6 * SHAPE["n_layer"] + 1  # every projection and the head
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            theirs = dict(layers.pop(name).named_buffers())
            for b, t in m.named_buffers():
                assert torch.equal(t, theirs[b]), (name, b)
    assert not layers
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    ref = _logits(load_model(base_path))
    assert (_logits(loaded) - ref).abs().max() < (0.04 if kind == "int8" else 0.3) * ref.abs().max()


def test_int8_lora_run_freezes_the_base_and_its_adapter_serves_and_merges_into_the_original(base_path, tmp_path,
                                                                                             capsys):
    base = load_model(base_path, quantize="int8")
    frozen = {n: t.clone() for n, t in base.named_buffers()}
    result = train(tiny_config(tmp_path / "run", model=str(base_path), base_dtype="int8", **RUN), data=tiny_data())
    model = result.model
    now = dict(model.named_buffers())
    assert frozen.keys() <= now.keys() and all(torch.equal(now[k], v) for k, v in frozen.items())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.emb.weight.dtype == torch.bfloat16 and not model.emb.weight.requires_grad
    n = load_model(base_path).num_parameters() / 1e6  # the quantized weights count as parameters
    assert f"x 64, {n:.1f}M parameters ({n:.1f}M frozen" in capsys.readouterr().out
    adapter = result.exports["adapter"]
    # the adapter names the original base and reproduces the trained model on the quantized one
    assert adapters.read_adapter(adapter)[2]["fingerprint"] == adapters.base_info(load_model(base_path))["fingerprint"]
    model.eval()
    served = load_model(base_path, quantize="int8", adapter=adapter)
    adapters.freeze_base(served)
    compact(served, "int8")  # (its embedding in bf16 too, as in training)
    torch.testing.assert_close(_logits(served), _logits(model), atol=1e-5, rtol=0)
    # merge folds it into the original weights: equal to the original base + adapter
    capsys.readouterr()
    assert main(["merge", "--model", str(base_path), "--adapter", str(adapter), "--out", str(tmp_path / "m.pth")]) == 0
    on_original = load_model(base_path, adapter=adapter)
    original = load_model(base_path)
    merged = load_model(tmp_path / "m.pth")
    for name, m in adapters.lora_modules(on_original).items():
        w = original.get_submodule(name).weight
        torch.testing.assert_close(merged.get_submodule(name).weight, w + m.delta_weight(), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="quantized base cannot be exported"):
        save_model(model, tmp_path / "q.pth")
    # evaluation on the original and on a quantized base
    from rwkv_sft.eval.evaluate import evaluate
    losses = [evaluate(load_model(base_path, quantize=kind, adapter=adapter), tiny_data().train, None,
                       exact_match_samples=0)["loss"] for kind in (None, "int8", "nf4")]
    assert losses[0] == pytest.approx(losses[1], rel=0.02) and losses[0] == pytest.approx(losses[2], rel=0.1)


def test_preference_log_probabilities_read_a_quantized_head_as_its_dequantized_weight(tmp_path):
    import copy
    from test_preference import PAIRS, _write
    from rwkv_sft.data import DataConfig
    from rwkv_sft.data.pairs import collate_pairs, prepare_pairs
    from rwkv_sft.tokenizer import Tokenizer
    from rwkv_sft.train.preference import sequence_logps
    pairs = prepare_pairs(DataConfig(_write(tmp_path / "p.jsonl", PAIRS)), Tokenizer(), show_report=False).train
    batch = collate_pairs(pairs, range(len(PAIRS)))
    model = random_model(seed=1, n_layer=2, n_embd=64, vocab_size=65536)
    adapters.freeze_base(model)
    twin = copy.deepcopy(model)
    quantize_model(model, "int8")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            twin.get_submodule(name).weight.data = m.dequantize()
    with torch.no_grad():
        logp, count = sequence_logps(model, batch)
        ref, ref_count = sequence_logps(twin, batch)
    assert torch.equal(count, ref_count)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-4)


def test_a_quantized_base_trains_under_the_heap_policy_a_bf16_base_does(base_path, tmp_path, monkeypatch):
    from rwkv_sft import utils
    from rwkv_sft.train.parallel import use_heap_policy  # what `rwkv-sft train` sets before train()
    policies = []
    monkeypatch.setattr(utils, "set_heap_policy", policies.append)
    for base, low in (("bf16", False), ("int8", False), ("nf4", False), ("int8", True), ("bf16", True)):
        use_heap_policy(tiny_config(tmp_path / base, model=str(base_path), base_dtype=base, low_memory=low, **RUN))
    assert policies == [False, False, False, True, True]


def test_wrong_base_missing_library_and_full_fine_tuning_are_one_line_errors(base_path, tmp_path, capsys,
                                                                             monkeypatch):
    result = train(tiny_config(tmp_path / "run", model=str(base_path), base_dtype="int8", **{**RUN, "max_steps": 1}),
                   data=tiny_data())
    other = tmp_path / "other.pth"
    save_model(random_model(seed=2, **SHAPE), other)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"context": "ab", "completion": "cd"}) + "\n")
    err = _cli_error(capsys, "generate", "--model", str(other), "--adapter", str(result.exports["adapter"]),
                     "--prompt", "a", "--base-dtype", "int8")
    assert "adapter trained on another base" in err
    err = _cli_error(capsys, "train", "--model", str(base_path), "--data", str(data), "--out", str(tmp_path / "f"),
                     "--base-dtype", "nf4")
    assert "quantizes a frozen base: give lora_rank" in err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    err = _cli_error(capsys, "generate", "--model", str(base_path), "--prompt", "a", "--base-dtype", "nf4")
    assert "needs the bitsandbytes library" in err and "rwkv-sft[quant]" in err
    assert load_model(base_path, quantize="int8") is not None  # int8 needs no library


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_resume_on_a_quantized_base_is_bit_identical_and_composes_with_checkpointing_and_segments(
        base_path, tmp_path, monkeypatch, kind):
    settings = dict(RUN, model=str(base_path), base_dtype=kind, batch_tokens=24, step_tokens=48)
    straight, second = _straight_and_resumed(tmp_path, monkeypatch, settings)
    a, b = (adapters.adapter_state_dict(r.model) for r in (straight, second))
    assert a.keys() == b.keys() and any(k.endswith("time_state") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    segmented = train(tiny_config(tmp_path / "c", activation_checkpointing=True, segment_len=8, **settings),
                      data=tiny_data())
    assert segmented.steps == 6
    assert _losses(tmp_path / "c") == pytest.approx(_losses(tmp_path / "a"), rel=1e-5)


PEAK_SCRIPT = """
import sys, torch
from rwkv_sft import RWKV7
from rwkv_sft.weights import load_model, save_model
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
path, tiny, kind = sys.argv[1], sys.argv[2], sys.argv[3]
quantize = None if kind == "none" else kind
load_model(tiny, quantize=quantize)  # what a first load costs once (imports, lazy initialisation)
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here
before = status("VmRSS")
model = load_model(path, quantize=quantize)
for t in [*model.parameters(), *model.buffers()]:  # every stored tensor read (a mapped file's pages count)
    t.sum()
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self's peak and page release are Linux's")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loading_quantized_peaks_near_the_quantized_size_not_the_file_size(tmp_path, suffix):
    """A 4 x 1024 fp32 file of ~200 MB: a plain load of it (memory-mapped, read by a forward)
    rises by about the file size; an int8 load, tensor by tensor, by little more than half of it"""
    path = tmp_path / f"big{suffix}"
    torch.manual_seed(0)
    from rwkv_sft import RWKV7Config
    from rwkv_sft.weights import save_model
    model = RWKV7(RWKV7Config(n_layer=4, n_embd=1024, vocab_size=1024), init_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, path)
    del model
    size = path.stat().st_size
    save_model(RWKV7(RWKV7Config(n_layer=1, n_embd=64, vocab_size=64)), tmp_path / "tiny.pth")

    # glibc's mmap threshold fixed at 1 MiB: by default it rises to the largest block freed, and
    # then keeps freed fp32 copies in its heap at random (threads' arenas), which would measure
    # the allocator's retention rather than what the loader holds alive
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))

    def rise(kind):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(tmp_path / "tiny.pth"), kind], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip().splitlines()[-1])
    assert rise("int8") < 0.6 * size < 0.9 * size < rise("none")  # (int8 weights: a quarter of fp32)
