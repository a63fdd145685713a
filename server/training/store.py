"""The on-disk state of training jobs: ``<store>/.talora/jobs/<id>/``.

Each job folder holds ``job.json`` (the ``JobRecord``, rewritten atomically on every change),
``examples.jsonl`` (the labelled examples as a task file), ``source/`` (the bundle the task is adapted
from), ``run/`` (the worker's ``talora-train`` output folder: ``log.jsonl``, ``summary.json``,
``bundle/``), ``worker.log`` (the worker's output) and, at the end, ``result.json`` or ``error.json``
written by the worker. A hidden folder of the store, so no store listing or watcher sees it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from talora.server.adapter_registry import write_atomic

log = logging.getLogger(__name__)
JOBS_DIR = Path(".talora") / "jobs"
JOB_FILE = "job.json"
ACTIVE = ("queued", "running", "installing")
JOB_ID = re.compile(r"\A[0-9a-f]{16}\Z")


def new_job_id() -> str:
    return secrets.token_hex(8)


@dataclass
class JobRecord:
    """One training job: what was asked, where it is, and what came of it."""

    id: str
    task: str
    kind: str
    status: str
    options: dict[str, Any]  # labels, template, verbalizers, language, install, version, steps, eval_every, seed
    examples: int
    label_counts: dict[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # step, steps, loss, dev, eta_s, elapsed_s
    result: dict[str, Any] = field(default_factory=dict)  # dev and test metrics, version, installed, files
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class JobStore:
    """The job folders of one adapter store."""

    def __init__(self, store: Path):
        self.root = Path(store) / JOBS_DIR

    def folder(self, job_id: str) -> Path:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"job id {job_id[:40]!r} is not a job id")
        return self.root / job_id

    def save(self, record: JobRecord) -> None:
        write_atomic(self.folder(record.id) / JOB_FILE,
                     json.dumps(record.to_json(), indent=1, ensure_ascii=False).encode())

    def load_all(self) -> list[JobRecord]:
        """Every readable job record, oldest first; an unreadable one is logged and left alone."""
        records = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not JOB_ID.fullmatch(folder.name):
                continue
            try:
                records.append(JobRecord(**json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("training job %s: its record cannot be read (%s); left alone", folder.name, exc)
        return sorted(records, key=lambda r: r.created_at)
