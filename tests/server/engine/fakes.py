"""Fakes of the engine's unit tests: a model whose task KV names its adapter, so that a ``SlotTable``
runs without a frozen LM, and adapter versions that the slot table and the scheduler can read."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import torch

from talora.adapters.model.talora_model import SlotKV
from talora.server.engine.slots import SlotTable
from talora.server.metrics import Metrics

LAYERS, HEADS, TASK_PROMPT_LEN = 2, 2, 3


class FakeModel:
    """What a ``SlotTable`` reads of a ``TaloraModel``: the task KV of an adapter is filled with its
    ``fast`` value, so a slot shows whose KV it holds; ``broken`` adapters fail to compute."""

    def __init__(self) -> None:
        config = SimpleNamespace(num_layers=LAYERS, num_kv_heads=1, head_dim=2, num_heads=HEADS)
        self.lm = SimpleNamespace(config=config, dtype=torch.float32, device=torch.device("cpu"))
        self.cfg = SimpleNamespace(task_prompt_len=TASK_PROMPT_LEN)
        self.computed: list[float] = []
        self.broken: set[float] = set()

    def task_kv(self, prefix, fast: torch.Tensor, gate: torch.Tensor, basis) -> SlotKV:
        value = float(fast.flatten()[0])
        if value in self.broken:
            raise RuntimeError("task KV failed")
        self.computed.append(value)
        kv = torch.full((LAYERS, 1, TASK_PROMPT_LEN, 1, 2), value)
        return SlotKV(kv, -kv, gate)


def adapter(task: int, serial: int = 1) -> Any:
    """An adapter version of task ``t<task>``: its KV and gates are filled with ``10 * task + serial``; one
    label of one token (what the scheduler plans a score job with)."""
    value = 10 * task + serial
    return SimpleNamespace(key=(f"t{task}", serial), task=f"t{task}", fast=torch.full((TASK_PROMPT_LEN, 4), value),
                           gate=torch.full((LAYERS, HEADS), value), basis=None, label_ids=((1,),))


def make_table(num_slots: int) -> tuple[SlotTable, FakeModel]:
    """A slot table of ``num_slots`` slots on a ``FakeModel``, and the model."""
    model = FakeModel()
    return SlotTable(cast(Any, model), cast(Any, None), num_slots, Metrics()), model
