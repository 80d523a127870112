"""Formats (JSONL, JSON array, CSV, Parquet, chat, text, field names) and every kind of bad input."""
import json
import os

import numpy as np
import pytest

from rwkv_sft.data import DataConfig, prepare_data
from rwkv_sft.errors import UserError
from test_data_support import ByteTokenizer, write

TOK = ByteTokenizer()
enc = TOK.encode


def prep(tmp_path, files, **kw):
    return prepare_data(DataConfig(files, **kw), TOK, cache_dir=str(tmp_path / "cache"), show_progress=False)


def rows(ex):
    return [(ex.tokens(i).tolist(), ex.loss_positions(i).tolist()) for i in range(len(ex))]


def expected(segments):
    """[(ids, loss)] -> (ids, flags), first flag False."""
    ids = [t for s, _ in segments for t in s]
    flags = [f for s, loss in segments for f in [loss] * len(s)]
    return ids, [False] + flags[1:]


PAIRS = [("Q: 1+1?\nA:", " 2"), ("", "empty context"), ("ünï ", "cödé")]


def test_jsonl_json_array_csv_field_names_agree(tmp_path):
    want = [expected([(enc(c) or [0], False), (enc(p) + [0], True)]) for c, p in PAIRS]
    jsonl = write(tmp_path / "a.jsonl", "".join(json.dumps({"context": c, "completion": p}) + "\n\n" for c, p in PAIRS))
    array = write(tmp_path / "b.json", json.dumps([{"prompt": c, "response": p} for c, p in PAIRS], indent=1))
    inout = write(tmp_path / "c.jsonl", "\n".join(json.dumps({"input": c, "output": p}) for c, p in PAIRS))
    mine = write(tmp_path / "d.jsonl", "\n".join(json.dumps({"q": c, "a": p, "context": 1}) for c, p in PAIRS))
    import csv
    with open(tmp_path / "e.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["context", "completion"])
        w.writerows(PAIRS)
    lines = {jsonl: [1, 3, 5], inout: [1, 2, 3], str(tmp_path / "e.csv"): [2, 4, 5]}
    for path, kw in [(jsonl, {}), (array, {}), (inout, {}), (mine, {"context_field": "q", "completion_field": "a"}),
                     (str(tmp_path / "e.csv"), {})]:
        ex = prep(tmp_path, [path], **kw).train
        assert rows(ex) == want, path
        if path in lines:
            assert [ex.origin(i)[1] for i in range(len(ex))] == lines[path], path


def test_json_array_and_csv_lines(tmp_path):
    path = write(tmp_path / "a.json", '[\n {"context": "a", "completion": "b"},\n\n {"context": "c",\n "completion": "d"}\n]')
    ex = prep(tmp_path, [path]).train
    assert [ex.origin(i)[1] for i in range(2)] == [2, 4]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"context": [c for c, _ in PAIRS], "completion": [p for _, p in PAIRS]}), tmp_path / "a.parquet")
    ex = prep(tmp_path, [str(tmp_path / "a.parquet")]).train
    assert rows(ex) == [expected([(enc(c) or [0], False), (enc(p) + [0], True)]) for c, p in PAIRS]


def test_chat_loss_on_every_assistant_turn(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                         {"role": "assistant", "content": "ciao"}, {"role": "user", "content": "ignored"}]}
    path = write(tmp_path / "c.jsonl", json.dumps(chat))
    # The user turn after the last reply teaches nothing: refused, or counted when allowed.
    with pytest.raises(UserError, match=rf"^{path}:1: the turns after the last reply hold text that the chat format"):
        prep(tmp_path, [path])
    data = prep(tmp_path, [path], allow_unused_fields=True)
    assert data.report["unused_fields"] == {"turns after the last reply": 1}
    ex = data.train
    # Turns end with "\n\n" as in RWKV's chat front-ends; the end marker follows the last reply only.
    want = expected([(enc("System: Be brief.\n\n"), False), (enc("User: hi\n\n"), False), (enc("Assistant:"), False),
                     (enc(" hello\n\n"), True), (enc("User: bye\n\n"), False),
                     (enc("Assistant:"), False), (enc(" ciao\n\n") + [0], True)])
    assert rows(ex) == [want]
    prompt, completion = ex.split(0)
    assert completion.tolist() == enc(" ciao\n\n") + [0]
    assert prompt.tolist() == want[0][:len(want[0]) - len(completion)]
    # With "\n\n" as the end marker nothing follows the last reply's own "\n\n".
    ex = prep(tmp_path, [path], end_marker="\n\n", allow_unused_fields=True).train
    text = TOK.decode(ex.tokens(0).tolist())
    assert text == "System: Be brief.\n\nUser: hi\n\nAssistant: hello\n\nUser: bye\n\nAssistant: ciao\n\n"
    flags = ex.loss_positions(0)
    assert TOK.decode(ex.tokens(0)[flags].tolist()) == " hello\n\n ciao\n\n"


