"""Tests of the split-K decode kernel (``talora.kernels.decode_attention``) against its reference
twin ``gated_prefix_attention_ref`` in float64, and of the dispatcher's split-K rule.

Decode: one query per row over a padded cache ``(B, T, H_kv, h)`` viewed as ``(B*T, H_kv, h)``.
Cache lengths are chosen around the 64-key tile and the chunk boundaries (1, 63, 64, 65, ...),
ragged across the batch, with gates on and off and GQA groups of 1, 3 and 7. Outputs are
poisoned with NaN first. The default CPU run interprets small cases (``TRITON_INTERPRET=1``);
the full grid is marked ``gpu``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first Triton kernel import

import talora.kernels.dispatch as dispatch  # noqa: E402
from talora.kernels.reference import gated_prefix_attention_ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_triton = pytest.mark.skipif(
    not dispatch.triton_available() or (not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton on CUDA or TRITON_INTERPRET=1",
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

# Bounds on ||out - ref|| / ||ref|| and max|out - ref| / max|ref| (as tests/test_kernels.py).
TOLERANCES = {
    torch.float32: {"rel": 2e-5, "peak": 1e-4},
    torch.float16: {"rel": 3e-3, "peak": 6e-3},
    torch.bfloat16: {"rel": 2e-2, "peak": 3e-2},
}


def decode_case(seed: int, dtype: torch.dtype, kv_lens: list[int], group: int = 3, n_kv_heads: int = 2,
                head_dim: int = 64, n_prefix: int = 5, n_task: int = 4, gated: bool = True, device=DEVICE):
    """Arguments of ``gated_prefix_attention`` for a decode step: row b has ``kv_lens[b]`` cached keys."""
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_heads = len(kv_lens), n_kv_heads * group
    width = max(kv_lens) + 3  # padded cache, some room past the longest row
    n_slots = 3

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    gate = torch.randn(n_slots, n_heads, generator=gen) * 2
    gate[0, : n_heads // 2] = 0.0  # a closed gate gives exactly the main part
    return (randn(n_rows, n_heads, head_dim), randn(n_rows * width, n_kv_heads, head_dim),
            randn(n_rows * width, n_kv_heads, head_dim), ints(list(range(n_rows + 1))),
            ints([b * width for b in range(n_rows)]), ints(kv_lens),
            randn(n_prefix, n_kv_heads, head_dim), randn(n_prefix, n_kv_heads, head_dim),
            randn(n_slots, n_task, n_kv_heads, head_dim), randn(n_slots, n_task, n_kv_heads, head_dim),
            ints([b % n_slots for b in range(n_rows)]), gate.to(dtype).to(device), head_dim ** -0.5), gated


def check_splitk(args: Any, gated: bool, num_splits: int) -> None:
    from talora.kernels.decode_attention import gated_decode_attention

    q, dtype = args[0], args[0].dtype
    out = torch.full_like(q, float("nan"))
    max_kv_len = int(args[5].max())
    # ``args`` is exactly the kernel's positional inputs, so the keywords never collide (mypy cannot tell)
    result = gated_decode_attention(*args, gated=gated, out=out, max_kv_len=max_kv_len,  # type: ignore[misc]
                                    num_splits=num_splits)
    assert result is out
    wide: Any = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref = gated_prefix_attention_ref(*wide, gated=gated).cpu()  # type: ignore[misc]
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = out.double().cpu() - ref
    rel = (err.norm() / ref.norm()).item()
    peak = (err.abs().max() / ref.abs().max()).item()
    tol = TOLERANCES[dtype]
    assert rel <= tol["rel"] and peak <= tol["peak"], f"{dtype}: rel {rel:.2e} peak {peak:.2e} vs {tol}"


# ---------------------------------------------------------------- the split rule (no kernels)

def test_decode_splits_rule():
    assert dispatch.decode_splits(64, 2, 80 + 48) == 1  # short cache: one pass
    assert dispatch.decode_splits(64, 2, 80 + 1024) == 1  # Qwen2.5-0.5B shape, 1k cache: the grid is wide
    assert dispatch.decode_splits(64, 3, 80 + 8192) == 1  # SmolLM2 shape, 8k cache: likewise
    assert dispatch.decode_splits(1, 2, 80 + 1024) == 1  # one row, 1k cache: too short to pay
    assert dispatch.decode_splits(1, 2, 80 + 8192) == 4  # one row, 8k cache: split
    assert dispatch.decode_splits(4, 2, 80 + 8192) == 4  # 8 programs: still a sliver of 132 SMs
    assert dispatch.decode_splits(8, 2, 80 + 8192) == 1  # 16 programs: one pass was faster
    assert dispatch.decode_splits(1, 2, 80 + 8192, sm_count=16) == 1  # a small card: the grid is a share
    assert dispatch.decode_splits(512, 8, 80 + 4096) == 1  # the one-pass grid already fills the card
    assert dispatch.decode_splits(0, 2, 4096) == 1


@pytest.mark.parametrize("num_splits,main_len,expected", [
    (4, 1104, (320, 4)), (8, 100, (64, 2)), (3, 1, (64, 1)), (1, 4096, (4096, 1)), (5, 640, (128, 5)),
])
def test_split_layout(num_splits, main_len, expected):
    pytest.importorskip("triton")
    from talora.kernels.decode_attention import split_layout

    chunk, splits = split_layout(main_len, num_splits)
    assert (chunk, splits) == expected
    assert chunk % 64 == 0 and (splits - 1) * chunk < max(main_len, 1) <= splits * chunk


# ------------------------------------------- Triton, small cases (interpreted on CPU, default run)

@requires_triton
@pytest.mark.parametrize("kv_lens,num_splits", [
    ([1], 2),  # one cached key: every chunk past the first is empty
    ([59, 60, 124], 2),  # with m = 5: main lengths 64, 65 (one key into tile 2), 129
    ([1, 200, 37, 123], 3),  # ragged, some rows end in the first chunk
    ([187], 4),  # 192 main keys: exactly three full tiles over four requested splits
])
@pytest.mark.parametrize("gated", [True, False])
def test_splitk_matches_reference_float32(kv_lens, num_splits, gated):
    args, gated = decode_case(1, torch.float32, kv_lens, gated=gated)
    check_splitk(args, gated, num_splits)


@requires_triton
@pytest.mark.parametrize("dtype,group,head_dim", [(torch.bfloat16, 7, 64), (torch.float16, 1, 128)])
def test_splitk_low_precision_and_gqa(dtype, group, head_dim):
    args, gated = decode_case(2, dtype, [130, 3, 64], group=group, n_kv_heads=1, head_dim=head_dim)
    check_splitk(args, gated, 3)


@requires_triton
def test_splitk_empty_prefix_and_closed_gates():
    """m = 0 (the main set is the cache alone) and every gate at zero: exactly the main softmax."""
    args, gated = decode_case(3, torch.float32, [65, 1], n_prefix=0)
    args = args[:11] + (torch.zeros_like(args[11]),) + args[12:]
    check_splitk(args, gated, 2)


@requires_triton
def test_dispatch_routes_long_decode_to_splitk(monkeypatch):
    """Forced Triton, one query per row and a known cache bound: dispatch runs split-K."""
    import talora.kernels.decode_attention as splitk

    calls = []
    real = splitk.gated_decode_attention
    monkeypatch.setattr(splitk, "gated_decode_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(dispatch, "SPLITK_MIN_KEYS", 64)
    monkeypatch.setattr(dispatch, "SPLITK_MIN_CHUNK", 64)
    args, gated = decode_case(4, torch.float32, [200, 7])
    with dispatch.kernel_backend("triton"):
        out = dispatch.gated_prefix_attention(*args, gated=gated, max_q_len=1, max_kv_len=200)
        assert calls and calls[0]["num_splits"] == 205 // 64  # 5 prefix + 200 cached keys, 64-key chunks
        ref = gated_prefix_attention_ref(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                           for a in args])
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-4)
        calls.clear()
        dispatch.gated_prefix_attention(*args, gated=gated, max_q_len=1)  # no bound: one pass
        dispatch.gated_prefix_attention(*args, gated=gated, max_q_len=2, max_kv_len=200)  # not decode
    assert not calls


# ------------------------------------------------------------------ full grid (CUDA + triton)

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("group,n_kv_heads,head_dim", [(7, 2, 64), (3, 3, 64), (7, 4, 128), (1, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_splitk_grid(dtype, group, n_kv_heads, head_dim, gated):
    gen = torch.Generator().manual_seed(group * 100 + head_dim)
    for num_splits in (2, 3, 8):
        kv_lens = torch.randint(1, 1500, (40,), generator=gen).tolist() + [1, 63, 64, 65, 1024]
        args, gated_ = decode_case(5 + num_splits, dtype, kv_lens, group=group, n_kv_heads=n_kv_heads,
                                   head_dim=head_dim, n_prefix=64, n_task=16, gated=gated)
        check_splitk(args, gated_, num_splits)
