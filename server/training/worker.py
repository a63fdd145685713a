"""The training worker: ``python -m talora.server.training.worker <job folder>``, one process per job.

It runs ``talora-train target`` on the job's examples with the CLI's own code (``build_parser``,
``config_from_args``, ``run_target``), so a job gets the recipe's defaults for a user's task file
(all examples, inputs cut at a fitted length, class-balanced batches, the divergence guard, the best
dev evaluation kept) exactly as ``talora-train target --task-files`` does. Then it scores the trained
task on the held-out test split (``run_eval``), writes the test scores (and the job id, and the
version asked for) into the task file's ``training`` metadata, and ``result.json`` for the server.
A refusal of the data or the configuration is written to ``error.json`` (exit status 2).

The server starts it with its own thread budget (``--threads``, and ``OMP_NUM_THREADS``) at a lower
CPU priority (nice 10), so that serving keeps the cores it needs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import suppress
from pathlib import Path

from talora.server.adapter_registry import write_atomic
from talora.server.training.examples import EXAMPLES_FILE

RUN_FILE = "job.run.json"  # the job record and how to run it (model, device, threads), written by the server
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
PLAN_FILE = "plan.json"
NICE = 10

log = logging.getLogger("talora.server.training.worker")


def target_argv(job: dict, folder: Path, steps: int) -> list[str]:
    """``talora-train target`` flags of a job (what ``config_from_args`` reads)."""
    opts, run = job["options"], job["runtime"]
    argv = ["target", "--bundle", str(folder / "source"), "--task", job["task"], "--output-dir", str(folder / "run"),
            "--model", run["model"], "--device", run["device"], "--threads", str(run["threads"]),
            "--steps", str(steps), "--eval-limit", "0", "--seed", str(opts.get("seed", 0)), "--no-progress",
            "--save-every", "0"]
    every = opts.get("eval_every")
    every = max(1, steps // 6) if every is None else every  # default: about six dev evaluations, the best kept
    if every:
        argv += ["--eval-every", str(every)]
    return argv


def headline(metrics: dict) -> float | None:
    """A run's one score: accuracy (classify) or F1 (extract)."""
    value = metrics.get("accuracy", metrics.get("f1"))
    return float(value) if value is not None else None


def run(folder: Path) -> dict:
    from talora.adapters.data import load_split, register_file_task
    from talora.adapters.formats.io import TaskMeta, task_document
    from talora.adapters.train import recipe, run_eval, run_target
    from talora.adapters.train.cli import build_parser, config_from_args

    job = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    opts, task = job["options"], job["task"]
    register_file_task(folder / EXAMPLES_FILE, name=task, template=opts.get("template"), labels=opts.get("labels"),
                       verbalizers=opts.get("verbalizers"), language=opts.get("language", "en"), kind=job["kind"])
    train_examples = len(load_split(task, "train"))
    steps = int(opts.get("steps") or recipe.target_steps(0, train_examples, recipe.TARGET["batch_size"]))
    write_atomic(folder / PLAN_FILE, json.dumps({"steps": steps, "train_examples": train_examples}).encode())
    cfg = config_from_args(build_parser().parse_args(target_argv(job, folder, steps)))
    summary = run_target(cfg)
    bundle = Path(summary["bundle"])
    run = job["runtime"]
    tested = run_eval(config_from_args(build_parser().parse_args([
        "eval", "--bundle", str(bundle), "--task", task, "--split", "test", "--eval-limit", "0",
        "--model", run["model"], "--device", run["device"], "--threads", str(run["threads"])])))["metrics"]
    meta_path = bundle / f"{task}.json"
    data = json.loads(meta_path.read_text(encoding="utf-8"))
    majority = tested.get("majority_rate")
    data["training"] = {**data.get("training", {}), "test_metrics": tested, "job": job["id"],
                        "onboarded_through": "POST /v1/training/jobs"}
    if opts.get("version"):
        data["version"] = opts["version"]
    document = task_document(TaskMeta(**data))  # checks it as a served file is checked
    write_atomic(meta_path, json.dumps(document, indent=2, sort_keys=True).encode())
    dev = summary["metrics"][task]
    result = {"version": document["version"], "dev_metrics": dev, "test_metrics": tested,
              "dev": headline(dev), "test": headline(tested), "test_majority_rate": majority,
              "steps": summary["steps"], "train_examples": summary["train_examples"], "inputs": summary["inputs"],
              "bundle": str(bundle.relative_to(folder)), "diverged": summary.get("diverged"),
              "restored_step": summary.get("restored_step")}
    write_atomic(folder / RESULT_FILE, json.dumps(result, indent=1, ensure_ascii=False).encode())
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m talora.server.training.worker JOB_FOLDER", file=sys.stderr)
        return 2
    folder = Path(args[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with suppress(OSError):
        os.nice(NICE)
    tic = time.monotonic()
    try:
        result = run(folder)
    except (ValueError, KeyError) as exc:  # the CLI's refusals (exit status 2 there too)
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        log.error("training job refused: %s", message)
        write_atomic(folder / ERROR_FILE, json.dumps({"error": message}).encode())
        return 2
    log.info("training job done in %.1f s: dev %s, test %s", time.monotonic() - tic, result["dev"], result["test"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
