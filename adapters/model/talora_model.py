"""TA-LoRA on a frozen LM: the parametrisation and its two equivalent forward paths.

Parameters (docs/method.md): shared prompt ``P (m, d)`` and basis ``A (r, d)`` (slow, shared);
per task a fast weight ``B_t (n, r)`` (``(n, d)`` with ``full_rank``) and a gate ``g_t (L, H)``
starting at zero. The task prompt is ``ΔP_t = scale · B_t A``. A task may also own ``k`` basis rows
``V_t (k, d)`` beside the shared ``A``: its fast weight is then ``[B_t | U_t] (n, r + k)`` and
``ΔP_t = scale · (B_t A + U_t V_t)``, a rank-k residual outside the span of ``A`` (``U_t`` starts at
zero, so the task starts where the shared basis put it). Tasks with and without rows share a batch:
stacking pads ``U`` and ``V`` with zeros, which add nothing. With ``deep_prompt`` each task
has one ``B_t[l]`` per layer, ``(L, n, r)``: the task-prompt rows that enter layer ``l`` are
``scale · B_t[l] A`` instead of the previous layer's output (prefix tuning's deep prompts, still
in the shared basis and behind the gate).

* ``forward_full`` is the plain full-sequence path: every row is ``[P; ΔP_t; X]`` with dense
  two-softmax masks. It is the definition, kept simple, and what the tests compare against.
* The cached path splits the same computation the way the server runs it: ``shared_kv`` once,
  ``task_kv`` once per task, then ``forward_cached`` for the request tokens alone, through the
  ``talora.kernels`` ops. Training uses it too (it is differentiable), so training and serving
  share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from talora.adapters.model.config import TaloraConfig
from talora.adapters.model.frozen_lm import CausalLM, dense_attention, window_mask
from talora.adapters.runtime.batching import BatchMeta
from talora.kernels.dispatch import gated_prefix_attention, lowrank_prompt

SEG_SHARED, SEG_TASK, SEG_INPUT = 0, 1, 2


class TaskAdapter(nn.Module):
    """One task's fast weights: ``fast (n, r + k)`` (or ``(n, d)`` full rank), ``gate (L, H)`` and,
    when it owns basis rows, ``basis (k, d)`` (``None`` when k = 0)."""

    def __init__(self, fast: torch.Tensor, num_layers: int, num_heads: int, basis: torch.Tensor | None = None):
        super().__init__()
        self.fast = nn.Parameter(fast)
        self.gate = nn.Parameter(torch.zeros(num_layers, num_heads, dtype=fast.dtype, device=fast.device))
        self.basis = nn.Parameter(basis) if basis is not None else None

    @property
    def basis_rows(self) -> int:
        """k: the task's own basis rows."""
        return 0 if self.basis is None else self.basis.shape[0]


class LayerViews:
    """``layer(i)``: layer ``i``'s ``keys`` and ``values`` (indexed on their first dimension) as views made
    once, not a tensor index per layer and step (a visible share of a small model's decode step on CPU).
    Made again when ``keys`` or ``values`` is replaced; writes into either show through."""

    keys: torch.Tensor
    values: torch.Tensor

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.__dict__.get("_layer_views")
        if views is None or views[0] is not self.keys or views[1] is not self.values:
            views = (self.keys, self.values, list(zip(self.keys.unbind(0), self.values.unbind(0))))
            self.__dict__["_layer_views"] = views
        return views[2][i]


@dataclass
class PrefixKV(LayerViews):
    """Shared-prompt keys/values of every layer, computed once."""

    keys: torch.Tensor  # (L, m, H_kv, h)
    values: torch.Tensor  # (L, m, H_kv, h)


@dataclass
class SlotKV(LayerViews):
    """Task-prompt keys/values and gates for S task slots."""

    keys: torch.Tensor  # (L, S, n, H_kv, h)
    values: torch.Tensor  # (L, S, n, H_kv, h)
    gates: torch.Tensor  # (S, L, H) raw gate values (tanh applied in the kernel)


class KVCache(LayerViews):
    """Per-layer pools of own keys/values, ``(L, capacity, H_kv, h)``; rows own index ranges."""

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, capacity, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)


