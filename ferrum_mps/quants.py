"""GGML block formats in plain torch.

`dequantize_raw` is bit-exact with gguf-py's `gguf.quants.dequantize`: every
float32 operation happens in the same order (scale products first, then one
multiply and at most one add/sub per element), as separate eager ops so nothing
gets contracted into an FMA. `quantize` follows llama.cpp's reference quantizers
(ggml-quants.c), vectorised over all blocks at once.

Block layouts are gguf's: `GGML_QUANT_SIZES[qtype] == (block_size, type_size)`.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

Q = GGMLQuantizationType

__all__ = ["check_qtype", "row_nbytes", "dequantize_raw", "quantize", "DEQUANT_TYPES", "QUANT_TYPES"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_qtype(q) -> GGMLQuantizationType:
    """`q` (GGMLQuantizationType, its int value or its name) as a supported GGMLQuantizationType."""
    if isinstance(q, GGMLQuantizationType):
        qt = q
    elif isinstance(q, str):
        try:
            qt = Q[q.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML quantization type {q!r}") from None
    else:
        try:
            qt = Q(int(q))
        except (TypeError, ValueError):
            raise ValueError(f"unknown GGML quantization type {q!r}") from None
    if qt not in _DEQUANT:
        names = ", ".join(t.name for t in _DEQUANT)
        raise ValueError(f"unsupported GGML quantization type {qt.name} ({int(qt)}); supported: {names}")
    return qt


def row_nbytes(qtype, cols: int) -> int:
    """Bytes of one row of `cols` values in `qtype`."""
    qt = check_qtype(qtype)
    block, size = GGML_QUANT_SIZES[qt]
    if not isinstance(cols, int) or cols <= 0 or cols % block:
        raise ValueError(f"row length {cols} is not a positive multiple of the {qt.name} block size {block}")
    return cols // block * size


# ---------------------------------------------------------------------------
# dequantization: fn(blocks uint8 [n, type_size]) -> float32 [n, block_size]


def _u8(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian fp16 bytes -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2, k]: low nibbles first, then high nibbles (GGML's order)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 8, k] bit planes, bit i of every byte in plane i."""
    return (b.unsqueeze(-2) >> _u8(range(8), b.device).view(8, 1)) & 1


def _bits_le(b: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes of a little-endian integer -> [n, 8k] bits, bit j at j."""
    return ((b.unsqueeze(-1) >> _u8(range(8), b.device)) & 1).flatten(-2)


def _crumbs(b: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 4, k] 2-bit fields, shift 2i in plane i."""
    return (b.unsqueeze(-2) >> _u8((0, 2, 4, 6), b.device).view(4, 1)) & 3


def _signed(q: torch.Tensor, offset: int) -> torch.Tensor:
    return (q.to(torch.int8) - offset).to(torch.float32)


def _deq_q4_0(b):
    d = _f16(b[:, 0:2])
    q = _signed(_nibbles(b[:, 2:]).flatten(1), 8)
    return d * q


def _deq_q4_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).flatten(1).to(torch.float32)
    return d * q + m


def _q5(qh, qs):
    return _nibbles(qs).flatten(1) | (_bits_le(qh) << 4)


def _deq_q5_0(b):
    d = _f16(b[:, 0:2])
    return d * _signed(_q5(b[:, 2:6], b[:, 6:]), 16)


def _deq_q5_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return d * _q5(b[:, 4:8], b[:, 8:]).to(torch.float32) + m


def _deq_q8_0(b):
    d = _f16(b[:, 0:2])
    return b[:, 2:].view(torch.int8).to(torch.float32) * d


def _deq_q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    q = _crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).view(n, QK_K)


def _deq_q3_k(b):
    n = b.shape[0]
    hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lo = _nibbles(sc[:, :8]).reshape(n, 16)
    hi = _crumbs(sc[:, 8:12]).reshape(n, 16)
    scales = _signed(lo | (hi << 4), 32)
    dl = (d * scales).view(n, 16, 1)
    ql = _crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16)
    qh = _bits(hmask).reshape(n, 16, 16) ^ 1  # a set hmask bit means no -4 offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).view(n, QK_K)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> (8 six-bit scales, 8 six-bit mins) as float32."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scale.to(torch.float32), mins.to(torch.float32)


