"""`--offload cpu`: FSDP2's CPUOffloadPolicy in one process without torchrun, on a GPU; a one-line
error where there is nothing to offload from (a CPU run) or no FSDP to do it."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_train_helpers import metric_lines, tiny_config, tiny_data, tiny_examples

from rwkv_sft.cli import main


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "fsdp", "--offload", "cpu", "--device", "cpu"], "this run is on cpu"),
    (["--offload", "cpu"], "give --parallel fsdp with --offload cpu"),
])
def test_offload_without_a_gpu_or_fsdp_is_a_one_line_error(tmp_path, capsys, flags, message):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"context": "1+1=", "completion": "2"}) + "\n")
    args = ["train", "--data", str(data), "--n-layer", "1", "--n-embd", "64", "--out", str(tmp_path / "run"),
            "--no-progress", "--max-steps", "1"]
    assert main(args + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def _losses(out_dir):
    return [m["loss"] for m in metric_lines(out_dir) if m["kind"] == "train"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_trains_as_one_process_and_resumes(tmp_path):
    from torch.distributed.tensor import DTensor

    from rwkv_sft.train import train

    def config(out, **kw):  # fp32: equal to rounding; several micro-batches per step
        return tiny_config(out, device="cuda", precision="fp32", wkv_backend="chunked", step_tokens=24,
                           batch_tokens=48, save_every=3, keep_last=4, export=["pth"], **kw)

    data = SimpleNamespace(train=tiny_examples(24), eval=tiny_examples(6, seed=5), report={})
    one = train(config(tmp_path / "one", eval_exact_match=3), data=data)
    off = train(config(tmp_path / "off", parallel="fsdp", offload="cpu", eval_exact_match=3), data=data)
    torch.testing.assert_close(_losses(tmp_path / "off"), _losses(tmp_path / "one"), rtol=1e-5, atol=0)
    # the evaluation (greedy generation included) runs on the GPU too
    (ev_one,), (ev_off,) = ([m for m in metric_lines(tmp_path / r) if m["kind"] == "eval"] for r in ("one", "off"))
    assert ev_off["exact_match_n"] == 3 and ev_off["loss"] == pytest.approx(ev_one["loss"], rel=1e-5)
    # the shards (and so AdamW's state) live in CPU memory; the blocks ran on the GPU
    assert all(isinstance(p, DTensor) and p.to_local().device.type == "cpu" for p in off.model.parameters())
    exported = torch.load(tmp_path / "off" / "model.pth", weights_only=True)
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(exported[k].float(), v.float().cpu(), rtol=1e-4, atol=1e-5, msg=k)
    # its sharded step-3 checkpoint continues without offload, as the uninterrupted run did
    shutil.rmtree(tmp_path / "off" / "checkpoints" / "step_000006")
    train(config(tmp_path / "off", resume="auto"), data=tiny_data())
    torch.testing.assert_close(_losses(tmp_path / "off"), _losses(tmp_path / "one"), rtol=1e-5, atol=0)
