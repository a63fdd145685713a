"""CUDA graphs of decode-only steps, one per (rows bucket, longest-cache bucket).

A decode-only step (every row feeds the one token it picked last step and picks the next) runs
the same kernels every time, and on a GPU the Python launch overhead of ~20 ops x L layers rivals
their device time at small batches. ``DecodeGraphs`` captures ``forward_cached``, the LM head and
the log-softmax of such a step once per bucket into static buffers, and replays it:

1. the bucket's ``StepBuffers`` in static mode (``StepBuffers.static``) lay the step out, padded to
   the bucket with rows that read and write one scratch cache position (``scratch_index``, which
   no request range covers); the tokens of fed rows (picked by the step before and still on the
   device, ``StepPlan.add_fed_decode_row``) are written by ``feed_picks``, as on the eager path;
2. the graph replays; the first ``D`` rows of its static log-probabilities are the step's.

The cache-length bucket is the ``max_kv_len`` the graph was captured with, so the dispatcher's
split-K choice (``talora.kernels.dispatch``) is baked in and stays valid for shorter rows. The
prefix, the slot table and the KV pool are persistent tensors updated in place, so a graph stays
valid across adapter loads. ``eager=True`` runs the same static-buffer path without capturing:
that is how the CPU tests check the padding and metadata (capture itself needs CUDA).

Example: 3 decode rows with at most 300 cached keys replay the graph of bucket (4, 512); row 4
is a pad row (slot 0, one key, at the scratch position).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from talora.adapters.model.talora_model import KVCache, PrefixKV, SlotKV, TaloraModel
from talora.adapters.runtime.batching import PackedStep, StepBuffers, StepPlan, feed_picks
from talora.adapters.runtime.decoding import read_logprobs

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # rows of a captured decode step
KV_BUCKETS = tuple(2 ** i for i in range(8, 16))  # longest cache of a captured step: 256 .. 32,768 keys


def bucket_for(count: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``count``; None past the largest."""
    return next((b for b in buckets if b >= count), None)


def decode_only(plan: StepPlan) -> bool:
    """Whether every row of ``plan`` feeds one token, reads it, and picks the next (no label terms)."""
    rows = plan.rows
    return (bool(rows) and not plan.term_reads and plan.num_reads == len(rows)
            and plan.sample_reads == list(range(len(rows)))
            and all(len(r.tokens) == 1 and r.first_read == 0 and r.past > 0 for r in rows))


class DecodeGraphs:
    """Decode-only steps replayed from CUDA graphs (or, ``eager=True``, run from the same buffers)."""

    def __init__(self, model: TaloraModel, prefix: PrefixKV, slots: SlotKV, cache: KVCache,
                 scratch_index: int, eager: bool = False):
        self.model, self.prefix, self.slots, self.cache = model, prefix, slots, cache
        self.scratch_index, self.eager = scratch_index, eager
        self.device = model.lm.device
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, StepBuffers, torch.Tensor]] = {}
        self._pool = None if eager else torch.cuda.graph_pool_handle()

    @staticmethod
    def supported(device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (rows, longest cache) buckets captured so far, in capture order."""
        return list(self._graphs)

    @torch.no_grad()
    def run(self, plan: StepPlan, previous: torch.Tensor | None = None) -> torch.Tensor | None:
        """Log-probabilities ``(D, V)`` float32 of a decode-only ``plan``'s rows (a view of a static
        buffer, valid until the next call), or None when ``plan`` is not one or fits no bucket.
        ``previous``: the step before's picks on the device, which ``plan``'s fed rows read."""
        if not decode_only(plan):
            return None
        rows = bucket_for(len(plan.rows), ROW_BUCKETS)
        kv = bucket_for(max(r.past + 1 for r in plan.rows), KV_BUCKETS)
        if rows is None or kv is None:
            return None
        if (rows, kv) not in self._graphs:
            self._graphs[(rows, kv)] = self._capture(rows, kv)
        graph, buffers, logprobs = self._graphs[(rows, kv)]
        step = buffers.prepare(plan)  # the same addresses the graph was captured with
        feed_picks(step.input_ids, step.fed_at, step.fed_from, previous)
        if graph is None:
            return self._forward(step, kv)[: len(plan.rows)]
        graph.replay()
        return logprobs[: len(plan.rows)]

    def _forward(self, step: PackedStep, kv_bucket: int) -> torch.Tensor:
        meta = replace(step.meta, max_kv_len=kv_bucket)  # the bucket's split-K choice, baked into its graph
        hidden = self.model.forward_cached(step.input_ids, meta, self.prefix, self.slots, self.cache)
        return read_logprobs(self.model, hidden)

    def _capture(self, rows: int, kv_bucket: int):
        buffers = StepBuffers.static(self.device, rows, self.scratch_index)
        if self.eager:
            return None, buffers, torch.empty(0)
        step = buffers.prepare(StepPlan())  # pad rows only
        # Warm up on a side stream (Triton compiles, the allocator settles): pad rows only, so
        # the writes land on the scratch position and no request's cache changes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self._forward(step, kv_bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            logprobs = self._forward(step, kv_bucket)
        return graph, buffers, logprobs
