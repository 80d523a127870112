r"""Argument types and flags shared by the commands. Nothing here imports torch, so `--help`
and argument errors are instant.

Text flags (--prompt, --stop, --end-marker, unquoted --set values) understand one set of
escapes, because a shell passes `"a\nb"` as a backslash and an `n`: `\n` newline, `\t` tab,
`\r` carriage return, `\\` one backslash (so `\\n` is a backslash and an `n`). Any other
backslash is kept as typed. Files (--prompt-file, stdin, config files) are taken as they are.
"""
from __future__ import annotations

import argparse
import math
import re

from .data.config import DataConfig, data_config_from_dict
from .settings import one_of

ESCAPES_HELP = r"escapes \n \t \r \\; \\n is a literal backslash-n"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\r`, `\\` typed on a command line -> newline, tab, carriage return, backslash."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def number(kind=float, *, min=None, above=None, max=None):
    """An argparse type: a finite int or float within the given bounds, else a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if min is not None and value < min:
            raise argparse.ArgumentTypeError(f"must be >= {min}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if max is not None and value > max:
            raise argparse.ArgumentTypeError(f"must be <= {max}, got {text}")
        return value
    return parse


def segment_len(text: str):
    """--segment-len: a number of tokens, or auto (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or auto, got {text!r}") from None


def parse_set_value(text: str):
    """A --set value: a YAML literal (number, true/false, null, [list], "quoted string"); a bare
    string gets the text-flag escapes. 1e-4 is a number (YAML 1.1 alone would read a string)."""
    import yaml
    text = text.strip()
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text):
        return float(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return unescape(value) if isinstance(value, str) and text[:1] not in "\"'" else value


def split_set(item: str) -> tuple[str, object]:
    """"KEY=VALUE" -> (key, parsed value)."""
    from .errors import UserError
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise UserError(f"--set {item}: expected KEY=VALUE")
    return key.strip(), parse_set_value(value)


# -- data flags: the same set for train, eval and inspect-data -------------------------------------

def add_data_arguments(p, prefix: str = "data.", set_flag: bool = True) -> None:
    """--format, --context-field, --completion-field, --max-len, --end-marker, --anchor-fraction,
    --skip-invalid, --allow-unused-fields (and --set data.KEY=VALUE unless the command has its own --set).

    Each flag stores into `prefix + <DataConfig field>` only when given (defaults live in
    DataConfig), so a config file under a flag is not overridden by a default."""
    S = argparse.SUPPRESS
    p.add_argument("--format", dest=prefix + "format", default=S, choices=one_of(DataConfig, "format"),
                   help="how to read the records (default auto: by their fields)")
    p.add_argument("--context-field", dest=prefix + "context_field", metavar="NAME", default=S,
                   help="field of the context (default: context / prompt / input)")
    p.add_argument("--completion-field", dest=prefix + "completion_field", metavar="NAME", default=S,
                   help="field of the completion (default: completion / response / output)")
    p.add_argument("--max-len", dest=prefix + "max_len", metavar="N", type=number(int), default=S,
                   help="tokens per example after truncation (default 1024)")
    p.add_argument("--end-marker", dest=prefix + "end_marker", metavar="TEXT", type=unescape, default=S,
                   help=f'what ends each completion: "eos" (token 0, default) or text such as "\\n\\n" ({ESCAPES_HELP})')
    p.add_argument("--anchor-fraction", dest=prefix + "anchor_fraction", metavar="F",
                   type=number(float), default=S,
                   help="truncation keeps at least this fraction of max-len of the context (default 0.25)")
    p.add_argument("--skip-invalid", dest=prefix + "skip_invalid", action="store_true", default=S,
                   help="skip invalid rows and count them by reason (default: stop at the first)")
    p.add_argument("--allow-unused-fields", dest=prefix + "allow_unused_fields", action="store_true", default=S,
                   help="ignore text fields the format does not read (counted) instead of stopping")
    if set_flag:
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="any data setting, as in train: --set data.anchor_fraction=0.5")


def data_config(args, files: list[str], prefix: str = "data."):
    """The DataConfig of `files` from the data flags and --set data.KEY=VALUE of `args`."""
    d = {dest[len(prefix):]: value for dest, value in vars(args).items() if dest.startswith(prefix)}
    for item in getattr(args, "sets", []):
        key, value = split_set(item)
        d[key[len("data."):] if key.startswith("data.") else key] = value
    return data_config_from_dict({**d, "train_files": list(files)}, source="command line")
