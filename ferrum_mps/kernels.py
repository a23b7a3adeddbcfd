"""The Metal kernels as the launchers see them: launch geometry, kernel names, the generated prelude.

One copy of each fact, read by both sides:
- `GEOMETRY` (rows per simdgroup, tile sizes...) is what the Python launchers size their
  grids with, and `prelude()` turns it into the `#define`s that shaders.metal_source puts
  in front of every Metal library, so the kernels are compiled with the same numbers.
- The Metal type lists (`FERRUM_TYPES_<family>(X)` X-macros in the prelude) come from the
  quant-format registry (`ferrum_mps.quants.FORMATS`): the .metal files instantiate their
  kernels with one macro per list, and `kernel_name` forms names from the same registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from . import quants, shaders

__all__ = ["GEOMETRY", "DTYPE_NAMES", "KERNELS", "prelude", "kernel_name", "kernel", "every_kernel_name"]

# Activation dtypes of the kernels, as their names spell them (bf16 needs __HAVE_BFLOAT__).
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_METAL_DTYPE = {"f32": "float", "f16": "half", "bf16": "bfloat"}


@dataclass(frozen=True)
class Geometry:
    """Launch geometry shared by the launchers and the kernels (each field becomes a #define)."""

    N_SG: int = 2  # simdgroups per qlinear mat-vec threadgroup (32 * N_SG threads)
    MV_NR: int = 2  # weight rows per simdgroup of the m = 1 kernels (mv_*)
    MVB_NR: int = 2  # weight rows per simdgroup of the small-batch kernels (mvb_*)
    MVB_MMAX: int = 8  # largest m of the small-batch kernels; above it the mat-mat tile
    QMM_N: int = 64  # weight rows per mat-mat tile (qmm_tile in qmatmul.h)
    QMM_M: int = 32  # tokens (MoE: pairs) per mat-mat tile
    QMM_K: int = 32  # K step of the mat-mat tile
    QMM_THREADS: int = 128  # threads per mat-mat threadgroup (4 simdgroups)
    MOE_NSG: int = 2  # simdgroups per MoE mat-vec threadgroup
    MOE_NR: int = 2  # weight rows per simdgroup of the MoE mat-vec kernels
    MOE_ROUTE_MAX_E: int = 256  # experts the one-simdgroup routing kernels hold (moe_route, moe_gate_route; a multiple of 32)
    NORM_MAX_SG: int = 32  # simdgroups per norm threadgroup at most (1024 threads)
    ROUTE_NSG: int = 32  # simdgroups of moe_gate_route's router mat-vec: 1024 threads, the most one GPU core runs
    ATT_THREADS: int = 128  # threads per decode-attention threadgroup; one key of a block per thread
    ATT_BLOCK: int = 128  # keys per attention block (= ATT_THREADS); the shortest split of the sequence
    ATT_HMAX: int = 8  # query heads per attention threadgroup (GQA groups of Qwen3 / Llama / Gemma are <= 8)
    ATT_DMAX: int = 256  # largest head_dim: 8 heads x 256 as float = 8 KB of queries in threadgroup memory
    ATT_RTHREADS: int = 64  # threads per row of the split-merging launch
    FMV_NSG: int = 2  # simdgroups per fused (qkv / gate+up) mat-vec threadgroup
    FMV_NR: int = 2  # weight rows per simdgroup of the fused mat-vecs
    FMV_MMAX: int = 8  # largest m of the fused mat-vecs; beyond it the mat-mat kernels win (as in qlinear)

    @property
    def mv_rows(self) -> int:
        """Weight rows per qlinear m = 1 threadgroup."""
        return self.N_SG * self.MV_NR

    @property
    def mvb_rows(self) -> int:
        return self.N_SG * self.MVB_NR

    @property
    def fmv_rows(self) -> int:
        """Weight rows per fused mat-vec threadgroup."""
        return self.FMV_NSG * self.FMV_NR

    @property
    def moe_mv_rows(self) -> int:
        """Weight rows per MoE mat-vec threadgroup."""
        return self.MOE_NSG * self.MOE_NR


GEOMETRY = Geometry()


class Kernel(NamedTuple):
    file: str  # metal_ops/<file>
    family: str | None  # the registry's Metal family whose types it is instantiated for; None: untyped
    per_dtype: bool  # one instantiation per activation dtype (name suffix _f32/_f16/_bf16)


# Every kernel stem a launcher may ask for; the full name is stem[_<type>][_<dtype>].
KERNELS: dict[str, Kernel] = {
    "dequant": Kernel("dequantize.metal", "dequant", True),
    "get_rows": Kernel("dequantize.metal", "get_rows", False),  # int32 ids
    "get_rows_i64": Kernel("dequantize.metal", "get_rows", False),  # int64 ids, read as such (no cast launch)
    "mv": Kernel("qlinear.metal", "mv", True),
    "mvb": Kernel("qlinear.metal", "mvb", True),
    "mm": Kernel("qlinear.metal", "mm", True),
    "moe_mv": Kernel("moe.metal", "moe", True),
    "moe_mv_gate_up": Kernel("moe.metal", "moe", True),
    "moe_mv_down_sum": Kernel("moe.metal", "moe", True),
    "moe_mm": Kernel("moe.metal", "moe", True),
    "moe_mm_gate_up": Kernel("moe.metal", "moe", True),
    "moe_mm_down": Kernel("moe.metal", "moe", False),
    "moe_route": Kernel("moe.metal", None, True),
    "moe_reduce": Kernel("moe.metal", None, True),
    "moe_bucket": Kernel("moe.metal", None, False),
}


def kernel_name(stem: str, qtype=None, dtype: torch.dtype | None = None) -> str:
    """The host name of kernel `stem` for `qtype` and activation `dtype` (as the .metal instantiates it)."""
    k = KERNELS[stem]
    name = stem
    if k.family is not None:
        fmt = quants.FORMATS[quants.check_qtype(qtype)]
        if k.family not in fmt.metal:
            raise ValueError(f"{fmt.qtype.name} has no Metal {k.family} kernel")
        name += "_" + fmt.metal_name
    if k.per_dtype:
        name += "_" + DTYPE_NAMES[dtype]
    return name


def kernel(stem: str, qtype=None, dtype: torch.dtype | None = None):
    """The launchable kernel (see shaders.kernel; a module that launches often keeps the handle)."""
    return shaders.kernel(KERNELS[stem].file, kernel_name(stem, qtype, dtype))


def every_kernel_name(bfloat: bool = True) -> dict[str, set[str]]:
    """{file: every name kernel_name can form for it}: every stem x registered type x dtype."""
    dtypes = [d for d in DTYPE_NAMES if bfloat or d != torch.bfloat16]
    out: dict[str, set[str]] = {}
    for stem, k in KERNELS.items():
        types = quants.metal_types(k.family) if k.family else [None]
        for q in types:
            for d in dtypes if k.per_dtype else [None]:
                out.setdefault(k.file, set()).add(kernel_name(stem, q, d))
    return out


def prelude() -> str:
    """The #defines every Metal library is compiled with: GEOMETRY and the registry's type lists.

    FERRUM_TYPES_<family>(X) expands to X(t, n) for each type with that family, t the suffix
    of its Metal structs (blk_q4_K / mv_q4_K), n its name in kernel names (q4_k).
    """
    lines = ["// generated by ferrum_mps.kernels.prelude(): launch geometry and type lists"]
    lines += [f"#define {k} {v}" for k, v in asdict(GEOMETRY).items()]
    # FERRUM_DTYPES(X, a, b) -> X(a, b, <Metal type>, <name>) per activation dtype.
    each = {n: f"X(a, b, {_METAL_DTYPE[n]}, {n})" for n in DTYPE_NAMES.values()}
    lines += [
        "#if defined(__HAVE_BFLOAT__)",
        f"#define FERRUM_DTYPES(X, a, b) {' '.join(each.values())}",
        "#else",
        f"#define FERRUM_DTYPES(X, a, b) {' '.join(v for n, v in each.items() if n != 'bf16')}",
        "#endif",
    ]
    for fam in quants.METAL_FAMILIES:
        items = " ".join(f"X({f.metal_type}, {f.metal_name})" for f in map(quants.FORMATS.get, quants.metal_types(fam)))
        lines.append(f"#define FERRUM_TYPES_{fam}(X) {items}")
    return "\n".join(lines) + "\n"
