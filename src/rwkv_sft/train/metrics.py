"""Metrics: one JSON object per line in out_dir/metrics.jsonl (mirrored to TensorBoard and/or
Weights & Biases), and a plot.

The JSON Lines file is the record a run keeps; TensorBoard (the optional `tensorboard` package) and
W&B (the optional `wandb` package, `pip install rwkv-sft[wandb]`) are conveniences chosen with
`--report-to`. `plot_metrics` draws the loss curves from the JSON Lines alone.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .. import env
from ..errors import UserError


class MetricsLogger:
    """`log(kind, step, **values)` appends {"kind", "step", "time", **values} to metrics.jsonl.

    Disabled loggers (processes other than rank 0) accept every call and write nothing.
    Numeric values also go as "<kind>/<name>" to TensorBoard (when `torch.utils.tensorboard`
    imports) and to W&B, as `report_to` lists them (None: TensorBoard as `tensorboard` says).
    """

    def __init__(self, out_dir, enabled: bool = True, tensorboard: bool = True, report_to=None, run_config=None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = self._writer = self._wandb = None
        if not enabled:
            return
        report_to = ["tensorboard"] if report_to is None else report_to
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "wandb" in report_to:
            self._wandb = _start_wandb(Path(out_dir), run_config)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard and "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch raises ImportError when the tensorboard package is missing
                print("rwkv-sft: TensorBoard logging off (pip install tensorboard to enable); "
                      f"metrics go to {self.path}", flush=True)
            else:
                self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": time.time(), **values}
        # allow_nan: a non-finite loss is worth recording (Python's json writes NaN / Infinity)
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        scalars = {f"{kind}/{name}": value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, int(step))
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _start_wandb(out_dir: Path, run_config):
    """A W&B run named after the output directory, its files under out_dir/wandb. WANDB_MODE
    (offline, disabled), WANDB_PROJECT and the other WANDB_* variables apply as wandb reads them;
    a resumed run continues the same W&B run (its id is kept in out_dir/wandb/run_id)."""
    try:
        import wandb
    except ImportError:
        raise UserError("--report-to wandb: the wandb package is not installed (pip install 'rwkv-sft[wandb]')") from None
    id_file = out_dir / "wandb" / "run_id"
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=env.wandb_project(), name=out_dir.resolve().name,
                     dir=str(out_dir), config=run_config, id=run_id, resume="allow" if run_id else None)
    id_file.write_text(str(run.id), encoding="utf-8")
    return run


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file; a torn last line (a killed run) is ignored."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _series(records, kind, key):
    points = [(r["step"], r[key]) for r in records
              if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


REWARDS = ("reward_chosen", "reward_rejected", "margin")  # a preference run's (train/preference.py)
ACCURACIES = ("reward_accuracy", "preference_accuracy")


def plot_metrics(metrics_jsonl, png_path) -> Path:
    """PNG of metrics_figure for a metrics.jsonl file."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(read_metrics(metrics_jsonl), f"{Path(metrics_jsonl).parent.name}: training metrics")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def metrics_figure(records, title: str):
    """The train loss (and eval loss) vs step; eval exact match / token accuracy on the right-hand
    axis when the log has them. A preference run's log adds a panel below: rewards (chosen,
    rejected) and margin, reward and preference accuracy on its right-hand axis."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed (servers, CI)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    preference = any(isinstance(r.get(k), (int, float)) for r in records for k in REWARDS)
    fig, axes = plt.subplots(2 if preference else 1, 1, figsize=(8, 8 if preference else 4.5), dpi=100, sharex=True,
                             squeeze=False)
    ax = axes[0, 0]
    for kind, key, style in (("train", "loss", "-"), ("eval", "loss", "o-")):
        steps, values = _series(records, kind, key)
        if steps:
            ax.plot(steps, values, style, label=f"{kind} loss", markersize=4)
    axes[-1, 0].set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over pairs)" if preference else "completion loss (nats / token)")
    if any(v > 0 for r in records for v in [r.get("loss")] if isinstance(v, (int, float)) and math.isfinite(v)):
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 2, 4, 10 rather than 2x10^0
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_formatter(plain)
        # label the 2, 3, ... ticks only when there is no decade tick to read the scale from
        ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else matplotlib.ticker.NullFormatter())
    ax.grid(True, alpha=0.3)
    _with_accuracy(ax, records, [("eval", k) for k in ("exact_match", "token_accuracy")], "center right")
    if preference:
        ax = axes[1, 0]
        for key, color in zip(REWARDS, ("tab:blue", "tab:orange", "tab:purple")):
            for kind, style in (("train", "-"), ("eval", "o--")):
                steps, values = _series(records, kind, key)
                if steps:
                    ax.plot(steps, values, style, color=color, label=f"{kind} {key.replace('_', ' ')}", markersize=4)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_ylabel("reward")
        ax.grid(True, alpha=0.3)
        _with_accuracy(ax, records, [(kind, k) for k in ACCURACIES for kind in ("train", "eval")], "best")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    return fig


def _with_accuracy(ax, records, series, legend_loc: str) -> None:
    """The (kind, key) series that the log has on a right-hand 0..1 axis; one legend for both axes."""
    handles, labels = ax.get_legend_handles_labels()
    acc = [(kind, key, _series(records, kind, key)) for kind, key in series]
    acc = [a for a in acc if a[2][0]]
    if acc:
        ax2 = ax.twinx()
        colors = ("tab:green", "tab:red", "tab:olive", "tab:brown")
        for (kind, key, (steps, values)), color in zip(acc, colors):
            ax2.plot(steps, values, "s--" if kind == "eval" else ":", color=color,
                     label=f"{kind} {key.replace('_', ' ')}", markersize=4)
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc=legend_loc, fontsize="small")
