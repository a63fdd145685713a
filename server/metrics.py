"""Every Prometheus metric of the server, defined once, on a registry owned by one ``Metrics``.

The engine and the HTTP layer receive the same ``Metrics`` object; nothing is registered on the
process-global registry, so several servers (or tests) in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TRAINING_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("talora_requests", "HTTP requests by task, endpoint and status code",
                                ["task", "endpoint", "status"], registry=r)
        self.queue_seconds = Histogram("talora_queue_seconds", "time a request waited before its first batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("talora_prefill_seconds", "duration of the batch step that prefilled "
                                         "a request", buckets=LATENCY_BUCKETS, registry=r)
        self.total_seconds = Histogram("talora_request_seconds", "end-to-end latency of a request by endpoint",
                                       ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("talora_batch_rows", "rows (requests, label rows, decode rows) per batch step",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tasks = Histogram("talora_batch_tasks", "distinct task adapters per batch step",
                                     buckets=SIZE_BUCKETS, registry=r)
        self.tokens = Counter("talora_tokens", "tokens run through the model by phase", ["phase"], registry=r)
        self.tokens_per_second = Gauge("talora_tokens_per_second", "tokens per second of the last batch step",
                                       registry=r)
        self.queue_depth = Gauge("talora_queue_depth", "requests waiting for a batch", registry=r)
        self.queue_jobs = Gauge("talora_queue_jobs", "jobs (texts and prompts) waiting for a batch", registry=r)
        self.requests_cancelled = Counter("talora_requests_cancelled", "requests whose jobs were cancelled before "
                                          "they finished, by reason (disconnect: the client went away; timeout: "
                                          "request_timeout_s passed)", ["reason"], registry=r)
        self.active_sequences = Gauge("talora_active_sequences", "generations in progress", registry=r)
        self.resident_tasks = Gauge("talora_resident_tasks", "task adapters with KV in a device slot", registry=r)
        self.loaded_tasks = Gauge("talora_loaded_tasks", "task adapters loaded (host copies)", registry=r)
        self.slot_hits = Counter("talora_slot_hits", "batch rows whose task KV was already resident", registry=r)
        self.slot_misses = Counter("talora_slot_misses", "task KV computed into a slot on demand", registry=r)
        self.slot_evictions = Counter("talora_slot_evictions", "task KV evicted from a slot", registry=r)
        self.slot_compute_seconds = Histogram("talora_slot_compute_seconds", "time to compute one task's KV",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_loads = Counter("talora_adapter_loads", "adapter loads by source and result",
                                     ["source", "result"], registry=r)
        self.adapter_load_seconds = Histogram("talora_adapter_load_seconds", "time to read and validate an adapter",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.batch_failures = Counter("talora_batch_failures", "batch steps that raised", registry=r)
        self.job_failures = Counter("talora_job_failures", "requests the engine failed, by reason (step: their "
                                    "batch step raised; sample: their own sampling raised; worker: the worker "
                                    "stopped; shutdown: not run before shutdown)", ["reason"], registry=r)
        self.training_jobs = Gauge("talora_training_jobs", "training jobs by status (queued, running: running or "
                                   "installing)", ["status"], registry=r)
        self.training_jobs_finished = Counter("talora_training_jobs_finished", "training jobs that ended, by status "
                                              "(succeeded, failed, cancelled)", ["status"], registry=r)
        self.training_seconds = Histogram("talora_training_seconds", "wall time of each training job's worker "
                                          "process", buckets=TRAINING_BUCKETS, registry=r)
        self.vllm_cached_tokens = Counter("talora_vllm_cached_prompt_tokens", "prompt positions vLLM read from its "
                                          "prefix cache, by task (--backend vllm)", ["task"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
