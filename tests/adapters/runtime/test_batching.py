"""The one path for batches, label scores and decoding (``talora.adapters.runtime.batching/scoring/decoding``).

Fast, on tiny random models: the metadata layout of the docstring example, label plans, scores of
the cached path equal to the full-sequence path, the HF baseline's use of the same planner, and
the preallocated buffers reused and grown across steps.
"""

from __future__ import annotations

import pytest
import torch

from talora.adapters.model.talora_model import KVCache, TaloraModel
from talora.adapters.runtime.batching import BatchMeta, Row, StepBuffers, StepPlan
from talora.adapters.runtime.decoding import run_step
from talora.adapters.runtime.scoring import ScoreRequest, plan_labels, score_labels
from tests.helpers import tiny_talora_model

LABELS = [[7], [9, 4, 3], [9, 5]]


def _model(folder) -> TaloraModel:
    return tiny_talora_model(folder, ("a", "b"), shared_prompt_len=4, task_prompt_len=2, rank=2, init_std=0.5)[0]


def test_layout_of_the_docstring_example():
    plan = StepPlan()
    plan.add_row(Row([5, 6, 7, 8], past=0, start=0, slot=2, first_read=3))
    plan.add_decode_row([1, 2, 3, 4, 5, 6, 42], start=100, slot=0)
    step = StepBuffers.make("cpu", max_tokens=2, max_rows=1).prepare(plan)  # grows past its capacity
    meta = step.meta
    assert step.input_ids.tolist() == [5, 6, 7, 8, 42]
    assert meta.cu_seqlens_q.tolist() == [0, 4, 5] and meta.positions.tolist() == [0, 1, 2, 3, 6]
    assert meta.slot_ids.tolist() == [2, 0] and meta.k_starts.tolist() == [0, 100]
    assert meta.kv_lens.tolist() == [4, 7] and meta.write_index.tolist() == [0, 1, 2, 3, 106]
    assert step.read_index.tolist() == [3, 4] and step.sample_reads.tolist() == [1]
    assert (meta.cu_seqlens_q.dtype, meta.positions.dtype) == (torch.int32, torch.int64)
    assert meta.host_layout == [0, 4, 5, 0, 100, 4, 7, 2, 0]  # cu, k_starts, kv_lens, slots, as host ints


def test_layer_views_follow_writes_and_replacements():
    """``KVCache.layer`` (as ``PrefixKV`` and ``SlotKV``) hands out views made once: writes through them
    land in the pool, and a replaced pool gets views of its own."""
    cache = KVCache(num_layers=3, capacity=5, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    keys, values = cache.layer(1)
    assert cache.layer(1)[0] is keys
    keys.index_copy_(0, torch.tensor([2]), torch.ones(1, 2, 4))
    assert cache.keys[1, 2].eq(1).all() and cache.keys[0].eq(0).all() and cache.values.eq(0).all()
    cache.keys = torch.full_like(cache.keys, 5.0)
    assert cache.layer(1)[0] is not keys and cache.layer(1)[0].eq(5).all()


def test_static_mode_pads_to_its_rows_and_keeps_every_address():
    buffers = StepBuffers.static("cpu", rows=4, pad_index=999)
    plan = StepPlan()
    plan.add_decode_row([1, 2, 3, 4, 5, 6, 42], start=100, slot=3)
    step = buffers.prepare(plan)
    meta = step.meta
    assert step.input_ids.tolist() == [42, 0, 0, 0] and meta.positions.tolist() == [6, 0, 0, 0]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4] and meta.slot_ids.tolist() == [3, 0, 0, 0]
    assert meta.k_starts.tolist() == [100, 999, 999, 999] and meta.kv_lens.tolist() == [7, 1, 1, 1]
    assert meta.write_index.tolist() == [106, 999, 999, 999] and step.read_index.tolist() == [0]
    fields = lambda s: [s.input_ids, s.meta.cu_seqlens_q, s.meta.positions, s.meta.slot_ids,  # noqa: E731
                        s.meta.k_starts, s.meta.kv_lens, s.meta.write_index]
    plan = StepPlan()
    for i in range(4):
        plan.add_fed_decode_row(past=5 + i, start=10 * i, slot=1, picked_at=i)
    again = buffers.prepare(plan)
    assert [t.data_ptr() for t in fields(again)] == [t.data_ptr() for t in fields(step)]
    assert again.meta.write_index.tolist() == [5, 16, 27, 38] and again.fed_at.tolist() == [0, 1, 2, 3]
    wide = StepPlan()
    wide.add_row(Row([1, 2], past=3))
    with pytest.raises(ValueError, match="one token"):
        buffers.prepare(wide)
    plan.add_decode_row([1, 2], start=0, slot=0)
    with pytest.raises(ValueError, match="at most 4 rows"):
        buffers.prepare(plan)


def test_training_batches_are_laid_out_by_the_same_writer():
    from talora.adapters.train.data import EncodedExample
    from talora.adapters.train.objective import pack_batch

    batch = pack_batch([("b", EncodedExample([7], [3, 4], "y")), ("a", EncodedExample([5, 6], [9], "x"))])
    step = StepBuffers.make("cpu").prepare(batch.plan, cached=False)
    assert batch.task_names == ["a", "b"] and step.meta.slot_ids.tolist() == [1, 0]
    assert step.input_ids.tolist() == [7, 3, 5, 6] and step.meta.cu_seqlens_q.tolist() == [0, 2, 4]
    assert step.read_index.tolist() == [0, 1, 3] and batch.target_ids.tolist() == [3, 4, 9]


