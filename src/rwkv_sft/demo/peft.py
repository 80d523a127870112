"""`rwkv-sft demo --method lora|state`: teach the demo model a new habit with its weights frozen.

The base is the normal demo's model (`runs/demo/model.pth`, trained first when it is missing). The
new task asks for the same dates written American style — "Date: 1974-02-03\\nIn words:" ->
" February 3, 1974" — which the base never saw: it answers " 3 February 1974". Only a LoRA of
rank 8 (`--method lora`) or each layer's initial WKV state (`--method state`) trains; exact match
on the 200 held-out dates is measured before and after, with the method's default learning rate.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .full import HELDOUT_FILE, STEPS, TRAIN_FILE, show_comparison, stopped

PEFT_STEPS = {"lora": 100, "state": 150}
LORA_RANK = 8


def american(row: dict) -> dict:
    """" 3 February 1974" -> " February 3, 1974"."""
    day, month, year = re.fullmatch(r" (\d+) (\w+) (\d+)", row["completion"]).groups()
    return {"context": row["context"], "completion": f" {month} {day}, {year}"}


def write_task(src: Path, dst: Path) -> Path:
    rows = [american(json.loads(line)) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return dst


def out_dir(args) -> Path:
    return Path(args.out if args.out != "runs/demo" else f"runs/demo-{args.method}")


def ensure_base(args) -> tuple[Path, int]:
    """(the base checkpoint, 0), the normal demo trained first into runs/demo when it is missing;
    (_, its exit code) when that training stopped."""
    base = Path(args.base) if args.base else Path("runs/demo/model.pth")
    if not base.is_file():
        if args.base:
            from ..errors import UserError
            raise UserError(f"{base}: no such base checkpoint (--base)")
        print(f"rwkv-sft demo --method {args.method}: no base at {base}; training it first (rwkv-sft demo)", flush=True)
        from .full import run as _run
        args_base = type(args)(**{**vars(args), "out": str(base.parent), "steps": STEPS, "quick": False})
        code = _run(args_base)
        if code:
            return base, code
        print(flush=True)
    return base, 0


def run(args) -> int:
    from ..data import DataConfig, prepare_data
    from ..weights import load_model
    from ..tokenizer import Tokenizer
    from ..train import TrainConfig, train
    from ..eval.evaluate import evaluate

    start = time.perf_counter()
    method, out = args.method, out_dir(args)
    base, code = ensure_base(args)
    if code:
        return code
    out.mkdir(parents=True, exist_ok=True)
    data_cfg = DataConfig(train_files=[str(write_task(TRAIN_FILE, out / "american_train.jsonl"))],
                          eval_files=[str(write_task(HELDOUT_FILE, out / "american_heldout.jsonl"))],
                          max_len=64, seed=args.seed)
    steps = args.steps or PEFT_STEPS[method]
    config = TrainConfig(
        data=data_cfg, model=str(base), out_dir=str(out), max_steps=steps, batch_tokens=512, packing=False,
        lora_rank=LORA_RANK if method == "lora" else 0, state_tuning=method == "state",
        warmup_steps=min(10, steps // 5), eval_every=max(1, steps // 4), eval_exact_match=200,
        wkv_backend="chunked", tensorboard=False, seed=args.seed, device="cpu", progress=True,
        activation_checkpointing=False,  # a 2 x 128 model: its activations are small, recomputing them only costs time
        overwrite=True)  # every demo is a fresh run
    config.validate()  # the method's default learning rate
    tokenizer = Tokenizer()
    data = prepare_data(data_cfg, tokenizer=tokenizer, show_progress=False)
    what = f"LoRA rank {LORA_RANK} on {', '.join(['att r/k/v/o', 'ffn k/v'])}" if method == "lora" else \
        "each layer's initial WKV state"
    print(f"rwkv-sft demo --method {method}: {base} (frozen) learns to write dates American style; only {what} "
          f"trains; {len(data.train)} training / {len(data.eval)} held-out examples; {steps} steps at lr "
          f"{config.lr:g} on {args.threads} CPU thread(s)", flush=True)
    model = load_model(base)
    model.wkv_backend = config.wkv_backend
    before = evaluate(model, data.eval, tokenizer, batch_tokens=config.batch_tokens,
                      exact_match_samples=config.eval_exact_match)
    result = train(config, model=model, data=data, tokenizer=tokenizer)
    if result.interrupted:
        return stopped(result)
    after = result.eval
    show_comparison(before, after, args.samples, "base + adapter")
    adapter = result.exports.get("adapter")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s (training {result.time_s:.0f} s); adapter: {adapter}")
    print(f"try it: rwkv-sft generate --model {base} --adapter {adapter} --temperature 0 "
          f"--prompt $'Date: 1999-12-31\\nIn words:'")
    return 0
