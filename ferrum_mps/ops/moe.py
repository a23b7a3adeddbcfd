"""Mixture-of-Experts ops: routing, per-(token, slot) expert projections, the fused SwiGLU expert FFN.

Expert stacks are GGUF's 3-D tensors kept as raw blocks: uint8 [E, out, row_nbytes(qtype, in)].
A (token, slot) pair is one of the top-k experts chosen for one token; pair p = t * k + s.

CPU: pairs are grouped by expert once (one stable sort), only the selected experts are
dequantized (a bounded number at a time) and each group runs as one matmul, in float32.
MPS: Metal kernels in metal_ops/moe.metal, launched without any host round trip (see
the launch functions at the end of this file).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels, native, quants, shaders
from .common import (
    FLOAT_DTYPES, FLOAT_QTYPES, IDS_DTYPES, NO_ID, cdiv, check_float_tensor, check_ids, check_metal, check_same_device,
    ferrum_op,
    ids_int32,
)
from .linear import SMALL_M, qlinear_small

# The expert id of a (token, slot) pair that selects nothing (weight 0, contributes zeros):
# what moe_route gives a token whose logits are NaN/inf; the MPS launchers treat any id
# outside [0, E) so (they cannot check ids without a host sync).
NO_EXPERT = NO_ID
# Bytes of dequantized float32 expert weights the CPU implementations hold at once.
_CPU_CHUNK_BYTES = 96 << 20


# ---------------------------------------------------------------------------- validation


def _check_float(t: Tensor, name: str, dims: tuple[int, ...]) -> None:
    check_float_tensor(t, name)
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")


def _check_ids(ids: Tensor, T: int, k: int | None, what: str) -> int:
    check_ids(ids)
    if ids.dim() != 2 or ids.shape[0] != T or (k is not None and ids.shape[1] != k):
        want = f"[{T}, {k}]" if k is not None else f"[{T}, top_k]"
        raise ValueError(f"ids must have shape {want} to match {what}, got {tuple(ids.shape)}")
    if ids.shape[1] < 1:
        raise ValueError("ids must select at least one expert per token (top_k >= 1)")
    return ids.shape[1]


def _check_stack(raw: Tensor, qtype: int, out_features: int, in_features: int, name: str) -> int:
    """Validate an expert stack [E, out, row_nbytes(qtype, in)]; returns E."""
    q = quants.check_qtype(qtype)
    if not isinstance(raw, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(raw).__name__}")
    if raw.dtype != torch.uint8:
        raise TypeError(f"{name} must hold raw GGUF bytes as torch.uint8, got {raw.dtype}")
    if out_features < 1 or in_features < 1:
        raise ValueError(f"{name}: out_features and in_features must be positive, got {out_features}, {in_features}")
    rb = quants.row_nbytes(q, in_features)  # SymInt-safe: sizes may be SymInts under torch.compile
    if raw.dim() != 3 or raw.shape[0] < 1 or raw.shape[1] != out_features or raw.shape[2] != rb:
        raise ValueError(
            f"{name} must be an expert stack [experts, {out_features}, {rb}] "
            f"({q.name} rows of {in_features} weights), got shape {tuple(raw.shape)}"
        )
    if not raw.is_contiguous():
        raise ValueError(f"{name} must be contiguous (kernels address expert slabs by byte offset)")
    return raw.shape[0]


def _check_ids_range(ids: Tensor, experts: int) -> bool:
    """Raise unless every id is in [0, E) or NO_EXPERT; True when some pair has NO_EXPERT.

    Reading ids on an MPS tensor would be a host sync: only CPU inputs are checked here; the
    Metal kernels skip pairs whose id is out of range instead of reading out of bounds.
    Code that indexes with the ids (any kernel that has no NO_EXPERT case) must skip or
    filter those pairs when this returns True.
    """
    if ids.device.type == "cpu" and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < NO_EXPERT or hi >= experts:
            raise ValueError(f"expert ids must be in [0, {experts}) or {NO_EXPERT} (no expert), got values in [{lo}, {hi}]")
        return lo == NO_EXPERT
    return False


def _check_route(router_logits: Tensor, top_k: int) -> None:
    _check_float(router_logits, "router_logits", (2,))
    E = router_logits.shape[1]
    if E < 1:
        raise ValueError("router_logits must have at least one expert column")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}] (number of experts), got {top_k}")


def _check_qlinear(x, ids, experts_raw, qtype, out_features, in_features) -> tuple[int, int, int]:
    _check_float(x, "x", (2, 3))
    T = x.shape[0]
    k = _check_ids(ids, T, x.shape[1] if x.dim() == 3 else None, f"x of shape {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, expected in_features={in_features}")
    E = _check_stack(experts_raw, qtype, out_features, in_features, "experts_raw")
    check_same_device(x=x, ids=ids, experts_raw=experts_raw)
    return T, k, E


def _check_ffn(x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter):
    _check_float(x, "x", (2,))
    T, H = x.shape
    _check_float(weights, "weights", (2,))
    k = _check_ids(ids, T, None, f"x of shape {tuple(x.shape)}")
    if weights.shape != ids.shape:
        raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    E = _check_stack(gate_raw, gate_qtype, inter, H, "gate_raw")
    for raw, q, out, inp, name in ((up_raw, up_qtype, inter, H, "up_raw"), (down_raw, down_qtype, H, inter, "down_raw")):
        if _check_stack(raw, q, out, inp, name) != E:
            raise ValueError(f"{name} has {raw.shape[0]} experts, gate_raw has {E}")
    check_same_device(x=x, weights=weights, ids=ids, gate_raw=gate_raw, up_raw=up_raw, down_raw=down_raw)
    return T, H, k, E


# ---------------------------------------------------------------------------- CPU helpers


def _groups(ids: Tensor, experts: int):
    """Pairs sorted by expert (stable), and the experts used with their [start, end) in that order.

    Pairs with id NO_EXPERT sort first and belong to no group: they contribute nothing.
    """
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat - NO_EXPERT, minlength=experts + 1)
    ends = torch.cumsum(counts, 0)[1:]
    counts = counts[1:]
    used = torch.nonzero(counts).flatten()
    return order, used.tolist(), (ends - counts)[used].tolist(), ends[used].tolist()


def _chunks(used, starts, ends, nbytes_per_expert: int):
    """Consecutive runs of used experts whose dequantized weights fit _CPU_CHUNK_BYTES."""
    n = max(1, _CPU_CHUNK_BYTES // max(1, nbytes_per_expert))
    for i in range(0, len(used), n):
        yield used[i : i + n], starts[i : i + n], ends[i : i + n]


def _dequant_experts(raw: Tensor, sel: list[int], qtype: int, cols: int) -> Tensor:
    rows = raw[sel].reshape(-1, raw.shape[-1])
    return quants.dequantize_raw(rows, qtype, cols, torch.float32).view(len(sel), raw.shape[1], cols)


def _grouped_mm(xs: Tensor, w: Tensor, sizes: list[int]) -> Tensor:
    """Rows of xs (grouped, consecutive) times the transposed weight of their group: [sum(sizes), out]."""
    n, most = len(sizes), max(sizes)
    if most * n <= 2 * xs.shape[0]:
        # Balanced groups (decode: one pair per expert): one padded bmm.
        size = torch.tensor(sizes)
        group = torch.repeat_interleave(torch.arange(n), size)
        pos = torch.arange(xs.shape[0]) - torch.repeat_interleave(size.cumsum(0) - size, size)
        padded = xs.new_zeros(n, most, xs.shape[1])
        padded[group, pos] = xs
        return torch.bmm(padded, w.transpose(1, 2))[group, pos]
    return torch.cat([g @ wi.T for g, wi in zip(xs.split(sizes), w)])


def _expert_mm(xs: Tensor, raw: Tensor, sel: list[int], sizes: list[int], qtype: int, out_features: int, in_features: int) -> Tensor:
    """Rows of xs grouped by expert (consecutive runs of `sizes`) times their expert's W.T: [sum(sizes), out]."""
    qt = quants.check_qtype(qtype)
    if max(sizes) <= SMALL_M and qt not in FLOAT_QTYPES:
        # Decode: a few rows per expert, so dequantization is the cost; qlinear's small-m path
        # reads each selected expert's bytes once and never builds its float matrix.
        return torch.cat([qlinear_small(g, raw[e], qt, out_features, in_features) for g, e in zip(xs.split(sizes), sel)])
    return _grouped_mm(xs, _dequant_experts(raw, sel, qtype, in_features), sizes)


