"""Is the recipe dependable on a user's small or imbalanced task? Two checks, one JSON.

Both adapt a new task with ``talora-train target``'s defaults (``talora.adapters.train.recipe``)
from the quality benchmark's TA-LoRA source stage (source seed 0, the test plan's; restored from
its committed weights, or trained first through the benchmark when those are missing too):

1. **Small task**: ``tweet_sentiment`` with 60 training examples (20 per label), 5 seeds;
   accuracy and macro-F1 on 240 test items: the spread over seeds.
2. **Imbalanced task**: a file task of 1,000 tweets with 78 % negative (the user's 3-class case),
   its own 80/10/10 split; the recipe's class-balanced draws (``class_balance=sampler``) against
   plain draws (``none``), 3 seeds each; accuracy and macro-F1 on its (equally imbalanced) test split.

    python -m benchmarks.quality.recipe_checks                       # ~40 minutes on a 2-core CPU
    python -m benchmarks.quality.recipe_checks --parts imbalanced    # one check; the other's stored results stay
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.harness.paths import QUALITY_RESULTS, REPO_ROOT
from benchmarks.quality.plan import BenchConfig, load_result, save_result, source_run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the small-task check")
    p.add_argument("--imbalance-seeds", default="0,1,2", help="seeds of each arm of the imbalance check")
    p.add_argument("--parts", default="imbalanced,small",
                   help="checks to run (imbalanced, small); the other part's results stay as stored in --out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=QUALITY_RESULTS / "recipe_checks.json")
    return p.parse_args(argv)


def source_bundle(threads: int) -> Path:
    """The benchmark's TA-LoRA source bundle (source seed 0): here already, else restored from the
    build its record scored (committed in ``sources``), else trained here."""
    from benchmarks.quality.cli import RUNS, WORK_DIR
    from benchmarks.quality.runs import execute
    from benchmarks.quality.sources import SOURCES, restore_preferred, weights_here

    run = source_run(BenchConfig(), "talora", 0)
    artifacts = WORK_DIR / "artifacts"
    if not weights_here(run, artifacts) and restore_preferred(run, RUNS, SOURCES, artifacts) is None:
        record = execute(run, artifacts, WORK_DIR / "scratch", threads, progress=True)
        if load_result(RUNS, run.key) is None:
            save_result(RUNS, run.key, record)
    return artifacts / run.key / "bundle"


def _target(bundle: Path, task: str, out: Path, threads: int, **fields) -> dict:
    from talora.adapters.train import recipe, run_target

    cfg = recipe.target_config(bundle=str(bundle), task=task, output_dir=str(out), threads=threads, split="test",
                               dtype="bfloat16", save_every=0, progress=False, **fields)
    summary = run_target(cfg)
    m = summary["metrics"][task]
    return {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
            "majority_rate": round(m["majority_rate"], 4), "examples": m["examples"],
            "train_examples": summary["train_examples"], "diverged": summary.get("diverged"),
            "final_loss": round(summary["final_loss"], 4)}


def _spread(rows: list[dict]) -> dict:
    out = {}
    for metric in ("accuracy", "macro_f1"):
        values = [r[metric] for r in rows]
        out[metric] = {"mean": round(statistics.fmean(values), 4),
                       "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                       "min": min(values), "max": max(values)}
    return out


def small_task(bundle: Path, seeds: list[int], tmp: Path, threads: int, out: dict, save) -> dict:
    out.update(task="tweet_sentiment", train_examples=60, runs=[])
    for s in seeds:
        out["runs"].append({"seed": s, **_target(bundle, "tweet_sentiment", tmp / f"small-{s}", threads, seed=s,
                                                 train_limit=60, eval_limit=240)})
        out.update(_spread(out["runs"]))
        save()
    return out


def imbalanced_file(path: Path, total: int = 1000, share: float = 0.78) -> Path:
    """A 3-class tweet file with ``share`` negatives (drawn from the train split only)."""
    from talora.adapters.data import load_split

    pool = load_split("tweet_sentiment", "train")
    by_label: dict[str, list] = {}
    for ex in pool:
        by_label.setdefault(ex.label, []).append(ex)
    rng = random.Random(0)
    counts = {"negative": round(total * share)}
    rest = (total - counts["negative"]) // 2
    counts.update(neutral=rest, positive=total - counts["negative"] - rest)
    rows = [ex for label, n in counts.items() for ex in rng.sample(by_label[label], n)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in rows))
    return path


def imbalanced_task(bundle: Path, seeds: list[int], tmp: Path, threads: int, out: dict, save) -> dict:
    from talora.adapters.data import register_file_task

    data = imbalanced_file(tmp / "my_tweets.jsonl")
    register_file_task(data)
    out.update(task="my_tweets (file task: 1,000 tweets, 78% negative, 80/10/10 split)", arms={})
    for s in seeds:  # seed by seed, both arms, so that a stopped run leaves paired results
        for mode in ("sampler", "none"):
            arm = out["arms"].setdefault(mode, {"runs": []})
            arm["runs"].append({"seed": s, **_target(bundle, "my_tweets", tmp / f"imb-{mode}-{s}", threads, seed=s,
                                                     class_balance=mode, task_files=[str(data)], train_limit=0,
                                                     eval_limit=0)})
            arm.update(_spread(arm["runs"]))
            save()
    return out


PARTS = {"imbalanced": "imbalanced_task", "small": "small_task"}  # --parts name -> key in the JSON


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    bundle = source_bundle(args.threads)
    command = "python -m benchmarks.quality.recipe_checks " + " ".join(sys.argv[1:] if argv is None else argv)
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc: dict = {"bundle": str(bundle.relative_to(REPO_ROOT)) if bundle.is_relative_to(REPO_ROOT) else str(bundle),
                 "complete": False, "commands": {**_commands(stored), **{p: command for p in parts}}}
    doc.update({PARTS[p]: stored[PARTS[p]] for p in PARTS if p not in parts and PARTS[p] in stored})

    def save() -> None:  # after every run, so that a stopped check leaves what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        if "imbalanced" in parts:
            imbalanced_task(bundle, _ints(args.imbalance_seeds), Path(tmp), args.threads,
                            doc.setdefault("imbalanced_task", {}), save)
        if "small" in parts:
            small_task(bundle, _ints(args.seeds), Path(tmp), args.threads, doc.setdefault("small_task", {}), save)
    doc["complete"] = all(PARTS[p] in doc for p in PARTS)
    save()
    print(json.dumps(doc, indent=1))


def _commands(stored: dict) -> dict[str, str]:
    """The command each stored part came from (files from before ``--parts`` name one for both)."""
    if "commands" in stored:
        return dict(stored["commands"])
    return {p: stored["command"] for p, key in PARTS.items() if key in stored and "command" in stored}


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


if __name__ == "__main__":
    main()
