"""`rwkv-sft eval`: completion loss, perplexity, token accuracy and exact match of a checkpoint."""
from __future__ import annotations

import json

import torch


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="CKPT", help=".pth (BlinkDL layout) or .safetensors checkpoint")
    p.add_argument("--adapter", metavar="FILE", help="adapter.safetensors of a parameter-efficient run on --model")
    p.add_argument("--state", metavar="FILE", help="learned initial state (state.pth of a state-tuning run) to start from")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="examples to evaluate (JSONL/JSON, same formats as training); repeat for several")
    p.add_argument("--format", default="auto", choices=["auto", "completion", "chat", "text"])
    p.add_argument("--max-len", type=int, default=1024, help="tokens per example after truncation (default 1024)")
    p.add_argument("--end-marker", default="eos", help='"eos" (token 0, default) or a string such as "\\n\\n"')
    p.add_argument("--exact-match", type=int, default=64, metavar="N",
                   help="examples checked for exact match of the greedy completion (default 64; 0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation limit for exact match (default: 2 x the reference length + 8)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass (default 4096)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--wkv-backend", default="auto", choices=["auto", "chunked", "reference", "cuda", "fla"])
    p.add_argument("--samples", type=int, default=0, metavar="K", help="also print K completions beside their references")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def run(args) -> int:
    from ..data import DataConfig, prepare_data
    from ..errors import UserError
    from ..model import RWKV7
    from ..tokenizer import Tokenizer
    from .evaluate import evaluate
    from ..utils import resolve_device
    from .loop import resolve_precision

    if args.exact_match < 0 or args.batch_tokens < 1:
        raise UserError("--exact-match must be >= 0 and --batch-tokens >= 1")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    tokenizer = Tokenizer()
    data = prepare_data(DataConfig(train_files=args.data, format=args.format, max_len=args.max_len,
                                   end_marker=args.end_marker), tokenizer=tokenizer, show_progress=not args.json)
    model = RWKV7.load(args.model, dtype=torch.float32, device=device, adapter=args.adapter)
    if args.state:
        from ..adapters.state import load_state
        load_state(model, args.state)
    model.wkv_backend = args.wkv_backend
    result = evaluate(model, data.train, tokenizer, batch_tokens=args.batch_tokens,
                      exact_match_samples=args.exact_match, max_new_tokens=args.max_new_tokens,
                      device=device, precision=precision)
    samples = result.pop("samples", [])
    if args.json:
        print(json.dumps({"model": args.model, "adapter": args.adapter, "state": args.state, "data": args.data, **result,
                          "samples": samples[:args.samples]}, ensure_ascii=False))
        return 0
    rows = [("examples", f"{result['examples']}"), ("loss tokens", f"{result['loss_tokens']}"),
            ("loss", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.3f}"),
            ("token accuracy", f"{result['token_accuracy']:.2%}")]
    if "exact_match" in result:
        hits = sum(s["match"] for s in samples)
        rows.append(("exact match", f"{result['exact_match']:.2%} ({hits}/{result['exact_match_n']} greedy completions)"))
    rows.append(("time", f"{result['time_s']:.1f} s on {device.type}, {precision}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for s in samples[:args.samples]:
        print(f"\n--- {'match' if s['match'] else 'MISMATCH'}\ncontext:   {s['prompt']!r}\n"
              f"reference: {s['reference']!r}\ngenerated: {s['generated']!r}")
    return 0
