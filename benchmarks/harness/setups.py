"""The serving setups that ``serve_bench`` and ``gpu_serve_bench`` time, each as a ``run()`` closure.

Every setup serves the same prefill-only workload (classification-like): each request's input
tokens go through the model once and the logits of its last token are computed. A setup is built
by a ``make_*`` function that does all preparation (padding, packing metadata, slot table) and
returns a closure that serves the whole request set once and returns the last-token logits of
every request, so that no setup can skip work.

* ``make_bare_hf``: Hugging Face transformers, the bare model on the bare inputs (left-padded).
* ``make_bare_packed``: talora's own frozen model on packed rows, no prompt at all.
* ``make_reencode_hf``: HF with each row's ``[P; ΔP_t]`` re-encoded in front of its input
  (``inputs_embeds``), tasks mixed in a batch: the gate-off prompt, recomputed per request.
* ``make_talora``: talora's cached path: shared KV once, task KV from a slot table, request
  tokens only, all tasks in one packed batch.
* ``make_peft_grouped``: PEFT prompt tuning, one adapter active at a time, batches of one task.
* ``make_vllm_backend``: ``talora-serve --backend vllm``'s engine (``VllmEngine``) on a gate-off
  bundle: the same score jobs as ``make_talora_engine``, run by vLLM in its own venv, each pass
  with vLLM's prefix cache emptied first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness.request_set import BenchRequest, batches, grouped_by_task

Runner = Callable[[], list[torch.Tensor]]


def pad_left(rows: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids (B, T_max)`` and ``attention_mask (B, T_max)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def make_bare_hf(hf_model, requests: list[BenchRequest], batch_size: int, pad_id: int = 0) -> Runner:
    device = hf_model.device
    prepared = []
    for chunk in batches(list(range(len(requests))), batch_size):
        ids, mask = pad_left([requests[i].input_ids for i in chunk], pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        prepared.append((ids, mask, positions))

    @torch.inference_mode()
    def run() -> list[torch.Tensor]:
        return [hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
                for ids, mask, pos in prepared]

    return run


def make_reencode_hf(hf_model, task_prompts: torch.Tensor, requests: list[BenchRequest],
                     task_ids: list[int], batch_size: int) -> Runner:
    """``task_prompts (num_tasks, m+n, d)``: each task's ``[P; ΔP_t]`` rows."""
    device, embed = hf_model.device, hf_model.get_input_embeddings()
    prompt_len = task_prompts.shape[1]
    prepared = []
    for chunk in batches(list(range(len(requests))), batch_size):
        ids, mask = pad_left([requests[i].input_ids for i in chunk], 0, device)
        slots = torch.tensor([task_ids[i] for i in chunk], device=device)
        full_mask = torch.cat([torch.ones(len(chunk), prompt_len, dtype=mask.dtype, device=device), mask], 1)
        # the prompt sits in front of the left padding; positions skip the padding
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        prepared.append((ids, slots, full_mask, positions))

    @torch.inference_mode()
    def run() -> list[torch.Tensor]:
        out = []
        for ids, slots, mask, pos in prepared:
            embeds = torch.cat([task_prompts[slots].to(embed.weight.dtype), embed(ids)], dim=1)
            out.append(hf_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                logits_to_keep=1).logits[:, -1])
        return out

    return run


def _packed(requests: list[BenchRequest], chunk: list[int], slot_ids: list[int], device):
    from talora.adapters.model.talora_model import BatchMeta

    lengths = [len(requests[i].input_ids) for i in chunk]
    ids = torch.tensor([t for i in chunk for t in requests[i].input_ids], device=device)
    meta = BatchMeta.prefill(lengths, slot_ids, device=device)
    return ids, meta, (meta.cu_seqlens_q[1:] - 1).long()


def make_talora(talora_model, prefix, slots, requests: list[BenchRequest], task_slot_ids: list[int],
                batch_size: int) -> Runner:
    """``prefix``/``slots``: ``shared_kv()`` and ``task_kv()`` results; ``task_slot_ids[i]``: request i's slot."""
    device, lm = talora_model.lm.device, talora_model.lm
    prepared = [_packed(requests, chunk, [task_slot_ids[i] for i in chunk], device)
                for chunk in batches(list(range(len(requests))), batch_size)]

    @torch.inference_mode()
    def run() -> list[torch.Tensor]:
        return [lm.logits(talora_model.forward_cached(ids, meta, prefix, slots)[last])
                for ids, meta, last in prepared]

    return run


def make_bare_packed(lm, requests: list[BenchRequest], batch_size: int) -> Runner:
    """talora's frozen model on packed rows with plain causal attention (no prompt keys at all)."""
    from talora.kernels.dispatch import gated_prefix_attention

    cfg, device = lm.config, lm.device
    empty_prefix = torch.zeros(0, cfg.num_kv_heads, cfg.head_dim, dtype=lm.dtype, device=device)
    empty_slots = torch.zeros(1, 0, cfg.num_kv_heads, cfg.head_dim, dtype=lm.dtype, device=device)
    zero_gate = torch.zeros(1, cfg.num_heads, dtype=lm.dtype, device=device)
    prepared = [_packed(requests, chunk, [0] * len(chunk), device)
                for chunk in batches(list(range(len(requests))), batch_size)]

    def attend_for(meta):
        scratch: list[torch.Tensor] = []  # one output buffer for every layer, as forward_cached keeps

        def attend(layer, q, k, v):
            if not scratch:
                scratch.append(torch.empty_like(q))
            return gated_prefix_attention(q, k, v, meta.cu_seqlens_q, meta.k_starts, meta.kv_lens,
                                          empty_prefix, empty_prefix, empty_slots, empty_slots,
                                          meta.slot_ids, zero_gate, q.shape[-1] ** -0.5, out=scratch[0],
                                          host_layout=meta.host_layout)
        return attend

    @torch.inference_mode()
    def run() -> list[torch.Tensor]:
        return [lm.logits(lm.run_layers(lm.embed(ids), meta.positions, attend_for(meta))[last])
                for ids, meta, last in prepared]

    return run


