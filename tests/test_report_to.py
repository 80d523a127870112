"""`train --report-to tensorboard|wandb|none` (stand-ins for both packages record what they are
given) and `train --export hf`."""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import torch

from rwkv_sft.weights import load_model
from rwkv_sft.cli import main
from rwkv_sft.train.metrics import MetricsLogger


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(id=kwargs.get("id") or f"run{len(self.inits)}", log=self._log, finish=self._finish)

    def _log(self, data, step):
        self.logs.append((step, data))

    def _finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.fixture
def fake_tensorboard(monkeypatch):
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, name, value, step):
            scalars.append((name, value, step))

        def close(self):
            pass
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return scalars


def _train(tmp_path, *extra):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"context": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(6)))
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--no-progress", "--n-layer", "1", "--n-embd", "64", "--out", str(out),
            "--max-steps", "2", "--batch-tokens", "32", "--set", "eval_exact_match=0", *extra]
    return main(argv), out


def test_wandb_gets_every_numeric_metric_and_the_run_config(tmp_path, fake_wandb, fake_tensorboard):
    rc, out = _train(tmp_path, "--report-to", "wandb", "--export", "pth")
    assert rc == 0
    (init,) = fake_wandb.inits
    assert init["dir"] == str(out) and init["name"] == "run" and init["config"]["max_steps"] == 2
    assert "mode" not in init  # WANDB_MODE (offline) is wandb's to read
    assert [s for s, d in fake_wandb.logs if "train/loss" in d] == [1, 2]
    assert fake_wandb.finished == 1 and not fake_tensorboard  # tensorboard not asked for
    assert (out / "wandb" / "run_id").read_text() == "run1"
    assert (out / "model.pth").is_file() and not (out / "model.safetensors").exists()


def test_logger_resumes_the_same_wandb_run_and_none_logs_nowhere(tmp_path, fake_wandb, fake_tensorboard):
    for _ in range(2):
        with MetricsLogger(tmp_path, report_to=["wandb", "tensorboard"], run_config={"a": 1}) as m:
            m.log("train", 3, loss=1.5, note="text", ok=True)
    assert [i["id"] for i in fake_wandb.inits] == [None, "run1"] and fake_wandb.inits[1]["resume"] == "allow"
    assert fake_wandb.logs == [(3, {"train/loss": 1.5})] * 2
    assert fake_tensorboard == [("train/loss", 1.5, 3)] * 2
    with MetricsLogger(tmp_path / "n", report_to=["none"]) as m:
        m.log("train", 1, loss=2.0)
    assert len(fake_wandb.logs) == 2 and len(fake_tensorboard) == 2
    assert (tmp_path / "n" / "metrics.jsonl").read_text().count("\n") == 1  # the record a run keeps
    with MetricsLogger(tmp_path / "d") as m:  # default: TensorBoard, as before
        m.log("train", 1, loss=2.0)
    assert fake_tensorboard[-1] == ("train/loss", 2.0, 1)


def test_wandb_missing_or_bad_choice_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    rc, out = _train(tmp_path, "--report-to", "wandb")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "rwkv-sft[wandb]" in err and len(err.splitlines()) == 1  # before the data is read
    assert not out.exists()
    rc, _ = _train(tmp_path, "--report-to", "none", "wandb")
    assert rc == 2 and "report_to" in capsys.readouterr().err


def test_export_hf_is_the_same_model_as_export_pth(tmp_path):
    rc, out = _train(tmp_path, "--export", "pth", "hf", "--report-to", "none")
    assert rc == 0 and (out / "model.hf" / "config.json").is_file()
    a, b = load_model(out / "model.pth").state_dict(), load_model(out / "model.hf").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rc, _ = _train(tmp_path, "--export", "hf", "--report-to", "none", "--overwrite")  # a fresh run replaces it
    assert rc == 0 and (out / "model.hf" / "model.safetensors").is_file() and not (out / "model.pth").exists()
