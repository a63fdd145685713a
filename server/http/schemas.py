"""Request and response bodies of the HTTP API (pydantic).

Requests are strict: JSON types are not coerced (``"5"`` is not an integer, ``0`` is not a
boolean), every bound is one the engine can take (a seed fits torch's 64-bit generator seed,
``top_p`` is in (0, 1], texts are valid Unicode with something besides whitespace), and the
schema itself says so, so that ``/openapi.json`` describes exactly what the server accepts. The
limits that come from ``Settings`` (texts per request, ``max_new_tokens``) are written into the
served OpenAPI document by ``openapi.py``. A malformed body is a 422 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_TEXT_CHARS = 100_000  # per text; longer inputs are cut to the task's max_input_tokens anyway
MAX_STOPS = 4
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate such as \\ud800)") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain a character that is not whitespace")
    return value


Utf8 = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_valid_unicode)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=r"\S"),
                 AfterValidator(_valid_unicode), AfterValidator(_not_blank)]
StopString = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_valid_unicode)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None
Seed = Annotated[int, Field(ge=0, lt=SEED_MAX + 1, description="seed of this request's sampler (reproducible "
                                                           "sampling); 0 .. 2**64-1")]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False, description="0: greedy")]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, description="nucleus: keep the most likely "
                              "tokens up to this probability mass (always at least one)")]
TopK = Annotated[int, Field(ge=0, lt=2**31, description="keep only the k most likely tokens (0: no limit)")]
MAX_TEXTS = 4096  # the most texts any server takes (max_texts_per_request is at most this); validation stops here
TextBatch = Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)]  # maxItems: the server's limit


def stop_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(_Strict):
    """``POST /v1/tasks/{task}/predict``."""

    text: Text | TextBatch = Field(description="one text, or a list of texts scored with the same version")
    question: Utf8 | None = Field(None, description="fills {question} in templates that have one")


class GenerateRequest(_Strict):
    """``POST /v1/tasks/{task}/generate``."""

    text: Text
    question: Utf8 | None = None
    max_new_tokens: int = Field(64, ge=1, description="at most the server's max_new_tokens_limit")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    stop: Stop = Field(None, description=f"a string or up to {MAX_STOPS} that end the generation")
    stream: bool = Field(False, description="send server-sent events as tokens are generated")
    seed: Seed | None = None


class CompletionRequest(BaseModel):
    """OpenAI ``POST /v1/completions``; ``model`` is the task name. Unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, description="the task name")
    prompt: Text | TextBatch
    max_tokens: int | None = Field(16, ge=1, description="at most the server's max_new_tokens_limit")
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: TopK | None = Field(0, description="not an OpenAI field (vLLM's): keep the k most likely tokens, 0: all")
    n: Literal[1] | None = Field(1, description="only 1 is supported")
    stream: bool | None = False
    stop: Stop = None
    seed: Seed | None = None
    echo: Literal[False] | None = Field(False, description="not supported (must be false)")
    logprobs: None = Field(None, description="not supported (must be null)")
    best_of: Literal[1] | None = Field(None, description="only 1 is supported")
    question: Utf8 | None = Field(None, description="talora extension: fills {question} in templates that have one "
                                                    "(the prompt fills {text}); OpenAI clients pass it in extra_body")


# ----- responses ---------------------------------------------------------------------------------
class Prediction(BaseModel):
    label: str
    scores: dict[str, float] = Field(description="log-likelihood of each label")
    probabilities: dict[str, float] = Field(description="softmax of the scores over the labels")
    truncated: bool


class PredictOne(Prediction):
    task: str
    version: str


class _TaskAnswer(BaseModel):
    task: str
    version: str


class PredictMany(_TaskAnswer):
    results: list[Prediction]


