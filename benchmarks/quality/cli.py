"""Quality benchmark: TA-LoRA and its ablations against PEFT PromptTuning, MPT and LoRA.

Every method is trained and scored on the same frozen model (the embedded SmolLM2-135M-Instruct
by default), the same data subsets, the same step budgets and the same evaluation (rank
classification by label log-likelihood on one class-balanced test subset per task). Multi-task
methods (talora*, mpt, lora) first train on the source tasks, then adapt to each held-out target
task; PromptTuning trains on the target data from scratch. See docs/quality.md.

    python -m benchmarks.quality --plan-only            # the plan and its estimated time
    python -m benchmarks.quality --max-minutes 60       # run (resumes; stops before the budget ends)
    python -m benchmarks.quality --summarise            # rewrite results/quality/quality.{json,png} only
    python -m benchmarks.quality --protocol dev --plan-only   # the protocol's dev grids (docs/quality.md)

Each run's result (metrics and per-item predictions) is stored in
``benchmarks/results/quality/runs/<key>.json`` under a hash of its configuration and committed;
rerunning skips finished runs, on any machine. Source-stage weights are committed too, one folder
per build in ``benchmarks/results/quality/sources`` (``sources.py``): a machine without
them restores them into the git-ignored ``benchmarks/runs/quality/artifacts`` instead of
retraining, and a source stage with nothing committed is trained when a target run needs it. The
summary is written after every run of the published plan; a variant (``--eval-split dev``, recipe
or budget overrides) leaves ``quality.json`` alone and gets a ``quality-<split>-<hash>.json`` of its
own from ``--summarise``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.harness.paths import QUALITY_RESULTS, SCRATCH
from benchmarks.quality.execution import execute_plan, verify_runs
from benchmarks.quality.plan import (
    ABLATIONS,
    METHODS,
    SETTINGS,
    BenchConfig,
    Run,
    bind_builds,
    build_plan,
    check_frozen,
    estimate_seconds,
    find_result,
    measured_rates,
    protocol_dev_plan,
    protocol_test_plan,
    run_key,
    stored_results,
)
from benchmarks.quality.report import (
    dev_table,
    from_rebuilt_source,
    markdown_by_source_seed,
    markdown_means,
    markdown_table,
    markdown_zero_shot,
    plot,
    reference_rows,
    source_seed_means,
    summary_rows,
    write_summary,
)
from benchmarks.quality.sources import SOURCES, source_builds
from benchmarks.quality.stats import (
    HEADLINE_BASELINES,
    budget_comparisons,
    rerun_report,
    stage_comparisons,
)

WORK_DIR = SCRATCH / "quality"  # source-stage weights and scratch folders (git-ignored)
RUNS = QUALITY_RESULTS / "runs"  # one small JSON per finished run (committed)


def parse_args(argv=None) -> argparse.Namespace:
    base = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan-only", action="store_true", help="print the plan with estimated times and exit")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="rerun N stored target runs of the plan (the first of each method in turn) from their "
                   "recorded source builds, in a scratch folder, and report whether every per-item prediction "
                   "is the stored one; stores nothing in --runs-dir")
    p.add_argument("--keep-reruns", type=Path, default=None, metavar="DIR",
                   help="with --verify: keep each rerun's record in DIR (and take one kept there instead of "
                   "rerunning it, so a check resumes, and two processes can split it by --seeds)")
    p.add_argument("--rerun-report", type=Path, default=None, metavar="DIR",
                   help="compare the reruns kept in DIR with the stored runs (each method's shift, and TA-LoRA "
                   "against the baselines among runs made on the reruns' kernel path only); writes DIR.json")
    p.add_argument("--protocol", choices=("dev", "test"), default="",
                   help="the protocol of docs/quality.md instead of the published plan: 'dev', every method's dev "
                        "grid on the new targets; 'test', the one test reading (runs only once the recipe is "
                        "frozen: plan.PROTOCOL_FROZEN); with --plan-only, list it")
    p.add_argument("--summarise", action="store_true", help="only rewrite the summary from stored runs")
    p.add_argument("--sources-only", action="store_true",
                   help="only put every source stage's weights here (restored from --sources-dir, or trained when "
                   "none is committed) and commit them there; no target runs")
    p.add_argument("--dev-table", action="store_true", help="print the dev-split runs by method and learning rate "
                   "(seed count in brackets) and exit")
    p.add_argument("--against-target-steps", type=int, default=0, metavar="N",
                   help="print each method's target runs of this plan against the same runs with N target steps "
                        "(paired bootstrap, one source stage at a time) and exit")
    p.add_argument("--against-recipe", action="store_true",
                   help="print each method's target runs of this variant (--talora, --talora-target, --peft, "
                        "--source-steps, --target-steps) against the same runs under the recipe (paired bootstrap, "
                        "one source stage at a time) and exit")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop before starting a run past this budget (0: none)")
    p.add_argument("--methods", default=",".join(base.methods),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--settings", default=",".join(base.settings),
                   help="comma-separated subset of " + ",".join(SETTINGS))
    p.add_argument("--tasks", default="", help="comma-separated subset of the target tasks (default: all)")
    p.add_argument("--seeds", default=_join(base.seeds), help="comma-separated target seeds")
    p.add_argument("--source-seeds", default=_join(base.source_seeds), help="comma-separated source-stage seeds")
    p.add_argument("--ablation-seeds", default=_join(base.ablation_seeds), help="target seeds of the ablations")
    p.add_argument("--model", default=base.model, help="frozen model: the embedded default or a folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=base.dtype, help="frozen model dtype")
    p.add_argument("--target-dtype", choices=("float32", "bfloat16"), default="",
                   help="frozen model dtype of the target stages only (default: --dtype); e.g. float32 target "
                        "runs from the committed bfloat16 source stages on a CPU without native bfloat16")
    p.add_argument("--source-steps", type=int, default=0, help="source-stage steps of every method (0: the recipe's)")
    p.add_argument("--target-steps", type=int, default=0, help="target-stage steps of every method (0: the recipe's)")
    p.add_argument("--talora", default="", help="source-stage TrainConfig overrides, e.g. slow_lr_ratio=0.3,rank=8 "
                   "(every field reaches the trainer; new keys for the source stage and everything after it)")
    p.add_argument("--talora-target", default="",
                   help="target-stage TrainConfig overrides, e.g. lr=0.1,warmup_steps=0; the source stage is reused")
    p.add_argument("--peft", default="", help="PeftRecipe overrides, e.g. prompt_lr=0.1,mpt_lr=0.03,lora_lr=1e-3")
    p.add_argument("--test-limit", type=int, default=base.test_limit, help="test examples per task")
    p.add_argument("--eval-split", choices=("test", "dev"), default="test",
                   help="split every run is scored on: test (the published rows) or dev (for choosing settings)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--work-dir", type=Path, default=WORK_DIR, help="folder of source-stage weights and scratch")
    p.add_argument("--runs-dir", type=Path, default=RUNS, help="folder of the stored run results")
    p.add_argument("--results-dir", type=Path, default=QUALITY_RESULTS, help="folder of quality.json and quality.png")
    p.add_argument("--sources-dir", type=Path, default=SOURCES,
                   help="folder of the committed source-stage weights (restored instead of retraining)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _join(values) -> str:
    return ",".join(str(v) for v in values)


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
    base = BenchConfig(model=args.model, dtype=args.dtype, target_dtype=args.target_dtype, test_limit=args.test_limit,
                       eval_split=args.eval_split)
    targets = tuple(_csv(args.tasks)) or base.target_tasks
    unknown = [t for t in targets if t not in base.target_tasks]
    if unknown:
        raise SystemExit(f"--tasks: {unknown} are not target tasks of the plan ({', '.join(base.target_tasks)})")
    source = {**({"steps": args.source_steps} if args.source_steps else {}), **_overrides(args.talora)}
    target = {**({"steps": args.target_steps} if args.target_steps else {}), **_overrides(args.talora_target)}
    try:
        peft = replace(base.peft, **_overrides(args.peft))
        return base.with_overrides(source, target, methods=tuple(_csv(args.methods)),
                                   settings=tuple(_csv(args.settings)), target_tasks=targets, seeds=_ints(args.seeds),
                                   source_seeds=_ints(args.source_seeds), ablation_seeds=_ints(args.ablation_seeds),
                                   peft=peft)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"benchmarks.quality: {exc}") from exc


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in _csv(text))


def command_line(argv) -> str:
    return "python -m benchmarks.quality " + " ".join(shlex.quote(a) for a in argv)


def print_plan(plan: list[Run], runs_dir: Path, work_dir: Path | None = None, sources_dir: Path | None = None) -> None:
    """Every run with its estimated minutes, done or to do for the source builds at hand here."""
    rates = measured_rates(stored_results(runs_dir))
    artifacts = None if work_dir is None else work_dir / "artifacts"
    plan = bind_builds(plan, source_builds(plan, runs_dir, artifacts, sources_dir), runs_dir)
    total = todo = 0.0
    left = 0
    for run in plan:
        est = estimate_seconds(run, rates)
        done = find_result(runs_dir, run) is not None
        total += est
        todo += 0 if done else est
        left += not done
        build = f"  (source build {run.spec['source_build'][:8]})" if "source_build" in run.spec else ""
        print(f"{'done' if done else 'todo'}  {run.key}  {run.label:64s} ~{est / 60:5.1f} min{build}")
    print(f"{len(plan)} runs, {left} to do; estimated {total / 3600:.2f} h in all, {todo / 3600:.2f} h left "
          f"(rates in s/step: {({f'{k[0]}/{k[1]}': v for k, v in rates.items() if isinstance(k, tuple)})})")


def summarise(full_cfg: BenchConfig, runs_dir: Path, results_dir: Path, command: str, n_boot: int = 10_000,
              work_dir: Path | None = None, sources_dir: Path | None = None) -> dict:
    """``<summary_name>.json`` and ``.png`` (``quality.json`` for the published plan) from the stored runs of the
    full plan (not just the filter). The published plan is summarised at the builds its source
    records scored, whatever is on this machine; a variant at the builds at hand here (weights in
    ``work_dir``, else committed in ``sources_dir``)."""
    plan = build_plan(full_cfg)
    if is_headline(full_cfg):
        builds = source_builds(plan, runs_dir)
    else:
        builds = source_builds(plan, runs_dir, None if work_dir is None else work_dir / "artifacts", sources_dir)
    plan = bind_builds(plan, builds, runs_dir)
    results = _results(plan, runs_dir)
    rows, zero_shot = summary_rows(plan, results), reference_rows(plan, results)
    stored = list(results.values())
    # source stages as a random effect (issue 35): the pooled rows resample them, the stage-pair rows
    # hold one stage of each method at a time; a "better" needs both (stats.verdict)
    staged = stage_comparisons(stored, full_cfg.settings, baselines=HEADLINE_BASELINES + ABLATIONS, n_boot=n_boot)
    compared = staged["comparisons"]
    by_seed = {"means": source_seed_means(stored), "comparisons": staged["stage_pairs"]}
    rebuilt = rebuilt_source_runs(stored)
    if rebuilt:
        print(f"warning: {len(rebuilt)} target runs of this summary started from a rebuilt source stage, not the "
              f"build its stored record scored (first: {rebuilt[0]}); see docs/quality.md, 'Source builds'")
    name = summary_name(full_cfg)
    doc = write_summary(results_dir / f"{name}.json", rows, command, _config_record(full_cfg), len(plan),
                        len(results), zero_shot, compared, by_seed, recipe_record(full_cfg))
    plot(results_dir / f"{name}.png", rows, zero_shot, compared, by_seed["comparisons"])
    return doc


def _results(plan: list[Run], runs_dir: Path) -> dict[str, dict]:
    """The stored record of each run of a bound ``plan`` that has one, by run key."""
    return {r.key: res for r in plan if (res := find_result(runs_dir, r)) is not None}


def paired_report(cfg: BenchConfig, other: BenchConfig, runs_dir: Path, label: str,
                  n_boot: int = 10_000) -> list[dict]:
    """``budget_comparisons`` of the target runs the plans of ``cfg`` and ``other`` do not share (the
    same tasks, target seeds and items under another budget or recipe), each plan at the builds its
    source records scored; printed as ``this plan - <label>`` and returned."""
    found = []
    for plan_cfg in (cfg, other):
        plan = build_plan(plan_cfg)
        found.append(_results(bind_builds(plan, source_builds(plan, runs_dir), runs_dir), runs_dir))
    now, before = ([r for key, r in runs.items() if key not in found[1 - i]] for i, runs in enumerate(found))
    rows = budget_comparisons(now, before, cfg.settings, n_boot)
    for c in rows:
        src = "" if c["source_seed"] is None else f" from source seed {c['source_seed']}"
        print(f"{c['method']} {c['setting']}{src}: this plan - {label} {c['diff_mean']:+.3f} "
              f"[{c['ci90'][0]:+.3f}, {c['ci90'][1]:+.3f}] ({c['n_items']} paired units, target seeds "
              f"{','.join(map(str, c['seeds']))})")
    if not rows:
        print(f"no target run of this plan has a stored counterpart under {label}")
    return rows


def the_recipe(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with the recipe's stage configs, PEFT recipe and frozen-model dtypes (its filters, model,
    split and limits kept: ``BenchConfig`` sets those on the stage configs it is given)."""
    recipe_cfg = BenchConfig()
    return replace(cfg, source=recipe_cfg.source, target=recipe_cfg.target, peft=recipe_cfg.peft,
                   dtype=recipe_cfg.dtype, target_dtype=recipe_cfg.target_dtype)


