"""PyTorch reference twins of the talora kernels.

Each function here has the signature of its Triton twin in this package (plus, at most, host-side
hints that only the twin here reads: ``host_layout``) and is the definition of what that twin must
compute. They run on any device and in any dtype, compute in
at least float32 (float64 stays float64), and are what the CPU path of the server uses.
"""

from __future__ import annotations

import functools

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


# Which keys of a set the queries of a block see: ``_visible``'s key (q0, q_len, k0, k_len, causal, window).
_Seen = tuple[int, int, int, int, bool, int]
# One key set of a query block: keys and values (H_kv, T, h) and which keys each query sees (None: all).
_Part = tuple[torch.Tensor, torch.Tensor, _Seen | None]


def _attend(q: torch.Tensor, parts: list[_Part], scale: float, softcap: float,
            sees_itself: bool = False) -> torch.Tensor | None:
    """One softmax of ``q (H, q_len, h)`` over the keys of all ``parts`` -> ``(H, q_len, h)``; a query that
    sees no key gets zero. None when there are no parts (an empty key set contributes zero).
    ``sees_itself``: a part holds each query's own key (causal), so no query sees nothing and the
    zeroing pass is skipped."""
    if not parts:
        return None
    keys = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=1)
    values = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=1)
    mask = None
    if any(p[2] is not None for p in parts):
        layout = tuple((p[2], p[0].shape[1]) for p in parts)
        q_len, total = q.shape[1], sum(n for _, n in layout)
        joined = _small_joined if q_len * total <= SMALL_MASK else _joined
        mask = joined(q_len, layout, q.device)
    if not softcap:  # fused on CPU; grouped heads as below (head j reads KV head j // group)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]
        return o if mask is None or sees_itself else o.nan_to_num(0.0)
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = softcap * torch.tanh((q @ keys.transpose(1, 2)) * scale / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ values


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _visible(q0: int, q_len: int, k0: int, k_len: int, causal: bool, window: int) -> _Seen | None:
    """Which of the keys at positions ``k0 ..`` the queries at ``q0 ..`` see (causally when ``causal``,
    within ``window``), as the key of ``_mask``; None when they see them all."""
    cut = bool(window) and q0 + q_len - 1 - k0 >= window
    if not cut and not (causal and q_len > 1):  # a lone causal query is the last position: it sees all
        return None
    return q0, q_len, k0, k_len, causal, window if cut else 0


def _mask(q0: int, q_len: int, k0: int, k_len: int, causal: bool, window: int, device) -> torch.Tensor:
    """``(q_len, k_len)`` bool: what ``_visible``'s key says."""
    q_pos = torch.arange(q0, q0 + q_len, device=device)[:, None]
    k_pos = torch.arange(k0, k0 + k_len, device=device)[None, :]
    seen = q_pos - k_pos < window if window else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    return seen & (k_pos <= q_pos) if causal else seen


def _joined(q_len: int, layout: tuple[tuple[_Seen | None, int], ...], device) -> torch.Tensor:
    """``(q_len, T)``: the masks of key sets side by side; ``layout``: each set's ``_visible`` key and size."""
    return torch.cat([torch.ones(q_len, size, dtype=torch.bool, device=device) if key is None
                      else _mask(*key, device) for key, size in layout], dim=-1)


SMALL_MASK = 1 << 16  # elements: at most 512 kept masks of this size hold 32 MiB
# every layer of a step asks for the same masks: small ones are built once and kept (callers only read them)
_small_joined = functools.lru_cache(maxsize=512)(_joined)


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
    host_layout: list[int] | None = None,
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
        host_layout: optional ``cu_seqlens_q, k_starts, kv_lens, slot_ids`` as one list of host ints, equal
            to the tensors (``BatchMeta.host_layout``); saves reading them back once per layer. Only this
            twin reads it (the Triton kernels do not take it).

    Semantics, per row ``b`` with slot ``s = slot_ids[b]`` and head ``j`` (KV head ``j // (H // H_kv)``)::

        main = prefix keys (all) + own keys 0..p        (own_in_task: prefix keys only)
        task = slot_k[s] (all n)                         (own_in_task: own keys 0..p)
        gated:    o = softmax(q K_main^T * scale) V_main
                      + tanh(gate[s, j]) * softmax(q K_task^T * scale) V_task
        ungated:  o = softmax(q [K_main; K_task]^T * scale) [V_main; V_task]

    A key set that the window (or causality) leaves empty contributes zero. Computed in float32
    (float64 stays float64) and cast to ``q.dtype``. Returns ``out``.
    """
    ct = _compute_dtype(q.dtype)
    rows = len(slot_ids)
    if host_layout is None:
        host_layout = torch.cat([cu_seqlens_q, k_starts, kv_lens, slot_ids]).tolist()  # one read for the host loop
    layout = host_layout
    bounds, starts, lens, slots = (layout[:rows + 1], layout[rows + 1:2 * rows + 1],
                                   layout[2 * rows + 1:3 * rows + 1], layout[3 * rows + 1:])
    if not own_in_task and not softcap and all(bounds[b + 1] - bounds[b] <= 1 for b in range(rows)):
        return _one_query_rows(q, k, v, layout, prefix_k, prefix_v, slot_k, slot_v,
                               torch.tanh(_as(gate, ct)) if gated else None, softmax_scale, window, ct, out)
    if out is None:
        out = torch.empty_like(q)
    n_prefix, n_task = prefix_k.shape[0], slot_k.shape[1]
    prefix_k, prefix_v = (_as(t, ct).transpose(0, 1) for t in (prefix_k, prefix_v))  # (H_kv, m, h)
    if not own_in_task:
        slot_k, slot_v = (_as(t, ct).transpose(1, 2) for t in (slot_k, slot_v))  # (S, H_kv, n, h)
    gates = torch.tanh(_as(gate, ct)).view(*gate.shape, 1, 1) if gated else None  # (S, H, 1, 1)
    own_base = n_prefix + (0 if own_in_task else n_task)  # position of own key 0
    for b in range(len(slots)):
        lo, hi = bounds[b], bounds[b + 1]
        q_len, kv_len, start = hi - lo, lens[b], starts[b]
        if q_len == 0:
            continue
        qh = _as(q[lo:hi], ct).transpose(0, 1)  # (H, q_len, h)
        q0 = own_base + kv_len - q_len
        own = (_as(k[start:start + kv_len], ct).transpose(0, 1), _as(v[start:start + kv_len], ct).transpose(0, 1),
               _visible(q0, q_len, own_base, kv_len, True, window))
        main = [(prefix_k, prefix_v, _visible(q0, q_len, 0, n_prefix, False, window))] if n_prefix else []
        if own_in_task:
            task = [own]
        else:
            main.append(own)
            seen = _visible(q0, q_len, n_prefix, n_task, False, window)
            task = [(slot_k[slots[b]], slot_v[slots[b]], seen)] if n_task else []
        if not gated:
            ob = _attend(qh, main + task, softmax_scale, softcap, sees_itself=True)
        else:
            ob = _attend(qh, main, softmax_scale, softcap, sees_itself=not own_in_task)
            ot = _attend(qh, task, softmax_scale, softcap, sees_itself=own_in_task)
            if ot is not None and gates is not None:
                if ob is None:
                    ob = ot * gates[slots[b]]
                elif torch.is_grad_enabled():
                    ob = torch.addcmul(ob, ot, gates[slots[b]])
                else:  # written straight into the rows of ``out`` (no temporary, no copy)
                    torch.addcmul(ob.transpose(0, 1), ot.transpose(0, 1), gates[slots[b]].view(1, -1, 1),
                                  out=out[lo:hi])
                    continue
        out[lo:hi] = 0 if ob is None else ob.transpose(0, 1)
    return out


def _one_query_rows(q, k, v, layout: list[int], prefix_k, prefix_v, slot_k, slot_v, gates, scale: float,
                    window: int, ct: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """``gated_prefix_attention_ref`` when every row has at most one query and no softcap (a decode step):
    the same softmaxes with no mask and few ops per row (each op's dispatch is a visible share of a
    small model's decode step on CPU). A lone query is the last position of its row, so it sees every
    key but those a ``window`` cuts, which are a prefix of each key set: sliced off. Key sets are joined
    in their stored layout ``(T, H_kv, h)`` and seen as ``(1, H_kv, T, h)``. ``gates``: ``(S, H)`` tanh'd,
    or None (ungated: one softmax over the three sets). One row and no ``out``: its result is returned
    as it comes (no copy)."""
    rows = (len(layout) - 1) // 4
    n_prefix, n_task, heads, head_dim = prefix_k.shape[0], slot_k.shape[1], q.shape[1], q.shape[2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for b in range(rows):
        lo = layout[b]
        if layout[b + 1] == lo:
            continue
        start, kv_len, slot = layout[rows + 1 + b], layout[2 * rows + 1 + b], layout[3 * rows + 1 + b]
        first = max(0, n_prefix + n_task + kv_len - window) if window else 0  # first position it sees
        own = slice(start + max(0, first - n_prefix - n_task), start + kv_len)
        task = slice(max(0, first - n_prefix), n_task)
        pk, pv = (prefix_k, prefix_v) if not first else (prefix_k[first:], prefix_v[first:])
        if gates is None:  # ungated: the task keys join the main softmax
            keys, values = [pk, slot_k[slot, task], k[own]], [pv, slot_v[slot, task], v[own]]
        else:
            keys, values = [pk, k[own]], [pv, v[own]]
        query = _as(q[lo], ct).view(1, heads, 1, head_dim)
        main_k, main_v = (_as(torch.cat(t), ct).transpose(0, 1)[None] for t in (keys, values))
        o = sdpa(query, main_k, main_v, scale=scale, enable_gqa=True)  # (1, H, 1, h)
        if gates is not None and task.start < n_task:
            task_k, task_v = (_as(t[slot, task], ct).transpose(0, 1)[None] for t in (slot_k, slot_v))
            o = torch.addcmul(o, sdpa(query, task_k, task_v, scale=scale, enable_gqa=True), gates[slot, :, None, None])
        if out is None and rows == 1:
            return o.view(1, heads, head_dim).to(q.dtype)
        if out is None:
            out = torch.empty_like(q)
        out[lo] = o.view(heads, head_dim)
    return out if out is not None else torch.zeros_like(q)
