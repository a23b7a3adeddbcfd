"""GGML block formats in plain torch.

`dequantize_raw` is bit-exact with gguf-py's `gguf.quants.dequantize`: every
float32 operation happens in the same order (scale products first, then one
multiply and at most one add/sub per element), as separate eager ops so nothing
gets contracted into an FMA. `quantize` follows llama.cpp's reference quantizers
(ggml-quants.c), vectorised over all blocks at once.

Block layouts are gguf's: `GGML_QUANT_SIZES[qtype] == (block_size, type_size)`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

Q = GGMLQuantizationType

__all__ = [
    "check_qtype", "row_nbytes", "dequantize_raw", "code_planes", "plane_layout", "quantize", "DEQUANT_TYPES", "QUANT_TYPES",
    "UnsupportedQuantization", "Format", "FORMATS", "METAL_FAMILIES", "FLOAT_QTYPES", "metal_types",
]

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
            qt = Q(operator.index(q))  # ints (Python, numpy, 0-d torch), not floats
        except (TypeError, ValueError):
            raise ValueError(f"unknown GGML quantization type {q!r}") from None
    if qt not in FORMATS:
        names = ", ".join(t.name for t in FORMATS)
        raise ValueError(f"unsupported GGML quantization type {qt.name} ({int(qt)}); supported: {names}")
    return qt


def row_nbytes(qtype, cols: int) -> int:
    """Bytes of one row of `cols` values in `qtype` (cols may be a SymInt under torch.compile)."""
    qt = check_qtype(qtype)
    block, size = GGML_QUANT_SIZES[qt]
    if isinstance(cols, torch.SymInt):
        n = cols  # operator.index would specialise it; the checks below only add guards
    else:
        try:
            n = operator.index(cols)
        except TypeError:
            raise ValueError(f"row length must be an int, got {cols!r}") from None
    if n <= 0 or n % block:
        raise ValueError(f"row length {cols} is not a positive multiple of the {qt.name} block size {block}")
    return n // block * size


# ---------------------------------------------------------------------------
# dequantization helpers (uint8 bit twiddling; GGML's element order)


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
    return q.view(torch.int8) - offset  # codes < 128: reinterpreting the bytes is free


# Each format is `scale * q - offset` per element: fn(blocks) -> (scale, q, offset) with
# q the integer codes (or levels) shaped [n, groups, per_group], scale and offset
# [n, groups, 1] float32 (offset None when there is none; `+ m` is `- (-m)`, exact in IEEE).
# dequantize_raw turns q into float32 in the output buffer and applies scale and offset
# in place: gguf-py's two roundings (product, then sum) and no temporaries.


def _deq_q4_0(b):
    return _f16(b[:, 0:2])[:, :, None], _signed(_nibbles(b[:, 2:]).flatten(1), 8)[:, None], None


def _deq_q4_1(b):
    q = _nibbles(b[:, 4:]).flatten(1)[:, None]
    return _f16(b[:, 0:2])[:, :, None], q, -_f16(b[:, 2:4])[:, :, None]


def _q5(qh, qs):
    return _nibbles(qs).flatten(1) | (_bits_le(qh) << 4)


def _deq_q5_0(b):
    return _f16(b[:, 0:2])[:, :, None], _signed(_q5(b[:, 2:6], b[:, 6:]), 16)[:, None], None


def _deq_q5_1(b):
    return _f16(b[:, 0:2])[:, :, None], _q5(b[:, 4:8], b[:, 8:])[:, None], -_f16(b[:, 2:4])[:, :, None]


def _deq_q8_0(b):
    return _f16(b[:, 0:2])[:, :, None], b[:, 2:].view(torch.int8)[:, None], None


def _deq_q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    return dl, _crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16), ml


def _deq_q3_k(b):
    n = b.shape[0]
    hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lo = _nibbles(sc[:, :8]).reshape(n, 16)
    hi = _crumbs(sc[:, 8:12]).reshape(n, 16)
    dl = (d * _signed(lo | (hi << 4), 32).to(torch.float32)).view(n, 16, 1)
    ql = _crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16)
    qh = _bits(hmask).reshape(n, 16, 16) ^ 1  # a set hmask bit means no -4 offset
    return dl, ql.view(torch.int8) - (qh << 2).view(torch.int8), None


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> (8 six-bit scales, 8 six-bit mins) as float32."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scale.to(torch.float32), mins.to(torch.float32)


def _k_min_scales(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc).view(n, 8, 1), (dmin * mn).view(n, 8, 1)


def _deq_q4_k(b):
    dl, ml = _k_min_scales(b)
    return dl, _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32), ml


def _deq_q5_k(b):
    dl, ml = _k_min_scales(b)
    ql = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return dl, ql | (_bits(b[:, 16:48]) << 4), ml


def _deq_q6_k(b):
    n = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * sc.view(torch.int8).to(torch.float32)).view(n, 16, 1)
    lo = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    hi = _crumbs(qh.reshape(n, 2, 32)).reshape(n, 8, 32)
    return dl, _signed(lo | (hi << 4), 32).view(n, 16, 16), None


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4(idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.int8, device=idx.device)
    return table[idx.to(torch.int64)]


def _deq_iq4_nl(b):
    return _f16(b[:, 0:2])[:, :, None], _iq4(_nibbles(b[:, 2:]).flatten(1))[:, None], None


def _deq_iq4_xs(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    hi = _crumbs(b[:, 2:4]).transpose(1, 2).reshape(n, 8)  # 2 bits per sub-block of a LE uint16
    lo = _nibbles(b[:, 4:8]).transpose(1, 2).reshape(n, 8)  # low nibble = even sub-block
    dl = (d * _signed(lo | (hi << 4), 32).to(torch.float32)).view(n, 8, 1)
    return dl, _iq4(_nibbles(b[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32)), None


def _deq_float(dtype):
    def f(b):
        try:
            v = b.view(dtype)
        except RuntimeError:  # misaligned storage offset
            v = b.contiguous().view(dtype)
        return None, v[:, None], None

    return f




# ---------------------------------------------------------------------------
# code planes: the decode-path qlinear's view of a format (ferrum_mps.ops.linear).
#
# code_planes(b3, qt) splits a chunk of blocks b3 [rows, blocks, type_size] into
# integer "planes" [rows, blocks, w] plus per-block scales, such that
#     value[e] = scale[g(e)] * sum_planes factor * code[position of e] - bias[g(e)]
# PLANE_LAYOUT[qt] gives, per plane, the element of the block each of its w positions
# holds (-1: none, the position is ignored: the caller's x is 0 there) and its factor.
# The planes are cheap to make: whole contiguous blocks where the codes are bytes or
# nibbles (header bytes included, ignored: no 16-wide strided rows, which torch runs
# slowly), natural element order for the 256-value formats. scale/bias are float32
# [rows, blocks, groups]; bias None when 0; group g(e) = e // (block / groups).


def _nib_planes(b3, off: int):
    return [b3 & 0x0F, b3 >> 4], off


_SPREAD, _BIT_S = 0x0101010101010101, 0x8040201008040201 - (1 << 64)


def _bits_spread(qh):
    """[r, n, k] bytes -> uint8 [r, n, 8k]: bit s of byte t, times 2^s, at 8t + s.

    One int64 multiply copies each byte into all 8 bytes of a word (wrapping mod 2^64),
    one mask keeps bit s in byte s: 3 contiguous ops where shifting bit by bit is 16
    (torch runs broadcast shifts/ands ~10x slower than scalar ones). Plane layouts
    fold the 2^-s back into the factors.
    """
    r, n, k = qh.shape
    return ((qh.to(torch.int64) * _SPREAD) & _BIT_S).view(torch.uint8).view(r, n, 8 * k)


def _f16_3(b3, i: int):
    """The fp16 at byte i of every block as float32 [r, n, 1]."""
    if b3.storage_offset() % 2 == 0:  # read it in place: copying 2-byte columns out is slow
        return b3.view(torch.float16)[:, :, i // 2 : i // 2 + 1].to(torch.float32)
    return b3[:, :, i : i + 2].contiguous().view(torch.float16).to(torch.float32)


def _cp_q4_0(b3):
    d = _f16_3(b3, 0)
    return [b3 & 0x0F, b3 >> 4], d, d * 8


def _cp_q4_1(b3):
    return [b3 & 0x0F, b3 >> 4], _f16_3(b3, 0), -_f16_3(b3, 2)


def _cp_q5_0(b3):
    d = _f16_3(b3, 0)
    return [b3 & 0x0F, b3 >> 4, _bits_spread(b3[:, :, 2:6])], d, d * 16


def _cp_q5_1(b3):
    return [b3 & 0x0F, b3 >> 4, _bits_spread(b3[:, :, 4:8])], _f16_3(b3, 0), -_f16_3(b3, 2)


def _cp_q8_0(b3):
    return [b3.view(torch.int8)], _f16_3(b3, 0), None


def _or_shifted(u: torch.Tensor, src: torch.Tensor, shift: int, mask: int) -> None:
    """u |= (src >> shift) & mask moved to bits 4+ (scalar shifts only: torch vectorises those)."""
    t = src << (4 - shift) if shift <= 4 else src >> (shift - 4)
    u.bitwise_or_(t & (mask << 4))


def _k256(b3, qs: int):
    """Q4_K/Q5_K low nibbles in natural order: uint8 [r, n, 256]."""
    r, n = b3.shape[:2]
    q = b3[:, :, qs : qs + 128].view(r, n, 4, 32)
    u = torch.empty(r, n, 4, 2, 32, dtype=torch.uint8, device=b3.device)
    u[:, :, :, 0].copy_(q & 0x0F)
    u[:, :, :, 1].copy_(q >> 4)
    return u.view(r, n, 256)


def _k_scales3(b3):
    """Q4_K/Q5_K (d * scale, dmin * min) of the 8 sub-blocks, float32 [r, n, 8] each.

    get_scale_min_k4 on whole 32-bit words (4 sub-blocks per op, one op per block):
    byte-sized columns would be ~10x slower in torch.
    """
    r, n = b3.shape[:2]
    if b3.storage_offset() % 4:
        dl, ml = _k_min_scales(b3.reshape(r * n, -1))
        return dl.view(r, n, 8), ml.view(r, n, 8)
    w = b3.view(torch.int32)  # bytes 4..16 = words 1..3: low scales, low mins, high bits
    d, m, md = w[:, :, 1], w[:, :, 2], w[:, :, 3]
    sm = torch.stack((d & 0x3F3F3F3F, (md & 0x0F0F0F0F) | ((d >> 2) & 0x30303030),
                      m & 0x3F3F3F3F, ((md >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030)), dim=2)
    sm = sm.view(torch.uint8).view(r, n, 2, 8).to(torch.float32)
    return _f16_3(b3, 0) * sm[:, :, 0], _f16_3(b3, 2) * sm[:, :, 1]


def _cp_q4_k(b3):
    q = b3[:, :, 16:]
    return [q & 0x0F, q >> 4], *_k_scales3(b3)


def _cp_q5_k(b3):
    r, n = b3.shape[:2]
    u = _k256(b3, 48)
    qh, v = b3[:, :, 16:48], u.view(r, n, 8, 32)
    for s in range(8):  # bit s of qh byte j -> high bit of value 32 s + j
        _or_shifted(v[:, :, s], qh, s, 1)
    return [u], *_k_scales3(b3)


def _cp_q6_k(b3):
    r, n = b3.shape[:2]
    ql, qh = b3[:, :, :128].view(r, n, 2, 64), b3[:, :, 128:192].view(r, n, 2, 32)
    u = torch.empty(r, n, 2, 2, 64, dtype=torch.uint8, device=b3.device)
    u[:, :, :, 0].copy_(ql & 0x0F)
    u[:, :, :, 1].copy_(ql >> 4)
    v = u.view(r, n, 2, 4, 32)
    for i in range(4):  # 2-bit field i of qh byte j -> high bits of value 128 h + 32 i + j
        _or_shifted(v[:, :, :, i], qh, 2 * i, 3)
    dl = _f16_3(b3, 208) * b3[:, :, 192:208].view(torch.int8).to(torch.float32)
    return [u.view(r, n, 256)], dl, dl * 32


def _cp_q2_k(b3):
    r, n = b3.shape[:2]
    qs = b3[:, :, 16:80].view(r, n, 2, 32)
    u = torch.empty(r, n, 2, 4, 32, dtype=torch.uint8, device=b3.device)
    for i in range(4):
        u[:, :, :, i].copy_((qs >> 2 * i) & 3)
    sc = b3[:, :, :16]
    dl = _f16_3(b3, 80) * (sc & 0x0F).to(torch.float32)
    ml = _f16_3(b3, 82) * (sc >> 4).to(torch.float32)
    return [u.view(r, n, 256)], dl, ml


def _cp_generic(qt):
    fn = FORMATS[qt].dequant

    def f(b3):
        r, n = b3.shape[:2]
        scale, q, offset = fn(b3.reshape(r * n, -1))
        g = scale.shape[1]
        return [q.reshape(r, n, -1)], scale.view(r, n, g), None if offset is None else offset.view(r, n, g)

    return f


def _layout(size: int, *parts):
    """Plane layouts: parts = (byte offset of the first code, elements, factor) per plane, over whole blocks."""
    out = []
    for off, elems, factor in parts:
        e = [-1] * off + list(elems)
        out.append((e + [-1] * (size - len(e)) if len(e) < size else e, factor))
    return out


# Filled from FORMATS at the end of the module; a format without its own planes gets one
# generic plane (its dequant's codes) on first use.
_CODE_PLANES: dict = {}


def plane_layout(qtype) -> list[tuple[list[int], float | list[float]]]:
    """Per plane of code_planes: (element of the block at each position, -1 for none; factor, or one per position)."""
    qt = check_qtype(qtype)
    if FORMATS[qt].torch_dtype is not None:
        raise ValueError(f"{qt.name} is a float format: it has no integer codes")
    if qt not in _CODE_PLANES:
        block = GGML_QUANT_SIZES[qt][0]
        _CODE_PLANES[qt] = (_cp_generic(qt), [(list(range(block)), 1)])
    return _CODE_PLANES[qt][1]


def code_planes(b3: torch.Tensor, qtype):
    """Blocks b3 (uint8 [rows, blocks, type_size]) -> (planes, scale, bias): see plane_layout."""
    plane_layout(qtype)
    return _CODE_PLANES[check_qtype(qtype)][0](b3)


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
    fn = FORMATS[qt].dequant
    step = max(1, _CHUNK_VALUES // block) if raw.device.type == "cpu" else blocks.shape[0] or 1
    for i in range(0, blocks.shape[0], step):
        scale, q, offset = fn(blocks[i : i + step])
        o = out[i : i + step].view(q.shape)
        if dtype != torch.float32:
            o = torch.empty(q.shape, dtype=torch.float32, device=raw.device)
        o.copy_(q)  # integer codes -> float32, exact
        if scale is not None:
            o.mul_(scale)
        if offset is not None:
            o.sub_(offset)
        if dtype != torch.float32:
            out[i : i + step].view(q.shape).copy_(o)
    return out.view(rows, cols)


# ---------------------------------------------------------------------------
# quantization: llama.cpp's reference quantizers (quantize_row_*_ref), all blocks at once.
# fn(x float32 [n, block_size]) -> uint8 [n, type_size]


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> [n, 2] fp16 bytes (round to nearest even, like GGML_FP32_TO_FP16)."""
    return d.to(torch.float16).view(-1, 1).view(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf (halves away from zero), exact for every float32."""
    a = x.abs()
    f = a.floor()
    return torch.copysign(f + torch.floor(2 * (a - f)), x)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8k] 0/1 -> [..., k] bytes, bit j of the little-endian integer = bits[j]."""
    shifts = _u8(range(8), bits.device)
    return (bits.unflatten(-1, (-1, 8)) << shifts).sum(-1, dtype=torch.uint8)


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per row (first one on ties, like the C loops' strict `<`)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _q_q8_0(x):
    d = x.abs().amax(1) / 127
    q = _round_away(x * _inv(d)[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat((_f16_bytes(d), q), 1)


def _q_q4_0(x):
    d = _signed_max(x) / -8
    q = torch.trunc(x * _inv(d)[:, None] + 8.5).clamp_(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _pack_nibbles(q[:, :16], q[:, 16:])), 1)


def _q_q5_0(x):
    d = _signed_max(x) / -16
    q = torch.trunc(x * _inv(d)[:, None] + 16.5).clamp_(0, 31).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _pack_bits(q >> 4), _pack_nibbles(q[:, :16], q[:, 16:])), 1)


def _q_q4_1(x):
    mn, mx = x.amin(1), x.amax(1)
    d = (mx - mn) / 15
    q = torch.trunc((x - mn[:, None]) * _inv(d)[:, None] + 0.5).clamp_(0, 15).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q[:, :16], q[:, 16:])), 1)


