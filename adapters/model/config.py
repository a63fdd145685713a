"""Typed, validated configuration: the frozen model's architecture and the TA-LoRA adapter.

``ModelConfig.from_hf`` reads a Hugging Face ``config.json`` dict (Llama 2/3.x, SmolLM2, Mistral,
Qwen2/2.5, Qwen3, Gemma 2, Gemma 3, Phi-3/Phi-4-mini); ``TaloraConfig`` holds the adapter's
sizes and ablation switches (a pydantic ``Config``, as ``TrainConfig`` is). Both raise ``ValueError``
naming the offending field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# config.json model types read as one of the above: a multimodal Gemma 3 checkpoint's text model
MODEL_TYPE_ALIASES = {"gemma3": "gemma3_text"}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
FULL, SLIDING = "full_attention", "sliding_attention"
# tie_word_embeddings when config.json leaves it out: the default of the family's transformers config class
_TIED_BY_DEFAULT = ("gemma2", "gemma3_text")


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family causal LM.

    Example: SmolLM2-135M is ``ModelConfig(model_type="llama", vocab_size=49152,
    hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100000.0, tie_word_embeddings=True)``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # ----- what the families beyond Llama add (the defaults are Llama's) -----
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    unit_offset_norm: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
    sandwich_norm: bool = False  # attention and MLP outputs normed before the residual, MLP input too (Gemma)
    fused_projections: bool = False  # qkv_proj and gate_up_proj as one matrix each (Phi-3)
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" or "gelu_pytorch_tanh" (Gemma)
    embed_scale: float = 1.0  # token embeddings times this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # softmax scale is this ** -0.5 (Gemma); None: head_dim ** -0.5
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    sliding_window: int | None = None  # a query at position p sees keys at p - window + 1 .. p
    layer_types: tuple[str, ...] | None = None  # per layer FULL or SLIDING; None: the window (if any) everywhere
    local_rope_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * this dims (Phi-4-mini: 0.75)

    def __post_init__(self) -> None:
        if self.layer_types is not None and not isinstance(self.layer_types, tuple):  # a JSON list
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        _require(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
                 f"{self.model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        _require(rope_type in SUPPORTED_ROPE_TYPES, "rope_scaling",
                 f"rope_type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
                _require(key in (self.rope_scaling or {}), "rope_scaling", f"longrope needs {key!r}")
        _require(self.hidden_act in SUPPORTED_ACTIVATIONS, "hidden_act",
                 f"{self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}")
        _require(0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0, "partial_rotary_factor",
                 f"{self.partial_rotary_factor} does not give an even rotary dimension of head_dim={self.head_dim}")
        _require(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                 f"must be positive or null, got {self.sliding_window}")
        if self.layer_types is not None:
            _require(len(self.layer_types) == self.num_layers, "layer_types",
                     f"has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = sorted(set(self.layer_types) - {FULL, SLIDING})
            _require(not unknown, "layer_types", f"{unknown[0] if unknown else ''!r} is not {FULL!r} or {SLIDING!r}")
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, f"must be positive or null, got {value}")

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def softmax_scale(self) -> float:
        """The attention score multiplier."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int:
        """The sliding window of ``layer``; 0: it attends over every earlier key."""
        if self.sliding_window is None or (self.layer_types is not None and self.layer_types[layer] != SLIDING):
            return 0
        return self.sliding_window

    @property
    def has_windows(self) -> bool:
        """Whether some layer attends over a sliding window."""
        return any(self.layer_window(i) for i in range(self.num_layers))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x keys).

        An unsupported ``model_type`` raises ``ValueError`` listing the supported ones. A multimodal
        Gemma 3 config (``model_type`` "gemma3") is read as its ``text_config``."""
        model_type = cfg.get("model_type", "")
        model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = ", ".join(cfg.get("architectures") or []) or "no architectures listed"
            raise ValueError(f"model_type: {cfg.get('model_type', '')!r} ({archs}) is not supported; "
                             f"use one of {SUPPORTED_MODEL_TYPES}")
        if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
            top = cfg
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
            for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id"):
                if key not in cfg and key in top:
                    cfg[key] = top[key]
        gemma = model_type in ("gemma2", "gemma3_text")
        rope_src = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        local_theta = None
        if model_type == "gemma3_text":
            if FULL in rope_src or SLIDING in rope_src:  # transformers 5: one dict per layer type
                local_theta = float((rope_src.get(SLIDING) or {}).get("rope_theta", 10000.0))
                rope_src = rope_src.get(FULL) or {}
                rope_src.setdefault("rope_theta", 1_000_000.0)
            else:
                local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
                rope_src = {"rope_theta": cfg.get("rope_theta", 1_000_000.0), **(cfg.get("rope_scaling") or {})}
        rope = dict(rope_src)
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        partial = float(rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type") in ("su", "yarn") and model_type == "phi3":
            rope["rope_type"] = "longrope"  # what transformers' Phi3Config reads them as
        if rope.get("rope_type") == "longrope":
            rope.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        if rope.get("rope_type", "default") == "default":
            rope = {}
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if model_type in ("qwen2", "qwen3"):
            if not cfg.get("use_sliding_window", False):
                window, layer_types = None, None
            elif layer_types is None:  # transformers: layers from max_window_layers on slide
                start = cfg.get("max_window_layers", 0)
                layer_types = [SLIDING if i >= start else FULL for i in range(cfg["num_hidden_layers"])]
        elif model_type == "gemma2" and layer_types is None:
            layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(cfg["num_hidden_layers"])]
        elif model_type == "gemma3_text" and layer_types is None:
            pattern = cfg.get("sliding_window_pattern", 6)
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(cfg["num_hidden_layers"])]
        if window is None:
            layer_types = None
        if gemma:
            softcaps = (cfg.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
                        cfg.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None))
        else:
            softcaps = (None, None)
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        head_dim = cfg.get("head_dim") or hidden // heads
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope or None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            unit_offset_norm=gemma,
            sandwich_norm=gemma,
            fused_projections=model_type == "phi3",
            hidden_act=act,
            embed_scale=float(hidden ** 0.5) if gemma else 1.0,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", head_dim)) if gemma else None,
            attn_softcap=float(softcaps[0]) if softcaps[0] else None,
            final_softcap=float(softcaps[1]) if softcaps[1] else None,
            sliding_window=int(window) if window else None,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            local_rope_theta=local_theta,
            partial_rotary_factor=partial,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """What a weights fingerprint hashes: ``to_dict`` less the family fields at their defaults, so
        that a Llama, Mistral or Qwen2 checkpoint keeps the fingerprint it had before the fields existed."""
        data = self.to_dict()
        for name in _FAMILY_FIELDS:
            if data[name] == _FAMILY_DEFAULTS[name]:
                del data[name]
        return data


_FAMILY_FIELDS = ("qk_norm", "unit_offset_norm", "sandwich_norm", "fused_projections", "hidden_act", "embed_scale",
                  "query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window", "layer_types",
                  "local_rope_theta", "partial_rotary_factor")
_FAMILY_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.name in _FAMILY_FIELDS}


class Config(BaseModel):
    """A typed, validated, immutable configuration. Each field carries its help text
    (``Field(description=...)``; CLI flags show it). A bad value raises ``ValueError`` whose message
    starts with the field's name (``rank: Input should be greater than 0 (got 0)``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ValueError(error_text(exc)) from None

    def with_updates(self: C, **changes: Any) -> C:
        """A validated copy with ``changes``."""
        return type(self)(**{**self.model_dump(), **changes})


