"""Reading example files (JSON Lines, JSON arrays, CSV, Parquet) and rendering records as text.

A record is rendered into (context segments, completion segments), each a list of
(text, carries_loss); END stands for the end marker. Context and completion are concatenated
exactly as given: put any separator (a space, "\\n", "Answer:") at the end of the context.
Each segment is tokenized on its own, so a loss boundary is always a token boundary, and a
prompt tokenized alone at inference time matches what the model saw in training.

Chat ({"messages": [{"role", "content"}, ...]}) uses RWKV's chat format:
    System: ...\\n\\nUser: ...\\n\\nAssistant: ...<END>
Loss is on " " + content + END of EVERY assistant turn ("Assistant:" itself carries none). When
the end marker is not "\\n\\n", a "\\n\\n" (no loss) separates the END from the next turn. Turns
after the last assistant turn teach nothing and are left out. The last assistant reply is the
"completion" for truncation; everything before it is the "context" (earlier replies keep their loss).
Plain text ({"text": ...}) is text + END with loss on every token after the first.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from ..errors import UserError

END = None  # placeholder for the end marker's tokens in a segment list

CONTEXT_FIELDS = ("context", "prompt", "input")
COMPLETION_FIELDS = ("completion", "response", "output")
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class Invalid(Exception):
    """A bad record or file: `reason` is the category counted with skip_invalid."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass
class Rendered:
    context: list      # [(text, loss)]
    completion: list   # [(text | END, loss)]
    first_token_is_context: bool = False  # plain text: the first token is the context


# -- containers ---------------------------------------------------------------------------------

def check_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a data file")


def container_of(path: str, data: bytes) -> str:
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".tsv"):
        return "tsv"
    return "json-array" if data.lstrip()[:1] == b"[" else "jsonl"


def read_records(path: str, data: bytes):
    """Yield (line number, record dict or Invalid) for every example of a file's bytes."""
    kind = container_of(path, data)
    if kind == "parquet":
        yield from _parquet_records(path)
        return
    if not data.strip():
        yield 1, Invalid("empty file")
        return
    if kind == "jsonl":
        for i, (line, record) in enumerate(_jsonl_records(data)):
            if i == 0 and isinstance(record, Invalid) and _spans_lines(data):
                raise UserError(f"{path}: a JSON file must be an array of objects (or use JSON Lines: "
                                f"one object per line)")
            yield line, record
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield data.count(b"\n", 0, e.start) + 1, Invalid("invalid UTF-8", f"invalid UTF-8 ({e.reason})")
        return
    if kind == "json-array":
        yield from _json_array_records(text)
    else:
        yield from _csv_records(text, "\t" if kind == "tsv" else ",")


