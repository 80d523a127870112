"""Text generation: prompt prefill in one batched forward, then one recurrent step per token.

Every function takes a model (decoded on its own weights) or a `Decoder` (infer/decoder.py: its own
weight layout, faster on the CPU). `generate` samples one continuation (greedy with temperature 0; top-k, then top-p, then a
seeded draw otherwise), stopping at a stop string, the end-of-text token or a length limit.
`generate_iter` is the same as a generator of text pieces (`continue_iter` after a prefill done
elsewhere). `greedy_batch` / `complete_batch` / `greedy_complete` decode many prompts greedily as
a batch (exact-match evaluation, `generate --prompts`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..model.rwkv7 import RWKV7State
from . import GREEDY_BELOW
from .decoder import as_decoder

PREFILL_CHUNK = 4096  # prompt tokens per forward: bounds activation memory for long prompts


@dataclass
class Generation:
    text: str            # the continuation, without the stop string
    tokens: list[int]    # generated ids (those spelling a stop string included; the end-of-text token not)
    finish_reason: str   # "stop" (a stop string), "eos" (token 0) or "length" (max_new_tokens)
    prompt_tokens: int


# -- sampling ---------------------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B,V] with everything outside the top-k, then outside the top-p nucleus, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p
    (always at least one token).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token [B] from logits [B,V]; temperature 0 (or below GREEDY_BELOW) is greedy (argmax)."""
    logits = logits.float()
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_p, top_k, stop):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if isinstance(stop, str):
        raise TypeError("stop must be a sequence of strings, e.g. ('\\n\\n',), not a string")
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")


# -- stop strings -----------------------------------------------------------------------------------

class _Continuation:
    """The text of generated tokens so far, cut at the first stop string.

    Tokens are decoded with the stream decoder (never half a UTF-8 character); `ready()` hands
    out text that cannot be the start of a stop string, so a stream never shows part of one.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.decoder = tokenizer.stream()
        self.stop = tuple(stop)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _append(self, piece: str) -> bool:
        start = len(self.text)
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def add(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared."""
        return self._append(self.decoder.push(token))

    def finish(self) -> None:
        if not self.stopped:
            self._append(self.decoder.flush())

    def ready(self, final: bool = False) -> str:
        end = len(self.text)
        if not final and not self.stopped:  # hold back a tail that may grow into a stop string
            end -= max((n for s in self.stop for n in range(min(len(s) - 1, end), 0, -1)
                        if self.text.endswith(s[:n])), default=0)
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece


# -- model calls ------------------------------------------------------------------------------------

@torch.inference_mode()
def prefill(model, ids: Sequence[int] | torch.Tensor, state: RWKV7State | None = None,
            segment_len: int = PREFILL_CHUNK):
    """Run prompts through the model: ids [T] or [B,T] -> (last logits [B,V], state), `segment_len`
    tokens at a time (memory bounded whatever the prompt's length)."""
    decoder = as_decoder(model)
    tokens = torch.as_tensor(ids, dtype=torch.long, device=decoder.device)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    return decoder(tokens, state=state, full_output=False, segment_len=segment_len)


def _prompt_ids(tokenizer, prompt, state) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        if state is not None:
            raise ValueError("an empty prompt needs no state: give at least one token to continue from")
        ids = [tokenizer.eos_id]  # an empty context is the end-of-text token, as in training
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} out of range [0, {tokenizer.vocab_size})")
    return ids


# -- one sequence -----------------------------------------------------------------------------------

@torch.inference_mode()
def generate_iter(model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 256,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                  stop: Sequence[str] = ("\n\n",), stop_at_eos: bool = True,
                  state: RWKV7State | None = None) -> Iterator[str]:
    """Yields the continuation as text pieces (whole characters, never part of a stop string).

    The generator's return value (StopIteration.value) is the `Generation`.
    """
    _check_sampling(max_new_tokens, temperature, top_p, top_k, stop)
    ids = _prompt_ids(tokenizer, prompt, state)
    if max_new_tokens == 0:
        return Generation("", [], "length", len(ids))
    model = as_decoder(model)
    logits, state = prefill(model, ids, state)
    return (yield from continue_iter(model, tokenizer, logits, state, len(ids), max_new_tokens, temperature, top_p,
                                     top_k, seed, stop, stop_at_eos))


