"""rwkv-sft: fine-tune RWKV-7 language models on context -> completion data."""
import importlib

# Imported on first use: the command line answers --help without loading torch.
_LAZY = {"RWKV7": ".model", "RWKV7Config": ".model", "RWKV7State": ".model", "Tokenizer": ".tokenizer"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rwkv_sft' has no attribute {name!r}")


__all__ = ["RWKV7", "RWKV7Config", "RWKV7State", "Tokenizer"]
__version__ = "0.1.0"
