"""Fused decode-path ops: `ferrum::rms_norm`, `ferrum::add_rms_norm`, `ferrum::qk_norm_rope_cache`, `ferrum::moe_gate_route`.

`add_rms_norm`'s optional `pre_weight` norms x first (Gemma's post-attention / post-FFN
sandwich norms fused with the residual add and the next norm: one launch instead of two).

Each op: schema, CPU implementation (the reference semantics of models/layers.py and the
fallback), fake implementation (shapes for torch.compile) and MPS implementation (exactly one
Metal launch per call, kernels in metal_ops/norm.metal, no host sync). The MPS functions are
re-exported by `ferrum_mps.metal`, so the tests run them on CPU tensors under the harness.

Rounding follows models/layers.py (RMSNorm, RoPE): float32 accumulation, and values are rounded
to the activation dtype where the torch code holds them in it (RMSNorm: `w * T(x * rsqrt(mean(x^2)
+ eps))`, RoPE computed in float32 on the normed values, the residual sum in the activation dtype).

Norm weights must have the activation dtype (the model's `float_param(..., dtype)`).

Bad cache slots: the CPU op raises on a cache_position outside [0, S); the Metal kernel cannot
check without a host sync, so it skips writes outside [0, S) (nothing else is corrupted).

Routing: as ferrum::moe_route on `x @ W.T` (logits in x's dtype), with exact ties going to the
lower expert index. A token whose softmax is undefined (a NaN or +inf logit, or all logits
-inf; torch gives NaN probabilities there) gets id -1 and weight 0 in every slot: "no expert".
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import native, shaders
from ..kernels import DTYPE_NAMES, GEOMETRY
from .common import check_float_tensor, check_once, check_same_device, sig

__all__ = [
    "rms_norm", "add_rms_norm", "qk_norm_rope_cache", "moe_gate_route",  # torch.ops.ferrum.* (set at the end)
    "rms_norm_mps", "add_rms_norm_mps", "qk_norm_rope_cache_mps", "moe_gate_route_mps",
    "launch_rms_norm", "launch_add_rms_norm", "launch_qk_norm_rope_cache", "launch_moe_gate_route", "rope",
]

# The ops are defined with torch.library.Library rather than @custom_op: custom_op's Python
# autograd / ADInplaceOrView layers cost 6 us (pure op) to 13 us (mutating op) per call on this
# machine, Library.define's dispatch 1.7 us; at decode every microsecond of host time per op
# repeats ~4x per layer. The ops have no autograd formula (inference only).
_lib = torch.library.Library("ferrum", "FRAGMENT")

_DT = DTYPE_NAMES
_TAGS = (torch.Tag.needs_contiguous_strides,)
_MAX_THREADS = 32 * GEOMETRY.NORM_MAX_SG
_ROUTE_MAX_EXPERTS = GEOMETRY.MOE_ROUTE_MAX_E
_ROUTE_THREADS = 32 * GEOMETRY.ROUTE_NSG


# ---------------------------------------------------------------------------- validation


def _check_int64(t, name: str, shape: tuple) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_weight(w, x: Tensor, name: str, size: int) -> None:
    check_float_tensor(w, name)
    if tuple(w.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"{name} is {w.dtype} but the activations are {x.dtype}: norm weights take the activation dtype")


def _check_norm(x: Tensor, weight: Tensor, eps: float) -> int:
    check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    H = x.shape[-1]
    _check_weight(weight, x, "weight", H)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_same_device(x=x, weight=weight)
    return H


def _check_add(x: Tensor, residual: Tensor, weight: Tensor, eps: float, pre_weight: Tensor | None = None) -> int:
    H = _check_norm(x, weight, eps)
    if pre_weight is not None:
        _check_weight(pre_weight, x, "pre_weight", H)
        check_same_device(x=x, pre_weight=pre_weight)
    check_float_tensor(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"residual must be {x.dtype} (x's dtype) or float32 (a float32 residual stream), got {residual.dtype}")
    check_same_device(x=x, residual=residual)
    return H


def _check_qk(q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, position_ids, k_cache, v_cache, cache_position):
    for t, n in ((q, "q"), (k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        check_float_tensor(t, n)
        if t.dim() != 4:
            raise ValueError(f"{n} must have 4 dimensions, got shape {tuple(t.shape)}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if tuple(k.shape) != (B, T, Hkv, D) or tuple(v.shape) != (B, T, Hkv, D):
        raise ValueError(f"k and v must be [B, T, Hkv, D] = [{B}, {T}, Hkv, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D % 2 or not 2 <= D <= 2 * _MAX_THREADS:
        raise ValueError(f"head dim must be even and in [2, {2 * _MAX_THREADS}], got {D}")
    S = k_cache.shape[2]
    if tuple(k_cache.shape) != (B, Hkv, S, D) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must be [B, Hkv, S, D] = [{B}, {Hkv}, S, {D}], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (they are written in place)")
    for w, n in ((q_norm_weight, "q_norm_weight"), (k_norm_weight, "k_norm_weight")):
        if w is not None:
            _check_weight(w, q, n, D)
    if not isinstance(inv_freq, Tensor) or inv_freq.dtype != torch.float32 or tuple(inv_freq.shape) != (D // 2,):
        raise ValueError(f"inv_freq must be a float32 tensor of shape ({D // 2},), got {getattr(inv_freq, 'dtype', type(inv_freq))} {tuple(getattr(inv_freq, 'shape', ()))}")
    _check_int64(position_ids, "position_ids", (B, T))
    _check_int64(cache_position, "cache_position", (T,))
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_same_device(q=q, k=k, v=v, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, inv_freq=inv_freq,
                   position_ids=position_ids, k_cache=k_cache, v_cache=v_cache, cache_position=cache_position)
    return B, T, Hq, Hkv, D, S


def _check_gate_route(x, router_weight, top_k) -> tuple[int, int, int]:
    check_float_tensor(x, "x")
    check_float_tensor(router_weight, "router_weight")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    T, H = x.shape
    if router_weight.dim() != 2 or router_weight.shape[1] != H or router_weight.shape[0] < 1:
        raise ValueError(f"router_weight must be [experts, {H}], got shape {tuple(router_weight.shape)}")
    if router_weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"router_weight must be float32 or x's dtype {x.dtype}, got {router_weight.dtype}")
    E = router_weight.shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}] (number of experts), got {top_k}")
    check_same_device(x=x, router_weight=router_weight)
    return T, H, E


# ---------------------------------------------------------------------------- CPU semantics


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """models/layers.py's RMSNorm: float32 statistics, the normalised x rounded to w's dtype, times w."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """RoPE of x [..., D] by float32 cos/sin [..., D/2] (broadcast), x's dtype out: pairs (2i, 2i+1)
    when interleaved, else (i, i + D/2). The one copy: models/layers.py's RoPE calls it."""
    if interleaved:
        x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2).to(x.dtype)
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


