"""A run's life: the step plan, the output directory (fresh, overwrite, resume, lock), resume with
changed settings, interruption, and one-line errors for settings that cannot work."""
from __future__ import annotations

import math
import re

import pytest
from test_train_helpers import metric_lines, tiny_config, tiny_data

from rwkv_sft.data import BatchLoader
from rwkv_sft.errors import UserError
from rwkv_sft.train import train
from rwkv_sft.train.plan import count_steps


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _announced_steps(text: str) -> int:
    return int(re.search(r"; (\d+) steps", text)[1])


def _slow_step_count(examples, *, world_size, step_tokens, epochs, batch_tokens=64):
    """Collate every batch of every process, as the loop does, and group rounds into steps."""
    loaders = [BatchLoader(examples, batch_tokens=batch_tokens, packing=True, seed=0, rank=r, world_size=world_size)
               for r in range(world_size)]
    steps, pending, open_step = 0, 0, False
    for epoch in range(math.ceil(epochs)):
        n = loaders[0].num_batches(epoch)
        limit = n if epoch + 1 <= epochs else int(n * (epochs - epoch))
        per_rank = [[b.num_loss_tokens for b in loader.epoch_batches(epoch)][:limit] for loader in loaders]
        for counts in zip(*per_rank):
            pending, open_step = pending + sum(counts), True
            if step_tokens is None or pending >= step_tokens:
                steps, pending, open_step = steps + 1, 0, False
    return steps + open_step


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("step_tokens, epochs", [(None, 1), (10, 1), (45, 1), (100, 2.5), (45, 0.5)])
def test_step_plan_matches_collated_batches(world_size, step_tokens, epochs):
    examples = tiny_data(40).train
    loader = BatchLoader(examples, batch_tokens=64, packing=True, seed=0, rank=0, world_size=world_size)
    assert count_steps(loader, epochs, step_tokens) == _slow_step_count(
        examples, world_size=world_size, step_tokens=step_tokens, epochs=epochs)


def test_step_tokens_run_announces_and_runs_the_plan_and_ends_at_lr_final(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=None, epochs=1, step_tokens=60, schedule="linear", lr=1e-3,
                         lr_final=1e-4, warmup_steps=0)
    r = train(config, data=tiny_data(24))
    announced = _announced_steps(capsys.readouterr().out)
    lines = [m for m in metric_lines(tmp_path) if m["kind"] == "train"]
    assert r.steps == announced == len(lines) > 1
    assert math.isclose(lines[-1]["lr"], 1e-4) and math.isclose(lines[0]["lr"], 1e-3)


def test_a_plan_without_steps_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no optimizer step"):
        train(tiny_config(tmp_path, max_steps=None, epochs=0.01), data=tiny_data())
    assert not (tmp_path / "model.pth").exists() and not (tmp_path / "checkpoints").exists()
