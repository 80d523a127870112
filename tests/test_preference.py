"""Preference training: pair data rendered as SFT renders it, the forked forward against running the
two full sequences, each objective against its formula, the DPO reference, and runs of `train`."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import random_model

from rwkv_sft.adapters.lora import add_lora
from rwkv_sft.weights import save_model
from rwkv_sft.data import DataConfig
from rwkv_sft.data.cache import tokenize_bytes
from rwkv_sft.data.pairs import PairExamples, PairLoader, collate_pairs, prepare_pairs
from rwkv_sft.errors import UserError
from rwkv_sft.tokenizer import Tokenizer
from rwkv_sft.train import preference as pref

PAIRS = [
    {"prompt": "What is 2+2? ", "chosen": "4", "rejected": "five, I think"},
    {"context": "Say hi in French:", "chosen": " Bonjour", "rejected": " Hello there"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "London, obviously."}]},
    {"instruction": "Translate to German", "input": "cat", "chosen": "Katze", "rejected": "Hund"},
    {"prompt": "", "chosen": "x y", "rejected": "z"},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _sft_record(r, which):
    if "instruction" in r:
        return {"instruction": r["instruction"], "input": r["input"], "output": r[which]}
    prompt = r.get("prompt", r.get("context"))
    if isinstance(prompt, list):
        return {"messages": prompt + r[which]}
    return {"context": prompt, "completion": r[which]}


def test_pairs_are_rendered_and_scored_as_sft_renders_them(tmp_path, tok):
    pairs = prepare_pairs(DataConfig(_write(tmp_path / "p.jsonl", PAIRS)), tok, show_report=False).train
    for which, k in (("chosen", 1), ("rejected", 2)):
        sft = [_sft_record(r, which) for r in PAIRS]
        data = "".join(json.dumps(r) + "\n" for r in sft).encode()
        shard = tokenize_bytes("sft.jsonl", data, tok)
        for i, (start, ctx_len, stop) in enumerate(shard.index):
            context, *completions = pairs.parts(i)
            ids, scored = completions[k - 1]
            np.testing.assert_array_equal(np.concatenate([context, ids]), shard.ids[start:stop])
            # the scored tokens are SFT's loss tokens of the completion (end marker included)
            np.testing.assert_array_equal(scored, shard.flags[start + len(context):stop])
            assert scored[-1] and ids[-1] == 0  # the end marker is scored
            assert len(ids) == stop - start - ctx_len  # the fork is where SFT's completion starts


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "empty chosen"),
    ({"prompt": "a", "chosen": "b", "rejected": "  "}, "empty rejected"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical chosen and rejected"),
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "missing field 'prompt'"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "field 'chosen' is int"),
])
def test_bad_pairs_name_file_and_line_or_are_skipped_and_counted(tmp_path, tok, record, message):
    path = _write(tmp_path / "bad.jsonl", [PAIRS[0], record, PAIRS[1]])
    with pytest.raises(UserError, match=rf"bad.jsonl:2: {message}"):
        prepare_pairs(DataConfig(path), tok, show_report=False)
    data = prepare_pairs(DataConfig(path, skip_invalid=True), tok, show_report=False)
    assert len(data.train) == 2 and sum(data.report["skipped"].values()) == 1


def _synthetic_pairs(lens):
    """PairExamples of the given (context, chosen, rejected) lengths, every token scored."""
    lens = np.asarray(lens, np.int64)
    start = np.concatenate([[0], np.cumsum(lens.sum(1))[:-1]])
    n = int(lens.sum())
    return PairExamples([(np.ones(n, np.int64), np.ones(n, bool))], np.zeros(len(lens)), start, lens, lens,
                        np.arange(len(lens)))


def test_pair_batches_group_contexts_and_completions_of_like_length():
    # Two kinds of pair with the same total length: long context and short completions, and the
    # reverse. A batch pads its contexts and its completions separately, so mixing them wastes.
    lens = [(100, 10, 10)] * 40 + [(10, 55, 55)] * 40
    order = np.random.default_rng(0).permutation(len(lens))
    examples = _synthetic_pairs([lens[i] for i in order])
    for packing in (True, False):
        loader = PairLoader(examples, batch_tokens=1000, seed=1, packing=packing)
        plan = loader.plan(0)
        assert sorted(i for rows in plan for row in rows for i in row) == list(range(len(lens)))
        for rows in plan:
            assert loader.positions_of(rows) <= 1000
            assert len({tuple(examples.kept[i]) for row in rows for i in row}) == 1
            batch = loader.collate(rows)  # the plan's cost is what the forked forward runs
            after_fork = (pref.packed_completions(batch.completions, batch.scored)[0] if packing
                          else batch.completions[:, 1:])
            assert loader.positions_of(rows) == batch.context.numel() + after_fork.numel()


@pytest.mark.parametrize("lens, segment_len, expected", [
    ((60, 40, 40), None, {}),  # 60 + 2 * 39 positions exceed the budget, yet no row does
    ((150, 20, 20), None, {100: 1}),  # the context is longer than the budget: it runs in segments
    ((60, 40, 40), 64, {}),  # no row longer than --segment-len
    ((60, 70, 20), 64, {64: 1})])
def test_the_header_counts_pair_batches_whose_contexts_or_completions_run_in_segments(lens, segment_len, expected):
    from rwkv_sft.train.plan import segment_lengths
    loader = PairLoader(_synthetic_pairs([lens]), batch_tokens=100)
    assert segment_lengths(loader, segment_len, 100) == expected


def _model(seed=0, dtype=torch.float32, **kw):
    m = random_model(seed, n_layer=2, n_embd=64, head_size=64, vocab_size=65536).to(dtype)
    m.wkv_backend = kw.pop("backend", "reference")  # the fork is under test here, not the WKV backend
    for k, v in kw.items():
        setattr(m, k, v)
    return m


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tok):
    path = _write(tmp_path_factory.mktemp("pairs") / "p.jsonl", PAIRS)
    return collate_pairs(prepare_pairs(DataConfig(path), tok, show_report=False).train, range(len(PAIRS)))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_rel(a, b, tol):
    err = (a - b).abs().max().item()
    assert err <= tol * b.abs().max().item(), err


@pytest.mark.parametrize("packed", [True, False], ids=["completions-in-one-row", "completions-in-two-rows"])
@pytest.mark.parametrize("setting", ["plain", "segments", "checkpointing", "state", "lora", "chunked"])
def test_forked_logps_and_gradients_equal_running_both_full_sequences(batch, setting, packed):
    model = _model(activation_checkpointing=setting == "checkpointing",
                   backend="chunked" if setting == "chunked" else "reference")
    if setting == "state":
        for p in model.enable_state_tuning():
            torch.nn.init.normal_(p, std=0.3)
    if setting == "lora":
        add_lora(model, rank=4)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:
                torch.nn.init.normal_(p.data, std=0.1)
    segment = 3 if setting == "segments" else None
    weights = torch.linspace(-1, 1, 2 * batch.num_pairs)  # each sequence its own weight: no cancellation
    logp, count = pref.sequence_logps(model, batch, segment_len=segment, packed=packed)
    (logp * weights).sum().backward()
    forked = _grads(model)
    model.zero_grad()
    logp2, count2 = pref.sequence_logps_unforked(model, batch)
    (logp2 * weights).sum().backward()
    unforked = _grads(model)
    assert torch.equal(count, count2)
    _assert_rel(logp, logp2, 1e-5)
    assert forked.keys() == unforked.keys() and len(forked) > 0
    for name in forked:
        _assert_rel(forked[name], unforked[name], 1e-5)


@torch.no_grad()
def _independent_logps(model, batch):
    """Each sequence alone, full logits, float64 log-softmax: nothing shared with the code under test."""
    tokens, targets, mask = batch.full_sequences()
    out = []
    for s in range(tokens.shape[0]):
        n = int(mask[s].nonzero().max()) + 1
        logits, _ = model(tokens[s:s + 1, :n])
        logprobs = torch.log_softmax(logits[0].double(), -1).gather(1, targets[s, :n, None])[:, 0]
        out.append((float(logprobs[mask[s, :n]].sum()), int(mask[s].sum())))
    return out


def _formula(objective, seqs, ref, beta, gamma):
    losses = []
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for b in range(len(seqs) // 2):
        (pw, nw), (pl, nl) = seqs[2 * b], seqs[2 * b + 1]
        if objective == "dpo":
            losses.append(-math.log(sig(beta * ((pw - ref[2 * b]) - (pl - ref[2 * b + 1])))))
        elif objective == "orpo":
            odds = lambda avg: math.exp(avg) / (1 - math.exp(avg))  # noqa: E731
            losses.append(-pw / nw - beta * math.log(sig(math.log(odds(pw / nw)) - math.log(odds(pl / nl)))))
        else:
            losses.append(-math.log(sig(beta * pw / nw - beta * pl / nl - gamma)))
    return losses


@pytest.mark.parametrize("objective, beta, gamma", [("dpo", 0.3, None), ("orpo", 0.7, None), ("simpo", 2.5, 0.4)])
def test_each_objective_matches_its_formula_from_per_sequence_logps(batch, objective, beta, gamma):
    model = _model(dtype=torch.float64, backend="reference")
    seqs = _independent_logps(model, batch)
    ref = [p - 0.5 * k for k, (p, _) in enumerate(seqs)]  # a reference that differs per sequence
    expected = _formula(objective, seqs, ref, beta, gamma)
    module = pref.PreferenceLoss(model, objective, beta, gamma)
    loss_sum, stats = module(*pref.as_inputs(batch)[:-1], torch.tensor(ref, dtype=torch.float64))
    assert abs(loss_sum.item() - sum(expected)) <= 1e-9 * sum(expected)
    assert abs(float(stats[0]) - sum(expected)) <= 1e-9 * sum(expected)
    logp, count = pref.sequence_logps(model, batch)
    losses, _, _ = pref.pair_losses(objective, logp, count, torch.tensor(ref, dtype=torch.float64), beta, gamma)
    np.testing.assert_allclose(losses.detach().numpy(), expected, rtol=1e-9)


def test_lora_reference_is_the_model_with_adapters_disabled(batch):
    base = _model()
    model = copy.deepcopy(base)
    add_lora(model, rank=4)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p.data, std=0.1)
    for p in model.enable_state_tuning():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        expected = pref.sequence_logps(base, batch)[0]
        with pref.adapters_off(model):
            off = pref.sequence_logps(model, batch)[0]
        on = pref.sequence_logps(model, batch)[0]  # restored on exit
    torch.testing.assert_close(off, expected, rtol=1e-6, atol=1e-5)
    assert (on - expected).abs().max() > 1e-2  # the adapters do change the model
    module = pref.PreferenceLoss(model, "dpo", 0.1, None, reference="adapters")
    with torch.no_grad():
        _, stats = module(*pref.as_inputs(batch))
        logp = module.logps(batch)[0]
    chosen = 0.1 * (logp[0::2] - expected[0::2])
    torch.testing.assert_close(stats[1], chosen.sum().to(stats.dtype), rtol=1e-5, atol=1e-5)


# -- runs of `train` -----------------------------------------------------------------------------

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _date_pairs(n, seed):
    """Prefer '5 March 1999' to 'March 5 1999': the same tokens in another order."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d, m, y = int(rng.integers(1, 29)), int(rng.integers(0, 12)), int(rng.integers(1900, 2100))
        out.append({"prompt": f"Date {y}-{m + 1:02d}-{d:02d} in words:", "chosen": f" {d} {MONTHS[m]} {y}",
                    "rejected": f" {MONTHS[m]} {d} {y}"})
    return out


