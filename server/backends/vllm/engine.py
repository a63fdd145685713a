"""``talora-serve --backend vllm``: gate-off bundles served by vLLM behind talora's HTTP API.

``VllmEngine`` stands behind the same façade as the in-process ``Engine``
(``talora.server.facade.ServingEngine``), so the routes, schemas, admin hot swap, health and
metrics are talora's own. It keeps the adapters in the same ``AdapterRegistry``; what it does not
keep is a model: the frozen LM runs in a vLLM server (``process``), and this process holds
only the tokenizer, the token embedding matrix and the bundle's shared tensors.

Each job becomes vLLM completions requests (``inputs``): its ``[P; ΔP_t]`` rows, computed from the
version the job pinned, plus its token embeddings go in as ``prompt_embeds`` with the version's
``cache_salt`` (tasks never share prefix-cache blocks, a hot swap never reads the old version's;
``vllm_cache_salt`` = bundle shares the shared prompt's). Requests run on an asyncio loop in a thread
of their own (the worker), the way the in-process engine keeps device work off the HTTP event loop;
events reach the waiting request through ``Job.emit`` as they do from the in-process worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from talora.adapters.formats.io import load_bundle
from talora.adapters.model.loading import DTYPES, EmbeddingTable, load_embedding_table
from talora.server.adapter_registry import AdapterRegistry, AdapterVersion
from talora.server.backends.vllm.inputs import (
    assemble_embeds,
    cache_salt,
    check_embeds,
    check_gate_off,
    encode_embeds,
    generate_body,
    score_body,
    score_contexts,
    target_logprobs,
    task_rows,
)
from talora.server.backends.vllm.process import VllmProcess, VllmUnavailable
from talora.server.errors import InputTooLong, QueueFull, ShuttingDown, WorkerDead
from talora.server.facade import AdapterFacade, encode_request, load_adapters, resolve_bundle
from talora.server.jobs import Failed, Finished, Job, Scored, Token
from talora.server.metrics import Metrics
from talora.server.settings import Settings
from talora.server.watcher import StoreWatcher

log = logging.getLogger(__name__)
MONITOR_INTERVAL_S = 1.0


class VllmFailed(RuntimeError):
    """vLLM answered a request with an error, or could not be reached."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class VllmLoaded:
    """What ``VllmEngine.start`` builds."""

    tokenizer: Any
    registry: AdapterRegistry
    shared: dict[str, torch.Tensor]  # the bundle's prompt (m, d) and basis (r, d)
    table: EmbeddingTable


