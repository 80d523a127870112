"""The World tokenizer against the `rwkv` package's TRIE tokenizer (the slow, obviously-correct twin)."""
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from rwkv_sft import Tokenizer
from rwkv_sft.tokenizer import VOCAB_SIZE

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")

# --- a mixed corpus: the kinds of text that break tokenizers ----------------------------------------

WORDS = ("the of and to in is was for that with as on by at from his her which this be are an it "
         "were had not but have they their or one you all we can would there been if more when will "
         "model training language recurrent state token Goose weight decay kernel gradient").split()
CODE = ["def ", "return ", "import ", "class ", "for ", " in ", "if ", "else:", "self.", "()", "[i]",
        " = ", " == ", " += ", "# comment", '"""doc"""', "{", "}", "=>", "&&", "->", "::", "0x1F", "3.14"]
CHINESE = "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里"
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇯🇵", "🇺🇸", "❤️", "🧑🏿\u200d💻", "🫠", "✈︎"]
SCRIPTS = [(0x0400, 0x04FF), (0x0600, 0x06FF), (0x0900, 0x097F), (0x3040, 0x30FF), (0xAC00, 0xD7A3),
           (0x4E00, 0x9FFF), (0x0370, 0x03FF), (0x0E00, 0x0E7F)]


def _piece(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:  # English prose
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
        return " ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"]) + rng.choice([" ", "\n", "\n\n"])
    if kind == 1:  # code with indentation
        lines = ["    " * rng.randint(0, 4) + "".join(rng.choice(CODE) for _ in range(rng.randint(1, 8)))
                 for _ in range(rng.randint(1, 10))]
        return "\n".join(lines) + "\n"
    if kind == 2:  # Chinese prose with full-width punctuation
        return "".join(rng.choice(CHINESE) for _ in range(rng.randint(5, 80))) + rng.choice("，。！？：") + rng.choice(["", "\n"])
    if kind == 3:  # emoji, including ZWJ sequences, skin tones, flags, variation selectors
        return "".join(rng.choice(EMOJI) + rng.choice(["", " ", "\u200d"]) for _ in range(rng.randint(1, 10)))
    if kind == 4:  # combining marks stacked on letters
        return "".join(rng.choice("aeiouznAEO") + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(0, 4)))
                       for _ in range(rng.randint(1, 20)))
    if kind == 5:  # control characters and line endings
        return "".join(rng.choice([chr(rng.randrange(32)), "\x7f", "\r\n", "\r", "\n", "\t", "\x00"])
                       for _ in range(rng.randint(1, 10)))
    if kind == 6:  # long whitespace runs
        return rng.choice([" ", "\t", "\n", "\r\n", " \n"]) * rng.randint(1, 300)
    if kind == 7:  # random bytes, made into text by replacement (no surrogates)
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))).decode("utf-8", errors="replace")
    if kind == 8:  # other scripts
        lo, hi = rng.choice(SCRIPTS)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40))) + " "
    if kind == 9:  # any code point outside the surrogates
        return "".join(chr(c) for c in (rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)])
                                        for _ in range(rng.randint(1, 20))))
    if kind == 10:  # numbers, URLs, markup
        return rng.choice([str(rng.randrange(10 ** rng.randint(1, 12))), "https://example.com/a?b=c&d=%20",
                           "<p class=\"x\">", "</div>", "**bold**", "| a | b |", "\\frac{1}{2}", f"{rng.random():.6f}"])
    return rng.choice(["User: ", "\n\nAssistant:", "Question: ", "Answer:", " ", "I'm", "don't", "n't"])


def mixed_corpus(n_chars: int, seed: int = 0) -> list[str]:
    """Documents of mixed text, about n_chars characters in total."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < n_chars:
        doc = "".join(_piece(rng) for _ in range(rng.randint(1, 40)))
        docs.append(doc)
        total += len(doc)
    return docs


def byte_id(b: int) -> int:
    """The World vocabulary's token for the single byte b (ids 1..256)."""
    return b + 1


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def trie():
    return rwkv_tokenizer.TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def corpus():
    docs = mixed_corpus(750_000, seed=1)
    assert sum(len(d.encode("utf-8")) for d in docs) > 1_000_000
    return docs


# --- tests ---------------------------------------------------------------------------------------------

