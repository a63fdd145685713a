"""Every Prometheus metric of the server, defined once, on a registry owned by one ``Metrics``.

The engine and the HTTP layer receive the same ``Metrics`` object; nothing is registered on the
process-global registry, so several servers (or tests) in one process do not collide.
"""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TRAINING_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        counter, gauge = partial(Counter, registry=self.registry), partial(Gauge, registry=self.registry)
        latency = partial(Histogram, buckets=LATENCY_BUCKETS, registry=self.registry)
        sizes = partial(Histogram, buckets=SIZE_BUCKETS, registry=self.registry)
        self.requests = counter("talora_requests", "HTTP requests by task, endpoint and status code",
                                ["task", "endpoint", "status"])
        self.queue_seconds = latency("talora_queue_seconds", "time a request waited before its first batch")
        self.prefill_seconds = latency("talora_prefill_seconds", "duration of the batch step that prefilled a request")
        self.total_seconds = latency("talora_request_seconds", "end-to-end latency of a request by endpoint",
                                     ["endpoint"])
        self.batch_rows = sizes("talora_batch_rows", "rows (requests, label rows, decode rows) per batch step")
        self.batch_tasks = sizes("talora_batch_tasks", "distinct task adapters per batch step")
        self.tokens = counter("talora_tokens", "tokens run through the model by phase", ["phase"])
        self.tokens_per_second = gauge("talora_tokens_per_second", "tokens per second of the last batch step")
        self.queue_depth = gauge("talora_queue_depth", "requests waiting for a batch")
        self.queue_jobs = gauge("talora_queue_jobs", "jobs (texts and prompts) waiting for a batch")
        self.requests_cancelled = counter("talora_requests_cancelled", "requests whose jobs were cancelled before "
                                          "they finished, by reason (disconnect: the client went away; timeout: "
                                          "request_timeout_s passed)", ["reason"])
        self.active_sequences = gauge("talora_active_sequences", "generations in progress")
        self.resident_tasks = gauge("talora_resident_tasks", "task adapters with KV in a device slot")
        self.loaded_tasks = gauge("talora_loaded_tasks", "task adapters loaded (host copies)")
        self.slot_hits = counter("talora_slot_hits", "batch rows whose task KV was already resident")
        self.slot_misses = counter("talora_slot_misses", "task KV computed into a slot on demand")
        self.slot_evictions = counter("talora_slot_evictions", "task KV evicted from a slot")
        self.slot_compute_seconds = latency("talora_slot_compute_seconds", "time to compute one task's KV")
        self.adapter_loads = counter("talora_adapter_loads", "adapter loads by source and result", ["source", "result"])
        self.adapter_load_seconds = latency("talora_adapter_load_seconds", "time to read and validate an adapter")
        self.batch_failures = counter("talora_batch_failures", "batch steps that raised")
        self.job_failures = counter("talora_job_failures", "requests the engine failed, by reason (step: their "
                                    "batch step raised; sample: their own sampling raised; worker: the worker "
                                    "stopped; shutdown: not run before shutdown)", ["reason"])
        self.training_jobs = gauge("talora_training_jobs", "training jobs by status (queued, running: running or "
                                   "installing)", ["status"])
        self.training_jobs_finished = counter("talora_training_jobs_finished", "training jobs that ended, by status "
                                              "(succeeded, failed, cancelled)", ["status"])
        self.training_seconds = Histogram("talora_training_seconds", "wall time of each training job's worker "
                                          "process", buckets=TRAINING_BUCKETS, registry=self.registry)
        self.vllm_cached_tokens = counter("talora_vllm_cached_prompt_tokens", "prompt positions vLLM read from its "
                                          "prefix cache, by task (--backend vllm)", ["task"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
