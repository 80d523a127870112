"""AdamW groups (DESIGN.md §5.4), the learning-rate schedule and frozen parameters."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import random_model
from test_train_helpers import VOCAB, tiny_config, tiny_data

from rwkv_sft.errors import UserError
from rwkv_sft.train import train
from rwkv_sft.train.optim import freeze, lr_at, make_optimizer


def _model():
    return random_model(0, n_layer=2, n_embd=64, head_size=64, vocab_size=VOCAB)


def test_parameter_groups_follow_upstream():
    model = _model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        if name.endswith("att.w0"):
            assert (g["lr_scale"], g["weight_decay"]) == (2.0, 0.0), name
        elif name in ("emb.weight", "head.weight") or any(
                name.endswith(f"{m}.weight") for m in ("receptance", "key", "value", "output")):
            assert (g["lr_scale"], g["weight_decay"]) == (1.0, 0.1), name
        else:  # layer norms, token-shift mixes, LoRA factors, r_k, ...
            assert (g["lr_scale"], g["weight_decay"]) == (1.0, 0.0), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warmup_and_end(schedule):
    kw = dict(lr=1.0, lr_final=0.1, warmup=4, total=21, schedule=schedule)  # steps 0..20
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    end = lr_at(20, **kw)
    assert math.isclose(end, 1.0 if schedule == "constant" else 0.1)
    mid = lr_at(12, **kw)
    expected = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 0.55, "constant": 1.0}
    assert math.isclose(mid, expected[schedule])


def test_freeze_patterns():
    model = _model()
    n = freeze(model, ["emb", "blocks.1-1", "blocks.0.att.r_k"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "emb.weight" in frozen and "blocks.0.att.r_k" in frozen
    assert all(name.startswith("blocks.1.") for name in frozen - {"emb.weight", "blocks.0.att.r_k"})
    assert not any(name.startswith("blocks.0.ffn") for name in frozen) and "head.weight" not in frozen
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in frozen)
    with pytest.raises(UserError, match="names no parameter"):
        freeze(model, ["blocks.7"])


def test_frozen_parameters_do_not_move_in_training(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = train(tiny_config(tmp_path, max_steps=2, freeze=["emb", "blocks.0"]), model=model, data=tiny_data())
    after = r.model.state_dict()
    for k in before:
        moved = not torch.equal(before[k], after[k])
        assert moved == (not (k == "emb.weight" or k.startswith("blocks.0."))), k
