"""Sampling on the device (``talora.server.engine.generation``): seeded reproducibility, the sampled
distribution (chi-square against the exact one, for temperature, top-k and top-p), the masks,
greedy at temperature 0, float safety, and the engine's sampled generation replayed on the full
path with the same seed."""

from __future__ import annotations

import math
import time

import pytest
import torch

from talora.server.engine import generation
from talora.server.engine.generation import RowSampler, SamplingRow, mix32, row_key, sample_rows, sample_token

PROBS = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])  # a small known distribution
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}  # chi-square 0.999 quantiles by degrees of freedom


def draw(logprobs: torch.Tensor, count: int, temperature=1.0, top_p=1.0, top_k=0, step=0) -> torch.Tensor:
    """``count`` draws from one distribution, one row per seed 0..count-1, in one batched call."""
    rows = [SamplingRow(i, temperature, top_p, top_k, seed, step) for i, seed in enumerate(range(count))]
    return RowSampler(rows, "cpu")(logprobs.expand(count, -1).clone())


def chi_square(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(expected)).double()
    assert counts[expected == 0].sum() == 0, "a token with probability 0 was drawn"
    keep = expected > 0
    want = expected[keep].double() * len(tokens)
    return float(((counts[keep] - want) ** 2 / want).sum())


def test_mix32_is_a_32_bit_bijection_without_overflow():
    words = torch.arange(0, 2**16, dtype=torch.int64) * 65537 + 12345  # spread over 32 bits
    mixed = mix32(words & 0xFFFFFFFF)
    assert int(mixed.min()) >= 0 and int(mixed.max()) < 2**32
    assert len(torch.unique(mixed)) == len(words)
    assert [mix32(int(w)) for w in words[:50]] == mixed[:50].tolist()  # ints and tensors agree
    assert row_key(2**64 - 1, 0) != row_key(2**32 - 1, 0) and row_key(7, 1) != row_key(7, 2)


def test_same_seed_same_tokens_different_seeds_differ():
    logprobs = torch.log_softmax(torch.randn(500, generator=torch.Generator().manual_seed(0)), -1)
    first = [sample_token(logprobs, 0.9, 1.0, seed=3, step=s) for s in range(20)]
    assert first == [sample_token(logprobs, 0.9, 1.0, seed=3, step=s) for s in range(20)]
    assert first != [sample_token(logprobs, 0.9, 1.0, seed=4, step=s) for s in range(20)]
    assert len(set(first)) > 5  # the step moves the draw


def test_a_rows_draw_does_not_depend_on_its_batch():
    gen = torch.Generator().manual_seed(1)
    logprobs = torch.log_softmax(torch.randn(8, 300, generator=gen), -1)
    rows = [SamplingRow(i, 0.8, 0.9, 50 * (i % 2), 100 + i, i) for i in range(8)]
    together = RowSampler(rows, "cpu")(logprobs.clone())
    alone = [int(RowSampler([SamplingRow(0, *astuple(r)[1:])], "cpu")(logprobs[i:i + 1].clone())[0])
             for i, r in enumerate(rows)]
    assert together.tolist() == alone


def astuple(row: SamplingRow) -> tuple:
    return (row.read, row.temperature, row.top_p, row.top_k, row.seed, row.step)


@pytest.mark.parametrize("temperature,top_p,top_k,expected", [
    (1.0, 1.0, 0, PROBS),
    (0.5, 1.0, 0, PROBS ** 2 / (PROBS ** 2).sum()),  # temperature 0.5 squares the weights
    (1.0, 1.0, 3, torch.cat([PROBS[:3], torch.zeros(3)]) / PROBS[:3].sum()),
    (1.0, 0.65, 0, torch.cat([PROBS[:3], torch.zeros(3)]) / PROBS[:3].sum()),  # 0.35 + 0.25 < 0.65: three kept
    (2.0, 0.7, 2, torch.cat([PROBS[:2].sqrt(), torch.zeros(4)]) / PROBS[:2].sqrt().sum()),
])
def test_sampled_distribution_passes_chi_square(temperature, top_p, top_k, expected):
    """8,000 draws: a sampler off by a few percent in any kept token fails at the 0.999 quantile."""
    order = torch.tensor([3, 0, 5, 1, 4, 2])  # vocabulary order unrelated to probability
    logprobs = torch.empty(6)
    logprobs[order] = PROBS.log()
    want = torch.empty(6)
    want[order] = expected
    tokens = draw(logprobs, 8000, temperature, top_p, top_k)
    dof = int((want > 0).sum()) - 1
    assert chi_square(tokens, want) < CHI2_999[dof]


def test_chi_square_catches_a_wrong_temperature():
    """The test has power: draws at temperature 1 fail against the temperature-0.5 distribution."""
    tokens = draw(PROBS.log(), 8000, 1.0)
    assert chi_square(tokens, PROBS ** 2 / (PROBS ** 2).sum()) > CHI2_999[5]


