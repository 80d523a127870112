"""prepare_data: files -> cached tokens -> truncated TokenizedExamples (+ a report of every cut)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .cache import default_cache_dir, load_or_tokenize, tokenizer_identity
from .config import DataConfig, parse_file_spec
from .examples import TokenizedExamples
from .formats import TRAILING_TURNS, check_file
from .truncate import truncate


@dataclass
class PreparedData:
    train: TokenizedExamples
    eval: TokenizedExamples | None
    report: dict


def _progress_bar(total, show):
    if not show or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", leave=False)
    return bar, bar.update


def _load_shards(specs, config, tokenizer, cache_dir, show_progress):
    for spec in specs:
        check_file(spec.path)
    bar, update = _progress_bar(sum(os.path.getsize(s.path) for s in specs), show_progress)
    settings = dict(fmt=config.format, context_field=config.context_field,
                    completion_field=config.completion_field, end_marker=config.end_marker)
    tok_id = tokenizer_identity(tokenizer)
    try:
        return [load_or_tokenize(s.path, tokenizer, cache_dir, tokenizer_id=tok_id, progress=update,
                                 skip_invalid=config.skip_invalid, allow_unused_fields=config.allow_unused_fields,
                                 **settings) for s in specs]
    finally:
        if bar is not None:
            bar.close()


def _distributed_rank():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank()
    except ImportError:
        pass
    return None


def _load_all(specs, config, tokenizer, cache_dir, show_progress):
    """Rank 0 of a distributed run builds the caches while the others wait, then they read them.
    Rank 0's error is sent to every rank, so all of them stop with the same message."""
    rank = _distributed_rank()
    if rank is None:
        return _load_shards(specs, config, tokenizer, cache_dir, show_progress)
    import torch.distributed as dist
    error, shards = None, None
    if rank == 0:
        try:
            shards = _load_shards(specs, config, tokenizer, cache_dir, show_progress)
        except UserError as e:
            error = str(e)
    message = [error]
    dist.broadcast_object_list(message, src=0)  # also the barrier
    if message[0]:
        raise UserError(message[0])
    return shards or _load_shards(specs, config, tokenizer, cache_dir, False)


def _truncated(shards, weights, config, counts) -> TokenizedExamples:
    """Apply `truncate` to every example; count each kind of cut."""
    begin, end = [], []
    for shard in shards:
        start, context_len, stop = shard.index.T
        completion_len = stop - start - context_len
        kept_context, kept_completion = truncate(context_len, completion_len, config.max_len, config.anchor_fraction)
        counts["longer_than_max_len"] += int(np.count_nonzero(context_len + completion_len > config.max_len))
        counts["longest"] = max(counts["longest"], int((context_len + completion_len).max(initial=0)))
        counts["context_trimmed"] += int(np.count_nonzero(kept_context < context_len))
        counts["completion_cut"] += int(np.count_nonzero(kept_completion < completion_len))
        counts["empty_context"] += shard.meta.get("empty_context", 0)
        begin.append(start + context_len - kept_context)
        end.append(start + context_len + kept_completion)
    sizes = [len(s.index) for s in shards]
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return TokenizedExamples([(s.ids, s.flags) for s in shards], np.repeat(np.arange(len(shards)), sizes),
                             cat(begin), cat(end), cat([s.lines for s in shards]), np.repeat(weights, sizes),
                             [s.path for s in shards])


def _stats(examples: TokenizedExamples | None) -> dict:
    if examples is None or len(examples) == 0:
        return {"examples": 0, "tokens": 0, "loss_tokens": 0}
    lengths = examples.lengths
    loss = int(examples.loss_counts.sum())
    pct = np.percentile(lengths, [50, 90, 99]).tolist()
    return {"examples": len(examples), "tokens": int(lengths.sum()), "loss_tokens": loss,
            "length": {"min": int(lengths.min()), "p50": pct[0], "p90": pct[1], "p99": pct[2], "max": int(lengths.max())}}


