"""Preference pairs: {"prompt" | "context", "chosen", "rejected"} records -> tokenized pairs -> batches.

A pair is rendered exactly as SFT renders the same text: the record becomes two SFT records
(prompt + chosen, prompt + rejected) in the format SFT would detect (context/completion, Alpaca,
or chat when the prompt is a list of messages: TRL's conversational form), and each is rendered
and tokenized segment by segment as SFT does. The segments the two share from the start are the
pair's context (run once in training); the rest of each is its completion, and the scored tokens
of a completion are those SFT puts loss on there (the end marker included).

A batch holds B pairs: the contexts left-padded, with a state reset at each one's first token
(so a context ends exactly at the fork), and the 2B completions right-padded, chosen and rejected
of pair b in rows 2b and 2b + 1.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .cache import _encode_all, end_marker_ids
from .examples import TokenizedExamples
from .formats import END, Invalid, check_file, make_renderer, read_records
from .loader import BatchLoader
from .truncate import truncate

PAIR_FIELDS = ("chosen", "rejected")


def is_pair_record(record) -> bool:
    return isinstance(record, dict) and all(f in record for f in PAIR_FIELDS)


def _messages(value, name):
    if isinstance(value, str):  # a bare reply after a conversational prompt
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise Invalid("non-string field", f"field {name!r} is {type(value).__name__}, expected a string or messages")
    return value


def _empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, list) and not any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in value)


def sft_records(record) -> tuple[dict, dict]:
    """The two SFT records a pair record stands for (or raise Invalid)."""
    if not isinstance(record, dict):
        raise Invalid("not an object", f"expected a JSON object, got {type(record).__name__}")
    for name in PAIR_FIELDS:
        if name not in record:
            raise Invalid("missing field", f"missing field {name!r}")
        if _empty(record[name]):
            raise Invalid(f"empty {name}")
    rest = {k: v for k, v in record.items() if k not in PAIR_FIELDS}
    if "instruction" in record:  # Alpaca: the replies are the outputs
        return tuple({**rest, "output": record[name]} for name in PAIR_FIELDS)
    field = next((f for f in ("prompt", "context") if f in record), None)
    if field is None:
        raise Invalid("missing field", "missing field 'prompt' (or 'context')")
    prompt = rest.pop(field)
    if isinstance(prompt, list):  # conversational: prompt messages + the reply's messages
        return tuple({**rest, "messages": prompt + _messages(record[name], name)} for name in PAIR_FIELDS)
    for name in PAIR_FIELDS:
        if not isinstance(record[name], str):
            raise Invalid("non-string field", f"field {name!r} is {type(record[name]).__name__}, expected a string")
    return tuple({**rest, "context": prompt, "completion": record[name]} for name in PAIR_FIELDS)


def render_pair(record, render):
    """-> (context segments, chosen segments, rejected segments, unused field names)."""
    chosen, rejected = (render(r) for r in sft_records(record))
    a, b = chosen.context + chosen.completion, rejected.context + rejected.completion
    if a == b:
        raise Invalid("identical chosen and rejected")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n], a[n:], b[n:], chosen.unused


@dataclass
class PairBatch:
    """B pairs. context [B,Tc] left-padded, context_resets [B,Tc] True at each context's first token;
    completions [2B,Tp] right-padded (rows 2b, 2b+1: chosen, rejected of pair b), scored [2B,Tp]
    True at the scored tokens; pair_weight [B] 1 for a real pair, 0 for one that only keeps
    collectives in step."""
    context: torch.Tensor
    context_resets: torch.Tensor
    completions: torch.Tensor
    scored: torch.Tensor
    pair_weight: torch.Tensor
    example_ids: tuple = ()

    def to(self, device) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=True) for t in (self.context, self.context_resets,
                                                                     self.completions, self.scored, self.pair_weight)),
                         self.example_ids)

    @property
    def num_pairs(self) -> int:
        return self.context.shape[0]

    def full_sequences(self):
        """(tokens [2B,T], targets [2B,T], scored [2B,T]) on the CPU: each completion after its
        context as one right-padded sequence, what an SFT batch of the same text holds (the input
        of the unforked twin of the forked forward)."""
        self = self.to("cpu")
        B = self.num_pairs
        ctx_len = self.context_resets.long().argmax(1)  # first real token
        ctx_len = self.context.shape[1] - ctx_len
        comp_len = self.scored.shape[1] - self.scored.flip(1).long().argmax(1)  # up to the last scored
        comp_len = torch.where(self.scored.any(1), comp_len, torch.zeros_like(comp_len))
        seqs, flags = [], []
        for s in range(2 * B):
            c = self.context[s // 2, self.context.shape[1] - ctx_len[s // 2]:]
            seqs.append(torch.cat([c, self.completions[s, :comp_len[s]]]))
            flags.append(torch.cat([torch.zeros(len(c), dtype=torch.bool), self.scored[s, :comp_len[s]]]))
        T = max(len(x) for x in seqs)
        full = torch.zeros(2 * B, T, dtype=torch.long)
        mask = torch.zeros(2 * B, T, dtype=torch.bool)
        for s, (x, f) in enumerate(zip(seqs, flags)):
            full[s, :len(x)], mask[s, :len(f)] = x, f
        return full[:, :-1], full[:, 1:], mask[:, 1:]


class PairExamples:
    """Tokenized pairs over in-memory shards (one per file): pair i is its context, then its chosen,
    then its rejected completion, contiguous in shard `shard[i]` from `start[i]`. Truncation keeps
    the last `kept[i, 0]` context tokens and the first `kept[i, 1]` / `kept[i, 2]` tokens of each
    completion. `shards`, `shard`, `begin`, `end`, `weights` are what rundir.data_fingerprint and
    data.prepare.check_vocab read."""

    def __init__(self, shards, shard, start, lens, kept, lines, weights=None, paths=None):
        self.shards = shards
        self.shard, self.start = np.asarray(shard, np.int64), np.asarray(start, np.int64)
        self.lens, self.kept = np.asarray(lens, np.int64).reshape(-1, 3), np.asarray(kept, np.int64).reshape(-1, 3)
        self.lines = np.asarray(lines, np.int64)
        self.weights = np.ones(len(self.start)) if weights is None else np.asarray(weights, np.float64)
        self.paths = paths or [f"shard{k}" for k in range(len(shards))]

    def __len__(self):
        return len(self.start)

    @property
    def begin(self):  # where the kept context starts
        return self.start + self.lens[:, 0] - self.kept[:, 0]

    @property
    def end(self):  # the kept part's extent, both completions (the fingerprint sees every cut)
        return self.kept

    @property
    def positions(self) -> np.ndarray:
        """Tokens a pair feeds the forked forward: its context and both completions but their last tokens."""
        return self.kept[:, 0] + np.maximum(self.kept[:, 1:] - 1, 0).sum(1)

    @property
    def lengths(self):
        return self.positions + 1

    def parts(self, i):
        """(context ids, [(chosen ids, scored)], [(rejected ids, scored)]) after truncation."""
        ids, flags = self.shards[self.shard[i]]
        s, (c, p, q), (kc, kp, kq) = int(self.start[i]), self.lens[i], self.kept[i]
        ctx = ids[s + c - kc:s + c].astype(np.int64)
        a, b = s + c, s + c + p
        return (ctx, (ids[a:a + kp].astype(np.int64), np.asarray(flags[a:a + kp], bool)),
                (ids[b:b + kq].astype(np.int64), np.asarray(flags[b:b + kq], bool)))

    def tokens(self, i):
        ctx, (p, _), (q, _) = self.parts(i)
        return np.concatenate([ctx, p, q])

    def origin(self, i):
        return self.paths[self.shard[i]], int(self.lines[i])

    @property
    def loss_counts(self) -> np.ndarray:
        """Scored tokens of each pair (both completions)."""
        out = np.zeros(len(self), np.int64)
        for i in range(len(self)):
            _, (_, f), (_, g) = self.parts(i)
            out[i] = int(f.sum() + g.sum())
        return out

    def subset(self, indices):
        idx = np.asarray(indices, np.int64)
        return PairExamples(self.shards, self.shard[idx], self.start[idx], self.lens[idx], self.kept[idx],
                            self.lines[idx], self.weights[idx], self.paths)

    def unweighted(self):
        return PairExamples(self.shards, self.shard, self.start, self.lens, self.kept, self.lines, None, self.paths)

    epoch_indices = TokenizedExamples.epoch_indices  # reads only weights and len()


def collate_pairs(examples: PairExamples, indices) -> PairBatch:
    parts = [examples.parts(i) for i in indices]
    B = len(parts)
    Tc = max(len(c) for c, _, _ in parts)
    Tp = max(1, max(len(x) for _, p, q in parts for x, _ in (p, q)))
    context = np.zeros((B, Tc), np.int64)
    resets = np.zeros((B, Tc), bool)
    comps = np.zeros((2 * B, Tp), np.int64)
    scored = np.zeros((2 * B, Tp), bool)
    for b, (c, p, q) in enumerate(parts):
        context[b, Tc - len(c):], resets[b, Tc - len(c)] = c, True
        for k, (ids, f) in enumerate((p, q)):
            comps[2 * b + k, :len(ids)], scored[2 * b + k, :len(f)] = ids, f
    return PairBatch(torch.from_numpy(context), torch.from_numpy(resets), torch.from_numpy(comps),
                     torch.from_numpy(scored), torch.ones(B), tuple(int(i) for i in indices))


class PairLoader(BatchLoader):
    """BatchLoader's plan (split across processes) over pairs, one pair per batch row; with
    packing its two completions share a row (the rejected restarting from the context's state,
    train/preference.packed_completions), else each has one. Several pairs in a row would need the
    state at each context's end mid-row, which the WKV kernels do not hand out. A batch pads its
    contexts and its completions separately, so pairs are grouped by both: context length (two
    buckets per octave), then completion length."""

    def _completion_len(self, ids):
        """Positions of a pair's completions after the fork: one row, or the longer of two."""
        k = np.maximum(self.examples.kept[ids, 1:] - 1, 0)
        return k.sum(1) if self.packing else k.max(1)

    def _order(self, window):
        """The window's pairs in the order batches take them: longest context bucket first, then
        longest completions."""
        context_bucket = np.floor(2 * np.log2(np.maximum(self.examples.kept[window, 0], 1)))
        return window[np.lexsort((-self._completion_len(window), -context_bucket))]

    def _pad(self, window):
        batches, rows = [], []
        for i in self._order(window).tolist():
            if rows and (len(rows) == self.max_batch_size or self.positions_of(rows + [[i]]) > self.batch_tokens):
                batches.append(rows)
                rows = []
            rows.append([i])
        return batches + [rows] if rows else batches

    def _pack(self, window):  # (BatchLoader.plan's name for the plan with packing)
        return self._pad(window)

    def collate(self, rows) -> PairBatch:
        return collate_pairs(self.examples, [i for row in rows for i in row])

    def zero_weight(self, rows) -> PairBatch:
        batch = self.collate(rows)
        batch.pair_weight = torch.zeros_like(batch.pair_weight)
        return batch

    def row_shapes(self, rows) -> list[tuple[int, int]]:
        """The contexts [B, longest], then the completions after the fork [B or 2B, longest]."""
        ids = [i for row in rows for i in row]
        return [(len(ids), int(self.examples.kept[ids, 0].max())),
                ((1 if self.packing else 2) * len(ids), int(self._completion_len(ids).max()))]

    def positions_of(self, rows) -> int:
        return sum(n * T for n, T in self.row_shapes(rows))


