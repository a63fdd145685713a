"""The adapter lifecycle's host side: file -> validated host copy -> the table of current versions.

``AdapterRegistry`` holds, per task, the ``AdapterVersion`` new requests get. A version is an
immutable, fully validated host copy (metadata, fast weights, gate, label token ids); a request
keeps a reference to the version it was admitted with, so replacing or evicting a task never
changes a request in flight. The device side (``slots.SlotTable``) keys its KV by
``AdapterVersion.key``, which is unique per load.

Sources: the adapter store folder (by task name, or a relative path inside the store; anything
resolving outside it is refused), uploaded bytes, and ``poll_store`` for the watcher. Every
failure raises before anything changes: ``AdapterFormatError`` (bad file; the message names the
field), ``AdapterNotFound`` or ``AdapterConflict``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from talora.adapters.io import AdapterFormatError, BundleMeta, TaskMeta, check_task_name, decode_task, list_task_names
from talora.adapters.prompting import verbalizer_ids
from talora.server.metrics import Metrics

log = logging.getLogger(__name__)
MAX_PATH_CHARS = 1024


class AdapterNotFound(KeyError):
    """No such task is loaded, or no such adapter file is in the store."""

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterConflict(ValueError):
    """A different adapter arrived under a version string that is already loaded."""


@dataclass(frozen=True, eq=False)
class AdapterVersion:
    """One validated, immutable host copy of a task adapter."""

    meta: TaskMeta
    fast: torch.Tensor  # (n, r + k) or (n, d), the bundle's dtype, on the host
    gate: torch.Tensor  # (L, H)
    label_ids: tuple[tuple[int, ...], ...]  # verbaliser tokens of each label (classify); () otherwise
    digest: str  # sha256 of the metadata and tensor bytes
    source: str  # "store:<relative path>", "upload" or "watch:<relative path>"
    serial: int  # unique per load in this process
    basis: torch.Tensor | None = None  # (k, d): the task's own basis rows, when it has any

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def key(self) -> tuple[str, int]:
        """Slot-table key: a replaced adapter's old KV is never mistaken for the new one."""
        return (self.meta.task, self.serial)

    def describe(self) -> dict:
        m = self.meta
        return {"task": m.task, "version": m.version, "kind": m.kind, "labels": list(m.labels),
                "verbalizers": dict(m.verbalizers), "template": m.template,
                "max_input_tokens": m.max_input_tokens, "source": self.source, "training": dict(m.training)}


