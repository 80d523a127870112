"""The fused single-token decoding step against the model's normal forward (its slow twin)."""
import copy
import re

import pytest
import torch

from conftest import random_model
from rwkv_sft.infer.decoder import Decoder, as_decoder
from rwkv_sft.infer.step import _WEIGHT_TYPES
from rwkv_sft.infer.step import _step_with_kernels as _with_kernels
from rwkv_sft.infer.step import decode_step
from rwkv_sft.ops.decode_cpu import kernels

V = 300


def normal_step(model, tokens, state):
    """The general forward (forward_hidden + head), which the Decoder's [B,1] calls skip."""
    hidden, state = model.forward_hidden(tokens, state)
    return model.head(hidden[:, -1]), state


def random_state(model, batch):
    state = model.zero_state(batch)
    for t in (state.att_shift, state.wkv, state.ffn_shift):
        t.normal_()
    return state


@pytest.fixture(params=["kernels", "pytorch"])
def step_path(request, monkeypatch):
    """The decoding step's two paths: the C kernels (ops/csrc/decode_cpu.c) and plain PyTorch."""
    monkeypatch.setenv("RWKV_SFT_DECODE_KERNELS", "1" if request.param == "kernels" else "0")
    if request.param == "kernels" and kernels() is None:
        pytest.skip("no C compiler: the step runs its PyTorch path")
    return request.param


@pytest.mark.parametrize("batch", [3, 1, 9])  # (9: more rows than C's matrix-vector products take)
@pytest.mark.parametrize("variant", ["plain", "deep_embed", "lora", "training_layout", "compact"])
def test_decode_step_equals_the_normal_forward(one_thread, step_path, variant, batch, monkeypatch):
    """compact: a LoRA run's model on a bf16 compact base (what evaluation decodes during training)."""
    model = random_model(seed=3, n_layer=3, n_embd=128, vocab_size=V, deep_embed=variant == "deep_embed").eval()
    import rwkv_sft.infer.step as step
    taken = []
    monkeypatch.setattr(step, "_step_with_kernels", lambda *a: taken.append(1) or _with_kernels(*a))
    if variant in ("lora", "compact"):  # adapted projections are called through their modules
        from rwkv_sft.adapters import add_lora, compact_frozen, freeze_base
        add_lora(model, rank=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
        if variant == "compact":
            freeze_base(model)
            compact_frozen(model, torch.bfloat16)
            assert model.blocks[1].att.w1.dtype == torch.bfloat16
    decoder = Decoder(model, layout=variant != "training_layout")  # (the C products read either layout)
    tokens = torch.randint(0, V, (batch, 8))
    # (at 9 rows MKL multiplies the two paths' matrices in other summation orders: rounding of ~1e-5)
    tol = dict(rtol=1e-5, atol=5e-5 if batch == 9 else 1e-5)
    with torch.no_grad():
        for state in (None, random_state(model, batch)):
            fast = slow = state
            for t in range(tokens.shape[1]):
                want, slow = normal_step(model, tokens[:, t:t + 1], slow)
                got, fast = decoder(tokens[:, t:t + 1], fast, full_output=False)
                torch.testing.assert_close(got, want, **tol)
                for name in ("att_shift", "wkv", "ffn_shift"):
                    torch.testing.assert_close(getattr(fast, name), getattr(slow, name), **tol)
        assert bool(taken) == (step_path == "kernels")
        # plain projections are multiplied as one [3, C, C] stack; adapted ones through their modules
        assert (decoder.model.blocks[1].att in decoder.stacks) == (variant not in ("lora", "training_layout", "compact"))
        # The decoder takes this path for one token without gradients; full_output keeps the T axis.
        logits, _ = decoder(tokens[:, :1], None)
        assert logits.shape == (batch, 1, V)
        torch.testing.assert_close(logits[:, 0], normal_step(model, tokens[:, :1], None)[0], **tol)
        # Feeding a prompt in one call, then stepping, equals stepping all the way.
        _, prefilled = decoder(tokens[:, :5])
        a, _ = decoder(tokens[:, 5:6], prefilled, full_output=False)
        b, _ = normal_step(model, tokens[:, 5:6], model.forward_hidden(tokens[:, :5])[1])
        torch.testing.assert_close(a, b, **tol)


def test_the_decoder_lays_out_its_own_twin_and_never_changes_the_model(one_thread):
    """The decoder holds the projections transposed in its own twin (same values, same state_dict,
    every other tensor shared); the model's weights stay as they were, and it trains normally."""
    model = random_model(seed=4, n_layer=2, n_embd=64, vocab_size=V)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, V, (2, 4))
    decoder = Decoder(model, layout=True)
    with torch.inference_mode():
        decoder(tokens[:, :1])
    twin = decoder.model
    assert twin.head.weight.t().is_contiguous() and not twin.head.weight.is_contiguous()
    assert twin.emb.weight is model.emb.weight and twin.blocks[0].att.w1 is model.blocks[0].att.w1
    assert twin.blocks[0].att in decoder.stacks
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(v.is_contiguous() for v in after.values())
    assert twin.state_dict().keys() == before.keys() and all(torch.equal(twin.state_dict()[k], v) for k, v in before.items())
    logits, _ = model(tokens)  # with gradients: autograd works on the model's own weights
    logits.square().mean().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.is_contiguous()


