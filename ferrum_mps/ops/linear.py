"""Quantized linear algebra on raw GGML bytes: `ferrum::dequantize`, `ferrum::qlinear`, `ferrum::qembedding`.

Each op is defined here once: schema, CPU implementation (reference and
fallback), fake implementation (shapes for torch.compile / meta tensors) and the
MPS implementation (one Metal dispatch per call, kernels from
metal_ops/dequantize.metal and metal_ops/qlinear.metal). The MPS functions are
re-exported by `ferrum_mps.metal` so tests can run them on CPU tensors under the
Metal-on-CPU harness.

Weights are GGML rows: `raw` is a contiguous uint8 tensor of any shape holding
`rows * row_nbytes(qtype, cols)` bytes. `qtype` is a plain int
(`int(GGMLQuantizationType.Q4_K) == 12`). F32/F16/BF16 weights are raw bytes too
and go to torch's own matmul on a view.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import kernels, native, quants, shaders
from .common import FLOAT_DTYPES, FLOAT_QTYPES, IDS_DTYPES, cdiv, check_float_dtype, check_ids, check_metal, ferrum_op, ids_int32, round_up

Q = GGMLQuantizationType

__all__ = [
    "FLOAT_DTYPES",
    "FLOAT_QTYPES",
    "check_raw",
    "check_activation",
    "check_float_dtype",
    "dequantize",
    "qlinear",
    "qembedding",
    "dequantize_mps",
    "qlinear_mps",
    "qembedding_mps",
    "qlinear_small",
    "SMALL_M",
    "METAL_QTYPES",
    "check_weight",
]


# Float32 values dequantized per step on the CPU path: a small batch never holds a
# full float32 copy of a big weight (e.g. a 262k x 640 output embedding), and a
# chunk stays cache-sized.
_CPU_CHUNK_VALUES = 1 << 20
# Up to this many rows of x, CPU qlinear takes the decode path (qlinear_small); beyond it
# the matmul dominates (the planes' header/high-bit columns make it up to 2.4x larger)
# and dequantize-then-matmul in big chunks wins. Measured break-even: m ~ 16.
SMALL_M = 8
# Weight values per chunk of the decode path: each float32 plane (1 MiB) stays in L2
# and the ~10 torch ops per chunk amortise their dispatch (measured: 2^16 is 2x slower).
_SMALL_CHUNK_VALUES = 1 << 18


# ---------------------------------------------------------------------------
# validation shared by the CPU and MPS paths (and by the MoE ops)


def check_raw(raw: torch.Tensor, qtype: int, rows: int, cols: int, what: str = "raw") -> GGMLQuantizationType:
    """Check that `raw` holds `rows` GGML rows of `cols` values of `qtype`; return the qtype.

    ValueError: unknown/unsupported qtype, cols not a multiple of the block size,
    byte count not rows * row_nbytes, not contiguous. TypeError: not uint8.
    """
    if not isinstance(raw, torch.Tensor):
        raise TypeError(f"{what} must be a torch.uint8 tensor, got {type(raw).__name__}")
    if raw.dtype != torch.uint8:
        raise TypeError(f"{what} must be torch.uint8 (raw GGML bytes), got {raw.dtype}")
    qt = quants.check_qtype(qtype)
    if rows < 0:
        raise ValueError(f"{what}: row count must be >= 0, got {rows}")
    nb = quants.row_nbytes(qt, cols)
    if raw.numel() != rows * nb:
        raise ValueError(
            f"{what} has {raw.numel()} bytes but {rows} rows x {cols} {qt.name} values need "
            f"{rows} x {nb} = {rows * nb} bytes"
        )
    if not raw.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous())")
    return qt


def check_activation(x: torch.Tensor, in_features: int, raw: torch.Tensor, what: str = "x") -> None:
    """x: a float32/float16/bfloat16 tensor [..., in_features] on raw's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    check_float_dtype(x.dtype, what)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{what} has shape {tuple(x.shape)}: its last dimension must be in_features={in_features}")
    if x.device != raw.device:
        raise ValueError(f"{what} is on {x.device} but the weight bytes are on {raw.device}")