def rebuilt_source_runs(results: list[dict]) -> list[str]:
    """Labels of target runs whose ``source_build`` is not the build their source stage's record scored."""
    sources = {r["key"]: r for r in results if r["stage"] == "source"}
    return [f"{r['method']}/{r['task']}/{r['setting']}/s{r['seed']}/src{r['source_seed']}" for r in results
            if r["stage"] == "target" and from_rebuilt_source(r, sources.get(r["spec"]["source"]))]


def is_headline(cfg: BenchConfig) -> bool:
    """Whether ``cfg`` is the published plan (test split, the recipe, the default budgets and baselines)."""
    return _config_record(cfg) == _config_record(BenchConfig())


def summary_name(cfg: BenchConfig) -> str:
    """``quality`` for the published plan; ``quality-<split>-<hash of the config>`` for any variant of it, so
    that a dev sweep or a changed budget never overwrites the published summary."""
    if is_headline(cfg):
        return "quality"
    return f"quality-{cfg.eval_split}-{run_key(_config_record(cfg))[:8]}"


def recipe_record(cfg: BenchConfig) -> dict:
    """What froze the runs of a summary: the hash of the TA-LoRA recipe module
    (``recipe.recipe_hash``), of the PEFT baselines' recipe, and of the whole plan configuration."""
    from dataclasses import asdict

    from talora.adapters.train import recipe

    return {"recipe_hash": recipe.recipe_hash(), "peft_recipe_hash": run_key(asdict(cfg.peft))[:12],
            "plan_hash": run_key(_config_record(cfg))[:12]}