def test_by_default_only_a_step_in_pytorch_lays_out_weights(monkeypatch):
    """The C products are no faster on transposed weights, torch's are: Decoder(model) keeps a
    transposed twin only when its step runs in PyTorch; as_decoder never copies."""
    model = random_model(seed=4, n_layer=1, n_embd=64, vocab_size=V)
    monkeypatch.setenv("RWKV_SFT_DECODE_KERNELS", "0")
    assert Decoder(model).model is not model and as_decoder(model).model is model
    monkeypatch.setenv("RWKV_SFT_DECODE_KERNELS", "1")
    if kernels() is not None:
        assert Decoder(model).model is model


def test_the_trainer_keeps_the_training_layout_through_its_evaluations(tmp_path, monkeypatch):
    """An evaluation during training generates token by token; the model being trained must not be
    re-laid for it (two copies of every weight per evaluation). The trained model decodes as usual."""
    from types import SimpleNamespace

    import rwkv_sft.eval.evaluate as evaluate_mod
    from rwkv_sft.infer.step import decode_step
    from rwkv_sft.train import train
    from test_train_helpers import tiny_config, tiny_examples

    seen = []

    def fake_evaluate(model, *args, **kwargs):
        with torch.inference_mode():
            as_decoder(model)(torch.zeros(1, 1, dtype=torch.long))  # what the evaluation's generation calls
        seen.append(model.head.weight.is_contiguous())
        return {"loss": 1.0, "token_accuracy": 0.0, "exact_match": 0.0, "exact_match_n": 0, "samples": []}

    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    data = SimpleNamespace(train=tiny_examples(), eval=tiny_examples(4, seed=1), report={})
    result = train(tiny_config(tmp_path, eval_every=2), data=data)
    assert seen and all(seen)  # every evaluation ran on the training layout
    decoder = Decoder(result.model, layout=True)
    with torch.inference_mode():
        decoder(torch.zeros(1, 1, dtype=torch.long))
    assert not decoder.model.head.weight.is_contiguous() and result.model.head.weight.is_contiguous()


def test_a_failed_training_run_leaves_the_callers_model_decoding_as_usual(tmp_path, monkeypatch):
    import rwkv_sft.train.objective as objective
    from rwkv_sft.train import train
    from test_train_helpers import tiny_config, tiny_data

    def broken(*args, **kwargs):
        raise RuntimeError("the loss could not be built")

    monkeypatch.setattr(objective, "CompletionLoss", broken)  # fails after the trainer took the model over
    model = random_model(seed=3, n_layer=1, n_embd=64, vocab_size=256)
    with pytest.raises(RuntimeError, match="could not be built"):
        train(tiny_config(tmp_path), model=model, data=tiny_data())
    decoder = Decoder(model.eval(), layout=True)
    tokens = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens, full_output=False)[0], normal_step(model, tokens, None)[0],
                                   rtol=1e-5, atol=1e-5)
    assert not decoder.model.head.weight.is_contiguous()


def test_decoding_layout_transposes_widening_projections_only():
    """A matrix-vector product streams a widening weight (out >= in) faster transposed and a narrowing
    one (ffn.value, 4C -> C) faster as it is; the values never change."""
    model = Decoder(random_model(seed=5, n_layer=1, n_embd=64, vocab_size=V), layout=True).model
    block = model.blocks[0]
    assert not model.head.weight.is_contiguous() and not block.ffn.key.weight.is_contiguous()
    assert not block.att.receptance.weight.is_contiguous()
    assert block.ffn.value.weight.is_contiguous()


