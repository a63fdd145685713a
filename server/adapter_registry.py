"""The adapter lifecycle's host side: file -> validated host copy -> the table of current versions.

``AdapterRegistry`` holds, per task, the ``AdapterVersion`` new requests get. A version is an
immutable, fully validated host copy (metadata, fast weights, gate, label token ids); a request
keeps a reference to the version it was admitted with, so replacing or evicting a task never
changes a request in flight. The device side (``slots.SlotTable``) keys its KV by
``AdapterVersion.key``, which is unique per load.

Sources: the adapter store folder (by task name, or a relative path inside the store; anything
resolving outside it is refused), uploaded bytes, and ``poll_store`` for the watcher. Store files
are read with a size bound (``max_file_bytes``, the server's ``max_upload_bytes``). Every failure
raises before anything changes: ``AdapterFormatError`` (bad file; the message names the field;
``AdapterTooLarge`` for a file over the bound), ``AdapterNotFound`` or ``AdapterConflict``.

**Last known good.** Every version installed from the store, the watcher or an upload is also
kept, byte for byte, in ``<store>/.talora/served/<task>/`` (the pair, then ``record.json`` naming
it, each written atomically; a hidden folder, so no store listing sees it), and an evicted task's
copy is removed. At start (``load_all``) a store task whose files are refused, or a task served
before that the store no longer has, loads its kept copy instead; a task that was served before
and loads from neither is reported by ``missing`` (``/ready`` answers 503 until it is loaded or
deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from talora.adapters.formats.io import (
    MAX_VERBALIZER_TOKENS,
    TASK_NAME,
    AdapterFormatError,
    BundleMeta,
    TaskMeta,
    check_task_name,
    decode_task,
    list_task_names,
    parse_json_object,
)
from talora.adapters.runtime.prompting import verbalizer_ids
from talora.server.metrics import Metrics

log = logging.getLogger(__name__)
MAX_PATH_CHARS = 1024
DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # Settings.max_upload_bytes' default
SERVED_DIR = Path(".talora") / "served"  # the last-known-good copies, inside the store
RECORD = "record.json"
_KEPT_FILE = re.compile(r"\A[0-9a-f]{16}\.(json|safetensors)\Z")


class AdapterNotFound(KeyError):
    """No such task is loaded, or no such adapter file is in the store."""

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterConflict(ValueError):
    """A different adapter arrived under a version string that is already loaded."""


class AdapterTooLarge(AdapterFormatError):
    """An adapter file in the store is over ``max_upload_bytes`` (an HTTP 413; a 400 where unmapped)."""


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (``AdapterTooLarge`` beyond):
    its size is checked before reading, and no more than ``limit + 1`` bytes are read, in case it grows.
    Opened without blocking, so that a FIFO in its place cannot stall the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdapterFormatError(f"{what}: not a regular file")
        if info.st_size > limit:
            raise AdapterTooLarge(f"{what}: {info.st_size} bytes is over max_upload_bytes={limit}")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise AdapterTooLarge(f"{what}: over max_upload_bytes={limit} (the file grew while it was read)")
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder and one rename: a reader (or a restart after
    a crash) sees the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    replaced: str | None = None  # the version this one replaced when it was installed (None: none was loaded)

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

    def __init__(self, bundle: BundleMeta, store: Path, tokenizer, metrics: Metrics,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.bundle = bundle
        self.store = Path(store).resolve()
        self.served_dir = self.store / SERVED_DIR
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_file_bytes = max_file_bytes
        self._current: dict[str, AdapterVersion] = {}
        self._lock = threading.Lock()
        self._keep_lock = threading.Lock()  # an install and its last-known-good copy, in the order of installs
        self._expected: set[str] = set()  # tasks served before this start (kept copies): missing until loaded
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
    def decode(self, task: str, meta_bytes: bytes, blob: bytes, source: str,
               require_digest: bool = False) -> AdapterVersion:
        """Validate adapter bytes for ``task`` into a host copy; changes nothing. ``require_digest``:
        refuse a JSON without ``tensors_sha256`` (the watcher's loads)."""
        check_task_name(task)
        meta, tensors = decode_task(meta_bytes, blob, self.bundle, expected_task=task, require_digest=require_digest)
        if meta.kind == "classify":
            try:
                label_ids = tuple(tuple(ids) for ids in verbalizer_ids(self.tokenizer, meta.labels, meta.verbalizers))
            except ValueError as exc:
                raise AdapterFormatError(str(exc)) from None
            for label, ids in zip(meta.labels, label_ids):
                if len(ids) > MAX_VERBALIZER_TOKENS:
                    raise AdapterFormatError(f"verbalizers[{label!r}]: {len(ids)} tokens is over the limit of "
                                             f"{MAX_VERBALIZER_TOKENS}")
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
        """The two files of ``name`` in the store (or in ``root``, the bundle folder at start-up), each at
        most ``max_file_bytes`` (``AdapterTooLarge``)."""
        root = self.store if root is None else Path(root).resolve()
        target = self.resolve_store_path(name) if root == self.store else root / name
        files = [target.with_name(target.name + ".json"), target.with_name(target.name + ".safetensors")]
        try:
            for file in files:
                if not file.resolve().is_relative_to(root):
                    raise AdapterFormatError(f"path: {name!r} is outside the adapter store")
                if not file.is_file():
                    raise AdapterNotFound(f"{file.relative_to(root)} is not in the adapter store")
            meta_bytes, blob = (read_bounded(file, self.max_file_bytes, str(file.relative_to(root))) for file in files)
            return meta_bytes, blob
        except OSError as exc:
            raise AdapterFormatError(f"path: {name[:80]!r} cannot be read from the store ({exc.strerror})") from None

    # ----- explicit load / replace / evict --------------------------------------------------
    def load_store(self, task: str, name: str | None = None, source: str = "store",
                   root: Path | None = None, require_digest: bool = False) -> tuple[AdapterVersion, bool]:
        """Load or replace ``task`` from ``store/<name or task>.{json,safetensors}`` (or from ``root``, whose
        loads are not kept as last known good)."""
        check_task_name(task)
        name = name or task

        def load() -> tuple[AdapterVersion, bool]:
            meta_bytes, blob = self._read_store(name, root)
            adapter = self.decode(task, meta_bytes, blob, f"{source}:{name}", require_digest)
            return self._commit(adapter, meta_bytes, blob, keep=root is None)

        return self._timed(source, load)

    def load_bytes(self, task: str, meta_bytes: bytes, blob: bytes) -> tuple[AdapterVersion, bool]:
        """Load or replace ``task`` from uploaded bytes."""
        return self._timed("upload", lambda: self._commit(self.decode(task, meta_bytes, blob, "upload"),
                                                          meta_bytes, blob, keep=True))

    def evict(self, task: str) -> AdapterVersion:
        """Unload ``task`` and remove its last-known-good copy, so that a restart does not bring it back.
        A task that is not loaded: ``AdapterNotFound`` (after removing a kept copy, if it had one)."""
        with self._keep_lock:
            with self._lock:
                adapter = self._current.pop(task, None)
                self.metrics.loaded_tasks.set(len(self._current))
            self._expected.discard(task)
            forgot = self._forget(task)
        if adapter is None:
            extra = " (its last-known-good copy was removed: /ready no longer waits for it)" if forgot else ""
            raise AdapterNotFound(f"task {task!r} is not loaded{extra}")
        log.info("adapter %s version %s evicted", task, adapter.version)
        return adapter

    def missing(self) -> list[str]:
        """Tasks that were served before this start (they have a kept copy) and are not loaded now."""
        current = self.snapshot()
        return sorted(task for task in self._expected if task not in current)

    def _commit(self, adapter: AdapterVersion, meta_bytes: bytes, blob: bytes,
                keep: bool) -> tuple[AdapterVersion, bool]:
        """Install a fully validated ``adapter``, then (``keep``) its bytes as the task's last known good."""
        with self._keep_lock:
            current, changed = self._install(adapter)
            if keep:
                self._keep(current, meta_bytes, blob)
        return current, changed

    def _install(self, adapter: AdapterVersion) -> tuple[AdapterVersion, bool]:
        """Make ``adapter`` current; returns (current, changed). Same version, same bytes: no change.
        The installed copy's ``replaced`` is the version it replaced, read in the same step."""
        with self._lock:
            old = self._current.get(adapter.task)
            if old is not None and old.version == adapter.version:
                if old.digest == adapter.digest:
                    return old, False
                raise AdapterConflict(f"version: {adapter.version!r} of task {adapter.task!r} is already loaded with "
                                      "different contents; give the new adapter another version")
            adapter = dataclasses.replace(adapter, replaced=old.version if old is not None else None)
            self._current[adapter.task] = adapter
            self.metrics.loaded_tasks.set(len(self._current))
        log.info("adapter %s version %s loaded from %s%s", adapter.task, adapter.version, adapter.source,
                 f" (replaces {old.version})" if old else "")
        return adapter, True

    # ----- last known good: <store>/.talora/served/<task>/ -------------------------------------
    def _kept_dir(self, task: str) -> Path | None:
        return self.served_dir / task if TASK_NAME.fullmatch(task) else None

    def _keep(self, adapter: AdapterVersion, meta_bytes: bytes, blob: bytes) -> None:
        """Keep ``adapter``'s bytes as its task's last known good: the pair under a name of its digest,
        then the record naming it (each written atomically), then older pairs removed. A failure to
        write is logged (the adapter serves; a restart then has no copy of this version to fall back on)."""
        folder = self._kept_dir(adapter.task)
        if folder is None:
            return
        record = {"task": adapter.task, "version": adapter.version, "digest": adapter.digest,
                  "bundle_fingerprint": self.bundle.fingerprint, "source": adapter.source}
        stem = adapter.digest[:16]
        try:
            old = self._record(adapter.task)
            if old == record:
                return
            folder.mkdir(parents=True, exist_ok=True)
            pair = [folder / f"{stem}.safetensors", folder / f"{stem}.json"]
            if old is None or old.get("digest") != adapter.digest or not all(file.is_file() for file in pair):
                write_atomic(folder / f"{stem}.safetensors", blob)
                write_atomic(folder / f"{stem}.json", meta_bytes)
            write_atomic(folder / RECORD, json.dumps(record, indent=2).encode())
            for file in folder.iterdir():
                if _KEPT_FILE.fullmatch(file.name) and not file.name.startswith(stem):
                    file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("adapter %s version %s serves, but its last-known-good copy could not be written to %s "
                        "(%s): a restart could not fall back on it", adapter.task, adapter.version, folder, exc)
            self._forget(adapter.task)  # an older copy must not come back in its place after a restart

    def _record(self, task: str) -> dict[str, Any] | None:
        folder = self._kept_dir(task)
        if folder is None:
            return None
        try:
            return parse_json_object(read_bounded(folder / RECORD, 65536, RECORD), RECORD)
        except (OSError, AdapterFormatError):
            return None

    def _forget(self, task: str) -> bool:
        """Remove ``task``'s kept copy (the record first); True when there was one."""
        folder = self._kept_dir(task)
        if folder is None or not folder.is_dir():
            return False
        try:
            (folder / RECORD).unlink(missing_ok=True)
            for file in folder.iterdir():
                if _KEPT_FILE.fullmatch(file.name):
                    file.unlink(missing_ok=True)
            folder.rmdir()
        except OSError as exc:
            log.warning("the last-known-good copy of adapter %s could not be removed from %s: %s", task, folder, exc)
        return True

    def kept(self) -> dict[str, dict[str, Any]]:
        """The records of the kept copies made for this bundle: {task: record}."""
        records: dict[str, dict[str, Any]] = {}
        try:
            folders = sorted(self.served_dir.iterdir()) if self.served_dir.is_dir() else []
        except OSError as exc:
            log.warning("the last-known-good copies in %s cannot be listed: %s", self.served_dir, exc)
            return records
        for folder in folders:
            record = self._record(folder.name)
            if record is None or record.get("task") != folder.name:
                continue
            if record.get("bundle_fingerprint") != self.bundle.fingerprint:
                log.info("the last-known-good copy of adapter %s belongs to another bundle; not used", folder.name)
                continue
            records[folder.name] = record
        return records

    def _restore(self, task: str, record: dict[str, Any], refused: Exception | None) -> bool:
        """Load ``task``'s kept copy (at start-up), saying why; False (logged) when it does not load."""
        folder = self.served_dir / task
        why = f"its store files were refused ({refused})" if refused is not None else "the store has no files for it"

        def load() -> tuple[AdapterVersion, bool]:
            stem = str(record.get("digest", ""))[:16]
            meta_bytes, blob = (read_bounded(folder / f"{stem}{ext}", self.max_file_bytes, f"{task}{ext}")
                                for ext in (".json", ".safetensors"))
            if hashlib.sha256(meta_bytes + b"\0" + blob).hexdigest() != record.get("digest"):
                raise AdapterFormatError(f"digest: the kept files of {task!r} do not match their record")
            adapter = self.decode(task, meta_bytes, blob, f"last-known-good:{task}")
            return self._commit(adapter, meta_bytes, blob, keep=False)

        try:
            adapter, _ = self._timed("last-known-good", load)
        except (AdapterFormatError, AdapterNotFound, AdapterConflict, OSError) as exc:
            log.error("adapter %s, served before this start, is not served: %s, and its last-known-good copy in %s "
                      "(version %s) was refused (%s); /ready answers 503 until it is loaded or deleted", task, why,
                      folder, record.get("version"), exc)
            return False
        log.warning("adapter %s: %s; serving its last-known-good copy, version %s, from %s", task, why,
                    adapter.version, folder)
        return True

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
        watcher does not track them, it watches the store. From the store, a task whose files are
        refused, and a task served before that the store does not have, load their last-known-good
        copies; a task served before that loads from neither is ``missing``.
        """
        if bundle_dir is not None:
            root = Path(bundle_dir).resolve()
            loaded = []
            for task in tasks if tasks is not None else list_task_names(root):
                try:
                    self.load_store(task, source="bundle", root=root)
                except (AdapterFormatError, AdapterNotFound, AdapterConflict, OSError) as exc:
                    log.warning("adapter %s not loaded from the bundle: %s", task, exc)
                    continue
                loaded.append(task)
            return loaded
        kept = self.kept()
        names = list_task_names(self.store) if tasks is None else tasks
        loaded = []
        for task in names:
            try:
                signature = self._signature(task)
                self.load_store(task, source="store")
            except (AdapterFormatError, AdapterNotFound, AdapterConflict, OSError) as exc:
                if task in kept:
                    if self._restore(task, kept[task], exc):
                        loaded.append(task)
                else:
                    log.warning("adapter %s not loaded from the store: %s", task, exc)
                continue
            self._seen[task] = signature
            loaded.append(task)
        for task in sorted(set(kept) - set(names)) if tasks is None else []:
            if self._restore(task, kept[task], None):
                loaded.append(task)
        self._expected |= set(kept) if tasks is None else set(kept) & set(tasks)
        return loaded

    def poll_store(self) -> list[str]:
        """Load new and changed store adapters whose files were stable for one poll; returns them.

        The watcher loads only a JSON that names its tensors' sha256 (``tensors_sha256``), so that a pair
        caught half-copied, in whichever order its files arrive, is refused (the old version serves) and
        loaded once both files agree (the second file's arrival is a change)."""
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
                _, did_change = self.load_store(task, source="watch", require_digest=True)
            except (AdapterFormatError, AdapterNotFound, AdapterConflict, OSError) as exc:
                log.warning("watch: adapter %s not loaded, the previous version keeps serving: %s", task, exc)
                continue
            if did_change:
                changed.append(task)
        return changed
