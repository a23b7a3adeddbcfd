"""Helpers shared by the op modules (ferrum_mps.ops.*): dtype tables, argument checks, Metal type checks."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from .. import quants

__all__ = [
    "FLOAT_DTYPES", "FLOAT_QTYPES", "IDS_DTYPES", "TAGS", "NO_ID", "cdiv", "round_up", "check_float_dtype",
    "check_ids", "check_same_device", "check_metal", "ids_int32",
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


def check_ids(ids: torch.Tensor, what: str = "ids") -> None:
    """An int32/int64 tensor of ids (shapes and ranges are each op's business)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in IDS_DTYPES:
        raise TypeError(f"{what} must be int32 or int64, got {ids.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
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


def ids_int32(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Ids as the kernels read them: contiguous int32, where every id outside [0, n) stays outside.

    An int64 id is clamped to [NO_ID, n] first, so 2**32 + 1 does not wrap onto row / expert 1:
    one elementwise op, no host sync. The kernels treat any id outside [0, n) as "none".
    """
    if ids.dtype != torch.int32:
        ids = ids.clamp(NO_ID, n).to(torch.int32)
    return ids.contiguous()
