"""The serving engine: one frozen model, one worker thread, batches of any tasks.

``Engine.start()`` loads the frozen model and the bundle, computes the shared-prompt KV once,
loads the store's adapters, and starts the worker thread (and the store watcher when
configured). The HTTP layer looks adapters up (``adapter``, ``adapters``, ``load_*``, ``evict``),
turns requests into ``Job``s (``encode``) and ``submit``s them. The worker loops: the
``Scheduler`` hands it the adapters to warm and the jobs admitted to the next step, the
``Runner`` runs the step and emits the events. Everything touching the device happens on the
worker thread; the event loop only enqueues and waits for events.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from talora.adapters.formats.bundle import model_from_bundle
from talora.adapters.model.loading import LoadedModel, load_model
from talora.server.adapter_registry import AdapterRegistry, AdapterVersion
from talora.server.engine.kvpool import KVPool
from talora.server.engine.runner import GiveUp, Runner
from talora.server.engine.scheduler import Scheduler
from talora.server.engine.slots import SlotTable
from talora.server.errors import InputTooLong
from talora.server.facade import AdapterFacade, encode_request, load_adapters, resolve_bundle
from talora.server.jobs import Failed, Job
from talora.server.metrics import Metrics
from talora.server.settings import EngineConfig
from talora.server.training.manager import start_training
from talora.server.watcher import StoreWatcher

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What ``Engine.start`` builds: the tokenizer, the adapters, and the runner on the device."""

    tokenizer: Any
    registry: AdapterRegistry
    runner: Runner


