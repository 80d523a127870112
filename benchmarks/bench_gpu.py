"""Training on one GPU: rwkv-sft's step beside flash-linear-attention's RWKV-7 model, and the WKV-7 kernels.

    python benchmarks/bench_gpu.py                    # every row (a GPU, fla installed for its rows)
    python benchmarks/bench_gpu.py --rows train-0.1B wkv
    python benchmarks/bench_gpu.py --device cpu --tiny   # the script's own plumbing, on CPU (ours only)

Training rows (each trainer in its own process, so one's allocator cannot hide another's peak):
  ours       rwkv-sft: completion rows before the head, chunked linear cross-entropy, WKV-7 `auto`
  fla        fla.models.RWKV7ForCausalLM (the model rwkv7-hf / TRL users train), defaults
Both start from the same random weights (ours exported through `rwkv-sft convert --to hf`'s writer,
fla naming), see the same batch with the loss on every next token, fp32 master weights under bf16
autocast, AdamW (fused), gradient clipping 1.0; activation checkpointing off and on. Shapes: 0.1B
(12 x 768, B=16, T=512), 1.5B (24 x 2048, B=2, T=4096), and LoRA rank 16 on the 1.5B shape (fla's
row through `peft` when installed). Step-0 losses of both models must agree (within 1e-2): proof
that they are the same model. Time: --steps steps after two warm-up steps; peak: the most CUDA
memory allocated during those steps. MFU: model FLOPs per token (6 x the matrix parameters a token
passes, 4 x for a frozen LoRA base, plus the WKV-7 recurrence, 3 passes of 8 C N) x tokens/s /
the GPU's dense bf16 peak (table below, or --peak-tflops).

WKV-7 rows: forward + backward in bf16 at (B=16, T=512, H=12), (B=8, T=1024, H=32), (B=4, T=4096,
H=32), without and with an initial state: our CUDA kernel, what `auto` chooses, fla's chunk and
fused-recurrent kernels. Best of --repeats after a warm-up.

The last line is the JSON of every row (for scripts/gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
                    "RTX 4090": 165, "RTX 3090": 71, "A6000": 155}
TRAIN_ROWS = {  # name: layers, width, B, T, LoRA rank
    "train-0.1B": (12, 768, 16, 512, 0),
    "train-1.5B": (24, 2048, 2, 4096, 0),
    "lora-1.5B": (24, 2048, 2, 4096, 16),
}
TINY = {"train-0.1B": (2, 128, 2, 64, 0), "train-1.5B": (2, 128, 1, 128, 0), "lora-1.5B": (2, 128, 1, 128, 4)}
WKV_SHAPES = [(16, 512, 12), (8, 1024, 32), (4, 4096, 32)]
VOCAB = 65536


def make_batch(B, T, V, seed=0):
    """T + 1 random tokens a row: the model reads the first T and predicts the next of each."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T + 1), generator=g)


