"""Shared test helpers: random RWKV-7 models and the `rwkv` package as the outside reference."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from rwkv_sft import RWKV7, RWKV7Config

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and OpenMP's waits stall when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(seed=0, scale=0.1, **config) -> RWKV7:
    """A fresh model with every parameter perturbed, so no path is silently zero."""
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def rwkv_package_model(path_pth, deep_embed=False):
    """Load `path_pth` with the `rwkv` pip package (RWKV_x070, cpu fp32) — code nobody here wrote."""
    pytest.importorskip("rwkv")
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "0"
    if deep_embed:
        os.environ["RWKV_DE_VERSION"] = "1"
    else:
        os.environ.pop("RWKV_DE_VERSION", None)
    # The package picks its code paths from the environment at import time: re-import it.
    if "rwkv.model" in sys.modules:
        module = importlib.reload(sys.modules["rwkv.model"])
    else:
        module = importlib.import_module("rwkv.model")
    assert str(path_pth).endswith(".pth")
    return module.RWKV(str(path_pth)[: -len(".pth")], "cpu fp32")
