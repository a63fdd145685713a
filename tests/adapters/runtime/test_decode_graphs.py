"""Decode steps from static buffers (``talora.adapters.runtime.graphs``): on CPU the eager mode checks the
padding, the scratch position and the metadata against ``run_step``; capture and replay need
CUDA (``gpu`` marker)."""

from __future__ import annotations

import pytest
import torch

from talora.adapters.model.config import TaloraConfig
from talora.adapters.model.loading import load_checkpoint_folder
from talora.adapters.model.talora_model import KVCache, TaloraModel
from talora.adapters.runtime.batching import Row, StepBuffers, StepPlan
from talora.adapters.runtime.decoding import launch_step, run_step
from talora.adapters.runtime.graphs import KV_BUCKETS, ROW_BUCKETS, DecodeGraphs, bucket_for, decode_only

CAPACITY = 64  # per row; the scratch position is rows * CAPACITY


def _model(folder, device="cpu") -> TaloraModel:
    lm, _ = load_checkpoint_folder(folder)
    model = TaloraModel(lm, TaloraConfig(shared_prompt_len=4, task_prompt_len=2, rank=2, init_std=0.5))
    gen = torch.Generator().manual_seed(0)
    model.init_shared(gen)
    for name in ("a", "b"):
        model.add_task(name, generator=gen)
        with torch.no_grad():
            model.adapter(name).gate.normal_(generator=gen)
    return model.to(device)


def _prefilled(model, prompts, slot_ids):
    """Prefix, slots and a cache (one scratch position past the rows' ranges) after prefilling ``prompts``."""
    mc, device = model.lm.config, model.lm.device
    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_kv(prefix, *model.stacked(["a", "b"]))
        cache = KVCache(mc.num_layers, len(prompts) * CAPACITY + 1, mc.num_kv_heads, mc.head_dim, model.lm.dtype,
                        device)
        plan = StepPlan()
        for i, prompt in enumerate(prompts):
            plan.add_row(Row(prompt, 0, i * CAPACITY, slot_ids[i], len(prompt) - 1), sample=True)
        out = run_step(model, StepBuffers.make(device).prepare(plan), prefix, slots, cache)
    return prefix, slots, cache, out.next_tokens


def _decode_plan(prompts, next_tokens, slot_ids) -> StepPlan:
    plan = StepPlan()
    for i, (prompt, token) in enumerate(zip(prompts, next_tokens)):
        plan.add_decode_row([*prompt, token], i * CAPACITY, slot_ids[i])
    return plan


def _clone(cache: KVCache) -> KVCache:
    copy = KVCache.__new__(KVCache)
    copy.keys, copy.values = cache.keys.clone(), cache.values.clone()
    return copy


def _keep(into: list):
    def sampler(picked):
        into.append(picked.clone())
        return picked.argmax(-1)
    return sampler


def _fed_plan(prompts, slot_ids, picked_at) -> StepPlan:
    """The decode rows of ``_decode_plan``, their tokens still on the device at reads ``picked_at``."""
    plan = StepPlan()
    for i, (prompt, read) in enumerate(zip(prompts, picked_at)):
        plan.add_fed_decode_row(len(prompt), i * CAPACITY, slot_ids[i], read)
    return plan


def test_fed_rows_read_their_tokens_from_the_previous_picks_on_both_paths(tiny_llama_dir):
    """A decode row fed from the step before's picks (``overlap_steps``) computes what the row with
    the token on the host computes, through ``launch_step`` and through the static graph buffers."""
    model = _model(tiny_llama_dir)
    prompts, slot_ids = [[5, 17, 33], [2, 9], [40, 41, 42, 43, 44]], [1, 0, 1]
    prefix, slots, cache, next_tokens = _prefilled(model, prompts, slot_ids)
    previous = torch.tensor([7, *next_tokens[::-1]])  # picks of a step before, in another order
    picked_at = [3, 2, 1]
    fed = _fed_plan(prompts, slot_ids, picked_at)
    assert fed.fed_at == [0, 1, 2] and decode_only(fed)
    plain = _decode_plan(prompts, next_tokens, slot_ids)
    expected, got = [], []
    with torch.no_grad():
        run_step(model, StepBuffers.make("cpu").prepare(plain), prefix, slots, _clone(cache), _keep(expected))
        reads = launch_step(model, StepBuffers.make("cpu").prepare(fed), prefix, slots, _clone(cache), _keep(got),
                            previous=previous)
        with pytest.raises(ValueError, match="previous"):
            launch_step(model, StepBuffers.make("cpu").prepare(fed), prefix, slots, _clone(cache))
    torch.testing.assert_close(got[0], expected[0])
    assert reads.result().next_tokens == reads.tokens.tolist() == expected[0].argmax(-1).tolist()
    graphs = DecodeGraphs(model, prefix, slots, _clone(cache), scratch_index=len(prompts) * CAPACITY, eager=True)
    torch.testing.assert_close(graphs.run(fed, previous), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graphs.run(plain), expected[0], atol=1e-5, rtol=1e-5)  # the same buffers, not fed


