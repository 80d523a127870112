"""The tokenization cache: reuse, invalidation, atomic entries, one builder among processes."""
import json
import multiprocessing as mp
import os

import pytest

from rwkv_sft.data import DataConfig, prepare_data
from rwkv_sft.errors import UserError
from test_data_support import ByteTokenizer, write

ROWS = "".join(json.dumps({"context": f"question {i}?", "completion": f" answer {i}"}) + "\n" for i in range(20))


def prep(cache, files, tok=None, **kw):
    return prepare_data(DataConfig(files, **kw), tok or ByteTokenizer(), cache_dir=str(cache), show_progress=False)


def test_reuse_without_tokenizing(tmp_path):
    path = write(tmp_path / "a.jsonl", ROWS)
    tok = ByteTokenizer()
    first = prep(tmp_path / "c", [path], tok)
    assert tok.calls > 0 and not first.report["files"][0]["cached"]
    calls = tok.calls
    second = prep(tmp_path / "c", [path], tok, max_len=12)  # truncation settings do not change the cache
    assert second.report["files"][0]["cached"]
    assert tok.calls - calls <= 2  # at most the end marker and the identity probe, never the data
    third = prep(tmp_path / "c", [path], tok)
    assert [third.train.tokens(i).tolist() for i in range(20)] == [first.train.tokens(i).tolist() for i in range(20)]
    assert third.report == {**first.report, "files": third.report["files"]}
    entries = [e for e in os.listdir(tmp_path / "c") if not e.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].startswith(".tmp")  # one entry, no temporary left


def test_same_content_elsewhere_reuses_entry(tmp_path):
    a = write(tmp_path / "a.jsonl", ROWS)
    b = write(tmp_path / "b.jsonl", ROWS)
    prep(tmp_path / "c", [a])
    data = prep(tmp_path / "c", [b])
    assert data.report["files"][0]["cached"] and data.train.origin(0)[0] == b


@pytest.mark.parametrize("change", ["content", "end_marker", "format", "field", "tokenizer"])
def test_invalidation(tmp_path, change):
    path = write(tmp_path / "a.jsonl", ROWS)
    prep(tmp_path / "c", [path])
    kw, tok = {}, None
    if change == "content":
        write(tmp_path / "a.jsonl", ROWS.replace("answer 3", "answer 4"))
    elif change == "end_marker":
        kw = {"end_marker": "\n\n"}
    elif change == "format":
        kw = {"format": "completion"}
    elif change == "field":
        kw = {"context_field": "context"}
    else:
        tok = type("OtherTokenizer", (ByteTokenizer,), {})()
    data = prep(tmp_path / "c", [path], tok, **kw)
    assert not data.report["files"][0]["cached"]


def _worker(args):
    cache, path, rank = args
    data = prep(cache, [path])
    return data.report["files"][0]["cached"], data.train.tokens(5).tolist()


def test_one_builder_among_processes(tmp_path):
    path = write(tmp_path / "a.jsonl", ROWS * 50)
    with mp.get_context("fork").Pool(3) as pool:
        results = pool.map(_worker, [(tmp_path / "c", path, r) for r in range(3)])
    assert sorted(cached for cached, _ in results) == [False, True, True]
    assert len({tuple(t) for _, t in results}) == 1


def _distributed(rank, world, init, cache, path, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        data = prep(cache, [path])
        result = ("ok", data.report["files"][0]["cached"])
    except UserError as e:
        result = ("error", str(e))
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("bad", [False, True])
def test_distributed_rank0_builds_and_errors_reach_every_rank(tmp_path, bad):
    path = write(tmp_path / "a.jsonl", ROWS + ("{oops\n" if bad else ""))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_distributed, args=(r, 2, f"file://{tmp_path}/init", tmp_path / "c", path,
                                                    tmp_path / "out")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [json.load(open(f"{tmp_path}/out.{r}")) for r in range(2)]
    if bad:
        assert results[0] == results[1] and results[0][0] == "error"
        assert results[0][1].startswith(f"{path}:21: invalid JSON")
    else:
        assert results == [["ok", False], ["ok", True]]
