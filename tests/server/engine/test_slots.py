"""The task-slot table and its ``Placement`` on their own (a fake model whose task KV names the
adapter): a key holds at most one slot and no slot is lost, a resident key is a hit, pinned slots
are never evicted and the least recently used unpinned one goes first, a table whose slots are all
pinned refuses a new key without changing, a failed computation leaves no key in the slot, and a
placement fits exactly when its keys and the pinned ones fit the slots (Hypothesis state machine
against a model of the LRU order and the pins)."""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

import hypothesis
import hypothesis.strategies as st
import pytest
import torch
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from talora.server.engine.slots import NoFreeSlot
from tests.server.engine.fakes import adapter, make_table


def test_a_resident_key_is_a_hit_and_the_oldest_unpinned_goes_first():
    table, model = make_table(2)
    a, b, c = adapter(0), adapter(1), adapter(2)
    slot_a, slot_b = table.acquire(a), table.acquire(b)
    table.release(a)
    table.release(b)
    assert table.acquire(a) == slot_a and model.computed == [1, 11]  # a hit: no new computation
    table.release(a)
    assert table.acquire(c) == slot_b and table.resident() == [a.key, c.key]  # b was the least recently used
    assert table.metrics.slot_evictions._value.get() == 1


def test_pinned_slots_are_never_evicted_and_a_full_table_refuses_without_changing():
    table, model = make_table(2)
    a, b = adapter(0), adapter(1)
    table.acquire(a)
    table.acquire(b)
    with pytest.raises(NoFreeSlot):
        table.acquire(adapter(2))
    assert table.resident() == [a.key, b.key] and model.computed == [1, 11]
    table.release(a)
    assert table.acquire(adapter(2)) == 1 - table.slot_of(b.key)  # a's slot, b still pinned


class SlotMachine(RuleBasedStateMachine):
    """Random acquires, releases, failures, stale drops and placements against a model of the table:
    ``lru`` the resident keys, least recently used first, and ``pins``."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.model = make_table(1)
        self.lru: list[tuple[str, int]] = []
        self.pins: Counter[tuple[str, int]] = Counter()

    @initialize(num_slots=st.integers(1, 4))
    def make(self, num_slots: int) -> None:
        self.table, self.model = make_table(num_slots)

    def fits(self, keys: set[tuple[str, int]]) -> bool:
        """The meaning of a placement: its keys and every pinned key have a slot each."""
        return len(keys | set(self.pins)) <= self.table.num_slots

    def acquire(self, version: Any) -> None:
        """``table.acquire`` and what the model says it does: a hit, a free slot, the least recently used
        unpinned slot, or ``NoFreeSlot`` with nothing changed; a failed computation frees the slot."""
        key, before = version.key, dict((k, self.table.slot_of(k)) for k in self.lru)
        victims = [k for k in self.lru if not self.pins[k]]
        evicts = key not in self.lru and len(self.lru) == self.table.num_slots
        broken = float(version.fast[0, 0]) in self.model.broken
        try:
            slot = self.table.acquire(version)
        except NoFreeSlot:
            assert evicts and not victims and self.table.resident() == self.lru
            return
        except RuntimeError:
            assert broken and key not in self.lru and self.table.slot_of(key) is None
            if evicts:
                self.lru.remove(victims[0])
            return
        assert not broken or key in self.lru
        if key in self.lru:
            assert slot == before[key]
            self.lru.remove(key)
        elif evicts:
            assert slot == before[victims[0]], (victims, before)
            self.lru.remove(victims[0])
        self.lru.append(key)
        self.pins[key] += 1
        for pinned in self.pins:  # pinned keys keep their slots
            assert pinned == key or self.table.slot_of(pinned) == before[pinned]

    @rule(task=st.integers(0, 5), serial=st.integers(1, 2))
    def acquire_one(self, task: int, serial: int) -> None:
        self.acquire(adapter(task, serial))

    @rule(task=st.integers(0, 5))
    def acquire_a_broken_one(self, task: int) -> None:
        version = adapter(task, 3)
        self.model.broken.add(10 * task + 3)
        self.acquire(version)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def release(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.pins)))
        self.table.release(adapter(int(key[0][1:]), key[1]))
        self.pins[key] -= 1
        self.pins = +self.pins  # drop zero counts

    @rule()
    def unpin_all(self) -> None:
        self.table.unpin_all()
        self.pins.clear()

    @rule(current=st.sets(st.tuples(st.sampled_from([f"t{i}" for i in range(6)]), st.integers(1, 2))))
    def drop_stale(self, current: set[tuple[str, int]]) -> None:
        self.table.drop_stale(current)
        self.lru = [key for key in self.lru if key in current or self.pins[key]]

    @rule(initial=st.sets(st.tuples(st.sampled_from(["t0", "t1", "t2"]), st.just(1)), max_size=2),
          added=st.lists(st.integers(0, 5), max_size=5), acquire=st.booleans())
    def place(self, initial: set[tuple[str, int]], added: list[int], acquire: bool) -> None:
        """A placement fits exactly when its keys and the pinned ones fit; ``add`` keeps it fitting; the
        keys of a fitting placement can all be acquired (the runner acquires what admission placed)."""
        placement = self.table.placement(set(initial))
        assert placement.fits() == self.table.can_place(set(initial)) == self.fits(set(initial))
        if not placement.fits():
            return
        for task in added:
            key, keys = (f"t{task}", 1), set(placement.keys)
            assert placement.add(key) == self.fits(keys | {key}) == self.table.can_place(keys | {key})
            assert placement.keys == (keys | {key} if self.fits(keys | {key}) else keys)
        if acquire:
            for key in sorted(placement.keys):
                self.acquire(adapter(int(key[0][1:]), key[1]))
            assert all(self.pins[key] for key in placement.keys)

    @invariant()
    def each_key_in_one_slot_in_lru_order_holding_its_kv(self) -> None:
        table = self.table
        assert table.resident() == self.lru
        assert all(key in self.lru for key in self.pins)
        slots = [table.slot_of(key) for key in self.lru]
        assert sorted(cast(list[int], slots) + table._free) == list(range(table.num_slots))  # no slot lost
        for key, slot in zip(self.lru, slots):
            value = 10 * int(key[0][1:]) + key[1]
            assert torch.all(table.kv.keys[:, slot] == value) and torch.all(table.kv.values[:, slot] == -value)
            assert torch.all(table.kv.gates[slot] == value)


SlotMachine.TestCase.settings = hypothesis.settings(max_examples=80, stateful_step_count=30, deadline=None,
                                                    database=None)
test_slot_table_against_a_model = SlotMachine.TestCase