def test_constants(tok):
    assert tok.vocab_size == VOCAB_SIZE == 65536
    assert tok.eos_id == 0
    assert tok.decode([0]) == ""
    assert tok.decode([]) == ""
    assert tok.encode("") == []


def test_every_token_decodes_to_trie_bytes(tok, trie):
    assert all(trie.idx2token[byte_id(b)] == bytes([b]) for b in range(256))
    for i in range(VOCAB_SIZE):
        expected = trie.idx2token.get(i, b"")
        assert tok.decode_bytes([i]) == expected, i
        assert tok.decode([i]) == expected.decode("utf-8", errors="replace"), i


def test_encode_matches_trie_on_mixed_corpus(tok, trie, corpus):
    ours = tok.encode_batch(corpus)
    for doc, ids in zip(corpus, ours):
        assert ids == trie.encode(doc)
    assert [tok.encode(d) for d in corpus[:50]] == ours[:50]


def test_roundtrip_on_mixed_corpus(tok, corpus):
    for doc, ids in zip(corpus, tok.encode_batch(corpus)):
        assert all(0 < i < VOCAB_SIZE for i in ids)
        assert tok.decode(ids) == doc


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_encode_matches_trie_on_arbitrary_text(tok, trie, text):
    ids = tok.encode(text)
    assert ids == trie.encode(text)
    assert tok.decode(ids) == text


def test_decode_never_raises_on_random_ids(tok, trie):
    rng = random.Random(2)
    partial = [byte_id(b) for b in range(0x80, 0x100)]  # lone non-ASCII bytes: fragments of characters
    for _ in range(2000):
        ids = [rng.choice(partial) if rng.random() < 0.5 else rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(0, 30))]
        expected = b"".join(trie.idx2token.get(i, b"") for i in ids)
        assert tok.decode_bytes(ids) == expected
        assert tok.decode(ids) == expected.decode("utf-8", errors="replace")


def test_pickles(tok):
    import pickle
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode("pickled 你好 😀") == tok.encode("pickled 你好 😀")


def test_decode_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensor 你好")
    assert tok.decode(torch.tensor(ids)) == "tensor 你好"


@pytest.mark.parametrize("bad", [[-1], [VOCAB_SIZE], [5, 70000, 6], [33, -5]])
def test_out_of_range_ids_raise(tok, bad):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(bad)


def test_stream_decoder_equals_decode_for_random_splits(tok, corpus):
    rng = random.Random(3)
    docs = corpus[:200]
    ids_per_doc = tok.encode_batch(docs)
    # Byte-level splits: cut documents' byte tokens so characters span several tokens.
    byte_tokens = [[byte_id(b) for b in d.encode("utf-8")[:300]] for d in docs[:50]]
    junk = [[byte_id(rng.randrange(0x80, 0x100)) if rng.random() < 0.6 else rng.randrange(VOCAB_SIZE) for _ in range(40)]
            for _ in range(50)]
    for ids in ids_per_doc + byte_tokens + junk:
        one_by_one = tok.stream()
        pieces = [one_by_one.push(i) for i in ids] + [one_by_one.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in tok.decode(ids)
        chunked, out, pos = tok.stream(), [], 0
        while pos < len(ids):
            step = rng.randint(1, 7)
            out.append(chunked.push_many(ids[pos:pos + step]))
            pos += step
        out.append(chunked.flush())
        assert "".join(out) == tok.decode(ids)


def test_stream_decoder_holds_back_partial_characters(tok):
    euro = "€".encode("utf-8")  # 3 bytes
    byte_ids = [byte_id(b) for b in euro]
    assert tok.decode_bytes(byte_ids) == euro
    s = tok.stream()
    assert s.push(byte_ids[0]) == ""
    assert s.push(byte_ids[1]) == ""
    assert s.push(byte_ids[2]) == "€"
    assert s.push(byte_ids[0]) == ""
    assert s.flush() == "\ufffd"


def test_runtime_needs_no_rwkv_package(tok):
    import subprocess
    import sys
    code = ("import sys; sys.modules['rwkv'] = None\n"  # any import of the rwkv package now fails
            "from rwkv_sft.tokenizer import Tokenizer\n"
            "t = Tokenizer(); print(t.encode('hello world'), t.decode(t.encode('hello world')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{tok.encode('hello world')} hello world"
