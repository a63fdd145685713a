"""Fetch the few BIG-bench task files we use, and read them into examples.

BIG-bench 1.0.0 is a 358 MB sdist that must not be pip-installed. We fetch it with
`pip download --no-deps` and copy only `BIGBENCH_FILES` into `<cache>/bigbench/`.

Trap: pip 23+ rejects the sdist after downloading it, because its generated metadata
declares a `bleurt @ file://...` dependency ("Distributions from PyPI cannot declare direct
URL dependencies"), so no archive lands in `-d`. With `--no-clean` and TMPDIR pointed at a
staging folder, pip leaves the unpacked source tree behind; we copy the task files from it
and delete the tree. A local `bigbench-1.0.0.tar.gz` (from any pip that accepts it) also works.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .sources_pkg import MissingDataError, clean_text
from .spec import Example

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
TASKS_PREFIX = "bigbench/benchmark_tasks/"
BIGBENCH_FILES = (
    "vitaminc_fact_verification/task.json",
    "presuppositions_as_nli/task.json",
    "intent_recognition/task.json",
    "multiemo/all_text_zh/task.json",
    "squad_shifts/squaddev_v1.1.json",
)
FETCH_HINT = (
    "BIG-bench task files are not in the cache; run: python -m talora.adapters.data prepare --with-bigbench "
    "(downloads the 358 MB bigbench==1.0.0 sdist once), or: scripts/install_data.sh --with-bigbench"
)


def bigbench_dir(cache: Path) -> Path:
    return cache / "bigbench"


def missing_files(cache: Path) -> list[str]:
    return [rel for rel in BIGBENCH_FILES if not (bigbench_dir(cache) / rel).exists()]


def _copy_atomic(source, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(source, out)
    os.replace(tmp, dest)


def extract_from_sdist(sdist: Path, cache: Path) -> list[str]:
    """Copy the wanted task files out of a bigbench sdist; returns the ones still missing."""
    wanted = set(missing_files(cache))
    with tarfile.open(sdist, "r:*") as archive:
        for member in archive:
            if not member.isfile() or TASKS_PREFIX not in member.name:
                continue
            rel = member.name.split(TASKS_PREFIX, 1)[1]
            if rel in wanted:
                # The destination is built from our own constant, never from the member name.
                _copy_atomic(archive.extractfile(member), bigbench_dir(cache) / rel)
                wanted.discard(rel)
                if not wanted:
                    break
    return sorted(wanted)


def extract_from_tree(tasks_root: Path, cache: Path) -> list[str]:
    for rel in missing_files(cache):
        source = tasks_root / rel
        if source.exists():
            with open(source, "rb") as handle:
                _copy_atomic(handle, bigbench_dir(cache) / rel)
    return missing_files(cache)


def _pip_download(download_dir: Path, staging: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", BIGBENCH_REQUIREMENT,
               "-d", str(download_dir)]
    env = dict(os.environ, TMPDIR=str(staging))
    return subprocess.run(command, env=env, capture_output=True, text=True)


def fetch_bigbench(cache: Path, sdist: Path | None = None) -> None:
    """Make every file of BIGBENCH_FILES present under `<cache>/bigbench/` (no-op when they are)."""
    if not missing_files(cache):
        return
    downloads = cache / "downloads"
    sdist = sdist or next(iter(sorted(downloads.glob("bigbench-1.0.0.tar*"))), None)
    if sdist is not None:
        left = extract_from_sdist(Path(sdist), cache)
        if left:
            raise MissingDataError(f"{sdist} lacks {left}; is it bigbench 1.0.0?")
        return
    staging = cache / "downloads" / "pip-staging"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        result = _pip_download(downloads, staging)
        archives = sorted(downloads.glob("bigbench-1.0.0.tar*"))
        trees = sorted(staging.glob("pip-download-*/bigbench*/bigbench/benchmark_tasks"))
        if archives:
            left = extract_from_sdist(archives[0], cache)
        elif trees:
            left = extract_from_tree(trees[0], cache)
        else:
            raise MissingDataError(f"pip download of {BIGBENCH_REQUIREMENT} failed:\n{result.stderr[-2000:]}")
        if left:
            raise MissingDataError(f"the downloaded {BIGBENCH_REQUIREMENT} lacks {left}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_task_json(cache: Path, rel: str) -> dict:
    path = bigbench_dir(cache) / rel
    if not path.exists():
        raise MissingDataError(FETCH_HINT)
    return json.loads(path.read_text(encoding="utf-8"))


def _multiple_choice(cache: Path, rel: str, label_map: dict[str, str], text_of) -> list[Example]:
    examples = []
    for row in read_task_json(cache, rel)["examples"]:
        gold = [choice for choice, score in row["target_scores"].items() if score > 0]
        if len(gold) == 1 and gold[0] in label_map:
            text = text_of(row["input"])
            if text:
                examples.append(Example(text=text, label=label_map[gold[0]]))
    return examples


def _vitaminc_text(raw: str) -> str:
    passage, _, claim = raw.partition("\nClaim:")
    return f"{clean_text(passage)}\nClaim: {clean_text(claim)}" if claim else ""


def read_vitaminc(cache: Path) -> list[Example]:
    labels = {"True": "true", "False": "false", "Neither": "neither"}
    return _multiple_choice(cache, BIGBENCH_FILES[0], labels, _vitaminc_text)


def _presupposition_text(raw: str) -> str:
    body = raw.split("The answer is:")[0]
    first, _, second = body.partition("\nSentence 2:")
    first = clean_text(first.replace("Sentence 1:", "", 1))
    return f"Sentence 1: {first}\nSentence 2: {clean_text(second)}" if second else ""


def read_presuppositions(cache: Path) -> list[Example]:
    labels = {name: name for name in ("entailment", "neutral", "contradiction")}
    return _multiple_choice(cache, BIGBENCH_FILES[1], labels, _presupposition_text)


INTENT_LABELS = (
    "add_to_playlist", "book_restaurant", "get_weather", "play_music",
    "search_screening_event", "search_creative_work", "rate_book",
)


def read_intent(cache: Path) -> list[Example]:
    labels = {name: name for name in INTENT_LABELS}
    return _multiple_choice(cache, BIGBENCH_FILES[2], labels, lambda raw: clean_text(raw.replace("Utterance:", "", 1)))


def read_multiemo_zh(cache: Path) -> list[Example]:
    labels = {name: name for name in ("positive", "negative", "neutral", "ambivalent")}
    return _multiple_choice(cache, BIGBENCH_FILES[3], labels, clean_text)


def read_squad_dev(cache: Path) -> list[tuple[str, Example]]:
    """SQuAD v1.1 dev as (article title, example) pairs; answers deduplicated in order."""
    pairs = []
    for article in read_task_json(cache, BIGBENCH_FILES[4])["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"].strip()
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                if answers:
                    ex = Example(text=context, label=answers[0], question=qa["question"].strip(), answers=answers)
                    pairs.append((article["title"], ex))
    return pairs
