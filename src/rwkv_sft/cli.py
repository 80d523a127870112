"""The `rwkv-sft` command line: one sub-command per module, each with add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# sub-command -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "train": ("rwkv_sft.train.cli", "fine-tune (or train from scratch) on context -> completion data"),
    "eval": ("rwkv_sft.train.eval_cli", "completion loss, perplexity, accuracy and exact match of a model"),
    "generate": ("rwkv_sft.infer.cli", "generate text from a prompt"),
    "inspect-data": ("rwkv_sft.data.cli", "statistics of a data file and which tokens carry loss"),
    "info": ("rwkv_sft.model.cli", "show the configuration of a checkpoint"),
    "convert": ("rwkv_sft.model.cli_convert", "convert a checkpoint between .pth and .safetensors / dtypes"),
    "merge": ("rwkv_sft.adapters.cli", "fold a LoRA adapter into its base model and write a plain checkpoint"),
    "demo": ("rwkv_sft.demo", "train the bundled demo model and show that it learned"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv-sft",
        description="Fine-tune RWKV-7 models on context -> completion data; generate, evaluate, export.",
        epilog="Multi-process: torchrun --nproc-per-node N -m rwkv_sft train ...")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("rwkv_sft"):
                continue  # a command whose module is not part of this build
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"rwkv-sft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rwkv-sft {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `rwkv-sft generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
