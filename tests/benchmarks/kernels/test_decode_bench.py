"""Smoke tests of the decode measurements (``benchmarks/kernels/decode_bench.py``, run by
``engine_overhead.py --decode``) on CPU at tiny sizes: the same code a GPU run takes, less the
Triton timings and the HBM fraction, which need CUDA."""

from __future__ import annotations

import os
from argparse import Namespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton variants run interpreted

from benchmarks.harness.bundle import write_random_bundle  # noqa: E402
from benchmarks.kernels import decode_bench  # noqa: E402  (after TRITON_INTERPRET is set)
from benchmarks.serving import engine_overhead  # noqa: E402

ARGS = Namespace(gen_rows=4, gen_prompt_tokens=6, gen_new_tokens=5, gen_repeats=1, threads=1, device="cpu",
                 dtype="float32", kernel_rows=2, kernel_cache=70)


@pytest.mark.parametrize("card,peak", [("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12),
                                       ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA L40S", 0.864e12),
                                       ("NVIDIA A100-SXM4-80GB", 2.039e12), ("Some Future Card", None)])
def test_hbm_peak_by_card_name(card, peak):
    assert decode_bench.hbm_peak(card) == peak


def test_generation_and_kernel_measurements_run_on_cpu(tmp_path, tiny_server_model):
    loaded = tiny_server_model
    bundle = write_random_bundle(loaded.model, loaded.fingerprint, tmp_path / "bundle", 4)
    for overlap in (False, True):
        args = Namespace(**{**vars(ARGS), "overlap_steps": overlap})
        gen = decode_bench.generation_vs_bare_loop(loaded, bundle, args, lambda: None)
        assert gen["generated"]["bare_loop"] == 4 * 5 and 0 < gen["generated"]["engine"] <= 4 * 5
        assert gen["decode_vs_bare_loop"] > 0 and len(gen["tokens_per_s"]["engine"]) == 1
        assert gen["overlap_steps"] is overlap
        assert gen["device_memory"] == {"before_engine": None, "after_engine_warmup": None, "graph_buckets": []}
    kernel = decode_bench.decode_kernel_hbm(loaded.model.config, ARGS)
    assert kernel["variants"]["dispatched"]["rel_l2"] < 1e-5  # the reference on CPU, fp32 vs fp64
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert set(kernel["variants"]) == {"dispatched", "one_pass", "split2", "split4", "split8"}
        assert max(v["rel_l2"] for v in kernel["variants"].values()) < 1e-5
    assert kernel["decode_hbm_fraction"] is None and kernel["hbm_peak_bytes_per_s"] is None
    assert kernel["bytes"] == decode_bench.decode_bytes(loaded.model.config, 2, 70, loaded.model.dtype)


def test_bare_loop_matches_the_full_forward(tiny_server_model):
    """The bare loop is a real greedy decoder: its tokens equal argmax over the full forward."""
    lm = tiny_server_model.model
    ids = torch.tensor(decode_bench.prompts_for(2, 5, lm.config.vocab_size))
    expected = ids
    with torch.no_grad():
        for _ in range(3):
            expected = torch.cat([expected, lm(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(decode_bench.bare_greedy(lm, ids, 3), expected[:, 5:])
    synced = []
    assert decode_bench.bare_decode_loop(lm, ids.tolist(), 3, lambda: synced.append(1))() == 6 and synced == [1]


def test_decode_ratios_are_keyed_by_model():
    row = {"decode": {"generation": {"decode_vs_bare_loop": 1.1}, "kernel": {"decode_hbm_fraction": 0.7}}}
    ratios = engine_overhead.decode_ratios({"qwen05b-random": row, "tiny": row, "old_tiny": {}}, 1024)
    assert ratios == {"decode_vs_bare_loop": {"qwen05b": 1.1, "tiny": 1.1},
                      "decode_hbm_fraction_1k": {"qwen05b": 0.7, "tiny": 0.7}}
    assert "decode_hbm_fraction_cache64" in engine_overhead.decode_ratios({"tiny": row}, 64)
    assert engine_overhead.decode_ratios({"tiny": {}}, 1024) == {}
