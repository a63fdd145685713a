"""The scheduler on its own (no model, no device): the queue counts requests, admission takes turns
between clients and between each client's tasks, and no job is lost, duplicated or admitted over
the batch budgets, the slots or the KV cache pool; generations that stay active over many steps hold
their rows, ranges and slot pins, and every job is still served (unit tests and Hypothesis
properties)."""

from __future__ import annotations

import time
from typing import Any, cast

import hypothesis
import hypothesis.strategies as st
import pytest
import torch

from talora.server.engine.kvpool import KVPool
from talora.server.engine.scheduler import Admitted, Scheduler, release
from talora.server.errors import QueueFull
from talora.server.jobs import Failed, GenerationParams, Job
from talora.server.metrics import Metrics
from talora.server.settings import EngineConfig
from tests.server.engine.fakes import adapter, make_table
from tests.server.support import Collector


class FakePlacement:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: set[tuple[str, int]] = set()

    def add(self, key) -> bool:
        if key in self.keys or len(self.keys) < self.capacity:
            self.keys.add(key)
            return True
        return False


class FakeSlots:
    """A slot table of ``capacity`` slots, none of them pinned."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def placement(self, keys) -> FakePlacement:
        placement = FakePlacement(self.capacity)
        for key in keys:
            placement.add(key)
        return placement


ADAPTERS = {f"t{i}": adapter(i) for i in range(3)}


def make_job(client: str, task: str, prompt: int = 4, new: int = 2, deadline: float | None = None,
             kind: str = "generate") -> Job:
    """A generation of ``new`` tokens, or (``kind="score"``) a score job of one one-token label."""
    return Job(kind, cast(Any, ADAPTERS[task]), [1] * prompt, Collector(),
               deadline if deadline is not None else time.monotonic() + 600,
               GenerationParams(max_new_tokens=new) if kind == "generate" else None, client=client)


def scheduler(**config) -> Scheduler:
    return Scheduler(EngineConfig(**config), Metrics())


def pool(capacity: int = 256) -> KVPool:
    return KVPool(1, capacity, 1, 2, torch.float32, "cpu")


def run_all(sched: Scheduler, kv: KVPool, slots: FakeSlots, limit: int = 10_000) -> list[list[Admitted]]:
    """Steps until nothing waits, each step's jobs finishing (their ranges given back) before the next."""
    steps: list[list[Admitted]] = []
    while sched.waiting[1] and len(steps) < limit:
        work = sched.next_work([], kv, cast(Any, slots))
        assert work is not None
        _, admitted = work
        steps.append(admitted)
        for item in admitted:
            release(kv, item.job, item.starts)
    assert not sched.waiting[1], "the queue did not empty"
    return steps


def clients_in_order(steps: list[list[Admitted]]) -> list[str]:
    return [item.job.client for step in steps for item in step]


def test_the_queue_counts_requests_not_texts():
    sched = scheduler(max_queue=2)
    sched.submit([make_job("a", "t0") for _ in range(5)], worker_alive=True)
    sched.submit([make_job("b", "t0")], worker_alive=True)
    assert sched.waiting == (2, 6)
    assert sched.metrics.queue_depth._value.get() == 2 and sched.metrics.queue_jobs._value.get() == 6
    with pytest.raises(QueueFull, match=r"the queue is full \(2 requests waiting, max_queue\)"):
        sched.submit([make_job("c", "t0")], worker_alive=True)
    assert sched.waiting == (2, 6)  # all or none


def test_a_request_waits_until_its_last_job_is_admitted():
    sched = scheduler(max_queue=1, max_batch_size=1)
    kv, slots = pool(), FakeSlots(3)
    sched.submit([make_job("a", "t0") for _ in range(3)], worker_alive=True)
    work = sched.next_work([], kv, cast(Any, slots))
    assert work is not None and len(work[1]) == 1 and sched.waiting == (1, 2)
    with pytest.raises(QueueFull):
        sched.submit([make_job("b", "t0")], worker_alive=True)
    run_all(sched, kv, slots)
    assert sched.waiting == (0, 0)
    sched.submit([make_job("b", "t0")], worker_alive=True)


