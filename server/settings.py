"""Settings of ``talora-serve``: one typed, validated model read from flags and ``TALORA_*`` variables.

Every field is an environment variable ``TALORA_<FIELD>`` (``TALORA_NUM_SLOTS=16``) and a flag
``--<field-with-dashes>`` (``--num-slots 16``); a flag wins over the variable, the variable over
the default. ``Settings()`` raises ``pydantic.ValidationError`` naming the field that is wrong.
The engine is given only its part of them: ``Settings.engine_config()``, an ``EngineConfig``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from talora.adapters.model.precision import DtypeName


class EngineFields(BaseModel):
    """The settings an engine runs by: the model, the adapters, the batch and cache limits, the
    timeouts of the work it does and the training jobs it runs (``EngineConfig``, ``Settings``)."""

    model: str = Field("smollm2-135m-instruct",
                       description="frozen base model: the embedded default, a checkpoint folder or a hub id")
    dtype: DtypeName = Field("float32", description="weight and KV dtype")
    device: str = Field("auto", description="torch device; auto picks cuda when present, else cpu")
    bundle: Path | None = Field(None, description="adapter bundle folder (talora.json + shared.safetensors); "
                                                  "default: the packaged demo bundle")
    store: Path | None = Field(None, description="adapter store: its tasks load at start after the bundle's "
                               "(adding tasks, replacing those of the same name); the admin routes and the "
                               "watcher read task files from it; default: the bundle folder")
    torch_threads: int = Field(0, ge=0, description="CPU threads torch may use (0: torch's default)")
    num_slots: int = Field(8, ge=1, le=4096, description="task-KV slots kept on the device (LRU)")
    max_batch_size: int = Field(32, ge=1, description="most rows (requests and label rows) in one batch step")
    max_batch_tokens: int = Field(2048, ge=16, description="most new tokens in one batch step")
    max_queue: int = Field(256, ge=1, description="most waiting requests (a request of many texts is one; it waits "
                           "until its last text is admitted); beyond it requests get 429")
    kv_cache_tokens: int = Field(8192, ge=64, description="token capacity of the per-request KV cache pool")
    cuda_graphs: bool = Field(False, description="replay decode-only steps from CUDA graphs captured per "
                              "batch-size and cache-length bucket (CUDA only; ignored elsewhere)")
    overlap_steps: bool = Field(False, description="launch each step before reading the one before it, so the "
                                "host's planning overlaps the device's work (for GPUs: a CPU gains nothing)")
    request_timeout_s: float = Field(60.0, gt=0, description="a request not finished this long after it arrived "
                                     "(tokenising included) gets 504")
    on_overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="input longer than the task's max_input_tokens: cut it, or refuse with 413")
    watch_interval_s: float = Field(0.0, ge=0, description="poll the store for new and changed adapters "
                                                           "every this many seconds (0: off)")
    max_upload_bytes: int = Field(64 * 2**20, ge=1024, description="largest adapter upload accepted, and largest "
                                  "adapter file read from the store (413)")
    max_failed_steps: int = Field(8, ge=1, description="consecutive failed batch steps after which the worker "
                                  "gives up and talora-serve exits with status 70 (a supervisor restarts it)")
    training_max_running: int = Field(1, ge=0, le=64, description="training jobs (POST /v1/training/jobs) that run "
                                      "at once, each in its own worker process (0: the training routes are off, 501)")
    training_max_queued: int = Field(8, ge=1, description="training jobs waiting to run; beyond it a new job gets 429")
    training_threads: int = Field(1, ge=1, description="CPU threads of each training worker process (torch and "
                                  "OpenMP); the worker also runs at a lower CPU priority (nice 10)")
    training_timeout_s: float = Field(6 * 3600.0, gt=0, description="a training job running longer is stopped and "
                                      "marked failed")

    @model_validator(mode="after")
    def _check(self) -> EngineFields:
        if self.bundle is not None and not self.bundle.is_dir():
            raise ValueError(f"bundle: {self.bundle} is not a folder")
        if self.store is not None and not self.store.is_dir():
            raise ValueError(f"store: {self.store} is not a folder")
        return self


class EngineConfig(EngineFields):
    """What ``Engine`` is constructed with, and its scheduler, runner, slots and KV pool read: the
    ``EngineFields`` and nothing of the HTTP layer. Build it with ``Settings.engine_config()``."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Settings(BaseSettings, EngineFields):
    """Everything the server can be told; see docs/serving.md for the table."""

    model_config = SettingsConfigDict(env_prefix="TALORA_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port)")
    max_texts_per_request: int = Field(64, ge=1, le=4096, description="most texts (predict) or prompts "
                                       "(completions) in one request (at most max_queue)")
    max_new_tokens_limit: int = Field(512, ge=1, description="largest max_new_tokens a request may ask for")
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin routes; unset: they are off")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body on every route but the "
                                "adapter upload (413, refused from Content-Length before the body is read)")
    max_request_chars: int = Field(262_144, ge=1, description="most characters of texts, prompts and questions "
                                   "together in one request (413)")
    max_request_tokens: int = Field(32_768, ge=16, description="most prompt tokens of one request, after each "
                                    "text is cut to its task's max_input_tokens (413)")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a whole request "
                                    "head (line and headers) this long after it opened, or after its last "
                                    "answer, gets 408 and is closed")
    body_timeout_s: float = Field(15.0, gt=0, description="a request whose body stalls this long between two "
                                  "reads gets 408 and its connection is closed")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this "
                                      "many seconds")
    max_connections: int = Field(1024, ge=8, description="most open client connections; one more is answered "
                                 "503 and closed at once (also capped below the process's file limit)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, wait this long for requests in flight")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    training_max_examples: int = Field(20_000, ge=10, description="most labelled examples in one training job "
                                       "(413); the request body is also bounded by max_body_bytes")
    backend: Literal["talora", "vllm"] = Field(
        "talora", description="talora: the in-process TA-LoRA engine; vllm: a gate-off bundle served by vLLM "
        "(its own venv: scripts/setup_vllm.sh; docs/serving.md)")
    vllm_python: Path | None = Field(None, description="--backend vllm: python of the vLLM venv that runs the vLLM "
                                     "server (default: benchmarks/.venv-vllm of this checkout)")
    vllm_url: str | None = Field(None, description="--backend vllm: attach to this running vLLM server instead of "
                                 "starting one (it must serve --model's checkpoint with --enable-prompt-embeds)")
    vllm_args: str = Field("", description="--backend vllm: extra flags for the vLLM server it starts "
                           "(e.g. '--max-num-seqs 32')")
    vllm_max_model_len: int = Field(2048, ge=64, description="--backend vllm: most positions of one request, "
                                    "task prompt included")
    vllm_cache_salt: Literal["version", "bundle"] = Field("version", description="--backend vllm: version: tasks "
                                                          "share no vLLM cache block; bundle: P's blocks are shared")
    vllm_start_timeout_s: float = Field(600.0, gt=0, description="--backend vllm: wait this long for the vLLM "
                                        "server to answer /health")

    def engine_config(self) -> EngineConfig:
        """The engine's part of these settings. Training jobs are submitted through the admin routes:
        with those off (no ``admin_token``) the engine runs none (``training_max_running`` 0)."""
        values = self.model_dump(include=set(EngineFields.model_fields))
        if not self.admin_enabled:
            values["training_max_running"] = 0
        return EngineConfig(**values)

    @property
    def texts_limit(self) -> int:
        """Most texts or prompts one request may hold: a larger request could never be queued whole."""
        return min(self.max_texts_per_request, self.max_queue)

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())