def _q_q5_1(x):
    mn, mx = x.amin(1), x.amax(1)
    d = (mx - mn) / 31
    q = torch.trunc((x - mn[:, None]) * _inv(d)[:, None] + 0.5).clamp_(0, 31).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _pack_bits(q >> 4), _pack_nibbles(q[:, :16], q[:, 16:])), 1)


def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants for every row of x [N, n] at once: (L uint8 [N, n], scale [N], -min [N]).

    Start from the min/max grid, then try nstep+1 stretched grids (rmin + rdelta*is
    extra levels), refitting scale and min of each by weighted least squares and
    keeping it when its weighted squared error is lower. As in llama.cpp the grid
    of each try is laid from the best min found so far, so the tries run in
    sequence, each one over all rows at once.
    """
    mn = x.amin(1).clamp(max=0)
    mx = x.amax(1)
    flat = mx == mn
    sum_w, sum_x = w.sum(1), (w * x).sum(1)

    def grid(iscale, m):
        return (x - m).mul_(iscale).round_().clamp_(0, nmax)

    def sums(l):
        wl = w * l
        return wl.sum(1), (wl * l).sum(1), (wl * x).sum(1)

    def error(s, m, sum_l, sum_l2, sum_xl):
        # sum w (s*l + m - x)^2 expanded, without the sum w*x^2 that every candidate shares
        return s * (s * sum_l2 + 2 * (m * sum_l - sum_xl)) + m * (m * sum_w - 2 * sum_x)

    iscale = nmax / torch.where(flat, 1.0, mx - mn)
    scale = 1 / iscale
    L = grid(iscale[:, None], mn[:, None])
    best = error(scale, mn, *sums(L))
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / (mx - mn)
        laux = grid(iscale[:, None], mn[:, None])
        sum_l, sum_l2, sum_xl = sums(laux)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        err = error(this_scale, this_min, sum_l, sum_l2, sum_xl)
        better = ok & (err < best)
        L = torch.where(better[:, None], laux, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat[:, None], 0.0, L)
    scale = torch.where(flat, 0.0, scale)
    return L.to(torch.uint8), scale, -mn


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> the 12 bytes get_scale_min_k4 reads."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat((lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), _pack_nibbles(hi_s, hi_m)), 1)


def _q_k_min(x, nmax: int, rmin: float, rdelta: float, nstep: int):
    """quantize_row_q4_K_ref / q5_K_ref up to packing: (d, dmin fp16 bytes, 12 scale bytes, L [n, 8, 32])."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    av = torch.sqrt((xs * xs).sum(1) / 32)
    L, sc, mn = _make_qkx2(xs, av[:, None] + xs.abs(), nmax, rmin, rdelta, nstep)
    sc, mn, L = sc.view(nb, 8), mn.view(nb, 8), L.view(nb, 8, 32)
    max_scale, max_min = sc.amax(1).clamp(min=0), mn.amax(1).clamp(min=0)
    ls = torch.round(torch.where(max_scale > 0, 63 / max_scale, 0)[:, None] * sc).clamp_(0, 63)
    lm = torch.round(torch.where(max_min > 0, 63 / max_min, 0)[:, None] * mn).clamp_(0, 63)
    d16, dmin16 = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    d = (d16.float()[:, None] * ls)[:, :, None]
    dm = (dmin16.float()[:, None] * lm)[:, :, None]
    requant = torch.round((x.view(nb, 8, 32) + dm) / torch.where(d == 0, torch.ones_like(d), d)).clamp_(0, nmax)
    L = torch.where(d != 0, requant.to(torch.uint8), L)
    head = torch.cat((d16.view(-1, 1).view(torch.uint8), dmin16.view(-1, 1).view(torch.uint8),
                      _pack_scale_min_k4(ls.to(torch.uint8), lm.to(torch.uint8))), 1)
    return head, L


