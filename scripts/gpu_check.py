#!/usr/bin/env python3
"""One prepared check of every CUDA path, for a machine with a GPU and no network.

    make gpu-wheels                     # where pip reaches PyPI: the packages a GPU machine may lack -> .whl/
    python3 scripts/gpu_check.py        # on the GPU machine (or `make gpu-check`)
    python3 scripts/gpu_check.py --allow-cpu --tiny --no-install   # the check's own plumbing, on CPU

It installs the wheels found in .whl/ (into a folder of its own, offline) and this checkout with
`pip install --no-deps -e .`, then runs each step below, each in its own process so that one
failure (or a flag this build does not have yet) becomes one row of the table and the rest go on,
the quick ones first:

  install        the wheels and the editable install
  environment    torch, CUDA, GPUs, Triton, fla
  cuda-tests     tests/test_wkv7_gpu.py without fla: our CUDA kernel against the reference and chunked
  demo           the bundled demo trained on the GPU in bf16: held-out exact match and wall time
  checkpoint     a random 1.5B-shaped model (24 x 2048, vocabulary 65536), saved in bf16
  lora           one LoRA step on it at T=1024 (bf16 base), peak GPU memory
  state-tuning   one state-tuning step, likewise
  segmented      one LoRA step at T=4096 in segments of 1024, likewise
  fsdp           one FSDP step over all GPUs (needs 2 or more)
  offload        one full fine-tuning step with --parallel fsdp --offload cpu, one process, peak GPU memory
  quant          two LoRA steps at T=1024 on the 1.5B checkpoint quantized to nf4 at load (target: 3.9 GB)
  quant-big      (only when named in --only) likewise on 7.2B (32 x 4096) and 13.3B (61 x 4096)
                 checkpoints made for it, with activation checkpointing (targets: 8 and 14 GiB);
                 each checkpoint is deleted after its row
  offload-2.9b   (only when named in --only) 3 full fine-tuning steps of a 2.9B (32 x 2560) checkpoint
                 at T=1024: --offload cpu with the GPU capped at 16 GiB, beside the same steps
                 uncapped without offload (tokens/s of the last step)
  wkv-bench      benchmarks/bench_wkv.py: cuda vs fla vs chunked, fwd+bwd, T=4096, bf16, H=32 (C=2048)
  fla-tests      tests/test_wkv7_gpu.py's fla tests: fla against the reference and chunked
  gpu-bench      benchmarks/bench_gpu.py: our training step beside fla's RWKV7ForCausalLM (0.1B, 1.5B,
                 LoRA on 1.5B; checkpointing off/on), and the WKV-7 kernels at three shapes

Each row is pass, fail, skipped or unavailable (a feature this build lacks), with a reason. The
table is printed and written, after every step, to OUT/gpu_check.json (OUT: --out, else $OUT, else
runs/gpu_check), the steps' output to OUT/gpu_check.log. The steps share a time budget (--budget);
a step that would start after it is skipped. Exit code: 0 when nothing failed, 1 when something
did, 2 when there is no CUDA device (without --allow-cpu).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_DIR = ROOT / ".whl"
# What the GPU machine's image lacks (it has torch, triton, transformers, einops, tokenizers, numpy,
# safetensors, tqdm, matplotlib, pyyaml, pytest, hypothesis, ninja): pinned, one version each.
WHEELS = ["pyrwkv-tokenizer==0.9.1", "rwkv==0.8.32", "flash-linear-attention==0.6.0", "fla-core==0.6.0",
          "peft==0.17.1", "accelerate==1.10.1"]  # peft: the LoRA row of fla's model in bench_gpu.py
WHEEL_PYTHON = "3.12"
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64"]
GiB = 2**30
# Targets (pass/fail) on CUDA: the demo's held-out exact match and wall time; peak memory of the PEFT
# steps at T=1024 as RWKV-PEFT reports for 1.5B on one GPU.
DEMO_MIN_EXACT, DEMO_MAX_S = 0.90, 60.0
PEAK_TARGET_GIB = {"lora": 5.6e9 / GiB, "state-tuning": 5.3e9 / GiB}
# nf4 LoRA at T=1024: RWKV-PEFT's 1.5B figure, and a 7.2B / 13.3B on a 12 / 16 GB card
QUANT_TARGET_GIB = {"1.5b": 3.9e9 / GiB, "7.2b": 8.0, "13.3b": 14.0}
OFFLOAD_CAP_GIB = 16


# ---- wheels (run where pip reaches PyPI) -------------------------------------------------------

def download_wheels(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           WHEEL_PYTHON, "--implementation", "cp", *platforms, "-d", str(dest), *WHEELS]
    rc = subprocess.call(cmd)
    if rc == 0:
        total = sum(f.stat().st_size for f in dest.glob("*.whl"))
        print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}, {total / 2**20:.1f} MiB")
    return rc


# ---- the table ------------------------------------------------------------------------------------

class Report:
    def __init__(self, out: Path, mode: str):
        self.out, self.rows, self.mode = out, [], mode
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def add(self, step, status, detail="", seconds=None, peak_gib=None, **extra):
        row = dict(step=step, status=status, detail=detail, seconds=seconds, peak_gib=peak_gib, **extra)
        self.rows.append(row)
        print(_format_row(row), flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(dict(mode=self.mode, rows=self.rows), indent=1))
        os.replace(tmp, self.out / "gpu_check.json")

    def table(self) -> str:
        head = f"{'step':<13} {'status':<11} {'seconds':>7} {'peak GiB':>8}  detail"
        return "\n".join([head, "-" * len(head)] + [_format_row(r) for r in self.rows])


def _format_row(r) -> str:
    secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
    peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    return f"{r['step']:<13} {r['status']:<11} {secs:>7} {peak:>8}  {r['detail']}"


# ---- running steps --------------------------------------------------------------------------------

class Context:
    def __init__(self, args, report: Report, work: Path):
        self.args, self.report, self.work = args, report, work
        self.deadline = time.monotonic() + args.budget
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.site = work / "site"
        self.site.mkdir(exist_ok=True)  # on sys.path from the start: the import system caches its absence
        self.device = "cpu" if args.allow_cpu and not _cuda_available() else "cuda"
        self.train_flags: set[str] | None = None
        self.checkpoint: Path | None = None
        self._set_pythonpath()

    def _set_pythonpath(self):
        paths = [str(self.site), str(ROOT / "src")]
        old = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
        sys.path[:0] = paths

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: str, cmd: list[str], limit: float) -> tuple[int | None, str, float]:
        """Run cmd for at most min(limit, the budget left); (rc or None on timeout, output, seconds)."""
        timeout = max(1.0, min(limit, self.left()))
        self.report.log(f"\n===== {step}: {' '.join(cmd)}  (timeout {timeout:.0f} s)")
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = None, _text(e.stdout) + _text(e.stderr) + f"\n(timed out after {timeout:.0f} s)"
        seconds = time.monotonic() - start
        self.report.log(out)
        return rc, out, seconds

    def child(self, step: str, name: str, limit: float, **kw):
        """This script in child mode `name` (see CHILDREN); (rc, result dict or None, output, seconds)."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, "--_args", json.dumps(kw)]
        rc, out, seconds = self.run(step, cmd, limit)
        result = None
        for line in reversed(out.splitlines()):
            if line.startswith("GPU_CHECK_RESULT "):
                result = json.loads(line[len("GPU_CHECK_RESULT "):])
                break
        return rc, result, out, seconds


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip() and "GPU_CHECK_RESULT" not in ln]
    return lines[-1][:300] if lines else "(no output)"


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _sizes(tiny: bool) -> dict:
    """The shapes of every step: the real ones, or tiny ones that exercise the same code on CPU."""
    if tiny:
        return dict(bench=dict(B=1, T=64, H=2, N=16), demo_steps=2, demo_exact=4, demo_examples=32,
                    model=dict(n_layer=2, n_embd=64), T=64, T_long=128, segment=32, lora_rank=4,
                    big={"7.2b": dict(n_layer=2, n_embd=128), "13.3b": dict(n_layer=3, n_embd=128)},
                    offload_model=dict(n_layer=2, n_embd=128))
    return dict(bench=dict(B=4, T=4096, H=32, N=64), demo_steps=200, demo_exact=200, demo_examples=None,
                model=dict(n_layer=24, n_embd=2048), T=1024, T_long=4096, segment=1024, lora_rank=16,
                big={"7.2b": dict(n_layer=32, n_embd=4096), "13.3b": dict(n_layer=61, n_embd=4096)},
                offload_model=dict(n_layer=32, n_embd=2560))


