"""A chat with a model whose recurrent state carries the conversation from turn to turn.

Each turn feeds only what is new: the previous reply, the user's message and "Assistant:".
The reply is fed back as chat training data renders it (" " + cleaned reply + "\\n\\n", one
segment), not as the tokens sampled, so after any number of turns the state is the one the
whole conversation, rendered as training data, gives (tested against that).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..data.formats import THINK_OPEN, chat_prompt_segments, chat_segments, clean_text
from .decoder import as_decoder
from .generate import Generation, continue_iter, prefill


class ChatSession:
    """`reply(message)` -> the reply of `model` (a model or a `Decoder`); `system` starts the conversation, `think` opens every
    reply with "<think" (G1's think mode). `sampling`: the keyword arguments of `generate`
    (max_new_tokens, temperature, top_p, top_k, seed, stop, stop_at_eos)."""

    def __init__(self, model, tokenizer, system: str | None = None, think: bool = False, **sampling):
        self.model, self.tokenizer, self.think, self.sampling = as_decoder(model), tokenizer, think, sampling
        self.turns = [("system", clean_text(system))] if system else []  # [(role, cleaned text)]
        self.pending = [text for text, _ in chat_segments(self.turns)]  # text segments not fed yet
        self.state = None  # after every segment fed so far (None: the model's initial state)
        self.last: Generation | None = None

    def _feed(self, segments):
        """Logits and state after the segments, each tokenized on its own as in training data."""
        ids = [i for s in segments for i in self.tokenizer.encode(s)]
        return prefill(self.model, ids, self.state)

    @torch.inference_mode()
    def reply(self, message: str, stream: Callable[[str], object] | None = None) -> str:
        """The reply to `message` (its text as the conversation keeps it: "<think..." included in
        think mode, cleaned); `stream(piece)` gets the text as it is produced (the opener first)."""
        user = ("user", clean_text(message))
        logits, self.state = self._feed(self.pending + chat_prompt_segments([user]))  # up to "Assistant:"
        opener = THINK_OPEN if self.think else ""
        state = self.state
        if opener:
            logits, state = prefill(self.model, self.tokenizer.encode(" " + opener), state)
            if stream is not None:
                stream(opener)
        it = continue_iter(self.model, self.tokenizer, logits, state, 0, **self.sampling)
        while True:
            try:
                piece = next(it)
            except StopIteration as done:
                self.last = done.value
                break
            if stream is not None:
                stream(piece)
        text = clean_text(opener + self.last.text)
        self.turns += [user, ("assistant", text)]
        self.pending = [" " + text + "\n\n"]  # the reply as training data renders it, fed with the next turn
        return text