def matrix_params(model) -> int:
    """Elements of the 2-D weights a token passes through (the embedding is a lookup: not counted)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n)


def flops_per_token(layers, width, vocab, lora) -> float:
    from rwkv_sft import RWKV7, RWKV7Config
    with torch.device("meta"):
        model = RWKV7(RWKV7Config(n_layer=layers, n_embd=width, vocab_size=vocab))
    wkv = layers * 3 * 8 * width * 64  # forward, and a backward of twice its work
    return (4 if lora else 6) * matrix_params(model) + wkv


# ---- one trainer in this process -----------------------------------------------------------------

def ours_step_fn(model, seq, device, lora):
    from rwkv_sft.data import Batch
    from rwkv_sft.train.step import accumulate_gradients
    from rwkv_sft.train.loss import CompletionLoss
    tokens, targets = seq[:, :-1], seq[:, 1:]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, -1] = False  # fla's shifted labels leave the last position without a target
    batch = Batch(tokens, targets, mask)
    lm = CompletionLoss(model)
    count = batch.num_loss_tokens
    precision = "bf16" if device.type == "cuda" else "fp32"
    return lambda: accumulate_gradients(lm, [batch], device=device, global_count=count, l2wrap=False,
                                        precision=precision) / count


def fla_step_fn(model, seq, device):
    input_ids = seq[:, :-1].to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.item()
    return step


def child(args) -> dict:
    from rwkv_sft import RWKV7, RWKV7Config
    device = torch.device(args.device)
    layers, width, B, T, lora = (TINY if args.tiny else TRAIN_ROWS)[args.row]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 1.5B model's init is seconds there
        ours = RWKV7(RWKV7Config(n_layer=layers, n_embd=width, vocab_size=VOCAB))
    seq = make_batch(B, T, VOCAB)
    extra = {}
    if args.trainer == "ours":
        model = ours
        if lora:
            from rwkv_sft.adapters import AdapterSettings
            from rwkv_sft.adapters.training import compact, prepare
            prepare(model, AdapterSettings(lora_rank=lora, lora_alpha=float(lora)), seed=0, initialize=True)
            compact(model, "bf16")
        model.activation_checkpointing = args.checkpointing
        model.to(device)
        loss_and_backward = ours_step_fn(model, seq, device, lora)
    else:
        model, extra = fla_model(ours, device)
        del ours
        if lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=lora, target_modules=[
                "r_proj", "k_proj", "v_proj", "o_proj", "key", "value"]))
        if args.checkpointing:
            model.gradient_checkpointing_enable()
        loss_and_backward = fla_step_fn(model, seq, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99), fused=True)

    def step():
        loss = loss_and_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_loss = step()
    step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return dict(first_loss=float(first_loss), tokens_per_s=B * T / seconds, peak_gib=peak / 2**30,
                flops_per_token=flops_per_token(layers, width, VOCAB, lora), **extra)


def fla_model(ours, device):
    """fla's RWKV7ForCausalLM holding our model's weights, under the names and config our Hugging
    Face export writes (fla naming); the keys fla has and we did not fill are reported."""
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM

    from rwkv_sft.model import hf
    from rwkv_sft.weights import export_state_dict
    tensors = dict(hf._hf_tensor(k, t, "fla") for k, t in export_state_dict(ours).items())
    config = FlaConfig(**hf.hf_config(ours.config, "fla", torch.float32))
    with torch.device(device):
        model = RWKV7ForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    return model.to(device), dict(fla_missing=list(missing), fla_unexpected=list(unexpected))


# ---- WKV-7 kernels ----------------------------------------------------------------------------------

def wkv_kernels(device):
    """name -> fn(r, w, k, v, a, b, state) -> (y, state), for what is installed on `device`."""
    from rwkv_sft.ops import _load_backend, resolve_backend
    kernels = {}
    if device.type == "cuda":
        kernels["ours-cuda"] = _load_backend("cuda")

    def auto(r, w, k, v, a, b, state=None):
        B, T, H, N = r.shape
        name = resolve_backend("auto", r.device, T, N, batch_heads=B * H, dtype=r.dtype, with_state=state is not None)
        return _load_backend(name)(r, w, k, v, a, b, state=state)
    kernels["ours-auto"] = auto
    if device.type == "cpu":
        kernels["ours-chunked"] = _load_backend("chunked")
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError:
        return kernels

    def fla(fn):  # fla's conventions: log-decay -exp(w), state key x value
        def run(r, w, k, v, a, b, state=None):
            h0 = None if state is None else state.transpose(-1, -2)
            return fn(r, -torch.exp(w.float()).to(r.dtype), k, v, a, b, scale=1.0, initial_state=h0,
                      output_final_state=True)
        return run
    kernels["fla-chunk"], kernels["fla-recurrent"] = fla(chunk_rwkv7), fla(fused_recurrent_rwkv7)
    return kernels


def wkv_rows(device, repeats, tiny) -> list[dict]:
    from rwkv_sft.ops.wkv7_cuda import example_inputs
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for B, T, H in ([(2, 64, 2)] if tiny else WKV_SHAPES):
        xs = [x.requires_grad_() for x in example_inputs(B, T, H, 64, device=device, dtype=dtype)]
        for with_state in (False, True):
            state = torch.zeros(B, H, 64, 64, device=device, requires_grad=True) if with_state else None
            for name, fn in wkv_kernels(device).items():
                try:
                    best = float("inf")
                    for i in range(repeats + 1):
                        sync()
                        start = time.perf_counter()
                        y, s = fn(*xs, state=state)
                        (y.float().sum() + s.float().sum()).backward()
                        sync()
                        best = best if i == 0 else min(best, time.perf_counter() - start)
                    rows.append(dict(kernel=name, B=B, T=T, H=H, state=with_state, ms=best * 1e3))
                except Exception as e:  # a kernel that cannot run this shape is a row that says why
                    rows.append(dict(kernel=name, B=B, T=T, H=H, state=with_state, error=str(e).splitlines()[0]))
    return rows


# ---- the table ----------------------------------------------------------------------------------------

def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def run_child(args, row, trainer, checkpointing) -> dict:
    cmd = [sys.executable, __file__, "--child", "--row", row, "--trainer", trainer, "--device", args.device,
           "--steps", str(args.steps)] + (["--checkpointing"] if checkpointing else []) + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()] or ["exit code %d" % proc.returncode]
        return dict(error=lines[-1][:200])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=[*TRAIN_ROWS, "wkv"], choices=[*TRAIN_ROWS, "wkv"])
    p.add_argument("--trainers", nargs="+", default=["ours", "fla"], choices=["ours", "fla"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where the table lacks it")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the script's own check, e.g. on CPU)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(args)
    print(f"rwkv-sft vs fla on {gpu}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, vocabulary {VOCAB}")
    results = {"device": gpu, "train": [], "wkv": []}
    train_rows = [r for r in args.rows if r in TRAIN_ROWS]
    if train_rows:
        print(f"{'row':<11} {'ckpt':>4} {'trainer':<7} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>6} {'loss0':>9}  vs fla")
    for row in train_rows:
        for checkpointing in (False, True):
            measured = {t: run_child(args, row, t, checkpointing) for t in args.trainers}
            for trainer, r in measured.items():
                r.update(row=row, checkpointing=checkpointing, trainer=trainer)
                results["train"].append(r)
                if "error" in r:
                    print(f"{row:<11} {'on' if checkpointing else 'off':>4} {trainer:<7} error: {r['error']}")
                    continue
                mfu = f"{r['flops_per_token'] * r['tokens_per_s'] / (peak * 1e12):6.1%}" if peak else "   n/a"
                vs = ""
                other = measured.get("fla", {})
                if trainer == "ours" and "tokens_per_s" in other:
                    r["speedup"] = r["tokens_per_s"] / other["tokens_per_s"]
                    r["loss0_diff"] = abs(r["first_loss"] - other["first_loss"])
                    vs = (f"  {r['speedup']:.2f}x tokens/s, {r['peak_gib'] / max(other['peak_gib'], 1e-9):.2f}x peak, "
                          f"|loss0 diff| {r['loss0_diff']:.1e}")
                print(f"{row:<11} {'on' if checkpointing else 'off':>4} {trainer:<7} {r['tokens_per_s']:>10.0f} "
                      f"{r['peak_gib']:>9.2f} {mfu} {r['first_loss']:>9.4f}{vs}")
    if "wkv" in args.rows:
        results["wkv"] = wkv_rows(device, args.repeats, args.tiny)
        print(f"\nWKV-7 forward+backward, {'bf16' if device.type == 'cuda' else 'fp32'}, N=64 (ms)")
        print(f"{'B':>3} {'T':>5} {'H':>3} {'state':>5}  " + "  ".join(f"{k:>13}" for k in wkv_kernels(device)))
        for B, T, H in ([(2, 64, 2)] if args.tiny else WKV_SHAPES):
            for with_state in (False, True):
                cells = {r["kernel"]: r for r in results["wkv"] if (r["B"], r["T"], r["H"], r["state"]) == (B, T, H, with_state)}
                text = "  ".join(f"{cells[k]['ms']:>13.3f}" if "ms" in cells[k] else f"{'error':>13}" for k in cells)
                print(f"{B:>3} {T:>5} {H:>3} {'yes' if with_state else 'no':>5}  {text}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
