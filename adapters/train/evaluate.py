"""Score a task adapter on encoded examples, exactly as serving scores requests.

Classification: rank classification by label log-likelihood (``talora.adapters.scoring``).
Extractive QA: greedy decoding on the cached path (``talora.adapters.decoding``) (stops at the
end-of-sequence token or a newline), then SQuAD exact match and token F1.
"""

from __future__ import annotations

import torch

from talora.adapters.decoding import greedy_generate
from talora.adapters.scoring import ScoreRequest, score_labels
from talora.adapters.talora_model import PrefixKV, SlotKV, TaloraModel
from talora.adapters.train.data import EncodedTask
from talora.adapters.train.metrics import accuracy, exact_match, macro_f1, majority_rate, token_f1


def _task_tables(model: TaloraModel, task: str) -> tuple[PrefixKV, SlotKV]:
    prefix = model.shared_kv()
    return prefix, model.task_kv(prefix, *model.stacked([task]))


@torch.no_grad()
def predict_labels(model: TaloraModel, task: EncodedTask, batch_size: int) -> list[str]:
    """Predicted label of every example of ``task`` (argmax of label log-likelihood)."""
    prefix, slots = _task_tables(model, task.name)
    preds = []
    for start in range(0, len(task.examples), batch_size):
        chunk = task.examples[start:start + batch_size]
        requests = [ScoreRequest(ex.prompt_ids, task.label_ids, 0) for ex in chunk]
        for scores in score_labels(model, prefix, slots, requests):
            preds.append(task.labels[int(scores.argmax())])
    return preds


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
        pred = predict_answers(model, task, tokenizer, batch_size, max_new_tokens)
        em = [exact_match(p, ex.answers) for p, ex in zip(pred, task.examples)]
        f1 = [token_f1(p, ex.answers) for p, ex in zip(pred, task.examples)]
        return {"examples": len(pred), "exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1),
                "predictions": pred}
    finally:
        model.train(was_training)
