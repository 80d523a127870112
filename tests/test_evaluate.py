"""evaluate() against a by-hand computation with full logits; metrics log and plot."""
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_model
from rwkv_sft.data import TokenizedExamples
from rwkv_sft.model import RWKV7, RWKV7Config
from rwkv_sft.weights import load_model, save_model
from rwkv_sft.tokenizer import Tokenizer
from rwkv_sft.eval.evaluate import evaluate, exact_match_indices
from rwkv_sft.train.metrics import MetricsLogger, plot_metrics, read_metrics

V = 512


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model(seed=0, scale=0.3, n_layer=2, n_embd=64, vocab_size=V)


def by_hand_greedy(model, prompt, stop, limit):
    ids, out = list(prompt), []
    for _ in range(limit):
        logits, _ = model(torch.tensor([ids]))
        t = int(logits[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t == stop:
            break
    return out


def make_examples(model, n=12, seed=0):
    """Random prompts; completions are the model's own greedy continuation for the first half
    (cut just after a token that appears there for the first time, so greedy decoding stops
    exactly there) and a corrupted one for the second half."""
    rng = np.random.default_rng(seed)
    rows, should_match = [], []
    with torch.no_grad():
        for i in range(n):
            prompt = rng.integers(1, V, size=int(rng.integers(2, 9))).tolist()
            g = by_hand_greedy(model, prompt, stop=-1, limit=6)
            m = max(k for k in range(1, 7) if g[k - 1] not in g[:k - 1])
            ref = g[:m]
            if i >= n // 2:
                ref = ref[:-1] + [(ref[-1] + 1) % V]
            flags = [False] * len(prompt) + [True] * len(ref)
            rows.append((prompt + ref, flags))
            should_match.append(i < n // 2)
    return TokenizedExamples.from_lists(rows), should_match


def by_hand_metrics(model, examples, tokenizer, indices):
    losses, hits = [], []
    with torch.no_grad():
        for i in range(len(examples)):
            ids, flags = examples.tokens(i), examples.loss_positions(i)
            logits, _ = model(torch.tensor(ids[None, :-1]))  # full logits at every position
            targets, mask = torch.tensor(ids[1:]), torch.tensor(flags[1:])
            losses.append(F.cross_entropy(logits[0], targets, reduction="none")[mask])
            hits.append((logits[0].argmax(-1) == targets)[mask])
        matches = []
        for i in indices:
            prompt, ref = examples.split(i)
            gen = by_hand_greedy(model, prompt.tolist(), int(ref[-1]), 2 * len(ref) + 8)
            matches.append(gen[-1] == ref[-1] and tokenizer.decode(gen) == tokenizer.decode(ref.tolist()))
    losses, hits = torch.cat(losses), torch.cat(hits)
    return float(losses.mean()), float(hits.float().mean()), matches


@pytest.mark.parametrize("batch_tokens,segment_len", [(16, None), (4096, 0), (4, None), (4096, 3)])
def test_evaluate_matches_by_hand(model, tokenizer, batch_tokens, segment_len):
    """Also with rows run in segments (automatic above batch_tokens, or fixed; prompts prefilled in them)."""
    examples, should_match = make_examples(model)
    model.train()
    result = evaluate(model, examples, tokenizer, batch_tokens=batch_tokens, exact_match_samples=100,
                      segment_len=segment_len)
    assert model.training  # mode restored
    loss, acc, matches = by_hand_metrics(model, examples, tokenizer, range(len(examples)))
    assert matches == should_match  # the construction works: the check below is not vacuous
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["token_accuracy"] == pytest.approx(acc)
    assert result["loss_tokens"] == sum(int(examples.loss_positions(i).sum()) for i in range(len(examples)))
    assert result["exact_match"] == pytest.approx(sum(matches) / len(matches))
    assert [s["match"] for s in result["samples"]] == matches
    first = result["samples"][0]
    assert first["reference"] == tokenizer.decode(examples.split(0)[1][:-1].tolist())


def test_exact_match_sample_is_deterministic_subset(model, tokenizer):
    examples, _ = make_examples(model, n=10, seed=1)
    idx = exact_match_indices(len(examples), 4)
    assert idx == exact_match_indices(len(examples), 4) and len(set(idx)) == 4
    model.eval()
    result = evaluate(model, examples, tokenizer, exact_match_samples=4)
    assert not model.training
    _, _, matches = by_hand_metrics(model, examples, tokenizer, idx)
    assert result["exact_match_n"] == 4
    assert result["exact_match"] == pytest.approx(sum(matches) / 4)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_metrics_jsonl_round_trip_and_plot(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    written = []
    for step in range(1, 31):
        values = {"loss": 5.0 * 0.9 ** step, "lr": 1e-3}
        log.log("train", step, **values)
        written.append(("train", step, values))
        if step % 10 == 0:
            values = {"loss": 5.5 * 0.9 ** step, "exact_match": step / 30, "token_accuracy": step / 40}
            log.log("eval", step, **values)
            written.append(("eval", step, values))
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == len(written)
    for rec, (kind, step, values) in zip(records, written):
        assert rec["kind"] == kind and rec["step"] == step and isinstance(rec["time"], float)
        assert {k: rec[k] for k in values} == values
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plot.png")
    (w, h), nbytes = _png_size(png)
    assert 400 <= w <= 2000 and 300 <= h <= 2000 and nbytes > 5000


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path, enabled=False)
    log.log("train", 1, loss=1.0)
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1, "time": 0.0, "loss": 2.0}) + "\n{\"kind\": \"tr")
    assert [r["loss"] for r in read_metrics(path)] == [2.0]
    _png_size(plot_metrics(path, tmp_path / "p.png"))


