from .config import RWKV7Config
from .rwkv7 import RWKV7, RWKV7State

__all__ = ["RWKV7", "RWKV7Config", "RWKV7State"]