# ---- the steps --------------------------------------------------------------------------------------

def step_environment(ctx: Context):
    import importlib

    import torch
    importlib.invalidate_caches()  # the install step has just filled the site folder
    info = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    for name in ("triton", "fla", "transformers"):
        try:
            info[name] = getattr(__import__(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
            info[name] = f"missing ({type(e).__name__})"
    detail = ", ".join(f"{k} {v}" for k, v in info.items() if k != "gpus")
    gpus = f"{len(info['gpus'])} x {info['gpus'][0]}" if info["gpus"] else "no GPU"
    ctx.report.add("environment", "pass", f"{gpus}; {detail}", info=info)


def step_install(ctx: Context):
    if ctx.args.no_install:
        return ctx.report.add("install", "skipped", "--no-install: using the source tree on PYTHONPATH")
    start, notes = time.monotonic(), []
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if wheels:
        rc, out, _ = ctx.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                         "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(ctx.site),
                                         *map(str, wheels)], 180)
        if rc != 0:
            return ctx.report.add("install", "fail", f"wheels from {WHEEL_DIR}: {_last_line(out)}",
                                  time.monotonic() - start)
        notes.append(f"{len(wheels)} wheels from .whl/")
    else:
        notes.append("no .whl/ (run `make gpu-wheels` where pip reaches PyPI)")
    rc, out, _ = ctx.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                     "--no-index", "-e", str(ROOT)], 180)
    if rc != 0:
        return ctx.report.add("install", "fail", f"pip install --no-deps -e .: {_last_line(out)}; "
                              + "; ".join(notes), time.monotonic() - start)
    notes.append("pip install --no-deps -e . ok")
    ctx.report.add("install", "pass", "; ".join(notes), time.monotonic() - start)


