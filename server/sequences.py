"""A generation in progress: its KV cache range, its sampler and its text so far.

The engine's worker makes a ``Sequence`` when a generate job is admitted (``Sequence.begin``),
then, every step, samples the next token from the row's log-probabilities (``sample``) and
appends it (``push``), which emits the text that is safe to hand out and says whether the
generation is done; ``finish`` emits the rest and the ``Finished`` event.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from talora.server.generation import TextStream, sample_token
from talora.server.jobs import Finished, Job, Token


@dataclass(eq=False)
class Sequence:
    """One generate job while it runs."""

    job: Job
    slot: int
    start: int  # first position of its KV cache range
    tokens: list[int]  # prompt + generated; all but the last are in the cache
    stream: TextStream
    generator: torch.Generator

    @classmethod
    def begin(cls, job: Job, slot: int, start: int, tokenizer) -> Sequence:
        """A new sequence for ``job``, its sampler seeded with the request's seed (else a random one)."""
        params = job.generation
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        return cls(job, slot, start, list(job.prompt_ids), TextStream(tokenizer, params.stop), generator)

    @property
    def generated(self) -> int:
        return len(self.stream.ids)

    def sample(self, logprobs: torch.Tensor) -> int:
        """The next token from this row's ``logprobs (V,)`` with the request's temperature and top_p."""
        params = self.job.generation
        return sample_token(logprobs, params.temperature, params.top_p, self.generator)

    def push(self, token: int, eos_ids: set[int]) -> str | None:
        """Append ``token`` and emit the new safe text; the finish reason once done, else None."""
        if token in eos_ids:
            return "stop"
        self.tokens.append(token)
        delta = self.stream.push(token)
        if delta:
            self.job.emit(Token(delta))
        if self.stream.stopped:
            return "stop"
        return "length" if self.generated >= self.job.generation.max_new_tokens else None

    def finish(self, reason: str) -> None:
        """Emit the text held back so far and the ``Finished`` event."""
        tail = self.stream.finish()
        if tail:
            self.job.emit(Token(tail))
        self.job.emit(Finished(self.stream.text, reason, len(self.job.prompt_ids), self.generated))
