"""Source-stage weights of the quality benchmark, committed so that every machine starts its target
runs from the same build of a source stage.

A source stage retrained on another machine is another build (other CPU kernels give other last
bits, and hundreds of steps amplify them): target runs from it are not comparable with the stored
ones. So each finished source stage's weights (a few hundred KB: a TA-LoRA bundle's tensors and
metadata, or a PEFT source file) are copied to ``benchmarks/results/quality/sources/<key>/<build>/``
and committed beside the run records. A machine without the weights restores them from there
(the build the source stage's stored record scored when it is there, else the committed rebuild)
instead of retraining; only a source stage with nothing committed is trained again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.harness.paths import QUALITY_RESULTS
from benchmarks.quality.plan import TALORA_METHODS, Run, load_result, recorded_build

SOURCES = QUALITY_RESULTS / "sources"


def weight_files(folder: Path) -> list[Path]:
    """A source stage's weights: a TA-LoRA bundle's tensors, or a PEFT source file."""
    bundle = Path(folder) / "bundle"
    return sorted(bundle.glob("*.safetensors")) if bundle.is_dir() else sorted(Path(folder).glob("source.safetensors"))


def source_layout(folder: Path) -> list[str]:
    """The files that make a source stage's weights loadable, relative to its folder: a TA-LoRA
    bundle (tensors and metadata), or a PEFT source file."""
    folder = Path(folder)
    bundle = folder / "bundle"
    if bundle.is_dir():
        return sorted(str(p.relative_to(folder)) for p in bundle.iterdir() if p.is_file())
    return ["source.safetensors"] if (folder / "source.safetensors").is_file() else []


def artifact_build(folder: Path) -> str:
    """16 hex digits of sha256 over a source stage's weight files: which build of a source stage a
    target run started from. A source stage retrained on another machine is not bit-identical (other
    CPU kernels), so a target run records the build it used, and a stored record the build it scored."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def weights_here(run: Run, artifacts: Path) -> bool:
    """Whether source run ``run``'s weights are in ``artifacts``."""
    name = "bundle" if run.method in TALORA_METHODS else "source.safetensors"
    return (Path(artifacts) / run.key / name).exists()


def source_builds(plan: list[Run], runs_dir: Path, artifacts: Path | None = None,
                  store: Path | None = None) -> dict[str, str | None]:
    """For each source stage of ``plan``, the build its target runs start from here: the weights in
    ``artifacts``; else the committed build in ``store`` that a run would restore; else the build
    the stored record scored (None: no record). Without ``artifacts`` and ``store``: the recorded
    builds, which the published summary always uses."""
    builds: dict[str, str | None] = {}
    for run in plan:
        if run.stage != "source":
            continue
        recorded = recorded_build(load_result(runs_dir, run.key))
        if artifacts is not None and weights_here(run, artifacts):
            builds[run.key] = artifact_build(Path(artifacts) / run.key)
        elif store is not None and (found := preferred_build(store, run.key, recorded or "")) is not None:
            builds[run.key] = found
        else:
            builds[run.key] = recorded
    return builds


def committed_builds(store: Path, key: str) -> list[str]:
    """The builds of source stage ``key`` committed under ``store``, sorted."""
    folder = Path(store) / key
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))  # not scratch


def preferred_build(store: Path, key: str, recorded: str) -> str | None:
    """The committed build a machine without weights restores: the one the stored record scored,
    else the first committed rebuild; None when nothing is committed."""
    builds = committed_builds(store, key)
    if recorded in builds:
        return recorded
    return builds[0] if builds else None


def commit(artifacts: Path, key: str, store: Path) -> str:
    """Copy the weights of source stage ``key`` from ``artifacts`` into ``store``; returns the
    build. A build already committed is left as it is."""
    src = Path(artifacts) / key
    build = artifact_build(src)
    dest = Path(store) / key / build
    if not dest.exists():
        _copy_atomically(src, dest)
    return build


def restore(store: Path, key: str, build: str, artifacts: Path) -> None:
    """Put committed build ``build`` of source stage ``key`` where the runs read it."""
    dest = Path(artifacts) / key
    src = Path(store) / key / build
    if not src.is_dir():
        raise FileNotFoundError(f"no committed build {build} of source stage {key} in {store}")
    _copy_atomically(src, dest)
    found = artifact_build(dest)
    if found != build:  # a damaged or hand-edited copy: never train from it silently
        raise ValueError(f"source stage {key}: committed build {build} hashes to {found}")


def restore_preferred(run: Run, runs_dir: Path, store: Path, artifacts: Path) -> str | None:
    """Restore source stage ``run``'s ``preferred_build`` (the one its stored record scored, else a
    committed rebuild) into ``artifacts``; the build restored, or None when nothing is committed."""
    build = preferred_build(store, run.key, recorded_build(load_result(runs_dir, run.key)) or "")
    if build is not None:
        restore(store, run.key, build, artifacts)
    return build


def _copy_atomically(src: Path, dest: Path) -> None:
    """Copy the weight layout of one source stage (``source_layout``) from ``src`` to a new folder
    ``dest`` through a scratch folder renamed into place, so that a reader sees all of it or none.
    Whatever is at ``dest`` is replaced (the callers hold the source stage's claim)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for rel in source_layout(src):
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, scratch / rel)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(scratch, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["SOURCES", "artifact_build", "commit", "committed_builds", "preferred_build", "restore", "source_builds",
           "source_layout", "weight_files", "weights_here"]