class Engine(AdapterFacade[Loaded]):
    """Owns the model, the adapters, the scheduler, the runner and the worker thread."""

    def __init__(self, config: EngineConfig, metrics: Metrics | None = None, loaded: LoadedModel | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        """``config``: ``Settings.engine_config()``. ``on_fatal`` is called (on the worker thread) when the
        worker cannot go on; ``talora-serve`` passes one that ends the process with a non-zero status so
        that a supervisor restarts it."""
        self.config = config
        self.on_fatal = on_fatal
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler(config, self.metrics)
        self._model = loaded
        self._loaded: Loaded | None = None
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self.resident: frozenset[tuple[str, int]] = frozenset()  # adapter keys with task KV in a slot
        self.ready = False

    # ----- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load everything and start the worker; blocks until ready (seconds)."""
        s = self.config
        bundle = resolve_bundle(s)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        lm = self._model or load_model(s.model, s.dtype, device)
        model, bundle_meta, _ = model_from_bundle(lm.model, bundle, lm.fingerprint, tasks=[])
        model.eval()
        mc = lm.model.config
        eos = mc.eos_token_id if isinstance(mc.eos_token_id, list) else [mc.eos_token_id]
        eos_ids = {t for t in [*eos, getattr(lm.tokenizer, "eos_token_id", None)] if t is not None}
        with torch.no_grad():
            prefix = model.shared_kv()
        slots = SlotTable(model, prefix, s.num_slots, self.metrics)
        pool = KVPool(mc.num_layers, s.kv_cache_tokens, mc.num_kv_heads, mc.head_dim, lm.model.dtype, lm.model.device)
        runner = Runner(model, prefix, slots, pool, lm.tokenizer, eos_ids, s, self.metrics)
        registry = AdapterRegistry(bundle_meta, s.store or bundle, lm.tokenizer, self.metrics, s.max_upload_bytes)
        self._loaded = Loaded(lm.tokenizer, registry, runner)
        for task in self._load_adapters(bundle, device)[: s.num_slots]:
            self.warm(registry.get(task))
        self._spawn(self._run, "talora-engine")
        if s.watch_interval_s > 0:
            self._spawn(self._watch, "talora-store-watcher")
        self.training = start_training(s, registry.store, bundle, lm.name, device, self.metrics, self)
        self.ready = True

    def _load_adapters(self, bundle: Path, device: str) -> list[str]:
        return load_adapters(self.loaded.registry, bundle, device)

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued and running work (up to ``timeout`` s, then fail it with 503) and stop."""
        self.ready = False
        if self.training is not None:
            self.training.stop()
        self.scheduler.stop()
        self._halt.set()
        if self._threads:
            self._threads[0].join(timeout)
        self.scheduler.stop(abort=True)
        for thread in self._threads:
            thread.join()

    def alive(self) -> bool:
        return bool(self._threads) and self._threads[0].is_alive()

    @property
    def dead(self) -> bool:
        """The worker was started and has stopped without being asked to."""
        return bool(self._threads) and not self.scheduler.stopping and not self._threads[0].is_alive()

    # ----- the adapters: ``AdapterFacade`` over the registry ----------------------------------
    def _changed(self, adapter: AdapterVersion, changed: bool) -> tuple[AdapterVersion, bool]:
        if changed:
            self.warm(adapter)  # the new version's task KV is computed before requests need it
        return adapter, changed

    # ----- requests --------------------------------------------------------------------------
    def encode(self, adapter: AdapterVersion, text: str, question: str | None = None) -> tuple[list[int], bool]:
        """Prompt ids of ``text`` with the task's template; applies ``on_overflow``."""
        return encode_request(self.loaded.tokenizer, self.config, adapter, text, question)

    def check_fits(self, job: Job) -> None:
        """Refuse a job that could never fit the KV cache pool."""
        capacity = self.config.kv_cache_tokens
        if job.cache_tokens() > capacity:
            raise InputTooLong(f"the request needs {job.cache_tokens()} KV cache positions; the server has "
                               f"{capacity} (kv_cache_tokens)")

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` all together, or none (``QueueFull``, ``ShuttingDown``, ``WorkerDead``)."""
        self.scheduler.submit(jobs, worker_alive=not self._threads or self.alive())

    def warm(self, adapter: AdapterVersion) -> None:
        """Compute ``adapter``'s task KV into a slot soon (after a load), if a slot is free to take."""
        self.scheduler.warm(adapter)

    # ----- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as exc:  # noqa: BLE001 - the worker cannot go on: fail everything, then say so
            log.critical("the engine's worker stops: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._fail_all(Failed(503, "the engine's worker stopped; the server is restarting"), reason="worker")
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self._fail_all(Failed(503, "the server shut down before this request ran"), reason="shutdown")

    def _iterate(self) -> bool:
        """One pass of the worker: wait for work, warm slots, run one step. False: stop."""
        runner = self.loaded.runner
        work = self.scheduler.next_work(runner.active, runner.pool, runner.slots, busy=runner.pending is not None)
        if work is None:
            return False
        warm, admitted = work
        try:
            self._warm_slots(warm)
            if admitted or runner.active:
                runner.step(admitted)
            elif runner.pending is not None:
                runner.flush()
            else:
                self.scheduler.pause_if_waiting()
        except GiveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - fail this step's requests; the worker carries on
            log.exception("worker step failed")
            runner.recover(admitted, exc)
        finally:
            runner.slots.drop_stale(self.loaded.registry.current_keys())
            self._publish_resident()
        return True

    def _warm_slots(self, adapters: list[AdapterVersion]) -> None:
        current, slots = self.loaded.registry.current_keys(), self.loaded.runner.slots
        for adapter in adapters:
            if adapter.key in current and slots.slot_of(adapter.key) is None and slots.can_place({adapter.key}):
                try:
                    slots.acquire(adapter)
                    slots.release(adapter)
                except Exception:  # noqa: BLE001 - a request for this task will retry and report it
                    log.exception("computing the task KV of %s failed", adapter.task)

    def _fail_all(self, failure: Failed, reason: str) -> None:
        runner = self.loaded.runner
        for job in self.scheduler.drain():
            runner.fail_job(job, failure, reason)
        runner.fail_active(failure, reason)

    def _publish_resident(self) -> None:
        runner = self.loaded.runner
        self.resident = frozenset(runner.slots.resident())
        self.metrics.active_sequences.set(len(runner.active))

    def _watch(self) -> None:
        StoreWatcher(self.loaded.registry, self.config.watch_interval_s, self.warm).run(self._halt)