def _config_record(cfg: BenchConfig) -> dict:
    from benchmarks.quality.plan import key_fields

    record = cfg.to_dict()
    record["source"], record["target"] = key_fields(cfg.source), key_fields(cfg.target)
    return record


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = config_from_args(args)
    if not _report(args, cfg):
        _run_and_summarise(args, cfg, command_line(argv))


def _report(args: argparse.Namespace, cfg: BenchConfig) -> bool:
    """The modes that only read or check stored runs (``--dev-table``, ``--against-target-steps``,
    ``--against-recipe``, ``--plan-only``, ``--verify``, ``--rerun-report``); False when none was asked for."""
    if args.dev_table:
        print(dev_table(stored_results(args.runs_dir)))
    elif args.against_target_steps:
        paired_report(cfg, cfg.with_overrides(target={"steps": args.against_target_steps}), args.runs_dir,
                      f"{args.against_target_steps} target steps")
    elif args.against_recipe:
        recipe_cfg = the_recipe(cfg)
        if _config_record(recipe_cfg) == _config_record(cfg):
            raise SystemExit("--against-recipe: this plan is the recipe; give the variant's flags "
                             "(--talora, --talora-target, --peft, --source-steps, --target-steps, --dtype "
                             "or --target-dtype)")
        paired_report(cfg, recipe_cfg, args.runs_dir, "the recipe")
    elif args.protocol:
        plan = protocol_dev_plan() if args.protocol == "dev" else protocol_test_plan()
        if args.plan_only:
            print_plan(plan, args.runs_dir, args.work_dir, args.sources_dir)
            return True
        if args.protocol == "test":
            try:
                check_frozen()
            except ValueError as exc:
                raise SystemExit(f"--protocol test: {exc}") from exc
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        execute_plan(plan, args.runs_dir, args.work_dir, args.max_minutes, args.threads, not args.no_progress,
                     lambda: None, sources_dir=args.sources_dir)
        print("the protocol's runs are stored; --dev-table lists the dev runs")
    elif args.plan_only:
        print_plan(build_plan(cfg), args.runs_dir, args.work_dir, args.sources_dir)
        rates = measured_rates(stored_results(args.runs_dir))
        for name, plan in (("dev", protocol_dev_plan()), ("test", protocol_test_plan())):
            hours = sum(estimate_seconds(r, rates) for r in plan) / 3600
            print(f"protocol {name} (docs/quality.md, 'Protocol'): {len(plan)} runs, estimated {hours:.1f} h; "
                  f"--protocol {name} --plan-only lists them")
    elif args.verify:
        import torch

        torch.set_num_threads(args.threads)
        verify_runs(build_plan(cfg), args.runs_dir, args.work_dir, args.sources_dir, args.verify, args.threads,
                    not args.no_progress, args.keep_reruns)
    elif args.rerun_report:
        print_rerun_report(args.runs_dir, args.rerun_report, cfg.settings)
    else:
        return False
    return True


