"""Guards: non-finite steps are skipped and counted, repeated ones stop the run; OOM advice."""
from __future__ import annotations

import pytest
import torch
from test_train_helpers import VOCAB, tiny_config, tiny_data

from rwkv_sft import RWKV7, RWKV7Config
from rwkv_sft.errors import UserError
from rwkv_sft.train import checkpoint as ckpt
from rwkv_sft.train import train


class NaNModel(RWKV7):
    """forward_hidden returns NaN on the calls listed in `bad` (1-based)."""

    def __init__(self, bad, **kw):
        torch.manual_seed(0)
        super().__init__(RWKV7Config(n_layer=2, n_embd=64, head_size=64, vocab_size=VOCAB))
        self.bad, self.calls = bad, 0

    def forward_hidden(self, tokens, state=None, resets=None):
        self.calls += 1
        hidden, state = super().forward_hidden(tokens, state, resets)
        if self.bad(self.calls):
            hidden = hidden * float("nan")
        return hidden, state


def test_one_non_finite_step_is_skipped_and_counted(tmp_path):
    model = NaNModel(lambda call: call == 3)
    r = train(tiny_config(tmp_path, max_steps=5, save_every=0), model=model, data=tiny_data())
    assert r.steps == 5 and r.bad_steps == 1
    assert all(torch.isfinite(p).all() for p in r.model.parameters())
    state = ckpt.load_checkpoint(r.checkpoint)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {4}  # five steps, one without an update
    assert state["metrics"]["bad_steps"] == 1


def test_repeated_non_finite_steps_stop_with_last_good_checkpoint(tmp_path):
    model = NaNModel(lambda call: call >= 3)
    with pytest.raises(UserError, match=r"not finite in 2 steps in a row.*step_000002"):
        train(tiny_config(tmp_path, max_steps=8, save_every=2, max_bad_steps=2), model=model, data=tiny_data())
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step_000002"]
    state = ckpt.load_checkpoint(saved[-1])
    assert all(torch.isfinite(t).all() for t in state["model"].values())


class OOMModel(RWKV7):
    def forward_hidden(self, tokens, state=None, resets=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")


def test_out_of_memory_names_the_settings_to_lower(tmp_path):
    model = OOMModel(RWKV7Config(n_layer=1, n_embd=64, vocab_size=VOCAB))
    with pytest.raises(UserError, match=r"out of memory.*batch_tokens.*activation_checkpointing.*precision"):
        train(tiny_config(tmp_path), model=model, data=tiny_data())