def test_prefill_meta_without_a_cache():
    meta = BatchMeta.prefill([3, 2], [4, 0])
    assert meta.cu_seqlens_q.tolist() == [0, 3, 5] and meta.positions.tolist() == [0, 1, 2, 0, 1]
    assert meta.k_starts.tolist() == [0, 3] and meta.kv_lens.tolist() == [3, 2] and meta.write_index is None


def test_label_plan_shares_rows_and_names_every_token():
    plan = plan_labels([7, 8], [[3], [4, 5], [6]])
    assert plan.rows == [(7, 8), (7, 8, 4)] and plan.first_read == 1
    assert plan.terms == [(0, 0, 3, 0), (1, 0, 4, 1), (1, 1, 5, 1), (0, 0, 6, 2)]
    step_plan = StepPlan()
    step_plan.add_row(Row([1, 2], first_read=1))
    assert plan.add_to(step_plan, slot=1, starts=[10, 20]) == 0
    assert step_plan.term_reads == [1, 2, 3, 1] and step_plan.num_groups == 3
    assert [r.start for r in step_plan.rows[1:]] == [10, 20]


def test_scores_equal_the_full_path(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    prompts = [[5, 17, 33, 2], [40, 41], [60, 61, 62]]
    requests = [ScoreRequest(p, LABELS, slot) for p, slot in zip(prompts, [0, 1, 0])]
    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_kv(prefix, *model.stacked(["a", "b"]))
        got = score_labels(model, prefix, slots, requests)
        for req, scores in zip(requests, got):
            for label, verb in enumerate(LABELS):
                ids = torch.tensor([req.prompt_ids + verb])
                logp = torch.log_softmax(model.forward_full(ids, torch.ones_like(ids, dtype=torch.bool),
                                                            [["a", "b"][req.slot]])[0], -1)
                want = sum(logp[len(req.prompt_ids) - 1 + j, t] for j, t in enumerate(verb))
                assert scores[label] == pytest.approx(float(want), abs=1e-4)


def test_cached_steps_reuse_the_buffers_and_match_one_prefill(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    mc = model.lm.config
    prompt = [5, 17, 33, 2, 9]

    def cache():
        return KVCache(mc.num_layers, 16, mc.num_kv_heads, mc.head_dim, model.lm.dtype, "cpu")

    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_kv(prefix, *model.stacked(["a", "b"]))
        whole = StepPlan()
        whole.add_row(Row(prompt, 0, 3, 1, 0))
        whole.sample_reads = list(range(len(prompt)))
        whole_logprobs: list[torch.Tensor] = []
        ref = run_step(model, StepBuffers.make("cpu").prepare(whole), prefix, slots, cache(), _keep(whole_logprobs))
        buffers, steps_cache = StepBuffers.make("cpu", max_tokens=3, max_rows=1), cache()
        first = StepPlan()
        first.add_row(Row(prompt[:3], 0, 0, 1, 2), sample=True)
        run_step(model, buffers.prepare(first), prefix, slots, steps_cache)
        for n in (4, 5):
            step = StepPlan()
            step.add_decode_row(prompt[:n], 0, 1)
            logprobs: list[torch.Tensor] = []
            out = run_step(model, buffers.prepare(step), prefix, slots, steps_cache, _keep(logprobs))
            assert out.usable == [True]
            assert out.next_tokens == [int(logprobs[0][0].argmax())] == [ref.next_tokens[n - 1]]
            assert torch.allclose(logprobs[0][0], whole_logprobs[0][n - 1], atol=1e-5)


def _keep(into: list):
    """A ``run_step`` sampler that keeps the sample reads' log-probabilities and picks greedily."""
    def sampler(picked: torch.Tensor) -> torch.Tensor:
        into.append(picked.clone())
        return picked.argmax(-1)
    return sampler


def test_hf_baseline_scores_with_the_same_planner(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from benchmarks.quality import peft_baselines as quality_peft
    from talora.adapters.train.data import EncodedExample, EncodedTask

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    task = EncodedTask("t", "classify", ["x", "y", "z"], {}, "{text}", 16, label_ids=LABELS)
    gen = torch.Generator().manual_seed(1)
    for n in (3, 6, 4, 5):
        task.examples.append(EncodedExample(torch.randint(10, 200, (n,), generator=gen).tolist(), [], "x"))
    got = quality_peft.predict_labels(hf, task, None, 0, real_positions=True, batch_size=3)
    want = []
    with torch.no_grad():
        for ex in task.examples:
            scores = []
            for verb in LABELS:
                logp = torch.log_softmax(hf(torch.tensor([ex.prompt_ids + verb])).logits[0].float(), -1)
                scores.append(sum(float(logp[len(ex.prompt_ids) - 1 + j, t]) for j, t in enumerate(verb)))
            want.append(task.labels[max(range(3), key=scores.__getitem__)])
    assert got == want


@pytest.mark.parametrize("sampled", [False, True])
def test_a_read_is_usable_when_it_has_a_finite_value_and_no_nan(sampled):
    from talora.adapters.runtime.decoding import StepReads

    inf, nan = float("inf"), float("nan")
    picked = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]), -1)
    picked[1, 0] = -inf  # a token ruled out: still usable
    picked[2] = -inf  # nothing finite
    picked[3, 1] = nan
    sampler = (lambda p: torch.zeros(len(p), dtype=torch.long)) if sampled else None
    out = StepReads(torch.zeros(0), picked, sampler).result()
    assert out.usable == [True, True, False, False]
    assert out.next_tokens[:2] == ([0, 0] if sampled else [2, 2])
