"""Preference training: pair data rendered as SFT renders it, the forked forward against running the
two full sequences, each objective against its formula, the DPO reference, and runs of `train`."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import random_model

from rwkv_sft.adapters.lora import add_lora
from rwkv_sft.data import DataConfig
from rwkv_sft.data.cache import tokenize_bytes
from rwkv_sft.data.pairs import collate_pairs, prepare_pairs
from rwkv_sft.errors import UserError
from rwkv_sft.tokenizer import Tokenizer
from rwkv_sft.train import preference as pref

PAIRS = [
    {"prompt": "What is 2+2? ", "chosen": "4", "rejected": "five, I think"},
    {"context": "Say hi in French:", "chosen": " Bonjour", "rejected": " Hello there"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "London, obviously."}]},
    {"instruction": "Translate to German", "input": "cat", "chosen": "Katze", "rejected": "Hund"},
    {"prompt": "", "chosen": "x y", "rejected": "z"},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _sft_record(r, which):
    if "instruction" in r:
        return {"instruction": r["instruction"], "input": r["input"], "output": r[which]}
    prompt = r.get("prompt", r.get("context"))
    if isinstance(prompt, list):
        return {"messages": prompt + r[which]}
    return {"context": prompt, "completion": r[which]}


def test_pairs_are_rendered_and_scored_as_sft_renders_them(tmp_path, tok):
    pairs = prepare_pairs(DataConfig(_write(tmp_path / "p.jsonl", PAIRS)), tok, show_report=False).train
    for which, k in (("chosen", 1), ("rejected", 2)):
        sft = [_sft_record(r, which) for r in PAIRS]
        data = "".join(json.dumps(r) + "\n" for r in sft).encode()
        shard = tokenize_bytes("sft.jsonl", data, tok)
        for i, (start, ctx_len, stop) in enumerate(shard.index):
            context, *completions = pairs.parts(i)
            ids, scored = completions[k - 1]
            np.testing.assert_array_equal(np.concatenate([context, ids]), shard.ids[start:stop])
            # the scored tokens are SFT's loss tokens of the completion (end marker included)
            np.testing.assert_array_equal(scored, shard.flags[start + len(context):stop])
            assert scored[-1] and ids[-1] == 0  # the end marker is scored
            assert len(ids) == stop - start - ctx_len  # the fork is where SFT's completion starts


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "empty chosen"),
    ({"prompt": "a", "chosen": "b", "rejected": "  "}, "empty rejected"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical chosen and rejected"),
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "missing field 'prompt'"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "field 'chosen' is int"),
])
def test_bad_pairs_name_file_and_line_or_are_skipped_and_counted(tmp_path, tok, record, message):
    path = _write(tmp_path / "bad.jsonl", [PAIRS[0], record, PAIRS[1]])
    with pytest.raises(UserError, match=rf"bad.jsonl:2: {message}"):
        prepare_pairs(DataConfig(path), tok, show_report=False)
    data = prepare_pairs(DataConfig(path, skip_invalid=True), tok, show_report=False)
    assert len(data.train) == 2 and sum(data.report["skipped"].values()) == 1


def _model(seed=0, dtype=torch.float32, **kw):
    m = random_model(seed, n_layer=2, n_embd=64, head_size=64, vocab_size=65536).to(dtype)
    m.wkv_backend = kw.pop("backend", "reference")  # the fork is under test here, not the WKV backend
    for k, v in kw.items():
        setattr(m, k, v)
    return m


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tok):
    path = _write(tmp_path_factory.mktemp("pairs") / "p.jsonl", PAIRS)
    return collate_pairs(prepare_pairs(DataConfig(path), tok, show_report=False).train, range(len(PAIRS)))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_rel(a, b, tol):
    err = (a - b).abs().max().item()
    assert err <= tol * b.abs().max().item(), err


@pytest.mark.parametrize("setting", ["plain", "segments", "checkpointing", "state", "lora"])
def test_forked_logps_and_gradients_equal_running_both_full_sequences(batch, setting):
    model = _model(activation_checkpointing=setting == "checkpointing")
    if setting == "state":
        for p in model.enable_state_tuning():
            torch.nn.init.normal_(p, std=0.3)
    if setting == "lora":
        add_lora(model, rank=4)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:
                torch.nn.init.normal_(p.data, std=0.1)
    segment = 3 if setting == "segments" else None
    weights = torch.linspace(-1, 1, 2 * batch.num_pairs)  # each sequence its own weight: no cancellation
    logp, count = pref.sequence_logps(model, batch, segment_len=segment)
    (logp * weights).sum().backward()
    forked = _grads(model)
    model.zero_grad()
    logp2, count2 = pref.sequence_logps_unforked(model, batch)
    (logp2 * weights).sum().backward()
    unforked = _grads(model)
    assert torch.equal(count, count2)
    _assert_rel(logp, logp2, 1e-5)
    assert forked.keys() == unforked.keys() and len(forked) > 0
    for name in forked:
        _assert_rel(forked[name], unforked[name], 1e-5)


def _independent_logps(model, batch):
    """Each sequence alone, full logits, float64 log-softmax: nothing shared with the code under test."""
    tokens, targets, mask = batch.full_sequences()
    out = []
    for s in range(tokens.shape[0]):
        n = int(mask[s].nonzero().max()) + 1
        logits, _ = model(tokens[s:s + 1, :n])
        logprobs = torch.log_softmax(logits[0].double(), -1).gather(1, targets[s, :n, None])[:, 0]
        out.append((float(logprobs[mask[s, :n]].sum()), int(mask[s].sum())))
    return out


def _formula(objective, seqs, ref, beta, gamma):
    losses = []
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for b in range(len(seqs) // 2):
        (pw, nw), (pl, nl) = seqs[2 * b], seqs[2 * b + 1]
        if objective == "dpo":
            losses.append(-math.log(sig(beta * ((pw - ref[2 * b]) - (pl - ref[2 * b + 1])))))
        elif objective == "orpo":
            odds = lambda avg: math.exp(avg) / (1 - math.exp(avg))  # noqa: E731
            losses.append(-pw / nw - beta * math.log(sig(math.log(odds(pw / nw)) - math.log(odds(pl / nl)))))
        else:
            losses.append(-math.log(sig(beta * pw / nw - beta * pl / nl - gamma)))
    return losses


@pytest.mark.parametrize("objective, beta, gamma", [("dpo", 0.3, None), ("orpo", 0.7, None), ("simpo", 2.5, 0.4)])
def test_each_objective_matches_its_formula_from_per_sequence_logps(batch, objective, beta, gamma):
    model = _model(dtype=torch.float64, backend="reference")
    seqs = _independent_logps(model, batch)
    ref = [p - 0.5 * k for k, (p, _) in enumerate(seqs)]  # a reference that differs per sequence
    expected = _formula(objective, seqs, ref, beta, gamma)
    module = pref.PreferenceLoss(model, objective, beta, gamma)
    loss_sum, stats = module(*pref.as_inputs(batch)[:-1], torch.tensor(ref, dtype=torch.float64))
    assert abs(float(loss_sum) - sum(expected)) <= 1e-9 * sum(expected)
    assert abs(float(stats[0]) - sum(expected)) <= 1e-9 * sum(expected)
    logp, count = pref.sequence_logps(model, batch)
    losses, _, _ = pref.pair_losses(objective, logp, count, torch.tensor(ref, dtype=torch.float64), beta, gamma)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-9)


def test_lora_reference_is_the_model_with_adapters_disabled(batch):
    base = _model()
    model = copy.deepcopy(base)
    add_lora(model, rank=4)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p.data, std=0.1)
    for p in model.enable_state_tuning():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        expected = pref.sequence_logps(base, batch)[0]
        with pref.adapters_off(model):
            off = pref.sequence_logps(model, batch)[0]
        on = pref.sequence_logps(model, batch)[0]  # restored on exit
    torch.testing.assert_close(off, expected, rtol=1e-6, atol=1e-5)
    assert (on - expected).abs().max() > 1e-2  # the adapters do change the model
    module = pref.PreferenceLoss(model, "dpo", 0.1, None, reference="adapters")
    with torch.no_grad():
        _, stats = module(*pref.as_inputs(batch))
        logp = module.logps(batch)[0]
    chosen = 0.1 * (logp[0::2] - expected[0::2])
    torch.testing.assert_close(stats[1], chosen.sum().to(stats.dtype), rtol=1e-5, atol=1e-5)
