"""The frozen causal LM: one compact decoder for the supported families (Llama 2/3.x, SmolLM2,
Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3, Phi-3/Phi-4-mini), switched by ``ModelConfig`` fields:
q/k norms, Gemma's (1 + w) and sandwich norms, fused projections, GELU, embedding scale, partial
and per-layer RoPE, sliding windows and soft-capping.

One definition serves training and serving. The decoder runs on any token layout (padded
``(B, S)`` or packed ``(N,)``): every layer computes q/k/v with RoPE at the given positions and
hands them to an ``attend(layer, q, k, v)`` callback that owns the attention pattern and any KV
cache; ``CausalLM.attention(layer)`` says how that layer attends (scale, window, softcap).
``talora.adapters.model.talora_model`` supplies the TA-LoRA callbacks; ``causal_attend`` is the
plain causal one used for the bare model. Parameter names match Hugging Face checkpoints, so
``load_state_dict(strict=True)`` takes their weights unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from talora.adapters.model.config import FULL, SLIDING, ModelConfig
from talora.adapters.model.precision import float_matmul_enabled, float_matmul_scope, half_cpu

# attend(layer_idx, q (..., H, h), k (..., H_kv, h), v (..., H_kv, h)) -> (..., H, h)
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm with float32 statistics. Llama-style: ``weight * normed.to(dtype)``; with
    ``unit_offset`` (Gemma): ``(normed * (1 + weight)).to(dtype)``, the whole product in float32."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as the reference implementations do, whatever the dtype (one fused op)
        shape = (x.shape[-1],)
        if self.unit_offset:
            return (F.rms_norm(x.float(), shape, None, self.eps) * (1.0 + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)


def _inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies ``(rotary_dim/2,)`` of the full-attention layers, with Llama-3, linear
    or LongRoPE (short factors) scaling applied."""
    h = cfg.rotary_dim
    inv_freq = _inv_freq(cfg.rope_theta, h)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "longrope":
        inv_freq = inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
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