def build_peft_model(hf_model, task_prompts: torch.Tensor):
    """A PEFT prompt-tuning model with one adapter ``t<i>`` per task, prompt = ``task_prompts[i]``."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    num_tasks, prompt_len, _ = task_prompts.shape
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt_len)
    peft_model = get_peft_model(hf_model, config, adapter_name="t0")
    for task in range(1, num_tasks):
        peft_model.add_adapter(f"t{task}", config)
    with torch.no_grad():
        for task in range(num_tasks):
            encoder: Any = peft_model.prompt_encoder[f"t{task}"]  # a PEFT PromptEmbedding
            weight = encoder.embedding.weight
            weight.copy_(task_prompts[task].to(weight))
    return peft_model.eval()


def make_peft_grouped(peft_model, requests: list[BenchRequest], task_ids: list[int], batch_size: int,
                      pad_id: int = 0) -> Runner:
    """Requests grouped by task, ``set_adapter`` before each group's batches (left padding)."""
    device = peft_model.device
    prepared = []
    for chunk in grouped_by_task(task_ids, batch_size):
        ids, mask = pad_left([requests[i].input_ids for i in chunk], pad_id, device)
        prepared.append((f"t{task_ids[chunk[0]]}", ids, mask))

    @torch.inference_mode()
    def run() -> list[torch.Tensor]:
        out = []
        for adapter, ids, mask in prepared:
            peft_model.set_adapter(adapter)
            out.append(peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1])
        return out

    return run


def talora_task_prompts(talora_model, task_names: list[str]) -> torch.Tensor:
    """``[P; ΔP_t]`` of each named task, ``(num_tasks, m+n, d)``: what gate-off peers re-encode."""
    fast, _ = talora_model.stacked(task_names)
    with torch.no_grad():
        prompts = talora_model.task_prompts(fast)
        shared = talora_model.prompt.unsqueeze(0).expand(len(task_names), -1, -1)
        return torch.cat([shared, prompts], dim=1).detach()


def start_engine(loaded, bundle_dir, num_slots: int, batch_size: int, max_tokens: int, threads: int,
                 kv_cache_tokens: int = 16384):
    """An in-process ``talora.server.engine.Engine`` on ``loaded`` serving ``bundle_dir``, started."""
    from talora.server.engine import Engine
    from talora.server.settings import Settings

    settings = Settings(bundle=bundle_dir, num_slots=num_slots, max_batch_size=batch_size,
                        max_batch_tokens=batch_size * max_tokens, max_queue=100_000, torch_threads=threads,
                        kv_cache_tokens=max(kv_cache_tokens, batch_size * max_tokens), request_timeout_s=3600)
    engine = Engine(settings.engine_config(), loaded=loaded)
    engine.start()
    return engine


def make_talora_engine(engine, requests: list[BenchRequest], task_names: list[str]) -> Runner:
    """All requests submitted to the engine at once as score jobs of their task; waits for every one.

    ``task_names[i]`` is request i's task. The engine forms its own mixed-task batches.
    """
    import threading
    import time

    from talora.server.jobs import Job, Scored

    adapters = [engine.adapter(name) for name in task_names]

    def run() -> list[torch.Tensor]:
        results: list = [None] * len(requests)
        done = threading.Semaphore(0)

        def emitter(index: int):
            def emit(event) -> None:
                results[index] = event
                done.release()
            return emit

        deadline = time.monotonic() + 3600
        jobs = [Job("score", adapters[i], list(r.input_ids), emitter(i), deadline) for i, r in enumerate(requests)]
        engine.submit(jobs)
        for _ in jobs:
            done.acquire()
        failed = [e for e in results if not isinstance(e, Scored)]
        if failed:
            raise RuntimeError(f"{len(failed)} engine jobs failed, first: {failed[0]}")
        return [torch.tensor(e.scores) for e in results]

    return run


def start_vllm_backend(bundle_dir, vllm_python, batch_size: int, max_tokens: int, threads: int, prompt_len: int):
    """A ``VllmEngine`` (``talora-serve --backend vllm``) on the gate-off ``bundle_dir``, started: its vLLM
    child gets the worker's settings (``vllm_worker.py``: max sequences, batched tokens, model length)."""
    import os

    from talora.server.backends.vllm.engine import VllmEngine
    from talora.server.settings import Settings

    os.environ.setdefault("VLLM_SERVER_DEV_MODE", "1")  # /reset_prefix_cache, so that every pass starts cold
    max_len = prompt_len + max_tokens
    settings = Settings(bundle=bundle_dir, backend="vllm", vllm_python=vllm_python, torch_threads=threads,
                        max_queue=100_000, request_timeout_s=3600, vllm_max_model_len=((max_len + 31) // 32) * 32 + 32,
                        vllm_args=f"--max-num-seqs {batch_size} --max-num-batched-tokens "
                                  f"{max(2048, batch_size * max_len)}")
    engine = VllmEngine(settings)
    engine.start()
    return engine


def make_vllm_backend(engine, requests: list[BenchRequest], task_names: list[str]) -> Runner:
    """``make_talora_engine`` on a ``VllmEngine``, each pass from an empty vLLM prefix cache (otherwise a repeat
    finds every whole request cached)."""
    import httpx

    run = make_talora_engine(engine, requests, task_names)

    def cold() -> list[torch.Tensor]:
        httpx.post(f"{engine.url}/reset_prefix_cache", timeout=60).raise_for_status()
        return run()

    return cold
