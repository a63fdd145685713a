"""Triton twin of :func:`talora.kernels.reference.gated_prefix_attention_ref`.

One kernel serves packed prefill, decode against a padded KV cache, the task-prompt mode
(``own_in_task``) and the ungated ablation. A program owns one row ``b``, one KV head and a block
of ``BLOCK_M`` (query token, query head of the group) pairs: the query heads that share a KV head
are packed into the M dimension, so every key tile is loaded once per group (GQA) and a decode
step (one token, ``group`` heads) still fills a tensor-core tile. Each program streams three key
segments (shared prefix, own causal keys, task slot) through two online softmaxes in float32 and
never materialises a score matrix.

Used through :func:`talora.kernels.dispatch.gated_prefix_attention`, which picks this or the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from talora.kernels._triton_support import check_device, interpreting

_LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _attend_block(
    acc, m_i, l_i, q,
    k_base, v_base,
    start_n, hi, limit, low,
    stride_kt, stride_vt,
    offs_d, head_dim, qk_scale, softcap,
    BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):
    """Fold keys ``start_n .. start_n+BLOCK_N-1`` (those below ``hi``) into the online softmax.

    With ``WINDOW`` row ``i`` also hides keys below ``low[i]``; with ``SOFTCAP`` the (log2-domain)
    scores become ``softcap * tanh(s / softcap)``, ``softcap`` given in the log2 domain too."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < hi
    d_ok = offs_d < head_dim  # a head dim that is not a power of two is padded with zeros (Phi-3-mini: 96)
    kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=key_ok[None, :] & d_ok[:, None],
                 other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :],
                other=0.0)
    if INTERPRET:  # the interpreter's dot multiplies bf16 as raw integers: widen first
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if SOFTCAP:  # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice needed
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (s / softcap)) + 1.0))
    visible = key_ok[None, :] & (offs_n[None, :] <= limit[:, None])
    if WINDOW:
        visible = visible & (offs_n[None, :] >= low[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps max -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_segment(
    acc, m_i, l_i, q,
    k_base, v_base,
    lo, hi, limit, low,
    stride_kt, stride_vt,
    offs_d, head_dim, qk_scale, softcap,
    BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):
    """Fold keys ``lo..hi-1`` of one segment into an online softmax (log2 domain).

    Row ``i`` of the block sees key ``j`` iff ``j <= limit[i]``: ``limit`` is the causal
    position for own keys and ``n_keys - 1`` for segments seen in full; -1 hides a row.
    ``hi`` is the segment's key count, cut to the block's last causal position plus one; ``lo``
    is 0 in the one-pass kernel (a sliding window's first key for own keys) and a chunk's first key
    in the split-K decode kernel. ``low``: with ``WINDOW``, row ``i`` sees only keys ``j >= low[i]``.
    """
    if INTERPRET:
        # The interpreter cannot turn a run-time scalar into a range() bound under NumPy >= 2.4;
        # a while loop compares instead. Compiled code keeps the pipelined for loop.
        start_n = lo
        while start_n < hi:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, hi, limit, low,
                                          stride_kt, stride_vt, offs_d, head_dim, qk_scale, softcap,
                                          BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, hi, limit, low,
                                          stride_kt, stride_vt, offs_d, head_dim, qk_scale, softcap,
                                          BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)
    return acc, m_i, l_i


@triton.jit
def _kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, cu_seqlens_q_ptr, k_starts_ptr, kv_lens_ptr,
    prefix_k_ptr, prefix_v_ptr, slot_k_ptr, slot_v_ptr, slot_ids_ptr, gate_ptr, out_ptr,
    # sizes
    n_prefix, n_task, group, qk_scale, softcap, window,
    # strides (the last dimension of every KV and query tensor is contiguous)
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_pkt, stride_pkh,
    stride_pvt, stride_pvh,
    stride_sks, stride_skt, stride_skh,
    stride_svs, stride_svt, stride_svh,
    stride_gs, stride_gh,
    stride_ot, stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATED: tl.constexpr, OWN_IN_TASK: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
):
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + row)
    q_len = tl.load(cu_seqlens_q_ptr + row + 1) - q_start
    if pid_m * BLOCK_M >= q_len * group:
        return
    k_start = tl.load(k_starts_ptr + row).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + row)
    slot = tl.load(slot_ids_ptr + row).to(tl.int64)

    # M index = (query token, query head within the group), token-major.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = offs_m // group
    head = kv_head * group + offs_m % group
    row_ok = token < q_len
    offs_d = tl.arange(0, HEAD_PAD)  # HEAD_DIM rounded up to a power of two
    d_ok = offs_d < HEAD_DIM

    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    causal_limit = tl.where(row_ok, kv_len - q_len + token, -1)
    last_token = tl.minimum(q_len - 1, ((pid_m + 1) * BLOCK_M - 1) // group)
    own_hi = kv_len - q_len + last_token + 1
    prefix_limit = tl.where(row_ok, n_prefix - 1, -1)
    task_limit = tl.where(row_ok, n_task - 1, -1)
    # Sliding window: positions are prefix 0..m-1, task slot m..m+n-1, own keys from own_base on
    # (own_in_task: the own keys are the task prompt, at m..); a query at position P sees keys > P - window.
    # ``low_*`` is each segment's first visible key per row, in that segment's own index.
    if OWN_IN_TASK:
        own_base = n_prefix
    else:
        own_base = n_prefix + n_task
    low_own = causal_limit - window + 1
    low_prefix = low_own + own_base
    low_task = low_prefix - n_prefix
    own_lo = 0
    if WINDOW:  # own keys before the block's first query's window are never visible: skip them
        own_lo = tl.maximum(kv_len - q_len + (pid_m * BLOCK_M) // group - window + 1, 0)

    acc_main = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    m_main = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_main = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_task = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    m_task = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_task = tl.zeros([BLOCK_M], dtype=tl.float32)

    acc_main, m_main, l_main = _attend_segment(
        acc_main, m_main, l_main, q,
        prefix_k_ptr + kv_head * stride_pkh, prefix_v_ptr + kv_head * stride_pvh,
        0, n_prefix, prefix_limit, low_prefix, stride_pkt, stride_pvt, offs_d, HEAD_DIM, qk_scale, softcap,
        BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)
    own_k = k_ptr + k_start * stride_kt + kv_head * stride_kh
    own_v = v_ptr + k_start * stride_vt + kv_head * stride_vh
    if OWN_IN_TASK:
        if GATED:
            acc_task, m_task, l_task = _attend_segment(
                acc_task, m_task, l_task, q, own_k, own_v, own_lo, own_hi, causal_limit, low_own,
                stride_kt, stride_vt, offs_d, HEAD_DIM, qk_scale, softcap,
                BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)
        else:
            acc_main, m_main, l_main = _attend_segment(
                acc_main, m_main, l_main, q, own_k, own_v, own_lo, own_hi, causal_limit, low_own,
                stride_kt, stride_vt, offs_d, HEAD_DIM, qk_scale, softcap,
                BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)
    else:
        acc_main, m_main, l_main = _attend_segment(
            acc_main, m_main, l_main, q, own_k, own_v, own_lo, own_hi, causal_limit, low_own,
            stride_kt, stride_vt, offs_d, HEAD_DIM, qk_scale, softcap,
                BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)
        task_k = slot_k_ptr + slot * stride_sks + kv_head * stride_skh
        task_v = slot_v_ptr + slot * stride_svs + kv_head * stride_svh
        if GATED:
            acc_task, m_task, l_task = _attend_segment(
                acc_task, m_task, l_task, q, task_k, task_v, 0, n_task, task_limit, low_task,
                stride_skt, stride_svt, offs_d, HEAD_DIM, qk_scale, softcap,
                BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)
        else:
            acc_main, m_main, l_main = _attend_segment(
                acc_main, m_main, l_main, q, task_k, task_v, 0, n_task, task_limit, low_task,
                stride_skt, stride_svt, offs_d, HEAD_DIM, qk_scale, softcap,
                BLOCK_N, INTERPRET, DOT_PRECISION, SOFTCAP, WINDOW)

    # An empty key set contributes zero: divide by 1 where the weight sum is 0.
    o = acc_main / tl.where(l_main > 0.0, l_main, 1.0)[:, None]
    if GATED:
        g = tl.load(gate_ptr + slot * stride_gs + head * stride_gh, mask=row_ok, other=0.0).to(tl.float32)
        # tanh(g) = 1 - 2 / (exp(2g) + 1): exact limits at +-inf, no libdevice needed.
        tanh_g = 1.0 - 2.0 / (tl.exp(2.0 * g) + 1.0)
        o += tanh_g[:, None] * (acc_task / tl.where(l_task > 0.0, l_task, 1.0)[:, None])
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q, k, v, prefix_k, slot_k, gate, out, n_rows, any_head_dim=False):
    """Shapes, dtypes and device; ``any_head_dim``: a head dim in [16, 256] that need not be a power of two."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"gated_prefix_attention (triton) supports {SUPPORTED_DTYPES}, got {q.dtype}")
    n_q, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if any_head_dim and not 16 <= head_dim <= 256:
        raise ValueError(f"head dim must be in [16, 256], got {head_dim}")
    if not any_head_dim and (head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1)):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {head_dim}")
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv_heads} KV heads")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k)):
        if t.shape[-2:] != (n_kv_heads, head_dim) or t.dtype != q.dtype:
            raise ValueError(f"{name} must be (*, {n_kv_heads}, {head_dim}) {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    if slot_k.shape[-2:] != (n_kv_heads, head_dim) or slot_k.dtype != q.dtype:
        raise ValueError(f"slot_k must be (S, n, {n_kv_heads}, {head_dim}) {q.dtype}, got {tuple(slot_k.shape)}")
    if gate.shape[-1] != n_heads:
        raise ValueError(f"gate must be (S, {n_heads}), got {tuple(gate.shape)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError("out must match q in shape and dtype, with a contiguous last dimension")
    check_device(q)


def _launch_config(tokens_times_group: int, head_dim: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a block of (token, head) query pairs."""
    if head_dim > 128:  # Gemma's 256: smaller key tiles keep the K/V stages and two accumulators on chip
        if tokens_times_group <= 16:
            return 16, 32, 4, 2
        return (32, 32, 4, 1) if interpret else (32, 32, 8, 2)
    if tokens_times_group <= 16:  # decode: one token times the group's heads
        return 16, 64, 4, 3
    if interpret:
        return 32, 32, 4, 1
    return (128, 64, 8, 2) if head_dim <= 64 else (64, 64, 4, 2)


def gated_prefix_attention(
    q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
    slot_k, slot_v, slot_ids, gate, softmax_scale,
    own_in_task=False, gated=True, out=None, *, max_q_len: int | None = None, max_kv_len: int | None = None,
    window: int = 0, softcap: float = 0.0,
):
    """Triton implementation; the contract is
    :func:`talora.kernels.reference.gated_prefix_attention_ref` (sliding ``window`` and score
    ``softcap`` included: each is a compile-time switch, so a model without them runs the same code).

    ``max_q_len`` (keyword-only) is an upper bound on the rows' query counts; given, it saves
    reading ``cu_seqlens_q`` back to the host (pass 1 in decode); ``max_kv_len`` is ignored (the
    dispatcher's split-K choice). fp32 products use IEEE fp32,
    bf16/fp16 products use the tensor cores; accumulation is float32 throughout.
    """
    n_rows = slot_ids.shape[0]
    _check(q, k, v, prefix_k, slot_k, gate, out, n_rows, any_head_dim=True)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    prefix_k, prefix_v = _last_dim_contiguous(prefix_k), _last_dim_contiguous(prefix_v)
    slot_k, slot_v = _last_dim_contiguous(slot_k), _last_dim_contiguous(slot_v)
    if out is None:
        out = torch.empty_like(q)
    if n_rows == 0 or q.shape[0] == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    interpret = interpreting()
    head_pad = triton.next_power_of_2(head_dim)
    block_m, block_n, num_warps, num_stages = _launch_config(max_q_len * group, head_pad, interpret)
    grid = (triton.cdiv(max_q_len * group, block_m), n_rows, n_kv_heads)
    _kernel[grid](
        q, k, v, cu_seqlens_q, k_starts, kv_lens,
        prefix_k, prefix_v, slot_k, slot_v, slot_ids, gate, out,
        prefix_k.shape[0], slot_k.shape[1], group, softmax_scale * _LOG2E,
        float(softcap) * _LOG2E if softcap else 1.0, int(window),
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        prefix_k.stride(0), prefix_k.stride(1),
        prefix_v.stride(0), prefix_v.stride(1),
        slot_k.stride(0), slot_k.stride(1), slot_k.stride(2),
        slot_v.stride(0), slot_v.stride(1), slot_v.stride(2),
        gate.stride(0), gate.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_PAD=head_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        GATED=bool(gated), OWN_IN_TASK=bool(own_in_task),
        INTERPRET=interpret, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SOFTCAP=bool(softcap), WINDOW=bool(window),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


__all__ = ["gated_prefix_attention", "SUPPORTED_DTYPES"]
