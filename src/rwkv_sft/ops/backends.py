"""The WKV-7 backends by name, each imported on first use so optional backends cost nothing."""
from __future__ import annotations

import importlib

# backend name -> (module, function)
BACKENDS = {
    "reference": ("rwkv_sft.ops.wkv7_reference", "wkv7_reference"),
    "chunked": ("rwkv_sft.ops.wkv7_chunked", "wkv7_chunked"),
    "cuda": ("rwkv_sft.ops.wkv7_cuda", "wkv7_cuda"),
    "fla": ("rwkv_sft.ops.wkv7_fla", "wkv7_fla"),
}


def load_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown WKV-7 backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    module, function = BACKENDS[name]
    return getattr(importlib.import_module(module), function)
