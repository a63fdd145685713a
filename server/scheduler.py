"""Scheduling: the queue, and which queued jobs join the next step.

The HTTP layer ``submit``s jobs (all of a request or none); the worker asks ``next_work`` for
the adapters to warm and the jobs admitted to its next step: queued jobs in arrival order while
they fit the row and token budgets, the task slots and the KV cache pool (an oversized job runs
alone). Each admitted job holds one KV cache range per row (``Admitted.starts``) until the runner
gives them back with ``release``. Expired and cancelled jobs are dropped here. The scheduler never
touches the device.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from talora.server.errors import QueueFull, ShuttingDown, WorkerDead
from talora.server.jobs import Failed, Job
from talora.server.kvpool import KVPool
from talora.server.metrics import Metrics
from talora.server.registry import AdapterVersion
from talora.server.sequences import Sequence
from talora.server.settings import Settings
from talora.server.slots import SlotTable


@dataclass
class Admitted:
    """A job admitted to a step, with the first cache position of each of its ranges."""

    job: Job
    starts: list[int]  # one per ``job.cache_ranges()``


def release(pool: KVPool, job: Job, starts: list[int]) -> None:
    """Give back the KV cache ranges ``job`` was admitted with."""
    for start, length in zip(starts, job.cache_ranges()):
        pool.release(start, length)


class Scheduler:
    """The queue of jobs and of adapters to warm, shared by the HTTP threads and the worker."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self._queue: deque[Job] = deque()
        self._warm: deque[AdapterVersion] = deque()
        self._cv = threading.Condition()
        self.stopping = False  # no new work; finish what is queued and running
        self.aborted = False  # stop now: what is left fails

    def submit(self, jobs: list[Job], worker_alive: bool) -> None:
        """Queue ``jobs`` all together, or none (``QueueFull``, ``ShuttingDown``, ``WorkerDead``)."""
        with self._cv:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if not worker_alive:
                raise WorkerDead("the engine's worker has stopped; the server must be restarted")
            if len(self._queue) + len(jobs) > self.settings.max_queue:
                raise QueueFull(f"the queue is full ({self.settings.max_queue} requests waiting)")
            self._queue.extend(jobs)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify_all()

    def warm(self, adapter: AdapterVersion) -> None:
        """Ask the worker to compute ``adapter``'s task KV into a slot soon."""
        with self._cv:
            self._warm.append(adapter)
            self._cv.notify_all()

    def stop(self, abort: bool = False) -> None:
        with self._cv:
            self.stopping = True
            self.aborted = self.aborted or abort
            self._cv.notify_all()

    def next_work(self, active: list[Sequence], pool: KVPool, slots: SlotTable,
                  busy: bool = False) -> tuple[list[AdapterVersion], list[Admitted]] | None:
        """Wait for work; the adapters to warm and the jobs admitted next to ``active``. ``busy``: a
        step is in flight (it is work too). None: stop."""
        with self._cv:
            while not (self._queue or active or busy or self._warm or self.stopping):
                self._cv.wait()
            if self.aborted or (self.stopping and not self._queue and not active and not busy):
                return None
            warm, admitted = list(self._warm), self._admit(active, pool, slots)
            self._warm.clear()
            self.metrics.queue_depth.set(len(self._queue))
            return warm, admitted

    def pause_if_waiting(self) -> None:
        """Nothing fitted this step but jobs wait (for ranges or slots held by others): yield briefly."""
        with self._cv:
            if self._queue:
                self._cv.wait(0.01)

    def drain(self) -> list[Job]:
        """Take every queued job out (to fail them)."""
        with self._cv:
            queued, self._queue = list(self._queue), deque()
            return queued

    def _admit(self, active: list[Sequence], pool: KVPool, slots: SlotTable) -> list[Admitted]:
        s, now = self.settings, time.monotonic()
        rows_left, tokens_left = s.max_batch_size - len(active), s.max_batch_tokens - len(active)
        placement = slots.placement({seq.job.adapter.key for seq in active})
        admitted: list[Admitted] = []
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
                self.metrics.job_failures.labels("admit").inc()
                job.emit(Failed(500, f"the request could not be planned: {exc!r}"))
                continue
            alone = not admitted and not active  # an oversized job still runs, by itself
            if not alone and (len(lengths) > rows_left or sum(lengths) > tokens_left):
                break
            if not placement.add(job.adapter.key):  # the placement is dropped with the step if we stop here
                break
            starts = _allocate(pool, job)
            if starts is None:
                break
            self._queue.popleft()
            admitted.append(Admitted(job, starts))
            rows_left, tokens_left = rows_left - len(lengths), tokens_left - sum(lengths)
            self.metrics.queue_seconds.observe(now - job.enqueued_at)
        return admitted


def _allocate(pool: KVPool, job: Job) -> list[int] | None:
    """One range per ``job.cache_ranges()``, or None (and nothing held) when they do not all fit."""
    starts: list[int] = []
    for length in job.cache_ranges():
        start = pool.allocate(length)
        if start is None:
            for done, n in zip(starts, job.cache_ranges()):
                pool.release(done, n)
            return None
        starts.append(start)
    return starts
