"""Segment-wise forward (`segment_len`): the same outputs and gradients as one whole call."""
from __future__ import annotations

import pytest
import torch

from conftest import random_model
from rwkv_sft.model.rwkv7 import RWKV7State

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
