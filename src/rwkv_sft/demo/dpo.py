"""`rwkv-sft demo --method dpo`: the demo model learns, from preference pairs, to prefer a new style.

The base is the normal demo's model (`runs/demo/model.pth`, trained first when it is missing); it
writes " 3 February 1974". The bundled pairs (examples/make_demo_data.py) prefer the American
style of the same date, " February 3, 1974" (chosen), to the base's own (rejected): 400 training
pairs, 200 held-out ones whose dates never occur in training. DPO trains a rank-8 LoRA; its
reference is the base itself (the adapter switched off). Held-out preference accuracy, the share
of pairs where log pi(chosen) > log pi(rejected), is measured before and after.

The base starts about 40 nats in favour of its own style; DPO's beta is small (0.02) so that the
loss does not flatten before the preference turns (at the usual 0.1 it flattens near a margin of
30 nats: preference accuracy stayed at 0% after 60 steps at lr 1e-3). At beta 0.02 and lr 1e-2 it
reached 100% in 20 steps.
"""
from __future__ import annotations

import time

from .full import DATA_DIR
from .peft import LORA_RANK, ensure_base, out_dir

PAIRS_TRAIN = DATA_DIR / "dates_pairs_train.jsonl"
PAIRS_HELDOUT = DATA_DIR / "dates_pairs_heldout.jsonl"
DPO_STEPS, DPO_LR, DPO_BETA = 30, 1e-2, 0.02


def _margins(model, pairs, k: int):
    """log pi(chosen) - log pi(rejected) of the first k held-out pairs."""
    import torch

    from ..data.pairs import collate_pairs
    from ..train.preference import sequence_logps
    model.eval()
    with torch.no_grad():
        logp, _ = sequence_logps(model, collate_pairs(pairs, range(k)))
    return (logp[0::2] - logp[1::2]).tolist()


def _accuracy(ev: dict) -> str:
    right = round(ev["preference_accuracy"] * ev["pairs"])
    return f"preference accuracy {ev['preference_accuracy']:6.1%} ({right}/{ev['pairs']} held-out pairs)"


def run(args) -> int:
    from ..data import DataConfig
    from ..data.pairs import prepare_pairs
    from ..weights import load_model
    from ..tokenizer import Tokenizer
    from ..train import TrainConfig, train
    from ..train.preference import adapters_off, evaluate_pairs
    from .full import _log_before, stopped

    start = time.perf_counter()
    out = out_dir(args)
    base, code = ensure_base(args)
    if code:
        return code
    data_cfg = DataConfig(train_files=[str(PAIRS_TRAIN)], eval_files=[str(PAIRS_HELDOUT)], max_len=64, seed=args.seed)
    steps = args.steps or DPO_STEPS
    config = TrainConfig(
        data=data_cfg, model=str(base), out_dir=str(out), max_steps=steps, batch_tokens=512,
        objective="dpo", beta=DPO_BETA, lora_rank=LORA_RANK, lr=DPO_LR,
        warmup_steps=min(10, steps // 5), eval_every=max(1, steps // 4),
        wkv_backend="chunked", tensorboard=False, seed=args.seed, device="cpu", progress=True,
        activation_checkpointing=False,  # a 2 x 128 model: its activations are small, recomputing them only costs time
        overwrite=True)  # every demo is a fresh run
    tokenizer = Tokenizer()
    data = prepare_pairs(data_cfg, tokenizer, show_report=False)
    print(f"rwkv-sft demo --method dpo: {base} (frozen) learns to prefer dates written American style from pairs "
          f"(chosen ' February 3, 1974', rejected its own ' 3 February 1974'); DPO (beta {DPO_BETA:g}) trains a "
          f"LoRA of rank {LORA_RANK}, the reference is the base; {len(data.train)} training / {len(data.eval)} "
          f"held-out pairs; {steps} steps at lr {DPO_LR:g} on {args.threads} CPU thread(s)", flush=True)
    model = load_model(base)
    model.wkv_backend = config.wkv_backend
    before = evaluate_pairs(model, data.eval, objective="dpo", batch_tokens=config.batch_tokens)
    print(f"{'before training':<16} {_accuracy(before)}", flush=True)
    result = train(config, model=model, data=data, tokenizer=tokenizer)
    if result.interrupted:
        return stopped(result)
    _log_before(result, before)
    after = result.eval
    print(f"{'before training':<16} {_accuracy(before)}")
    print(f"{'after training':<16} {_accuracy(after)}   reward margin {after['margin']:.3f}, "
          f"reward accuracy {after['reward_accuracy']:.1%}")
    k = min(args.samples, len(data.eval))
    if k:
        with adapters_off(result.model):
            was = _margins(result.model, data.eval, k)
        now = _margins(result.model, data.eval, k)
        print(f"\n{'held-out context':<30}{'chosen':<22}{'rejected':<22}log pi(chosen) - log pi(rejected)")
        for i in range(k):
            context, (chosen, _), (rejected, _) = data.eval.parts(i)
            text = [tokenizer.decode(t.tolist()).replace("\n", " ") for t in (context, chosen[:-1], rejected[:-1])]
            print(f"{text[0]:<30}{text[1]!r:<22}{text[2]!r:<22}{was[i]:+7.1f} -> {now[i]:+.1f}")
    adapter = result.exports.get("adapter")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s (training {result.time_s:.0f} s); adapter: {adapter}; "
          f"plot: {result.plot_path}")
    print(f"try it: rwkv-sft eval --model {base} --adapter {adapter} --data {PAIRS_HELDOUT}")
    return 0
