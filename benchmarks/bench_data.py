"""Tokenization throughput of prepare_data on JSON Lines against the plain per-line loop.

Baseline: for each line, json.loads then tokenizer.encode(context) and encode(completion).
Ours: prepare_data building a fresh cache (parse, render, batch-encode, write .npy), then the
same call again reading the cache. Run: python benchmarks/bench_data.py [--mb 20]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from rwkv_sft import Tokenizer
from rwkv_sft.data import DataConfig, prepare_data


def make_jsonl(path, megabytes, seed=0):
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over a lazy dog while 你好 世界 data model token "
             "learning rate 12345 é ü café naïve").split()
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            ctx = " ".join(rng.choice(words) for _ in range(rng.randint(10, 300))) + "\nAnswer:"
            comp = " " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 100)))
            line = json.dumps({"context": ctx, "completion": comp}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
    return size


def baseline(path, tok):
    n = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            n += len(tok.encode(r["context"])) + len(tok.encode(r["completion"])) + 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20.0)
    args = ap.parse_args()
    tok = Tokenizer()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.jsonl")
        size = make_jsonl(path, args.mb)
        rows = []
        t = time.perf_counter()
        n_base = baseline(path, tok)
        rows.append(("baseline: json.loads + encode per line", time.perf_counter() - t, n_base))
        cfg = DataConfig([path], max_len=4096)
        t = time.perf_counter()
        data = prepare_data(cfg, tok, cache_dir=os.path.join(d, "cache"), show_progress=False)
        rows.append(("prepare_data, building the cache", time.perf_counter() - t, data.report["train"]["tokens"]))
        t = time.perf_counter()
        data = prepare_data(cfg, tok, cache_dir=os.path.join(d, "cache"), show_progress=False)
        rows.append(("prepare_data, cache hit", time.perf_counter() - t, data.report["train"]["tokens"]))
    print(f"JSONL: {size / 1e6:.1f} MB, {len(data.train)} examples, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"{'method':42s} {'seconds':>8s} {'MB/s':>8s} {'speed-up':>9s} {'tokens':>10s}")
    for name, dt, n in rows:
        print(f"{name:42s} {dt:8.2f} {size / 1e6 / dt:8.1f} {rows[0][1] / dt:8.2f}x {n:10d}")


if __name__ == "__main__":
    main()
