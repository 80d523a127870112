"""The files the tool writes: never over its own input, with the mode the umask gives, and only
its own deleted by --overwrite."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import random_model
from test_train_helpers import VOCAB, tiny_config, tiny_data

from rwkv_sft.weights import load_model, save_model
from rwkv_sft import adapters
from rwkv_sft.adapters.state import save_state
from rwkv_sft.weights.state import load_state
from rwkv_sft.cli import main
from rwkv_sft.train import train
from rwkv_sft.utils import atomic_write

SHAPE = dict(n_layer=2, n_embd=64, vocab_size=VOCAB)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture
def umask():
    """Set the process umask for a test, and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _cli_error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def _base_and_adapter(tmp_path):
    base = random_model(seed=1, **SHAPE)
    base_path = tmp_path / "base.pth"
    save_model(base, base_path)
    settings = adapters.AdapterSettings(lora_rank=4, lora_alpha=8.0)
    info = adapters.base_info(base)
    adapters.attach(base, settings)
    adapter = adapters.save_adapter(tmp_path / "adapter.safetensors", adapters.adapter_state_dict(base), settings, info)
    return base_path, adapter


# -- merge and convert never replace their input, nor an existing file unless asked -------------------

def test_merge_and_convert_refuse_their_input_and_existing_outputs(tmp_path, capsys):
    base, adapter = _base_and_adapter(tmp_path)
    (tmp_path / "link.pth").symlink_to(base)
    os.link(base, tmp_path / "hard.pth")
    original = base.read_bytes()
    for out in (base, tmp_path / "link.pth", tmp_path / "hard.pth"):
        for overwrite in ([], ["--overwrite"]):
            err = _cli_error(capsys, "merge", "--model", base, "--adapter", adapter, "--out", out, *overwrite)
            assert f"{out}: is the input {base}" in err
            err = _cli_error(capsys, "convert", base, out, "--dtype", "bf16", *overwrite)
            assert f"{out}: is the input {base}" in err
    assert "is the input" in _cli_error(capsys, "merge", "--model", base, "--adapter", adapter, "--out", adapter,
                                        "--overwrite")
    assert base.read_bytes() == original and load_model(base).emb.weight.dtype == torch.float32

    merged, converted = tmp_path / "merged.pth", tmp_path / "converted.safetensors"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert main(["convert", str(base), str(converted)]) == 0
    for argv in (["merge", "--model", base, "--adapter", adapter, "--out", merged], ["convert", merged, converted]):
        before = {p: p.read_bytes() for p in (merged, converted)}
        assert "already exists; give --overwrite" in _cli_error(capsys, *argv)
        assert {p: p.read_bytes() for p in (merged, converted)} == before
        assert main([str(a) for a in argv] + ["--overwrite"]) == 0
    assert load_model(converted).emb.weight.dtype == torch.float32  # now the merged model's copy
    torch.testing.assert_close(load_model(converted).state_dict(), load_model(merged).state_dict(), atol=0, rtol=0)


# -- modes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    with atomic_write(tmp_path / "f") as tmp:
        tmp.write_text("x")
    with open(tmp_path / "plain", "w"):
        pass
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def _modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()}


def test_every_file_a_run_merge_and_convert_write_is_readable_as_the_umask_says(tmp_path, umask):
    umask(0o022)
    full = tmp_path / "full"
    train(tiny_config(full, max_steps=3, save_every=1, export=["pth", "safetensors"]), data=tiny_data())
    # the resume rewrites metrics.jsonl (trimmed to its checkpoint) through atomic_write
    train(tiny_config(full, max_steps=4, resume="auto", export=["pth", "safetensors"]), data=tiny_data())
    base = tmp_path / "base.pth"
    save_model(random_model(seed=1, **SHAPE), base)
    peft = tmp_path / "peft"
    train(tiny_config(peft, model_config=None, model=str(base), lora_rank=4, state_tuning=True, max_steps=2,
                      save_every=1), data=tiny_data())
    assert main(["merge", "--model", str(base), "--adapter", str(peft / "adapter.safetensors"),
                 "--out", str(tmp_path / "merged.safetensors")]) == 0
    assert main(["convert", str(full / "model.pth"), str(tmp_path / "converted.pth"), "--dtype", "bf16"]) == 0
    modes = _modes(tmp_path)
    for name in ("full/model.pth", "full/model.safetensors", "full/config.yaml", "full/metrics.jsonl",
                 "peft/adapter.safetensors", "peft/state.pth", "peft/config.yaml", "merged.safetensors",
                 "converted.pth"):
        assert name in modes
    assert any(name.startswith("full/checkpoints/step_") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


# -- --overwrite deletes the run's files only ------------------------------------------------------------

def test_overwrite_deletes_only_what_the_run_wrote(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, max_steps=3, save_every=1, keep_last=3, export=["pth"]), data=tiny_data())
    mine = {out / "notes.txt": "mine", out / "checkpoints" / "mine.txt": "mine too",
            out / "checkpoints" / "step_best" / "w.pth": "kept", out / "tensorboard" / "notes.txt": "also"}
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (out / "checkpoints" / ".tmp_step_000009_1").mkdir()  # an interrupted save's leftovers are the run's
    train(tiny_config(out, max_steps=1, overwrite=True, export=[]), data=tiny_data(seed=4))
    assert {path: path.read_text() for path in mine} == mine
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["mine.txt", "step_000001", "step_best"]
    assert not (out / "model.pth").exists()

    # a folder holding only the user's files is not a run: nothing to refuse, nothing deleted
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "mine.txt").write_text("mine")
    train(tiny_config(other, max_steps=1, export=[]), data=tiny_data())
    assert (other / "checkpoints" / "mine.txt").read_text() == "mine"