def _q_q4_k(x):
    head, L = _q_k_min(x, 15, -1.0, 0.1, 20)
    qs = _pack_nibbles(L[:, 0::2], L[:, 1::2]).flatten(1)  # sub-blocks 2c, 2c+1 share 32 bytes
    return torch.cat((head, qs), 1)


def _q_q5_k(x):
    head, L = _q_k_min(x, 31, -0.5, 0.1, 15)
    qs = _pack_nibbles(L[:, 0::2], L[:, 1::2]).flatten(1)
    qh = ((L >> 4) << _u8(range(8), x.device).view(8, 1)).sum(1, dtype=torch.uint8)  # bit s = sub-block s
    return torch.cat((head, qh, qs), 1)


_QX_STEPS = (0, -9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9)


def _make_qx(x, nmax: int):
    """make_qx_quants(rmse_type=1, no weights) for every row of x [N, n]: (L [N, n] in [0, 2*nmax), scale [N])."""
    mx = _signed_max(x)
    zero = mx.abs() < 1e-15
    mx = torch.where(zero, torch.ones_like(mx), mx)
    steps = torch.tensor(_QX_STEPS, dtype=torch.float32, device=x.device)
    iscale = -(nmax + 0.1 * steps)[None, :] / mx[:, None]  # [N, C]
    l = torch.mul(iscale[:, :, None], x[:, None, :]).round_().clamp_(-nmax, nmax - 1)
    wl = (x * x)[:, None, :] * l
    sumlx, suml2 = (wl * x[:, None, :]).sum(-1), (wl * l).sum(-1)
    pos = suml2 > 0
    safe = torch.where(pos, suml2, torch.ones_like(suml2))
    score = torch.where(pos, sumlx * sumlx / safe, torch.full_like(sumlx, -float("inf")))
    score[:, 0] = torch.where(pos[:, 0], score[:, 0], torch.zeros_like(score[:, 0]))
    best = score.argmax(1, keepdim=True)
    L = l.gather(1, best[:, :, None].expand(-1, 1, l.shape[-1])).squeeze(1) + nmax
    scale = torch.where(pos, sumlx / safe, torch.zeros_like(sumlx)).gather(1, best).squeeze(1)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return L.to(torch.uint8), scale


