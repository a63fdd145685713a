"""Quality benchmark: TA-LoRA and its ablations against PEFT PromptTuning, MPT and LoRA.

Every method is trained and scored on the same frozen model (the embedded SmolLM2-135M-Instruct
by default), the same data subsets, the same step budgets and the same evaluation (rank
classification by label log-likelihood on one class-balanced test subset per task). Multi-task
methods (talora*, mpt, lora) first train on the source tasks, then adapt to each held-out target
task; PromptTuning trains on the target data from scratch. See docs/quality.md.

    python -m benchmarks.quality --plan-only            # the plan and its estimated time
    python -m benchmarks.quality --max-minutes 60       # run (resumes; stops before the budget ends)
    python -m benchmarks.quality --summarise            # rewrite results/quality.{json,png} only

Each run's result (metrics and per-item predictions) is stored in
``benchmarks/results/quality_runs/<key>.json`` under a hash of its configuration and committed;
rerunning skips finished runs, on any machine. Source-stage weights are committed too, one folder
per build in ``benchmarks/results/quality_sources`` (``quality_sources.py``): a machine without
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
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.quality_plan import (
    ABLATIONS,
    METHODS,
    SETTINGS,
    BenchConfig,
    Run,
    bind_builds,
    build_plan,
    estimate_seconds,
    find_result,
    measured_rates,
    run_key,
    save_result,
    stored_results,
)
from benchmarks.quality_report import (
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
from benchmarks.quality_sources import SOURCES, source_builds
from benchmarks.quality_stats import HEADLINE_BASELINES, budget_comparisons, by_source_seed, comparisons

HERE = Path(__file__).resolve().parent

WORK_DIR = HERE / "runs" / "quality"  # source-stage weights and scratch folders (git-ignored)
RESULTS = HERE / "results"
RUNS = RESULTS / "quality_runs"  # one small JSON per finished run (committed)


def parse_args(argv=None) -> argparse.Namespace:
    base = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan-only", action="store_true", help="print the plan with estimated times and exit")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="rerun N stored target runs of the plan (the first of each method in turn) from their "
                   "recorded source builds, in a scratch folder, and report whether every per-item prediction "
                   "is the stored one; stores nothing")
    p.add_argument("--summarise", action="store_true", help="only rewrite the summary from stored runs")
    p.add_argument("--sources-only", action="store_true",
                   help="only put every source stage's weights here (restored from --sources-dir, or trained when "
                   "none is committed) and commit them there; no target runs")
    p.add_argument("--dev-table", action="store_true", help="print the dev-split runs by method and learning rate "
                   "(seed count in brackets) and exit")
    p.add_argument("--against-target-steps", type=int, default=0, metavar="N",
                   help="print each method's target runs of this plan against the same runs with N target steps "
                        "(paired bootstrap, one source stage at a time) and exit")
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
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="folder of quality.json and quality.png")
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
    base = BenchConfig(model=args.model, dtype=args.dtype, test_limit=args.test_limit, eval_split=args.eval_split)
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
        raise SystemExit(f"quality.py: {exc}") from exc


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
    compared = comparisons(stored, full_cfg.settings, n_boot=n_boot)
    by_seed = {"means": source_seed_means(stored),
               "comparisons": by_source_seed(stored, full_cfg.settings, baselines=HEADLINE_BASELINES + ABLATIONS,
                                             n_boot=n_boot)}
    rebuilt = rebuilt_source_runs(stored)
    if rebuilt:
        print(f"warning: {len(rebuilt)} target runs of this summary started from a rebuilt source stage, not the "
              f"build its stored record scored (first: {rebuilt[0]}); see docs/quality.md, 'Source builds'")
    name = summary_name(full_cfg)
    doc = write_summary(results_dir / f"{name}.json", rows, command, _config_record(full_cfg), len(plan),
                        len(results), zero_shot, compared, by_seed)
    plot(results_dir / f"{name}.png", rows, zero_shot, compared, by_seed["comparisons"])
    return doc


def _results(plan: list[Run], runs_dir: Path) -> dict[str, dict]:
    """The stored record of each run of a bound ``plan`` that has one, by run key."""
    return {r.key: res for r in plan if (res := find_result(runs_dir, r)) is not None}


def budget_report(cfg: BenchConfig, runs_dir: Path, steps: int, n_boot: int = 10_000) -> list[dict]:
    """``budget_comparisons`` of the target runs ``cfg`` and ``cfg`` with ``steps`` target steps do
    not share, each plan at the builds its source records scored; printed and returned."""
    found = []
    for plan_cfg in (cfg, cfg.with_overrides(target={"steps": steps})):
        plan = build_plan(plan_cfg)
        found.append(_results(bind_builds(plan, source_builds(plan, runs_dir), runs_dir), runs_dir))
    now, before = ([r for key, r in runs.items() if key not in found[1 - i]] for i, runs in enumerate(found))
    rows = budget_comparisons(now, before, cfg.settings, n_boot)
    for c in rows:
        src = "" if c["source_seed"] is None else f" from source seed {c['source_seed']}"
        print(f"{c['method']} {c['setting']}{src}: this plan - {steps} target steps {c['diff_mean']:+.3f} "
              f"[{c['ci90'][0]:+.3f}, {c['ci90'][1]:+.3f}] ({c['n_items']} paired units, target seeds "
              f"{','.join(map(str, c['seeds']))})")
    return rows


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


def _config_record(cfg: BenchConfig) -> dict:
    from benchmarks.quality_plan import key_fields

    record = cfg.to_dict()
    record["source"], record["target"] = key_fields(cfg.source), key_fields(cfg.target)
    return record


def execute_plan(plan: list[Run], runs_dir: Path, work_dir: Path, max_minutes: float, threads: int, progress: bool,
                 after_run, poll_s: float = 30.0, sources_dir: Path | None = None, sources_only: bool = False) -> int:
    """Run every unfinished run of ``plan`` in order; returns how many ran. A target run whose
    source stage's weights are missing (a new machine) restores them from ``sources_dir`` (the
    committed builds, ``quality_sources``) or, with nothing committed, reruns that source stage
    first and commits its weights there. Target runs are bound to the build of the weights they
    start from (``quality_plan.at_build``): after a rebuild, the runs of the stored build count as
    not done for it.

    Several processes may run the same plan on one work folder: each claims a run before it
    starts it (``benchmarks/quality_claims.py``) and skips runs that another process holds,
    coming back to them; when only those are left it waits for them (every ``poll_s`` seconds)
    and takes over any whose process has ended without a result.

    ``sources_only``: only put the weights of every source stage of ``plan`` here (restored, or
    trained when nothing is committed) and commit them to ``sources_dir``; no target runs."""
    from tqdm.auto import tqdm

    from benchmarks.quality_claims import RunClaims
    from benchmarks.quality_runs import execute, needs_source, store_source_result
    from benchmarks.quality_sources import artifact_build, commit, restore_preferred, weights_here

    artifacts, scratch = work_dir / "artifacts", work_dir / "scratch"
    claims = RunClaims(work_dir / "claims")
    start, ran = time.monotonic(), 0
    by_key = {r.key: r for r in plan}

    def run_one(run: Run) -> None:
        nonlocal ran
        bar.set_postfix_str(run.label)
        result = execute(run, artifacts, scratch, threads, progress)
        if run.stage == "source":
            if store_source_result(runs_dir, result) == "rebuilt":
                tqdm.write(f"warning: {run.label} was rebuilt here and differs from its stored record (another "
                           f"machine's kernels); its record stays, the rebuild is in rebuilds/, and target runs from "
                           f"it get keys of their own with source_build={result['build']}")
            if sources_dir is not None:
                commit(artifacts, run.key, sources_dir)
        else:
            save_result(runs_dir, run.key, result)
        ran += 1
        after_run()

    def ensure_source(source: Run) -> None:
        """The source stage's weights in ``artifacts``: restored from a committed build, else trained."""
        if weights_here(source, artifacts):
            return
        build = restore_preferred(source, runs_dir, sources_dir, artifacts) if sources_dir is not None else None
        if build is not None:
            tqdm.write(f"{source.label}: restored its committed build {build}")
        else:
            tqdm.write(f"{source.label}: its weights are neither here nor committed; running it first")
            run_one(source)
            if not weights_here(source, artifacts):
                raise RuntimeError(f"{source.label} finished with no weights in {artifacts / source.key}")

    def attempt(run: Run) -> bool:
        """Run ``run`` (and its missing source stage) if this process can claim them."""
        source = by_key[run.spec["source"]] if needs_source(run) else None
        if source is not None:
            if not claims.claim(source.key):
                return False  # another process is (re)running the source stage
            ensure_source(source)
            claims.release(source.key)  # others may start target runs of it now
            run = bind_builds([run], {source.key: artifact_build(artifacts / source.key)}, runs_dir)[0]
            if find_result(runs_dir, run) is not None:
                return True  # done from this build already
        if not claims.claim(run.key):
            return False
        if find_result(runs_dir, run) is None:  # finished by another process meanwhile
            run_one(run)
        return True

    def unfinished() -> list[Run]:
        builds = source_builds(plan, runs_dir, artifacts, sources_dir)
        return [r for r in bind_builds(plan, builds, runs_dir) if find_result(runs_dir, r) is None]

    if sources_only:
        bar = tqdm(total=sum(r.stage == "source" for r in plan), desc="source stages", disable=not progress)
        try:
            for source in (r for r in plan if r.stage == "source"):
                while not claims.claim(source.key):
                    time.sleep(poll_s)  # another process is training it
                ensure_source(source)
                if sources_dir is not None:
                    commit(artifacts, source.key, sources_dir)
                claims.release(source.key)
                bar.update(1)
        finally:
            claims.release_all()
            bar.close()
        return ran
    pending = unfinished()
    bar = tqdm(total=len(pending), desc="quality runs", disable=not progress)
    try:
        while pending:
            held = 0
            for run in pending:
                if find_result(runs_dir, run) is not None:
                    continue  # finished by another process sharing the folders
                if max_minutes and time.monotonic() - start + estimate_seconds(
                        run, measured_rates(stored_results(runs_dir))) > max_minutes * 60:
                    tqdm.write(f"stopping: {run.label} would pass the {max_minutes:g}-minute budget")
                    return ran
                try:
                    held += not attempt(run)
                finally:
                    claims.release_all()
            left = unfinished()  # after a rebuild, the runs of the stored build are not done for this one
            bar.total = bar.n + len(left)
            bar.update(max(0, len(pending) - len(left)))
            if left and held == len(left):
                time.sleep(poll_s)  # every run left is held by another process
            pending = left
    finally:
        claims.release_all()
        bar.close()
    return ran