def _pytest_step(ctx: Context, step: str, select: str, limit: float):
    """tests/test_wkv7_gpu.py, the quick tests whose names match `select` (pytest -k)."""
    # -v: one line per test, so that a run cut short by the budget still says how far it got
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not slow", "--durations=5",
           "tests/test_wkv7_gpu.py", "-k", select]
    if ctx.args.tiny:  # the plumbing only: quick tests that run without a GPU
        cmd[-1] = f"({select}) and (fla_refuses_cpu or missing_sources)"
    rc, out, seconds = ctx.run(step, cmd, limit)
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", ln)),
                   _last_line(out))
    if rc is None:
        counts = {w: len(re.findall(rf" {w.upper()}\b", out)) for w in ("passed", "failed", "skipped")}
        running = [ln.split(" ")[0] for ln in out.splitlines() if ln.startswith("tests/")][-1:]
        return ctx.report.add(step, "fail", f"timed out in {' '.join(running) or '?'} after "
                              + ", ".join(f"{n} {w}" for w, n in counts.items()), seconds)
    failed = [ln.split(" ")[1] for ln in out.splitlines() if ln.startswith("FAILED ")][:5]
    detail = summary + (f"; first failures: {', '.join(failed)}" if failed else "")
    ctx.report.add(step, "pass" if rc == 0 else "fail", detail, seconds)


def step_cuda_tests(ctx: Context):
    _pytest_step(ctx, "cuda-tests", "not fla", 150)


def step_fla_tests(ctx: Context):
    _pytest_step(ctx, "fla-tests", "fla", 300)


