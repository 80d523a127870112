"""rwkv-sft: fine-tune RWKV-7 language models on context -> completion data."""
from .model import RWKV7, RWKV7Config, RWKV7State


def __getattr__(name):
    # The tokenizer loads its vocabulary on first use only.
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'rwkv_sft' has no attribute {name!r}")


__all__ = ["RWKV7", "RWKV7Config", "RWKV7State", "Tokenizer"]
__version__ = "0.1.0"