def print_rerun_report(runs_dir: Path, reruns_dir: Path, settings: tuple[str, ...]) -> dict:
    """``stats.rerun_report`` of the reruns kept in ``reruns_dir``, printed and written to
    ``reruns_dir`` + ``.json``."""
    import json

    reruns = stored_results(reruns_dir)
    if not reruns:
        raise SystemExit(f"--rerun-report: no reruns kept in {reruns_dir} (make them with --verify N "
                         f"--keep-reruns {reruns_dir})")
    report = {"reruns_dir": str(reruns_dir), **rerun_report(stored_results(runs_dir), reruns, settings)}
    print(f"{report['reruns']} reruns on {', '.join(' / '.join(filter(None, p)) for p in report['paths'])}")
    for row in report["shift"]:
        print(f"shift      {row['method']:<14} {row['setting']:<5} source seed {row['source_seed']}: "
              f"{row['diff_mean']:+.3f} [{row['ci90'][0]:+.3f}, {row['ci90'][1]:+.3f}] rerun - stored, "
              f"{row['n_items']} units")
    for row in report["same_path"]:
        stage = "pooled" if row["source_seed"] is None else f"source seed {row['source_seed']}"
        print(f"same path  {row['a']} - {row['b']:<14} {row['setting']:<5} {stage}: {row['diff_mean']:+.3f} "
              f"[{row['ci90'][0]:+.3f}, {row['ci90'][1]:+.3f}], {row['n_items']} units")
    out = reruns_dir.with_name(reruns_dir.name + ".json")
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return report


