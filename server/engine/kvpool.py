"""The per-request KV cache: one ``KVCache`` pool and a first-fit allocator of contiguous ranges.

``gated_prefix_attention`` reads a row's own keys as ``k[k_starts[b] : k_starts[b] + kv_len]``,
so each row needs one contiguous range: a generation reserves ``prompt + max_new_tokens`` at
admission, a scoring row its own length for one step. Freed ranges merge with their neighbours.
One more position past ``capacity`` (``scratch``) belongs to no range: the pad rows of a decode
step replayed from a CUDA graph (``talora.adapters.runtime.graphs``) write and read there. Only the
engine's worker thread uses a ``KVPool``.
"""

from __future__ import annotations

import bisect

import torch

from talora.adapters.model.talora_model import KVCache


class KVPool:
    """``capacity`` token positions of per-layer keys/values with range allocation."""

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.cache = KVCache(num_layers, capacity + 1, num_kv_heads, head_dim, dtype, device)
        self.capacity = capacity
        self.scratch = capacity  # the position no range covers
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (start, length)

    @property
    def free_tokens(self) -> int:
        return sum(length for _, length in self._free)

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    def reset(self) -> None:
        """Free every range (after a failed step, when no job holds one any more)."""
        self._free = [(0, self.capacity)]

    def allocate(self, length: int) -> int | None:
        """Start of a free range of ``length`` tokens, or None when no range is large enough."""
        for i, (start, free) in enumerate(self._free):
            if free >= length:
                if free == length:
                    del self._free[i]
                else:
                    self._free[i] = (start + length, free - length)
                return start
        return None

    def release(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(i, (start, length))
        if i + 1 < len(self._free) and start + length == self._free[i + 1][0]:
            length += self._free.pop(i + 1)[1]
            self._free[i] = (start, length)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev_start, prev_len = self._free.pop(i - 1)
            self._free[i - 1] = (prev_start, prev_len + length)
