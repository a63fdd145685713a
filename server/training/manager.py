"""``TrainingManager``: the queue of training jobs, their worker processes, and the install of their results.

``submit`` checks a job (its examples as ``talora-train --task-files`` checks a file, one job per task
at a time, the queue's cap), writes its folder (``store.JobStore``) and queues it. A supervisor thread
starts queued jobs while fewer than ``training_max_running`` run, each as its own process
(``python -m talora.server.training.worker``, ``training_threads`` torch threads, nice 10), follows
their progress from the run's ``log.jsonl``, stops them on ``cancel`` or past ``training_timeout_s``,
and installs a finished task: its files are copied into the store (the old ones kept aside), then
loaded through the registry's load path (``install``, the admin PUT's), and put back as they were if
that load is refused, so a failed job never changes what is served.

On start, queued jobs found on disk are queued again; a job found running (the server stopped while
it ran) is marked failed, and its worker, if it still runs, is stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talora.adapters.formats.io import BUNDLE_FILE, SHARED_FILE, check_task_name, list_task_names
from talora.server.adapter_registry import write_atomic
from talora.server.errors import JobConflict, JobNotFound, QueueFull
from talora.server.metrics import Metrics
from talora.server.settings import EngineFields
from talora.server.training.examples import check_examples, write_examples
from talora.server.training.store import ACTIVE, JobRecord, JobStore, new_job_id
from talora.server.training.worker import ERROR_FILE, PLAN_FILE, RESULT_FILE, RUN_FILE, headline

log = logging.getLogger(__name__)
POLL_S = 0.5
KILL_GRACE_S = 5.0
WORKER_LOG = "worker.log"
INTERRUPTED = "interrupted: the server stopped while the job ran (its task was not changed); submit it again"


@dataclass
class Submission:
    """A job as asked: the task, its examples (dicts of text, label and, for extract, question) and options."""

    task: str
    examples: list[dict[str, Any]]
    kind: str = "classify"
    labels: list[str] | None = None
    template: str | None = None
    verbalizers: dict[str, str] | None = None
    language: str = "en"
    install: bool = True
    version: str | None = None
    steps: int = 0
    eval_every: int | None = None  # None: about six dev evaluations per run (the worker's default)
    seed: int = 0


@dataclass
class _Running:
    record: JobRecord
    proc: subprocess.Popen
    started: float
    log_file: Any
    cancelled: bool = False


def under_ray() -> bool:
    """Whether this process is a Ray worker (a ``--ray`` replica): training jobs are not run there yet."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


