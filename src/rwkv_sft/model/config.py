"""RWKV7Config: every dimension of an RWKV-7 model; checkpoints infer it from tensor shapes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def low_rank_dim(factor: float) -> int:
    """Upstream's rounding of a LoRA width: a multiple of 32, at least 32."""
    return max(32, int(round(factor / 32)) * 32)


@dataclass
class RWKV7Config:
    n_layer: int
    n_embd: int
    vocab_size: int = 65536
    head_size: int = 64
    # Low-rank widths of the w/a/v/g projections; None -> current upstream formulas.
    dim_w: int | None = None
    dim_a: int | None = None
    dim_v: int | None = None
    dim_g: int | None = None
    dim_ffn: int | None = None  # None -> 4 * n_embd
    deep_embed: bool = False  # the DeepEmbed variant (ffn.s_emb, s1, s2, s0, s_emb_x)
    deep_embed_dim: int = 32  # s_emb rows hold deep_embed_dim ** 2 values

    def __post_init__(self):
        C = self.n_embd
        if self.n_layer < 1 or C < 1 or self.vocab_size < 1 or self.head_size < 1:
            raise ValueError(f"n_layer, n_embd, vocab_size and head_size must be positive, got {self}")
        if C % self.head_size:
            raise ValueError(f"n_embd={C} is not a multiple of head_size={self.head_size}")
        root = math.sqrt(C)
        self.dim_w = self.dim_w or low_rank_dim(2.5 * root)
        self.dim_a = self.dim_a or low_rank_dim(2.5 * root)
        self.dim_v = self.dim_v or low_rank_dim(1.7 * root)
        self.dim_g = self.dim_g or low_rank_dim(5 * root)
        self.dim_ffn = self.dim_ffn or 4 * C

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return asdict(self)
