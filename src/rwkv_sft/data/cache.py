"""Tokenize a data file once into an on-disk cache of numpy arrays, memory-mapped on reuse.

A cache entry holds one file's examples BEFORE truncation (so max_len and anchor_fraction can
change without re-tokenizing): ids (uint16 when the vocabulary fits), one loss flag per token,
index [n, 3] = (start, context length, stop) and each example's line. The key hashes the file's
bytes, the tokenizer's identity and the settings that change tokens (format, field names, end
marker). Invalid rows are counted in the entry (with the first error's message), so the same
entry serves runs with and without skip_invalid; so are text fields the format does not read
(allow_unused_fields).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from filelock import FileLock

from .. import env
from ..errors import UserError
from .formats import END, Invalid, check_file, make_renderer, read_records, unused_problem

CACHE_VERSION = 3  # 2: chat turns end with "\n\n", Alpaca, ShareGPT; 3: G1 tools and cleaning, formats counted
CHUNK = 2048  # records rendered and tokenized together
_PROBE = "Hello, World! 你好 123 \n\n\t ünïcödé 🙂 User: Assistant:"


def default_cache_dir() -> str:
    return env.data_cache() or str(env.cache_home() / "data")


def tokenizer_identity(tokenizer) -> str:
    """A tokenizer's own `identity` if it has one, else its class, size and the ids of a probe text."""
    if getattr(tokenizer, "identity", None):
        return str(tokenizer.identity)
    probe = hashlib.blake2b(str(list(tokenizer.encode(_PROBE))).encode(), digest_size=8).hexdigest()
    cls = type(tokenizer)
    return f"{cls.__module__}.{cls.__qualname__}:{getattr(tokenizer, 'vocab_size', '?')}:{probe}"


def end_marker_ids(tokenizer, marker: str) -> list[int]:
    if marker == "eos":
        return [getattr(tokenizer, "eos_id", 0)]
    ids = list(tokenizer.encode(marker))
    if not ids:
        raise UserError(f"end marker {marker!r} encodes to no tokens")
    return ids


@dataclass
class Shard:
    """One file's tokenized examples (before truncation)."""
    path: str
    ids: np.ndarray     # [total tokens] uint16 / int32
    flags: np.ndarray   # [total tokens] bool: carries loss
    index: np.ndarray   # [n, 3] int64: start, context length, stop
    lines: np.ndarray   # [n] int64
    meta: dict          # skipped {reason: n}, first_error ("line: problem"), empty_context, cached,
                        # unused_fields {name: rows}, first_unused ("line: problem"), formats {kind: rows}


# -- tokenizing ---------------------------------------------------------------------------------

def _encode_all(tokenizer, texts):
    batch = getattr(tokenizer, "encode_batch", None)  # the World tokenizer's runs on all cores
    return batch(texts) if batch else [tokenizer.encode(t) for t in texts]


