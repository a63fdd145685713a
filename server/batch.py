"""One batch step's layout: rows of any task and phase, packed for ``forward_cached``.

A step mixes three kinds of rows in one packed forward over the shared KV cache pool:
label-scoring rows (``prompt + verbaliser[:-1]``, one step), generation prefills (the prompt)
and generation decodes (the last sampled token). ``pack`` builds the ``BatchMeta`` and the flat
indices of the positions whose next-token distribution the engine reads.

Example: a scoring row of 4 tokens at cache range 0.., slot 2, read at its last position,
and a decode row with 6 tokens already cached at 100.., slot 0::

    rows = [Row([5, 6, 7, 8], past=0, start=0, slot=2, reads=[3]),
            Row([42], past=6, start=100, slot=0, reads=[0])]
    -> cu_seqlens_q = [0, 4, 5]; positions = [0, 1, 2, 3, 6]; slot_ids = [2, 0]
       k_starts = [0, 100]; kv_lens = [4, 7]; write_index = [0, 1, 2, 3, 106]
       read_index = [3, 4]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from talora.adapters.talora_model import BatchMeta


@dataclass
class Row:
    tokens: list[int]  # new tokens of this row in this step
    past: int  # tokens of this row already in the cache (0 for a prefill)
    start: int  # first cache position of the row's range
    slot: int  # task slot
    reads: list[int] = field(default_factory=list)  # new-token offsets whose logits are wanted


def pack(rows: list[Row], device) -> tuple[torch.Tensor, BatchMeta, torch.Tensor]:
    """Flat token ids ``(N,)``, the step's ``BatchMeta``, and ``read_index (R,)`` into the N tokens."""
    lengths = [len(r.tokens) for r in rows]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    positions = [r.past + i for r in rows for i in range(len(r.tokens))]
    write = [r.start + p for r, n in zip(rows, lengths) for p in range(r.past, r.past + n)]
    reads = [offsets[b] + i for b, r in enumerate(rows) for i in r.reads]

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    meta = BatchMeta(cu_seqlens_q=tensor(offsets, torch.int32), positions=tensor(positions, torch.int64),
                     slot_ids=tensor([r.slot for r in rows], torch.int32),
                     k_starts=tensor([r.start for r in rows], torch.int32),
                     kv_lens=tensor([r.past + n for r, n in zip(rows, lengths)], torch.int32),
                     write_index=tensor(write, torch.int64))
    flat = tensor([t for r in rows for t in r.tokens], torch.int64)
    return flat, meta, tensor(reads, torch.int64)


def label_scores(logprobs: torch.Tensor, prompt_len: int, rows: list[tuple[int, ...]],
                 first_read: list[int], label_ids: tuple[tuple[int, ...], ...]) -> list[float]:
    """Sum of each label's verbaliser log-probabilities.

    ``logprobs (R, V)`` are the step's read positions; score row ``j`` of the job (``rows[j]``)
    has its reads ``prompt_len - 1 ..`` end of row at ``first_read[j]`` onwards in ``logprobs``.
    """
    row_of = {row: j for j, row in enumerate(rows)}
    scores = []
    for verb in label_ids:
        j = row_of[tuple(rows[0][:prompt_len]) + verb[:-1]]
        idx = torch.arange(len(verb), device=logprobs.device) + first_read[j]
        target = torch.tensor(verb, device=logprobs.device)
        scores.append(float(logprobs[idx, target].sum()))
    return scores