@torch.inference_mode()
def continue_iter(model, tokenizer, logits: torch.Tensor, state: RWKV7State, prompt_tokens: int,
                  max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int | None = None, stop: Sequence[str] = ("\n\n",), stop_at_eos: bool = True) -> Iterator[str]:
    """`generate_iter` after the prompt's prefill: from its last logits [1,V] and state (a chat keeps
    the state of a conversation and prefills each turn itself)."""
    _check_sampling(max_new_tokens, temperature, top_p, top_k, stop)
    out = Generation("", [], "length", prompt_tokens)
    if max_new_tokens == 0:
        return out
    decoder = as_decoder(model)
    generator = torch.Generator(device=logits.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    cont = _Continuation(tokenizer, stop)
    for step in range(max_new_tokens):
        token = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        if token == tokenizer.eos_id and stop_at_eos:
            out.finish_reason = "eos"
            break
        out.tokens.append(token)
        if cont.add(token):
            out.finish_reason = "stop"
            break
        if piece := cont.ready():
            yield piece
        if step + 1 < max_new_tokens:
            logits, state = decoder(torch.tensor([[token]], device=logits.device), state=state, full_output=False)
    cont.finish()
    if piece := cont.ready(final=True):
        yield piece
    out.text = cont.text
    return out


def generate(model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: Sequence[str] = ("\n\n",), stop_at_eos: bool = True, state: RWKV7State | None = None,
             stream: Callable[[str], object] | None = None) -> Generation:
    """Continue `prompt` (text or token ids). temperature 0 = greedy; otherwise top-k, then
    top-p, then a draw from a torch.Generator seeded by `seed`. `state` continues from an
    earlier call's prefix; `stream(piece)` receives the text as it is produced."""
    it = generate_iter(model, tokenizer, prompt, max_new_tokens, temperature, top_p, top_k, seed,
                       stop, stop_at_eos, state)
    while True:
        try:
            piece = next(it)
        except StopIteration as done:
            return done.value
        if stream is not None:
            stream(piece)


# -- many prompts, greedy ---------------------------------------------------------------------------

def _cat_states(states: list[RWKV7State]) -> RWKV7State:
    return RWKV7State(*(torch.cat([getattr(s, f) for s in states], dim=1) for f in ("att_shift", "wkv", "ffn_shift")))


@torch.inference_mode()
def greedy_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 accept: Callable[[int, int], bool], segment_len: int = PREFILL_CHUNK) -> None:
    """Greedy decoding of many token-id prompts as one batch.

    Each new token t of prompt p is handed to `accept(p, t)`, which returns False once prompt p
    is finished. Prompts of equal length share a prefill forward; then every unfinished row
    advances by one recurrent step per token, and finished rows leave the batch.
    """
    if not prompts or max_new_tokens == 0:
        return
    model = as_decoder(model)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    rows, logits, states = [], [], []
    for group in by_length.values():
        lg, st = prefill(model, [list(prompts[i]) for i in group], segment_len=segment_len)
        rows += group
        logits.append(lg)
        states.append(st)
    logits, state = torch.cat(logits), _cat_states(states)
    active = torch.tensor(rows, device=logits.device)  # batch row -> prompt index

    for step in range(max_new_tokens):
        tokens = logits.float().argmax(dim=-1)
        keep = [row for row, (p, t) in enumerate(zip(active.tolist(), tokens.tolist())) if accept(p, t)]
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(active):
            keep = torch.tensor(keep, device=logits.device)
            active, tokens, state = active[keep], tokens[keep], state.select(keep)
        logits, state = model(tokens.unsqueeze(1), state=state, full_output=False)


def complete_batch(model, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 256,
                   stop: Sequence[str] = ("\n\n",), stop_at_eos: bool = True) -> list[Generation]:
    """Greedy continuations of many prompts (texts or token ids), decoded together as one batch
    (`greedy_batch`). Same results as `generate` with temperature 0 on each prompt."""
    _check_sampling(max_new_tokens, 0.0, 1.0, 0, stop)
    all_ids = [_prompt_ids(tokenizer, p, None) for p in _encode_all(tokenizer, prompts)]
    conts = [_Continuation(tokenizer, stop) for _ in all_ids]
    outs = [Generation("", [], "length", len(ids)) for ids in all_ids]

    def accept(p: int, t: int) -> bool:
        if t == tokenizer.eos_id and stop_at_eos:
            outs[p].finish_reason = "eos"
            return False
        outs[p].tokens.append(t)
        if conts[p].add(t):
            outs[p].finish_reason = "stop"
            return False
        return True

    greedy_batch(model, all_ids, max_new_tokens, accept)
    for c, out in zip(conts, outs):
        c.finish()
        out.text = c.text
    return outs


def greedy_complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256,
                    stop: Sequence[str] = ("\n\n",), stop_at_eos: bool = True) -> list[str]:
    """The texts of `complete_batch`."""
    return [g.text for g in complete_batch(model, tokenizer, prompts, max_new_tokens, stop, stop_at_eos)]


def _encode_all(tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of many prompts: texts encoded (one parallel call where the tokenizer offers it),
    token ids as they are."""
    prompts = list(prompts)
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, texts))
    return [next(encoded) if isinstance(p, str) else [int(i) for i in p] for p in prompts]


__all__ = ["Generation", "complete_batch", "continue_iter", "filter_logits", "generate", "generate_iter", "greedy_batch",
           "greedy_complete", "prefill", "sample_next"]
