"""Batch metadata for ``forward_cached``, built in one place from rows.

A step is a list of ``Row``s of any task and phase (a fresh prefill, a label-scoring row, a
decode row with tokens already cached). ``StepBuffers.make`` preallocates host and device buffers
once; ``StepBuffers.prepare(rows)`` fills them in place each step (vectorised, one copy per
dtype to the device, non-blocking from pinned memory on CUDA) and returns a ``PackedStep``:
the flat token ids, the ``BatchMeta`` the kernels read, the flat indices of the positions whose
next-token distribution is wanted, and the label-scoring terms over those reads (``StepPlan``). Training
(``BatchMeta.prefill``, ``objective.pack_batch``), evaluation, label scoring, the server's engine, the
CUDA graphs of decode steps and the benchmarks all come through here.

Example: a scoring row of 4 tokens at cache range 0.., slot 2, read from its last position, and
a decode row with 6 tokens already cached at 100.., slot 0, read at its one token::

    rows = [Row([5, 6, 7, 8], past=0, start=0, slot=2, first_read=3),
            Row([42], past=6, start=100, slot=0, first_read=0)]
    -> cu_seqlens_q = [0, 4, 5]; positions = [0, 1, 2, 3, 6]; slot_ids = [2, 0]
       k_starts = [0, 100]; kv_lens = [4, 7]; write_index = [0, 1, 2, 3, 106]
       read_index = [3, 4]

``StepBuffers.static(device, rows=4, pad_index=999)`` lays out steps of one-token rows padded to 4
rows (CUDA graphs replay fixed addresses): the decode row above alone is followed by three pad rows
of token 0, slot 0, position 0, which read and write only cache position 999::

    -> cu_seqlens_q = [0, 1, 2, 3, 4]; k_starts = [100, 999, 999, 999]; kv_lens = [7, 1, 1, 1]
       write_index = [106, 999, 999, 999]; read_index = [0]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class BatchMeta:
    """Layout of one packed batch of request tokens for ``forward_cached``.

    Example: two rows of 3 and 2 new tokens, slots 4 and 0, fresh prefill without a cache::

        cu_seqlens_q = [0, 3, 5]; positions = [0, 1, 2, 0, 1]; slot_ids = [4, 0]
        k_starts = [0, 3]; kv_lens = [3, 2]; write_index = None

    With a cache of 16 tokens per row, decoding one token for each row after that prefill::

        cu_seqlens_q = [0, 1, 2]; positions = [3, 2]; k_starts = [0, 16]; kv_lens = [4, 3]
        write_index = [3, 18]
    """

    cu_seqlens_q: torch.Tensor  # (B+1,) int32 cumulative new-token counts
    positions: torch.Tensor  # (N,) int64 own position of each new token (0 = first input token)
    slot_ids: torch.Tensor  # (B,) int32 task slot of each row
    k_starts: torch.Tensor  # (B,) int32 first own key of each row (in the cache, or in the new tokens)
    kv_lens: torch.Tensor  # (B,) int32 own keys visible to each row, new tokens included
    write_index: torch.Tensor | None = None  # (N,) int64 cache index of each new token; None: no cache
    max_q_len: int | None = None  # host int: most new tokens in a row (kernels size grids without a read-back)
    max_kv_len: int | None = None  # host int: largest ``kv_lens`` (a long decode step may run split-K)
    # host ints: cu_seqlens_q, k_starts, kv_lens and slot_ids back to back, so that the reference kernel's
    # row loop reads them without a device read per layer; None: it reads the tensors
    host_layout: list[int] | None = None

    @classmethod
    def prefill(cls, lengths: list[int], slot_ids: list[int], device="cpu") -> BatchMeta:
        """A fresh packed prefill of rows with ``lengths`` tokens and no cache (no token ids needed)."""
        plan = StepPlan([Row(range(n), slot=slot) for n, slot in zip(lengths, slot_ids)])
        return StepBuffers.make(device, reused=False).prepare(plan, cached=False).meta


@dataclass
class Row:
    """One row of a step: new tokens, what is already cached, where, for which task, what is read."""

    tokens: Sequence[int]  # new token ids of this row in this step
    past: int = 0  # tokens of this row already in the cache (0 for a prefill)
    start: int = 0  # first cache position of the row's range (ignored without a cache)
    slot: int = 0  # task slot
    first_read: int | None = None  # offset of the first new token whose logits are wanted (to the end); None: none


@dataclass
class StepPlan:
    """The rows of one step and the label log-probability terms over their reads.

    A term adds ``logp(target | read)`` to score ``group``; reads are numbered across the step in
    row order (``add_row`` returns a row's first read number).
    """

    rows: list[Row] = field(default_factory=list)
    term_reads: list[int] = field(default_factory=list)  # (P,) index into the step's reads
    term_targets: list[int] = field(default_factory=list)  # (P,) token id whose log-probability is wanted
    term_groups: list[int] = field(default_factory=list)  # (P,) score the term adds to
    sample_reads: list[int] = field(default_factory=list)  # (D,) reads whose next token is picked
    fed_at: list[int] = field(default_factory=list)  # (F,) flat token whose id is a pick of the step before
    fed_from: list[int] = field(default_factory=list)  # (F,) that pick's sample read in the step before
    num_groups: int = 0
    num_reads: int = 0
    num_tokens: int = 0

    def add_row(self, row: Row, sample: bool = False) -> int:
        """Append ``row``; returns the number of its first read. ``sample``: its last read picks a next token."""
        first = self.num_reads
        self.rows.append(row)
        self.num_tokens += len(row.tokens)
        if row.first_read is not None:
            self.num_reads += len(row.tokens) - row.first_read
        if sample:
            self.sample_reads.append(self.num_reads - 1)
        return first

    def add_decode_row(self, tokens: Sequence[int], start: int, slot: int) -> int:
        """Append the row that feeds the last of ``tokens`` (the rest cached at ``start``) and picks the next."""
        return self.add_row(Row(tokens[-1:], len(tokens) - 1, start, slot, 0), sample=True)

    def add_fed_decode_row(self, past: int, start: int, slot: int, picked_at: int) -> int:
        """Append a decode row whose token is not on the host yet: the step before picked it on the
        device at its sample read ``picked_at`` (``past`` tokens before it are cached at ``start``).
        ``launch_step`` writes it into the step's input ids there, so the host need not wait for it."""
        self.fed_at.append(self.num_tokens)
        self.fed_from.append(picked_at)
        return self.add_row(Row((0,), past, start, slot, 0), sample=True)

    def add_term(self, read: int, target: int, group: int) -> None:
        self.term_reads.append(read)
        self.term_targets.append(target)
        self.term_groups.append(group)


@dataclass
class PackedStep:
    """Views of ``StepBuffers`` for one step; valid until the next ``prepare``."""

    input_ids: torch.Tensor  # (N,) int64 flat new tokens
    meta: BatchMeta
    read_index: torch.Tensor  # (R,) int64 flat positions whose next-token distribution is read
    term_reads: torch.Tensor  # (P,) int64 index into the R reads
    term_targets: torch.Tensor  # (P,) int64 token ids
    term_groups: torch.Tensor  # (P,) int64 score index
    sample_reads: torch.Tensor  # (D,) int64 index into the R reads: rows that pick a next token
    fed_at: torch.Tensor  # (F,) int64 flat tokens whose ids are the step before's picks ...
    fed_from: torch.Tensor  # (F,) int64 ... at these sample reads of it
    num_groups: int


def feed_picks(input_ids: torch.Tensor, fed_at: torch.Tensor, fed_from: torch.Tensor,
               previous: torch.Tensor | None) -> None:
    """Write into ``input_ids`` (in place, on the device) the tokens of a step's fed decode rows
    (``StepPlan.add_fed_decode_row``): token ``fed_at[i]`` becomes ``previous[fed_from[i]]``, the
    step before's pick at that sample read. Nothing to do when no row is fed."""
    if not len(fed_at):
        return
    if previous is None:
        raise ValueError("previous: the step has fed decode rows but no previous picks were given")
    input_ids.index_copy_(0, fed_at, previous[fed_from])


_LONG_FIELDS = ("tokens", "positions", "write", "reads", "term_reads", "term_targets", "term_groups", "sample_reads",
                "fed_at", "fed_from")
_INT_FIELDS = ("cu", "slots", "k_starts", "kv_lens")


@dataclass
class StepBuffers:
    """Preallocated metadata buffers (vLLM ``LoRAKernelMeta``): ``make`` once, ``prepare`` every step.

    ``host_long``/``host_int`` hold every field of a step back to back (int64 and int32); on
    CUDA they are pinned (when reused) and copied to ``device_long``/``device_int`` without
    blocking; on CPU the device buffers are the host ones. They grow (doubling) when a step does not fit.
    """

    device: torch.device
    host_long: torch.Tensor  # (capacity_long,) int64
    host_int: torch.Tensor  # (capacity_int,) int32
    device_long: torch.Tensor  # (capacity_long,) int64 on ``device``
    device_int: torch.Tensor  # (capacity_int,) int32 on ``device``
    copied: torch.cuda.Event | None = None  # last copy to the device; the host buffers are reused after it
    static_rows: int = 0  # > 0: static mode, every step padded to this many rows (see ``static``)
    pad_index: int = 0  # static mode: the one cache position pad rows read and write

    @classmethod
    def make(cls, device="cpu", max_tokens: int = 256, max_rows: int = 16, reused: bool = True) -> StepBuffers:
        """Buffers for steps of up to ``max_tokens`` tokens and ``max_rows`` rows (they grow past them).
        ``reused=False``: for one step only, so the host side is not pinned (pinning costs more than it saves)."""
        device = torch.device(device)
        pin = device.type == "cuda" and reused
        host_long = torch.empty(10 * max_tokens, dtype=torch.int64, pin_memory=pin)
        host_int = torch.empty(4 * max_rows + 1, dtype=torch.int32, pin_memory=pin)
        if device.type == "cpu":
            return cls(device, host_long, host_int, host_long, host_int)
        return cls(device, host_long, host_int, torch.empty_like(host_long, device=device),
                   torch.empty_like(host_int, device=device))

    @classmethod
    def static(cls, device, rows: int, pad_index: int) -> StepBuffers:
        """Static mode, for CUDA graphs: steps of at most ``rows`` one-token rows, padded to ``rows`` with
        rows of token 0, slot 0 and position 0 that read and write only cache position ``pad_index``.
        They never grow, so the input ids and the ``BatchMeta`` tensors of every step keep their
        addresses; only the fields after them (reads, sample reads, fed tokens) vary in size."""
        return replace(cls.make(device, rows, rows), static_rows=rows, pad_index=pad_index)

    def prepare(self, plan: StepPlan, cached: bool = True) -> PackedStep:
        """Fill the buffers for ``plan``; ``cached=False``: no KV cache, the rows' keys are their new tokens."""
        rows = plan.rows
        if self.static_rows:
            if len(rows) > self.static_rows or any(len(r.tokens) != 1 for r in rows):
                raise ValueError(f"plan: static buffers take at most {self.static_rows} rows of one token")
            rows = rows + [Row((0,), start=self.pad_index)] * (self.static_rows - len(rows))
        layout = _layout(plan, rows, cached)
        long_sizes = [len(layout[name]) for name in _LONG_FIELDS]
        int_sizes = [len(layout[name]) for name in _INT_FIELDS]
        self._reserve(sum(long_sizes), sum(int_sizes))
        longs = self._fill(self.host_long, self.device_long, [layout[n] for n in _LONG_FIELDS], long_sizes)
        ints = self._fill(self.host_int, self.device_int, [layout[n] for n in _INT_FIELDS], int_sizes)
        tokens, positions, write, reads, term_reads, term_targets, term_groups, sample_reads, fed_at, fed_from = longs
        cu, slots, k_starts, kv_lens = ints
        host = np.concatenate([layout["cu"], layout["k_starts"], layout["kv_lens"], layout["slots"]]).tolist()
        meta = BatchMeta(cu, positions, slots, k_starts, kv_lens, write if cached else None,
                         int(layout["q_lens"].max(initial=0)), int(layout["kv_lens"].max(initial=0)), host)
        return PackedStep(tokens, meta, reads, term_reads, term_targets, term_groups, sample_reads,
                          fed_at, fed_from, plan.num_groups)

    def _reserve(self, longs: int, ints: int) -> None:
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy still reads the host buffers
        if longs > self.host_long.numel() or ints > self.host_int.numel():
            if self.static_rows:
                raise ValueError("static step buffers cannot grow: their addresses are baked into CUDA graphs")
            grown = StepBuffers.make(self.device, max(longs, 2 * self.host_long.numel()) // 10 + 1,
                                     max(ints, 2 * self.host_int.numel()) // 4 + 1, self.host_long.is_pinned())
            self.host_long, self.host_int = grown.host_long, grown.host_int
            self.device_long, self.device_int = grown.device_long, grown.device_int

    def _fill(self, host: torch.Tensor, device: torch.Tensor, arrays: list[np.ndarray],
              sizes: list[int]) -> list[torch.Tensor]:
        total = sum(sizes)
        np.concatenate(arrays, out=host.numpy()[:total], casting="unsafe")
        if device is not host:
            device[:total].copy_(host[:total], non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        bounds = list(itertools.accumulate(sizes, initial=0))
        return [device[a:b] for a, b in zip(bounds, bounds[1:])]


def _ints(values, count: int) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64, count=count)


def _layout(plan: StepPlan, rows: list[Row], cached: bool) -> dict[str, np.ndarray]:
    """Every metadata array of a step, computed with vector operations from ``rows`` (``plan``'s, maybe padded)."""
    count = len(rows)
    lengths = _ints((len(r.tokens) for r in rows), count)
    past = _ints((r.past for r in rows), count)
    cu = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    row_of_token = np.repeat(np.arange(count), lengths)
    positions = past[row_of_token] + np.arange(cu[-1]) - cu[:-1][row_of_token]
    starts = _ints((r.start for r in rows), count) if cached else cu[:-1]
    first = _ints((len(r.tokens) if r.first_read is None else r.first_read for r in rows), count)
    read_counts = lengths - first
    read_offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(read_counts, out=read_offsets[1:])
    row_of_read = np.repeat(np.arange(count), read_counts)
    reads = cu[:-1][row_of_read] + first[row_of_read] + np.arange(read_offsets[-1]) - read_offsets[:-1][row_of_read]
    return {"tokens": _ints(itertools.chain.from_iterable(r.tokens for r in rows), int(cu[-1])),
            "positions": positions, "write": starts[row_of_token] + positions if cached else positions[:0],
            "reads": reads, "term_reads": np.asarray(plan.term_reads, dtype=np.int64),
            "term_targets": np.asarray(plan.term_targets, dtype=np.int64),
            "term_groups": np.asarray(plan.term_groups, dtype=np.int64),
            "sample_reads": np.asarray(plan.sample_reads, dtype=np.int64),
            "fed_at": np.asarray(plan.fed_at, dtype=np.int64), "fed_from": np.asarray(plan.fed_from, dtype=np.int64),
            "cu": cu, "slots": _ints((r.slot for r in rows), count), "k_starts": starts,
            "kv_lens": past + lengths, "q_lens": lengths}