def tokenize_bytes(path, data, tokenizer, *, fmt="auto", context_field=None, completion_field=None,
                   end_marker="eos", skip_invalid=False, allow_unused_fields=False, progress=None) -> Shard:
    """Parse, render and tokenize one file's bytes. Raises UserError("path:line: problem") on the
    first invalid row unless skip_invalid, which counts them by reason instead, and on the first
    record with a text field its format does not read unless allow_unused_fields (counted then)."""
    end_ids = end_marker_ids(tokenizer, end_marker)
    end_is_separator = end_ids == list(tokenizer.encode("\n\n"))
    eos = getattr(tokenizer, "eos_id", 0)
    dtype = np.uint16 if getattr(tokenizer, "vocab_size", 1 << 16) <= (1 << 16) else np.int32
    ids, flags, index, lines = [], [], [], []  # per chunk: numpy arrays / lists
    skipped, first_error, empty_context, total = {}, None, 0, 0
    unused, first_unused, formats = {}, None, {}
    total_lines, done_lines = data.count(b"\n") + 1, 0

    def invalid(line, e):
        nonlocal first_error
        if not skip_invalid:
            raise UserError(f"{path}:{line}: {e}")
        skipped[e.reason] = skipped.get(e.reason, 0) + 1
        first_error = first_error or f"{line}: {e}"  # without the path: entries are keyed by content

    def flush(chunk):
        """Tokenize a chunk of rendered records; work per segment in Python, per token in numpy."""
        nonlocal empty_context, total, done_lines
        encoded = iter(_encode_all(tokenizer, [t for _, r in chunk for t, _ in r.context + r.completion if t is not END]))
        pieces, piece_loss, no_loss_at, chunk_start = [], [], [], total
        for line, r in chunk:
            start, context_len = total, 0
            for text, loss in r.context:  # a chat's context holds earlier replies and their END
                pieces.append(end_ids if text is END else next(encoded))
                piece_loss.append(loss)
                context_len += len(pieces[-1])
            if r.first_token_is_context:  # plain text: the first token predicts, it is not predicted
                context_len = 1
                no_loss_at.append(start)
            elif context_len == 0:  # an empty context becomes one token 0
                pieces.append([eos])
                piece_loss.append(False)
                context_len = 1
                empty_context += 1
            completion_len = 0
            for text, loss in r.completion:
                pieces.append(end_ids if text is END else next(encoded))
                piece_loss.append(loss)
                completion_len += len(pieces[-1])
            total += context_len + completion_len - r.first_token_is_context
            index.append((start, context_len, total))
            lines.append(line)
        ids.append(np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=total - chunk_start))
        flags.append(np.repeat(np.array(piece_loss, dtype=bool), np.fromiter(map(len, pieces), np.int64, len(pieces))))
        flags[-1][np.asarray(no_loss_at, dtype=np.int64) - chunk_start] = False
        if chunk and progress is not None:
            progress(len(data) * (chunk[-1][0] - done_lines) / total_lines)
            done_lines = chunk[-1][0]

    render, chunk = make_renderer(fmt, context_field, completion_field, end_is_separator), []
    for line, record in read_records(path, data):
        if isinstance(record, Invalid):
            invalid(line, record)
            continue
        try:
            rendered = render(record)
        except Invalid as e:
            invalid(line, e)
            continue
        formats[rendered.kind] = formats.get(rendered.kind, 0) + 1
        if rendered.unused:
            problem = f"{line}: {unused_problem(rendered.unused[0], rendered.kind)}"
            if not allow_unused_fields:
                raise UserError(f"{path}:{problem}")
            first_unused = first_unused or problem
            for name in rendered.unused:
                unused[name] = unused.get(name, 0) + 1
        chunk.append((line, rendered))
        if len(chunk) >= CHUNK:
            flush(chunk)
            chunk = []
    flush(chunk)
    if not index and not skipped:
        invalid(1, Invalid("empty file", "no examples in the file"))
    if progress is not None:
        progress(len(data) * (total_lines - done_lines) / total_lines)
    return Shard(path, np.concatenate(ids), np.concatenate(flags), np.asarray(index, dtype=np.int64).reshape(-1, 3),
                 np.asarray(lines, dtype=np.int64), {"skipped": skipped, "first_error": first_error,
                                                     "empty_context": empty_context, "unused_fields": unused,
                                                     "first_unused": first_unused, "formats": formats})


# -- the cache ----------------------------------------------------------------------------------

def cache_key(data: bytes, tokenizer_id: str, settings: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(data)
    h.update(json.dumps([CACHE_VERSION, tokenizer_id, settings], sort_keys=True).encode())
    return h.hexdigest()


def _load_array(path):
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be memory-mapped
        return np.load(path)


def _read_entry(entry, path) -> Shard:
    arrays = {name: _load_array(os.path.join(entry, f"{name}.npy")) for name in ("ids", "flags", "index", "lines")}
    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    return Shard(path, meta=meta, **arrays)


def _write_entry(entry, shard: Shard) -> None:
    """Write into a temporary directory, then rename it into place: readers never see half an entry."""
    parent = os.path.dirname(entry)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        for name in ("ids", "flags", "index", "lines"):
            np.save(os.path.join(tmp, f"{name}.npy"), getattr(shard, name))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**shard.meta, "source": shard.path}, f)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isdir(entry):  # anything but "another process got there first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_tokenize(path, tokenizer, cache_dir, *, tokenizer_id=None, progress=None, skip_invalid=False,
                     allow_unused_fields=False, **settings) -> Shard:
    """The cached Shard of `path`, building it first if needed. Re-raises a cached entry's first
    error unless skip_invalid, and its first unused text field unless allow_unused_fields."""
    check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    key = cache_key(data, tokenizer_id or tokenizer_identity(tokenizer), settings)
    entry = os.path.join(cache_dir, key)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        open(entry + ".lock", "a").close()
    except OSError as e:
        raise UserError(f"data cache {cache_dir}: cannot write there ({e.strerror}); set RWKV_SFT_CACHE to a "
                        f"writable directory") from None
    with FileLock(entry + ".lock"):  # one builder per entry: other processes wait, then read it
        if os.path.isdir(entry):
            shard = _read_entry(entry, path)
            shard.meta["cached"] = True
            if progress is not None:
                progress(len(data))
        else:
            # Without skip_invalid the first bad row raises here and nothing is written.
            shard = tokenize_bytes(path, data, tokenizer, skip_invalid=skip_invalid,
                                   allow_unused_fields=allow_unused_fields, progress=progress, **settings)
            _write_entry(entry, shard)
            shard.meta["cached"] = False
    if not skip_invalid and shard.meta.get("first_error"):
        raise UserError(f"{path}:{shard.meta['first_error']}")
    if not allow_unused_fields and shard.meta.get("first_unused"):
        raise UserError(f"{path}:{shard.meta['first_unused']}")
    return shard
