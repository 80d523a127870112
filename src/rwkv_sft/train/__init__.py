"""Training: `from rwkv_sft.train import train, TrainConfig` (imported on first use, cheaply)."""


def __getattr__(name):
    if name in ("train", "TrainResult"):
        from . import loop
        return getattr(loop, name)
    if name == "TrainConfig":
        from .config import TrainConfig
        return TrainConfig
    raise AttributeError(f"module 'rwkv_sft.train' has no attribute {name!r}")


__all__ = ["train", "TrainConfig", "TrainResult"]
