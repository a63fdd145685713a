"""Running: one step of the worker, from admitted jobs to the events their requests get.

``Runner.step`` puts every active generation (one decode row each) and every admitted job
(a generation's prefill row, or a score job's label rows from ``talora.adapters.scoring``) into
one ``StepPlan``, runs it as one packed ``forward_cached`` through ``talora.adapters.decoding``
(label scores summed and next tokens picked on the device: greedy, or sampled by
``talora.server.generation.RowSampler``), then emits the scores, appends the tokens, and retires
finished sequences, giving back their KV cache ranges and slot pins. A step that fails fails
its own requests only; after ``max_failed_steps`` failures in a row the runner gives up
(``GiveUp``). Only the engine's worker thread calls it.
"""

from __future__ import annotations

import logging
import time

from talora.adapters.batching import Row, StepBuffers, StepPlan
from talora.adapters.decoding import StepOutputs, read_outputs, run_step
from talora.adapters.graphs import DecodeGraphs
from talora.adapters.talora_model import PrefixKV, TaloraModel
from talora.server.generation import BadLogits, RowSampler, SamplingRow
from talora.server.jobs import Failed, Job, Scored
from talora.server.kvpool import KVPool
from talora.server.metrics import Metrics
from talora.server.registry import AdapterVersion
from talora.server.scheduler import Admitted, release
from talora.server.sequences import Sequence
from talora.server.settings import Settings
from talora.server.slots import SlotTable

log = logging.getLogger("talora.server.engine")


class GiveUp(RuntimeError):
    """The worker stops: too many steps in a row failed."""


class Runner:
    """The device side of the worker: the model, its slot table, the KV pool and the active generations."""

    def __init__(self, model: TaloraModel, prefix: PrefixKV, slots: SlotTable, pool: KVPool, tokenizer,
                 eos_ids: set[int], settings: Settings, metrics: Metrics):
        self.model, self.prefix, self.slots, self.pool = model, prefix, slots, pool
        self.tokenizer, self.eos_ids, self.settings, self.metrics = tokenizer, eos_ids, settings, metrics
        self.buffers = StepBuffers.make(model.lm.device, settings.max_batch_tokens, settings.max_batch_size)
        self.graphs = (DecodeGraphs(model, prefix, slots.kv, pool.cache, pool.scratch)
                       if settings.cuda_graphs and DecodeGraphs.supported(model.lm.device) else None)
        self.active: list[Sequence] = []
        self.failed_steps = 0  # consecutive steps that raised

    def step(self, admitted: list[Admitted]) -> None:
        """Run one step of the active generations and ``admitted``; emits every event it produces."""
        start = time.perf_counter()
        plan, acquired, score_jobs = StepPlan(), [], []  # score_jobs: (admitted, first score group)
        generating = list(self.active)
        for seq in generating:
            plan.add_decode_row(seq.tokens, seq.start, seq.slot)
        try:
            for item in admitted:
                job = item.job
                slot = self.slots.acquire(job.adapter)
                acquired.append(job.adapter)
                if job.kind == "generate":
                    generating.append(Sequence.begin(job, slot, item.starts[0], self.tokenizer))
                    plan.add_row(Row(job.prompt_ids, 0, item.starts[0], slot, len(job.prompt_ids) - 1), sample=True)
                else:
                    score_jobs.append((item, job.label_plan().add_to(plan, slot, item.starts)))
            sampling = [row for i, seq in enumerate(generating) if (row := seq.sampling(i)) is not None]
            outputs = self._forward(plan, sampling)
        except Exception as exc:  # noqa: BLE001 - a failing batch fails its own requests only
            log.exception("batch step of %d rows failed", len(plan.rows))
            self._fail_step(admitted, acquired, Failed(500, f"the batch failed: {type(exc).__name__}: {exc}"))
            self._count_failed_step(exc)
            return
        self.failed_steps = 0
        self._record(plan.rows, admitted, time.perf_counter() - start)
        self._finish_scores(score_jobs, outputs)
        self._advance(generating, outputs)

    def _forward(self, plan: StepPlan, sampling: list[SamplingRow]) -> StepOutputs:
        """Run ``plan``; ``sampling``: the generations (by sample read) that sample with a temperature."""
        sampler = RowSampler(sampling, self.model.lm.device) if sampling else None
        picked = self.graphs.run(plan) if self.graphs is not None else None
        if picked is not None:  # a decode-only step, replayed from a CUDA graph
            return read_outputs(picked.new_zeros(0), picked, sampler)
        return run_step(self.model, self.buffers.prepare(plan), self.prefix, self.slots.kv, self.pool.cache, sampler)

    def _finish_scores(self, score_jobs: list[tuple[Admitted, int]], outputs: StepOutputs) -> None:
        for item, group in score_jobs:
            job = item.job
            job.emit(Scored(outputs.scores[group:group + len(job.label_ids)].tolist()))
            release(self.pool, job, item.starts)
            self.slots.release(job.adapter)

    def _advance(self, generating: list[Sequence], outputs: StepOutputs) -> None:
        """Append one token to every generation (sample read ``i`` is ``generating[i]``) and retire the done."""
        still, now = [], time.monotonic()
        for i, seq in enumerate(generating):
            finish: str | Failed | None
            try:
                finish = None if seq.job.cancelled else seq.push(_next_token(i, outputs), self.eos_ids)
            except Exception as exc:  # noqa: BLE001 - one sequence's failure is its own
                log.exception("generation of task %s failed", seq.job.adapter.task)
                self.metrics.job_failures.labels("sample").inc()
                finish = Failed(500, f"the generation failed: {type(exc).__name__}: {exc}")
            if seq.job.cancelled:
                self._retire(seq, None)
            elif finish is not None:
                self._retire(seq, finish)
            elif seq.job.deadline < now:
                self._retire(seq, Failed(504, f"timed out after {self.settings.request_timeout_s} s"))
            else:
                still.append(seq)
        self.active = still

    def _retire(self, seq: Sequence, outcome: str | Failed | None) -> None:
        self.pool.release(seq.start, seq.job.cache_tokens())
        self.slots.release(seq.job.adapter)
        if isinstance(outcome, Failed):
            seq.job.emit(outcome)
        elif outcome is not None:
            seq.finish(outcome)

    # ----- failure ---------------------------------------------------------------------------
    def recover(self, admitted: list[Admitted], exc: Exception) -> None:
        """A fault escaped ``step``: fail every job it held, then return the pool and the slot pins to a
        clean state (queued jobs hold no ranges and no pins, so after this every range is free and no
        slot pinned). Raises ``GiveUp`` after ``max_failed_steps`` consecutive failures."""
        failure = Failed(500, f"the batch failed: {type(exc).__name__}: {exc}")
        for job in [item.job for item in admitted] + [seq.job for seq in self.active]:
            self.fail_job(job, failure, "step")
        self.active = []
        self.pool.reset()
        self.slots.unpin_all()
        self._count_failed_step(exc)

    def fail_job(self, job: Job, failure: Failed, reason: str) -> None:
        self.metrics.job_failures.labels(reason).inc()
        job.emit(failure)

    def fail_active(self, failure: Failed, reason: str) -> None:
        for seq in self.active:
            self.fail_job(seq.job, failure, reason)
        self.active = []

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
        if self.failed_steps >= self.settings.max_failed_steps:
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
