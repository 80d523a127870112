"""A quantized frozen base (int8 / nf4) against the bf16 base: layer speed, LoRA steps, quality.

    python benchmarks/bench_quant.py --only layer     # one 4096 x 4096 layer, forward + input gradient
    python benchmarks/bench_quant.py --only steps --shapes small   # LoRA r16 steps, 12 x 768
    python benchmarks/bench_quant.py --only steps --shapes 2.9b 7.2b   # needs the machine alone (~16 GiB files)
    python benchmarks/bench_quant.py --only quality   # held-out loss of LoRAs trained on each base

layer: x [512, 4096] through a frozen [4096, 4096] weight, forward + the input's gradient, best of
5: fp32 (reference), bf16 upcast per call (the compact base), our int8 (the scale applied to the
output), int8 dequantized then multiplied (the plain way), bitsandbytes' Linear8bitLt, nf4 as we
run it (bitsandbytes' dequantize_4bit, then the product), bitsandbytes' matmul_4bit.

steps: each case a fresh subprocess doing what `train` does (the checkpoint loaded as the trainer
loads it: a quantized base quantized at load, tensor by tensor; LoRA r16 on the default targets;
activation checkpointing; the trainer's default heap policy, the same for every base), 2 optimizer steps at T=512, batch 1,
every position carrying loss. peak = the process's ru_maxrss (load included); tokens/s of the
last step. Random bf16 checkpoints written as bench_peft.py writes them (deleted afterwards).

quality: a 4 x 256 model first trained from scratch on the demo's dates (rwkv-sft demo's task);
then a LoRA r16 learns the American date style on a bf16, an int8 and an nf4 copy of it, same
seed and steps; each adapter is then applied to the original (fp32) base and its held-out
completion loss measured on the 200 held-out dates.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rwkv_sft.cli import use_huge_pages

use_huge_pages()  # as the command line does, before torch allocates
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"small": dict(n_layer=12, n_embd=768, vocab_size=65536),
          "2.9b": dict(n_layer=32, n_embd=2560, vocab_size=65536),
          "7.2b": dict(n_layer=32, n_embd=4096, vocab_size=65536)}
LIMITS = {("2.9b", "int8"): 5.0, ("7.2b", "int8"): 12.0, ("7.2b", "nf4"): 8.0}  # GiB, peak resident


def best(fn, repeats=5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def layer_table() -> None:
    from rwkv_sft.adapters.lora import frozen_linear
    from rwkv_sft.adapters.quant import QuantLinear
    torch.manual_seed(0)
    w = torch.randn(4096, 4096) * 0.02
    x = torch.randn(512, 4096, requires_grad=True)
    grad = torch.randn(512, 4096)
    wb = w.bfloat16()
    int8, nf4 = QuantLinear.from_weight(w, "int8"), QuantLinear.from_weight(w, "nf4")
    q, scale = int8.q, int8.row_scale

    def plain_int8(x):  # dequantize the whole weight, then multiply
        return F.linear(x, q.float() * scale[:, None])

    cases = {"fp32 weight": lambda x: F.linear(x, w), "bf16 (upcast per call)": lambda x: frozen_linear(x, wb),
             "int8 (ours)": int8, "int8 dequantize + matmul": plain_int8, "nf4 (ours: bnb dequant)": nf4}
    try:
        import bitsandbytes as bnb
        lin = bnb.nn.Linear8bitLt(4096, 4096, bias=False, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        cases["bitsandbytes Linear8bitLt"] = lin
        q4, st = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        cases["bitsandbytes matmul_4bit"] = lambda x: bnb.matmul_4bit(x, q4.t(), quant_state=st)
    except Exception as e:  # noqa: BLE001  (a row that cannot run says why)
        print(f"bitsandbytes: {type(e).__name__}: {e}")
    print(f"\nlayer: x [512, 4096] @ W[4096, 4096]^T, forward + input gradient, best of 5, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'case':<28}{'ms':>9}{'vs bf16':>9}{'max err':>10}")
    ref = F.linear(x, w)
    base = None
    for name, fn in cases.items():
        def step():
            x.grad = None
            fn(x).backward(grad)
        t = best(step)
        base = t if name.startswith("bf16") else base
        err = (fn(x) - ref).abs().max().item()
        print(f"{name:<28}{t * 1e3:>9.1f}{(base / t if base else float('nan')):>8.2f}x{err:>10.4f}")


def lora_setup(ckpt: str, base: str, T: int, after_load=lambda: None):
    """What a LoRA r16 run on `base` holds before its first step, built as train.run.build_run builds
    it (quantized at load, adapters, compact base, activation checkpointing, AdamW), and a batch of T
    random tokens, every position carrying loss: (loss_module, optimizer, params, tokens, targets, mask)."""
    from rwkv_sft.adapters import training as peft_run
    from rwkv_sft.data import DataConfig
    from rwkv_sft.train.config import TrainConfig
    from rwkv_sft.train.loss import CompletionLoss
    from rwkv_sft.train.optim import make_optimizer
    from rwkv_sft.weights import load_model
    config = TrainConfig(data=DataConfig(train_files=["unused"]), model=ckpt, lora_rank=16, base_dtype=base).validate()
    model = load_model(ckpt, quantize=base if base in peft_run.QUANTIZED else None)
    after_load()
    peft_run.prepare(model, peft_run.settings_from(config), seed=0, initialize=True)
    model = peft_run.compact(model, config.base_dtype)
    model.activation_checkpointing = config.activation_checkpointing
    model.train()
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
    params = [p for p in model.parameters() if p.requires_grad]
    seq = torch.randint(0, model.config.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(1))
    return CompletionLoss(model), optimizer, params, seq[:, :-1], seq[:, 1:], torch.ones(1, T, dtype=torch.bool)


def child(spec: dict) -> dict:
    from rwkv_sft.train.parallel import use_heap_policy
    from rwkv_sft.train.config import TrainConfig
    from rwkv_sft.data import DataConfig
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    use_heap_policy(TrainConfig(data=DataConfig(train_files=["unused"]), model=spec["ckpt"], lora_rank=16,
                                base_dtype=spec["base"], device="cpu"))  # as `rwkv-sft train` sets it
    T = spec["T"]
    loss_module, optimizer, params, tokens, targets, mask = lora_setup(spec["ckpt"], spec["base"], T)
    load_s, times = time.perf_counter() - t0, []
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        start = time.perf_counter()
        loss = loss_module(tokens, targets, mask, None, 1e-4 / T) / T
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"base": spec["base"], "peak_gib": peak / 2**30, "load_peak_gib": load_peak / 2**30, "load_s": load_s,
            "step_s": times[-1], "tokens_per_s": T / times[-1], "loss": float(loss)}


def run_case(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        return {"base": spec["base"], "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steps_table(shape_name: str, args) -> None:
    shape = SHAPES[shape_name]
    path = Path(args.tmp) / f"bench_quant_{shape['n_layer']}x{shape['n_embd']}.pth"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).parent / "bench_peft.py"), "--write", str(path), "--shape",
                    json.dumps(shape)], check=True)
    size = path.stat().st_size / 2**30
    print(f"\n{shape['n_layer']} x {shape['n_embd']}, V {shape['vocab_size']} (bf16 file {size:.1f} GiB, written in "
          f"{time.perf_counter() - t0:.0f} s): LoRA r16, T={args.T}, activation checkpointing, 2 steps, "
          f"{args.threads} thread(s)", flush=True)
    print(f"{'base':<7}{'peak':>11}{'load peak':>12}{'load s':>8}{'step s':>8}{'tokens/s':>10}{'vs bf16':>9}  limit")
    try:
        rows, base = [], None
        for kind in args.bases:
            r = run_case(dict(ckpt=str(path), base=kind, T=args.T, threads=args.threads))
            if "error" in r:
                print(f"{kind:<7}  failed: {r['error']}", flush=True)
                continue
            base = r if kind == "bf16" else base
            limit = LIMITS.get((shape_name, kind))
            verdict = "" if limit is None else f"<= {limit:g} GiB: " + ("ok" if r["peak_gib"] <= limit else "OVER")
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
            print(f"{kind:<7}{r['peak_gib']:>7.2f} GiB{r['load_peak_gib']:>8.2f} GiB{r['load_s']:>8.1f}{r['step_s']:>8.1f}"
                  f"{r['tokens_per_s']:>10.1f}{ratio:>9}  {verdict}", flush=True)
            rows.append(r)
    finally:
        path.unlink(missing_ok=True)


def quality_table(args) -> None:
    from rwkv_sft.weights import load_model
    from rwkv_sft.data import DataConfig, prepare_data
    from rwkv_sft.demo import HELDOUT_FILE, TRAIN_FILE
    from rwkv_sft.demo.peft import write_task
    from rwkv_sft.tokenizer import Tokenizer
    from rwkv_sft.train import TrainConfig, train
    from rwkv_sft.eval.evaluate import evaluate
    tok = Tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = dict(batch_tokens=512, packing=False, progress=False, tensorboard=False, export=["pth"], seed=0,
                      eval_every=0, eval_exact_match=0, save_every=0)
        base_cfg = TrainConfig(data=DataConfig(train_files=[str(TRAIN_FILE)]), out_dir=str(tmp / "base"),
                               model_config=dict(n_layer=4, n_embd=256, head_size=64, vocab_size=65536),
                               max_steps=args.base_steps, lr=3e-3, lr_final=3e-4, warmup_steps=20, **common)
        t0 = time.perf_counter()
        base_path = train(base_cfg).exports["pth"]
        train_file, heldout = write_task(TRAIN_FILE, tmp / "us_train.jsonl"), write_task(HELDOUT_FILE, tmp / "us_heldout.jsonl")
        held = prepare_data(DataConfig(train_files=[str(heldout)]), tokenizer=tok, show_progress=False, role="eval").train
        print(f"\nquality: base 4 x 256 trained {args.base_steps} steps on the demo's dates ({time.perf_counter() - t0:.0f} s); "
              f"LoRA r16, {args.lora_steps} steps on American-style dates; held-out loss of each adapter on the original base")
        print(f"{'base':<7}{'train s':>9}{'held-out loss':>15}{'vs bf16':>9}{'on its own base':>17}  limit")
        ref = None
        for kind in ("bf16", "int8", "nf4"):
            t0 = time.perf_counter()
            r = train(TrainConfig(data=DataConfig(train_files=[str(train_file)]), out_dir=str(tmp / kind),
                                  model=str(base_path), lora_rank=16, base_dtype=kind, max_steps=args.lora_steps,
                                  **{**common, "export": []}))
            secs = time.perf_counter() - t0
            adapter = r.exports["adapter"]
            loss = evaluate(load_model(base_path, dtype=torch.float32, adapter=adapter), held, tok,
                            exact_match_samples=0)["loss"]
            own = evaluate(r.model, held, tok, exact_match_samples=0)["loss"]
            ref = loss if kind == "bf16" else ref
            limit = {"int8": 1.02, "nf4": 1.05}.get(kind)
            verdict = "" if limit is None else f"<= {limit:.2f}x: " + ("ok" if loss <= ref * limit else "OVER")
            print(f"{kind:<7}{secs:>9.0f}{loss:>15.4f}{loss / ref:>8.3f}x{own:>17.4f}  {verdict}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["layer", "steps", "quality"])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["small"])
    p.add_argument("--bases", nargs="+", choices=["bf16", "int8", "nf4"], default=["bf16", "int8", "nf4"])
    p.add_argument("--tmp", default="/tmp", help="where the random checkpoints are written (deleted afterwards)")
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--base-steps", type=int, default=200)
    p.add_argument("--lora-steps", type=int, default=60)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.only in (None, "layer"):
        layer_table()
    if args.only in (None, "steps"):
        for name in args.shapes:
            steps_table(name, args)
    if args.only in (None, "quality"):
        quality_table(args)


if __name__ == "__main__":
    main()