@dataclass
class Rope:
    """One RoPE table: ``inv_freq (rotary_dim/2,)``; with LongRoPE, ``long_inv_freq`` for the
    positions at or past ``long_from`` and ``factor`` on cos and sin."""

    inv_freq: torch.Tensor
    long_inv_freq: torch.Tensor | None = None
    long_from: int = 0
    factor: float = 1.0

    @classmethod
    def of(cls, cfg: ModelConfig, local: bool = False, device: torch.device | str | None = None) -> Rope:
        """The full-attention layers' table, or with ``local`` the sliding layers' (Gemma 3: its own base)."""
        if local and cfg.local_rope_theta is not None:
            return cls(_inv_freq(cfg.local_rope_theta, cfg.rotary_dim).to(device))
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type") != "longrope":
            return cls(rope_inv_freq(cfg).to(device))
        old_ctx = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or cfg.max_position_embeddings / old_ctx
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
        long = _inv_freq(cfg.rope_theta, cfg.rotary_dim) / torch.tensor(scaling["long_factor"], dtype=torch.float32)
        return cls(rope_inv_freq(cfg).to(device), long.to(device), int(old_ctx), float(attention_factor))


    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin (..., 1, rotary_dim)`` of ``positions (...)`` in ``dtype``, for ``rotate`` (``sin``'s
        first half negated, as ``rotate`` takes it). LongRoPE
        rotates the positions at or past ``long_from`` by its long factors, each position by its own: a
        cached key keeps its rotation whatever comes after it (transformers switches the whole sequence
        at once instead)."""
        pos = positions.to(torch.float32)[..., None]
        freqs = pos * self.inv_freq.to(positions.device)
        if self.long_inv_freq is not None:
            long = pos * self.long_inv_freq.to(positions.device)
            freqs = torch.where(positions[..., None] >= self.long_from, long, freqs)
        cos, sin = freqs.cos(), freqs.sin()
        if self.factor != 1.0:
            cos, sin = cos * self.factor, sin * self.factor
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        return cos.to(dtype)[..., None, :], sin.to(dtype)[..., None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., heads, h)`` by ``Rope.tables`` (rotate-half convention) over its first
    ``cos.shape[-1]`` dims; the rest pass through (partial rotary).

    The rotate-half form ``x * cos + cat(-x2, x1) * sin`` with the sign folded into the table's
    first half: ``x * cos + cat(x2, x1) * sin'``, the halves swapped by one ``flip``."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot] if rot < x.shape[-1] else x
    swapped = x_rot.unflatten(-1, (2, rot // 2)).flip(-2).flatten(-2)
    out = torch.addcmul(x_rot * cos, swapped, sin)
    return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: Rope | torch.Tensor) -> torch.Tensor:
    """``x (..., heads, h)`` rotated at its ``positions (...)`` by ``rope`` (a table, or inverse frequencies)."""
    return rotate(x, *(rope if isinstance(rope, Rope) else Rope(rope)).tables(positions, x.dtype))


def columns_first(device: torch.device) -> bool:
    """Whether weights on ``device`` are stored transposed (``[in, out]`` contiguous, the ``[out, in]``
    parameter a view of it). On CPU, MKL's product of a few rows against a row-major ``[out, in]``
    weight repacks the weight on every call; against the transposed layout it does not, which speeds
    up short prefills (docs/benchmarks.md, "decode_vs_hf"). GPUs keep the usual layout."""
    return device.type == "cpu"


def lay_out(module: nn.Linear | nn.Embedding) -> None:
    """Store ``module``'s weight in its device's layout (``columns_first``, else row-major: a weight
    moved off the CPU keeps its strides); values are unchanged."""
    weight = module.weight
    if weight.is_meta:
        return
    if columns_first(weight.device):
        if not weight.t().is_contiguous():
            module.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
    elif not weight.is_contiguous():
        module.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=weight.requires_grad)


class Stacked:
    """Several ``nn.Linear`` of one input laid out as one matrix: their weights (and biases) become views
    of it, so one product computes them all and no weight is held twice. On a ``columns_first`` device
    the matrix is stored ``[in, out]`` (each weight a column block, seen transposed). ``__call__``
    returns None when the layout no longer holds (a parameter was replaced, or it needs a gradient):
    use the layers then."""

    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        parts = [lin.weight.detach() for lin in linears]
        if columns_first(parts[0].device):
            self.weight = torch.cat([w.t() for w in parts], dim=1).t()  # [out, in], a view of [in, out]
        else:
            self.weight = torch.cat(parts)
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
        row, self.views = 0, []
        for lin in linears:
            rows = lin.out_features
            lin.weight = nn.Parameter(self.weight[row:row + rows], requires_grad=lin.weight.requires_grad)
            self.views.append((lin._parameters, lin.weight, lin.weight.data_ptr(), lin.weight.stride()))
            if self.bias is not None and lin.bias is not None:
                lin.bias = nn.Parameter(self.bias[row:row + rows], requires_grad=lin.bias.requires_grad)
            row += rows

    @classmethod
    def of(cls, *linears: nn.Linear) -> Stacked | None:
        return None if linears[0].weight.is_meta else cls(*linears)

    def holds(self) -> bool:
        # runs on every product: reads the layers' parameter dicts, not ``lin.weight`` (nn.Module's slow
        # attribute lookup, a measurable share of a decode step)
        for params, weight, ptr, stride in self.views:
            if params["weight"] is not weight or weight.requires_grad or weight.data_ptr() != ptr \
                    or weight.stride() != stride:
                return False
        return self.bias is None or self.linears[0].bias is not None and \
            self.linears[0].bias.data_ptr() == self.bias.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """All the layers' outputs side by side (``(..., sum of out_features)``), or None."""
        return F.linear(x, self.weight, self.bias) if self.holds() else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.head_dim
        self.sizes = (cfg.num_heads * h, cfg.num_kv_heads * h, cfg.num_kv_heads * h)
        if cfg.fused_projections:  # Phi-3: one matrix, q then k then v rows
            self.qkv_proj = nn.Linear(d, sum(self.sizes), bias=cfg.attention_bias)
        else:
            self.q_proj = nn.Linear(d, self.sizes[0], bias=cfg.attention_bias)
            self.k_proj = nn.Linear(d, self.sizes[1], bias=cfg.attention_bias)
            self.v_proj = nn.Linear(d, self.sizes[2], bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * h, d, bias=False)
        self.stacked: Stacked | None = None
        if cfg.qk_norm:  # over each head's dims, before RoPE
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.unit_offset_norm)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.unit_offset_norm)
        self.cfg = cfg

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values ``(..., heads, h)`` of ``x``, q and k rotated (``Rope.tables``)."""
        cfg = self.cfg
        if cfg.fused_projections:
            out = self.qkv_proj(x)
        else:
            out = self.stacked(x) if self.stacked is not None else None
            if out is None:  # the weights are no longer one matrix (replaced, or trainable)
                out = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)
        q, k, v = out.unflatten(-1, (sum(heads), cfg.head_dim)).split(heads, dim=-2)
        if cfg.qk_norm:
            return rotate(self.q_norm(q), cos, sin), rotate(self.k_norm(k), cos, sin), v
        q, k = rotate(out[..., :cfg.head_dim * (heads[0] + heads[1])].unflatten(-1, (-1, cfg.head_dim)),
                      cos, sin).split(heads[:2], dim=-2)  # q and k heads in one rotation
        return q, k, v

    def stack(self) -> None:
        """One product for q, k and v (``Stacked``): called whenever the weights move or change dtype."""
        if not self.cfg.fused_projections:
            self.stacked = Stacked.of(self.q_proj, self.k_proj, self.v_proj)
        else:
            lay_out(self.qkv_proj)
        lay_out(self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.fused_projections
        if self.fused:  # Phi-3: gate rows then up rows
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"
        self.stacked: Stacked | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            both = self.stacked(x) if self.stacked is not None else None
            gate, up = (self.gate_proj(x), self.up_proj(x)) if both is None else both.chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)

    def stack(self) -> None:
        """One product for gate and up (``Stacked``)."""
        if not self.fused:
            self.stacked = Stacked.of(self.gate_proj, self.up_proj)
        else:
            lay_out(self.gate_up_proj)
        lay_out(self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, cfg.unit_offset_norm)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:  # Gemma: post_attention_layernorm norms the attention output
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.unit_offset_norm)


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends: softmax ``scale``, sliding ``window`` (0: none) and score ``softcap`` (0: none)."""

    scale: float
    window: int = 0
    softcap: float = 0.0


