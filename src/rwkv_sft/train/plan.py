"""The step plan: which global batches make each optimizer step, and how many steps a run takes.

Every process computes the same plan from the loader's global batch plan (deterministic in seed
and epoch): a step takes batches in plan order until they hold `step_tokens` loss tokens (or one
batch per process without it), so with `step_tokens` the steps do not depend on the number of
processes and a run resumed on another number continues alike. The loader knows each batch's loss
tokens before the epoch starts, so the count is exact: the announced total, the progress bar and
the schedule agree with the steps that run.
"""
from __future__ import annotations

import itertools

from ..errors import UserError


def epoch_limit(num_batches: int, epochs: float, epoch: int) -> int:
    """Batches of `epoch` that a run of `epochs` (maybe fractional) uses."""
    return num_batches if epoch + 1 <= epochs else int(num_batches * (epochs - epoch))


def step_plan(loader, epochs: float, start_epoch: int, start_batch: int, step_tokens: int | None, world_size: int):
    """The optimizer steps from a data position on, each a list of (epoch, index, rows) of the
    global batch plan. `epochs` may be fractional or inf; a step may span an epoch boundary, and
    the data may end inside a step (it runs with what it has)."""
    step, tokens = [], 0
    for epoch in itertools.count(start_epoch):
        if epoch >= epochs:
            break
        limit = epoch_limit(len(loader.plan(epoch)), epochs, epoch)
        for index in range(start_batch if epoch == start_epoch else 0, limit):
            rows = loader.plan(epoch)[index]
            step.append((epoch, index, rows))
            tokens += loader.loss_tokens(rows) if step_tokens else 0
            if (tokens >= step_tokens) if step_tokens else len(step) == world_size:
                yield step
                step, tokens = [], 0
    if step:
        yield step


def count_steps(loader, epochs: float, step_tokens: int | None) -> int:
    """Optimizer steps of a run over `epochs`."""
    return sum(1 for _ in step_plan(loader, epochs, 0, 0, step_tokens, loader.world_size))


def plan_steps(config, loader) -> int:
    """Total optimizer steps of the run; a plan without any step is a UserError."""
    if config.max_steps:
        return config.max_steps
    total = count_steps(loader, config.epochs, config.step_tokens)
    if total == 0:
        raise UserError(f"epochs={config.epochs:g} is less than one micro-batch ({len(loader.plan(0))} per epoch): "
                        f"no optimizer step to run; raise --epochs or give --max-steps")
    return total


def segment_lengths(loader, segment_len: int | None, batch_tokens: int, epoch: int = 0) -> dict[int, int]:
    """{segment length: number of batches} of the batches of `epoch` whose rows run in segments
    (model/segments.segment_len_for decides, from the shape of each sequence batch the forward
    runs: a pair batch's contexts and completions are two)."""
    from ..model.segments import segment_len_for
    found: dict[int, int] = {}
    for rows in loader.plan(epoch):
        for shape in loader.row_shapes(rows):
            S = segment_len_for(shape, segment_len, batch_tokens)
            if S is not None and S < shape[1]:  # (a row no longer than S runs whole)
                found[S] = found.get(S, 0) + 1
                break
    return found