def _deq_q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl, ml = (d * sc).view(n, 8, 1), (dmin * mn).view(n, 8, 1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).view(n, QK_K)


def _deq_q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl, ml = (d * sc).view(n, 8, 1), (dmin * mn).view(n, 8, 1)
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q = (ql | (_bits(b[:, 16:48]) << 4)).to(torch.float32)
    return (dl * q - ml).view(n, QK_K)


def _deq_q6_k(b):
    n = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * sc.view(torch.int8).to(torch.float32)).view(n, 16, 1)
    lo = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    hi = _crumbs(qh.reshape(n, 2, 32)).reshape(n, 8, 32)
    q = _signed(lo | (hi << 4), 32).view(n, 16, 16)
    return (dl * q).view(n, QK_K)


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4(idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=idx.device)
    return table[idx.to(torch.int64)]


def _deq_iq4_nl(b):
    d = _f16(b[:, 0:2])
    return d * _iq4(_nibbles(b[:, 2:]).flatten(1))


def _deq_iq4_xs(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    hi = _crumbs(b[:, 2:4]).transpose(1, 2).reshape(n, 8)  # 2 bits per sub-block of a LE uint16
    lo = _nibbles(b[:, 4:8]).transpose(1, 2).reshape(n, 8)  # low nibble = even sub-block
    dl = (d * _signed(lo | (hi << 4), 32)).view(n, 8, 1)
    q = _iq4(_nibbles(b[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32))
    return (dl * q).view(n, QK_K)


def _deq_float(dtype):
    def f(b):
        try:
            return b.view(dtype).to(torch.float32)
        except RuntimeError:  # misaligned storage offset
            return b.contiguous().view(dtype).to(torch.float32)

    return f


_DEQUANT: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: _deq_float(torch.float32),
    Q.F16: _deq_float(torch.float16),
    Q.BF16: _deq_float(torch.bfloat16),
    Q.Q4_0: _deq_q4_0,
    Q.Q4_1: _deq_q4_1,
    Q.Q5_0: _deq_q5_0,
    Q.Q5_1: _deq_q5_1,
    Q.Q8_0: _deq_q8_0,
    Q.Q2_K: _deq_q2_k,
    Q.Q3_K: _deq_q3_k,
    Q.Q4_K: _deq_q4_k,
    Q.Q5_K: _deq_q5_k,
    Q.Q6_K: _deq_q6_k,
    Q.IQ4_NL: _deq_iq4_nl,
    Q.IQ4_XS: _deq_iq4_xs,
}
DEQUANT_TYPES = tuple(_DEQUANT)

# Values per dequantization step: big enough to amortise op dispatch, small enough
# that the uint8/float32 temporaries stay in cache.
_CHUNK_VALUES = 1 << 18


def dequantize_raw(raw: torch.Tensor, qtype, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize rows of GGML blocks: uint8 `raw` (any shape, numel = rows * row_nbytes) -> [rows, cols]."""
    if not isinstance(raw, torch.Tensor):
        raise TypeError(f"raw must be a torch.uint8 tensor, got {type(raw).__name__}")
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw must be torch.uint8, got {raw.dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    qt = check_qtype(qtype)
    nb = row_nbytes(qt, cols)
    if raw.numel() % nb:
        raise ValueError(f"raw has {raw.numel()} bytes, not a whole number of {qt.name} rows of {cols} values ({nb} bytes each)")
    rows = raw.numel() // nb
    block, size = GGML_QUANT_SIZES[qt]
    blocks = raw.reshape(-1, size)
    out = torch.empty(rows * cols, dtype=dtype, device=raw.device).view(-1, block)
    fn = _DEQUANT[qt]
    step = max(1, _CHUNK_VALUES // block) if raw.device.type == "cpu" else blocks.shape[0] or 1
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = fn(blocks[i : i + step])
    return out.view(rows, cols)


def quantize(w: torch.Tensor, qtype) -> torch.Tensor:  # pragma: no cover - replaced below
    raise NotImplementedError
