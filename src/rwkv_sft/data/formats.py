"""Reading example files (JSON Lines, JSON arrays, CSV, Parquet) and rendering records as text.

A record is rendered into (context segments, completion segments), each a list of
(text, carries_loss); END stands for the end marker. Context and completion are concatenated
exactly as given: put any separator (a space, "\\n", "Answer:") at the end of the context.
Each segment is tokenized on its own, so a loss boundary is always a token boundary, and a
prompt tokenized alone at inference time matches what the model saw in training.

Chat ({"messages": [{"role", "content"}, ...]} or ShareGPT's {"conversations": [{"from",
"value"}, ...]}) is the text RWKV-7 G1's templates and the chat front-ends (ChatRWKV,
RWKV-Runner) feed the model (docs/formats.md has the rules and their sources):
    System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\n<END>
Each reply ends with "\\n\\n" (where the front-ends stop); loss is on " " + reply + "\\n\\n" of
EVERY assistant turn ("Assistant:" itself carries none), and the end marker follows the last
reply only (none is added when the end marker is "\\n\\n" itself). The last assistant reply is
the "completion" for truncation; everything before it is the "context" (earlier replies keep
their loss). Turns after the last reply teach nothing: they are reported like unused fields.
A reply's thinking (`<think>...</think>` in its text, or a `reasoning_content` field) is part of
the reply and carries loss. Tools (G1's function-call template): a record's `tools` list goes
into the System turn, an assistant's `tool_calls` become a ```json block, a `tool` message
becomes "User: Function output:\\n...".
Alpaca ({"instruction", "input", "output"}) uses the RWKV instruction prompt
    Instruction: ...\\n\\nInput: ...\\n\\nResponse:     (the Input part only when input is not empty)
with " " + output + END as the completion. In chat and Alpaca every text is cleaned as the
G1 templates clean it (`clean_text`). Plain text ({"text": ...}) is text + END with loss on
every token after the first.

A record's string field that holds text and that its format does not read (also a message's,
and the turns after the last reply) is reported in `Rendered.unused`: the caller refuses it or
counts it, never drops it unseen.
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
ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "User"}  # role -> the turn's name
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "observation": "tool"}  # ShareGPT's "from" values
# G1's function-call template (RWKV-LM RWKV-v7/RWKV7-G1x-templates.txt): the tool list in the System
# turn, a call as a ```json block, the result back as a User turn.
TOOLS_OPEN, TOOLS_CLOSE = "Tools:\n", "\nReturn only a JSON function call."
TOOL_OUTPUT = "Function output:\n"
THINK_OPEN = "<think"  # `generate --think` opens the reply with it (G1's think mode)
TRAILING_TURNS = "turns after the last reply"  # the name under which they are counted as unused
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
    """Text of a turn or an Alpaca field as RWKV-7 G1's templates clean it: CRLF -> LF, runs of
    newlines -> one ("\\n\\n" ends a turn), surrounding whitespace stripped. Exactly `clean_txt` of
    BlinkDL/RWKV-LM RWKV-v7/RWKV7-G1x-templates.txt (a lone CR is kept, as there)."""
    return re.sub(r"\n{2,}", "\n", text.replace("\r\n", "\n")).strip()


def chat_prompt(message: str, system: str | None = None, think: bool = False) -> str:
    """A user message (after an optional system prompt) as a chat prompt, ready for the model to
    continue with its reply; `think` opens the reply with "<think" (G1's think mode)."""
    return "".join(chat_prompt_segments(cli_turns(message, system), think))


def cli_turns(message: str, system: str | None = None) -> list:
    """[(role, cleaned text)] of a prompt typed as text: the system prompt (if any), the user turn."""
    return ([("system", clean_text(system))] if system else []) + [("user", clean_text(message))]


def chat_segments(turns) -> list:
    """[(text, loss)] of rendered turns: an assistant turn is "Assistant:" and its reply " ...\\n\\n"
    (with loss); any other is "Role: ...\\n\\n"."""
    out = []
    for role, text in turns:
        if role == "assistant":
            out += [("Assistant:", False), (" " + text + "\n\n", True)]
        else:
            out.append((f"{ROLES[role]}: {text}\n\n", False))
    return out


def chat_prompt_segments(turns, think: bool = False) -> list[str]:
    """The text segments of a generation prompt: the turns, then "Assistant:" (and " <think")."""
    return [t for t, _ in chat_segments(turns)] + ["Assistant:"] + [" " + THINK_OPEN] * think


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


def unused_problem(name: str, kind: str) -> str:
    """The one-line complaint about unused text `name` (a field, or TRAILING_TURNS)."""
    what = f"the {TRAILING_TURNS} hold" if name == TRAILING_TURNS else f"field {name!r} holds"
    return f"{what} text that the {kind} format does not read (--allow-unused-fields ignores such fields)"


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
        unused = ()
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
            turns, unused = chat_turns(record)
            used, r = (_chat_field(record), "system", "tools"), _render_chat(turns, end_is_separator)
            unused += r.unused  # the turns after the last reply
        r.unused, r.kind = unused_text_fields(record, used) + unused, kind
        return r

    return render


def render(record, fmt="auto", context_field=None, completion_field=None, end_is_separator=False) -> Rendered:
    """One record -> Rendered, or raise Invalid."""
    return make_renderer(fmt, context_field, completion_field, end_is_separator)(record)


def alpaca_prompt(instruction: str, inp: str = "") -> str:
    """The RWKV instruction prompt (texts already cleaned), ready for " " + output."""
    return f"Instruction: {instruction}\n\n" + (f"Input: {inp}\n\n" if inp else "") + "Response:"


def _alpaca_fields(record) -> tuple[str, str]:
    instruction = clean_text(_string(record, "instruction"))
    given = record.get("input")
    inp = "" if given is None else clean_text(_string(record, "input"))  # optional; null = none
    if not instruction:
        raise Invalid("empty instruction")
    return instruction, inp


def _render_alpaca(record) -> Rendered:
    instruction, inp = _alpaca_fields(record)
    output = clean_text(_string(record, "output"))
    if not output:
        raise Invalid("empty completion")
    return Rendered([(alpaca_prompt(instruction, inp), False)], [(" " + output, True), (END, True)])


# -- chat ---------------------------------------------------------------------------------------

def _chat_field(record):
    return next((f for f in CHAT_FIELDS if f in record), None)


def _compact(value) -> str:
    """JSON on one line without spaces, as in G1's function-call template."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _tools_text(record) -> str:
    """The System turn's tool list: a list of tool objects one per line ("[\\n{...},\\n{...}\\n]", as
    in G1's template), or a string (e.g. "- name(arg: type)" lines) as written."""
    tools = record["tools"]
    if isinstance(tools, str):
        body = clean_text(tools)
    elif isinstance(tools, list) and tools:
        body = "[\n" + ",\n".join(map(_compact, tools)) + "\n]"
    else:
        raise Invalid("bad tools", "'tools' must be a non-empty list (or a string)")
    return TOOLS_OPEN + body + TOOLS_CLOSE


def _tool_call(calls, where) -> str:
    """An assistant's tool call as G1's template writes it: ```json\\n{"name":...,"arguments":{...}}\\n```."""
    if not isinstance(calls, list) or len(calls) != 1:
        raise Invalid("bad tool call", f"{where}: 'tool_calls' must hold one call (G1's template has one JSON call "
                      "per reply)")
    call = calls[0]
    fn = call.get("function", call) if isinstance(call, dict) else None  # OpenAI's {"function": {...}} or bare
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
        raise Invalid("bad tool call", f"{where}: a tool call needs a 'name' and 'arguments'")
    args = fn["arguments"]
    if isinstance(args, str):  # OpenAI sends the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise Invalid("bad tool call", f"{where}: the arguments of {fn['name']!r} are not valid JSON") from None
    return "```json\n" + _compact({"name": fn["name"], "arguments": args}) + "\n```"


# Message fields the chat format reads besides role and text, by role: a reply's tool call and
# thinking; the link of a tool's result to its call (structure, not text: G1 links them by order).
MESSAGE_FIELDS = {"assistant": frozenset({"tool_calls", "reasoning_content"}), "tool": frozenset({"tool_call_id"})}


def chat_turns(record) -> tuple[list, tuple]:
    """([(role, cleaned text)], unused message fields) of an OpenAI-style "messages" or a ShareGPT
    "conversations" list, with a record's `system` and `tools` in the first System turn."""
    key = _chat_field(record)
    if key is None:
        raise Invalid("missing field", "missing field 'messages' (or 'conversations')")
    messages = record[key]
    if not isinstance(messages, list):
        raise Invalid("bad messages", f"{key!r} must be a list")
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    turns, unused = [], set()
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str):
            raise Invalid("bad messages", f"{key} item {k} must be an object with string {role_key!r} and {text_key!r}")
        role = ROLE_ALIASES.get(m[role_key].lower(), m[role_key].lower())
        if role not in ROLES:
            raise Invalid("bad messages", f"{key} item {k} has unknown {role_key} {m[role_key]!r} "
                          "(expected system, user/human, assistant/gpt, tool/observation)")
        calls = m.get("tool_calls") if role == "assistant" else None
        text = m.get(text_key)
        if not (isinstance(text, str) or (text is None and calls)):  # a call may come without text
            raise Invalid("bad messages", f"{key} item {k} must be an object with string {role_key!r} and {text_key!r}")
        text = clean_text(text or "")
        if role == "assistant":
            thinking = m.get("reasoning_content")
            if thinking is not None:  # G1 writes thinking "<think>\n...\n</think>\n" before the answer
                thinking = clean_text(_string(m, "reasoning_content"))
                text = "<think>\n" + (thinking + "\n" if thinking else "") + "</think>\n" + text
            if calls:
                text = (text + "\n" if text else "") + _tool_call(calls, f"{key} item {k}")
        elif role == "tool":
            text = TOOL_OUTPUT + text
        turns.append((role, text))
        read = MESSAGE_FIELDS.get(role, frozenset()) | {role_key, text_key}
        unused.update(f"{key}[].{f}" for f in unused_text_fields(m, read))
    # One System turn first: the record's system prompt (else the conversation's), then the tool list.
    system = [clean_text(_string(record, "system"))] if record.get("system") is not None else []
    if record.get("tools") is not None:
        if not system and turns and turns[0][0] == "system":
            system = [turns.pop(0)[1]]
        system.append(_tools_text(record))
    if any(system):
        turns.insert(0, ("system", "\n".join(t for t in system if t)))
    return turns, tuple(sorted(unused))


