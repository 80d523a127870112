"""Formats users bring as they are: Alpaca, ShareGPT, files with a UTF-8 BOM and CRLF line ends;
chat rendered exactly as RWKV's chat front-ends feed the model; no text field silently ignored."""
import csv
import io
import json

import pytest

from rwkv_sft import Tokenizer
from rwkv_sft.data import DataConfig, format_report, prepare_data
from rwkv_sft.data.formats import chat_prompt, clean_text
from rwkv_sft.errors import UserError
from test_data_support import ByteTokenizer, write

TOK = ByteTokenizer()
enc = TOK.encode


def prep(tmp_path, files, tokenizer=TOK, **kw):
    return prepare_data(DataConfig(files, **kw), tokenizer, cache_dir=str(tmp_path / "cache"), show_progress=False)


def rows(ex):
    return [(ex.tokens(i).tolist(), ex.loss_positions(i).tolist()) for i in range(len(ex))]


def parts(ex, i, tok=TOK):
    """(text without loss, text with loss) of example i."""
    ids, loss = ex.tokens(i), ex.loss_positions(i)
    return tok.decode(ids[~loss].tolist()), tok.decode(ids[loss].tolist())


# -- Alpaca -------------------------------------------------------------------------------------------

def test_alpaca_instruction_is_kept_in_the_rwkv_instruction_template(tmp_path):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "Hi!"},
               {"instruction": "Say bye.", "output": "Bye!"},                      # input is optional
               {"instruction": "Two\r\n\r\n\r\nlines ", "input": None, "output": " a\n\nb "}]
    path = write(tmp_path / "a.json", json.dumps(records))
    for kw in ({}, {"format": "alpaca"}):
        ex = prep(tmp_path, [path], **kw).train
        assert [parts(ex, i) for i in range(len(ex))] == [
            ("Instruction: Add the numbers.\n\nInput: 2 and 3\n\nResponse:", " 5"),
            ("Instruction: Say hi.\n\nResponse:", " Hi!"),
            ("Instruction: Say bye.\n\nResponse:", " Bye!"),
            ("Instruction: Two\nlines\n\nResponse:", " a\nb")]
        # The prompt is one segment and the end marker closes the response.
        assert ex.tokens(0).tolist() == enc("Instruction: Add the numbers.\n\nInput: 2 and 3\n\nResponse:") + enc(" 5") + [0]
        assert ex.loss_positions(0).sum() == len(enc(" 5")) + 1


def test_alpaca_bad_rows(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"instruction": "x", "output": "y"}) + "\n"
                 + json.dumps({"instruction": "  ", "input": "z", "output": "y"}) + "\n"
                 + json.dumps({"instruction": "x", "input": 3, "output": "y"}) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:2: empty instruction$"):
        prep(tmp_path, [path])
    assert prep(tmp_path, [path], skip_invalid=True).report["skipped"] == {"empty instruction": 1, "non-string field": 1}


# -- unused text fields -------------------------------------------------------------------------------

def test_a_text_field_the_format_does_not_read_is_an_error_or_a_counted_warning(tmp_path):
    lines = [{"context": "a", "completion": "b", "id": 7, "blank": " ", "none": None},  # no text lost: fine
             {"context": "a", "completion": "b", "note": "keep me"},
             {"prompt": "a", "input": "also a context", "completion": "b"},
             {"text": "t", "source": "web"}]
    path = write(tmp_path / "u.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(UserError, match=rf"^{path}:2: field 'note' holds text that the completion format does not "
                                        r"read \(--allow-unused-fields"):
        prep(tmp_path, [path])
    data = prep(tmp_path, [path], allow_unused_fields=True)
    assert len(data.train) == 4
    assert data.report["unused_fields"] == {"note": 1, "input": 1, "source": 1}
    assert "ignored text fields: 'input' in 1 rows, 'note' in 1 rows, 'source' in 1 rows" in format_report(data.report)
    with pytest.raises(UserError, match=rf"^{path}:2: field 'note'"):  # the cached entry still refuses
        prep(tmp_path, [path])
    # CSV columns and the fields of chat records count too.
    table = write(tmp_path / "t.csv", "context,completion,comment\na,b,\nc,d,why\n")
    with pytest.raises(UserError, match=rf"^{table}:3: field 'comment'"):
        prep(tmp_path, [table])
    chat = write(tmp_path / "c.jsonl", json.dumps({"id": "x1", "conversations": [{"from": "human", "value": "q"},
                                                                               {"from": "gpt", "value": "r"}]}))
    with pytest.raises(UserError, match=rf"^{chat}:1: field 'id' holds text that the chat format"):
        prep(tmp_path, [chat])