def format_report(report: dict, role: str = "train") -> str:
    """One human line: examples, tokens, loss tokens, cuts, skipped rows. `role` names what the
    examples are for ("train"; "eval" when a command only evaluates them)."""
    train, ev = report["train"], report["eval"]
    cuts = report["truncated"]
    parts = [f"{train['examples']} {role} examples ({train['tokens']} tokens, {train['loss_tokens']} with loss)"]
    if ev["examples"]:
        parts.append(f"{ev['examples']} eval examples")
    parts.append(f"truncated: {cuts['context_trimmed']} context, {cuts['completion_cut']} completion "
                 f"({cuts['longer_than_max_len']} longer than max_len {report['max_len']}, the longest "
                 f"{cuts['longest']} tokens); {cuts['empty_context']} empty contexts")
    if report["skipped"]:
        parts.append("skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(report["skipped"].items())))
    if report["unused_fields"]:
        parts.append(f"WARNING: ignored text fields: {format_unused(report['unused_fields'])}")
    return "; ".join(parts)


def format_unused(counts: dict) -> str:
    return ", ".join(f"{name if name == TRAILING_TURNS else repr(name)} in {n} rows" for name, n in sorted(counts.items()))


def format_counts(counts: dict) -> str:
    """{"chat": 3, "completion": 2} -> "3 chat, 2 completion" (most first)."""
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def prepare_data(config: DataConfig, tokenizer=None, cache_dir=None, show_progress=True,
                 role: str = "train", show_report=None) -> "PreparedData":
    """Parse -> tokenize (cached, shared by every process) -> truncate. See docs/data.md.
    `role` only names the examples in the printed summary. `show_progress`: a tokenizing bar;
    `show_report` (default: show_progress): the one-line summary of examples, truncation and
    skipped rows on stderr."""
    if tokenizer is None:
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer()
    if not config.train_files:
        raise UserError("no training files given")
    cache_dir = cache_dir or default_cache_dir()
    train_specs = [parse_file_spec(s) for s in config.train_files]
    eval_specs = [parse_file_spec(s) for s in config.eval_files]
    shards = _load_all(train_specs + eval_specs, config, tokenizer, cache_dir, show_progress)
    counts = {"context_trimmed": 0, "completion_cut": 0, "empty_context": 0, "longer_than_max_len": 0, "longest": 0}
    n_train = len(train_specs)
    train = _truncated(shards[:n_train], [s.weight for s in train_specs], config, counts)
    evaluation = _truncated(shards[n_train:], [1.0] * len(eval_specs), config, counts) if eval_specs else None
    if config.eval_fraction:
        order = np.random.default_rng(config.seed).permutation(len(train))
        n_eval = min(len(train) - 1, max(1, round(config.eval_fraction * len(train))))
        evaluation, train = train.subset(np.sort(order[:n_eval])), train.subset(np.sort(order[n_eval:]))
        evaluation.weights[:] = 1.0
    if len(train) == 0:
        raise UserError(f"no valid training examples in {', '.join(s.path for s in train_specs)}")
    skipped, unused, formats = {}, {}, {}
    for shard in shards:
        for total, part in ((skipped, shard.meta["skipped"]), (unused, shard.meta["unused_fields"]),
                            (formats, shard.meta["formats"])):
            for name, n in part.items():
                total[name] = total.get(name, 0) + n
    report = {"train": _stats(train), "eval": _stats(evaluation), "truncated": counts, "skipped": skipped,
              "unused_fields": unused, "formats": formats, "max_len": config.max_len,
              "files": [{"path": s.path, "examples": len(s.index), "skipped": s.meta["skipped"],
                         "formats": s.meta["formats"], "cached": s.meta.get("cached", False)} for s in shards]}
    if (show_progress if show_report is None else show_report) and (_distributed_rank() or 0) == 0:  # once per run
        print(f"data: {format_report(report, role)}", file=sys.stderr)
    return PreparedData(train, evaluation, report)


def check_vocab(data, vocab_size: int) -> None:
    """Every token id of `data` (train and eval examples, or pairs) must exist in the model's
    vocabulary: a one-line error naming the first record that has one outside it."""
    for examples in (data.train, data.eval):
        if examples is None or len(examples) == 0:
            continue
        for k, (ids, _) in enumerate(examples.shards):
            mine = np.flatnonzero(examples.shard == k)
            if len(ids) == 0 or len(mine) == 0 or int(np.max(ids)) < vocab_size:
                continue  # the whole shard fits (the common case, no need to look closer)
            for i in mine:
                top = int(examples.tokens(i).max(initial=0))
                if top >= vocab_size:
                    where, line = examples.origin(i)
                    raise UserError(f"{where}:{line}: token id {top} is outside the model's vocabulary of "
                                    f"{vocab_size} (vocab_size); use a model with a larger vocabulary")
