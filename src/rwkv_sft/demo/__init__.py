"""`rwkv-sft demo`: train a tiny RWKV-7 from scratch on the bundled task and show that it learned.

The task (examples/make_demo_data.py): "Date: 1974-02-03\\nIn words:" -> " 3 February 1974".
The model must reorder three fields, turn the month number into its name and drop a leading
zero; the held-out dates never occur in training. Exact match on the held-out set is measured
before and after training, the loss curve is plotted, and a few completions are shown.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..cli_args import number

DATA_DIR = Path(__file__).resolve().parent
TRAIN_FILE = DATA_DIR / "dates_train.jsonl"
HELDOUT_FILE = DATA_DIR / "dates_heldout.jsonl"

MODEL = dict(n_layer=2, n_embd=128, head_size=64, vocab_size=65536)  # World vocabulary
STEPS, QUICK_STEPS = 200, 60


def demo_config(out_dir, steps: int = STEPS, seed: int = 0, progress: bool = True):
    """The TrainConfig of the demo: from scratch, so a high learning rate with warmup."""
    from ..data import DataConfig
    from ..train.config import TrainConfig
    data = DataConfig(train_files=[str(TRAIN_FILE)], eval_files=[str(HELDOUT_FILE)], max_len=64, seed=seed)
    return TrainConfig(
        data=data, model_config=dict(MODEL), out_dir=str(out_dir),
        max_steps=steps, batch_tokens=512, packing=False,  # ~32 examples of 16 positions per step
        lr=3e-3, lr_final=3e-4, warmup_steps=min(20, steps // 5), schedule="cosine",
        eval_every=max(1, steps // 4), eval_exact_match=200, wkv_backend="chunked",
        export=["pth"], tensorboard=False, seed=seed, device="cpu", progress=progress,
        overwrite=True)  # every demo is a fresh run


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps instead of {STEPS} (a smoke test)")
    p.add_argument("--steps", type=number(int, min=1), default=None, metavar="N", help="optimizer steps (overrides --quick)")
    p.add_argument("--threads", type=number(int, min=1), default=None, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's, one per core)")
    p.add_argument("--seed", type=number(int, min=0, max=2**63 - 1), default=0, metavar="N")
    p.add_argument("--samples", type=number(int, min=0), default=5, metavar="K",
                   help="held-out completions to show (default: 5)")
    p.add_argument("--method", choices=["full", "lora", "state", "dpo"], default="full",
                   help="full: train from scratch (default); lora / state: adapt the demo model (--base) to "
                        "a new output style with its weights frozen (into runs/demo-METHOD); dpo: teach it to "
                        "prefer that style from preference pairs (a LoRA, DPO)")
    p.add_argument("--base", help="base for --method lora/state/dpo (default runs/demo/model.pth, trained when missing)")


def _show(title: str, ev: dict) -> None:
    print(f"{title:<16} exact match {ev['exact_match']:6.1%} ({round(ev['exact_match'] * ev['exact_match_n'])}"
          f"/{ev['exact_match_n']} held-out dates)   loss {ev['loss']:.3f}   token accuracy {ev['token_accuracy']:.1%}",
          flush=True)


def show_comparison(before: dict, after: dict, samples: int, column: str) -> None:
    """Held-out metrics before and after training, and `samples` completions beside their references."""
    _show("before training", before)
    _show("after training", after)
    print(f"\n{'held-out context':<30}{'reference':<22}{column:<22}")
    for s in after["samples"][:samples]:
        prompt = s["prompt"].replace("\n", " ")
        print(f"{prompt:<30}{s['reference']!r:<22}{s['generated']!r:<22}{'ok' if s['match'] else 'WRONG'}")


def stopped(result) -> int:
    """A demo stopped by Ctrl-C / SIGTERM: nothing to compare; the shell's exit code for the signal."""
    import signal
    print("demo stopped before the end of training: no comparison", flush=True)
    return 128 + (result.signal or signal.SIGTERM)


def _log_before(result, before: dict) -> None:
    """The untrained model's evaluation as step 0 of the run's log and plot."""
    import json

    from ..train.metrics import plot_metrics
    from ..utils import atomic_write
    record = {"kind": "eval", "step": 0, "time": time.time(),
              **{k: v for k, v in before.items() if isinstance(v, (int, float))}}
    with atomic_write(result.metrics_path) as tmp:
        tmp.write_text(json.dumps(record) + "\n" + result.metrics_path.read_text())
    plot_metrics(result.metrics_path, result.plot_path)


def run(args) -> int:
    import torch

    threads = torch.get_num_threads()
    args.threads = args.threads or threads
    torch.set_num_threads(args.threads)
    try:
        if args.method == "dpo":
            from .dpo import run as run_dpo
            return run_dpo(args)
        if args.method != "full":
            from .peft import run as run_peft
            return run_peft(args)
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the process (e.g. a test session) keeps its setting


def _run(args) -> int:
    import torch

    from ..data import prepare_data
    from ..model import RWKV7, RWKV7Config
    from ..tokenizer import Tokenizer
    from ..train import train
    from ..train.evaluate import evaluate

    start, cpu_start = time.perf_counter(), time.process_time()
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    out = Path(args.out)
    config = demo_config(out, steps, args.seed)

    tokenizer = Tokenizer()
    data = prepare_data(config.data, tokenizer=tokenizer, show_progress=False)
    torch.manual_seed(args.seed)
    model = RWKV7(RWKV7Config(**config.model_config))
    model.wkv_backend = config.wkv_backend
    print(f"rwkv-sft demo: dates -> words, {len(data.train)} training / {len(data.eval)} held-out examples; "
          f"RWKV-7 from scratch, {MODEL['n_layer']} layers x {MODEL['n_embd']}, vocabulary {MODEL['vocab_size']}; "
          f"{steps} steps on {args.threads} CPU thread(s)", flush=True)
    before = evaluate(model, data.eval, tokenizer, batch_tokens=config.batch_tokens,
                      exact_match_samples=config.eval_exact_match)
    _show("before training", before)
    result = train(config, model=model, data=data, tokenizer=tokenizer)
    if result.interrupted:
        return stopped(result)
    _log_before(result, before)
    after = result.eval
    show_comparison(before, after, args.samples, "model")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s (training {result.time_s:.0f} s, {result.steps} steps; "
          f"CPU time {time.process_time() - cpu_start:.0f} s); "
          f"loss plot: {result.plot_path}; model: {result.exports.get('pth')}")
    print(f"try it: rwkv-sft generate --model {result.exports.get('pth')} --temperature 0 --prompt $'Date: 1999-12-31\\nIn words:'")
    return 0
