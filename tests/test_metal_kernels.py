"""The seams between the Python launchers and the Metal sources (ferrum_mps.kernels):

- every .metal in metal_ops compiles under the Metal-on-CPU harness with the generated prelude;
- every kernel name a launcher can form (every registered type x activation dtype x path) exists
  in the compiled library, and the libraries hold no kernel the launchers cannot name;
- the launch geometry the Python side sizes grids with is what the kernels are compiled with.
"""

import re
from dataclasses import asdict
from importlib import resources

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import ferrum_mps.metal as metal
from ferrum_mps import kernels, quants, shaders
from ferrum_mps.testing.metal_sim import compile_shader

METAL_FILES = sorted(p.name for p in resources.files("ferrum_mps.metal_ops").iterdir() if p.name.endswith(".metal"))


@pytest.fixture(scope="module")
def libraries():
    """{file: names of the kernels the harness compiled from it}."""
    def names(lib):  # the library's kernels: what dir() adds to the class's own attributes
        return {n for n in dir(lib) if not n.startswith("_") and not hasattr(type(lib), n) and n not in ("bounds_check", "timeout")}

    return {f: names(compile_shader(shaders.metal_source(f))) for f in METAL_FILES}


def test_every_metal_file_compiles_and_every_formable_name_exists(libraries):
    formable = kernels.every_kernel_name()
    assert set(formable) <= set(METAL_FILES)
    for f, names in formable.items():
        assert names <= libraries[f], f"{f} lacks {sorted(names - libraries[f])}"
        # No instantiation that no launcher can reach (a type listed in Metal but not in the registry).
        assert libraries[f] <= names, f"{f} has kernels no launcher names: {sorted(libraries[f] - names)}"


class _NamesOnly:
    """A shader compiler that translates with the harness (so names are the real library's) and
    records every kernel looked up; its kernels launch nothing, so every path is cheap to walk."""

    def __init__(self, libraries):
        self.libraries, self.looked_up = libraries, set()

    def __call__(self, source):
        file = next(f for f in METAL_FILES if source.endswith(resources.files("ferrum_mps.metal_ops").joinpath(f).read_text()))
        return _NamesLibrary(self, file)


class _NamesLibrary:
    def __init__(self, compiler, file):
        self.compiler, self.file = compiler, file

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        assert name in self.compiler.libraries[self.file], f"launcher asked {self.file} for missing kernel {name}"
        self.compiler.looked_up.add((self.file, name))
        return lambda *args, threads=None, group_size=None: None


def _raw(qt, rows, cols):
    return torch.zeros(rows, quants.row_nbytes(qt, cols), dtype=torch.uint8)


def test_every_launcher_path_names_an_existing_kernel(libraries):
    """qlinear (m = 1 / small batch / mat-mat), dequantize, qembedding and the MoE ops (mat-vec and
    mat-mat paths, fused and mixed gate/up) for every registered type x dtype: each name exists."""
    rec = _NamesOnly(libraries)
    dtypes = list(kernels.DTYPE_NAMES)
    with metal.use_shader_compiler(rec):
        for qt in quants.metal_types("mm"):
            k = quants.FORMATS[qt].block
            raw = _raw(qt, 8, k)
            for dt in dtypes:
                for m in (1, 2, kernels.GEOMETRY.MVB_MMAX, kernels.GEOMETRY.MVB_MMAX + 1):
                    metal.qlinear(torch.zeros(m, k, dtype=dt), raw, int(qt), 8, k)
        for qt in quants.metal_types("dequant"):
            k = max(quants.FORMATS[qt].block, 16)
            for dt in dtypes:
                metal.dequantize(_raw(qt, 2, k), int(qt), 2, k, dt)
        for qt in quants.metal_types("get_rows"):
            k = max(quants.FORMATS[qt].block, 16)
            for ids_dtype in (torch.int32, torch.int64):
                metal.qembedding(torch.zeros(3, dtype=ids_dtype), _raw(qt, 2, k), int(qt), k)
        moe_types = quants.metal_types("moe")
        for qt, up in zip(moe_types, moe_types[1:] + moe_types[:1]):  # fused (gate == up) and mixed
            for q_up in (qt, up):
                H = inter = 256
                g, u, d = (_raw(q, 4 * inter, H).view(4, inter, -1) for q in (qt, q_up, qt))
                for dt in dtypes:
                    metal.moe_route(torch.zeros(2, 4, dtype=dt), 2, True)
                    for T in (1, 40):
                        ids, w = torch.zeros(T, 2, dtype=torch.int32), torch.zeros(T, 2)
                        metal.moe_ffn(torch.zeros(T, H, dtype=dt), w, ids, g, u, d, int(qt), int(q_up), int(qt), inter)
                        metal.moe_qlinear(torch.zeros(T, H, dtype=dt), ids, g, int(qt), inter, H)
    launched = {}
    for f, n in rec.looked_up:
        launched.setdefault(f, set()).add(n)
    formable = kernels.every_kernel_name()
    for f, names in launched.items():
        assert names <= formable[f], f"{f}: launched names kernel_name cannot form: {sorted(names - formable[f])}"
    # Walked every path: all that is left unlaunched is a float type dequantized to its own dtype
    # (dequantize_mps copies those with torch).
    same = {kernels.kernel_name("dequant", q, d) for q, d in quants.FLOAT_QTYPES.items() if "dequant" in quants.FORMATS[q].metal}
    assert {f: n - launched.get(f, set()) for f, n in formable.items()} == {
        "dequantize.metal": same, "qlinear.metal": set(), "moe.metal": set()}


