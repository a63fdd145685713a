"""Running the quality benchmark's plan: ``execute_plan`` trains and scores every unfinished run (several
processes may share one plan), ``verify_runs`` reruns stored runs and compares their predictions.

``benchmarks/quality/cli.py`` is the command line; this module does the work it hands off.
"""
from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.quality.plan import (
    Run,
    bind_builds,
    estimate_seconds,
    find_result,
    load_result,
    measured_rates,
    save_result,
    stored_results,
)
from benchmarks.quality.sources import source_builds


def execute_plan(plan: list[Run], runs_dir: Path, work_dir: Path, max_minutes: float, threads: int, progress: bool,
                 after_run, poll_s: float = 30.0, sources_dir: Path | None = None, sources_only: bool = False) -> int:
    """Run every unfinished run of ``plan`` in order; returns how many ran. A target run whose
    source stage's weights are missing (a new machine) restores them from ``sources_dir`` (the
    committed builds, ``sources``) or, with nothing committed, reruns that source stage
    first and commits its weights there. Target runs are bound to the build of the weights they
    start from (``plan.at_build``): after a rebuild, the runs of the stored build count as
    not done for it.

    Several processes may run the same plan on one work folder: each claims a run before it
    starts it (``benchmarks/quality/claims.py``) and skips runs that another process holds,
    coming back to them; when only those are left it waits for them (every ``poll_s`` seconds)
    and takes over any whose process has ended without a result.

    ``sources_only``: only put the weights of every source stage of ``plan`` here (restored, or
    trained when nothing is committed) and commit them to ``sources_dir``; no target runs."""
    runner = _PlanRunner(plan, runs_dir, work_dir, threads, progress, after_run, poll_s, sources_dir)
    if sources_only:
        runner.put_sources()
    else:
        runner.run_pending(max_minutes)
    return runner.ran


class _PlanRunner:
    """One process's share of a plan on a work folder it may share with others (``execute_plan``)."""

    def __init__(self, plan: list[Run], runs_dir: Path, work_dir: Path, threads: int, progress: bool, after_run,
                 poll_s: float, sources_dir: Path | None) -> None:
        from benchmarks.quality.claims import RunClaims

        self.plan, self.by_key = plan, {r.key: r for r in plan}
        self.runs_dir, self.sources_dir = runs_dir, sources_dir
        self.artifacts, self.scratch = work_dir / "artifacts", work_dir / "scratch"
        self.claims = RunClaims(work_dir / "claims")
        self.threads, self.progress, self.after_run, self.poll_s = threads, progress, after_run, poll_s
        self.ran = 0
        self.bar = tqdm(total=0, disable=not progress)  # sized by put_sources or run_pending

    def _progress_bar(self, total: int, desc: str) -> tqdm:
        self.bar.reset(total=total)
        self.bar.set_description_str(desc)
        return self.bar

    def put_sources(self) -> None:
        """The weights of every source stage here, committed to ``sources_dir``; no target runs."""
        from benchmarks.quality.sources import commit

        bar = self._progress_bar(sum(r.stage == "source" for r in self.plan), "source stages")
        try:
            for source in (r for r in self.plan if r.stage == "source"):
                while not self.claims.claim(source.key):
                    time.sleep(self.poll_s)  # another process is training it
                self._ensure_source(source)
                if self.sources_dir is not None:
                    commit(self.artifacts, source.key, self.sources_dir)
                self.claims.release(source.key)
                bar.update(1)
        finally:
            self.claims.release_all()
            bar.close()

    def run_pending(self, max_minutes: float) -> None:
        """Every unfinished run in plan order, stopping before one would pass ``max_minutes`` (0: none)."""
        start = time.monotonic()
        pending = self._unfinished()
        bar = self._progress_bar(len(pending), "quality runs")
        try:
            while pending:
                held = 0
                for run in pending:
                    if find_result(self.runs_dir, run) is not None:
                        continue  # finished by another process sharing the folders
                    if max_minutes and time.monotonic() - start + estimate_seconds(
                            run, measured_rates(stored_results(self.runs_dir))) > max_minutes * 60:
                        bar.write(f"stopping: {run.label} would pass the {max_minutes:g}-minute budget")
                        return
                    try:
                        held += not self._attempt(run)
                    finally:
                        self.claims.release_all()
                left = self._unfinished()  # after a rebuild, the runs of the stored build are not done for this one
                bar.total = bar.n + len(left)
                bar.update(max(0, len(pending) - len(left)))
                if left and held == len(left):
                    time.sleep(self.poll_s)  # every run left is held by another process
                pending = left
        finally:
            self.claims.release_all()
            bar.close()

    def _unfinished(self) -> list[Run]:
        builds = source_builds(self.plan, self.runs_dir, self.artifacts, self.sources_dir)
        return [r for r in bind_builds(self.plan, builds, self.runs_dir) if find_result(self.runs_dir, r) is None]

    def _attempt(self, run: Run) -> bool:
        """Run ``run`` (and its missing source stage) if this process can claim them."""
        from benchmarks.quality.runs import needs_source
        from benchmarks.quality.sources import artifact_build

        source = self.by_key[run.spec["source"]] if needs_source(run) else None
        if source is not None:
            if not self.claims.claim(source.key):
                return False  # another process is (re)running the source stage
            self._ensure_source(source)
            self.claims.release(source.key)  # others may start target runs of it now
            run = bind_builds([run], {source.key: artifact_build(self.artifacts / source.key)}, self.runs_dir)[0]
            if find_result(self.runs_dir, run) is not None:
                return True  # done from this build already
        if not self.claims.claim(run.key):
            return False
        if find_result(self.runs_dir, run) is None:  # finished by another process meanwhile
            self._run_one(run)
        return True

    def _ensure_source(self, source: Run) -> None:
        """The source stage's weights in ``artifacts``: restored from a committed build, else trained."""
        from benchmarks.quality.sources import restore_preferred, weights_here

        if weights_here(source, self.artifacts):
            return
        build = None
        if self.sources_dir is not None:
            build = restore_preferred(source, self.runs_dir, self.sources_dir, self.artifacts)
        if build is not None:
            self.bar.write(f"{source.label}: restored its committed build {build}")
            return
        self.bar.write(f"{source.label}: its weights are neither here nor committed; running it first")
        self._run_one(source)
        if not weights_here(source, self.artifacts):
            raise RuntimeError(f"{source.label} finished with no weights in {self.artifacts / source.key}")

    def _run_one(self, run: Run) -> None:
        from benchmarks.quality.runs import execute, store_source_result
        from benchmarks.quality.sources import commit

        self.bar.set_postfix_str(run.label)
        result = execute(run, self.artifacts, self.scratch, self.threads, self.progress)
        if run.stage == "source":
            if store_source_result(self.runs_dir, result) == "rebuilt":
                self.bar.write(f"warning: {run.label} was rebuilt here and differs from its stored record (another "
                               f"machine's kernels); its record stays, the rebuild is in rebuilds/, and target runs "
                               f"from it get keys of their own with source_build={result['build']}")
            if self.sources_dir is not None:
                commit(self.artifacts, run.key, self.sources_dir)
        else:
            save_result(self.runs_dir, run.key, result)
        self.ran += 1
        self.after_run()


