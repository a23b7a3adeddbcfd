"""ferrum::dequantize / qlinear / qembedding on CPU, against gguf-py's numpy dequantizer + plain torch."""

import gguf
import numpy as np
import pytest
import torch

import ferrum_mps.ops  # noqa: F401  (registers the ops)
from ferrum_mps.ops import linear as L
from ferrum_mps.quants import FORMATS

Q = gguf.GGMLQuantizationType
# Every registered type (ferrum_mps.quants.FORMATS): a new format is tested here without a new list.
QUANT_TYPES = [q for q, f in FORMATS.items() if f.torch_dtype is None]
FLOAT_TYPES = [q for q, f in FORMATS.items() if f.torch_dtype is not None]


def random_raw(qtype, rows, cols, seed=0):
    """Valid random GGML rows: random bytes with finite, moderate f16 scales (floats from randn)."""
    g = torch.Generator().manual_seed(seed)
    qt = Q(qtype)
    if qt in L.FLOAT_QTYPES:
        return (torch.randn(rows, cols, generator=g) * 0.5).to(L.FLOAT_QTYPES[qt]).view(torch.uint8).reshape(rows, -1).contiguous()
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = torch.randint(0, 256, (rows * cols // block, size), dtype=torch.uint8, generator=g)
    for off in FORMATS[qt].f16_fields:  # random bytes there could be inf/nan
        scale = (torch.rand(raw.shape[0], generator=g) * 0.02 + 0.001) * (torch.randint(0, 2, (raw.shape[0],), generator=g) * 2 - 1)
        raw[:, off : off + 2] = scale.half().view(torch.uint8).view(-1, 2)
    return raw.reshape(rows, -1).contiguous()


def gguf_dequant(raw, qtype, rows, cols):
    qt = Q(qtype)
    if qt in L.FLOAT_QTYPES:
        return raw.reshape(-1).view(L.FLOAT_QTYPES[qt]).float().reshape(rows, cols)
    return torch.from_numpy(gguf.quants.dequantize(raw.reshape(rows, -1).numpy(), qt).astype(np.float32)).reshape(rows, cols)


def cols_for(qt):
    return 512 if gguf.GGML_QUANT_SIZES[qt][0] == 256 else 96


@pytest.mark.parametrize("qt", QUANT_TYPES + FLOAT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_matches_gguf(qt, dtype):
    rows, cols = 5, cols_for(qt)
    raw = random_raw(qt, rows, cols, seed=int(qt))
    out = torch.ops.ferrum.dequantize(raw, int(qt), rows, cols, dtype)
    assert out.shape == (rows, cols) and out.dtype == dtype
    torch.testing.assert_close(out, gguf_dequant(raw, qt, rows, cols).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("qt", QUANT_TYPES + FLOAT_TYPES, ids=lambda q: q.name)
def test_qlinear_matches_reference(qt):
    out_f, in_f = 7, cols_for(qt)
    raw = random_raw(qt, out_f, in_f, seed=1)
    w = gguf_dequant(raw, qt, out_f, in_f).double()
    x = torch.randn(2, 3, in_f)
    y = torch.ops.ferrum.qlinear(x, raw, int(qt), out_f, in_f)
    assert y.shape == (2, 3, out_f) and y.dtype == torch.float32
    ref = (x.double() @ w.T).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qt", [Q.Q4_K, Q.Q8_0, Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_qlinear_low_precision_activations(qt, dtype):
    out_f, in_f = 9, 256
    raw = random_raw(qt, out_f, in_f, seed=2)
    w = gguf_dequant(raw, qt, out_f, in_f)
    x = torch.randn(4, in_f).to(dtype)
    y = torch.ops.ferrum.qlinear(x, raw, int(qt), out_f, in_f)
    assert y.dtype == dtype
    ref = x.double() @ w.double().T
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 17])
def test_qlinear_works_in_row_chunks(monkeypatch, m):
    """Neither path dequantizes the whole weight at once (m = 1: decode path's codes; m = 17: dequantize_raw)."""
    out_f, in_f = 100, 256
    raw = random_raw(Q.Q6_K, out_f, in_f, seed=3)
    x = torch.randn(m, in_f)
    full = torch.ops.ferrum.qlinear(x, raw, int(Q.Q6_K), out_f, in_f)
    seen = []
    name = "code_planes" if m <= L.SMALL_M else "dequantize_raw"
    real = getattr(L.quants, name)

    def spy(r, *a, **k):
        seen.append(r.numel())
        return real(r, *a, **k)

    monkeypatch.setattr(L, "_CPU_CHUNK_VALUES", 16 * in_f)
    monkeypatch.setattr(L, "_SMALL_CHUNK_VALUES", 16 * in_f)
    monkeypatch.setattr(L.quants, name, spy)
    chunked = torch.ops.ferrum.qlinear(x, raw, int(Q.Q6_K), out_f, in_f)
    assert len(seen) == 7 and max(seen) == 16 * raw.shape[1]
    ref = x.double() @ gguf_dequant(raw, Q.Q6_K, out_f, in_f).double().T
    torch.testing.assert_close(chunked.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("qt", QUANT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16, 17])
def test_qlinear_decode_path_matches_reference(qt, m):
    """m <= 8 takes the decode path (code planes * block scale, offsets via group sums of x), larger m the dequantize path."""
    block = gguf.GGML_QUANT_SIZES[qt][0]
    out_f, in_f = 37, 2 * block if block == 256 else 5 * block  # odd rows: chunks with a ragged tail
    raw = random_raw(qt, out_f, in_f, seed=10 + m)
    x = torch.randn(m, in_f) + 0.5  # a mean != 0: the offset term matters
    ref = x.double() @ gguf_dequant(raw, qt, out_f, in_f).double().T
    for chunk in (L._SMALL_CHUNK_VALUES, 3 * in_f):
        L_chunk, L._SMALL_CHUNK_VALUES = L._SMALL_CHUNK_VALUES, chunk
        try:
            y = torch.ops.ferrum.qlinear(x, raw, int(qt), out_f, in_f)
        finally:
            L._SMALL_CHUNK_VALUES = L_chunk
        assert y.shape == (m, out_f) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("qt", [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.IQ4_XS], ids=lambda q: q.name)
@pytest.mark.parametrize("off", [1, 2, 3])
def test_qlinear_decode_path_misaligned_raw(qt, off):
    """The decode path reads fp16 scales and 32-bit words in place when aligned; any byte offset still works."""
    block = gguf.GGML_QUANT_SIZES[qt][0]
    out_f, in_f = 9, 2 * block if block == 256 else 4 * block
    raw = random_raw(qt, out_f, in_f, seed=5)
    big = torch.zeros(raw.numel() + off, dtype=torch.uint8)
    big[off:] = raw.reshape(-1)
    x = torch.randn(1, in_f)
    ref = x.double() @ gguf_dequant(raw, qt, out_f, in_f).double().T
    y = torch.ops.ferrum.qlinear(x, big[off:].view(out_f, -1), int(qt), out_f, in_f)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("qt", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.F32, Q.BF16], ids=lambda q: q.name)
def test_qembedding_matches_reference(qt):
    rows, dim = 11, cols_for(qt)
    raw = random_raw(qt, rows, dim, seed=4)
    ids = torch.tensor([[3, 0, 10], [3, 7, 1]])
    out = torch.ops.ferrum.qembedding(ids, raw, int(qt), dim)
    assert out.shape == (2, 3, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, gguf_dequant(raw, qt, rows, dim)[ids], rtol=0, atol=0)
    out32 = torch.ops.ferrum.qembedding(ids.int(), raw, int(qt), dim)
    torch.testing.assert_close(out32, out, rtol=0, atol=0)


def test_opcheck():
    raw = random_raw(Q.Q4_K, 8, 256)
    x = torch.randn(3, 256)
    torch.library.opcheck(torch.ops.ferrum.qlinear.default, (x, raw, int(Q.Q4_K), 8, 256))
    torch.library.opcheck(torch.ops.ferrum.qlinear.default, (x.half(), random_raw(Q.F16, 8, 256), int(Q.F16), 8, 256))
    torch.library.opcheck(torch.ops.ferrum.dequantize.default, (raw, int(Q.Q4_K), 8, 256, torch.float16))
    torch.library.opcheck(torch.ops.ferrum.dequantize.default, (random_raw(Q.F32, 2, 32), int(Q.F32), 2, 32, torch.float32))
    torch.library.opcheck(torch.ops.ferrum.qembedding.default, (torch.tensor([1, 5, 1]), raw, int(Q.Q4_K), 256))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("emb", random_raw(Q.Q8_0, 16, 64, seed=5))
        self.register_buffer("w1", random_raw(Q.Q4_K, 32, 256, seed=6))
        self.register_buffer("w2", random_raw(Q.Q6_K, 64, 256, seed=7))

    def forward(self, ids):
        h = torch.ops.ferrum.qembedding(ids, self.emb, int(Q.Q8_0), 64)
        h = torch.cat([h, h, h, h], -1)
        h = torch.nn.functional.silu(torch.ops.ferrum.qlinear(h, self.w1, int(Q.Q4_K), 32, 256))
        h = torch.cat([h] * 8, -1)
        return torch.ops.ferrum.qlinear(h, self.w2, int(Q.Q6_K), 64, 256) + torch.ops.ferrum.dequantize(self.w2, int(Q.Q6_K), 64, 256, torch.float32).sum(1)


def test_compile_fullgraph_no_graph_breaks():
    m = _Block()
    ids = torch.tensor([[1, 2, 15]])
    eager = m(ids)
    explained = torch._dynamo.explain(m)(ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), eager, rtol=1e-6, atol=1e-6)