def verify_runs(plan: list[Run], runs_dir: Path, work_dir: Path, sources_dir: Path | None, n: int, threads: int,
                progress: bool) -> list[dict]:
    """Rerun up to ``n`` stored target runs of ``plan`` (round-robin over methods, in plan order)
    from the source builds their records name, restoring committed weights where needed, and
    compare their per-item predictions with the stored ones. Nothing is stored: the reruns go to a
    scratch folder. A run whose recorded source build is neither here nor committed is skipped
    (retraining it would test another build)."""
    import tempfile

    from benchmarks.quality_runs import execute, needs_source
    from benchmarks.quality_sources import artifact_build, committed_builds, restore, weights_here

    artifacts = work_dir / "artifacts"
    plan = bind_builds(plan, source_builds(plan, runs_dir), runs_dir)  # the recorded builds
    by_key = {r.key: r for r in plan}
    queues: dict[str, list[Run]] = {}
    for run in plan:
        if run.stage == "target" and find_result(runs_dir, run) is not None:
            queues.setdefault(run.method, []).append(run)
    picked: list[Run] = []
    while len(picked) < n and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    outcomes = []
    for run in picked:
        stored = find_result(runs_dir, run)
        assert stored is not None
        if needs_source(run):
            source, build = by_key[run.spec["source"]], run.source_build
            if weights_here(source, artifacts):
                if artifact_build(artifacts / source.key) != build:  # never overwrite another build in use
                    print(f"skip   {run.label}: another build of its source stage is in {artifacts / source.key}")
                    continue
            elif sources_dir is not None and build in committed_builds(sources_dir, source.key):
                restore(sources_dir, source.key, build, artifacts)
            else:
                print(f"skip   {run.label}: its source build {build or '(unrecorded)'} is neither here nor committed")
                continue
        with tempfile.TemporaryDirectory(prefix="quality-verify-") as scratch:
            result = execute(run, artifacts, Path(scratch), threads, progress)
        task = run.task
        same = result["predictions"][task] == stored["predictions"][task]
        differ = sum(a != b for a, b in zip(result["predictions"][task], stored["predictions"][task], strict=True))
        outcomes.append({"run": run.label, "key": run.key, "identical": same, "items": len(stored["gold"][task]),
                         "items_differing": differ, "stored_accuracy": stored["metrics"][task]["accuracy"],
                         "accuracy": result["metrics"][task]["accuracy"]})
        print(f"{'same ' if same else 'DIFF '}  {run.label}: {differ} of {len(stored['gold'][task])} predictions "
              f"differ; accuracy {stored['metrics'][task]['accuracy']:.3f} stored, "
              f"{result['metrics'][task]['accuracy']:.3f} now", flush=True)
    same_n = sum(o["identical"] for o in outcomes)
    print(f"{same_n} of {len(outcomes)} reruns reproduce their stored predictions exactly")
    return outcomes


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = config_from_args(args)
    base = BenchConfig()  # the summary covers the whole plan of these settings, not just the filter
    full_cfg = replace(cfg, methods=base.methods, settings=base.settings, target_tasks=base.target_tasks,
                       seeds=base.seeds, source_seeds=base.source_seeds, ablation_seeds=base.ablation_seeds)
    plan = build_plan(cfg)
    if args.dev_table:
        print(dev_table(stored_results(args.runs_dir)))
        return
    if args.against_target_steps:
        budget_report(cfg, args.runs_dir, args.against_target_steps)
        return
    if args.plan_only:
        print_plan(plan, args.runs_dir, args.work_dir, args.sources_dir)
        return
    if args.verify:
        import torch

        torch.set_num_threads(args.threads)
        verify_runs(plan, args.runs_dir, args.work_dir, args.sources_dir, args.verify, args.threads,
                    not args.no_progress)
        return
    command = command_line(argv)
    headline = is_headline(full_cfg) and not args.sources_only  # source stages alone change no row
    if not args.summarise:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        # after each run only the headline plan's summary is rewritten; a variant's is written by --summarise
        def after_run() -> None:
            if headline:
                summarise(full_cfg, args.runs_dir, args.results_dir, command, n_boot=2000)

        execute_plan(plan, args.runs_dir, args.work_dir, args.max_minutes, args.threads, not args.no_progress,
                     after_run, sources_dir=args.sources_dir, sources_only=args.sources_only)
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
