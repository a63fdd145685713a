"""``TrainConfig``: every setting of ``talora-train``, typed and validated.

One dataclass serves the three stages (``source``, ``target``, ``eval``); ``STAGE_FIELDS`` says
which fields each subcommand exposes as flags. Values come from defaults, then a JSON or YAML
file (``--config``), then kebab-case flags (``--shared-prompt-len 32``); ``__post_init__``
raises ``ValueError`` naming the offending field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from talora.adapters.model.config import AdapterShape, TaloraConfig, described

STAGES = ("source", "target", "eval")
SAMPLING = ("proportional", "temperature")
TARGET_INIT = ("mean", "nearest", "random")
GATE_INIT = ("zero", "source")
LR_SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
BASIS_INITS = ("random", "embedding")
CLASS_BALANCE = ("none", "sampler")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class TrainConfig(AdapterShape):
    """Settings of one ``talora-train`` run, each with its help text (the flags show it). The adapter
    shape fields come from ``AdapterShape`` (the source stage uses them; the target stage takes the
    bundle's)."""

    stage: str = described("source", "training stage (set by the subcommand)")
    model: str = described(
        "smollm2-135m-instruct",
        "frozen LM: 'smollm2-135m-instruct' (embedded default), a checkpoint folder or a hub id")
    tasks: list[str] = described(help="comma-separated registry task names (talora.adapters.data)", factory=list)
    task_files: list[str] = described(
        help='comma-separated JSONL/CSV (text,label) files registered as tasks named after the file', factory=list)
    output_dir: str = described("runs/talora", "run folder: bundle, task adapters, checkpoints, log.jsonl, curves")
    # adapter init (source stage; the shape fields are AdapterShape's)
    basis_init: str = described(
        "random", "init of A: random (N(0, init_std)) or embedding (rows at the token embeddings' norm)")
    prompt_init_text: str = described(
        "", "initialise P from the embeddings of this text (repeated to m rows); empty: random vocabulary rows")
    # optimisation
    steps: int = described(
        200, "optimiser steps (target stage: 0 = by the training data, 48 for k-shot sets and about 4.5 passes "
             "over full data, 48-144)")
    batch_size: int = described(8, "examples per step per process (mixed tasks)")
    lr: float = described(0.3, "learning rate of the fast weights B_t (AdamW)")
    gate_lr_ratio: float = described(0.1, "learning rate of the gates g_t = lr * gate_lr_ratio")
    basis_lr_ratio: float = described(0.0, "learning rate of A = lr * basis_lr_ratio (0: the same as P)")
    weight_decay: float = described(0.0, "AdamW weight decay of every trained tensor")
    warmup_steps: int = described(0, "linear learning-rate warm-up steps")
    lr_schedule: str = described("constant", "constant, cosine or linear decay after the warm-up")
    grad_clip: float = described(1.0, "clip the global gradient norm to this (0 = off)")
    sampling: str = described("temperature", "task mixing: proportional (to task size) or temperature (size ** (1/T))")
    sampling_temperature: float = described(2.0, "T of temperature sampling (1 = proportional, large = uniform)")
    max_input_tokens: int = described(
        96, "truncate each input text to this many tokens (at most the task's own limit; target stage: 0 = by the "
            "task, 48 for a packaged task, for a user's file the 95th percentile of its training texts' token "
            "lengths, at most 512)")
    train_limit: int = described(
        2000, "use at most this many training examples per task (class-balanced; 0 = all; target stage: -1 = by "
              "the task, 256 for a packaged task, all of a user's file)")
    class_balance: str = described(
        "sampler", "classification batches: sampler (each label equally often) or none (as the data falls)")
    keep_best: bool = described(
        True, "keep the trained tensors of the best dev evaluation (eval_every > 0), or of the lowest "
              "smoothed training loss if the loss diverges; a warning says when this happens")
    # target stage
    bundle: str = described("", "source bundle folder (target and eval stages)")
    task: str = described("", "the task to adapt (target) or score (eval)")
    shots: int = described(
        0, "k-shot: k training examples per label for classification, k in all for QA (0 = full data)")
    target_init: str = described(
        "mean", "initial B_target: mean of the source B_t, the nearest source task (lowest loss), or random")
    gate_init: str = described(
        "zero", "initial g_target: zero (the method's zero-initialised gate) or source (taken like B_target: the "
                "mean of the source gates, or the nearest task's; zero with target_init random)")
    train_shared: bool = described(False, "target stage: also train P and A (slow); writes a new bundle")
    task_basis_rows: int = described(
        0, "k: rows of each trained task's own basis V_t (k x d) beside the shared A; the task prompt becomes "
        "scale * (B_t A + U_t V_t) with U_t (n x k) starting at zero (0 = none; not with full_rank; target "
        "stage: -1 = by the training data, 1 for full data of at least 128 examples and 0 otherwise)")
    # evaluation
    split: str = described("dev", "split to evaluate (train, dev or test)")
    eval_limit: int = described(200, "evaluate on at most this many examples per task (class-balanced; 0 = all)")
    eval_every: int = described(0, "evaluate every this many steps during training (0 = only at the end)")
    eval_batch_size: int = described(16, "examples per forward pass at evaluation")
    max_new_tokens: int = described(24, "greedy-decoding budget for extractive QA answers")
    # bookkeeping
    seed: int = described(0, "seed of the initialisation and of the data order")
    save_every: int = described(50, "write a resumable checkpoint every this many steps (0 = only at the end)")
    log_every: int = described(1, "write a JSONL log row every this many steps")
    resume: bool = described(False, "continue from the newest checkpoint in output_dir")
    device: str = described("auto", "auto (CUDA when available), cpu or cuda")
    dtype: str = described(
        "float32", "frozen model dtype: float32, or bfloat16 (adapter tensors stay float32 master copies; "
                   "~1.6x faster training on CPUs with AVX-512 BF16)")
    threads: int = described(0, "torch CPU threads (0 = leave torch's default)")
    progress: bool = described(True, "show progress bars")

    def __post_init__(self) -> None:
        super().__post_init__()  # the shape fields, with their own names
        _require(self.stage in STAGES, "stage", f"{self.stage!r} is not one of {STAGES}")
        _require(bool(self.model), "model", "must name a model")
        for name in ("batch_size", "eval_batch_size", "max_new_tokens"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        if self.stage == "target":  # 0 / -1: set from the task (recipe.target_input_tokens, target_train_limit)
            _require(self.max_input_tokens >= 0, "max_input_tokens",
                     f"must be > 0, or 0 (by the task), got {self.max_input_tokens}")
            _require(self.train_limit >= -1, "train_limit",
                     f"must be >= 0 (0 = all), or -1 (by the task), got {self.train_limit}")
        else:
            _require(self.max_input_tokens > 0, "max_input_tokens", f"must be > 0, got {self.max_input_tokens}")
            _require(self.train_limit >= 0, "train_limit", f"must be >= 0, got {self.train_limit}")
        if self.stage == "target":  # 0: set from the training data (recipe.target_steps)
            _require(self.steps >= 0, "steps", f"must be >= 0 (0 = by the training data), got {self.steps}")
        else:
            _require(self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        for name in ("shots", "eval_limit", "eval_every", "warmup_steps", "save_every", "threads"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")
        for name in ("lr", "gate_lr_ratio", "sampling_temperature"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _require(self.sampling in SAMPLING, "sampling", f"{self.sampling!r} is not one of {SAMPLING}")
        _require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"{self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        _require(self.target_init in TARGET_INIT, "target_init", f"{self.target_init!r} is not one of {TARGET_INIT}")
        _require(self.gate_init in GATE_INIT, "gate_init", f"{self.gate_init!r} is not one of {GATE_INIT}")
        _require(self.device in DEVICES, "device", f"{self.device!r} is not one of {DEVICES}")
        _require(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
        _require(self.basis_init in BASIS_INITS, "basis_init", f"{self.basis_init!r} is not one of {BASIS_INITS}")
        _require(self.class_balance in CLASS_BALANCE, "class_balance",
                 f"{self.class_balance!r} is not one of {CLASS_BALANCE}")
        if self.stage == "target":  # -1: set from the training data (recipe.target_basis_rows)
            _require(self.task_basis_rows >= -1, "task_basis_rows",
                     f"must be >= 0, or -1 (by the training data), got {self.task_basis_rows}")
        else:
            _require(self.task_basis_rows >= 0, "task_basis_rows", f"must be >= 0, got {self.task_basis_rows}")
        _require(not (self.task_basis_rows > 0 and self.full_rank), "task_basis_rows",
                 "a full-rank task prompt has no basis to extend; use 0 with full_rank")
        _require(self.basis_lr_ratio >= 0, "basis_lr_ratio", f"must be >= 0, got {self.basis_lr_ratio}")
        _require(self.split in ("train", "dev", "test"), "split", f"{self.split!r} is not train, dev or test")
        _require(isinstance(self.tasks, list) and all(isinstance(t, str) for t in self.tasks),
                 "tasks", "must be a list of task names")
        if self.stage == "source":
            _require(bool(self.tasks or self.task_files), "tasks", "the source stage needs at least one task")
        if self.stage in ("target", "eval"):
            _require(bool(self.bundle), "bundle", f"the {self.stage} stage needs a bundle folder")
            _require(bool(self.task), "task", f"the {self.stage} stage needs a task name")

    def talora(self) -> TaloraConfig:
        return TaloraConfig(**self.shape())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_updates(self, **changes) -> TrainConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown TrainConfig field")
        for f in fields(cls):
            if f.name in data:
                data = {**data, f.name: _coerce(f.name, str(f.type), data[f.name])}
        return cls(**data)


_FILE_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _coerce(name: str, type_name: str, value: Any) -> Any:
    """Check a file value's type (JSON/YAML give ints for floats, which is fine)."""
    expected = _FILE_TYPES.get(type_name)
    if type_name == "list[str]":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        _require(isinstance(value, list), name, f"must be a list, got {value!r}")
        return [str(v) for v in value]
    if expected is not None:
        bad = not isinstance(value, expected) or (type_name in ("int", "float") and isinstance(value, bool))
        _require(not bad, name, f"must be {type_name}, got {value!r}")
        return float(value) if type_name == "float" else value
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) config file into a dict of fields."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of field names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


_COMMON = ("model", "output_dir", "seed", "device", "dtype", "threads", "progress", "split", "eval_limit",
           "eval_batch_size", "max_new_tokens", "task_files")
_TRAIN = ("steps", "batch_size", "lr", "gate_lr_ratio", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip",
          "max_input_tokens", "train_limit", "class_balance", "keep_best", "eval_every", "save_every", "log_every",
          "resume")
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "source": _COMMON + _TRAIN + ("tasks", "shared_prompt_len", "task_prompt_len", "rank", "scale", "gated",
                                  "full_rank", "deep_prompt", "slow_lr_ratio", "basis_lr_ratio", "init_std",
                                  "basis_init", "prompt_init_text", "sampling", "sampling_temperature",
                                  "task_basis_rows"),
    "target": _COMMON + _TRAIN + ("bundle", "task", "shots", "target_init", "gate_init", "train_shared",
                                  "slow_lr_ratio", "basis_lr_ratio", "task_basis_rows"),
    "eval": tuple(f for f in _COMMON if f != "output_dir") + ("bundle", "task"),
}