def verify_runs(plan: list[Run], runs_dir: Path, work_dir: Path, sources_dir: Path | None, n: int, threads: int,
                progress: bool, keep_dir: Path | None = None) -> list[dict]:
    """Rerun up to ``n`` stored target runs of ``plan`` (round-robin over methods, in plan order)
    from the source builds their records name, restoring committed weights where needed, and
    compare their per-item predictions with the stored ones. Nothing in ``runs_dir`` changes: the
    reruns train in a scratch folder. A run whose recorded source build is neither here nor
    committed is skipped (retraining it would test another build).

    ``keep_dir``: keep each rerun's record there under its key (``rerun_report`` reads them), and
    take a rerun already kept there instead of running it again, so that an interrupted check
    resumes and two processes can split one by target seeds."""
    import tempfile

    from benchmarks.quality.runs import execute

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
        result = load_result(keep_dir, run.key) if keep_dir is not None else None
        if result is None:
            if not _source_in_place(run, by_key, artifacts, sources_dir):
                continue
            with tempfile.TemporaryDirectory(prefix="quality-verify-") as scratch:
                result = execute(run, artifacts, Path(scratch), threads, progress)
            if keep_dir is not None:
                save_result(keep_dir, run.key, result)
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


def _source_in_place(run: Run, by_key: dict[str, Run], artifacts: Path, sources_dir: Path | None) -> bool:
    """Whether the weights of the source build ``run`` records are in ``artifacts`` (restored from
    ``sources_dir`` if need be) for a rerun; False, saying why, when that build is not to be had or
    another build of its source stage is in use there."""
    from benchmarks.quality.runs import needs_source
    from benchmarks.quality.sources import artifact_build, committed_builds, restore, weights_here

    if not needs_source(run):
        return True
    source, build = by_key[run.spec["source"]], run.source_build
    if weights_here(source, artifacts):
        if artifact_build(artifacts / source.key) != build:  # never overwrite another build in use
            print(f"skip   {run.label}: another build of its source stage is in {artifacts / source.key}")
            return False
    elif sources_dir is not None and build in committed_builds(sources_dir, source.key):
        restore(sources_dir, source.key, build, artifacts)
    else:
        print(f"skip   {run.label}: its source build {build or '(unrecorded)'} is neither here nor committed")
        return False
    return True
