"""Segment-wise forward (`segment_len`): the same outputs and gradients as one whole call."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_model
from test_train_helpers import VOCAB, random_batch, tiny_config

from rwkv_sft.data import TokenizedExamples
from rwkv_sft.infer.generate import greedy_batch, prefill
from rwkv_sft.model.rwkv7 import RWKV7State
from rwkv_sft.model.segments import segment_len_for
from rwkv_sft.train import train
from rwkv_sft.train.step import accumulate_gradients
from rwkv_sft.train.loss import CompletionLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    return random_model(seed=11, scale=0.2, n_layer=2, n_embd=32, head_size=16, vocab_size=97, **kw).double()


def _state(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    s = model.zero_state(B, dtype=torch.float64)
    return RWKV7State(*(torch.randn(t.shape, generator=g, dtype=t.dtype).mul_(0.5).requires_grad_()
                        for t in (s.att_shift, s.wkv, s.ffn_shift)))


def _run(model, tokens, resets, segment_len, seed=0, rows=None):
    """Forward + backward of a loss that touches every output: logits and the final state."""
    state = _state(model, tokens.shape[0], seed)
    model.zero_grad(set_to_none=True)
    hidden, out = model.forward_hidden(tokens, state, resets=resets, segment_len=segment_len, rows=rows)
    hidden = model.head(hidden)  # so that every parameter has a gradient
    g = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (hidden, out.att_shift, out.wkv, out.ffn_shift)]
    loss = sum((t * w).sum() for t, w in zip((hidden, out.att_shift, out.wkv, out.ffn_shift), weights))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads.update({f"state.{k}": t.grad.clone() for k, t in zip(("att_shift", "wkv", "ffn_shift"),
                                                              (state.att_shift, state.wkv, state.ffn_shift))})
    return hidden.detach(), out.detach(), grads


def _assert_same(a, b):
    (ha, sa, ga), (hb, sb, gb) = a, b
    torch.testing.assert_close(ha, hb, rtol=1e-9, atol=1e-10)
    for name in ("att_shift", "wkv", "ffn_shift"):
        torch.testing.assert_close(getattr(sa, name), getattr(sb, name), rtol=1e-9, atol=1e-10)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")
        assert ga[name].abs().sum() > 0, f"{name}: no gradient reached it"


def _tokens_and_resets(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 97, (B, T), generator=g)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, [t % T for t in (0, 4, 5, T - 2)]] = True   # at, next to and inside segment boundaries
    resets[1, [3 % T, 8 % T]] = True
    return tokens, resets


@pytest.mark.parametrize("T,S", [(13, 4), (7, 1), (5, 9), (16, 8)])
def test_gradients_equal_whole_sequence(T, S):
    """Every parameter's and the incoming state's gradient, at T not a multiple of S, S = 1 and S > T,
    with packed-example resets inside segments and on their first token."""
    model = _model()
    tokens, resets = _tokens_and_resets(2, T)
    _assert_same(_run(model, tokens, resets, S), _run(model, tokens, resets, None))


def test_gradients_equal_without_resets_and_deep_embed():
    model = random_model(seed=3, scale=0.2, n_layer=3, n_embd=32, head_size=16, vocab_size=97, deep_embed=True,
                         deep_embed_dim=4).double()
    tokens, _ = _tokens_and_resets(2, 11)
    _assert_same(_run(model, tokens, None, 3), _run(model, tokens, None, None))


def test_rows_are_the_masked_hidden_rows():
    """rows=mask returns hidden[mask] in its row-major order, segment by segment, with its gradients."""
    model = _model()
    tokens, resets = _tokens_and_resets(3, 14, seed=2)
    rows = torch.rand(3, 14, generator=torch.Generator().manual_seed(5)) < 0.4
    w = torch.randn(int(rows.sum()), 97, dtype=torch.float64)

    def grads_of(hidden):
        model.zero_grad(set_to_none=True)
        (model.head(hidden) * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    full, _ = model.forward_hidden(tokens, _state(model, 3, 0), resets=resets)
    ref = grads_of(full[rows])
    picked, _ = model.forward_hidden(tokens, _state(model, 3, 0), resets=resets, segment_len=4, rows=rows)
    torch.testing.assert_close(picked, full[rows].detach(), rtol=1e-9, atol=1e-10)
    got = grads_of(picked)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_activation_checkpointing_inside_segments():
    model = _model()
    tokens, resets = _tokens_and_resets(2, 10)
    whole = _run(model, tokens, resets, None)
    model.activation_checkpointing = True
    _assert_same(_run(model, tokens, resets, 3), whole)


def test_each_segment_is_recomputed_in_the_backward():
    """The activations are not kept: every segment's blocks run again during the backward."""
    model = _model()
    calls = []
    model.blocks[1].register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    tokens, resets = _tokens_and_resets(2, 10)
    hidden, _ = model.forward_hidden(tokens, resets=resets, segment_len=4)
    assert len(calls) == 3
    hidden.sum().backward()
    assert len(calls) == 6
    with torch.no_grad():  # nothing to recompute without autograd
        calls.clear()
        model.forward_hidden(tokens, resets=resets, segment_len=4)
        assert len(calls) == 3