def test_inspect_data_flag(tmp_path, capsys):
    from rwkv_sft.cli import main
    path = write(tmp_path / "u.jsonl", json.dumps({"instruction": "i", "output": "o", "category": "qa"}) + "\n")
    args = ["inspect-data", "--cache-dir", str(tmp_path / "cache"), path]
    assert main(args) == 2
    assert "u.jsonl:1: field 'category' holds text" in capsys.readouterr().err
    assert main(args + ["--allow-unused-fields"]) == 0
    assert "ignored text fields: 'category' in 1 rows" in capsys.readouterr().out


# -- ShareGPT -----------------------------------------------------------------------------------------

def test_sharegpt_reads_as_chat(tmp_path):
    turns = [("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")]
    share = {"system": "system", "user": "human", "assistant": "gpt"}
    a = write(tmp_path / "m.jsonl", json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}))
    b = write(tmp_path / "s.json", json.dumps([{"conversations": [{"from": share[r], "value": c} for r, c in turns]}]))
    want = rows(prep(tmp_path, [a]).train)
    assert rows(prep(tmp_path, [b]).train) == want
    assert rows(prep(tmp_path, [b], format="chat").train) == want
    bad = write(tmp_path / "bad.jsonl", json.dumps({"conversations": [{"from": "bot", "value": "x"}]}))
    with pytest.raises(UserError, match=rf"^{bad}:1: conversations item 0 has unknown from 'bot'"):
        prep(tmp_path, [bad])


# -- chat as the front-ends feed it -------------------------------------------------------------------

def test_chat_text_is_what_rwkv_chat_front_ends_feed_the_model(tmp_path):
    """RWKV-Runner encodes the whole conversation `User: ...\\n\\nAssistant: ...\\n\\n` (texts cleaned:
    CRLF -> LF, blank lines collapsed, stripped) and stops each reply at "\\n\\n": the tokens of a
    rendered chat are that encoding, token 0 only after the last reply."""
    tok = Tokenizer()
    messages = [("system", "You are terse.\r\n\r\nAlways."), ("user", " What is 2+2?\n"), ("assistant", "4."),
                ("user", "And 3+3?"), ("assistant", "It is 6.\n\nDone. ")]
    path = write(tmp_path / "c.jsonl", json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]}))
    ex = prep(tmp_path, [path], tokenizer=tok).train
    front_end = ("System: You are terse.\nAlways.\n\nUser: What is 2+2?\n\nAssistant: 4.\n\n"
                 "User: And 3+3?\n\nAssistant: It is 6.\nDone.\n\n")
    ids, loss = ex.tokens(0).tolist(), ex.loss_positions(0)
    assert ids == tok.encode(front_end) + [0] and ids.count(0) == 1
    assert parts(ex, 0, tok)[1] == " 4.\n\n It is 6.\nDone.\n\n"
    assert loss[-1] and loss[-2] and ids[-2] == tok.encode("\n\n")[0]  # loss on the terminator and the end marker
    # The prompt of a one-turn chat is exactly what `generate --chat` sends.
    one = write(tmp_path / "one.jsonl", json.dumps({"messages": [{"role": "user", "content": "Hi\r\n\r\nthere "},
                                                                 {"role": "assistant", "content": "Hello"}]}))
    prompt, completion = prep(tmp_path, [one], tokenizer=tok).train.split(0)
    assert prompt.tolist() == tok.encode(chat_prompt("Hi\r\n\r\nthere ")) == tok.encode("User: Hi\nthere\n\nAssistant:")
    assert completion.tolist() == tok.encode(" Hello\n\n") + [0]
    # G1's clean_txt exactly (RWKV-LM RWKV-v7/RWKV7-G1x-templates.txt): CRLF -> LF, newline runs -> one,
    # stripped; a lone CR is not a line end there.
    assert clean_text(" a\r\rb\r\n\r\n\r\nc\n") == "a\r\rb\nc"