def test_the_stacked_projections_follow_the_weights(one_thread):
    """In the decoder's twin receptance/key/value are views of one stack: a weight changed in place
    changes the step, a weight replaced (load_state_dict(assign=True), .to()) leaves the stack for
    the modules; the step equals the normal forward throughout."""
    decoder = Decoder(random_model(seed=5, n_layer=2, n_embd=64, vocab_size=V).eval(), layout=True)
    model = decoder.model
    tokens = torch.randint(0, V, (2, 1))
    from rwkv_sft.infer.step import _stack
    with torch.no_grad():
        att = model.blocks[1].att
        assert _stack(decoder.stacks, att) is not None
        att.key.weight.mul_(1.5)  # in place: the stack sees it
        torch.testing.assert_close(decoder(tokens, None, full_output=False)[0],
                                   normal_step(model, tokens, None)[0], rtol=1e-5, atol=1e-5)
        sd = {k: v.clone() * (1.1 if k.endswith("att.value.weight") else 1) for k, v in model.state_dict().items()}
        model.load_state_dict(sd, assign=True)
        assert _stack(decoder.stacks, att) is None
        torch.testing.assert_close(decoder(tokens, None, full_output=False)[0],
                                   normal_step(model, tokens, None)[0], rtol=1e-5, atol=1e-5)


# ---- the C kernels on their own ----

def _matvec(lib, x, w, transposed):
    """x [B,in] (or [in]) times w^T [in,out] through C, w stored transposed or as it is."""
    rows = x.reshape(-1, w.shape[1]).contiguous()
    y = torch.empty(rows.shape[0], w.shape[0])
    stored = w.t().contiguous() if transposed else w.contiguous()
    function = getattr(lib, "rwkv7_matvec_" + _WEIGHT_TYPES[w.dtype])
    function(rows.shape[0], rows.data_ptr(), stored.data_ptr(), y.data_ptr(), w.shape[1], w.shape[0], int(transposed))
    return y.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("shape", [(1100, 37), (53, 70), (16, 16), (1, 5), (2050, 515)])
def test_matvec_equals_float64(shape, transposed, threads, dtype, rows):
    """Both weight layouts, sizes that are no multiple of the 16-wide sums, the 4-row passes or the
    512-column blocks, one and two threads (each thread's share of the outputs); fp32 weights and
    bf16 ones (read exactly as fp32)."""
    lib = kernels()
    if lib is None:
        pytest.skip("no C compiler")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
        w, x = torch.randn(shape, generator=g).to(dtype), torch.randn(rows, shape[1], generator=g)
        want = (x.double() @ w.double().t()).float()
        torch.testing.assert_close(_matvec(lib, x, w, transposed), want, rtol=1e-5, atol=1e-5 * shape[1] ** 0.5)
    finally:
        torch.set_num_threads(before)


def test_relu_square_keeps_nan():
    lib = kernels()
    if lib is None:
        pytest.skip("no C compiler")
    k = torch.tensor([-1.0, 0.0, 2.0, float("nan"), float("inf")])
    lib.rwkv7_relu_square(k.numel(), k.data_ptr())
    torch.testing.assert_close(k, torch.relu(torch.tensor([-1.0, 0.0, 2.0, float("nan"), float("inf")])) ** 2,
                               equal_nan=True)


