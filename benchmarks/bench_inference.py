"""Prefill and token-by-token decoding on CPU: rwkv-sft against the `rwkv` pip package (RWKV_x070, cpu fp32).

Both load the same random checkpoint (BlinkDL .pth layout). Rows:
  prefill   one forward over a prompt of --prompt tokens, last logits only
  decode    `load_model` as it is, then `as_decoder(model)(token, state, full_output=False)` per token
            (the fused step on the model's own weights, as `generate(model, ...)` decodes)
  generate  `generate()` (greedy, no stop strings) on that model
  cli       what `rwkv-sft generate` runs: `Decoder(model)`, then `generate()`
  decode-py the decode loop with the C step switched off (RWKV_SFT_DECODE_KERNELS=0: the PyTorch step)
            through `Decoder(model)` made so, which then keeps the projections transposed (as
            `rwkv-sft generate` without a C compiler)
  cli-bf16  `rwkv-sft generate --dtype bf16`: the cli row on bf16 weights (half the bytes per token),
            still against the package in fp32
The package side of every decoding row is its own `forward([token], state)` loop with argmax.
Ours and the package run interleaved, --repeats times; the table shows median tokens/s and the
median of the per-repeat ratios, which survive a busy machine better than absolute numbers.
Targets (docs/rwkv7.md): prefill >= 2x; decode and generate >= 1x; cli >= 1.2x.

    python benchmarks/bench_inference.py [--n-layer 12 --n-embd 768 --prompt 512 --decode 64 --threads 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch


def seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    from rwkv.model import RWKV  # the outside reference

    from rwkv_sft import RWKV7, RWKV7Config, Tokenizer
    from rwkv_sft.weights import load_model, save_model
    from rwkv_sft.infer.decoder import Decoder, as_decoder
    from rwkv_sft.infer.generate import generate

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tmp = tempfile.mkdtemp()
    try:
        save_model(model, f"{tmp}/m.pth")
        del model
        theirs = RWKV(f"{tmp}/m", "cpu fp32")
        ours = load_model(f"{tmp}/m.pth")                                  # the default Python path
        cli = Decoder(load_model(f"{tmp}/m.pth", dtype=torch.float32).eval())  # as the CLI loads
        cli_bf16 = Decoder(load_model(f"{tmp}/m.pth", dtype=torch.bfloat16).eval())
    finally:
        shutil.rmtree(tmp)
    tokenizer = Tokenizer()

    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    ids = prompt[0].tolist()
    n = args.decode

    def our_prefill():
        with torch.inference_mode():
            ours(prompt, full_output=False)

    def their_prefill():
        theirs.forward(ids, None)

    def our_decode(decoder=as_decoder(ours)):
        with torch.inference_mode():
            logits, state = decoder(prompt[:, :8], full_output=False)
            for _ in range(n):
                logits, state = decoder(logits.argmax(-1, keepdim=True), state, full_output=False)

    def without_kernels(fn):
        before = os.environ.get("RWKV_SFT_DECODE_KERNELS", "1")
        os.environ["RWKV_SFT_DECODE_KERNELS"] = "0"
        try:
            return fn()
        finally:
            os.environ["RWKV_SFT_DECODE_KERNELS"] = before

    in_pytorch = without_kernels(lambda: Decoder(ours))

    def our_decode_in_pytorch():
        without_kernels(lambda: our_decode(in_pytorch))

    def their_decode():
        logits, state = theirs.forward(ids[:8], None)
        for _ in range(n):
            logits, state = theirs.forward([int(logits.argmax())], state)

    def our_generate(m):
        out = generate(m, tokenizer, ids[:8], max_new_tokens=n + 1, temperature=0, stop=(), stop_at_eos=False,
                       stream=lambda piece: None)
        assert len(out.tokens) == n + 1

    with torch.inference_mode():  # the same numbers: a prompt, then one decoding step
        a, state = ours(prompt, full_output=False)
        a_step = as_decoder(ours)(prompt[:, :1], state, full_output=False)[0]
    b, their_state = theirs.forward(ids, None)
    b_step = theirs.forward(ids[:1], their_state)[0]
    max_diff = max((a[0] - b).abs().max().item(), (a_step[0] - b_step).abs().max().item())

    phases = [("prefill", args.prompt, our_prefill, their_prefill),
              ("decode", n, our_decode, their_decode),
              ("generate", n, lambda: our_generate(ours), their_decode),
              ("cli", n, lambda: our_generate(cli), their_decode),
              ("decode-py", n, our_decode_in_pytorch, their_decode),
              ("cli-bf16", n, lambda: our_generate(cli_bf16), their_decode)]
    for _, _, mine, ref in phases:  # warm-up (allocator, the package's TorchScript)
        mine()
        ref()
    times = {name: ([], []) for name, *_ in phases}
    for rep in range(args.repeats):
        for name, _, mine, ref in phases:
            pair = (mine, ref) if rep % 2 == 0 else (ref, mine)  # alternate who goes first
            t = [seconds(f) for f in pair]
            t_mine, t_ref = t if rep % 2 == 0 else t[::-1]
            times[name][0].append(t_mine)
            times[name][1].append(t_ref)

    print(f"\nmodel L={args.n_layer} C={args.n_embd} V={args.vocab}, prompt {args.prompt}, decode {n} tokens, "
          f"{args.threads} threads, fp32, {args.repeats} interleaved repeats; max |logit diff| {max_diff:.2e}")
    print(f"{'phase':<9} {'rwkv pkg tok/s':>15} {'rwkv-sft tok/s':>15} {'ratio (median)':>15} {'min':>6} {'max':>6}")
    for name, tokens, *_ in phases:
        mine, ref = times[name]
        ratios = [r / m for m, r in zip(mine, ref)]
        print(f"{name:<9} {tokens / statistics.median(ref):>15.1f} {tokens / statistics.median(mine):>15.1f} "
              f"{statistics.median(ratios):>14.2f}x {min(ratios):>5.2f}x {max(ratios):>5.2f}x")


if __name__ == "__main__":
    main()