# ---------------------------------------------------------------------------- moe_route


@ferrum_op("ferrum::moe_route")
def moe_route(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax (float32) over experts, top-k (torch.topk order), renormalised when `normalize`.

    Returns (weights float32 [T, k], ids int32 [T, k]), exactly as Qwen3MoeTopKRouter; a token
    whose softmax is undefined (NaN or +inf logits, all -inf) gets ids NO_EXPERT and weights 0.
    """
    _check_route(router_logits, top_k)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # A NaN or +inf logit, or a row of -inf, leaves the softmax undefined (NaN): that token
    # gets no expert (id -1, weight 0) rather than arbitrary ids with NaN weights.
    undefined = probs.isnan().any(dim=-1, keepdim=True)
    weights = weights.masked_fill(undefined, 0.0)
    ids = ids.masked_fill(undefined, NO_EXPERT)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


@moe_route.register_fake
def _(router_logits, top_k, normalize):
    _check_route(router_logits, top_k)
    T = router_logits.shape[0]
    return (
        router_logits.new_empty(T, top_k, dtype=torch.float32),
        router_logits.new_empty(T, top_k, dtype=torch.int32),
    )


# ---------------------------------------------------------------------------- moe_qlinear


@ferrum_op("ferrum::moe_qlinear")
def moe_qlinear(x: Tensor, ids: Tensor, experts_raw: Tensor, qtype: int, out_features: int, in_features: int) -> Tensor:
    """y[t, s] = x[t] (or x[t, s]) @ W[ids[t, s]].T for each pair; W are the quantized expert matrices."""
    T, k, E = _check_qlinear(x, ids, experts_raw, qtype, out_features, in_features)
    _check_ids_range(ids, E)  # pairs with NO_EXPERT: _groups leaves them out
    out = torch.zeros(T * k, out_features, dtype=torch.float32)
    if T == 0:
        return out.view(T, k, out_features).to(x.dtype)
    rows = x.float().reshape(-1, in_features)
    y = native.moe_matmul(rows.contiguous(), ids.to(torch.int32).contiguous(), experts_raw, quants.check_qtype(qtype),
                          out_features, in_features, per_slot=x.dim() == 3)
    if y is not None:  # native kernels: experts grouped in C++, int8 activations
        return y.view(T, k, out_features).to(x.dtype)
    order, used, starts, ends = _groups(ids, E)
    for sel, s0, e0 in _chunks(used, starts, ends, out_features * in_features * 4):
        pairs = order[s0[0] : e0[-1]]
        xs = rows[pairs // k] if x.dim() == 2 else rows[pairs]
        sizes = [e - s for s, e in zip(s0, e0)]
        out[pairs] = _expert_mm(xs, experts_raw, sel, sizes, qtype, out_features, in_features)
    return out.view(T, k, out_features).to(x.dtype)


@moe_qlinear.register_fake
def _(x, ids, experts_raw, qtype, out_features, in_features):
    T, k, _ = _check_qlinear(x, ids, experts_raw, qtype, out_features, in_features)
    return x.new_empty(T, k, out_features)


# ---------------------------------------------------------------------------- moe_ffn


@ferrum_op("ferrum::moe_ffn")
def moe_ffn(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    gate_raw: Tensor,
    up_raw: Tensor,
    down_raw: Tensor,
    gate_qtype: int,
    up_qtype: int,
    down_qtype: int,
    inter: int,
) -> Tensor:
    """out[t] = sum_s weights[t, s] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, s]."""
    T, H, k, E = _check_ffn(x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter)
    _check_ids_range(ids, E)  # pairs with NO_EXPERT: _groups leaves them out
    out = torch.zeros(T, H, dtype=torch.float32)
    if T == 0:
        return out.to(x.dtype)
    xf, wf = x.float(), weights.float().reshape(-1)
    y = _moe_ffn_native(xf, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter)
    if y is not None:
        return y.to(x.dtype)
    order, used, starts, ends = _groups(ids, E)
    for sel, s0, e0 in _chunks(used, starts, ends, 3 * inter * H * 4):
        pairs = order[s0[0] : e0[-1]]
        tokens = pairs // k
        sizes = [e - s for s, e in zip(s0, e0)]
        xs = xf[tokens]
        g = _expert_mm(xs, gate_raw, sel, sizes, gate_qtype, inter, H)
        u = _expert_mm(xs, up_raw, sel, sizes, up_qtype, inter, H)
        h = torch.nn.functional.silu(g) * u
        y = _expert_mm(h, down_raw, sel, sizes, down_qtype, H, inter)
        out.index_add_(0, tokens, y * wf[pairs, None])
    return out.to(x.dtype)


def _moe_ffn_native(xf, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter):
    """moe_ffn on the native kernels (three grouped mat-muls), or None when they do not apply."""
    qts = [quants.check_qtype(q) for q in (gate_qtype, up_qtype, down_qtype)]
    if not native.enabled() or any(q not in native.QTYPES for q in qts) or not native.available():
        return None
    T, H = xf.shape
    ids32, xc = ids.to(torch.int32).contiguous(), xf.contiguous()
    g = native.moe_matmul(xc, ids32, gate_raw, qts[0], inter, H, per_slot=False)
    u = native.moe_matmul(xc, ids32, up_raw, qts[1], inter, H, per_slot=False)
    if g is None or u is None:
        return None
    h = native.act_mul("silu", g, u)  # the decode plans' code, so both give the same bits
    if h is None:
        return None
    y = native.moe_matmul(h, ids32, down_raw, qts[2], H, inter, per_slot=True)
    if y is None:
        return None
    return native.moe_combine(weights.float(), y.view(T, -1, H))


@moe_ffn.register_fake
def _(x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter):
    T, H, _, _ = _check_ffn(x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter)
    return x.new_empty(T, H)


# ---------------------------------------------------------------------------- MPS (Metal) launches
#
# Each function validates everything it can without reading GPU memory, then only launches
# kernels: no .item(), no nonzero, no output shape that depends on the ids. Ids outside
# [0, E) cannot be checked without a host sync: the kernels never address memory with them
# and the pair contributes zeros instead (int64 ids are clamped before the int32 cast, so
# none wraps onto a valid expert).
#
# The thin path: what depends only on the expert stacks (qtypes, shapes, layout) and the
# activation dtype is validated once and kept as a plan (kernel handles, grid sizes) in
# shaders.plans; per call the other inputs' shapes are compared, then buffers are allocated
# and the kernels launched. Any mismatch runs the full checks, which say what is wrong.
#
# Launches per call (ours; plus one torch cast when ids are int64):
#   moe_route: 1.  moe_qlinear: 1 below _MM_MIN_TOKENS tokens, else 2 (bucket, mat-mat).
#   moe_ffn: 2 below _MM_MIN_TOKENS (gate+up+silu*mul, down+weighted sum), else 4
#   (bucket, gate+up+silu*mul, down*weight, per-token sum).

_MM_MIN_TOKENS = 32  # from here on tokens share expert weights often enough to tile
_G = kernels.GEOMETRY
_ROUTE_MAX_EXPERTS = _G.MOE_ROUTE_MAX_E
_MV_GROUP = [32 * _G.MOE_NSG, 1, 1]  # MoE mat-vec threadgroup: MOE_NSG simdgroups x MOE_NR rows
_MM_GROUP = [_G.QMM_THREADS, 1, 1]
_IDS, _WEIGHT_DTYPES = IDS_DTYPES, FLOAT_DTYPES


def _stack_key(raw: Tensor) -> tuple:
    """What validating an expert stack depends on (shape, dtype, layout, device)."""
    return raw.shape, raw.dtype, raw.is_contiguous(), raw.storage_offset() & 1, raw.device


def _bucket(ids32: Tensor, experts: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """GPU-side grouping of pairs by expert into fixed-size buffers: pairs, their tokens, tile list."""
    P = ids32.numel()
    max_tiles = P // _G.QMM_M + min(experts, P) + 1
    dev = ids32.device
    starts = torch.empty(experts, dtype=torch.int32, device=dev)
    pairs = torch.empty(P, dtype=torch.int32, device=dev)
    toks = torch.empty(P, dtype=torch.int32, device=dev)
    tiles = torch.empty(3 * max_tiles, dtype=torch.int32, device=dev)
    k = kernels.kernel("moe_bucket")
    k(ids32, starts, pairs, toks, tiles, P, experts, ids32.shape[1], max_tiles, threads=256, group_size=256)
    return pairs, toks, tiles, max_tiles


def moe_route_mps(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    try:
        key = ("moe_route", router_logits.dtype, router_logits.dim(), router_logits.shape[-1], top_k)
        kern = shaders.plans.get(key)
    except (AttributeError, IndexError, TypeError):
        key = kern = None
    if kern is None:
        _check_route(router_logits, top_k)
        E = router_logits.shape[1]
        if E > _ROUTE_MAX_EXPERTS:
            raise ValueError(f"the Metal routing kernel handles up to {_ROUTE_MAX_EXPERTS} experts, got {E}")
        kern = kernels.kernel("moe_route", dtype=router_logits.dtype)
        if key is not None:
            shaders.plans[key] = kern
    T, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    if T:
        kern(router_logits.contiguous(), weights, ids, E, top_k, int(bool(normalize)), threads=[32, T], group_size=[32, 1])
    return weights, ids


class _QLinearPlan:
    """moe_qlinear's launches for one expert stack x activation dtype."""

    def __init__(self, x, ids, experts_raw, qtype, out_features, in_features):
        _, _, self.E = _check_qlinear(x, ids, experts_raw, qtype, out_features, in_features)
        q = check_metal(experts_raw, qtype, "moe", "experts_raw")
        self.out_features, self.in_features, self.dev = out_features, in_features, experts_raw.device
        self.mv = kernels.kernel("moe_mv", q, x.dtype)
        self.mm = kernels.kernel("moe_mm", q, x.dtype)
        self.mv_rows, self.mm_rows = cdiv(out_features, _G.moe_mv_rows), cdiv(out_features, _G.QMM_N)

    def ok(self, x: Tensor, ids: Tensor) -> bool:
        """The per-call inputs fit the plan (else the full checks run and say why not)."""
        return (x.dim() in (2, 3) and x.shape[-1] == self.in_features and ids.dim() == 2 and ids.shape[0] == x.shape[0]
                and ids.shape[1] >= 1 and (x.dim() == 2 or ids.shape[1] == x.shape[1]) and ids.dtype in _IDS
                and x.device == self.dev and ids.device == self.dev)


