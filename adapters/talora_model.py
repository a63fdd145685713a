"""TA-LoRA on a frozen LM: the parametrisation and its two equivalent forward paths.

Parameters (docs/method.md): shared prompt ``P (m, d)`` and basis ``A (r, d)`` (slow, shared);
per task a fast weight ``B_t (n, r)`` (``(n, d)`` with ``full_rank``) and a gate ``g_t (L, H)``
starting at zero. The task prompt is ``ΔP_t = scale · B_t A``. With ``deep_prompt`` each task
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

from talora.adapters.batching import BatchMeta
from talora.adapters.config import TaloraConfig
from talora.adapters.model import CausalLM, dense_attention
from talora.kernels import gated_prefix_attention, lowrank_prompt

SEG_SHARED, SEG_TASK, SEG_INPUT = 0, 1, 2


class TaskAdapter(nn.Module):
    """One task's fast weights: ``fast (n, r)`` (or ``(n, d)`` full rank) and ``gate (L, H)``."""

    def __init__(self, fast: torch.Tensor, num_layers: int, num_heads: int):
        super().__init__()
        self.fast = nn.Parameter(fast)
        self.gate = nn.Parameter(torch.zeros(num_layers, num_heads, dtype=fast.dtype, device=fast.device))


@dataclass
class PrefixKV:
    """Shared-prompt keys/values of every layer, computed once."""

    keys: torch.Tensor  # (L, m, H_kv, h)
    values: torch.Tensor  # (L, m, H_kv, h)


@dataclass
class SlotKV:
    """Task-prompt keys/values and gates for S task slots."""

    keys: torch.Tensor  # (L, S, n, H_kv, h)
    values: torch.Tensor  # (L, S, n, H_kv, h)
    gates: torch.Tensor  # (S, L, H) raw gate values (tanh applied in the kernel)


