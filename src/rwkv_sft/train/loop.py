"""The training loop: `train(config) -> TrainResult`.

A run is built (train/run.py), then steps until its plan ends, a stop signal, or too many
non-finite steps in a row: each step (train/step.py) is logged, and evaluated and checkpointed
(train/saving.py) at the configured intervals; at the end the last checkpoint, a final evaluation
and the export.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..model import RWKV7
from . import checkpoint as ckpt
from . import distributed, parallel, rundir, saving
from .config import TrainConfig
from .run import Run, build_run, describe
from .step import OOM_GRACE_STEPS, take_step


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
    run = build_run(config, d, model, data, tokenizer)
    if run.finished:
        return _finished(run)  # said so; nothing is written
    metrics = _start(run)
    t_start = time.perf_counter()
    with _StopRequest() as stop:
        interrupted = _steps(run, metrics, stop, t_start)
    if run.progress.last_saved is None or run.progress.last_saved.name != f"step_{run.progress.step:06d}":
        saving.save(run)
    eval_result, exports = None, {}
    if not interrupted:
        eval_result = _evaluate(run, metrics)
        exports = saving.export(run)
    elif d.is_main and run.peft is not None:
        exports.update(run.progress.outputs)  # the adapter as of the checkpoint just saved
    metrics.close()
    return _result(run, t_start, eval_result, exports, interrupted, stop.signum)


def _start(run: Run):
    """The run is known to start: its settings written, a resumed log cut back to its checkpoint,
    the header printed, the checkpoint's random state restored. Returns the metrics logger."""
    from .metrics import MetricsLogger
    config, d, p = run.config, run.d, run.progress
    if d.is_main:
        rundir.write_config(run.out, config)
        if run.warmup_notice:
            print(f"rwkv-sft train: {run.warmup_notice}", flush=True)
    if d.is_main and run.state is not None:
        logged = saving.trim_metrics(run.out / "metrics.jsonl", p.step)
        p.tokens_before = logged if p.tokens_before is None else p.tokens_before  # an older checkpoint: the log's
    p.tokens_before = p.tokens_before or 0
    metrics = MetricsLogger(run.out, enabled=d.is_main, tensorboard=config.tensorboard, report_to=config.report_to,
                            run_config=config.to_dict())
    if d.is_main:
        print(describe(run), flush=True)
    if run.state is not None:
        ckpt.set_rng_state(run.state["rng"])
    return metrics


def _steps(run: Run, metrics, stop: _StopRequest, t_start: float) -> bool:
    """Step until the plan ends (False) or a signal stops every process (True)."""
    from tqdm.auto import tqdm
    config, d, p = run.config, run.d, run.progress
    bar = tqdm(total=run.total_steps, initial=p.step, unit="step", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
               disable=not (d.is_main and config.progress))
    plan, start_step, bad_run, interrupted = run.step_plan(), p.step, 0, False
    while p.step < run.total_steps:
        planned = next(plan, None)
        if planned is None:  # out of data
            break
        p.epoch, p.batch = planned[-1][0], planned[-1][1] + 1  # the data position: global
        r = take_step(run, planned, p.step, early=p.step - start_step < OOM_GRACE_STEPS)
        if r.updated:
            bad_run = 0
            p.history.append({"step": p.step + 1, "loss": r.loss, "lr": r.lr, **r.watched})
        elif r.count:
            p.bad_steps, bad_run = p.bad_steps + 1, bad_run + 1
            if d.is_main:
                bar.write(f"step {p.step + 1}: non-finite loss or gradient (loss {r.loss}, grad norm {r.grad_norm}); "
                          f"step skipped ({bad_run} in a row)")
        p.step += 1
        p.tokens, p.loss_tokens = p.tokens + r.positions, p.loss_tokens + r.count
        if bad_run >= config.max_bad_steps:
            raise UserError(
                f"stopped at step {p.step}: the loss or a gradient was not finite in {bad_run} steps in a row "
                f"(lower lr, check the data, or use --precision fp32); last good checkpoint: {p.last_saved or 'none'}")
        _log_step(run, metrics, bar, r, time.perf_counter() - t_start)
        if _stop_requested(d, stop):
            interrupted = True
            break
        if config.eval_every and p.step % config.eval_every == 0 and p.step < run.total_steps:
            _evaluate(run, metrics)
        if config.save_every and p.step % config.save_every == 0 and p.step < run.total_steps:
            saving.save(run)
    bar.close()
    return interrupted


