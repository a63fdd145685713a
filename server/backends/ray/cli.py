"""``talora-serve --ray``: the same server as engine replicas on Ray Serve (``pip install talora[ray]``).

    talora-serve --ray --replicas 2 --store /shared/adapters --admin-token secret
    talora-serve --ray --address auto --replicas 8 --replica-gpus 1      # join a running cluster

Every ``talora-serve`` flag keeps its meaning (each replica gets the same ``Settings``); the flags
of ``RayOptions`` say how many replicas, their resources and their concurrency. Without
``--address`` a local cluster is started, bound to 127.0.0.1, and shut down on exit. See
docs/scale_out.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys

from pydantic import ValidationError

from talora.adapters.formats.cli_flags import add_flags
from talora.server.backends.ray.proxy import CALLBACK, CALLBACK_ENV, ProxyLimits
from talora.server.backends.ray.support import LOOPBACK_ENV, RayOptions
from talora.server.cli import build_parser
from talora.server.settings import Settings

log = logging.getLogger(__name__)


def build_ray_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.prog = "talora-serve --ray"
    add_flags(parser.add_argument_group("Ray Serve", "replicas of the engine behind one HTTP ingress"), RayOptions)
    return parser


def parse(argv: list[str]) -> tuple[Settings, RayOptions]:
    """Settings and RayOptions from flags (and TALORA_* variables); ValidationError names the field."""
    args = vars(build_ray_parser().parse_args(argv))
    ray_args = {name: args.pop(name) for name in list(args) if name in RayOptions.model_fields}
    return Settings(**args), RayOptions(**ray_args)


def main(argv: list[str]) -> int:
    try:
        settings, options = parse(argv)
    except SystemExit as exc:  # argparse: --help (0), or a flag it refuses (2)
        return int(exc.code or 0)
    except ValidationError as exc:
        for error in exc.errors():
            print(f"talora-serve --ray: {'.'.join(str(p) for p in error['loc'])}: {error['msg']}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("ray") is None:
        print("talora-serve --ray: Ray Serve is not installed: pip install 'talora[ray]'", file=sys.stderr)
        return 2
    if settings.admin_enabled and settings.store is None:
        print("talora-serve --ray: store: the admin routes write to the adapter store; give --store a folder "
              "every replica shares", file=sys.stderr)
        return 2
    return run(settings, options)


def proxy_limits(settings: Settings, options: RayOptions) -> ProxyLimits:
    """What Serve's proxy keeps of a request to replay it (``talora.server.backends.ray.proxy``)."""
    return ProxyLimits(settings.max_body_bytes, options.retries + 1, settings.body_timeout_s)


def start_cluster(options: RayOptions, log_to_driver: bool = True, proxy: ProxyLimits | None = None) -> None:
    """Join ``options.address``, or start a local cluster whose servers listen on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray turns a loopback address
    into the machine's routable one and its servers listen on every interface. Ray's single-node
    mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, inherited by every process of the cluster)
    keeps the node address, the GCS, the raylets, the workers and Serve on the loopback interface.
    A local cluster's processes also inherit the variables that load talora's middleware into
    Serve's proxy (``proxy``, default limits if None); a joined cluster's nodes must have them set
    where they were started (docs/scale_out.md, deploy/kubernetes).
    """
    if options.address:
        import ray

        if os.environ.get(CALLBACK_ENV) != CALLBACK:
            log.warning("joining %s: its nodes' proxies answer a dead ingress's requests with Serve's bare 500 "
                        "unless they were started with %s=%s", options.address, CALLBACK_ENV, CALLBACK)
        ray.init(address=options.address)
        return
    os.environ.update((proxy or ProxyLimits()).env())
    os.environ[LOOPBACK_ENV] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; ray may have been imported before the variable
    ray.init(num_cpus=options.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=log_to_driver)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(settings: Settings, options: RayOptions) -> int:
    """Deploy the application and serve until interrupted; a local cluster is shut down after."""
    import ray
    from ray import serve

    from talora.server.backends.ray.serve import build_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_cluster(options, proxy=proxy_limits(settings, options))
    signal.signal(signal.SIGTERM, _interrupt)  # after Ray's own handler: a supervisor's stop drains like Ctrl-C
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, options), name=options.app_name, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("interrupted: shutting the replicas down")
    finally:
        serve.delete(options.app_name)
        if not options.address:
            serve.shutdown()
            ray.shutdown()
    return 0