def test_masks_never_pick_outside_top_k_or_the_nucleus():
    gen = torch.Generator().manual_seed(5)
    logprobs = torch.log_softmax(torch.randn(4, 1000, generator=gen) * 3, -1)
    params = [(1.5, 1.0, 10), (1.0, 0.3, 0), (1.0, 0.5, 4), (2.0, 1e-9, 0)]
    # one step of 200 seeds x 4 settings: read n is distribution n % 4
    rows = [SamplingRow(4 * seed + i, t, p, k, seed, 0) for seed in range(200) for i, (t, p, k) in enumerate(params)]
    tokens = RowSampler(rows, "cpu")(logprobs.repeat(200, 1)).view(200, 4)
    ranked = logprobs.argsort(-1, descending=True)
    assert set(tokens[:, 0].tolist()) <= set(ranked[0, :10].tolist())
    assert set(tokens[:, 2].tolist()) <= set(ranked[2, :4].tolist())
    nucleus = ranked[1][: int((logprobs[1].exp().sort(descending=True).values.cumsum(0) < 0.3).sum()) + 1]
    assert set(tokens[:, 1].tolist()) <= set(nucleus.tolist())
    assert set(tokens[:, 3].tolist()) == {int(ranked[3, 0])}  # a tiny nucleus keeps the best only


def full_sort_choice(logprobs: torch.Tensor, row: SamplingRow) -> int:
    """The choice of the sampler before ``topk``: the whole vocabulary sorted, the first ``top_k`` and
    the nucleus of that order kept, the race run over them."""
    logits = logprobs.double()
    best = logits.max()
    scaled = torch.where(logits == best, 0.0, (logits - best) / row.temperature)
    score = scaled - generation.race_noise(torch.tensor([[row_key(row.seed, row.step)]]), len(logits))[0]
    weights, order = torch.sort(scaled.exp(), descending=True)
    keep = (weights.cumsum(0) - weights) / weights.sum() < row.top_p
    keep &= (row.top_k <= 0) | (torch.arange(len(logits)) < row.top_k)
    keep[0] = True
    return int(order[torch.where(keep, score[order], float("-inf")).argmax()])


@pytest.mark.parametrize("params", [
    [(1.0, 1.0, 50), (0.7, 0.9, 50), (1.3, 1.0, 7), (1.0, 0.99, 1)],  # top-k only: a topk of 50
    [(1.0, 1.0, 50), (1.0, 1.0, 0), (0.8, 0.6, 3)],  # beside a row without limits
    [(1.0, 1.0, 50), (1.3, 0.5, 0), (0.9, 0.95, 0)],  # a nucleus without top-k: the whole sort
    [(0.9, 0.95, 5000), (2.0, 1.0, 2000), (0.5, 1.0, 1999)],  # top_k up to and past the vocabulary
], ids=["top-k", "with-unlimited", "with-nucleus-only", "top-k-past-vocab"])
def test_top_k_and_nucleus_pick_what_a_full_sort_picks(params):
    """Rows without ties: the same tokens, seed for seed, as sorting the whole vocabulary."""
    gen = torch.Generator().manual_seed(6)
    logprobs = torch.log_softmax(torch.randn(len(params), 2000, generator=gen, dtype=torch.float64) * 2, -1)
    assert all(len(row.unique()) == 2000 for row in logprobs)
    rows = [SamplingRow(len(params) * seed + i, t, p, k, seed, 3)
            for seed in range(40) for i, (t, p, k) in enumerate(params)]
    tokens = RowSampler(rows, "cpu")(logprobs.repeat(40, 1))
    assert tokens.tolist() == [full_sort_choice(logprobs[r.read % len(params)], r) for r in rows]


def test_ties_at_the_cut_are_all_kept_whatever_the_batch():
    """Logits in tie groups (2 at the top, then 5, 50, 500): a cut inside a group keeps all of it, and a
    row's tokens do not depend on the other rows (which change how many candidates ``topk`` returns)."""
    values = torch.cat([torch.full((n,), v) for n, v in ((2, 3.0), (5, 2.0), (50, 1.0), (500, 0.0))])
    logprobs = torch.log_softmax(values[torch.randperm(557, generator=torch.Generator().manual_seed(7))], -1)
    params = [(1.0, 1.0, 3), (1.0, 1.0, 1), (1.0, 0.06, 60), (0.5, 0.3, 0)]
    kept = [7, 2, 7, 2]  # top_k 3 and the nucleus 0.06 cut in the group of 5, the others in the group of 2
    others = [SamplingRow(2 * seed, *params[seed % 4], seed, 0) for seed in range(600)]
    for (t, p, k), size in zip(params, kept):
        rows = [SamplingRow(seed, t, p, k, seed, 0) for seed in range(600)]
        alone = RowSampler(rows, "cpu")(logprobs.expand(600, -1).clone())
        assert set(alone.tolist()) == set(logprobs.argsort(descending=True)[:size].tolist())
        beside = [SamplingRow(2 * seed + 1, *astuple(r)[1:]) for seed, r in enumerate(rows)]
        mixed = RowSampler(others + beside, "cpu")(logprobs.expand(1200, -1).clone())
        assert mixed[1::2].tolist() == alone.tolist()


