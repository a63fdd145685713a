"""The Ray-free parts of the Ray Serve application, testable without Ray installed.

- ``RayOptions``: the deployment's own settings (replicas, concurrency, autoscaling, CPUs).
- ``task_of``: which task an HTTP request is for (its path, or the ``model`` of a completion),
  which the ingress turns into the multiplexed model id ``task@version``.
- ``asgi_exchange``: run one HTTP request through an ASGI app in-process and yield the response
  as ``{"status", "headers"}`` then body chunks: how a replica answers through its unchanged
  ``create_app`` without opening a port.
- ``merge_metrics``: the Prometheus text of every replica as one exposition, each sample
  labelled with its replica.
- ``rank_by_affinity``: the order in which the task-affine router tries the replicas for one
  request (``routing.TaskAffinityRouter`` applies it to Serve's replicas).
- ``retry_delay``: whether, and after how long, a client retries an answer (the contract of
  docs/scale_out.md, "Failures"), used by the tests and ``benchmarks/serving/scale_out.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field, model_validator

# Ray's single-node mode: the node address, the GCS, the raylet and the workers stay on 127.0.0.1
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TASK_PATH = re.compile(r"^/v1/tasks/([^/]+)(?:/(?:predict|generate))?/?$")
ADMIN_PATH = re.compile(r"^/v1/adapters/([^/]+)/?$")


class RayOptions(BaseModel):
    """How the replicas are deployed; flags of ``talora-serve --ray`` and args of ``serve run``."""

    model_config = {"extra": "forbid"}

    replicas: int = Field(2, ge=1, description="replicas of the engine (fixed; see autoscale_max_replicas)")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica takes at once: enough for its "
                                      "batcher to mix tasks (Ray's default of 5 would starve it)")
    autoscale_max_replicas: int = Field(0, ge=0, description="0: a fixed number of replicas; else autoscale "
                                        "between replicas and this")
    target_ongoing_requests: float = Field(16.0, gt=0, description="autoscaling target per replica")
    routing: Literal["task", "serve", "random"] = Field(
        "task", description="task: by task@version with overflow (a task sticks to the replicas holding its KV until "
        "they are affinity_slack requests busier than another); serve: Serve's own multiplexing rules (a task "
        "leaves its replicas only when they are full); random: Serve's default, no affinity (for comparison)")
    affinity_slack: int = Field(2, ge=0, description="routing=task: a request goes to a replica that does not hold "
                                "its task only when that replica has this many fewer requests in flight than the "
                                "least busy holder (0: least busy replica, ties to a holder)")
    ingress_replicas: int = Field(2, ge=1, description="replicas of the HTTP ingress: with 2 or more, killing one "
                                  "leaves the others answering")
    retries: int = Field(2, ge=0, description="times the ingress retries a request whose replica died before "
                         "it answered")
    access_log: bool = Field(True, description="Serve's log line per request in each replica and the ingress")
    address: str | None = Field(None, description="an existing Ray cluster (auto, or ray://host:port); "
                                "default: start a local one bound to 127.0.0.1")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (default: all)")
    app_name: str = Field("talora", description="the Serve application's name")

    @model_validator(mode="after")
    def _check(self) -> RayOptions:
        if self.autoscale_max_replicas and self.autoscale_max_replicas < self.replicas:
            raise ValueError("autoscale_max_replicas: must be at least replicas")
        return self

    def replica_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for the engine replicas."""
        actor = {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus}
        options: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests, "ray_actor_options": actor,
                                   "health_check_period_s": 2, "graceful_shutdown_timeout_s": 30,
                                   "logging_config": {"enable_access_log": self.access_log}}
        if self.autoscale_max_replicas:
            options["autoscaling_config"] = {"min_replicas": self.replicas, "max_replicas": self.autoscale_max_replicas,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.replicas
        return options

    def ingress_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for the ingress."""
        return {"num_replicas": self.ingress_replicas, "health_check_period_s": 2,
                "logging_config": {"enable_access_log": self.access_log}}


def task_of(method: str, path: str, body: bytes) -> str | None:
    """The task a request is served with (None: any replica may answer it, e.g. /health, admin)."""
    match = TASK_PATH.match(path)
    if match:
        return match.group(1)
    if method == "POST" and path.rstrip("/") == "/v1/completions":
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return None  # the replica answers the 422
        return model if isinstance(model, str) else None
    return None


Key = TypeVar("Key", bound=Hashable)


def rank_by_affinity(candidates: Sequence[tuple[Key, int | None, bool]], slack: int,
                     rng: random.Random | None = None) -> list[Key]:
    """Replica keys in the order to try them for one request of a task.

    ``candidates``: (key, requests in flight or None when unknown, holds the task's id). A replica's
    score is its requests in flight, less ``slack`` when it holds the task: a task stays on its
    replicas while they are at most ``slack`` requests busier than another (affinity), and spills
    over beyond that: a hot task spreads, and a new, empty replica takes work once the others have
    ``slack`` requests in flight. Unknown counts are taken as 0 (a new replica, or one idle long
    enough for Serve's cache to forget it). Ties go to a holder, then at random.
    """
    draw = (rng or random.Random()).random
    scored = [((load or 0) - (slack if holds else 0), not holds, draw(), key)
              for key, load, holds in candidates]
    return [key for *_, key in sorted(scored, key=lambda s: s[:3])]


def retry_delay(status: int | None, headers: Mapping[str, str] | None = None, body: bytes = b"") -> float | None:
    """Seconds a client waits before it sends a request again, or None: the answer is final.

    - No answer (the connection failed): retry after 1 s.
    - 503: the talora ingress (no replica could answer) or Serve (backpressure); ``Retry-After``.
    - 500 whose body is not JSON: Serve's proxy saying that the ingress replica holding the request
      died (every talora error body is JSON); retry after 1 s.
    """
    if status is None:
        return 1.0
    if status == 503:
        try:
            return max(0.0, float((headers or {}).get("retry-after", "1")))
        except ValueError:
            return 1.0
    if status == 500:
        try:
            json.loads(body)
        except ValueError:
            return 1.0
    return None


def admin_task(method: str, path: str) -> str | None:
    match = ADMIN_PATH.match(path)
    return match.group(1) if match and method in ("PUT", "DELETE") else None


def http_scope(method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {}}


async def asgi_exchange(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                        body: bytes) -> AsyncIterator[Any]:
    """Yield ``{"status": int, "headers": [(name, value), ...]}``, then the body chunks (bytes).

    Closing the generator early (the client went away) tells the app the client disconnected and
    cancels it, which cancels the request's jobs in the engine.
    """
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    gone, body_sent = asyncio.Event(), False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(http_scope(method, path, query, headers), receive, messages.put)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": [(k, v) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        await task  # an exception the app did not turn into a response surfaces here
    finally:
        gone.set()
        if not task.done():
            task.cancel()


def _labels(labels: dict[str, str]) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def merge_metrics(texts: dict[str, str]) -> str:
    """One Prometheus exposition of several replicas' texts; every sample gets ``replica="<id>"``."""
    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (type, help, sample lines)
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            kind, doc, lines = families.setdefault(family.name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {"replica": replica, **sample.labels}
                lines.append(f"{sample.name}{_labels(labels)} {float(sample.value)!r}")
    out = []
    for name, (kind, doc, lines) in families.items():
        name = f"{name}_total" if kind == "counter" else name  # as prometheus_client writes counters
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"
