"""Evaluation on held-out examples: completion loss, perplexity, token accuracy, exact match."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..adapters.quant import loss_weight
from ..data import BatchLoader, TokenizedExamples
from ..infer.generate import PREFILL_CHUNK, greedy_batch
from ..model.segments import hidden_rows, segment_len_for
from ..ops.cross_entropy import loss_and_argmax
from ..precision import autocast


def exact_match_indices(n: int, samples: int, seed: int = 0) -> list[int]:
    """The deterministic sample of examples checked for exact match (sorted; all when samples >= n)."""
    if samples >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:samples].tolist())


def greedy_tokens(model, prompts, stop_tokens, limits, device, precision="fp32",
                  segment_len: int = PREFILL_CHUNK) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), up to and including its stop token, or
    `limits[i]` tokens; prompts are prefilled `segment_len` tokens at a time."""
    out = [[] for _ in prompts]

    def accept(i: int, token: int) -> bool:
        out[i].append(token)
        return token != stop_tokens[i] and len(out[i]) < limits[i]

    with autocast(device, precision):
        greedy_batch(model, [list(map(int, p)) for p in prompts], max(limits, default=0), accept, segment_len)
    return out


@torch.inference_mode()
def evaluate(model, examples: TokenizedExamples, tokenizer, *, batch_tokens: int = 4096,
             exact_match_samples: int = 64, max_new_tokens: int | None = None, device=None,
             precision: str = "fp32", seed: int = 0, segment_len: int | None = None) -> dict:
    """Metrics of `model` on `examples` (every example once), computed in this process.

    It is not split across processes: a DDP run calls it on rank 0 only, an FSDP run on every
    process (each block's forward gathers its shards) inside parallel.whole_root.

    - loss: mean cross-entropy over all loss tokens (completion tokens incl. the end marker),
      each predicted from everything before it; perplexity = exp(loss).
    - token_accuracy: fraction of loss tokens where the argmax of the logits is the target.
    - exact_match: over a deterministic sample of `exact_match_samples` examples (seeded by
      `seed`; all when there are fewer), with prompt, reference = examples.split(i): the model
      continues the prompt greedily until it emits the reference's last token (the end marker:
      token 0 or 261 "\\n\\n") or has produced `max_new_tokens` tokens (default: twice the
      reference's length + 8). The example matches when that last token was produced and the
      decoded text of the generated tokens equals the decoded text of the reference (so a
      different tokenization of the same text still matches; stopping early or late does not).
    - samples: for the exact-match sample, dicts {"prompt", "reference", "generated", "match"}
      (decoded text, end marker excluded) to show to people.

    Hidden rows are gathered at the loss mask before the head, so no logits exist for context
    positions. segment_len: as in training (`segment_len_for`: None splits only rows longer than
    batch_tokens, 0 never); prompts are prefilled in segments of it (default 4096) as well. The model is put in eval mode and restored to its previous mode afterwards.
    """
    if max_new_tokens is not None and not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1 (or None for the default), got {max_new_tokens!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        examples = examples.unweighted()  # file weights decide sampling in training, not evaluation
        head = loss_weight(model.head)  # a bf16 or quantized head read a block of rows at a time, as in training
        loss_sum, correct, count = 0.0, 0, 0
        if len(examples):
            loader = BatchLoader(examples, batch_tokens=batch_tokens, packing=False, shuffle=False)
            for batch in loader.epoch_batches(0):
                b = batch.to(device)
                S = segment_len_for(b.tokens.shape, segment_len, batch_tokens)
                with autocast(device, precision):
                    rows = hidden_rows(model, b.tokens, b.resets, b.loss_mask, S)
                targets = b.targets[b.loss_mask]
                losses, predicted = loss_and_argmax(rows.float(), head, targets)  # in fp32, chunked as in training
                loss_sum += float(losses.double().sum())
                correct += int((predicted == targets).sum())
                count += rows.shape[0]
        loss = loss_sum / count if count else float("nan")
        result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if count else float("nan"),
                  "token_accuracy": correct / count if count else float("nan"),
                  "loss_tokens": count, "examples": len(examples)}

        indices = [i for i in exact_match_indices(len(examples), exact_match_samples, seed)
                   if len(examples.split(i)[1])]
        if indices:
            pairs = [examples.split(i) for i in indices]
            limits = [2 * len(ref) + 8 if max_new_tokens is None else max_new_tokens for _, ref in pairs]
            generated = greedy_tokens(model, [p for p, _ in pairs], [int(ref[-1]) for _, ref in pairs],
                                      limits, device, precision, segment_len or PREFILL_CHUNK)
            samples = []
            for (prompt, ref), gen in zip(pairs, generated):
                stopped = bool(gen) and gen[-1] == int(ref[-1])
                match = stopped and tokenizer.decode(gen) == tokenizer.decode(ref.tolist())
                body = gen[:-1] if stopped else gen  # shown without the end marker
                samples.append({"prompt": tokenizer.decode(prompt.tolist()), "reference": tokenizer.decode(ref[:-1].tolist()),
                                "generated": tokenizer.decode(body), "match": match})
            result["exact_match"] = sum(s["match"] for s in samples) / len(samples)
            result["exact_match_n"] = len(samples)
            result["samples"] = samples
        result["time_s"] = time.perf_counter() - start
        return result
    finally:
        model.train(was_training)
