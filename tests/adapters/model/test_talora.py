"""TA-LoRA semantics: gates, ablations, gradients, and cached path == full-sequence path."""

from __future__ import annotations

import pytest
import torch

from talora.adapters.model.config import TaloraConfig
from talora.adapters.model.talora_model import KVCache, TaloraModel
from talora.adapters.runtime.batching import Row, StepBuffers, StepPlan
from tests.helpers import tiny_talora_model

TASKS = ["alpha", "beta", "gamma"]


def _model(folder, **cfg) -> TaloraModel:
    config = {"shared_prompt_len": 5, "task_prompt_len": 3, "rank": 2, "init_std": 0.5, **cfg}
    return tiny_talora_model(folder, TASKS, open_gates=False, **config)[0]


def _open_gates(model: TaloraModel, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.tasks:
            gate = model.adapter(name).gate
            gate.copy_(torch.randn(gate.shape, generator=gen))


def _batch(vocab: int, lengths=(7, 3, 11)):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return ids, mask


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture()
def model(tiny_llama_dir):
    return _model(tiny_llama_dir)


def _closed_gates_match_shared_prompt_alone(model, hf) -> None:
    """With every gate closed, ``forward_full`` equals transformers (``hf``) on ``[P; X]`` with X at
    positions m+n.. (P lives in the input-embedding space: Gemma's token rows times sqrt(d), as
    transformers' embedding gives them)."""
    ids, mask = _batch(model.lm.config.vocab_size)
    m, n = model.cfg.shared_prompt_len, model.cfg.task_prompt_len
    with torch.no_grad():
        ours = model.forward_full(ids, mask, TASKS)
        for b in range(ids.shape[0]):
            x = ids[b, : mask[b].sum()]
            embeds = torch.cat([model.prompt, hf.get_input_embeddings()(x)])[None]
            positions = torch.cat([torch.arange(m), m + n + torch.arange(len(x))])[None]
            ref = hf(inputs_embeds=embeds, position_ids=positions).logits[0, m:]
            assert (ours[b, : len(x)] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_zero_gates_equal_frozen_lm_with_shared_prompt_alone(model, tiny_llama_dir):
    _closed_gates_match_shared_prompt_alone(model, _hf(tiny_llama_dir))


def test_gate_off_equals_one_joint_softmax(tiny_llama_dir):
    model = _model(tiny_llama_dir, gated=False)
    ids, mask = _batch(model.lm.config.vocab_size)
    m, n = model.cfg.shared_prompt_len, model.cfg.task_prompt_len
    with torch.no_grad():
        ours = model.forward_full(ids, mask, TASKS)
        prompts = model.task_prompts(model.stacked(TASKS)[0])
        hf = _hf(tiny_llama_dir)
        for b in range(ids.shape[0]):
            x = ids[b, : mask[b].sum()]
            embeds = torch.cat([model.prompt, prompts[b], hf.get_input_embeddings()(x)])[None]
            ref = hf(inputs_embeds=embeds).logits[0, m + n:]
            assert (ours[b, : len(x)] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_open_gate_changes_output(model):
    ids, mask = _batch(model.lm.config.vocab_size)
    with torch.no_grad():
        closed = model.forward_full(ids, mask, TASKS)
        _open_gates(model)
        opened = model.forward_full(ids, mask, TASKS)
    assert (closed - opened)[mask].abs().max() > 1e-3


def _loss(model, ids, mask):
    logits = model.forward_full(ids, mask, TASKS)
    return logits[mask].logsumexp(-1).mean() - logits[mask][:, 0].mean()


def test_gradients_follow_the_gate(model):
    ids, mask = _batch(model.lm.config.vocab_size)
    _loss(model, ids, mask).backward()
    assert model.prompt.grad.abs().sum() > 0
    for adapter in model.tasks.values():
        assert adapter.gate.grad.abs().sum() > 0
        assert adapter.fast.grad is None or adapter.fast.grad.abs().sum() == 0
    assert model.basis.grad is None or model.basis.grad.abs().sum() == 0
    assert all(p.grad is None for p in model.lm.parameters())

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.tasks["beta"].gate[0, 1] = 0.5
    _loss(model, ids, mask).backward()
    assert model.tasks["beta"].fast.grad.abs().sum() > 0
    assert model.basis.grad.abs().sum() > 0
    assert model.tasks["alpha"].fast.grad is None or model.tasks["alpha"].fast.grad.abs().sum() == 0


def _cached_vs_full(model: TaloraModel, decode_steps: int = 4):
    """Prefill then greedy decode on the cached path; compare every step to the full path."""
    lengths = [7, 3, 11, 5]
    tasks = ["alpha", "beta", "gamma", "beta"]
    ids, mask = _batch(model.lm.config.vocab_size, lengths)
    names = sorted(set(tasks))
    slot_of = {t: i for i, t in enumerate(names)}
    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_slots(prefix, names)
        capacity = max(lengths) + decode_steps
        mc = model.lm.config
        cache = KVCache(mc.num_layers, capacity * len(lengths), mc.num_kv_heads, mc.head_dim, torch.float32, "cpu")
        buffers, plan = StepBuffers.make("cpu"), StepPlan()
        for b, n in enumerate(lengths):
            plan.add_row(Row(ids[b, :n].tolist(), 0, b * capacity, slot_of[tasks[b]]))
        step = buffers.prepare(plan)
        hidden = model.forward_cached(step.input_ids, step.meta, prefix, slots, cache)
        cached_logits = model.lm.logits(hidden)
        full = model.forward_full(ids, mask, tasks)
        worst = _rel(cached_logits, torch.cat([full[b, :n] for b, n in enumerate(lengths)]))
        last = step.meta.cu_seqlens_q[1:].long() - 1
        seqs = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
        step_logits = cached_logits[last]
        for _ in range(decode_steps):
            nxt = step_logits.argmax(-1)
            for b, tok in enumerate(nxt.tolist()):
                seqs[b].append(tok)
            kv_lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
            plan = StepPlan()
            for b, seq in enumerate(seqs):
                plan.add_decode_row(seq, b * capacity, slot_of[tasks[b]])
            step = buffers.prepare(plan)
            step_logits = model.lm.logits(model.forward_cached(step.input_ids, step.meta, prefix, slots, cache))
            width = max(len(s) for s in seqs)
            padded = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            pad_mask = torch.arange(width)[None] < kv_lens[:, None]
            full = model.forward_full(padded, pad_mask, tasks)
            ref = full[torch.arange(len(seqs)), kv_lens.long() - 1]
            worst = max(worst, _rel(step_logits, ref))
    return worst


@pytest.mark.parametrize("cfg", [{}, {"gated": False}, {"full_rank": True}, {"shared_prompt_len": 0},
                                 {"deep_prompt": True}, {"deep_prompt": True, "full_rank": True}],
                         ids=["talora", "gate-off", "full-rank", "no-shared-prompt", "deep", "deep-full-rank"])
def test_cached_path_equals_full_sequence_path(tiny_llama_dir, cfg):
    model = _model(tiny_llama_dir, **cfg)
    _open_gates(model)
    assert _cached_vs_full(model) <= 1e-5


def test_cached_path_on_qwen2(tmp_path):
    from tests.helpers import save_tiny_checkpoint

    model = _model(save_tiny_checkpoint(tmp_path, "qwen2"))
    _open_gates(model)
    assert _cached_vs_full(model) <= 1e-5


@pytest.mark.parametrize("field,value", [("task_prompt_len", 0), ("rank", -1), ("slow_lr_ratio", 0.0),
                                         ("shared_prompt_len", -2), ("scale", 0)])
def test_bad_talora_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TaloraConfig(**{field: value})


def test_a_deep_prompt_gives_each_layer_its_own_task_rows(tiny_llama_dir):
    """With ``deep_prompt`` B_t is (L, n, r) and layer l's task keys/values come from B_t[l]
    alone: changing one layer's rows changes that layer's task keys and no other's."""
    model = _model(tiny_llama_dir, deep_prompt=True)
    layers = model.lm.config.num_layers
    fast, gates = model.stacked(["alpha"])
    assert fast.shape == (1, layers, 3, 2)
    with torch.no_grad():
        prefix = model.shared_kv()
        before = model.task_kv(prefix, fast, gates)
        changed = fast.clone()
        changed[0, 1] += 1.0
        after = model.task_kv(prefix, changed, gates)
    moved = [not torch.equal(before.keys[layer], after.keys[layer]) for layer in range(layers)]
    assert moved == [layer == 1 for layer in range(layers)]


def test_fast_weight_shape_is_checked(model):
    with pytest.raises(ValueError, match="fast: expected shape"):
        model.add_task("bad", fast=torch.zeros(2, 2))


def _with_task_bases(model: TaloraModel, rows: dict[str, int], seed: int = 5) -> None:
    """Give tasks basis rows of their own, with non-zero U_t so that the rows count."""
    gen = torch.Generator().manual_seed(seed)
    for name, k in rows.items():
        old = model.adapter(name)
        shared = old.fast.detach()
        fast = torch.cat([shared, torch.randn(*shared.shape[:-1], k, generator=gen)], dim=-1)
        basis = torch.randn(k, model.lm.config.hidden_size, generator=gen)
        model.add_task(name, fast, gate=old.gate.detach(), basis=basis)


@pytest.mark.parametrize("cfg", [{}, {"deep_prompt": True}], ids=["talora", "deep"])
def test_task_basis_rows_keep_the_cached_path_equal_to_the_full_path(tiny_llama_dir, cfg):
    """Tasks with 0, 1 and 2 rows of their own in one batch: stacking pads U and V with zeros."""
    model = _model(tiny_llama_dir, **cfg)
    _open_gates(model)
    _with_task_bases(model, {"beta": 2, "gamma": 1})
    assert model.task_bases(["alpha", "beta"]).shape == (2, 2, model.lm.config.hidden_size)
    assert model.task_bases(["alpha"]) is None
    assert _cached_vs_full(model) <= 1e-5


def test_task_basis_rows_add_u_v_to_the_task_prompt(model):
    """ΔP = scale * (B A + U V), and new rows start switched off (U = 0)."""
    d = model.lm.config.hidden_size
    b = model.adapter("alpha").fast.detach().clone()
    gen = torch.Generator().manual_seed(1)
    fresh = model.add_task("fresh", b, generator=gen, basis_rows=2)
    assert fresh.fast.shape == (3, 4) and fresh.basis.shape == (2, d)
    assert torch.equal(fresh.fast[:, 2:], torch.zeros(3, 2))
    with torch.no_grad():
        plain = model.task_prompts(*model.stacked(["alpha"])[:1])
        started = model.task_prompts(model.stacked(["fresh"])[0], model.task_bases(["fresh"]))
        assert torch.allclose(started, plain)
        fresh.fast[:, 2:] = torch.randn(3, 2, generator=gen)
        got = model.task_prompts(model.stacked(["fresh"])[0], model.task_bases(["fresh"]))[0]
    want = model.cfg.scale * (b @ model.basis + fresh.fast[:, 2:] @ fresh.basis)
    assert torch.allclose(got, want.detach(), atol=1e-5)


def test_task_basis_rows_are_checked(tiny_llama_dir, model):
    with pytest.raises(ValueError, match="basis: expected shape"):
        model.add_task("bad", basis=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="fast: expected shape"):
        model.add_task("bad", fast=torch.zeros(3, 2), basis=torch.zeros(1, model.lm.config.hidden_size))
    full = _model(tiny_llama_dir, full_rank=True)
    with pytest.raises(ValueError, match="basis: a full-rank"):
        full.add_task("bad", basis_rows=1)