def _log_step(run: Run, metrics, bar, r, elapsed: float) -> None:
    p, config = run.progress, run.config
    if p.step % config.log_every == 0 or p.step == run.total_steps:
        metrics.log("train", p.step, loss=r.loss, lr=r.lr, grad_norm=r.grad_norm, tokens=p.tokens_before + p.tokens,
                    loss_tokens=r.count, tokens_per_s=p.tokens / elapsed, bad_steps=p.bad_steps, epoch=p.epoch,
                    **r.watched)
    bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}", tok_s=f"{p.tokens / elapsed:,.0f}", refresh=False,
                    **{k: f"{r.watched[k]:.3f}" for k in ("margin", "reward_accuracy") if k in r.watched})
    bar.update(1)


def _stop_requested(d: distributed.Dist, stop: _StopRequest) -> bool:
    """Did any process get a signal? Then all stop as by that signal (same summary and exit code)."""
    ints, terms = distributed.all_sum(d, [float(stop.signum == signal.SIGINT), float(stop.signum == signal.SIGTERM)])
    if ints or terms:
        stop.signum = stop.signum or (signal.SIGINT if ints else signal.SIGTERM)
    return bool(ints or terms)


def _evaluate(run: Run, metrics) -> dict | None:
    """The objective's evaluation on the held-out data, logged (None without any)."""
    result, d = None, run.d
    has_eval = run.data.eval is not None and len(run.data.eval) > 0
    if has_eval and (d.is_main or run.par.sharded):  # a sharded model needs every process
        with parallel.whole_root(run.par):
            result = run.objective.evaluate(run.model)
        metrics.log("eval", run.progress.step, **{k: v for k, v in result.items() if isinstance(v, (int, float))})
    distributed.barrier(d)
    return result


def _result(run: Run, t_start: float, eval_result, exports, interrupted: bool, signum) -> TrainResult:
    from .metrics import plot_metrics
    p, out = run.progress, run.out
    metrics_path, plot_path = out / "metrics.jsonl", None
    if run.d.is_main and metrics_path.is_file():
        plot_path = out / "metrics.png"
        plot_metrics(metrics_path, plot_path)
    elapsed = time.perf_counter() - t_start
    recent = [h["loss"] for h in p.history[-10:]]
    result = TrainResult(
        model=run.model, steps=p.step, tokens=p.tokens, loss_tokens=p.loss_tokens, time_s=elapsed,
        tokens_per_s=p.tokens / elapsed if elapsed > 0 else 0.0, train_loss=sum(recent) / len(recent) if recent else None,
        eval=eval_result, bad_steps=p.bad_steps, interrupted=interrupted, out_dir=out, checkpoint=p.last_saved,
        exports=exports, metrics_path=metrics_path if metrics_path.is_file() else None, plot_path=plot_path,
        signal=signum if interrupted else None)
    if run.d.is_main:
        print(summary(result, signum), flush=True)
    return result


def _finished(run: Run) -> TrainResult:
    """The result of a resume that found its run finished: what the run left, no work done."""
    out, history = run.out, run.progress.history
    recent = [h["loss"] for h in history[-10:]]
    exports = {kind: out / name for kind, name in (("pth", "model.pth"), ("safetensors", "model.safetensors"),
                                                   ("adapter", "adapter.safetensors"), ("state", "state.pth"))
               if (out / name).is_file()}
    return TrainResult(model=run.model, steps=run.progress.step, tokens=0, loss_tokens=0, time_s=0.0,
                       tokens_per_s=0.0, train_loss=sum(recent) / len(recent) if recent else None, eval=None,
                       bad_steps=run.progress.bad_steps, interrupted=False, out_dir=out,
                       checkpoint=run.resume_from, exports=exports,
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
