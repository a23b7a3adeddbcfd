"""Native CPU kernels (ferrum_mps/native) against independent float references.

The native path quantizes activations to int8 per 32 values (llama.cpp's scheme), so
products are compared with a relative tolerance: ||y - ref|| / ||ref|| <= 2e-2 (measured
~5.5e-3 for every type on Gaussian data); embedding rows are bit-exact.
"""

import logging

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

import ferrum_mps.ops  # noqa: F401  (registers the ops)
from ferrum_mps import native, quants

pytestmark = pytest.mark.native  # conftest runs every other test on the exact float path

TYPES = sorted(native.QTYPES, key=int)
REL_TOL = 2e-2


def _raw(qt, rows, cols, seed=0):
    """GGML bytes of a [rows, cols] weight: quantized Gaussians, or random blocks with sane fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    try:
        return quants.quantize(torch.randn(rows, cols, generator=g), qt).reshape(-1)
    except quants.UnsupportedQuantization:
        pass
    block, size = GGML_QUANT_SIZES[qt]
    b = torch.randint(0, 256, (rows * cols // block, size), generator=g, dtype=torch.uint8)
    half = torch.tensor([0.01, 0.02], dtype=torch.float16).view(torch.uint8)
    scale_at = {Q.Q2_K: (80, 82), Q.Q3_K: (108,)}[qt]  # d (and dmin) of the block
    for off in scale_at:
        b[:, off : off + 2] = half[:2]
    return b.reshape(-1)


def _gguf_weight(raw, qt, rows, cols):
    return torch.from_numpy(gguf_dequantize(raw.view(rows, -1).numpy(), qt).reshape(rows, cols).astype(np.float32))


def test_native_library_loads():
    assert native.available(), native.status()["why"]
    assert native.status()["isa"] in native.isa_levels()


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 5])
def test_qlinear_native_vs_float_reference(qt, m):
    n, k = 40, 512
    raw = _raw(qt, n, k)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(1))
    y = torch.ops.ferrum.qlinear(x, raw, int(qt), n, k)
    with native.disabled():
        ref = torch.ops.ferrum.qlinear(x, raw, int(qt), n, k)
    gguf_ref = x @ _gguf_weight(raw, qt, n, k).T
    assert y.shape == (2, m, n) and y.dtype == torch.float32
    assert _rel(y, gguf_ref) <= REL_TOL
    assert _rel(y, ref) <= REL_TOL
    assert _rel(ref, gguf_ref) < 1e-5  # the switch really ran the float path


def test_qlinear_native_dtypes_threads_and_opcheck():
    qt, n, k = Q.Q4_K, 300, 256
    raw = _raw(qt, n, k)
    x = torch.randn(3, k)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.ferrum.qlinear(x, raw, int(qt), n, k)
        torch.set_num_threads(2)
        two = torch.ops.ferrum.qlinear(x, raw, int(qt), n, k)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # every output is one task's: no thread-count dependence
    # Same accumulation order on every path: a row's result does not depend on the batch (decode == prefill).
    # m = 1 runs the fused in-place kernels (Q8_0/Q5_0/Q4_K/Q6_K on AVX2), m = 2-3 the fused multi-row
    # ones (Q4_K/Q6_K) or the unpacked single-row path, 6 rows the unpacked 4-row block (rows 0-3) and
    # single-row (4-5) paths.
    x6 = torch.randn(6, k)
    for q in (Q.Q4_K, Q.Q8_0, Q.Q5_0, Q.Q6_K):
        r = _raw(q, n, k)
        assert torch.equal(torch.ops.ferrum.qlinear(x[1:2], r, int(q), n, k), torch.ops.ferrum.qlinear(x, r, int(q), n, k)[1:2])
        assert torch.equal(torch.ops.ferrum.qlinear(x[1:2], r, int(q), n, k), torch.ops.ferrum.qlinear(x[:2], r, int(q), n, k)[1:2])
        six = torch.ops.ferrum.qlinear(x6, r, int(q), n, k)
        assert torch.equal(torch.ops.ferrum.qlinear(x6[5:], r, int(q), n, k), six[5:])
        assert torch.equal(torch.ops.ferrum.qlinear(x6[2:3], r, int(q), n, k), six[2:3])
        assert torch.equal(torch.ops.ferrum.qlinear(x6[:4], r, int(q), n, k)[2:3], six[2:3])  # Q4_K: fused 4 rows
    for dt in (torch.float16, torch.bfloat16):
        y = torch.ops.ferrum.qlinear(x.to(dt), raw, int(qt), n, k)
        assert y.dtype == dt and _rel(y.float(), one) < 1e-2
    torch.library.opcheck(torch.ops.ferrum.qlinear.default, (x, raw, int(qt), n, k))


def test_qlinear_native_q8_0_lm_head_shape():
    # Gemma's output projection is Q8_0 with many rows: the in-place Q8_0 path, multi-threaded.
    qt, n, k = Q.Q8_0, 5000, 640
    raw = _raw(qt, n, k, seed=3)
    x = torch.randn(1, k)
    y = torch.ops.ferrum.qlinear(x, raw, int(qt), n, k)
    assert _rel(y, x @ _gguf_weight(raw, qt, n, k).T) <= REL_TOL


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_qembedding_native_bit_exact(qt):
    rows, dim = 12, 256
    raw = _raw(qt, rows, dim)
    ids = torch.tensor([[3, 0, 11], [3, 7, 7]])
    y = torch.ops.ferrum.qembedding(ids, raw, int(qt), dim)
    assert torch.equal(y, _gguf_weight(raw, qt, rows, dim)[ids])


@pytest.fixture(scope="module")
def experts():
    E, H, inter = 6, 256, 256
    stack = lambda qt, o, i, s: torch.stack([_raw(qt, o, i, seed=s + e).view(o, -1) for e in range(E)])  # noqa: E731
    return E, H, inter, stack(Q.Q4_K, inter, H, 10), stack(Q.Q4_K, inter, H, 20), stack(Q.Q6_K, H, inter, 30)


@pytest.mark.parametrize("T", [1, 9])
def test_moe_native_vs_float_reference(experts, T):
    E, H, inter, gate, up, down = experts
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g)
    w, ids = torch.ops.ferrum.moe_route(torch.randn(T, E, generator=g), 3, True)
    args = (x, w, ids, gate, up, down, int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), inter)
    y = torch.ops.ferrum.moe_ffn(*args)
    q = torch.ops.ferrum.moe_qlinear(x, ids, gate, int(Q.Q4_K), inter, H)
    xs = torch.randn(T, 3, inter, generator=g)  # per-slot activations (the down projection's form)
    d = torch.ops.ferrum.moe_qlinear(xs, ids.long(), down, int(Q.Q6_K), H, inter)
    with native.disabled():
        y_ref = torch.ops.ferrum.moe_ffn(*args)
        q_ref = torch.ops.ferrum.moe_qlinear(x, ids, gate, int(Q.Q4_K), inter, H)
        d_ref = torch.ops.ferrum.moe_qlinear(xs, ids.long(), down, int(Q.Q6_K), H, inter)
    assert y.shape == y_ref.shape and _rel(y, y_ref) <= REL_TOL
    assert q.shape == q_ref.shape and _rel(q, q_ref) <= REL_TOL
    assert d.shape == d_ref.shape and _rel(d, d_ref) <= REL_TOL
    torch.library.opcheck(torch.ops.ferrum.moe_ffn.default, args)


def test_moe_native_no_expert_pairs_contribute_nothing(experts):
    E, H, inter, gate, up, down = experts
    x = torch.randn(2, H)
    ids = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int32)  # -1: moe_route's NO_EXPERT
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = torch.ops.ferrum.moe_qlinear(x, ids, gate, int(Q.Q4_K), inter, H)
    f = torch.ops.ferrum.moe_ffn(x, w, ids, gate, up, down, int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), inter)
    with native.disabled():
        f_ref = torch.ops.ferrum.moe_ffn(x, w, ids, gate, up, down, int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), inter)
    assert torch.equal(y[0, 1], torch.zeros(inter)) and torch.equal(y[1], torch.zeros(2, inter))
    assert _rel(y[0, 0], x[0] @ _gguf_weight(gate[1].reshape(-1), Q.Q4_K, inter, H).T) <= REL_TOL
    assert torch.equal(f[1], torch.zeros(H)) and _rel(f, f_ref) <= REL_TOL


def test_moe_native_bad_ids_still_raise(experts):
    E, H, inter, gate, _, _ = experts
    with pytest.raises(ValueError, match="expert ids"):
        torch.ops.ferrum.moe_qlinear(torch.randn(1, H), torch.tensor([[0, E]]), gate, int(Q.Q4_K), inter, H)


@pytest.mark.parametrize("qt", [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_portable_build_matches_the_simd_build(qt):
    # The lowest level (no AVX2 on x86; the code an arm64 CPU runs) is plain C++: same
    # arithmetic in the same order, so it matches the loaded library to float rounding.
    # m = 1 runs the fused in-place kernels on AVX2; m = 5 the unpacked 4-row and 1-row ones.
    lowest = native.isa_levels()[-1]
    lib = native.library_for(lowest)
    n, k = 24, 512
    raw = _raw(qt, n, k)
    for m in (1, 5):
        x = torch.randn(m, k)
        out = torch.empty(m, n)
        assert lib.fm_qmatmul(int(qt), raw.data_ptr(), n, k, x.data_ptr(), m, out.data_ptr(), 2) == 0
        assert _rel(out, x @ _gguf_weight(raw, qt, n, k).T) <= REL_TOL
        torch.testing.assert_close(out, torch.ops.ferrum.qlinear(x, raw, int(qt), n, k), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not {"x86-64-v4", "x86-64-v3"} <= set(native.isa_levels()),
                    reason="needs an x86-64 CPU with AVX-512 (x86-64-v4)")
@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_avx512_and_avx2_builds_agree_bit_for_bit(qt):
    # K-quants: the AVX-512 kernels fold their 16 int32 lanes into the AVX2 code's 8 (exact integers)
    # before the same float steps; the other types run the same AVX2 code in both builds.
    v4, v3 = (native.library_for(i) for i in ("x86-64-v4", "x86-64-v3"))
    n, k = 24, 1024
    raw = _raw(qt, n, k)
    for m in (1, 2, 5):
        x = torch.randn(m, k)
        outs = [torch.empty(m, n), torch.empty(m, n)]
        for lib, out in zip((v4, v3), outs):
            assert lib.fm_qmatmul(int(qt), raw.data_ptr(), n, k, x.data_ptr(), m, out.data_ptr(), 2) == 0
        assert torch.equal(outs[0], outs[1])
        assert _rel(outs[0], x @ _gguf_weight(raw, qt, n, k).T) <= REL_TOL


def test_fallback_when_the_library_does_not_build(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "qkernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setattr(native, "_lib", {})
    qt, n, k = Q.Q5_0, 16, 64
    raw = _raw(qt, n, k)
    x = torch.randn(1, k)
    with caplog.at_level(logging.WARNING, logger="ferrum_mps.native"):
        y = torch.ops.ferrum.qlinear(x, raw, int(qt), n, k)
    assert not native.available() and "failed" in native.status()["why"]
    assert any("native CPU kernels unavailable" in r.getMessage() for r in caplog.records)
    assert torch.allclose(y, x @ _gguf_weight(raw, qt, n, k).T, rtol=1e-5, atol=1e-5)


def _rope_ref(x, pos, inv_freq, interleaved):
    """Independent double-precision RoPE of x [..., D] at one position."""
    f = pos * inv_freq.double()
    c, s = f.cos(), f.sin()
    x = x.double()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_cache_native_decode_token(interleaved, norm):
    # One float32 decode token runs fm_qk_norm_rope_cache; compared with a double reference written
    # here (per-head RMSNorm, RoPE, cache slot write) and with the torch path of the op.
    Hq, Hkv, D, S, pos, slot, eps = 4, 2, 64, 16, 50, 9, 1e-6
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    qw, kw = (torch.randn(D, generator=g) if norm else None for _ in range(2))
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    kc, vc = torch.randn(1, Hkv, S, D, generator=g), torch.randn(1, Hkv, S, D, generator=g)
    kc0, vc0 = kc.clone(), vc.clone()
    args = (q, k, v, qw, kw, eps, inv, torch.tensor([[pos]]), interleaved)
    y = torch.ops.ferrum.qk_norm_rope_cache(*args, kc, vc, torch.tensor([slot]))
    rms = lambda x, w: x.double() * (x.double().pow(2).mean(-1, keepdim=True) + eps).rsqrt() * w.double() if norm else x  # noqa: E731
    torch.testing.assert_close(y, _rope_ref(rms(q, qw), pos, inv, interleaved).transpose(1, 2).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[:, :, slot], _rope_ref(rms(k, kw), pos, inv, interleaved)[:, 0].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(vc[:, :, slot], v[:, 0])
    others = [i for i in range(S) if i != slot]
    assert torch.equal(kc[:, :, others], kc0[:, :, others]) and torch.equal(vc[:, :, others], vc0[:, :, others])
    kc2, vc2 = kc0.clone(), vc0.clone()
    with native.disabled():
        ref = torch.ops.ferrum.qk_norm_rope_cache(*args, kc2, vc2, torch.tensor([slot]))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, kc2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre", [False, True])
def test_add_rms_norm_native(pre):
    # float32 rows run fm_add_rms_norm; against a double reference written here and the torch path.
    g = torch.Generator().manual_seed(11)
    x, r = torch.randn(2, 3, 640, generator=g), torch.randn(2, 3, 640, generator=g)
    w, pw, eps = torch.randn(640, generator=g), torch.randn(640, generator=g) if pre else None, 1e-6
    rms = lambda v, g_: g_.double() * (v * (v.pow(2).mean(-1, keepdim=True) + eps).rsqrt())  # noqa: E731
    s_ref = r.double() + (rms(x.double(), pw) if pre else x.double())
    normed, s = torch.ops.ferrum.add_rms_norm(x, r, w, eps, pw)
    torch.testing.assert_close(s, s_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed, rms(s_ref, w).float(), rtol=1e-5, atol=1e-5)
    with native.disabled():
        ref = torch.ops.ferrum.add_rms_norm(x, r, w, eps, pw)
    torch.testing.assert_close(normed, ref[0], rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.ferrum.add_rms_norm.default, (x, r, w, eps, pw))


@pytest.mark.native
def test_disabled_is_per_thread_and_set_enabled_is_process_wide():
    import threading

    seen = {}

    def probe(name):
        seen[name] = native.enabled()

    assert native.enabled()
    with native.disabled():
        assert not native.enabled()
        t = threading.Thread(target=probe, args=("inside",))
        t.start(), t.join()
    assert native.enabled() and seen["inside"]  # another thread (a server's model thread) kept the kernels
    before = native.set_enabled(False)
    try:
        t = threading.Thread(target=probe, args=("off",))
        t.start(), t.join()
        assert before is True and not native.enabled() and not seen["off"]
    finally:
        native.set_enabled(before)
