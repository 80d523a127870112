"""One source for each setting's type: the choice lists (Literal types) that the flags, the config
files and validation read; a type without a check is an error; adapters replace modules."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from rwkv_sft import settings
from rwkv_sft.adapters.files import AdapterSettings
from rwkv_sft.cli import build_parser, main
from rwkv_sft.data.config import DataConfig
from rwkv_sft.errors import UserError
from rwkv_sft.settings import Precision, Quantized, WkvBackend, choices
from rwkv_sft.train.config import TrainConfig

from conftest import random_model

CONFIGS = {"": TrainConfig, "data.": DataConfig}


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


SAME_AS_TRAIN = ("precision", "wkv_backend")  # eval's flags that mean what train's do


def _setting_of(command: str, dest: str):
    """(class, field) a flag stores into: train's `c:KEY` / `c:data.KEY`, the data flags' `data.KEY`,
    eval's --precision and --wkv-backend."""
    key = dest[2:] if dest.startswith("c:") else dest
    if key.startswith("data."):
        return DataConfig, key[len("data."):]
    if dest.startswith("c:") or key in SAME_AS_TRAIN:
        return (TrainConfig, key) if key in settings.field_types(TrainConfig) else (None, None)
    return None, None


def test_every_choice_flag_takes_its_choices_from_the_setting():
    """Every flag of every command that stores into a choice setting offers exactly the setting's
    Literal values, and every choice setting with a flag has them (nothing spelled twice)."""
    checked = set()
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            cls, name = _setting_of(command, action.dest)
            if cls is None:
                continue
            want = choices(settings.field_types(cls)[name])
            if want or action.choices:
                assert tuple(action.choices or ()) == want, (command, action.option_strings)
                checked.add((command, name))
    assert {("train", n) for n in ("schedule", "precision", "wkv_backend", "parallel", "offload", "objective",
                                   "lora_init", "base_dtype", "export", "report_to", "format")} <= checked
    assert {("eval", "precision"), ("eval", "wkv_backend"), ("eval", "format"), ("inspect-data", "format")} <= checked
    # flags without a config setting of their own name read the same types
    subs = _subparsers(build_parser())
    flag = lambda cmd, opt: next(a for a in subs[cmd]._actions if opt in a.option_strings)  # noqa: E731
    assert flag("eval", "--base-dtype").choices == flag("generate", "--base-dtype").choices == choices(Quantized)
    assert set(flag("generate", "--dtype").choices) == set(choices(Precision)) - {"auto"}


def test_the_code_behind_each_choice_list_knows_the_same_values():
    from rwkv_sft import ops
    from rwkv_sft.adapters import lora, quant, training
    from rwkv_sft.train import preference
    assert set(choices(WkvBackend)) == {"auto", *ops._BACKENDS}
    assert quant.KINDS == training.QUANTIZED == choices(Quantized)
    assert set(choices(Quantized)) < set(choices(settings.BaseDtype))
    assert lora.INITS == choices(settings.LoraInit)
    assert set(preference.DEFAULT_BETA) == set(choices(settings.Objective)) - {"sft"}


@pytest.mark.parametrize("name, text, setting", [
    ("run.yaml", "schedule: cosin\n", r"schedule: expected one of cosine, linear, constant, got 'cosin'"),
    ("run.toml", "export = ['pth', 'onnx']\n", r"export: expected one of pth, safetensors, hf, got 'onnx'"),
    ("run.yaml", "offload: gpu\n", r"offload: expected one of cpu, got 'gpu'"),
    ("run.yaml", "precision: 16\n", r"precision: expected one of auto, bf16, fp32, got 16"),
    # a list's items are checked too: an int among the LoRA targets stopped the run with a traceback
    ("run.yaml", "lora_rank: 4\nlora_targets: [1]\n", r"lora_targets: expected str, got 1"),
    ("run.yaml", "freeze: [emb, 3]\n", r"freeze: expected str, got 3"),
    ("run.yaml", "betas: [0.9]\n", r"betas: expected 2 values"),
    ("run.yaml", "data_format: chat\n", r"unknown setting 'data_format'"),
])
def test_a_bad_value_in_a_config_file_is_one_line_naming_file_and_setting(tmp_path, capsys, name, text, setting):
    path = tmp_path / name
    common = ("model_config = {n_layer = 1, n_embd = 64}\n[data]\ntrain_files = ['a.jsonl']\n" if name.endswith(".toml")
              else "model_config: {n_layer: 1, n_embd: 64}\ndata:\n  train_files: [a.jsonl]\n")
    path.write_text(text + common)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"rwkv-sft train: error: {path}: ") and setting.split(":")[0] in err, err
    import re
    assert re.search(setting, err), err