def test_logits_and_last_row():
    model = _model()
    tokens, resets = _tokens_and_resets(2, 9)
    with torch.no_grad():
        whole, s_whole = model(tokens, resets=resets)
        seg, s_seg = model(tokens, resets=resets, segment_len=2)
        last, s_last = model(tokens, resets=resets, full_output=False, segment_len=2)
    torch.testing.assert_close(seg, whole, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(last, whole[:, -1], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s_last.wkv, s_whole.wkv, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s_seg.ffn_shift, s_whole.ffn_shift, rtol=1e-9, atol=1e-10)


def test_bad_segment_len():
    model = _model()
    with pytest.raises(ValueError, match="segment_len"):
        model.forward_hidden(torch.zeros(1, 4, dtype=torch.long), segment_len=0)


# -- training, evaluation and generation with segments ----------------------------------------------

def _fp32_model(seed=0):
    return random_model(seed, n_layer=2, n_embd=64, head_size=64, vocab_size=VOCAB)


def _close(a, b, tol=2e-5):
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), err


@pytest.mark.parametrize("segment_len,batch_tokens,precision", [(3, None, "fp32"), (None, 8, "fp32"), (4, None, "bf16")])
def test_training_step_loss_and_gradients_equal_unsegmented(segment_len, batch_tokens, precision):
    """A step's loss and gradients with segments (fixed, and automatic when rows exceed batch_tokens),
    also under bf16 autocast (the recomputation runs under the same autocast as the forward)."""
    batch = random_batch(B=2, T=11, seed=1, mask_fraction=0.5, resets=True)
    batch.resets[0, 3] = batch.resets[1, 6] = True   # on a segment's first token
    results = []
    for S, bt in [(segment_len, batch_tokens), (0, None)]:
        model = _fp32_model()
        model.wkv_backend = "reference"  # the loss path is under test here, not the WKV backend
        lm = CompletionLoss(model, chunk_size=4, segment_len=S, batch_tokens=bt)
        loss = accumulate_gradients(lm, [batch], device="cpu", global_count=batch.num_loss_tokens, l2wrap=True,
                                    precision=precision)
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    tol = 1e-6 if precision == "fp32" else 1e-2  # bf16: segments change where rounding happens
    assert loss == pytest.approx(ref_loss, rel=tol)
    for name in ref_grads:
        _close(grads[name], ref_grads[name], tol=2e-5 if precision == "fp32" else 5e-2)


def test_segment_len_for():
    assert segment_len_for((2, 100), 7, 64) == 7
    assert segment_len_for((2, 100), 0, 64) is None          # never split
    assert segment_len_for((1, 100), None, 64) == 64          # automatic: a row above the budget
    assert segment_len_for((4, 16), None, 64) is None         # a batch within it is not split
    assert segment_len_for((1, 100), None, None) is None


