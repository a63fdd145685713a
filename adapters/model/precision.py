"""16-bit matrix products on CPUs without native 16-bit kernels.

On a CPU without AVX-512 BF16 / AMX (or Arm's BF16 extension), torch runs a ``bfloat16`` matrix
product through a generic fallback, many times slower than the same product in float32
(docs/training.md has the figures).
Elementwise work is not affected: it is vectorised through float32 either way.

A native bfloat16 product reads bfloat16 inputs, forms each product exactly in float32,
accumulates in float32 and rounds the result to bfloat16. ``FloatMatmul`` computes the same thing
with float32 kernels: it widens the 16-bit inputs (exactly), runs the float32 product and rounds
the result back, so that the model keeps its bfloat16 numerics (weights, activations and outputs
all in bfloat16) at float32 speed. Only the order of the float32 sums differs, as it does between
any two native kernels. Gradients follow the same path: autograd records the float32 product.

``CausalLM`` enters it around its decoder layers and head when its weights are 16-bit on such a
CPU (``float_matmul_needed``); ``TALORA_FLOAT_MATMUL=0`` turns it off (to time torch's own path).
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The one table of dtype names: configs, flags and adapter files name a dtype by one of these.
DtypeName = Literal["float32", "bfloat16", "float16"]
TrainDtypeName = Literal["float32", "bfloat16"]  # float16 training would need loss scaling
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}
HALF = (torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (``KeyError`` for a dtype outside ``DTYPES``)."""
    return {v: k for k, v in DTYPES.items()}[dtype]


# Products whose 16-bit CPU kernels fall back to the slow generic path.
_PRODUCTS = frozenset({
    F.linear, F.bilinear, F.scaled_dot_product_attention,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
    torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm,
    torch.addbmm, torch.Tensor.addbmm, torch.einsum,
})


@functools.cache
def native_half(dtype: torch.dtype) -> bool:
    """Whether torch's CPU kernels for the 16-bit float ``dtype`` run natively on this CPU (oneDNN's
    own check: AVX-512 BF16 or AMX on x86, BF16 / FP16 extensions on Arm)."""
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without the check: assume native
        return True


def half_cpu(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether ``dtype`` is 16-bit and ``device`` a CPU without native kernels for it."""
    return dtype in HALF and torch.device(device).type == "cpu" and not native_half(dtype)


def float_matmul_enabled() -> bool:
    """False when ``TALORA_FLOAT_MATMUL`` is 0 / false / no / off (to time torch's own path)."""
    return os.environ.get("TALORA_FLOAT_MATMUL", "1").strip().lower() not in ("0", "false", "no", "off")


def float_matmul_needed(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether a model in ``dtype`` on ``device`` should run its products through ``FloatMatmul``."""
    return half_cpu(dtype, device) and float_matmul_enabled()


def _half_of(tensors: list[torch.Tensor]) -> torch.dtype | None:
    """The one 16-bit dtype of a product's floating-point CPU operands, else None (leave it alone)."""
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats or any(t.device.type != "cpu" for t in tensors):
        return None
    dtypes = {t.dtype for t in floats}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    return dtype if dtype in HALF else None


def _widen(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_widen(v) for v in value)
    return value


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


class FloatMatmul(TorchFunctionMode):
    """Run 16-bit CPU matrix products in float32 and round their results back to 16 bits."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS and "out" not in kwargs:
            half = _half_of(_tensors([*args, *kwargs.values()]))
            if half is not None:
                return func(*_widen(args), **_widen(kwargs)).to(half)
        return func(*args, **kwargs)


_state = threading.local()
T = TypeVar("T", bound=Callable[..., Any])


def float_matmul_scope(method: T) -> T:
    """Decorate a ``CausalLM`` method: run it under ``FloatMatmul`` when ``self.float_matmul``.
    Nested decorated calls enter the mode once."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if getattr(_state, "active", False) or not self.float_matmul:
            return method(self, *args, **kwargs)
        _state.active = True
        try:
            with FloatMatmul():
                return method(self, *args, **kwargs)
        finally:
            _state.active = False

    return wrapper  # type: ignore[return-value]