def _q_q6_k(x):
    nb = x.shape[0]
    L, sc = _make_qx(x.reshape(nb * 16, 16), 32)
    L, sc = L.view(nb, 16, 16), sc.view(nb, 16)
    max_scale = _signed_max(sc)
    zero = max_scale.abs() < 1e-15
    iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d16 = (1 / iscale).to(torch.float16)
    q_sc = torch.round(iscale[:, None] * sc).clamp_(-128, 127)
    d = (d16.float()[:, None] * q_sc)[:, :, None]
    requant = torch.round(x.view(nb, 16, 16) / torch.where(d == 0, torch.ones_like(d), d)).clamp_(-32, 31) + 32
    L = torch.where(d != 0, requant.to(torch.uint8), L).view(nb, 2, 4, 32)
    ql = _pack_nibbles(L[:, :, 0:2], L[:, :, 2:4]).flatten(1)
    qh = ((L >> 4) << _u8((0, 2, 4, 6), x.device).view(4, 1)).sum(2, dtype=torch.uint8).flatten(1)
    out = torch.cat((ql, qh, q_sc.to(torch.int8).view(torch.uint8), d16.view(-1, 1).view(torch.uint8)), 1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)


def _q_float(dtype):
    def f(x):
        return x.to(dtype).view(torch.uint8)

    return f


