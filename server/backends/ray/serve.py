"""talora on Ray Serve: engine replicas behind an ingress with the same HTTP API, routed by task.

    talora-serve --ray --replicas 2 --store /shared/adapters          # a local cluster on 127.0.0.1
    serve run talora.server.backends.ray.serve:app_builder replicas=2 store=/shared/adapters

``TaloraReplica`` runs one in-process ``Engine`` and its unchanged ``create_app``; requests reach
that app in-process (``asgi_exchange``), so every route, schema and error is the one-machine
server's. ``TaloraIngress`` takes each HTTP request, finds its task (path, or a completion's
``model``) and the version the shared store names (``SharedStore``), and sends it to a replica
with the multiplexed model id ``task@version``: Ray Serve prefers replicas that hold that id, so
a task sticks to the replicas whose slot table holds its task KV, and a new version is a new id.
Each replica holds at most ``num_slots`` ids (its slot table). No ``@serve.batch``: the engine's
batcher mixes tasks itself, and ``max_ongoing_requests`` is raised so that it sees enough work.

An admin PUT is validated and loaded by one replica, then written to the shared store; every other
replica loads it from there when the first request of the new id reaches it. Requests already
admitted finish on their version, as on one machine. A replica that dies before answering is
retried on another (``RayOptions.retries``); Serve restarts it (``check_health``).

Routing (``RayOptions.routing``): ``task`` uses ``routing.TaskAffinityRouter`` (affinity with
overflow, so a hot task spreads and a new replica fills); ``serve`` keeps Serve's own multiplexing
rules; ``random`` sends no model id. The ingress runs ``RayOptions.ingress_replicas`` replicas (2 by
default), so Serve's proxy keeps answering through the others when one dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, cast

import ray
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from talora.adapters.formats.io import list_task_names
from talora.server.adapter_registry import AdapterNotFound, AdapterVersion
from talora.server.backends.ray.store import SharedStore
from talora.server.backends.ray.support import (
    LOOPBACK_ENV,
    RayOptions,
    admin_task,
    asgi_exchange,
    merge_metrics,
    task_of,
)
from talora.server.engine import Engine
from talora.server.facade import resolve_bundle
from talora.server.http.app import create_app
from talora.server.http.limits import read_bounded_body
from talora.server.settings import Settings

log = logging.getLogger(__name__)
REPLICA_HEADER = b"x-talora-replica"
METRICS_PUSH_S = 2.0
METRICS_STALE_S = 5 * METRICS_PUSH_S
LISTINGS = ("/v1/tasks", "/v1/models", "/ready")  # answered from the registry: synced with the store first
ROUTER = "talora.server.backends.ray.routing:TaskAffinityRouter"
# no replica could take the request (it died before answering, or none is up): retried, then 503
UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)


def keep_replica_grpc_on_loopback() -> None:
    """In a loopback-only local cluster (``ray_cli.start_cluster``), bind each replica's gRPC server to 127.0.0.1.

    Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on ``[::]:0``, every
    interface, whatever the node address (it carries traffic only with
    ``RAY_SERVE_USE_GRPC_BY_DEFAULT=1``). Runs when this module is imported, in each replica.
    """
    global _grpc_patched
    if _grpc_patched or os.environ.get(LOOPBACK_ENV) != "0":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        return

    def loopback(server, address: str):
        return original(server, address.replace("[::]", "127.0.0.1", 1))

    replica.add_port_to_grpc_server = loopback
    _grpc_patched = True


_grpc_patched = False
keep_replica_grpc_on_loopback()


class _MetricsHub:
    """The latest Prometheus text of every live replica, pushed by the replicas, read by the ingress.

    A replica that stopped pushing (killed, or its node lost) drops out after ``METRICS_STALE_S``.
    """

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def all(self) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {r: (t, text) for r, (t, text) in self.texts.items() if now - t < METRICS_STALE_S}
        return {r: text for r, (_, text) in self.texts.items()}


MetricsHub: Any = ray.remote(num_cpus=0)(_MetricsHub)


def metrics_hub(app_name: str):
    return MetricsHub.options(name=f"talora-metrics-{app_name}", namespace="talora", get_if_exists=True,
                              lifetime="detached").remote()


def shared_store(settings: Settings) -> SharedStore:
    bundle = resolve_bundle(settings)
    return SharedStore(settings.store or bundle, bundle)


class TaloraReplica:
    """One engine (model, slot table, batcher) serving the whole HTTP API in-process.

    ``replica_deployment(num_slots)`` makes the deployment: its ``hold`` is the
    ``@serve.multiplexed`` loader, with one id per slot so that Serve's view of what a replica
    holds matches its slot table.
    """

    def __init__(self, settings: Settings, app_name: str = "talora"):
        self.settings, self.store = settings, shared_store(settings)
        self.engine = Engine(settings.engine_config())
        self.engine.start()
        self.app = create_app(settings, self.engine)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.hub = metrics_hub(app_name)
        self._admin_busy: set[str] = set()  # tasks an admin request is changing here: the store lags behind
        self._stop = threading.Event()
        threading.Thread(target=self._push_metrics, name="talora-metrics-push", daemon=True).start()

    async def hold(self, model_id: str) -> AdapterVersion | None:
        raise NotImplementedError("replica_deployment() defines the multiplexed loader")

    async def _load(self, model_id: str) -> AdapterVersion | None:
        task, _, version = model_id.partition("@")
        return await asyncio.to_thread(self.sync, task, version)

    def sync(self, task: str, version: str) -> AdapterVersion | None:
        """Make the registry serve the store's ``version`` of ``task`` ("" : none).

        No slot is warmed here: the request that asked computes the task KV itself when it is admitted
        (warming first would compute it on the worker just the same, and count a miss and a hit for it).
        """
        registry = self.engine.loaded.registry
        current = registry.snapshot().get(task)
        if task in self._admin_busy:  # a PUT or DELETE here is ahead of the store: do not undo it
            return current
        if not version:
            if current is not None:
                registry.evict(task)
            return None
        if current is None or current.version != version:
            try:
                current = self._load_from_store(task)
            except Exception as exc:  # noqa: BLE001 - the request gets the route's own 404 / old version
                log.warning("adapter %s@%s could not be loaded from the shared store: %s", task, version, exc)
                return current
        return current

    def sync_all(self) -> None:
        """Bring every task to the store's version (before a listing answers)."""
        tasks = set(self.engine.loaded.registry.snapshot()) | set(list_task_names(self.store.store))
        for task in sorted(tasks):
            version = self.store.version_of(task) or ""
            current = self.engine.loaded.registry.snapshot().get(task)
            if (current.version if current else "") != version:
                self.sync(task, version)

    def _load_from_store(self, task: str) -> AdapterVersion:
        registry = self.engine.loaded.registry
        try:
            return registry.load_store(task)[0]
        except AdapterNotFound:
            if self.store.bundle == self.store.store:
                raise
            return registry.load_store(task, source="bundle", root=self.store.bundle)[0]

    async def call(self, request: dict[str, Any]):
        """Answer one HTTP request (``Ingress`` fields); yields the head, then body chunks."""
        task, version = request["task"], request["version"]
        if serve.get_multiplexed_model_id():
            await self.hold(serve.get_multiplexed_model_id())
        if task is not None:
            current = self.engine.loaded.registry.snapshot().get(task)
            if (current.version if current else "") != version:  # an id held from before an evict or a revert
                await asyncio.to_thread(self.sync, task, version)
        elif request["path"].rstrip("/") in LISTINGS:
            await asyncio.to_thread(self.sync_all)
        admin = admin_task(request["method"], request["path"])
        exchange = asgi_exchange(self.app, request["method"], request["path"], request["query"],
                                 request["headers"], request["body"])
        if admin is None:
            async for item in exchange:
                yield self._tag(item)
            return
        self._admin_busy.add(admin)
        try:
            items = [item async for item in exchange]  # the store is written before the client hears 200
            await asyncio.to_thread(self._after_admin, request["method"], admin, items[0]["status"])
        finally:
            self._admin_busy.discard(admin)
        for item in items:
            yield self._tag(item)

    def _tag(self, item):
        if isinstance(item, dict):
            item["headers"].append((REPLICA_HEADER, self.replica_id.encode()))
        return item

    def _after_admin(self, method: str, task: str, status: int) -> None:
        if status != 200:
            return
        if method == "PUT":
            self.store.persist(self.engine.loaded.registry.get(task))
        else:
            self.store.evict(task)

    def check_health(self) -> None:
        if self.engine.dead:
            raise RuntimeError("the engine's worker has stopped")

    def _push_metrics(self) -> None:
        while not self._stop.wait(METRICS_PUSH_S):
            try:
                self.hub.put.remote(self.replica_id, self.engine.metrics.render().decode())
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                log.debug("pushing metrics failed", exc_info=True)

    def __del__(self) -> None:
        self._stop.set()
        try:
            self.hub.drop.remote(self.replica_id)
        except Exception:  # noqa: BLE001 - the cluster may be going away
            pass
        self.engine.stop(self.settings.drain_timeout_s)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class TaloraIngress:
    """The HTTP entry: picks ``task@version`` and forwards to the replicas, retrying a dead one.

    Runs as ``RayOptions.ingress_replicas`` replicas; each is stateless (the version comes from the
    shared store), so Serve's proxy sends new requests to the others while one is replaced.
    """

    def __init__(self, replicas: DeploymentHandle, settings: Settings, options: RayOptions):
        self.replicas, self.options, self.store = replicas, options, shared_store(settings)
        self.settings = settings
        self.hub = metrics_hub(options.app_name)

    async def __call__(self, http: Request) -> Response:
        method, path = http.method, http.url.path
        try:  # bounded as on one machine: this process holds the body before a replica sees it
            body = await read_bounded_body(http, self.settings)
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail, "field": "body"}, status_code=exc.status_code,
                                headers=exc.headers)
        if method == "GET" and path == "/metrics":
            return await self._metrics()
        task = task_of(method, path, body)
        version = self.store.version_of(task) if task is not None else None
        request = {"method": method, "path": path, "query": http.url.query.encode(), "body": body,
                   "headers": list(http.headers.raw), "task": task, "version": version or ""}
        affine = version and self.options.routing != "random"
        handle = self.replicas.options(multiplexed_model_id=f"{task}@{version}" if affine else "", stream=True)
        retries = 0 if admin_task(method, path) else self.options.retries
        for attempt in range(retries + 1):
            stream: Any = handle.call.remote(request)
            try:
                head = await stream.__anext__()
            except UNAVAILABLE as exc:
                log.warning("no replica answered %s %s (attempt %d): %s", method, path, attempt + 1, exc)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. the shared store could not be written
                log.exception("the replica failed %s %s", method, path)
                return JSONResponse({"detail": f"the replica failed: {type(exc).__name__}", "field": None},
                                    status_code=500)
            response = StreamingResponse(self._rest(stream), status_code=head["status"])
            response.raw_headers = head["headers"]
            return response
        return JSONResponse({"detail": "the replica serving this request stopped; retry", "field": None},
                            status_code=503, headers={"Retry-After": "1"})

    @staticmethod
    async def _rest(stream):
        async for chunk in stream:
            yield chunk

    async def _metrics(self) -> Response:
        texts = await self.hub.all.remote()
        return PlainTextResponse(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)