# -- reading files --------------------------------------------------------------------------------

@dataclass
class PreparedPairs:
    train: PairExamples
    eval: PairExamples | None
    report: dict


def tokenize_pairs(path, tokenizer, config, counts) -> tuple:
    """One file -> (ids, flags, [(start, lens)], lines). Bad pairs: UserError naming file:line, or
    counted by reason in counts["skipped"] with config.skip_invalid."""
    check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    end_ids = end_marker_ids(tokenizer, config.end_marker)
    render = make_renderer(config.format, config.context_field, config.completion_field,
                           end_is_separator=end_ids == list(tokenizer.encode("\n\n")))
    rendered = []
    for line, record in read_records(path, data):
        try:
            if isinstance(record, Invalid):
                raise record
            ctx, a, b, unused = render_pair(record, render)
            if unused and not config.allow_unused_fields:
                raise UserError(f"{path}:{line}: field(s) {', '.join(map(repr, unused))} hold text that this format "
                                f"does not read (rename them, or allow_unused_fields to ignore them)")
            for name in unused:
                counts["unused_fields"][name] = counts["unused_fields"].get(name, 0) + 1
            rendered.append((line, ctx, a, b))
        except Invalid as e:
            if not config.skip_invalid:
                raise UserError(f"{path}:{line}: {e}") from None
            counts["skipped"][e.reason] = counts["skipped"].get(e.reason, 0) + 1
    texts = [t for _, *parts in rendered for segs in parts for t, _ in segs if t is not END]
    encoded = iter(_encode_all(tokenizer, texts))
    ids, flags, index, lines = [], [], [], []
    pos = 0
    for line, *parts in rendered:
        lens = []
        for k, segs in enumerate(parts):
            seg_ids = [end_ids if t is END else list(next(encoded)) for t, _ in segs]
            toks = [x for s in seg_ids for x in s]
            fl = [bool(loss) and k > 0 for (_, loss), s in zip(segs, seg_ids) for _ in s]
            if k == 0 and not toks:  # an empty context becomes one token 0, as in SFT
                toks, fl = [0], [False]
                counts["empty_context"] += 1
            if k > 0 and not any(fl):
                raise UserError(f"{path}:{line}: the {('chosen', 'rejected')[k - 1]} completion has no token "
                                f"that SFT would train on")
            ids += toks
            flags += fl
            lens.append(len(toks))
        index.append((pos, *lens))
        lines.append(line)
        pos += sum(lens)
    return np.asarray(ids, np.int64), np.asarray(flags, bool), np.asarray(index, np.int64).reshape(-1, 4), lines