class CausalLM(nn.Module):
    """A frozen decoder-only LM whose attention pattern is supplied by the caller."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._half_cpu: bool | None = None  # 16-bit weights on a CPU without native kernels (cached)
        self._attention = [LayerAttention(cfg.softmax_scale, cfg.layer_window(i), cfg.attn_softcap or 0.0)
                           for i in range(cfg.num_layers)]
        self._build_rope(self.inv_freq.device)
        self._stack()

    def _build_rope(self, device) -> None:
        cfg = self.config
        self.rope = Rope.of(cfg, device=device)
        local = cfg.local_rope_theta is not None and cfg.layer_types is not None
        self._layer_rope = [Rope.of(cfg, local=True, device=device) if local and t == SLIDING else self.rope
                            for t in (cfg.layer_types or [FULL] * cfg.num_layers)]

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 whatever dtype the weights are cast to.
        super()._apply(fn, recurse)
        device = self.model.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config).to(device)
        self._build_rope(device)
        self._half_cpu = None  # dtype or device may have changed
        self._stack()
        return self

    def _stack(self) -> None:
        """Lay out each layer's q/k/v and gate/up weights for one product each (``Stacked``), every
        weight in its device's layout (``columns_first``), a head tied to the embedding too (``embed``
        then gathers columns: as fast as rows for a few tokens, a few ms more for thousands)."""
        for layer in self.model.layers:
            for part in (cast(DecoderLayer, layer).self_attn, cast(DecoderLayer, layer).mlp):
                if part.stacked is None or not part.stacked.holds():
                    part.stack()
        embedding = self.model.embed_tokens
        if self.lm_head.weight is embedding.weight:  # tied: the head's layout wins, lookups gather columns
            lay_out(embedding)
            self.lm_head.weight = embedding.weight
        else:
            lay_out(self.lm_head)

    def attention(self, idx: int) -> LayerAttention:
        """How layer ``idx`` attends: its softmax scale, sliding window and score softcap."""
        return self._attention[idx]

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
        """Input embeddings of ``input_ids``: the token rows times ``embed_scale`` (Gemma: sqrt(d),
        rounded to the weights' dtype as transformers does). Soft-prompt rows live in this space."""
        table = self.model.embed_tokens.weight
        if table.stride(0) == 1 and table.shape[1] > 1:  # columns-first (a tied head's layout)
            rows = table.t().index_select(1, input_ids.reshape(-1)).t().reshape(*input_ids.shape, -1)
        else:
            rows = self.model.embed_tokens(input_ids)
        return rows if self.config.embed_scale == 1.0 else rows * self.embed_scale()

    def embed_scale(self) -> torch.Tensor:
        """The embedding multiplier as a scalar of the weights' dtype."""
        return torch.tensor(self.config.embed_scale, dtype=self.dtype, device=self.device)

    def layer_forward(self, idx: int, layer: DecoderLayer, hidden: torch.Tensor,
                      rotary: tuple[torch.Tensor, torch.Tensor], attend: AttendFn) -> torch.Tensor:
        """Decoder layer ``idx`` (the module ``layer``); ``rotary``: its RoPE ``cos, sin`` at the tokens'
        positions (``Rope.tables``). Called by ``run_layers``, under its precision scope."""
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(hidden), *rotary)
        attn = attend(idx, q, k, v)
        out = layer.self_attn.o_proj(attn.reshape(*attn.shape[:-2], -1))
        if self.config.sandwich_norm:
            hidden = hidden + layer.post_attention_layernorm(out)
            return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        hidden = hidden + out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @float_matmul_scope
    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   before: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """All decoder layers then the final norm; returns the last hidden states. ``before(idx,
        hidden)``, when given, rewrites the hidden states that enter layer ``idx``. RoPE tables are made
        once per call."""
        ropes = {id(rope): rope for rope in self._layer_rope}  # one or two distinct (Gemma 3: global, local)
        tables = {key: rope.tables(positions, hidden.dtype) for key, rope in ropes.items()}
        for idx, (layer, rope) in enumerate(zip(self.model.layers, self._layer_rope)):  # no ModuleList index
            if before is not None:
                hidden = before(idx, hidden)
            hidden = self.layer_forward(idx, cast(DecoderLayer, layer), hidden, tables[id(rope)], attend)
        return self.model.norm(hidden)

    @float_matmul_scope
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bare-model logits ``(B, S, V)`` for right-padded ``input_ids (B, S)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        attend = causal_attend(attention_mask.bool(), self.attention)
        return self.logits(self.run_layers(self.embed(input_ids), positions, attend))


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=-2)


