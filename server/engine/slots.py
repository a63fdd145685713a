"""The device side of the adapter lifecycle: a fixed table of task-KV slots with LRU eviction.

The table is one ``SlotKV`` with ``num_slots`` rows (keys/values ``(L, S, n, H_kv, h)``, gates
``(S, L, H)``) that every batch passes to the kernels whole; a batch row names its slot by
index. A slot holds one ``AdapterVersion`` (keyed by ``AdapterVersion.key``), computed from its
host copy by ``TaloraModel.task_kv`` when first needed. Slots used by the batch being built or
by a generation in progress are pinned and never evicted; among the rest the least recently
used goes first. Only the engine's worker thread touches a ``SlotTable``.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict

import torch

from talora.adapters.model.talora_model import PrefixKV, SlotKV, TaloraModel
from talora.server.adapter_registry import AdapterVersion
from talora.server.metrics import Metrics


class NoFreeSlot(RuntimeError):
    """Every slot is pinned by work in progress."""


class Placement:
    """Keys that must be resident at once: ``missing`` of them need a slot, ``evictable`` slots hold
    other unpinned keys. Each ``add`` costs O(1), so admitting a step's jobs is linear."""

    def __init__(self, table: SlotTable, keys: set[tuple[str, int]], missing: int, evictable: int):
        self.table, self.keys, self.missing, self.evictable = table, keys, missing, evictable

    def fits(self) -> bool:
        return self.missing <= len(self.table._free) + self.evictable

    def add(self, key: tuple[str, int]) -> bool:
        """Add ``key`` if all keys then still fit; returns whether it was added."""
        if key in self.keys:
            return True
        resident = key in self.table._slot_of
        missing = self.missing + (not resident)
        evictable = self.evictable - (resident and not self.table._pins[key])
        if missing > len(self.table._free) + evictable:
            return False
        self.keys.add(key)
        self.missing, self.evictable = missing, evictable
        return True


class SlotTable:
    """``num_slots`` task-KV slots on the model's device."""

    def __init__(self, model: TaloraModel, prefix: PrefixKV, num_slots: int, metrics: Metrics):
        self.model, self.prefix, self.metrics = model, prefix, metrics
        mc, n = model.lm.config, model.cfg.task_prompt_len
        shape = (mc.num_layers, num_slots, n, mc.num_kv_heads, mc.head_dim)
        dtype, device = model.lm.dtype, model.lm.device
        self.kv = SlotKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                         torch.zeros(num_slots, mc.num_layers, mc.num_heads, dtype=dtype, device=device))
        self.num_slots = num_slots
        self._slot_of: OrderedDict[tuple[str, int], int] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(num_slots - 1, -1, -1))
        self._pins: Counter[tuple[str, int]] = Counter()

    def resident(self) -> list[tuple[str, int]]:
        return list(self._slot_of)

    def slot_of(self, key: tuple[str, int]) -> int | None:
        return self._slot_of.get(key)

    def can_place(self, keys: set[tuple[str, int]]) -> bool:
        """Whether all of ``keys`` could be resident at once without evicting pinned slots."""
        return self.placement(keys).fits()

    def placement(self, keys: set[tuple[str, int]]) -> Placement:
        """A set of keys to make resident together, grown one key at a time (``Placement.add``)."""
        missing = sum(1 for key in keys if key not in self._slot_of)
        evictable = sum(1 for key in self._slot_of if not self._pins[key] and key not in keys)
        return Placement(self, set(keys), missing, evictable)

    def acquire(self, adapter: AdapterVersion) -> int:
        """Pin ``adapter``'s slot, computing its KV first when it is not resident; returns the slot."""
        key = adapter.key
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
            self.metrics.slot_hits.inc()
        else:
            slot = self._free.pop() if self._free else self._evict_one()
            try:
                self._compute(adapter, slot)
            except BaseException:
                self._free.append(slot)
                raise
            self._slot_of[key] = slot
            self.metrics.slot_misses.inc()
            self.metrics.resident_tasks.set(len(self._slot_of))
        self._pins[key] += 1
        return slot

    def release(self, adapter: AdapterVersion) -> None:
        key = adapter.key
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def unpin_all(self) -> None:
        """Drop every pin (after a failed step, when no work holds a slot any more); KV stays resident."""
        self._pins.clear()

    def drop_stale(self, current: set[tuple[str, int]]) -> None:
        """Free unpinned slots of replaced or evicted adapters: nothing new will ask for them."""
        for key in [k for k in self._slot_of if k not in current and not self._pins[k]]:
            self._free.append(self._slot_of.pop(key))
        self.metrics.resident_tasks.set(len(self._slot_of))

    def _evict_one(self) -> int:
        for key in self._slot_of:  # oldest first
            if not self._pins[key]:
                self.metrics.slot_evictions.inc()
                return self._slot_of.pop(key)
        raise NoFreeSlot("every task slot is in use by requests in progress")

    @torch.no_grad()
    def _compute(self, adapter: AdapterVersion, slot: int) -> None:
        start = time.perf_counter()
        device, dtype = self.kv.keys.device, self.kv.keys.dtype
        fast = adapter.fast.to(device=device, dtype=dtype)[None]
        gate = adapter.gate.to(device=device, dtype=dtype)[None]
        basis = None if adapter.basis is None else adapter.basis.to(device=device, dtype=dtype)[None]
        kv = self.model.task_kv(self.prefix, fast, gate, basis)
        self.kv.keys[:, slot] = kv.keys[:, 0]
        self.kv.values[:, slot] = kv.values[:, 0]
        self.kv.gates[slot] = gate[0]
        self.metrics.slot_compute_seconds.observe(time.perf_counter() - start)