def test_abandoned_and_expired_requests_give_their_place_back():
    sched = scheduler(max_queue=2)
    gone = [make_job("a", "t0") for _ in range(3)]
    late = make_job("b", "t1", deadline=time.monotonic() - 1)
    sched.submit(gone, worker_alive=True)
    sched.submit([late], worker_alive=True)
    for job in gone:
        job.cancel()
    sched.submit([make_job("c", "t0")], worker_alive=True)  # the sweep made room
    assert sched.waiting == (1, 1)
    sink = cast(Collector, late.emit)
    assert len(sink.events) == 1 and isinstance(sink.events[0], Failed) and sink.events[0].status == 504
    assert all(not cast(Collector, job.emit).events for job in gone)  # a cancelled job gets no answer


def test_a_heavy_request_does_not_hold_back_another_clients_small_one():
    sched = scheduler(max_batch_size=1)
    sched.submit([make_job("heavy", "t0") for _ in range(16)], worker_alive=True)
    sched.submit([make_job("light", "t0")], worker_alive=True)
    order = clients_in_order(run_all(sched, pool(), FakeSlots(3)))
    assert order[:3] == ["heavy", "light", "heavy"] and len(order) == 17


def test_turns_go_round_every_client_then_every_task_of_a_client():
    sched = scheduler(max_batch_size=64, max_batch_tokens=4096)
    sched.submit([make_job("a", "t0") for _ in range(3)], worker_alive=True)
    sched.submit([make_job("a", "t1") for _ in range(3)], worker_alive=True)
    sched.submit([make_job("b", "t2") for _ in range(2)], worker_alive=True)
    [step] = run_all(sched, pool(), FakeSlots(3))
    assert [(item.job.client, item.job.adapter.task) for item in step] == [
        ("a", "t0"), ("b", "t2"), ("a", "t1"), ("b", "t2"), ("a", "t0"), ("a", "t1"), ("a", "t0"), ("a", "t1")]


def test_a_job_that_does_not_fit_keeps_its_turn_and_an_oversized_one_runs_alone():
    sched = scheduler(max_batch_size=8, max_batch_tokens=32)
    sched.submit([make_job("a", "t0", prompt=20)], worker_alive=True)
    sched.submit([make_job("b", "t0", prompt=20)], worker_alive=True)
    sched.submit([make_job("c", "t0", prompt=100)], worker_alive=True)
    sched.submit([make_job("d", "t0", prompt=4)], worker_alive=True)
    steps = run_all(sched, pool(), FakeSlots(3))
    # b does not fit beside a: the step ends there (d does not jump the turn); c runs alone
    assert [[item.job.client for item in step] for step in steps] == [["a"], ["b"], ["c"], ["d"]]


# ----- properties -------------------------------------------------------------------------------

REQUEST = st.tuples(st.integers(0, 3), st.sampled_from(sorted(ADAPTERS)),
                    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 8)), min_size=1, max_size=6),
                    st.sampled_from(["live", "live", "live", "cancelled", "expired"]))


@hypothesis.settings(max_examples=150, deadline=None, database=None)
@hypothesis.given(requests=st.lists(REQUEST, min_size=1, max_size=12), rows=st.integers(1, 6),
                  tokens=st.integers(16, 64), num_slots=st.integers(1, 3))
def test_admission_is_fair_complete_and_within_budgets(requests, rows, tokens, num_slots):
    sched = scheduler(max_batch_size=rows, max_batch_tokens=tokens, max_queue=len(requests))
    kv, slots = pool(48 + 8), FakeSlots(num_slots)
    submitted = []
    past = time.monotonic() - 1
    for client, task, shapes, fate in requests:
        jobs = [make_job(f"c{client}", task, prompt, new, deadline=past if fate == "expired" else None)
                for prompt, new in shapes]
        sched.submit(jobs, worker_alive=True)
        if fate == "cancelled":
            for job in jobs:
                job.cancel()
        submitted.append((fate, jobs))
    assert sched.waiting == (len(requests), sum(len(jobs) for _, jobs in submitted))
    steps = run_all(sched, kv, slots)
    admitted = [item.job for step in steps for item in step]

    # every live job admitted once, no dead one; an expired job told so once, a cancelled one not at all
    live = [job for fate, jobs in submitted if fate == "live" for job in jobs]
    assert sorted(map(id, admitted)) == sorted(map(id, live))
    for fate, jobs in submitted:
        for job in jobs:
            events = cast(Collector, job.emit).events
            if fate == "expired":
                assert len(events) == 1 and isinstance(events[0], Failed) and events[0].status == 504
            else:
                assert events == []

    # budgets, slots and the pool
    for step in steps:  # (a step may admit nothing: its sweep dropped the last jobs)
        if len(step) > 1:
            assert sum(len(item.job.row_lengths()) for item in step) <= rows
            assert sum(sum(item.job.row_lengths()) for item in step) <= tokens
        assert len({item.job.adapter.key for item in step}) <= num_slots
    assert kv.free_tokens == 48 + 8 and sched.waiting == (0, 0)
    assert sched.metrics.queue_depth._value.get() == 0 and sched.metrics.queue_jobs._value.get() == 0

    # arrival order within a client's task; turns between clients, and between a client's tasks
    for client in {job.client for job in admitted}:
        for task in ADAPTERS:
            mine = [job for job in admitted if job.client == client and job.adapter.task == task]
            assert mine == [job for job in live if job.client == client and job.adapter.task == task]
    _assert_turns([job.client for job in admitted])
    for client in {job.client for job in admitted}:
        _assert_turns([job.adapter.task for job in admitted if job.client == client])