def moe_qlinear_mps(x: Tensor, ids: Tensor, experts_raw: Tensor, qtype: int, out_features: int, in_features: int) -> Tensor:
    try:
        key = ("moe_qlinear", qtype, out_features, in_features, x.dtype, _stack_key(experts_raw))
        plan = shaders.plans.get(key)
    except (AttributeError, TypeError):
        key = plan = None
    if plan is None or not plan.ok(x, ids):
        plan = _QLinearPlan(x, ids, experts_raw, qtype, out_features, in_features)
        if key is not None:
            shaders.plans[key] = plan
    T, k, E = x.shape[0], ids.shape[1], plan.E
    x, ids32, per_slot, P = x.contiguous(), ids_int32(ids, E), int(x.dim() == 3), T * k
    if T < _MM_MIN_TOKENS:
        y = torch.empty(T, k, out_features, dtype=x.dtype, device=x.device)
        if T:
            plan.mv(experts_raw, x, ids32, y, in_features, out_features, E, k, per_slot,
                    threads=[_MV_GROUP[0], plan.mv_rows, P], group_size=_MV_GROUP)
        return y
    pairs, toks, tiles, n_tiles = _bucket(ids32, E)
    y = torch.zeros(T, k, out_features, dtype=x.dtype, device=x.device)  # pairs with a bad id stay zero
    plan.mm(experts_raw, x, pairs, toks, tiles, y, in_features, out_features, per_slot,
            threads=[_MM_GROUP[0], plan.mm_rows, n_tiles], group_size=_MM_GROUP)
    return y


