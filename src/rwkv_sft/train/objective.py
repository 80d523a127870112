"""What a run trains for, chosen once when the run is built: the completion loss (sft) or a
preference objective (train/preference.py). Both give the loop the same four things: the loss
module that parallel.wrap wraps, the loader of the training data, one step's forward/backward
(its loss and what users watch) and the evaluation on held-out data.
"""
from __future__ import annotations

from . import distributed
from .loss import CompletionLoss
from .step import accumulate_gradients


class Completion:
    """Supervised fine-tuning: the mean loss over every completion token of the step."""

    def __init__(self, config, data, *, device, precision, tokenizer=None):
        self.config, self.data, self.device, self.precision = config, data, device, precision
        self.tokenizer = tokenizer
        if tokenizer is None and data.eval is not None and len(data.eval):
            from ..tokenizer import Tokenizer  # the evaluation's exact match decodes
            self.tokenizer = Tokenizer()

    def loss_module(self, model) -> CompletionLoss:
        c = self.config
        return CompletionLoss(model, c.loss_chunk_size, c.segment_len, c.batch_tokens)

    def loader(self, **kw):
        from ..data import BatchLoader
        return BatchLoader(self.data.train, packing=self.config.packing, **kw)

    def step(self, loss_module, batches, planned, count: int, *, d, wrapped) -> tuple[float, dict]:
        """One step's forward/backward over this process's `batches`: (the step's mean token loss, {})."""
        local = accumulate_gradients(loss_module, batches, device=self.device, global_count=count,
                                     world_size=d.world_size, wrapped=wrapped, precision=self.precision,
                                     l2wrap=self.config.l2wrap)
        return (distributed.all_sum(d, [local])[0] / count if count else 0.0), {}

    def evaluate(self, model) -> dict:
        from ..eval.evaluate import evaluate  # switches the model to eval mode and back
        c = self.config
        return evaluate(model, self.data.eval, self.tokenizer, batch_tokens=c.batch_tokens, segment_len=c.segment_len,
                        exact_match_samples=c.eval_exact_match, device=self.device, precision=self.precision)


def make_objective(config, model, data, *, d, precision, tokenizer, data_fingerprint: str):
    """The run's objective. A preference run takes its reference from `model` as it is now: call
    before a checkpoint's weights are restored into it."""
    if config.preference:
        from .preference import Preference
        return Preference(config, model, data, device=d.device, precision=precision, d=d,
                          data_fingerprint=data_fingerprint)
    return Completion(config, data, device=d.device, precision=precision, tokenizer=tokenizer)
