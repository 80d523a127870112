"""The step plan: how many optimizer steps a run takes, counted by the rule the loop follows.

Process r of W takes the epoch's global batches r, r + W, ...; in round k every process runs its
k-th batch, and a step takes whole rounds until the global loss-token count reaches step_tokens
(or one round without step_tokens). The loader knows each batch's loss tokens before the epoch
starts, so the count is exact: the announced total, the progress bar and the schedule agree with
the steps that run.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError


def epoch_limit(num_batches: int, epochs: float, epoch: int) -> int:
    """Batches (per process) of `epoch` that a run of `epochs` (maybe fractional) uses."""
    return num_batches if epoch + 1 <= epochs else int(num_batches * (epochs - epoch))


def round_loss_tokens(loader, epoch: int) -> np.ndarray:
    """Loss tokens of each round of `epoch`, summed over every process."""
    per_batch = loader.batch_loss_tokens(epoch)
    rounds = np.zeros(loader.num_batches(epoch) * loader.world_size, dtype=np.int64)
    rounds[:len(per_batch)] = per_batch  # a process left short runs a zero-weight batch
    return rounds.reshape(-1, loader.world_size).sum(axis=1)


def count_steps(loader, epochs: float, step_tokens: int | None) -> int:
    """Optimizer steps of a run over `epochs` (a step may span an epoch boundary)."""
    steps, pending, open_step = 0, 0, False
    for epoch in range(math.ceil(epochs)):
        rounds = round_loss_tokens(loader, epoch)
        rounds = rounds[:epoch_limit(len(rounds), epochs, epoch)]
        if step_tokens is None:
            steps += len(rounds)
            continue
        for count in rounds.tolist():
            pending, open_step = pending + count, True
            if pending >= step_tokens:
                steps, pending, open_step = steps + 1, 0, False
    return steps + open_step  # the data ends inside a step: it runs with what it has


def plan_steps(config, loader) -> int:
    """Total optimizer steps of the run; a plan without any step is a UserError."""
    if config.max_steps:
        return config.max_steps
    total = count_steps(loader, config.epochs, config.step_tokens)
    if total == 0:
        raise UserError(f"epochs={config.epochs:g} is less than one micro-batch ({loader.num_batches(0)} per epoch "
                        f"and process): no optimizer step to run; raise --epochs or give --max-steps")
    return total