def test_temperature_zero_is_greedy_and_unsampled_reads_take_the_argmax():
    gen = torch.Generator().manual_seed(2)
    logprobs = torch.log_softmax(torch.randn(5, 400, generator=gen), -1)
    assert [sample_token(row, 0.0, 0.5, seed=1) for row in logprobs] == logprobs.argmax(-1).tolist()
    sampled = RowSampler([SamplingRow(2, 1.0, 1.0, 0, 9, 0)], "cpu")(logprobs.clone())
    assert sampled[[0, 1, 3, 4]].tolist() == logprobs.argmax(-1)[[0, 1, 3, 4]].tolist()
    assert RowSampler([], "cpu")(logprobs.clone()).tolist() == logprobs.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-8])
def test_tiny_temperatures_are_greedy_and_finite(temperature):
    logprobs = torch.log_softmax(torch.randn(3, 300, generator=torch.Generator().manual_seed(3)), -1)
    logprobs[:, 7] = float("-inf")
    t = torch.full((3, 1), temperature, dtype=torch.float64)
    keys = torch.tensor([[row_key(s, 0)] for s in range(3)])
    for top_p in (1.0, 0.5):
        tokens = sample_rows(logprobs, t, torch.full_like(t, top_p), torch.zeros(3, 1, dtype=torch.int64), keys)
        assert tokens.tolist() == logprobs.argmax(-1).tolist()


def test_sample_rows_takes_low_precision_logits():
    logprobs = torch.log_softmax(torch.randn(2, 64, generator=torch.Generator().manual_seed(4)), -1)
    rows = [SamplingRow(i, 0.7, 0.95, 20, 11, 3) for i in range(2)]
    assert RowSampler(rows, "cpu")(logprobs.bfloat16()).dtype == torch.int64
    assert math.isfinite(float(logprobs.max()))


# ----- through the engine ------------------------------------------------------------------------
def _generate(engine, text: str, params, extra: int = 0):
    """Submit one generate job (and ``extra`` greedy ones beside it); returns it and its ``Finished``."""
    import threading

    from talora.server.jobs import Finished, GenerationParams, Job
    from tests.server.support import GENERATE

    adapter = engine.adapter(GENERATE)
    results, done = [], threading.Semaphore(0)

    def emit(event):
        if isinstance(event, Finished) or type(event).__name__ == "Failed":
            results.append(event)
            done.release()

    def job(prompt, p):
        ids, _ = engine.encode(adapter, prompt)
        return Job("generate", adapter, ids, emit if p is params else (lambda e: None),
                   time.monotonic() + 120, p)

    main = job(text, params)
    others = [job(f"{text} {i}", GenerationParams(max_new_tokens=4, temperature=0)) for i in range(extra)]
    engine.submit(others[: extra // 2] + [main] + others[extra // 2:])
    assert done.acquire(timeout=120), "the engine did not answer"
    assert isinstance(results[0], Finished), results[0]
    return main, results[0]


def test_engine_sampling_is_seeded_and_equals_the_full_path(engine, tiny_bundle, tiny_server_model):
    from talora.adapters.formats.bundle import model_from_bundle
    from talora.server.jobs import GenerationParams
    from tests.server.support import GENERATE

    params = GenerationParams(max_new_tokens=6, temperature=0.9, top_p=0.95, top_k=40, seed=2024)
    job, alone = _generate(engine, "Once upon a time", params)
    _, crowded = _generate(engine, "Once upon a time", params, extra=4)
    assert crowded.text == alone.text  # the same seed in another batch: the same tokens
    loaded = tiny_server_model
    model, _, _ = model_from_bundle(loaded.model, tiny_bundle, loaded.fingerprint, tasks=[GENERATE])
    ids = list(job.prompt_ids)
    with torch.no_grad():
        for step in range(alone.completion_tokens):
            logits = model.forward_full(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), [GENERATE])
            logprobs = torch.log_softmax(logits[0, -1].float(), -1)
            ids.append(sample_token(logprobs, 0.9, 0.95, seed=2024, step=step, top_k=40))
    expected = loaded.tokenizer.decode(ids[len(job.prompt_ids):], skip_special_tokens=True)
    assert alone.text == expected
