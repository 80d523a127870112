"""The batch that the data pipeline hands to the training loop."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A padded or packed batch. Position t reads tokens[b,t] and predicts targets[b,t].

    loss_mask[b,t] is True exactly where targets[b,t] is a completion token (the end marker
    included) of a real example; padding and context positions are False. resets[b,t] is True
    where a packed example starts (the recurrent state restarts there); None when every row holds
    one example starting at t = 0. Masks come from lengths, never from comparing ids with a pad id.
    """
    tokens: torch.Tensor      # [B,T] int64
    targets: torch.Tensor     # [B,T] int64
    loss_mask: torch.Tensor   # [B,T] bool
    resets: torch.Tensor | None = None  # [B,T] bool
    example_ids: tuple[int, ...] = ()   # dataset indices of the examples in this batch

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.targets), move(self.loss_mask), move(self.resets), self.example_ids)
