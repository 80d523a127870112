import importlib

from .config import RWKV7Config

_LAZY = {"RWKV7": ".rwkv7", "RWKV7State": ".rwkv7"}  # torch is imported on first use


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RWKV7", "RWKV7Config", "RWKV7State"]