class AdapterRegistry:
    """Current adapter version of each task; thread-safe, every change atomic."""

    def __init__(self, bundle: BundleMeta, store: Path, tokenizer, metrics: Metrics):
        self.bundle = bundle
        self.store = Path(store).resolve()
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._current: dict[str, AdapterVersion] = {}
        self._lock = threading.Lock()
        self._serials = itertools.count(1)
        self._seen: dict[str, tuple] = {}  # store file signatures already loaded (watcher)
        self._pending: dict[str, tuple] = {}  # signatures seen once, loaded when stable

    # ----- reading -----------------------------------------------------------------------
    def get(self, task: str) -> AdapterVersion:
        adapter = self._current.get(task)
        if adapter is None:
            raise AdapterNotFound(f"task {task!r} is not loaded")
        return adapter

    def snapshot(self) -> dict[str, AdapterVersion]:
        with self._lock:
            return dict(self._current)

    def current_keys(self) -> set[tuple[str, int]]:
        return {a.key for a in self.snapshot().values()}

    # ----- file -> validated host copy -----------------------------------------------------
    def decode(self, task: str, meta_bytes: bytes, blob: bytes, source: str) -> AdapterVersion:
        """Validate adapter bytes for ``task`` into a host copy; changes nothing."""
        check_task_name(task)
        meta, tensors = decode_task(meta_bytes, blob, self.bundle, expected_task=task)
        if meta.kind == "classify":
            try:
                label_ids = tuple(tuple(ids) for ids in verbalizer_ids(self.tokenizer, meta.labels, meta.verbalizers))
            except ValueError as exc:
                raise AdapterFormatError(str(exc)) from None
        else:
            label_ids = ()
        digest = hashlib.sha256(meta_bytes + b"\0" + blob).hexdigest()
        return AdapterVersion(meta, tensors["fast"], tensors["gate"], label_ids, digest, source, next(self._serials),
                              tensors.get("basis"))

    def resolve_store_path(self, name: str) -> Path:
        """``store/name`` (no suffix) if it stays inside the store, else ``AdapterFormatError``."""
        if not name or Path(name).is_absolute() or "\0" in name:
            raise AdapterFormatError(f"path: {name!r} must be a relative path inside the adapter store")
        parts = Path(name).parts  # isprintable() is False for lone surrogates and control characters
        if len(name) > MAX_PATH_CHARS or any(len(part) > 200 for part in parts) or not name.isprintable():
            raise AdapterFormatError(f"path: {name[:80]!r} is not a usable store path (printable UTF-8, at most "
                                     f"{MAX_PATH_CHARS} characters, 200 per folder or file name)")
        target = (self.store / name).resolve()
        if not target.is_relative_to(self.store):
            raise AdapterFormatError(f"path: {name!r} is outside the adapter store")
        return target

    def _read_store(self, name: str, root: Path | None = None) -> tuple[bytes, bytes]:
        """The two files of ``name`` in the store (or in ``root``, the bundle folder at start-up)."""
        root = self.store if root is None else Path(root).resolve()
        target = self.resolve_store_path(name) if root == self.store else root / name
        files = [target.with_name(target.name + ".json"), target.with_name(target.name + ".safetensors")]
        try:
            for file in files:
                if not file.resolve().is_relative_to(root):
                    raise AdapterFormatError(f"path: {name!r} is outside the adapter store")
                if not file.is_file():
                    raise AdapterNotFound(f"{file.relative_to(root)} is not in the adapter store")
            return files[0].read_bytes(), files[1].read_bytes()
        except OSError as exc:
            raise AdapterFormatError(f"path: {name[:80]!r} cannot be read from the store ({exc.strerror})") from None

    # ----- explicit load / replace / evict --------------------------------------------------
    def load_store(self, task: str, name: str | None = None, source: str = "store",
                   root: Path | None = None) -> tuple[AdapterVersion, bool]:
        """Load or replace ``task`` from ``store/<name or task>.{json,safetensors}`` (or from ``root``)."""
        check_task_name(task)
        name = name or task
        return self._timed(source, lambda: self._install(
            self.decode(task, *self._read_store(name, root), source=f"{source}:{name}")))

    def load_bytes(self, task: str, meta_bytes: bytes, blob: bytes) -> tuple[AdapterVersion, bool]:
        """Load or replace ``task`` from uploaded bytes."""
        return self._timed("upload", lambda: self._install(self.decode(task, meta_bytes, blob, "upload")))

    def evict(self, task: str) -> AdapterVersion:
        with self._lock:
            adapter = self._current.pop(task, None)
            self.metrics.loaded_tasks.set(len(self._current))
        if adapter is None:
            raise AdapterNotFound(f"task {task!r} is not loaded")
        log.info("adapter %s version %s evicted", task, adapter.version)
        return adapter

    def _install(self, adapter: AdapterVersion) -> tuple[AdapterVersion, bool]:
        """Make ``adapter`` current; returns (current, changed). Same version, same bytes: no change."""
        with self._lock:
            old = self._current.get(adapter.task)
            if old is not None and old.version == adapter.version:
                if old.digest == adapter.digest:
                    return old, False
                raise AdapterConflict(f"version: {adapter.version!r} of task {adapter.task!r} is already loaded with "
                                      "different contents; give the new adapter another version")
            self._current[adapter.task] = adapter
            self.metrics.loaded_tasks.set(len(self._current))
        log.info("adapter %s version %s loaded from %s%s", adapter.task, adapter.version, adapter.source,
                 f" (replaces {old.version})" if old else "")
        return adapter, True

    def _timed(self, source: str, load):
        start = time.perf_counter()
        try:
            result = load()
        except Exception:
            self.metrics.adapter_loads.labels(source, "error").inc()
            raise
        self.metrics.adapter_loads.labels(source, "ok").inc()
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)
        return result

    # ----- the store at start-up and the watcher ---------------------------------------------
    def _signature(self, task: str, root: Path | None = None) -> tuple:
        stats = [((root or self.store) / f"{task}{ext}").stat() for ext in (".json", ".safetensors")]
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def load_all(self, tasks: list[str] | None = None, bundle_dir: Path | None = None) -> list[str]:
        """Load every task in the store (or ``tasks``); a bad file is logged and skipped.

        With ``bundle_dir``, load the bundle folder's tasks instead (source ``bundle``); the
        watcher does not track them, it watches the store.
        """
        root, source = (Path(bundle_dir).resolve(), "bundle") if bundle_dir is not None else (self.store, "store")
        loaded = []
        for task in tasks if tasks is not None else list_task_names(root):
            try:
                signature = self._signature(task, root)
                self.load_store(task, source=source, root=root)
            except (AdapterFormatError, AdapterNotFound, AdapterConflict, OSError) as exc:
                log.warning("adapter %s not loaded from the %s: %s", task, source, exc)
                continue
            if bundle_dir is None:
                self._seen[task] = signature
            loaded.append(task)
        return loaded

    def poll_store(self) -> list[str]:
        """Load new and changed store adapters whose files were stable for one poll; returns them."""
        changed = []
        for task in list_task_names(self.store):
            try:
                signature = self._signature(task)
            except OSError:
                continue
            if signature == self._seen.get(task):
                continue
            if self._pending.get(task) != signature:
                self._pending[task] = signature  # a writer may still be busy: load on the next poll
                continue
            del self._pending[task]
            self._seen[task] = signature
            try:
                _, did_change = self.load_store(task, source="watch")
            except (AdapterFormatError, AdapterNotFound, AdapterConflict, OSError) as exc:
                log.warning("watch: adapter %s not loaded, the previous version keeps serving: %s", task, exc)
                continue
            if did_change:
                changed.append(task)
        return changed
