"""Shared pieces of the training tests: tiny data, tiny configs, random batches."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rwkv_sft.data import Batch, DataConfig, TokenizedExamples

VOCAB = 256


def tiny_examples(n=24, seed=0, vocab=VOCAB, min_len=6, max_len=20):
    """Random (tokens, loss flags): a context then a completion that carries the loss."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ctx = int(rng.integers(1, length - 1))
        flags = np.arange(length) >= ctx
        out.append((rng.integers(1, vocab, length), flags))
    return TokenizedExamples.from_lists(out)


def tiny_data(n=24, seed=0):
    return SimpleNamespace(train=tiny_examples(n, seed), eval=None, report={})


def tiny_config(out_dir, **overrides):
    from rwkv_sft.train import TrainConfig
    settings = dict(data=DataConfig(train_files=["unused.jsonl"]),
                    model_config=dict(n_layer=2, n_embd=64, head_size=64, vocab_size=VOCAB),
                    out_dir=str(out_dir), max_steps=6, batch_tokens=64, lr=1e-3, warmup_steps=2,
                    progress=False, tensorboard=False, export=[], packing=True)
    settings.update(overrides)
    return TrainConfig(**settings)


def random_batch(B=3, T=10, vocab=VOCAB, seed=0, mask_fraction=0.4, resets=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < mask_fraction
    r = (torch.rand(B, T, generator=g) < 0.15) if resets else None
    return Batch(tokens, targets, mask, r)


def metric_lines(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

