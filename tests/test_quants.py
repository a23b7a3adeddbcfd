"""ferrum_mps.quants against gguf-py (dequantize, and quantize where it has one) and llama.cpp's reference quantizers.

The reference k-quantizers at the bottom of this file are straightforward per-block
NumPy ports of llama.cpp's quantize_row_q{4,5,6}_K_ref (ggml-quants.c): sequential
candidate loops, float32 arithmetic, the C packing code line by line.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings, strategies as st

from ferrum_mps.quants import DEQUANT_TYPES, FORMATS, QUANT_TYPES, check_qtype, dequantize_raw, quantize, row_nbytes

# Byte offsets of the fp16 fields of each block format (the registry's; checked against gguf-py below).
F16_FIELDS = {q: f.f16_fields for q, f in FORMATS.items() if f.f16_fields}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def finite_blocks(data: bytes, qtype, rows: int, blocks: int) -> np.ndarray:
    """Random bytes as [rows, blocks * type_size] with every fp16 scale field finite (exponent != 31)."""
    _, size = GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(data, dtype=np.uint8).copy().reshape(rows * blocks, size)
    for off in F16_FIELDS.get(qtype, ()):
        hi = raw[:, off + 1]
        raw[:, off + 1] = np.where((hi & 0x7C) == 0x7C, hi & 0xBF, hi)
    return raw.reshape(rows, blocks * size)


def same(ours: torch.Tensor, ref: np.ndarray, dtype=torch.float32) -> bool:
    """Bit-for-bit equal (NaNs, which only raw F32/F16/BF16 bytes can hold, just have to be NaN in both)."""
    want = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).to(dtype)
    if ours.dtype != dtype or ours.shape != want.shape:
        return False
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    if torch.equal(ours.view(bits), want.view(bits)):
        return True
    nan = ours.isnan()
    return torch.equal(nan, want.isnan()) and torch.equal(ours[~nan].view(bits), want[~nan].view(bits))


@st.composite
def raw_blocks(draw, qtype):
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    _, size = GGML_QUANT_SIZES[qtype]
    data = draw(st.binary(min_size=rows * blocks * size, max_size=rows * blocks * size))
    return finite_blocks(data, qtype, rows, blocks)


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_random_blocks_bit_exact(qtype):
    block, _ = GGML_QUANT_SIZES[qtype]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(raw=raw_blocks(qtype), dtype=st.sampled_from(OUT_DTYPES))
    def check(raw, dtype):
        cols = raw.shape[1] // GGML_QUANT_SIZES[qtype][1] * block
        with np.errstate(all="ignore"):
            ref = gguf_dequantize(raw, qtype).reshape(raw.shape[0], cols)
        ours = dequantize_raw(torch.from_numpy(raw), qtype, cols, dtype)
        assert same(ours, ref, dtype)

    check()


def test_all_supported_types_are_covered():
    assert set(DEQUANT_TYPES) == set(F16_FIELDS) | set(FLOAT_TYPES)
    assert set(QUANT_TYPES) >= {Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_registry_f16_fields_are_the_block_scales_per_gguf(qtype):
    """Every value of a GGML block is (fp16 scale x code) +/- (fp16 min x code): with all the registry's
    fp16 fields zeroed gguf-py decodes zeros, and with any one of them left random it does not."""
    rng = np.random.default_rng(int(qtype))
    _, size = GGML_QUANT_SIZES[qtype]
    fields = F16_FIELDS[qtype]
    raw = finite_blocks(rng.integers(0, 256, 64 * size, dtype=np.uint8).tobytes(), qtype, 64, 1)
    assert FORMATS[qtype].type_size == size and FORMATS[qtype].block == GGML_QUANT_SIZES[qtype][0]
    for keep in (None,) + fields:
        r = raw.copy()
        for off in fields:
            if off != keep:
                r[:, off : off + 2] = 0
        with np.errstate(all="ignore"):
            out = gguf_dequantize(r, qtype)
        assert (np.count_nonzero(out) == 0) == (keep is None), (qtype.name, keep)


def test_gemma_every_tensor_bit_exact(gemma_gguf_path):
    from ferrum_mps.gguf_file import read_gguf

    f = read_gguf(gemma_gguf_path)
    seen = {}
    for name, qt in f.tensors.items():
        cols = qt.shape[-1]
        raw = qt.raw.reshape(-1, qt.raw.shape[-1])
        for i in range(0, raw.shape[0], 16384):  # the 262144-row embedding in slices
            chunk = raw[i : i + 16384]
            ref = gguf_dequantize(chunk.numpy(), qt.qtype)
            assert same(dequantize_raw(chunk, qt.qtype, cols), ref.reshape(chunk.shape[0], cols)), name
        seen[qt.qtype] = seen.get(qt.qtype, 0) + 1
    assert sum(seen.values()) == 236 and set(seen) == {Q.F32, Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0}
    qt = f.tensors["blk.0.ffn_down.weight"]
    for dtype in (torch.float16, torch.bfloat16):  # the half-precision outputs are the float32 ones rounded
        assert torch.equal(qt.dequantize(dtype), qt.dequantize().to(dtype))


# --- quantize ------------------------------------------------------------------


def special_rows(cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows = [
        torch.zeros(cols),
        torch.full((cols,), 0.75),
        torch.full((cols,), -2.0),
        torch.randn(cols, generator=g).abs() + 0.1,  # all positive: the k-quant min clips to 0
        -(torch.randn(cols, generator=g).abs()),
        torch.randn(cols, generator=g) * 1e-3,
        torch.randn(cols, generator=g) * 40,
        torch.where(torch.arange(cols) % 37 == 0, 10.0, 0.0),  # isolated spikes in zeros
        torch.randn(cols, generator=g).round(),  # many exact ties
    ]
    spike = torch.randn(cols, generator=g)
    spike[5] = 30.0
    rows.append(spike)
    return torch.stack(rows)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_quantize_bytes_decode_the_same_in_gguf(qtype):
    g = torch.Generator().manual_seed(0)
    w = torch.cat((torch.randn(6, 512, generator=g), special_rows(512)))
    raw = quantize(w, qtype)
    assert raw.dtype == torch.uint8 and raw.shape == (w.shape[0], row_nbytes(qtype, 512))
    ours = dequantize_raw(raw, qtype, 512)
    assert same(ours, gguf_dequantize(raw.numpy(), qtype))
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[6], torch.zeros(512))  # zeros stay zeros
    err = (ours - w).abs().amax(1) / w.abs().amax(1).clamp(min=1e-30)
    assert (err <= 0.5).all()  # no row is garbage (Q4_0's worst case is half a step of amax/8)


SIMPLE = [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1, Q.BF16]


@pytest.mark.parametrize("qtype", SIMPLE, ids=lambda q: q.name)
def test_simple_quants_byte_identical_to_gguf_on_any_rows(qtype):
    """Hypothesis-drawn rows (ties, subnormals, repeated values, wide ranges) give gguf-py's exact bytes."""

    values = st.floats(-3e4, 3e4, width=32, allow_subnormal=True) | st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.5, 1e-40])

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(rows=st.lists(st.lists(values, min_size=32, max_size=32), min_size=1, max_size=3))
    def check(rows):
        w = np.array(rows, dtype=np.float32)
        with np.errstate(all="ignore"):
            want = gguf_quantize(w, qtype)
        assert np.array_equal(quantize(torch.from_numpy(w), qtype).numpy(), want)

    check()


