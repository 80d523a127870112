"""LoRA / PiSSA adapters: merge, adapter files, compact frozen base, PEFT training and resume."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import yaml
import torch.nn.functional as F
from conftest import random_model, rwkv_package_model
from test_train_helpers import VOCAB, tiny_config, tiny_data

from rwkv_sft.weights import load_model, save_model
from rwkv_sft import adapters
from rwkv_sft.model.rwkv7 import ChannelMix, TimeMix
from rwkv_sft.ops.frozen import UpcastLinear
from rwkv_sft.cli import main
from rwkv_sft.errors import UserError
from rwkv_sft.train import train

SHAPE = dict(n_layer=2, n_embd=64, vocab_size=VOCAB)
TOKENS = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Bit-identical resume needs one reduction order; tiny shapes gain nothing from threads."""


def _perturb_adapters(model, seed=5, scale=0.2):
    """Trained-looking adapters: LoRA's B starts at zero, which would hide a wrong merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in adapters.adapter_state_dict(model).items():
            if not name.endswith(("lora_A0", "lora_B0")):
                t.add_(torch.randn(t.shape, generator=g) * scale)


def _lora_run_files(tmp_path, init="lora", rank=4):
    """A base checkpoint and an adapter file for it, as a run would write them."""
    base = random_model(seed=1, **SHAPE)
    base_path = tmp_path / "base.pth"
    save_model(base, base_path)
    settings = adapters.AdapterSettings(lora_rank=rank, lora_alpha=8.0, lora_init=init)
    info = adapters.base_info(base)
    adapters.attach(base, settings)
    _perturb_adapters(base)
    adapter_path = adapters.save_adapter(tmp_path / "adapter.safetensors", adapters.adapter_state_dict(base),
                                         settings, info)
    return base_path, adapter_path, base


def _logits(model):
    with torch.no_grad():
        return model(TOKENS)[0]


def _cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_merged_checkpoint_equals_base_plus_adapter_here_and_in_the_rwkv_package(tmp_path):
    base_path, adapter_path, trained = _lora_run_files(tmp_path)
    adapted = load_model(base_path, adapter=adapter_path)
    expected = _logits(adapted)
    torch.testing.assert_close(expected, _logits(trained), atol=0, rtol=0)  # load == what training computed
    assert (expected - _logits(load_model(base_path))).abs().max() > 1e-2  # the adapter does something

    for suffix in ("pth", "safetensors"):
        merged_path = tmp_path / f"merged.{suffix}"
        assert main(["merge", "--model", str(base_path), "--adapter", str(adapter_path), "--out", str(merged_path)]) == 0
        merged = load_model(merged_path)
        assert not adapters.lora_modules(merged)
        assert merged.state_dict().keys() == load_model(base_path).state_dict().keys()  # BlinkDL keys only
        torch.testing.assert_close(_logits(merged), expected, atol=2e-5, rtol=0)

    reference = rwkv_package_model(tmp_path / "merged.pth")
    theirs = reference.forward(TOKENS[0].tolist(), None, full_output=True)[0]
    torch.testing.assert_close(expected[0], theirs, atol=2e-4, rtol=0)


def test_pissa_leaves_the_model_unchanged_at_step_0_and_merges(tmp_path):
    model = random_model(seed=1, **SHAPE)
    before = _logits(model)
    names = adapters.add_lora(model, rank=4, alpha=2.0, init="pissa")
    lora = adapters.lora_modules(model)[names[0]]
    assert lora.lora_B.abs().max() > 0 and torch.equal(lora.lora_A, lora.lora_A0)  # principal directions, not zero
    # scale * B0 A0 is the best rank-4 approximation of W: the residual is what the top 4 directions leave
    S = torch.linalg.svdvals(lora.weight)
    residual = torch.linalg.matrix_norm(lora.weight - lora.scale * lora.lora_B0 @ lora.lora_A0)
    assert residual < 1.01 * S[4:].norm()
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)

    _perturb_adapters(model)
    base_path, adapter_path = tmp_path / "base.pth", tmp_path / "adapter.safetensors"
    plain = random_model(seed=1, **SHAPE)
    save_model(plain, base_path)
    settings = adapters.AdapterSettings(lora_rank=4, lora_alpha=2.0, lora_init="pissa")
    adapters.save_adapter(adapter_path, adapters.adapter_state_dict(model), settings, adapters.base_info(plain))
    assert main(["merge", "--model", str(base_path), "--adapter", str(adapter_path), "--out", str(tmp_path / "m.pth")]) == 0
    torch.testing.assert_close(_logits(load_model(tmp_path / "m.pth")), _logits(model), atol=2e-5, rtol=0)


def test_adapter_errors_are_one_line(tmp_path, capsys):
    base_path, adapter_path, _ = _lora_run_files(tmp_path)
    other = tmp_path / "other.pth"
    save_model(random_model(seed=2, **SHAPE), other)
    err = _cli_error(capsys, "merge", "--model", str(other), "--adapter", str(adapter_path), "--out", str(tmp_path / "x.pth"))
    assert "another base" in err
    bigger = tmp_path / "bigger.pth"
    save_model(random_model(seed=1, n_layer=3, n_embd=64, vocab_size=VOCAB), bigger)
    assert "3 layers" in _cli_error(capsys, "merge", "--model", str(bigger), "--adapter", str(adapter_path), "--out", "x.pth")

    data = adapter_path.read_bytes()
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:])
    assert "corrupt adapter" in _cli_error(capsys, "merge", "--model", str(base_path), "--adapter", str(flipped), "--out", "x.pth")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _cli_error(capsys, "merge", "--model", str(base_path), "--adapter", str(truncated),
                                                "--out", "x.pth")
    model_file = tmp_path / "model.safetensors"
    save_model(load_model(base_path), model_file)
    assert "not an rwkv-sft adapter" in _cli_error(capsys, "merge", "--model", str(base_path), "--adapter",
                                                   str(model_file), "--out", "x.pth")
    with pytest.raises(UserError, match="'att.keys' matches no linear layer.*att.receptance"):
        adapters.add_lora(random_model(**SHAPE), targets=["att.keys"])
    with pytest.raises(UserError, match="'head' cannot take LoRA"):
        adapters.add_lora(random_model(**SHAPE), targets=["head"])
    # "*": every linear layer of the blocks (the head is not eligible), the default targets here
    every = adapters.add_lora(random_model(**SHAPE), targets=["*"])
    assert every == adapters.match_targets(random_model(**SHAPE), adapters.DEFAULT_TARGETS) and len(every) == 12
    assert adapters.add_lora(random_model(**SHAPE), targets=["blocks.1.*"]) == [n for n in every if n.startswith("blocks.1.")]
    with pytest.raises(UserError, match="'he\\*' matches no linear layer of the blocks"):
        adapters.add_lora(random_model(**SHAPE), targets=["he*"])
    assert adapters.add_lora(random_model(**SHAPE), targets=["blocks.1.att.key,ffn.value"]) == [
        "blocks.0.ffn.value", "blocks.1.att.key", "blocks.1.ffn.value"]


def test_upcast_linear_matches_fp32_linear_and_keeps_no_fp32_copy():
    w = torch.randn(48, 32).to(torch.bfloat16)
    x = torch.randn(5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = UpcastLinear.apply(x, w)
    y2 = F.linear(x2, w.float())
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.bfloat16]  # the stored weight, not a copy
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(y, y2, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("deep_embed", [False, True])
def test_compact_bf16_base_computes_the_bf16_rounded_model_in_fp32(deep_embed):
    model = random_model(seed=1, deep_embed=deep_embed, **SHAPE)
    adapters.add_lora(model, rank=4)
    _perturb_adapters(model)
    adapters.freeze_base(model)
    twin = random_model(seed=1, deep_embed=deep_embed, **SHAPE)  # the same model with its frozen matrices rounded to bf16, all fp32
    adapters.add_lora(twin, rank=4)
    twin.load_state_dict(model.state_dict())
    adapters.compact_frozen(model, torch.bfloat16)
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            q.copy_(p.float())
            matrix = (p.dim() == 2 and name.endswith(".weight") and "lora" not in name
                      or name.rsplit(".", 1)[-1] in TimeMix.LOW_RANK + ChannelMix.LOW_RANK)
            assert p.dtype == (torch.bfloat16 if matrix and not p.requires_grad else torch.float32), name
    assert model.emb.weight.dtype == model.blocks[0].att.key.weight.dtype == model.head.weight.dtype == torch.bfloat16
    assert model.blocks[1].att.w1.dtype == model.blocks[1].att.v2.dtype == torch.bfloat16
    assert not deep_embed or model.blocks[0].ffn.s1.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model), _logits(twin), atol=1e-5, rtol=1e-5)
    loss = model(TOKENS)[0].logsumexp(-1).mean()
    loss.backward()
    twin_loss = twin(TOKENS)[0].logsumexp(-1).mean()
    twin_loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (not p.requires_grad), name
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


LORA_RUN = dict(lora_rank=4, lora_alpha=8.0, max_steps=6, save_every=2, keep_last=2, wkv_backend="chunked")


def _base_file(tmp_path, dtype=torch.float32):
    path = tmp_path / "base.pth"
    if not path.exists():
        save_model(random_model(seed=1, **SHAPE), path, dtype=dtype)
    return path


def test_lora_training_changes_only_the_adapter_and_checkpoints_only_it(tmp_path, capsys):
    base_path = _base_file(tmp_path, torch.bfloat16)
    base = load_model(base_path)
    result = train(tiny_config(tmp_path / "run", model_config=None, model=str(base_path), lr=1e-2, **LORA_RUN),
                   data=tiny_data())
    model = result.model
    assert model.activation_checkpointing  # the PEFT default, and the run says so
    assert "1 process(es) on cpu, fp32, activation checkpointing;" in capsys.readouterr().out
    for k, v in base.state_dict().items():  # the frozen weights, bit-identical, kept in bf16
        assert torch.equal(model.state_dict()[k].to(v.dtype), v), k
    assert model.blocks[0].att.key.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    saved = torch.load(result.checkpoint / "state.pt", weights_only=True)
    assert set(saved["model"]) == set(adapters.adapter_state_dict(model)) and saved["model"]
    assert len(saved["optimizer"]["state"]) == len(saved["model"])  # nothing frozen in the optimizer
    assert result.exports == {"adapter": tmp_path / "run" / "adapter.safetensors"}
    # the adapter file reproduces the trained model
    adapted = load_model(base_path, dtype=torch.float32, adapter=result.exports["adapter"])
    model.eval()
    torch.testing.assert_close(_logits(adapted), _logits(model), atol=1e-5, rtol=0)
    assert (_logits(adapted) - _logits(load_model(base_path, dtype=torch.float32))).abs().max() > 1e-3


def _sigterm_at_step(monkeypatch, n):
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return original


def _straight_and_resumed(tmp_path, monkeypatch, settings):
    """(the run straight through, the same run stopped by SIGTERM at step 3 and resumed)."""
    straight = train(tiny_config(tmp_path / "a", **settings), data=tiny_data())
    original = _sigterm_at_step(monkeypatch, 3)
    first = train(tiny_config(tmp_path / "b", **settings), data=tiny_data())
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert first.interrupted and first.steps == 3
    return straight, train(tiny_config(tmp_path / "b", resume="auto", **settings), data=tiny_data())


def test_resume_of_a_pissa_run_is_bit_identical(tmp_path, monkeypatch):
    base_path = _base_file(tmp_path)
    settings = dict(model_config=None, model=str(base_path), lora_init="pissa", lora_dropout=0.1, **LORA_RUN)
    straight, second = _straight_and_resumed(tmp_path, monkeypatch, settings)
    assert second.steps == 6
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ta, tb = (adapters.read_adapter(tmp_path / run / "adapter.safetensors")[0] for run in "ab")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    with pytest.raises(UserError, match="other adapter settings.*lora_rank=4"):
        train(tiny_config(tmp_path / "b", resume="auto", **{**settings, "lora_rank": 8}), data=tiny_data())
    # dropout is a training setting like lr: a resume may change it (the adapter's shape and meaning stay)
    more = train(tiny_config(tmp_path / "b", resume="auto", **{**settings, "lora_dropout": 0.3, "max_steps": 7}),
                 data=tiny_data())
    assert more.steps == 7 and adapters.read_adapter(tmp_path / "b" / "adapter.safetensors")[1].lora_dropout == 0.3
    other = tmp_path / "other.pth"
    save_model(random_model(seed=2, **SHAPE), other)
    with pytest.raises(UserError, match="another base"):
        train(tiny_config(tmp_path / "b", resume="auto", **{**settings, "model": str(other)}), data=tiny_data())
    with pytest.raises(UserError, match="parameter-efficient run, but this run is a full"):
        train(tiny_config(tmp_path / "b", resume="auto", model_config=None, model=str(base_path), max_steps=6),
              data=tiny_data())


def _ddp_worker(rank, port, out_dir, base_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(tiny_config(out_dir, model_config=None, model=base_path, lora_rank=4, max_steps=None, epochs=1,
                      step_tokens=10**6, batch_tokens=48, wkv_backend="chunked"), data=tiny_data())


@pytest.mark.slow
def test_lora_on_two_processes_equals_one_process(tmp_path):
    """DDP reduces only the adapter's gradients (the frozen base is neither broadcast nor reduced)."""
    import torch.multiprocessing as mp
    from test_train_dist import _free_port
    base_path = str(_base_file(tmp_path))
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path / "ddp"), base_path), nprocs=2, join=True)
    single = train(tiny_config(tmp_path / "one", model_config=None, model=base_path, lora_rank=4, max_steps=None,
                               epochs=1, step_tokens=10**6, batch_tokens=48, wkv_backend="chunked"), data=tiny_data())
    got = adapters.read_adapter(tmp_path / "ddp" / "adapter.safetensors")[0]
    want = adapters.read_adapter(tmp_path / "one" / "adapter.safetensors")[0]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    assert single.steps == 1 and (got["blocks.0.att.key.lora_B"] != 0).any()


