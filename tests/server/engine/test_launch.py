"""``Runner._launch`` places a step's tasks in the slot table (a fake model whose task KV names the
adapter, the device forward left out): the step's resident tasks are pinned before the others are
placed, so no task of the step evicts another task of the same step and each is computed once."""

from __future__ import annotations

import time
from typing import Any, cast

import hypothesis
import hypothesis.strategies as st
import pytest
import torch

from talora.server.engine.kvpool import KVPool
from talora.server.engine.runner import Runner
from talora.server.engine.scheduler import Admitted
from talora.server.jobs import Job
from talora.server.metrics import Metrics
from talora.server.settings import EngineConfig
from tests.server.engine.fakes import adapter, make_table


def launch(num_slots: int, resident: list[int], step: list[int]) -> tuple[list[float], Any]:
    """Make ``resident`` tasks resident (first the oldest), then launch one step of a score job per
    task of ``step`` (in that order). Returns the task KV computations and the table."""
    table, model = make_table(num_slots)
    for task in resident:
        table.acquire(adapter(task))
        table.release(adapter(task))
    pool = KVPool(1, 64, 1, 2, torch.float32, "cpu")
    runner = Runner(cast(Any, model), cast(Any, None), table, pool, None, set(), EngineConfig(), Metrics())
    runner._forward = lambda plan, sampling, previous: cast(Any, None)  # type: ignore[method-assign]
    jobs = [Admitted(Job("score", adapter(task), [5, 6], lambda event: None, time.monotonic() + 60), [8 * i])
            for i, task in enumerate(step)]
    launched = runner._launch(jobs, None, [])
    assert launched is not None
    assert [row.slot for row in launched.rows] == [table.slot_of(adapter(task).key) for task in step]
    return model.computed, table


@pytest.mark.parametrize("step", [[1, 0], [0, 1]], ids=["new-first", "resident-first"])
def test_a_step_never_evicts_its_own_resident_task(step):
    """Two slots hold task 0 (least recently used) and task 2; a step of tasks 0 and 1 keeps 0 and puts
    1 in 2's slot, whatever the order of its jobs (placing 1 first used to evict 0, computed again)."""
    computed, table = launch(2, [0, 2], step)
    assert computed == [1, 21, 11]  # task t's KV is filled with 10 * t + 1
    assert sorted(table.resident()) == [adapter(0).key, adapter(1).key]
    assert table.metrics.slot_evictions._value.get() == 1


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(data=st.data(), num_slots=st.integers(1, 4))
def test_a_step_computes_exactly_its_tasks_that_were_not_resident(data, num_slots):
    resident = data.draw(st.lists(st.integers(0, 6), unique=True, max_size=num_slots))
    tasks = data.draw(st.lists(st.integers(0, 6), unique=True, min_size=1, max_size=num_slots))
    step = data.draw(st.lists(st.sampled_from(tasks), min_size=len(tasks), max_size=6).filter(
        lambda jobs: set(jobs) == set(tasks)))
    computed, table = launch(num_slots, resident, step)
    assert computed[len(resident):] == [10 * t + 1 for t in dict.fromkeys(step) if t not in resident]
    assert {adapter(t).key for t in step} <= set(table.resident())
