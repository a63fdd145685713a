"""16-bit matrix products through float32 kernels (``talora.adapters.model.precision``)."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from talora.adapters.model.precision import FloatMatmul

PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_attention_math"}


class ProductDtypes(TorchDispatchMode):
    """Records the operand dtypes of every aten matrix product that runs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in PRODUCTS:
            self.seen.append((name, {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}))
        return func(*args, **(kwargs or {}))


class Exact(TorchFunctionMode):
    """Every floating operand in float64: the reference result."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def wide(v):
            return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        return func(*[wide(a) for a in args], **{k: wide(v) for k, v in (kwargs or {}).items()})


def _ops(gen):
    x = torch.randn(24, 40, generator=gen).bfloat16()
    w = (torch.randn(32, 40, generator=gen) * 0.1).bfloat16()
    b = torch.randn(32, generator=gen).bfloat16()
    q, k, v = (torch.randn(2, 3, 8, 16, generator=gen).bfloat16() for _ in range(3))
    return {
        "linear": lambda: F.linear(x, w, b),
        "matmul": lambda: x @ w.T,
        "bmm": lambda: torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)),
        "einsum": lambda: torch.einsum("bhqd,bhkd->bhqk", q, k),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


@pytest.mark.parametrize("op", ["linear", "matmul", "bmm", "einsum", "sdpa"])
def test_float_matmul_keeps_bfloat16_results_and_runs_float32_kernels(op):
    f = _ops(torch.Generator().manual_seed(0))[op]
    native = f()
    with ProductDtypes() as spy, FloatMatmul():
        emulated = f()
    assert spy.seen and all(dtypes == {torch.float32} for _, dtypes in spy.seen), spy.seen
    assert emulated.dtype == native.dtype == torch.bfloat16 and emulated.shape == native.shape
    with Exact():
        exact = f()
    # as close to the exact result as torch's own bfloat16 path, and equal to it but for a rare last
    # bit (float32 sums in another order); native sdpa also rounds its softmax to bfloat16 before
    # the second product, which the float32 kernel does not
    assert (emulated.double() - exact).abs().max() <= (native.double() - exact).abs().max() * 1.01 + 1e-6
    if op != "sdpa":
        assert (emulated == native).float().mean() > 0.99
        assert torch.equal(emulated, exact.bfloat16()) or (emulated == exact.bfloat16()).float().mean() > 0.99


def test_float_matmul_leaves_float32_and_mixed_products_alone():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with ProductDtypes() as spy, FloatMatmul():
        out = x @ w
    assert [d for _, d in spy.seen] == [{torch.float32}]
    assert out.dtype == torch.float32 and torch.equal(out, x @ w)
    with FloatMatmul(), pytest.raises(RuntimeError):  # a dtype mismatch still fails as it does natively
        x.bfloat16() @ w


def test_gradients_flow_through_float32_products():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, generator=gen).bfloat16().requires_grad_(True)
    w = (torch.randn(12, 16, generator=gen) * 0.1).bfloat16()
    grads = {}
    for name, mode in (("native", None), ("float", FloatMatmul)):
        x.grad = None
        if mode:
            with mode():
                y = F.linear(x, w)
        else:
            y = F.linear(x, w)
        y.float().square().sum().backward()
        grads[name] = x.grad.clone()
    assert grads["float"].dtype == torch.bfloat16
    torch.testing.assert_close(grads["float"].float(), grads["native"].float(), rtol=2 ** -6, atol=1e-3)


def test_a_bfloat16_model_without_native_kernels_matches_torchs_own_path(tmp_path, monkeypatch):
    from talora.adapters.model import precision
    from talora.adapters.model.loading import load_checkpoint_folder
    from tests.helpers import save_tiny_checkpoint

    lm, _ = load_checkpoint_folder(save_tiny_checkpoint(tmp_path / "m"), torch.bfloat16)
    ids = torch.randint(0, lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(precision, "native_half", lambda dtype: False)
    assert lm.float_matmul
    with torch.no_grad(), ProductDtypes() as spy:
        emulated = lm(ids)
    assert spy.seen and all(dtypes == {torch.float32} for _, dtypes in spy.seen)
    monkeypatch.setenv("TALORA_FLOAT_MATMUL", "0")
    assert not lm.float_matmul
    with torch.no_grad(), ProductDtypes() as spy:
        native = lm(ids)
    assert {torch.bfloat16} in [d for _, d in spy.seen]
    assert emulated.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(emulated.float(), native.float(), rtol=0.05, atol=0.05)
