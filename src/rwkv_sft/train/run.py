"""Building a run: from its settings to a model that trains, its objective, its wrapping, its
optimizer, its batches and its schedule, restored from a checkpoint when it resumes.

build_run's stages follow what each needs: the run folder decides fresh or resume; the data and
the model are checked against the checkpoint; the objective takes its reference from the starting
model before the checkpoint's weights go in; the wrapping (which replaces the parameters with
shards) comes before the optimizer, and the optimizer before its saved state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import quant
from ..adapters import training as peft_run
from ..data.prepare import check_vocab
from ..errors import UserError
from ..model import RWKV7, RWKV7Config
from ..ops import check_backend
from ..precision import resolve_precision
from ..weights import load_model
from . import checkpoint as ckpt
from . import distributed, parallel, rundir
from .config import TrainConfig
from .objective import make_objective
from .optim import freeze, make_optimizer, warmup_for
from .plan import plan_steps, step_plan
from .plan import segment_lengths as plan_segments
from .saving import Progress


@dataclass
class Run:
    config: TrainConfig
    d: distributed.Dist
    precision: str                 # resolved: bf16 | fp32
    out: Path
    resume_from: Path | None       # the checkpoint this run continues
    state: dict | None             # its contents
    data: object                   # PreparedData (or PreparedPairs)
    fingerprint: str               # of the training examples (a resume must see the same)
    model: RWKV7
    peft: object | None            # adapter settings; None: full fine-tuning
    base: object                   # what peft_run.prepare returned (the adapter's base)
    objective: object              # objective.Completion or preference.Preference
    loss_module: torch.nn.Module
    par: parallel.Parallel
    optimizer: torch.optim.Optimizer
    params: list                   # the trained parameters (clipped together)
    loader: object
    total_steps: int
    warmup: int
    warmup_notice: str | None
    progress: Progress
    finished: bool = False         # a resume of a run that has nothing left to do

    @property
    def device(self) -> torch.device:
        return self.d.device

    @property
    def schedule(self) -> dict:
        c = self.config
        lr_final = c.lr / 10 if c.lr_final is None else c.lr_final
        return dict(lr=c.lr, lr_final=lr_final, warmup=self.warmup, total=self.total_steps, schedule=c.schedule)

    def step_plan(self):
        """The steps still to run: each a list of (epoch, batch, rows) micro-batches of every process."""
        epochs = math.inf if self.config.max_steps else self.config.epochs
        return step_plan(self.loader, epochs, self.progress.epoch, self.progress.batch, self.config.step_tokens,
                         self.d.world_size)


def build_model(config: TrainConfig) -> RWKV7:
    if config.model:  # in the file's dtype, memory-mapped: peft_run.compact decides what becomes fp32
        quantize = config.base_dtype if config.base_dtype in peft_run.QUANTIZED else None  # at load: peak near its size
        return load_model(config.model, quantize=quantize)
    torch.manual_seed(config.seed)
    try:
        return RWKV7(RWKV7Config(**config.model_config))  # vocab_size defaults to the World 65536
    except (TypeError, ValueError) as e:
        raise UserError(f"model_config: {e}") from None


def _load_data(config: TrainConfig, d, data, tokenizer):
    if data is None and config.preference:
        from ..data.pairs import prepare_pairs
        data = prepare_pairs(config.data, tokenizer, show_report=d.is_main)
    elif data is None:
        from ..data import prepare_data
        data = prepare_data(config.data, tokenizer=tokenizer, show_progress=d.is_main and config.progress,
                            show_report=d.is_main)  # --no-progress hides bars, never the data report
    if len(data.train) == 0:
        raise UserError(f"{', '.join(config.data.train_files)}: no training examples")
    return data


def _restore_weights(model, state, peft, base, resume_from) -> None:
    """A whole checkpoint's weights into the unwrapped model (a sharded one loads after wrapping)."""
    if state is None or state.get("sharded"):
        return
    try:
        peft_run.restore(model, state, peft, base, resume_from)
    except RuntimeError as e:  # shapes that differ: a one-line message, not torch's list
        lines = str(e).splitlines()
        raise UserError(f"{resume_from}: the checkpoint's model does not fit this run's model "
                        f"({lines[1].strip() if len(lines) > 1 else e})") from None


