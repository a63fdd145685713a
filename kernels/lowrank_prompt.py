"""Triton twin of :func:`talora.kernels.reference.lowrank_prompt_ref`.

A program writes one row's ``n`` prompt rows over a block of ``BLOCK_D`` hidden columns:
``out[o:o+n, cols] = scale * B[slot] @ A[:, cols]`` as ``r`` rank-one updates in float32 (``r`` is
a compile-time constant: one compile per bundle). The
op moves ``R * n * d`` output elements and reads ``A`` from L2, so it is bound by the writes.

Used through :func:`talora.kernels.dispatch.lowrank_prompt`, which picks this or the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from talora.kernels._triton_support import check_device

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _kernel(
    # pointers
    fast_ptr, basis_ptr, slot_ids_ptr, row_offsets_ptr, out_ptr,
    # sizes
    n_prompt, hidden, scale,
    # strides
    stride_fs, stride_fn, stride_fr,
    stride_br, stride_bd,
    stride_on, stride_od,
    # meta-parameters
    RANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    slot = tl.load(slot_ids_ptr + row).to(tl.int64)
    offset = tl.load(row_offsets_ptr + row).to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = offs_n < n_prompt
    d_ok = offs_d < hidden

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    fast_col = fast_ptr + slot * stride_fs + offs_n * stride_fn
    basis_row = basis_ptr + offs_d * stride_bd
    for kk in tl.static_range(RANK):  # r is a handful (4..8): unrolled rank-one updates
        b = tl.load(fast_col + kk * stride_fr, mask=n_ok, other=0.0).to(tl.float32)
        a = tl.load(basis_row + kk * stride_br, mask=d_ok, other=0.0).to(tl.float32)
        acc += b[:, None] * a[None, :]
    acc = acc * scale

    out_rows = offset + offs_n
    tl.store(out_ptr + out_rows[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


def lowrank_prompt(fast_weights, basis, slot_ids, row_offsets, out, scale):
    """Triton implementation; the contract is :func:`talora.kernels.reference.lowrank_prompt_ref`."""
    for name, t in (("fast_weights", fast_weights), ("basis", basis), ("out", out)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"lowrank_prompt (triton): {name} must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    n_slots, n_prompt, rank = fast_weights.shape
    if basis.shape[0] != rank or out.shape[1] != basis.shape[1]:
        raise ValueError(f"shapes do not chain: fast {tuple(fast_weights.shape)}, basis {tuple(basis.shape)}, "
                         f"out {tuple(out.shape)}")
    if slot_ids.shape != row_offsets.shape:
        raise ValueError("slot_ids and row_offsets must both be (R,)")
    check_device(out)
    n_rows, hidden = slot_ids.shape[0], out.shape[1]
    if n_rows == 0 or n_prompt == 0:
        return out
    block_n = max(triton.next_power_of_2(n_prompt), 2)
    block_d = max(min(256, triton.next_power_of_2(hidden), 4096 // block_n), 16)
    grid = (n_rows, triton.cdiv(hidden, block_d))
    _kernel[grid](
        fast_weights, basis, slot_ids, row_offsets, out,
        n_prompt, hidden, float(scale),
        fast_weights.stride(0), fast_weights.stride(1), fast_weights.stride(2),
        basis.stride(0), basis.stride(1),
        out.stride(0), out.stride(1),
        RANK=rank, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4,
    )
    return out


__all__ = ["lowrank_prompt", "SUPPORTED_DTYPES"]
