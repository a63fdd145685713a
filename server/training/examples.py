"""A job's labelled examples, checked as ``talora-train --task-files`` checks a task file.

The examples are written as the job's task file (``examples.jsonl``) and read back through
``talora.adapters.data.file_task`` (``read_rows``, ``make_file_task``: the code that registers a
``--task-files`` file), so the API refuses what the CLI refuses, with the same words: an empty text or
label, a label outside the given label set, fewer than 2 examples of a label, fewer than 10 in all,
one label only, an extract answer that is not a span of its text. On top of the CLI, which drops
repeated texts silently, the API refuses them (``duplicate_rows``), and examples too few to give
the dev and test splits at least one example each. Rows are numbered from 1, in the order sent.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from talora.adapters.data.file_task import duplicate_rows, make_file_task, read_rows
from talora.adapters.formats.io import AdapterFormatError, check_template
from talora.server.errors import FieldError

EXAMPLES_FILE = "examples.jsonl"


class ExamplesRefused(FieldError):
    """The examples (or the task's description) cannot make a task; the message names the row or field (422)."""


def write_examples(folder: Path, examples: list[dict[str, Any]]) -> Path:
    path = Path(folder) / EXAMPLES_FILE
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in examples), encoding="utf-8")
    return path


def _plain(message: str, path: Path) -> str:
    """The file task's message about the job's file, said about the request's examples."""
    message = message.replace(f"task file {path}: ", "").replace(f"task file {path} ", "the examples ")
    message = message.replace("the examples has", "the examples have").replace("the examples is", "the examples are")
    message = message.replace(str(path), "the examples")
    return re.sub(r"\brow (\d+)", lambda m: f"row {m[1]} (examples[{int(m[1]) - 1}])", message)


def check_examples(path: Path, task: str, kind: str, labels: list[str] | None, template: str | None,
                   verbalizers: dict[str, str] | None, language: str) -> dict[str, Any]:
    """Validate the task file at ``path``; returns the split sizes and label counts, or raises
    ``ExamplesRefused`` naming the row or field at fault."""
    if template is not None:
        try:
            check_template(template)
        except AdapterFormatError as exc:
            raise ExamplesRefused("template", str(exc).removeprefix("template: ")) from None
    try:
        rows = read_rows(path, kind)
        repeats = duplicate_rows(rows)
        if repeats:
            row, first = repeats[0]
            what = "text and question" if kind == "extract" else "text"
            raise ValueError(f"row {row} has the same {what} as row {first} ({len(repeats)} repeated rows in all); "
                             "send each text once (a repeated text adds nothing, and one with two labels cannot "
                             "be learnt)")
        entry = make_file_task(path, name=task, template=template, labels=labels, verbalizers=verbalizers,
                               language=language, kind=kind)
        parts = entry.build(path.parent)
    except ValueError as exc:
        message = _plain(str(exc), path)
        field = message.partition(":")[0] if message.startswith(("labels:", "kind:")) else "examples"
        if message.startswith("TaskSpec."):
            field = message.removeprefix("TaskSpec.").partition(" ")[0]
        raise ExamplesRefused(field, message.removeprefix(f"{field}: ")) from None
    empty = [split for split, items in parts.items() if not items]
    if empty:
        raise ExamplesRefused("examples", f"{len(rows)} examples leave the {' and '.join(empty)} split empty; "
                                          "the job holds out 10% of each label for dev and 10% for test, so send "
                                          "at least 6 examples of each label (10 texts for an extract task)")
    counts = Counter(ex.label for ex in rows) if kind == "classify" else Counter()
    return {"splits": {split: len(items) for split, items in parts.items()}, "labels": dict(sorted(counts.items())),
            "spec_labels": list(entry.spec.labels), "template": entry.spec.template,
            "verbalizers": dict(entry.spec.verbalizers)}
