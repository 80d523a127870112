"""`rwkv-sft generate`: continue a prompt with a model, streaming the text to stdout; many prompts
from a file (`--prompts`, one JSON line each); or a chat read from stdin (`--interactive`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cli_args import ESCAPES_HELP, number, unescape
from ..data.formats import THINK_OPEN, chat_prompt, chat_prompt_segments, cli_turns
from ..errors import UserError
from ..settings import Dtype, Quantized, choices
from . import GREEDY_BELOW


def add_arguments(p):
    p.add_argument("--model", required=True, help=".pth (BlinkDL layout), .safetensors, or a training checkpoint OUT/checkpoints/step_N")
    p.add_argument("--state", metavar="FILE", help="learned initial state (state.pth of a state-tuning run) to start from")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", type=unescape, metavar="TEXT",
                     help=f"prompt text ({ESCAPES_HELP}; '-' reads stdin; without any prompt option, stdin is read "
                          "when it is not a terminal)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (taken as it is, no escapes)")
    src.add_argument("--prompts", metavar="FILE",
                     help="many prompts: one per line, or records (.jsonl .json .csv .tsv .parquet) with a prompt/context/"
                          "input/text field, an Alpaca instruction or a conversation (messages); writes one JSON line "
                          "per prompt {line, prompt, completion, finish_reason}")
    src.add_argument("--interactive", action="store_true",
                     help="chat: each line on stdin is a user turn, answered in turn; the conversation's state is carried")
    chat = p.add_argument_group("chat (RWKV-7 G1 templates: docs/formats.md)")
    chat.add_argument("--chat", action="store_true",
                      help=f"wrap the prompt as {chat_prompt('PROMPT')!r}, as chat training data is rendered")
    chat.add_argument("--system", type=unescape, metavar="TEXT",
                      help="system prompt, first in the conversation (implies --chat)")
    chat.add_argument("--think", action="store_true",
                      help=f"open the reply with {THINK_OPEN!r}: G1's think mode (implies --chat)")
    p.add_argument("--output", metavar="FILE", help="with --prompts: write the JSON lines to FILE instead of stdout")
    p.add_argument("--batch-size", type=number(int, min=1), default=32, metavar="N",
                   help="with --prompts and greedy decoding: prompts decoded together (default 32)")
    p.add_argument("--max-new-tokens", type=number(int, min=0), default=256, metavar="N", help="(default 256)")
    p.add_argument("--temperature", type=number(float, min=0), default=1.0, metavar="T",
                   help=f"0 (or below {GREEDY_BELOW:g}) = greedy (default 1.0)")
    p.add_argument("--top-p", type=number(float, above=0, max=1), default=1.0, metavar="P",
                   help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    p.add_argument("--top-k", type=number(int, min=0), default=0, metavar="K",
                   help="sample from the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=number(int, min=0, max=2**63 - 1), default=None, metavar="N",
                   help="sampling seed (with --prompts, each prompt is sampled as alone with this seed)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", type=unescape,
                   help=f"stop when this text appears (repeatable; {ESCAPES_HELP}; default '\\n\\n')")
    p.add_argument("--no-stop", action="store_true", help="no stop strings: run to end-of-text or --max-new-tokens")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token (id 0)")
    p.add_argument("--adapter", metavar="FILE", help="adapter.safetensors of a parameter-efficient run on --model")
    p.add_argument("--dtype", choices=choices(Dtype), default="fp32")
    p.add_argument("--base-dtype", choices=choices(Quantized), default=None,
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


def _read_line(stream) -> str | None:
    """One line of stdin without its line end (None at the end of input)."""
    data = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline().encode("utf-8")
    if not data:
        return None
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise UserError(f"stdin: not UTF-8 text (byte {e.start} of the line)") from None


def interactive(session, write, stdin=None) -> None:
    """The REPL: a user turn per line of stdin (blank lines ignored) until its end; each reply is
    written as it is produced, then a blank line. On a terminal, "User: " is asked on stderr."""
    stdin = stdin or sys.stdin
    tty = stdin.isatty()
    while True:
        if tty:
            print("User: ", end="", file=sys.stderr, flush=True)
        message = _read_line(stdin)
        if message is None:
            return
        if not message.strip():
            continue
        started = False

        def show(piece):  # the reply without the space the model writes after "Assistant:"
            nonlocal started
            piece = piece if started else piece.lstrip()
            started = started or bool(piece)
            if piece:
                write(piece)

        if tty:
            write("Assistant: ")
        session.reply(message, stream=show)
        write("\n\n")


def run_prompts(model, tokenizer, prompts, out, batch_size: int, **sampling) -> None:
    """One JSON line per prompt on `out`: greedy decoding in batches, sampling one prompt at a time
    (each as `generate` alone with the same seed)."""
    from .generate import complete_batch, generate

    def ids(segments):
        return [i for s in segments for i in tokenizer.encode(s)]

    def emit(line, segments, gen):
        out.write(json.dumps({"line": line, "prompt": "".join(segments), "completion": gen.text,
                              "finish_reason": gen.finish_reason}, ensure_ascii=False) + "\n")
        out.flush()

    if sampling["temperature"] < GREEDY_BELOW:
        for k in range(0, len(prompts), batch_size):
            chunk = prompts[k:k + batch_size]
            gens = complete_batch(model, tokenizer, [ids(s) for _, s in chunk], sampling["max_new_tokens"],
                                  sampling["stop"], sampling["stop_at_eos"])
            for (line, segments), gen in zip(chunk, gens):
                emit(line, segments, gen)
    else:
        for line, segments in prompts:
            emit(line, segments, generate(model, tokenizer, ids(segments), **sampling))


def run(args) -> int:
    import torch

    from ..weights import load_model
    from ..tokenizer import Tokenizer
    from ..utils import resolve_device
    from .decoder import Decoder
    from .generate import generate
    from .prompts import read_prompts, same_file

    stop = [] if args.no_stop else (args.stop or ["\n\n"])
    if "" in stop:
        raise UserError("--stop: empty stop string (use --no-stop to generate without stop strings)")
    if args.output and not args.prompts:
        raise UserError("--output goes with --prompts (a single prompt's text goes to stdout)")
    chat = args.chat or args.interactive or args.system is not None or args.think
    prompts = prompt = None
    if args.prompts:  # read (and checked) before the model loads
        if args.output and same_file(args.output, args.prompts):
            raise UserError(f"--output {args.output} is the prompts file itself")
        prompts = read_prompts(args.prompts, chat, args.system, args.think)
    elif not args.interactive:
        prompt = read_prompt(args)
        if chat:  # each segment tokenized alone, as chat training data is
            prompt = chat_prompt_segments(cli_turns(prompt, args.system), args.think)

    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, dtype=dtype, device=device, adapter=args.adapter, quantize=args.base_dtype).eval()
    if args.state:
        from ..weights.state import load_state
        load_state(model, args.state)
    decoder = Decoder(model)
    del model  # (a decoder that re-lays weights for its step keeps its own copies: the model's are freed)
    tokenizer = Tokenizer()

    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets U+FFFD, not a crash
        sys.stdout.reconfigure(errors="replace")

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed, stop=stop, stop_at_eos=not args.ignore_eos)
    if prompts is not None:
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                run_prompts(decoder, tokenizer, prompts, out, args.batch_size, **sampling)
        else:
            run_prompts(decoder, tokenizer, prompts, sys.stdout, args.batch_size, **sampling)
        return 0
    if args.interactive:
        from .chat import ChatSession
        interactive(ChatSession(decoder, tokenizer, args.system, args.think, **sampling), write)
        return 0
    if isinstance(prompt, list):
        prompt = [i for s in prompt for i in tokenizer.encode(s)]
        if args.think:
            write(THINK_OPEN)  # the reply as the conversation keeps it begins with it
    generate(decoder, tokenizer, prompt, stream=write, **sampling)
    write("\n")
    return 0
