"""What the HTTP layer and every backend share of an engine: the ``ServingEngine`` protocol, the adapter
half (``AdapterFacade``) and ``resolve_bundle``, ``load_adapters``, ``encode_request``. Behind it:
``talora.server.engine.Engine`` (in-process; also each Ray replica) or ``VllmEngine`` (``--backend vllm``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from talora.adapters.demo import demo_bundle_dir
from talora.adapters.formats.io import BundleMeta
from talora.adapters.runtime.prompting import encode_prompt
from talora.server.adapter_registry import AdapterRegistry, AdapterVersion
from talora.server.errors import BundleMissing, InputTooLong
from talora.server.jobs import Job
from talora.server.metrics import Metrics
from talora.server.settings import EngineFields

if TYPE_CHECKING:
    from talora.server.training.manager import TrainingManager

log = logging.getLogger(__name__)


def resolve_bundle(config: EngineFields) -> Path:
    """``--bundle``, or the demo bundle shipped in ``talora.adapters.demo`` (``BundleMissing`` when not built)."""
    if config.bundle is not None:
        return config.bundle
    folder = demo_bundle_dir()
    if not (folder / "talora.json").is_file():
        raise BundleMissing(f"the demo adapter bundle is not built yet ({folder} has no talora.json): produce it "
                            "with `talora-train demo`, or serve another bundle with `talora-serve --bundle PATH`")
    return folder


def encode_request(tokenizer, config: EngineFields, adapter: AdapterVersion, text: str,
                   question: str | None = None) -> tuple[list[int], bool]:
    """Prompt ids of ``text`` with the task's template, and whether it was cut; applies ``on_overflow``
    (one definition for every backend)."""
    limit = adapter.meta.max_input_tokens
    ids, truncated = encode_prompt(tokenizer, adapter.meta.template, text, limit, question)
    if config.on_overflow == "reject":
        # the text was tokenised once already: count it again only when it was cut
        for name, value in ((("text", text),) if truncated else ()) + (("question", question),):
            count = len(tokenizer(value, add_special_tokens=False)["input_ids"]) if value else 0
            if count > limit:
                raise InputTooLong(f"{name}: {count} tokens is over task {adapter.task!r}'s limit of {limit}")
    if not ids:
        raise InputTooLong("text: the prompt encodes to no tokens")
    return ids, truncated


def load_adapters(registry: AdapterRegistry, bundle: Path, where: str) -> list[str]:
    """Load the bundle's tasks, then the store's (a store task adds a task or replaces the bundle's of that
    name); returns the task names, sorted. ``where`` names the device or backend in the log line."""
    from_bundle = registry.load_all(bundle_dir=bundle) if registry.store != bundle.resolve() else []
    from_store = registry.load_all()
    tasks = sorted(registry.snapshot())
    replaced = sorted(set(from_bundle) & set(from_store))
    log.info("serving %d task adapters on %s: %d from the bundle %s, %d from the store %s (replacing %s): %s",
             len(tasks), where, len(from_bundle), bundle, len(from_store), registry.store,
             ", ".join(replaced) or "none", ", ".join(tasks) or "(none)")
    if not tasks:
        log.warning("no task adapter loaded: /ready answers 503 until one is (PUT /v1/adapters/{task}, or "
                    "files in the store with --watch-interval-s)")
    missing = registry.missing()
    if missing:
        log.error("%d task adapters served before this start are not served now: %s; /ready answers 503 until "
                  "each is loaded (PUT /v1/adapters/{task}, or good files in the store with --watch-interval-s) or "
                  "deleted (DELETE /v1/adapters/{task})", len(missing), ", ".join(missing))
    return tasks


class ServingEngine(Protocol):
    metrics: Metrics
    ready: bool  # loaded and taking requests
    resident: frozenset[tuple[str, int]]  # adapter keys whose prompt state is warm on the device
    training: TrainingManager | None  # the training jobs (POST /v1/training/jobs); None where they are off

    def start(self) -> None:
        """Load everything; blocks until ready."""

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work in flight (up to ``timeout`` s, then fail it with 503) and stop."""

    def alive(self) -> bool:
        """The engine can run requests."""

    @property
    def dead(self) -> bool:
        """Started, and stopped without being asked to."""

    @property
    def bundle(self) -> BundleMeta: ...

    def adapter(self, task: str) -> AdapterVersion:
        """The version new requests of ``task`` get now (``AdapterNotFound`` when not loaded)."""

    def adapters(self) -> dict[str, AdapterVersion]: ...

    def load_bytes(self, task: str, meta: bytes, tensors: bytes) -> tuple[AdapterVersion, bool]: ...

    def load_store(self, task: str, path: str) -> tuple[AdapterVersion, bool]: ...

    def evict(self, task: str) -> AdapterVersion: ...

    def encode(self, adapter: AdapterVersion, text: str, question: str | None = None) -> tuple[list[int], bool]:
        """Prompt ids of ``text`` with the task's template, and whether it was truncated."""

    def check_fits(self, job: Job) -> None:
        """Raise ``InputTooLong`` for a job the engine could never run."""

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` all together, or none (``QueueFull``, ``ShuttingDown``, ``WorkerDead``)."""


class HasRegistry(Protocol):
    registry: AdapterRegistry


L = TypeVar("L", bound=HasRegistry)


class AdapterFacade(Generic[L]):
    """The adapter half of ``ServingEngine``, for an engine whose ``start`` sets ``_loaded`` (an ``L``
    holding the ``registry``). ``_changed`` is called with every loaded version; an engine that keeps
    per-adapter state on the device overrides it (``Engine`` warms the new version's slot)."""

    _loaded: L | None = None
    training: TrainingManager | None = None  # the engine's training jobs, when it runs them (``Engine``)

    @property
    def loaded(self) -> L:
        """What ``start`` loaded (``RuntimeError`` before it)."""
        if self._loaded is None:
            raise RuntimeError("the engine is not started")
        return self._loaded

    def adapter(self, task: str) -> AdapterVersion:
        """The version new requests of ``task`` get now (``AdapterNotFound`` when not loaded)."""
        return self.loaded.registry.get(task)

    def adapters(self) -> dict[str, AdapterVersion]:
        """Every loaded task's current version (empty before ``start``)."""
        return self._loaded.registry.snapshot() if self._loaded is not None else {}

    @property
    def bundle(self) -> BundleMeta:
        return self.loaded.registry.bundle

    def load_bytes(self, task: str, meta: bytes, tensors: bytes) -> tuple[AdapterVersion, bool]:
        """Load or replace ``task`` from uploaded files. (version, changed)."""
        return self._changed(*self.loaded.registry.load_bytes(task, meta, tensors))

    def load_store(self, task: str, path: str) -> tuple[AdapterVersion, bool]:
        """Load or replace ``task`` from ``path`` in the store. (version, changed)."""
        return self._changed(*self.loaded.registry.load_store(task, path))

    def evict(self, task: str) -> AdapterVersion:
        """Unload ``task``: new requests get 404, requests in flight finish with their version."""
        return self.loaded.registry.evict(task)

    def _changed(self, adapter: AdapterVersion, changed: bool) -> tuple[AdapterVersion, bool]:
        return adapter, changed
