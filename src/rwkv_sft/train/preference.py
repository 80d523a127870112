"""Preference objectives (DPO, ORPO, SimPO) over completion pairs, with the shared context run once.

The forked forward: each pair's context runs once; both completions start from its final state
(per layer: WKV state and both token-shift states, repeated for the two branches), and the first
completion token of each is predicted from the context's last hidden row. Autograd carries the
gradients of both branches back through the shared context, so they are exactly those of running
the two full sequences (`sequence_logps_unforked` is that twin, and the tests compare them).
Log-probabilities come from the per-row form of the chunked linear cross-entropy: no full logits.

Per pair, with log pi(y) the sum and avg log pi(y) the mean of the scored tokens' log-probs:
  DPO    -log s(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
  ORPO   -avg log pi(y_w) - lambda log s(log odds(y_w) - log odds(y_l)), odds = p / (1 - p),
         p = exp(avg log pi); lambda is --beta
  SimPO  -log s(beta avg log pi(y_w) - beta avg log pi(y_l) - gamma)
Rewards (what users watch): DPO beta (log pi - log ref); ORPO and SimPO beta avg log pi.

DPO's reference: with LoRA or state tuning the base itself with the adapters switched off (no
second copy of the model); with full fine-tuning the starting model's log-probs, computed once
before training and cached beside the tokenized data (TRL's precompute_ref_log_probs).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.quant import loss_weight
from ..errors import UserError
from ..precision import autocast
from ..model.segments import hidden_rows, segment_len_for
from ..ops import linear_cross_entropy
from .loss import same_segment_count

DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}  # TRL's defaults (SimPO: the paper's)
DEFAULT_SIMPO_GAMMA = 1.0  # the SimPO paper's gamma / beta = 0.5 at its beta = 2
STATS = ("loss", "reward_chosen", "reward_rejected", "reward_accuracy", "preference_accuracy", "pairs")


# -- log-probabilities ---------------------------------------------------------------------------

def _hidden(model, tokens, state, resets, rows, S, restart=None):
    """(forward_hidden(tokens, state, resets, restart=...)[0][rows], final state), segment by
    segment when S splits."""
    if S is not None and S < tokens.shape[1]:
        return model.forward_hidden(tokens, state, resets, segment_len=S, rows=rows, restart=restart)
    hidden, state = model.forward_hidden(tokens, state, resets, restart=restart)
    return hidden[rows], state


def packed_completions(completions, scored):
    """Each pair's two completions in one row, chosen then rejected, each but its last token (the
    inputs after the fork; the first targets come from the context's last row): (inputs [B,T],
    resets [B,T] (at the rejected's first input), targets [B,T], scored rows [B,T], the completion
    [0, 2B) each position belongs to [B,T]). A completion ends at its last scored token (later ones
    are nobody's target). T is 0 when no completion has a second token."""
    n, Tp = completions.shape
    B, device = n // 2, completions.device
    length = torch.where(scored.any(1), (scored * torch.arange(1, Tp + 1, device=device)).amax(1), 0)
    inputs = (length - 1).clamp(min=0).view(B, 2)
    T = int(inputs.sum(1).max()) if B else 0
    pos = torch.arange(T, device=device)[None]
    first = inputs[:, :1]
    in_rejected = pos >= first
    src = 2 * torch.arange(B, device=device)[:, None] + in_rejected
    col = torch.where(in_rejected, pos - first, pos).clamp(max=max(Tp - 2, 0))  # (padding reads any column)
    valid = pos < inputs.sum(1, keepdim=True)
    tokens = torch.where(valid, completions[src, col], 0)
    target_col = (col + 1).clamp(max=Tp - 1)
    return tokens, valid & (pos == first), completions[src, target_col], valid & scored[src, target_col], src


def head_logps(head, hidden, targets, seq, n_seq, chunk_size=None):
    """Summed log-prob of `targets` per sequence id `seq` through `head`, fp32 (fp64 for an fp64 model)."""
    nll = linear_cross_entropy(hidden, loss_weight(head), targets, reduction="none", chunk_size=chunk_size)
    return -torch.zeros(n_seq, dtype=nll.dtype, device=nll.device).index_add(0, seq, nll)


class HeadLogps(nn.Module):
    """head_logps as a module of its own (the model's head itself, no copy): the unit an fsdp run
    gathers the head's weight around (parallel.wrap), as HeadLoss is for the completion loss."""

    def __init__(self, head, chunk_size: int | None = None):
        super().__init__()
        self.head, self.chunk_size = head, chunk_size

    def forward(self, hidden, targets, seq, n_seq: int):
        return head_logps(self.head, hidden, targets, seq, n_seq, self.chunk_size)


def _sum_per_sequence(model, hidden, targets, seq, n_seq, chunk_size, score=None):
    if score is not None:  # the loss module's HeadLogps
        return score(hidden, targets, seq, n_seq)
    return head_logps(model.head, hidden, targets, seq, n_seq, chunk_size)


def sequence_logps(model, batch, chunk_size=None, segment_len=None, batch_tokens=None, lockstep=False, score=None,
                   packed=True):
    """The forked forward: (log pi [2B] summed over each completion's scored tokens, their count [2B]).
    `lockstep`: every process of the group runs as many segments (sharded blocks); `score`: the
    head's HeadLogps module (default: the head read directly); `packed`: each pair's two
    completions run in one row (the rejected restarting from the context's state), else in two."""
    B, Tc = batch.context.shape
    n, Tp = batch.completions.shape
    scored, comps = batch.scored, batch.completions
    context, resets = batch.context, batch.context_resets
    last = torch.zeros_like(resets)
    last[:, -1] = True
    S = segment_len_for((B, Tc), segment_len, batch_tokens)
    if lockstep:  # padded before each row's reset, so the contexts' ends stay where they are
        context, last, resets, S = same_segment_count(context, last, resets, S, before=True)
    resets = None if bool(resets[:, 0].all()) else resets  # no padding: no reset
    h_last, state = _hidden(model, context, None, resets, last, S)
    seq = torch.arange(n, device=comps.device)
    hidden = [h_last.repeat_interleave(2, 0)[scored[:, 0]]]  # the first tokens: from the context's end
    targets, seqs = [comps[:, 0][scored[:, 0]]], [seq[scored[:, 0]]]
    if packed:
        tokens, resets, rest_targets, rows, rest_seq = packed_completions(comps, scored)
        start, restart = state, state
    else:
        tokens, rows = comps[:, :-1], scored[:, 1:]
        resets, rest_targets, rest_seq = None, comps[:, 1:], seq[:, None].expand(n, Tp - 1)
        start, restart = state.repeat(2), None
    if tokens.shape[1]:  # (a completion holds at least a token and the end marker: so in every process)
        S = segment_len_for(tuple(tokens.shape), segment_len, batch_tokens)
        targets.append(rest_targets[rows])
        seqs.append(rest_seq[rows])
        if lockstep:  # padded after the rows' ends, outside the scored rows
            tokens, rows, resets, S = same_segment_count(tokens, rows, resets, S)
        h_rest, _ = _hidden(model, tokens, start, resets, rows, S, restart)
        hidden.append(h_rest)
    logp = _sum_per_sequence(model, torch.cat(hidden), torch.cat(targets), torch.cat(seqs), n, chunk_size, score)
    return logp, scored.sum(1)


def sequence_logps_unforked(model, batch, chunk_size=None, segment_len=None):
    """The twin: each completion after its context as one full sequence (what SFT would run)."""
    device = batch.context.device
    tokens, targets, mask = (t.to(device) for t in batch.full_sequences())
    S = segment_len if segment_len and segment_len < tokens.shape[1] else None
    hidden = hidden_rows(model, tokens, None, mask, S)
    n = tokens.shape[0]
    seq = torch.arange(n, device=device)[:, None].expand_as(mask)[mask]
    return _sum_per_sequence(model, hidden, targets[mask], seq, n, chunk_size), mask.sum(1)


# -- objectives ----------------------------------------------------------------------------------

def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(objective: str, logp, count, ref=None, beta: float = 0.1, gamma: float = DEFAULT_SIMPO_GAMMA):
    """Per pair (loss [B], chosen reward [B], rejected reward [B]) from the interleaved [2B] sums."""
    pc, pr = logp[0::2], logp[1::2]
    count = count.to(logp.dtype).clamp(min=1)
    ac, ar = pc / count[0::2], pr / count[1::2]
    if objective == "dpo":
        if ref is None:
            raise ValueError("dpo needs the reference log-probs")
        chosen, rejected = beta * (pc - ref[0::2]), beta * (pr - ref[1::2])
        return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()
    if objective == "orpo":
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        return -ac - beta * F.logsigmoid(log_odds), beta * ac.detach(), beta * ar.detach()
    if objective == "simpo":
        return -F.logsigmoid(beta * (ac - ar) - gamma), beta * ac.detach(), beta * ar.detach()
    raise ValueError(f"unknown preference objective {objective!r}")


@contextlib.contextmanager
def adapters_off(model):
    """The frozen base alone: every LoRA layer computes its base weight only and every learned
    initial state is left out (no copy of anything; restored on exit)."""
    from ..adapters.lora import lora_modules
    loras = list(lora_modules(model).values())
    states = [(b.att, b.att.time_state) for b in model.blocks if b.att.time_state is not None]
    try:
        for m in loras:
            m.adapter_on = False
        for att, _ in states:
            att.time_state = None
        yield model
    finally:
        for m in loras:
            m.adapter_on = True
        for att, p in states:
            att.time_state = p


class PreferenceLoss(nn.Module):
    """Wraps the model so that DDP sees one forward: the batch's summed pair loss (weighted by
    pair_weight) and the summed statistics (detached) in STATS order."""

    def __init__(self, model, objective: str, beta: float, gamma: float, chunk_size=None, segment_len=None,
                 batch_tokens=None, reference: str | None = None, packed: bool = True):
        super().__init__()
        self.model, self.objective, self.beta, self.gamma = model, objective, beta, gamma
        self.chunk_size, self.segment_len, self.batch_tokens = chunk_size, segment_len, batch_tokens
        self.packed = packed  # both completions of a pair in one row
        self.reference = reference  # "adapters" | "cached" | None (dpo only)
        self.lockstep_segments = False  # every process runs as many segments (set for sharded blocks)
        self.head_loss = HeadLogps(model.head, chunk_size)  # the head's unit under fsdp (parallel.wrap)

    def logps(self, batch):
        return sequence_logps(self.model, batch, self.chunk_size, self.segment_len, self.batch_tokens,
                              self.lockstep_segments, self.head_loss, self.packed)

    def forward(self, context, context_resets, completions, scored, pair_weight, ref=None):
        from ..data.pairs import PairBatch
        batch = PairBatch(context, context_resets, completions, scored, pair_weight)
        if self.objective == "dpo" and self.reference == "adapters":
            with torch.no_grad(), adapters_off(self.model):
                ref = self.logps(batch)[0]
        logp, count = self.logps(batch)
        losses, chosen, rejected = pair_losses(self.objective, logp, count, ref, self.beta, self.gamma)
        w = pair_weight.to(losses.dtype)
        stats = torch.stack([losses.detach(), chosen, rejected, (chosen > rejected).to(w.dtype),
                             (logp[0::2] > logp[1::2]).detach().to(w.dtype), torch.ones_like(w)])
        return (losses * w).sum(), (stats * w).sum(1)  # (not a matmul: autocast would make it bf16)


def as_inputs(batch, ref_table=None):
    """The forward's arguments for a PairBatch (with the cached reference rows when given)."""
    ref = None
    if ref_table is not None:
        ref = torch.from_numpy(ref_table[list(batch.example_ids)].reshape(-1)).to(batch.context.device)
    return batch.context, batch.context_resets, batch.completions, batch.scored, batch.pair_weight, ref


def accumulate(loss_module, batches, *, device, global_pairs: int, world_size: int = 1, wrapped=None,
               precision="fp32", ref_table=None):
    """Forward/backward every micro-batch; gradients end as d(sum of pair losses / global_pairs).
    Returns this process's summed STATS (float64 numpy)."""
    from . import parallel
    runner = wrapped if wrapped is not None else loss_module
    total = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        b = batch.to(device)
        with parallel.micro_batch(wrapped, i == len(batches) - 1):
            with autocast(device, precision):
                loss_sum, stats = runner(*as_inputs(b, ref_table))
            (loss_sum * (world_size / max(1, global_pairs))).backward()
        total += stats.double()
    return total.cpu().numpy()


def summarize(stats) -> dict:
    """Summed STATS -> the means users watch."""
    stats = dict(zip(STATS, (float(x) for x in stats)))
    n = max(1.0, stats.pop("pairs"))
    out = {k: v / n for k, v in stats.items()}
    out["margin"] = out["reward_chosen"] - out["reward_rejected"]
    return out


# -- the reference of a full fine-tuning DPO run -------------------------------------------------

def _pair_batches(model, examples, *, batch_tokens, device, packing):
    """Every pair of `examples` once, in order, as batches on `device`; the model in eval mode
    meanwhile (restored after)."""
    from ..data.pairs import PairLoader
    loader = PairLoader(examples.unweighted(), batch_tokens=batch_tokens, shuffle=False, packing=packing)
    was_training = model.training
    model.eval()
    try:
        for rows in loader.plan(0):
            yield loader.collate(rows).to(device)
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_table(model, examples, *, batch_tokens, device, precision="fp32", chunk_size=None, segment_len=None,
                    packing=True):
    """[n, 2] float32 (chosen, rejected) summed log-probs of every pair under `model`."""
    table = np.zeros((len(examples), 2), np.float32)
    for b in _pair_batches(model, examples, batch_tokens=batch_tokens, device=device, packing=packing):
        with autocast(device, precision):
            logp, _ = sequence_logps(model, b, chunk_size, segment_len, batch_tokens, packed=packing)
        table[list(b.example_ids)] = logp.float().view(-1, 2).cpu().numpy()
    return table


def cached_reference(model, examples, data_fingerprint: str, *, cache_dir, is_main=True, barrier=lambda: None, **kw):
    """reference_table, computed once and cached in `cache_dir` under the data's and the model's
    fingerprints and the settings that shape its batches (the main process computes it; the others
    wait, then read it). The batches the policy runs at step 1 are then those the reference ran,
    so DPO starts at exactly log 2."""
    from ..adapters.files import fingerprint
    from ..utils import atomic_write
    shaping = ":".join(str(kw.get(k)) for k in ("precision", "packing", "batch_tokens", "segment_len", "chunk_size"))
    key = hashlib.blake2b(f"{data_fingerprint}:{fingerprint(model.state_dict())}:{shaping}".encode(),
                          digest_size=12).hexdigest()
    path = os.path.join(cache_dir, f"reference-logps-{key}.npy")
    if is_main and not os.path.exists(path):
        table = reference_table(model, examples, **kw)
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, table)
    barrier()
    table = np.load(path, allow_pickle=False)
    if table.shape != (len(examples), 2):
        raise UserError(f"{path}: a cached reference of another shape ({table.shape}); delete the file")
    return table


