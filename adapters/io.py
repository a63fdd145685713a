"""The adapter file format: safetensors tensors plus a JSON sidecar, never pickle.

A **bundle** folder holds ``talora.json`` and ``shared.safetensors`` ({"prompt": (m, d),
"basis": (r, d)}), and the task adapters trained with it: ``<task>.json`` and
``<task>.safetensors`` ({"fast": (n, r) or (n, d), (L, n, r) with a deep prompt, "gate": (L, H)}).
A task with ``k`` basis rows of its own also holds ``"basis": (k, d)``, and its ``"fast"`` is
``(n, r + k)`` (``(L, n, r + k)`` deep); files without it are read exactly as before.
The bundle JSON names the base model and its fingerprint; each task JSON names the bundle fingerprint it belongs to.
Every reader checks names, shapes, dtypes and fingerprints and raises ``AdapterFormatError``
saying which field is wrong; nothing is half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from talora.adapters.config import ModelConfig, TaloraConfig

FORMAT_VERSION = 1
BUNDLE_FILE = "talora.json"
SHARED_FILE = "shared.safetensors"
TASK_KINDS = ("classify", "extract", "generate")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterFormatError(ValueError):
    """An adapter file is malformed or does not fit; the message names the field."""


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise AdapterFormatError(f"task: {name!r} is not a valid task name "
                                 "(letters, digits, '_', '.', '-'; at most 64; no path separators)")
    return name


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


@dataclass
class BundleMeta:
    """Contents of ``talora.json``."""

    base_model: str
    base_fingerprint: str
    model_config: dict[str, Any]
    talora: dict[str, Any]
    dtype: str = "float32"
    fingerprint: str = ""  # sha256 of the shared tensors and this metadata; set on save
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> TaloraConfig:
        return TaloraConfig.from_dict(self.talora)

    @property
    def arch(self) -> ModelConfig:
        return ModelConfig(**self.model_config)


@dataclass
class TaskMeta:
    """Contents of ``<task>.json``."""

    task: str
    bundle_fingerprint: str
    kind: str = "classify"
    labels: list[str] = field(default_factory=list)
    verbalizers: dict[str, str] = field(default_factory=dict)
    template: str = "{text}"
    max_input_tokens: int = 256
    version: str = ""  # set on save to a content hash unless given
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_task_name(self.task)
        if self.kind not in TASK_KINDS:
            raise AdapterFormatError(f"kind: {self.kind!r} is not one of {TASK_KINDS}")
        if self.kind == "classify":
            if len(self.labels) < 2:
                raise AdapterFormatError("labels: a classify task needs at least two labels")
            missing = [label for label in self.labels if label not in self.verbalizers]
            if missing:
                raise AdapterFormatError(f"verbalizers: label {missing[0]!r} has no verbaliser")
            if len(set(self.verbalizers[label] for label in self.labels)) != len(self.labels):
                raise AdapterFormatError("verbalizers: two labels share one verbaliser")
        if "{text}" not in self.template:
            raise AdapterFormatError("template: must contain {text}")
        if self.max_input_tokens <= 0:
            raise AdapterFormatError("max_input_tokens: must be positive")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"{what}: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{what}: {path} must hold a JSON object")
    return data


def _meta_from(cls, data: dict[str, Any], what: str):
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise AdapterFormatError(f"{what}: unknown field {unknown[0]!r}")
    try:
        meta = cls(**data)
    except TypeError as exc:
        raise AdapterFormatError(f"{what}: {exc}") from None
    if meta.format_version != FORMAT_VERSION:
        raise AdapterFormatError(f"format_version: {meta.format_version} is not supported (expected {FORMAT_VERSION})")
    if meta.dtype not in _DTYPES:
        raise AdapterFormatError(f"dtype: {meta.dtype!r} is not one of {tuple(_DTYPES)}")
    return meta


def _load_tensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{what}: not a safetensors file ({exc})") from None


def parse_tensors(blob: bytes, expected: dict[str, tuple[int, ...]], dtype: str, what: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes and check the tensor names, shapes and dtype."""
    return check_tensors(_load_tensors(blob, what), expected, dtype, what)


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], dtype: str,
                  what: str) -> dict[str, torch.Tensor]:
    """Check parsed tensors' names, shapes, dtype and values; returns them."""
    if set(tensors) != set(expected):
        raise AdapterFormatError(f"{what}: tensors {sorted(tensors)} do not match the expected {sorted(expected)}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise AdapterFormatError(f"{name}: shape {tuple(t.shape)} does not match the expected {shape}")
        if t.dtype != _DTYPES[dtype]:
            raise AdapterFormatError(f"{name}: dtype {str(t.dtype).removeprefix('torch.')} does not match {dtype}")
        if not torch.isfinite(t.float()).all():
            raise AdapterFormatError(f"{name}: holds NaN or infinite values")
    return tensors


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


# ----- bundle ------------------------------------------------------------------------------
def shared_shapes(meta: BundleMeta) -> dict[str, tuple[int, ...]]:
    cfg, arch = meta.config, meta.arch
    return {"prompt": (cfg.shared_prompt_len, arch.hidden_size),
            "basis": (0 if cfg.full_rank else cfg.rank, arch.hidden_size)}


def save_bundle(folder: Path, meta: BundleMeta, prompt: torch.Tensor, basis: torch.Tensor) -> BundleMeta:
    """Write ``talora.json`` + ``shared.safetensors``; fills in ``meta.fingerprint``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta.dtype = _dtype_name(prompt.dtype)
    blob = save({"prompt": prompt.detach().cpu().contiguous(), "basis": basis.detach().cpu().contiguous()})
    meta.fingerprint = ""
    meta.fingerprint = _digest(blob, json.dumps(asdict(meta), sort_keys=True).encode())
    (folder / SHARED_FILE).write_bytes(blob)
    (folder / BUNDLE_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True))
    return meta


def load_bundle(folder: Path, base_fingerprint: str | None = None) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """Read and check a bundle; ``base_fingerprint`` is the loaded model's, when one is loaded."""
    folder = Path(folder)
    meta = _meta_from(BundleMeta, _read_json(folder / BUNDLE_FILE, BUNDLE_FILE), BUNDLE_FILE)
    try:
        meta.config, meta.arch  # noqa: B018 - validates both
    except (ValueError, TypeError) as exc:
        raise AdapterFormatError(f"{BUNDLE_FILE}: {exc}") from None
    if base_fingerprint is not None and meta.base_fingerprint != base_fingerprint:
        raise AdapterFormatError(f"base_fingerprint: the bundle was trained on another base model "
                                 f"({meta.base_model}, {meta.base_fingerprint[:12]}) than the one loaded "
                                 f"({base_fingerprint[:12]})")
    try:
        blob = (folder / SHARED_FILE).read_bytes()
    except FileNotFoundError:
        raise AdapterFormatError(f"{SHARED_FILE}: not found in {folder}") from None
    tensors = parse_tensors(blob, shared_shapes(meta), meta.dtype, SHARED_FILE)
    return meta, tensors


# ----- tasks -------------------------------------------------------------------------------
def task_shapes(bundle: BundleMeta, basis_rows: int = 0) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a task adapter of ``bundle`` owning ``basis_rows`` basis rows."""
    cfg, arch = bundle.config, bundle.arch
    shapes = {"fast": cfg.fast_shape(arch.num_layers, arch.hidden_size, basis_rows),
              "gate": (arch.num_layers, arch.num_heads)}
    if basis_rows:
        shapes["basis"] = (basis_rows, arch.hidden_size)
    return shapes


def _task_tensors(fast: torch.Tensor, gate: torch.Tensor, basis: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = {"fast": fast, "gate": gate} | ({"basis": basis} if basis is not None else {})
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def encode_task(meta: TaskMeta, fast: torch.Tensor, gate: torch.Tensor,
                basis: torch.Tensor | None = None) -> tuple[bytes, bytes]:
    """Serialise a task adapter to (json bytes, safetensors bytes); fills in version and dtype."""
    meta.dtype = _dtype_name(fast.dtype)
    blob = save(_task_tensors(fast, gate, basis))
    if not meta.version:
        meta.version = _digest(blob, meta.task.encode())[:12]
    return json.dumps(asdict(meta), indent=2, sort_keys=True).encode(), blob


def save_task(folder: Path, meta: TaskMeta, fast: torch.Tensor, gate: torch.Tensor,
              basis: torch.Tensor | None = None) -> TaskMeta:
    """Write ``<task>.json`` + ``<task>.safetensors`` into ``folder`` (tensors first, JSON last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_bytes, blob = encode_task(meta, fast, gate, basis)
    tmp = folder / f".{meta.task}.safetensors.tmp"
    tmp.write_bytes(blob)
    tmp.replace(folder / f"{meta.task}.safetensors")
    tmp = folder / f".{meta.task}.json.tmp"
    tmp.write_bytes(meta_bytes)
    tmp.replace(folder / f"{meta.task}.json")
    return meta


def _basis_rows(tensors: dict[str, torch.Tensor], bundle: BundleMeta) -> int:
    """k of a task file: the rows of its ``basis`` tensor (0 without one)."""
    basis = tensors.get("basis")
    if basis is None:
        return 0
    if bundle.config.full_rank:
        raise AdapterFormatError("basis: a full-rank bundle's task adapters have no basis rows")
    if basis.dim() != 2 or basis.shape[0] < 1:
        raise AdapterFormatError(f"basis: shape {tuple(basis.shape)} is not (k, d) with k >= 1")
    return basis.shape[0]


def decode_task(meta_bytes: bytes, blob: bytes, bundle: BundleMeta,
                expected_task: str | None = None) -> tuple[TaskMeta, dict[str, torch.Tensor]]:
    """Parse and check a task adapter against ``bundle``; raises ``AdapterFormatError``."""
    try:
        data = json.loads(meta_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"metadata: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFormatError("metadata: must be a JSON object")
    meta = _meta_from(TaskMeta, data, "metadata")
    if expected_task is not None and meta.task != expected_task:
        raise AdapterFormatError(f"task: the file is for {meta.task!r}, not {expected_task!r}")
    if meta.bundle_fingerprint != bundle.fingerprint:
        raise AdapterFormatError(f"bundle_fingerprint: the adapter belongs to bundle {meta.bundle_fingerprint[:12]}, "
                                 f"not the loaded bundle {bundle.fingerprint[:12]}")
    if meta.dtype != bundle.dtype:
        raise AdapterFormatError(f"dtype: {meta.dtype} does not match the bundle's {bundle.dtype}")
    what = f"{meta.task}.safetensors"
    tensors = _load_tensors(blob, what)
    tensors = check_tensors(tensors, task_shapes(bundle, _basis_rows(tensors, bundle)), meta.dtype, what)
    return meta, tensors


def load_task(folder: Path, task: str, bundle: BundleMeta) -> tuple[TaskMeta, dict[str, torch.Tensor]]:
    folder = Path(folder)
    check_task_name(task)
    try:
        meta_bytes = (folder / f"{task}.json").read_bytes()
        blob = (folder / f"{task}.safetensors").read_bytes()
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"task: {exc.filename} not found") from None
    return decode_task(meta_bytes, blob, bundle, expected_task=task)


def list_task_names(folder: Path) -> list[str]:
    """Task adapters present in a bundle folder (both files present)."""
    folder = Path(folder)
    return sorted(p.stem for p in folder.glob("*.json")
                  if p.name != BUNDLE_FILE and TASK_NAME.match(p.stem) and (folder / f"{p.stem}.safetensors").is_file())
