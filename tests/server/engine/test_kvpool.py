"""The KV cache pool's range arithmetic on its own (no model): ranges handed out never overlap and
never cover the scratch position, a release gives its positions back and merges with free
neighbours, allocation is first fit and fails cleanly (nothing held, nothing changed) when no free
range is long enough, and ``reset`` frees everything. Hypothesis drives random sequences of
allocations and releases against a model of which positions are held."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import torch
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from talora.server.engine.kvpool import KVPool


def make_pool(capacity: int) -> KVPool:
    """A pool of ``capacity`` positions of one layer, one head of size 2, on the CPU."""
    return KVPool(1, capacity, 1, 2, torch.float32, "cpu")


def test_a_fresh_pool_is_one_free_range_and_the_scratch_position_lies_past_it():
    pool = make_pool(16)
    assert (pool.free_tokens, pool.largest_free(), pool.scratch) == (16, 16, 16)
    assert pool.cache.keys.shape[1] == 17  # the scratch position is in the cache, outside every range


def test_freed_neighbours_merge_so_a_longer_range_fits_again():
    pool = make_pool(12)
    a, b, c = (pool.allocate(4) for _ in range(3))
    assert (a, b, c) == (0, 4, 8) and pool.allocate(1) is None
    pool.release(a, 4)
    pool.release(c, 4)
    assert pool.largest_free() == 4 and pool.allocate(5) is None  # 8 free positions, in two pieces
    pool.release(b, 4)  # the middle joins both neighbours
    assert pool.largest_free() == 12 and pool.allocate(12) == 0


def test_allocation_takes_the_first_free_range_long_enough():
    pool = make_pool(12)
    first, _, third = pool.allocate(6), pool.allocate(2), pool.allocate(2)
    pool.release(first, 6)
    pool.release(third, 2)  # free: 6 positions at 0, 4 at 8 (the tightest fit for 3 or 4)
    assert pool.allocate(3) == 0 and pool.allocate(4) == 8 and pool.allocate(3) == 3
    assert pool.free_tokens == 0


class PoolMachine(RuleBasedStateMachine):
    """Random allocations and releases; the model is the set of ranges held, ``(start, length)``."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool(1)
        self.held: dict[int, int] = {}

    @initialize(capacity=st.integers(1, 64))
    def make(self, capacity: int) -> None:
        self.pool = make_pool(capacity)

    def free_runs(self) -> list[tuple[int, int]]:
        """The model's maximal runs of free positions, ``(start, length)`` in order."""
        runs, at = [], 0
        for start, length in sorted(self.held.items()) + [(self.pool.capacity, 0)]:
            if start > at:
                runs.append((at, start - at))
            at = start + length
        return runs

    @rule(length=st.integers(1, 24))
    def allocate(self, length: int) -> None:
        first_fit = next((start for start, free in self.free_runs() if free >= length), None)
        before = (self.pool.free_tokens, self.pool.largest_free())
        start = self.pool.allocate(length)
        assert start == first_fit, (length, self.free_runs())
        if start is None:
            assert (self.pool.free_tokens, self.pool.largest_free()) == before
        else:
            self.held[start] = length

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data) -> None:
        start = data.draw(st.sampled_from(sorted(self.held)))
        self.pool.release(start, self.held.pop(start))

    @rule()
    def reset(self) -> None:
        self.pool.reset()
        self.held.clear()

    @invariant()
    def ranges_are_disjoint_and_inside_the_pool(self) -> None:
        ends = [(start, start + length) for start, length in sorted(self.held.items())]
        assert all(end <= next_start for (_, end), (next_start, _) in zip(ends, ends[1:])), ends
        assert all(0 <= start and end <= self.pool.capacity for start, end in ends)  # never the scratch

    @invariant()
    def free_space_is_what_no_range_holds_and_merged(self) -> None:
        runs = self.free_runs()
        assert self.pool.free_tokens == self.pool.capacity - sum(self.held.values())
        assert self.pool.largest_free() == max((length for _, length in runs), default=0)


PoolMachine.TestCase.settings = hypothesis.settings(max_examples=150, stateful_step_count=40, deadline=None,
                                                    database=None)
test_pool_ranges_against_a_model = PoolMachine.TestCase