@pytest.fixture(scope="module")
def date_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dates")
    return _write(root / "train.jsonl", _date_pairs(48, 0)), _write(root / "eval.jsonl", _date_pairs(24, 1))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_SFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def one_thread():
    """Bit-identical needs the same reduction order in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(out, files, **kw):
    from rwkv_sft.train import TrainConfig
    settings = dict(data=DataConfig(files[0], eval_files=[files[1]]), out_dir=str(out), max_steps=6,
                    model_config=dict(n_layer=2, n_embd=64, head_size=64),
                    batch_tokens=256, lr=3e-3, warmup_steps=0, progress=False, tensorboard=False, export=[],
                    wkv_backend="chunked", objective="dpo")
    settings.update(kw)
    return TrainConfig(**settings)


def _fresh(seed=0):
    from rwkv_sft import RWKV7, RWKV7Config
    torch.manual_seed(seed)
    return RWKV7(RWKV7Config(n_layer=2, n_embd=64, head_size=64))


def _lines(out, kind="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_dpo_with_lora_starts_at_log2_and_leaves_the_base_bit_identical(tmp_path, date_files):
    from rwkv_sft.train import train
    model = _fresh()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(_config(tmp_path, date_files, lora_rank=4, max_steps=3), model=model)
    first = _lines(tmp_path)[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6  # the adapter starts at zero: policy == reference
    assert first["margin"] == 0.0 and first["reward_accuracy"] == 0.0
    after = result.model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), k
    assert any("lora_B" in k and after[k].abs().max() > 0 for k in after)  # and the adapter did train
    assert {"reward_chosen", "reward_rejected", "margin", "reward_accuracy",
            "preference_accuracy"} <= set(_lines(tmp_path, "eval")[-1])


def test_dpo_in_bf16_starts_at_log2_and_logs_fp32_means(tmp_path, date_files):
    from rwkv_sft.train import train
    train(_config(tmp_path, date_files, state_tuning=True, precision="bf16", max_steps=1), model=_fresh())
    assert abs(_lines(tmp_path)[0]["loss"] - math.log(2)) < 1e-6


def test_full_dpo_precomputes_the_reference_once_and_held_out_accuracy_rises(tmp_path, date_files):
    from rwkv_sft.data.pairs import prepare_pairs
    from rwkv_sft.train import train
    held_out = prepare_pairs(DataConfig(date_files[1]), show_report=False).train
    before = pref.evaluate_pairs(_fresh(), held_out, objective="dpo")["preference_accuracy"]
    result = train(_config(tmp_path / "run", date_files), model=_fresh())
    assert abs(_lines(tmp_path / "run")[0]["loss"] - math.log(2)) < 1e-6  # the reference is the starting model
    cached = list((tmp_path / "cache").glob("reference-logps-*.npy"))
    assert len(cached) == 2  # train and eval pairs, beside the tokenized data
    assert before < 0.75 and result.eval["preference_accuracy"] >= 0.9, (before, result.eval)
    # batches of another shape get a reference of their own: it runs what step 1 runs
    train(_config(tmp_path / "two-rows", date_files, packing=False, max_steps=1), model=_fresh())
    assert abs(_lines(tmp_path / "two-rows")[0]["loss"] - math.log(2)) < 1e-6
    assert len(list((tmp_path / "cache").glob("reference-logps-*.npy"))) == 4


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_train_and_report(tmp_path, date_files, objective):
    from rwkv_sft.data.pairs import prepare_pairs
    from rwkv_sft.train import train
    held_out = prepare_pairs(DataConfig(date_files[1]), show_report=False).train
    before = pref.evaluate_pairs(_fresh(), held_out, objective=objective)
    result = train(_config(tmp_path, date_files, objective=objective, max_steps=4), model=_fresh())
    lines = _lines(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in lines) and lines[-1]["loss"] < lines[0]["loss"]
    assert result.eval["loss"] < before["loss"]
    assert result.eval["preference_accuracy"] > before["preference_accuracy"], (before, result.eval)


def test_resume_is_bit_identical(tmp_path, date_files, one_thread):
    from rwkv_sft.train import train
    kw = dict(step_tokens=200, schedule="constant")  # the schedule does not depend on max_steps then
    straight = train(_config(tmp_path / "a", date_files, max_steps=4, **kw), model=_fresh())
    train(_config(tmp_path / "b", date_files, max_steps=2, **kw), model=_fresh())
    resumed = train(_config(tmp_path / "b", date_files, max_steps=4, resume="auto", **kw), model=_fresh())
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _lines(tmp_path / "a")] == [r["loss"] for r in _lines(tmp_path / "b")]


def test_eval_and_inspect_data_on_a_pairs_file(tmp_path, date_files, capsys):
    from rwkv_sft.cli import main
    model = _fresh()
    save_model(model, tmp_path / "m.pth")
    held_out = prepare_pairs(DataConfig(date_files[1]), show_report=False).train
    expected = pref.evaluate_pairs(model, held_out)["preference_accuracy"]
    assert main(["eval", "--model", str(tmp_path / "m.pth"), "--data", date_files[1], "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pairs"] == 24 and out["preference_accuracy"] == expected
    assert main(["inspect-data", date_files[0], "--show", "1"]) == 0
    text = capsys.readouterr().out
    assert "48 train pairs" in text and "chosen:   ⟦" in text and "rejected: ⟦" in text and "<eos>⟧" in text


def _ddp_worker(rank, port, out_dir, files, result_file, cache):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), RWKV_SFT_CACHE=cache)
    torch.set_num_threads(1)
    from rwkv_sft.train import train
    r = train(_config(out_dir, files, max_steps=None, epochs=1, step_tokens=10**6, batch_tokens=128), model=_fresh())
    if rank == 0:
        torch.save({"steps": r.steps, "weights": r.model.state_dict()}, result_file)


@pytest.mark.slow
def test_ddp_two_processes_train_like_one(tmp_path, date_files):
    """Full-fine-tuning DPO (the reference precomputed by the main process) over one step that
    spans the epoch, split across two gloo processes, equals the same step in one process."""
    import socket

    import torch.multiprocessing as mp

    from rwkv_sft.train import train
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "ddp"), date_files, str(result), str(tmp_path / "cache")),
             nprocs=2, join=True)
    got = torch.load(result, weights_only=True)
    single = train(_config(tmp_path / "one", date_files, max_steps=None, epochs=1, step_tokens=10**6,
                           batch_tokens=128), model=_fresh())
    assert got["steps"] == single.steps == 1
    first = _lines(tmp_path / "one")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    ddp = _lines(tmp_path / "ddp")[0]
    assert ddp["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert ddp["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-5)  # the gradient's scale and size
    for k, v in single.model.state_dict().items():  # AdamW's first step is nearly sign(gradient) * lr:
        err = (got["weights"][k] - v).abs().max().item()  # a gradient near zero may round either way
        assert err <= 0.01 * 3e-3 + 1e-5 * v.abs().max().item(), k


def test_plot_draws_the_rewards_users_watch(tmp_path):
    """A preference run's plot has a panel of rewards, margin and accuracies: every series drawn is
    the log's values at its steps; an SFT log keeps the one loss panel."""
    from rwkv_sft.train.metrics import MetricsLogger, metrics_figure, plot_metrics, read_metrics
    rng = np.random.default_rng(0)
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 13):
            chosen, rejected = rng.normal(size=2)
            log.log("train", step, loss=float(rng.random()) + 0.1, lr=1e-3, reward_chosen=chosen, reward_rejected=rejected,
                    margin=chosen - rejected, reward_accuracy=float(rng.random()), preference_accuracy=float(rng.random()))
            if step % 4 == 0:
                log.log("eval", step, loss=0.5, reward_chosen=0.3 * step, reward_rejected=-0.1 * step, margin=0.4 * step,
                        reward_accuracy=step / 12, preference_accuracy=step / 24, pairs=8)
    records = read_metrics(tmp_path / "metrics.jsonl")
    fig = metrics_figure(records, "run")
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")}
    expected = {}
    for kind in ("train", "eval"):
        for key in ("loss", "reward_chosen", "reward_rejected", "margin", "reward_accuracy", "preference_accuracy"):
            rows = [r for r in records if r["kind"] == kind]
            expected[f"{kind} {key.replace('_', ' ')}"] = ([r["step"] for r in rows], [r[key] for r in rows])
    assert drawn == expected
    rewards_panel = [ax for ax in fig.axes if any("reward chosen" in line.get_label() for line in ax.get_lines())]
    assert len(rewards_panel) == 1 and rewards_panel[0] is not fig.axes[0]  # below the loss, not on it
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sft = [{k: v for k, v in r.items() if k in ("kind", "step", "time", "loss")} for r in records]
    fig = metrics_figure(sft, "sft")
    assert sorted(line.get_label() for ax in fig.axes for line in ax.get_lines()) == ["eval loss", "train loss"]
    import matplotlib.pyplot as plt
    plt.close("all")