@pytest.mark.parametrize("qtype", SIMPLE, ids=lambda q: q.name)
def test_simple_quants_byte_identical_to_gguf(qtype):
    g = torch.Generator().manual_seed(2)
    w = torch.cat((torch.randn(8, 256, generator=g), special_rows(256)))
    assert np.array_equal(quantize(w, qtype).numpy(), gguf_quantize(w.numpy(), qtype))


def test_quantize_keeps_leading_dims_and_dtypes():
    w = torch.randn(3, 2, 256, dtype=torch.bfloat16)
    raw = quantize(w, Q.Q4_K)
    assert raw.shape == (3, 2, 144)
    assert torch.equal(raw.view(6, 144), quantize(w.float().view(6, 256), "Q4_K"))
    assert torch.equal(quantize(w, Q.F16).view(torch.float16).view(3, 2, 256), w.to(torch.float16))


def test_quantize_bad_input():
    with pytest.raises(TypeError, match="float"):
        quantize(torch.ones(2, 256, dtype=torch.int32), Q.Q4_K)
    with pytest.raises(TypeError):
        quantize(np.ones((2, 256), dtype=np.float32), Q.Q4_K)
    with pytest.raises(ValueError, match="Q3_K"):
        quantize(torch.ones(2, 256), Q.Q3_K)
    with pytest.raises(NotImplementedError):  # as gguf-py's quantize says it, for callers that fall back
        quantize(torch.ones(2, 256), Q.IQ4_XS)
    with pytest.raises(ValueError, match="unknown"):
        quantize(torch.ones(2, 256), 1234)
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.ones(2, 200), Q.Q4_K)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[float("nan")] + [0.0] * 31]), Q.Q8_0)
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.full((1, 32), 1e6), Q.Q4_0)
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.full((1, 256), 1e5), Q.F16)
    quantize(torch.full((1, 32), 1e6), Q.Q8_0)  # 1e6/127 still fits a float16 scale


