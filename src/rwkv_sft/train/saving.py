"""A run's checkpoints and final files: where the run is (Progress), what a checkpoint of it holds,
the metrics log cut back to a resumed checkpoint, and the export at the end. (The files
themselves: train/checkpoint.py; whole or sharded: train/parallel.py.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import training as peft_run
from ..utils import atomic_write
from . import checkpoint as ckpt
from . import parallel


@dataclass
class Progress:
    """Where a run is: what its checkpoints save and a resume restores, and this session's counts."""
    step: int = 0                  # optimizer steps done (including skipped non-finite ones)
    epoch: int = 0                 # the data position (global): the next step starts at this batch
    batch: int = 0
    history: list = field(default_factory=list)   # {"step", "loss", "lr", ...} of every good step
    bad_steps: int = 0             # steps skipped because the loss or a gradient was not finite
    tokens_before: int | None = 0  # positions trained before this session (None: not in the checkpoint)
    tokens: int = 0                # positions processed this session (B*T incl. padding, all processes)
    loss_tokens: int = 0           # completion tokens trained on this session (all processes)
    last_saved: Path | None = None  # the newest complete checkpoint
    outputs: dict = field(default_factory=dict)   # a PEFT run's adapter files, written with its last checkpoint

    @classmethod
    def resumed(cls, state: dict | None, checkpoint: Path | None) -> "Progress":
        if state is None:
            return cls(last_saved=checkpoint)
        return cls(step=state["scheduler"]["step"], epoch=state["data"]["epoch"], batch=state["data"]["batch"],
                   history=list(state["metrics"]["history"]), bad_steps=state["metrics"].get("bad_steps", 0),
                   tokens_before=state["metrics"].get("tokens"), last_saved=checkpoint)


def save(run) -> Path:
    """Checkpoint `run` (train/run.py) at its progress; a PEFT run also writes its adapter files."""
    p, d = run.progress, run.d
    payload = {
        "version": 1, "step": p.step, "scheduler": {"step": p.step, "total_steps": run.total_steps, "warmup": run.warmup},
        "rng": ckpt.rng_state(), "data": {"epoch": p.epoch, "batch": p.batch, "fingerprint": run.fingerprint},
        "config": run.config.to_dict(),
        "metrics": {"history": p.history, "bad_steps": p.bad_steps, "tokens": p.tokens_before + p.tokens},
    }
    if run.peft is not None:  # only what trains; the frozen base is the run's --model
        payload.update(peft_run.checkpoint_entries(run.model, run.peft, run.base))
        payload["model"] = parallel.whole_tensors(payload["model"])  # an fsdp run's shards, gathered (small)
        if d.is_main:
            p.outputs.update(peft_run.write_outputs(run.out, payload["model"], run.peft, run.base))
    p.last_saved = parallel.save_checkpoint(run.par, d, run.out / "checkpoints", p.step, payload, run.config.keep_last,
                                            run.model, run.optimizer)
    return p.last_saved


def export(run) -> dict[str, Path]:
    """The finished run's model files (every process calls): kind -> file on the main process."""
    d, config = run.d, run.config
    exports = {}
    weights = parallel.full_state_dict(run.par, d, run.model) if config.export and run.peft is None else None
    if d.is_main and run.peft is not None:
        exports.update(run.progress.outputs)  # written with the last checkpoint
    elif d.is_main:
        from ..weights import write_state_dict
        for kind in config.export:
            exports[kind] = run.out / f"model.{kind}"
            write_state_dict(weights, exports[kind], run.model.config)
    del weights
    return exports


def trim_metrics(path: Path, step: int) -> int:
    """On resume, drop the log lines of steps after the checkpoint (they will be redone). Returns
    the cumulative `tokens` of the last train line kept (for checkpoints that do not hold it)."""
    if not path.is_file():
        return 0
    keep, tokens = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record.get("step", 0) > step:
                continue
            if record.get("kind") == "train" and isinstance(record.get("tokens"), int):
                tokens = record["tokens"]
        except (ValueError, AttributeError):
            pass
        keep.append(line)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
    return tokens
