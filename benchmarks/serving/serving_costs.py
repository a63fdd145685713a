"""Two small serving costs, old against new: the streaming detokeniser and the top-k sampler.

Times in one process, on the same inputs, (1) ``TextStream`` over a generation of ``--tokens``
ids of the embedded SmolLM2 tokenizer (English and Chinese text), decoding every id each token
(what it did before: the path it still takes for a tokenizer without a fast backend) against
decoding a short window; (2) ``sample_rows`` at top_k 50 over the embedded model's vocabulary
(49,152) for 1 and 64 rows, sorting the whole vocabulary (the sampler before ``topk``, kept here
as the baseline) against ``topk``. Each setup checks that old and new give the same text or
tokens, and is timed after a warm-up as the median of ``--repeats`` rounds. One JSONL row per
setup, with the machine and versions, is appended to ``--jsonl``; the ratios are printed:

    python -m benchmarks.serving.serving_costs                  # on an idle machine (CUDA when present)
    python -m benchmarks.serving.serving_costs --smoke          # tiny sizes: shows that it runs
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import torch

from benchmarks.harness.flags import add_flags, bench_parser
from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import append_jsonl, machine_info, time_repeats

TEXT = ("The engine streams each generated token to the client as soon as its text is final. "
        "机器学习是人工智能的一个分支，我们今天在北京见面，然后一起去吃饺子。 ")


class DecodeAll:
    """A tokenizer with nothing but ``decode``: ``TextStream`` decodes every id each token (the old cost)."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def full_sort_rows(logprobs: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                   keys: torch.Tensor) -> torch.Tensor:
    """The sampler before ``topk``: the whole vocabulary sorted in float64, the kept set a prefix of it."""
    from talora.server.engine.generation import race_noise

    logits = logprobs.double()
    best = logits.max(-1, keepdim=True).values
    scaled = torch.where(logits == best, 0.0, (logits - best) / temperature)
    score = scaled - race_noise(keys, logits.shape[-1])
    weights, order = torch.sort(torch.exp(scaled), dim=-1, descending=True)
    rank = torch.arange(weights.shape[-1], device=weights.device)[None, :]
    keep = ((weights.cumsum(-1) - weights) / weights.sum(-1, keepdim=True) < top_p) & ((top_k <= 0) | (rank < top_k))
    keep[:, 0] = True
    choice = torch.where(keep, score.gather(-1, order), float("-inf")).argmax(-1, keepdim=True)
    return order.gather(-1, choice)[:, 0]


def timed(run: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall seconds of ``repeats`` calls of ``run`` after one warm-up call."""
    run()
    return statistics.median(time_repeats(run, repeats, sync)["wall_s"])


def detokeniser_row(tokenizer, tokens: int, repeats: int) -> dict:
    from talora.server.engine.generation import TextStream

    ids = (tokenizer(TEXT, add_special_tokens=False)["input_ids"] * tokens)[:tokens]

    def stream(view) -> Callable[[], str]:
        def run() -> str:
            text = TextStream(view, ("<|never|>",))
            return "".join(text.push(token) for token in ids) + text.finish()
        return run

    old, new = stream(DecodeAll(tokenizer)), stream(tokenizer)
    same = old() == new() == tokenizer.decode(ids, skip_special_tokens=True)
    old_s, new_s = timed(old, repeats), timed(new, repeats)
    return {"setup": "detokeniser", "tokens": tokens, "same_output": same, "old_s": old_s, "new_s": new_s,
            "old_over_new": old_s / new_s}


def sampler_row(vocab: int, rows: int, top_k: int, device: str, repeats: int) -> dict:
    from talora.server.engine.generation import row_key, sample_rows

    gen = torch.Generator().manual_seed(rows)
    logprobs = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * 3, -1).to(device)
    temperature = torch.full((rows, 1), 0.8, dtype=torch.float64, device=device)
    top_p = torch.ones_like(temperature)
    limit = torch.full((rows, 1), top_k, dtype=torch.int64, device=device)
    keys = torch.tensor([[row_key(seed, 0)] for seed in range(rows)], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None

    def old() -> torch.Tensor:
        return full_sort_rows(logprobs, temperature, top_p, limit, keys)

    def new() -> torch.Tensor:
        return sample_rows(logprobs, temperature, top_p, limit, keys, candidates=top_k)

    same = torch.equal(old(), new())
    old_s, new_s = timed(old, repeats, sync), timed(new, repeats, sync)
    return {"setup": "sampler", "device": device, "vocab": vocab, "rows": rows, "top_k": top_k,
            "same_tokens": same, "old_s": old_s, "new_s": new_s, "old_over_new": old_s / new_s}


def run(args) -> list[dict]:
    from transformers import AutoTokenizer

    from talora.adapters.model.loading import default_model_dir

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, vocab, rows = (32, 1000, (1, 4)) if args.smoke else (args.tokens, args.vocab, (1, 64))
    repeats = 1 if args.smoke else args.repeats
    machine = machine_info(args.threads)
    results = [detokeniser_row(AutoTokenizer.from_pretrained(default_model_dir()), tokens, repeats)]
    results += [sampler_row(vocab, count, args.top_k, device, repeats) for count in rows]
    for row in results:
        append_jsonl(args.jsonl, {**row, "smoke": args.smoke, "machine": machine})
    return results


def main(argv=None) -> None:
    p = bench_parser(__doc__)
    add_flags(p, repeats=20, threads=1, jsonl=SERVING_RESULTS / "serving_costs.jsonl")
    p.add_argument("--tokens", type=int, default=512, help="generated tokens the detokeniser streams")
    p.add_argument("--vocab", type=int, default=49_152, help="vocabulary of the sampled rows")
    p.add_argument("--top-k", type=int, default=50, help="top_k of every sampled row")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one round: checks that it runs")
    for row in run(p.parse_args(argv)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
