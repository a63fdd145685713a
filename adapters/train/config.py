"""``TrainConfig``: every setting of ``talora-train``, typed and validated.

One dataclass serves the three stages (``source``, ``target``, ``eval``); ``STAGE_FIELDS`` says
which fields each subcommand exposes as flags. Values come from defaults, then a JSON or YAML
file (``--config``), then kebab-case flags (``--shared-prompt-len 32``); ``__post_init__``
raises ``ValueError`` naming the offending field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from talora.adapters.config import TaloraConfig

STAGES = ("source", "target", "eval")
SAMPLING = ("proportional", "temperature")
TARGET_INIT = ("mean", "nearest", "random")
LR_SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
BASIS_INITS = ("random", "embedding")
CLASS_BALANCE = ("none", "sampler")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass
class TrainConfig:
    """Settings of one ``talora-train`` run; field help lives in ``HELP``."""

    stage: str = "source"
    model: str = "smollm2-135m-instruct"
    tasks: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)
    output_dir: str = "runs/talora"
    # adapter shape (source stage; the target stage takes them from the bundle)
    shared_prompt_len: int = 32
    task_prompt_len: int = 8
    rank: int = 4
    scale: float = 1.0
    gated: bool = True
    full_rank: bool = False
    slow_lr_ratio: float = 0.1
    init_std: float = 0.02
    basis_init: str = "random"
    prompt_init_text: str = ""
    # optimisation
    steps: int = 200
    batch_size: int = 8
    lr: float = 0.3
    gate_lr_ratio: float = 0.1
    basis_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    sampling: str = "temperature"
    sampling_temperature: float = 2.0
    max_input_tokens: int = 96
    train_limit: int = 2000
    class_balance: str = "sampler"
    keep_best: bool = True
    # target stage
    bundle: str = ""
    task: str = ""
    shots: int = 0
    target_init: str = "mean"
    train_shared: bool = False
    # evaluation
    split: str = "dev"
    eval_limit: int = 200
    eval_every: int = 0
    eval_batch_size: int = 16
    max_new_tokens: int = 24
    # bookkeeping
    seed: int = 0
    save_every: int = 50
    log_every: int = 1
    resume: bool = False
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _require(self.stage in STAGES, "stage", f"{self.stage!r} is not one of {STAGES}")
        _require(bool(self.model), "model", "must name a model")
        for name in ("steps", "batch_size", "max_input_tokens", "eval_batch_size", "max_new_tokens"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("shots", "eval_limit", "eval_every", "warmup_steps", "save_every", "threads", "train_limit"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")
        for name in ("lr", "gate_lr_ratio", "sampling_temperature"):
            _require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _require(self.sampling in SAMPLING, "sampling", f"{self.sampling!r} is not one of {SAMPLING}")
        _require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"{self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        _require(self.target_init in TARGET_INIT, "target_init", f"{self.target_init!r} is not one of {TARGET_INIT}")
        _require(self.device in DEVICES, "device", f"{self.device!r} is not one of {DEVICES}")
        _require(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
        _require(self.basis_init in BASIS_INITS, "basis_init", f"{self.basis_init!r} is not one of {BASIS_INITS}")
        _require(self.class_balance in CLASS_BALANCE, "class_balance",
                 f"{self.class_balance!r} is not one of {CLASS_BALANCE}")
        _require(self.basis_lr_ratio >= 0, "basis_lr_ratio", f"must be >= 0, got {self.basis_lr_ratio}")
        _require(self.split in ("train", "dev", "test"), "split", f"{self.split!r} is not train, dev or test")
        _require(isinstance(self.tasks, list) and all(isinstance(t, str) for t in self.tasks),
                 "tasks", "must be a list of task names")
        if self.stage == "source":
            _require(bool(self.tasks or self.task_files), "tasks", "the source stage needs at least one task")
            self.talora()  # validates the adapter fields with their own names
        if self.stage in ("target", "eval"):
            _require(bool(self.bundle), "bundle", f"the {self.stage} stage needs a bundle folder")
            _require(bool(self.task), "task", f"the {self.stage} stage needs a task name")

    def talora(self) -> TaloraConfig:
        return TaloraConfig(shared_prompt_len=self.shared_prompt_len, task_prompt_len=self.task_prompt_len,
                            rank=self.rank, scale=self.scale, gated=self.gated, full_rank=self.full_rank,
                            slow_lr_ratio=self.slow_lr_ratio, init_std=self.init_std)

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


HELP: dict[str, str] = {
    "stage": "training stage (set by the subcommand)",
    "model": "frozen LM: 'smollm2-135m-instruct' (embedded default), a checkpoint folder or a hub id",
    "tasks": "comma-separated registry task names (talora.adapters.tasks)",
    "task_files": "comma-separated JSONL/CSV (text,label) files registered as tasks named after the file",
    "output_dir": "run folder: bundle, task adapters, checkpoints, log.jsonl, curves",
    "shared_prompt_len": "m: rows of the shared prompt P (0 = no shared prompt)",
    "task_prompt_len": "n: rows of each task prompt",
    "rank": "r: rows of the shared basis A",
    "scale": "task prompt = scale * B_t A",
    "gated": "zero-initialised gated attention for the task prompt (false: plain two-part prompt)",
    "full_rank": "B_t is n x d with no basis (ablation)",
    "slow_lr_ratio": "learning rate of P (and of A unless basis_lr_ratio is set) = lr * slow_lr_ratio",
    "init_std": "std of the random init of source B_t (and of A with basis_init=random)",
    "basis_init": "init of A: random (N(0, init_std)) or embedding (rows at the token embeddings' norm)",
    "prompt_init_text": "initialise P from the embeddings of this text (repeated to m rows); "
                        "empty: random vocabulary rows",
    "basis_lr_ratio": "learning rate of A = lr * basis_lr_ratio (0: the same as P)",
    "class_balance": "classification batches: sampler (each label equally often) or none (as the data falls)",
    "keep_best": "keep the trained tensors of the best dev evaluation (eval_every > 0), or of the lowest "
                 "smoothed training loss if the loss diverges; a warning says when this happens",
    "steps": "optimiser steps",
    "batch_size": "examples per step per process (mixed tasks)",
    "lr": "learning rate of the fast weights B_t (AdamW)",
    "gate_lr_ratio": "learning rate of the gates g_t = lr * gate_lr_ratio",
    "weight_decay": "AdamW weight decay of every trained tensor",
    "warmup_steps": "linear learning-rate warm-up steps",
    "lr_schedule": "constant, cosine or linear decay after the warm-up",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "sampling": "task mixing: proportional (to task size) or temperature (size ** (1/T))",
    "sampling_temperature": "T of temperature sampling (1 = proportional, large = uniform)",
    "max_input_tokens": "truncate each input text to this many tokens (at most the task's own limit)",
    "train_limit": "use at most this many training examples per task (class-balanced; 0 = all)",
    "bundle": "source bundle folder (target and eval stages)",
    "task": "the task to adapt (target) or score (eval)",
    "shots": "k-shot: k training examples per label for classification, k in all for QA (0 = full data)",
    "target_init": "initial B_target: mean of the source B_t, the nearest source task (lowest loss), or random",
    "train_shared": "target stage: also train P and A (slow); writes a new bundle",
    "split": "split to evaluate (train, dev or test)",
    "eval_limit": "evaluate on at most this many examples per task (class-balanced; 0 = all)",
    "eval_every": "evaluate every this many steps during training (0 = only at the end)",
    "eval_batch_size": "examples per forward pass at evaluation",
    "max_new_tokens": "greedy-decoding budget for extractive QA answers",
    "seed": "seed of the initialisation and of the data order",
    "save_every": "write a resumable checkpoint every this many steps (0 = only at the end)",
    "log_every": "write a JSONL log row every this many steps",
    "resume": "continue from the newest checkpoint in output_dir",
    "device": "auto (CUDA when available), cpu or cuda",
    "dtype": "frozen model dtype: float32, or bfloat16 (adapter tensors stay float32 master copies; "
             "~1.6x faster training on CPUs with AVX-512 BF16)",
    "threads": "torch CPU threads (0 = leave torch's default)",
    "progress": "show progress bars",
}

_COMMON = ("model", "output_dir", "seed", "device", "dtype", "threads", "progress", "split", "eval_limit",
           "eval_batch_size", "max_new_tokens", "task_files")
_TRAIN = ("steps", "batch_size", "lr", "gate_lr_ratio", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip",
          "max_input_tokens", "train_limit", "class_balance", "keep_best", "eval_every", "save_every", "log_every",
          "resume")
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "source": _COMMON + _TRAIN + ("tasks", "shared_prompt_len", "task_prompt_len", "rank", "scale", "gated",
                                  "full_rank", "slow_lr_ratio", "basis_lr_ratio", "init_std", "basis_init",
                                  "prompt_init_text", "sampling", "sampling_temperature"),
    "target": _COMMON + _TRAIN + ("bundle", "task", "shots", "target_init", "train_shared", "slow_lr_ratio",
                                  "basis_lr_ratio"),
    "eval": tuple(f for f in _COMMON if f != "output_dir") + ("bundle", "task"),
}