class UnsupportedQuantization(ValueError, NotImplementedError):
    """quantize() has no quantizer for this type (a ValueError; also a NotImplementedError, like gguf-py's)."""


# Values per quantization step: the k-quant searches hold ~20 candidates per value.
_QUANT_CHUNK_VALUES = 1 << 17


def quantize(w: torch.Tensor, qtype) -> torch.Tensor:
    """Quantize float `w` [..., cols] to GGML blocks: uint8 [..., row_nbytes] on w's device.

    Follows llama.cpp's reference quantizers (no importance matrix): Q8_0/Q4_0/Q5_0
    are absmax-scaled, Q4_1/Q5_1 min/max-scaled, Q4_K/Q5_K search each sub-block's scale and min
    (make_qkx2_quants), Q6_K searches each sub-block's scale (make_qx_quants).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a float tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a float tensor, got {w.dtype}")
    qt = check_qtype(qtype)
    fmt = FORMATS[qt]
    if fmt.quantize is None:
        raise UnsupportedQuantization(
            f"quantize does not support {qt.name}; supported: {', '.join(t.name for t in QUANT_TYPES)}"
        )
    if w.dim() == 0:
        raise ValueError("w must have at least one dimension")
    cols = w.shape[-1]
    nb = row_nbytes(qt, cols)
    x = w.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("w contains NaN or infinite values")
    limit = fmt.quant_limit
    if limit is not None and x.numel() and (amax := float(x.abs().max())) > limit:
        raise ValueError(f"w has values up to {amax:g}: {qt.name} keeps its scales in float16, which caps values at {limit:g}")
    block, size = GGML_QUANT_SIZES[qt]
    x = x.view(-1, block)
    out = torch.empty(x.shape[0], size, dtype=torch.uint8, device=x.device)
    fn = fmt.quantize
    step = max(1, _QUANT_CHUNK_VALUES // block)
    for i in range(0, x.shape[0], step):
        out[i : i + step] = fn(x[i : i + step])
    return out.view(*w.shape[:-1], nb)


# ---------------------------------------------------------------------------
# The registry: one record per GGML type ferrum supports. Everything else is derived from
# it: the tables above, the op modules' type sets (ferrum_mps.ops), the Metal kernel
# instantiations (ferrum_mps.kernels generates their type lists) and the tests' type lists.
#
# To add a type: its dequant (and, optionally, code planes / quantizer) above, its
# blk_<type> struct and dequant16 (and mv_<type> traits for "mv"/"moe") in
# metal_ops/quant_blocks.h, and one record here naming the Metal families it has.

# Metal kernel families a record may list (kernel names: ferrum_mps.kernels.KERNELS).
METAL_FAMILIES = ("dequant", "get_rows", "mv", "mvb", "mm", "moe")
_ROWS = frozenset({"dequant", "get_rows", "mvb", "mm"})  # dequant16 is all these need
_MV = _ROWS | {"mv"}  # + lane-level mat-vec traits (mv_<type>)
_ALL = _MV | {"moe"}


@dataclass(frozen=True)
class Format:
    """What ferrum knows about one GGML type."""

    qtype: GGMLQuantizationType
    dequant: Callable  # blocks uint8 [n, type_size] -> (scale, q, offset), see the dequant section
    planes: tuple | None = None  # (code_planes fn, plane layout); None: one generic plane
    quantize: Callable | None = None  # float32 [n, block] -> uint8 [n, type_size]
    quant_limit: float | None = None  # largest |w| whose fp16 block scales still fit
    f16_fields: tuple[int, ...] = ()  # byte offsets of the block's fp16 scales / mins
    metal: frozenset = frozenset()  # Metal kernel families instantiated for it
    torch_dtype: torch.dtype | None = None  # F32 / F16 / BF16: the element type

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def metal_name(self) -> str:
        """The type as it appears in kernel names: q4_k, iq4_nl, f16."""
        return self.qtype.name.lower()

    @property
    def metal_type(self) -> str:
        """The suffix of its Metal structs blk_<t> / mv_<t>: q4_K, iq4_nl, f16."""
        n = self.qtype.name.lower()
        return n[:-1] + "K" if n.endswith("_k") else n


_F16_MAX = 65504.0
_BITS_Q5 = (list(range(32)), [16 / (1 << s) for _ in range(4) for s in range(8)])  # _bits_spread's 2^s undone

FORMATS: dict[GGMLQuantizationType, Format] = {f.qtype: f for f in (
    Format(Q.F32, _deq_float(torch.float32), quantize=_q_float(torch.float32), torch_dtype=torch.float32),
    Format(Q.F16, _deq_float(torch.float16), quantize=_q_float(torch.float16), quant_limit=_F16_MAX,
           metal=frozenset({"dequant", "get_rows"}), torch_dtype=torch.float16),
    Format(Q.BF16, _deq_float(torch.bfloat16), quantize=_q_float(torch.bfloat16),
           metal=frozenset({"dequant", "get_rows"}), torch_dtype=torch.bfloat16),
    Format(Q.Q4_0, _deq_q4_0, (_cp_q4_0, _layout(18, (2, range(16), 1), (2, range(16, 32), 1))),
           _q_q4_0, _F16_MAX * 8, (0,), _ALL),
    Format(Q.Q4_1, _deq_q4_1, (_cp_q4_1, _layout(20, (4, range(16), 1), (4, range(16, 32), 1))),
           _q_q4_1, _F16_MAX, (0, 2), _MV),
    Format(Q.Q5_0, _deq_q5_0, (_cp_q5_0, _layout(22, (6, range(16), 1), (6, range(16, 32), 1)) + [_BITS_Q5]),
           _q_q5_0, _F16_MAX * 16, (0,), _ALL),
    Format(Q.Q5_1, _deq_q5_1, (_cp_q5_1, _layout(24, (8, range(16), 1), (8, range(16, 32), 1)) + [_BITS_Q5]),
           _q_q5_1, _F16_MAX, (0, 2), _MV),
    Format(Q.Q8_0, _deq_q8_0, (_cp_q8_0, _layout(34, (2, range(32), 1))), _q_q8_0, _F16_MAX * 127, (0,), _ALL),
    Format(Q.Q2_K, _deq_q2_k, (_cp_q2_k, [(list(range(256)), 1)]), f16_fields=(80, 82), metal=_MV),
    Format(Q.Q3_K, _deq_q3_k, f16_fields=(108,), metal=_MV),
    Format(Q.Q4_K, _deq_q4_k, (_cp_q4_k, [([64 * (t // 32) + 32 * p + t % 32 for t in range(128)], 1) for p in (0, 1)]),
           _q_q4_k, _F16_MAX * 63, (0, 2), _ALL),
    Format(Q.Q5_K, _deq_q5_k, (_cp_q5_k, [(list(range(256)), 1)]), _q_q5_k, _F16_MAX * 63, (0, 2), _ALL),
    Format(Q.Q6_K, _deq_q6_k, (_cp_q6_k, [(list(range(256)), 1)]), _q_q6_k, _F16_MAX * 128, (208,), _ALL),
    Format(Q.IQ4_NL, _deq_iq4_nl, f16_fields=(0,), metal=_ROWS),
    Format(Q.IQ4_XS, _deq_iq4_xs, f16_fields=(0,), metal=_ROWS),
)}

DEQUANT_TYPES = tuple(FORMATS)
QUANT_TYPES = tuple(q for q, f in FORMATS.items() if f.quantize is not None)
FLOAT_QTYPES = {q: f.torch_dtype for q, f in FORMATS.items() if f.torch_dtype is not None}
_CODE_PLANES.update({q: f.planes for q, f in FORMATS.items() if f.planes is not None})


def metal_types(family: str) -> tuple[GGMLQuantizationType, ...]:
    """The types with Metal kernels of `family` (one of METAL_FAMILIES), in registry order."""
    if family not in METAL_FAMILIES:
        raise ValueError(f"unknown Metal kernel family {family!r}; families: {', '.join(METAL_FAMILIES)}")
    return tuple(q for q, f in FORMATS.items() if family in f.metal)


assert all(f.type_size % 2 == 0 for f in FORMATS.values() if f.metal)  # Metal reads blocks with 16-bit loads