def build_run(config: TrainConfig, d: distributed.Dist, model=None, data=None, tokenizer=None) -> Run:
    """Everything a run needs before its first step (`model` / `data` / `tokenizer`: the caller's)."""
    precision = resolve_precision(config.precision, d.device)
    check_backend(config.wkv_backend, d.device)
    out = Path(config.out_dir)
    resume_from = rundir.start(config, out, d.is_main)  # fresh, overwrite or resume; never two runs mixed
    state = ckpt.load_checkpoint(resume_from) if resume_from else None
    if state is not None:
        rundir.check_resume(state["config"], config, resume_from)
    data = _load_data(config, d, data, tokenizer)
    fingerprint = rundir.data_fingerprint(data.train)
    if state is not None:
        rundir.check_resume_data(state["data"].get("fingerprint"), fingerprint, resume_from)
    model = model if model is not None else build_model(config)
    check_vocab(data, model.config.vocab_size)
    peft = peft_run.settings_from(config)
    base = peft_run.prepare(model, peft, seed=config.seed, initialize=state is None)
    freeze(model, config.freeze)
    # offload: the model stays in CPU memory; fully_shard moves one unit at a time through the GPU
    model = peft_run.compact(model, config.base_dtype).to("cpu" if config.offload else d.device)
    objective = make_objective(config, model, data, d=d, precision=precision, tokenizer=tokenizer,
                               data_fingerprint=fingerprint)
    _restore_weights(model, state, peft, base, resume_from)
    model.wkv_backend = config.wkv_backend
    model.activation_checkpointing = config.activation_checkpointing
    model.train()
    loss_module = objective.loss_module(model)
    par = parallel.wrap(loss_module, d, config.parallel, precision, offload=config.offload == "cpu")
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
                               eps=config.eps, state_lr=config.state_lr)
    loader = objective.loader(batch_tokens=config.batch_tokens, seed=config.seed, rank=d.rank,
                              world_size=d.world_size, shuffle=True)
    total_steps = plan_steps(config, loader)
    warmup, notice = warmup_for(total_steps, config.warmup_steps, config.warmup_ratio)  # of this run's total
    run = Run(config, d, precision, out, resume_from, state, data, fingerprint, model, peft, base, objective,
              loss_module, par, optimizer, [p for p in model.parameters() if p.requires_grad], loader, total_steps,
              warmup, notice, Progress.resumed(state, resume_from))
    if state is not None:
        parallel.load_optimizer(par, state, resume_from, model, optimizer)
        rundir.check_resume_steps(run.progress.step, total_steps, resume_from, config, announce=d.is_main)
        run.finished = run.progress.step == total_steps and rundir.finished(
            out, resume_from, config.export if peft is None else ())
    return run


def describe(run: Run) -> str:
    """The run's one-line header: model, what trains, data, processes, precision, segments, steps."""
    model, config, d, peft = run.model, run.config, run.d, run.peft
    quantized = quant.quantized_numel(model)  # a quantized base's weights are buffers, frozen too
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + quantized
    n_params = sum(p.numel() for p in model.parameters()) + quantized
    held = {}  # frozen elements by dtype in memory (--base-dtype: the matrices; vectors stay fp32)
    for p in model.parameters():
        if not p.requires_grad:
            held[p.dtype] = held.get(p.dtype, 0) + p.numel()
    frozen_in = str(max(held, key=held.get)).removeprefix("torch.").replace("bfloat16", "bf16").replace(
        "float32", "fp32") if held else ""
    frozen_in = config.base_dtype if quantized else frozen_in  # the matrices, held as buffers
    segments = plan_segments(run.loader, config.segment_len, config.batch_tokens)
    return (f"rwkv-sft train: {model.config.n_layer} layers x {model.config.n_embd}, {n_params / 1e6:.1f}M parameters"
            f"{f' ({frozen / 1e6:.1f}M frozen in {frozen_in}, {(n_params - frozen) / 1e6:.2f}M trained)' if frozen else ''}"
            f"{f'; {peft.describe()}' if peft else ''}; "
            f"{len(run.data.train)} {'pairs' if config.preference else 'examples'}; {d.world_size} "
            f"process(es){f' ({run.par.mode})' if d.enabled else ''} on {d.device.type}, {run.precision}"
            f"{', activation checkpointing' if config.activation_checkpointing else ''}"
            + (f", rows in segments of {'/'.join(map(str, sorted(segments)))} tokens ({sum(segments.values())} of "
               f"{len(run.loader.plan(0))} batches)" if segments else "") + f"; {run.total_steps} steps"
            + (f"; resuming from {run.resume_from} (step {run.progress.step})" if run.resume_from else ""))
