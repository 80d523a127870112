"""Truncation: the vectorised function against a token-by-token twin, and end to end through files."""
import json
import os
import tempfile

import numpy as np
from hypothesis import given, settings, strategies as st

from rwkv_sft.data import BatchLoader, DataConfig, prepare_data, truncate
from test_data_support import ByteTokenizer


def truncate_slow(c, p, max_len, fraction):
    """Drop the oldest context token while too long and above the anchor; then cut the completion."""
    anchor = min(c, max(1, int(fraction * max_len)))
    while c + p > max_len and c > anchor:
        c -= 1
    while c + p > max_len:
        p -= 1
    return c, p


lengths = st.integers(1, 300)
fractions = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9])


@given(lengths, lengths, st.integers(2, 400), fractions)
def test_truncate_properties(c, p, max_len, fraction):
    kc, kp = truncate(c, p, max_len, fraction)
    assert (kc, kp) == truncate_slow(c, p, max_len, fraction)
    assert 0 < kc <= c and 0 < kp <= p and kc + kp == min(c + p, max_len)
    anchor = min(c, max(1, int(fraction * max_len)))
    assert kc >= anchor
    if p <= max_len - anchor:  # the completion fits beside the anchor: it stays whole
        assert kp == p
    if kp < p:
        assert kc == anchor


@given(st.lists(st.tuples(lengths, lengths), min_size=1, max_size=20), st.integers(2, 400), fractions)
def test_truncate_arrays_match_scalars(pairs, max_len, fraction):
    c, p = np.array(pairs).T
    kc, kp = truncate(c, p, max_len, fraction)
    assert [(int(a), int(b)) for a, b in zip(kc, kp)] == [truncate(a, b, max_len, fraction) for a, b in pairs]


text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=60)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(text, text.filter(bool)), min_size=1, max_size=8), st.integers(2, 80), fractions)
def test_truncation_end_to_end(pairs, max_len, fraction):
    """Tokens, mask count and masked targets of every prepared example match the definition."""
    tok = ByteTokenizer()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"context": c, "completion": p}) + "\n" for c, p in pairs)
        data = prepare_data(DataConfig([path], max_len=max_len, anchor_fraction=fraction), tok,
                            cache_dir=os.path.join(d, "cache"), show_progress=False)
    ex = data.train
    cut_context = cut_completion = 0
    full = []  # every example's length before truncation
    loader = BatchLoader(ex, batch_tokens=1, shuffle=False)  # one example per batch
    batches = {b.example_ids[0]: b for b in loader.epoch_batches(0)}
    for i, (c, p) in enumerate(pairs):
        ctx = tok.encode(c) or [0]
        comp = tok.encode(p) + [0]
        kc, kp = truncate_slow(len(ctx), len(comp), max_len, fraction)
        full.append(len(ctx) + len(comp))
        cut_context += kc < len(ctx)
        cut_completion += kp < len(comp)
        assert ex.tokens(i).tolist() == ctx[len(ctx) - kc:] + comp[:kp]
        assert ex.length(i) <= max_len
        assert ex.loss_positions(i).sum() == kp
        b = batches[i]
        assert b.num_loss_tokens == kp
        assert b.targets[b.loss_mask].tolist() == comp[:kp]
    assert data.report["truncated"]["context_trimmed"] == cut_context
    assert data.report["truncated"]["completion_cut"] == cut_completion
    assert data.report["truncated"]["empty_context"] == sum(not tok.encode(c) for c, _ in pairs)
    assert data.report["truncated"]["longer_than_max_len"] == sum(n > max_len for n in full)
    assert data.report["truncated"]["longest"] == max(full)