class KVCache:
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
            self.prompt.copy_(emb[rows.to(emb.device)])
            noise = torch.randn(self.basis.shape, generator=generator)
            if basis_init == "embedding":
                row_norm = emb.float().norm(dim=-1).mean().cpu()
                noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-6) * row_norm
            elif basis_init == "random":
                noise = noise * self.cfg.init_std
            else:
                raise ValueError(f"basis_init: {basis_init!r} is not 'random' or 'embedding'")
            self.basis.copy_(noise.to(self.basis))

    def add_task(self, name: str, fast: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, gate: torch.Tensor | None = None) -> TaskAdapter:
        """Add task ``name`` with fast weights ``fast`` (random when None) and gate ``gate`` (zero when None)."""
        shape = self.fast_shape
        if fast is None:
            fast = torch.randn(shape, generator=generator) * self.cfg.init_std
        if tuple(fast.shape) != shape:
            raise ValueError(f"fast: expected shape {shape}, got {tuple(fast.shape)}")
        mc = self.lm.config
        adapter = TaskAdapter(fast.to(self.prompt.dtype).to(self.lm.device).clone(), mc.num_layers, mc.num_heads)
        if gate is not None:
            with torch.no_grad():
                adapter.gate.copy_(gate)
        self.tasks[name] = adapter
        return adapter

    def task_prompts(self, fast: torch.Tensor) -> torch.Tensor:
        """``ΔP`` for stacked fast weights ``(S, n, r)`` -> ``(S, n, d)``; deep: ``(S, L, n, r)``
        -> ``(S, L, n, d)``, one task prompt per layer."""
        if self.cfg.deep_prompt:
            s, layers = fast.shape[:2]
            return self._prompts(fast.flatten(0, 1)).unflatten(0, (s, layers))
        return self._prompts(fast)

    def _prompts(self, fast: torch.Tensor) -> torch.Tensor:
        if self.cfg.full_rank:
            return self.cfg.scale * fast
        s, n = fast.shape[:2]
        out = torch.zeros(s * n, self.lm.config.hidden_size, dtype=fast.dtype, device=fast.device)
        offsets = torch.arange(s, device=fast.device) * n
        slots = torch.arange(s, dtype=torch.int32, device=fast.device)
        return lowrank_prompt(fast, self.basis, slots, offsets, out, self.cfg.scale).view(s, n, -1)

    def stacked(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast weights ``(S, *fast_shape)`` and gates ``(S, L, H)`` of the named tasks."""
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task {unknown[0]!r}")
        return (torch.stack([self.adapter(t).fast for t in names]),
                torch.stack([self.adapter(t).gate for t in names]))

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
        prompts = self.task_prompts(fast).to(self.lm.dtype)  # (B, n, d); deep: (B, L, n, d)
        shared = self.prompt.to(self.lm.dtype).unsqueeze(0).expand(batch, -1, -1)
        hidden = torch.cat([shared, self._layer_prompt(prompts, 0), self.lm.embed(input_ids)], dim=1)
        seg = torch.tensor([SEG_SHARED] * m + [SEG_TASK] * n + [SEG_INPUT] * t_len, device=input_ids.device)
        valid = torch.cat([torch.ones(batch, m + n, dtype=torch.bool, device=input_ids.device),
                           attention_mask.bool()], dim=1)
        main_mask, task_mask = segment_masks(seg, valid)
        positions = torch.arange(m + n + t_len, device=input_ids.device).expand(batch, -1)

        def attend(layer: int, q, k, v):
            if not self.cfg.gated:
                return dense_attention(q, k, v, main_mask | task_mask)
            gate = torch.tanh(gates[:, layer, :]).to(q.dtype)  # (B, H)
            main = dense_attention(q, k, v, main_mask)
            return main + gate[:, None, :, None] * dense_attention(q, k, v, task_mask)

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
            causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()[None]
            return dense_attention(q[None], k[None], v[None], causal)[0]

        if m:
            self.lm.run_layers(self.prompt.to(self.lm.dtype), torch.arange(m, device=self.prompt.device), attend)
            return PrefixKV(torch.stack(keys), torch.stack(values))
        empty = self.prompt.new_zeros(mc.num_layers, 0, mc.num_kv_heads, mc.head_dim, dtype=self.lm.dtype)
        return PrefixKV(empty, empty)

    def task_kv(self, prefix: PrefixKV, fast: torch.Tensor, gates: torch.Tensor) -> SlotKV:
        """Task-prompt keys/values for stacked ``fast (S, *fast_shape)`` and ``gates (S, L, H)``."""
        m, n = self.cfg.shared_prompt_len, self.cfg.task_prompt_len
        s = fast.shape[0]
        prompts = self.task_prompts(fast).to(self.lm.dtype)

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

        def attend(layer: int, q, k, v):
            if cache is not None:
                cache.keys[layer, meta.write_index] = k.to(cache.keys.dtype)
                cache.values[layer, meta.write_index] = v.to(cache.values.dtype)
                k, v = cache.keys[layer], cache.values[layer]
            return self._attend_kernel(layer, q, k, v, meta, prefix, slots, slots.gates, own_in_task=False)

        return self.lm.run_layers(self.lm.embed(input_ids), offset + meta.positions, attend)

    def _attend_kernel(self, layer, q, k, v, meta: BatchMeta, prefix: PrefixKV, slots: SlotKV | None,
                       gates: torch.Tensor, own_in_task: bool) -> torch.Tensor:
        slot_k = slots.keys[layer] if slots is not None else k.new_zeros(1, 0, *k.shape[1:])
        slot_v = slots.values[layer] if slots is not None else slot_k
        return gated_prefix_attention(
            q, k, v, meta.cu_seqlens_q, meta.k_starts, meta.kv_lens,
            prefix.keys[layer], prefix.values[layer], slot_k, slot_v, meta.slot_ids,
            gates[:, layer, :], q.shape[-1] ** -0.5, own_in_task=own_in_task, gated=self.cfg.gated,
            max_q_len=meta.max_q_len, max_kv_len=meta.max_kv_len,
        )


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