class TaloraModel(nn.Module):
    """A frozen ``CausalLM`` with the shared TA-LoRA parameters and named task adapters."""

    def __init__(self, lm: CausalLM, cfg: TaloraConfig, param_dtype: torch.dtype | None = None):
        """``param_dtype``: dtype of the adapter tensors (default: the LM's). Training keeps them
        in float32 on a bfloat16 LM (master copies); they are cast to the LM's dtype where used."""
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.cfg = cfg
        mc = lm.config
        dtype, device = param_dtype or lm.dtype, lm.device
        self.prompt = nn.Parameter(torch.zeros(cfg.shared_prompt_len, mc.hidden_size, dtype=dtype, device=device))
        basis_rows = 0 if cfg.full_rank else cfg.rank
        self.basis = nn.Parameter(torch.zeros(basis_rows, mc.hidden_size, dtype=dtype, device=device))
        self.tasks = nn.ModuleDict()

    # ----- parameters -------------------------------------------------------------------
    @property
    def fast_shape(self) -> tuple[int, ...]:
        """One task's ``B_t``: ``(n, r)``, ``(n, d)`` full rank, with a leading ``L`` when deep."""
        return self.cfg.fast_shape(self.lm.config.num_layers, self.lm.config.hidden_size)

    def _embedding_scale(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` rescaled so that each has the mean norm of a token-embedding row."""
        row_norm = self.lm.model.embed_tokens.weight.float().norm(dim=-1).mean().cpu() * self.lm.config.embed_scale
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6) * row_norm

    def init_shared(self, generator: torch.Generator | None = None, basis_init: str = "random",
                    prompt_ids: list[int] | None = None) -> None:
        """``P`` from token-embedding rows, ``A`` random.

        ``P``: the embeddings of ``prompt_ids`` (an instruction text, repeated to m rows) or of
        randomly chosen vocabulary rows. ``A``: ``basis_init="random"`` draws N(0, init_std);
        ``"embedding"`` draws rows at the token embeddings' scale (each row's norm is the mean
        embedding-row norm), so that ΔP = B A starts in the range the frozen model reads.
        """
        emb = self.lm.model.embed_tokens.weight
        m = self.cfg.shared_prompt_len
        if prompt_ids:
            rows = torch.tensor([prompt_ids[i % len(prompt_ids)] for i in range(m)], dtype=torch.long)
        else:
            rows = torch.randint(0, emb.shape[0], (m,), generator=generator)
        with torch.no_grad():
            self.prompt.copy_(self.lm.embed(rows.to(emb.device)))
            noise = torch.randn(self.basis.shape, generator=generator)
            if basis_init == "embedding":
                noise = self._embedding_scale(noise)
            elif basis_init == "random":
                noise = noise * self.cfg.init_std
            else:
                raise ValueError(f"basis_init: {basis_init!r} is not 'random' or 'embedding'")
            self.basis.copy_(noise.to(self.basis))

    def add_task(self, name: str, fast: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, gate: torch.Tensor | None = None,
                 basis: torch.Tensor | None = None, basis_rows: int = 0) -> TaskAdapter:
        """Add task ``name`` with fast weights ``fast`` (random when None), gate ``gate`` (zero when None)
        and its own basis rows ``basis (k, d)``.

        ``basis_rows`` k > 0 without ``basis`` draws ``V_t`` at the token embeddings' scale and, when
        ``fast`` is None or has the shared shape ``(..., n, r)``, appends k zero columns ``U_t`` to it,
        so the new rows start switched off.
        """
        if basis is not None:
            if basis.dim() != 2 or basis.shape[1] != self.lm.config.hidden_size:
                raise ValueError(f"basis: expected shape (k, {self.lm.config.hidden_size}), got {tuple(basis.shape)}")
            basis_rows = basis.shape[0]
        if basis_rows and self.cfg.full_rank:
            raise ValueError("basis: a full-rank task prompt has no basis to extend")
        if fast is None:
            fast = torch.randn(self.fast_shape, generator=generator) * self.cfg.init_std
        if basis_rows and basis is None:
            basis = self._embedding_scale(torch.randn(basis_rows, self.lm.config.hidden_size, generator=generator))
            if tuple(fast.shape) == self.fast_shape:
                fast = torch.cat([fast, fast.new_zeros(*fast.shape[:-1], basis_rows)], dim=-1)
        shape = self.cfg.fast_shape(self.lm.config.num_layers, self.lm.config.hidden_size, basis_rows)
        if tuple(fast.shape) != shape:
            raise ValueError(f"fast: expected shape {shape}, got {tuple(fast.shape)}")
        mc = self.lm.config

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.prompt.dtype).to(self.lm.device).clone()
        adapter = TaskAdapter(own(fast), mc.num_layers, mc.num_heads, own(basis) if basis is not None else None)
        if gate is not None:
            with torch.no_grad():
                adapter.gate.copy_(gate)
        self.tasks[name] = adapter
        return adapter

    def task_prompts(self, fast: torch.Tensor, bases: torch.Tensor | None = None) -> torch.Tensor:
        """``ΔP`` for stacked fast weights ``(S, n, r + k)`` and task bases ``(S, k, d)`` (None when
        k = 0) -> ``(S, n, d)``; deep: ``(S, L, n, r + k)`` -> ``(S, L, n, d)``, one task prompt per
        layer (a task's rows ``V_t`` serve every layer)."""
        if self.cfg.deep_prompt:
            s, layers = fast.shape[:2]
            flat_bases = None if bases is None else bases.repeat_interleave(layers, dim=0)
            prompts = self.low_rank_prompts(fast.flatten(0, 1), self.basis, flat_bases, self.cfg)
            return prompts.unflatten(0, (s, layers))
        return self.low_rank_prompts(fast, self.basis, bases, self.cfg)

    @staticmethod
    def low_rank_prompts(fast: torch.Tensor, basis: torch.Tensor, bases: torch.Tensor | None,
                         cfg: TaloraConfig) -> torch.Tensor:
        """The one task-prompt formula (the vLLM backend's too): ``[B | U] (S, n, r + k)``, ``A (r, d)``,
        ``V (S, k, d)`` or None -> ``ΔP = scale · (B A + U V)`` ``(S, n, d)``; ``scale · B`` when full rank."""
        if cfg.full_rank:
            return cfg.scale * fast
        s, n = fast.shape[:2]
        r = basis.shape[0]
        out = torch.zeros(s * n, basis.shape[1], dtype=fast.dtype, device=fast.device)
        offsets = torch.arange(s, device=fast.device) * n
        slots = torch.arange(s, dtype=torch.int32, device=fast.device)
        shared = fast[..., :r].contiguous() if bases is not None else fast
        prompts = lowrank_prompt(shared, basis, slots, offsets, out, cfg.scale).view(s, n, -1)
        if bases is None:
            return prompts
        return prompts + cfg.scale * torch.bmm(fast[..., r:], bases.to(fast.dtype))

    def stacked(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast weights ``(S, *fast_shape)`` and gates ``(S, L, H)`` of the named tasks; with task
        basis rows, fast is ``(S, ..., n, r + k_max)``, zero-padded (``task_bases`` pads alike)."""
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task {unknown[0]!r}")
        adapters = [self.adapter(t) for t in names]
        k_max = max(a.basis_rows for a in adapters)
        return (torch.stack([_pad_last(a.fast, k_max - a.basis_rows) for a in adapters]),
                torch.stack([a.gate for a in adapters]))

    def task_bases(self, names: list[str]) -> torch.Tensor | None:
        """The named tasks' own basis rows ``(S, k_max, d)``, zero-padded; None when no task has any."""
        adapters = [self.adapter(t) for t in names]
        k_max = max((a.basis_rows for a in adapters), default=0)
        if not k_max:
            return None
        d = self.lm.config.hidden_size
        rows = [a.basis if a.basis is not None else self.prompt.new_zeros(0, d) for a in adapters]
        return torch.stack([torch.cat([v, v.new_zeros(k_max - v.shape[0], d)]) for v in rows])

    def task_slots(self, prefix: PrefixKV, names: list[str]) -> SlotKV:
        """``task_kv`` of the named tasks (one slot each, in order)."""
        return self.task_kv(prefix, *self.stacked(names), self.task_bases(names))

    def adapter(self, name: str) -> TaskAdapter:
        """The ``TaskAdapter`` of task ``name`` (``KeyError`` if absent)."""
        return cast(TaskAdapter, self.tasks[name])

    # ----- the plain full-sequence path -------------------------------------------------
    def forward_full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     task_names: list[str]) -> torch.Tensor:
        """Logits ``(B, T, V)`` of right-padded inputs, each row ``[P; ΔP_t; X]`` in one sequence."""
        m, n = self.cfg.shared_prompt_len, self.cfg.task_prompt_len
        batch, t_len = input_ids.shape
        fast, gates = self.stacked(task_names)
        # (B, n, d); deep: (B, L, n, d)
        prompts = self.task_prompts(fast, self.task_bases(task_names)).to(self.lm.dtype)
        shared = self.prompt.to(self.lm.dtype).unsqueeze(0).expand(batch, -1, -1)
        hidden = torch.cat([shared, self._layer_prompt(prompts, 0), self.lm.embed(input_ids)], dim=1)
        seg = torch.tensor([SEG_SHARED] * m + [SEG_TASK] * n + [SEG_INPUT] * t_len, device=input_ids.device)
        valid = torch.cat([torch.ones(batch, m + n, dtype=torch.bool, device=input_ids.device),
                           attention_mask.bool()], dim=1)
        main_mask, task_mask = segment_masks(seg, valid)
        pos = torch.arange(m + n + t_len, device=input_ids.device)
        positions = pos.expand(batch, -1)
        masks = {0: (main_mask, task_mask)}

        def attend(layer: int, q, k, v):
            spec = self.lm.attention(layer)
            if spec.window not in masks:  # a sliding window over the positions of [P; ΔP_t; X]
                near = window_mask(pos, pos, spec.window)[None]
                masks[spec.window] = (main_mask & near, task_mask & near)
            main_m, task_m = masks[spec.window]
            if not self.cfg.gated:
                return dense_attention(q, k, v, main_m | task_m, spec.scale, spec.softcap)
            gate = torch.tanh(gates[:, layer, :]).to(q.dtype)  # (B, H)
            main = dense_attention(q, k, v, main_m, spec.scale, spec.softcap)
            return main + gate[:, None, :, None] * dense_attention(q, k, v, task_m, spec.scale, spec.softcap)

        def before(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            rows = self._layer_prompt(prompts, layer)
            return torch.cat([hidden[:, :m], rows, hidden[:, m + n:]], dim=1)

        hidden = self.lm.run_layers(hidden, positions, attend, before if self.cfg.deep_prompt else None)
        return self.lm.logits(hidden[:, m + n:])

    def _layer_prompt(self, prompts: torch.Tensor, layer: int) -> torch.Tensor:
        """The task-prompt rows that enter ``layer``: its own with a deep prompt, else the input's."""
        return prompts[:, layer] if self.cfg.deep_prompt else prompts

    # ----- the cached path -------------------------------------------------------------
    def shared_kv(self) -> PrefixKV:
        """Keys/values of ``P`` in every layer (P attends causally to itself only)."""
        mc, m = self.lm.config, self.cfg.shared_prompt_len
        keys, values = [], []

        def attend(layer: int, q, k, v):
            keys.append(k)
            values.append(v)
            spec, pos = self.lm.attention(layer), torch.arange(m, device=q.device)
            causal = (torch.ones(m, m, dtype=torch.bool, device=q.device).tril() & window_mask(pos, pos, spec.window))
            return dense_attention(q[None], k[None], v[None], causal[None], spec.scale, spec.softcap)[0]

        if m:
            self.lm.run_layers(self.prompt.to(self.lm.dtype), torch.arange(m, device=self.prompt.device), attend)
            return PrefixKV(torch.stack(keys), torch.stack(values))
        empty = self.prompt.new_zeros(mc.num_layers, 0, mc.num_kv_heads, mc.head_dim, dtype=self.lm.dtype)
        return PrefixKV(empty, empty)

    def task_kv(self, prefix: PrefixKV, fast: torch.Tensor, gates: torch.Tensor,
                bases: torch.Tensor | None = None) -> SlotKV:
        """Task-prompt keys/values for stacked ``fast (S, *fast_shape)``, ``gates (S, L, H)`` and
        task basis rows ``bases (S, k, d)`` (None: no task has any)."""
        m, n = self.cfg.shared_prompt_len, self.cfg.task_prompt_len
        s = fast.shape[0]
        prompts = self.task_prompts(fast, bases).to(self.lm.dtype)

        def rows(layer: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
            return self._layer_prompt(prompts, layer).reshape(s * n, -1)
        meta = BatchMeta.prefill([n] * s, list(range(s)), device=fast.device)
        keys, values = [], []

        def attend(layer: int, q, k, v):
            keys.append(k.view(s, n, *k.shape[1:]))
            values.append(v.view(s, n, *v.shape[1:]))
            return self._attend_kernel(layer, q, k, v, meta, prefix, None, gates, own_in_task=True)

        self.lm.run_layers(rows(0), m + meta.positions, attend, rows if self.cfg.deep_prompt else None)
        return SlotKV(torch.stack(keys), torch.stack(values), gates)

    def forward_cached(self, input_ids: torch.Tensor, meta: BatchMeta, prefix: PrefixKV,
                       slots: SlotKV, cache: KVCache | None = None) -> torch.Tensor:
        """Last hidden states ``(N, d)`` of packed request tokens ``input_ids (N,)``.

        With ``cache``, each new token's key/value is first written at ``meta.write_index``
        and the rows attend over their cached keys; without it, over the new tokens alone.
        """
        offset = self.cfg.shared_prompt_len + self.cfg.task_prompt_len
        write = meta.write_index
        if cache is not None and write is None:
            raise ValueError("meta.write_index: a step over a cache needs the cache index of each new token")

        # without autograd, every layer writes its attention output into one buffer (the layer's output
        # projection has read it before the next layer writes): no fresh pages per layer on CPU. A decode
        # step (one query per row) keeps the kernel's own result instead, which saves a copy.
        scratch: list[torch.Tensor] = []

        def attend(layer: int, q, k, v):
            if cache is not None and write is not None:
                keys, values = cache.layer(layer)
                keys.index_copy_(0, write, k.to(keys.dtype))
                values.index_copy_(0, write, v.to(values.dtype))
                k, v = keys, values
            out = None
            if meta.max_q_len != 1 and not torch.is_grad_enabled():
                if not scratch:
                    scratch.append(torch.empty_like(q))
                out = scratch[0]
            return self._attend_kernel(layer, q, k, v, meta, prefix, slots, slots.gates, own_in_task=False,
                                       out=out)

        return self.lm.run_layers(self.lm.embed(input_ids), offset + meta.positions, attend)

    def _attend_kernel(self, layer, q, k, v, meta: BatchMeta, prefix: PrefixKV, slots: SlotKV | None,
                       gates: torch.Tensor, own_in_task: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        if slots is not None:
            slot_k, slot_v = slots.layer(layer)
        else:
            slot_k = slot_v = k.new_zeros(1, 0, *k.shape[1:])
        prefix_k, prefix_v = prefix.layer(layer)
        spec = self.lm.attention(layer)
        return gated_prefix_attention(
            q, k, v, meta.cu_seqlens_q, meta.k_starts, meta.kv_lens,
            prefix_k, prefix_v, slot_k, slot_v, meta.slot_ids,
            gates[:, layer, :], spec.scale, own_in_task=own_in_task, gated=self.cfg.gated, out=out,
            max_q_len=meta.max_q_len, max_kv_len=meta.max_kv_len, window=spec.window, softcap=spec.softcap,
            host_layout=meta.host_layout,
        )


def _pad_last(t: torch.Tensor, extra: int) -> torch.Tensor:
    """``t`` with ``extra`` zero columns appended on its last dimension."""
    return torch.cat([t, t.new_zeros(*t.shape[:-1], extra)], dim=-1) if extra else t


def segment_masks(seg: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Main and task key masks ``(B, S, S)`` of the TA-LoRA segment attention.

    ``seg (S,)`` holds the segment of each position; ``valid (B, S)`` marks real tokens.
    """
    qi, kj = seg[:, None], seg[None, :]
    pos = torch.arange(seg.shape[0], device=seg.device)
    causal = pos[None, :] <= pos[:, None]
    main = ((qi == SEG_SHARED) & (kj == SEG_SHARED) & causal) \
        | ((qi == SEG_TASK) & (kj == SEG_SHARED)) \
        | ((qi == SEG_INPUT) & ((kj == SEG_SHARED) | ((kj == SEG_INPUT) & causal)))
    task = ((qi == SEG_TASK) & (kj == SEG_TASK) & causal) | ((qi == SEG_INPUT) & (kj == SEG_TASK))
    key_ok = valid[:, None, :]
    return main[None] & key_ok, task[None] & key_ok