C = TypeVar("C", bound=Config)


def error_text(exc: ValidationError) -> str:
    """``field: what is wrong`` for each error of ``exc``, one a line (a validator's own message, which
    names its field, as it is)."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        if error["type"] == "value_error":
            message = str(error["ctx"]["error"])
            lines.append(f"{name}: {message}" if name else message)
        elif error["type"] == "extra_forbidden":
            lines.append(f"{name}: unknown {exc.title} field")
        else:
            lines.append(f"{name}: {error['msg']} (got {error['input']!r})")
    return "\n".join(lines)


class AdapterShape(Config):
    """The sizes and ablation switches of a TA-LoRA adapter: what a bundle records (``TaloraConfig``)
    and what a source stage is trained with (``TrainConfig`` inherits them)."""

    shared_prompt_len: int = Field(32, ge=0, description="m: rows of the shared prompt P (0 = no shared prompt)")
    task_prompt_len: int = Field(8, gt=0, description="n: rows of each task prompt")
    rank: int = Field(4, gt=0, description="r: rows of the shared basis A")
    scale: float = Field(1.0, gt=0, description="task prompt = scale * B_t A")
    gated: bool = Field(True, description="zero-initialised gated attention for the task prompt (false: plain "
                        "two-part prompt)")
    full_rank: bool = Field(False, description="B_t is n x d with no basis (ablation)")
    deep_prompt: bool = Field(
        False, description="a task prompt per layer: B_t is L x n x r and layer l reads its own rows scale * B_t[l] A "
        "as the task prompt's input (prefix-tuning style); false: one task prompt at the input, carried through the "
        "layers")
    slow_lr_ratio: float = Field(
        0.1, gt=0, le=1, description="learning rate of P (and of A unless basis_lr_ratio is set) = lr * slow_lr_ratio")
    init_std: float = Field(0.02, gt=0, description="std of the random init of source B_t (and of A with "
                            "basis_init=random)")

    def fast_shape(self, num_layers: int, hidden_size: int, basis_rows: int = 0) -> tuple[int, ...]:
        """Shape of one task's fast weight B_t: ``(n, r)``, ``(n, d)`` full rank, ``(L, ...)`` deep;
        ``(..., n, r + k)`` for a task owning ``basis_rows`` k basis rows (``[B_t | U_t]``)."""
        row = (self.task_prompt_len, (hidden_size if self.full_rank else self.rank) + basis_rows)
        return (num_layers, *row) if self.deep_prompt else row

    def shape(self) -> dict[str, Any]:
        """The ``AdapterShape`` fields of this config, by name."""
        return {name: getattr(self, name) for name in AdapterShape.model_fields}


class TaloraConfig(AdapterShape):
    """Sizes and switches of a TA-LoRA adapter bundle (see docs/method.md); a bundle's ``talora.json``
    holds its ``model_dump()``.

    ``shared_prompt_len`` (m) shared soft-prompt rows, ``task_prompt_len`` (n) task-prompt rows,
    ``rank`` (r) of the shared basis. Ablations: ``gated=False`` joins the task keys to the main
    softmax; ``full_rank=True`` makes each task's fast weight n x d with no basis;
    ``slow_lr_ratio=1`` removes the fast/slow split; ``shared_prompt_len=0`` drops the shared prompt.
    """

    extra: dict[str, Any] = Field(default_factory=dict, description="free-form fields a bundle keeps beside the shape")
