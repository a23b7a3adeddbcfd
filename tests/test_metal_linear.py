"""The MPS implementations of dequantize / qlinear / qembedding (metal_ops/*.metal + their launch code),
run through `ferrum_mps.metal` under the Metal-on-CPU harness (and on a real GPU on a Mac).

References: the CPU ops, themselves checked against gguf-py in test_ops_linear.py, evaluated in float64.
"""

import gguf
import pytest
import torch

import ferrum_mps.metal as metal
import ferrum_mps.ops  # noqa: F401
from ferrum_mps import shaders
from ferrum_mps.quants import metal_types
from test_ops_linear import gguf_dequant, random_raw

Q = gguf.GGMLQuantizationType
# From the format registry: every type with Metal kernels is tested, whatever it is.
MV_QTYPES = list(metal_types("mv"))  # dedicated m = 1 kernels
QTYPES = list(metal_types("mm"))  # the others (IQ4) at m = 1 run the small-batch kernel
M_BUCKETS = [1, 2, 3, 5, 8, 9, 31, 64, 67]
N = 70  # neither a multiple of the 4-row mat-vec groups nor of the 64-row mat-mat tile


def _k(qt, big=False):
    """K: a multiple of 256 for k-quants; for 32-blocks a multiple of 32 that is not one of 256."""
    if gguf.GGML_QUANT_SIZES[qt][0] == 256:
        return 768 if big else 256
    return 288 if big else 96


def at_offset(raw, device, offset=6):
    """The same bytes, contiguous, starting `offset` bytes into a bigger storage."""
    flat = raw.reshape(-1)
    buf = torch.zeros(flat.numel() + offset + 10, dtype=torch.uint8, device=device)
    buf[offset : offset + flat.numel()] = flat.to(device)
    out = buf[offset : offset + flat.numel()].view(raw.shape)
    assert out.storage_offset() == offset and out.is_contiguous()
    return out


def reference(x, raw, qt, n, k):
    w = torch.ops.ferrum.dequantize(raw.cpu().contiguous(), int(qt), n, k, torch.float32).double()
    return x.cpu().double() @ w.T


def check(y, ref, dtype):
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------
# dequantize: exact


@pytest.mark.parametrize("qt", QTYPES + [Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_dequantize_exact(metal_device, qt):
    rows, cols = 3, _k(qt, big=True)
    raw = random_raw(qt, rows, cols, seed=int(qt))
    expect = gguf_dequant(raw, qt, rows, cols)
    torch.testing.assert_close(torch.ops.ferrum.dequantize(raw, int(qt), rows, cols, torch.float32), expect, rtol=0, atol=0)
    for dtype in (torch.float32, torch.float16):
        out = metal.dequantize(at_offset(raw, metal_device), int(qt), rows, cols, dtype)
        assert out.shape == (rows, cols) and out.dtype == dtype and out.device.type == metal_device.type
        torch.testing.assert_close(out.cpu(), expect.to(dtype), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# qlinear: every type x every m bucket (float32), dtypes and K sizes on a subset


@pytest.mark.parametrize("m", M_BUCKETS)
@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.name)
def test_qlinear_every_type_and_m(metal_device, qt, m):
    k = _k(qt)
    raw = random_raw(qt, N, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = metal.qlinear(x.to(metal_device), at_offset(raw, metal_device), int(qt), N, k)
    assert y.shape == (m, N)
    check(y, reference(x, raw, qt, N, k), torch.float32)


@pytest.mark.parametrize("m", [1, 4, 40])
@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.name)
def test_qlinear_float16_activations(metal_device, qt, m):
    k = _k(qt)
    raw = random_raw(qt, 37, k, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).half()
    y = metal.qlinear(x.to(metal_device), raw.to(metal_device), int(qt), 37, k)
    check(y, reference(x, raw, qt, 37, k), torch.float16)


@pytest.mark.parametrize("m", [1, 6, 33])
@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.name)
def test_qlinear_longer_rows(metal_device, qt, m):
    """K spanning several lane strides (and, for 32-blocks, a partial last stride)."""
    k = _k(qt, big=True)
    raw = random_raw(qt, 9, k, seed=5)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(11))
    y = metal.qlinear(x.to(metal_device), raw.to(metal_device), int(qt), 9, k)
    assert y.shape == (2, m, 9)
    check(y.reshape(-1, 9), reference(x.reshape(-1, k), raw, qt, 9, k), torch.float32)


