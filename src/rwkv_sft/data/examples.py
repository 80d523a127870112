"""TokenizedExamples: read-only views of truncated examples over memory-mapped token arrays."""
from __future__ import annotations

import numpy as np


class TokenizedExamples:
    """Example i is the slice [begin[i], end[i]) of shard `shard[i]`'s ids and loss flags.

    Truncation keeps the last context tokens and the first completion tokens, which are adjacent
    in the cache, so every truncated example is one contiguous slice: nothing is copied.
    `weights[i]` is how often example i is used per epoch (file weights and counts).
    """

    def __init__(self, shards, shard, begin, end, lines, weights=None, paths=None):
        self.shards = shards            # [(ids, flags)]
        self.shard = np.asarray(shard, dtype=np.int64)
        self.begin = np.asarray(begin, dtype=np.int64)
        self.end = np.asarray(end, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)
        self.weights = np.ones(len(self.begin)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.paths = paths or [f"shard{k}" for k in range(len(shards))]

    @classmethod
    def from_lists(cls, examples):
        """Build in memory from [(token ids, loss flags)] (tests, small tools)."""
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in examples]) if examples else np.zeros(0, np.int64)
        flags = np.concatenate([np.asarray(f, dtype=bool) for _, f in examples]) if examples else np.zeros(0, bool)
        ends = np.cumsum([len(t) for t, _ in examples], dtype=np.int64)
        begins = ends - [len(t) for t, _ in examples]
        return cls([(ids, flags)], np.zeros(len(examples)), begins, ends, np.arange(1, len(examples) + 1))

    def __len__(self) -> int:
        return len(self.begin)

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.begin

    def length(self, i) -> int:
        return int(self.end[i] - self.begin[i])

    def tokens(self, i) -> np.ndarray:
        """Token ids (int64) of example i after truncation: context + completion + end marker."""
        return self.shards[self.shard[i]][0][self.begin[i]:self.end[i]].astype(np.int64)

    def loss_positions(self, i) -> np.ndarray:
        """bool per token of example i: True where that token is a loss target. The first token is
        never one (nothing predicts it), even where truncation began a chat inside a reply."""
        flags = np.array(self.shards[self.shard[i]][1][self.begin[i]:self.end[i]], dtype=bool)
        flags[:1] = False
        return flags

    def split(self, i) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids, reference completion ids): the completion is the last run of loss tokens
        (for chat, the last assistant reply with its end marker); the prompt is all before it."""
        ids, loss = self.tokens(i), self.loss_positions(i)
        end = len(loss) - int(np.argmax(loss[::-1])) if loss.any() else len(loss)
        start = end
        while start > 0 and loss[start - 1]:
            start -= 1
        return ids[:start], ids[start:end]

    def origin(self, i) -> tuple[str, int]:
        """(file, line) that example i came from."""
        return self.paths[self.shard[i]], int(self.lines[i])

    def subset(self, indices) -> "TokenizedExamples":
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedExamples(self.shards, self.shard[idx], self.begin[idx], self.end[idx], self.lines[idx],
                                 self.weights[idx], self.paths)

    @property
    def loss_counts(self) -> np.ndarray:
        """Loss tokens of each example (targets only: the first token is never predicted)."""
        counts = np.zeros(len(self), dtype=np.int64)
        for k, (_, flags) in enumerate(self.shards):  # from a running count over each shard
            running = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
            mine = self.shard == k
            counts[mine] = running[self.end[mine]] - running[self.begin[mine] + 1]
        return counts

    def unweighted(self) -> "TokenizedExamples":
        """The same examples, each used once per epoch (evaluation ignores file weights)."""
        return TokenizedExamples(self.shards, self.shard, self.begin, self.end, self.lines, paths=self.paths)

    def epoch_indices(self, epoch: int, seed: int = 0) -> np.ndarray:
        """The examples of one epoch, each repeated by its weight: floor(w) copies plus one more
        with probability frac(w), drawn deterministically from (seed, epoch). Unshuffled."""
        whole = np.floor(self.weights).astype(np.int64)
        frac = self.weights - whole
        if frac.any():
            whole = whole + (np.random.default_rng([seed, epoch, 7]).random(len(frac)) < frac)
        return np.repeat(np.arange(len(self), dtype=np.int64), whole)
