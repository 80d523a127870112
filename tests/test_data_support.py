"""Helpers for the data tests: a byte-level stand-in tokenizer that counts its calls."""


class ByteTokenizer:
    """id = byte + 1 (0 stays the end-of-sequence id); encodes "\\n\\n" as two tokens."""
    eos_id = 0
    vocab_size = 257

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


def write(path, text_or_bytes):
    data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    path.write_bytes(data)
    return str(path)
