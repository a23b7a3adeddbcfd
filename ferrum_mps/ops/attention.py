"""`ferrum::decode_attention`: attention of a few new queries over a preallocated K/V cache.

Schema, CPU implementation (reference and fallback), fake implementation and the MPS
implementation (metal_ops/attention.metal: flash-decoding, 1 launch for short caches,
2 for long ones) side by side. `decode_attention_mps` is re-exported by
`ferrum_mps.metal` so the tests run it on CPU tensors under the Metal-on-CPU harness.

Semantics (those of models/modeling.py's `_masks` + models/layers.py's `sdpa_gqa`): query t sits at cache slot
p = cache_position[t] and attends to the slots s with s <= p, p - s < window (window > 0),
attention_mask[b, s] != 0, and always to s == p itself (a left-padding query then sees
only itself instead of giving NaN). A 2-D mask shorter than the cache (generate()'s mask
grows by one column per step) keeps the slots past its end, as transformers does when it
expands a 2-D mask over a static cache. GQA: query head h reads kv head h // (Hq // Hkv).
Softmax and accumulation in float32; the result has q's dtype, laid out [B, T, Hq * D]
(what o_proj takes).
"""

from __future__ import annotations

import functools

import torch

from .. import native, shaders
from ..kernels import DTYPE_NAMES as _DT
from ..kernels import GEOMETRY as _G
from .common import check_float_dtype, check_once, sig

__all__ = ["decode_attention", "decode_attention_mps", "launch_decode_attention", "attention_plan", "check_decode_attention"]

_TAGS = (torch.Tag.needs_contiguous_strides,)
MAX_HEAD_DIM = _G.ATT_DMAX  # threadgroup memory holds the queries as float
_HMAX = _G.ATT_HMAX  # query heads per threadgroup
_THREADS, _RTHREADS = _G.ATT_THREADS, _G.ATT_RTHREADS
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)

# Splitting the sequence (flash-decoding). The split count is fixed on the host from the
# cache length S (no sync to learn the real positions); the GPU cuts [lo, p] into that many
# chunks of at least one 128-key block, so a short context in a big cache leaves the extra
# threadgroups with nothing to read. Enough threadgroups to fill an M-Max (40 cores x a few
# resident groups), each with >= 1 block of 128 keys at full cache length; at most 64
# partials per output row to merge.
SPLIT_MIN_KEYS = _G.ATT_BLOCK  # the kernel's shortest chunk
SPLIT_TARGET_GROUPS = 256
SPLIT_MAX = 64


def check_decode_attention(q, k_cache, v_cache, cache_position, attention_mask, window) -> tuple[int, ...]:
    """Validate the arguments; return (B, Hq, T, D, Hkv, S). Raises TypeError/ValueError naming the culprit."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_position", cache_position)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, T, D] and k_cache [B, Hkv, S, D], got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    B, Hq, T, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    check_float_dtype(q.dtype, "q")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, k_cache {tuple(k_cache.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} (batch and head_dim must agree)")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if not 0 < D <= MAX_HEAD_DIM or D % 16:
        raise ValueError(f"head_dim {D} must be a multiple of 16 in 16..{MAX_HEAD_DIM} (4 lanes x 4 values per K step)")
    if cache_position.dtype != torch.int64 or cache_position.shape != (T,):
        raise ValueError(f"cache_position must be int64 of shape ({T},), got {cache_position.dtype} {tuple(cache_position.shape)}")
    if attention_mask is not None:
        if attention_mask.dtype not in _MASK_DTYPES:
            raise TypeError(f"attention_mask must be bool or integer (nonzero = keep), got {attention_mask.dtype}")
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, mask length)")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = no sliding window), got {window}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_position", cache_position), ("attention_mask", attention_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return B, Hq, T, D, Hkv, S


# ---------------------------------------------------------------------------
# ferrum::decode_attention


@torch.library.custom_op("ferrum::decode_attention", mutates_args=(), device_types="cpu", tags=_TAGS)
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    attention_mask: torch.Tensor | None,
    window: int,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, T, D] over the cache slots [0, max(cache_position)] of k/v_cache [B, Hkv, S, D] -> [B, T, Hq * D]."""
    B, Hq, T, D, Hkv, S = check_decode_attention(q, k_cache, v_cache, cache_position, attention_mask, window)
    if T == 0 or B == 0:
        return q.new_empty((B, T, Hq * D))
    pos = cache_position
    if int(pos.min()) < 0 or int(pos.max()) >= S:
        raise ValueError(f"cache_position {pos.tolist()} outside the cache of {S} slots")
    hi = int(pos.max()) + 1  # never touch the unused tail of the cache
    if T == 1:
        # Decode: one query over the slots [lo, hi) with no masked slot in between (the usual case: an
        # all-ones mask) is plain attention over a slice of the cache: 3 torch ops instead of ~25
        # (61 -> ~20 us a call, ~0.7 ms of a 24 ms Gemma CPU token).
        lo = max(0, hi - window) if window > 0 else 0
        if attention_mask is None or bool(attention_mask[:, lo:hi].all()):  # slots past the mask's end are kept
            o = native.decode_attention(q.float(), k_cache, v_cache, lo, hi, scale)  # the decode plans' code
            if o is not None:
                return o.to(q.dtype)
            G = Hq // Hkv
            o = torch.nn.functional.scaled_dot_product_attention(
                q.float().reshape(B, Hkv, G, D), k_cache[:, :, lo:hi].float(), v_cache[:, :, lo:hi].float(), scale=scale)
            return o.reshape(B, 1, Hq * D).to(q.dtype)
    s = torch.arange(hi)
    allowed = s[None] <= pos[:, None]  # [T, hi]
    if window > 0:
        allowed = allowed & (pos[:, None] - s[None] < window)
    allowed = allowed[None].expand(B, T, hi)
    if attention_mask is not None:
        keep = attention_mask[:, :hi] != 0
        if keep.shape[1] < hi:  # slots past the mask's end are kept
            keep = torch.cat((keep, keep.new_ones(B, hi - keep.shape[1])), 1)
        allowed = allowed & keep[:, None]
    allowed = allowed | (s[None] == pos[:, None])[None]
    G = Hq // Hkv
    k = k_cache[:, :, :hi].float()
    v = v_cache[:, :, :hi].float()
    qf = q.float().reshape(B, Hkv, G * T, D)
    scores = (qf @ k.transpose(-1, -2)).view(B, Hkv, G, T, hi) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    o = torch.softmax(scores, -1).view(B, Hkv, G * T, hi) @ v
    return o.view(B, Hq, T, D).transpose(1, 2).reshape(B, T, Hq * D).to(q.dtype)


