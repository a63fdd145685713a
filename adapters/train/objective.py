"""The training loss: next-token loss on the answer tokens only, on the cached path.

A batch of examples of any tasks is packed into one row per example, ``prompt + target[:-1]``;
the shared prompt's keys/values are computed once per batch and each task's prompt once per
batch (``shared_kv``, ``task_kv``), exactly as serving does, and logits are taken only at the
positions that predict a target token. ``AnswerLoss`` is an ``nn.Module`` so that
``DistributedDataParallel`` can wrap it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from talora.adapters.model.talora_model import BatchMeta, TaloraModel
from talora.adapters.train.data import EncodedExample
from talora.kernels.dispatch import kernel_backend


@dataclass
class PackedBatch:
    """Packed rows of one training batch.

    Example: task ``a`` prompt [5, 6] target [9] and task ``b`` prompt [7] target [3, 4]::

        input_ids = [5, 6, 7, 3]; lengths = [2, 2]; task_names = ["a", "b"]; slot_ids = [0, 1]
        target_positions = [1, 2, 3]; target_ids = [9, 3, 4]
    """

    input_ids: torch.Tensor  # (N,) int64 packed tokens of every row
    lengths: list[int]  # (B,) tokens per row
    slot_ids: list[int]  # (B,) index into task_names of each row's task
    task_names: list[str]  # (S,) distinct tasks of the batch, sorted
    target_positions: torch.Tensor  # (K,) int64 packed positions whose next token is a target
    target_ids: torch.Tensor  # (K,) int64 the target tokens

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.lengths, self.slot_ids, self.task_names,
                           self.target_positions.to(device), self.target_ids.to(device))


def pack_batch(items: list[tuple[str, EncodedExample]]) -> PackedBatch:
    """Pack ``(task name, example)`` pairs into one ``PackedBatch``."""
    names = sorted({task for task, _ in items})
    slot_of = {name: i for i, name in enumerate(names)}
    tokens: list[int] = []
    lengths: list[int] = []
    slots: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for task, ex in items:
        row = ex.prompt_ids + ex.target_ids[:-1]
        start = len(tokens)
        first = start + len(ex.prompt_ids) - 1
        positions.extend(range(first, first + len(ex.target_ids)))
        targets.extend(ex.target_ids)
        tokens.extend(row)
        lengths.append(len(row))
        slots.append(slot_of[task])
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return PackedBatch(as_long(tokens), lengths, slots, names, as_long(positions), as_long(targets))


def answer_logits(model: TaloraModel, batch: PackedBatch) -> torch.Tensor:
    """Logits ``(K, V)`` (float32) at the target positions of ``batch``."""
    prefix = model.shared_kv()
    slots = model.task_slots(prefix, batch.task_names)
    meta = BatchMeta.prefill(batch.lengths, batch.slot_ids, device=batch.input_ids.device)
    hidden = model.forward_cached(batch.input_ids, meta, prefix, slots)
    return model.lm.logits(hidden[batch.target_positions]).float()


def differentiable_kernels():
    """Use the PyTorch reference kernels inside: the Triton twins (picked on CUDA) have no backward."""
    return kernel_backend("reference")


class AnswerLoss(nn.Module):
    """``forward(batch)`` -> mean cross-entropy over the batch's answer tokens.

    With gradients enabled the forward runs on the reference kernels, whose autograd the
    backward pass needs; under ``torch.no_grad`` it uses whatever ``talora.kernels`` dispatches.
    """

    def __init__(self, model: TaloraModel):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.cross_entropy(answer_logits(self.model, batch), batch.target_ids)
        with differentiable_kernels():
            return F.cross_entropy(answer_logits(self.model, batch), batch.target_ids)
