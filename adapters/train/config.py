"""``TrainConfig``: every setting of ``talora-train``, typed and validated.

One pydantic model serves the three stages (``source``, ``target``, ``eval``); ``STAGE_FIELDS`` says
which fields each subcommand exposes as flags. Values come from defaults, then a JSON or YAML
file (``--config``), then kebab-case flags (``--shared-prompt-len 32``); a bad value raises
``ValueError`` naming the offending field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from talora.adapters.model.config import AdapterShape, TaloraConfig
from talora.adapters.model.precision import TrainDtypeName


class TrainConfig(AdapterShape):
    """Settings of one ``talora-train`` run, each with its help text (the flags show it). The adapter
    shape fields come from ``AdapterShape`` (the source stage uses them; the target stage takes the
    bundle's). The target stage's 0 or -1 in ``steps``, ``max_input_tokens``, ``train_limit`` and
    ``task_basis_rows`` mean "set from the task and its data" (``recipe.target_*``)."""

    stage: Literal["source", "target", "eval"] = Field("source", description="training stage (set by the subcommand)")
    model: str = Field("smollm2-135m-instruct", min_length=1, description="frozen LM: 'smollm2-135m-instruct' "
                       "(embedded default), a checkpoint folder or a hub id")
    tasks: list[str] = Field(default_factory=list, description="comma-separated registry task names "
                             "(talora.adapters.data)")
    task_files: list[str] = Field(default_factory=list, description="comma-separated JSONL/CSV (text,label) files "
                                  "registered as tasks named after the file")
    output_dir: str = Field("runs/talora", description="run folder: bundle, task adapters, checkpoints, log.jsonl, "
                            "curves")
    # adapter init (source stage; the shape fields are AdapterShape's)
    basis_init: Literal["random", "embedding"] = Field(
        "random", description="init of A: random (N(0, init_std)) or embedding (rows at the token embeddings' norm)")
    prompt_init_text: str = Field("", description="initialise P from the embeddings of this text (repeated to m "
                                  "rows); empty: random vocabulary rows")
    # optimisation
    steps: int = Field(200, ge=0, description="optimiser steps (target stage: 0 = by the training data, 48 for "
                       "k-shot sets and about 4.5 passes over full data, 48-144)")
    batch_size: int = Field(8, gt=0, description="examples per step per process (mixed tasks)")
    lr: float = Field(0.3, gt=0, description="learning rate of the fast weights B_t (AdamW)")
    gate_lr_ratio: float = Field(0.1, gt=0, description="learning rate of the gates g_t = lr * gate_lr_ratio")
    basis_lr_ratio: float = Field(0.0, ge=0, description="learning rate of A = lr * basis_lr_ratio (0: the same as P)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of every trained tensor")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="constant, cosine or linear decay after the warm-up")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = off)")
    sampling: Literal["proportional", "temperature"] = Field(
        "temperature", description="task mixing: proportional (to task size) or temperature (size ** (1/T))")
    sampling_temperature: float = Field(2.0, gt=0, description="T of temperature sampling (1 = proportional, large "
                                        "= uniform)")
    max_input_tokens: int = Field(
        96, ge=0, description="truncate each input text to this many tokens (at most the task's own limit; target "
        "stage: 0 = by the task, 48 for a packaged task, for a user's file the 95th percentile of its training "
        "texts' token lengths, at most 512)")
    train_limit: int = Field(
        2000, ge=-1, description="use at most this many training examples per task (class-balanced; 0 = all; "
        "target stage: -1 = by the task, 256 for a packaged task, all of a user's file)")
    class_balance: Literal["none", "sampler"] = Field(
        "sampler", description="classification batches: sampler (each label equally often) or none (as the data "
        "falls)")
    keep_best: bool = Field(
        True, description="keep the trained tensors of the best dev evaluation (eval_every > 0), or of the lowest "
        "smoothed training loss if the loss diverges; a warning says when this happens")
    # target stage
    bundle: str = Field("", description="source bundle folder (target and eval stages)")
    task: str = Field("", description="the task to adapt (target) or score (eval)")
    shots: int = Field(0, ge=0, description="k-shot: k training examples per label for classification, k in all "
                       "for QA (0 = full data)")
    target_init: Literal["mean", "nearest", "random"] = Field(
        "mean", description="initial B_target: mean of the source B_t, the nearest source task (lowest loss), or "
        "random")
    gate_init: Literal["zero", "source"] = Field(
        "zero", description="initial g_target: zero (the method's zero-initialised gate) or source (taken like "
        "B_target: the mean of the source gates, or the nearest task's; zero with target_init random)")
    train_shared: bool = Field(False, description="target stage: also train P and A (slow); writes a new bundle")
    task_basis_rows: int = Field(
        0, ge=-1, description="k: rows of each trained task's own basis V_t (k x d) beside the shared A; the task "
        "prompt becomes scale * (B_t A + U_t V_t) with U_t (n x k) starting at zero (0 = none; not with full_rank; "
        "target stage: -1 = by the training data, 1 for full data of at least 128 examples and 0 otherwise)")
    # evaluation
    split: Literal["train", "dev", "test"] = Field("dev", description="split to evaluate (train, dev or test)")
    eval_limit: int = Field(200, ge=0, description="evaluate on at most this many examples per task "
                            "(class-balanced; 0 = all)")
    eval_every: int = Field(0, ge=0, description="evaluate every this many steps during training (0 = only at the "
                            "end)")
    eval_batch_size: int = Field(16, gt=0, description="examples per forward pass at evaluation")
    max_new_tokens: int = Field(24, gt=0, description="greedy-decoding budget for extractive QA answers")
    # bookkeeping
    seed: int = Field(0, description="seed of the initialisation and of the data order")
    save_every: int = Field(50, ge=0, description="write a resumable checkpoint every this many steps (0 = only at "
                            "the end)")
    log_every: int = Field(1, gt=0, description="write a JSONL log row every this many steps")
    resume: bool = Field(False, description="continue from the newest checkpoint in output_dir")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (CUDA when available), cpu or cuda")
    dtype: TrainDtypeName = Field(
        "float32", description="frozen model dtype: float32, or bfloat16 (adapter tensors stay float32 master "
        "copies; ~1.6x faster training on CPUs with AVX-512 BF16)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = leave torch's default)")
    progress: bool = Field(True, description="show progress bars")

    @field_validator("tasks", "task_files", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [v for v in value.split(",") if v] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_stage(self) -> TrainConfig:
        by_data = self.stage == "target"  # its 0 / -1 are set from the task and its data
        named = self.stage == "source"
        checks = (
            (self.steps > 0 or by_data, "steps", "must be > 0 (0 = by the training data: target stage only)"),
            (self.max_input_tokens > 0 or by_data, "max_input_tokens", "must be > 0 (0 = by the task: target stage "
                                                                       "only)"),
            (self.train_limit >= 0 or by_data, "train_limit", "must be >= 0 (-1 = by the task: target stage only)"),
            (self.task_basis_rows >= 0 or by_data, "task_basis_rows",
             "must be >= 0 (-1 = by the training data: target stage only)"),
            (self.task_basis_rows <= 0 or not self.full_rank, "task_basis_rows",
             "a full-rank task prompt has no basis to extend; use 0 with full_rank"),
            (bool(self.tasks or self.task_files) or not named, "tasks", "the source stage needs at least one task"),
            (bool(self.bundle) or named, "bundle", f"the {self.stage} stage needs a bundle folder"),
            (bool(self.task) or named, "task", f"the {self.stage} stage needs a task name"),
        )
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")
        return self

    def talora(self) -> TaloraConfig:
        return TaloraConfig(**self.shape())


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
