"""The shared adapter store of a Ray Serve deployment: the one source of truth every replica reads.

On one machine, ``talora-serve`` keeps the current version of each task in memory and a PUT of an
upload changes only that memory. With replicas that start, stop and restart on their own, the
current version must live where every replica (and the ingress) can read it: the store folder,
in today's layout (``<task>.json`` + ``<task>.safetensors``), on a disk all nodes share.

- ``version_of(task)``: the version the store names for ``task`` now (the ingress turns it into
  the multiplexed model id ``task@version``); falls back to the bundle folder's tasks; a task
  evicted by the admin route has a tombstone and no version. Reads are cached by file stat.
- ``persist(adapter)``: after a replica validated and loaded an adapter from an upload or another
  store path, write it to ``<task>.*`` (tensors first, JSON last, each an atomic rename).
- ``evict(task)``: move the task's files to ``.evicted/`` and leave a tombstone.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from talora.adapters.formats.io import MAX_META_BYTES, TASK_NAME, save_task
from talora.server.adapter_registry import AdapterVersion

log = logging.getLogger(__name__)
EVICTED = ".evicted"


class SharedStore:
    """The store folder (and the bundle folder behind it) as seen by the ingress and the replicas."""

    def __init__(self, store: Path, bundle: Path):
        self.store, self.bundle = Path(store).resolve(), Path(bundle).resolve()
        self._cache: dict[Path, tuple[tuple[int, int], str]] = {}  # json path -> (stat, version)

    def _read_version(self, path: Path) -> str | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        signature = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        if stat.st_size > MAX_META_BYTES:
            return None  # not a task's metadata: the replica's load refuses it and says why
        try:
            version = str(json.loads(path.read_bytes()).get("version", ""))
        except (OSError, ValueError, AttributeError, RecursionError):
            return None  # a writer is busy or the file is bad: the replica's load reports it
        self._cache[path] = (signature, version)
        return version

    def tombstone(self, task: str) -> Path:
        return self.store / EVICTED / task

    def version_of(self, task: str) -> str | None:
        """The version of ``task`` that new requests get, or None when the store has no such task."""
        if not TASK_NAME.match(task):
            return None
        version = self._read_version(self.store / f"{task}.json")
        if version is not None:
            return version
        if self.tombstone(task).exists() or self.bundle == self.store:
            return None
        return self._read_version(self.bundle / f"{task}.json")

    def persist(self, adapter: AdapterVersion) -> bool:
        """Make ``adapter`` the store's version of its task; False when the store already names it."""
        task = adapter.task
        self.tombstone(task).unlink(missing_ok=True)
        if self._read_version(self.store / f"{task}.json") == adapter.version:
            return False
        save_task(self.store, copy.deepcopy(adapter.meta), adapter.fast, adapter.gate, adapter.basis)
        log.info("adapter %s version %s written to the shared store %s", task, adapter.version, self.store)
        return True

    def evict(self, task: str) -> None:
        """Keep the task's files under ``.evicted/`` and mark it gone, so no replica loads it again."""
        folder = self.store / EVICTED
        folder.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in (".json", ".safetensors"):  # JSON first: the task is gone before its tensors move
            source = self.store / f"{task}{suffix}"
            if source.exists():
                source.replace(folder / f"{task}.{stamp}{suffix}")
        self.tombstone(task).write_text(stamp)
        log.info("adapter %s evicted from the shared store %s", task, self.store)
