"""Score a task adapter on encoded examples, exactly as serving scores requests.

Classification: rank classification by label log-likelihood (``talora.adapters.runtime.scoring``).
Extractive QA: greedy decoding on the cached path (``talora.adapters.runtime.decoding``) (stops at the
end-of-sequence token or a newline), then SQuAD exact match and token F1.

``zero_shot_answers`` is the reference an extract adapter has to beat: the frozen model alone
(Hugging Face ``generate``, no adapter) answering the same encoded prompts.
"""

from __future__ import annotations

import torch

from talora.adapters.model.talora_model import PrefixKV, SlotKV, TaloraModel
from talora.adapters.runtime.decoding import greedy_generate
from talora.adapters.runtime.scoring import ScoreRequest, score_labels
from talora.adapters.train.data import EncodedTask
from talora.adapters.train.metrics import accuracy, exact_match, macro_f1, majority_rate, token_f1


def _task_tables(model: TaloraModel, task: str) -> tuple[PrefixKV, SlotKV]:
    prefix = model.shared_kv()
    return prefix, model.task_slots(prefix, [task])


@torch.no_grad()
def label_scores(model: TaloraModel, task: EncodedTask, batch_size: int) -> list[torch.Tensor]:
    """Label log-likelihoods ``(labels,)`` of every example of ``task``, in order."""
    prefix, slots = _task_tables(model, task.name)
    out: list[torch.Tensor] = []
    for start in range(0, len(task.examples), batch_size):
        chunk = task.examples[start:start + batch_size]
        out += score_labels(model, prefix, slots, [ScoreRequest(ex.prompt_ids, task.label_ids, 0) for ex in chunk])
    return out


def predict_labels(model: TaloraModel, task: EncodedTask, batch_size: int) -> list[str]:
    """Predicted label of every example of ``task`` (argmax of label log-likelihood)."""
    return [task.labels[int(scores.argmax())] for scores in label_scores(model, task, batch_size)]


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return ids | ({newline[0]} if len(newline) == 1 else set())


@torch.no_grad()
def predict_answers(model: TaloraModel, task: EncodedTask, tokenizer, batch_size: int,
                    max_new_tokens: int) -> list[str]:
    """Greedy answer text of every example of an extract ``task``."""
    prefix, slots = _task_tables(model, task.name)
    stop = _stop_ids(tokenizer)
    answers: list[str] = []
    for start in range(0, len(task.examples), batch_size):
        chunk = task.examples[start:start + batch_size]
        out = greedy_generate(model, prefix, slots, [ex.prompt_ids for ex in chunk], [0] * len(chunk),
                              max_new_tokens, stop)
        answers.extend(tokenizer.decode(ids).split("\n")[0].strip() for ids in out)
    return answers


@torch.no_grad()
def zero_shot_tokens(model_folder, prompts: list[list[int]], stop: set[int], batch_size: int, max_new_tokens: int,
                     pad_id: int, dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """Greedy continuation of each prompt by the frozen model alone (no adapter; Hugging Face
    ``generate`` with left padding), stop tokens excluded."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).eval()
    out_ids: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=sorted(stop), pad_token_id=pad_id)
        for row in out[:, width:].tolist():
            out_ids.append(row[:next((i for i, t in enumerate(row) if t in stop), len(row))])
    return out_ids


def zero_shot_answers(model_folder, task: EncodedTask, tokenizer, batch_size: int, max_new_tokens: int,
                      dtype: torch.dtype = torch.float32) -> list[str]:
    """Greedy answer text of the frozen model alone for every example of an extract ``task``: the
    same prompt tokens, stop tokens and answer clean-up as ``predict_answers``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = zero_shot_tokens(model_folder, [ex.prompt_ids for ex in task.examples], _stop_ids(tokenizer), batch_size,
                           max_new_tokens, pad, dtype)
    return [tokenizer.decode(ids).split("\n")[0].strip() for ids in out]


def answer_scores(answers: list[str], task: EncodedTask) -> dict:
    """Exact match and token F1 of ``answers`` against ``task``'s gold answers."""
    em = [exact_match(p, ex.answers) for p, ex in zip(answers, task.examples)]
    f1 = [token_f1(p, ex.answers) for p, ex in zip(answers, task.examples)]
    return {"examples": len(answers), "exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1),
            "predictions": answers}


def evaluate_task(model: TaloraModel, task: EncodedTask, tokenizer, batch_size: int = 16,
                  max_new_tokens: int = 24) -> dict:
    """Metrics of ``model`` on the encoded examples of ``task``; includes the example count and
    ``predictions``, one per example (the label index for classification, the answer text for
    extraction), for per-item comparisons."""
    was_training = model.training
    model.eval()
    try:
        if task.kind == "classify":
            gold = [ex.label for ex in task.examples]
            pred = predict_labels(model, task, batch_size)
            return {"examples": len(gold), "accuracy": accuracy(gold, pred),
                    "macro_f1": macro_f1(gold, pred, task.labels), "majority_rate": majority_rate(gold),
                    "predictions": [task.labels.index(p) for p in pred]}
        return answer_scores(predict_answers(model, task, tokenizer, batch_size, max_new_tokens), task)
    finally:
        model.train(was_training)