# -- BOM and CRLF ---------------------------------------------------------------------------------------

PAIRS = [("Q: 1+1?", " 2"), ("ünï", " cödé")]
BOM = b"\xef\xbb\xbf"


def _csv_text(rows_, lineterminator):
    out = io.StringIO()
    w = csv.writer(out, lineterminator=lineterminator)
    w.writerow(["context", "completion"])
    w.writerows(rows_)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_bom_and_crlf_read_like_plain_lf(tmp_path, kind):
    if kind == "jsonl":
        text = "".join(json.dumps({"context": c, "completion": p}) + "\n" for c, p in PAIRS)
    elif kind == "json":
        text = json.dumps([{"context": c, "completion": p} for c, p in PAIRS], indent=1) + "\n"
    else:  # a multi-line cell too
        text = _csv_text(PAIRS + [("two\nlines", " ok")], "\n")
    plain = prep(tmp_path, [write(tmp_path / f"plain.{kind}", text)]).train
    crlf = BOM + text.replace("\n", "\r\n").encode()
    ex = prep(tmp_path, [write(tmp_path / f"bom.{kind}", crlf)]).train
    assert rows(ex) == rows(plain) and len(ex) >= 2
    assert [ex.origin(i)[1] for i in range(len(ex))] == [plain.origin(i)[1] for i in range(len(ex))]
    if kind == "csv":
        assert parts(ex, 2) == ("two\nlines", " ok")


def test_utf16_file_is_named(tmp_path):
    path = write(tmp_path / "w.jsonl", '{"context": "a", "completion": "b"}\n'.encode("utf-16"))
    with pytest.raises(UserError, match=rf"^{path}:1: UTF-16 text \(save the file as UTF-8\)$"):
        prep(tmp_path, [path])


# -- RWKV-7 G1 templates ----------------------------------------------------------------------------
# The strings below are G1's templates byte for byte: BlinkDL/RWKV-LM, RWKV-v7/RWKV7-G1x-templates.txt
# (commit b9563fc, "Think mode" and "Function call" sections; the thinking layout "<think>\n...\n
# </think>\n" as in that file's first version, b562542).

G1_TOOLS_SIGNATURES = ("System: Tools:\n- get_weather(location: string, unit?: \"celsius\" | \"fahrenheit\")\n"
                       "- get_stock_price(ticker: string)\n- translate_text(text: string, target_language: string)\n"
                       "Return only a JSON function call.\n\nUser: Translate \"Will it rain tomorrow?\" into Japanese."
                       "\n\nAssistant: ```json")
G1_TOOLS_JSON = (
    "System: Tools:\n[\n{\"name\":\"find_free_slots\",\"description\":\"Find free calendar slots\",\"arguments\":"
    "{\"date\":{\"type\":\"string\"},\"duration_minutes\":{\"type\":\"integer\"},\"time_window\":{\"type\":\"string\"}}},"
    "\n{\"name\":\"create_calendar_event\",\"description\":\"Create a calendar event\",\"arguments\":{\"title\":"
    "{\"type\":\"string\"},\"start_time\":{\"type\":\"string\"},\"end_time\":{\"type\":\"string\"},\"attendees\":"
    "{\"type\":\"array\",\"items\":{\"type\":\"string\"}}}}\n]\nReturn only a JSON function call.\n\n"
    "User: Schedule a 30-minute sync with Bob on 2026-05-08 afternoon.\n\nAssistant: ```json\n{\"name\":"
    "\"find_free_slots\",\"arguments\":{\"date\":\"2026-05-08\",\"duration_minutes\":30,\"time_window\":"
    "\"afternoon\"}}\n```\n\nUser: Function output:\n{\"free_slots\":[{\"start\":\"2026-05-08T15:00:00+09:00\","
    "\"end\":\"2026-05-08T15:30:00+09:00\"}],\"bob_email\":\"bob@example.com\"}\n\nAssistant: ```json")