def step_wkv_bench(ctx: Context):
    b = _sizes(ctx.args.tiny)["bench"]
    path = ctx.work / "bench_wkv.json"
    cmd = [sys.executable, "benchmarks/bench_wkv.py", "--device", ctx.device, "--backends", "cuda", "fla", "chunked",
           "--dtypes", "bf16", "--T", str(b["T"]), "--B", str(b["B"]), "--H", str(b["H"]), "--N", str(b["N"]),
           "--repeats", "3" if not ctx.args.tiny else "1", "--min-seconds", "0", "--json", str(path)]
    rc, out, seconds = ctx.run("wkv-bench", cmd, 240)
    if rc != 0 or not path.is_file():
        # the timings printed before the cut still say something (fla compiles for minutes on first use)
        done = re.findall(r"\.\.\. (\w+)\s+T=\s*\d+ \w+ (fwd\+bwd|fwd)\s+([\d.]+ ms)", out)
        partial = "; measured before that: " + ", ".join(f"{b} {p} {t}" for b, p, t in done) if done else ""
        return ctx.report.add("wkv-bench", "fail", ("timed out" if rc is None else _last_line(out)) + partial, seconds)
    res = json.loads(path.read_text())
    ms = {c["backend"]: c["ms"] for c in res["cases"] if c["pass"] == "fwd+bwd"}
    fwd = {c["backend"]: c["ms"] for c in res["cases"] if c["pass"] == "fwd"}
    cells = [f"{k} {ms[k]:.1f} ms (fwd {fwd.get(k, float('nan')):.1f})" for k in ("cuda", "fla", "chunked") if k in ms]
    detail = (f"fwd+bwd B={b['B']} T={b['T']} H={b['H']} N={b['N']} bf16: " + ", ".join(cells)
              + "".join(f"; {n}" for n in res["notes"]))
    status = "pass"
    if "cuda" in ms and "fla" in ms:
        ratio = ms["cuda"] / ms["fla"]
        detail += f"; ours/fla {ratio:.2f} (target <= 1)"
        status = "pass" if ratio <= 1.0 else "fail"
    elif ctx.device == "cuda":
        status, detail = "fail", detail + "; cuda or fla did not run"
    ctx.report.add("wkv-bench", status, detail, seconds, bench=res)


def step_gpu_bench(ctx: Context):
    """Targets: ours >= 1.3x fla's tokens/s at no more peak memory in every full fine-tuning row,
    the same step-0 loss (within 1e-2), and `auto`'s WKV-7 no slower than fla's kernels."""
    cmd = [sys.executable, "benchmarks/bench_gpu.py", "--device", ctx.device]
    if ctx.args.tiny:
        cmd += ["--tiny", "--trainers", "ours", "--steps", "1", "--repeats", "1"]
    rc, out, seconds = ctx.run("gpu-bench", cmd, 420)
    last = out.strip().splitlines()[-1:] or [""]
    if rc != 0 or not last[0].startswith("{"):
        return ctx.report.add("gpu-bench", "fail", "timed out" if rc is None else _last_line(out), seconds)
    res, misses, cells = json.loads(last[0]), [], []
    for r in res["train"]:
        if "error" in r:
            misses.append(f"{r['row']} {r['trainer']}: {r['error']}")
        elif "speedup" in r:
            cells.append(f"{r['row']}{' ckpt' if r['checkpointing'] else ''} {r['speedup']:.2f}x")
            if r["loss0_diff"] > 1e-2:
                misses.append(f"{r['row']} step-0 loss differs by {r['loss0_diff']:.3f}")
            if not r["row"].startswith("lora") and r["speedup"] < 1.3:
                misses.append(f"{r['row']} {r['speedup']:.2f}x < 1.3x")
    for r in res["wkv"]:
        if r["kernel"] == "ours-auto" and "ms" in r:
            fla = [o["ms"] for o in res["wkv"] if o["kernel"].startswith("fla") and "ms" in o
                   and (o["B"], o["T"], o["H"], o["state"]) == (r["B"], r["T"], r["H"], r["state"])]
            if fla and r["ms"] > min(fla):
                misses.append(f"WKV T={r['T']} H={r['H']}{' state' if r['state'] else ''} "
                              f"{r['ms'] / min(fla):.2f}x fla")
    detail = "tokens/s vs fla: " + (", ".join(cells) or "no fla rows") + "".join(f"; {m}" for m in misses)
    status = "fail" if misses or (ctx.device == "cuda" and not cells) else "pass"
    ctx.report.add("gpu-bench", status, detail, seconds, bench=res)