def _losses(out_dir) -> list[float]:
    from test_train_helpers import metric_lines
    return [m["loss"] for m in metric_lines(out_dir) if m["kind"] == "train"]


def test_lora_and_state_compose_with_accumulation_checkpointing_segments_and_bf16(tmp_path):
    """LoRA + a learned state with several micro-batches per step (accumulation), trained three
    ways that must agree: as it is; with activation checkpointing and rows run 8 tokens at a time
    (equal); under bf16 autocast (close)."""
    base_path = str(_base_file(tmp_path))
    settings = dict(model_config=None, model=base_path, lora_rank=4, lora_alpha=8.0, state_tuning=True,
                    max_steps=4, step_tokens=96, wkv_backend="chunked", lr=1e-2)
    micro = train(tiny_config(tmp_path / "micro", batch_tokens=24, **settings), data=tiny_data())
    whole = train(tiny_config(tmp_path / "whole", batch_tokens=24, activation_checkpointing=True, segment_len=8,
                              **settings), data=tiny_data())
    bf16 = train(tiny_config(tmp_path / "bf16", batch_tokens=24, precision="bf16", **settings), data=tiny_data())
    reference = _losses(tmp_path / "micro")
    assert len(reference) == 4 and reference[-1] < reference[0]  # it learns
    assert _losses(tmp_path / "whole") == pytest.approx(reference, rel=1e-5)
    assert _losses(tmp_path / "bf16") == pytest.approx(reference, rel=0.02)
    a, b = (adapters.adapter_state_dict(r.model) for r in (micro, whole))
    assert any(k.endswith("time_state") for k in a) and a.keys() == b.keys()
    for k in a:
        # atol: Adam turns a gradient that is ~0 up to rounding into a step of ~lr of either sign
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    assert bf16.bad_steps == 0


