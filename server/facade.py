"""The façade the HTTP layer serves: what routes, ``bridge`` and the app's lifespan use of an engine.

Two engines stand behind it: ``talora.server.engine.Engine`` (the in-process TA-LoRA engine, the
default) and ``talora.server.vllm_engine.VllmEngine`` (``--backend vllm``: gate-off bundles on
vLLM). The routes, schemas and error handling are the same for both.
"""

from __future__ import annotations

from typing import Protocol

from talora.adapters.io import BundleMeta
from talora.server.jobs import Job
from talora.server.metrics import Metrics
from talora.server.registry import AdapterVersion
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