def step_demo(ctx: Context):
    s = _sizes(ctx.args.tiny)
    rc, result, out, seconds = ctx.child("demo", "demo", 150, device=ctx.device, steps=s["demo_steps"],
                                         exact=s["demo_exact"], examples=s["demo_examples"],
                                         out=str(ctx.work / "demo"))
    if rc != 0 or result is None:
        return ctx.report.add("demo", "fail", "timed out" if rc is None else _last_line(out), seconds)
    em, wall = result["exact_match"], result["wall_s"]
    detail = (f"held-out exact match {em:.1%} ({result['exact_match_n']} dates), {result['steps']} steps bf16 on "
              f"{result['device']}: {wall:.0f} s in all ({result['train_s']:.0f} s training)")
    status = "pass"
    if ctx.device == "cuda":
        detail += f"; targets >= {DEMO_MIN_EXACT:.0%}, <= {DEMO_MAX_S:.0f} s"
        status = "pass" if em >= DEMO_MIN_EXACT and wall <= DEMO_MAX_S else "fail"
    ctx.report.add("demo", status, detail, seconds, _gib(result.get("peak")), result=result)


def _write_checkpoint(ctx: Context, step: str, shape: dict, limit: float = 120):
    """A random checkpoint of `shape` written by a child process: (path or None, detail, seconds)."""
    path = ctx.work / f"model_{shape['n_layer']}x{shape['n_embd']}.pth"
    rc, result, out, seconds = ctx.child(step, "checkpoint", limit, device=ctx.device, path=str(path), **shape)
    if rc != 0 or result is None:
        return None, "timed out" if rc is None else _last_line(out), seconds
    return path, (f"{shape['n_layer']} x {shape['n_embd']}, {result['params'] / 1e9:.2f} B parameters, "
                  f"{path.stat().st_size / GiB:.2f} GiB bf16"), seconds


def step_checkpoint(ctx: Context):
    s = _sizes(ctx.args.tiny)
    path, detail, seconds = _write_checkpoint(ctx, "checkpoint", s["model"])
    if path is None:
        return ctx.report.add("checkpoint", "fail", detail, seconds)
    ctx.checkpoint = path
    _write_long_text(ctx.work / "long.jsonl", s["T_long"])
    ctx.report.add("checkpoint", "pass", detail, seconds)


def _train_flags(ctx: Context) -> set[str]:
    """The option strings `rwkv-sft train` knows in this build."""
    if ctx.train_flags is None:
        from rwkv_sft.cli import build_parser
        text = StringIO()
        try:
            with redirect_stdout(text):
                build_parser().parse_args(["train", "--help"])
        except SystemExit:
            pass
        ctx.train_flags = set(re.findall(r"--[a-z][a-z0-9-]*", text.getvalue()))
    return ctx.train_flags


def _train_step(ctx: Context, step: str, flags: list[str], T: int, nproc: int = 1, target: float | None = None,
                checkpoint: Path | None = None, steps: int = 1, cap_gib: float | None = None, limit: float = 150):
    """`steps` optimizer steps of `rwkv-sft train` on `checkpoint` (default: the checkpoint step's), a row
    with the loss and peak GPU memory (a pass/fail against `target` GiB); from 2 steps on, the last
    step's tokens/s. cap_gib: the GPU memory this process may use (set_per_process_memory_fraction)."""
    missing = [f for f in flags if f.startswith("--") and f not in _train_flags(ctx)]
    if missing:
        return ctx.report.add(step, "unavailable", f"this build of `rwkv-sft train` has no {', '.join(missing)}")
    checkpoint = checkpoint or ctx.checkpoint
    if checkpoint is None:
        return ctx.report.add(step, "skipped", "no checkpoint (the checkpoint step did not pass)")
    args = ["train", "--model", str(checkpoint), "--data", str(ctx.work / "long.jsonl"), "--format", "text",
            "--max-len", str(T), "--batch-tokens", str(T), "--max-steps", str(steps), "--warmup-steps", "0",
            "--device", ctx.device, "--precision", "bf16", "--out", str(ctx.work / step), "--no-progress",
            "--set", "tensorboard=false", "--set", "export=[]", *flags]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(__file__).resolve()), "--_child", "train", "--_args", json.dumps(dict(argv=args))]
        rc, out, seconds = ctx.run(step, cmd, 180)
        results = [json.loads(ln.split("GPU_CHECK_RESULT ", 1)[1]) for ln in out.splitlines() if "GPU_CHECK_RESULT " in ln]
        result = max(results, key=lambda r: r.get("peak") or 0) if results else None
    else:
        rc, result, out, seconds = ctx.child(step, "train", limit, argv=args, cap_gib=cap_gib)
    if rc != 0 or result is None or result.get("rc"):
        return ctx.report.add(step, "fail", "timed out" if rc is None else _last_line(out), seconds)
    peak = _gib(result.get("peak"))
    detail = f"{steps} step{'s' * (steps > 1)}, T={T}, {' '.join(flags)}; loss {result.get('loss')}"
    if checkpoint != ctx.checkpoint:
        detail = f"{checkpoint.name}: {detail}"
    if cap_gib is not None:
        detail += f"; GPU capped at {cap_gib} GiB"
    if result.get("step_tokens_per_s"):
        detail += f"; last step {result['step_tokens_per_s']:,.0f} tokens/s"
    if peak is not None:
        detail += f"; peak reserved {_gib(result.get('reserved')):.2f} GiB"
    status = "pass"
    if target is not None and peak is not None:
        detail += f"; target <= {target:.2f} GiB allocated"
        status = "pass" if peak <= target else "fail"
    ctx.report.add(step, status, detail, seconds, peak)