def test_a_bad_data_choice_names_the_table(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model_config: {n_layer: 1, n_embd: 64}\ndata:\n  train_files: [a.jsonl]\n  format: chatml\n")
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"rwkv-sft train: error: {path}: data.format: expected one of auto, "
                                               "completion, alpaca, chat, text, got 'chatml'")


def test_a_config_built_in_python_is_checked_against_the_same_choices():
    data = DataConfig(train_files=["a.jsonl"])
    for key, value in (("schedule", "cosin"), ("objective", "ppo"), ("export", ["pth", "onnx"]),
                       ("parallel", "tp"), ("base_dtype", "fp8")):
        with pytest.raises(UserError, match=f"^{key}: expected one of .*, got "):
            TrainConfig(data=data, model_config={"n_layer": 1}, **{key: value}).validate()
    with pytest.raises(UserError, match="^data.format: expected one of auto, completion, alpaca, chat, text, "
                                        "got 'chatml'$"):
        DataConfig(train_files=["a.jsonl"], format="chatml")
    for key, value, message in (("lr", -1.0, r"^lr must be positive, got -1.0$"),
                                ("keep_last", 0, r"^keep_last must be >= 1"),
                                ("warmup_ratio", 0.6, r"^warmup_ratio must be in \[0, 0.5\], got 0.6 \(warmup"),
                                ("seed", 2**63, r"^seed must be in \[0, 2\*\*63\)")):
        with pytest.raises(UserError, match=message):
            TrainConfig(data=data, model_config={"n_layer": 1}, **{key: value}).validate()


@pytest.mark.parametrize("text, message", [
    ("lr: -1\n", "lr must be positive, got -1.0"),
    ("lr_final: -1.0e-5\n", "lr_final must be >= 0, got -1e-05"),
    ("max_steps: 0\n", "max_steps must be >= 1, got 0"),
    ("lora_rank: 2\nlora_dropout: 1.5\n", r"lora_dropout must be in \[0, 1\), got 1.5"),
    ("data: {train_files: [a.jsonl], anchor_fraction: 1}\n", r"data.anchor_fraction must be in \[0, 1\), got 1.0"),
])
def test_a_value_out_of_range_in_a_config_file_names_file_and_setting(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text + "model_config: {n_layer: 1, n_embd: 64}\n" +
                    ("" if text.startswith("data") else "data: {train_files: [a.jsonl]}\n"))
    assert main(["train", "--config", str(path)]) == 2
    import re
    assert re.fullmatch(f"rwkv-sft train: error: {re.escape(str(path))}: {message}", capsys.readouterr().err.strip())


def test_a_setting_of_a_type_without_a_check_is_an_error_not_accepted():
    """A field whose type the checker does not know cannot slip through unchecked."""
    @dataclasses.dataclass
    class Odd:
        where: Path = Path(".")
        pair: typing.Union[int, str] = 0

    for key in ("where", "pair"):
        with pytest.raises(TypeError, match=f"odd.yaml: {key}: no check for a setting of type"):
            settings.coerce_fields({key: "x"}, Odd, "odd.yaml")
    # ... and every real setting has one: its default passes its own check
    for cls in (TrainConfig, DataConfig, AdapterSettings):
        for f in dataclasses.fields(cls):
            if f.name == "data":
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = ["x.jsonl"] if default is dataclasses.MISSING else default
            settings.coerce(value, settings.field_types(cls)[f.name], f.name)


