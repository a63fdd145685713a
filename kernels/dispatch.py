"""Choose between the Triton kernels and their reference twins, in one place.

``auto`` (default, or env ``TALORA_KERNELS``) runs Triton on CUDA tensors of a dtype the kernels
support (float32, bfloat16, float16) when triton imports, and the reference otherwise (CPU
tensors, float64). ``triton`` and ``reference`` force one side; forced ``triton`` also takes CPU
tensors when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the CPU test suite), and
raises otherwise. Triton is imported on first use, so this module imports without it.

Decode steps over long caches go to the split-K kernel (``kernels/decode_attention.py``) when
Triton runs: see ``decode_splits`` for the rule. The reference computes both the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

from talora.kernels.reference import gated_prefix_attention_ref, lowrank_prompt_ref

_BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(name: str, where: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(f"{where} must be one of {_BACKENDS}, got {name!r}")
    return name


DEFAULT_BACKEND = _check(os.environ.get("TALORA_KERNELS", "auto"), "TALORA_KERNELS")  # decided once, at import
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("talora_kernel_backend", default=None)


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Run the block with ``name`` ("auto", "triton", "reference") forced. The override is scoped to
    this thread (a ``ContextVar``): training on the reference kernels in one thread leaves a server's
    worker thread on ``DEFAULT_BACKEND``."""
    token = _override.set(_check(name, "kernel backend"))
    try:
        yield
    finally:
        _override.reset(token)


def get_backend() -> str:
    """The backend calls in this thread use now: the innermost ``kernel_backend`` block's, else the default."""
    return _override.get() or DEFAULT_BACKEND


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports in this process."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    backend = get_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend forced to 'triton' but triton does not import")
        return True
    return t.is_cuda and t.dtype in _TRITON_DTYPES and triton_available()


# Split-K decode costs partial writes, a combine launch and allocations, so it is used only when the
# one-pass grid (B * H_kv programs) leaves nearly every SM idle over a long cache. The constants come
# from the sweep in docs/kernels.md, "When the dispatcher uses it".
SPLITK_MIN_KEYS = 4096  # main keys per row below which one pass runs
SPLITK_MIN_CHUNK = 256  # keys per split, so each program streams at least four 64-key tiles
SPLITK_GRID_SHARE = 16  # split only when B * H_kv <= SMs // this
SPLITK_SPLITS = 4  # chunks per row when splitting


@functools.cache
def _sm_count(device_index: int | None) -> int:
    """SMs of CUDA device ``device_index``; None (interpreted CPU tensors): 132, an H100/H200's."""
    if device_index is None:
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(n_rows: int, n_kv_heads: int, main_len: int, sm_count: int = 132) -> int:
    """Chunks to cut each row's ``main_len`` keys (shared prompt + longest cache) into; 1: one pass.

    ``min(main_len // SPLITK_MIN_CHUNK, SPLITK_SPLITS)`` when ``main_len >= SPLITK_MIN_KEYS`` and the
    one-pass grid ``n_rows * n_kv_heads`` is at most ``sm_count // SPLITK_GRID_SHARE``, else 1. On 132
    SMs: one to four rows of an 8k cache (2 KV heads) split in 4; 64 rows of any cache run one pass.
    """
    programs = n_rows * n_kv_heads
    if main_len < SPLITK_MIN_KEYS or programs == 0 or programs > sm_count // SPLITK_GRID_SHARE:
        return 1
    return max(1, min(main_len // SPLITK_MIN_CHUNK, SPLITK_SPLITS))


def lowrank_prompt(fast_weights, basis, slot_ids, row_offsets, out, scale):
    """See :func:`talora.kernels.reference.lowrank_prompt_ref` for the contract."""
    if _use_triton(out):
        from talora.kernels.lowrank_prompt import lowrank_prompt as lowrank_prompt_triton

        return lowrank_prompt_triton(fast_weights, basis, slot_ids, row_offsets, out, scale)
    return lowrank_prompt_ref(fast_weights, basis, slot_ids, row_offsets, out, scale)


def gated_prefix_attention(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                           slot_k, slot_v, slot_ids, gate, softmax_scale,
                           own_in_task=False, gated=True, out=None, *, max_q_len=None, max_kv_len=None,
                           window=0, softcap=0.0, host_layout=None):
    """See :func:`talora.kernels.reference.gated_prefix_attention_ref` for the contract.

    ``max_kv_len`` (keyword-only, optional) bounds ``kv_lens``; with ``max_q_len == 1`` it lets a
    decode step over a long cache run split-K (``decode_splits``) without a read-back. A sliding
    ``window`` or a score ``softcap`` (Gemma, Mistral, Phi-3 layers) runs the one-pass Triton kernel,
    which takes both; the split-K decode kernel does not, so such a step never splits, nor does one
    whose head dim is not a power of two (Phi-3-mini's 96: the one-pass kernel pads it).
    ``host_layout`` (keyword-only, optional): the rows' layout as host ints, which only the reference
    reads (the Triton kernels read the tensors on the device).
    """
    if _use_triton(q):
        head_dim = q.shape[-1]
        plain = not window and not softcap and not head_dim & (head_dim - 1)  # what split-K takes
        if max_q_len == 1 and max_kv_len is not None and not own_in_task and plain:
            main_len = prefix_k.shape[0] + max_kv_len + (0 if gated else slot_k.shape[1])
            splits = decode_splits(slot_ids.shape[0], k.shape[1], main_len,
                                   _sm_count(q.device.index if q.is_cuda else None))
            if splits > 1:
                from talora.kernels.decode_attention import gated_decode_attention

                return gated_decode_attention(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                                              slot_k, slot_v, slot_ids, gate, softmax_scale, gated=gated,
                                              out=out, max_kv_len=max_kv_len, num_splits=splits)
        from talora.kernels.gated_attention import gated_prefix_attention as attention_triton

        return attention_triton(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                                slot_k, slot_v, slot_ids, gate, softmax_scale,
                                own_in_task=own_in_task, gated=gated, out=out, max_q_len=max_q_len,
                                window=window, softcap=softcap)
    return gated_prefix_attention_ref(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                                      slot_k, slot_v, slot_ids, gate, softmax_scale,
                                      own_in_task=own_in_task, gated=gated, out=out, max_q_len=max_q_len,
                                      max_kv_len=max_kv_len, window=window, softcap=softcap,
                                      host_layout=host_layout)
