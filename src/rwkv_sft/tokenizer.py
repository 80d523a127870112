"""The RWKV World tokenizer: encode with the Rust `pyrwkv_tokenizer`, decode from the vocabulary.

Encoding is greedy longest match over UTF-8 bytes (the `rwkv` package's TRIE tokenizer; the Rust
one is byte-exact with it and several times faster). Decoding is ours: an id -> bytes table and
UTF-8 with replacement, so it never raises on tokens that split a character.
"""
from __future__ import annotations

import ast
import codecs
import functools
from pathlib import Path

import pyrwkv_tokenizer

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
VOCAB_SIZE = 65536  # embedding rows of World models; ids 65530..65535 have no bytes
EOS_ID = 0          # end of text; decodes to ""


def vocab_path() -> Path:
    """The vocabulary shipped with `pyrwkv_tokenizer` (same entries as the `rwkv` package's copy)."""
    return Path(pyrwkv_tokenizer.__file__).parent / VOCAB_FILE


@functools.lru_cache(maxsize=None)
def load_vocab(path: str) -> tuple[bytes, ...]:
    """id -> bytes for every id in [0, VOCAB_SIZE); ids absent from the file map to b""."""
    table = [b""] * VOCAB_SIZE
    ids, literals, lengths = [], [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.rstrip("\r")
        if not line:
            continue
        try:
            first, last = line.index(" "), line.rindex(" ")
            ids.append(int(line[:first]))
            literals.append(line[first + 1:last])
            lengths.append(int(line[last + 1:]))
        except ValueError:
            raise ValueError(f"{path}:{n}: not a vocabulary line ('<id> <literal> <length>')") from None
    # One literal_eval of the whole list: much faster than one per line.
    values = ast.literal_eval("[" + ",".join(literals) + "]")
    for i, value, length in zip(ids, values, lengths):
        value = value.encode("utf-8") if isinstance(value, str) else value
        if not 0 < i < VOCAB_SIZE or len(value) != length:
            raise ValueError(f"{path}: bad entry for id {i}: {value!r} (length {length})")
        table[i] = value
    return tuple(table)


class StreamDecoder:
    """Decodes tokens one at a time, emitting only complete UTF-8 text.

    Incomplete trailing bytes are held back until the next token completes them (or `flush`
    replaces them with U+FFFD), so the concatenated output equals `Tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes (possibly "")."""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def push_many(self, ids) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """End of stream: whatever is held back, as replacement characters."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """RWKV World tokenizer (65536 ids; id 0 = end of text)."""

    vocab_size = VOCAB_SIZE
    eos_id = EOS_ID

    def __init__(self, vocab_file=None):
        path = str(vocab_file or vocab_path())
        if not Path(path).is_file():
            raise FileNotFoundError(f"RWKV vocabulary not found: {path}")
        self.vocab_file = path
        self._rust = pyrwkv_tokenizer.WorldTokenizer(path)
        self._id_to_bytes = load_vocab(path)

    def __reduce__(self):  # the Rust object cannot be pickled: rebuild from the file (DataLoader workers)
        return (Tokenizer, (self.vocab_file,))

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._rust.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many strings at once (the Rust side works on them in parallel)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() takes strs, got {type(t).__name__}")
        return self._rust.encode_batch(texts)

    def decode_bytes(self, ids) -> bytes:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors, arrays, iterables
        if ids and (min(ids) < 0 or max(ids) >= VOCAB_SIZE):
            bad = next(i for i in ids if not 0 <= i < VOCAB_SIZE)
            raise ValueError(f"token id {bad} out of range [0, {VOCAB_SIZE})")
        return b"".join(map(self._id_to_bytes.__getitem__, ids))

    def decode(self, ids) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a split character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __len__(self) -> int:
        return VOCAB_SIZE


__all__ = ["Tokenizer", "StreamDecoder", "load_vocab", "vocab_path", "VOCAB_SIZE", "EOS_ID"]
