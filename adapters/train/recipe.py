"""The TA-LoRA training recipe: one place for the settings that make adapters good.

``talora-train source`` and ``talora-train target`` take their defaults from ``SOURCE`` and
``TARGET`` (flags and ``--config`` files override them), ``talora-train demo`` trains the demo
bundle with them, and the quality benchmark (``benchmarks/quality.py``) trains every TA-LoRA row
with them. Each value was chosen on the dev split; docs/quality.md ("The recipe") has the table
of what each change bought and the commands that measured it.

Only recipe fields live here (adapter shape, learning rates, schedule, budget, data handling);
machine settings (device, dtype, threads) and bookkeeping (output folder, logging) do not.
"""

from __future__ import annotations

from talora.adapters.train.config import TrainConfig

SOURCE: dict = {
    # adapter shape: m shared rows, n task rows, rank r of the shared basis
    "shared_prompt_len": 32,
    "task_prompt_len": 8,
    "rank": 8,
    # AdamW rates: B_t at lr, P at lr * slow_lr_ratio, A at lr * basis_lr_ratio, gates at lr * gate_lr_ratio
    "lr": 0.1,
    "slow_lr_ratio": 0.3,
    "basis_lr_ratio": 0.1,
    "gate_lr_ratio": 0.1,
    "basis_init": "embedding",
    "init_std": 0.02,
    # budget and schedule
    "steps": 300,
    "batch_size": 8,
    "warmup_steps": 20,
    "lr_schedule": "cosine",
    # data
    "sampling": "temperature",
    "sampling_temperature": 2.0,
    "max_input_tokens": 48,
    "train_limit": 512,
    "class_balance": "sampler",
}

TARGET: dict = {
    "lr": 0.3,
    "gate_lr_ratio": 0.33,
    "target_init": "mean",
    "steps": 48,
    "batch_size": 8,
    "warmup_steps": 4,
    "lr_schedule": "cosine",
    "max_input_tokens": 48,
    "train_limit": 256,
    "class_balance": "sampler",
}

RECIPES = {"source": SOURCE, "target": TARGET}


def defaults(stage: str) -> dict:
    """The recipe's field values of ``stage`` ("source", "target"; "eval" has none)."""
    return dict(RECIPES.get(stage, {}))


def source_config(**fields) -> TrainConfig:
    """A source-stage ``TrainConfig``: the recipe, then ``fields``."""
    return TrainConfig.from_dict({**SOURCE, **fields, "stage": "source"})


def target_config(**fields) -> TrainConfig:
    """A target-stage ``TrainConfig``: the recipe, then ``fields``."""
    return TrainConfig.from_dict({**TARGET, **fields, "stage": "target"})