def _long_examples(n=4, length=70, completion=3, seed=0):
    """Long contexts, short completions at the end: the loss rows sit in the last segment only."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        L = length + 7 * k
        rows.append((rng.integers(1, VOCAB, L), np.arange(L) >= L - completion))
    return SimpleNamespace(train=TokenizedExamples.from_lists(rows), eval=None, report={})


def test_long_example_training_run_equals_unsegmented(tmp_path):
    """End to end: examples 4x longer than batch_tokens train in segments (automatic) to the same
    weights as with whole rows."""
    runs = {}
    for name, S in [("auto", None), ("whole", 0)]:
        config = tiny_config(tmp_path / name, max_steps=3, batch_tokens=20, segment_len=S, packing=True)
        runs[name] = train(config, data=_long_examples())
    assert runs["auto"].loss_tokens == runs["whole"].loss_tokens == 9
    for k, v in runs["whole"].model.state_dict().items():
        _close(runs["auto"].model.state_dict()[k], v, tol=1e-4)
    assert runs["auto"].train_loss == pytest.approx(runs["whole"].train_loss, rel=1e-5)


def test_prefill_and_greedy_in_segments_equal_whole():
    model = _fp32_model(seed=2)
    prompts = [list(range(1, 12)), list(range(40, 51)), list(range(7, 10))]
    with torch.inference_mode():
        whole, s_whole = prefill(model, prompts[:2], segment_len=10**6)
        seg, s_seg = prefill(model, prompts[:2], segment_len=3)
    torch.testing.assert_close(seg, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_seg.wkv, s_whole.wkv, rtol=1e-5, atol=1e-5)
    outputs = {}
    for S in (2, 10**6):
        got = [[] for _ in prompts]
        greedy_batch(model, prompts, 5, lambda p, t: got[p].append(t) or True, segment_len=S)
        outputs[S] = got
    assert outputs[2] == outputs[10**6] and all(len(g) == 5 for g in outputs[2])


def test_lora_gradients_equal_unsegmented():
    """LoRA layers inside segments: the same adapter gradients as whole rows."""
    from rwkv_sft.adapters import DEFAULT_TARGETS, add_lora, freeze_base
    batch = random_batch(B=2, T=9, seed=3, mask_fraction=0.5, resets=True)
    grads = []
    for S in (2, 0):
        model = _fp32_model(seed=4)
        add_lora(model, DEFAULT_TARGETS, 4, 8.0, 0.0, "lora")
        freeze_base(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        accumulate_gradients(CompletionLoss(model, segment_len=S), [batch], device="cpu",
                             global_count=batch.num_loss_tokens)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        _close(grads[0][name], grads[1][name])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_backend_that_checks_itself_at_first_use(monkeypatch, precision):
    """The CUDA kernel checks itself at its first call, which comes from inside the first segment's
    checkpointed forward (under bf16 autocast in a bf16 run): the step must train exactly as without
    that check (on a GPU, the check's own autograd broke the checkpoint's recomputation, and the
    autocast reached its reference and disabled a correct kernel)."""
    import rwkv_sft.ops as ops
    import rwkv_sft.ops.wkv7_cuda as cuda_mod
    from test_wkv7_gpu import _autocast_proof_kernel
    monkeypatch.setattr(cuda_mod, "_extension", lambda device: None)
    monkeypatch.setattr(cuda_mod, "wkv7_cuda", _autocast_proof_kernel)
    resolve, checked = ops.resolve_backend, []

    def resolve_with_self_check(backend, device, *args, **kwargs):
        if not checked:
            cuda_mod._self_check(torch.device("cpu"))
            checked.append(torch.is_autocast_enabled("cpu"))
        return resolve(backend, device, *args, **kwargs)

    batch = random_batch(B=2, T=11, seed=1, mask_fraction=0.5, resets=True)
    results = []
    for patched in (True, False):
        if patched:
            monkeypatch.setattr(ops, "resolve_backend", resolve_with_self_check)
        model = _fp32_model()
        model.activation_checkpointing = True
        lm = CompletionLoss(model, chunk_size=4, segment_len=4)
        loss = accumulate_gradients(lm, [batch], device="cpu", global_count=batch.num_loss_tokens, precision=precision)
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
        monkeypatch.setattr(ops, "resolve_backend", resolve)
    assert checked == [precision == "bf16"]  # it ran, once, under the training's autocast if any
    (loss, grads), (ref_loss, ref_grads) = results
    assert loss == ref_loss
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
