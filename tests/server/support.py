"""Helpers for the server tests (no tests here): random bundles on any loaded model (the tiny random
one of the fast tier, or the real default model), and a real uvicorn server on 127.0.0.1 in a
background thread. The fixtures built from them are in ``tests/server/conftest.py``."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from talora.adapters.formats.bundle import export_bundle, export_task
from talora.adapters.model.config import TaloraConfig
from talora.adapters.model.talora_model import TaloraModel
from talora.server.jobs import Failed, Finished, Scored

TEMPLATE = "Text: {text}\nAnswer:"
CLASSIFY = {
    "sentiment": {"positive": " good", "negative": " bad"},
    "topic": {"sports": " sports", "politics": " politics", "science": " science"},
    "spam": {"ham": " no", "spam": " yes"},
    "intent": {"buy": " buy it now", "ask": " a question"},  # multi-token verbalisers
}
GENERATE = "echo"


def build_bundle(folder: Path, loaded, seed: int = 0, basis_rows: dict[str, int] | None = None, **shape) -> Path:
    """A bundle of four classify tasks and one generate task with random, open gates
    (``shape``: ``TaloraConfig`` fields other than the default sizes, e.g. ``deep_prompt=True``;
    ``basis_rows``: tasks that own that many basis rows, with random U_t and V_t)."""
    gen = torch.Generator().manual_seed(seed)
    config = TaloraConfig(**{"shared_prompt_len": 4, "task_prompt_len": 4, "rank": 4, "init_std": 0.5, **shape})
    model = TaloraModel(loaded.model, config)
    model.init_shared(gen)
    bundle = export_bundle(model, folder, loaded.name, loaded.fingerprint)
    for task, verbalizers in CLASSIFY.items():
        add_random_task(model, task, gen, basis_rows=(basis_rows or {}).get(task, 0))
        export_task(model, task, folder, bundle, kind="classify", labels=list(verbalizers),
                    verbalizers=verbalizers, template=TEMPLATE, max_input_tokens=32)
    add_random_task(model, GENERATE, gen, gate_std=0.05, basis_rows=(basis_rows or {}).get(GENERATE, 0))
    export_task(model, GENERATE, folder, bundle, kind="generate", template="{text}", max_input_tokens=32)
    return folder


def add_random_task(model: TaloraModel, task: str, gen: torch.Generator, gate_std: float = 1.0,
                    basis_rows: int = 0) -> None:
    adapter = model.add_task(task, generator=gen, basis_rows=basis_rows)
    with torch.no_grad():
        adapter.gate.copy_(torch.randn(adapter.gate.shape, generator=gen) * gate_std)
        if basis_rows:  # U_t starts at zero; open it so that the rows count
            u = adapter.fast[..., -basis_rows:]
            u.copy_(torch.randn(u.shape, generator=gen))


def write_version(folder: Path, loaded, task: str, seed: int, version: str, out: Path | None = None,
                  name: str | None = None) -> Path:
    """Write another version of ``task`` of the bundle in ``folder`` into ``out`` (default ``folder``),
    under task name ``name`` (default ``task``), with new random fast weights and gates."""
    import json

    from talora.adapters.formats.bundle import model_from_bundle

    name = name or task
    meta = json.loads((folder / f"{task}.json").read_text())
    model, bundle, _ = model_from_bundle(loaded.model, folder, loaded.fingerprint, tasks=[])
    add_random_task(model, name, torch.Generator().manual_seed(seed), gate_std=2.0)
    fields = {k: meta[k] for k in ("kind", "labels", "verbalizers", "template", "max_input_tokens")}
    export_task(model, name, out or folder, bundle, version=version, **fields)
    return (out or folder) / f"{name}.json"


class Collector:
    """A thread-safe ``emit`` that remembers every event."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Scored, Finished, Failed)):
            self.done.set()

    def wait(self, timeout=120):
        assert self.done.wait(timeout), "the engine did not answer"
        return self.events[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, output: Callable[[], str], timeout: float = 180) -> int:
    """Poll ``/ready`` of a talora-serve subprocess until it answers 200; returns how many polls
    reached the server (each writes one request-log line). Fails with ``output()`` (the process's
    log) if the process exits first or ``timeout`` passes (then it kills the process): a subprocess
    importing torch is ready in seconds on an idle machine and in minutes on a loaded 2-core one."""
    deadline, polls = time.monotonic() + timeout, 0
    while True:
        assert proc.poll() is None, output()
        if time.monotonic() > deadline:
            proc.kill()  # so that output() can read the whole log
            proc.wait()
            raise AssertionError("talora-serve did not become ready\n" + output())
        try:
            polls += 1
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return polls
        except (httpx.ConnectError, httpx.ConnectTimeout):
            polls -= 1  # never reached the server: no log line
        except httpx.TransportError:
            pass  # reached it and timed out: the server still answers and logs it
        time.sleep(0.2)


class ServerThread:
    """``create_app`` under a real uvicorn on 127.0.0.1, in a thread of this process, with the limits and
    the drain of ``talora-serve`` (``http_server``).

    The engine sets torch's thread count from its settings; leaving the block restores the count
    the suite had, so that one server's settings do not leak into later tests.
    """

    def __init__(self, settings, loaded):
        from talora.server.engine import Engine
        from talora.server.http.app import create_app
        from talora.server.http.server import TaloraServer, uvicorn_config

        self.torch_threads = torch.get_num_threads()
        self.engine = Engine(settings.engine_config(), loaded=loaded)
        self.app = create_app(settings, self.engine)
        self.port = free_port()
        config = uvicorn_config(self.app, settings, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = TaloraServer(config, self.engine, settings.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        torch.set_num_threads(self.torch_threads)


def serve(bundle_dir: Path, loaded, **overrides) -> ServerThread:
    """A test server on ``bundle_dir``: one torch thread (the CI machine is shared), short timeouts."""
    from talora.server.settings import Settings

    settings = Settings(bundle=bundle_dir, torch_threads=1, **{"num_slots": 3, "drain_timeout_s": 10, **overrides})
    return ServerThread(settings, loaded)