# ---------------------------------------------------------------------------- ferrum::rms_norm


_lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", tags=_TAGS)


def rms_norm_cpu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * T(x * rsqrt(mean(x^2) + eps)) over the last dim, float32 statistics, x's dtype out."""
    _check_norm(x, weight, eps)
    out = native.rms_norm(x, weight, eps)  # float32: the decode plans' code, so both give the same bits
    return out if out is not None else _rms(x, weight, eps).contiguous()


def _rms_norm_fake(x, weight, eps):
    _check_norm(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------- ferrum::add_rms_norm


_lib.define(
    "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, Tensor? pre_weight=None) -> (Tensor, Tensor)",
    tags=_TAGS,
)


def add_rms_norm_cpu(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, pre_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(normed, s): s = residual + x, the new residual stream, in residual's dtype (x's dtype, or
    float32 for a float32 residual stream under half activations); normed = rms_norm(s) in x's dtype:
    weight * T(s * rsqrt(mean(s^2) + eps)), T = x.dtype.

    pre_weight: x is first normed with it (rms_norm(x, pre_weight, eps), same eps): Gemma's
    sandwich norm on a block's output, fused with the residual add and the next norm.
    """
    _check_add(x, residual, weight, eps, pre_weight)
    if x.numel():
        out = native.add_rms_norm(x, residual, weight, eps, pre_weight)  # float32: one native call (~40 -> ~8 us)
        if out is not None:
            return out
    if pre_weight is not None:
        x = _rms(x, pre_weight, eps)
    s = (residual + x).contiguous()
    return _rms(s, weight, eps).contiguous(), s


def _add_rms_norm_fake(x, residual, weight, eps, pre_weight=None):
    _check_add(x, residual, weight, eps, pre_weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(residual, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------- ferrum::qk_norm_rope_cache


_lib.define(
    "qk_norm_rope_cache(Tensor q, Tensor k, Tensor v, Tensor? q_norm_weight, Tensor? k_norm_weight, float eps, "
    "Tensor inv_freq, Tensor position_ids, bool interleaved, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor cache_position) -> Tensor",
    tags=_TAGS,
)


def qk_norm_rope_cache_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_norm_weight: Tensor | None,
    k_norm_weight: Tensor | None,
    eps: float,
    inv_freq: Tensor,
    position_ids: Tensor,
    interleaved: bool,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_position: Tensor,
) -> Tensor:
    """Per-head RMSNorm (when a weight is given) and RoPE of q [B, T, Hq, D] and k [B, T, Hkv, D];
    k and v [B, T, Hkv, D] are written into k_cache/v_cache [B, Hkv, S, D] at slots cache_position [T];
    returns q in attention layout [B, Hq, T, D].

    inv_freq [D/2] float32 already holds the base, the freq factors and the linear scale; angle =
    position_ids [B, T] * inv_freq. interleaved: pairs (2i, 2i+1) (GGUF's permuted llama q/k),
    else (i, i + D/2) (rotate-half). ValueError on a cache_position outside [0, S).
    """
    B, T, Hq, Hkv, D, S = _check_qk(
        q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, position_ids, k_cache, v_cache, cache_position
    )
    if T and (int(cache_position.min()) < 0 or int(cache_position.max()) >= S):
        raise ValueError(f"cache_position {cache_position.tolist()} outside the cache of {S} slots")
    if B == 1 and T == 1:  # a decode token: one native call when float32 (70 -> ~15 us)
        out = native.qk_norm_rope_cache(q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, int(position_ids.view(-1)[0]),
                                        interleaved, k_cache, v_cache, int(cache_position[0]))
        if out is not None:
            return out
    if q_norm_weight is not None:
        q = _rms(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = _rms(k, k_norm_weight, eps)
    f = position_ids[..., None].float() * inv_freq
    cos, sin = f.cos()[:, :, None], f.sin()[:, :, None]
    k_cache.index_copy_(2, cache_position, rope(k, cos, sin, interleaved).transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, cache_position, v.transpose(1, 2).to(v_cache.dtype))
    return rope(q, cos, sin, interleaved).transpose(1, 2).contiguous()


def _qk_norm_rope_cache_fake(q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, position_ids, interleaved, k_cache, v_cache, cache_position):
    B, T, Hq, _, D, _ = _check_qk(
        q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, position_ids, k_cache, v_cache, cache_position
    )
    return q.new_empty(B, Hq, T, D)


# ---------------------------------------------------------------------------- ferrum::moe_gate_route


_lib.define("moe_gate_route(Tensor x, Tensor router_weight, int top_k, bool normalize) -> (Tensor, Tensor)", tags=_TAGS)


def moe_gate_route_cpu(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Router logits x @ router_weight.T (float32 accumulation, rounded to x's dtype), then as
    ferrum::moe_route: softmax in float32, top-k with ties to the lower expert index, renormalised
    when `normalize`. Returns (weights float32 [T, k], ids int32 [T, k]); a token with an undefined
    softmax (NaN) gets ids -1 and weights 0.
    """
    _check_gate_route(x, router_weight, top_k)
    out = native.moe_route(x, router_weight, top_k, normalize)  # float32: the decode plans' code
    if out is not None:
        return out
    logits = (x.float() @ router_weight.float().T).to(x.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = _stable_topk(probs, top_k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    bad = probs.isnan().any(-1, keepdim=True)
    weights = weights.masked_fill(bad, 0.0)
    ids = ids.masked_fill(bad, -1)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def _stable_topk(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk with a defined tie rule: equal values in ascending expert order."""
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    return probs.gather(1, ids), ids


def _moe_gate_route_fake(x, router_weight, top_k, normalize):
    T, _, _ = _check_gate_route(x, router_weight, top_k)
    return x.new_empty(T, top_k, dtype=torch.float32), x.new_empty(T, top_k, dtype=torch.int32)


# ---------------------------------------------------------------------------- MPS (Metal) launches
#
# One launch per call, no reads of device memory. Vector (4-wide) loads need H % 4 == 0 and
# 4-element-aligned buffers; otherwise the scalar variant of the same kernel runs.
# `<op>_mps` validates (once per key of everything its check reads: common.check_once), then calls
# `launch_<op>`: callers that validated once (a module at build) may call the launch functions directly.
# The keys hold no token count where the check does not need it (rms_norm: only the last dim), so
# prefill lengths do not add entries; qk_norm_rope_cache's does (its [B, T] shapes are checked
# against each other): one small tuple per (B, T) seen.


def _width(units: int) -> int:
    """Threadgroup width: one work unit per thread, 32..1024 threads (a power of two)."""
    nt = 32
    while nt < units and nt < _MAX_THREADS:
        nt *= 2
    return nt


def _vec(H: int, *tensors: Tensor) -> int:
    return 4 if H % 4 == 0 and all(t.storage_offset() % 4 == 0 for t in tensors) else 1


def _key(make, *args):
    """make(*args), or None for arguments no key can be formed of (not tensors: the check says what is wrong)."""
    try:
        return make(*args)
    except (AttributeError, TypeError, IndexError):  # IndexError: a 0-dim x
        return None


def rms_norm_mps(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    key = _key(lambda: ("rms_norm", x.dtype, x.shape[-1], x.device, sig(weight), eps))
    check_once(key, _check_norm, x, weight, eps)
    return launch_rms_norm(x, weight, eps)


def launch_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rms_norm_mps without its argument checks."""
    H = x.shape[-1]
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // H if H else 0
    if rows:
        V = _vec(H, x, weight)
        nt = _width(H // V)
        k = shaders.kernel("norm.metal", f"rms_norm_{_DT[x.dtype]}_v{V}")
        k(x, weight, y, H, float(eps), threads=[nt, rows], group_size=[nt, 1])
    return y


def add_rms_norm_mps(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, pre_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    key = _key(lambda: ("add_rms_norm", x.dtype, x.shape[-1], x.device, residual.dtype, residual.shape == x.shape,
                        residual.device, sig(weight), eps, sig(pre_weight)))
    check_once(key, _check_add, x, residual, weight, eps, pre_weight)
    return launch_add_rms_norm(x, residual, weight, eps, pre_weight)


def launch_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, pre_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """add_rms_norm_mps without its argument checks."""
    H = x.shape[-1]
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    y, s = torch.empty_like(x), torch.empty_like(residual)
    rows = x.numel() // H if H else 0
    if rows:
        vec_args = (x, residual, weight) if pre_weight is None else (x, residual, weight, pre_weight)
        V = _vec(H, *vec_args)
        nt = _width(H // V)
        types = f"{_DT[x.dtype]}_{_DT[residual.dtype]}_v{V}"
        if pre_weight is None:
            k = shaders.kernel("norm.metal", f"add_rms_norm_{types}")
            k(x, residual, weight, y, s, H, float(eps), threads=[nt, rows], group_size=[nt, 1])
        else:
            k = shaders.kernel("norm.metal", f"norm_add_rms_norm_{types}")
            k(x, pre_weight.contiguous(), residual, weight, y, s, H, float(eps), threads=[nt, rows], group_size=[nt, 1])
    return y, s


def qk_norm_rope_cache_mps(
    q: Tensor, k: Tensor, v: Tensor, q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, eps: float,
    inv_freq: Tensor, position_ids: Tensor, interleaved: bool, k_cache: Tensor, v_cache: Tensor,
    cache_position: Tensor,
) -> Tensor:
    key = _key(lambda: ("qk_norm_rope_cache", sig(q), sig(k), sig(v), sig(q_norm_weight), sig(k_norm_weight), eps,
                        sig(inv_freq), sig(position_ids), sig(k_cache), k_cache.is_contiguous(), sig(v_cache),
                        v_cache.is_contiguous(), sig(cache_position)))
    check_once(key, _check_qk, q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, position_ids, k_cache, v_cache,
               cache_position)
    return launch_qk_norm_rope_cache(
        q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, position_ids, interleaved, k_cache, v_cache, cache_position
    )


def launch_qk_norm_rope_cache(
    q: Tensor, k: Tensor, v: Tensor, q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, eps: float,
    inv_freq: Tensor, position_ids: Tensor, interleaved: bool, k_cache: Tensor, v_cache: Tensor,
    cache_position: Tensor,
) -> Tensor:
    """qk_norm_rope_cache_mps without its argument checks."""
    B, T, Hq, D = q.shape
    Hkv, S = k.shape[2], k_cache.shape[2]
    q_out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    if B * T == 0:
        return q_out
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    flags = (q_norm_weight is not None) | (k_norm_weight is not None) << 1 | bool(interleaved) << 2
    qw = q if q_norm_weight is None else q_norm_weight.contiguous()  # an unread placeholder of the right type
    kw = q if k_norm_weight is None else k_norm_weight.contiguous()
    nt = -(-D // 64) * 32  # D/2 pairs, rounded up to whole simdgroups
    kern = shaders.kernel("norm.metal", f"qk_norm_rope_cache_{_DT[q.dtype]}_{_DT[k_cache.dtype]}")
    if position_ids.stride() == (0, 1):  # one row of positions expanded over the batch: read it in place
        pos, pstride = position_ids[0], 0
    else:
        pos, pstride = position_ids.contiguous(), T
    kern(q, k, v, qw, kw, inv_freq.contiguous(), pos, cache_position.contiguous(),
         k_cache, v_cache, q_out, [Hq, Hkv, D, T, S, flags, pstride], float(eps),
         threads=[nt, Hq + Hkv, B * T], group_size=[nt, 1, 1])
    return q_out


def moe_gate_route_mps(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    key = _key(lambda: ("moe_gate_route", x.dtype, x.shape[1:], x.device, sig(router_weight), top_k))
    check_once(key, _check_gate_route_mps, x, router_weight, top_k)
    return launch_moe_gate_route(x, router_weight, top_k, normalize)


def _check_gate_route_mps(x: Tensor, router_weight: Tensor, top_k: int) -> None:
    _, _, E = _check_gate_route(x, router_weight, top_k)
    if E > _ROUTE_MAX_EXPERTS:
        raise ValueError(f"the Metal routing kernel handles up to {_ROUTE_MAX_EXPERTS} experts, got {E}")


def launch_moe_gate_route(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """moe_gate_route_mps without its argument checks."""
    (T, H), E = x.shape, router_weight.shape[0]
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    if T:
        x, w = x.contiguous(), router_weight.contiguous()
        V = _vec(H, x, w)
        k = shaders.kernel("norm.metal", f"moe_gate_route_{_DT[x.dtype]}_{_DT[w.dtype]}_v{V}")
        k(x, w, weights, ids, H, E, top_k, int(bool(normalize)),
          threads=[_ROUTE_THREADS, T], group_size=[_ROUTE_THREADS, 1])
    return weights, ids


def _register(name: str, cpu, mps, fake):
    _lib.impl(name, cpu, "CPU")
    _lib.impl(name, mps, "MPS")
    torch.library.register_fake(f"ferrum::{name}", fake, lib=_lib)
    return getattr(torch.ops.ferrum, name)


rms_norm = _register("rms_norm", rms_norm_cpu, rms_norm_mps, _rms_norm_fake)
add_rms_norm = _register("add_rms_norm", add_rms_norm_cpu, add_rms_norm_mps, _add_rms_norm_fake)
qk_norm_rope_cache = _register("qk_norm_rope_cache", qk_norm_rope_cache_cpu, qk_norm_rope_cache_mps, _qk_norm_rope_cache_fake)
moe_gate_route = _register("moe_gate_route", moe_gate_route_cpu, moe_gate_route_mps, _moe_gate_route_fake)
