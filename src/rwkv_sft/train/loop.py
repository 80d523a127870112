"""The training loop: `train(config) -> TrainResult`.

One optimizer step = micro-batches (per process) until the global batch holds `step_tokens` loss
tokens (or one micro-batch per process). Their loss-token count is summed over processes *before*
any backward, so every token of the step weighs the same: loss = sum of token losses / count.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import quant
from ..adapters import training as peft_run
from ..errors import UserError
from ..model import RWKV7, RWKV7Config
from ..weights import load_model
from ..ops import check_backend
from ..utils import atomic_write
from . import checkpoint as ckpt
from . import distributed, parallel, rundir
from .config import TrainConfig
from .loss import L2WRAP, CompletionLoss
from .optim import freeze, lr_at, make_optimizer, set_lr, warmup_for
from .plan import plan_steps, step_plan
from .plan import segment_lengths as plan_segments

OOM_GRACE_STEPS = 3  # an out-of-memory error in the first steps is a setting to lower, not a bug


@dataclass
class TrainResult:
    model: RWKV7
    steps: int                     # optimizer steps done (including skipped non-finite ones)
    tokens: int                    # positions processed this session (B*T incl. padding, all processes)
    loss_tokens: int               # completion tokens trained on this session (all processes)
    time_s: float
    tokens_per_s: float
    train_loss: float | None       # mean loss of the last (up to) 10 good steps
    eval: dict | None              # final evaluate() result
    bad_steps: int                 # steps skipped because the loss or a gradient was not finite
    interrupted: bool              # stopped by SIGINT/SIGTERM after saving a checkpoint
    out_dir: Path
    checkpoint: Path | None        # newest complete checkpoint
    exports: dict[str, Path] = field(default_factory=dict)   # "pth"/"safetensors" (or "adapter"/"state") -> file
    metrics_path: Path | None = None
    plot_path: Path | None = None
    signal: int | None = None      # the signal that stopped the run (when interrupted)


class _StopRequest:
    """SIGINT/SIGTERM: finish the current step, save, stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __call__(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum  # the first signal names the stop (torchrun follows a second Ctrl-C with SIGTERM)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


@contextlib.contextmanager
def _oom_advice(early: bool, step: int, config: TrainConfig, precision: str):
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


def resolve_precision(precision: str, device: torch.device) -> str:
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if precision == "bf16" and not bf16_ok:
        raise UserError(f"precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16; use --precision fp32")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(config: TrainConfig) -> RWKV7:
    if config.model:  # in the file's dtype, memory-mapped: peft_run.compact decides what becomes fp32
        quantize = config.base_dtype if config.base_dtype in peft_run.QUANTIZED else None  # at load: peak near its size
        return load_model(config.model, quantize=quantize)
    torch.manual_seed(config.seed)
    try:
        return RWKV7(RWKV7Config(**config.model_config))  # vocab_size defaults to the World 65536
    except (TypeError, ValueError) as e:
        raise UserError(f"model_config: {e}") from None


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


def _my_batches(loader, step, d: distributed.Dist):
    """This process's micro-batches of a step: every world_size-th; zero-weight ones where a
    process would have fewer than the others (the collectives need the same count)."""
    mine = [loader.collate(rows) for _, _, rows in step[d.rank::d.world_size]]
    return mine + [loader.zero_weight(step[0][2])] * (-(-len(step) // d.world_size) - len(mine))


def _trim_metrics(path: Path, step: int) -> int:
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


def train(config: TrainConfig, *, model: RWKV7 | None = None, data=None, tokenizer=None) -> TrainResult:
    """Train as `config` says. `model` / `data` (a PreparedData) / `tokenizer` replace what the
    config would load. In a multi-process run a failure on any process ends every process: the
    failing one prints the error and exits (code 2 for a UserError, 1 otherwise)."""
    config.validate()
    d = distributed.setup(config.device, config.dist_timeout_s, own_group=config.offload is not None)
    finished = False
    try:
        parallel.check_device(config, d)  # before the run folder is made
        with rundir.locked(Path(config.out_dir), enabled=d.is_main):
            result = _train(config, d, model, data, tokenizer)
        finished = True
        return result
    except Exception as e:
        if d.enabled:
            distributed.abort(d, e, 2 if isinstance(e, UserError) else 1)
        raise
    finally:
        distributed.teardown(d, all_finished=finished)


def _train(config: TrainConfig, d: distributed.Dist, model, data, tokenizer) -> TrainResult:
    from ..data import BatchLoader, prepare_data
    from .metrics import MetricsLogger, plot_metrics

    device, out = d.device, Path(config.out_dir)
    precision = resolve_precision(config.precision, device)
    check_backend(config.wkv_backend, device)
    ckpt_root = out / "checkpoints"
    resume_from = rundir.start(config, out, d.is_main)  # fresh, overwrite or resume; never two runs mixed
    state = ckpt.load_checkpoint(resume_from) if resume_from else None
    if state is not None:
        rundir.check_resume(state["config"], config, resume_from)

    if data is None and config.preference:
        from ..data.pairs import prepare_pairs
        data = prepare_pairs(config.data, tokenizer, show_report=d.is_main)
    elif data is None:
        data = prepare_data(config.data, tokenizer=tokenizer, show_progress=d.is_main and config.progress,
                            show_report=d.is_main)  # --no-progress hides bars, never the data report
    if len(data.train) == 0:
        raise UserError(f"{', '.join(config.data.train_files)}: no training examples")

    fingerprint = rundir.data_fingerprint(data.train)
    if state is not None:
        rundir.check_resume_data(state["data"].get("fingerprint"), fingerprint, resume_from)
    model = model if model is not None else build_model(config)
    rundir.check_vocab(data, model.config.vocab_size)
    peft = peft_run.settings_from(config)  # None: full fine-tuning
    base = peft_run.prepare(model, peft, seed=config.seed, initialize=state is None)
    freeze(model, config.freeze)
    # offload: the model stays in CPU memory; fully_shard moves one unit at a time through the GPU
    model = peft_run.compact(model, config.base_dtype).to("cpu" if config.offload else device)
    pref = None  # a preference run (train/preference.py); its reference is the model as it starts
    if config.preference:
        from .preference import Run
        pref = Run(config, model, data, device=device, precision=precision, d=d, data_fingerprint=fingerprint)
    if state is not None and not state.get("sharded"):  # a sharded checkpoint loads after wrapping
        try:
            peft_run.restore(model, state, peft, base, resume_from)
        except RuntimeError as e:  # shapes that differ: a one-line message, not torch's list
            lines = str(e).splitlines()
            raise UserError(f"{resume_from}: the checkpoint's model does not fit this run's model "
                            f"({lines[1].strip() if len(lines) > 1 else e})") from None
    model.wkv_backend = config.wkv_backend
    model.activation_checkpointing = config.activation_checkpointing
    model.train()
    quantized = quant.quantized_numel(model)  # a quantized base's weights are buffers, frozen too
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + quantized
    loss_module = pref.loss_module(model) if pref else CompletionLoss(model, config.loss_chunk_size, config.segment_len,
                                                                      config.batch_tokens)
    par = parallel.wrap(loss_module, d, config.parallel, precision, offload=config.offload == "cpu")
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
                               state_lr=config.state_lr)
    params = [p for p in model.parameters() if p.requires_grad]

    loader = (pref.loader if pref else functools.partial(BatchLoader, data.train, packing=config.packing))(
        batch_tokens=config.batch_tokens, seed=config.seed, rank=d.rank, world_size=d.world_size, shuffle=True)
    step, epoch, batch_index, history = 0, 0, 0, []
    total_steps = plan_steps(config, loader)
    if state is not None:
        parallel.load_optimizer(par, state, resume_from, model, optimizer)
        step = state["scheduler"]["step"]
        epoch, batch_index = state["data"]["epoch"], state["data"]["batch"]
        history = list(state["metrics"]["history"])
        rundir.check_resume_steps(step, total_steps, resume_from, config, announce=d.is_main)
        if step == total_steps and rundir.finished(out, resume_from, config.export if peft is None else ()):
            return _finished(model, state, out, resume_from)  # said so; nothing is written
    if d.is_main:
        rundir.write_config(out, config)  # only now: the run is known to start
    lr_final = config.lr / 10 if config.lr_final is None else config.lr_final
    warmup, notice = warmup_for(total_steps, config.warmup_steps, config.warmup_ratio)  # of this run's total
    if notice and d.is_main:
        print(f"rwkv-sft train: {notice}", flush=True)
    schedule = dict(lr=config.lr, lr_final=lr_final, warmup=warmup, total=total_steps, schedule=config.schedule)
    epochs = math.inf if config.max_steps else config.epochs
    plan = step_plan(loader, epochs, epoch, batch_index, config.step_tokens, d.world_size)

    tokens_before = (state or {}).get("metrics", {}).get("tokens")  # positions trained before this session
    if d.is_main and state is not None:
        logged = _trim_metrics(out / "metrics.jsonl", step)
        tokens_before = logged if tokens_before is None else tokens_before  # an older checkpoint: from the log
    tokens_before = tokens_before or 0
    metrics = MetricsLogger(out, enabled=d.is_main, tensorboard=config.tensorboard, report_to=config.report_to,
                            run_config=config.to_dict())
    has_eval = data.eval is not None and len(data.eval) > 0
    if has_eval and tokenizer is None:
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer()

    def run_eval() -> dict | None:
        result = None
        if has_eval and (d.is_main or par.sharded):  # a sharded model needs every process
            from .evaluate import evaluate  # switches the model to eval mode and back
            with parallel.whole_root(par):
                result = pref.evaluate(model) if pref else evaluate(model, data.eval, tokenizer, batch_tokens=config.batch_tokens, segment_len=config.segment_len,
                                  exact_match_samples=config.eval_exact_match, device=device, precision=precision)
            metrics.log("eval", step, **{k: v for k, v in result.items() if isinstance(v, (int, float))})
        distributed.barrier(d)
        return result

    last_saved, outputs = resume_from, {}

    def save() -> Path:
        nonlocal last_saved
        payload = {
            "version": 1, "step": step, "scheduler": {"step": step, "total_steps": total_steps, "warmup": warmup},
            "rng": ckpt.rng_state(), "data": {"epoch": epoch, "batch": batch_index, "fingerprint": fingerprint},
            "config": config.to_dict(),
            "metrics": {"history": history, "bad_steps": bad_total, "tokens": tokens_before + tokens},
        }
        if peft is not None:  # only what trains; the frozen base is the run's --model
            payload.update(peft_run.checkpoint_entries(model, peft, base))
            payload["model"] = parallel.whole_tensors(payload["model"])  # an fsdp run's shards, gathered (small)
            if d.is_main:
                outputs.update(peft_run.write_outputs(out, payload["model"], peft, base))
        last_saved = parallel.save_checkpoint(par, d, ckpt_root, step, payload, config.keep_last, model, optimizer)
        return last_saved

    if d.is_main:
        n_params = sum(p.numel() for p in model.parameters()) + quantized
        held = {}  # frozen elements by dtype in memory (--base-dtype: the matrices; vectors stay fp32)
        for p in model.parameters():
            if not p.requires_grad:
                held[p.dtype] = held.get(p.dtype, 0) + p.numel()
        frozen_in = str(max(held, key=held.get)).removeprefix("torch.").replace("bfloat16", "bf16").replace(
            "float32", "fp32") if held else ""
        frozen_in = config.base_dtype if quantized else frozen_in  # the matrices, held as buffers
        segments = plan_segments(loader, config.segment_len, config.batch_tokens)
        print(f"rwkv-sft train: {model.config.n_layer} layers x {model.config.n_embd}, {n_params / 1e6:.1f}M parameters"
              f"{f' ({frozen / 1e6:.1f}M frozen in {frozen_in}, {(n_params - frozen) / 1e6:.2f}M trained)' if frozen else ''}"
              f"{f'; {peft.describe()}' if peft else ''}; "
              f"{len(data.train)} examples; {d.world_size} "
              f"process(es){f' ({par.mode})' if d.enabled else ''} on {device.type}, {precision}"
              f"{', activation checkpointing' if config.activation_checkpointing else ''}"
              + (f", rows in segments of {'/'.join(map(str, sorted(segments)))} tokens ({sum(segments.values())} of "
                 f"{len(loader.plan(0))} batches)" if segments else "") + f"; {total_steps} steps"
              + (f"; resuming from {resume_from} (step {step})" if resume_from else ""), flush=True)
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
               disable=not (d.is_main and config.progress))

    if state is not None:
        ckpt.set_rng_state(state["rng"])
    start_step, bad_total, bad_run = step, (state or {}).get("metrics", {}).get("bad_steps", 0), 0
    tokens = loss_tokens = 0
    interrupted, eval_result = False, None
    t_start = time.perf_counter()
    with _StopRequest() as stop:
        while step < total_steps:
            # 1. the step's micro-batches and their global loss-token count, before any backward
            planned = next(plan, None)
            if planned is None:  # out of data
                break
            batches = _my_batches(loader, planned, d)
            epoch, batch_index = planned[-1][0], planned[-1][1] + 1  # the data position: global
            count = sum(loader.loss_tokens(rows) for _, _, rows in planned)
            n_tokens = sum(loader.positions_of(rows) for _, _, rows in planned)
            # 2. forward/backward, clip, update unless something was not finite
            set_lr(optimizer, lr := lr_at(step, **schedule))
            with _oom_advice(step - start_step < OOM_GRACE_STEPS, step, config, precision):
                if pref:  # the mean over the step's pairs, and the rewards users watch
                    loss, watched = pref.step(loss_module, batches, planned, d=d, wrapped=par.module)
                else:
                    watched, local_loss = {}, accumulate_gradients(
                        loss_module, batches, device=device, global_count=count, world_size=d.world_size,
                        wrapped=par.module, precision=precision, l2wrap=config.l2wrap)
                    loss = distributed.all_sum(d, [local_loss])[0] / count if count else 0.0
                grad_norm = parallel.clip_grad_norm(params, config.grad_clip or math.inf)
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if count and finite:
                    optimizer.step()
            if count and finite:
                bad_run = 0
                history.append({"step": step + 1, "loss": loss, "lr": lr, **watched})
            elif count:
                bad_total, bad_run = bad_total + 1, bad_run + 1
                if d.is_main:
                    bar.write(f"step {step + 1}: non-finite loss or gradient (loss {loss}, grad norm {grad_norm}); "
                              f"step skipped ({bad_run} in a row)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens, loss_tokens = tokens + n_tokens, loss_tokens + count
            elapsed = time.perf_counter() - t_start
            if bad_run >= config.max_bad_steps:
                raise UserError(
                    f"stopped at step {step}: the loss or a gradient was not finite in {bad_run} steps in a row "
                    f"(lower lr, check the data, or use --precision fp32); last good checkpoint: {last_saved or 'none'}")
            if step % config.log_every == 0 or step == total_steps:
                metrics.log("train", step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens_before + tokens,
                            loss_tokens=count, tokens_per_s=tokens / elapsed, bad_steps=bad_total, epoch=epoch, **watched)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:,.0f}", refresh=False,
                            **{k: f"{watched[k]:.3f}" for k in ("margin", "reward_accuracy") if k in watched})
            bar.update(1)
            ints, terms = distributed.all_sum(d, [float(stop.signum == signal.SIGINT), float(stop.signum == signal.SIGTERM)])
            if ints or terms:  # any process signalled: all stop as by that signal (same summary and exit code)
                stop.signum = stop.signum or (signal.SIGINT if ints else signal.SIGTERM)
                interrupted = True
                break
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                run_eval()
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                save()
    bar.close()

    if last_saved is None or last_saved.name != f"step_{step:06d}":
        save()
    exports, plot_path = {}, None
    if not interrupted:
        eval_result = run_eval()
        weights = parallel.full_state_dict(par, d, model) if config.export and peft is None else None
        if d.is_main and peft is not None:
            exports.update(outputs)  # written with the last checkpoint
        elif d.is_main:
            from ..weights import write_state_dict
            for kind in config.export:
                exports[kind] = out / f"model.{kind}"
                write_state_dict(weights, exports[kind], model.config)
        del weights
    elif d.is_main and peft is not None:
        exports.update(outputs)  # the adapter as of the checkpoint just saved
    metrics.close()
    metrics_path = out / "metrics.jsonl"
    if d.is_main and metrics_path.is_file():
        plot_path = out / "metrics.png"
        plot_metrics(metrics_path, plot_path)
    elapsed = time.perf_counter() - t_start
    recent = [h["loss"] for h in history[-10:]]
    result = TrainResult(
        model=model, steps=step, tokens=tokens, loss_tokens=loss_tokens, time_s=elapsed,
        tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0, train_loss=sum(recent) / len(recent) if recent else None,
        eval=eval_result, bad_steps=bad_total, interrupted=interrupted, out_dir=out, checkpoint=last_saved,
        exports=exports, metrics_path=metrics_path if metrics_path.is_file() else None, plot_path=plot_path,
        signal=stop.signum if interrupted else None)
    if d.is_main:
        print(summary(result, stop.signum), flush=True)
    return result


