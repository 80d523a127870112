"""The `rwkv-sft` command line: one sub-command per module, each with add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import env
from .errors import UserError

# sub-command -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "train": ("rwkv_sft.train.cli", "fine-tune (or train from scratch) on context -> completion data"),
    "eval": ("rwkv_sft.eval.cli", "completion loss, perplexity, accuracy and exact match of a model"),
    "generate": ("rwkv_sft.infer.cli", "generate text from a prompt"),
    "inspect-data": ("rwkv_sft.inspect_data", "statistics of a data file and which tokens carry loss"),
    "info": ("rwkv_sft.weights.cli", "show the configuration of a checkpoint"),
    "convert": ("rwkv_sft.weights.cli_convert", "convert a checkpoint between .pth and .safetensors / dtypes"),
    "merge": ("rwkv_sft.weights.cli_merge", "fold a LoRA adapter into its base model and write a plain checkpoint"),
    "demo": ("rwkv_sft.demo", "train the bundled demo model and show that it learned"),
    "launch": ("rwkv_sft.train.launch", "several processes: torchrun's options, then a command (train ...); "
                                        "exits 130/143 when interrupted, without torchrun's traceback"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error (the usage is in --help)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The parser; the flags (and the modules) of `commands` only, all when None. Each command's
    module is imported to add its flags, so `rwkv-sft CMD` imports CMD's module alone."""
    parser = _Parser(
        prog="rwkv-sft",
        description="Fine-tune RWKV-7 models on context -> completion data; generate, evaluate, export.",
        epilog="Text flags (--prompt, --stop, --end-marker, bare --set values) understand the escapes \\n "
               "(newline), \\t, \\r and \\\\ (one backslash: \\\\n is a backslash and an n). "
               "Multi-process: rwkv-sft launch --nproc-per-node N train ... (or torchrun --nproc-per-node N "
               "-m rwkv_sft train ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = None
        if commands is None or name in commands:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("rwkv_sft"):
                    continue  # a command whose module is not part of this build
                raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        if module is not None:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def use_huge_pages() -> None:
    """Large CPU tensors on 2 MiB pages where the kernel allows it (torch reads the variable once,
    before its first allocation; THP_MEM_ALLOC_ENABLE=0 keeps 4 KiB pages). A CPU training step
    allocates and frees buffers of tens to hundreds of MB, and fresh ones cost a page fault per
    4 KiB (per 2 MiB on huge pages). Process-wide, so the command line's to set, not train()'s."""
    env.default_huge_pages()


def main(argv=None) -> int:
    use_huge_pages()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[:1])  # the command comes first; `rwkv-sft --help` needs no module
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or an argument error (2), already printed: the exit code
        return e.code if isinstance(e.code, int) else 2
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
