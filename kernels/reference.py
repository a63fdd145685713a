"""PyTorch reference twins of the talora kernels.

Each function here has exactly the signature of its Triton twin in this package and is the
definition of what that twin must compute. They run on any device and in any dtype, compute in
at least float32 (float64 stays float64), and are what the CPU path of the server uses.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lowrank_prompt_ref(
    fast_weights: torch.Tensor,
    basis: torch.Tensor,
    slot_ids: torch.Tensor,
    row_offsets: torch.Tensor,
    out: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write each row's task prompt ``scale * B[slot] @ A`` into a packed embedding buffer.

    Args:
        fast_weights: ``(S, n, r)`` per-slot fast weights ``B``.
        basis: ``(r, d)`` shared basis ``A``.
        slot_ids: ``(R,)`` int, the slot of each of the R rows, in ``[0, S)``.
        row_offsets: ``(R,)`` int, where row ``b``'s n prompt rows start in ``out``.
        out: ``(N, d)`` packed buffer; rows ``row_offsets[b] : row_offsets[b] + n`` are
            overwritten in place, every other row is left untouched.
        scale: multiplier applied to the product.

    Semantics::

        for b in range(R):
            o = row_offsets[b]
            out[o:o+n] = (scale * fast_weights[slot_ids[b]].float() @ basis.float()).to(out.dtype)

    The accumulation is float32 (float64 for float64 inputs). Returns ``out``.
    """
    n = fast_weights.shape[1]
    ct = _compute_dtype(out.dtype)
    prompts = scale * torch.matmul(fast_weights[slot_ids.long()].to(ct), basis.to(ct))
    for b, offset in enumerate(row_offsets.tolist()):
        out[offset : offset + n] = prompts[b].to(out.dtype)
    return out


def _masked_softmax_parts(scores: torch.Tensor, mask: torch.Tensor):
    """Unnormalised softmax pieces over ``mask``: (row max, exp scores, row sums).

    Rows with no visible key get zero weights (their contribution is zero, never NaN).
    """
    if scores.shape[-1] == 0:
        zeros = scores.new_zeros(*scores.shape[:-1], 1)
        return zeros, scores, zeros
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max) * mask
    return row_max, weights, weights.sum(dim=-1, keepdim=True)


