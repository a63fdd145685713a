"""Look tasks up, load their splits (cached as JSONL), prepare them all.

Built-in tasks come from `catalog.BUILTIN`. User tasks come from `register_file_task` (this
process) or from `<cache>/user_tasks.json`, which `python -m talora.adapters.data add` writes.
Built-in splits are cached in `<cache>/<task>/{train,dev,test}.jsonl` with a `meta.json` that
records the split seed and cache format, so a changed policy rebuilds them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import bigbench as bb
from .catalog import BUILTIN, TaskEntry
from .file_task import make_file_task
from .sources_pkg import MissingDataError
from .spec import Example, TaskSpec
from .splits import CACHE_FORMAT_VERSION, SPLITS, balanced_subset, cache_root, read_jsonl, write_jsonl

_BUILTIN = {entry.spec.name: entry for entry in BUILTIN}
_REGISTERED: dict[str, TaskEntry] = {}
USER_INDEX = "user_tasks.json"


def _user_index(cache: Path) -> dict[str, dict]:
    path = cache / USER_INDEX
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _entries(cache_dir=None) -> tuple[dict[str, TaskEntry], dict[str, str]]:
    """(usable tasks, saved user tasks whose file no longer validates -> the reason)."""
    entries, broken = dict(_BUILTIN), {}
    for name, kwargs in _user_index(cache_root(cache_dir)).items():
        if name not in _REGISTERED and name not in entries:
            try:
                entries[name] = make_file_task(name=name, **kwargs)
            except ValueError as err:  # a moved or edited file must not break the other tasks
                broken[name] = str(err)
    entries.update(_REGISTERED)
    return entries, broken


def _entry(name: str, cache_dir=None) -> TaskEntry:
    entries, broken = _entries(cache_dir)
    if name in broken:
        raise ValueError(f"saved task {name!r} is unusable: {broken[name]}")
    if name not in entries:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(entries))}")
    return entries[name]


def list_tasks() -> list[str]:
    """Names of the built-in, registered and saved user tasks, built-ins first."""
    entries, _ = _entries()
    return [name for name in _BUILTIN] + sorted(name for name in entries if name not in _BUILTIN)


def get_task(name: str) -> TaskSpec:
    return _entry(name).spec


def register_file_task(path, name=None, template=None, labels=None, verbalizers=None, language="en", *,
                       save=False, cache_dir=None, kind="classify") -> TaskSpec:
    """Register a JSONL/CSV (text, label) task for this process; `save=True` also records it in
    `<cache>/user_tasks.json`, so later processes (and the CLI) find it by name.

    Raises ValueError naming the problem (missing column, one label only, empty file, ...).
    """
    entry = make_file_task(path, name=name, template=template, labels=labels, verbalizers=verbalizers,
                           language=language, kind=kind)
    if entry.spec.name in _BUILTIN:
        raise ValueError(f"name {entry.spec.name!r} is a built-in task; pass another name")
    _REGISTERED[entry.spec.name] = entry
    if save:
        _save_user_task(cache_root(cache_dir), entry.spec, Path(path).expanduser().resolve())
    return entry.spec


def _save_user_task(cache: Path, spec: TaskSpec, path: Path) -> None:
    index = _user_index(cache)
    extra = {"kind": spec.kind} if spec.kind != "classify" else {}
    index[spec.name] = {"path": str(path), "template": spec.template, "labels": list(spec.labels),
                        "verbalizers": spec.verbalizers, "language": spec.language, **extra}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / (USER_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, cache / USER_INDEX)


def _cached_is_fresh(folder: Path, entry: TaskEntry) -> bool:
    meta_path = folder / "meta.json"
    if not meta_path.exists() or not all((folder / f"{s}.jsonl").exists() for s in SPLITS):
        return False
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta.get("format") == CACHE_FORMAT_VERSION and meta.get("seed") == entry.seed


def build_splits(name: str, cache_dir=None) -> dict[str, list[Example]]:
    """Build all three splits from the raw source, bypassing the JSONL cache."""
    entry = _entry(name, cache_dir)
    parts = entry.build(cache_root(cache_dir))
    empty = [split for split in SPLITS if not parts[split]]
    if empty:
        raise ValueError(f"task {name!r} built empty splits {empty}")
    return parts


def _materialise(name: str, cache_dir=None) -> dict[str, int]:
    entry = _entry(name, cache_dir)
    folder = cache_root(cache_dir) / name
    parts = build_splits(name, cache_dir)
    for split in SPLITS:
        write_jsonl(folder / f"{split}.jsonl", parts[split])
    counts = {split: len(parts[split]) for split in SPLITS}
    meta = {"format": CACHE_FORMAT_VERSION, "seed": entry.seed, "counts": counts, "source": entry.spec.source}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return counts


def load_split(name: str, split: str, cache_dir=None, limit: int | None = None) -> list[Example]:
    """Examples of one split, deterministic for a task; `limit` takes a class-balanced subset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = _entry(name, cache_dir)
    if name not in _BUILTIN:  # user files are small and may change: always rebuilt
        examples = build_splits(name, cache_dir)[split]
    else:
        folder = cache_root(cache_dir) / name
        if not _cached_is_fresh(folder, entry):
            _materialise(name, cache_dir)
        examples = read_jsonl(folder / f"{split}.jsonl")
    if limit is None:
        return examples
    return balanced_subset(examples, limit, entry.seed, by_label=entry.spec.kind == "classify")


def prepare_all(cache_dir=None, tasks=None, progress=True, fetch_bigbench=False,
                bigbench_sdist=None) -> dict[str, dict[str, int]]:
    """Materialise every split of `tasks` (default: all built-ins) into the cache; returns counts.

    With tasks=None, BIG-bench tasks are skipped (with a note) when their files are absent and
    `fetch_bigbench` is false; a task named explicitly raises MissingDataError instead.
    """
    from tqdm.auto import tqdm

    cache = cache_root(cache_dir)
    names = list(tasks) if tasks is not None else list(_BUILTIN)
    entries = [_entry(name, cache_dir) for name in names]
    if any(e.needs_bigbench for e in entries) and bb.missing_files(cache):
        if fetch_bigbench or bigbench_sdist is not None:
            bb.fetch_bigbench(cache, Path(bigbench_sdist) if bigbench_sdist else None)
        elif tasks is None:
            skipped = [e.spec.name for e in entries if e.needs_bigbench]
            tqdm.write(f"skipping {', '.join(skipped)}: {bb.FETCH_HINT}")
            names = [e.spec.name for e in entries if not e.needs_bigbench]
        else:
            raise MissingDataError(bb.FETCH_HINT)
    counts = {}
    for name in tqdm(names, desc="preparing tasks", disable=not progress):
        counts[name] = _materialise(name, cache_dir)
    return counts
