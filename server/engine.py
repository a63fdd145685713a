"""The serving engine: one frozen model, one worker thread, batches of any tasks.

``Engine.start()`` loads the frozen model and the bundle, computes the shared-prompt KV once,
loads the store's adapters (``registry``), and starts the worker thread (and the store watcher
when configured). The HTTP layer turns requests into ``Job``s and ``submit``s them; the worker
forms each step from the active generations (one decode row each) plus queued jobs in arrival
order, while they fit the row and token budgets, the task slots and the KV cache pool, and runs
it as one packed ``forward_cached`` (see ``batch.py``). Everything touching the device happens on
the worker thread; the event loop only enqueues and waits for events.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from talora.adapters.batching import Row, StepBuffers, StepPlan
from talora.adapters.bundle import model_from_bundle
from talora.adapters.config import ModelConfig
from talora.adapters.decoding import StepOutputs, run_step
from talora.adapters.loading import LoadedModel, load_model
from talora.adapters.prompting import encode_prompt
from talora.server.generation import BadLogits
from talora.server.jobs import Failed, Job, Scored
from talora.server.kvpool import KVPool
from talora.server.metrics import Metrics
from talora.server.registry import AdapterRegistry, AdapterVersion
from talora.server.sequences import Sequence
from talora.server.settings import Settings
from talora.server.slots import SlotTable

log = logging.getLogger(__name__)


class BundleMissing(RuntimeError):
    """No bundle was given and the demo bundle has not been built."""


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests."""


class ShuttingDown(RuntimeError):
    """The engine is draining and takes no new work."""


class InputTooLong(ValueError):
    """An input does not fit the task's limit (``on_overflow=reject``) or the KV cache."""


class WorkerDead(RuntimeError):
    """The worker thread has stopped for good; the process is about to exit (or should be restarted)."""


class _GiveUp(RuntimeError):
    """The worker stops: too many steps in a row failed."""