def test_launch_geometry_is_what_the_kernels_are_compiled_with():
    geometry = asdict(kernels.GEOMETRY)
    probe = kernels.prelude() + "\n#include <metal_stdlib>\nusing namespace metal;\n" + (
        "kernel void geometry_probe(device long *out [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        + "".join(f"    if (i == 0) out[{j}] = {name};\n" for j, name in enumerate(geometry))
        + "}\n"
    )
    out = torch.zeros(len(geometry), dtype=torch.int64)
    compile_shader(probe).geometry_probe(out, threads=1, group_size=1)
    assert dict(zip(geometry, out.tolist())) == geometry
    # ...and no source redefines them (a second copy would win after the prelude, or clash).
    root = resources.files("ferrum_mps.metal_ops")
    for p in root.iterdir():
        if p.name.endswith((".metal", ".h")):
            defined = set(re.findall(r"^\s*#\s*define\s+(\w+)", p.read_text(), re.M))
            assert not defined & set(geometry), f"{p.name} defines {sorted(defined & set(geometry))}"
    # What the kernels assume of the numbers (they index arrays sized from them).
    g = kernels.GEOMETRY
    assert g.ATT_BLOCK == g.ATT_THREADS and g.ATT_THREADS % 32 == 0  # one key of a block per thread
    assert (g.ATT_HMAX * g.ATT_DMAX) % g.ATT_THREADS == 0 and g.MOE_ROUTE_MAX_E % 32 == 0
    # ...and the launchers size their grids and limits from GEOMETRY, not from a copy of their own.
    from ferrum_mps.ops import attention, fused_linear, moe, norm

    assert (attention.MAX_HEAD_DIM, attention._HMAX, attention._THREADS, attention._RTHREADS, attention.SPLIT_MIN_KEYS) == (
        g.ATT_DMAX, g.ATT_HMAX, g.ATT_THREADS, g.ATT_RTHREADS, g.ATT_BLOCK)
    assert (fused_linear.FUSED_MAX_M, fused_linear._ROWS_PER_GROUP, fused_linear._GROUP) == (
        g.FMV_MMAX, g.FMV_NSG * g.FMV_NR, 32 * g.FMV_NSG)
    assert (norm._ROUTE_MAX_EXPERTS, norm._ROUTE_THREADS, norm._MAX_THREADS) == (g.MOE_ROUTE_MAX_E, 32 * g.ROUTE_NSG, 32 * g.NORM_MAX_SG)
    assert moe._ROUTE_MAX_EXPERTS == g.MOE_ROUTE_MAX_E


def test_registry_and_gguf_agree():
    from gguf import GGML_QUANT_SIZES

    for qt, f in quants.FORMATS.items():
        assert (f.block, f.type_size) == GGML_QUANT_SIZES[qt]
        assert set(f.metal) <= set(quants.METAL_FAMILIES)
    # The op modules' type sets are the registry's.
    from ferrum_mps.ops import linear

    assert linear.METAL_QTYPES == set(quants.FLOAT_QTYPES) | set(quants.metal_types("mm"))
    assert Q.Q4_K in quants.metal_types("moe") and Q.IQ4_XS not in quants.metal_types("mv")