def replica_deployment(num_slots: int):
    """The ``TaloraReplica`` deployment holding at most ``num_slots`` multiplexed ids per replica."""

    class Replica(TaloraReplica):
        @serve.multiplexed(max_num_models_per_replica=num_slots)
        async def hold(self, model_id: str) -> AdapterVersion | None:
            return await self._load(model_id)

    return serve.deployment(name="TaloraReplica")(Replica)


def router_options(options: RayOptions) -> dict[str, Any]:
    """``Deployment.options`` for the replicas' request router: ours for ``routing=task``, else Serve's."""
    if options.routing != "task":
        return {}
    config = RequestRouterConfig(request_router_class=cast(Any, ROUTER),  # an import path: Ray's stubs want a class
                                 request_router_kwargs={"slack": options.affinity_slack})
    return {"request_router_config": config}


def build_app(settings: Settings, options: RayOptions):
    """The Serve application: ``ingress_replicas`` ingresses -> ``replicas`` engine replicas."""
    if settings.torch_threads == 0:  # torch would start one thread per core of the node in every replica
        settings = settings.model_copy(update={"torch_threads": max(1, int(options.replica_cpus))})
    deployment = replica_deployment(settings.num_slots).options(**options.replica_options(), **router_options(options))
    replicas = deployment.bind(settings, options.app_name)
    ingress_deployment: Any = TaloraIngress  # a Serve Deployment (Ray's stubs type the class itself)
    ingress = ingress_deployment.options(**options.ingress_options())
    return ingress.bind(replicas, settings, options)


def app_builder(args: dict[str, Any]):
    """``serve run talora.server.backends.ray.serve:app_builder key=value ...``: Settings and RayOptions fields."""
    ray_keys = set(RayOptions.model_fields)
    options = RayOptions(**{k: v for k, v in args.items() if k in ray_keys})
    settings = Settings(**{k: v for k, v in args.items() if k not in ray_keys})
    return build_app(settings, options)