class _FFNPlan:
    """moe_ffn's launches for one set of expert stacks x activation dtype."""

    def __init__(self, x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter):
        _, self.H, _, self.E = _check_ffn(x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter)
        g = check_metal(gate_raw, gate_qtype, "moe", "gate_raw")
        u = check_metal(up_raw, up_qtype, "moe", "up_raw")
        d = check_metal(down_raw, down_qtype, "moe", "down_raw")
        self.dev, self.inter, dt = gate_raw.device, inter, x.dtype
        # Files mixing gate and up types are rare: two moe_qlinear launches and a torch silu*mul.
        self.fused = g == u
        if self.fused:
            self.mv_gate_up = kernels.kernel("moe_mv_gate_up", g, dt)
            self.mm_gate_up = kernels.kernel("moe_mm_gate_up", g, dt)
        self.mv_down_sum = kernels.kernel("moe_mv_down_sum", d, dt)
        self.mm_down = kernels.kernel("moe_mm_down", d)
        self.reduce = kernels.kernel("moe_reduce", dtype=dt)
        self.mv_inter, self.mv_h = cdiv(inter, _G.moe_mv_rows), cdiv(self.H, _G.moe_mv_rows)
        self.mm_inter, self.mm_h = cdiv(inter, _G.QMM_N), cdiv(self.H, _G.QMM_N)

    def ok(self, x: Tensor, weights: Tensor, ids: Tensor) -> bool:
        dev = self.dev
        return (x.dim() == 2 and x.shape[1] == self.H and ids.dim() == 2 and ids.shape[0] == x.shape[0]
                and ids.shape[1] >= 1 and weights.shape == ids.shape and ids.dtype in _IDS
                and weights.dtype in _WEIGHT_DTYPES and x.device == dev and ids.device == dev and weights.device == dev)


