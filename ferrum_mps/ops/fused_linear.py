"""Multi-weight mat-vecs for decode: `ferrum::qkv_linear` and `ferrum::gate_up_act`.

Schema, CPU implementation (reference and fallback: qlinear per weight), fake and MPS
implementation side by side. On MPS, up to FUSED_MAX_M activation rows and weights of the
FUSED_QTYPES go through ONE launch (metal_ops/fused_linear.metal: each threadgroup runs the
existing per-type rows routine of qmatmul.h on the weight its index selects; the quant type
is a kernel argument, so any mix such as Q4_K q/k + Q6_K v takes the same kernel). Larger
batches, float weights and other quant types call qlinear once per weight (the mat-mat
kernels; see `fused_path`).
"""

from __future__ import annotations

import functools

import torch
from gguf import GGMLQuantizationType

from .. import native, quants, shaders
from . import linear as L
from ..kernels import DTYPE_NAMES, GEOMETRY
from .common import check_metal, check_once

Q = GGMLQuantizationType

__all__ = ["FUSED_QTYPES", "ACTS", "fused_path", "qkv_linear", "gate_up_act", "qkv_linear_mps", "gate_up_act_mps",
           "launch_qkv_linear", "launch_gate_up_act"]

_TAGS = (torch.Tag.needs_contiguous_strides,)
# The types of llama.cpp's Q4_K_M / Q5_K_M / Q8_0 files (GT_* in fused_linear.metal).
FUSED_QTYPES = frozenset({Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
FUSED_MAX_M = GEOMETRY.FMV_MMAX  # beyond it the mat-mat kernels win (as in qlinear)
ACTS = {"silu": 0, "gelu_pytorch_tanh": 1}
_ROWS_PER_GROUP = GEOMETRY.fmv_rows
_GROUP = 32 * GEOMETRY.FMV_NSG  # threads per threadgroup


def fused_path(qtypes, m: int) -> bool:
    """Whether the MPS op runs in one launch for these weight types and m activation rows."""
    return 1 <= m <= FUSED_MAX_M and all(quants.check_qtype(q) in FUSED_QTYPES for q in qtypes)


@functools.lru_cache(maxsize=64)
def _row_bytes(qt: int, in_features: int) -> int:
    return quants.row_nbytes(quants.check_qtype(qt), in_features)


def _check(x, weights, in_features) -> list:
    """weights: (raw, qtype, rows, name); returns the checked qtypes."""
    qts = []
    for raw, qtype, rows, name in weights:
        if rows <= 0:
            raise ValueError(f"{name}: output features must be >= 1, got {rows}")
        qts.append(L.check_raw(raw, qtype, rows, in_features, name))
        L.check_activation(x, in_features, raw)
    return qts


def _check_mps(x, weights, in_features) -> tuple[int, ...]:
    """_check, and Metal's needs of the weights of the one-launch path; returns the qtypes as ints."""
    qts = _check(x, weights, in_features)
    if all(qt in FUSED_QTYPES for qt in qts):
        for (raw, _, _, name), qt in zip(weights, qts):
            check_metal(raw, qt, "mv", name)
    return tuple(int(qt) for qt in qts)


def _key(op: str, x, weights, *rest):
    """What _check_mps reads (as qlinear_mps's plan key), or None when no key can be formed (the check says why).

    x by its dtype, last dim and device only: the token count does not add entries."""
    try:
        return (op, x.dtype, x.shape[-1], x.device, *rest, *(
            (qtype, rows, raw.dtype, raw.numel(), raw.is_contiguous(), raw.storage_offset() & 1, raw.device)
            for raw, qtype, rows, _ in weights))
    except (AttributeError, TypeError, IndexError):  # IndexError: a 0-dim x
        return None


def _act(act: str):
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    if act == "silu":
        return torch.nn.functional.silu
    return lambda g: torch.nn.functional.gelu(g, approximate="tanh")


# ---------------------------------------------------------------------------
# ferrum::qkv_linear


@torch.library.custom_op("ferrum::qkv_linear", mutates_args=(), device_types="cpu", tags=_TAGS)
def qkv_linear(
    x: torch.Tensor,
    raw_q: torch.Tensor,
    qtype_q: int,
    raw_k: torch.Tensor,
    qtype_k: int,
    raw_v: torch.Tensor,
    qtype_v: int,
    n_q: int,
    n_kv: int,
    in_features: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x Wq^T, x Wk^T, x Wv^T) for x [..., in_features]; float32 accumulation, x's dtype out."""
    _check(x, ((raw_q, qtype_q, n_q, "raw_q"), (raw_k, qtype_k, n_kv, "raw_k"), (raw_v, qtype_v, n_kv, "raw_v")), in_features)
    return (
        L.qlinear(x, raw_q, qtype_q, n_q, in_features),
        L.qlinear(x, raw_k, qtype_k, n_kv, in_features),
        L.qlinear(x, raw_v, qtype_v, n_kv, in_features),
    )


@qkv_linear.register_fake
def _(x, raw_q, qtype_q, raw_k, qtype_k, raw_v, qtype_v, n_q, n_kv, in_features):
    lead = x.shape[:-1]
    return x.new_empty((*lead, n_q)), x.new_empty((*lead, n_kv)), x.new_empty((*lead, n_kv))


def qkv_linear_mps(x, raw_q, qtype_q, raw_k, qtype_k, raw_v, qtype_v, n_q, n_kv, in_features):
    weights = ((raw_q, qtype_q, n_q, "raw_q"), (raw_k, qtype_k, n_kv, "raw_k"), (raw_v, qtype_v, n_kv, "raw_v"))
    qts = check_once(_key("qkv_linear", x, weights, in_features), _check_mps, x, weights, in_features)
    return launch_qkv_linear(x, raw_q, int(qts[0]), raw_k, int(qts[1]), raw_v, int(qts[2]), n_q, n_kv, in_features)


def launch_qkv_linear(x, raw_q, qtype_q, raw_k, qtype_k, raw_v, qtype_v, n_q, n_kv, in_features):
    """qkv_linear_mps without its argument checks: for callers that validated the weights once."""
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    qts = (qtype_q, qtype_k, qtype_v)
    if not (1 <= m <= FUSED_MAX_M and all(qt in FUSED_QTYPES for qt in qts)):
        return tuple(L.qlinear_mps(x, r, q, n, in_features) for r, q, n in ((raw_q, qtype_q, n_q), (raw_k, qtype_k, n_kv), (raw_v, qtype_v, n_kv)))
    lead = x.shape[:-1]
    yq = torch.empty((m, n_q), dtype=x.dtype, device=x.device)
    yk = torch.empty((m, n_kv), dtype=x.dtype, device=x.device)
    yv = torch.empty((m, n_kv), dtype=x.dtype, device=x.device)
    groups = -(-n_q // _ROWS_PER_GROUP) + 2 * -(-n_kv // _ROWS_PER_GROUP)
    k = shaders.kernel("fused_linear.metal", f"qkv_{'mv' if m == 1 else 'mvb'}_{DTYPE_NAMES[x.dtype]}")
    k(raw_q, raw_k, raw_v, x2, yq, yk, yv, in_features, n_q, n_kv, m, qtype_q, qtype_k, qtype_v,
      _row_bytes(qtype_q, in_features), _row_bytes(qtype_k, in_features), _row_bytes(qtype_v, in_features),
      threads=[_GROUP, groups], group_size=[_GROUP, 1])
    return yq.view(*lead, n_q), yk.view(*lead, n_kv), yv.view(*lead, n_kv)


qkv_linear.register_kernel("mps")(qkv_linear_mps)


# ---------------------------------------------------------------------------
# ferrum::gate_up_act


@torch.library.custom_op("ferrum::gate_up_act", mutates_args=(), device_types="cpu", tags=_TAGS)
def gate_up_act(
    x: torch.Tensor, raw_gate: torch.Tensor, qtype_gate: int, raw_up: torch.Tensor, qtype_up: int, inter: int, in_features: int, act: str
) -> torch.Tensor:
    """act(x Wg^T) * (x Wu^T) for x [..., in_features] -> [..., inter]; act in ACTS, computed in float32."""
    _check(x, ((raw_gate, qtype_gate, inter, "raw_gate"), (raw_up, qtype_up, inter, "raw_up")), in_features)
    fn = _act(act)
    xf = x.float()
    g = L.qlinear(xf, raw_gate, qtype_gate, inter, in_features)
    u = L.qlinear(xf, raw_up, qtype_up, inter, in_features)
    h = native.act_mul(act, g, u)  # the decode plans' code, so both give the same bits
    return (h if h is not None else fn(g) * u).to(x.dtype)


@gate_up_act.register_fake
def _(x, raw_gate, qtype_gate, raw_up, qtype_up, inter, in_features, act):
    return x.new_empty((*x.shape[:-1], inter))


def gate_up_act_mps(x, raw_gate, qtype_gate, raw_up, qtype_up, inter, in_features, act):
    weights = ((raw_gate, qtype_gate, inter, "raw_gate"), (raw_up, qtype_up, inter, "raw_up"))
    key = _key("gate_up_act", x, weights, in_features, act)
    qts = check_once(key, lambda: (_act(act), _check_mps(x, weights, in_features))[1])
    return launch_gate_up_act(x, raw_gate, int(qts[0]), raw_up, int(qts[1]), inter, in_features, act)


def launch_gate_up_act(x, raw_gate, qtype_gate, raw_up, qtype_up, inter, in_features, act):
    """gate_up_act_mps without its argument checks: for callers that validated the weights once."""
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    if not (1 <= m <= FUSED_MAX_M and qtype_gate in FUSED_QTYPES and qtype_up in FUSED_QTYPES):
        # the mat-mat kernels, then activation * up in float32 (2 more device ops)
        g = L.qlinear_mps(x, raw_gate, qtype_gate, inter, in_features)
        u = L.qlinear_mps(x, raw_up, qtype_up, inter, in_features)
        return (_act(act)(g.float()) * u.float()).to(x.dtype)
    y = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    k = shaders.kernel("fused_linear.metal", f"gate_up_{'mv' if m == 1 else 'mvb'}_{DTYPE_NAMES[x.dtype]}")
    k(raw_gate, raw_up, x2, y, in_features, inter, m, qtype_gate, qtype_up, _row_bytes(qtype_gate, in_features),
      _row_bytes(qtype_up, in_features), ACTS[act], threads=[_GROUP, -(-inter // _ROWS_PER_GROUP)], group_size=[_GROUP, 1])
    return y.view(*x.shape[:-1], inter)


gate_up_act.register_kernel("mps")(gate_up_act_mps)