class VllmEngine(AdapterFacade[VllmLoaded]):
    """The engine façade over a vLLM server, for gate-off bundles."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, table: EmbeddingTable | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        """``table``: the model's embeddings, when already loaded; ``on_fatal`` is called when the vLLM
        server dies (``talora-serve`` ends the process so that a supervisor restarts it)."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.on_fatal = on_fatal
        self.dtype = DTYPES[settings.dtype]
        self.resident: frozenset[tuple[str, int]] = frozenset()
        self.ready = False
        self._table = table
        self._loaded: VllmLoaded | None = None
        self._process: VllmProcess | None = None
        self.url, self.model = "", ""
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._client: Any = None  # httpx.AsyncClient, made on the worker loop
        self._lock = threading.Lock()
        self._in_flight: set[concurrent.futures.Future] = set()
        self._stopping = False
        self._halt = threading.Event()
        self._monitor: threading.Thread | None = None

    # ----- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Check the bundle (gate off), load the adapters, start (or attach to) vLLM; blocks until ready."""
        from transformers import AutoTokenizer

        s = self.settings
        bundle_dir = resolve_bundle(s)
        table = self._table or load_embedding_table(s.model, s.dtype)
        meta, shared = load_bundle(bundle_dir, table.fingerprint)
        check_gate_off(meta)
        if meta.arch != table.config:
            raise ValueError("model_config: the bundle's architecture does not match the model")
        tokenizer = AutoTokenizer.from_pretrained(table.folder)
        registry = AdapterRegistry(meta, s.store or bundle_dir, tokenizer, self.metrics, s.max_upload_bytes)
        self._loaded = VllmLoaded(tokenizer, registry, shared, table)
        load_adapters(registry, bundle_dir, "vLLM")
        self._process = VllmProcess(s, table.folder)
        self.url, self.model = self._process.start()
        self._thread = threading.Thread(target=self._loop.run_forever, name="talora-vllm", daemon=True)
        self._thread.start()
        self._call(self._open_client())
        self._monitor = threading.Thread(target=self._watch, name="talora-vllm-monitor", daemon=True)
        self._monitor.start()
        self.ready = True
        log.info("serving through vLLM at %s (model %s)", self.url, self.model)

    def _call(self, coro, timeout: float | None = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _open_client(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.settings.max_queue, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(base_url=self.url, timeout=None, limits=limits)

    def stop(self, timeout: float | None = None) -> None:
        """Let the requests in flight finish (up to ``timeout`` s, then fail them with 503), stop vLLM."""
        self.ready = False
        with self._lock:
            self._stopping = True
        self._halt.set()
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._thread is not None and self._thread.is_alive():
            with self._lock:
                left = list(self._in_flight)
            for future in left:
                future.cancel()
            if self._client is not None:
                self._call(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._process is not None:
            self._process.stop()

    def alive(self) -> bool:
        thread_ok = self._thread is not None and self._thread.is_alive()
        return thread_ok and (self._process is None or self._process.exit_status() is None)

    @property
    def dead(self) -> bool:
        return self._thread is not None and not self._stopping and not self.alive()

    def _watch(self) -> None:
        """Watch the vLLM child (fatal when it dies) and, when configured, the adapter store."""
        store = StoreWatcher(self.loaded.registry, self.settings.watch_interval_s)
        while not self._halt.wait(MONITOR_INTERVAL_S):
            status = self._process.exit_status() if self._process is not None else None
            if status is not None and not self._stopping:
                exc = VllmUnavailable(f"the vLLM server exited with status {status}")
                log.critical("%s", exc)
                if self.on_fatal is not None:
                    self.on_fatal(exc)
                return
            store.tick()

    # ----- requests --------------------------------------------------------------------------
    def encode(self, adapter: AdapterVersion, text: str, question: str | None = None) -> tuple[list[int], bool]:
        return encode_request(self.loaded.tokenizer, self.settings, adapter, text, question)

    def prompt_len(self) -> int:
        cfg = self.bundle.config
        return cfg.shared_prompt_len + cfg.task_prompt_len

    def check_fits(self, job: Job) -> None:
        """Refuse a job longer than vLLM's ``max_model_len`` with the task prompt in front."""
        extra = job.generation.max_new_tokens if job.kind == "generate" else max(map(len, job.label_ids), default=1)
        needed = self.prompt_len() + len(job.prompt_ids) + extra
        if needed > self.settings.vllm_max_model_len:
            raise InputTooLong(f"the request needs {needed} positions with the task prompt; vLLM runs at most "
                               f"{self.settings.vllm_max_model_len} (vllm_max_model_len)")

    def submit(self, jobs: list[Job]) -> None:
        """Send ``jobs`` to vLLM, all or none (``QueueFull``, ``ShuttingDown``, ``WorkerDead``)."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if not self.alive():
                raise WorkerDead("the vLLM server has stopped; the server must be restarted")
            if len(self._in_flight) + len(jobs) > self.settings.max_queue:
                raise QueueFull(f"{self.settings.max_queue} requests are in flight (max_queue)")
            for job in jobs:
                future = asyncio.run_coroutine_threadsafe(self._run(job), self._loop)
                self._in_flight.add(future)
                future.add_done_callback(self._finished)
            self.metrics.queue_depth.set(len(self._in_flight))

    def _finished(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._in_flight.discard(future)
            self.metrics.queue_depth.set(len(self._in_flight))

    def embeds_of(self, adapter: AdapterVersion, token_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
        """``[P; ΔP_t; embed(X)]`` of one request, checked before it is handed to vLLM."""
        loaded = self.loaded
        rows = task_rows(self.bundle, loaded.shared, adapter, self.dtype)
        embeds = assemble_embeds(rows, loaded.table.embed, list(token_ids))
        check_embeds(embeds, loaded.table.config.hidden_size, self.dtype, self.settings.vllm_max_model_len)
        return embeds

    def salt(self, adapter: AdapterVersion) -> str:
        return cache_salt(adapter, self.bundle if self.settings.vllm_cache_salt == "bundle" else None)

    async def _run(self, job: Job) -> None:
        if job.cancelled:
            return
        try:
            work = self._score(job) if job.kind == "score" else self._generate(job)
            await asyncio.wait_for(work, max(job.deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            job.emit(Failed(504, f"the request did not finish within {self.settings.request_timeout_s} s"))
        except VllmFailed as exc:
            self.metrics.job_failures.labels("step").inc()
            job.emit(Failed(exc.status, str(exc)))
        except Exception as exc:  # noqa: BLE001 - this request fails; the engine carries on
            log.exception("a vLLM request failed")
            self.metrics.job_failures.labels("step").inc()
            job.emit(Failed(500, f"the request failed: {type(exc).__name__}: {exc}"))

    async def _post(self, body: dict) -> dict:
        try:
            response = await self._client.post("/v1/completions", json=body)
        except Exception as exc:  # noqa: BLE001 - any transport failure is vLLM being unreachable
            raise VllmFailed(503, f"vLLM could not be reached: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise VllmFailed(500, f"vLLM refused the request ({response.status_code}): {response.text[:500]}")
        return response.json()

    def _count_usage(self, task: str, usage: dict | None) -> None:
        usage = usage or {}
        self.metrics.tokens.labels("prefill").inc(usage.get("prompt_tokens", 0))
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        self.metrics.vllm_cached_tokens.labels(task).inc(cached)

    async def _score(self, job: Job) -> None:
        """Each label's ``sum_j log p(y_k[j] | x, y_k[:j])``: one vLLM request per distinct context."""
        adapter, salt = job.adapter, self.salt(job.adapter)
        contexts = score_contexts(job.prompt_ids, job.label_ids)
        bodies = [score_body(self.model, encode_embeds(self.embeds_of(adapter, c.token_ids)), salt, c.targets)
                  for c in contexts]
        replies = await asyncio.gather(*(self._post(body) for body in bodies))
        scores = [0.0] * len(job.label_ids)
        for context, reply in zip(contexts, replies):
            self._count_usage(adapter.task, reply.get("usage"))
            found = target_logprobs(reply["choices"][0], context.targets)
            for target, label in context.terms:
                scores[label] += found[target]
        job.emit(Scored(scores))

    async def _generate(self, job: Job) -> None:
        """Stream vLLM's completion as ``Token`` events, then ``Finished``."""
        body = generate_body(self.model, encode_embeds(self.embeds_of(job.adapter, job.prompt_ids)),
                             self.salt(job.adapter), job.generation)
        text, finish_reason, usage = [], None, None
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    raise VllmFailed(500, f"vLLM refused the request ({response.status_code}): {detail}")
                async for line in response.aiter_lines():
                    if job.cancelled:
                        return  # leaving the stream closes it; vLLM aborts the request
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            text.append(choice["text"])
                            job.emit(Token(choice["text"]))
                        finish_reason = choice.get("finish_reason") or finish_reason
        except VllmFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream is vLLM being unreachable
            raise VllmFailed(503, f"the vLLM stream broke: {type(exc).__name__}: {exc}") from exc
        self._count_usage(job.adapter.task, usage)
        completion_tokens = (usage or {}).get("completion_tokens", 0)
        self.metrics.tokens.labels("decode").inc(completion_tokens)
        job.emit(Finished("".join(text), "length" if finish_reason == "length" else "stop", len(job.prompt_ids),
                          completion_tokens))