class GenerateResult(_TaskAnswer):
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    truncated: bool


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """OpenAI ``text_completion``; ``system_fingerprint`` is the adapter version."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class Health(BaseModel):
    status: Literal["ok", "dead"]


class Ready(BaseModel):
    ready: bool
    tasks: int = Field(description="task adapters loaded")
    missing: list[str] = Field(default_factory=list, description="only while not empty: tasks served before the "
                               "last start that are not served now (the answer is 503 until each is loaded or "
                               "deleted)")


class FieldIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error of the task, admin and health routes."""

    detail: str = Field(description="what went wrong; starts with the field's name when one field is at fault")
    field: str | None = Field(None, description="the request field at fault, if one is")
    errors: list[FieldIssue] | None = Field(None, description="every validation error (422 only)")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIError(BaseModel):
    """Errors of ``/v1/completions`` and ``/v1/models``, in OpenAI's shape."""

    error: OpenAIErrorDetail


class BundleInfo(BaseModel):
    fingerprint: str = Field(description="of the bundle's shared parameters and base model")
    base_model: str


class TaskInfo(BaseModel):
    """A loaded task's metadata and current version."""

    task: str
    version: str
    kind: str = Field(description="classify, extract or generate")
    labels: list[str]
    verbalizers: dict[str, str]
    template: str
    max_input_tokens: int
    source: str = Field(description="where the version was loaded from (bundle, store path, upload)")
    training: dict[str, Any]
    resident: bool = Field(description="its task KV is in a device slot")


class TaskList(BaseModel):
    tasks: list[TaskInfo]
    num_slots: int
    bundle: BundleInfo


class ModelCard(BaseModel):
    """One task as an OpenAI model."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    version: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterLoaded(_TaskAnswer):
    previous_version: str | None
    changed: bool = Field(description="false when the same version was already loaded")
    source: str


class AdapterEvicted(BaseModel):
    task: str
    evicted_version: str


# ----- training jobs (routes_training.py) -------------------------------------------------------
MAX_TRAINING_EXAMPLES = 100_000  # validation stops here; the server's own limit is training_max_examples (413)
TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                                description="the task to train: a new name, or a served task to retrain")]
Version = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+@/-]{0,63}$")]
Label = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_valid_unicode)]


class TrainingExample(_Strict):
    """One labelled example, as a line of a task file: ``text`` and ``label`` (for an extract task the answer, a
    span of ``text``, and ``question``). Emptiness, repeats and labels are checked as the CLI checks a task file."""

    text: Utf8
    label: Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_valid_unicode)]
    question: Utf8 | None = None


class TrainingJobRequest(_Strict):
    """``POST /v1/training/jobs``: train a task from labelled examples (``talora-train target``'s recipe)."""

    task: TaskName
    examples: list[TrainingExample] = Field(min_length=1, max_length=MAX_TRAINING_EXAMPLES)
    kind: Literal["classify", "extract"] = "classify"
    labels: list[Label] | None = Field(None, min_length=2, max_length=256,
                                       description="the label set (default: the labels of the examples, sorted)")
    template: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        None, description="prompt template with {text} (and {question} for extract), ending where the answer starts "
                          "(default: the task-file default)")
    verbalizers: dict[Label, Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, description="text scored after the prompt for each label (default: ' ' + label)")
    language: Literal["en", "zh"] = "en"
    install: bool = Field(True, description="install the trained task into the store and serve it; false: only "
                                            "train (the job's result names the files, for PUT /v1/adapters/{task})")
    version: Version | None = Field(None, description="version of the installed task (default: a hash of its "
                                                      "tensors); must not be the version served now")
    steps: int = Field(0, ge=0, le=10_000, description="optimiser steps (0: the recipe's, by the training data)")
    eval_every: int | None = Field(None, ge=0, le=10_000, description="evaluate on dev every this many steps and "
                                   "keep the best (default: about six times per run; 0: only at the end)")
    seed: int = Field(0, ge=0, lt=2**31)


class TrainingJob(BaseModel):
    """A training job: what was asked, its state, progress and result."""

    id: str
    task: str
    kind: str
    status: Literal["queued", "running", "installing", "succeeded", "failed", "cancelled"]
    examples: int
    label_counts: dict[str, int]
    options: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: dict[str, Any] = Field(description="splits (train/dev/test sizes); while it runs: step, steps, loss, "
                                                 "dev (the last dev score), eta_s, elapsed_s")
    result: dict[str, Any] = Field(description="at the end: dev and test metrics, version, installed, path")
    error: str | None = Field(description="why it failed")


class TrainingJobList(BaseModel):
    jobs: list[TrainingJob]