def _embedding_rows(raw: torch.Tensor, qtype: int, dim: int) -> tuple[GGMLQuantizationType, int]:
    qt = quants.check_qtype(qtype)
    nb = quants.row_nbytes(qt, dim)
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"raw must be a torch.uint8 tensor, got {getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.numel() % nb:
        raise ValueError(f"raw has {raw.numel()} bytes, not a whole number of {qt.name} rows of dim={dim} ({nb} bytes each)")
    rows = raw.numel() // nb
    check_raw(raw, qt, rows, dim)
    return qt, rows


def _check_ids(ids: torch.Tensor, raw: torch.Tensor) -> None:
    check_ids(ids)
    if ids.device != raw.device:
        raise ValueError(f"ids is on {ids.device} but the embedding bytes are on {raw.device}")


# ---------------------------------------------------------------------------
# CPU building blocks


def _float_view(raw: torch.Tensor, qt: GGMLQuantizationType, rows: int, cols: int) -> torch.Tensor:
    """F32/F16/BF16 bytes as a [rows, cols] tensor without a copy (copy only if misaligned)."""
    flat = raw.reshape(-1)
    try:
        return flat.view(FLOAT_QTYPES[qt]).view(rows, cols)
    except RuntimeError:  # storage offset not a multiple of the element size
        return flat.clone().view(FLOAT_QTYPES[qt]).view(rows, cols)


def _dequant_rows(raw2: torch.Tensor, qt: GGMLQuantizationType, cols: int) -> torch.Tensor:
    if qt in FLOAT_QTYPES:
        return _float_view(raw2, qt, raw2.shape[0], cols).float()
    return quants.dequantize_raw(raw2, qt, cols, torch.float32)