def gated_prefix_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_starts: torch.Tensor,
    kv_lens: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    slot_k: torch.Tensor,
    slot_v: torch.Tensor,
    slot_ids: torch.Tensor,
    gate: torch.Tensor,
    softmax_scale: float,
    own_in_task: bool = False,
    gated: bool = True,
    out: torch.Tensor | None = None,
    *,
    max_q_len: int | None = None,
) -> torch.Tensor:
    """Mixed-task gated prefix attention over packed variable-length rows.

    Args:
        q: ``(Nq, H, h)`` queries of all B rows, packed; row ``b`` owns
            ``q[cu_seqlens_q[b] : cu_seqlens_q[b+1]]`` (``q_len_b`` tokens).
        k, v: ``(Nk, H_kv, h)`` the rows' own keys and values; row ``b``'s key ``j`` is
            ``k[k_starts[b] + j]`` for ``j < kv_lens[b]``. A padded cache ``(B, T, H_kv, h)``
            is passed as its ``(B*T, H_kv, h)`` view with ``k_starts = arange(B) * T``.
        cu_seqlens_q: ``(B+1,)`` int32 cumulative query counts.
        k_starts: ``(B,)`` int32 first own key of each row.
        kv_lens: ``(B,)`` int32 own key count of each row, ``kv_lens[b] >= q_len_b``. Query ``i``
            of row ``b`` sits at own position ``p = kv_lens[b] - q_len_b + i`` and sees own keys
            ``0..p`` (prefill: ``kv_lens == q_lens``; decode: ``q_len_b == 1``).
        prefix_k, prefix_v: ``(m, H_kv, h)`` shared-prompt KV, one copy for every row, visible
            in full to every query (``m`` may be 0).
        slot_k, slot_v: ``(S, n, H_kv, h)`` task-slot KV table.
        slot_ids: ``(B,)`` int32 slot of each row.
        gate: ``(S, H)`` raw gate values of this layer (``tanh`` is applied here).
        softmax_scale: score multiplier, usually ``h ** -0.5``.
        own_in_task: task-prompt mode, used to compute a task's KV at adapter load: the rows'
            own keys form the task set (causal) and the main set is the shared prompt alone;
            ``slot_k``/``slot_v`` are not read.
        gated: ``False`` joins the task set to the main softmax (gate ignored): plain two-part
            prompt tuning.
        out: optional ``(Nq, H, h)`` output buffer, fully overwritten.
        max_q_len: optional upper bound on the rows' query counts; the Triton twin uses it to
            size its grid without reading ``cu_seqlens_q`` back to the host (pass 1 in decode).
            Ignored here.

    Semantics, per row ``b`` with slot ``s = slot_ids[b]`` and head ``j`` (KV head ``j // (H // H_kv)``)::

        main = prefix keys (all) + own keys 0..p        (own_in_task: prefix keys only)
        task = slot_k[s] (all n)                         (own_in_task: own keys 0..p)
        gated:    o = softmax(q K_main^T * scale) V_main
                      + tanh(gate[s, j]) * softmax(q K_task^T * scale) V_task
        ungated:  o = softmax(q [K_main; K_task]^T * scale) [V_main; V_task]

    An empty key set contributes zero. Computed in float32 (float64 stays float64) and
    cast to ``q.dtype``. Returns ``out``.
    """
    n_q, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    ct = _compute_dtype(q.dtype)
    if out is None:
        out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    starts, lens, slots = k_starts.tolist(), kv_lens.tolist(), slot_ids.tolist()
    prefix_kx = prefix_k.to(ct).repeat_interleave(group, dim=1).transpose(0, 1)  # (H, m, h)
    prefix_vx = prefix_v.to(ct).repeat_interleave(group, dim=1).transpose(0, 1)
    n_prefix = prefix_k.shape[0]
    for b in range(len(slots)):
        q_len, kv_len, start = bounds[b + 1] - bounds[b], lens[b], starts[b]
        if q_len == 0:
            continue
        qb = q[bounds[b] : bounds[b + 1]].to(ct).transpose(0, 1)  # (H, q_len, h)
        own_k = k[start : start + kv_len].to(ct).repeat_interleave(group, dim=1).transpose(0, 1)
        own_v = v[start : start + kv_len].to(ct).repeat_interleave(group, dim=1).transpose(0, 1)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        causal = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # (q_len, kv_len)
        prefix_mask = torch.ones(q_len, n_prefix, dtype=torch.bool, device=q.device)
        if own_in_task:
            main_k, main_v, main_mask = prefix_kx, prefix_vx, prefix_mask
            task_k, task_v, task_mask = own_k, own_v, causal
        else:
            main_k = torch.cat([prefix_kx, own_k], dim=1)
            main_v = torch.cat([prefix_vx, own_v], dim=1)
            main_mask = torch.cat([prefix_mask, causal], dim=1)
            task_k = slot_k[slots[b]].to(ct).repeat_interleave(group, dim=1).transpose(0, 1)
            task_v = slot_v[slots[b]].to(ct).repeat_interleave(group, dim=1).transpose(0, 1)
            task_mask = torch.ones(q_len, task_k.shape[1], dtype=torch.bool, device=q.device)
        if not gated:
            keys = torch.cat([main_k, task_k], dim=1)
            values = torch.cat([main_v, task_v], dim=1)
            _, w, total = _masked_softmax_parts(
                qb @ keys.transpose(1, 2) * softmax_scale, torch.cat([main_mask, task_mask], dim=1)
            )
            ob = (w @ values) / total.clamp_min(torch.finfo(ct).tiny)
        else:
            _, w_main, s_main = _masked_softmax_parts(qb @ main_k.transpose(1, 2) * softmax_scale, main_mask)
            _, w_task, s_task = _masked_softmax_parts(qb @ task_k.transpose(1, 2) * softmax_scale, task_mask)
            tiny = torch.finfo(ct).tiny
            g = torch.tanh(gate[slots[b]].to(ct)).view(n_heads, 1, 1)
            ob = (w_main @ main_v) / s_main.clamp_min(tiny) + g * (w_task @ task_v) / s_task.clamp_min(tiny)
        out[bounds[b] : bounds[b + 1]] = ob.transpose(0, 1).to(out.dtype)
    return out
