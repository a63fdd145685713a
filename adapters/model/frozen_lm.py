"""The frozen causal LM: a compact Llama-family implementation (Llama, SmolLM2, Mistral, Qwen2).

One definition serves training and serving. The decoder runs on any token layout (padded
``(B, S)`` or packed ``(N,)``): every layer computes q/k/v with RoPE at the given positions and
hands them to an ``attend(layer, q, k, v)`` callback that owns the attention pattern and any KV
cache. ``talora.adapters.model.talora_model`` supplies the TA-LoRA callbacks; ``causal_attend`` is the
plain causal one used for the bare model. Parameter names match Hugging Face checkpoints, so
``load_state_dict(strict=True)`` takes their weights unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from talora.adapters.model.config import ModelConfig
from talora.adapters.model.precision import float_matmul_enabled, float_matmul_scope, half_cpu

# attend(layer_idx, q (..., H, h), k (..., H_kv, h), v (..., H_kv, h)) -> (..., H, h)
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as the reference implementation does, whatever the dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies ``(head_dim/2,)`` with Llama-3 or linear scaling applied."""
    h = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, h, 2, dtype=torch.int64).float() / h))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., heads, h)`` by its ``positions (...)`` (rotate-half convention)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = emb.cos().to(x.dtype)[..., None, :]
    sin = emb.sin().to(x.dtype)[..., None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * h, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * h, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * h, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * h, d, bias=False)
        self.cfg = cfg

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
        cfg, lead = self.cfg, x.shape[:-1]
        q = self.q_proj(x).view(*lead, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(*lead, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A frozen Llama-family LM whose attention pattern is supplied by the caller."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._half_cpu: bool | None = None  # 16-bit weights on a CPU without native kernels (cached)

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 whatever dtype the weights are cast to.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.model.embed_tokens.weight.device)
        self._half_cpu = None  # dtype or device may have changed
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def float_matmul(self) -> bool:
        """Whether the matrix products run in float32 on 16-bit inputs (a CPU without native
        16-bit kernels: ``talora.adapters.model.precision``). Checked once per dtype and device, so the
        layers of a GPU step pay one attribute read; ``TALORA_FLOAT_MATMUL`` is read on each call."""
        if self._half_cpu is None:
            self._half_cpu = half_cpu(self.dtype, self.device)
        return self._half_cpu and float_matmul_enabled()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    @float_matmul_scope
    def layer_forward(self, idx: int, hidden: torch.Tensor, positions: torch.Tensor,
                      attend: AttendFn) -> torch.Tensor:
        layer = cast(DecoderLayer, self.model.layers[idx])
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(hidden), positions, self.inv_freq)
        attn = attend(idx, q, k, v)
        hidden = hidden + layer.self_attn.o_proj(attn.reshape(*attn.shape[:-2], -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @float_matmul_scope
    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   before: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """All decoder layers then the final norm; returns the last hidden states. ``before(idx,
        hidden)``, when given, rewrites the hidden states that enter layer ``idx``."""
        for idx in range(self.config.num_layers):
            if before is not None:
                hidden = before(idx, hidden)
            hidden = self.layer_forward(idx, hidden, positions, attend)
        return self.model.norm(hidden)

    @float_matmul_scope
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bare-model logits ``(B, S, V)`` for right-padded ``input_ids (B, S)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        attend = causal_attend(attention_mask.bool())
        return self.logits(self.run_layers(self.embed(input_ids), positions, attend))


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=-2)


def dense_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of padded ``q (B,S,H,h)`` over ``k, v (B,T,H_kv,h)`` with ``mask (B,S,T)``.

    Queries with no visible key return zeros.
    """
    group = q.shape[-2] // k.shape[-2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, repeat_kv(k, group), repeat_kv(v, group)))
    scores = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.float().masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
    return (probs @ vh).transpose(1, 2)


def causal_attend(attention_mask: torch.Tensor) -> AttendFn:
    """Plain causal attention over right-padded rows (the bare model)."""
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal[None] & attention_mask[:, None, :]
    return lambda idx, q, k, v: dense_attention(q, k, v, mask)
