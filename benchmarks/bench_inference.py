"""Prefill and single-token decode on CPU: rwkv-sft against the `rwkv` pip package (RWKV_x070, cpu fp32).

Both load the same random checkpoint (BlinkDL .pth layout). Prefill = one forward over a prompt
of T tokens, returning only the last logits; decode = one token at a time carrying the state.
Prints tokens/s for each and the ratio. Targets (DESIGN.md §6): prefill >= 2x, decode >= 1x.

    python benchmarks/bench_inference.py [--n-layer 12 --n-embd 768 --prompt 512 --decode 64 --threads 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def timed(fn, repeats):
    fn()  # warm-up (JIT / allocator)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    from rwkv.model import RWKV  # the outside reference

    from rwkv_sft import RWKV7, RWKV7Config

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tmp = tempfile.mkdtemp()
    model.save(f"{tmp}/m.pth")
    theirs = RWKV(f"{tmp}/m", "cpu fp32")
    ours = RWKV7.load(f"{tmp}/m.pth", dtype=torch.float32).eval().decoding_layout()  # as `rwkv-sft generate`

    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    ids = prompt[0].tolist()

    def our_prefill():
        with torch.inference_mode():
            return ours(prompt, full_output=False)

    def their_prefill():
        return theirs.forward(ids, None)

    def our_decode():
        with torch.inference_mode():
            _, state = ours(prompt[:, :8], full_output=False)
            tok = prompt[:, :1]
            for _ in range(args.decode):
                logits, state = ours(tok, state, full_output=False)
                tok = logits.argmax(-1, keepdim=True)

    def their_decode():
        _, state = theirs.forward(ids[:8], None)
        tok = ids[0]
        for _ in range(args.decode):
            logits, state = theirs.forward([tok], state)
            tok = int(logits.argmax())

    with torch.inference_mode():
        a = ours(prompt, full_output=False)[0][0]
    b = theirs.forward(ids, None)[0]
    max_diff = (a - b).abs().max().item()

    rows = []
    for name, mine, ref, n in [("prefill", our_prefill, their_prefill, args.prompt),
                               ("decode", our_decode, their_decode, args.decode)]:
        t_mine, t_ref = timed(mine, args.repeats), timed(ref, args.repeats)
        rows.append((name, n / t_ref, n / t_mine, t_ref / t_mine))
    print(f"\nmodel L={args.n_layer} C={args.n_embd} V={args.vocab}, prompt {args.prompt}, "
          f"{args.threads} threads, fp32; max |logit diff| {max_diff:.2e}")
    print(f"{'phase':<8} {'rwkv pkg tok/s':>15} {'rwkv-sft tok/s':>15} {'speed-up':>9}")
    for name, ref_tps, my_tps, ratio in rows:
        print(f"{name:<8} {ref_tps:>15.1f} {my_tps:>15.1f} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
