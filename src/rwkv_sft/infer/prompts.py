"""`generate --prompts FILE`: many prompts, one result (a JSON line) each.

A prompts file is one prompt per line (any file but .jsonl/.json/.csv/.tsv/.parquet; blank lines
are skipped) or records in one of those containers, rendered as `formats.prompt_segments` says
(a conversation, an Alpaca instruction, or a prompt/context/input/text field). Each prompt is a
list of text segments tokenized one by one, as training data is.
"""
from __future__ import annotations

import os

from ..data.formats import UTF8_BOM, Invalid, check_file, prompt_segments, read_records
from ..errors import UserError

RECORD_FILES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_prompts(path: str, chat: bool = False, system: str | None = None, think: bool = False) -> list:
    """[(line, [text segments])] of a prompts file; a bad line is a one-line UserError."""
    check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(RECORD_FILES):
        records = read_records(path, data)
    else:
        data = data.removeprefix(UTF8_BOM)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise UserError(f"{path}:{line}: invalid UTF-8 ({e.reason})") from None
        records = ((n, {"prompt": line.removesuffix("\r")}) for n, line in enumerate(text.split("\n"), 1) if line.strip())
    prompts = []
    for line, record in records:
        try:
            if isinstance(record, Invalid):
                raise record
            prompts.append((line, prompt_segments(record, chat, system, think)))
        except Invalid as e:
            raise UserError(f"{path}:{line}: {e}") from None
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
