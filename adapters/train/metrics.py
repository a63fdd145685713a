"""Evaluation metrics: accuracy and macro-F1 for classification, SQuAD-style EM and F1 for QA."""

from __future__ import annotations

import re
import string
from collections import Counter


def accuracy(gold: list[str], pred: list[str]) -> float:
    if len(gold) != len(pred) or not gold:
        raise ValueError("gold and pred must be non-empty and of equal length")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def macro_f1(gold: list[str], pred: list[str], labels: list[str]) -> float:
    """Mean over ``labels`` of the per-label F1 (a label never gold nor predicted scores 0)."""
    if len(gold) != len(pred) or not gold:
        raise ValueError("gold and pred must be non-empty and of equal length")
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def majority_rate(gold: list[str]) -> float:
    """Accuracy of always predicting the most frequent gold label."""
    return Counter(gold).most_common(1)[0][1] / len(gold)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """Best token-overlap F1 of ``prediction`` against any gold answer."""
    return max(_f1(prediction, a) for a in answers)
