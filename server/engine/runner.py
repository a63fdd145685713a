"""Running: one step of the worker, from admitted jobs to the events their requests get.

``Runner.step`` puts every active generation (one decode row each) and every admitted job
(a generation's prefill row, or a score job's label rows from ``talora.adapters.runtime.scoring``) into
one ``StepPlan`` and launches it as one packed ``forward_cached`` through
``talora.adapters.runtime.decoding`` (label scores summed and next tokens picked on the device: greedy,
or sampled by ``talora.server.engine.generation.RowSampler``). Reading a step emits the scores, appends
the tokens, and retires finished sequences, giving back their KV cache ranges and slot pins.

By default a step is read as soon as it is launched. With ``EngineConfig.overlap_steps`` the runner
launches step N+1 before reading step N, so the host's planning and reading overlap the
device's work (on a GPU; a CPU runs every op before returning): the decode rows of step N+1 take
their tokens from step N's picks on the device (``StepPlan.add_fed_decode_row``), a sequence whose
last token is in flight gets no row, and a sequence found finished when step N is read has one
row in step N+1 computed for nothing; its cache range and slot pin go back once step N+1 is read
(the row writes inside its range: it feeds a token before ``max_new_tokens`` was reached). The
outputs are the same token for token (``tests/server/test_overlap.py``).

A step that fails fails its own requests only; after ``max_failed_steps`` failures in a row the
runner gives up (``GiveUp``). Only the engine's worker thread calls it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from talora.adapters.model.talora_model import PrefixKV, TaloraModel
from talora.adapters.runtime.batching import Row, StepBuffers, StepPlan
from talora.adapters.runtime.decoding import StepOutputs, StepReads, launch_step
from talora.adapters.runtime.graphs import DecodeGraphs
from talora.server.adapter_registry import AdapterVersion
from talora.server.engine.generation import BadLogits, RowSampler, SamplingRow
from talora.server.engine.kvpool import KVPool
from talora.server.engine.scheduler import Admitted, release
from talora.server.engine.sequences import Sequence
from talora.server.engine.slots import SlotTable
from talora.server.jobs import Failed, Job, Scored
from talora.server.metrics import Metrics
from talora.server.settings import EngineConfig

log = logging.getLogger("talora.server.engine")


class GiveUp(RuntimeError):
    """The worker stops: too many steps in a row failed."""


@dataclass(eq=False)
class Launched:
    """A step sent to the device and not read yet."""

    reads: StepReads
    rows: list[Row]
    admitted: list[Admitted]
    generating: list[Sequence]  # sample read i is generating[i]
    score_jobs: list[tuple[Admitted, int]]  # (admitted, its first score group)
    started: float
    retiring: list[Sequence] = field(default_factory=list)  # retired while this step ran: released after it


class Runner:
    """The device side of the worker: the model, its slot table, the KV pool and the active generations."""

    def __init__(self, model: TaloraModel, prefix: PrefixKV, slots: SlotTable, pool: KVPool, tokenizer,
                 eos_ids: set[int], config: EngineConfig, metrics: Metrics):
        self.model, self.prefix, self.slots, self.pool = model, prefix, slots, pool
        self.tokenizer, self.eos_ids, self.config, self.metrics = tokenizer, eos_ids, config, metrics
        self.buffers = StepBuffers.make(model.lm.device, config.max_batch_tokens, config.max_batch_size)
        self.graphs = (DecodeGraphs(model, prefix, slots.kv, pool.cache, pool.scratch)
                       if config.cuda_graphs and DecodeGraphs.supported(model.lm.device) else None)
        self.active: list[Sequence] = []  # launched generations not known to be finished
        self.pending: Launched | None = None  # with overlap_steps: the step launched and not read yet
        self.reading: Launched | None = None  # the step being read (its jobs fail with it if reading raises)
        self.failed_steps = 0  # consecutive steps that raised

    def step(self, admitted: list[Admitted]) -> None:
        """Launch a step of the active generations and ``admitted``, then read the step launched before
        it (``overlap_steps``) or this one. Emits every event the read step produces."""
        previous, self.pending = self.pending, None
        acquired: list[AdapterVersion] = []
        try:
            launched = self._launch(admitted, previous, acquired)
        except Exception as exc:  # noqa: BLE001 - a failing batch fails its own requests only
            log.exception("batch step of %d jobs and %d generations failed", len(admitted), len(self.active))
            if previous is not None:
                self._read(previous, None)
            self._fail_step(admitted, acquired, Failed(500, f"the batch failed: {type(exc).__name__}: {exc}"))
            self._count_failed_step(exc)
            return
        self.failed_steps = 0
        if self.config.overlap_steps:
            self.pending = launched
        if previous is not None:
            self._read(previous, launched)
        if launched is not None and not self.config.overlap_steps:
            self._read(launched, None)

    def flush(self) -> None:
        """Read the step in flight, if any (nothing new to launch)."""
        previous, self.pending = self.pending, None
        if previous is not None:
            self._read(previous, None)

    def _launch(self, admitted: list[Admitted], previous: Launched | None,
                acquired: list[AdapterVersion]) -> Launched | None:
        """Plan and launch one step; None when it has no rows (every generation's last token is in flight)."""
        start = time.perf_counter()
        plan, score_jobs, new = StepPlan(), [], []
        ahead = int(previous is not None)  # every active generation has one token in ``previous``
        # with a token in flight, a generation one token short of max_new_tokens is done after it
        generating = [seq for seq in self.active if not ahead or seq.generated + 1 < seq.job.generation.max_new_tokens]
        for seq in generating:
            if ahead:
                plan.add_fed_decode_row(len(seq.tokens), seq.start, seq.slot, seq.read)
            else:
                plan.add_decode_row(seq.tokens, seq.start, seq.slot)
        # the step's resident tasks are pinned first: placing its other tasks must not evict one of them
        slots = [0] * len(admitted)
        for i in sorted(range(len(admitted)), key=lambda i: self.slots.slot_of(admitted[i].job.adapter.key) is None):
            slots[i] = self.slots.acquire(admitted[i].job.adapter)
            acquired.append(admitted[i].job.adapter)
        for item, slot in zip(admitted, slots):
            job = item.job
            if job.kind == "generate":
                new.append(Sequence.begin(job, slot, item.starts[0], self.tokenizer))
                plan.add_row(Row(job.prompt_ids, 0, item.starts[0], slot, len(job.prompt_ids) - 1), sample=True)
            else:
                score_jobs.append((item, job.label_plan().add_to(plan, slot, item.starts)))
        if not plan.rows:
            return None
        sampling = [row for i, seq in enumerate(generating) if (row := seq.sampling(i, ahead)) is not None]
        sampling += [row for i, seq in enumerate(new, len(generating)) if (row := seq.sampling(i)) is not None]
        generating += new
        reads = self._forward(plan, sampling, previous.reads.tokens if previous is not None else None)
        launched = Launched(reads, plan.rows, admitted, generating, score_jobs, start)
        for i, seq in enumerate(generating):
            seq.read, seq.last_step = i, launched
        self.active += new
        return launched

    def _forward(self, plan: StepPlan, sampling: list[SamplingRow], previous: torch.Tensor | None) -> StepReads:
        """Launch ``plan``; ``sampling``: the generations (by sample read) that sample with a temperature;
        ``previous``: the step before's picks on the device (for fed decode rows)."""
        sampler = RowSampler(sampling, self.model.lm.device) if sampling else None
        picked = self.graphs.run(plan, previous) if self.graphs is not None else None
        if picked is not None:  # a decode-only step, replayed from a CUDA graph
            return StepReads(picked.new_zeros(0), picked, sampler)
        return launch_step(self.model, self.buffers.prepare(plan), self.prefix, self.slots.kv, self.pool.cache,
                           sampler, previous)

    def _read(self, step: Launched, later: Launched | None) -> None:
        """Wait for ``step``'s reads and emit what they say; ``later``: the step launched after it."""
        self.reading = step
        outputs = step.reads.result()
        self._record(step.rows, step.admitted, time.perf_counter() - step.started)
        self._finish_scores(step.score_jobs, outputs)
        self._advance(step.generating, outputs, later)
        for seq in step.retiring:
            self._release(seq)
        self.reading = None

    def _finish_scores(self, score_jobs: list[tuple[Admitted, int]], outputs: StepOutputs) -> None:
        for item, group in score_jobs:  # resources go back before the answer, so a caller that has it sees them free
            job = item.job
            scores = outputs.scores[group:group + len(job.label_ids)].tolist()
            release(self.pool, job, item.starts)
            self.slots.release(job.adapter)
            job.emit(Scored(scores))

    def _advance(self, generating: list[Sequence], outputs: StepOutputs, later: Launched | None) -> None:
        """Append one token to every generation (sample read ``i`` is ``generating[i]``) and retire the done."""
        now = time.monotonic()
        for i, seq in enumerate(generating):
            if seq.done:  # retired while this step ran: its row was computed for nothing
                continue
            finish: str | Failed | None
            try:
                finish = None if seq.job.cancelled else seq.push(_next_token(i, outputs), self.eos_ids)
            except Exception as exc:  # noqa: BLE001 - one sequence's failure is its own
                log.exception("generation of task %s failed", seq.job.adapter.task)
                self.metrics.job_failures.labels("sample").inc()
                finish = Failed(500, f"the generation failed: {type(exc).__name__}: {exc}")
            if seq.job.cancelled:
                self._retire(seq, None, later)
            elif finish is not None:
                self._retire(seq, finish, later)
            elif seq.job.deadline < now:
                self._retire(seq, Failed(504, f"timed out after {self.config.request_timeout_s} s"), later)
        self.active = [seq for seq in self.active if not seq.done]

    def _retire(self, seq: Sequence, outcome: str | Failed | None, later: Launched | None = None) -> None:
        """Give back the range and pin (now, or after ``later`` when it has a row for ``seq``), then emit
        ``outcome``: a caller holding the answer finds the resources already free."""
        seq.done = True
        if later is not None and seq.last_step is later:
            later.retiring.append(seq)
        else:
            self._release(seq)
        if isinstance(outcome, Failed):
            seq.job.emit(outcome)
        elif outcome is not None:
            seq.finish(outcome)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.start, seq.job.cache_tokens())
        self.slots.release(seq.job.adapter)

    # ----- failure ---------------------------------------------------------------------------
    def recover(self, admitted: list[Admitted], exc: Exception) -> None:
        """A fault escaped ``step``: fail every job it held, then return the pool and the slot pins to a
        clean state (queued jobs hold no ranges and no pins, so after this every range is free and no
        slot pinned). Raises ``GiveUp`` after ``max_failed_steps`` consecutive failures."""
        failure = Failed(500, f"the batch failed: {type(exc).__name__}: {exc}")
        for job in self._held([item.job for item in admitted]):
            self.fail_job(job, failure, "step")
        self.active, self.pending, self.reading = [], None, None
        self.pool.reset()
        self.slots.unpin_all()
        self._count_failed_step(exc)

    def fail_job(self, job: Job, failure: Failed, reason: str) -> None:
        self.metrics.job_failures.labels(reason).inc()
        job.emit(failure)

    def fail_active(self, failure: Failed, reason: str) -> None:
        """Fail every generation and every score job of a step not read yet (the worker stops)."""
        for job in self._held([]):
            self.fail_job(job, failure, reason)
        self.active, self.pending, self.reading = [], None, None

    def _held(self, jobs: list[Job]) -> list[Job]:
        """``jobs``, the active generations' and the unread steps' score jobs, each once."""
        unread = [step for step in (self.reading, self.pending) if step is not None]
        held = jobs + [seq.job for seq in self.active] + [item.job for step in unread for item, _ in step.score_jobs]
        return list({id(job): job for job in held}.values())

    def _fail_step(self, admitted: list[Admitted], acquired: list[AdapterVersion], failure: Failed) -> None:
        for adapter in acquired:
            self.slots.release(adapter)
        for item in admitted:
            release(self.pool, item.job, item.starts)
            self.fail_job(item.job, failure, "step")
        for seq in self.active:
            self._retire(seq, None)
            self.fail_job(seq.job, failure, "step")
        self.active = []

    def _count_failed_step(self, exc: Exception) -> None:
        self.metrics.batch_failures.inc()
        self.failed_steps += 1
        if self.failed_steps >= self.config.max_failed_steps:
            raise GiveUp(f"{self.failed_steps} batch steps in a row failed; the last: {exc!r}") from exc

    def _record(self, rows: list[Row], admitted: list[Admitted], elapsed: float) -> None:
        m = self.metrics
        decode = sum(1 for r in rows if r.past > 0)
        prefill = sum(len(r.tokens) for r in rows if r.past == 0)
        m.batch_rows.observe(len(rows))
        m.batch_tasks.observe(len({r.slot for r in rows}))
        m.tokens.labels("prefill").inc(prefill)
        m.tokens.labels("decode").inc(decode)
        m.tokens_per_second.set((prefill + decode) / max(elapsed, 1e-9))
        for _ in admitted:
            m.prefill_seconds.observe(elapsed)


def _next_token(read: int, outputs: StepOutputs) -> int:
    """The token picked on the device at sample read ``read``, unless its logits were unusable."""
    if not outputs.usable[read]:
        raise BadLogits("the model produced NaN or non-finite logits")
    return outputs.next_tokens[read]
