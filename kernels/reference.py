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


def _softmax_attend(parts: list[tuple[torch.Tensor, torch.Tensor]],
                    may_be_empty: bool = False) -> torch.Tensor | None:
    """One softmax over the keys of all ``parts`` (``(scores (G, Q, T_i), values (G, T_i, h))``).

    Masked-out keys carry ``-inf`` scores; every query sees at least one key of a non-empty part,
    unless ``may_be_empty`` (a sliding window), where a query that sees none gets zero.
    None when there are no parts (an empty key set contributes zero).
    """
    if not parts:
        return None
    if len(parts) == 1:
        scores, values = parts[0]
    else:
        scores = torch.cat([p[0] for p in parts], dim=-1)
        values = torch.cat([p[1] for p in parts], dim=1)
    probs = torch.softmax(scores, dim=-1)
    return (probs.nan_to_num(0.0) if may_be_empty else probs) @ values


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
    max_kv_len: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
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
        max_kv_len: optional upper bound on ``kv_lens``; with ``max_q_len == 1`` the dispatcher uses
            it to choose the split-K decode kernel over long caches. Ignored here.
        window: sliding window (0: none). Keys and queries sit at the positions of the sequence
            ``[prefix; task slot; own]``: prefix key ``i`` at ``i``, task key ``i`` at ``m + i``, own key
            ``j`` (and the query at own position ``j``) at ``m + n + j``, with ``m = prefix_k.shape[0]``
            and ``n = slot_k.shape[1]`` (``own_in_task``: own key ``j`` at ``m + j``). A query at position
            ``P`` sees only keys at positions ``> P - window``, in every key set (Gemma, Mistral, Phi-3).
        softcap: score soft-capping (0: none): ``s = softcap * tanh(s / softcap)`` on the scaled scores
            ``q k^T * scale`` before the softmax (Gemma 2).

    Semantics, per row ``b`` with slot ``s = slot_ids[b]`` and head ``j`` (KV head ``j // (H // H_kv)``)::

        main = prefix keys (all) + own keys 0..p        (own_in_task: prefix keys only)
        task = slot_k[s] (all n)                         (own_in_task: own keys 0..p)
        gated:    o = softmax(q K_main^T * scale) V_main
                      + tanh(gate[s, j]) * softmax(q K_task^T * scale) V_task
        ungated:  o = softmax(q [K_main; K_task]^T * scale) [V_main; V_task]

    A key set that the window (or causality) leaves empty contributes zero. Computed in float32
    (float64 stays float64) and cast to ``q.dtype``. Returns ``out``.
    """
    n_q, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    ct = _compute_dtype(q.dtype)
    if out is None:
        out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    starts, lens, slots = k_starts.tolist(), kv_lens.tolist(), slot_ids.tolist()
    # Grouped layout: KV head j serves query heads j*group .. (j+1)*group - 1, so a row's queries
    # are arranged (H_kv, group * q_len, h) and the keys are used as they are, never repeated.
    n_prefix, n_task = prefix_k.shape[0], slot_k.shape[1]
    prefix_kt = prefix_k.to(ct).permute(1, 2, 0)  # (H_kv, h, m)
    prefix_vt = prefix_v.to(ct).transpose(0, 1)  # (H_kv, m, h)
    if not own_in_task:
        slot_kt = slot_k.to(ct).permute(0, 2, 3, 1)  # (S, H_kv, h, n)
        slot_vt = slot_v.to(ct).transpose(1, 2)  # (S, H_kv, n, h)
    gates = torch.tanh(gate.to(ct)).view(-1, n_kv, group, 1, 1) if gated else None
    own_base = n_prefix + (0 if own_in_task else n_task)  # position of own key 0
    prefix_pos = torch.arange(n_prefix, device=q.device)
    task_pos = n_prefix + torch.arange(n_task, device=q.device)

    def scores(qg: torch.Tensor, kt: torch.Tensor, q_abs: torch.Tensor, k_abs: torch.Tensor,
               causal: bool = False) -> torch.Tensor:
        """(H_kv, group * q_len, T) scores with softcap, window and (own keys) causal masks."""
        s = qg @ kt
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        hidden = torch.zeros(q_abs.shape[0], k_abs.shape[0], dtype=torch.bool, device=q.device)
        if causal:
            hidden |= k_abs[None, :] > q_abs[:, None]
        if window:
            hidden |= q_abs[:, None] - k_abs[None, :] >= window
        if not hidden.any():
            return s
        n_kv_, rows, keys = s.shape
        return s.view(n_kv_, group, -1, keys).masked_fill(hidden, float("-inf")).view(n_kv_, rows, keys)

    for b in range(len(slots)):
        lo, hi = bounds[b], bounds[b + 1]
        q_len, kv_len, start = hi - lo, lens[b], starts[b]
        if q_len == 0:
            continue
        qg = q[lo:hi].to(ct).view(q_len, n_kv, group, head_dim).permute(1, 2, 0, 3)
        qg = qg.reshape(n_kv, group * q_len, head_dim) * softmax_scale  # (H_kv, group * q_len, h)
        own_kt = k[start : start + kv_len].to(ct).permute(1, 2, 0)  # (H_kv, h, kv_len)
        own_v = v[start : start + kv_len].to(ct).transpose(0, 1)  # (H_kv, kv_len, h)
        q_abs = own_base + torch.arange(kv_len - q_len, kv_len, device=q.device)
        own_abs = own_base + torch.arange(kv_len, device=q.device)
        own = (scores(qg, own_kt, q_abs, own_abs, causal=True), own_v)
        main = [(scores(qg, prefix_kt, q_abs, prefix_pos), prefix_vt)] if n_prefix else []
        if own_in_task:
            task = [own]
        else:
            main.append(own)
            task = [(scores(qg, slot_kt[slots[b]], q_abs, task_pos), slot_vt[slots[b]])] if n_task else []
        empty = bool(window)  # a query may see no key of a set: that set contributes zero to it
        if not gated:
            ob = _softmax_attend(main + task, empty)
        else:
            ob = _softmax_attend(main, empty)
            ot = _softmax_attend(task, empty)
            if ot is not None and gates is not None:
                ot = (ot.view(n_kv, group, q_len, head_dim) * gates[slots[b]]).view(n_kv, group * q_len, head_dim)
                ob = ot if ob is None else ob + ot
        if ob is None:
            out[lo:hi] = 0
        else:
            ob = ob.view(n_kv, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, n_heads, head_dim)
            out[lo:hi] = ob.to(out.dtype)
    return out