def test_lora_settings_have_one_check():
    """A run's config and a direct add_lora call refuse a bad LoRA setting with the same message."""
    from rwkv_sft.adapters import add_lora
    data = DataConfig(train_files=["a.jsonl"])
    for bad, message in ((dict(lora_init="dora"), "lora_init: expected one of lora, pissa, got 'dora'"),
                         (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
                         (dict(lora_alpha=-2.0), "lora_alpha must be positive, got -2.0")):
        with pytest.raises(UserError, match=message):
            TrainConfig(data=data, model_config={"n_layer": 1}, lora_rank=4, **bad).validate()
        args = dict(init=bad.get("lora_init", "lora"), dropout=bad.get("lora_dropout", 0.0),
                    alpha=bad.get("lora_alpha"))
        with pytest.raises(UserError, match=message):
            add_lora(random_model(n_layer=1, n_embd=64, vocab_size=256), rank=4, **args)


def _no_hooks(model):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_adapters_replace_modules_and_keep_parameters_and_keys():
    """LoRA and a compact base put new modules in place of the old ones (no class swapped, no
    hook added); the new modules hold the very parameters, so keys and values stay."""
    from rwkv_sft import adapters
    model = random_model(n_layer=2, n_embd=64, vocab_size=256)
    keys = list(model.state_dict())
    key_layer, weight = model.blocks[0].att.key, model.blocks[0].att.key.weight
    head, emb = model.head, model.emb
    adapters.add_lora(model, rank=4)
    adapters.freeze_base(model)
    new = model.blocks[0].att.key
    assert new is not key_layer and type(key_layer) is nn.Linear and isinstance(new, adapters.LoRALinear)
    assert new.weight is weight
    assert [k for k in model.state_dict() if "lora" not in k] == keys
    adapters.compact_frozen(model, torch.bfloat16)
    assert type(head) is nn.Linear and type(emb) is nn.Embedding  # the originals are untouched
    assert model.head is not head and model.head.weight is head.weight and model.head.weight.dtype == torch.bfloat16
    assert model.emb is not emb and model.emb.weight is emb.weight
    assert model.emb(torch.tensor([1, 2])).dtype == torch.float32
    assert [k for k in model.state_dict() if "lora" not in k] == keys
    assert _no_hooks(model)
    adapters.compact_frozen(model, torch.bfloat16)  # a second time changes nothing
    assert model.blocks[0].att.key is new


def test_an_adapter_files_settings_are_checked_against_their_types(tmp_path):
    from rwkv_sft.adapters.files import read_adapter, save_adapter
    tensors = {"blocks.0.att.key.lora_A": torch.zeros(2, 8)}
    for bad, message in ((dict(lora_init="dora"), r"lora_init: expected one of lora, pissa, got 'dora'"),
                         (dict(lora_rank="four"), r"lora_rank: expected int, got 'four'"),
                         (dict(lora_targets=[3]), r"lora_targets: expected str, got 3")):
        path = save_adapter(tmp_path / "a.safetensors", tensors, AdapterSettings(**{"lora_rank": 2, **bad}),
                            {"fingerprint": "0"})
        with pytest.raises(UserError, match=f"^{path}: adapter settings: {message}$"):
            read_adapter(path)
    good = save_adapter(tmp_path / "b.safetensors", tensors, AdapterSettings(lora_rank=2, lora_alpha=4.0),
                        {"fingerprint": "0"})
    assert read_adapter(good)[1] == AdapterSettings(lora_rank=2, lora_alpha=4.0)


def test_a_runs_resolved_config_reads_back_as_it_was(tmp_path):
    """OUT/config.yaml (every setting, resolved) passes the same checks and gives the same config."""
    import yaml
    from rwkv_sft.train.rundir import write_config
    config = TrainConfig(data=DataConfig(train_files=["a.jsonl"], format="chat", anchor_fraction=0.5),
                         model_config={"n_layer": 1, "n_embd": 64}, lora_rank=4, lora_init="pissa",
                         state_tuning=True, schedule="linear", export=["hf"], report_to=["none"],
                         betas=(0.8, 0.9), warmup_ratio=0.1, out_dir=str(tmp_path)).validate()
    write_config(tmp_path, config)
    again = TrainConfig.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()),
                                  source=str(tmp_path / "config.yaml")).validate()
    assert again == config


@pytest.mark.parametrize("quantized", [False, True])
def test_adapters_off_computes_the_frozen_base_alone(quantized):
    """The preference objectives' reference pass switches each LoRA layer off by a flag; on a
    quantized base as on a plain one, it equals the model whose adapters add nothing."""
    from rwkv_sft import adapters
    from rwkv_sft.adapters.training import quantize_model
    from rwkv_sft.train.preference import adapters_off
    model = random_model(n_layer=1, n_embd=64, vocab_size=256)
    adapters.add_lora(model, rank=4)
    adapters.freeze_base(model)
    if quantized:
        quantize_model(model, "int8")
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in adapters.lora_modules(model).values():
            m.lora_B.normal_()
        on = model(tokens)[0]
        with adapters_off(model):
            off = model(tokens)[0]
        assert torch.equal(model(tokens)[0], on)  # restored on exit
        for m in adapters.lora_modules(model).values():
            m.lora_B.zero_()
        torch.testing.assert_close(off, model(tokens)[0], atol=0, rtol=0)
    assert (on - off).abs().max() > 1e-3