def _strip_marks(shown: str) -> str:
    return shown.replace("⟦", "").replace("⟧", "").replace("<eos>", "")


def test_g1_think_template_exactly(tmp_path, capsys):
    """Thinking stays in the reply as trained text, with loss; the prompt of `generate --think` is
    the rendered conversation up to "Assistant: <think"."""
    from rwkv_sft.cli import main
    from rwkv_sft.data.formats import prompt_segments
    tok = Tokenizer()
    record = {"messages": [{"role": "system", "content": "Be exact."},
                           {"role": "user", "content": "2+2?\r\n\r\nBe brief."},
                           {"role": "assistant", "content": "<think>\nAdd them.\n\nIt is 4.\n</think>\n4"},
                           {"role": "user", "content": "3+3?"},
                           {"role": "assistant", "content": "6", "reasoning_content": "Add again."}]}
    front_end = ("System: Be exact.\n\nUser: 2+2?\nBe brief.\n\nAssistant: <think>\nAdd them.\nIt is 4.\n</think>\n4\n\n"
                 "User: 3+3?\n\nAssistant: <think>\nAdd again.\n</think>\n6\n\n")
    path = write(tmp_path / "t.jsonl", json.dumps(record))
    ex = prep(tmp_path, [path], tokenizer=tok).train
    assert ex.tokens(0).tolist() == tok.encode(front_end) + [0]
    assert parts(ex, 0, tok)[1] == " <think>\nAdd them.\nIt is 4.\n</think>\n4\n\n <think>\nAdd again.\n</think>\n6\n\n"
    # G1 think mode: "User: xxx\n\nAssistant: <think"; the rendered reply continues it.
    asking = {"messages": record["messages"][:4]}
    think_prompt = "".join(prompt_segments(asking, think=True))
    assert think_prompt == front_end[:front_end.rindex("Assistant:")] + "Assistant: <think"
    assert front_end.startswith(think_prompt)
    assert chat_prompt("2+2?", system="S", think=True) == "System: S\n\nUser: 2+2?\n\nAssistant: <think"
    # An empty reasoning_content is G1's "fake thinking" block.
    fake = write(tmp_path / "f.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": "hello", "reasoning_content": ""}]}))
    assert tok.decode(prep(tmp_path, [fake], tokenizer=tok).train.tokens(0).tolist()[:-1]) == \
        "User: hi\n\nAssistant: <think>\n</think>\nhello\n\n"
    # inspect-data --show prints what the front-ends send, loss marked.
    assert main(["inspect-data", "--cache-dir", str(tmp_path / "cache"), path, "--show", "1"]) == 0
    shown = capsys.readouterr().out.split("---\n", 1)[1]
    assert _strip_marks(shown).rstrip("\n") == front_end.rstrip("\n")
    assert "Assistant:⟦ <think>\nAdd them." in shown