def test_compile_inductor_equals_eager():
    m = _Block()
    ids = torch.tensor([[4, 2]])
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(ids), m(ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# bad input: a clear exception naming the problem


def _q4k(rows=4, cols=256):
    return random_raw(Q.Q4_K, rows, cols)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(2, 128), _q4k(), 12, 4, 256), ValueError, "in_features=256"),
        (lambda: (torch.randn(2, 256), _q4k().float(), 12, 4, 256), TypeError, "uint8"),
        (lambda: (torch.randn(2, 256), _q4k(4, 512)[:, ::2], 12, 4, 256), ValueError, "contiguous"),
        (lambda: (torch.randn(2, 256), _q4k(5), 12, 4, 256), ValueError, "bytes"),
        (lambda: (torch.randn(2, 250), random_raw(Q.Q8_0, 4, 256)[:, :-1].contiguous(), 8, 4, 250), ValueError, "block size"),
        (lambda: (torch.randn(2, 256), _q4k(), 99, 4, 256), ValueError, "quantization type"),
        (lambda: (torch.randn(2, 256), _q4k(), 4, 4, 256), ValueError, "unsupported|unknown"),
        (lambda: (torch.randint(0, 9, (2, 256)), _q4k(), 12, 4, 256), TypeError, "float32"),
        (lambda: (torch.randn(2, 256, dtype=torch.float64), _q4k(), 12, 4, 256), TypeError, "float32"),
        (lambda: (torch.randn(2, 256, device="meta"), _q4k(), 12, 4, 256), ValueError, "device|on meta"),
    ],
    ids=["x_last_dim", "raw_dtype", "raw_strided", "byte_count", "block_multiple", "unknown_qtype",
         "unsupported_qtype", "x_int", "x_float64", "devices"],
)
def test_qlinear_bad_input(make, exc, match):
    args = make()
    with pytest.raises(exc, match=match):
        L.check_raw(args[1], *args[2:])  # the shared validator
        L.check_activation(args[0], args[4], args[1])
    if args[0].device.type == "cpu":
        with pytest.raises(exc, match=match):
            torch.ops.ferrum.qlinear(*args)