def test_check_qtype_row_nbytes_and_dequantize_bad_input():
    assert check_qtype(12) is Q.Q4_K and check_qtype("q6_k") is Q.Q6_K and check_qtype(Q.Q8_0) is Q.Q8_0
    for bad in (99, "Q9_Z", None, 2.5):
        with pytest.raises(ValueError, match="unknown"):
            check_qtype(bad)
    with pytest.raises(ValueError, match="unsupported.*IQ2_XXS"):
        check_qtype(Q.IQ2_XXS)
    assert row_nbytes(Q.Q4_K, 512) == 288 and row_nbytes(Q.F16, 3) == 6
    for cols in (100, 0, -256):
        with pytest.raises(ValueError, match="multiple"):
            row_nbytes(Q.Q4_K, cols)
    raw = torch.zeros(2, 144, dtype=torch.uint8)
    assert dequantize_raw(raw, 12, 256).shape == (2, 256)
    assert dequantize_raw(raw.view(-1), 12, 256).shape == (2, 256)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_raw(raw.to(torch.int8), 12, 256)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_raw(raw, 12, 256, torch.int32)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_raw(raw[:, :100], 12, 256)
    with pytest.raises(ValueError, match="multiple"):
        dequantize_raw(raw, 12, 250)


# --- round-trip error vs llama.cpp's reference quantizers ------------------------------

f32 = np.float32


def nearest_int(v):
    return np.round(np.float32(v)).astype(np.int32)  # ties to even, as the 1.5*2^23 trick does


def to_f16(v) -> np.float16:
    return np.float16(np.float32(v))


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    mn, mx = f32(min(x.min(), 0)), f32(x.max())
    sum_w = f32(weights.sum(dtype=f32))
    sum_x = f32((weights * x).sum(dtype=f32))
    if mx == mn:
        return np.zeros(len(x), np.int32), f32(0), -mn
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
    best_error = f32((weights * (scale * L + mn - x) ** 2).sum(dtype=f32))
    for i in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * i + nmax) / (mx - mn)
        Laux = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(f32)
        sum_l = f32((weights * Laux).sum(dtype=f32))
        sum_l2 = f32((weights * Laux * Laux).sum(dtype=f32))
        sum_xl = f32((weights * Laux * x).sum(dtype=f32))
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            cur_error = f32((weights * (this_scale * Laux + this_min - x) ** 2).sum(dtype=f32))
            if cur_error < best_error:
                L, best_error, scale, mn = Laux.astype(np.int32), cur_error, this_scale, this_min
    return L, f32(scale), f32(-mn)


def get_scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_k_min_block(x, nmax, rmin, rdelta, nstep):
    """quantize_row_q4_K_ref / q5_K_ref for one block: (d, dmin, scale bytes, L)."""
    L = np.zeros(QK_K, np.int32)
    scales, mins = np.zeros(8, f32), np.zeros(8, f32)
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        av_x = np.sqrt(f32((xs * xs).sum(dtype=f32)) / 32)
        L[32 * j : 32 * j + 32], scales[j], mins[j] = make_qkx2_quants(xs, av_x + np.abs(xs), nmax, rmin, rdelta, nstep)
    max_scale, max_min = max(f32(0), scales.max()), max(f32(0), mins.max())
    inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
    inv_min = f32(63) / max_min if max_min > 0 else f32(0)
    sc = [0] * 12
    for j in range(8):
        ls = min(63, int(nearest_int(inv_scale * scales[j])) & 0xFF)
        lm = min(63, int(nearest_int(inv_min * mins[j])) & 0xFF)
        if j < 4:
            sc[j], sc[j + 4] = ls, lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    d, dmin = to_f16(max_scale / f32(63)), to_f16(max_min / f32(63))
    for j in range(8):
        s, m = get_scale_min_k4(j, sc)
        dj = f32(d) * f32(s)
        if not dj:
            continue
        dm = f32(dmin) * f32(m)
        L[32 * j : 32 * j + 32] = np.clip(nearest_int((x[32 * j : 32 * j + 32] + dm) / dj), 0, nmax)
    return d, dmin, sc, L


