"""Reading a training step checkpoint directory (`OUT/checkpoints/step_N`): the files it holds,
its state, and the model's tensors in it. Writing one is the trainer's (train/checkpoint.py); this
part sits low because loading a model or an adapter from a step directory needs it too.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import UserError

STATE_FILE, MARKER = "state.pt", "COMPLETE"
SHARDS = "shards"  # the directory of torch.distributed.checkpoint files inside a sharded checkpoint


def is_checkpoint(path) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() and (path / STATE_FILE).is_file()


def model_weights(path) -> dict:
    """The model's tensors (BlinkDL names) in the training checkpoint directory `path`."""
    if not is_checkpoint(path):
        raise UserError(f"{path}: is a directory but not a training checkpoint (expected {STATE_FILE} and {MARKER}, "
                        f"as in OUT/checkpoints/step_000100), nor a Hugging Face directory (config.json), "
                        "nor a .pth or .safetensors file")
    state = load_checkpoint(path)
    if state.get("adapter") is not None:  # a parameter-efficient run saves only what it trains
        base = state.get("config", {}).get("model") or "BASE"
        raise UserError(f"{path}: a checkpoint of a parameter-efficient run holds only this step's adapter: "
                        f"use --model {base} --adapter {path} (generate, eval); to train on from it, resume its "
                        f"run (train --resume) or merge it first (rwkv-sft merge --model {base} --adapter {path} "
                        f"--out merged.pth)")
    return _sharded_model(path) if state.get("sharded") else state["model"]


def _sharded_model(path) -> dict:
    """The model's tensors of a sharded checkpoint, read whole by this one process (any number of
    processes wrote it); the optimizer's shards are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(str(Path(path) / SHARDS))
    try:
        entries = reader.read_metadata().state_dict_metadata
        model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
                 if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # its notes on loading without a process group: meant, not news
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
            dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    except Exception as e:  # noqa: BLE001 - a missing or damaged shard is a bad checkpoint for the user
        raise UserError(f"{path}: cannot read the sharded checkpoint ({str(e).splitlines()[0][:200]})") from None
    return model


def load_checkpoint(path) -> dict:
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file for the user
        raise UserError(f"{path}: cannot read the training checkpoint ({str(e).splitlines()[0][:200]})") from None