@torch.no_grad()
def evaluate_pairs(model, examples, *, objective="dpo", beta=None, gamma=DEFAULT_SIMPO_GAMMA, batch_tokens=4096,
                   device="cpu", precision="fp32", reference: str | None = None, ref_table=None, segment_len=None,
                   chunk_size=None, packing=True) -> dict:
    """Held-out pairs: mean loss, rewards, margin, reward accuracy and preference accuracy
    (log pi(y_w) > log pi(y_l)). Without a reference (DPO), the loss and rewards are left out."""
    beta = DEFAULT_BETA.get(objective, 0.1) if beta is None else beta
    loss_module = PreferenceLoss(model, objective, beta, gamma, chunk_size, segment_len, batch_tokens, reference,
                                 packing)
    has_ref = objective != "dpo" or reference == "adapters" or ref_table is not None
    total = np.zeros(len(STATS))
    for b in _pair_batches(model, examples, batch_tokens=batch_tokens, device=device, packing=packing):
        with autocast(device, precision):
            if has_ref:
                stats = loss_module(*as_inputs(b, ref_table))[1]
            else:  # preference accuracy only
                logp, _ = loss_module.logps(b)
                ones = torch.ones(b.num_pairs, dtype=torch.float64, device=logp.device)
                stats = torch.stack([ones * 0, ones * 0, ones * 0, ones * 0,
                                     (logp[0::2] > logp[1::2]).double(), ones]) * b.pair_weight.double()
                stats = stats.sum(1)
        total += stats.double().cpu().numpy()
    out = summarize(total)
    out["pairs"] = len(examples)
    if not has_ref:
        out = {k: out[k] for k in ("preference_accuracy", "pairs")}
    return out


