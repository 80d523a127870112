"""`rwkv-sft eval`: completion loss, perplexity, token accuracy and exact match of a checkpoint."""
from __future__ import annotations

import json

from ..cli_args import add_data_arguments, data_config, number, segment_len
from ..settings import Precision, Quantized, WkvBackend, choices


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="CKPT", help=".pth (BlinkDL layout), .safetensors, or a training checkpoint OUT/checkpoints/step_N")
    p.add_argument("--adapter", metavar="FILE",
                   help="adapter.safetensors of a parameter-efficient run on --model, or its OUT/checkpoints/step_N")
    p.add_argument("--base-dtype", choices=choices(Quantized), default=None,
                   help="store the projection matrices quantized (as a run with --base-dtype int8|nf4 trained on)")
    p.add_argument("--state", metavar="FILE", help="learned initial state (state.pth of a state-tuning run) to start from")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="examples to evaluate (JSONL/JSON, same formats as training); repeat for several")
    add_data_arguments(p.add_argument_group("data (as in train)"))
    p.add_argument("--exact-match", type=number(int, min=0), default=64, metavar="N",
                   help="examples checked for exact match of the greedy completion (default 64; 0 = off)")
    p.add_argument("--max-new-tokens", type=number(int, min=1), default=None, metavar="N",
                   help="generation limit for exact match (default: 2 x the reference length + 8)")
    p.add_argument("--batch-tokens", type=number(int, min=1), default=4096, metavar="N",
                   help="tokens per forward pass (default 4096)")
    p.add_argument("--segment-len", type=segment_len, default=None, metavar="S|auto",
                   help="run each example S tokens at a time (memory flat in length; default auto: examples "
                        "longer than --batch-tokens are split; 0: never); prompts are prefilled in segments too")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=choices(Precision))
    p.add_argument("--wkv-backend", default="auto", choices=choices(WkvBackend))
    p.add_argument("--samples", type=number(int, min=0), default=0, metavar="K",
                   help="also print K of the exact-match completions beside their references (K <= --exact-match)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def run(args) -> int:
    import torch

    from ..data import prepare_data
    from ..errors import UserError
    from ..weights import load_model
    from ..ops import check_backend
    from ..tokenizer import Tokenizer
    from ..utils import resolve_device
    from ..precision import resolve_precision
    from .evaluate import evaluate

    if (args.segment_len or 0) < 0:
        raise UserError(f"--segment-len must be >= 0 (or auto), got {args.segment_len}")
    if args.samples > args.exact_match:
        raise UserError(f"--samples {args.samples} shows completions of the exact-match check, which covers "
                        f"{args.exact_match} examples: raise --exact-match to at least {args.samples}")
    config = data_config(args, args.data)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    check_backend(args.wkv_backend, device)
    tokenizer = Tokenizer()
    from ..data.config import parse_file_spec
    from ..data.pairs import is_pairs_file, prepare_pairs
    from ..data.prepare import check_vocab
    pairs = is_pairs_file(parse_file_spec(config.train_files[0]).path)
    if pairs:
        data = prepare_pairs(config, tokenizer, show_report=not args.json, role="eval")
    else:
        data = prepare_data(config, tokenizer=tokenizer, show_progress=not args.json, role="eval")
    model = load_model(args.model, dtype=torch.float32, device=device, adapter=args.adapter, quantize=args.base_dtype)
    check_vocab(data, model.config.vocab_size)
    if args.state:
        from ..weights.state import load_state
        load_state(model, args.state)
    model.wkv_backend = args.wkv_backend
    if pairs:
        return _report_pairs(args, model, data.train, device, precision)
    result = evaluate(model, data.train, tokenizer, batch_tokens=args.batch_tokens,
                      exact_match_samples=args.exact_match, max_new_tokens=args.max_new_tokens,
                      device=device, precision=precision, segment_len=args.segment_len)
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


def _report_pairs(args, model, pairs, device, precision) -> int:
    """A file of preference pairs: how often the model prefers the chosen completion."""
    from ..train.preference import evaluate_pairs
    result = evaluate_pairs(model, pairs, objective="dpo", batch_tokens=args.batch_tokens, device=device,
                            precision=precision, segment_len=args.segment_len)
    if args.json:
        print(json.dumps({"model": args.model, "adapter": args.adapter, "state": args.state, "data": args.data,
                          **result}))
    else:
        print(f"pairs                  {result['pairs']}\n"
              f"preference accuracy    {result['preference_accuracy']:.2%} (log p(chosen) > log p(rejected))")
    return 0