def test_chat_truncation_drops_oldest_tokens_keeping_flags(tmp_path):
    chat = {"messages": [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 10},
                         {"role": "user", "content": "z"}, {"role": "assistant", "content": "w" * 5}]}
    path = write(tmp_path / "c.jsonl", json.dumps(chat))
    full = prep(tmp_path, [path], max_len=1000).train
    cut = prep(tmp_path, [path], max_len=30).train
    n = cut.length(0)
    assert n == 30
    assert cut.tokens(0).tolist() == full.tokens(0).tolist()[-30:]
    assert cut.loss_positions(0)[1:].tolist() == full.loss_positions(0)[-29:].tolist()


def test_text_loss_after_first_token(tmp_path):
    path = write(tmp_path / "t.jsonl", json.dumps({"text": "hello world"}))
    ex = prep(tmp_path, [path]).train
    assert rows(ex) == [(enc("hello world") + [0], [False] + [True] * 11)]


def test_weights_counts_and_eval(tmp_path):
    a = write(tmp_path / "a.jsonl", "".join(json.dumps({"context": "a", "completion": str(i)}) + "\n" for i in range(10)))
    b = write(tmp_path / "b.jsonl", "".join(json.dumps({"context": "b", "completion": str(i)}) + "\n" for i in range(4)))
    data = prep(tmp_path, [f"{a}:0.5", f"{b}*3"], eval_files=[b])
    ex = data.train
    assert len(ex) == 14 and len(data.eval) == 4
    counts = [np.bincount(ex.epoch_indices(e, seed=1), minlength=14) for e in range(20)]
    assert all((c[10:] == 3).all() for c in counts)            # counted: exactly 3 copies every epoch
    assert all(set(c[:10]) <= {0, 1} for c in counts)
    assert 60 <= sum(c[:10].sum() for c in counts) <= 140       # weight 0.5: about half each epoch
    assert not all((counts[0] == c).all() for c in counts[1:])  # ... a different half per epoch
    assert (ex.epoch_indices(3, seed=1) == ex.epoch_indices(3, seed=1)).all()
    held = prep(tmp_path, [a], eval_fraction=0.3, seed=5)
    assert len(held.eval) == 3 and len(held.train) == 7
    lines = lambda e: {e.origin(i)[1] for i in range(len(e))}  # noqa: E731
    assert lines(held.eval).isdisjoint(lines(held.train)) and len(lines(held.eval) | lines(held.train)) == 10


GOOD = json.dumps({"context": "a", "completion": "b"}) + "\n"
BAD_ROWS = [
    ("invalid JSON", GOOD + '{"context": "a", "completion": \n'),
    ("missing field", GOOD + json.dumps({"context": "a"}) + "\n"),
    ("non-string field", GOOD + json.dumps({"context": "a", "completion": 3}) + "\n"),
    ("empty completion", GOOD + json.dumps({"context": "a", "completion": ""}) + "\n"),
    ("invalid UTF-8", GOOD.encode() + b'{"context": "\xff\xfe", "completion": "b"}\n'),
    ("no assistant turn", GOOD + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
]


@pytest.mark.parametrize("reason,content", BAD_ROWS, ids=[r for r, _ in BAD_ROWS])
def test_bad_rows_name_file_and_line(tmp_path, reason, content):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(UserError) as e:
        prep(tmp_path, [path])
    assert str(e.value).startswith(f"{path}:2: "), str(e.value)
    data = prep(tmp_path, [path], skip_invalid=True)
    assert len(data.train) == 1 and data.report["skipped"] == {reason: 1}
    with pytest.raises(UserError, match=f"^{path}:2: "):  # a cached entry still fails without skip_invalid
        prep(tmp_path, [path])


def test_bad_json_array_names_line(tmp_path):
    path = write(tmp_path / "bad.json", '[\n {"context": "a", "completion": "b"},\n {"context": \n]')
    with pytest.raises(UserError, match=rf"^{path}:4: invalid JSON"):
        prep(tmp_path, [path])


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path / "empty.json", content)
    good = write(tmp_path / "good.jsonl", GOOD)
    with pytest.raises(UserError, match=rf"^{path}:1: .*empty"):
        prep(tmp_path, [good, path])
    assert prep(tmp_path, [good, path], skip_invalid=True).report["skipped"] == {"empty file": 1}


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        prep(tmp_path, [str(tmp_path / "nope.jsonl")], skip_invalid=True)
    os.mkdir(tmp_path / "dir")
    with pytest.raises(UserError, match="dir: is a directory"):
        prep(tmp_path, [str(tmp_path / "dir")])


def test_only_invalid_rows_is_an_error(tmp_path):
    path = write(tmp_path / "bad.jsonl", "{oops\n")
    with pytest.raises(UserError, match="no valid training examples"):
        prep(tmp_path, [path], skip_invalid=True)


def test_bad_settings():
    for kw in [{"max_len": 1}, {"anchor_fraction": 1.0}, {"format": "xml"}, {"end_marker": ""}]:
        with pytest.raises(UserError):
            DataConfig(["x"], **kw)
