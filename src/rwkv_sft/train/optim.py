"""AdamW with RWKV's parameter groups, the learning-rate schedule, and frozen parameters."""
from __future__ import annotations

import math
import re

import torch

from ..errors import UserError


def param_groups(model: torch.nn.Module, weight_decay: float, state_lr_scale: float | None = None) -> list[dict]:
    """Upstream groups (docs/rwkv7.md, "Optimisation"): att.w0 at 2x lr without decay; decay only on 2-D
    `.weight` matrices (emb, head, r/k/v/o, ffn key/value); everything else without decay.
    `state_lr_scale`: the learned states (`att.time_state`) in a group of their own at that
    multiple of the lr. Each group carries `lr_scale`, applied by `set_lr`."""
    decay, plain, double, state = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if state_lr_scale is not None and name.endswith("att.time_state"):
            state.append(p)
        elif name.endswith("att.w0"):
            double.append(p)
        elif p.dim() == 2 and name.endswith(".weight"):
            decay.append(p)
        else:
            plain.append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, lr_scale=1.0),
              dict(params=plain, weight_decay=0.0, lr_scale=1.0),
              dict(params=double, weight_decay=0.0, lr_scale=2.0),
              dict(params=state, weight_decay=0.0, lr_scale=state_lr_scale)]
    return [g for g in groups if g["params"]]


def make_optimizer(model, *, lr, weight_decay, betas, eps, state_lr=None) -> torch.optim.AdamW:
    """`state_lr`: the learned states' own peak lr (they follow the schedule scaled by state_lr / lr)."""
    groups = param_groups(model, weight_decay, None if state_lr is None else state_lr / lr)
    if not groups:
        raise UserError("every parameter is frozen: nothing to train (check `freeze`)")
    # fused: one pass over each tensor per step instead of a dozen (CPU and CUDA, fp32/bf16 weights)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state (moments, step counts) but keep this run's settings
    (weight decay, betas, eps, lr_scale): a resume may change them."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UserError(f"the checkpoint's optimizer state does not fit this run's trainable parameters ({e})") from None
    for group, mine in zip(optimizer.param_groups, settings):
        group.update(mine)


DEFAULT_WARMUP = 10  # steps, but at most a tenth of the run


def warmup_for(total: int, steps: int | None = None, ratio: float | None = None) -> tuple[int, str | None]:
    """The warmup of a run of `total` steps and a notice when it had to be shortened: `steps`, or
    `ratio` of the run, or by default DEFAULT_WARMUP steps but at most a tenth of the run. Warmup
    takes at most half the run, so that the schedule has room to decay to lr_final."""
    if steps is None:
        return (int(ratio * total) if ratio is not None else min(DEFAULT_WARMUP, total // 10)), None
    fit = total // 2
    if steps <= fit:
        return steps, None
    return fit, f"warmup_steps {steps} does not fit a run of {total} steps: warming up over {fit} (at most half the run)"


def lr_at(step: int, *, lr: float, lr_final: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then cosine / linear / constant from lr to lr_final:
    step `total - 1`, the last of the run, uses exactly lr_final (constant: lr). Needs
    warmup < total for that (warmup_for keeps it to half the run)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = total - 1 - warmup  # steps from the peak to the last one
    left = 1.0 - min(1.0, (step - warmup) / span) if span > 0 else 0.0  # 1 -> 0, exactly 0 at the end
    if schedule == "linear":
        return lr_final + (lr - lr_final) * left
    return lr_final + (lr - lr_final) * 0.5 * (1.0 - math.cos(math.pi * left))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def freeze(model: torch.nn.Module, patterns: list[str]) -> int:
    """Stop gradients for the parameters that `patterns` name: "emb", "head", "blocks.3",
    "blocks.0-5" (a range of layers, inclusive), or any parameter-name prefix ("blocks.2.att").
    Returns the number of frozen parameters (elements)."""
    frozen = 0
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        m = re.fullmatch(r"blocks\.(\d+)-(\d+)", pattern)
        prefixes = [f"blocks.{i}" for i in range(int(m[1]), int(m[2]) + 1)] if m else [pattern]
        hit = set()
        for name, p in model.named_parameters():
            for pre in prefixes:
                if name == pre or name.startswith(pre + "."):
                    if p.requires_grad:
                        frozen += p.numel()
                    p.requires_grad_(False)
                    hit.add(pre)
        if m and (int(m[1]) > int(m[2]) or len(hit) < len(prefixes)):  # a range reaching past the last block
            blocks = len({n.split(".")[1] for n in names if n.startswith("blocks.")})
            raise UserError(f"freeze: {pattern!r} is not a range of this model's blocks (it has blocks 0-{blocks - 1})")
        if not hit:
            raise UserError(f"freeze: {pattern!r} names no parameter (examples: emb, head, blocks.0, "
                            f"blocks.0-3; the model has {names[0]} ... {names[-1]})")
    return frozen