def test_thin_path_checks_the_weight_once_and_the_activations_every_call(metal_device, monkeypatch):
    """After the first call on a weight layout the MPS functions reuse its plan (no weight re-validation,
    no kernel lookup), yet bad activations / ids / weights of another layout still raise clearly."""
    from ferrum_mps.ops import linear as L
    from ferrum_mps.ops import moe as M

    calls = []
    for mod, name in ((L, "check_raw"), (M, "_check_ffn"), (M, "_check_qlinear")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    dev = metal_device
    raw = torch.zeros(8, quants.row_nbytes(Q.Q8_0, 64), dtype=torch.uint8, device=dev)
    x = torch.zeros(1, 64, device=dev)
    metal.qlinear(x, raw, int(Q.Q8_0), 8, 64)
    metal.qlinear(x, raw, int(Q.Q8_0), 8, 64)
    assert calls == ["check_raw"]
    with pytest.raises(ValueError, match="in_features=64"):
        metal.qlinear(torch.zeros(1, 32, device=dev), raw, int(Q.Q8_0), 8, 64)
    with pytest.raises(ValueError, match="device|on meta"):
        metal.qlinear(x.to("meta"), raw, int(Q.Q8_0), 8, 64)
    with pytest.raises(ValueError, match="bytes"):
        metal.qlinear(x, raw[:7], int(Q.Q8_0), 8, 64)

    g = torch.zeros(4, 32, quants.row_nbytes(Q.Q8_0, 64), dtype=torch.uint8, device=dev)
    d = torch.zeros(4, 64, quants.row_nbytes(Q.Q8_0, 32), dtype=torch.uint8, device=dev)
    w, ids = torch.full((1, 2), 0.5, device=dev), torch.tensor([[0, 3]], dtype=torch.int32, device=dev)
    calls.clear()
    for _ in range(2):
        metal.moe_ffn(x, w, ids, g, g, d, 8, 8, 8, 32)
        metal.moe_qlinear(x, ids, g, 8, 32, 64)
    assert calls == ["_check_ffn", "_check_qlinear"]
    with pytest.raises(ValueError, match="weights must have the shape of ids"):
        metal.moe_ffn(x, w[:, :1], ids, g, g, d, 8, 8, 8, 32)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        metal.moe_ffn(x, w, ids.float(), g, g, d, 8, 8, 8, 32)
    with pytest.raises(ValueError, match="ids must have shape"):
        metal.moe_qlinear(torch.zeros(2, 64, device=dev), ids, g, 8, 32, 64)
    with pytest.raises(ValueError, match="down_raw has 3 experts"):
        metal.moe_ffn(x, w, ids, g, g, d[:3], 8, 8, 8, 32)


def test_fused_ops_check_their_arguments_once_per_layout(metal_device, monkeypatch):
    """The fused decode ops run their full check once per key (shapes, dtypes, layouts, devices),
    as qlinear does; a call that differs in anything the check reads still raises clearly."""
    from ferrum_mps.ops import attention as A
    from ferrum_mps.ops import fused_linear as F
    from ferrum_mps.ops import norm as N

    calls = []
    for mod, name in ((N, "_check_norm"), (N, "_check_add"), (N, "_check_qk"), (N, "_check_gate_route"),
                      (A, "check_decode_attention"), (F, "_check")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    dev = metal_device
    x, w = torch.randn(1, 16, device=dev), torch.ones(16, device=dev)
    q, k = torch.randn(1, 1, 2, 16, device=dev), torch.randn(1, 1, 1, 16, device=dev)
    kc, vc = torch.zeros(1, 1, 4, 16, device=dev), torch.zeros(1, 1, 4, 16, device=dev)
    inv, pos, cp = torch.ones(8, device=dev), torch.zeros(1, 1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    raw = torch.zeros(4, quants.row_nbytes(Q.Q8_0, 32), dtype=torch.uint8, device=dev)
    x32 = torch.zeros(1, 32, device=dev)
    for _ in range(3):
        metal.rms_norm(x, w, 1e-6)
        metal.add_rms_norm(x, x, w, 1e-6)
        metal.qk_norm_rope_cache(q, k, k, None, w, 1e-6, inv, pos, False, kc, vc, cp)
        metal.moe_gate_route(x, torch.ones(4, 16, device=dev), 2, True)
        metal.decode_attention(q.transpose(1, 2), kc, vc, cp, None, 0, 0.25)
        metal.qkv_linear(x32, raw, int(Q.Q8_0), raw, int(Q.Q8_0), raw, int(Q.Q8_0), 4, 4, 32)
        metal.gate_up_act(x32, raw, int(Q.Q8_0), raw, int(Q.Q8_0), 4, 32, "silu")
    assert calls == ["_check_norm", "_check_add", "_check_norm", "_check_qk", "_check_gate_route",
                     "check_decode_attention", "_check", "_check"]  # add_rms_norm's check calls _check_norm
    with pytest.raises(TypeError, match="activation dtype"):
        metal.rms_norm(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        metal.rms_norm(x, w[:8], 1e-6)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        metal.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        metal.add_rms_norm(x, torch.zeros(2, 16, device=dev), w, 1e-6)
    with pytest.raises(ValueError, match="cache_position must have shape"):
        metal.qk_norm_rope_cache(q, k, k, None, w, 1e-6, inv, pos, False, kc, vc, cp[:0])
    with pytest.raises(ValueError, match="contiguous"):
        metal.qk_norm_rope_cache(q, k, k, None, w, 1e-6, inv, pos, False, torch.zeros(1, 1, 16, 4, device=dev).transpose(2, 3), vc, cp)
    with pytest.raises(ValueError, match="device|meta"):
        metal.decode_attention(q.transpose(1, 2), kc, vc, cp.to("meta"), None, 0, 0.25)
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        metal.decode_attention(q.transpose(1, 2), kc, vc, cp, torch.ones(1, 4, device=dev), 0, 0.25)
    with pytest.raises(ValueError, match="in_features=32"):
        metal.qkv_linear(x, raw, int(Q.Q8_0), raw, int(Q.Q8_0), raw, int(Q.Q8_0), 4, 4, 32)
    with pytest.raises(ValueError, match="raw_v has .* bytes"):
        metal.qkv_linear(x32, raw, int(Q.Q8_0), raw, int(Q.Q8_0), raw[:3], int(Q.Q8_0), 4, 4, 32)
    with pytest.raises(ValueError, match="act must be one of"):
        metal.gate_up_act(x32, raw, int(Q.Q8_0), raw, int(Q.Q8_0), 4, 32, "relu")
