"""CUDA graphs of decode-only steps, one per (rows bucket, longest-cache bucket).

A decode-only step (every row feeds the one token it picked last step and picks the next) runs
the same kernels every time, and on a GPU the Python launch overhead of ~20 ops x L layers rivals
their device time at small batches. ``DecodeGraphs`` captures ``forward_cached``, the LM head and
the log-softmax of such a step once per bucket into static buffers, and replays it:

1. the step's rows are written into pinned host arrays, padded to the bucket with rows that read
   and write one scratch cache position (``scratch_index``, a position no request range covers),
   and copied without blocking into the static device metadata; the tokens of fed rows (picked by
   the step before and still on the device, ``StepPlan.add_fed_decode_row``) are written there by
   ``feed_picks``, as on the eager path;
2. the graph replays; the first ``D`` rows of its static log-probabilities are the step's.

The cache-length bucket is the ``max_kv_len`` the graph was captured with, so the dispatcher's
split-K choice (``talora.kernels.dispatch``) is baked in and stays valid for shorter rows. The
prefix, the slot table and the KV pool are persistent tensors updated in place, so a graph stays
valid across adapter loads. ``eager=True`` runs the same static-buffer path without capturing:
that is how the CPU tests check the padding and metadata (capture itself needs CUDA).

Example: 3 decode rows with at most 300 cached keys replay the graph of bucket (4, 512); row 4
is a pad row: slot 0, ``k_starts = kv_lens - 1 + write = scratch``, one key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from talora.adapters.model.talora_model import KVCache, PrefixKV, SlotKV, TaloraModel
from talora.adapters.runtime.batching import BatchMeta, StepPlan, feed_picks

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


@dataclass
class _Static:
    """The static buffers of one bucket: host (pinned on CUDA) and device, and the views a graph reads."""

    host: torch.Tensor  # (7, B) int64: input ids, positions, write index, k_starts, kv_lens, then the first F
    # columns of fed_at and fed_from (``StepPlan``'s, F fed rows)
    device_long: torch.Tensor  # (7, B) int64 on the device
    slots_host: torch.Tensor  # (B,) int32
    slots_device: torch.Tensor  # (B,) int32
    meta: BatchMeta  # views of the device buffers, max_kv_len = the cache bucket
    k_starts: torch.Tensor  # (B,) int32, filled on the device from ``device_long``
    kv_lens: torch.Tensor  # (B,) int32
    copied: torch.cuda.Event | None = None  # the last copy out of ``host``; it is rewritten after it


class DecodeGraphs:
    """Decode-only steps replayed from CUDA graphs (or, ``eager=True``, run from the same buffers)."""

    def __init__(self, model: TaloraModel, prefix: PrefixKV, slots: SlotKV, cache: KVCache,
                 scratch_index: int, eager: bool = False):
        self.model, self.prefix, self.slots, self.cache = model, prefix, slots, cache
        self.scratch_index, self.eager = scratch_index, eager
        self.device = model.lm.device
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, _Static, torch.Tensor]] = {}
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
        graph, static, logprobs = self._graphs[(rows, kv)]
        self._fill(static, plan, previous)
        if graph is None:
            return self._forward(static)[: len(plan.rows)]
        graph.replay()
        return logprobs[: len(plan.rows)]

    def _make_static(self, rows: int, kv_bucket: int) -> _Static:
        pin = self.device.type == "cuda"
        host = torch.zeros(7, rows, dtype=torch.int64, pin_memory=pin)
        slots_host = torch.zeros(rows, dtype=torch.int32, pin_memory=pin)
        host[2:4], host[4] = self.scratch_index, 1  # every row a pad row
        device_long, slots_device = host.to(self.device), slots_host.to(self.device)
        k_starts, kv_lens = device_long[3].int(), device_long[4].int()
        cu = torch.arange(rows + 1, dtype=torch.int32, device=self.device)
        meta = BatchMeta(cu, device_long[1], slots_device, k_starts, kv_lens, device_long[2], 1, kv_bucket)
        return _Static(host, device_long, slots_host, slots_device, meta, k_starts, kv_lens)

    def _fill(self, static: _Static, plan: StepPlan, previous: torch.Tensor | None) -> None:
        """Write ``plan``'s rows (then pad rows) into the static buffers, without blocking on CUDA."""
        n = len(plan.rows)
        if static.copied is not None:
            static.copied.synchronize()  # the copy of this bucket's last step may still read ``host``
        host = static.host.numpy()
        host[0, :n] = [r.tokens[0] for r in plan.rows]
        past = np.fromiter((r.past for r in plan.rows), dtype=np.int64, count=n)
        starts = np.fromiter((r.start for r in plan.rows), dtype=np.int64, count=n)
        host[1, :n], host[2, :n], host[3, :n], host[4, :n] = past, starts + past, starts, past + 1
        host[0, n:], host[1, n:], host[2:4, n:], host[4, n:] = 0, 0, self.scratch_index, 1
        fed = len(plan.fed_at)
        host[5, :fed], host[6, :fed] = plan.fed_at, plan.fed_from  # a decode-only step's token i is its row i
        static.slots_host.numpy()[:n] = [r.slot for r in plan.rows]
        static.slots_host.numpy()[n:] = 0
        static.device_long.copy_(static.host, non_blocking=True)
        static.slots_device.copy_(static.slots_host, non_blocking=True)
        if self.device.type == "cuda":
            static.copied = torch.cuda.Event()
            static.copied.record()
        feed_picks(static.device_long[0], static.device_long[5, :fed], static.device_long[6, :fed], previous)
        # The kernels read int32 starts and lengths: converted on the device, into the captured storage.
        static.k_starts.copy_(static.device_long[3])
        static.kv_lens.copy_(static.device_long[4])

    def _forward(self, static: _Static) -> torch.Tensor:
        model = self.model
        hidden = model.forward_cached(static.device_long[0], static.meta, self.prefix, self.slots, self.cache)
        return torch.log_softmax(model.lm.logits(hidden).float(), dim=-1)

    def _capture(self, rows: int, kv_bucket: int):
        static = self._make_static(rows, kv_bucket)
        if self.eager:
            return None, static, torch.empty(0)
        # Warm up on a side stream (Triton compiles, the allocator settles): pad rows only, so
        # the writes land on the scratch position and no request's cache changes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self._forward(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            logprobs = self._forward(static)
        return graph, static, logprobs
