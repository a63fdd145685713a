"""Typed, validated configuration: the frozen model's architecture and the TA-LoRA adapter.

``ModelConfig.from_hf`` reads a Hugging Face ``config.json`` dict (Llama, SmolLM2, Mistral,
Qwen2); ``TaloraConfig`` holds the adapter's sizes and ablation switches. Both raise
``ValueError`` naming the offending field.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


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

    def __post_init__(self) -> None:
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

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x keys)."""
        model_type = cfg.get("model_type", "")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type", "default") == "default":
            rope = {}
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope or None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def described(default: Any = MISSING, help: str = "", factory: Any = MISSING) -> Any:
    """A dataclass field with its help text beside it (``metadata["help"]``; CLI flags show it)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def help_of(cls: type, name: str) -> str:
    """The help text of the dataclass field ``name`` of ``cls``."""
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


@dataclass(frozen=True)
class AdapterShape:
    """The sizes and ablation switches of a TA-LoRA adapter: what a bundle records (``TaloraConfig``)
    and what a source stage is trained with (``TrainConfig`` inherits them)."""

    shared_prompt_len: int = described(32, "m: rows of the shared prompt P (0 = no shared prompt)")
    task_prompt_len: int = described(8, "n: rows of each task prompt")
    rank: int = described(4, "r: rows of the shared basis A")
    scale: float = described(1.0, "task prompt = scale * B_t A")
    gated: bool = described(True, "zero-initialised gated attention for the task prompt (false: plain two-part prompt)")
    full_rank: bool = described(False, "B_t is n x d with no basis (ablation)")
    deep_prompt: bool = described(
        False, "a task prompt per layer: B_t is L x n x r and layer l reads its own rows scale * B_t[l] A as the "
        "task prompt's input (prefix-tuning style); false: one task prompt at the input, carried through the layers")
    slow_lr_ratio: float = described(
        0.1, "learning rate of P (and of A unless basis_lr_ratio is set) = lr * slow_lr_ratio")
    init_std: float = described(0.02, "std of the random init of source B_t (and of A with basis_init=random)")

    def __post_init__(self) -> None:
        _require(self.shared_prompt_len >= 0, "shared_prompt_len", f"must be >= 0, got {self.shared_prompt_len}")
        _require(self.task_prompt_len > 0, "task_prompt_len", f"must be > 0, got {self.task_prompt_len}")
        _require(self.rank > 0, "rank", f"must be > 0, got {self.rank}")
        _require(self.scale > 0, "scale", f"must be > 0, got {self.scale}")
        _require(0 < self.slow_lr_ratio <= 1, "slow_lr_ratio", f"must be in (0, 1], got {self.slow_lr_ratio}")
        _require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")

    def fast_shape(self, num_layers: int, hidden_size: int, basis_rows: int = 0) -> tuple[int, ...]:
        """Shape of one task's fast weight B_t: ``(n, r)``, ``(n, d)`` full rank, ``(L, ...)`` deep;
        ``(..., n, r + k)`` for a task owning ``basis_rows`` k basis rows (``[B_t | U_t]``)."""
        row = (self.task_prompt_len, (hidden_size if self.full_rank else self.rank) + basis_rows)
        return (num_layers, *row) if self.deep_prompt else row

    def shape(self) -> dict[str, Any]:
        """The ``AdapterShape`` fields of this config, by name."""
        return {name: getattr(self, name) for name in AdapterShape.__dataclass_fields__}


@dataclass(frozen=True)
class TaloraConfig(AdapterShape):
    """Sizes and switches of a TA-LoRA adapter bundle (see docs/method.md).

    ``shared_prompt_len`` (m) shared soft-prompt rows, ``task_prompt_len`` (n) task-prompt rows,
    ``rank`` (r) of the shared basis. Ablations: ``gated=False`` joins the task keys to the main
    softmax; ``full_rank=True`` makes each task's fast weight n x d with no basis;
    ``slow_lr_ratio=1`` removes the fast/slow split; ``shared_prompt_len=0`` drops the shared prompt.
    """

    extra: dict[str, Any] = described(help="free-form fields a bundle keeps beside the shape", factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaloraConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown TaloraConfig field")
        return cls(**data)
