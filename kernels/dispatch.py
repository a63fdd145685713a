"""Choose between the Triton kernels and their reference twins, in one place.

``auto`` (default, or env ``TALORA_KERNELS``) runs Triton on CUDA tensors of a dtype the kernels
support (float32, bfloat16, float16) when triton imports, and the reference otherwise (CPU
tensors, float64). ``triton`` and ``reference`` force one side; forced ``triton`` also takes CPU
tensors when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the CPU test suite), and
raises otherwise. Triton is imported on first use, so ``import talora.kernels`` works without it.
"""

from __future__ import annotations

import functools
import os

import torch

from talora.kernels.reference import gated_prefix_attention_ref, lowrank_prompt_ref

_BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_backend = os.environ.get("TALORA_KERNELS", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"TALORA_KERNELS must be one of {_BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """Force ``triton`` or ``reference``, or go back to ``auto``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports in this process."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    if _backend == "reference":
        return False
    if _backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend forced to 'triton' but triton does not import")
        return True
    return t.is_cuda and t.dtype in _TRITON_DTYPES and triton_available()


def lowrank_prompt(fast_weights, basis, slot_ids, row_offsets, out, scale):
    """See :func:`talora.kernels.reference.lowrank_prompt_ref` for the contract."""
    if _use_triton(out):
        from talora.kernels.lowrank_prompt import lowrank_prompt as lowrank_prompt_triton

        return lowrank_prompt_triton(fast_weights, basis, slot_ids, row_offsets, out, scale)
    return lowrank_prompt_ref(fast_weights, basis, slot_ids, row_offsets, out, scale)


def gated_prefix_attention(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                           slot_k, slot_v, slot_ids, gate, softmax_scale,
                           own_in_task=False, gated=True, out=None, *, max_q_len=None):
    """See :func:`talora.kernels.reference.gated_prefix_attention_ref` for the contract."""
    if _use_triton(q):
        from talora.kernels.gated_attention import gated_prefix_attention as attention_triton

        return attention_triton(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                                slot_k, slot_v, slot_ids, gate, softmax_scale,
                                own_in_task=own_in_task, gated=gated, out=out, max_q_len=max_q_len)
    return gated_prefix_attention_ref(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                                      slot_k, slot_v, slot_ids, gate, softmax_scale,
                                      own_in_task=own_in_task, gated=gated, out=out, max_q_len=max_q_len)