def dense_attention(q, k, v, mask: torch.Tensor, scale: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Softmax attention of padded ``q (B,S,H,h)`` over ``k, v (B,T,H_kv,h)`` with ``mask (B,S,T)``.

    Scores are ``q k^T * scale`` (default ``h ** -0.5``), then ``softcap * tanh(scores / softcap)``
    when ``softcap`` is non-zero. Queries with no visible key return zeros.
    """
    group = q.shape[-2] // k.shape[-2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, repeat_kv(k, group), repeat_kv(v, group)))
    scores = ((qh @ kh.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)).float()
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
    return (probs @ vh).transpose(1, 2)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``(..., S, T)``: key at ``k_pos`` lies within ``window`` of the query at ``q_pos`` (``q - k < window``;
    all True for window 0). Causality is the caller's."""
    if not window:
        return torch.ones(q_pos.shape[-1], k_pos.shape[-1], dtype=torch.bool, device=q_pos.device)
    return q_pos[..., :, None] - k_pos[..., None, :] < window


def causal_attend(attention_mask: torch.Tensor,
                  attention: Callable[[int], LayerAttention] | None = None) -> AttendFn:
    """Plain causal attention over right-padded rows (the bare model), each layer as ``attention(layer)``
    says (scale, sliding window, softcap; default: plain softmax at ``h ** -0.5``)."""
    seq = attention_mask.shape[1]
    pos = torch.arange(seq, device=attention_mask.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal[None] & attention_mask[:, None, :]
    masks: dict[int, torch.Tensor] = {0: mask}

    def attend(idx, q, k, v):
        if attention is None:
            return dense_attention(q, k, v, mask)
        spec = attention(idx)
        if spec.window not in masks:
            masks[spec.window] = mask & window_mask(pos, pos, spec.window)[None]
        return dense_attention(q, k, v, masks[spec.window], spec.scale, spec.softcap)
    return attend