def test_without_a_compiler_the_step_runs_in_pytorch(one_thread, monkeypatch, tmp_path, capsys):
    """No compiler: no library and no message. A compiler that fails, or a $CC that is not there:
    one line on stderr naming the reason. Either way decoding works (the PyTorch path) and gives
    the normal forward's logits."""
    import warnings

    import rwkv_sft.ops.decode_cpu as decode_cpu
    real_compiler = decode_cpu.compiler
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached build to find
    monkeypatch.setattr(decode_cpu, "_loaded", {})
    monkeypatch.setattr(decode_cpu, "compiler", lambda: None)
    model = random_model(seed=2, n_layer=2, n_embd=64, vocab_size=V).eval()
    tokens = torch.randint(0, V, (1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            got = Decoder(model)(tokens, full_output=False)[0]
    assert decode_cpu._loaded == {"lib": None}
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(got, normal_step(model, tokens, None)[0], rtol=1e-5, atol=1e-5)

    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'decode_cpu.c:1: error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(decode_cpu, "_loaded", {})
    monkeypatch.setattr(decode_cpu, "compiler", lambda: str(broken))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_cpu.kernels() is None
    assert decode_cpu.kernels() is None  # once: the failure is remembered
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.fullmatch(r"rwkv-sft: .*decoding runs in PyTorch .*error: no such thing\)\n", err)
    assert not list((tmp_path / "rwkv_sft" / "decode_cpu").iterdir())  # no half-written file left

    for cc, says in (("/nonexistent", "CC=/nonexistent: no such command"), ("/bin/false", "/bin/false could not")):
        monkeypatch.setenv("CC", cc)
        monkeypatch.setattr(decode_cpu, "_loaded", {})
        monkeypatch.setattr(decode_cpu, "compiler", real_compiler)  # reads $CC
        assert decode_cpu.kernels() is None and decode_cpu.kernels() is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rwkv-sft: ") and says in err, err


def test_the_kernels_take_odd_inputs_or_leave_them_to_pytorch(one_thread, step_path):
    """A state whose tensors are views with odd strides, a parameter stored transposed, a float64
    WKV state: the step still equals the normal forward (C reads a contiguous copy of the state,
    and leaves a parameter it cannot read as it is to the PyTorch path)."""
    model = random_model(seed=6, n_layer=2, n_embd=64, vocab_size=V).eval()
    tokens = torch.randint(0, V, (1, 1))
    state = random_state(model, 2).select(torch.tensor([1]))
    state.wkv = state.wkv.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    state.att_shift = state.att_shift[..., :].expand(-1, 1, -1)
    with torch.no_grad():
        att = model.blocks[1].att
        att.w1.data = att.w1.data.t().contiguous().t()
        for s in (state, type(state)(state.att_shift, state.wkv.double(), state.ffn_shift)):
            got, new = decode_step(model, tokens, s, full_output=False)
            want, expected = normal_step(model, tokens, s)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new.wkv, expected.wkv.to(new.wkv.dtype), rtol=1e-5, atol=1e-5)


def test_every_build_variant_compiles_and_computes(tmp_path):
    """The fallbacks for other toolchains (no OpenMP, no per-CPU clones) build here too and give
    the same products."""
    import ctypes
    import subprocess

    import rwkv_sft.ops.decode_cpu as decode_cpu
    cc = decode_cpu.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    w, x = torch.randn(300, 70), torch.randn(70)
    for i, variant in enumerate(decode_cpu.VARIANTS):
        out = tmp_path / f"v{i}.so"
        subprocess.run([cc, *decode_cpu.FLAGS, *variant, str(decode_cpu.SOURCE), "-o", str(out), "-lm"], check=True)
        lib = ctypes.CDLL(str(out))
        lib.rwkv7_matvec_f32.argtypes = decode_cpu._SIGNATURES["rwkv7_matvec_f32"]
        for transposed in (True, False):
            torch.testing.assert_close(_matvec(lib, x, w, transposed), w @ x, rtol=1e-5, atol=1e-4)


def test_a_bf16_model_decodes_in_its_stored_layout(one_thread):
    """In bf16 torch's CPU matrix-vector product is ~10x slower on a transposed weight (a 12 x 768
    step: 448 against 39 ms), so decoding leaves bf16 weights as they are; the step still equals
    the normal forward."""
    model = random_model(seed=8, n_layer=2, n_embd=64, vocab_size=V).eval().to(torch.bfloat16)
    tokens = torch.randint(0, V, (1, 1))
    decoder = Decoder(model, layout=True)
    with torch.no_grad():
        got, state = decoder(tokens, full_output=False)
        want, expected = normal_step(model, tokens, None)
    twin = decoder.model
    assert twin.head.weight.is_contiguous() and twin.blocks[0].att.receptance.weight.is_contiguous()
    assert not decoder.stacks
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state.wkv, expected.wkv, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "deep_embed", "lora"])
def test_a_bf16_model_steps_in_c_like_its_fp32_twin(one_thread, step_path, variant, batch):
    """C reads bf16 weights as fp32 and keeps activations in fp32, so a bf16 model's step equals
    the full forward of its fp32 twin (the same weights, converted exactly) from the same state:
    the WKV state to fp32 rounding, logits and token shifts to bf16 rounding (they come back in
    bf16). The PyTorch path computes in bf16 and is held to bf16's distance, as are LoRA layers and
    DeepEmbed's channel mix, which both paths run through their modules in the model's dtype."""
    model = random_model(seed=9, n_layer=3, n_embd=128, vocab_size=V, deep_embed=variant == "deep_embed").eval()
    if variant == "lora":
        from rwkv_sft.adapters import add_lora
        add_lora(model, rank=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
    model = model.to(torch.bfloat16)
    twin = copy.deepcopy(model).float()
    tokens = torch.randint(0, V, (batch, 4))
    exact = step_path == "kernels" and variant == "plain"
    tol = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=0.1, atol=0.1)  # (bf16 over 3 layers)
    rounded = dict(rtol=8e-3, atol=1e-5) if exact else tol  # a bf16 result: one bf16 rounding
    state = random_state(model, batch)
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            got, new = decode_step(model, tokens[:, t:t + 1], state, full_output=False)
            want, expected = normal_step(twin, tokens[:, t:t + 1], state)
            assert got.dtype == new.att_shift.dtype == new.ffn_shift.dtype == torch.bfloat16
            torch.testing.assert_close(new.wkv, expected.wkv, **tol)
            torch.testing.assert_close(got.float(), want, **rounded)
            torch.testing.assert_close(new.att_shift.float(), expected.att_shift, **rounded)
            state = new