def demo_bundle_dir() -> Path:
    spec = importlib.util.find_spec("talora.adapters")
    if spec is None or not spec.submodule_search_locations:
        raise BundleMissing("the talora.adapters package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "demo"


def resolve_bundle(settings: Settings) -> Path:
    if settings.bundle is not None:
        return settings.bundle
    folder = demo_bundle_dir()
    if not (folder / "talora.json").is_file():
        raise BundleMissing(f"the demo adapter bundle is not built yet ({folder} has no talora.json): produce it "
                            "with `talora-train demo`, or serve another bundle with `talora-serve --bundle PATH`")
    return folder


class Engine:
    """Owns the model, the slot table, the KV pool and the worker thread."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, loaded: LoadedModel | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        """``on_fatal`` is called (on the worker thread) when the worker cannot go on; ``talora-serve``
        passes one that ends the process with a non-zero status so that a supervisor restarts it."""
        self.settings = settings
        self.on_fatal = on_fatal
        self._failed_steps = 0  # consecutive steps that raised
        self.metrics = metrics or Metrics()
        self._loaded = loaded
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._active: list[Sequence] = []
        self._warm: deque[AdapterVersion] = deque()
        self._stopping = self._abort = False
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self.resident: frozenset[tuple[str, int]] = frozenset()
        self.ready = False

    # ----- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load everything and start the worker; blocks until ready (seconds)."""
        s = self.settings
        bundle = resolve_bundle(s)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = self._loaded or load_model(s.model, s.dtype, device)
        self.tokenizer: Any = loaded.tokenizer
        self.model, bundle_meta, _ = model_from_bundle(loaded.model, bundle, loaded.fingerprint, tasks=[])
        self.model.eval()
        mc: ModelConfig = loaded.model.config
        eos = mc.eos_token_id if isinstance(mc.eos_token_id, list) else [mc.eos_token_id]
        tokenizer_eos: int | None = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = {t for t in [*eos, tokenizer_eos] if t is not None}
        with torch.no_grad():
            self.prefix = self.model.shared_kv()
        self.slots = SlotTable(self.model, self.prefix, s.num_slots, self.metrics)
        self.pool = KVPool(mc.num_layers, s.kv_cache_tokens, mc.num_kv_heads, mc.head_dim, loaded.model.dtype,
                           loaded.model.device)
        self.registry = AdapterRegistry(bundle_meta, s.store or bundle, self.tokenizer, self.metrics)
        self._buffers = StepBuffers.make(device, s.max_batch_tokens, s.max_batch_size)
        loaded_tasks = self._load_adapters(bundle, device)
        for task in loaded_tasks[: s.num_slots]:
            self.warm(self.registry.get(task))
        self._spawn(self._run, "talora-engine")
        if s.watch_interval_s > 0:
            self._spawn(self._watch, "talora-store-watcher")
        self.ready = True

    def _load_adapters(self, bundle: Path, device: str) -> list[str]:
        """The bundle's tasks, then the store's: a store task adds a task or replaces the bundle's of that name."""
        from_bundle = self.registry.load_all(bundle_dir=bundle) if self.registry.store != bundle.resolve() else []
        from_store = self.registry.load_all()
        tasks = sorted(self.registry.snapshot())
        replaced = sorted(set(from_bundle) & set(from_store))
        log.info("serving %d task adapters on %s: %d from the bundle %s, %d from the store %s (replacing %s): %s",
                 len(tasks), device, len(from_bundle), bundle, len(from_store), self.registry.store,
                 ", ".join(replaced) or "none", ", ".join(tasks) or "(none)")
        if not tasks:
            log.warning("no task adapter loaded: /ready answers 503 until one is (PUT /v1/adapters/{task}, or "
                        "files in the store with --watch-interval-s)")
        return tasks

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued and running work (up to ``timeout`` s, then fail it with 503) and stop."""
        with self._cv:
            self._stopping = True
            self.ready = False
            self._cv.notify_all()
        self._halt.set()
        if self._threads:
            self._threads[0].join(timeout)
        with self._cv:
            self._abort = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()

    def alive(self) -> bool:
        return bool(self._threads) and self._threads[0].is_alive()

    @property
    def dead(self) -> bool:
        """The worker was started and has stopped without being asked to."""
        return bool(self._threads) and not self._stopping and not self._threads[0].is_alive()

    # ----- called from the HTTP layer --------------------------------------------------------
    def encode(self, adapter: AdapterVersion, text: str, question: str | None = None) -> tuple[list[int], bool]:
        """Prompt ids of ``text`` with the task's template; applies ``on_overflow``."""
        limit = adapter.meta.max_input_tokens
        if self.settings.on_overflow == "reject":
            for name, value in (("text", text), ("question", question)):
                count = len(self.tokenizer(value or "", add_special_tokens=False)["input_ids"])
                if count > limit:
                    raise InputTooLong(f"{name}: {count} tokens is over task {adapter.task!r}'s limit of {limit}")
        ids, truncated = encode_prompt(self.tokenizer, adapter.meta.template, text, limit, question)
        if not ids:
            raise InputTooLong("text: the prompt encodes to no tokens")
        return ids, truncated

    def check_fits(self, job: Job) -> None:
        """Refuse a job that could never fit the KV cache pool."""
        if job.cache_tokens() > self.pool.capacity:
            raise InputTooLong(f"the request needs {job.cache_tokens()} KV cache positions; the server has "
                               f"{self.pool.capacity} (kv_cache_tokens)")

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` all together, or none (``QueueFull``, ``ShuttingDown``)."""
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._threads and not self.alive():
                raise WorkerDead("the engine's worker has stopped; the server must be restarted")
            if len(self._queue) + len(jobs) > self.settings.max_queue:
                raise QueueFull(f"the queue is full ({self.settings.max_queue} requests waiting)")
            self._queue.extend(jobs)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify_all()

    def warm(self, adapter: AdapterVersion) -> None:
        """Compute ``adapter``'s task KV into a slot soon (after a load), if a slot is free to take."""
        with self._cv:
            self._warm.append(adapter)
            self._cv.notify_all()

    # ----- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as exc:  # noqa: BLE001 - the worker cannot go on: fail everything, then say so
            log.critical("the engine's worker stops: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._fail_all(Failed(503, "the engine's worker stopped; the server is restarting"), reason="worker")
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self._fail_all(Failed(503, "the server shut down before this request ran"), reason="shutdown")

    def _iterate(self) -> bool:
        """One pass of the worker: wait for work, warm slots, run one step. False: stop."""
        with self._cv:
            while not (self._queue or self._active or self._warm or self._stopping):
                self._cv.wait()
            if self._abort or (self._stopping and not self._queue and not self._active):
                return False
            warm, admitted = list(self._warm), self._admit()
            self._warm.clear()
            self.metrics.queue_depth.set(len(self._queue))
        try:
            self._warm_slots(warm)
            if admitted or self._active:
                self._step(admitted)
            elif self._queue:
                with self._cv:
                    self._cv.wait(0.01)
        except _GiveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - fail this step's requests; the worker carries on
            log.exception("worker step failed")
            self._recover(admitted, exc)
        return True

    def _recover(self, admitted, exc: Exception) -> None:
        """Fail every job the broken step held, then return the pool and the slot pins to a clean state.

        Queued jobs hold no cache ranges and no pins, so after failing the admitted and active jobs
        every range is free and no slot is pinned. Gives up (raises) after
        ``max_failed_steps`` consecutive failures: a device in that state will not recover.
        """
        failure = Failed(500, f"the batch failed: {type(exc).__name__}: {exc}")
        for job, _ in admitted:
            self._fail_job(job, failure, "step")
        for seq in self._active:
            self._fail_job(seq.job, failure, "step")
        self._active = []
        self.pool.reset()
        self.slots.unpin_all()
        self._publish_resident()
        self._count_failed_step(exc)

    def _count_failed_step(self, exc: Exception) -> None:
        self.metrics.batch_failures.inc()
        self._failed_steps += 1
        if self._failed_steps >= self.settings.max_failed_steps:
            raise _GiveUp(f"{self._failed_steps} batch steps in a row failed; the last: {exc!r}") from exc

    def _fail_job(self, job: Job, failure: Failed, reason: str) -> None:
        self.metrics.job_failures.labels(reason).inc()
        job.emit(failure)

    def _admit(self) -> list[tuple[Job, list[int]]]:
        """Pop the queued jobs that fit this step: (job, each of its rows' cache start)."""
        s, now = self.settings, time.monotonic()
        rows_left, tokens_left = s.max_batch_size - len(self._active), s.max_batch_tokens - len(self._active)
        keys = {seq.job.adapter.key for seq in self._active}
        admitted: list[tuple[Job, list[int]]] = []
        while self._queue:
            job = self._queue[0]
            if job.cancelled or job.deadline < now:
                self._queue.popleft()
                if not job.cancelled:
                    job.emit(Failed(504, f"timed out after {s.request_timeout_s} s in the queue"))
                continue
            try:
                lengths = job.row_lengths()
            except Exception as exc:  # noqa: BLE001 - a job that cannot be planned fails alone
                self._queue.popleft()
                self._fail_job(job, Failed(500, f"the request could not be planned: {exc!r}"), "admit")
                continue
            n_tokens = sum(lengths)
            alone = not admitted and not self._active  # an oversized job still runs, by itself
            if not alone and (len(lengths) > rows_left or n_tokens > tokens_left):
                break
            if job.adapter.key not in keys and not self.slots.can_place(keys | {job.adapter.key}):
                break
            starts = self._allocate(job)
            if starts is None:
                break
            self._queue.popleft()
            admitted.append((job, starts))
            keys.add(job.adapter.key)
            rows_left, tokens_left = rows_left - len(lengths), tokens_left - n_tokens
            self.metrics.queue_seconds.observe(now - job.enqueued_at)
        return admitted

    def _allocate(self, job: Job) -> list[int] | None:
        lengths = job.cache_ranges()
        starts: list[int] = []
        for length in lengths:
            start = self.pool.allocate(length)
            if start is None:
                for done, n in zip(starts, lengths):
                    self.pool.release(done, n)
                return None
            starts.append(start)
        return starts

    def _warm_slots(self, adapters: list[AdapterVersion]) -> None:
        current = self.registry.current_keys()
        for adapter in adapters:
            if adapter.key in current and self.slots.slot_of(adapter.key) is None \
                    and self.slots.can_place({adapter.key}):
                try:
                    self.slots.acquire(adapter)
                    self.slots.release(adapter)
                except Exception:  # noqa: BLE001 - a request for this task will retry and report it
                    log.exception("computing the task KV of %s failed", adapter.task)
        self._publish_resident()

    def _step(self, admitted) -> None:
        start = time.perf_counter()
        plan, acquired, score_jobs = StepPlan(), [], []  # score_jobs: (job, cache starts, first score group)
        generating = list(self._active)
        for seq in generating:
            plan.add_decode_row(seq.tokens, seq.start, seq.slot)
        try:
            for job, starts in admitted:
                slot = self.slots.acquire(job.adapter)
                acquired.append(job.adapter)
                if job.kind == "generate":
                    generating.append(Sequence.begin(job, slot, starts[0], self.tokenizer))
                    plan.add_row(Row(job.prompt_ids, 0, starts[0], slot, len(job.prompt_ids) - 1), sample=True)
                else:
                    score_jobs.append((job, starts, job.label_plan().add_to(plan, slot, starts)))
            sampled = [i for i, seq in enumerate(generating) if seq.job.generation.temperature > 0]
            outputs = self._forward(plan, sampled)
        except Exception as exc:  # noqa: BLE001 - a failing batch fails its own requests only
            log.exception("batch step of %d rows failed", len(plan.rows))
            self._fail_step(admitted, acquired, Failed(500, f"the batch failed: {type(exc).__name__}: {exc}"))
            self._count_failed_step(exc)
            return
        self._failed_steps = 0
        self._record(plan.rows, admitted, time.perf_counter() - start)
        self._finish_scores(score_jobs, outputs)
        self._advance(generating, sampled, outputs)
        self.slots.drop_stale(self.registry.current_keys())
        self._publish_resident()

    def _forward(self, plan: StepPlan, sampled: list[int]) -> StepOutputs:
        """Run ``plan``; ``sampled``: the generations (by sample read) that need their whole distribution."""
        return run_step(self.model, self._buffers.prepare(plan), self.prefix, self.slots.kv, self.pool.cache, sampled)

    def _finish_scores(self, score_jobs, outputs: StepOutputs) -> None:
        for job, starts, group in score_jobs:
            job.emit(Scored(outputs.scores[group:group + len(job.label_ids)].tolist()))
            for st, n in zip(starts, job.cache_ranges()):
                self.pool.release(st, n)
            self.slots.release(job.adapter)

    def _advance(self, generating: list[Sequence], sampled: list[int], outputs: StepOutputs) -> None:
        """Pick one token for every generation (sample read ``i`` is ``generating[i]``) and retire the done."""
        still, now, whole = [], time.monotonic(), {i: k for k, i in enumerate(sampled)}
        for i, seq in enumerate(generating):
            finish: str | Failed | None
            try:
                finish = None if seq.job.cancelled else seq.push(self._next_token(seq, i, whole, outputs),
                                                                  self.eos_ids)
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
        self._active = still

    @staticmethod
    def _next_token(seq: Sequence, read: int, whole: dict[int, int], outputs: StepOutputs) -> int:
        """Greedy picks were made on the device; a sampled row draws from its distribution on the host."""
        if read in whole:
            assert outputs.logprobs is not None
            return seq.sample(outputs.logprobs[whole[read]])
        if not outputs.usable[read]:
            raise BadLogits("the model produced NaN or non-finite logits")
        return outputs.next_tokens[read]

    def _retire(self, seq: Sequence, outcome: str | Failed | None) -> None:
        self.pool.release(seq.start, seq.job.cache_tokens())
        self.slots.release(seq.job.adapter)
        if isinstance(outcome, Failed):
            seq.job.emit(outcome)
        elif outcome is not None:
            seq.finish(outcome)

    # ----- failure, metrics ---------------------------------------------------------------------
    def _fail_step(self, admitted, acquired: list[AdapterVersion], failure: Failed) -> None:
        for adapter in acquired:
            self.slots.release(adapter)
        for job, starts in admitted:
            for st, n in zip(starts, job.cache_ranges()):
                self.pool.release(st, n)
            self._fail_job(job, failure, "step")
        for seq in self._active:
            self._retire(seq, None)
            self._fail_job(seq.job, failure, "step")
        self._active = []
        self.slots.drop_stale(self.registry.current_keys())
        self._publish_resident()

    def _fail_all(self, failure: Failed, reason: str) -> None:
        with self._cv:
            queued, self._queue = list(self._queue), deque()
        for job in [*queued, *(seq.job for seq in self._active)]:
            self._fail_job(job, failure, reason)
        self._active = []

    def _record(self, rows: list[Row], admitted, elapsed: float) -> None:
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

    def _publish_resident(self) -> None:
        self.resident = frozenset(self.slots.resident())
        self.metrics.active_sequences.set(len(self._active))

    def _watch(self) -> None:
        while not self._halt.wait(self.settings.watch_interval_s):
            try:
                for task in self.registry.poll_store():
                    self.warm(self.registry.get(task))
            except Exception:  # noqa: BLE001 - the watcher must keep running
                log.exception("watching the adapter store failed")