def _record_group_lrs(monkeypatch):
    """Patch AdamW.step to record, per call, (the learned states' lr, the other groups' lrs)."""
    original, seen = torch.optim.AdamW.step, []

    def step(self, *a, **k):
        is_state = [all(p.dim() == 3 for p in g["params"]) for g in self.param_groups]  # time_state: [H, N, N]
        seen.append(([g["lr"] for g, s in zip(self.param_groups, is_state) if s],
                     {g["lr"] for g, s in zip(self.param_groups, is_state) if not s}))
        return original(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_lora_and_state_train_at_their_own_learning_rates_recorded_and_resumable(tmp_path, monkeypatch):
    settings = dict(model_config=None, model=str(_base_file(tmp_path)), state_tuning=True, lr=1e-3, lr_final=1e-4,
                    warmup_steps=0, **{**LORA_RUN, "max_steps": 3})
    seen = _record_group_lrs(monkeypatch)
    train(tiny_config(tmp_path / "run", state_lr=5e-3, **settings), data=tiny_data())
    assert len(seen) == 3 and all(len(state) == 1 and len(other) == 1 for state, other in seen)
    assert [s[0] for s, _ in seen] == [pytest.approx(5 * next(iter(o))) for _, o in seen]  # same schedule, scaled
    assert seen[0][0] == [pytest.approx(5e-3)] and seen[-1][0] == [pytest.approx(5e-4)]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["state_lr"] == 5e-3
    # a resume may change it, like lr
    seen.clear()
    train(tiny_config(tmp_path / "run", resume="auto", state_lr=2e-3, **{**settings, "max_steps": 5}), data=tiny_data())
    assert len(seen) == 2 and all(s[0] == pytest.approx(2 * next(iter(o))) for s, o in seen)
    assert seen[-1][0] == [pytest.approx(2e-4)]
    # the default: the state method's lr; and it means nothing without both adapters
    from rwkv_sft.train.config import LR_DEFAULTS
    assert tiny_config(tmp_path / "x", **settings).validate().state_lr == LR_DEFAULTS["state"]
    with pytest.raises(UserError, match="state_lr applies when LoRA and a learned state train together"):
        tiny_config(tmp_path / "x", model_config=None, model="m.pth", state_tuning=True, state_lr=1e-2).validate()