def _gib(x):
    return None if x is None else x / GiB


def step_lora(ctx: Context):
    s = _sizes(ctx.args.tiny)
    _train_step(ctx, "lora", ["--lora-rank", str(s["lora_rank"]), "--base-dtype", "bf16"], s["T"],
                target=None if ctx.args.tiny else PEAK_TARGET_GIB["lora"])


def step_state_tuning(ctx: Context):
    s = _sizes(ctx.args.tiny)
    _train_step(ctx, "state-tuning", ["--state-tuning", "--base-dtype", "bf16", "--lr", "0.01"], s["T"],
                target=None if ctx.args.tiny else PEAK_TARGET_GIB["state-tuning"])


def step_segmented(ctx: Context):
    s = _sizes(ctx.args.tiny)
    _train_step(ctx, "segmented", ["--lora-rank", str(s["lora_rank"]), "--base-dtype", "bf16",
                                   "--segment-len", str(s["segment"])], s["T_long"])


def step_fsdp(ctx: Context):
    import torch
    n = torch.cuda.device_count()
    if n < 2:
        return ctx.report.add("fsdp", "skipped", f"needs 2 or more GPUs, found {n}")
    _train_step(ctx, "fsdp", ["--parallel", "fsdp"], _sizes(ctx.args.tiny)["T"], nproc=n)


def step_offload(ctx: Context):
    if ctx.device != "cuda":
        return ctx.report.add("offload", "skipped", "needs a GPU (a CPU run has nothing to offload)")
    # full fine-tuning with the weights, gradients and AdamW's state in CPU memory, one process
    _train_step(ctx, "offload", ["--parallel", "fsdp", "--offload", "cpu"], _sizes(ctx.args.tiny)["T"])


def step_quant(ctx: Context):
    s = _sizes(ctx.args.tiny)
    _train_step(ctx, "quant", ["--lora-rank", str(s["lora_rank"]), "--base-dtype", "nf4"], s["T"], steps=2,
                target=None if ctx.args.tiny else QUANT_TARGET_GIB["1.5b"])


def step_quant_big(ctx: Context):
    """nf4 LoRA steps on bases a consumer GPU cannot hold in bf16, each checkpoint made for its row
    (on the GPU, several minutes and tens of GB of disk at 13.3B) and deleted after it."""
    s = _sizes(ctx.args.tiny)
    if ctx.checkpoint is None:
        return ctx.report.add("quant-big", "skipped", "no training text (the checkpoint step did not pass)")
    for name, shape in s["big"].items():
        step = f"quant-{name}"
        if ctx.left() < MIN_START_S:
            ctx.report.add(step, "skipped", "time budget spent")
            continue
        path, detail, seconds = _write_checkpoint(ctx, step, shape, limit=300)
        if path is None:
            ctx.report.add(step, "fail", f"writing the checkpoint: {detail}", seconds)
            continue
        try:
            _train_step(ctx, step, ["--lora-rank", str(s["lora_rank"]), "--base-dtype", "nf4",
                                    "--activation-checkpointing"], s["T"], checkpoint=path, limit=300,
                        target=None if ctx.args.tiny else QUANT_TARGET_GIB[name])
        finally:
            path.unlink(missing_ok=True)


