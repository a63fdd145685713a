"""The adapter file format: safetensors tensors plus a JSON sidecar, never pickle.

A **bundle** folder holds ``talora.json`` and ``shared.safetensors`` ({"prompt": (m, d),
"basis": (r, d)}), and the task adapters trained with it: ``<task>.json`` and
``<task>.safetensors`` ({"fast": (n, r) or (n, d), (L, n, r) with a deep prompt, "gate": (L, H)}).
A task with ``k`` basis rows of its own also holds ``"basis": (k, d)``, and its ``"fast"`` is
``(n, r + k)`` (``(L, n, r + k)`` deep). The bundle JSON names the base model and its fingerprint;
each task JSON names the bundle fingerprint it belongs to and the sha256 of its tensors file (absent
in older files), so that a JSON and a tensors file of two versions never load together.
Every reader checks names, shapes, dtypes and fingerprints and raises ``AdapterFormatError``
saying which field is wrong; nothing is half-loaded. A task's metadata has one strict schema
(``check_task_document``): JSON types exactly (no coercion, no bools for integers, no NaN), the
bounds below, and each kind's own fields; the message of every refusal starts with the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from talora.adapters.model.config import ModelConfig, TaloraConfig
from talora.adapters.model.precision import DTYPES, dtype_name

FORMAT_VERSION = 1
BUNDLE_FILE = "talora.json"
SHARED_FILE = "shared.safetensors"
TASK_KINDS = ("classify", "extract", "generate")
TASK_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" would accept a trailing newline
# a version goes into the X-Talora-Adapter-Version response header: visible ASCII, no spaces, controls or ':'
VERSION = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+@/-]{0,63}\Z")
_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
# bounds of a task's metadata (each refusal names its field)
MAX_META_BYTES = 2**20  # the whole <task>.json
MAX_LABELS = 256  # labels of a classify task: a predict scores every label
MAX_LABEL_CHARS = 128  # characters of one label or one verbaliser
MAX_VERBALIZER_TOKENS = 16  # tokens of one verbaliser (checked where the tokenizer is: the server's registry)
MAX_INPUT_TOKENS = 8192  # largest max_input_tokens
MAX_TEMPLATE_CHARS = 4096
MAX_TRAINING_BYTES = 65536  # the training summary, as JSON
MAX_TRAINING_DEPTH = 8  # nesting of objects and lists in the training summary
TEMPLATE_FIELDS = ("text", "question")


class AdapterFormatError(ValueError):
    """An adapter file is malformed or does not fit; the message names the field."""


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise AdapterFormatError(f"task: {name!r} is not a valid task name "
                                 "(letters, digits, '_', '.', '-'; at most 64; no path separators)")
    return name


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
        return TaloraConfig(**self.talora)

    @property
    def arch(self) -> ModelConfig:
        return ModelConfig(**self.model_config)


@dataclass
class TaskMeta:
    """Contents of ``<task>.json``; constructing one checks it against ``check_task_document``."""

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
    tensors_sha256: str = ""  # sha256 of the tensors file; set on save (older files: "")

    def __post_init__(self) -> None:
        check_task_document(task_document(self), complete=False)


def task_document(meta: TaskMeta) -> dict[str, Any]:
    """``meta`` as the JSON object it is written as (a training value that is not a finite number,
    such as a diverged run's NaN loss, is written as null)."""
    data = asdict(meta)
    data["training"] = _finite(data["training"])
    try:
        return json.loads(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(f"training: not JSON ({exc})") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_TASK_TYPES: dict[str, type] = {
    "task": str, "bundle_fingerprint": str, "kind": str, "labels": list, "verbalizers": dict, "template": str,
    "max_input_tokens": int, "version": str, "dtype": str, "format_version": int, "training": dict,
    "tensors_sha256": str}
_JSON_TYPE = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
_TASK_DEFAULTS = {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
                  for f in fields(TaskMeta) if f.default is not MISSING or f.default_factory is not MISSING}


def _shown(name: Any) -> str:
    """A field name for a message: itself when it is a plain name, else its (cut) repr."""
    text = str(name)
    return text if re.fullmatch(r"[A-Za-z0-9_]{1,64}", text) else repr(text[:64])


def _text(value: Any, what: str, limit: int) -> str:
    """A non-empty string of valid Unicode (no lone surrogates: a response could not encode it)."""
    if type(value) is not str:
        raise AdapterFormatError(f"{what}: must be a string, not {type(value).__name__}")
    if not value or len(value) > limit:
        raise AdapterFormatError(f"{what}: must hold 1 to {limit} characters, not {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterFormatError(f"{what}: is not valid Unicode (a lone surrogate)") from None
    return value


def _check_json(value: Any, what: str, depth: int) -> None:
    """A JSON value of finite numbers and valid strings, nested at most ``depth`` deep."""
    if value is None or type(value) in (bool, int):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise AdapterFormatError(f"{what}: {value} is not a JSON number")
    elif type(value) is str:
        if value:
            _text(value, what, MAX_TRAINING_BYTES)
    elif type(value) in (list, dict):
        if depth <= 0:
            raise AdapterFormatError(f"{what}: nested deeper than {MAX_TRAINING_DEPTH} levels")
        items = value.items() if type(value) is dict else enumerate(value)
        for key, item in items:
            if type(key) is str:
                _text(key, f"{what}: key", MAX_LABEL_CHARS)
            _check_json(item, f"{what}.{_shown(key)}" if type(key) is str else f"{what}[{key}]", depth - 1)
    else:
        raise AdapterFormatError(f"{what}: {type(value).__name__} is not a JSON value")


def check_template(template: str) -> str:
    """A template: at most the fields {text} (required) and {question}, no conversion, no format spec."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise AdapterFormatError(f"template: {exc} (write a literal brace as {{{{ or }}}})") from None
    names = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise AdapterFormatError(f"template: field {{{name[:40]}}} is not one of "
                                     f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        if spec or conversion:
            raise AdapterFormatError(f"template: {{{name}}} takes no conversion or format spec")
        names.add(name)
    if "text" not in names:
        raise AdapterFormatError("template: must contain {text}")
    return template


def check_task_document(data: Mapping[str, Any], complete: bool = True) -> None:
    """The one schema of a task's metadata (``<task>.json`` as parsed JSON); raises ``AdapterFormatError``
    whose message starts with the field. ``complete``: a file to serve (its version is set); False
    while a ``TaskMeta`` is built in code (the version is filled in on save)."""
    for name in data:
        if name not in _TASK_TYPES:
            raise AdapterFormatError(f"{_shown(name)}: unknown field of a task's metadata "
                                     f"(the fields are {', '.join(_TASK_TYPES)})")
    for name in ("task", "bundle_fingerprint"):
        if name not in data:
            raise AdapterFormatError(f"{name}: missing")
    for name, kind in _TASK_TYPES.items():
        if name in data and type(data[name]) is not kind:  # exactly: a bool is no integer, nothing is coerced
            raise AdapterFormatError(f"{name}: must be {_JSON_TYPE[kind]}, not {type(data[name]).__name__}")
    values: dict[str, Any] = {**_TASK_DEFAULTS, **data}
    check_task_name(values["task"])
    fingerprint = values["bundle_fingerprint"]
    if len(fingerprint) > 128 or not fingerprint.isascii() or not fingerprint.isprintable():
        raise AdapterFormatError("bundle_fingerprint: must be at most 128 printable ASCII characters")
    if values["format_version"] != FORMAT_VERSION:
        raise AdapterFormatError(f"format_version: {values['format_version']} is not supported "
                                 f"(expected {FORMAT_VERSION})")
    if values["dtype"] not in DTYPES:
        raise AdapterFormatError(f"dtype: {values['dtype'][:40]!r} is not one of {tuple(DTYPES)}")
    version = values["version"]
    if (complete or version) and not VERSION.fullmatch(version):
        raise AdapterFormatError(f"version: {version[:80]!r} is not a valid version (1 to 64 of A-Z a-z 0-9 "
                                 "'.' '_' '+' '@' '/' '-', starting with a letter or digit)")
    digest = values["tensors_sha256"]
    if digest and not _SHA256.fullmatch(digest):
        raise AdapterFormatError("tensors_sha256: must be 64 lowercase hex digits (a sha256)")
    kind = values["kind"]
    if kind not in TASK_KINDS:
        raise AdapterFormatError(f"kind: {kind[:40]!r} is not one of {TASK_KINDS}")
    _check_labels(kind, values["labels"], values["verbalizers"])
    check_template(_text(values["template"], "template", MAX_TEMPLATE_CHARS))
    limit = values["max_input_tokens"]
    if not 1 <= limit <= MAX_INPUT_TOKENS:
        raise AdapterFormatError(f"max_input_tokens: {limit} is not in 1 .. {MAX_INPUT_TOKENS}")
    training = values["training"]
    _check_json(training, "training", MAX_TRAINING_DEPTH)
    if len(json.dumps(training)) > MAX_TRAINING_BYTES:
        raise AdapterFormatError(f"training: over {MAX_TRAINING_BYTES} bytes as JSON")


def _check_labels(kind: str, labels: list, verbalizers: dict) -> None:
    if kind != "classify":
        if labels:
            raise AdapterFormatError(f"labels: {kind} tasks have no labels")
        if verbalizers:
            raise AdapterFormatError(f"verbalizers: {kind} tasks have no verbalisers")
        return
    if not 2 <= len(labels) <= MAX_LABELS:
        raise AdapterFormatError(f"labels: a classify task needs 2 to {MAX_LABELS} labels, not {len(labels)}")
    for i, label in enumerate(labels):
        _text(label, f"labels[{i}]", MAX_LABEL_CHARS)
    if len(set(labels)) != len(labels):
        raise AdapterFormatError("labels: a label appears twice")
    missing = [label for label in labels if label not in verbalizers]
    if missing:
        raise AdapterFormatError(f"verbalizers: label {missing[0]!r} has no verbaliser")
    extra = [key for key in verbalizers if key not in set(labels)]
    if extra:
        raise AdapterFormatError(f"verbalizers: {extra[0][:64]!r} is not a label")
    for label in labels:
        _text(verbalizers[label], f"verbalizers[{label!r}]", MAX_LABEL_CHARS)
    if len(set(verbalizers[label] for label in labels)) != len(labels):
        raise AdapterFormatError("verbalizers: two labels share one verbaliser")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {twice[:64]!r} appears twice")
    return data


def parse_json_object(raw: bytes, what: str, allow_nan: bool = False) -> dict[str, Any]:
    """Strict JSON: UTF-8, no NaN or Infinity (unless ``allow_nan``), no key twice, not nested past
    Python's recursion limit, an object at the top; else ``AdapterFormatError`` naming ``what``."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=None if allow_nan else _no_constant,
                          object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise AdapterFormatError(f"{what}: nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and the hooks' refusals
        raise AdapterFormatError(f"{what}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{what}: must be a JSON object")
    return data


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFormatError(f"{what}: {path} not found") from None
    return parse_json_object(raw, f"{what}: {path}", allow_nan=True)  # a bundle's training summary may hold NaN


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
    if meta.dtype not in DTYPES:
        raise AdapterFormatError(f"dtype: {meta.dtype!r} is not one of {tuple(DTYPES)}")
    return meta


def _load_tensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{what}: not a safetensors file ({exc})") from None


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], dtype: str,
                  what: str) -> dict[str, torch.Tensor]:
    """Check parsed tensors' names, shapes, dtype and values; returns them."""
    if set(tensors) != set(expected):
        raise AdapterFormatError(f"{what}: tensors {sorted(tensors)} do not match the expected {sorted(expected)}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise AdapterFormatError(f"{name}: shape {tuple(t.shape)} does not match the expected {shape}")
        if t.dtype != DTYPES[dtype]:
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
    meta.dtype = dtype_name(prompt.dtype)
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
    return meta, check_tensors(_load_tensors(blob, SHARED_FILE), shared_shapes(meta), meta.dtype, SHARED_FILE)


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
    """Serialise a task adapter to (json bytes, safetensors bytes); fills in version, dtype and
    tensors_sha256, and checks the result against the schema ``decode_task`` reads it with."""
    meta.dtype = dtype_name(fast.dtype)
    blob = save(_task_tensors(fast, gate, basis))
    if not meta.version:
        meta.version = _digest(blob, meta.task.encode())[:12]
    meta.tensors_sha256 = _digest(blob)
    document = task_document(meta)
    check_task_document(document)
    return json.dumps(document, indent=2, sort_keys=True).encode(), blob


def save_task(folder: Path, meta: TaskMeta, fast: torch.Tensor, gate: torch.Tensor,
              basis: torch.Tensor | None = None) -> TaskMeta:
    """Write ``<task>.json`` + ``<task>.safetensors`` into ``folder`` (tensors first, JSON last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_bytes, blob = encode_task(meta, fast, gate, basis)
    for name, data in ((f"{meta.task}.safetensors", blob), (f"{meta.task}.json", meta_bytes)):
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(folder / name)
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


def decode_task(meta_bytes: bytes, blob: bytes, bundle: BundleMeta, expected_task: str | None = None,
                require_digest: bool = False) -> tuple[TaskMeta, dict[str, torch.Tensor]]:
    """Parse and check a task adapter against ``bundle``; raises ``AdapterFormatError``.

    The metadata must pass ``check_task_document``; when it names ``tensors_sha256`` the tensors must
    be those bytes (checked after their names, shapes, dtype and values, whose errors say more).
    ``require_digest``: refuse metadata without ``tensors_sha256`` (older files), whose pairing with
    the tensors file cannot be checked."""
    if len(meta_bytes) > MAX_META_BYTES:
        raise AdapterFormatError(f"metadata: {len(meta_bytes)} bytes is over the limit of {MAX_META_BYTES}")
    data = parse_json_object(meta_bytes, "metadata")
    check_task_document(data)
    meta = TaskMeta(**data)
    if expected_task is not None and meta.task != expected_task:
        raise AdapterFormatError(f"task: the file is for {meta.task!r}, not {expected_task!r}")
    if meta.bundle_fingerprint != bundle.fingerprint:
        raise AdapterFormatError(f"bundle_fingerprint: the adapter belongs to bundle {meta.bundle_fingerprint[:12]}, "
                                 f"not the loaded bundle {bundle.fingerprint[:12]}")
    if meta.dtype != bundle.dtype:
        raise AdapterFormatError(f"dtype: {meta.dtype} does not match the bundle's {bundle.dtype}")
    if require_digest and not meta.tensors_sha256:
        raise AdapterFormatError("tensors_sha256: missing, so the pairing of this JSON with its tensors file "
                                 "cannot be checked (re-save the adapter with save_task or talora-train)")
    what = f"{meta.task}.safetensors"
    tensors = _load_tensors(blob, what)
    tensors = check_tensors(tensors, task_shapes(bundle, _basis_rows(tensors, bundle)), meta.dtype, what)
    if meta.tensors_sha256 and _digest(blob) != meta.tensors_sha256:
        raise AdapterFormatError(f"tensors_sha256: {what} (sha256 {_digest(blob)[:12]}) is not the tensors file of "
                                 f"this metadata (version {meta.version!r}, sha256 {meta.tensors_sha256[:12]}): "
                                 "the pair is from two versions, or one file is still being copied")
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
    return sorted(p.stem for p in folder.glob("*.json") if p.name != BUNDLE_FILE and TASK_NAME.fullmatch(p.stem)
                  and (folder / f"{p.stem}.safetensors").is_file())