def _examples(files, tokenizer, config, counts, weights) -> PairExamples | None:
    if not files:
        return None
    shards, shard, start, lens, lines, w = [], [], [], [], [], []
    for k, (path, weight) in enumerate(zip(files, weights)):
        ids, flags, index, ls = tokenize_pairs(path, tokenizer, config, counts)
        shards.append((ids, flags))
        shard += [k] * len(index)
        start += index[:, 0].tolist()
        lens += index[:, 1:].tolist()
        lines += ls
        w += [weight] * len(index)
    lens = np.asarray(lens, np.int64).reshape(-1, 3)
    longest = lens[:, 1:].max(1) if len(lens) else np.zeros(0, np.int64)
    kc, _ = truncate(lens[:, 0], longest, config.max_len, config.anchor_fraction)
    kept = np.stack([kc, np.minimum(lens[:, 1], config.max_len - kc), np.minimum(lens[:, 2], config.max_len - kc)], 1)
    counts["context_trimmed"] += int((kc < lens[:, 0]).sum())
    counts["completion_cut"] += int((kept[:, 1:] < lens[:, 1:]).any(1).sum())
    counts["longer_than_max_len"] += int((lens[:, 0] + longest > config.max_len).sum())
    counts["longest"] = max(counts["longest"], int((lens[:, 0] + longest).max(initial=0)))
    return PairExamples(shards, shard, start, lens, kept, lines, w, list(files))