def _render_chat(turns, end_is_separator: bool) -> Rendered:
    """Rendered turns up to the last reply; `unused` is non-empty when turns follow it."""
    last = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise Invalid("no assistant turn", "chat has no assistant turn")
    for k, (role, text) in enumerate(turns[:last + 1]):
        if role == "assistant" and not text:
            raise Invalid("empty completion", f"assistant message {k} is empty")
    segments = chat_segments(turns[:last + 1])
    split = len(segments) - 1  # the last reply is the completion
    if not end_is_separator:  # the reply's own "\n\n" already is the end marker otherwise
        segments.append((END, True))
    trailing = any(text for _, text in turns[last + 1:])
    return Rendered(segments[:split], segments[split:], unused=(TRAILING_TURNS,) * trailing)


def prompt_segments(record, chat: bool = False, system: str | None = None, think: bool = False) -> list[str]:
    """The text segments of a generation prompt from a record of a prompts file: a conversation
    (messages / conversations, ending before the reply to write), an Alpaca instruction, or a
    prompt / context / input / text field (a user turn when `chat`)."""
    if not isinstance(record, dict):
        raise Invalid("not an object", f"expected a JSON object, got {type(record).__name__}")
    if _chat_field(record) is not None:
        turns, _ = chat_turns(record)
        if not turns or turns[-1][0] == "assistant":
            raise Invalid("bad messages", "the conversation ends with an assistant turn: nothing to reply to")
        if system and turns[0][0] != "system":
            turns.insert(0, ("system", clean_text(system)))
        return chat_prompt_segments(turns, think)
    if "instruction" in record:
        if system or think:
            raise Invalid("not a chat", "--system and --think apply to chat prompts, not to an Alpaca instruction")
        return [alpaca_prompt(*_alpaca_fields(record))]
    name = next((f for f in CONTEXT_FIELDS + ("text",) if f in record), None)
    if name is None:
        raise Invalid("missing field", "no prompt (expected a prompt, context, input, text, instruction, "
                      "messages or conversations field)")
    text = _string(record, name)
    return chat_prompt_segments(cli_turns(text, system), think) if chat else [text]