def step_offload_big(ctx: Context):
    """Full fine-tuning of a model whose weights, gradients and AdamW state (16 bytes a parameter, 46 GB
    at 2.9B) exceed the GPU's allowed 16 GiB, beside the same steps on the whole GPU without offload."""
    if ctx.device != "cuda":
        return ctx.report.add("offload-2.9b", "skipped", "needs a GPU (a CPU run has nothing to offload)")
    s = _sizes(ctx.args.tiny)
    if ctx.checkpoint is None:
        return ctx.report.add("offload-2.9b", "skipped", "no training text (the checkpoint step did not pass)")
    path, detail, seconds = _write_checkpoint(ctx, "offload-2.9b", s["offload_model"], limit=300)
    if path is None:
        return ctx.report.add("offload-2.9b", "fail", f"writing the checkpoint: {detail}", seconds)
    try:
        _train_step(ctx, "offload-2.9b", ["--parallel", "fsdp", "--offload", "cpu"], s["T"], checkpoint=path,
                    steps=3, cap_gib=OFFLOAD_CAP_GIB, limit=400)
        _train_step(ctx, "offload-2.9b-baseline", [], s["T"], checkpoint=path, steps=3, limit=300)
    finally:
        path.unlink(missing_ok=True)


# The install first (the environment row then sees the installed fla), our kernel's tests and the
# quick steps next, so that a slow Triton compile (fla's kernels, minutes on first use) cannot
# starve them; fla's tests last, with whatever budget is left.
STEPS = {"install": step_install, "environment": step_environment, "cuda-tests": step_cuda_tests,
         "demo": step_demo, "checkpoint": step_checkpoint, "lora": step_lora, "state-tuning": step_state_tuning,
         "segmented": step_segmented, "fsdp": step_fsdp, "offload": step_offload, "quant": step_quant,
         "quant-big": step_quant_big, "offload-2.9b": step_offload_big, "wkv-bench": step_wkv_bench,
         "fla-tests": step_fla_tests, "gpu-bench": step_gpu_bench}
MIN_START_S = 20  # a step is not started with less of the budget left
OPT_IN = {"quant-big", "offload-2.9b"}  # minutes and tens of GB each: run only when named in --only


def _write_long_text(path: Path, T: int) -> None:
    """Examples of plain text longer than T tokens (one word is at least one token)."""
    import random
    rng = random.Random(0)
    words = ["state", "token", "model", "chunk", "decay", "value", "key", "layer", "head", "train"]
    with open(path, "w") as f:
        for _ in range(4):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(T + 16))}) + "\n")


# ---- child processes ------------------------------------------------------------------------------

