"""`rwkv-sft inspect-data` end to end in a subprocess, with the real World tokenizer."""
import json
import os
import re
import subprocess
import sys

from rwkv_sft import Tokenizer

ROWS = [{"context": "Q: 2+2?\nA:", "completion": " 4"},
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]},
        {"context": "word " * 40, "completion": " done"}]


def inspect(tmp_path, *args):
    """A real process, as a user runs it."""
    env = {**os.environ, "RWKV_SFT_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "rwkv_sft", "inspect-data", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def inspect_here(tmp_path, capsys, *args):
    """The same command in this process (starting Python and torch again costs seconds)."""
    from rwkv_sft.cli import main
    code = main(["inspect-data", "--cache-dir", str(tmp_path / "cache"), *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def data_file(tmp_path, extra=""):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + extra)
    return str(path)


def test_stats_json_and_rendering(tmp_path, capsys):
    path = data_file(tmp_path)
    tok = Tokenizer()
    out = inspect_here(tmp_path, capsys, path, "--max-len", "32", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["train"]["examples"] == 3 and stats["truncated"]["context_trimmed"] == 1
    assert stats["train"]["length"]["max"] == 32
    chat_loss = len(tok.encode(" Hello!\n\n")) + len(tok.encode(" See you.\n\n")) + 1
    want_loss = len(tok.encode(" 4")) + 1 + chat_loss + len(tok.encode(" done")) + 1
    assert stats["train"]["loss_tokens"] == want_loss

    out = inspect(tmp_path, path, "--max-len", "32", "--show", "3")
    assert out.returncode == 0, out.stderr
    assert "examples: 3" in out.stdout and "1 context trimmed" in out.stdout
    assert "\x1b[" not in out.stdout  # not a terminal: brackets, no colours
    blocks = out.stdout.split("--- example ")[1:]
    assert len(blocks) == 3
    marked = [re.findall(r"⟦(.*?)⟧", b.split("---\n", 1)[1], flags=re.S) for b in blocks]
    assert marked == [[" 4<eos>"], [" Hello!\n\n", " See you.\n\n<eos>"], [" done<eos>"]]
    # Outside the brackets: the context, exactly (the chat's turns separated by "\n\n").
    assert "User: Hi there\n\nAssistant:⟦ Hello!\n\n⟧User: Bye\n\nAssistant:⟦" in blocks[1]

    out = inspect_here(tmp_path, capsys, path, "--example", "1")
    assert out.returncode == 0 and out.stdout.count("--- example ") == 1 and "example 1 (" in out.stdout


def test_bad_input_one_line_error(tmp_path, capsys):
    path = data_file(tmp_path, extra='{"context": "x", "completion": 5}\n')
    out = inspect(tmp_path, path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"rwkv-sft inspect-data: error: {path}:4: field 'completion' is int, "
                                               f"expected a string"]
    out = inspect_here(tmp_path, capsys, path, "--skip-invalid", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["skipped"] == {"non-string field": 1}
    out = inspect_here(tmp_path, capsys, str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "missing.jsonl: no such file" in out.stderr


def test_counts_per_format_when_a_file_mixes_them(tmp_path, capsys):
    path = data_file(tmp_path, json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n")
    out = inspect_here(tmp_path, capsys, path, "--show", "0")
    assert out.returncode == 0, out.stderr
    assert f"files: {path} (4 examples: 2 completion, 1 alpaca, 1 chat)" in out.stdout
    assert "formats: 2 completion, 1 alpaca, 1 chat" in out.stdout
    stats = json.loads(inspect_here(tmp_path, capsys, path, "--json").stdout)
    assert stats["formats"] == stats["files"][0]["formats"] == {"completion": 2, "chat": 1, "alpaca": 1}
    single = tmp_path / "one.jsonl"
    single.write_text(json.dumps(ROWS[0]) + "\n")
    out = inspect_here(tmp_path, capsys, str(single), "--show", "0")
    assert f"files: {single} (1 examples)" in out.stdout and "formats: 1 completion" in out.stdout
