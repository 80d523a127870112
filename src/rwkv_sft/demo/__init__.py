"""`rwkv-sft demo`: train a tiny RWKV-7 from scratch on the bundled task and show that it learned.

The task (examples/make_demo_data.py): "Date: 1974-02-03\\nIn words:" -> " 3 February 1974".
The model must reorder three fields, turn the month number into its name and drop a leading
zero; the held-out dates never occur in training. Exact match on the held-out set is measured
before and after training, the loss curve is plotted, and a few completions are shown.
"""
from __future__ import annotations

from ..cli_args import number
from .full import HELDOUT_FILE, MODEL, QUICK_STEPS, STEPS, TRAIN_FILE, demo_config

__all__ = ["HELDOUT_FILE", "MODEL", "QUICK_STEPS", "STEPS", "TRAIN_FILE", "add_arguments", "demo_config", "run"]


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


def run(args) -> int:
    import torch

    from ..utils import set_heap_policy
    set_heap_policy(low_memory=False)  # as `rwkv-sft train` does for one CPU process
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
        from .full import run as run_full
        return run_full(args)
    finally:
        torch.set_num_threads(threads)  # the process (e.g. a test session) keeps its setting
