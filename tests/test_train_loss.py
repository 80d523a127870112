"""The completion loss: chunked path vs full logits, token weighting across accumulation."""
from __future__ import annotations

import pytest
import torch
from conftest import random_model
from test_train_helpers import VOCAB, random_batch

from rwkv_sft.data import Batch
from rwkv_sft.train.step import accumulate_gradients
from rwkv_sft.train.loss import CompletionLoss, reference_loss_sum


def _model(seed=0):
    m = random_model(seed, n_layer=2, n_embd=64, head_size=64, vocab_size=VOCAB)
    m.wkv_backend = "reference"  # the loss path is under test here, not the WKV backend
    return m


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _assert_grads_close(a, b, tol=2e-6):
    """Equal up to fp32 rounding, relative to each gradient's scale."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] is not None and b[name] is not None, name
        err = (a[name] - b[name]).abs().max().item()
        assert err <= tol * (1 + b[name].abs().max().item()), (name, err)


@pytest.mark.parametrize("resets", [False, True])
def test_chunked_loss_equals_full_logits_masked_ce(resets):
    model, batch = _model(), random_batch(seed=1, resets=resets)
    loss = CompletionLoss(model, chunk_size=5)(batch.tokens, batch.targets, batch.loss_mask, batch.resets)
    loss.backward()
    fast = _grads(model)
    model.zero_grad()
    ref = reference_loss_sum(model, batch.tokens, batch.targets, batch.loss_mask, batch.resets)
    ref.backward()
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-5, atol=1e-4)
    _assert_grads_close(fast, _grads(model))


def test_the_loss_leaves_the_model_as_it_was():
    """The loss module calls the model and its head; it adds nothing to them (no attribute, no
    module, no parameter), so what a run builds around the model never changes the model."""
    model = _model()
    before = (dict(vars(model.head)), [n for n, _ in model.named_modules()], list(model.state_dict()))
    loss_module = CompletionLoss(model, chunk_size=4)
    batch = random_batch(seed=3)
    loss_module(batch.tokens, batch.targets, batch.loss_mask, batch.resets).backward()
    assert (dict(vars(model.head)), [n for n, _ in model.named_modules()], list(model.state_dict())) == before
    assert loss_module.head_loss.head is model.head  # the model's head itself, not a copy


def test_l2wrap_adds_upstream_gradient_on_loss_rows_only():
    model, batch = _model(), random_batch(seed=2)
    coef = 0.3  # large, so the extra gradient is visible
    CompletionLoss(model, chunk_size=4)(batch.tokens, batch.targets, batch.loss_mask, None, coef).backward()
    fast = _grads(model)
    model.zero_grad()
    # twin: upstream adds coef * max_logit at the argmax, i.e. the gradient of coef * max^2 / 2
    logits, _ = model(batch.tokens)
    rows = logits[batch.loss_mask]
    ref = reference_loss_sum(model, batch.tokens, batch.targets, batch.loss_mask)
    (ref + 0.5 * coef * (rows.max(-1).values ** 2).sum()).backward()
    _assert_grads_close(fast, _grads(model))


def _split(batch: Batch, sizes):
    out, start = [], 0
    for s in sizes:
        sl = slice(start, start + s)
        out.append(Batch(batch.tokens[sl], batch.targets[sl], batch.loss_mask[sl]))
        start += s
    return out


def test_accumulation_weights_every_token_equally():
    big = random_batch(B=5, T=9, seed=3, mask_fraction=0.5)
    big.loss_mask[0, :6] = True   # micro-batches with very different loss-token counts
    big.loss_mask[1:3] = False
    big.loss_mask[1, 4] = True
    parts = _split(big, [2, 2, 1])
    counts = [p.num_loss_tokens for p in parts]
    assert len(set(counts)) > 1
    model = _model()
    lm = CompletionLoss(model, chunk_size=3)
    accumulate_gradients(lm, [big], device="cpu", global_count=big.num_loss_tokens, l2wrap=True)
    one = _grads(model)
    model.zero_grad()
    accumulate_gradients(lm, parts, device="cpu", global_count=big.num_loss_tokens, l2wrap=True)
    _assert_grads_close(one, _grads(model))
    # and it is not the average of per-micro-batch means (what the test guards against)
    model.zero_grad()
    for p in parts:
        accumulate_gradients(lm, [p], device="cpu", global_count=p.num_loss_tokens * len(parts), l2wrap=False)
    means = _grads(model)
    assert not torch.allclose(one["head.weight"], means["head.weight"], atol=1e-6)


def test_all_masked_batch_gives_zero_loss_and_zero_grads():
    model = _model()
    batch = random_batch(seed=4)
    batch.loss_mask[:] = False
    loss = accumulate_gradients(CompletionLoss(model), [batch], device="cpu", global_count=0)
    assert loss == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_activation_checkpointing_gives_the_same_gradients():
    model, batch = _model(), random_batch(seed=5)
    lm = CompletionLoss(model, chunk_size=4)
    accumulate_gradients(lm, [batch], device="cpu", global_count=batch.num_loss_tokens)
    plain = _grads(model)
    model.zero_grad()
    model.activation_checkpointing = True
    accumulate_gradients(lm, [batch], device="cpu", global_count=batch.num_loss_tokens)
    _assert_grads_close(plain, _grads(model))


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_fp32_loss():
    model, batch = _model(), random_batch(seed=6)
    lm = CompletionLoss(model, chunk_size=4)
    fp32 = accumulate_gradients(lm, [batch], device="cpu", global_count=batch.num_loss_tokens)
    model.zero_grad()
    bf16 = accumulate_gradients(lm, [batch], device="cpu", global_count=batch.num_loss_tokens, precision="bf16")
    assert abs(bf16 - fp32) < 0.02 * abs(fp32)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