def test_g1_function_call_templates_exactly(tmp_path):
    """A record's tools (a JSON list one tool per line, or signature lines), an assistant's tool call
    (OpenAI's tool_calls, arguments as JSON text) and a tool's output render as G1's templates."""
    from rwkv_sft.data.formats import prompt_segments
    tok = Tokenizer()
    tools = [{"name": "find_free_slots", "description": "Find free calendar slots", "arguments": {
                 "date": {"type": "string"}, "duration_minutes": {"type": "integer"}, "time_window": {"type": "string"}}},
             {"name": "create_calendar_event", "description": "Create a calendar event", "arguments": {
                 "title": {"type": "string"}, "start_time": {"type": "string"}, "end_time": {"type": "string"},
                 "attendees": {"type": "array", "items": {"type": "string"}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "find_free_slots", "arguments": json.dumps(
        {"date": "2026-05-08", "duration_minutes": 30, "time_window": "afternoon"})}}
    output = ('{"free_slots":[{"start":"2026-05-08T15:00:00+09:00","end":"2026-05-08T15:30:00+09:00"}],'
              '"bob_email":"bob@example.com"}')
    messages = [{"role": "user", "content": "Schedule a 30-minute sync with Bob on 2026-05-08 afternoon."},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": output}]
    # The template ends by opening the reply with "```json": our prompt is everything before it.
    assert "".join(prompt_segments({"tools": tools, "messages": messages})) + " ```json" == G1_TOOLS_JSON
    signatures = ("- get_weather(location: string, unit?: \"celsius\" | \"fahrenheit\")\n- get_stock_price(ticker: string)"
                  "\n- translate_text(text: string, target_language: string)")
    question = "Translate \"Will it rain tomorrow?\" into Japanese."
    asking = {"tools": signatures, "messages": [{"role": "user", "content": question}]}
    assert "".join(prompt_segments(asking)) + " ```json" == G1_TOOLS_SIGNATURES
    # In training data the calls carry loss like any reply, the tool list and outputs none.
    second = {"name": "create_calendar_event", "arguments": {
        "title": "Sync", "start_time": "2026-05-08T15:00:00+09:00", "end_time": "2026-05-08T15:30:00+09:00",
        "attendees": ["bob@example.com"]}}
    record = {"tools": tools, "messages": messages + [{"role": "assistant", "tool_calls": [{"function": second}]}]}
    path = write(tmp_path / "tools.jsonl", json.dumps(record))
    ex = prep(tmp_path, [path], tokenizer=tok).train
    reply = " ```json\n" + json.dumps(second, separators=(",", ":")) + "\n```\n\n"
    assert tok.decode(ex.tokens(0).tolist()) == G1_TOOLS_JSON[:-len(" ```json")] + reply
    first_call = G1_TOOLS_JSON[G1_TOOLS_JSON.index(" ```json\n{"):G1_TOOLS_JSON.index("\n\nUser: Function")] + "\n\n"
    assert parts(ex, 0, tok)[1] == first_call + reply
    # A system prompt comes before the tool list, in the one System turn.
    with_system = {"tools": signatures, "messages": [{"role": "system", "content": "Be brief."}] + asking["messages"]}
    assert "".join(prompt_segments(with_system)).startswith("System: Be brief.\nTools:\n- get_weather(")
    broken = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}
    bad = write(tmp_path / "bad.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}, broken]}))
    with pytest.raises(UserError, match=rf"^{bad}:1: messages item 1: the arguments of 'f' are not valid JSON$"):
        prep(tmp_path, [bad])


def test_message_fields_and_trailing_turns_are_never_dropped_unseen(tmp_path):
    """A message's field that the chat format does not read (a name) and the turns after the last reply
    stop the run, or are counted with --allow-unused-fields; tool messages are read."""
    chat = {"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "hello"},
                         {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok", "weight": 1}]}
    trailing = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                  {"from": "human", "value": "and then?"}]}
    path = write(tmp_path / "m.jsonl", json.dumps(chat) + "\n" + json.dumps(trailing) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:1: field 'messages\[\]\.name' holds text that the chat format"):
        prep(tmp_path, [path])
    data = prep(tmp_path, [path], allow_unused_fields=True)
    assert data.report["unused_fields"] == {"messages[].name": 1, "turns after the last reply": 1}
    assert ("ignored text fields: 'messages[].name' in 1 rows, turns after the last reply in 1 rows"
            in format_report(data.report))
    assert parts(data.train, 0)[0] == "User: hi\n\nAssistant:User: Function output:\n42\n\nAssistant:"
    assert parts(data.train, 1) == ("User: q\n\nAssistant:", " a\n\n")