def _peak(torch, device):
    if device.startswith("cuda"):
        return dict(peak=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
    return dict(peak=None, reserved=None)


def child_demo(kw):
    import torch
    from rwkv_sft.data import prepare_data
    from rwkv_sft.demo import demo_config
    from rwkv_sft.tokenizer import Tokenizer
    from rwkv_sft.train import train
    start = time.perf_counter()
    config = demo_config(kw["out"], kw["steps"], progress=False)
    config.device, config.precision, config.wkv_backend = kw["device"], "bf16", "auto"
    config.eval_exact_match, config.eval_every = kw["exact"], 0
    if kw["examples"]:  # the first examples of each file only (tiny runs)
        files = []
        for src in config.data.train_files + config.data.eval_files:
            files.append(Path(kw["out"]) / Path(src).name)
            files[-1].parent.mkdir(parents=True, exist_ok=True)
            files[-1].write_text("".join(Path(src).read_text().splitlines(keepends=True)[:kw["examples"]]))
        n = len(config.data.train_files)
        config.data.train_files, config.data.eval_files = [str(f) for f in files[:n]], [str(f) for f in files[n:]]
    tokenizer = Tokenizer()
    data = prepare_data(config.data, tokenizer=tokenizer, show_progress=False)
    result = train(config, data=data, tokenizer=tokenizer)
    ev = result.eval
    return dict(exact_match=ev["exact_match"], exact_match_n=ev["exact_match_n"], loss=ev["loss"],
                steps=result.steps, train_s=result.time_s, wall_s=time.perf_counter() - start,
                device=kw["device"], **_peak(torch, kw["device"]))


def child_checkpoint(kw):
    import torch
    from rwkv_sft import RWKV7, RWKV7Config
    from rwkv_sft.weights import save_model
    config = RWKV7Config(n_layer=kw["n_layer"], n_embd=kw["n_embd"])
    torch.manual_seed(0)
    try:
        with torch.device(kw["device"]):  # the upstream initialisation, on the GPU where there is one
            model = RWKV7(config)
        where = kw["device"]
    except Exception as e:  # noqa: BLE001 - slower on the CPU, but the checkpoint is what matters
        print(f"initialising on {kw['device']} failed ({type(e).__name__}: {e}); on the CPU instead", flush=True)
        model, where = RWKV7(config), "cpu"
    save_model(model, kw["path"], dtype=torch.bfloat16)
    return dict(params=model.num_parameters(), initialised_on=where)


def child_train(kw):
    import torch
    from rwkv_sft.cli import main
    device = kw["argv"][kw["argv"].index("--device") + 1]
    if kw.get("cap_gib") and device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, kw["cap_gib"] * GiB / total))
    rc = main(kw["argv"])
    out = Path(kw["argv"][kw["argv"].index("--out") + 1])
    loss = step_rate = None
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        train = [r for r in rows if r.get("kind") == "train"]
        loss = train[0]["loss"] if train else None
        if len(train) >= 2 and train[-1]["time"] > train[-2]["time"]:  # the last step alone: warm
            step_rate = (train[-1]["tokens"] - train[-2]["tokens"]) / (train[-1]["time"] - train[-2]["time"])
    return dict(rc=rc, loss=loss, step_tokens_per_s=step_rate, rank=int(os.environ.get("RANK", 0)),
                **_peak(torch, device))


CHILDREN = {"demo": child_demo, "checkpoint": child_checkpoint, "train": child_train}


# ---- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: $OUT, else runs/gpu_check)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default 480)")
    p.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps (in the usual order)")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no CUDA device (plumbing)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (with --allow-cpu: a quick run)")
    p.add_argument("--no-install", action="store_true", help="install nothing; use the source tree")
    p.add_argument("--download-wheels", metavar="DIR", nargs="?", const=str(WHEEL_DIR),
                   help=f"download the wheels the GPU machine lacks into DIR (default .whl/) and exit: {', '.join(WHEELS)}")
    p.add_argument("--_child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.download_wheels:
        return download_wheels(Path(args.download_wheels))
    if args._child:
        result = CHILDREN[args._child](json.loads(args._args))
        print("GPU_CHECK_RESULT " + json.dumps(result), flush=True)
        return 0 if not result.get("rc") else 1

    try:
        import torch
    except ImportError:
        print("gpu_check: no torch in this Python; nothing checked")
        return 2
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); nothing checked")
        return 2

    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    report = Report(out, "tiny" if args.tiny else "full")
    work = Path(tempfile.mkdtemp(prefix="rwkv_sft_gpu_check_"))
    ctx = Context(args, report, work)
    print(f"gpu_check: {ctx.device}, budget {args.budget:.0f} s, output {out}", flush=True)
    try:
        for name, fn in STEPS.items():
            if args.only and name not in args.only:
                continue
            if ctx.left() < MIN_START_S:
                report.add(name, "skipped", f"time budget of {args.budget:.0f} s spent")
                continue
            if name in OPT_IN and not args.only:
                report.add(name, "skipped", "run only when named: --only " + name)
                continue
            start = time.monotonic()
            try:
                fn(ctx)
            except Exception as e:  # noqa: BLE001 - one broken step must not end the check
                report.add(name, "fail", f"{type(e).__name__}: {e}"[:300], time.monotonic() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + report.table())
    print(f"\ntable: {out / 'gpu_check.json'}; output of every step: {report.log_path}")
    return 1 if any(r["status"] == "fail" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
