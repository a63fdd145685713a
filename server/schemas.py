"""Request bodies of the HTTP API (pydantic); a malformed body is a 422 that names the field."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > 4:
        raise ValueError("at most 4 stop strings")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


class PredictRequest(BaseModel):
    """``POST /v1/tasks/{task}/predict``."""

    model_config = ConfigDict(extra="forbid")

    text: str | list[str] = Field(description="one text, or a list of texts scored with the same version")
    question: str | None = Field(None, description="fills {question} in templates that have one")

    @field_validator("text")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one text")
        return value


class GenerateRequest(BaseModel):
    """``POST /v1/tasks/{task}/generate``."""

    model_config = ConfigDict(extra="forbid")

    text: str
    question: str | None = None
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the generation")
    stream: bool = Field(False, description="send server-sent events as tokens are generated")
    seed: int | None = Field(None, description="seed of this request's sampler (reproducible sampling)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        return _stop_list(value)


class CompletionRequest(BaseModel):
    """OpenAI ``POST /v1/completions``; ``model`` is the task name. Unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool | None = Field(False, description="not supported (must be false)")
    logprobs: int | None = Field(None, description="not supported (must be null)")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        return _stop_list(value)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one prompt")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value
