"""AdamW groups (docs/rwkv7.md, "Optimisation"), the learning-rate schedule and frozen parameters."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import random_model
from test_train_helpers import VOCAB, tiny_config, tiny_data

from rwkv_sft.errors import UserError
from rwkv_sft.train import train
from rwkv_sft.train.optim import freeze, lr_at, make_optimizer, warmup_for
from test_train_helpers import metric_lines


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


def test_warmup_default_ratio_and_clamp():
    assert [warmup_for(t)[0] for t in (1, 6, 19, 20, 55, 100, 1000)] == [0, 0, 1, 2, 5, 10, 10]
    assert warmup_for(200, ratio=0.05) == (10, None) and warmup_for(7, ratio=0.5) == (3, None)
    assert warmup_for(6, steps=3) == (3, None)
    w, notice = warmup_for(6, steps=10)
    assert w == 3 and notice == "warmup_steps 10 does not fit a run of 6 steps: warming up over 3 (at most half the run)"
    assert warmup_for(1, steps=5)[0] == 0


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_the_last_step_runs_at_exactly_lr_final_whatever_the_warmup_and_length(schedule):
    for total in range(1, 40):
        for asked in (None, 0, 1, 3, 10, 100):
            warmup = warmup_for(total, steps=asked)[0]
            lrs = [lr_at(s, lr=1e-3, lr_final=1e-4, warmup=warmup, total=total, schedule=schedule)
                   for s in range(total)]
            assert lrs[-1] == 1e-4, (total, asked)
            top = max(range(total), key=lambda s: lrs[s])  # up to lr, then down to lr_final, never up again
            assert lrs[top] == (1e-3 if total > 1 else 1e-4) and top == max(0, warmup - 1), (total, asked)
            assert all(a >= b for a, b in zip(lrs[top:], lrs[top + 1:])), (total, asked)


def _train_lrs(out):
    return [m["lr"] for m in metric_lines(out) if m["kind"] == "train"]


def test_a_short_run_reaches_lr_and_ends_at_lr_final(tmp_path, capsys):
    train(tiny_config(tmp_path / "a", max_steps=6, warmup_steps=None, lr=1e-3), data=tiny_data())
    lrs = _train_lrs(tmp_path / "a")
    assert lrs[0] == 1e-3 and lrs[-1] == 1e-3 / 10 and len(lrs) == 6  # default warmup: none in 6 steps
    train(tiny_config(tmp_path / "b", max_steps=6, warmup_steps=10, lr=1e-3, lr_final=2e-4), data=tiny_data())
    assert "rwkv-sft train: warmup_steps 10 does not fit a run of 6 steps: warming up over 3" in capsys.readouterr().out
    lrs = _train_lrs(tmp_path / "b")
    assert [round(x, 12) for x in lrs[:3]] == [round(1e-3 * k / 3, 12) for k in (1, 2, 3)] and lrs[-1] == 2e-4
    train(tiny_config(tmp_path / "c", max_steps=6, warmup_steps=None, schedule="constant"), data=tiny_data())
    assert _train_lrs(tmp_path / "c") == [1e-3] * 6  # constant: lr throughout, no lr_final
    with pytest.raises(UserError, match="lr_final applies to cosine and linear only"):
        tiny_config(tmp_path / "d", schedule="constant", lr_final=1e-4).validate()
    with pytest.raises(UserError, match="not both"):
        tiny_config(tmp_path / "d", warmup_steps=2, warmup_ratio=0.1).validate()


@pytest.mark.parametrize("longer", [dict(max_steps=9), dict(max_steps=None, epochs=2)])
def test_a_resume_with_another_length_still_ends_at_lr_final(tmp_path, longer):
    settings = dict(warmup_steps=None, warmup_ratio=0.3, lr=1e-3, lr_final=5e-5)
    train(tiny_config(tmp_path, max_steps=4, **settings), data=tiny_data())
    assert _train_lrs(tmp_path)[-1] == 5e-5
    r = train(tiny_config(tmp_path, resume="auto", **{**settings, "max_steps": None, **longer}), data=tiny_data())
    lrs = _train_lrs(tmp_path)
    assert len(lrs) == r.steps > 4 and lrs[-1] == 5e-5


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
