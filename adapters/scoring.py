"""Rank classification by label log-likelihood on the cached path (training eval and serving).

For a request with prompt tokens ``x`` and label verbalisers ``y_1..y_K``, the score of label
``k`` is ``sum_j log p(y_k[j] | x, y_k[:j])``. Each distinct row ``x + y_k[:-1]`` is run once
(single-token verbalisers share one row per request), packed with every other request's rows
in one batch of any tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from talora.adapters.talora_model import BatchMeta, PrefixKV, SlotKV, TaloraModel


@dataclass
class ScoreRequest:
    prompt_ids: list[int]  # the task's rendered prompt
    label_ids: list[list[int]]  # verbaliser tokens of each label, in label order
    slot: int  # task slot in the SlotKV table


def _plan_rows(requests: list[ScoreRequest]):
    rows: list[list[int]] = []
    row_slots: list[int] = []
    index: dict[tuple[int, tuple[int, ...]], int] = {}
    reads = []  # per request, per label: (row, first position read)
    for r, req in enumerate(requests):
        per_label = []
        for verb in req.label_ids:
            tokens = tuple(req.prompt_ids + verb[:-1])
            key = (r, tokens)
            if key not in index:
                index[key] = len(rows)
                rows.append(list(tokens))
                row_slots.append(req.slot)
            per_label.append((index[key], len(req.prompt_ids) - 1))
        reads.append(per_label)
    return rows, row_slots, reads


def score_labels(model: TaloraModel, prefix: PrefixKV, slots: SlotKV,
                 requests: list[ScoreRequest]) -> list[torch.Tensor]:
    """Log-likelihood of every label of every request: a list of ``(K_r,)`` float32 tensors."""
    if not requests:
        return []
    rows, row_slots, reads = _plan_rows(requests)
    device = model.lm.device
    meta = BatchMeta.prefill([len(r) for r in rows], row_slots, device=device)
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)
    hidden = model.forward_cached(flat, meta, prefix, slots)
    starts = meta.cu_seqlens_q[:-1].tolist()
    results = []
    for req, per_label in zip(requests, reads):
        scores = []
        for verb, (row, first) in zip(req.label_ids, per_label):
            pos = starts[row] + first + torch.arange(len(verb), device=device)
            logp = torch.log_softmax(model.lm.logits(hidden[pos]).float(), dim=-1)
            scores.append(logp[torch.arange(len(verb), device=device), torch.tensor(verb, device=device)].sum())
        results.append(torch.stack(scores))
    return results