def prepare_pairs(config, tokenizer=None, show_report: bool = True, role: str = "train") -> PreparedPairs:
    """The pairs of config.train_files / eval_files (weights and eval_fraction as in SFT)."""
    from .config import parse_file_spec
    if tokenizer is None:
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer()
    counts = {"context_trimmed": 0, "completion_cut": 0, "empty_context": 0, "longer_than_max_len": 0,
              "longest": 0, "skipped": {}, "unused_fields": {}}
    train_specs = [parse_file_spec(s) for s in config.train_files]
    train = _examples([s.path for s in train_specs], tokenizer, config, counts, [s.weight for s in train_specs])
    evaluation = _examples([parse_file_spec(s).path for s in config.eval_files], tokenizer, config, counts,
                           [1.0] * len(config.eval_files))
    if config.eval_fraction and len(train) > 1:
        order = np.random.default_rng(config.seed).permutation(len(train))
        n_eval = min(len(train) - 1, max(1, round(config.eval_fraction * len(train))))
        evaluation, train = train.subset(np.sort(order[:n_eval])).unweighted(), train.subset(np.sort(order[n_eval:]))
    if train is None or len(train) == 0:
        raise UserError(f"no valid preference pairs in {', '.join(s.path for s in train_specs)}")
    report = {"train_pairs": len(train), "eval_pairs": 0 if evaluation is None else len(evaluation), **counts}
    if show_report:
        print(f"data: {format_pair_report(report, role)}", file=sys.stderr)
    return PreparedPairs(train, evaluation, report)


def format_pair_report(r: dict, role: str = "train") -> str:
    parts = [f"{r['train_pairs']} {role} pairs"]
    if r["eval_pairs"]:
        parts.append(f"{r['eval_pairs']} eval pairs")
    parts.append(f"truncated: {r['context_trimmed']} context, {r['completion_cut']} completion ({r['longer_than_max_len']} "
                 f"longer than max_len, the longest {r['longest']} tokens); {r['empty_context']} empty contexts")
    if r["skipped"]:
        parts.append("skipped: " + ", ".join(f"{n} {k}" for k, n in sorted(r["skipped"].items())))
    if r["unused_fields"]:
        parts.append("WARNING: ignored text fields: " + ", ".join(f"{k!r} in {n} rows" for k, n in sorted(r["unused_fields"].items())))
    return "; ".join(parts)


def is_pairs_file(path) -> bool:
    """True when the file's first record is a preference pair."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        for _, record in read_records(str(path), data):
            return is_pair_record(record)
    except (OSError, UserError):
        return False
    return False
