"""User tasks from a JSONL ({"text": ..., "label": ...} per line) or CSV (text,label columns) file.

`make_file_task` validates the file and returns a `TaskEntry` whose splits are a seeded,
stratified 80/10/10 cut of the file, so a user adds a task without writing code:
`python -m talora.adapters.data add my_reviews.csv --name reviews`. An extractive task
(`kind="extract"`) has a `question` column too, its `label` is the answer, a span of the text, and
its splits keep each text's questions together. Every refusal names the row (1-based, blank lines
not counted) where one is at fault; `duplicate_rows` finds repeated texts (the file task drops
them, `dedupe`; the server's training API refuses them).
"""
from __future__ import annotations

import csv
import json
import re
import zlib
from pathlib import Path

from .catalog import TaskEntry
from .spec import Example, TaskSpec
from .splits import SplitPolicy, dedupe, group_split, stratified_split

MIN_EXAMPLES = 10
MIN_PER_LABEL = 2
FILE_POLICY = SplitPolicy(dev_fraction=0.1, test_fraction=0.1, max_dev=1000, max_test=2000)
FILE_KINDS = ("classify", "extract")


def _rows_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _rows_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _blank(value) -> bool:
    return value is None or not str(value).strip()


def read_rows(path: Path, kind: str = "classify") -> list[Example]:
    """Examples from the file, in file order; ValueError naming the problem (and the row) otherwise."""
    if kind not in FILE_KINDS:
        raise ValueError(f"kind: {kind!r} is not a kind of task file ({', '.join(FILE_KINDS)})")
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"task file {path} must end in .jsonl or .csv")
    rows = _rows_jsonl(path) if suffix == ".jsonl" else _rows_csv(path)
    if not rows:
        raise ValueError(f"task file {path} is empty")
    for column in ("text", "question", "label") if kind == "extract" else ("text", "label"):
        absent = [i for i, row in enumerate(rows, start=1) if _blank(row.get(column))]
        if len(absent) == len(rows):
            raise ValueError(f"task file {path} has no {column!r} column")
        if absent:
            raise ValueError(f"task file {path}: row {absent[0]} has an empty {column!r} column")
    if kind == "classify":
        return [Example(text=str(row["text"]).strip(), label=str(row["label"]).strip()) for row in rows]
    examples = []
    for number, row in enumerate(rows, start=1):
        text, answer = str(row["text"]).strip(), str(row["label"]).strip()
        if answer not in text:
            raise ValueError(f"task file {path}: row {number}'s answer (label {answer[:40]!r}) is not a span of its "
                             "text; an extract task's answers are copied from the text")
        examples.append(Example(text=text, label=answer, question=str(row["question"]).strip(), answers=(answer,)))
    return examples


def duplicate_rows(examples: list[Example]) -> list[tuple[int, int]]:
    """``(row, first row)`` of every example whose text (and question) repeats an earlier one's; rows 1-based."""
    first: dict[tuple, int] = {}
    repeats = []
    for number, ex in enumerate(examples, start=1):
        key = (ex.text, ex.question)
        if key in first:
            repeats.append((number, first[key]))
        else:
            first[key] = number
    return repeats


def _check_labels(path: Path, examples: list[Example], labels) -> tuple[str, ...]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    if len(counts) < 2:
        raise ValueError(f"task file {path} has only one label ({next(iter(counts))!r}); a task needs at least 2")
    if labels is None:
        labels = tuple(sorted(counts))
    labels = tuple(str(label) for label in labels)
    unknown = sorted(set(counts) - set(labels))
    if unknown:
        row = next(i for i, ex in enumerate(examples, start=1) if ex.label not in labels)
        raise ValueError(f"task file {path} has labels {unknown} that are not in labels={list(labels)} "
                         f"(the first at row {row})")
    rare = sorted(label for label in labels if counts.get(label, 0) < MIN_PER_LABEL)
    if rare:
        raise ValueError(f"task file {path}: labels {rare} have fewer than {MIN_PER_LABEL} examples")
    return labels


def default_template(labels: tuple[str, ...]) -> str:
    names = [label.replace("{", "{{").replace("}", "}}") for label in labels]
    choices = ", ".join(names[:-1]) + " or " + names[-1]
    return "Text: {text}\nWhich label fits this text: " + choices + "? Answer:"


def task_name_for(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem).strip("_")
    return name or "user_task"


EXTRACT_TEMPLATE = "Context: {text}\nQuestion: {question}\nAnswer:"


def make_file_task(path, name=None, template=None, labels=None, verbalizers=None, language="en",
                   kind="classify") -> TaskEntry:
    """Validate `path` and describe it as a task; splits are built from the file on demand."""
    path = Path(path).expanduser().resolve()
    examples, _ = dedupe(read_rows(path, kind))
    if kind == "extract":
        if labels:
            raise ValueError(f"labels: an extract task has no label set (task file {path})")
        labels, verbalizers = (), {}
    else:
        labels = _check_labels(path, examples, labels)
        verbalizers = dict(verbalizers) if verbalizers else {label: " " + label for label in labels}
    if len(examples) < MIN_EXAMPLES:
        raise ValueError(f"task file {path} has {len(examples)} examples; at least {MIN_EXAMPLES} are needed")
    name = name or task_name_for(path)
    spec = TaskSpec(
        name=name, kind=kind, language=language, labels=labels, verbalizers=verbalizers,
        template=template or (EXTRACT_TEMPLATE if kind == "extract" else default_template(labels)),
        max_input_tokens=512, source=f"user file {path}", license="as stated by the file's owner",
        description=f"user task from {path.name}",
    )
    seed = zlib.crc32(name.encode("utf-8"))

    def build(cache: Path) -> dict[str, list[Example]]:
        rows, _ = dedupe(read_rows(path, kind))
        if kind == "extract":  # a text's questions stay in one split
            return group_split(rows, seed, FILE_POLICY, lambda ex: ex.text)
        return stratified_split(rows, seed, FILE_POLICY)

    return TaskEntry(spec=spec, build=build, seed=seed)