def ref_q4_k(x):
    out = bytearray()
    for blk in x.reshape(-1, QK_K):
        d, dmin, sc, L = ref_k_min_block(blk, 15, -1.0, 0.1, 20)
        qs = [0] * 128
        for j in range(0, QK_K, 64):
            for l in range(32):
                qs[j // 2 + l] = L[j + l] | (L[j + l + 32] << 4)
        out += d.tobytes() + dmin.tobytes() + bytes(sc) + bytes(qs)
    return np.frombuffer(bytes(out), np.uint8)


def ref_q5_k(x):
    out = bytearray()
    for blk in x.reshape(-1, QK_K):
        d, dmin, sc, L = ref_k_min_block(blk, 31, -0.5, 0.1, 15)
        qh, ql = [0] * 32, [0] * 128
        m1, m2 = 1, 2
        for n in range(0, QK_K, 64):
            for j in range(32):
                l1, l2 = int(L[n + j]), int(L[n + j + 32])
                if l1 > 15:
                    l1 -= 16
                    qh[j] |= m1
                if l2 > 15:
                    l2 -= 16
                    qh[j] |= m2
                ql[n // 2 + j] = l1 | (l2 << 4)
            m1, m2 = m1 << 2, m2 << 2
        out += d.tobytes() + dmin.tobytes() + bytes(sc) + bytes(qh) + bytes(ql)
    return np.frombuffer(bytes(out), np.uint8)


def make_qx_quants(x, nmax):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)."""
    i_max = int(np.argmax(np.abs(x)))
    amax, mx = abs(x[i_max]), x[i_max]
    if amax < 1e-15:
        return np.zeros(len(x), np.int32), f32(0)
    w = x * x
    iscale = f32(-nmax) / mx
    l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    L = l + nmax
    sumlx = f32((w * x * l).sum(dtype=f32))
    suml2 = f32((w * l * l).sum(dtype=f32))
    scale = sumlx / suml2 if suml2 else f32(0)
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * i) / mx
        l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        sumlx = f32((w * x * l).sum(dtype=f32))
        suml2 = f32((w * l * l).sum(dtype=f32))
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = l + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return L, f32(scale)


def ref_q6_k(x):
    out = bytearray()
    for blk in x.reshape(-1, QK_K):
        L = np.zeros(QK_K, np.int32)
        scales = np.zeros(16, f32)
        for ib in range(16):
            L[16 * ib : 16 * ib + 16], scales[ib] = make_qx_quants(blk[16 * ib : 16 * ib + 16], 32)
        ib_max = int(np.argmax(np.abs(scales)))
        max_scale, max_abs = scales[ib_max], abs(scales[ib_max])
        if max_abs < 1e-15:
            out += bytes(210)
            continue
        iscale = f32(-128) / max_scale
        d = to_f16(f32(1) / iscale)
        sc = [min(127, int(nearest_int(iscale * s))) for s in scales]
        for j in range(16):
            dj = f32(d) * f32(sc[j])
            if not dj:
                continue
            L[16 * j : 16 * j + 16] = np.clip(nearest_int(blk[16 * j : 16 * j + 16] / dj), -32, 31) + 32
        ql, qh = [0] * 128, [0] * 64
        for j in range(0, QK_K, 128):
            for l in range(32):
                q1, q2, q3, q4 = (int(L[j + l + k]) for k in (0, 32, 64, 96))
                ql[j // 2 + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                ql[j // 2 + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                qh[j // 4 + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
        out += bytes(ql) + bytes(qh) + np.array(sc, np.int8).tobytes() + d.tobytes()
    return np.frombuffer(bytes(out), np.uint8)


REFERENCE = {Q.Q4_K: ref_q4_k, Q.Q5_K: ref_q5_k, Q.Q6_K: ref_q6_k}


def rmse(qtype, raw: np.ndarray, w: np.ndarray) -> float:
    back = gguf_dequantize(raw.reshape(w.shape[0], -1), qtype)
    return float(np.sqrt(np.mean((back.astype(np.float64) - w) ** 2)))


@pytest.fixture(scope="module")
def real_weights(gemma_gguf_path):
    from ferrum_mps.gguf_file import read_gguf

    # The Q8_0 embedding, so requantizing to k-quants is real work; re-cut into rows of 2048.
    emb = read_gguf(gemma_gguf_path).tensors["token_embd.weight"]
    rows = dequantize_raw(emb.raw[1000:1048], emb.qtype, emb.shape[1])
    return rows.reshape(-1, 2048)[:12].numpy()


@pytest.mark.parametrize("data", ["normal", "gemma"])
@pytest.mark.parametrize("qtype", list(REFERENCE), ids=lambda q: q.name)
def test_k_quant_rmse_close_to_llama_cpp_reference(qtype, data, request):
    if data == "normal":
        w = np.random.default_rng(3).standard_normal((12, 1024)).astype(np.float32)
    else:
        w = request.getfixturevalue("real_weights")
    ref_raw = REFERENCE[qtype](w)
    assert ref_raw.size == w.shape[0] * row_nbytes(qtype, w.shape[1])
    ours_raw = quantize(torch.from_numpy(w), qtype).numpy()
    ref_e, ours_e = rmse(qtype, ref_raw, w), rmse(qtype, ours_raw, w)
    assert ours_e <= 1.02 * ref_e, (ours_e, ref_e)
    # Same algorithm: most blocks come out byte for byte the same (float sums differ in order).
    _, size = GGML_QUANT_SIZES[qtype]
    agree = np.mean(np.all(ours_raw.reshape(-1, size) == ref_raw.reshape(-1, size), axis=1))
    assert agree >= 0.5, agree
