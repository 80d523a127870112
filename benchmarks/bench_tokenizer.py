"""Tokenizer throughput: rwkv_sft.Tokenizer against the `rwkv` package's TRIE tokenizer.

Same ~5 MB of mixed text (English, code, Chinese, emoji, other scripts, whitespace, control
characters) for both; prints MB/s (of UTF-8 input for encode, of output for decode).

    python benchmarks/bench_tokenizer.py [--mb 5] [--repeat 3]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_tokenizer import mixed_corpus  # noqa: E402  (the corpus the tests check byte-exactness on)

from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # noqa: E402
import rwkv.rwkv_tokenizer  # noqa: E402

from rwkv_sft import Tokenizer  # noqa: E402


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=5.0, help="approximate corpus size in MB of UTF-8")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    docs = mixed_corpus(int(args.mb * 1e6 / 1.35), seed=0)  # ~1.35 UTF-8 bytes per character
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    mb = n_bytes / 1e6

    ours = Tokenizer()
    trie = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.rwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt"))

    rows = []
    t_trie, ids_trie = best_time(lambda: [trie.encode(d) for d in docs], args.repeat)
    t_ours, ids_ours = best_time(lambda: [ours.encode(d) for d in docs], args.repeat)
    t_batch, ids_batch = best_time(lambda: ours.encode_batch(docs), args.repeat)
    assert ids_ours == ids_trie == ids_batch, "encodings differ"
    rows.append(("encode", mb / t_trie, mb / t_ours))
    rows.append(("encode_batch", mb / t_trie, mb / t_batch))

    t_trie_d, text_trie = best_time(lambda: [trie.decode(i) for i in ids_trie], args.repeat)
    t_ours_d, text_ours = best_time(lambda: [ours.decode(i) for i in ids_trie], args.repeat)
    assert text_ours == text_trie == docs, "decodings differ"
    rows.append(("decode", mb / t_trie_d, mb / t_ours_d))

    n_tokens = sum(map(len, ids_trie))
    print(f"corpus: {len(docs)} documents, {mb:.2f} MB UTF-8, {n_tokens} tokens; "
          f"best of {args.repeat}")
    print(f"{'operation':<14} {'TRIE MB/s':>10} {'ours MB/s':>10} {'speed-up':>9}")
    for name, base, new in rows:
        print(f"{name:<14} {base:>10.2f} {new:>10.2f} {new / base:>8.1f}x")


if __name__ == "__main__":
    main()