# -- every step checkpoint of a PEFT run is usable as it is ----------------------------------------------

def _logits(model):
    with torch.no_grad():
        return model(torch.arange(1, 24).view(1, -1) % VOCAB)[0]


def test_each_peft_checkpoint_holds_and_serves_its_own_steps_adapter(tmp_path, capsys):
    base = tmp_path / "base.pth"
    save_model(random_model(seed=1, **SHAPE), base)
    out = tmp_path / "run"
    train(tiny_config(out, model_config=None, model=str(base), lora_rank=4, state_tuning=True, lr=1e-2,
                      max_steps=4, save_every=2, keep_last=2), data=tiny_data())
    step2, step4 = out / "checkpoints" / "step_000002", out / "checkpoints" / "step_000004"
    (latest, settings, info), (mine, settings4, info4) = (adapters.read_adapter(out / "adapter.safetensors"),
                                                          adapters.read_adapter(step4 / "adapter.safetensors"))
    torch.testing.assert_close(latest, mine, atol=0, rtol=0)
    assert (settings, info) == (settings4, info4)
    torch.testing.assert_close(torch.load(out / "state.pth", weights_only=True),
                               torch.load(step4 / "state.pth", weights_only=True), atol=0, rtol=0)
    at = {step: _logits(load_model(base, adapter=step)) for step in (step2, step4)}
    assert (at[step2] - at[step4]).abs().max() > 1e-3  # two different steps
    torch.testing.assert_close(at[step4], _logits(load_model(base, adapter=out / "adapter.safetensors")), atol=0, rtol=0)
    # the step's adapter is the one its state.pt trained: a checkpoint without the file (older
    # versions wrote none) reads the same tensors from state.pt
    (step2 / "adapter.safetensors").unlink()
    torch.testing.assert_close(_logits(load_model(base, adapter=step2)), at[step2], atol=0, rtol=0)
    with_state = load_model(base)
    load_state(with_state, step4)  # --state STEP_DIR: that step's state.pth
    torch.testing.assert_close(with_state.learned_state(), load_model(base, adapter=step4).learned_state())

    # --model STEP_DIR: the advice names this step and the run's base, never OUT/adapter.safetensors
    err = _cli_error(capsys, "generate", "--model", step2, "--prompt", "x", "--max-new-tokens", "1")
    assert f"--model {base} --adapter {step2}" in err and "OUT/adapter" not in err
    capsys.readouterr()
    # train has no --adapter: the advice also names what train can do with the step
    (tmp_path / "d.jsonl").write_text('{"context": "a", "completion": " b"}\n')
    assert main(["train", "--model", str(step2), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the data report)
    assert f"rwkv-sft merge --model {base} --adapter {step2}" in err and "train --resume" in err, err
    assert main(["generate", "--model", str(base), "--adapter", str(step2), "--prompt", "x", "--max-new-tokens", "1"]) == 0
    assert main(["merge", "--model", str(base), "--adapter", str(step4), "--out", str(tmp_path / "m.pth")]) == 0
    assert (_logits(load_model(tmp_path / "m.pth")) - _logits(load_model(base))).abs().max() > 1e-3


def test_a_wrong_file_as_adapter_says_what_it_is(tmp_path, capsys):
    base, adapter = _base_and_adapter(tmp_path)
    model = load_model(base)
    model.enable_state_tuning()
    save_state(model, tmp_path / "state.pth")
    run_full = tmp_path / "full"
    train(tiny_config(run_full, max_steps=1), data=tiny_data())
    for path, says in ((tmp_path / "state.pth", "a learned-state file (give it with --state), not an adapter"),
                       (base, "a PyTorch checkpoint (a model goes to --model), not an adapter"),
                       (run_full / "checkpoints" / "step_000001", "full fine-tuning run holds a whole model"),
                       (run_full, "neither an adapter file nor a training checkpoint")):
        err = _cli_error(capsys, "merge", "--model", base, "--adapter", path, "--out", tmp_path / "m.pth")
        assert says in err and "header too large" not in err


# -- resume: a finished run is left alone; the token count continues -------------------------------------

def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_resuming_a_finished_run_says_so_once_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    for export in ([], ["pth"]):
        train(tiny_config(out, max_steps=3, save_every=1, export=export, overwrite=True), data=tiny_data())
        before = _snapshot(out)
        capsys.readouterr()
        r = train(tiny_config(out, max_steps=3, resume="auto", export=export), data=tiny_data())
        printed = capsys.readouterr().out
        assert printed.count("nothing to train") == 1 and "training finished" not in printed
        assert "tokens/s" not in printed and printed.count("\n") == 1
        assert _snapshot(out) == before
        assert r.steps == 3 and not r.interrupted and r.checkpoint.name == "step_000003"
    assert r.exports == {"pth": out / "model.pth"}


def test_peft_run_resumed_when_finished_touches_nothing(tmp_path, capsys):
    base = tmp_path / "base.pth"
    save_model(random_model(seed=1, **SHAPE), base)
    config = dict(model_config=None, model=str(base), state_tuning=True, max_steps=2, save_every=1)
    train(tiny_config(tmp_path / "run", **config), data=tiny_data())
    before = _snapshot(tmp_path / "run")
    r = train(tiny_config(tmp_path / "run", resume="auto", **config), data=tiny_data())
    assert _snapshot(tmp_path / "run") == before and set(r.exports) == {"adapter", "state"}


def _train_tokens(out) -> list[tuple[int, int]]:
    from test_train_helpers import metric_lines
    return [(m["step"], m["tokens"]) for m in metric_lines(out) if m["kind"] == "train"]


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_cumulative_tokens_continue_from_the_resumed_step(tmp_path, old_checkpoint):
    train(tiny_config(tmp_path / "straight", max_steps=5), data=tiny_data())
    straight = _train_tokens(tmp_path / "straight")
    assert [s for s, _ in straight] == [1, 2, 3, 4, 5] and straight[0][1] < straight[-1][1]
    out = tmp_path / "resumed"
    train(tiny_config(out, max_steps=2, save_every=1), data=tiny_data())
    if old_checkpoint:  # written before checkpoints held the count: it comes from metrics.jsonl
        path = out / "checkpoints" / "step_000002" / "state.pt"
        state = torch.load(path, weights_only=True)
        del state["metrics"]["tokens"]
        torch.save(state, path)
    train(tiny_config(out, max_steps=5, resume="auto"), data=tiny_data())
    assert _train_tokens(out) == straight


def test_a_sharded_checkpoint_as_model_loads_without_torchs_warnings(tmp_path):
    """A checkpoint of an fsdp run (shards written with torch.distributed.checkpoint), read whole
    by one process: the same weights, and nothing on stderr."""
    import subprocess
    import sys
    import warnings

    import torch.distributed.checkpoint as dcp

    from rwkv_sft.train import checkpoint as ckpt
    model = random_model(seed=3, **SHAPE)
    tmp = ckpt.temp_dir(tmp_path, 1)
    tmp.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=tmp / ckpt.SHARDS, no_dist=True)
    step = ckpt.save_checkpoint(tmp_path, 1, {"sharded": True, "step": 1}, keep_last=1, tmp=tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(step)
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), atol=0, rtol=0)
    proc = subprocess.run([sys.executable, "-m", "rwkv_sft", "info", str(step)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "" and "n_layer: 2" in proc.stdout


# -- the run header says what runs ----------------------------------------------------------------------

def _header(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("rwkv-sft train: ") and " layers x " in line)


def test_the_header_shows_the_frozen_dtype_and_the_segments(tmp_path, capsys):
    base = tmp_path / "base.pth"
    save_model(random_model(seed=1, **SHAPE), base)
    for dtype in ("bf16", "fp32"):
        train(tiny_config(tmp_path / dtype, model_config=None, model=str(base), lora_rank=4, base_dtype=dtype,
                          max_steps=1), data=tiny_data())
        assert f"M frozen in {dtype}, " in _header(capsys)
    data = tiny_data()  # examples of 6..20 tokens
    longest = int(data.train.lengths.max()) - 1
    train(tiny_config(tmp_path / "s8", max_steps=1, segment_len=8), data=data)
    assert "fp32, rows in segments of 8 tokens (" in _header(capsys)
    train(tiny_config(tmp_path / "auto", max_steps=1, batch_tokens=16), data=data)  # auto: rows over 16 tokens
    header = _header(capsys)
    assert longest > 16 and "rows in segments of 16 tokens (" in header
    for settings in (dict(segment_len=0, batch_tokens=16), dict(batch_tokens=64)):  # never / no row that long
        train(tiny_config(tmp_path / "none", max_steps=1, overwrite=True, **settings), data=data)
        assert "segments" not in _header(capsys)


def _fsdp_header(rank, port, out):
    import contextlib
    import sys

    from test_train_fsdp import _start
    _start(rank, port)
    with open(f"{out}.rank{rank}", "w") as f, contextlib.redirect_stdout(f):
        train(tiny_config(out, max_steps=1, parallel="fsdp", dist_timeout_s=60), data=tiny_data())
    sys.stdout.flush()


def test_the_header_shows_fsdp(tmp_path):
    import torch.multiprocessing as mp
    from test_train_dist import _free_port
    mp.spawn(_fsdp_header, args=(_free_port(), str(tmp_path / "run")), nprocs=2, join=True)
    header = next(line for line in (tmp_path / "run.rank0").read_text().splitlines() if " layers x " in line)
    assert "2 process(es) (fsdp) on cpu" in header, header