def test_eval_command_json(tmp_path, tokenizer, capsys):
    from rwkv_sft.cli import main
    from rwkv_sft.data import DataConfig, prepare_data

    data = tmp_path / "d.jsonl"
    rows = [{"context": f"Q{i}: {'ab' * i}?", "completion": f" {i * 7} ok"} for i in range(1, 7)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(1)
    model = RWKV7(RWKV7Config(n_layer=1, n_embd=64))  # World vocabulary: the tokenizer's ids fit
    save_model(model, tmp_path / "m.pth")
    assert main(["eval", "--model", str(tmp_path / "m.pth"), "--data", str(data), "--exact-match", "3",
                 "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prepared = prepare_data(DataConfig(train_files=[str(data)]), tokenizer=tokenizer, show_progress=False)
    want = evaluate(load_model(tmp_path / "m.pth"), prepared.train, tokenizer, exact_match_samples=3)
    assert got["examples"] == 6 and got["exact_match_n"] == 3
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(want["token_accuracy"])


@pytest.mark.parametrize("kind", ["completions", "pairs"])
def test_eval_command_does_not_import_the_trainer(tmp_path, kind):
    """`rwkv-sft eval` runs from a fresh interpreter without the training loop (or anything it pulls
    in) ever being imported: evaluation is its own package beside the trainer. A pairs file is
    scored by the preference objective's module, which loads no more of the trainer."""
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    if kind == "pairs":
        rows = [{"prompt": f"Q{i}?", "chosen": f" {i}", "rejected": f" {i + 1}"} for i in range(3)]
        flags = "'--device', 'cpu', '--json'"
    else:
        rows = [{"context": f"Q{i}?", "completion": f" {i}"} for i in range(3)]
        flags = "'--exact-match', '1', '--device', 'cpu', '--json'"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    save_model(RWKV7(RWKV7Config(n_layer=1, n_embd=64)), tmp_path / "m.pth")
    script = ("import sys\nfrom rwkv_sft.cli import main\n"
              "TRAINER = {'rwkv_sft.train.loop', 'rwkv_sft.train.parallel', 'rwkv_sft.train.optim'}\n"
              f"rc = main(['eval', '--model', {str(tmp_path / 'm.pth')!r}, '--data', {str(data)!r}, "
              f"{flags}])\n"
              "print('RC', rc, 'TRAINER', sorted(m for m in sys.modules if m in TRAINER))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "RC 0 TRAINER []", out.stdout


@pytest.mark.parametrize("kind", ["completions", "pairs"])
def test_eval_data_outside_the_models_vocabulary_is_one_line_error(tmp_path, capsys, kind):
    from rwkv_sft.cli import main
    data = tmp_path / "d.jsonl"
    row = ({"prompt": "Hello?", "chosen": " yes", "rejected": " no"} if kind == "pairs"
           else {"context": "Hello?", "completion": " yes"})
    data.write_text(json.dumps(row) + "\n")
    torch.manual_seed(0)
    save_model(RWKV7(RWKV7Config(n_layer=1, n_embd=64, vocab_size=256)), tmp_path / "m.pth")
    assert main(["eval", "--model", str(tmp_path / "m.pth"), "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rwkv-sft eval: error: {data}:1: token id") and "vocabulary of 256" in err[-1], err