# -- the objective the training loop calls ------------------------------------------------------

class Preference:
    """A preference run's objective (train/objective.py): its loss module, loader, step, and evaluation."""

    def __init__(self, config, model, data, *, device, precision, d, data_fingerprint: str):
        from ..data.cache import default_cache_dir
        self.config, self.data, self.device, self.precision = config, data, device, precision
        kw = dict(batch_tokens=config.batch_tokens, device=device, precision=precision,
                  chunk_size=config.loss_chunk_size, segment_len=config.segment_len, packing=config.packing)
        self.reference, self.ref_train, self.ref_eval = None, None, None
        if config.objective == "dpo" and config.method != "full":
            self.reference = "adapters"
        elif config.objective == "dpo":  # before any checkpoint is restored: the starting model
            from . import distributed
            self.reference = "cached"
            barrier = functools.partial(distributed.barrier, d)
            self.ref_train = cached_reference(model, data.train, data_fingerprint, cache_dir=default_cache_dir(),
                                              is_main=d.is_main, barrier=barrier, **kw)
            if data.eval is not None and len(data.eval):
                from .rundir import data_fingerprint as fp
                self.ref_eval = cached_reference(model, data.eval, fp(data.eval), cache_dir=default_cache_dir(),
                                                 is_main=d.is_main, barrier=barrier, **kw)

    def loss_module(self, model):
        c = self.config
        return PreferenceLoss(model, c.objective, c.beta, c.simpo_gamma, c.loss_chunk_size, c.segment_len,
                              c.batch_tokens, self.reference, c.packing)

    def loader(self, **kw):
        from ..data.pairs import PairLoader
        return PairLoader(self.data.train, packing=self.config.packing, **kw)

    def step(self, loss_module, batches, planned, count: int, *, d, wrapped):
        """One step's forward/backward: (mean pair loss, the other means users watch)."""
        from . import distributed
        pairs = sum(len(row) for _, _, rows in planned for row in rows)
        local = accumulate(loss_module, batches, device=self.device, global_pairs=pairs, world_size=d.world_size,
                           wrapped=wrapped, precision=self.precision, ref_table=self.ref_train)
        watched = summarize(distributed.all_sum(d, local.tolist()))
        return watched.pop("loss"), watched

    def evaluate(self, model) -> dict:
        c = self.config
        return evaluate_pairs(model, self.data.eval, objective=c.objective, beta=c.beta, gamma=c.simpo_gamma,
                              batch_tokens=c.batch_tokens, device=self.device, precision=self.precision,
                              reference=self.reference, ref_table=self.ref_eval, segment_len=c.segment_len,
                              chunk_size=c.loss_chunk_size, packing=c.packing)
