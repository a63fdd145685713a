"""Token sampling and incremental detokenisation with stop strings, for the engine's decode steps.

``sample_token`` picks the next token from one row's logits (greedy at temperature 0, otherwise
temperature + nucleus sampling with the request's own generator). ``TextStream`` turns the
generated ids into text deltas: it holds back an incomplete UTF-8 character and any tail that
could still become a stop string, so a streamed client never sees text that is later withdrawn.
"""

from __future__ import annotations

import torch


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Next token id from ``logits (V,)`` float32."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Generated ids -> text, cut at the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to hand out."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))
        return self._take(safe - self._stop_prefix_len(self.text[:safe]))

    def finish(self) -> str:
        """Everything not yet handed out, at the end of the generation."""
        return self._take(len(self.text))

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
