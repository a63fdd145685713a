"""Scheduling: the queue, and which queued jobs join the next step.

The HTTP layer ``submit``s the jobs of one request together (all or none). The queue counts
requests, whatever their number of texts: ``max_queue`` requests may wait, and a request waits
until its last job is admitted. Queued jobs sit in per-client, per-task sub-queues (``FairQueue``)
that the worker's ``next_work`` serves round-robin: one job of the client whose turn it is, of
that client's task whose turn it is, then the next client, while the jobs fit the row and token
budgets, the task slots and the KV cache pool (an oversized job runs alone). The first job that
does not fit ends the step's admission and keeps its turn, so no job is passed over for good,
and a heavy request of one client (or task) never makes another's small request wait behind all
of it: the jobs of one request may be admitted over many steps, each client's in turn. Each
admitted job holds one KV cache range per row (``Admitted.starts``) until the runner gives them
back with ``release``. Expired and cancelled jobs are dropped here, also while they wait (every
step sweeps the sub-queues' heads). The scheduler never touches the device.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from talora.server.adapter_registry import AdapterVersion
from talora.server.engine.kvpool import KVPool
from talora.server.engine.sequences import Sequence
from talora.server.engine.slots import SlotTable
from talora.server.errors import QueueFull, ShuttingDown, WorkerDead
from talora.server.jobs import Failed, Job
from talora.server.metrics import Metrics
from talora.server.settings import EngineConfig


@dataclass
class Admitted:
    """A job admitted to a step, with the first cache position of each of its ranges."""

    job: Job
    starts: list[int]  # one per ``job.cache_ranges()``


def release(pool: KVPool, job: Job, starts: list[int]) -> None:
    """Give back the KV cache ranges ``job`` was admitted with."""
    for start, length in zip(starts, job.cache_ranges()):
        pool.release(start, length)


@dataclass(eq=False)
class _Request:
    """One submitted request: its client and how many of its jobs still wait."""

    client: str
    waiting: int


@dataclass(eq=False)
class _Batch:
    """The waiting jobs of one request for one task, in order."""

    request: _Request
    jobs: deque[Job]


class FairQueue:
    """Waiting jobs in per-client, per-task sub-queues, served round-robin (not thread-safe: the
    ``Scheduler`` holds its lock).

    ``head()`` is the next job in turn: the first waiting job of the first request of the task whose
    turn it is within the client whose turn it is. ``take(admitted=True)`` removes it and passes the
    turn on (that task goes behind the client's other tasks, the client behind the other clients);
    ``take(admitted=False)`` removes a dropped job and leaves the turn where it is. A new client
    joins at the back of the turn. Requests of one client and task are served in arrival order.
    """

    def __init__(self) -> None:
        # client -> task -> that client's requests (each its jobs of that task), in turn order
        self._clients: OrderedDict[str, OrderedDict[str, deque[_Batch]]] = OrderedDict()
        self.requests = 0  # requests with a job waiting
        self.jobs = 0  # jobs waiting

    def __bool__(self) -> bool:
        return self.jobs > 0

    def push(self, client: str, jobs: list[Job]) -> None:
        """Queue one request's ``jobs`` (none: nothing to queue)."""
        if not jobs:
            return
        request = _Request(client, len(jobs))
        by_task: dict[str, deque[Job]] = {}
        for job in jobs:
            by_task.setdefault(job.adapter.task, deque()).append(job)
        tasks = self._clients.setdefault(client, OrderedDict())
        for task, queued in by_task.items():
            tasks.setdefault(task, deque()).append(_Batch(request, queued))
        self.requests += 1
        self.jobs += len(jobs)

    def head(self) -> Job | None:
        """The job whose turn it is, or None when nothing waits."""
        if not self._clients:
            return None
        tasks = next(iter(self._clients.values()))
        return next(iter(tasks.values()))[0].jobs[0]

    def take(self, admitted: bool) -> Job:
        """Remove ``head()``; ``admitted``: pass the turn on."""
        client, tasks = next(iter(self._clients.items()))
        task, batches = next(iter(tasks.items()))
        batch = batches[0]
        job = batch.jobs.popleft()
        self._taken(batch)
        if not batch.jobs:
            batches.popleft()
        if not batches:
            del tasks[task]
        elif admitted:
            tasks.move_to_end(task)
        if not tasks:
            del self._clients[client]
        elif admitted:
            self._clients.move_to_end(client)
        return job

    def sweep(self, dead: Callable[[Job], bool]) -> list[Job]:
        """Remove every job of each request whose first waiting job is ``dead`` (cancelled or expired:
        the jobs of one request are cancelled, and expire, together); returns the removed jobs, in
        order. Turns stay where they are."""
        removed: list[Job] = []
        for client in list(self._clients):
            tasks = self._clients[client]
            for task in list(tasks):
                if not any(dead(batch.jobs[0]) for batch in tasks[task]):
                    continue  # the usual case: nothing to rebuild
                kept: deque[_Batch] = deque()
                for batch in tasks[task]:
                    if dead(batch.jobs[0]):
                        gone = [job for job in batch.jobs if dead(job)]
                        batch.jobs = deque(job for job in batch.jobs if not dead(job))
                        for _ in gone:
                            self._taken(batch)
                        removed += gone
                    if batch.jobs:
                        kept.append(batch)
                if kept:
                    tasks[task] = kept
                else:
                    del tasks[task]
            if not tasks:
                del self._clients[client]
        return removed

    def drain(self) -> list[Job]:
        """Remove and return every waiting job."""
        jobs = list(self)
        self._clients.clear()
        self.requests = self.jobs = 0
        return jobs

    def __iter__(self) -> Iterator[Job]:
        for tasks in self._clients.values():
            for batches in tasks.values():
                for batch in batches:
                    yield from batch.jobs

    def _taken(self, batch: _Batch) -> None:
        self.jobs -= 1
        batch.request.waiting -= 1
        if batch.request.waiting == 0:
            self.requests -= 1


class Scheduler:
    """The queue of jobs and of adapters to warm, shared by the HTTP threads and the worker."""

    def __init__(self, config: EngineConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self._queue = FairQueue()
        self._warm: deque[AdapterVersion] = deque()
        self._cv = threading.Condition()
        self.stopping = False  # no new work; finish what is queued and running
        self.aborted = False  # stop now: what is left fails

    @property
    def waiting(self) -> tuple[int, int]:
        """(requests, jobs) waiting now."""
        with self._cv:
            return self._queue.requests, self._queue.jobs

    def submit(self, jobs: list[Job], worker_alive: bool) -> None:
        """Queue the jobs of one request all together, or none (``QueueFull``, ``ShuttingDown``,
        ``WorkerDead``); their ``client`` is the client whose turn they wait for."""
        with self._cv:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if not worker_alive:
                raise WorkerDead("the engine's worker has stopped; the server must be restarted")
            if not jobs:
                return
            limit = self.config.max_queue
            if self._queue.requests >= limit:
                self._sweep(time.monotonic())  # abandoned and expired requests hold no place
            if self._queue.requests >= limit:
                raise QueueFull(f"the queue is full ({limit} requests waiting, max_queue)")
            self._queue.push(jobs[0].client, jobs)
            self._publish()
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
            self._sweep(time.monotonic())
            warm, admitted = list(self._warm), self._admit(active, pool, slots)
            self._warm.clear()
            self._publish()
            return warm, admitted

    def pause_if_waiting(self) -> None:
        """Nothing fitted this step but jobs wait (for ranges or slots held by others): yield briefly."""
        with self._cv:
            if self._queue:
                self._cv.wait(0.01)

    def drain(self) -> list[Job]:
        """Take every queued job out (to fail them)."""
        with self._cv:
            queued = self._queue.drain()
            self._publish()
            return queued

    def _publish(self) -> None:
        self.metrics.queue_depth.set(self._queue.requests)
        self.metrics.queue_jobs.set(self._queue.jobs)

    def _sweep(self, now: float) -> None:
        """Drop the waiting requests that were cancelled or have expired."""
        for job in self._queue.sweep(lambda job: job.cancelled or job.deadline < now):
            self._dropped(job)

    def _dropped(self, job: Job) -> None:
        if not job.cancelled:
            job.emit(Failed(504, f"timed out after {self.config.request_timeout_s} s in the queue"))

    def _admit(self, active: list[Sequence], pool: KVPool, slots: SlotTable) -> list[Admitted]:
        s, now = self.config, time.monotonic()
        rows_left, tokens_left = s.max_batch_size - len(active), s.max_batch_tokens - len(active)
        placement = slots.placement({seq.job.adapter.key for seq in active})
        admitted: list[Admitted] = []
        while (job := self._queue.head()) is not None:
            if job.cancelled or job.deadline < now:
                self._dropped(self._queue.take(admitted=False))
                continue
            try:
                lengths = job.row_lengths()
            except Exception as exc:  # noqa: BLE001 - a job that cannot be planned fails alone
                self._queue.take(admitted=False)
                self.metrics.job_failures.labels("admit").inc()
                job.emit(Failed(500, f"the request could not be planned: {exc!r}"))
                continue
            alone = not admitted and not active  # an oversized job still runs, by itself
            if not alone and (len(lengths) > rows_left or sum(lengths) > tokens_left):
                break  # it keeps its turn: the next step starts with it
            if not placement.add(job.adapter.key):  # the placement is dropped with the step if we stop here
                break
            starts = _allocate(pool, job)
            if starts is None:
                break
            self._queue.take(admitted=True)
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