def moe_ffn_mps(
    x: Tensor, weights: Tensor, ids: Tensor, gate_raw: Tensor, up_raw: Tensor, down_raw: Tensor,
    gate_qtype: int, up_qtype: int, down_qtype: int, inter: int,
) -> Tensor:
    try:
        key = ("moe_ffn", gate_qtype, up_qtype, down_qtype, inter, x.dtype,
               _stack_key(gate_raw), _stack_key(up_raw), _stack_key(down_raw))
        plan = shaders.plans.get(key)
    except (AttributeError, TypeError):
        key = plan = None
    if plan is None or not plan.ok(x, weights, ids):
        plan = _FFNPlan(x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter)
        if key is not None:
            shaders.plans[key] = plan
    T, H, k, E = x.shape[0], plan.H, ids.shape[1], plan.E
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    x, ids32, P = x.contiguous(), ids_int32(ids, E), T * k
    w = weights.to(torch.float32).contiguous()
    small = T < _MM_MIN_TOKENS
    if not small:
        pairs, toks, tiles, n_tiles = _bucket(ids32, E)
    if not plan.fused:
        g = moe_qlinear_mps(x, ids32, gate_raw, gate_qtype, inter, H)
        u = moe_qlinear_mps(x, ids32, up_raw, up_qtype, inter, H)
        h = (torch.nn.functional.silu(g.float()) * u.float()).view(P, inter)
    else:
        h = torch.empty(P, inter, dtype=torch.float32, device=x.device)
        if small:
            plan.mv_gate_up(gate_raw, up_raw, x, ids32, h, H, inter, E, k,
                            threads=[_MV_GROUP[0], plan.mv_inter, P], group_size=_MV_GROUP)
        else:
            plan.mm_gate_up(gate_raw, up_raw, x, pairs, toks, tiles, h, H, inter,
                            threads=[_MM_GROUP[0], plan.mm_inter, n_tiles], group_size=_MM_GROUP)
    if small:
        plan.mv_down_sum(down_raw, h, w, ids32, out, H, inter, E, k,
                         threads=[_MV_GROUP[0], plan.mv_h, T], group_size=_MV_GROUP)
        return out
    y = torch.empty(P, H, dtype=torch.float32, device=x.device)
    plan.mm_down(down_raw, h, pairs, tiles, w, y, H, inter,
                 threads=[_MM_GROUP[0], plan.mm_h, n_tiles], group_size=_MM_GROUP)
    plan.reduce(y, ids32, out, T, H, k, E, threads=cdiv(T * H, 256) * 256, group_size=256)
    return out


moe_route.register_kernel("mps")(moe_route_mps)
moe_qlinear.register_kernel("mps")(moe_qlinear_mps)
moe_ffn.register_kernel("mps")(moe_ffn_mps)
