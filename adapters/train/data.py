"""Training data: tasks encoded once into token rows, and a seeded mixed-task batch sampler.

Each example becomes ``EncodedExample(prompt_ids, target_ids)``: the task template filled with
the (truncated) text, encoded exactly as serving encodes it (``talora.adapters.runtime.prompting``), and
the answer tokens that follow it: the label's verbaliser for classification, the answer span
plus the end-of-sequence token for extractive QA (so greedy decoding learns where to stop).
The sampler draws each batch slot's task from ``p_t ∝ size_t ** (1/T)`` and an example of that
task uniformly, from one ``torch.Generator`` whose state goes into checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from talora.adapters.runtime.prompting import encode_prompt, verbalizer_ids


@dataclass
class EncodedExample:
    prompt_ids: list[int]  # rendered template, ends where the answer starts
    target_ids: list[int]  # answer tokens the loss is taken on
    label: str  # gold label (classify) or first gold answer (extract)
    answers: tuple[str, ...] = ()  # every gold answer (extract)


@dataclass
class EncodedTask:
    """One task ready for training and scoring."""

    name: str
    kind: str  # "classify" | "extract"
    labels: list[str]
    verbalizers: dict[str, str]
    template: str
    max_input_tokens: int  # the truncation actually used; recorded in the task file
    examples: list[EncodedExample] = field(default_factory=list)
    label_ids: list[list[int]] = field(default_factory=list)  # verbaliser tokens, label order
    cut: int = 0  # examples whose text (or question) was cut to max_input_tokens

    def export_fields(self) -> dict:
        """Keyword arguments of ``export_task`` describing this task."""
        return dict(kind=self.kind, labels=list(self.labels), verbalizers=dict(self.verbalizers),
                    template=self.template, max_input_tokens=self.max_input_tokens)


def encode_task(spec, examples, tokenizer, max_input_tokens: int) -> EncodedTask:
    """Encode registry ``examples`` of ``spec`` (a ``TaskSpec``) with ``tokenizer``."""
    limit = min(max_input_tokens, spec.max_input_tokens)
    labels = list(spec.labels)
    task = EncodedTask(spec.name, spec.kind, labels, dict(spec.verbalizers), spec.template, limit)
    if spec.kind == "classify":
        task.label_ids = verbalizer_ids(tokenizer, labels, spec.verbalizers)
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt, cut = encode_prompt(tokenizer, spec.template, ex.text, limit, ex.question)
        task.cut += cut
        if spec.kind == "classify":
            target = task.label_ids[labels.index(ex.label)]
        else:
            target = tokenizer(" " + ex.label.strip(), add_special_tokens=False)["input_ids"]
            target = target + ([eos] if eos is not None else [])
        task.examples.append(EncodedExample(prompt, list(target), ex.label, tuple(ex.answers) or (ex.label,)))
    return task


def text_lengths(tokenizer, examples) -> list[int]:
    """Token count of each example's text, the part ``max_input_tokens`` cuts (the template's own
    tokens come on top and are never cut)."""
    return [len(tokenizer(ex.text, add_special_tokens=False)["input_ids"]) for ex in examples]


def task_weights(sizes: list[int], sampling: str, temperature: float) -> torch.Tensor:
    """Sampling probability of each task: proportional to size, or to ``size ** (1/T)``."""
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    weights = sizes_t ** power
    return weights / weights.sum()


def label_groups(task: EncodedTask) -> list[list[int]] | None:
    """Example indices of each label of a classification task (for class-balanced draws)."""
    if task.kind != "classify":
        return None
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(task.examples):
        groups.setdefault(ex.label, []).append(i)
    return list(groups.values())


class MixedTaskSampler:
    """Seeded draws of ``(task index, example index)`` pairs; ``state_dict`` for resuming.

    In a distributed run every rank builds its own sampler with ``seed + rank``, so ranks see
    different batches and the run is still reproducible.
    """

    def __init__(self, sizes: list[int], sampling: str, temperature: float, seed: int,
                 label_groups: list[list[list[int]] | None] | None = None):
        """``label_groups[t]``: example indices of each label of task t; when given (not None) an
        example of task t is drawn by picking a label uniformly, then an example of that label."""
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"tasks: every task needs training examples, got sizes {sizes}")
        self.sizes = list(sizes)
        self.label_groups = label_groups or [None] * len(sizes)
        self.probs = task_weights(sizes, sampling, temperature)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, batch_size: int) -> list[tuple[int, int]]:
        tasks = torch.multinomial(self.probs, batch_size, replacement=True, generator=self.generator).tolist()
        picks = []
        for task in tasks:
            groups = self.label_groups[task]
            if groups:
                group = groups[int(torch.randint(len(groups), (1,), generator=self.generator))]
                index = group[int(torch.randint(len(group), (1,), generator=self.generator))]
            else:
                index = int(torch.randint(self.sizes[task], (1,), generator=self.generator))
            picks.append((task, index))
        return picks

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def k_shot(examples, shots: int, kind: str, seed: int):
    """``shots`` examples per label (classify) or ``shots`` in all (extract), seeded."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    if kind != "classify":
        return [examples[i] for i in order[:shots]]
    taken: dict[str, int] = {}
    picked = []
    for i in order:
        label = examples[i].label
        if taken.get(label, 0) < shots:
            taken[label] = taken.get(label, 0) + 1
            picked.append(examples[i])
    return picked
