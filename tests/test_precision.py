"""bf16 autocast on CPU: the WKV-7 operator, a training step, evaluation and the CLI, each against fp32.

Under autocast the time mix hands the operator bf16 projections beside fp32 decay and `a`
paths; every backend that runs here must accept that, compute the recurrence in fp32 and give
y in r's dtype (the policy in `rwkv_sft.ops.wkv7`). The GPU backends' twins are in
tests/test_wkv7_gpu.py and scripts/gpu_check.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import random_model
from rwkv_sft.cli import main
from rwkv_sft.weights import save_model
from rwkv_sft.data import TokenizedExamples
from rwkv_sft.ops import wkv7
from rwkv_sft.ops.wkv7_cuda import example_inputs
from rwkv_sft.ops.wkv7_reference import wkv7_reference
from rwkv_sft.tokenizer import Tokenizer
from rwkv_sft.eval.evaluate import evaluate
from rwkv_sft.precision import autocast
from rwkv_sft.train.step import accumulate_gradients
from rwkv_sft.train.loss import CompletionLoss
from test_train_helpers import random_batch

CPU_BACKENDS = ["reference", "chunked"]
BF16 = 2e-2  # relative: bf16 matmuls (8-bit mantissa) in the rest of the model
AUTOCAST_DTYPES = [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_operator_under_autocast_keeps_fp32_inside(backend):
    """r and v bf16, w/k/a/b fp32 (as the model's time mix gives them under autocast): y in r's
    dtype, the state fp32, every gradient in its input's dtype, and the fp32 results as close to
    a float64 run on the same values as fp32 arithmetic allows (a bf16 step would miss by ~1e-2)."""
    B, T, H, N = 2, 37, 2, 16
    g = torch.Generator().manual_seed(3)
    xs = [x.to(d) for x, d in zip(example_inputs(B, T, H, N, dtype=torch.float64), AUTOCAST_DTYPES)]
    state = torch.randn(B, H, N, N, generator=g) * 0.2
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[1, 20] = True
    dy = torch.randn(B, T, H, N, generator=g).bfloat16()  # y's gradient comes in y's dtype
    ds = torch.randn(B, H, N, N, generator=g)

    def run(inputs, s0, fn, precision):
        inputs = [x.detach().clone().requires_grad_() for x in inputs + [s0]]
        with autocast("cpu", precision):  # the forward only, as the training loop does
            y, s = fn(*inputs[:6], state=inputs[6], resets=resets)
        torch.autograd.backward((y, s), (dy.to(y.dtype), ds.to(s.dtype)))
        return [y, s] + [x.grad for x in inputs]

    got = run(xs, state, lambda *a, **k: wkv7(*a, backend=backend, **k), "bf16")
    want = run([x.double() for x in xs], state.double(), wkv7_reference, "fp32")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert [x.dtype for x in got[2:]] == AUTOCAST_DTYPES + [torch.float32]
    names = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate"]
    for name, x, ref in zip(names, got, want):
        tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-4  # bf16: one rounding of the result
        assert _rel(x, ref) < tol, f"{backend} {name}: {_rel(x, ref):.2e}"


def autocast_step(backend, checkpointing=False, precision="bf16"):
    """Loss and gradients of one training step of a small random model on packed rows."""
    model = random_model(seed=1, n_layer=2, n_embd=64, head_size=16, vocab_size=256)
    model.wkv_backend, model.activation_checkpointing = backend, checkpointing
    batch = random_batch(B=2, T=40, vocab=256, seed=4, resets=True)
    loss = accumulate_gradients(CompletionLoss(model, chunk_size=16), [batch], device="cpu",
                                global_count=batch.num_loss_tokens, precision=precision)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    return loss, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("backend,checkpointing", [("reference", False), ("chunked", False), ("chunked", True)])
def test_training_step_under_autocast_tracks_fp32(backend, checkpointing):
    """The loss within bf16 reach of fp32; the gradients as the reference backend's under the same
    autocast (the operator is fp32 inside in both) and pointing where fp32's do (the projections'
    bf16 matmuls alone move a few weight gradients by tens of percent, so no tight bound there)."""
    fp32, g32 = autocast_step(backend, checkpointing, "fp32")
    bf16, g16 = autocast_step(backend, checkpointing)
    _, twin = autocast_step("reference")
    assert abs(bf16 - fp32) < BF16 * abs(fp32)
    assert ((g16 - twin).norm() / twin.norm()).item() < 1e-2
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0).item() > 0.99


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_evaluate_under_autocast_tracks_fp32(backend):
    model = random_model(seed=2, scale=0.3, n_layer=2, n_embd=64, head_size=16, vocab_size=256)
    model.wkv_backend = backend
    g = torch.Generator().manual_seed(5)
    rows = []
    for n in (7, 12, 20):
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        rows.append((ids, [False] * (n - 4) + [True] * 4))
    examples = TokenizedExamples.from_lists(rows)
    run = lambda precision: evaluate(model, examples, Tokenizer(), exact_match_samples=2,  # noqa: E731
                                     max_new_tokens=3, precision=precision)
    fp32, bf16 = run("fp32"), run("bf16")
    assert abs(bf16["loss"] - fp32["loss"]) < BF16 * fp32["loss"]
    assert bf16["exact_match_n"] == 2  # greedy decoding ran under autocast too


@pytest.mark.slow
def test_cli_train_and_eval_bf16_track_fp32(tmp_path, capsys):
    """`train --precision bf16` (packing, accumulation, activation checkpointing, an eval) and
    `eval --precision bf16` against the same commands in fp32, on a model with non-trivial logits."""
    model = random_model(seed=3, scale=0.1, n_layer=2, n_embd=64)  # the World vocabulary
    save_model(model, tmp_path / "base.pth")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context": f"Q{i}: {i * 7}?", "completion": f" {i * 7 % 11}"}) + "\n"
                            for i in range(12)))
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["train", "--model", str(tmp_path / "base.pth"), "--data", str(data), "--eval-data", str(data),
                     "--out", str(out), "--precision", precision, "--device", "cpu", "--max-steps", "1",
                     "--batch-tokens", "64", "--step-tokens", "40", "--packing", "--activation-checkpointing",
                     "--eval-exact-match", "1", "--lr", "1e-6", "--no-progress", "--set", "tensorboard=false",
                     "--set", "export=[]"]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[precision, "train"] = next(r["loss"] for r in records if r["kind"] == "train")
        capsys.readouterr()
        assert main(["eval", "--model", str(tmp_path / "base.pth"), "--data", str(data), "--precision", precision,
                     "--device", "cpu", "--exact-match", "1", "--max-new-tokens", "2", "--json"]) == 0
        losses[precision, "eval"] = json.loads(capsys.readouterr().out)["loss"]
    for kind in ("train", "eval"):
        assert abs(losses["bf16", kind] - losses["fp32", kind]) < BF16 * losses["fp32", kind], losses
