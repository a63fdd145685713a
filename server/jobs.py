"""What a request becomes inside the engine: a ``Job``, and the events the engine sends back.

A predict request of K texts is K score jobs; a generate request is one generate job. Each job
pins the ``AdapterVersion`` it was admitted with and carries an ``emit`` callback the worker
thread calls with ``Scored``, ``Token``, ``Finished`` or ``Failed`` (the HTTP layer bridges it
to an asyncio queue). ``cancel()`` from any thread makes the worker drop the job at its next step.
``client`` names who sent it: the scheduler admits the jobs of different clients in turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from talora.adapters.runtime.scoring import LabelPlan, plan_labels
from talora.server.adapter_registry import AdapterVersion


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # 0: no limit
    ignore_eos: bool = False  # run to max_new_tokens through end-of-sequence tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens: must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k: must be >= 0 (0: no limit)")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must not be empty")


@dataclass(frozen=True)
class Scored:
    scores: list[float]  # log-likelihood of each label, in label order


@dataclass(frozen=True)
class Token:
    text: str  # newly decoded text (may be empty while a stop string or a character is incomplete)


@dataclass(frozen=True)
class Finished:
    text: str  # the whole generated text, stop string excluded
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int  # HTTP status the request should get (500 batch failure, 504 timeout, 503 shutting down)
    message: str


Event = Scored | Token | Finished | Failed


@dataclass(eq=False)
class Job:
    """One text to score or continue with one pinned adapter version."""

    kind: str  # "score" or "generate"
    adapter: AdapterVersion
    prompt_ids: list[int]
    emit: Callable[[Event], None]
    deadline: float  # time.monotonic() after which the job fails with 504
    params: GenerationParams | None = None
    client: str = "-"  # who sent it: the scheduler takes turns between clients (``bridge.client_of``)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    _label_plan: LabelPlan | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("score", "generate"):
            raise ValueError(f"kind: {self.kind!r} is not 'score' or 'generate'")
        if not self.prompt_ids:
            raise ValueError("prompt_ids: a job needs at least one token")
        if self.kind == "generate" and self.params is None:
            raise ValueError("params: a generate job needs GenerationParams")

    @property
    def generation(self) -> GenerationParams:
        """The sampling parameters of a generate job."""
        if self.params is None:
            raise ValueError(f"params: a {self.kind} job has no GenerationParams")
        return self.params

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def label_ids(self) -> tuple[tuple[int, ...], ...]:
        return self.adapter.label_ids

    def label_plan(self) -> LabelPlan:
        """The rows and terms that score this job's labels (``talora.adapters.runtime.scoring``), planned once."""
        if self._label_plan is None:
            self._label_plan = plan_labels(self.prompt_ids, self.label_ids)
        return self._label_plan

    def row_lengths(self) -> list[int]:
        """New tokens of each row this job runs in its first step."""
        if self.kind == "generate":
            return [len(self.prompt_ids)]
        return [len(row) for row in self.label_plan().rows]

    def cache_ranges(self) -> list[int]:
        """Length of each KV cache range this job holds while it runs (one per row)."""
        if self.kind == "generate":
            return [len(self.prompt_ids) + self.generation.max_new_tokens]
        return self.row_lengths()

    def cache_tokens(self) -> int:
        """KV cache positions this job holds while it runs."""
        return sum(self.cache_ranges())
