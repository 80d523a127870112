"""BatchLoader: contents against a slow twin, exactly-once across ranks, resume, packing equivalence."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkv_sft.data import BatchLoader, TokenizedExamples


def make_examples(n, seed=0, max_len=40, weights=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, max_len + 1))
        context = int(rng.integers(1, length))
        ids = rng.integers(1, 100, length)
        out.append((ids, np.arange(length) >= context))
    ex = TokenizedExamples.from_lists(out)
    if weights is not None:
        ex.weights = np.asarray(weights, dtype=float)
    return ex


def unpack(batch):
    """Slow twin: cut every row back into examples at the resets (or at its padding)."""
    found = []
    for b in range(batch.tokens.shape[0]):
        starts = batch.resets[b].nonzero().flatten().tolist() if batch.resets is not None else [0]
        found.append(starts)
    return found


def check_batch(ex, batch, budget, packing):
    assert batch.tokens.shape == batch.targets.shape == batch.loss_mask.shape
    B, T = batch.tokens.shape
    assert B * T <= budget or len(batch.example_ids) == 1
    k = 0
    for b, starts in enumerate(unpack(batch)):
        if not packing:
            starts = [0]
        t = 0
        for s in starts:
            assert s == t
            i = batch.example_ids[k]
            seq, flags = ex.tokens(i), ex.loss_positions(i)
            n = len(seq) - 1
            assert batch.tokens[b, t:t + n].tolist() == seq[:-1].tolist()
            assert batch.targets[b, t:t + n].tolist() == seq[1:].tolist()
            assert batch.loss_mask[b, t:t + n].tolist() == flags[1:].tolist()
            t += n
            k += 1
        assert not batch.loss_mask[b, t:].any()  # padding never carries loss
    assert k == len(batch.example_ids)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_across_ranks(packing, world_size):
    ex = make_examples(53, seed=world_size)
    budget = 120
    for epoch in range(3):
        loaders = [BatchLoader(ex, batch_tokens=budget, packing=packing, seed=7, rank=r, world_size=world_size)
                   for r in range(world_size)]
        counts = {ld.num_batches(epoch) for ld in loaders}
        assert len(counts) == 1  # every rank steps the same number of times
        seen = []
        for ld in loaders:
            batches = list(ld.epoch_batches(epoch))
            assert len(batches) == ld.num_batches(epoch)
            for batch in batches:
                if not batch.example_ids:  # zero weight
                    assert not batch.loss_mask.any() and batch.tokens.numel() > 0
                    continue
                check_batch(ex, batch, budget, packing)
                seen += batch.example_ids
        assert sorted(seen) == list(range(len(ex)))


def test_epochs_differ_and_are_deterministic():
    ex = make_examples(40)
    a = BatchLoader(ex, batch_tokens=100, seed=1)
    b = BatchLoader(ex, batch_tokens=100, seed=1)
    ids = lambda ld, e: [x.example_ids for x in ld.epoch_batches(e)]  # noqa: E731
    assert ids(a, 0) == ids(b, 0) and ids(a, 1) == ids(b, 1)
    assert ids(a, 0) != ids(a, 1)
    assert ids(a, 0) != ids(BatchLoader(ex, batch_tokens=100, seed=2), 0)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_remaining_batches(packing):
    ex = make_examples(30)
    ld = BatchLoader(ex, batch_tokens=80, packing=packing, rank=1, world_size=2)
    full = list(ld.epoch_batches(2))
    fresh = BatchLoader(ex, batch_tokens=80, packing=packing, rank=1, world_size=2)
    rest = list(fresh.epoch_batches(2, start=3))
    assert len(rest) == len(full) - 3
    for x, y in zip(full[3:], rest):
        assert x.example_ids == y.example_ids and torch.equal(x.tokens, y.tokens) and torch.equal(x.loss_mask, y.loss_mask)


def test_weights_apply_per_epoch():
    ex = make_examples(10, weights=[2.0] * 5 + [0.5] * 5)
    for epoch in range(4):
        ld = BatchLoader(ex, batch_tokens=200, world_size=2, rank=0)
        seen = [i for r in range(2) for b in BatchLoader(ex, batch_tokens=200, world_size=2, rank=r).epoch_batches(epoch)
                for i in b.example_ids]
        assert sorted(seen) == sorted(ex.epoch_indices(epoch, seed=0).tolist())
        assert all(seen.count(i) == 2 for i in range(5))
        assert ld.num_batches(epoch) >= 1


def test_long_example_alone_and_max_batch_size():
    ex = make_examples(20, max_len=30)
    for packing in (False, True):
        for b in BatchLoader(ex, batch_tokens=10, packing=packing).epoch_batches(0):
            assert b.tokens.numel() <= 10 or len(b.example_ids) == 1
        for b in BatchLoader(ex, batch_tokens=1000, max_batch_size=3, packing=packing).epoch_batches(0):
            assert b.tokens.shape[0] <= 3


def test_packing_fills_rows():
    ex = make_examples(200, max_len=20)
    ld = BatchLoader(ex, batch_tokens=19 * 8, packing=True)
    batches = list(ld.epoch_batches(0))
    used = sum(int(ex.lengths[list(b.example_ids)].sum() - len(b.example_ids)) for b in batches)
    total = sum(b.tokens.numel() for b in batches)
    assert used / total > 0.9


def test_packed_row_equals_examples_alone():
    """A packed row with resets gives each example the same loss as running it alone."""
    from rwkv_sft import RWKV7, RWKV7Config
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=2, n_embd=64, vocab_size=100, head_size=32)).eval()
    model.wkv_backend = "reference"
    with torch.no_grad():  # random weights make the test sensitive to state leaking between examples
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    rng = np.random.default_rng(3)
    ex = TokenizedExamples.from_lists([(rng.integers(1, 100, n), np.arange(n) >= n // 3) for n in [13, 3, 4, 5, 2, 6, 3, 7]])
    ld = BatchLoader(ex, batch_tokens=1000, packing=True, shuffle=False)
    (batch,) = list(ld.epoch_batches(0))
    assert batch.resets.sum(1).max() >= 3, batch.resets.sum(1)  # some row holds several examples
    with torch.no_grad():
        logits, _ = model(batch.tokens, resets=batch.resets)
        packed = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(batch.targets.shape)
        # Each example alone, one per row, padded at its end (a causal model ignores what follows).
        seqs = [torch.as_tensor(ex.tokens(i)) for i in batch.example_ids]
        alone, _ = model(torch.nn.utils.rnn.pad_sequence([q[:-1] for q in seqs], batch_first=True))
        ids = iter(range(len(seqs)))
        for b, starts in enumerate(unpack(batch)):
            for t in starts:
                k = next(ids)
                n = len(seqs[k]) - 1
                want = F.cross_entropy(alone[k, :n], seqs[k][1:], reduction="none")
                torch.testing.assert_close(packed[b, t:t + n], want, rtol=1e-4, atol=1e-4)
        # Without resets the state leaks from one example into the next: the losses change.
        leaky, _ = model(batch.tokens)
        leaky = F.cross_entropy(leaky.flatten(0, 1), batch.targets.flatten(), reduction="none").view(packed.shape)
        assert not torch.allclose(leaky[batch.loss_mask], packed[batch.loss_mask], atol=1e-3)


def test_empty_examples():
    ld = BatchLoader(TokenizedExamples.from_lists([]), batch_tokens=10, world_size=2, rank=1)
    assert ld.num_batches(0) == 0 and list(ld.epoch_batches(0)) == []
