"""The benchmark request set: real task inputs, a fixed length distribution, task popularity.

One request set is built once (fixed seed) and served by every setup of ``serve_bench``: the
same input tokens in the same order. Only the task of each request changes between the task
mixes (one task, N tasks uniform, N tasks with Zipf popularity), and the task draw is seeded too.

    texts = real_task_texts(["tweet_sentiment", "bbc_topic"], per_task=64)
    requests = build_request_set(texts, encode, num_requests=256, min_tokens=16, max_tokens=128)
    task_ids = assign_tasks(len(requests), num_tasks=64, popularity="zipf", seed=0)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

POPULARITIES = ("uniform", "zipf")


@dataclass(frozen=True)
class BenchRequest:
    """One request: its input token ids and the real task its text came from."""

    request_id: int
    input_ids: tuple[int, ...]  # (T,) with min_tokens <= T <= max_tokens
    source_task: str


def zipf_weights(num_tasks: int, exponent: float = 1.0) -> list[float]:
    """Popularity of task ranks 1..num_tasks, proportional to ``rank ** -exponent``, summing to 1."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks: must be >= 1, got {num_tasks}")
    raw = [rank ** -exponent for rank in range(1, num_tasks + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def assign_tasks(num_requests: int, num_tasks: int, popularity: str = "uniform", seed: int = 0,
                 exponent: float = 1.0) -> list[int]:
    """Task index in ``[0, num_tasks)`` of each request, drawn i.i.d. from the popularity law."""
    if popularity not in POPULARITIES:
        raise ValueError(f"popularity: must be one of {POPULARITIES}, got {popularity!r}")
    weights = zipf_weights(num_tasks, exponent) if popularity == "zipf" else [1.0] * num_tasks
    rng = random.Random(seed)
    return rng.choices(range(num_tasks), weights=weights, k=num_requests)


def build_request_set(texts: dict[str, list[str]], encode: Callable[[str], list[int]],
                      num_requests: int = 256, min_tokens: int = 16, max_tokens: int = 128,
                      seed: int = 0) -> list[BenchRequest]:
    """``num_requests`` requests with lengths uniform in ``[min_tokens, max_tokens]``.

    Each request takes texts of one source task (chosen round-robin) in a seeded order, encodes
    them and concatenates until the drawn length is reached, then cuts to exactly that length.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"token range: need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    sources = sorted(name for name, items in texts.items() if items)
    if not sources:
        raise ValueError("texts: no source task has any text")
    rng = random.Random(seed)
    cursors = {name: rng.randrange(len(texts[name])) for name in sources}
    requests = []
    for request_id in range(num_requests):
        source = sources[request_id % len(sources)]
        length = rng.randint(min_tokens, max_tokens)
        ids: list[int] = []
        for _ in range(1000):  # a source of empty encodings must not loop forever
            if len(ids) >= length:
                break
            ids.extend(encode(texts[source][cursors[source]]))
            cursors[source] = (cursors[source] + 1) % len(texts[source])
        if len(ids) < length:
            raise ValueError(f"texts[{source!r}]: encodes to too few tokens")
        requests.append(BenchRequest(request_id, tuple(ids[:length]), source))
    return requests


def real_task_texts(task_names: list[str] | None = None, per_task: int = 64,
                    split: str = "test") -> dict[str, list[str]]:
    """Rendered model prompts of real task examples (``talora.adapters.tasks``), by task name.

    Tasks whose data is not installed are skipped; the caller gets whatever is available.
    """
    from talora.adapters.data import MissingDataError, get_task, list_tasks, load_split, render_prompt

    texts = {}
    for name in task_names or list_tasks():
        try:
            examples = load_split(name, split, limit=per_task)
        except (MissingDataError, FileNotFoundError, ValueError, KeyError):
            continue
        spec = get_task(name)
        texts[name] = [render_prompt(spec, example) for example in examples]
    return texts


def real_request_set(tokenizer, num_requests: int, min_tokens: int = 16, max_tokens: int = 128, seed: int = 0,
                     per_task: int = 32) -> list[BenchRequest]:
    """``build_request_set`` over ``per_task`` real inputs of every installed task, encoded by ``tokenizer``
    (a Hugging Face tokenizer, no special tokens): the request set of serve_bench, load_test and memory_scale."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return build_request_set(real_task_texts(per_task=per_task), encode, num_requests, min_tokens, max_tokens, seed)


def save_request_set(path: Path, requests: list[BenchRequest], task_ids: list[int]) -> None:
    """One JSON line per request: id, input ids, source task and benchmark task index."""
    with open(path, "w", encoding="utf-8") as handle:
        for request, task_id in zip(requests, task_ids, strict=True):
            handle.write(json.dumps({**asdict(request), "task_id": task_id}) + "\n")


def load_request_set(path: Path) -> tuple[list[BenchRequest], list[int]]:
    requests, task_ids = [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            task_ids.append(row.pop("task_id"))
            requests.append(BenchRequest(row["request_id"], tuple(row["input_ids"]), row["source_task"]))
    return requests, task_ids


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive chunks of at most ``batch_size`` request indices."""
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def grouped_by_task(task_ids: list[int], batch_size: int) -> list[list[int]]:
    """Batches that each hold one task only (tasks in first-seen order): how PEFT serves."""
    order: dict[int, list[int]] = {}
    for index, task in enumerate(task_ids):
        order.setdefault(task, []).append(index)
    return [chunk for members in order.values() for chunk in batches(members, batch_size)]
