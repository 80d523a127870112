"""`rwkv-sft launch [torchrun options] train ...`: torchrun that ends as the run did.

Plain torchrun stops the workers of a run interrupted by Ctrl-C / SIGTERM and, once they have
saved and printed their summary, ends with its own SignalException traceback and exit code 1; a
worker's error ends in a ChildFailedError report, again exit 1. This is the same launcher
(torch.distributed.run's parser and run; every torchrun option works) without those
endings: 130 / 143 after SIGINT / SIGTERM, the failing worker's exit code after an error. It also
gives the workers longer to finish their step and save once signalled (SHUTDOWN_TIMEOUT_S instead
of torchrun's 30 s, after which it kills them), unless --shutdown-timeout or
TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise.
"""
from __future__ import annotations

import argparse

from .. import env
from ..errors import UserError

SHUTDOWN_TIMEOUT_S = 300


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.prefix_chars = "+"  # no option of our own: every one, --help included, is torchrun's, passed on as given
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, metavar="[torchrun options] COMMAND ...",
                   help="torchrun's options (--nproc-per-node N, --nnodes, --rdzv-*), then the rwkv-sft command "
                        "and its flags")


def run(args) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    parser = get_args_parser()  # torchrun's own parser: its options, --help and errors
    parser.prog = "rwkv-sft launch"
    for action in parser._actions:
        action.metavar = {"training_script": "COMMAND", "training_script_args": "..."}.get(action.dest, action.metavar)
    ns = parser.parse_args(args.torchrun_args)
    if ns.module or ns.no_python or ns.run_path:
        raise UserError("launch runs rwkv-sft itself: give the command and its flags (train ...) without "
                        "-m, --no-python or --run-path")
    ns.training_script_args = [ns.training_script, *ns.training_script_args]  # python -m rwkv_sft COMMAND ...
    ns.training_script, ns.module = "rwkv_sft", True
    if ns.shutdown_timeout is None and not env.shutdown_timeout_given():
        ns.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    try:
        torchrun(ns)
    except SignalException as e:  # the workers were signalled and have stopped (or were killed)
        return 128 + int(e.sigval)
    except ChildFailedError as e:  # the workers said why; exit as the first one that failed
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a negative code: killed by that signal
    return 0
