"""Tests of talora.kernels: the reference twins against a naive float64 oracle, and the Triton
kernels (compiled on CUDA, interpreted on CPU) against the reference in float64.

Every output buffer is poisoned with NaN before the call, so an unwritten element fails; NaN
never passes. Tolerances come from ``TOLERANCES``, keyed by the dtype of the data. The default
CPU run covers the reference and small ``TRITON_INTERPRET=1`` cases; the full grids are marked
``gpu`` (run them with ``pytest -m gpu`` on a machine with CUDA and triton).
"""

from __future__ import annotations

import math
import os
import threading
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of a Triton kernel module: @triton.jit reads it then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import talora.kernels.dispatch as dispatch  # noqa: E402
from talora.kernels.reference import gated_prefix_attention_ref, lowrank_prompt_ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
requires_triton = pytest.mark.skipif(
    not dispatch.triton_available() or (not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton on CUDA or TRITON_INTERPRET=1",
)

# Bounds on ||out - ref|| / ||ref|| (rel) and max|out - ref| / max|ref| (peak), ref in float64.
TOLERANCES = {
    torch.float64: {"rel": 1e-12, "peak": 1e-11},
    torch.float32: {"rel": 2e-5, "peak": 1e-4},
    torch.float16: {"rel": 3e-3, "peak": 6e-3},
    torch.bfloat16: {"rel": 2e-2, "peak": 3e-2},
}

ATTENTION_MODES = {  # name: (layout, own_in_task, gated)
    "prefill": ("packed", False, True),
    "prefill_ungated": ("packed", False, False),
    "decode": ("decode", False, True),
    "decode_ungated": ("decode", False, False),
    "chunked_ungated": ("chunked", False, False),
    "task_prompt": ("task_prompt", True, True),
    "task_prompt_ungated": ("task_prompt", True, False),
}
SLOT_MIXES = ("distinct", "one", "zipf", "single_use")


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(ref).all(), "reference produced non-finite values"
    assert torch.isfinite(out).all(), "output has NaN/inf: unwritten (poisoned) or broken elements"
    err = out.double().cpu() - ref.double().cpu()
    ref64 = ref.double().cpu()
    rel = (err.norm() / ref64.norm().clamp_min(1e-30)).item()
    peak = (err.abs().max() / ref64.abs().max().clamp_min(1e-30)).item()
    tol = TOLERANCES[dtype]
    assert rel <= tol["rel"] and peak <= tol["peak"], f"{dtype}: rel {rel:.3e} peak {peak:.3e} vs {tol}"


def _as_float64(args):
    return [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


def _int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def draw_slots(gen: torch.Generator, n_rows: int, mix: str, max_slots: int = 64):
    """(slot_ids, n_slots) for a task mix: all distinct, one slot for all, Zipf, a slot used once."""
    if mix == "distinct":
        n_slots = min(n_rows, max_slots)
        ids = torch.randperm(n_slots, generator=gen).repeat(math.ceil(n_rows / n_slots))[:n_rows]
        return ids, n_slots
    n_slots = int(torch.randint(2, max_slots + 1, (1,), generator=gen))
    if mix == "one":
        return torch.full((n_rows,), int(torch.randint(0, n_slots, (1,), generator=gen))), n_slots
    if mix == "zipf":
        weights = 1.0 / torch.arange(1, n_slots + 1, dtype=torch.float64)
        return torch.multinomial(weights, n_rows, replacement=True, generator=gen), n_slots
    ids = torch.zeros(n_rows, dtype=torch.long)  # single_use: every row on slot 0 but one
    ids[int(torch.randint(0, n_rows, (1,), generator=gen))] = n_slots - 1
    return ids, n_slots


def make_attention_case(seed, dtype, head_dim, group, mode, mix="zipf", n_rows=None, max_len=300,
                        n_kv_heads=2, n_prefix=None, device=DEVICE):
    """Random inputs of ``gated_prefix_attention`` as a tuple in argument order."""
    layout, own_in_task, gated = ATTENTION_MODES[mode]
    gen = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    n_rows = n_rows or randint(1, 12)
    n_heads = n_kv_heads * group
    n_prefix = randint(0, 40) if n_prefix is None else n_prefix
    n_task = randint(1, 24)
    if layout == "task_prompt":
        q_lens = kv_lens = [n_task] * n_rows
    else:
        kv_lens = [randint(1, max_len) for _ in range(n_rows)]
        q_lens = {"packed": kv_lens, "decode": [1] * n_rows,
                  "chunked": [randint(1, n) for n in kv_lens]}[layout]
    slot_ids, n_slots = draw_slots(gen, n_rows, mix)
    if layout in ("packed", "task_prompt"):
        cache_rows, k_starts = sum(kv_lens), [sum(kv_lens[:b]) for b in range(n_rows)]
    else:  # padded cache (B, T, H_kv, h) viewed as (B*T, H_kv, h)
        width = max(kv_lens) + randint(0, 5)
        cache_rows, k_starts = n_rows * width, [b * width for b in range(n_rows)]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    cu_seqlens = [0]
    for n in q_lens:
        cu_seqlens.append(cu_seqlens[-1] + n)
    gate = torch.randn(n_slots, n_heads, generator=gen) * 2
    gate[0, : n_heads // 2] = 0.0  # closed gates must give exactly the main part
    tensors = (
        randn(cu_seqlens[-1], n_heads, head_dim),
        randn(cache_rows, n_kv_heads, head_dim), randn(cache_rows, n_kv_heads, head_dim),
        _int32(cu_seqlens, "cpu"), _int32(k_starts, "cpu"), _int32(kv_lens, "cpu"),
        randn(n_prefix, n_kv_heads, head_dim), randn(n_prefix, n_kv_heads, head_dim),
        randn(n_slots, n_task, n_kv_heads, head_dim), randn(n_slots, n_task, n_kv_heads, head_dim),
        slot_ids.to(torch.int32), gate.to(dtype),
    )
    return tuple(t.to(device) for t in tensors) + (head_dim ** -0.5, own_in_task, gated)


def attention_oracle(q, k, v, cu_seqlens_q, k_starts, kv_lens, prefix_k, prefix_v,
                     slot_k, slot_v, slot_ids, gate, softmax_scale, own_in_task, gated, window=0, softcap=0.0):
    """The formula of docs/method.md, one query at a time, in float64, written independently of the reference.

    ``window``: keys sit at the positions of ``[prefix; task slot; own]`` (own_in_task: ``[prefix; own]``)
    and a query sees those less than ``window`` behind it; ``softcap`` caps the scaled scores."""
    q, k, v, prefix_k, prefix_v, slot_k, slot_v, gate = (
        t.double().cpu() for t in (q, k, v, prefix_k, prefix_v, slot_k, slot_v, gate))
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    m, n = prefix_k.shape[0], 0 if own_in_task else slot_k.shape[1]

    def softmax_part(qv, keys, values, key_pos, q_pos):  # qv (H, h); keys/values (N, H_kv, h) -> (H, h)
        if window:
            seen = q_pos - key_pos < window
            keys, values = keys[seen], values[seen]
        if keys.shape[0] == 0:
            return torch.zeros_like(qv)
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", qv, keys) * softmax_scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        return torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), values)

    for b in range(len(slot_ids)):
        s, start = int(slot_ids[b]), int(k_starts[b])
        q_len = int(cu_seqlens_q[b + 1] - cu_seqlens_q[b])
        for i in range(q_len):
            pos = int(kv_lens[b]) - q_len + i
            own = (k[start : start + pos + 1], v[start : start + pos + 1], m + n + torch.arange(pos + 1))
            prefix = (prefix_k, prefix_v, torch.arange(m))
            if own_in_task:
                main, task = prefix, own
            else:
                main = tuple(torch.cat([a, b_]) for a, b_ in zip(prefix, own))
                task = (slot_k[s], slot_v[s], m + torch.arange(slot_k.shape[1]))
            qv, q_pos = q[int(cu_seqlens_q[b]) + i], m + n + pos
            if gated:
                o = softmax_part(qv, *main, q_pos) + torch.tanh(gate[s])[:, None] * softmax_part(qv, *task, q_pos)
            else:
                o = softmax_part(qv, *(torch.cat([a, b_]) for a, b_ in zip(main, task)), q_pos)
            out[int(cu_seqlens_q[b]) + i] = o
    return out


def run_attention(backend, args, dtype, **family):
    """Call the public op with ``backend`` forced, into a NaN-poisoned buffer (``family``: window, softcap)."""
    out = torch.full_like(args[0], float("nan"))
    with dispatch.kernel_backend(backend):
        result = dispatch.gated_prefix_attention(*args[:13], own_in_task=args[13], gated=args[14], out=out, **family)
    assert result is out
    return out


def check_attention_triton(args, dtype, **family):
    expected = gated_prefix_attention_ref(*_as_float64(args), **family)
    assert_matches(run_attention("triton", args, dtype, **family), expected, dtype)


def make_lowrank_case(seed, dtype, mix, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    n_rows = int(torch.randint(1, 40, (1,), generator=gen))
    n_prompt, rank = int(torch.randint(1, 17, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
    hidden = int(torch.randint(8, 600, (1,), generator=gen))
    slot_ids, n_slots = draw_slots(gen, n_rows, mix)
    gaps = torch.randint(0, 4, (n_rows,), generator=gen)  # untouched rows between prompts
    starts = (torch.arange(n_rows) * n_prompt + gaps.cumsum(0))[torch.randperm(n_rows, generator=gen)]
    n_buffer = int(starts.max()) + n_prompt + 3
    fast = (torch.randn(n_slots, n_prompt, rank, generator=gen)).to(dtype)
    basis = (torch.randn(rank, hidden, generator=gen)).to(dtype)
    out = torch.randn(n_buffer, hidden, generator=gen).to(dtype)
    written = torch.zeros(n_buffer, dtype=torch.bool)
    for s in starts.tolist():
        written[s : s + n_prompt] = True
    out[written] = float("nan")
    move = lambda t: t.to(device)  # noqa: E731
    return (move(fast), move(basis), move(slot_ids.to(torch.int32)), move(starts.to(torch.int32)),
            move(out), 0.37), written


def check_lowrank(backend, seed, dtype, mix):
    args, written = make_lowrank_case(seed, dtype, mix)
    before = args[4].clone()
    expected = lowrank_prompt_ref(*_as_float64(args[:4]), args[4].double().clone(), args[5])
    with dispatch.kernel_backend(backend):
        result = dispatch.lowrank_prompt(*args)
    assert result is args[4]
    written = written.to(result.device)
    assert torch.equal(result[~written], before[~written]), "rows outside the prompts were modified"
    assert_matches(result[written], expected[written], dtype)


# ---------------------------------------------------------------- reference (CPU, default run)

@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("seed", range(2))
def test_reference_matches_oracle(mode, seed):
    args = make_attention_case(100 + seed, torch.float64, 16, group=1 + 2 * seed, mode=mode,
                               max_len=20, n_rows=4, device="cpu")
    assert_matches(gated_prefix_attention_ref(*args), attention_oracle(*args), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["prefill", "decode", "task_prompt_ungated"])
def test_reference_low_precision(dtype, mode):
    args = make_attention_case(7, dtype, 64, group=3, mode=mode, max_len=40, device="cpu")
    expected = gated_prefix_attention_ref(*_as_float64(args))
    assert_matches(run_attention("reference", args, dtype), expected, dtype)


def test_closed_gate_is_frozen_model_with_shared_prompt():
    """With every gate at zero the task slot is invisible: plain attention over [P; X] (causal)."""
    args = list(make_attention_case(3, torch.float64, 32, group=2, mode="prefill", max_len=30, n_rows=3,
                                    n_prefix=5, device="cpu"))
    args[11] = torch.zeros_like(args[11])
    out = gated_prefix_attention_ref(*args)
    q, k, v, cu, k_starts, kv_lens, prefix_k, prefix_v = args[:8]
    for b in range(3):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        keys = torch.cat([prefix_k, k[rows]]).repeat_interleave(2, 1).transpose(0, 1)
        values = torch.cat([prefix_v, v[rows]]).repeat_interleave(2, 1).transpose(0, 1)
        n_q = rows.stop - rows.start
        mask = torch.ones(n_q, 5 + n_q, dtype=torch.bool).tril(diagonal=5)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[rows].transpose(0, 1), keys, values, attn_mask=mask, scale=args[12])
        torch.testing.assert_close(out[rows], expected.transpose(0, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mix", SLOT_MIXES)
def test_lowrank_reference(mix):
    check_lowrank("reference", 11, torch.bfloat16, mix)


def test_backend_selection():
    with pytest.raises(ValueError, match="kernel backend"):
        with dispatch.kernel_backend("cuda"):
            pass
    with dispatch.kernel_backend("auto"):
        assert not dispatch._use_triton(torch.zeros(1))  # CPU tensors run the reference
    with dispatch.kernel_backend("reference"):
        assert not dispatch._use_triton(torch.zeros(1, device=DEVICE))
    if HAS_CUDA and dispatch.triton_available():
        with dispatch.kernel_backend("auto"):
            assert dispatch._use_triton(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
            assert not dispatch._use_triton(torch.zeros(1, device="cuda", dtype=torch.float64))


def test_a_backend_override_is_scoped_to_its_block_and_its_thread():
    """Training forces the reference kernels (``differentiable_kernels``); a server's worker thread
    running meanwhile keeps the default."""
    seen: dict[str, str] = {}
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        inside.wait(10)
        seen["other"] = dispatch.get_backend()
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with dispatch.kernel_backend("reference"):
        with dispatch.kernel_backend("triton"):
            seen["nested"] = dispatch.get_backend()
        seen["outer"] = dispatch.get_backend()
        inside.set()
        release.wait(10)
    worker.join(10)
    assert seen == {"nested": "triton", "outer": "reference", "other": dispatch.DEFAULT_BACKEND}
    assert dispatch.get_backend() == dispatch.DEFAULT_BACKEND


# ------------------------------------------- Triton, small cases (interpreted on CPU, default run)

@requires_triton
@pytest.mark.parametrize("dtype,head_dim,group,mode,mix", [
    (torch.float32, 64, 1, "prefill", "distinct"),
    (torch.bfloat16, 64, 3, "prefill_ungated", "one"),
    (torch.float16, 128, 7, "decode", "zipf"),
    (torch.float32, 64, 7, "chunked_ungated", "single_use"),
    (torch.bfloat16, 128, 1, "task_prompt", "zipf"),
    (torch.float16, 64, 3, "task_prompt_ungated", "distinct"),
])
def test_attention_triton_small(dtype, head_dim, group, mode, mix):
    args = make_attention_case(21, dtype, head_dim, group, mode, mix=mix, n_rows=3, max_len=40, n_kv_heads=1)
    check_attention_triton(args, dtype)


@requires_triton
@pytest.mark.parametrize("mode", ["prefill", "task_prompt"])
def test_attention_triton_empty_prefix_and_empty_row(mode):
    """m = 0 (in task-prompt mode the main set is then empty) and a row with no queries."""
    args = list(make_attention_case(5, torch.float32, 64, 3, mode, n_rows=3, max_len=20,
                                    n_kv_heads=1, n_prefix=0))
    cu = args[3].clone()
    cu[2:] -= cu[2] - cu[1]  # row 1 has no queries
    args[3] = cu
    args[5] = torch.cat([args[5][:1], torch.zeros(1, dtype=torch.int32, device=cu.device), args[5][2:]])
    args[0] = args[0][: int(cu[-1])].contiguous()
    check_attention_triton(tuple(args), torch.float32)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lowrank_triton_small(dtype):
    check_lowrank("triton", 31, dtype, "zipf")


# ------------------------------------------------------------------ full grids (CUDA + triton)

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("group", [1, 3, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_triton_grid(dtype, head_dim, group, mode):
    seed = zlib.crc32(f"{dtype}-{head_dim}-{group}-{mode}".encode()) % 10_000
    mix = SLOT_MIXES[seed % len(SLOT_MIXES)]
    args = make_attention_case(seed, dtype, head_dim, group, mode, mix=mix, n_rows=1 + seed % 24)
    check_attention_triton(args, dtype)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mix", SLOT_MIXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_triton_task_mix(dtype, mix):
    """64 rows with 1..64 distinct slots, one slot for all, a slot used by one row."""
    args = make_attention_case(41, dtype, 64, 7, "prefill", mix=mix, n_rows=64, max_len=120)
    check_attention_triton(args, dtype)
    decode = make_attention_case(42, dtype, 128, 7, "decode", mix=mix, n_rows=64, n_kv_heads=4)
    check_attention_triton(decode, dtype)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mix", SLOT_MIXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lowrank_triton_grid(dtype, mix):
    for seed in range(3):
        check_lowrank("triton", 50 + seed, dtype, mix)


@pytest.mark.gpu
@requires_cuda
def test_auto_backend_uses_triton_on_cuda():
    args = make_attention_case(9, torch.bfloat16, 64, 7, "decode", n_rows=8)
    out = run_attention("auto", args, torch.bfloat16)
    assert dispatch._use_triton(args[0])
    assert_matches(out, gated_prefix_attention_ref(*_as_float64(args)), torch.bfloat16)


# ------------------------------------- model families: head dims, sliding windows, soft-capping
# Head dims and windows of the families talora serves: Llama 3.x / Qwen3 / Phi-4-mini 128 (Llama 3.2 1B:
# 64), Phi-3-mini 96 (not a power of two: the Triton kernel pads it), Gemma 2/3 256 with a sliding
# window (4096 / 512 / 1024 in the checkpoints; small here so that it cuts) and Gemma 2's softcap 50.
FAMILY_CASES = {  # name: (head_dim, group, window, softcap)
    "gemma2": (256, 2, 9, 50.0),
    "gemma3": (256, 2, 9, 0.0),
    "phi3": (96, 1, 13, 0.0),
    "mistral": (128, 4, 7, 0.0),
    "softcap_only": (64, 3, 0, 5.0),  # a small cap, so that it bends the scores
}


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("window,softcap", [(1, 0.0), (6, 0.0), (17, 3.0), (0, 2.0)])
def test_reference_window_and_softcap_match_oracle(mode, window, softcap):
    args = make_attention_case(300 + window, torch.float64, 16, group=2, mode=mode, max_len=24, n_rows=4,
                               n_prefix=7, device="cpu")
    family = {"window": window, "softcap": softcap}
    assert_matches(gated_prefix_attention_ref(*args, **family), attention_oracle(*args, **family), torch.float64)


def test_a_window_wider_than_the_sequence_and_a_huge_softcap_change_nothing():
    args = make_attention_case(8, torch.float64, 32, group=2, mode="prefill", max_len=30, n_rows=3, device="cpu")
    plain = gated_prefix_attention_ref(*args)
    torch.testing.assert_close(gated_prefix_attention_ref(*args, window=10_000), plain, rtol=0, atol=0)
    torch.testing.assert_close(gated_prefix_attention_ref(*args, softcap=1e9), plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", FAMILY_CASES)
@pytest.mark.parametrize("mode", ["prefill", "decode", "task_prompt"])
def test_reference_family_shapes_match_oracle(family, mode):
    head_dim, group, window, softcap = FAMILY_CASES[family]
    args = make_attention_case(17, torch.float64, head_dim, group, mode, max_len=30, n_rows=3, n_kv_heads=1,
                               n_prefix=5, device="cpu")
    kw = {"window": window, "softcap": softcap}
    assert_matches(gated_prefix_attention_ref(*args, **kw), attention_oracle(*args, **kw), torch.float64)


@requires_triton
@pytest.mark.parametrize("family,dtype,mode", [
    ("gemma2", torch.float32, "prefill"),
    ("gemma2", torch.bfloat16, "decode"),
    ("gemma3", torch.float32, "task_prompt"),
    ("phi3", torch.float32, "prefill"),
    ("phi3", torch.float16, "chunked_ungated"),
    ("mistral", torch.float32, "decode"),
    ("softcap_only", torch.float32, "prefill_ungated"),
])
def test_attention_triton_families_small(family, dtype, mode):
    head_dim, group, window, softcap = FAMILY_CASES[family]
    args = make_attention_case(23, dtype, head_dim, group, mode, n_rows=3, max_len=40, n_kv_heads=1, n_prefix=6)
    check_attention_triton(args, dtype, window=window, softcap=softcap)


def test_windowed_or_soft_capped_decode_never_splits(monkeypatch):
    """The split-K decode kernel takes neither a window nor a softcap nor a padded head dim: the
    dispatcher keeps such a step on the one-pass kernel (which takes all three)."""
    calls = []
    monkeypatch.setattr(dispatch, "_use_triton", lambda t: True)
    monkeypatch.setattr(dispatch, "decode_splits", lambda *a: 4)
    import talora.kernels.decode_attention as split_k
    import talora.kernels.gated_attention as one_pass

    monkeypatch.setattr(split_k, "gated_decode_attention", lambda *a, **k: calls.append("split"))
    monkeypatch.setattr(one_pass, "gated_prefix_attention", lambda *a, **k: calls.append("one"))
    for head_dim, kw in ((64, {"window": 4}), (64, {"softcap": 30.0}), (96, {}), (64, {})):
        args = make_attention_case(2, torch.float32, head_dim, 1, "decode", n_rows=2, max_len=10, device="cpu")
        dispatch.gated_prefix_attention(*args[:13], max_q_len=1, max_kv_len=10, **kw)
    assert calls == ["one", "one", "one", "split"]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("family", FAMILY_CASES)
@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_triton_family_grid(family, mode, dtype):
    head_dim, group, window, softcap = FAMILY_CASES[family]
    seed = zlib.crc32(f"{family}-{mode}-{dtype}".encode()) % 10_000
    for win in (window, 4 * window + 33):  # a window that cuts within a tile and one across tiles
        args = make_attention_case(seed, dtype, head_dim, group, mode, mix=SLOT_MIXES[seed % 4], n_rows=1 + seed % 16)
        check_attention_triton(args, dtype, window=win if window else 0, softcap=softcap)


def test_small_masks_are_built_once_per_shape_and_match_fresh_ones():
    """Every layer of a step asks for the same masks: small ones are kept, equal to a fresh build."""
    import talora.kernels.reference as reference

    reference._small_joined.cache_clear()
    args = make_attention_case(3, torch.float64, 16, 2, "prefill", n_rows=5, max_len=30, device="cpu")
    first = gated_prefix_attention_ref(*args, window=7)
    built = reference._small_joined.cache_info().misses
    again = gated_prefix_attention_ref(*args, window=7)
    assert reference._small_joined.cache_info().misses == built and reference._small_joined.cache_info().hits >= built
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    layout = (((40, 9, 0, 40, False, 7), 40), (None, 3), ((40, 9, 43, 9, True, 0), 9))
    kept = reference._small_joined(9, layout, torch.device("cpu"))
    fresh = torch.cat([reference._mask(40, 9, 0, 40, False, 7, "cpu"), torch.ones(9, 3, dtype=torch.bool),
                       reference._mask(40, 9, 43, 9, True, 0, "cpu")], dim=-1)
    assert torch.equal(kept, fresh)
    assert_matches(first, attention_oracle(*args, window=7), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["decode", "decode_ungated"])
@pytest.mark.parametrize("window", [0, 3, 40])
def test_reference_decode_of_one_row_without_out(dtype, mode, window):
    """A decode step of one row and no ``out`` (the in-process generation's step) returns its result
    directly: same values as the oracle, the query's dtype and shape; a window that cuts into the
    prefix, the task prompt or the row's own keys slices each set."""
    args = make_attention_case(40 + window, dtype, 32, group=3, mode=mode, n_rows=1, max_len=30, n_prefix=9,
                               device="cpu")
    out = gated_prefix_attention_ref(*args[:15], window=window)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert_matches(out, attention_oracle(*_as_float64(args), window=window), dtype)


def test_reference_takes_the_host_layout_it_is_given():
    """``host_layout`` stands for the layout tensors (the reference reads no tensor back then): a layout
    that disagrees with them shows it is the one read."""
    args = make_attention_case(5, torch.float64, 16, group=2, mode="decode", n_rows=3, max_len=20, device="cpu")
    cu, k_starts, kv_lens, slot_ids = args[3], args[4], args[5], args[10]
    host = torch.cat([cu, k_starts, kv_lens, slot_ids]).tolist()
    torch.testing.assert_close(gated_prefix_attention_ref(*args, host_layout=host), gated_prefix_attention_ref(*args),
                               rtol=0, atol=0)
    shifted = host[:4] + [s + 1 for s in host[4:7]] + host[7:]  # each row's keys start one later
    assert not torch.equal(gated_prefix_attention_ref(*args, host_layout=shifted), gated_prefix_attention_ref(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["prefill", "chunked_ungated", "decode", "task_prompt"])
def test_reference_without_autograd_equals_the_autograd_path(dtype, mode):
    """Without autograd the reference writes the gated sum straight into ``out`` and may skip copies; the
    values are those of the path that records gradients, in every dtype ``out`` can have."""
    args = make_attention_case(61, dtype, 32, group=3, mode=mode, n_rows=4, max_len=30, n_prefix=5, device="cpu")
    recorded = gated_prefix_attention_ref(*args)
    with torch.no_grad():
        into = torch.full_like(args[0], float("nan"))
        written = gated_prefix_attention_ref(*args[:15], out=into)
    assert written is into and written.dtype == dtype
    torch.testing.assert_close(written, recorded, rtol=0, atol=0)
