"""Helpers shared by the op modules (ferrum_mps.ops.*): dtype tables, argument checks, Metal type checks."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from gguf import GGMLQuantizationType

from .. import quants, shaders

__all__ = [
    "FLOAT_DTYPES", "FLOAT_QTYPES", "IDS_DTYPES", "TAGS", "NO_ID", "cdiv", "round_up", "check_float_dtype",
    "check_float_tensor", "check_ids", "check_same_device", "check_metal", "ids_int32", "ferrum_op", "check_once", "sig",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_QTYPES = quants.FLOAT_QTYPES  # {F32: torch.float32, F16: ..., BF16: ...}
IDS_DTYPES = (torch.int32, torch.int64)
# Inductor hands these ops contiguous inputs (the Metal kernels ignore strides).
TAGS = (torch.Tag.needs_contiguous_strides,)
# An id that selects nothing: no expert (weight 0, contributes zeros), no embedding row (zeros).
NO_ID = -1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, g: int) -> int:
    return cdiv(n, g) * g


def check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dtype}")


def check_float_tensor(t: Any, what: str) -> None:
    """`t` is a float32/float16/bfloat16 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    check_float_dtype(t.dtype, what)


def check_ids(ids: torch.Tensor, what: str = "ids") -> None:
    """An int32/int64 tensor of ids (shapes and ranges are each op's business)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in IDS_DTYPES:
        raise TypeError(f"{what} must be int32 or int64, got {ids.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors on one device (None: an absent optional tensor, skipped)."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def check_metal(raw: torch.Tensor, qtype, family: str, what: str = "raw") -> GGMLQuantizationType:
    """`qtype` has Metal kernels of `family` and `raw` may be bound to them (2-byte aligned); returns the qtype."""
    qt = quants.check_qtype(qtype)
    if family not in quants.FORMATS[qt].metal:
        names = ", ".join(t.name for t in quants.metal_types(family))
        label = "MoE" if family == "moe" else family
        raise ValueError(f"{what}: {qt.name} has no Metal {label} kernel (Metal supports {names})")
    # Blocks are read with 16-bit loads: Metal needs the buffer offset 2-byte aligned.
    if raw.storage_offset() % 2:
        raise ValueError(f"{what} starts at odd byte offset {raw.storage_offset()}: GGML blocks need 2-byte alignment (clone it)")
    return qt


def sig(t: torch.Tensor | None) -> tuple | None:
    """What an argument check of tensor `t` depends on (dtype, shape, device); None stays None."""
    return None if t is None else (t.dtype, t.shape, t.device)


def check_once(key: Any, check: Callable, *args: Any) -> Any:
    """`check(*args)`, run only the first time for `key` (all its outcome depends on; None: every time).

    The thin launch path of the fused ops (as qlinear_mps's plans): a compiled decode step calls
    each op per layer per token with the same shapes, and a full check costs up to ~13 us of host
    time against ~1-3 us for building its key. The result is kept in shaders.plans (dropped with
    the compiled kernels), so a key must hold every input the check reads.
    """
    try:
        hit = shaders.plans.get(key, _MISS) if key is not None else None
    except TypeError:  # an unhashable argument (a list for an int...): the check says what is wrong
        key = None
    if key is None:
        return check(*args)
    if hit is _MISS:
        hit = shaders.plans[key] = check(*args)
    return hit


_MISS = object()


def ids_int32(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Ids as the kernels read them: contiguous int32, where every id outside [0, n) stays outside.

    An int64 id is clamped to [NO_ID, n] first, so 2**32 + 1 does not wrap onto row / expert 1:
    one elementwise op, no host sync. The kernels treat any id outside [0, n) as "none".
    """
    if ids.dtype != torch.int32:
        ids = ids.clamp(NO_ID, n).to(torch.int32)
    return ids.contiguous()


# ---------------------------------------------------------------------------
# Op registration one level below torch.library.custom_op.
#
# custom_op puts a Python autograd layer in front of every call: 15-30 us per call on this
# machine, 3-10x the cost of the launch itself (benchmarks/bench_ops.py, section launch:
# custom_op ~20 us over the function, a Library.define/impl op ~4-6 us). The ops here are
# defined with the same inferred schema, CPU impl, fake and MPS impl, plus a small Autograd
# kernel that passes straight through unless a gradient is wanted, and then makes backward
# raise (as custom_op does for an op without a backward): inference-only, never silently wrong.

_LIBS: dict[str, torch.library.Library] = {}
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_grad_enabled, _any_requires_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad  # what custom_op uses


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, *args):
        ctx.name = op.name()
        return op(*args)  # grad mode is off in here: the Autograd kernel passes through

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name} has no backward: the ferrum ops are inference-only")


class FerrumOp:
    """A ferrum op: callable like the op; register_fake / register_kernel as on a custom_op."""

    def __init__(self, qualname: str, fn: Callable, tags: tuple):
        ns, self._name = qualname.split("::")
        self._lib = _LIBS.get(ns) or _LIBS.setdefault(ns, torch.library.Library(ns, "FRAGMENT"))
        self._lib.define(self._name + torch.library.infer_schema(fn, mutates_args=()), tags=tags)
        self._lib.impl(self._name, fn, "CPU")
        self._qualname = qualname
        self._op = op = getattr(getattr(torch.ops, ns), self._name).default
        below = op._handle.redispatch_boxed

        def autograd(keyset, *args):  # a closure, not a method: this runs on every call
            if _grad_enabled() and _any_requires_grad(*args):
                return _NoBackward.apply(op, *args)
            return below(keyset & _BELOW_AUTOGRAD, *args)

        self._lib.impl(self._name, autograd, "Autograd", with_keyset=True)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any) -> Any:
        return self._op(*args)

    @property
    def default(self) -> torch._ops.OpOverload:
        return self._op

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self._qualname, lib=self._lib)(fn)
        return fn

    def register_kernel(self, device: str) -> Callable[[Callable], Callable]:
        def wrap(fn: Callable) -> Callable:
            self._lib.impl(self._name, fn, device.upper())
            return fn

        return wrap


def ferrum_op(qualname: str, tags: tuple = TAGS) -> Callable[[Callable], FerrumOp]:
    """Decorator on the CPU implementation, in place of torch.library.custom_op(qualname, mutates_args=(),
    device_types="cpu", tags=tags): the schema is inferred from its annotations."""
    return lambda fn: FerrumOp(qualname, fn, tags)
