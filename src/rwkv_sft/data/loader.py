"""BatchLoader: length-bucketed padded batches or packed rows, split exactly once across ranks.

Every rank computes the same global plan for an epoch (deterministic in seed and epoch) and
takes batches rank, rank + world_size, ...; ranks left short get zero-weight batches (a real
batch's tokens with an all-False loss mask), so every rank runs the same number of steps.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .batch import Batch
from .examples import TokenizedExamples

WINDOW = 1024  # examples bucketed or packed together: tight batches, yet still well shuffled


class BatchLoader:
    def __init__(self, examples: TokenizedExamples, *, batch_tokens: int, packing: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, max_batch_size: int | None = None):
        if batch_tokens < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_tokens={batch_tokens}, rank={rank}, world_size={world_size}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        self.examples, self.batch_tokens, self.packing = examples, batch_tokens, packing
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.max_batch_size = max_batch_size or batch_tokens
        self.positions = examples.lengths - 1  # an example of n tokens is n - 1 (input, target) pairs
        # Packing: rows as long as the longest example (or the budget), as many as the budget allows.
        self.row_len = int(min(batch_tokens, self.positions.max(initial=1)))
        self.rows_per_batch = max(1, min(self.max_batch_size, batch_tokens // self.row_len))
        self._plan_cache = (None, None)
        self._loss_counts = None

    # -- the plan: batches -> rows -> example indices, identical on every rank --------------------
    def plan(self, epoch: int) -> list[list[list[int]]]:
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = self.examples.epoch_indices(epoch, self.seed)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        batches = []
        for w in range(0, len(order), WINDOW):
            window = order[w:w + WINDOW]
            window = window[np.argsort(-self.positions[window], kind="stable")]  # longest first
            batches += self._pack(window) if self.packing else self._pad(window)
        if self.shuffle:
            batches = [batches[k] for k in np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))]
        self._plan_cache = (epoch, batches)
        return batches

    def _pad(self, window):
        """One example per row; rows of similar length share a batch of at most batch_tokens."""
        batches, rows, T = [], [], 0
        for i in window.tolist():
            p = int(self.positions[i])
            if rows and ((len(rows) + 1) * T > self.batch_tokens or len(rows) == self.max_batch_size):
                batches.append(rows)
                rows = []
            if not rows:
                T = p  # longest first: the first row sets the batch's length
            rows.append([i])
        return batches + [rows] if rows else batches

    def _pack(self, window):
        """First-fit decreasing into rows of row_len positions; an example longer than that is alone."""
        batches, rows, free = [], [], np.zeros(0, dtype=np.int64)
        for i in window.tolist():
            p = int(self.positions[i])
            if p > self.row_len:
                batches.append([[i]])
                continue
            fits = np.flatnonzero(free >= p)
            if len(fits):
                rows[fits[0]].append(i)
                free[fits[0]] -= p
            else:
                rows.append([i])
                free = np.append(free, self.row_len - p)
        return batches + [rows[k:k + self.rows_per_batch] for k in range(0, len(rows), self.rows_per_batch)]

    # -- this rank's share -------------------------------------------------------------------------
    def num_batches(self, epoch: int) -> int:
        """Batches per rank in `epoch`: the same on every rank."""
        return math.ceil(len(self.plan(epoch)) / self.world_size)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch` from batch index `start` (to resume mid-epoch)."""
        plan = self.plan(epoch)
        mine = plan[self.rank::self.world_size]
        for k in range(start, self.num_batches(epoch)):
            yield self.collate(mine[k]) if k < len(mine) else self.zero_weight(plan[0])

    def zero_weight(self, rows: list[list[int]]) -> Batch:
        """A real batch's tokens with no loss: keeps collectives in step on a rank with nothing left."""
        batch = self.collate(rows)
        return Batch(batch.tokens, batch.targets, torch.zeros_like(batch.loss_mask), batch.resets, ())

    def loss_tokens(self, rows: list[list[int]]) -> int:
        """Loss tokens of a planned batch, without building it."""
        if self._loss_counts is None:
            self._loss_counts = self.examples.loss_counts
        return int(sum(self._loss_counts[i] for row in rows for i in row))

    def positions_of(self, rows: list[list[int]]) -> int:
        """B*T of a planned batch (padding included), without building it."""
        return len(rows) * max(sum(int(self.positions[i]) for i in row) for row in rows)

    def row_shapes(self, rows: list[list[int]]) -> list[tuple[int, int]]:
        """(rows, length) of each sequence batch the forward runs for a planned batch."""
        return [(len(rows), self.positions_of(rows) // len(rows))]

    def collate(self, rows: list[list[int]]) -> Batch:
        """Rows of examples -> Batch. An example s with loss flags f fills tokens s[:-1],
        targets s[1:], loss_mask f[1:] from its start; the mask comes from lengths only."""
        ex = self.examples
        T = max(sum(int(self.positions[i]) for i in row) for row in rows)
        tokens = np.zeros((len(rows), T), dtype=np.int64)
        targets = np.zeros((len(rows), T), dtype=np.int64)
        loss_mask = np.zeros((len(rows), T), dtype=bool)
        resets = np.zeros((len(rows), T), dtype=bool)
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                s, f = ex.tokens(i), ex.loss_positions(i)
                n = len(s) - 1
                tokens[b, t:t + n], targets[b, t:t + n], loss_mask[b, t:t + n] = s[:-1], s[1:], f[1:]
                resets[b, t] = True
                t += n
        ids = tuple(i for row in rows for i in row)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(loss_mask),
                     torch.from_numpy(resets) if self.packing else None, ids)