def test_dequantize_and_embedding_bad_input():
    raw = _q4k()
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.ferrum.dequantize(raw, 12, 4, 256, torch.int32)
    with pytest.raises(ValueError, match="bytes"):
        torch.ops.ferrum.dequantize(raw, 12, 3, 256, torch.float32)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.ferrum.qembedding(torch.tensor([4]), raw, 12, 256)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.ferrum.qembedding(torch.tensor([-1]), raw, 12, 256)
    with pytest.raises(TypeError, match="int32 or int64"):
        torch.ops.ferrum.qembedding(torch.tensor([1.0]), raw, 12, 256)
    with pytest.raises(ValueError, match="whole number"):
        torch.ops.ferrum.qembedding(torch.tensor([1]), raw[:, :-2].contiguous(), 12, 256)


def test_ops_are_inference_only_but_never_silently_wrong_under_autograd():
    """The ops have no backward: with an input that requires grad the forward works and backward raises
    (rather than returning detached outputs or silent zero gradients)."""
    raw = random_raw(Q.Q8_0, 4, 64)
    x = torch.randn(2, 64, requires_grad=True)
    y = torch.ops.ferrum.qlinear(x, raw, int(Q.Q8_0), 4, 64)
    torch.testing.assert_close(y, x.detach() @ gguf_dequant(raw, Q.Q8_0, 4, 64).T, rtol=1e-5, atol=1e-5)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="ferrum::qlinear has no backward"):
        y.sum().backward()
    with torch.no_grad():
        assert not torch.ops.ferrum.qlinear(x, raw, int(Q.Q8_0), 4, 64).requires_grad
