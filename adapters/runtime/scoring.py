"""Rank classification by label log-likelihood on the cached path (training eval and serving).

For a request with prompt tokens ``x`` and label verbalisers ``y_1..y_K``, the score of label
``k`` is ``sum_j log p(y_k[j] | x, y_k[:j])``. ``plan_labels`` gives the distinct rows
``x + y_k[:-1]`` to run (single-token verbalisers share one row per request) and, per label
token, which row and offset predicts it; ``LabelPlan.add_to`` puts a request's rows and terms into
a step (``talora.adapters.runtime.batching``), where they are packed with every other request's rows
of any task; ``talora.adapters.runtime.decoding.run_step`` sums the terms on the device, so only the
K scores of each request leave it. ``score_labels`` is the whole path without a KV cache; the
server's engine runs the same plan with one.

Example: prompt ``[7, 8]``, labels ``[[3], [4, 5]]`` -> rows ``[(7, 8), (7, 8, 4)]``, each read
from offset 1 (the prompt's last token); label 0 = logp(3 | row 0 @1), label 1 = logp(4 | row 1
@1) + logp(5 | row 1 @2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from talora.adapters.model.talora_model import PrefixKV, SlotKV, TaloraModel
from talora.adapters.runtime.batching import Row, StepBuffers, StepPlan
from talora.adapters.runtime.decoding import run_step


@dataclass
class ScoreRequest:
    prompt_ids: list[int]  # the task's rendered prompt
    label_ids: list[list[int]]  # verbaliser tokens of each label, in label order
    slot: int  # task slot in the SlotKV table


@dataclass(frozen=True)
class LabelPlan:
    """The rows one request runs to score its labels, and each label token's place in them."""

    rows: list[tuple[int, ...]]  # distinct rows ``prompt + verbaliser[:-1]``
    first_read: int  # offset read first in every row: the prompt's last token
    terms: list[tuple[int, int, int, int]]  # (row, read number in the row, target token, label)
    num_labels: int

    def add_to(self, plan: StepPlan, slot: int, starts: Sequence[int] | None = None) -> int:
        """Append this request's rows (at cache ``starts``) and terms to a step; returns its first score group."""
        group = plan.num_groups
        plan.num_groups += self.num_labels
        first_reads = [plan.add_row(Row(tokens, 0, starts[j] if starts else 0, slot, self.first_read))
                       for j, tokens in enumerate(self.rows)]
        for row, read, target, label in self.terms:
            plan.add_term(first_reads[row] + read, target, group + label)
        return group

    @property
    def cache_tokens(self) -> int:
        return sum(len(row) for row in self.rows)


def plan_labels(prompt_ids: Sequence[int], label_ids: Sequence[Sequence[int]]) -> LabelPlan:
    """The rows and terms that score every label of ``label_ids`` after ``prompt_ids``."""
    prompt = tuple(prompt_ids)
    index: dict[tuple[int, ...], int] = {}
    terms = []
    for label, verb in enumerate(label_ids):
        row = index.setdefault(prompt + tuple(verb[:-1]), len(index))
        terms += [(row, j, token, label) for j, token in enumerate(verb)]
    return LabelPlan(list(index), len(prompt) - 1, terms, len(label_ids))


def score_labels(model: TaloraModel, prefix: PrefixKV, slots: SlotKV,
                 requests: list[ScoreRequest]) -> list[torch.Tensor]:
    """Log-likelihood of every label of every request: a list of ``(K_r,)`` float32 tensors."""
    if not requests:
        return []
    plan = StepPlan()
    groups = [plan_labels(req.prompt_ids, req.label_ids).add_to(plan, req.slot) for req in requests]
    step = StepBuffers.make(model.lm.device, reused=False).prepare(plan, cached=False)
    scores = run_step(model, step, prefix, slots).scores
    return [scores[g:g + len(req.label_ids)] for g, req in zip(groups, requests)]