class TrainingManager:
    """Training jobs of one server. ``install(task)`` loads ``<store>/<task>.{json,safetensors}`` the way an admin
    PUT does (returns ``(AdapterVersion, changed)``); ``current(task)`` is the version served now, or None."""

    def __init__(self, settings: EngineFields, store: Path, bundle: Path, model: str, device: str, metrics: Metrics,
                 install: Callable[[str], tuple[Any, bool]], current: Callable[[str], str | None]):
        self.settings, self.metrics = settings, metrics
        self.store, self.bundle = Path(store).resolve(), Path(bundle).resolve()
        self.model, self.device = model, device
        self._install, self._current = install, current
        self.jobs = JobStore(self.store)
        self._records: dict[str, JobRecord] = {}
        self._queue: list[str] = []
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        for record in self.jobs.load_all():
            if record.status == "queued":
                self._queue.append(record.id)
            elif record.status in ("running", "installing"):
                self._stop_stray_worker(record)
                self._finish(record, "failed", INTERRUPTED)
            self._records[record.id] = record
        if self._queue:
            log.info("training: %d queued jobs found on disk are queued again", len(self._queue))
        self._publish()
        self._thread = threading.Thread(target=self._supervise, name="talora-training", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the supervisor; running jobs are stopped and marked failed, queued ones stay queued on disk."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for job in running:
            self._kill(job.proc)
            job.log_file.close()
            self._finish(job.record, "failed", INTERRUPTED)

    # ----- the API ---------------------------------------------------------------------------
    def submit(self, sub: Submission) -> JobRecord:
        """Check and queue a job: ``ExamplesRefused`` (422), ``JobConflict`` (409), ``QueueFull`` (429)."""
        check_task_name(sub.task)
        with self._lock:
            self._check_free(sub)
        job_id = new_job_id()
        folder = self.jobs.folder(job_id)
        folder.mkdir(parents=True)
        try:  # a job refused here (or not saved) leaves no folder behind
            checked = check_examples(write_examples(folder, sub.examples), sub.task, sub.kind, sub.labels,
                                     sub.template, sub.verbalizers, sub.language)
            options = {"labels": checked["spec_labels"] or None, "template": checked["template"],
                       "verbalizers": checked["verbalizers"] or None, "language": sub.language,
                       "install": sub.install, "version": sub.version, "steps": sub.steps,
                       "eval_every": sub.eval_every, "seed": sub.seed}
            record = JobRecord(id=job_id, task=sub.task, kind=sub.kind, status="queued", options=options,
                               examples=len(sub.examples), label_counts=checked["labels"],
                               progress={"splits": checked["splits"]})
            with self._lock:  # checked again: another job of the task may have come in meanwhile
                self._check_free(sub)
                self.jobs.save(record)
                self._records[job_id] = record
                self._queue.append(job_id)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("training job %s queued: task %s, %d examples (%s)", job_id, sub.task, len(sub.examples),
                 ", ".join(f"{k}={v}" for k, v in checked["splits"].items()))
        self._publish()
        return record

    def _check_free(self, sub: Submission) -> None:
        busy = [r for r in self._records.values() if r.task == sub.task and r.active]
        if busy:
            raise JobConflict(f"task: a training job of task {sub.task!r} is {busy[0].status} already (job "
                              f"{busy[0].id}); wait for it or cancel it")
        queued = sum(r.status == "queued" for r in self._records.values())
        if queued >= self.settings.training_max_queued:
            raise QueueFull(f"the training queue is full ({queued} jobs waiting, training_max_queued)")
        if sub.version is not None and sub.install and sub.version == self._current(sub.task):
            raise JobConflict(f"version: {sub.version!r} is the version of task {sub.task!r} served now; a trained "
                              "task is installed under a new version")

    def list(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._find(job_id)

    def _find(self, job_id: str) -> JobRecord:
        record = self._records.get(job_id)
        if record is None:
            raise JobNotFound(f"training job {job_id[:40]!r} does not exist")
        return record

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (a running worker is stopped); ``JobConflict`` once it installs or ended."""
        with self._lock:
            record = self._find(job_id)
            if record.status == "queued":
                self._queue.remove(job_id)
            elif record.status == "running" and job_id in self._running:
                self._running[job_id].cancelled = True
            else:
                raise JobConflict(f"training job {job_id} is {record.status}: only a queued or running job can be "
                                  "cancelled")
        if record.status == "queued":
            self._finish(record, "cancelled", None)
        else:
            self._wake_kill(job_id)
        return record

    def remove(self, job_id: str) -> JobRecord:
        """Delete a finished job's folder (its trained files too); ``JobConflict`` while it is active."""
        with self._lock:
            record = self._find(job_id)
            if record.active:
                raise JobConflict(f"training job {job_id} is {record.status}: cancel it first")
            del self._records[job_id]
        shutil.rmtree(self.jobs.folder(job_id), ignore_errors=True)
        return record

    # ----- the supervisor ----------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._halt.wait(POLL_S):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the supervisor must keep running
                log.exception("training supervisor step failed")

    def _tick(self) -> None:
        for job_id, job in list(self._running.items()):
            self._follow(job)
            code = job.proc.poll()
            overdue = time.monotonic() - job.started > self.settings.training_timeout_s
            if code is None and (job.cancelled or overdue):
                self._kill(job.proc)
                code = job.proc.wait()
                job.record.error = None if job.cancelled else (
                    f"the job ran over training_timeout_s={self.settings.training_timeout_s:g} s and was stopped")
            if code is None:
                continue
            job.log_file.close()
            with self._lock:
                self._running.pop(job_id, None)
            self.metrics.training_seconds.observe(time.monotonic() - job.started)
            self._ended(job, code)
        while not self._halt.is_set():
            with self._lock:
                if len(self._running) >= self.settings.training_max_running or not self._queue:
                    break
                record = self._records[self._queue.pop(0)]
            self._launch(record)
        self._publish()

    def _ended(self, job: _Running, code: int) -> None:
        record, folder = job.record, self.jobs.folder(job.record.id)
        # record.error is set when the job ran over the time limit
        failure = None if job.cancelled else record.error or (self._failure(folder, code) if code else None)
        if job.cancelled or failure:
            self._finish(record, "cancelled" if job.cancelled else "failed", failure)
            return
        try:
            result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self._finish(record, "failed", f"the worker wrote no result ({exc})")
            return
        task_files = folder / result["bundle"] / record.task
        result["path"] = str(task_files.relative_to(self.store))  # PUT /v1/adapters/{task} {"path": ...} loads it
        record.result = result
        if not record.options.get("install", True):
            self._finish(record, "succeeded", None)
            return
        record.status = "installing"
        self._save(record)
        try:
            adapter, changed = self._install_files(record.task, task_files)
        except Exception as exc:  # noqa: BLE001 - any refusal: the served version stays, the job says why
            self._finish(record, "failed", f"install refused, the served version is unchanged: {exc}")
            return
        record.result.update(installed=True, version=adapter.version, changed=changed,
                             previous_version=adapter.replaced if changed else adapter.version)
        self._finish(record, "succeeded", None)

    def _failure(self, folder: Path, code: int) -> str:
        with suppress(OSError, ValueError, KeyError):
            return json.loads((folder / ERROR_FILE).read_text(encoding="utf-8"))["error"]
        lines: list[str] = []
        with suppress(OSError):
            lines = (folder / WORKER_LOG).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        tail = " | ".join(lines[-3:])[-600:]
        return f"the training worker exited with status {code}" + (f": {tail}" if tail else "")

    def _install_files(self, task: str, files: Path) -> tuple[Any, bool]:
        """Copy ``files``.{json,safetensors} into the store as ``<task>.*`` and load them; on a refusal put the
        store's old files back (or remove the new ones), so that nothing changed."""
        names = [f"{task}.safetensors", f"{task}.json"]  # tensors first, JSON last (the watcher pairs them)
        old = {name: (self.store / name).read_bytes() if (self.store / name).is_file() else None for name in names}
        try:
            for name in names:
                write_atomic(self.store / name, (files.parent / (files.name + Path(name).suffix)).read_bytes())
            return self._install(task)
        except BaseException:
            for name in reversed(names):
                kept = old[name]
                if kept is None:
                    (self.store / name).unlink(missing_ok=True)
                else:
                    write_atomic(self.store / name, kept)
            raise

    def _launch(self, record: JobRecord) -> None:
        folder = self.jobs.folder(record.id)
        s = self.settings
        try:
            self._source_bundle(folder / "source", record.task)
            job = record.to_json() | {"runtime": {"model": self.model, "device": self.device,
                                                  "threads": s.training_threads}}
            write_atomic(folder / RUN_FILE, json.dumps(job).encode())
            threads = str(s.training_threads)
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
            log_file = open(folder / WORKER_LOG, "ab")  # noqa: SIM115 - closed when the job ends
            proc = subprocess.Popen([sys.executable, "-m", "talora.server.training.worker", str(folder)],
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    cwd=folder, start_new_session=True)
        except OSError as exc:
            self._finish(record, "failed", f"the training worker could not start ({exc})")
            return
        with self._lock:  # a cancel sees the job running only once it can stop it
            record.status, record.started_at = "running", time.time()
            record.progress = {**record.progress, "pid": proc.pid}
            self._running[record.id] = _Running(record, proc, time.monotonic(), log_file)
        self._save(record)
        log.info("training job %s started: task %s, worker pid %d, %d threads", record.id, record.task, proc.pid,
                 s.training_threads)

    def _source_bundle(self, target: Path, task: str) -> None:
        """The served bundle's shared files and its tasks but ``task`` (a task of the bundle is trained anew, from
        the others)."""
        target.mkdir(exist_ok=True)
        others = [f"{o}{ext}" for o in list_task_names(self.bundle) if o != task for ext in (".json", ".safetensors")]
        for name in (BUNDLE_FILE, SHARED_FILE, *others):
            shutil.copyfile(self.bundle / name, target / name)

    def _follow(self, job: _Running) -> None:
        """Progress of a running job from its plan and its run's log rows: step, loss, dev score, ETA."""
        folder = self.jobs.folder(job.record.id)
        progress = dict(job.record.progress)
        with suppress(OSError, ValueError, KeyError):
            progress["steps"] = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8"))["steps"]
        rows = []
        with suppress(OSError):
            for line in (folder / "run" / "log.jsonl").read_text(encoding="utf-8").splitlines():
                with suppress(ValueError):  # a row being written
                    rows.append(json.loads(line))
        steps = [r for r in rows if r.get("kind") == "step"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        if steps:
            last = steps[-1]
            recent = [r["seconds"] for r in steps[-10:] if isinstance(r.get("seconds"), int | float)]
            progress.update(step=last["step"], loss=last.get("loss"))
            if recent and progress.get("steps"):
                progress["eta_s"] = round(max(0, progress["steps"] - last["step"]) * sum(recent) / len(recent), 1)
        if evals:
            dev = headline(evals[-1].get("metrics", {}).get(job.record.task, {}))
            if dev is not None:
                progress.update(dev=dev, dev_step=evals[-1].get("step"))
        progress["elapsed_s"] = round(time.monotonic() - job.started, 1)
        if progress != job.record.progress:
            job.record.progress = progress
            self._save(job.record)

    # ----- bookkeeping -------------------------------------------------------------------------
    def _finish(self, record: JobRecord, status: str, error: str | None) -> None:
        record.status, record.error, record.finished_at = status, error, time.time()
        record.progress = {k: v for k, v in record.progress.items() if k != "pid"}
        self._save(record)
        self.metrics.training_jobs_finished.labels(status).inc()
        (log.warning if status == "failed" else log.info)("training job %s (task %s) %s%s", record.id, record.task,
                                                          status, f": {error}" if error else "")
        self._publish()

    def _save(self, record: JobRecord) -> None:
        try:
            self.jobs.save(record)
        except OSError as exc:
            log.warning("training job %s: its record could not be written (%s)", record.id, exc)

    def _publish(self) -> None:
        with self._lock:
            counts = {status: sum(r.status == status for r in self._records.values()) for status in ACTIVE}
        self.metrics.training_jobs.labels("queued").set(counts["queued"])
        self.metrics.training_jobs.labels("running").set(counts["running"] + counts["installing"])

    def _wake_kill(self, job_id: str) -> None:
        """A cancelled running job: stop its worker now (the supervisor records the end)."""
        job = self._running.get(job_id)
        if job is not None and job.proc.poll() is None:
            _signal_group(job.proc.pid, signal.SIGTERM)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()

    def _stop_stray_worker(self, record: JobRecord) -> None:
        """The worker of a job interrupted by a restart, if it still runs (its command line names the job folder)."""
        pid = record.progress.get("pid")
        if not isinstance(pid, int):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return
        if str(self.jobs.folder(record.id)) in cmdline and "talora.server.training.worker" in cmdline:
            _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the worker's process group (its own session); one that has ended, or is not ours, is left."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def start_training(settings: EngineFields, store: Path, bundle: Path, model: str, device: str, metrics: Metrics,
                   engine: Any) -> TrainingManager | None:
    """The started ``TrainingManager`` of an engine (``load_store`` and ``adapters`` are its ``ServingEngine``
    methods), or None where this server runs no training jobs: ``training_max_running`` 0 (also with the admin
    routes off: ``Settings.engine_config``), or a ``--ray`` replica (not yet: docs/serving.md)."""
    if settings.training_max_running == 0 or under_ray():
        return None

    def current(task: str) -> str | None:
        adapter = engine.adapters().get(task)
        return adapter.version if adapter is not None else None

    manager = TrainingManager(settings, store, bundle, model, device.split(":")[0], metrics,
                              install=lambda task: engine.load_store(task, task), current=current)
    manager.start()
    return manager