def _assert_turns(keys: list[str]) -> None:
    """Between two consecutive turns of one key, no other key has two turns."""
    for key in set(keys):
        at = [i for i, k in enumerate(keys) if k == key]
        for a, b in zip(at, at[1:]):
            between = keys[a + 1:b]
            assert all(between.count(other) <= 1 for other in set(between)), (key, keys)


class Running:
    """An active generation as the scheduler sees it (``seq.job``), and the steps it has left."""

    def __init__(self, item: Admitted):
        self.job, self.starts = item.job, item.starts
        self.steps_left = item.job.params.max_new_tokens if item.job.params else 1


JOB = st.tuples(st.sampled_from(["generate", "score"]), st.integers(1, 24), st.integers(1, 6))


@hypothesis.settings(max_examples=60, deadline=None, database=None)
@hypothesis.given(requests=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(sorted(ADAPTERS)),
                                              st.lists(JOB, min_size=1, max_size=4)), min_size=1, max_size=10),
                  rows=st.integers(1, 5), tokens=st.integers(16, 48), num_slots=st.integers(1, 3),
                  capacity=st.integers(32, 64))
def test_active_generations_hold_their_rows_ranges_and_slots_and_every_job_is_served(
        requests, rows, tokens, num_slots, capacity):
    """A worker's loop without a model: admitted generations stay active (one decode row each, their
    range and slot pin held) until their tokens are out, score jobs give theirs back after one step.
    No step goes over the budgets counting the active rows (but a job alone), the runner can pin
    every admitted job's slot, and every job is served once within a bounded number of steps."""
    sched = scheduler(max_batch_size=rows, max_batch_tokens=tokens, max_queue=len(requests))
    kv, (slots, _) = pool(capacity), make_table(num_slots)
    jobs = []
    for client, task, shapes in requests:
        request = [make_job(f"c{client}", task, prompt, new, kind=kind) for kind, prompt, new in shapes]
        sched.submit(request, worker_alive=True)
        jobs += request
    active: list[Running] = []
    served: list[Job] = []
    for _ in range(2 * sum(job.cache_tokens() for job in jobs)):  # far more steps than any fair order needs
        if not (sched.waiting[1] or active):
            break
        work = sched.next_work(cast(Any, active), kv, slots)
        assert work is not None
        admitted = work[1]
        lengths = [n for item in admitted for n in item.job.row_lengths()]
        if len(admitted) > 1 or active:
            assert len(active) + len(lengths) <= rows and len(active) + sum(lengths) <= tokens
        for item in admitted:
            slots.acquire(item.job.adapter)  # as the runner does: no NoFreeSlot after admission placed it
        served += [item.job for item in admitted]
        active += [Running(item) for item in admitted]
        for seq in active:
            seq.steps_left -= 1
            if not seq.steps_left:
                release(kv, seq.job, seq.starts)
                slots.release(seq.job.adapter)
        active = [seq for seq in active if seq.steps_left]
    assert not sched.waiting[1] and not active, "the queue did not empty"
    assert sorted(map(id, served)) == sorted(map(id, jobs))
    assert kv.free_tokens == kv.largest_free() == capacity and not slots._pins
