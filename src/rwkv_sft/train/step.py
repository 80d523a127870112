"""One optimizer step: micro-batches (per process) until the global batch holds `step_tokens` loss
tokens (or one micro-batch per process). Their loss-token count is summed over processes *before*
any backward, so every token of the step weighs the same: loss = sum of token losses / count.

take_step: this process's micro-batches of the planned step -> the objective's forward/backward
-> gradient clipping -> the update, unless the loss or a gradient was not finite.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..precision import autocast
from . import distributed, parallel
from .loss import L2WRAP
from .optim import lr_at, set_lr

OOM_GRACE_STEPS = 3  # an out-of-memory error in the first steps is a setting to lower, not a bug


def accumulate_gradients(loss_module, batches, *, device, global_count: int, world_size: int = 1,
                         wrapped=None, precision: str = "fp32", l2wrap: bool = True) -> float:
    """Forward/backward every micro-batch; gradients end as d(sum of token losses / global_count).

    `wrapped`: the loss module under DDP or FSDP, which average gradients over processes, hence
    the factor world_size. Returns this process's sum of token losses.
    """
    scale = world_size / max(1, global_count)
    coef = L2WRAP * world_size / global_count if l2wrap and global_count else 0.0
    runner = wrapped if wrapped is not None else loss_module
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        b = batch.to(device)
        with parallel.micro_batch(wrapped, i == len(batches) - 1):
            with autocast(device, precision):
                loss_sum = runner(b.tokens, b.targets, b.loss_mask, b.resets, coef)
            (loss_sum * scale).backward()
        total += loss_sum.detach().double()
    return float(total)


def my_batches(loader, step, d: distributed.Dist):
    """This process's micro-batches of a step: every world_size-th; zero-weight ones where a
    process would have fewer than the others (the collectives need the same count)."""
    mine = [loader.collate(rows) for _, _, rows in step[d.rank::d.world_size]]
    return mine + [loader.zero_weight(step[0][2])] * (-(-len(step) // d.world_size) - len(mine))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


@contextlib.contextmanager
def oom_advice(early: bool, step: int, config, precision: str):
    """Out of memory in the first steps: say which setting to lower instead of a traceback."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not early or not _is_oom(e):
            raise
        raise UserError(
            f"out of memory in training step {step + 1} (batch_tokens={config.batch_tokens}, precision={precision}, "
            f"activation_checkpointing={config.activation_checkpointing}): lower batch_tokens (--batch-tokens), turn "
            f"on activation_checkpointing (--activation-checkpointing) or use --precision bf16") from None


@dataclass
class StepResult:
    loss: float          # the step's mean loss (all processes)
    lr: float
    grad_norm: float
    count: int           # loss tokens of the global batch (0: nothing to learn, no update)
    positions: int       # positions of the global batch (B*T incl. padding, all processes)
    watched: dict        # what else users watch (a preference run's rewards)
    finite: bool         # the loss and the gradient norm were finite (else the update was skipped)

    @property
    def updated(self) -> bool:
        return bool(self.count) and self.finite


def take_step(run, planned, step: int, early: bool) -> StepResult:
    """Optimizer step `step` (0-based) of `run` (train/run.py) over the `planned` micro-batches of
    every process; `early`: an out-of-memory error becomes advice (oom_advice)."""
    loader, d = run.loader, run.d
    batches = my_batches(loader, planned, d)
    count = sum(loader.loss_tokens(rows) for _, _, rows in planned)
    positions = sum(loader.positions_of(rows) for _, _, rows in planned)
    set_lr(run.optimizer, lr := lr_at(step, **run.schedule))
    with oom_advice(early, step, run.config, run.precision):
        loss, watched = run.objective.step(run.loss_module, batches, planned, count, d=d, wrapped=run.par.module)
        grad_norm = parallel.clip_grad_norm(run.params, run.config.grad_clip or math.inf)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if count and finite:
            run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, lr, grad_norm, count, positions, watched, finite)
