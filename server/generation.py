"""Token sampling and incremental detokenisation with stop strings, for the engine's decode steps.

``sample_token`` picks the next token from one row's logits (greedy at temperature 0, otherwise
temperature + nucleus sampling with the request's own generator). ``TextStream`` turns the
generated ids into text deltas: it holds back an incomplete UTF-8 character and any tail that
could still become a stop string, so a streamed client never sees text that is later withdrawn.
"""

from __future__ import annotations

import torch


class BadLogits(ValueError):
    """A row of logits holds NaN or no finite value: the model's output, not the request, is broken."""


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Next token id from ``logits (V,)`` (any float dtype), for any ``temperature >= 0`` and ``top_p`` in (0, 1].

    Sampling runs in float64 on logits shifted so that the best is 0: after dividing by even a
    denormal temperature the best token keeps weight ``exp(0) = 1``, so the distribution never
    becomes all zeros or NaN. The nucleus always keeps the most likely token, however small
    ``top_p`` is. Raises ``BadLogits`` when the row has a NaN or no finite entry.
    """
    best = torch.max(logits)
    if torch.isnan(logits).any() or not torch.isfinite(best):
        raise BadLogits("the model produced NaN or non-finite logits")
    if temperature == 0:
        return int(torch.argmax(logits))
    weights = torch.exp((logits.double() - float(best)) / temperature)
    if top_p < 1:
        sorted_weights, order = torch.sort(weights, descending=True)
        cumulative = torch.cumsum(sorted_weights, 0) / sorted_weights.sum()
        keep = cumulative - sorted_weights / sorted_weights.sum() < top_p
        keep[0] = True
        choice = torch.multinomial(sorted_weights * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(weights, 1, generator=generator))


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
