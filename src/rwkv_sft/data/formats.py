"""Reading example files (JSON Lines, JSON arrays, CSV, Parquet) and rendering records as text.

A record is rendered into (context segments, completion segments), each a list of
(text, carries_loss); END stands for the end marker. Context and completion are concatenated
exactly as given: put any separator (a space, "\\n", "Answer:") at the end of the context.
Each segment is tokenized on its own, so a loss boundary is always a token boundary, and a
prompt tokenized alone at inference time matches what the model saw in training.

Chat ({"messages": [{"role", "content"}, ...]} or ShareGPT's {"conversations": [{"from",
"value"}, ...]}) is the text RWKV chat front-ends (ChatRWKV, RWKV-Runner) feed the model:
    System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\n<END>
Each reply ends with "\\n\\n" (where the front-ends stop); loss is on " " + reply + "\\n\\n" of
EVERY assistant turn ("Assistant:" itself carries none), and the end marker follows the last
reply only (none is added when the end marker is "\\n\\n" itself). Turns after the last assistant
turn teach nothing and are left out. The last assistant reply is the "completion" for
truncation; everything before it is the "context" (earlier replies keep their loss).
Alpaca ({"instruction", "input", "output"}) uses the RWKV instruction prompt
    Instruction: ...\\n\\nInput: ...\\n\\nResponse:     (the Input part only when input is not empty)
with " " + output + END as the completion. In chat and Alpaca every text is cleaned as the
front-ends clean it (`clean_text`). Plain text ({"text": ...}) is text + END with loss on every
token after the first.

A record's string field that holds text and that its format does not read is reported in
`Rendered.unused`: the caller refuses it or counts it, never drops it unseen.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass

from ..errors import UserError

END = None  # placeholder for the end marker's tokens in a segment list

CONTEXT_FIELDS = ("context", "prompt", "input")
COMPLETION_FIELDS = ("completion", "response", "output")
CHAT_FIELDS = ("messages", "conversations")          # OpenAI-style, ShareGPT
ALPACA_FIELDS = ("instruction", "input", "output")
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT's "from" values
UTF8_BOM = b"\xef\xbb\xbf"


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
    unused: tuple = ()  # names of the record's text fields that the format did not read
    kind: str = ""      # the format the record was read as


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
    """Yield (line number, record dict or Invalid) for every example of a file's bytes.

    A UTF-8 byte order mark (spreadsheet "CSV UTF-8" exports, Windows editors) is skipped, and
    CRLF line ends read as LF."""
    data = data.removeprefix(UTF8_BOM)
    kind = container_of(path, data)
    if kind == "parquet":
        yield from _parquet_records(path)
        return
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        yield 1, Invalid("invalid UTF-8", "UTF-16 text (save the file as UTF-8)")
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
    text = text.replace("\r\n", "\n")  # also inside quoted fields: a file saved with CRLF reads as with LF
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

def clean_text(text: str) -> str:
    """Text of a chat turn or an Alpaca field as RWKV's chat front-ends send it: CRLF -> LF, blank
    lines collapsed to one newline ("\\n\\n" ends a turn), surrounding whitespace stripped."""
    return re.sub(r"\n{2,}", "\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def chat_prompt(message: str) -> str:
    """A single user message as a chat prompt, ready for the model to continue with its reply."""
    return f"User: {clean_text(message)}\n\nAssistant:"


def _string(record, name):
    if name not in record:
        raise Invalid("missing field", f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise Invalid("non-string field", f"field {name!r} is {type(value).__name__}, expected a string")
    return value


def unused_text_fields(record: dict, used) -> tuple:
    """Fields holding non-blank text that a format reading only `used` would lose."""
    return tuple(k for k, v in record.items() if k not in used and isinstance(v, str) and v.strip())


def make_renderer(fmt: str = "auto", context_field=None, completion_field=None, end_is_separator: bool = False):
    """Return render(record) -> Rendered (or raise Invalid) for these settings."""
    context_fields = (context_field,) if context_field else CONTEXT_FIELDS
    completion_fields = (completion_field,) if completion_field else COMPLETION_FIELDS
    known = frozenset(context_fields + completion_fields)
    explicit = frozenset(f for f in (context_field, completion_field) if f)

    def pick(record, names):
        for name in names:
            if name in record:
                return name
        return names[0]  # missing: _string names it

    def detect(record):
        if not explicit.isdisjoint(record):  # fields the user named win over any guess
            return "completion"
        if "instruction" in record:
            return "alpaca"
        if not known.isdisjoint(record):
            return "completion"
        if any(f in record for f in CHAT_FIELDS):
            return "chat"
        if "text" in record:
            return "text"
        raise Invalid("missing field", "no known fields (expected context/completion, prompt/response, "
                      "input/output, instruction/output, messages, conversations or text)")

    def render(record) -> Rendered:
        if not isinstance(record, dict):
            raise Invalid("not an object", f"expected a JSON object, got {type(record).__name__}")
        kind = detect(record) if fmt == "auto" else fmt
        if kind == "completion":
            used = (pick(record, context_fields), pick(record, completion_fields))
            context, completion = (_string(record, name) for name in used)
            if not completion:
                raise Invalid("empty completion")
            r = Rendered([(context, False)], [(completion, True), (END, True)])
        elif kind == "text":
            used = ("text",)
            text = _string(record, "text")
            if not text:
                raise Invalid("empty text")
            r = Rendered([], [(text, True), (END, True)], first_token_is_context=True)
        elif kind == "alpaca":
            used, r = ALPACA_FIELDS, _render_alpaca(record)
        else:
            used, r = (_chat_field(record),), _render_chat(record, end_is_separator)
        r.unused, r.kind = unused_text_fields(record, used), kind
        return r

    return render


def render(record, fmt="auto", context_field=None, completion_field=None, end_is_separator=False) -> Rendered:
    """One record -> Rendered, or raise Invalid."""
    return make_renderer(fmt, context_field, completion_field, end_is_separator)(record)


def _render_alpaca(record) -> Rendered:
    instruction = clean_text(_string(record, "instruction"))
    given = record.get("input")
    inp = "" if given is None else clean_text(_string(record, "input"))  # optional; null = none
    output = clean_text(_string(record, "output"))
    if not instruction:
        raise Invalid("empty instruction")
    if not output:
        raise Invalid("empty completion")
    prompt = f"Instruction: {instruction}\n\n" + (f"Input: {inp}\n\n" if inp else "") + "Response:"
    return Rendered([(prompt, False)], [(" " + output, True), (END, True)])


def _chat_field(record):
    return next((f for f in CHAT_FIELDS if f in record), None)


def _chat_turns(record) -> list:
    """[(role, text)] of an OpenAI-style "messages" or a ShareGPT "conversations" list."""
    key = _chat_field(record)
    if key is None:
        raise Invalid("missing field", "missing field 'messages' (or 'conversations')")
    messages = record[key]
    if not isinstance(messages, list):
        raise Invalid("bad messages", f"{key!r} must be a list")
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
            raise Invalid("bad messages", f"{key} item {k} must be an object with string {role_key!r} and {text_key!r}")
        role = m[role_key].lower()
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise Invalid("bad messages", f"{key} item {k} has unknown {role_key} {m[role_key]!r} "
                          "(expected system, user/human, assistant/gpt)")
        turns.append((role, clean_text(m[text_key])))
    return turns


def _render_chat(record, end_is_separator: bool) -> Rendered:
    turns = _chat_turns(record)
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
        segments += [("Assistant:", False), (" " + content + "\n\n", True)]
    if not end_is_separator:  # the reply's own "\n\n" already is the end marker otherwise
        segments.append((END, True))
    return Rendered(segments[:split], segments[split:])
