"""Quality benchmark: TA-LoRA and its ablations against PEFT PromptTuning, MPT and LoRA.

Every method is trained and scored on the same frozen model (the embedded SmolLM2-135M-Instruct
by default), the same data subsets, the same step budgets and the same evaluation (rank
classification by label log-likelihood on one class-balanced test subset per task). Multi-task
methods (talora*, mpt, lora) first train on the source tasks, then adapt to each held-out target
task; PromptTuning trains on the target data from scratch. See docs/quality.md.

    python benchmarks/quality.py --plan-only            # the plan and its estimated time
    python benchmarks/quality.py --max-minutes 60       # run (resumes; stops before the budget ends)
    python benchmarks/quality.py --summarise            # rewrite results/quality.{json,png} only

Each run's result is cached in ``benchmarks/runs/quality/<key>.json`` under a hash of its
configuration; rerunning skips finished runs. The summary is written after every run.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality_plan import (METHODS, SETTINGS, BenchConfig, Run, build_plan, cached_results,  # noqa: E402
                          estimate_seconds, load_result, measured_rates, save_result)
from quality_report import markdown_table, markdown_zero_shot, plot, reference_rows, summary_rows, write_summary  # noqa: E402

CACHE_DIR = HERE / "runs" / "quality"
RESULTS = HERE / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan-only", action="store_true", help="print the plan with estimated times and exit")
    p.add_argument("--summarise", action="store_true", help="only rewrite the summary from cached runs")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop before starting a run past this budget (0: none)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ",".join(SETTINGS))
    p.add_argument("--tasks", default="", help="comma-separated subset of the target tasks (default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated target seeds")
    p.add_argument("--model", default=BenchConfig.model, help="frozen model: the embedded default or a folder")
    p.add_argument("--source-steps", type=int, default=BenchConfig.source_steps, help="source-stage steps")
    p.add_argument("--target-steps", type=int, default=BenchConfig.target_steps, help="target-stage steps")
    p.add_argument("--talora", default="", help="TA-LoRA overrides for both stages, e.g. slow_lr_ratio=0.3,rank=8 "
                   "(new source and target keys for every TA-LoRA method)")
    p.add_argument("--talora-target", default="", help="target-stage TA-LoRA overrides, e.g. lr=0.3,target_init=random, in place "
                   "of the plan's (lr=0.3,gate_lr_ratio=0.33); their own cache keys, the source stage is reused")
    p.add_argument("--test-limit", type=int, default=BenchConfig.test_limit, help="test examples per task")
    p.add_argument("--eval-split", choices=("test", "dev"), default="test",
                   help="split every run is scored on: test (the published rows) or dev (for choosing settings)")
    p.add_argument("--peft-lr-schedule", choices=("constant", "cosine", "linear"), default="constant",
                   help="learning-rate schedule of the PEFT baselines (PromptTuning, MPT, LoRA)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="folder of cached run results")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="folder of quality.json and quality.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _overrides(text: str) -> dict:
    """``a=1,b=0.3,c=true,d=mean`` -> {"a": 1, "b": 0.3, "c": True, "d": "mean"}."""
    out: dict = {}
    for item in _csv(text):
        name, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            out[name] = value.lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                out[name] = cast(value)
                break
            except ValueError:
                continue
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = BenchConfig()
    targets = tuple(_csv(args.tasks)) or base.target_tasks
    unknown = [t for t in targets if t not in base.target_tasks]
    if unknown:
        raise SystemExit(f"--tasks: {unknown} are not target tasks of the plan ({', '.join(base.target_tasks)})")
    return replace(base, methods=tuple(_csv(args.methods)), settings=tuple(_csv(args.settings)),
                   target_tasks=targets, seeds=tuple(int(s) for s in _csv(args.seeds)), model=args.model,
                   source_steps=args.source_steps, target_steps=args.target_steps, test_limit=args.test_limit,
                   eval_split=args.eval_split, peft_lr_schedule=args.peft_lr_schedule,
                   talora={**base.talora, **_overrides(args.talora)},
                   talora_target=_overrides(args.talora_target) if args.talora_target else base.talora_target)


def command_line(argv) -> str:
    return "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in argv)


def print_plan(plan: list[Run], cache_dir: Path) -> None:
    rates = measured_rates(cached_results(cache_dir))
    total = todo = 0.0
    for run in plan:
        est = estimate_seconds(run, rates)
        done = load_result(cache_dir, run.key) is not None
        total += est
        todo += 0 if done else est
        print(f"{'done' if done else 'todo'}  {run.key}  {run.label:60s} ~{est / 60:5.1f} min")
    left = sum(load_result(cache_dir, r.key) is None for r in plan)
    print(f"{len(plan)} runs, {left} to do; estimated {total / 3600:.2f} h in all, {todo / 3600:.2f} h left "
          f"(rates in s/step: {({f'{k[0]}/{k[1]}': v for k, v in rates.items() if isinstance(k, tuple)})})")


def summarise(cfg: BenchConfig, full_cfg: BenchConfig, cache_dir: Path, results_dir: Path, command: str) -> dict:
    """quality.json and quality.png from the cached runs of the full plan (not just the filter)."""
    plan = build_plan(full_cfg)
    results = {r.key: res for r in plan if (res := load_result(cache_dir, r.key)) is not None}
    rows, zero_shot = summary_rows(plan, results), reference_rows(plan, results)
    doc = write_summary(results_dir / "quality.json", rows, command, full_cfg.to_dict(), len(plan), len(results),
                        zero_shot)
    plot(results_dir / "quality.png", rows, zero_shot)
    return doc


def execute_plan(plan: list[Run], cache_dir: Path, max_minutes: float, progress: bool, after_run) -> int:
    """Run every unfinished run of ``plan`` in order; returns how many ran."""
    from tqdm.auto import tqdm

    from quality_runs import execute, needs_source, source_ready

    def finished(run: Run) -> bool:  # a result, and for a source stage its artifact too
        return load_result(cache_dir, run.key) is not None and (run.stage != "source" or source_ready(run, cache_dir))

    start, ran = time.monotonic(), 0
    bar = tqdm([r for r in plan if not finished(r)], desc="quality runs", disable=not progress)
    for run in bar:
        if finished(run):
            continue  # finished meanwhile by another sitting sharing the cache
        rates = measured_rates(cached_results(cache_dir))
        elapsed = time.monotonic() - start
        if max_minutes and elapsed + estimate_seconds(run, rates) > max_minutes * 60:
            tqdm.write(f"stopping: {run.label} would pass the {max_minutes:g}-minute budget")
            break
        if needs_source(run):
            src = next(r for r in plan if r.key == run.spec["source"])
            if not finished(src):
                tqdm.write(f"skipping {run.label}: its source stage {src.key} has not finished")
                continue
        bar.set_postfix_str(run.label)
        save_result(cache_dir, run.key, execute(run, cache_dir, progress))
        ran += 1
        after_run()
    bar.close()
    return ran


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = config_from_args(args)
    base = BenchConfig()  # the summary covers the whole plan of these settings, not just the filter
    full_cfg = replace(cfg, methods=base.methods, settings=base.settings, target_tasks=base.target_tasks,
                       seeds=base.seeds)
    plan = build_plan(cfg)
    if args.plan_only:
        print_plan(plan, args.cache_dir)
        return
    command = command_line(argv)
    if not args.summarise:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        execute_plan(plan, args.cache_dir, args.max_minutes, not args.no_progress,
                     lambda: summarise(cfg, full_cfg, args.cache_dir, args.results_dir, command))
    doc = summarise(cfg, full_cfg, args.cache_dir, args.results_dir, command)
    print(f"{doc['runs_finished']}/{doc['runs_planned']} runs finished; {len(doc['rows'])} rows in "
          f"{args.results_dir / 'quality.json'}")
    if args.summarise:
        print(markdown_zero_shot(doc["zero_shot"]) + "\n\n" + markdown_table(doc["rows"]))


if __name__ == "__main__":
    main()
