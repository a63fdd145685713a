"""A generation in progress: its KV cache range, its sampling seed and its text so far.

The engine's worker makes a ``Sequence`` when a generate job is admitted (``Sequence.begin``),
then, every step, describes its sampling for the device (``sampling``: None when greedy), and
appends the token picked there (``push``), which emits the text that is safe to hand out and
says whether the generation is done; ``finish`` emits the rest and the ``Finished`` event.
When steps overlap (``Settings.overlap_steps``) a sequence is planned one token ahead of the
host: ``ahead`` counts its token picked on the device but not yet pushed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from talora.server.engine.generation import SamplingRow, TextStream
from talora.server.jobs import Finished, Job, Token


@dataclass(eq=False)
class Sequence:
    """One generate job while it runs."""

    job: Job
    slot: int
    start: int  # first position of its KV cache range
    tokens: list[int]  # prompt + generated; all but the last are in the cache
    stream: TextStream
    seed: int  # the request's seed, else a random one (< 2**64)
    read: int = -1  # its sample read in the last step it was launched in
    last_step: object = None  # that step (the runner's record of it)
    done: bool = False  # retired: what the device still computes for it is dropped

    @classmethod
    def begin(cls, job: Job, slot: int, start: int, tokenizer) -> Sequence:
        """A new sequence for ``job``, its sampling seeded with the request's seed (else a random one)."""
        params = job.generation
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        return cls(job, slot, start, list(job.prompt_ids), TextStream(tokenizer, params.stop), seed)

    @property
    def generated(self) -> int:
        return len(self.stream.ids)

    def sampling(self, read: int, ahead: int = 0) -> SamplingRow | None:
        """This step's sampling of the next token, picked at sample read ``read`` with ``ahead``
        tokens picked but not pushed yet; None: greedy."""
        params = self.job.generation
        if params.temperature == 0:
            return None
        return SamplingRow(read, params.temperature, params.top_p, params.top_k, self.seed, self.generated + ahead)

    def push(self, token: int, eos_ids: set[int]) -> str | None:
        """Append ``token`` and emit the new safe text; the finish reason once done, else None."""
        if token in eos_ids and not self.job.generation.ignore_eos:
            return "stop"
        self.tokens.append(token)
        if delta := self.stream.push(token):
            self.job.emit(Token(delta))
        if self.stream.stopped:
            return "stop"
        return "length" if self.generated >= self.job.generation.max_new_tokens else None

    def finish(self, reason: str) -> None:
        """Emit the text held back so far and the ``Finished`` event."""
        if tail := self.stream.finish():
            self.job.emit(Token(tail))
        self.job.emit(Finished(self.stream.text, reason, len(self.job.prompt_ids), self.generated))