def _finished(model, state: dict, out: Path, checkpoint: Path) -> TrainResult:
    """The result of a resume that found its run finished: what the run left, no work done."""
    recent = [h["loss"] for h in state["metrics"]["history"][-10:]]
    exports = {kind: out / name for kind, name in (("pth", "model.pth"), ("safetensors", "model.safetensors"),
                                                   ("adapter", "adapter.safetensors"), ("state", "state.pth"))
               if (out / name).is_file()}
    return TrainResult(model=model, steps=state["scheduler"]["step"], tokens=0, loss_tokens=0, time_s=0.0,
                       tokens_per_s=0.0, train_loss=sum(recent) / len(recent) if recent else None, eval=None,
                       bad_steps=state["metrics"].get("bad_steps", 0), interrupted=False, out_dir=out,
                       checkpoint=checkpoint, exports=exports,
                       metrics_path=out / "metrics.jsonl" if (out / "metrics.jsonl").is_file() else None,
                       plot_path=out / "metrics.png" if (out / "metrics.png").is_file() else None)


def summary(r: TrainResult, signum=None) -> str:
    """The one-screen report printed at the end of a run."""
    rows = [("steps", f"{r.steps}" + (f" ({r.bad_steps} skipped: non-finite loss or gradient)" if r.bad_steps else "")),
            ("tokens", f"{r.tokens:,} ({r.loss_tokens:,} completion tokens) in {r.time_s:.1f} s = {r.tokens_per_s:,.0f} tokens/s"),
            ("train loss", "n/a" if r.train_loss is None else f"{r.train_loss:.4f} (mean of the last steps)")]
    if r.eval:
        num = lambda key, fmt: "n/a" if r.eval.get(key) is None else format(r.eval[key], fmt)  # noqa: E731
        if "preference_accuracy" in r.eval:
            rows.append(("eval", f"loss {num('loss', '.4f')}, margin {num('margin', '.3f')}, reward accuracy "
                                 f"{num('reward_accuracy', '.3f')}, preference accuracy {num('preference_accuracy', '.3f')}"))
        else:
            rows.append(("eval", f"loss {num('loss', '.4f')}, perplexity {num('perplexity', '.2f')}, token accuracy "
                                 f"{num('token_accuracy', '.3f')}, exact match {num('exact_match', '.3f')}"))
    rows.append(("checkpoint", str(r.checkpoint)))
    if r.exports:
        rows.append(("model", ", ".join(str(p) for p in r.exports.values())))
    elif r.interrupted and r.checkpoint:  # generate, eval, info and train --model take it as it is
        rows.append(("model", f"{r.checkpoint} (the checkpoint; use it as --model)"))
    rows.append(("metrics", ", ".join(str(p) for p in (r.metrics_path, r.plot_path) if p) or "n/a"))
    if r.interrupted:
        name = signal.Signals(signum).name if signum else "a signal"
        rows.append(("stopped", f"by {name} after saving; continue with --resume auto "
                                f"(rwkv-sft train --config {r.out_dir / 'config.yaml'} --resume auto)"))
    width = max(len(k) for k, _ in rows)
    title = "training interrupted" if r.interrupted else "training finished"
    return "\n".join([f"── {title} " + "─" * 40] + [f"{k:<{width}}  {v}" for k, v in rows])
