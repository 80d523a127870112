"""Model files in and out: BlinkDL `.pth`, `.safetensors`, Hugging Face directories and training
checkpoints read into an `RWKV7` (with an adapter or a quantized base), and written back; a learned
state file read into a model; the `info`, `convert` and `merge` commands. Above `model/` (the math)
and `adapters/`, which know no files of whole models."""
import importlib

# imported on first use: the command line answers --help without loading torch
_LAZY = {name: ".checkpoint" for name in ("export_state_dict", "infer_config", "load_model", "read_state_dict",
                                          "save_model", "write_state_dict")}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
