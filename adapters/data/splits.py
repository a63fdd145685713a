"""Deterministic train/dev/test splits, class-balanced subsets and the JSONL split cache.

Every function here is a pure function of its inputs and an integer seed: the same source
list in the same order gives the same splits on every machine (no `hash()`, no set order).
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .spec import Example

SPLITS = ("train", "dev", "test")
CACHE_FORMAT_VERSION = 1  # bump when a loader or the split policy changes


@dataclass(frozen=True)
class SplitPolicy:
    """How a source without an official split is cut.

    dev_fraction / test_fraction: share of each label (or group) that goes to dev / test.
    max_dev / max_test: caps in examples, so big sets keep most data for training.
    """

    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    max_dev: int = 1000
    max_test: int = 2000

    def __post_init__(self) -> None:
        for name in ("dev_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"SplitPolicy.{name} must lie in (0, 0.5)")
        for name in ("max_dev", "max_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"SplitPolicy.{name} must be >= 1")

    def fractions(self, total: int) -> tuple[float, float]:
        """(dev, test) fractions after applying the caps to a set of `total` examples."""
        dev = min(self.dev_fraction, self.max_dev / max(total, 1))
        test = min(self.test_fraction, self.max_test / max(total, 1))
        return dev, test


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Data cache folder: `cache_dir`, else `$TALORA_CACHE/data`, else `~/.cache/talora/data`."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("TALORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "talora")
    return Path(root) / "data"


def dedupe(examples: Sequence[Example]) -> tuple[list[Example], int]:
    """Drop repeated texts; a text seen with two different labels is dropped entirely.

    Returns (kept examples in first-seen order, number of texts dropped for label conflicts).
    """
    labels_by_key: dict[tuple, set[str]] = {}
    first: dict[tuple, Example] = {}
    for ex in examples:
        key = (ex.text, ex.question)
        labels_by_key.setdefault(key, set()).add(ex.label)
        first.setdefault(key, ex)
    conflicts = {key for key, labels in labels_by_key.items() if len(labels) > 1}
    kept = [ex for key, ex in first.items() if key not in conflicts]
    return kept, len(conflicts)


def _cut(items: list, dev_fraction: float, test_fraction: float) -> tuple[list, list, list]:
    n_test = round(len(items) * test_fraction)
    n_dev = round(len(items) * dev_fraction)
    return items[n_test + n_dev:], items[n_test:n_test + n_dev], items[:n_test]


def stratified_split(examples: Sequence[Example], seed: int, policy: SplitPolicy) -> dict[str, list[Example]]:
    """Per-label seeded shuffle and cut, so dev and test keep the label proportions."""
    dev_fraction, test_fraction = policy.fractions(len(examples))
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    parts: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for offset, label in enumerate(sorted(by_label)):
        items = list(by_label[label])
        random.Random(seed * 1009 + offset).shuffle(items)
        for split, chunk in zip(("train", "dev", "test"), _cut(items, dev_fraction, test_fraction)):
            parts[split].extend(chunk)
    for offset, split in enumerate(SPLITS):
        random.Random(seed + 7919 * (offset + 1)).shuffle(parts[split])
    return parts


def group_split(
    examples: Sequence[Example], seed: int, policy: SplitPolicy, group_of: Callable[[Example], str]
) -> dict[str, list[Example]]:
    """Seeded split by whole groups (e.g. a QA context passage), so no group spans two splits."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(group_of(ex), []).append(ex)
    order = list(groups)
    random.Random(seed).shuffle(order)
    dev_fraction, test_fraction = policy.fractions(len(examples))
    targets = {"test": test_fraction * len(examples), "dev": dev_fraction * len(examples)}
    parts: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for key in order:
        split = next((s for s in ("test", "dev") if len(parts[s]) < targets[s]), "train")
        parts[split].extend(groups[key])
    for offset, split in enumerate(SPLITS):
        random.Random(seed + 7919 * (offset + 1)).shuffle(parts[split])
    return parts


def balanced_subset(examples: Sequence[Example], limit: int, seed: int, by_label: bool = True) -> list[Example]:
    """`limit` examples, taken round-robin over labels in split order, then shuffled.

    Deterministic; as class-balanced as the split allows (a label that runs out leaves
    its turns to the others); the subset for a smaller limit lies inside a larger one.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit >= len(examples):
        return list(examples)
    if not by_label:  # extractive QA: labels are answers, so balance means nothing; take a prefix
        return list(examples[:limit])
    queues: dict[str, list[Example]] = {}
    for ex in examples:
        queues.setdefault(ex.label, []).append(ex)
    picked: list[Example] = []
    depth = 0
    while len(picked) < limit:
        for label in sorted(queues):
            if depth < len(queues[label]) and len(picked) < limit:
                picked.append(queues[label][depth])
        depth += 1
    random.Random(seed).shuffle(picked)
    return picked


def write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    """Write atomically, so a killed `prepare` never leaves a half split behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for ex in examples:
            handle.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as handle:
        return [Example.from_json(json.loads(line)) for line in handle if line.strip()]