def qlinear_small(xf: torch.Tensor, raw: torch.Tensor, qt: GGMLQuantizationType, n: int, k: int) -> torch.Tensor:
    """xf [m, k] float32 (m small) @ W.T for quantized W, one cache-sized row chunk at a time.

    At small m the dequantization passes, not the matmul, are the cost, so each chunk
    takes the fewest full-size passes torch runs fast: integer code planes
    (quants.code_planes: contiguous bit twiddling, whole blocks with their header
    bytes) -> one float32 copy -> one multiply by the block scale -> one matmul with x
    laid out like the plane (zeros under header bytes, factors like 16 for high bits
    folded in). The formats' offsets (Q4_0's -8, Q4_K's mins, ...) never touch the
    weights: their share is bias [rows, groups] times the group sums of x.
    """
    m = xf.shape[0]
    block, size = GGML_QUANT_SIZES[qt]
    out = torch.empty((m, n), dtype=torch.float32)
    if n == 0 or m == 0:
        return out.zero_()
    nblk = k // block
    xb = torch.cat((xf.view(m, nblk, block), xf.new_zeros(m, nblk, 1)), 2)  # element -1 reads the 0
    xe = []
    for elems, factor in quants.plane_layout(qt):
        idx = torch.tensor(elems, dtype=torch.long)
        xe.append((xb[:, :, idx] * torch.tensor(factor, dtype=torch.float32)).view(m, nblk * len(elems)))
    runs = _plane_runs(qt)
    raw3 = raw.view(n, nblk, size)
    step = max(1, min(n, _SMALL_CHUNK_VALUES // k))
    xsum = buf = None  # one float32 buffer for every plane of every chunk: fresh pages fault
    for r in range(0, n, step):
        rows = min(step, n - r)
        planes, scale, bias = quants.code_planes(raw3[r : r + rows], qt)
        g = scale.shape[2]
        acc = None
        for codes, x_p, (lo, run, gsel) in zip(planes, xe, runs):
            w = codes.shape[2]
            if buf is None or buf.numel() < rows * nblk * w:
                buf = torch.empty(step * nblk * w, dtype=torch.float32)
            f = buf[: rows * nblk * w].view(rows, nblk, w)
            f.copy_(codes)
            if gsel is None:  # the whole plane is the groups in order
                f.view(rows, nblk, g, w // g).mul_(scale.unsqueeze(-1))
            else:
                sub = f[:, :, lo : lo + len(gsel) * run].view(rows, nblk, len(gsel), run)
                sub.mul_((scale if g == 1 else scale[:, :, gsel]).unsqueeze(-1))
            f2 = f.view(rows, nblk * w)
            acc = x_p @ f2.T if acc is None else acc.addmm_(x_p, f2.T)
        if bias is not None:
            if xsum is None:
                xsum = xf.view(m, nblk * g, block // g).sum(-1)
            acc.sub_(xsum @ bias.reshape(rows, nblk * g).T)
        out[:, r : r + rows] = acc
    return out


_RUNS: dict = {}


def _plane_runs(qt: GGMLQuantizationType) -> list:
    """Per code plane: (first position, run length, group of each run; None: the whole plane is the groups in order).

    A plane's positions that hold elements must be one span of whole groups (runs of
    block/groups positions of one group each), so the block scale is one broadcast
    multiply over a [rows, blocks, runs, group] view.
    """
    if qt not in _RUNS:
        block = GGML_QUANT_SIZES[qt][0]
        _, scale, _ = quants.code_planes(torch.zeros(1, 1, GGML_QUANT_SIZES[qt][1], dtype=torch.uint8), qt)
        g = scale.shape[2]
        gs = block // g
        out = []
        for elems, _ in quants.plane_layout(qt):
            pos = [i for i, e in enumerate(elems) if e >= 0]
            lo, n = pos[0], len(pos)
            run = n if g == 1 else gs
            groups = [elems[lo + j * run] // gs for j in range(n // run)]
            if n % run or pos[-1] - lo + 1 != n or any(
                e // gs != groups[(i - lo) // run] for i, e in enumerate(elems[lo : lo + n], lo)
            ):
                raise AssertionError(f"{qt.name}: a code plane is not a span of whole scale groups")
            whole = lo == 0 and n == len(elems) and groups == list(range(g))
            out.append((lo, run, None if whole else torch.tensor(groups, dtype=torch.long)))
        _RUNS[qt] = out
    return _RUNS[qt]


# ---------------------------------------------------------------------------
# ferrum::dequantize


@ferrum_op("ferrum::dequantize")
def dequantize(raw: torch.Tensor, qtype: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Raw GGML rows -> [rows, cols] in `dtype` (float32/float16/bfloat16)."""
    qt = check_raw(raw, qtype, rows, cols)
    check_float_dtype(dtype, "dtype")
    if qt in FLOAT_QTYPES:
        return _float_view(raw, qt, rows, cols).to(dtype, copy=True)
    return quants.dequantize_raw(raw, qt, cols, dtype).view(rows, cols)


@dequantize.register_fake
def _(raw, qtype, rows, cols, dtype):
    return raw.new_empty((rows, cols), dtype=dtype)


def dequantize_mps(raw: torch.Tensor, qtype: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    qt = check_raw(raw, qtype, rows, cols)
    check_float_dtype(dtype, "dtype")
    if qt == Q.F32 or (qt in FLOAT_QTYPES and FLOAT_QTYPES[qt] == dtype):
        return _float_view(raw, qt, rows, cols).to(dtype, copy=True)
    out = torch.empty((rows, cols), dtype=dtype, device=raw.device)
    if rows == 0:
        return out
    check_metal(raw, qt, "dequant")
    # One thread per 16 values: the unit every block dequantizer in quant_blocks.h produces.
    n16 = rows * cols // 16
    kernels.kernel("dequant", qt, dtype)(raw, out, n16, threads=round_up(n16, 256), group_size=256)
    return out


dequantize.register_kernel("mps")(dequantize_mps)


# ---------------------------------------------------------------------------
# ferrum::qlinear


@ferrum_op("ferrum::qlinear")
def qlinear(x: torch.Tensor, raw: torch.Tensor, qtype: int, out_features: int, in_features: int) -> torch.Tensor:
    """y = x @ W.T with W = raw dequantized [out_features, in_features]; float32 accumulation, x's dtype out."""
    qt = check_raw(raw, qtype, out_features, in_features)
    check_activation(x, in_features, raw)
    x2 = x.reshape(-1, in_features)
    if qt in FLOAT_QTYPES and FLOAT_QTYPES[qt] == x.dtype:
        w = _float_view(raw, qt, out_features, in_features)
        return torch.nn.functional.linear(x2, w).view(*x.shape[:-1], out_features)
    xf = x2.float()
    if qt not in FLOAT_QTYPES:
        y = native.qmatmul(xf.contiguous(), raw, qt, out_features, in_features)
        if y is not None:  # native kernels (int8 activations); None: disabled or unavailable
            return y.to(x.dtype).view(*x.shape[:-1], out_features)
    if x2.shape[0] <= SMALL_M and qt not in FLOAT_QTYPES:
        return qlinear_small(xf, raw, qt, out_features, in_features).to(x.dtype).view(*x.shape[:-1], out_features)
    out = torch.empty((x2.shape[0], out_features), dtype=torch.float32)
    raw2 = raw.view(out_features, -1)
    step = max(1, _CPU_CHUNK_VALUES // in_features)
    for r in range(0, out_features, step):
        w = _dequant_rows(raw2[r : r + step], qt, in_features)
        out[:, r : r + step] = xf @ w.T
    return out.to(x.dtype).view(*x.shape[:-1], out_features)


@qlinear.register_fake
def _(x, raw, qtype, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


def qlinear_mps(x: torch.Tensor, raw: torch.Tensor, qtype: int, out_features: int, in_features: int) -> torch.Tensor:
    # The thin path: everything that depends only on the weight (its qtype, shape, layout) and
    # x's dtype is validated once and kept as a plan with its kernel handles; per call only x's
    # shape and device are checked, then one allocation and one launch.
    try:
        key = ("qlinear", qtype, out_features, in_features, x.dtype, raw.dtype, raw.numel(), raw.is_contiguous(), raw.storage_offset() & 1)
        plan = shaders.plans.get(key)
    except (AttributeError, TypeError):  # not tensors, unhashable qtype...: the full checks say what is wrong
        key = plan = None
    if plan is None:
        plan = _qlinear_plan(key, x, raw, qtype, out_features, in_features)
    if x.dim() == 0 or x.shape[-1] != in_features or x.device != raw.device:
        check_activation(x, in_features, raw)
    return plan(x, raw)


def _qlinear_plan(key, x, raw, qtype, out_features, in_features) -> "_QLinearPlan":
    qt = check_raw(raw, qtype, out_features, in_features)
    check_activation(x, in_features, raw)
    if qt not in FLOAT_QTYPES:
        check_metal(raw, qt, "mm")
    plan = _QLinearPlan(qt, out_features, in_features, x.dtype)
    if key is not None:
        shaders.plans[key] = plan
    return plan


class _QLinearPlan:
    """The launches of one weight layout x activation dtype: kernel handles and grid sizes, found once."""

    def __init__(self, qt: GGMLQuantizationType, n: int, k: int, dtype: torch.dtype):
        self.qt, self.n, self.k = qt, n, k
        if qt in FLOAT_QTYPES:
            return
        g = kernels.GEOMETRY
        # m = 1: N_SG simdgroups x MV_NR rows per threadgroup (types without mv traits: the mvb kernel).
        has_mv = qt in _MV_TYPES
        self.mv = kernels.kernel("mv" if has_mv else "mvb", qt, dtype)
        self.mv_args = () if has_mv else (1,)
        self.mv_grid = dict(threads=[32 * g.N_SG, cdiv(n, g.mv_rows if has_mv else g.mvb_rows)], group_size=[32 * g.N_SG, 1])
        self.mvb = kernels.kernel("mvb", qt, dtype)
        self.mvb_grid = dict(threads=[32 * g.N_SG, cdiv(n, g.mvb_rows)], group_size=[32 * g.N_SG, 1])
        self.mm = kernels.kernel("mm", qt, dtype)
        self.mm_threads = g.QMM_THREADS * cdiv(n, g.QMM_N)

    def __call__(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        n, k = self.n, self.k
        if self.qt in FLOAT_QTYPES:
            x2 = x.reshape(-1, k)
            w = _float_view(raw, self.qt, n, k)
            y = torch.nn.functional.linear(x2, w) if w.dtype == x.dtype else torch.nn.functional.linear(x2.float(), w.float())
            return y.to(x.dtype).view(*x.shape[:-1], n)
        x = x.contiguous()
        m = x.numel() // k
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
        if m == 1:
            self.mv(raw, x, out, k, n, *self.mv_args, **self.mv_grid)
        elif m == 0:
            pass
        elif m <= kernels.GEOMETRY.MVB_MMAX:
            self.mvb(raw, x, out, k, n, m, **self.mvb_grid)
        else:
            g = kernels.GEOMETRY
            self.mm(raw, x, out, k, n, m, threads=[self.mm_threads, cdiv(m, g.QMM_M)], group_size=[g.QMM_THREADS, 1])
        return out


qlinear.register_kernel("mps")(qlinear_mps)


# ---------------------------------------------------------------------------
# ferrum::qembedding


@ferrum_op("ferrum::qembedding")
def qembedding(ids: torch.Tensor, raw: torch.Tensor, qtype: int, dim: int) -> torch.Tensor:
    """Rows `ids` of the GGML table `raw` ([rows, dim]) as float32 [*ids.shape, dim]; only those rows are dequantized."""
    qt, rows = _embedding_rows(raw, qtype, dim)
    _check_ids(ids, raw)
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        raise ValueError(f"ids out of range: the embedding table has {rows} rows, got ids in [{int(flat.min())}, {int(flat.max())}]")
    if qt not in FLOAT_QTYPES:
        y = native.get_rows(raw, qt, dim, flat.contiguous())
        if y is not None:  # bit-exact with the torch path below
            return y.view(*ids.shape, dim)
    picked = raw.view(rows, quants.row_nbytes(qt, dim)).index_select(0, flat)
    return _dequant_rows(picked, qt, dim).view(*ids.shape, dim)


@qembedding.register_fake
def _(ids, raw, qtype, dim):
    return raw.new_empty((*ids.shape, dim), dtype=torch.float32)


def qembedding_mps(ids: torch.Tensor, raw: torch.Tensor, qtype: int, dim: int) -> torch.Tensor:
    """As the CPU op, but an id outside [0, rows) yields a row of zeros (checking it would need a host readback)."""
    try:  # the thin path, as qlinear_mps: the table is checked once per layout, ids per call
        key = ("qembedding", qtype, dim, raw.dtype, raw.numel(), raw.is_contiguous(), raw.storage_offset() & 1)
        plan = shaders.plans.get(key)
    except (AttributeError, TypeError):
        key = plan = None
    if plan is None:
        plan = _qembedding_plan(key, raw, qtype, dim)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in IDS_DTYPES or ids.device != raw.device:
        _check_ids(ids, raw)
    qt, rows, kern = plan
    if kern is None:  # F32: torch gather; ids outside [0, rows) read row 0 and are zeroed
        flat = ids.reshape(-1)
        valid = (flat >= 0) & (flat < rows)
        if rows == 0:
            return raw.new_zeros((*ids.shape, dim), dtype=torch.float32)
        picked = _float_view(raw, qt, rows, dim).index_select(0, flat.clamp(0, rows - 1))
        return torch.where(valid.unsqueeze(1), picked, 0.0).view(*ids.shape, dim)
    # int64 ids (what tokenizers give) go to the kernel as they are: 2**32 + 1 is out of range
    # there, a zero row, never row 1; and no cast launch per call.
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((*ids.shape, dim), dtype=torch.float32, device=raw.device)
    n = flat.numel() * (dim // 16)
    if n:
        kern[flat.dtype](raw, flat, out, dim, rows, n, threads=round_up(n, 256), group_size=256)
    return out


def _qembedding_plan(key, raw, qtype, dim):
    qt, rows = _embedding_rows(raw, qtype, dim)
    if qt == Q.F32:
        kern = None
    else:
        check_metal(raw, qt, "get_rows")
        kern = {torch.int32: kernels.kernel("get_rows", qt), torch.int64: kernels.kernel("get_rows_i64", qt)}
    if key is not None:
        shaders.plans[key] = (qt, rows, kern)
    return qt, rows, kern


qembedding.register_kernel("mps")(qembedding_mps)


# ---------------------------------------------------------------------------
# What runs on MPS (derived from the format registry, ferrum_mps.quants.FORMATS)

_MV_TYPES = frozenset(quants.metal_types("mv"))  # with lane-level m = 1 kernels; others use mvb at m = 1
METAL_QTYPES = frozenset(FLOAT_QTYPES) | frozenset(quants.metal_types("mm"))  # qlinear on MPS (floats: torch)


def check_weight(raw: torch.Tensor, qtype, rows: int, cols: int, what: str = "raw") -> GGMLQuantizationType:
    """All qlinear checks that depend on the weight alone (what a module runs once, at build)."""
    qt = check_raw(raw, qtype, rows, cols, what)
    if raw.device.type == "mps" and qt not in FLOAT_QTYPES:
        check_metal(raw, qt, "mm", what)
    return qt
