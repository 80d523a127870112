"""Generate the demo's bundled data: ISO dates -> dates in words, train and held-out.

    python examples/make_demo_data.py  # rewrites src/rwkv_sft/demo/dates_{train,heldout}.jsonl
                                       # and dates_pairs_{train,heldout}.jsonl

The task needs real sequence modelling (reorder three fields, map the month number to its
name, drop a leading zero) yet a tiny model learns it in minutes. Deterministic (fixed seed);
no date of the held-out file appears in the training file.

The pair files (`rwkv-sft demo --method dpo`) hold the same dates as preference pairs: chosen the
American style (" February 3, 1974"), rejected the demo's own (" 3 February 1974"); the first
`--pairs` training dates and every held-out date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

MONTHS = ("January February March April May June July August September October November December").split()
FIRST, LAST = datetime.date(1950, 1, 1), datetime.date(2049, 12, 31)
OUT = Path(__file__).resolve().parent.parent / "src" / "rwkv_sft" / "demo"


def example(d: datetime.date) -> dict:
    return {"context": f"Date: {d.isoformat()}\nIn words:", "completion": f" {d.day} {MONTHS[d.month - 1]} {d.year}"}


def pair(d: datetime.date) -> dict:
    old = example(d)
    return {"prompt": old["context"], "chosen": f" {MONTHS[d.month - 1]} {d.day}, {d.year}", "rejected": old["completion"]}


def make(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    days = (LAST - FIRST).days + 1
    picked = random.Random(seed).sample(range(days), n_train + n_heldout)  # distinct dates
    dates = [FIRST + datetime.timedelta(days=k) for k in picked]
    return dates[n_heldout:], dates[:n_heldout]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--pairs", type=int, default=400, help="training pairs (the first training dates)")
    p.add_argument("--seed", type=int, default=20240515)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    train, heldout = make(args.train, args.heldout, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "dates_train.jsonl", [example(d) for d in train])
    write_jsonl(args.out / "dates_heldout.jsonl", [example(d) for d in heldout])
    write_jsonl(args.out / "dates_pairs_train.jsonl", [pair(d) for d in train[:args.pairs]])
    write_jsonl(args.out / "dates_pairs_heldout.jsonl", [pair(d) for d in heldout])
    print(f"wrote {len(train)} + {len(heldout)} examples and {min(args.pairs, len(train))} + {len(heldout)} pairs "
          f"to {args.out}")


if __name__ == "__main__":
    main()