@decode_attention.register_fake
def _(q, k_cache, v_cache, cache_position, attention_mask, window, scale):
    B, Hq, T, D = q.shape
    return q.new_empty((B, T, Hq * D))


@functools.lru_cache(maxsize=256)
def attention_plan(B: int, T: int, Hq: int, Hkv: int, S: int) -> tuple[int, int, int]:
    """(query heads per threadgroup, head groups per kv head, splits) of a launch."""
    G = Hq // Hkv
    nhg = -(-G // _HMAX)
    hg = -(-G // nhg)
    rows = B * T * Hkv * nhg
    nsplit = max(1, min(-(-S // SPLIT_MIN_KEYS), -(-SPLIT_TARGET_GROUPS // rows), SPLIT_MAX))
    return hg, nhg, nsplit


def decode_attention_mps(q, k_cache, v_cache, cache_position, attention_mask, window, scale):
    """As the CPU op; a cache_position outside [0, S) gives a row of zeros (checking it would need a host sync)."""
    # Checked once per key of all the check reads (common.check_once); the mask only by its dtype,
    # rank and batch: generate()'s mask grows by one column per step.
    try:
        m = attention_mask
        key = ("decode_attention", sig(q), sig(k_cache), sig(v_cache), sig(cache_position),
               None if m is None else (m.dtype, m.shape[:1], m.dim(), m.device), window)
    except (AttributeError, TypeError):  # not tensors: the check says what is wrong
        key = None
    check_once(key, check_decode_attention, q, k_cache, v_cache, cache_position, attention_mask, window)
    return launch_decode_attention(q, k_cache, v_cache, cache_position, attention_mask, window, scale)


def launch_decode_attention(q, k_cache, v_cache, cache_position, attention_mask, window, scale):
    """The launches of decode_attention_mps without its argument checks (~11 us of host time per call):
    for callers that validated shapes and dtypes once (a decoder layer at build)."""
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((B, T, Hq * D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    hg, nhg, nsplit = attention_plan(B, T, Hq, Hkv, S)
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    pos = cache_position.contiguous()
    if attention_mask is None:
        mask, mlen, esize = pos.view(torch.uint8), 0, 0  # never read
    else:
        m = attention_mask.contiguous()
        mask, mlen, esize = m.view(torch.uint8), m.shape[1], m.element_size()
    dt = _DT[q.dtype]
    direct = nsplit == 1
    if direct:
        part_o = part_ml = pos.view(torch.float32)  # never touched by a one-split launch: no allocation
    else:
        part_o = out.new_empty((B * T * Hq, nsplit, D), dtype=torch.float32)
        part_ml = out.new_empty((B * T * Hq, nsplit, 2), dtype=torch.float32)
    k = shaders.kernel("attention.metal", f"attn_split_{dt}")
    k(q, k_cache, v_cache, pos, mask, out, part_o, part_ml, T, Hq, Hkv, S, D, hg, nsplit, int(window), mlen, esize,
      int(direct), float(scale), threads=[_THREADS, nsplit, B * T * Hkv * nhg], group_size=[_THREADS, 1, 1])
    if not direct:
        r = shaders.kernel("attention.metal", f"attn_reduce_{dt}")
        r(part_o, part_ml, out, D, nsplit, threads=[_RTHREADS, B * T * Hq], group_size=[_RTHREADS, 1])
    return out


decode_attention.register_kernel("mps")(decode_attention_mps)