def _fsdp_worker(rank, port, out_dir, files, cache):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), RWKV_SFT_CACHE=cache)
    torch.set_num_threads(1)
    from rwkv_sft.train import train
    train(_config(out_dir, files, **FSDP_RUN), model=_fresh())


# LoRA on a sharded frozen base; several micro-batches per step, a different number on each process;
# contexts and completions of different lengths in segments of 5 tokens (counts that differ per process)
FSDP_RUN = dict(parallel="fsdp", lora_rank=4, max_steps=3, step_tokens=300, batch_tokens=128, segment_len=5,
                schedule="constant")


@pytest.mark.slow
def test_fsdp_two_processes_train_like_one(tmp_path, date_files):
    """DPO with LoRA (the reference: the sharded base with the adapter off) on two gloo processes
    under fsdp: the losses, rewards and held-out evaluation of one process."""
    import socket

    import torch.multiprocessing as mp

    from safetensors.torch import load_file

    from rwkv_sft.train import train
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(port, str(tmp_path / "fsdp"), date_files, str(tmp_path / "cache")), nprocs=2, join=True)
    train(_config(tmp_path / "one", date_files, **{**FSDP_RUN, "parallel": "ddp"}), model=_fresh())
    one, fsdp = _lines(tmp_path / "one"), _lines(tmp_path / "fsdp")
    assert len(one) == len(fsdp) == 3 and abs(one[0]["loss"] - math.log(2)) < 1e-6
    for key in ("loss", "reward_chosen", "reward_rejected", "grad_norm"):
        torch.testing.assert_close([r[key] for r in fsdp], [r[key] for r in one], rtol=1e-5, atol=1e-7, msg=key)
    assert one[-1]["margin"] != 0.0  # the adapter did train
    (e1,), (e2,) = _lines(tmp_path / "one", "eval"), _lines(tmp_path / "fsdp", "eval")
    for key in ("loss", "margin", "preference_accuracy"):
        assert e2[key] == pytest.approx(e1[key], rel=1e-5), key
    a, b = (load_file(tmp_path / run / "adapter.safetensors") for run in ("one", "fsdp"))
    assert a.keys() == b.keys() and len(a) > 0
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_dpo_with_state_tuning_under_fsdp_is_refused(tmp_path, date_files):
    """Its reference switches the learned state off, which the sharded blocks would put back."""
    with pytest.raises(UserError, match="dpo with state tuning under --parallel fsdp"):
        _config(tmp_path, date_files, parallel="fsdp", state_tuning=True).validate()
    _config(tmp_path, date_files, parallel="fsdp", lora_rank=4).validate()
    _config(tmp_path, date_files, parallel="fsdp", state_tuning=True, objective="simpo").validate()
