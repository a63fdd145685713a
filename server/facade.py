"""The façade the HTTP layer serves: what routes, ``bridge`` and the app's lifespan use of an engine.

Two engines stand behind it: ``talora.server.engine.Engine`` (the in-process TA-LoRA engine, the
default) and ``talora.server.vllm_engine.VllmEngine`` (``--backend vllm``: gate-off bundles on
vLLM). The routes, schemas and error handling are the same for both.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from talora.adapters.io import BundleMeta
from talora.server.jobs import Job
from talora.server.metrics import Metrics
from talora.server.registry import AdapterRegistry, AdapterVersion
from talora.server.settings import Settings


class ServingEngine(Protocol):
    settings: Settings
    metrics: Metrics
    ready: bool  # loaded and taking requests
    resident: frozenset[tuple[str, int]]  # adapter keys whose prompt state is warm on the device

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