def _spans_lines(data: bytes) -> bool:
    """True when the file starts with one JSON value written over several lines (pretty-printed)."""
    try:
        text = data.decode("utf-8").lstrip()
        _, end = json.JSONDecoder().raw_decode(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return "\n" in text[:end]


def _jsonl_records(data: bytes):
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = data.split(b"\n")  # decode line by line to find the bad ones
    loads = json.loads
    for n, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, Invalid("invalid UTF-8", f"invalid UTF-8 ({e.reason})")
                continue
        if not line.strip():
            continue  # blank lines separate nothing; they are not examples
        try:
            yield n, loads(line)
        except json.JSONDecodeError as e:
            yield n, Invalid("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")


def _json_array_records(text: str):
    """Walk the array item by item so that every example knows its line."""
    decoder = json.JSONDecoder()
    i, n = text.index("[") + 1, len(text)
    line = 1 + text.count("\n", 0, i)

    def skip_ws(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def bad(at, msg):
        return 1 + text.count("\n", 0, at), Invalid("invalid JSON", f"invalid JSON ({msg})")

    i = skip_ws(i)
    if i < n and text[i] == "]":
        yield line, Invalid("empty file", "empty JSON array")
        return
    last = 0
    while True:
        line += text.count("\n", last, i)
        last = i
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield bad(e.pos, e.msg)
            return
        yield line, item
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < n and text[i] == "]":
            if text[i + 1:].strip():
                yield bad(i + 1, "extra data after the array")
            return
        else:
            yield bad(i, "expected ',' or ']'")
            return


def _csv_records(text: str, delimiter: str):
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        reader.fieldnames  # reads the header
        while True:
            line = reader.line_num + 1  # where the row starts (a quoted field may span lines)
            row = next(reader, None)
            if row is None:
                return
            yield line, {k: v for k, v in row.items() if k is not None and v is not None}
    except csv.Error as e:
        yield reader.line_num, Invalid("invalid CSV", f"invalid CSV ({e})")


def _parquet_records(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: cannot read Parquet ({e})") from None
    if table.num_rows == 0:
        yield 1, Invalid("empty file")
    for n, row in enumerate(table.to_pylist(), 1):  # "line" = row number
        yield n, row


# -- records -> segments ------------------------------------------------------------------------

def _string(record, name):
    if name not in record:
        raise Invalid("missing field", f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise Invalid("non-string field", f"field {name!r} is {type(value).__name__}, expected a string")
    return value


def make_renderer(fmt: str = "auto", context_field=None, completion_field=None, end_is_separator: bool = False):
    """Return render(record) -> Rendered (or raise Invalid) for these settings."""
    context_fields = (context_field,) if context_field else CONTEXT_FIELDS
    completion_fields = (completion_field,) if completion_field else COMPLETION_FIELDS
    known = frozenset(context_fields + completion_fields)

    def pick(record, names):
        for name in names:
            if name in record:
                return name
        return names[0]  # missing: _string names it

    def render(record) -> Rendered:
        if not isinstance(record, dict):
            raise Invalid("not an object", f"expected a JSON object, got {type(record).__name__}")
        kind = fmt
        if kind == "auto":
            kind = ("completion" if not known.isdisjoint(record) else "chat" if "messages" in record
                    else "text" if "text" in record else None)
            if kind is None:
                raise Invalid("missing field", "no known fields (expected context/completion, prompt/response, "
                              "input/output, messages or text)")
        if kind == "completion":
            context = _string(record, pick(record, context_fields))
            completion = _string(record, pick(record, completion_fields))
            if not completion:
                raise Invalid("empty completion")
            return Rendered([(context, False)], [(completion, True), (END, True)])
        if kind == "text":
            text = _string(record, "text")
            if not text:
                raise Invalid("empty text")
            return Rendered([], [(text, True), (END, True)], first_token_is_context=True)
        return _render_chat(record, end_is_separator)

    return render


def render(record, fmt="auto", context_field=None, completion_field=None, end_is_separator=False) -> Rendered:
    """One record -> Rendered, or raise Invalid."""
    return make_renderer(fmt, context_field, completion_field, end_is_separator)(record)


def _render_chat(record, end_is_separator: bool) -> Rendered:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise Invalid("missing field" if messages is None else "bad messages",
                      "missing field 'messages'" if messages is None else "'messages' must be a list")
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Invalid("bad messages", f"message {k} must be an object with string 'role' and 'content'")
        role = m["role"].lower()
        if role not in ROLES:
            raise Invalid("bad messages", f"message {k} has unknown role {m['role']!r} (expected system, user, assistant)")
        turns.append((role, m["content"]))
    last = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise Invalid("no assistant turn", "chat has no assistant turn")
    segments, split = [], 0
    for k, (role, content) in enumerate(turns[:last + 1]):
        if role != "assistant":
            segments.append((f"{ROLES[role]}: {content}\n\n", False))
            continue
        if not content:
            raise Invalid("empty completion", f"assistant message {k} is empty")
        if k == last:
            split = len(segments) + 1
        segments += [("Assistant:", False), (" " + content, True), (END, True)]
        if k != last and not end_is_separator:
            segments.append(("\n\n", False))
    return Rendered(segments[:split], segments[split:])
