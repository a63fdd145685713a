"""Turn a task's template and a request text into token ids, the same way in training and serving.

The text (and question) are truncated to the task's ``max_input_tokens`` *before* the template
is applied, so the instruction around them is never cut. Label scoring uses each label's
verbaliser tokens, which follow the prompt directly.
"""

from __future__ import annotations


def _truncate(tokenizer, text: str, max_tokens: int) -> tuple[str, bool]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens]), True


def encode_prompt(tokenizer, template: str, text: str, max_input_tokens: int,
                  question: str | None = None) -> tuple[list[int], bool]:
    """Token ids of ``template`` filled with the (truncated) text; returns (ids, truncated)."""
    text, cut = _truncate(tokenizer, text, max_input_tokens)
    fields = {"text": text}
    if "{question}" in template:
        fields["question"] = _truncate(tokenizer, question or "", max_input_tokens)[0]
    ids = tokenizer(template.format(**fields), add_special_tokens=False)["input_ids"]
    return ids, cut


def verbalizer_ids(tokenizer, labels: list[str], verbalizers: dict[str, str]) -> list[list[int]]:
    """Token ids of each label's verbaliser, in label order; each must be non-empty."""
    out = []
    for label in labels:
        ids = tokenizer(verbalizers[label], add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"verbalizers: {label!r} encodes to no tokens")
        out.append(ids)
    return out
