"""`rwkv-sft inspect-data`: statistics of data files and a rendering of which tokens carry loss."""
from __future__ import annotations

import json
import sys

from .cli_args import add_data_arguments, data_config, number
from .errors import UserError

LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"            # plain output: loss tokens inside the brackets
ANSI_LOSS, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"  # a terminal: loss tokens in bold green
EOS_TEXT = "<eos>"


def add_arguments(p):
    p.add_argument("files", nargs="+", metavar="FILE", help='data files ("path", "path:weight" or "path*count")')
    add_data_arguments(p.add_argument_group("data (as in train)"))
    show = p.add_mutually_exclusive_group()
    show.add_argument("--show", type=number(int, min=0), default=2, metavar="N",
                      help="render the first N examples (default 2)")
    show.add_argument("--example", type=number(int, min=0), default=None, metavar="I", help="render example I only")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--cache-dir", default=None, help="tokenization cache (default ~/.cache/rwkv_sft/data)")


def render_example(examples, i, tokenizer, color: bool) -> str:
    """The text of example i with its loss tokens marked (one decode per run of equal flags)."""
    ids, loss = examples.tokens(i), examples.loss_positions(i)
    eos = getattr(tokenizer, "eos_id", 0)
    out, k = [], 0
    while k < len(ids):
        j = k
        while j < len(ids) and loss[j] == loss[k]:
            j += 1
        run, text = ids[k:j].tolist(), []
        while run:  # the end-of-text token decodes to nothing: show it
            cut = run.index(eos) if eos in run else len(run)
            text.append(tokenizer.decode(run[:cut]) + (EOS_TEXT if cut < len(run) else ""))
            run = run[cut + 1:]
        text = "".join(text)
        if loss[k]:
            text = f"{ANSI_LOSS}{text}{ANSI_RESET}" if color else f"{LOSS_OPEN}{text}{LOSS_CLOSE}"
        out.append(text)
        k = j
    return "".join(out)


def _stats_text(report) -> str:
    train, cuts = report["train"], report["truncated"]
    from .data.prepare import format_counts, format_unused

    def file_text(f):  # a file that mixes formats says how many rows of each
        mixed = f": {format_counts(f['formats'])}" if len(f["formats"]) > 1 else ""
        return f"{f['path']} ({f['examples']} examples{mixed})"

    lines = ["files: " + ", ".join(map(file_text, report["files"])), f"examples: {train['examples']}",
             f"formats: {format_counts(report['formats'])}"]
    skipped = report["skipped"]
    lines.append(f"skipped: {sum(skipped.values())}" + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) + ")"
                                                       if skipped else ""))
    share = train["loss_tokens"] / max(1, train["tokens"])
    lines.append(f"tokens: {train['tokens']}, with loss: {train['loss_tokens']} ({share:.1%})")
    L = train.get("length")
    if L:
        lines.append(f"length (tokens, after truncation to {report['max_len']}): min {L['min']}, p50 {L['p50']:g}, "
                     f"p90 {L['p90']:g}, p99 {L['p99']:g}, max {L['max']}")
    over = cuts["longer_than_max_len"]
    lines.append(f"longer than max_len {report['max_len']}: {over} examples (the longest has {cuts['longest']} tokens"
                 + (f"; --max-len {cuts['longest']} keeps every example whole, training runs long rows in segments)"
                    if over else ")"))
    lines.append(f"truncated: {cuts['context_trimmed']} context trimmed, {cuts['completion_cut']} completion cut, "
                 f"{cuts['empty_context']} empty contexts (became token 0)")
    if report["unused_fields"]:
        lines.append(f"ignored text fields: {format_unused(report['unused_fields'])}")
    return "\n".join(lines)


def run(args) -> int:
    import numpy as np

    from .tokenizer import Tokenizer
    from .data.prepare import prepare_data

    config = data_config(args, args.files)
    tokenizer = Tokenizer()
    from .data.config import parse_file_spec
    from .data.pairs import is_pairs_file
    if is_pairs_file(parse_file_spec(config.train_files[0]).path):
        return _inspect_pairs(args, config, tokenizer)
    data = prepare_data(config, tokenizer, cache_dir=args.cache_dir, show_progress=False)
    examples = data.train
    if args.json:
        print(json.dumps(data.report, indent=2))
        return 0
    print(_stats_text(data.report))
    if args.example is not None:
        if not 0 <= args.example < len(examples):
            raise UserError(f"--example {args.example}: there are {len(examples)} examples (0..{len(examples) - 1})")
        chosen = [args.example]
    else:
        chosen = range(min(args.show, len(examples)))
    color = sys.stdout.isatty()
    for i in chosen:
        path, line = examples.origin(i)
        n_loss = int(np.count_nonzero(examples.loss_positions(i)))
        legend = "loss tokens in green" if color else f"loss tokens inside {LOSS_OPEN}{LOSS_CLOSE}"
        print(f"\n--- example {i} ({path}:{line}; {examples.length(i)} tokens, {n_loss} with loss; {legend}) ---")
        print(render_example(examples, i, tokenizer, color))
    return 0


class _Marked:
    """One token sequence with its loss flags, as render_example reads an example."""

    def __init__(self, ids, flags):
        self.ids, self.flags = ids, flags

    def tokens(self, i):
        return self.ids

    def loss_positions(self, i):
        return self.flags


def _inspect_pairs(args, config, tokenizer) -> int:
    """Preference pairs: counts, then each shown pair's context and both completions, scored tokens marked."""
    import numpy as np

    from .data.pairs import format_pair_report, prepare_pairs
    data = prepare_pairs(config, tokenizer, show_report=False)
    pairs = data.train
    if args.json:
        print(json.dumps(data.report, indent=2))
        return 0
    print(format_pair_report(data.report).replace("; ", "\n"))
    if args.example is not None and not 0 <= args.example < len(pairs):
        raise UserError(f"--example {args.example}: there are {len(pairs)} pairs (0..{len(pairs) - 1})")
    chosen = [args.example] if args.example is not None else range(min(args.show, len(pairs)))
    color = sys.stdout.isatty()
    legend = "scored tokens in green" if color else f"scored tokens inside {LOSS_OPEN}{LOSS_CLOSE}"
    for i in chosen:
        path, line = pairs.origin(i)
        context, good, bad = pairs.parts(i)
        print(f"\n--- pair {i} ({path}:{line}; context {len(context)} tokens, chosen {len(good[0])} / rejected "
              f"{len(bad[0])} tokens, {int(good[1].sum())} / {int(bad[1].sum())} scored; {legend}) ---")
        print("context:  " + render_example(_Marked(context, np.zeros(len(context), bool)), 0, tokenizer, color))
        for name, (ids, flags) in (("chosen", good), ("rejected", bad)):
            print(f"{name + ':':<10}" + render_example(_Marked(ids, flags), 0, tokenizer, color))
    return 0
