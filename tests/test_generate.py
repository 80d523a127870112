"""Generation against slow twins: argmax over full-sequence forwards, per-prompt decoding, plain sorting."""
import os
import subprocess
import sys

import pytest
import torch

from rwkv_sft import RWKV7, RWKV7Config, Tokenizer
from rwkv_sft.weights import save_model
from rwkv_sft.infer.generate import filter_logits, generate, generate_iter, greedy_complete, prefill

PROMPTS = ["Hello world", "The quick brown fox", "你好，世界", "x", "def f(a, b):\n    return", "Hi"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def model():
    """A tiny model with random weights everywhere (the fresh init zeroes output projections, so
    every token would look alike). The per-token WKV recurrence is the fastest backend at this size."""
    torch.manual_seed(0)
    m = RWKV7(RWKV7Config(n_layer=2, n_embd=64, vocab_size=65536, head_size=64), init_weights=False).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    m.wkv_backend = "reference"
    return m


def argmax_by_hand(model, ids, n):
    """Greedy decoding the slow way: the whole sequence through the model at every step."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


class EosAfter(torch.nn.Module):
    """The model, except that the end-of-text token wins right after `trigger` is fed."""

    def __init__(self, model, trigger):
        super().__init__()
        self.model, self.trigger = model, trigger

    def forward(self, tokens, state=None, full_output=True, segment_len=None):
        logits, state = self.model(tokens, state=state, full_output=full_output, segment_len=segment_len)
        last = logits if not full_output else logits[:, -1]
        last[tokens[:, -1] == self.trigger, 0] = 1e9
        return logits, state


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_greedy_equals_argmax_by_hand(model, tok, backend):
    model.wkv_backend = backend
    try:
        for prompt in PROMPTS[:2]:
            r = generate(model, tok, prompt, max_new_tokens=10, temperature=0, stop=(), stop_at_eos=False)
            expected = argmax_by_hand(model, tok.encode(prompt), 10)
            assert r.tokens == expected
            assert r.text == tok.decode(expected)
            assert r.finish_reason == "length" and r.prompt_tokens == len(tok.encode(prompt))
    finally:
        model.wkv_backend = "reference"


def test_outputs_vary(model, tok):
    with torch.no_grad():
        firsts = {int(model(torch.tensor([tok.encode(p)]))[0][0, -1].argmax()) for p in PROMPTS}
    assert len(firsts) > 2


def test_token_id_prompt_and_state_continuation(model, tok):
    ids = tok.encode("The quick brown fox jumps")
    whole = generate(model, tok, ids, max_new_tokens=8, temperature=0, stop=())
    _, state = prefill(model, ids[:3])
    resumed = generate(model, tok, ids[3:], max_new_tokens=8, temperature=0, stop=(), state=state)
    assert resumed.tokens == whole.tokens
    again = generate(model, tok, ids[3:], max_new_tokens=8, temperature=0, stop=(), state=state)
    assert again.tokens == whole.tokens  # the caller's state is not modified


def test_empty_prompt_starts_from_end_of_text(model, tok):
    r = generate(model, tok, "", max_new_tokens=5, temperature=0, stop=(), stop_at_eos=False)
    assert r.tokens == argmax_by_hand(model, [0], 5)


def test_max_new_tokens(model, tok):
    for n in (0, 1, 7):
        r = generate(model, tok, "Hello", max_new_tokens=n, temperature=0.8, seed=1, stop=(), stop_at_eos=False)
        assert len(r.tokens) == n and r.finish_reason == "length"
        assert r.text == tok.decode(r.tokens)


def test_stop_string_stops_and_is_excluded(model, tok):
    full = generate(model, tok, "Hello world", max_new_tokens=20, temperature=0, stop=(), stop_at_eos=False)
    stop = tok.decode(full.tokens[6:8])  # text that first appears within the continuation
    cut = full.text.find(stop)
    assert stop and cut >= 0
    r = generate(model, tok, "Hello world", max_new_tokens=20, temperature=0, stop=("never here", stop), stop_at_eos=False)
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut]
    assert r.tokens == full.tokens[:len(r.tokens)] and len(r.tokens) <= 8
    assert tok.decode(r.tokens).startswith(r.text + stop)


def test_eos_stops(model, tok):
    full = generate(model, tok, "Hello world", max_new_tokens=10, temperature=0, stop=(), stop_at_eos=False)
    eos_model = EosAfter(model, trigger=full.tokens[3])
    r = generate(eos_model, tok, "Hello world", max_new_tokens=10, temperature=0, stop=())
    assert r.finish_reason == "eos" and r.tokens == full.tokens[:4] and r.text == tok.decode(full.tokens[:4])
    r = generate(eos_model, tok, "Hello world", max_new_tokens=10, temperature=0, stop=(), stop_at_eos=False)
    assert r.tokens[:5] == full.tokens[:4] + [0] and r.finish_reason == "length"


def test_seeded_sampling(model, tok):
    kw = dict(max_new_tokens=10, temperature=1.0, stop=(), stop_at_eos=False)
    a = generate(model, tok, "Hello", seed=123, **kw)
    assert generate(model, tok, "Hello", seed=123, **kw).tokens == a.tokens
    assert any(generate(model, tok, "Hello", seed=s, **kw).tokens != a.tokens for s in range(3))
    greedy = generate(model, tok, "Hello", max_new_tokens=10, temperature=0, stop=(), stop_at_eos=False)
    assert generate(model, tok, "Hello", seed=5, top_k=1, **kw).tokens == greedy.tokens
    assert generate(model, tok, "Hello", seed=5, top_p=1e-9, **kw).tokens == greedy.tokens


def filter_by_hand(logits, top_k, top_p):
    """One row at a time with Python lists: keep the top k, then the smallest nucleus reaching top_p."""
    out = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        values = logits[row].tolist()
        order = sorted(range(len(values)), key=lambda i: -values[i])
        if top_k > 0:
            order = [i for i in order if values[i] >= values[order[min(top_k, len(order)) - 1]]]
        probs = torch.softmax(torch.tensor([values[i] for i in order]), 0).tolist()
        kept, mass = [], 0.0
        for i, p in zip(order, probs):
            if kept and mass >= top_p:
                break
            kept.append(i)
            mass += p
        for i in kept:
            out[row, i] = values[i]
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (3, 0.9), (0, 1e-6), (1, 1.0), (50, 0.3)])
def test_filter_logits_matches_by_hand(top_k, top_p):
    torch.manual_seed(top_k)
    logits = torch.randn(4, 40) * 2
    assert torch.equal(filter_logits(logits, top_k, top_p), filter_by_hand(logits, top_k, top_p))


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_once(logits, g) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    probs = torch.softmax(logits[0, :3], 0)  # top_k=3 keeps three tokens
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], probs, atol=0.03)


def sample_once(logits, g):
    from rwkv_sft.infer.generate import sample_next
    return sample_next(logits, temperature=1.0, top_k=3, generator=g)[0]


def test_stream_pieces_concatenate_to_text(model, tok):
    for kw in (dict(stop=()), dict(stop=("\n\n", "e")), dict(stop=(" ", "the"))):
        pieces = []
        r = generate(model, tok, "Hello", max_new_tokens=25, temperature=1.0, seed=7, stream=pieces.append, **kw)
        assert "".join(pieces) == r.text
        assert all(pieces)
        it = generate_iter(model, tok, "Hello", max_new_tokens=25, temperature=1.0, seed=7, **kw)
        assert list(it) == pieces


def test_greedy_complete_equals_per_prompt_generate(model, tok):
    prompts = PROMPTS + ["Hello world", "", "abc"]  # repeated and equal-length prompts share a prefill
    for stop in ((), ("\n\n", "a")):
        batched = greedy_complete(model, tok, prompts, max_new_tokens=9, stop=stop)
        single = [generate(model, tok, p, max_new_tokens=9, temperature=0, stop=stop).text for p in prompts]
        assert batched == single
    assert greedy_complete(model, tok, [], max_new_tokens=5) == []


def test_bad_arguments(model, tok):
    with pytest.raises(ValueError):
        generate(model, tok, "x", max_new_tokens=-1)
    with pytest.raises(ValueError):
        generate(model, tok, "x", top_p=0)
    with pytest.raises(ValueError):
        generate(model, tok, "x", stop=("",))
    with pytest.raises(TypeError):
        generate(model, tok, "x", stop="\n")
    with pytest.raises(ValueError, match="out of range"):
        generate(model, tok, [1, 70000])


# --- the command line ------------------------------------------------------------------------------

def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rwkv_sft", "generate", *args], input=stdin,
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)


@pytest.fixture(scope="module")
def saved_model(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path)
    return path


def test_cli_in_process(model, tok, saved_model, capsys):
    from rwkv_sft.cli import main
    greedy = dict(max_new_tokens=8, temperature=0)
    for extra, prompt, stop in ((["--no-stop"], "Hello world", ()),
                                (["--chat"], "User: Hello world\n\nAssistant:", ("\n\n",)),
                                (["--stop", "e", "--stop", "\\n"], "Hello world", ("e", "\n"))):
        expected = generate(model, tok, prompt, stop=stop, **greedy).text
        assert main(["generate", "--model", str(saved_model), "--prompt", "Hello world", "--max-new-tokens", "8",
                     "--temperature", "0", *extra]) == 0
        assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--model", str(saved_model), "--prompt", "x", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert "--top-p" in err and len(err.strip().splitlines()) == 1


def test_cli_subprocess_prompt_from_stdin(model, tok, saved_model):
    expected = generate(model, tok, "Hello world", max_new_tokens=6, temperature=0, stop=()).text
    r = run_cli("--model", str(saved_model), "--max-new-tokens", "6", "--temperature", "0", "--no-stop",
                stdin="Hello world\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_cli_missing_model_is_one_line_error(tmp_path):
    r = run_cli("--model", str(tmp_path / "nope.pth"), "--prompt", "hi")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.pth" in lines[0]


def test_cli_prompt_sources(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rwkv_sft.errors import UserError
    from rwkv_sft.infer.cli import read_prompt, unescape
    assert unescape(r"a\n\nb\t\\n") == "a\n\nb\t\\n"
    f = tmp_path / "p.txt"
    f.write_text("line one\nline two\n", encoding="utf-8")
    assert read_prompt(SimpleNamespace(prompt=None, prompt_file=str(f))) == "line one\nline two"
    assert read_prompt(SimpleNamespace(prompt="as given\n", prompt_file=None)) == "as given\n"
    with pytest.raises(UserError, match="no such file"):
        read_prompt(SimpleNamespace(prompt=None, prompt_file=str(tmp_path / "missing.txt")))
    class Terminal:
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal())
    with pytest.raises(UserError, match="no prompt"):
        read_prompt(SimpleNamespace(prompt=None, prompt_file=None))
    f.write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="not UTF-8"):
        read_prompt(SimpleNamespace(prompt=None, prompt_file=str(f)))


# --- chat, many prompts ----------------------------------------------------------------------------

def segment_ids(tok, segments):
    return [i for s in segments for i in tok.encode(s)]


@pytest.mark.parametrize("think", [False, True])
def test_chat_session_carries_the_state_of_the_whole_conversation(model, tok, think):
    """Each reply equals generating from the whole conversation so far, rendered as chat training
    data (the slow twin), and the final state is that rendering's."""
    from rwkv_sft.data.formats import chat_prompt_segments, chat_segments, clean_text
    from rwkv_sft.infer.chat import ChatSession
    greedy = dict(max_new_tokens=7, temperature=0, stop=("\n\n",))
    session = ChatSession(model, tok, system="Be\r\n\r\nbrief.", think=think, **greedy)
    turns = [("system", "Be\nbrief.")]
    for message in ("Hello there", "你好\n\nagain", "x"):
        reply = session.reply(message)
        turns.append(("user", clean_text(message)))
        alone = generate(model, tok, segment_ids(tok, chat_prompt_segments(turns, think)), **greedy)
        assert reply == clean_text(("<think" if think else "") + alone.text)
        turns.append(("assistant", reply))
    assert session.turns == turns
    whole, _ = prefill(model, segment_ids(tok, [t for t, _ in chat_segments(turns)]))
    carried, _ = prefill(model, segment_ids(tok, session.pending), session.state)
    torch.testing.assert_close(carried, whole, rtol=1e-5, atol=1e-5)


def test_cli_chat_system_think(model, tok, saved_model, capsys):
    from rwkv_sft.cli import main
    prompt = "System: Be brief.\n\nUser: Hi\n\nAssistant: <think"
    expected = generate(model, tok, prompt, max_new_tokens=8, temperature=0).text
    assert main(["generate", "--model", str(saved_model), "--prompt", "Hi", "--system", "Be brief.", "--think",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "<think" + expected + "\n"


def test_cli_interactive_reads_turns_from_stdin(model, tok, saved_model):
    from rwkv_sft.infer.chat import ChatSession
    greedy = dict(max_new_tokens=6, temperature=0, stop=("\n\n",))
    session = ChatSession(model, tok, system="Be brief.", **greedy)
    expected = ""
    for message in ("Hello world", "And then?"):
        session.reply(message)
        expected += session.last.text.lstrip() + "\n\n"
    r = run_cli("--model", str(saved_model), "--interactive", "--system", "Be brief.", "--max-new-tokens", "6",
                "--temperature", "0", stdin="Hello world\n\n   \nAnd then?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected and r.stderr == ""


def test_cli_prompts_file_one_json_line_per_prompt(model, tok, saved_model, tmp_path, capsys):
    """Lines or records; greedy in batches (the fast path) and sampled one by one, each equal to
    `generate` on that prompt alone."""
    import json

    from rwkv_sft.cli import main
    lines = tmp_path / "p.txt"
    lines.write_text("Hello world\n\n你好\r\nx\n", encoding="utf-8")
    records = tmp_path / "p.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hello world", "id": 7},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                      {"role": "user", "content": "Bye"}]},
        {"instruction": "Add.", "input": "2 and 3"}]) + "\n")
    want_lines = [(1, "Hello world"), (3, "你好"), (4, "x")]
    want_records = [(1, "Hello world"), (2, "User: Hi\n\nAssistant: Yo\n\nUser: Bye\n\nAssistant:"),
                    (3, "Instruction: Add.\n\nInput: 2 and 3\n\nResponse:")]
    chat = [(n, f"System: S\n\nUser: {p}\n\nAssistant:") for n, p in want_lines]
    for path, extra, want in ((lines, [], want_lines), (records, [], want_records), (lines, ["--chat", "--system", "S"], chat)):
        for sampling in (["--temperature", "0", "--batch-size", "2"], ["--temperature", "0.9", "--seed", "3"]):
            assert main(["generate", "--model", str(saved_model), "--prompts", str(path), "--max-new-tokens", "6",
                         *extra, *sampling]) == 0
            got = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
            temperature = float(sampling[1])
            for (line, prompt), g in zip(want, got, strict=True):
                alone = generate(model, tok, prompt, max_new_tokens=6, temperature=temperature, seed=3)
                assert g == {"line": line, "prompt": prompt, "completion": alone.text,
                             "finish_reason": alone.finish_reason}
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(saved_model), "--prompts", str(lines), "--output", str(out),
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "" and len(out.read_text().splitlines()) == 3
    # Bad input: one line naming file and line, before the model is read.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "?"}) + "\n")
    ends = tmp_path / "ends.jsonl"
    ends.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    for args, message in ((["--prompts", str(bad)], f"{bad}:2: no prompt"),
                          (["--prompts", str(ends)], f"{ends}:1: the conversation ends with an assistant turn"),
                          (["--prompts", str(lines), "--output", str(lines)], "is the prompts file itself"),
                          (["--prompt", "x", "--output", str(out)], "--output goes with --prompts")):
        assert main(["generate", "--model", str(tmp_path / "missing.pth"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_prompt_outside_the_models_vocabulary_is_one_line_error(tmp_path, capsys):
    # a 256-token model (a byte-level toy) given World-tokenized text: the embedding has no row for
    # most ids, and the C step would read past its table; every way in says so in one line
    from rwkv_sft.cli import main
    from rwkv_sft.infer.decoder import Decoder
    from rwkv_sft.errors import UserError
    torch.manual_seed(0)
    small = RWKV7(RWKV7Config(n_layer=1, n_embd=64, vocab_size=256))
    path = tmp_path / "small.pth"
    save_model(small, path)
    for flags in (["--prompt", "Hello world"], ["--prompt", "Hi", "--temperature", "0"], ["--chat", "--prompt", "Hi"]):
        assert main(["generate", "--model", str(path), "--max-new-tokens", "2", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "outside the model's vocabulary of 256 tokens" in err[0], err
    with torch.no_grad():
        for tokens in (torch.tensor([[300]]), torch.tensor([[1, 2, 256]]), torch.tensor([[-1]])):
            with pytest.raises(UserError, match="outside the model's vocabulary"):
                Decoder(small)(tokens)
        Decoder(small)(torch.tensor([[0, 255]]))  # the edges are inside