@pytest.mark.parametrize("qt", [Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 3, 12])
def test_qlinear_bfloat16_activations(metal_device, qt, m):
    k = _k(qt)
    raw = random_raw(qt, 10, k, seed=6)
    x = torch.randn(m, k).bfloat16()
    y = metal.qlinear(x.to(metal_device), raw.to(metal_device), int(qt), 10, k)
    check(y, reference(x, raw, qt, 10, k), torch.bfloat16)


@pytest.mark.parametrize("qt", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_qlinear_float_weights_use_torch(metal_device, qt):
    raw = random_raw(qt, 5, 64, seed=8)
    x = torch.randn(3, 64)
    y = metal.qlinear(x.to(metal_device), raw.to(metal_device), int(qt), 5, 64)
    check(y, reference(x, raw, qt, 5, 64), torch.float32)


def test_real_gemma_weights(metal_device, gemma_gguf_path):
    """llama.cpp-made Q4_K / Q6_K / Q5_0 rows through every kernel family, vs the CPU op."""
    from ferrum_mps.gguf_file import read_gguf

    f = read_gguf(gemma_gguf_path)
    for name, m in (("blk.0.attn_output.weight", 1), ("blk.0.ffn_down.weight", 3), ("blk.0.attn_k.weight", 1), ("blk.0.attn_output.weight", 9)):
        qt = f.tensors[name]
        n, k = qt.shape
        raw = qt.raw[:40].contiguous()  # 40 rows keep the harness run short; the blocks are the file's
        x = torch.randn(m, k)
        y = metal.qlinear(x.to(metal_device), raw.to(metal_device), int(qt.qtype), 40, k)
        check(y, reference(x, raw, qt.qtype, 40, k), torch.float32)


class _CountingCompiler:
    """Wraps the active compiler: counts every kernel launch."""

    def __init__(self, inner):
        self.inner, self.launches = inner, []

    def __call__(self, source):
        lib = self.inner(source)
        outer = self

        class Lib:
            def __getattr__(self, name):
                k = getattr(lib, name)

                def launch(*args, **kw):
                    outer.launches.append(name)
                    return k(*args, **kw)

                return launch

        return Lib()


@pytest.mark.parametrize(
    "qt, m, prefix",
    [(q, 1, "mv_") for q in MV_QTYPES] + [(Q.IQ4_XS, 1, "mvb_"), (Q.Q6_K, 5, "mvb_"), (Q.Q6_K, 20, "mm_")],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_one_dispatch_per_call(metal_device, qt, m, prefix):
    counting = _CountingCompiler(shaders.get_shader_compiler())
    k = _k(qt)
    raw = random_raw(qt, 8, k).to(metal_device)
    x = torch.randn(m, k)
    with metal.use_shader_compiler(counting):
        y = metal.qlinear(x.to(metal_device), raw, int(qt), 8, k)
    assert counting.launches == [f"{prefix}{qt.name.lower()}_f32"]
    check(y, reference(x, raw, qt, 8, k), torch.float32)


# ---------------------------------------------------------------------------------------------
# qembedding


@pytest.mark.parametrize("qt", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0, Q.Q3_K, Q.IQ4_XS, Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_qembedding(metal_device, qt):
    rows, dim = 13, _k(qt)
    raw = random_raw(qt, rows, dim, seed=9)
    ids = torch.tensor([[12, 0, 5], [5, 5, 1]])
    out = metal.qembedding(ids.to(metal_device), at_offset(raw, metal_device), int(qt), dim)
    assert out.shape == (2, 3, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), gguf_dequant(raw, qt, rows, dim)[ids], rtol=0, atol=0)


def test_qembedding_out_of_range_ids_give_zero_rows(metal_device):
    raw = random_raw(Q.Q4_K, 4, 256)
    out = metal.qembedding(torch.tensor([3, 4, -1], dtype=torch.int32).to(metal_device), raw.to(metal_device), int(Q.Q4_K), 256)
    torch.testing.assert_close(out[0].cpu(), gguf_dequant(raw, Q.Q4_K, 4, 256)[3], rtol=0, atol=0)
    assert torch.count_nonzero(out[1:].cpu()) == 0


@pytest.mark.parametrize("qt", [Q.Q4_K, Q.F32, Q.F16], ids=lambda q: q.name)
def test_qembedding_int64_ids_outside_int32_are_not_truncated(metal_device, qt):
    """2**32 + 1 must not become row 1 when narrowed to int32: any id outside [0, rows) is a zero row on MPS
    (the CPU op rejects it: checking costs nothing there)."""
    raw = random_raw(qt, 4, 256)
    ids = torch.tensor([2**32 + 1, 2, -(2**32) + 3, 4, -1], dtype=torch.int64)
    out = metal.qembedding(ids.to(metal_device), raw.to(metal_device), int(qt), 256).cpu()
    torch.testing.assert_close(out[1], gguf_dequant(raw, qt, 4, 256)[2], rtol=0, atol=0)
    assert torch.count_nonzero(out[[0, 2, 3, 4]]) == 0
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.ferrum.qembedding(ids, raw, int(qt), 256)


def test_qembedding_empty_table_and_ids(metal_device):
    raw = torch.empty(0, dtype=torch.uint8)
    for ids in (torch.empty(0, dtype=torch.int64), torch.empty(2, 0, dtype=torch.int32)):
        for out in (torch.ops.ferrum.qembedding(ids, raw, int(Q.Q4_K), 256),
                    metal.qembedding(ids.to(metal_device), raw.to(metal_device), int(Q.Q4_K), 256)):
            assert out.shape == (*ids.shape, 256) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.ferrum.qembedding(torch.tensor([0]), raw, int(Q.Q4_K), 256)


# ---------------------------------------------------------------------------------------------
# bad input: checked before any launch


def test_bad_input_raises_before_launch(metal_device):
    raw = random_raw(Q.Q4_K, 4, 256).to(metal_device)
    x = torch.randn(2, 256).to(metal_device)
    with pytest.raises(ValueError, match="in_features=256"):
        metal.qlinear(torch.randn(2, 128).to(metal_device), raw, int(Q.Q4_K), 4, 256)
    with pytest.raises(ValueError, match="bytes"):
        metal.qlinear(x, raw, int(Q.Q4_K), 5, 256)
    with pytest.raises(TypeError, match="uint8"):
        metal.qlinear(x, raw.float(), int(Q.Q4_K), 4, 256)
    with pytest.raises(ValueError, match="contiguous"):
        metal.qlinear(x, random_raw(Q.Q4_K, 4, 512).to(metal_device)[:, :144], int(Q.Q4_K), 4, 256)
    with pytest.raises(TypeError, match="float32"):
        metal.qlinear(x.double(), raw, int(Q.Q4_K), 4, 256)
    with pytest.raises(ValueError, match="device|on meta"):
        metal.qlinear(x.to("meta"), raw, int(Q.Q4_K), 4, 256)
    with pytest.raises(ValueError, match="odd byte offset"):
        metal.qlinear(x, at_offset(raw.cpu(), metal_device, offset=3), int(Q.Q4_K), 4, 256)
    with pytest.raises(ValueError, match="unsupported|unknown"):
        metal.dequantize(raw, 1234, 4, 256, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        metal.dequantize(raw, int(Q.Q4_K), 4, 256, torch.int8)
    with pytest.raises(TypeError, match="int32 or int64"):
        metal.qembedding(torch.tensor([0.0]).to(metal_device), raw, int(Q.Q4_K), 256)


def test_mps_kernels_registered_as_the_ops_mps_implementations():
    """On a Mac, torch.ops.ferrum.* on MPS tensors dispatch to exactly these functions."""
    import ferrum_mps.ops.linear as L

    for op, fn in (("qlinear", L.qlinear_mps), ("dequantize", L.dequantize_mps), ("qembedding", L.qembedding_mps)):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ferrum::{op}", "MPS")
        assert getattr(metal, op) is fn
