"""Choose between the Triton kernels and their reference twins, in one place.

``auto`` (default, or env ``TALORA_KERNELS``) runs Triton on CUDA tensors when triton imports
and the reference otherwise; tests force ``triton`` or ``reference`` with ``set_backend``.
"""

from __future__ import annotations

import os

import torch

from talora.kernels.reference import gated_prefix_attention_ref, lowrank_prompt_ref

_BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("TALORA_KERNELS", "auto")


def set_backend(name: str) -> None:
    """Force ``triton`` or ``reference``, or go back to ``auto``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def _use_triton(t: torch.Tensor) -> bool:
    # Filled in by the Triton implementation: until then everything runs the reference.
    return False


def lowrank_prompt(fast_weights, basis, slot_ids, row_offsets, out, scale):
    """See :func:`talora.kernels.reference.lowrank_prompt_ref` for the contract."""
    return lowrank_prompt_ref(fast_weights, basis, slot_ids, row_offsets, out, scale)


def gated_prefix_attention(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                           slot_k, slot_v, slot_ids, gate, softmax_scale,
                           own_in_task=False, gated=True, out=None):
    """See :func:`talora.kernels.reference.gated_prefix_attention_ref` for the contract."""
    return gated_prefix_attention_ref(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                                      slot_k, slot_v, slot_ids, gate, softmax_scale,
                                      own_in_task=own_in_task, gated=gated, out=out)
