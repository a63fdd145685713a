"""``talora-train``: train and score TA-LoRA adapters from the shell.

Subcommands ``source``, ``target``, ``eval`` and ``demo``; every flag is a kebab-case copy of a
``TrainConfig`` field (``--shared-prompt-len``), and ``--config FILE`` (JSON or YAML) supplies
fields that flags then override. The summary of the run is printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

from talora.adapters.formats.cli_flags import add_flags
from talora.adapters.train import recipe
from talora.adapters.train.config import STAGE_FIELDS, TrainConfig, load_config_file

_DESCRIPTIONS = {
    "source": "multi-task training of the shared prompt P and basis A (slow) and every task's B_t, g_t (fast)",
    "target": "adapt a new task from a source bundle (full data or --shots k); trains its B_t, g_t only",
    "eval": "score a bundle's task adapter on a split (accuracy/macro-F1 or EM/F1)",
    "demo": "reproduce the committed demo bundle: the source stage on SmolLM2, then the held-out target tasks",
}


def _task_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated task names")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="talora-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, names in STAGE_FIELDS.items():
        p = sub.add_parser(stage, help=_DESCRIPTIONS[stage], description=_DESCRIPTIONS[stage])
        p.add_argument("--config", help="JSON or YAML file of TrainConfig fields; flags override it")
        add_flags(p, TrainConfig, names, recipe.defaults(stage))
    demo = sub.add_parser("demo", help=_DESCRIPTIONS["demo"], description=_DESCRIPTIONS["demo"])
    from talora.adapters.train.demo import DEMO_CONFIG

    add_flags(demo, TrainConfig, ("output_dir", "steps", "threads", "resume", "progress", "eval_limit", "dtype"),
              {**recipe.SOURCE, **DEMO_CONFIG})
    demo.add_argument("--target-steps", type=int, default=argparse.SUPPRESS,
                      help="optimiser steps of each target task (default: DEMO_TARGETS' own, else the recipe's by "
                           "the task's training data: 48 for k-shot sets, about 4.5 passes over full data, "
                           "48-144)")
    demo.add_argument("--target-tasks", type=_task_list, default=argparse.SUPPRESS, metavar="A,B",
                      help="train only these of the demo's target tasks (default: all of DEMO_TARGETS)")
    demo.add_argument("--targets-only", action="store_true",
                      help="skip the source stage: adapt the target tasks from --source-bundle (its P, A and tasks "
                           "are kept)")
    demo.add_argument("--source-bundle", type=Path, default=None, metavar="DIR",
                      help="the bundle --targets-only adapts from (default: the installed demo bundle)")
    demo.add_argument("--install", action="store_true",
                      help="copy the trained bundle into the package's demo folder (talora.adapters.demo): every "
                           "task at least 0.15 above its no-skill reference (a classifier's majority rate, an "
                           "extract task's zero-shot F1)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- config file <- flags; raises ValueError naming a bad field."""
    values = vars(args).copy()
    command = values.pop("command")
    config_file = values.pop("config", None)
    for name in ("install", "target_steps", "target_tasks", "targets_only", "source_bundle"):
        values.pop(name, None)
    merged: dict = recipe.defaults("source" if command == "demo" else command)
    if command == "demo":
        from talora.adapters.train.demo import DEMO_CONFIG

        merged.update(DEMO_CONFIG)
    elif config_file:
        merged.update(load_config_file(config_file))
    merged.update(values)
    merged["stage"] = "source" if command == "demo" else command
    return TrainConfig(**merged)


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_distributed(code)
    return code


def _leave_distributed(code: int) -> None:
    """End a ``torchrun`` worker without the interpreter's teardown. Its work is done and on disk and
    its process group destroyed, but the teardown still frees gloo's and DDP's C++ state, and
    freeing it there (threads still joinable, the interpreter half gone) can abort a finished
    worker now and then, which fails the whole job. ``os._exit`` skips that phase."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"talora-train: error: {exc}", file=sys.stderr)
        return 2
    from talora.adapters.train import run_eval, run_source, run_target

    runner = {"source": run_source, "target": run_target, "eval": run_eval}[cfg.stage]
    if args.command == "demo":
        from talora.adapters.train.demo import demo_folder, demo_targets, run_demo

        try:
            targets = demo_targets(getattr(args, "target_tasks", None), getattr(args, "target_steps", None))
        except ValueError as exc:
            print(f"talora-train: error: {exc}", file=sys.stderr)
            return 2
        source = (args.source_bundle or demo_folder()) if args.targets_only else None
        runner = partial(run_demo, targets=targets, source_bundle=source)
    try:
        summary = runner(cfg)
    except ValueError as exc:
        print(f"talora-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # the task registry's "unknown task 'x'; known tasks: ..."; any other is a bug
        message = str(exc.args[0]) if exc.args else ""
        if not message.startswith("unknown task"):
            raise
        print(f"talora-train: error: {message}\nhint: a task of your own (not packaged) is found by name only "
              "with --task-files PATH (its JSONL or CSV), or after `python -m talora.adapters.data add`",
              file=sys.stderr)
        return 2
    if args.command == "demo" and args.install and summary.get("verified"):
        from talora.adapters.train.demo import install_bundle, served_tasks

        served, summary["not_installed"] = served_tasks(summary)
        summary["installed"] = str(install_bundle(Path(summary["bundle"]), tasks=served))
    if os.environ.get("RANK", "0") == "0":
        shown = {k: v for k, v in summary.items() if k not in ("predictions", "gold")}  # per-item lists
        print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
