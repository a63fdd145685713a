"""``talora-serve``: parse flags (kebab-case copies of the ``Settings`` fields) and run uvicorn.

    talora-serve                                # SmolLM2-135M-Instruct + the demo bundle, 127.0.0.1:8000
    talora-serve --bundle runs/b --num-slots 16 --admin-token secret --watch-interval-s 2
    talora-serve --ray --replicas 2 --store /shared/adapters  # replicas on Ray Serve (see backends/ray/cli.py)
    talora-serve --backend vllm --bundle runs/gate-off      # a gate-off bundle on vLLM (see backends/vllm/engine.py)

Flags win over ``TALORA_*`` environment variables, which win over the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import typing

from pydantic import ValidationError

from talora.adapters.formats.cli_flags import add_flags
from talora.adapters.model.config import error_text
from talora.server.settings import Settings

if typing.TYPE_CHECKING:
    from talora.server.facade import ServingEngine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="talora-serve", description="Serve TA-LoRA task adapters over HTTP. "
                                     "Every flag is also the environment variable TALORA_<FIELD>.")
    add_flags(parser, Settings, env_prefix="TALORA_")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--ray" in argv:  # replicas on Ray Serve (the ray extra): server/backends/ray/cli.py, docs/scale_out.md
        from talora.server.backends.ray.cli import main as ray_main

        return ray_main([a for a in argv if a != "--ray"])
    args = vars(build_parser().parse_args(argv))
    try:
        settings = Settings(**args)
    except ValidationError as exc:
        for line in error_text(exc).splitlines():
            print(f"talora-serve: {line}", file=sys.stderr)
        return 2
    return serve(settings)


EXIT_WORKER_DEAD = 70  # EX_SOFTWARE: the engine's worker stopped; a supervisor should restart the server
EXIT_GRACE_S = 1.0


def exit_for_restart(exc: BaseException) -> None:
    """End the process at once when the engine's worker cannot go on: a server that accepts requests it
    can never answer is worse than one that is restarted (systemd, Kubernetes, Ray restart on exit)."""
    logging.getLogger("talora.server").critical("exiting with status %d so that the server is restarted: %s",
                                                EXIT_WORKER_DEAD, exc)
    time.sleep(EXIT_GRACE_S)  # the event loop still answers: the failed requests get their 500 / 503 first
    logging.shutdown()
    os._exit(EXIT_WORKER_DEAD)


def make_engine(settings: Settings) -> ServingEngine:
    """The engine of ``settings.backend``: the in-process one, or vLLM for a gate-off bundle."""
    if settings.backend == "vllm":
        from talora.server.backends.vllm.engine import VllmEngine

        return VllmEngine(settings, on_fatal=exit_for_restart)
    from talora.server.engine import Engine

    return Engine(settings.engine_config(), on_fatal=exit_for_restart)


def serve(settings: Settings) -> int:
    """Bind the port, load everything, then serve until SIGINT/SIGTERM (which drain the requests in flight)."""
    from talora.adapters.model.loading import ModelLoadError
    from talora.server.backends.vllm.process import VllmUnavailable
    from talora.server.errors import BundleMissing
    from talora.server.facade import resolve_bundle
    from talora.server.http.app import create_app
    from talora.server.http.server import TaloraServer, bind_socket, uvicorn_config

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_socket(settings.host, settings.port)  # a busy port is reported before the model loads
    except OSError as exc:
        print(f"talora-serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        resolve_bundle(settings)
        engine = make_engine(settings)
        engine.start()
    except (BundleMissing, ModelLoadError) as exc:
        print(f"talora-serve: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bundle that does not fit the model (or vLLM), with the field named
        print(f"talora-serve: {exc}", file=sys.stderr)
        return 2
    except VllmUnavailable as exc:
        print(f"talora-serve: {exc}", file=sys.stderr)
        engine.stop(0)
        return 2
    app = create_app(settings, engine)
    TaloraServer(uvicorn_config(app, settings), engine, settings.drain_timeout_s).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
