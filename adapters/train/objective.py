"""The training loss: next-token loss on the answer tokens only, on the cached path.

A batch of examples of any tasks is packed into one step (``StepPlan``) of one row per example;
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

from talora.adapters.model.talora_model import TaloraModel
from talora.adapters.runtime.batching import Row, StepBuffers, StepPlan
from talora.adapters.train.data import EncodedExample
from talora.kernels.dispatch import kernel_backend


@dataclass
class PackedBatch:
    """One training batch as one step of ``talora.adapters.runtime.batching``: a row per example,
    ``prompt + target[:-1]``, read from its last prompt token on, so that its reads predict the targets.

    Example: task ``a`` prompt [5, 6] target [9] and task ``b`` prompt [7] target [3, 4]::

        plan.rows = [Row([5, 6], slot=0, first_read=1), Row([7, 3], slot=1, first_read=0)]
        task_names = ["a", "b"]; target_ids = [9, 3, 4]
        -> input_ids = [5, 6, 7, 3]; read_index = [1, 2, 3]
    """

    plan: StepPlan  # (B,) rows, one per example; a row's slot indexes task_names
    task_names: list[str]  # (S,) distinct tasks of the batch, sorted
    target_ids: torch.Tensor  # (K,) int64 the target token of each of the step's K reads

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.plan, self.task_names, self.target_ids.to(device))


def pack_batch(items: list[tuple[str, EncodedExample]]) -> PackedBatch:
    """Pack ``(task name, example)`` pairs into one ``PackedBatch``."""
    names = sorted({task for task, _ in items})
    plan = StepPlan()
    for task, ex in items:
        tokens = ex.prompt_ids + ex.target_ids[:-1]
        plan.add_row(Row(tokens, slot=names.index(task), first_read=len(tokens) - len(ex.target_ids)))
    targets = [t for _, ex in items for t in ex.target_ids]
    return PackedBatch(plan, names, torch.tensor(targets, dtype=torch.long))


def answer_logits(model: TaloraModel, batch: PackedBatch) -> torch.Tensor:
    """Logits ``(K, V)`` (float32) at the positions of ``batch`` that predict a target, on its device."""
    prefix = model.shared_kv()
    slots = model.task_slots(prefix, batch.task_names)
    step = StepBuffers.make(batch.target_ids.device, reused=False).prepare(batch.plan, cached=False)
    hidden = model.forward_cached(step.input_ids, step.meta, prefix, slots)
    return model.lm.logits(hidden[step.read_index]).float()


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