def test_buckets_and_what_counts_as_a_decode_step():
    assert [bucket_for(n, ROW_BUCKETS) for n in (1, 3, 64, 65, 129)] == [1, 4, 64, 128, None]
    assert bucket_for(300, KV_BUCKETS) == 512 and bucket_for(2**15 + 1, KV_BUCKETS) is None
    decode = _decode_plan([[1, 2], [3]], [4, 5], [0, 1])
    assert decode_only(decode)
    prefill = StepPlan()
    prefill.add_row(Row([1, 2, 3], 0, 0, 0, 2), sample=True)
    assert not decode_only(prefill) and not decode_only(StepPlan())
    decode.add_term(0, 5, 0)
    decode.num_groups = 1
    assert not decode_only(decode)  # a label-scoring term needs the step's own reads


def test_eager_static_path_equals_run_step_and_keeps_pad_rows_on_scratch(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    prompts, slot_ids = [[5, 17, 33], [2, 9], [40, 41, 42, 43, 44]], [1, 0, 1]
    prefix, slots, cache, next_tokens = _prefilled(model, prompts, slot_ids)
    plan = _decode_plan(prompts, next_tokens, slot_ids)  # 3 rows -> bucket 4: one pad row
    reference_cache, picked = _clone(cache), []
    with torch.no_grad():
        expected = run_step(model, StepBuffers.make("cpu").prepare(plan), prefix, slots, reference_cache,
                            _keep(picked))
    scratch = len(prompts) * CAPACITY
    graphs = DecodeGraphs(model, prefix, slots, cache, scratch_index=scratch, eager=True)
    for _ in range(2):  # the second call reuses the bucket's buffers
        got = graphs.run(plan)
        assert got is not None and got.shape == picked[0].shape
        torch.testing.assert_close(got, picked[0], atol=1e-5, rtol=1e-5)
    assert graphs.buckets == [(4, 256)]
    assert got.argmax(-1).tolist() == expected.next_tokens
    real = torch.ones(cache.keys.shape[1], dtype=torch.bool)
    real[scratch] = False
    torch.testing.assert_close(cache.keys[:, real], reference_cache.keys[:, real])  # pad rows wrote scratch only
    torch.testing.assert_close(cache.values[:, real], reference_cache.values[:, real])


def test_steps_that_are_not_decode_only_are_declined(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    prefix, slots, cache, _ = _prefilled(model, [[1, 2]], [0])
    graphs = DecodeGraphs(model, prefix, slots, cache, scratch_index=CAPACITY, eager=True)
    prefill = StepPlan()
    prefill.add_row(Row([3, 4], 0, 0, 0, 1), sample=True)
    assert graphs.run(prefill) is None and not graphs.buckets
    assert not DecodeGraphs.supported(torch.device("cpu"))


def test_cpu_runner_builds_no_graphs_even_when_asked(tiny_bundle, tiny_server_model):
    from talora.server.engine import Engine
    from talora.server.settings import Settings

    engine = Engine(Settings(bundle=tiny_bundle, num_slots=3, torch_threads=1, cuda_graphs=True).engine_config(),
                    loaded=tiny_server_model)
    threads = torch.get_num_threads()
    engine.start()
    try:
        assert engine.loaded.runner.graphs is None
    finally:
        engine.stop(10)
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_graph_equals_run_step_on_cuda(tiny_llama_dir, dtype):
    model = _model(tiny_llama_dir, "cuda").to(dtype)
    prompts, slot_ids = [[5, 17, 33], [2, 9], [40, 41, 42, 43, 44], [7]], [1, 0, 1, 1]
    prefix, slots, cache, next_tokens = _prefilled(model, prompts, slot_ids)
    scratch = len(prompts) * CAPACITY
    graphs = DecodeGraphs(model, prefix, slots, cache, scratch_index=scratch)
    for rows in (3, 4, 1):  # buckets 4, 4 (replayed), 1
        plan = _decode_plan(prompts[:rows], next_tokens[:rows], slot_ids[:rows])
        reference_cache, picked = _clone(cache), []
        with torch.no_grad():
            run_step(model, StepBuffers.make("cuda").prepare(plan), prefix, slots, reference_cache, _keep(picked))
        got = graphs.run(plan)
        assert got is not None
        torch.testing.assert_close(got, picked[0], atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-3)
        real = torch.ones(cache.keys.shape[1], dtype=torch.bool, device="cuda")
        real[scratch] = False
        assert torch.equal(cache.keys[:, real], reference_cache.keys[:, real])
    assert graphs.buckets == [(4, 256), (1, 256)]  # in capture order
