"""Parameter-efficient fine-tuning: peak resident memory and tokens/s of full / LoRA / state tuning.

    python benchmarks/bench_peft.py                  # both tables (~8 GiB free RAM, ~30 min on 2 cores)
    python benchmarks/bench_peft.py --only compare   # 0.4B-shaped (24 x 1024): full vs LoRA vs state
    python benchmarks/bench_peft.py --only big       # 2.9B-shaped (32 x 2560): LoRA r=16 and state, each <= 8 GiB
    python benchmarks/bench_peft.py --only checkpointing   # 0.4B-shaped: LoRA / state with and without
                                                           # activation checkpointing (on by default in PEFT runs)

Each case runs with the trainer's heap policy on CPU (rwkv_sft.utils.set_heap_policy): the
default keeps freed memory for speed; the "low-mem" rows are `train --low-memory`.

Each case is a fresh subprocess running real optimizer steps (the trainer's own pieces: adapters,
frozen bf16 base, AdamW groups, completion loss) on a random checkpoint that the benchmark writes
as a bf16 `.pth` (as released models are) into --tmp and deletes afterwards. Peak memory is the
subprocess's peak resident set (ru_maxrss; the memory-mapped base counts once it is read) or,
on a GPU, torch.cuda.max_memory_allocated. tokens/s is that of the last step (the first pays for
page faults and allocator warm-up). Every position carries loss (the head's worst case).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from rwkv_sft.cli import use_huge_pages

use_huge_pages()  # as the command line does, before torch allocates
import torch  # noqa: E402

BIG = dict(n_layer=32, n_embd=2560, vocab_size=65536)
COMPARE = dict(n_layer=24, n_embd=1024, vocab_size=65536)
METHODS = {"full": {}, "lora": {"lora_rank": 16}, "state": {"state_tuning": True},
           "lora low-mem": {"lora_rank": 16, "low_memory": True}, "state low-mem": {"state_tuning": True, "low_memory": True}}
METHODS.update({"lora +ckpt": METHODS["lora"], "state +ckpt": METHODS["state"]})  # rows of the checkpointing table


def write_checkpoint(path: Path, shape: dict) -> None:
    """A random RWKV-7 of `shape` in bf16, written tensor by tensor without an fp32 copy of it all:
    two layers get upstream's initialisation (plus noise, so nothing is exactly zero), every other
    layer is a noisy copy of layer 1; embedding and head are random."""
    from rwkv_sft import RWKV7, RWKV7Config
    torch.manual_seed(0)
    cfg = RWKV7Config(**shape)
    with torch.device("meta"):
        layout = RWKV7(cfg, init_weights=False).state_dict()
    two = RWKV7(RWKV7Config(n_layer=2, n_embd=cfg.n_embd, vocab_size=256)).state_dict()
    sd = {}
    for key, ref in layout.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m:
            src = two[f"blocks.{min(int(m[1]), 1)}.{m[2]}"]
            t = src + torch.randn_like(src) * (0.01 if src.dim() < 2 else 0.2 / src.shape[-1] ** 0.5)
        elif key in ("emb.weight", "head.weight"):
            t = torch.randn(ref.shape) * (1e-2 if key == "emb.weight" else 0.5 / cfg.n_embd ** 0.5)
        else:
            t = two[key].clone()
        sd[key] = t.to(torch.bfloat16)
    del two
    torch.save(sd, path)


def child(spec: dict) -> dict:
    """One case: load the bf16 checkpoint as the trainer does, run `steps` optimizer steps."""
    from rwkv_sft.weights import load_model
    from rwkv_sft.adapters import training as peft_run
    from rwkv_sft.train.loss import CompletionLoss
    from rwkv_sft.train.optim import make_optimizer

    from rwkv_sft.train.config import TrainConfig
    from rwkv_sft.data import DataConfig
    from rwkv_sft.utils import set_heap_policy
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    t0 = time.perf_counter()
    config = TrainConfig(data=DataConfig(train_files=["unused"]), model=spec["ckpt"], **METHODS[spec["method"]])
    config.validate()
    if device.type == "cpu":
        set_heap_policy(config.low_memory)  # as `rwkv-sft train` does
    model = load_model(spec["ckpt"])
    peft = peft_run.settings_from(config)
    peft_run.prepare(model, peft, seed=0, initialize=True)
    model = peft_run.compact(model, config.base_dtype).to(device)
    model.activation_checkpointing = spec["checkpointing"]
    model.train()
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_module = CompletionLoss(model)
    T, V = spec["T"], model.config.vocab_size
    seq = torch.randint(0, V, (1, T + 1), generator=torch.Generator().manual_seed(1)).to(device)
    tokens, targets = seq[:, :-1], seq[:, 1:]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    load_s, times = time.perf_counter() - t0, []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        with autocast:
            loss = loss_module(tokens, targets, mask, None, 1e-4 / T) / T
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": spec["method"], "trainable": sum(p.numel() for p in params), "peak_gib": peak / 2**30,
            "step_s": times[-1], "tokens_per_s": T / times[-1], "load_s": load_s, "loss": float(loss)}


def run_case(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": spec["method"], "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(title: str, rows: list[dict], base: dict | None = None, limit: float | None = None) -> str:
    lines = [title, f"{'method':<14}{'trainable':>12}{'peak':>11}{'step s':>9}{'tokens/s':>10}"
             + (f"{'vs full':>9}" if base else "") + (f"{'limit':>14}" if limit else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<14}  failed: {r['error']}")
            continue
        line = (f"{r['method']:<14}{r['trainable'] / 1e6:>11.1f}M{r['peak_gib']:>7.2f} GiB{r['step_s']:>9.1f}"
                f"{r['tokens_per_s']:>10.1f}")
        if base:
            line += f"{r['tokens_per_s'] / base['tokens_per_s']:>8.2f}x" if "error" not in base else f"{'n/a':>9}"
        if limit:
            line += f"{'<= %g GiB: ' % limit + ('ok' if r['peak_gib'] <= limit else 'OVER'):>14}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["compare", "big", "checkpointing"])
    p.add_argument("--tmp", default="/tmp", help="where the random checkpoints are written (deleted afterwards)")
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    common = dict(T=args.T, threads=args.threads, device=args.device)
    print(f"bench_peft: T={args.T}, batch 1, {args.threads} thread(s), {args.device}; bf16 checkpoint files; "
          f"peak = {'max_memory_allocated' if args.device.startswith('cuda') else 'peak resident set'} of each case's process",
          flush=True)
    for name, shape, methods, steps, ckpting, limit in (
            ("compare", COMPARE, ["full", "lora", "state"], 3, False, None),
            ("big", BIG, ["lora", "lora low-mem", "state low-mem"], 2, True, 8.0),
            ("checkpointing", COMPARE, ["lora", "lora +ckpt", "state", "state +ckpt"], 3, None, None)):
        if args.only and args.only != name:
            continue
        path = Path(args.tmp) / f"bench_peft_{shape['n_layer']}x{shape['n_embd']}.pth"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write", str(path), "--shape", json.dumps(shape)], check=True)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            rows = [run_case(dict(common, ckpt=str(path), method=m, steps=steps,
                                  checkpointing=m.endswith("+ckpt") if ckpting is None else ckpting)) for m in methods]
        finally:
            path.unlink(missing_ok=True)
        title = (f"\n{shape['n_layer']} x {shape['n_embd']}, V {shape['vocab_size']}: {steps} optimizer steps"
                 f"{', activation checkpointing' if ckpting else ''}{' (+ckpt rows)' if ckpting is None else ''}; "
                 "frozen base in bf16 for LoRA/state")
        print(table(title, rows, base=rows[0] if methods[0] == "full" else None, limit=limit), flush=True)


if __name__ == "__main__":
    if "--write" in sys.argv:
        i = sys.argv.index("--write")
        write_checkpoint(Path(sys.argv[i + 1]), json.loads(sys.argv[sys.argv.index("--shape") + 1]))
    else:
        main()
