"""`rwkv-sft generate`: continue a prompt with a model, streaming the text to stdout."""
from __future__ import annotations

import sys
from pathlib import Path

from ..cli_args import ESCAPES_HELP, number, unescape
from ..data.formats import chat_prompt
from ..errors import UserError
from . import GREEDY_BELOW


def add_arguments(p):
    p.add_argument("--model", required=True, help=".pth (BlinkDL layout), .safetensors, or a training checkpoint OUT/checkpoints/step_N")
    p.add_argument("--state", metavar="FILE", help="learned initial state (state.pth of a state-tuning run) to start from")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", type=unescape, metavar="TEXT",
                     help=f"prompt text ({ESCAPES_HELP}; '-' reads stdin; without any prompt option, stdin is read "
                          "when it is not a terminal)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (taken as it is, no escapes)")
    p.add_argument("--chat", action="store_true", help=f"wrap the prompt as {chat_prompt('PROMPT')!r}, as chat training data is rendered")
    p.add_argument("--max-new-tokens", type=number(int, min=0), default=256, metavar="N", help="(default 256)")
    p.add_argument("--temperature", type=number(float, min=0), default=1.0, metavar="T",
                   help=f"0 (or below {GREEDY_BELOW:g}) = greedy (default 1.0)")
    p.add_argument("--top-p", type=number(float, above=0, max=1), default=1.0, metavar="P",
                   help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    p.add_argument("--top-k", type=number(int, min=0), default=0, metavar="K",
                   help="sample from the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=number(int, min=0, max=2**63 - 1), default=None, metavar="N")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", type=unescape,
                   help=f"stop when this text appears (repeatable; {ESCAPES_HELP}; default '\\n\\n')")
    p.add_argument("--no-stop", action="store_true", help="no stop strings: run to end-of-text or --max-new-tokens")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token (id 0)")
    p.add_argument("--adapter", metavar="FILE", help="adapter.safetensors of a parameter-efficient run on --model")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--base-dtype", choices=["int8", "nf4"], default=None,
                   help="store the projection matrices quantized (as a run with --base-dtype int8|nf4 trained on)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def read_prompt(args) -> str:
    """The prompt from --prompt, --prompt-file or stdin; one trailing newline of a file or pipe is dropped."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"{path}: no such file (--prompt-file)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    elif args.prompt == "-" or not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"stdin: not UTF-8 text (byte {e.start})") from None
    else:
        raise UserError("no prompt: give --prompt TEXT, --prompt-file PATH, or pipe the prompt on stdin")
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def run(args) -> int:
    import torch

    from ..model import RWKV7
    from ..tokenizer import Tokenizer
    from ..utils import resolve_device
    from .generate import generate

    stop = [] if args.no_stop else (args.stop or ["\n\n"])
    if "" in stop:
        raise UserError("--stop: empty stop string (use --no-stop to generate without stop strings)")
    prompt = read_prompt(args)
    if args.chat:
        prompt = chat_prompt(prompt)

    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = RWKV7.load(args.model, dtype=dtype, device=device, adapter=args.adapter,
                       quantize=args.base_dtype).eval().decoding_layout()
    if args.state:
        from ..adapters.state import load_state
        load_state(model, args.state)
    tokenizer = Tokenizer()

    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets U+FFFD, not a crash
        sys.stdout.reconfigure(errors="replace")

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=stop,
             stop_at_eos=not args.ignore_eos, stream=write)
    write("\n")
    return 0