def _run_and_summarise(args: argparse.Namespace, cfg: BenchConfig, command: str) -> None:
    """Run what the plan is missing (unless ``--summarise``), then rewrite the summary of the whole plan
    of these settings (not just the filtered slice): only the published plan's after each run."""
    base = BenchConfig()
    full_cfg = replace(cfg, methods=base.methods, settings=base.settings, target_tasks=base.target_tasks,
                       seeds=base.seeds, source_seeds=base.source_seeds, ablation_seeds=base.ablation_seeds)
    headline = is_headline(full_cfg) and not args.sources_only  # source stages alone change no row
    if not args.summarise:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)

        def after_run() -> None:
            if headline:
                summarise(full_cfg, args.runs_dir, args.results_dir, command, n_boot=2000)

        execute_plan(build_plan(cfg), args.runs_dir, args.work_dir, args.max_minutes, args.threads,
                     not args.no_progress, after_run, sources_dir=args.sources_dir, sources_only=args.sources_only)
        if args.sources_only:
            return
        if not headline:
            print("a variant of the plan (another split, budget or recipe): quality.json is left as it is; "
                  "--dev-table lists these runs, and --summarise with the same flags writes their own summary")
            return
    doc = summarise(full_cfg, args.runs_dir, args.results_dir, command, work_dir=args.work_dir,
                    sources_dir=args.sources_dir)
    print(f"{doc['runs_finished']}/{doc['runs_planned']} runs finished; {len(doc['rows'])} rows in "
          f"{args.results_dir / summary_name(full_cfg)}.json")
    if args.summarise:
        print(markdown_means(doc["means"], doc["comparisons"]) + "\n\n" + markdown_by_source_seed(doc["by_source_seed"])
              + "\n\n" + markdown_zero_shot(doc["zero_shot"]) + "\n\n" + markdown_table(doc["rows"]))


if __name__ == "__main__":
    main()
