"""Split-K (flash-decoding) Triton twin of :func:`talora.kernels.reference.gated_prefix_attention_ref`
for decode steps: one query per row over a long KV cache.

The one-pass kernel (``gated_attention.py``) gives each (row, KV head) one program that streams
the whole key sequence alone: with 64 rows x 2 KV heads that is 128 programs for 132 SMs, and a
long cache then runs at half the card's bandwidth. Here each row's **main key sequence** (shared
prompt, then the row's own cached keys; in the ungated ablation the task slot's keys follow) is
cut into ``num_splits`` chunks of ``chunk`` keys, and each chunk is a separate program, so the
grid is ``(num_splits + GATED, B, H_kv)``. A program writes its partial online-softmax state,
``max`` (log2 domain), ``sum`` and the unnormalised ``acc``, per query head; when gated, the last
split index streams the task slot into its own partial. A second kernel combines each (row, head):
``o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s + tanh(g) * acc_task / l_task``.

As in the one-pass kernel, the query heads of a KV group are packed into the M dimension (each
key tile is read once per group), statistics and accumulators are float32, and no score matrix
is written. Chosen by :func:`talora.kernels.dispatch.gated_prefix_attention` for decode steps
over long caches (``dispatch.decode_splits``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from talora.kernels._triton_support import interpreting
from talora.kernels.gated_attention import _LOG2E, _attend_segment, _check, _last_dim_contiguous

BLOCK_N = 64  # keys per tile; every chunk is a multiple of it


@triton.jit
def _split_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, k_starts_ptr, kv_lens_ptr,
    prefix_k_ptr, prefix_v_ptr, slot_k_ptr, slot_v_ptr, slot_ids_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    # sizes
    n_prefix, n_task, group, chunk, num_splits, qk_scale,
    # strides (the last dimension of every KV and query tensor is contiguous; partials are contiguous)
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_pkt, stride_pkh,
    stride_pvt, stride_pvh,
    stride_sks, stride_skt, stride_skh,
    stride_svs, stride_svt, stride_svh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    row = tl.program_id(1)
    kv_head = tl.program_id(2)
    n_heads = tl.num_programs(2) * group

    k_start = tl.load(k_starts_ptr + row).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + row)
    slot = tl.load(slot_ids_ptr + row).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)  # query head within the group (decode: one token per row)
    head = kv_head * group + offs_m
    head_ok = offs_m < group
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    task_k = slot_k_ptr + slot * stride_sks + kv_head * stride_skh
    task_v = slot_v_ptr + slot * stride_svs + kv_head * stride_svh
    # decode: every key of a segment is visible (also passed as the unused window bound: no window,
    # no softcap here; the dispatcher sends windowed or soft-capped layers to the one-pass kernel)
    all_keys = tl.full([BLOCK_M], 2**30, dtype=tl.int32)
    if split == num_splits:  # GATED only: the task slot, its own softmax
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, task_k, task_v, 0, n_task, all_keys, all_keys,
                                        stride_skt, stride_svt, offs_d, HEAD_DIM, qk_scale, 1.0,
                                        BLOCK_N, INTERPRET, DOT_PRECISION, False, False)
    else:
        # Main sequence positions [lo, hi): prefix 0..m-1, own keys m..m+kv_len-1, (ungated) task after.
        lo = split * chunk
        hi = lo + chunk
        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, prefix_k_ptr + kv_head * stride_pkh, prefix_v_ptr + kv_head * stride_pvh,
            lo, tl.minimum(hi, n_prefix), all_keys, all_keys, stride_pkt, stride_pvt,
            offs_d, HEAD_DIM, qk_scale, 1.0, BLOCK_N, INTERPRET, DOT_PRECISION, False, False)
        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, k_ptr + k_start * stride_kt + kv_head * stride_kh,
            v_ptr + k_start * stride_vt + kv_head * stride_vh,
            tl.maximum(lo - n_prefix, 0), tl.minimum(hi - n_prefix, kv_len), all_keys, all_keys,
            stride_kt, stride_vt,
            offs_d, HEAD_DIM, qk_scale, 1.0, BLOCK_N, INTERPRET, DOT_PRECISION, False, False)
        if not GATED:
            own_end = n_prefix + kv_len
            acc, m_i, l_i = _attend_segment(
                acc, m_i, l_i, q, task_k, task_v,
                tl.maximum(lo - own_end, 0), tl.minimum(hi - own_end, n_task), all_keys, all_keys,
                stride_skt, stride_svt,
                offs_d, HEAD_DIM, qk_scale, 1.0, BLOCK_N, INTERPRET, DOT_PRECISION, False, False)

    # Partials are (B, H, num_splits + GATED) for m and l, (B, H, num_splits + GATED, h) for acc.
    total_splits = num_splits + GATED
    part = (row.to(tl.int64) * n_heads + head) * total_splits + split
    tl.store(part_m_ptr + part, m_i, mask=head_ok)
    tl.store(part_l_ptr + part, l_i, mask=head_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_ok[:, None])


@triton.jit
def _combine_kernel(
    # pointers
    part_m_ptr, part_l_ptr, part_acc_ptr, slot_ids_ptr, gate_ptr, out_ptr,
    # sizes
    num_splits,
    # strides
    stride_gs, stride_gh,
    stride_ot, stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, GATED: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    n_heads = tl.num_programs(1)
    total_splits = num_splits + GATED
    base = (row.to(tl.int64) * n_heads + head) * total_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    split_ok = offs_s < num_splits
    m_s = tl.load(part_m_ptr + base + offs_s, mask=split_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base + offs_s, mask=split_ok, other=0.0)
    acc_s = tl.load(part_acc_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=split_ok[:, None], other=0.0)
    m_max = tl.max(m_s, axis=0)
    # Empty chunks (past a row's end) keep max -inf and weight 0; shift by 0 if all are empty.
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m_s - m_safe)
    l_main = tl.sum(w * l_s, axis=0)
    o = tl.sum(w[:, None] * acc_s, axis=0) / tl.where(l_main > 0.0, l_main, 1.0)
    if GATED:
        l_task = tl.load(part_l_ptr + base + num_splits)
        acc_task = tl.load(part_acc_ptr + (base + num_splits) * HEAD_DIM + offs_d)
        slot = tl.load(slot_ids_ptr + row).to(tl.int64)
        g = tl.load(gate_ptr + slot * stride_gs + head * stride_gh).to(tl.float32)
        tanh_g = 1.0 - 2.0 / (tl.exp(2.0 * g) + 1.0)  # exact limits at +-inf, no libdevice
        o += tanh_g * acc_task / tl.where(l_task > 0.0, l_task, 1.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def split_layout(main_len: int, num_splits: int) -> tuple[int, int]:
    """(chunk, num_splits) for ``num_splits`` requested over ``main_len`` keys: chunks are whole
    ``BLOCK_N`` tiles, and no split is left with nothing to read at ``main_len``."""
    tiles = triton.cdiv(max(main_len, 1), BLOCK_N)
    tiles_per_split = triton.cdiv(tiles, max(1, min(num_splits, tiles)))
    return tiles_per_split * BLOCK_N, triton.cdiv(tiles, tiles_per_split)


def _split_stages(element_size: int, head_dim: int) -> int:
    """Pipeline stages of the split kernel: 3, or 2 where three stages of K and V tiles would not fit
    in shared memory (float32 at head_dim 128 asks for 268 KiB on a Hopper SM's 227 KiB)."""
    return 2 if element_size * head_dim > 256 else 3


def gated_decode_attention(
    q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
    slot_k, slot_v, slot_ids, gate, softmax_scale,
    own_in_task=False, gated=True, out=None, *, max_kv_len: int, num_splits: int,
):
    """Split-K decode; the contract is :func:`talora.kernels.reference.gated_prefix_attention_ref`
    restricted to decode: every row has exactly one query (``cu_seqlens_q = arange(B + 1)``, not
    read here) and ``own_in_task`` is False.

    ``max_kv_len`` (keyword-only) bounds ``kv_lens`` from above (the host knows it; reading it back
    would stall); ``num_splits`` is the number of chunks the main sequence of ``n_prefix +
    max_kv_len`` keys (plus ``n`` when ungated) is cut into, lowered so that every chunk holds
    whole 64-key tiles and the last one is not empty. Partials live in float32 scratch of
    ``B * H * (num_splits + 1) * (h + 2)`` elements.
    """
    if own_in_task:
        raise ValueError("gated_decode_attention is for decode steps; own_in_task runs the one-pass kernel")
    n_rows = slot_ids.shape[0]
    _check(q, k, v, prefix_k, slot_k, gate, out, n_rows)
    if q.shape[0] != n_rows:
        raise ValueError(f"decode takes one query per row: q has {q.shape[0]} tokens for {n_rows} rows")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    prefix_k, prefix_v = _last_dim_contiguous(prefix_k), _last_dim_contiguous(prefix_v)
    slot_k, slot_v = _last_dim_contiguous(slot_k), _last_dim_contiguous(slot_v)
    if out is None:
        out = torch.empty_like(q)
    if n_rows == 0:
        return out
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    n_prefix, n_task = prefix_k.shape[0], slot_k.shape[1]
    main_len = n_prefix + max_kv_len + (0 if gated else n_task)
    chunk, num_splits = split_layout(main_len, num_splits)
    total_splits = num_splits + int(bool(gated))
    part_m = torch.empty(n_rows, n_heads, total_splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(n_rows, n_heads, total_splits, head_dim, device=q.device, dtype=torch.float32)
    interpret = interpreting()
    _split_kernel[(total_splits, n_rows, n_kv_heads)](
        q, k, v, k_starts, kv_lens, prefix_k, prefix_v, slot_k, slot_v, slot_ids,
        part_m, part_l, part_acc,
        n_prefix, n_task, group, chunk, num_splits, softmax_scale * _LOG2E,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        prefix_k.stride(0), prefix_k.stride(1),
        prefix_v.stride(0), prefix_v.stride(1),
        slot_k.stride(0), slot_k.stride(1), slot_k.stride(2),
        slot_v.stride(0), slot_v.stride(1), slot_v.stride(2),
        HEAD_DIM=head_dim, BLOCK_M=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        GATED=bool(gated), INTERPRET=interpret,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=1 if interpret else _split_stages(q.element_size(), head_dim),
    )
    _combine_kernel[(n_rows, n_heads)](
        part_m, part_l, part_acc, slot_ids, gate, out,
        num_splits,
        gate.stride(0), gate.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), GATED=bool(gated),
        num_warps=1 if head_dim <= 64 else 2,
    )
    return out


__all__ = ["gated_decode_attention", "split_layout", "BLOCK_N"]
