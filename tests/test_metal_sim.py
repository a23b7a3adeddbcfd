"""Self-tests of the Metal-on-CPU harness: Metal semantics, calling convention, checks.

References are independent: torch on the same inputs, or values computed in Python
from the documented Metal rules (dispatchThreads grids, shuffle lane arithmetic).
"""

import pytest
import torch

from ferrum_mps.testing.metal_sim import MetalSimError, compile_shader

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"

# ---------------------------------------------------------------------------------------
# Calling convention and built-ins

CONV = HEADER + r"""
kernel void axpb(device float* out [[buffer(0)]], device const float* x [[buffer(1)]],
                 constant float& a [[buffer(2)]], constant long& b [[buffer(3)]],
                 constant long& n [[buffer(4)]], uint i [[thread_position_in_grid]]) {
    if (i < n) out[i] = a * x[i] + float(b);
}
kernel void narrow(device int* out, constant int& v, constant half& h, constant short& s,
                   uint i [[thread_position_in_grid]]) {
    out[0] = v; out[1] = int(float(h) * 4.0); out[2] = s;
}
kernel void lists(device float* out, constant long* il, constant float* fl, uint i [[thread_position_in_grid]]) {
    out[i] = float(il[i]) + fl[i];
}
kernel void pos(device uint* o, uint3 tpig [[thread_position_in_grid]], ushort3 tpitg [[thread_position_in_threadgroup]],
                uint3 tgpig [[threadgroup_position_in_grid]], uint3 tptg [[threads_per_threadgroup]],
                uint3 tgpg [[threadgroups_per_grid]], uint tiitg [[thread_index_in_threadgroup]],
                ushort lane [[thread_index_in_simdgroup]], ushort sg [[simdgroup_index_in_threadgroup]],
                uint3 tpg [[threads_per_grid]], uint w [[threads_per_simdgroup]], uint nsg [[simdgroups_per_threadgroup]]) {
    uint id = tpig.x + tpig.y * tpg.x + tpig.z * tpg.x * tpg.y;
    device uint* r = o + id * 16;
    r[0] = tpig.x; r[1] = tpig.y; r[2] = tpig.z;
    r[3] = tpitg.x; r[4] = tpitg.y; r[5] = tpitg.z;
    r[6] = tgpig.x; r[7] = tgpig.y; r[8] = tgpig.z;
    r[9] = tptg.x * 10000 + tptg.y * 100 + tptg.z;
    r[10] = tgpg.x * 10000 + tgpg.y * 100 + tgpg.z;
    r[11] = tiitg; r[12] = lane; r[13] = sg; r[14] = w; r[15] = nsg;
}
template <typename T>
kernel void scale(device T* x [[buffer(0)]], constant float& f [[buffer(1)]], uint i [[thread_position_in_grid]]) {
    x[i] = T(float(x[i]) * f);
}
#define SCALE(name, T) template [[host_name("scale_" #name)]] kernel void scale<T>(device T*, constant float&, uint);
SCALE(f32, float)
SCALE(f16, half)
"""


@pytest.fixture(scope="module")
def conv():
    return compile_shader(CONV)


def test_scalars_and_partial_group(conv):
    x = torch.randn(1000)
    out = torch.full((1000,), -7.0)
    conv.axpb(out, x, 2.5, 3, 1000, threads=1000, group_size=256)  # last group has 232 threads
    torch.testing.assert_close(out, 2.5 * x + 3.0)


def test_tensor_bound_at_storage_offset(conv):
    base = torch.randn(64)
    out = torch.zeros(80)
    conv.axpb(out[16:], base[8:], 1.0, 0, 56, threads=56, group_size=32)
    assert torch.equal(out[:16], torch.zeros(16))
    assert torch.equal(out[16:72], base[8:])
    assert torch.equal(out[72:], torch.zeros(8))


def test_arg_casts_and_lists(conv):
    o = torch.zeros(3, dtype=torch.int32)
    conv.narrow(o, -123456, 1.75, -3, threads=1, group_size=1, arg_casts={1: "int32", 2: "fp16", 3: "int16"})
    assert o.tolist() == [-123456, 7, -3]
    out = torch.zeros(3)
    conv.lists(out, [1, 2, 3], [0.5, 0.25, 0.125], threads=3, group_size=3)
    assert out.tolist() == [1.5, 2.25, 3.125]


@pytest.mark.parametrize("threads,group", [([37, 5, 3], [8, 4, 2]), ([100], [64]), ([33, 2], [32, 1])])
def test_thread_position_builtins(conv, threads, group):
    t3 = threads + [1] * (3 - len(threads))
    g3 = group + [1] * (3 - len(group))
    n = t3[0] * t3[1] * t3[2]
    o = torch.full((n * 16,), 0xFFFFFFFF, dtype=torch.int64).to(torch.int32)
    conv.pos(o, threads=threads, group_size=group)
    got = o.view(n, 16).tolist()
    ngroups = [(t + g - 1) // g for t, g in zip(t3, g3)]
    for z in range(t3[2]):
        for y in range(t3[1]):
            for x in range(t3[0]):
                gid = [x // g3[0], y // g3[1], z // g3[2]]
                loc = [x % g3[0], y % g3[1], z % g3[2]]
                size = [min(g, t - gi * g) for g, t, gi in zip(g3, t3, gid)]  # partial edge groups
                tiitg = loc[0] + loc[1] * size[0] + loc[2] * size[0] * size[1]
                nthreads = size[0] * size[1] * size[2]
                want = [x, y, z, *loc, *gid, size[0] * 10000 + size[1] * 100 + size[2],
                        ngroups[0] * 10000 + ngroups[1] * 100 + ngroups[2],
                        tiitg, tiitg % 32, tiitg // 32, 32, (nthreads + 31) // 32]
                assert got[x + y * t3[0] + z * t3[0] * t3[1]] == want, (x, y, z)


def test_templated_host_name_kernels(conv):
    x = torch.randn(64)
    want = x * 0.3
    conv.scale_f32(x, 0.3, threads=64, group_size=64)
    torch.testing.assert_close(x, want)
    h = torch.randn(64).half()
    want = (h.float() * 0.3).half()
    conv.scale_f16(h, 0.3, threads=64, group_size=64)
    assert torch.equal(h, want)
    with pytest.raises(AttributeError, match="no kernel named 'scale'"):
        conv.scale


def test_calling_convention_errors(conv):
    x, out = torch.randn(8), torch.zeros(8)
    ok = dict(threads=8, group_size=8)
    with pytest.raises(ValueError, match="not contiguous"):
        conv.axpb(out, torch.randn(8, 2)[:, 0], 1.0, 0, 8, **ok)
    with pytest.raises(TypeError, match="constant float& a"):
        conv.axpb(out, x, 1, 0, 8, **ok)  # int where the kernel reads a float
    with pytest.raises(TypeError, match="constant long& b"):
        conv.axpb(out, x, 1.0, 0.5, 8, **ok)  # float where the kernel reads an integer
    with pytest.raises(TypeError, match="constant int& v"):
        conv.narrow(torch.zeros(3, dtype=torch.int32), 5, 1.0, 1, threads=1, group_size=1,
                    arg_casts={2: "fp16", 3: "int16"})  # int64 into a 4-byte int
    with pytest.raises(TypeError, match="scalar reference"):
        conv.axpb(out, x, torch.ones(1), 0, 8, **ok)
    with pytest.raises(TypeError, match="pointer"):
        conv.axpb(out, 1.0, 1.0, 0, 8, **ok)
    with pytest.raises(TypeError, match="torch.float16 tensor"):
        conv.axpb(out, x.half(), 1.0, 0, 8, **ok)
    with pytest.raises(ValueError, match="1024"):
        conv.axpb(out, x, 1.0, 0, 8, threads=2048, group_size=2048)
    with pytest.raises(ValueError, match="takes 5 buffer arguments"):
        conv.axpb(out, x, 1.0, 0, **ok)
    with pytest.raises(ValueError, match="group_size"):
        conv.axpb(out, x, 1.0, 0, 8, threads=8)
    with pytest.raises(ValueError, match="rank"):
        conv.axpb(out, x, 1.0, 0, 8, threads=[8, 1], group_size=8)
    assert torch.equal(out, torch.zeros(8))  # nothing ran


# ---------------------------------------------------------------------------------------
# simdgroup functions, divergence, barriers, threadgroup memory

SIMD = HEADER + r"""
kernel void reduce(device const float* x, device float* o, uint i [[thread_position_in_grid]]) {
    float v = x[i];
    o[i * 6 + 0] = simd_sum(v);
    o[i * 6 + 1] = simd_max(v);
    o[i * 6 + 2] = simd_min(v);
    o[i * 6 + 3] = simd_prefix_inclusive_sum(v);
    o[i * 6 + 4] = simd_prefix_exclusive_sum(v);
    o[i * 6 + 5] = float(simd_sum(int(x[i] * 100.0f)));
}
kernel void shuffles(device const float* x, device float* o, constant uint& d,
                     uint i [[thread_position_in_grid]], ushort lane [[thread_index_in_simdgroup]]) {
    float v = x[i];
    o[i * 6 + 0] = simd_shuffle_down(v, d);
    o[i * 6 + 1] = simd_shuffle_up(v, d);
    o[i * 6 + 2] = simd_shuffle_xor(v, d);
    o[i * 6 + 3] = simd_broadcast(v, d);
    o[i * 6 + 4] = simd_shuffle(v, ushort((lane * 7) % 32));
    float4 w = float4(v, v + 1, v + 2, v + 3);
    o[i * 6 + 5] = simd_shuffle_xor(w, d).w;
}
static float count_in_helper(float v) { return simd_sum(v); }
kernel void diverge(device float* o, uint i [[thread_position_in_grid]], ushort lane [[thread_index_in_simdgroup]]) {
    if (lane % 3 == 0) return;                        // exited lanes are inactive
    float a;
    if (lane < 10) a = simd_sum(1.0f);                // each branch: its own active set
    else a = simd_sum(100.0f);
    float b = 0;
    for (uint k = 0; k < lane; k++) b = simd_sum(1.0f);   // lanes leave the loop one by one
    float c = count_in_helper(1.0f);                  // all surviving lanes again, through a helper
    o[i * 3 + 0] = a; o[i * 3 + 1] = b; o[i * 3 + 2] = c;
}
kernel void tg_reduce(device const float* x, device float* o, constant long& n,
                      uint2 tg [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                      ushort lane [[thread_index_in_simdgroup]], ushort sg [[simdgroup_index_in_threadgroup]],
                      ushort nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float part[32];
    float s = 0;
    for (long c = tid; c < n; c += 256) s += x[tg.y * n + c];
    s = simd_sum(s);
    if (lane == 0) part[sg] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float v = lane < nsg ? part[lane] : 0.0f;
        v = simd_sum(v);
        if (lane == 0) o[tg.y] = v;
    }
}
kernel void uninit(device float* o, uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float buf[64];
    if (tid % 2 == 0) buf[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    o[tid] = buf[tid ^ 1];
}
kernel void bad_barrier_branch(device float* o, uint tid [[thread_index_in_threadgroup]]) {
    if (tid < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); o[tid] = 1; }
    else { threadgroup_barrier(mem_flags::mem_threadgroup); o[tid] = 2; }
}
kernel void bad_barrier_exit(device float* o, uint tid [[thread_index_in_threadgroup]]) {
    if (tid == 5) return;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    o[tid] = 1;
}
kernel void bad_barrier_trips(device float* o, uint tid [[thread_index_in_threadgroup]]) {
    for (uint k = 0; k < 1 + tid / 32; k++) threadgroup_barrier(mem_flags::mem_threadgroup);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    o[tid] = 1;
}
kernel void atomics(device atomic_uint* hist, device const uint* v, device float* o,
                    uint i [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                    uint2 tg [[threadgroup_position_in_grid]]) {
    threadgroup atomic_int count;
    if (tid == 0) atomic_store_explicit(&count, 0, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    atomic_fetch_add_explicit(&hist[v[i]], 1u, memory_order_relaxed);
    atomic_fetch_add_explicit(&count, int(v[i]), memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) o[tg.x] = float(atomic_load_explicit(&count, memory_order_relaxed));
}
"""


@pytest.fixture(scope="module")
def simd():
    return compile_shader(SIMD)


def test_simd_reductions_and_prefix(simd):
    x = torch.randn(96)  # 3 simdgroups, the last one partial in a group of 80
    o = torch.zeros(96 * 6)
    simd.reduce(x[:80].contiguous(), o[: 80 * 6], threads=80, group_size=80)
    o = o[: 80 * 6].view(80, 6)
    for lo, hi in ((0, 32), (32, 64), (64, 80)):
        seg = x[lo:hi]
        torch.testing.assert_close(o[lo:hi, 0], seg.sum().expand(hi - lo), rtol=1e-5, atol=1e-5)
        assert torch.equal(o[lo:hi, 1], seg.max().expand(hi - lo))
        assert torch.equal(o[lo:hi, 2], seg.min().expand(hi - lo))
        torch.testing.assert_close(o[lo:hi, 3], seg.cumsum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[lo:hi, 4], seg.cumsum(0) - seg, rtol=1e-5, atol=1e-5)
        assert torch.equal(o[lo:hi, 5], (seg * 100).to(torch.int32).sum().float().expand(hi - lo))


@pytest.mark.parametrize("d", [1, 5, 16])
def test_simd_shuffles(simd, d):
    x = torch.randn(64)
    o = torch.zeros(64 * 6)
    simd.shuffles(x, o, d, threads=64, group_size=64, arg_casts={2: "int32"})
    o = o.view(64, 6)
    for i in range(64):
        lane, base = i % 32, i - i % 32
        assert o[i, 0] == x[base + lane + d if lane + d < 32 else i]  # upper lanes keep their value
        assert o[i, 1] == x[base + lane - d if lane >= d else i]
        assert o[i, 2] == x[base + (lane ^ d)]
        assert o[i, 3] == x[base + d]
        assert o[i, 4] == x[base + (lane * 7) % 32]
        assert o[i, 5] == x[base + (lane ^ d)] + 3


def test_simd_active_lanes_follow_divergence(simd):
    o = torch.full((64 * 3,), -1.0)
    simd.diverge(o, threads=64, group_size=64)
    o = o.view(64, 3)
    alive = [lane for lane in range(32) if lane % 3 != 0]
    low = [lane for lane in alive if lane < 10]
    for i in range(64):
        lane = i % 32
        if lane % 3 == 0:
            assert o[i].tolist() == [-1, -1, -1]
            continue
        a = len(low) if lane < 10 else 100.0 * (len(alive) - len(low))
        # trip k of the loop runs with the lanes whose lane > k; the last trip of `lane` is k = lane - 1
        b = 0 if lane == 0 else sum(1 for other in alive if other > lane - 1)
        assert o[i].tolist() == [a, b, len(alive)], lane


def test_threadgroup_reduction_with_barrier(simd):
    x = torch.randn(3, 1000)
    o = torch.zeros(3)
    simd.tg_reduce(x, o, 1000, threads=[256, 3], group_size=[256, 1])
    torch.testing.assert_close(o, x.sum(1), rtol=1e-5, atol=1e-4)
    o2 = torch.zeros(3)
    simd.tg_reduce(x, o2, 1000, threads=[96, 3], group_size=[96, 1])  # 3 simdgroups: part[3..] poisoned, unread
    assert not torch.isnan(o2).any()


def test_uninitialised_threadgroup_memory_is_poison(simd):
    o = torch.zeros(64)
    simd.uninit(o, threads=64, group_size=64)
    assert torch.equal(o[1::2], torch.ones(32))
    assert torch.isnan(o[0::2]).all()


@pytest.mark.parametrize(
    "name,match",
    [
        ("bad_barrier_branch", "different threadgroup_barriers"),
        ("bad_barrier_exit", "returned while"),
        ("bad_barrier_trips", "different threadgroup_barriers"),
    ],
)
def test_barrier_misuse_raises(simd, name, match):
    o = torch.zeros(64)
    with pytest.raises(MetalSimError, match=match) as e:
        getattr(simd, name)(o, threads=64, group_size=64)
    assert name in str(e.value) and "thread_position_in_grid" in str(e.value)


def test_atomics_device_and_threadgroup(simd):
    v = torch.randint(0, 10, (300,), dtype=torch.int32)
    hist = torch.zeros(10, dtype=torch.int32)
    o = torch.zeros(3)
    simd.atomics(hist, v, o, threads=300, group_size=128)
    assert torch.equal(hist, torch.bincount(v, minlength=10).to(torch.int32))
    want = [v[0:128].sum(), v[128:256].sum(), v[256:].sum()]
    assert o.tolist() == [float(w) for w in want]


# ---------------------------------------------------------------------------------------
# Numerics: half rounding, vector casts, math, simdgroup matrices

NUM = HEADER + r"""
kernel void half_ops(device const half* a, device const half* b, device const half* c, device half* o,
                     uint i [[thread_position_in_grid]]) {
    half x = a[i] * b[i];
    half y = x + c[i];
    o[i * 3 + 0] = y;
    o[i * 3 + 1] = a[i] / b[i];
    half2 v = half2(a[i], b[i]) * 0.1h;
    o[i * 3 + 2] = v.x - v.y;
}
kernel void casts(device const int4* v, device float4* o, device int4* bits, uint i [[thread_position_in_grid]]) {
    int4 x = v[i];
    o[i * 4 + 0] = float4(x);
    o[i * 4 + 1] = (float4)x + 0.5;
    o[i * 4 + 2] = float4(float2(x.xy), x.z, 1);
    o[i * 4 + 3] = float4(half4(float4(x) * 0.001f));
    bits[i] = as_type<int4>(float4(x));
    uchar4 u = uchar4(x & 0xff);
    bits[i].x += int(u.w);
    bits[i].y += int(dot(float4(x > 0), float4(1000)));  // a comparison converts to 1/0, not -1/0
}
kernel void math(device const float* x, device float* o, uint i [[thread_position_in_grid]]) {
    float v = x[i];
    o[i * 8 + 0] = exp(v);
    o[i * 8 + 1] = rsqrt(fabs(v) + 1);
    o[i * 8 + 2] = tanh(v);
    o[i * 8 + 3] = fma(v, 2.0, 1.0);
    o[i * 8 + 4] = clamp(v, -0.5, 0.5);
    o[i * 8 + 5] = dot(float4(v), float4(1, 2, 3, 4));
    o[i * 8 + 6] = select(1.0f, 2.0f, v > 0);
    o[i * 8 + 7] = fmax(0, float2(v, -v)).y;
}
template <typename T>
kernel void gemm(device const T* A, device const T* B, device float* C, constant long& M, constant long& N,
                 constant long& K, uint2 tg [[threadgroup_position_in_grid]], ushort sg [[simdgroup_index_in_threadgroup]],
                 uint tid [[thread_index_in_threadgroup]]) {
    // One 16x16 tile per group of 4 simdgroups, each owning an 8x8 quarter; K in steps of 8.
    threadgroup T ta[16 * 8];
    threadgroup T tb[8 * 16];
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    uint r0 = tg.y * 16, c0 = tg.x * 16, sr = (sg / 2) * 8, sc = (sg % 2) * 8;
    for (long k0 = 0; k0 < K; k0 += 8) {
        for (uint e = tid; e < 128; e += 128) {
            uint r = e / 8, c = e % 8;
            ta[e] = (r0 + r < M && k0 + c < K) ? A[(r0 + r) * K + k0 + c] : T(0);
            uint rb = e / 16, cb = e % 16;
            tb[e] = (k0 + rb < K && c0 + cb < N) ? B[(k0 + rb) * N + c0 + cb] : T(0);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_matrix<T, 8, 8> a, b;
        simdgroup_load(a, ta, 8, ulong2(0, sr));
        simdgroup_load(b, tb, 16, ulong2(sc, 0));
        simdgroup_multiply_accumulate(acc, a, b, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    threadgroup float out[16 * 16];
    simdgroup_store(acc, out, 16, ulong2(sc, sr));
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = tid; e < 256; e += 128) {
        uint r = e / 16, c = e % 16;
        if (r0 + r < M && c0 + c < N) C[(r0 + r) * N + c0 + c] = out[e];
    }
}
kernel void bf16_ops(device const bfloat* a, device const bfloat* b, device bfloat* o, uint i [[thread_position_in_grid]]) {
    o[i * 2 + 0] = a[i] * b[i] + a[i];
    o[i * 2 + 1] = bfloat(float(a[i]) * 3.0f);
}
kernel void votes(device uint* o, device const packed_float3* p, uint i [[thread_position_in_grid]],
                  ushort lane [[thread_index_in_simdgroup]]) {
    simd_vote v = simd_ballot(lane % 5 == 0);
    o[i * 4 + 0] = uint(ulong(v));
    o[i * 4 + 1] = quad_sum(uint(lane));
    o[i * 4 + 2] = simd_is_first() ? 1u : 0u;
    float3 q = p[i];
    o[i * 4 + 3] = uint(q.x + q.y * 10 + q.z * 100);
}
template [[host_name("gemm_f32")]] kernel void gemm<float>(device const float*, device const float*, device float*,
    constant long&, constant long&, constant long&, uint2, ushort, uint);
template [[host_name("gemm_f16")]] kernel void gemm<half>(device const half*, device const half*, device float*,
    constant long&, constant long&, constant long&, uint2, ushort, uint);
"""


@pytest.fixture(scope="module")
def num():
    return compile_shader(NUM)


def test_half_rounds_after_every_operation(num):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4096, generator=g).half() for _ in range(3))
    o = torch.zeros(4096 * 3, dtype=torch.half)
    num.half_ops(a, b, c, o, threads=4096, group_size=256)
    o = o.view(4096, 3)
    assert torch.equal(o[:, 0], a * b + c)  # torch CPU half rounds each op: exact match
    assert torch.equal(o[:, 1], a / b)
    tenth = torch.tensor(0.1).half()
    assert torch.equal(o[:, 2], a * tenth - b * tenth)


def test_vector_casts_convert(num):
    v = torch.randint(-1000, 1000, (16, 4), dtype=torch.int32)
    o = torch.zeros(16 * 4, 4)
    bits = torch.zeros(16, 4, dtype=torch.int32)
    num.casts(v, o, bits, threads=16, group_size=16)
    o = o.view(16, 4, 4)
    f = v.float()
    assert torch.equal(o[:, 0], f)  # float4(int4) converts (a bitcast would give denormals)
    assert torch.equal(o[:, 1], f + 0.5)  # so does the C-style cast
    want2 = f.clone()
    want2[:, 3] = 1
    assert torch.equal(o[:, 2], want2)
    assert torch.equal(o[:, 3], (f * 0.001).half().float())
    want_bits = f.view(torch.int32).clone()
    want_bits[:, 0] += (v[:, 3] & 0xFF)
    want_bits[:, 1] += 1000 * (v > 0).sum(1).to(torch.int32)
    assert torch.equal(bits, want_bits)  # as_type reinterprets


def test_math_functions(num):
    x = torch.linspace(-3, 3, 64)
    o = torch.zeros(64 * 8)
    num.math(x, o, threads=64, group_size=64)
    o = o.view(64, 8)
    torch.testing.assert_close(o[:, 0], x.exp())
    torch.testing.assert_close(o[:, 1], torch.rsqrt(x.abs() + 1))
    torch.testing.assert_close(o[:, 2], x.tanh())
    torch.testing.assert_close(o[:, 3], x * 2 + 1)
    torch.testing.assert_close(o[:, 4], x.clamp(-0.5, 0.5))
    torch.testing.assert_close(o[:, 5], x * 10)
    assert torch.equal(o[:, 6], torch.where(x > 0, 2.0, 1.0))
    torch.testing.assert_close(o[:, 7], (-x).clamp(min=0))


def test_bfloat_rounds_like_torch(num):
    a, b = torch.randn(256).bfloat16(), torch.randn(256).bfloat16()
    o = torch.zeros(512, dtype=torch.bfloat16)
    num.bf16_ops(a, b, o, threads=256, group_size=128)
    assert torch.equal(o[0::2], a * b + a)
    assert torch.equal(o[1::2], (a.float() * 3).bfloat16())


def test_ballot_quad_and_packed3(num):
    import numpy as np

    p = torch.arange(48 * 3, dtype=torch.float32).remainder(7).view(48, 3)
    o = torch.zeros(48 * 4, dtype=torch.int32)
    num.votes(o, p, threads=np.int64(48), group_size=[np.int32(48)])  # numpy ints are accepted
    o = o.view(48, 4)
    first = sum(1 << lane for lane in range(0, 32, 5))
    second = sum(1 << lane for lane in range(0, 16, 5))  # 16 lanes in the partial simdgroup
    assert o[:32, 0].tolist() == [first] * 32 and o[32:, 0].tolist() == [second] * 16
    assert o[:, 1].tolist() == [4 * (i % 32 // 4) * 4 + 6 for i in range(48)]
    assert o[:, 2].tolist() == [1 if i % 32 == 0 else 0 for i in range(48)]
    assert o[:, 3].tolist() == (p[:, 0] + p[:, 1] * 10 + p[:, 2] * 100).int().tolist()


@pytest.mark.parametrize("dtype,name", [(torch.float32, "gemm_f32"), (torch.float16, "gemm_f16")])
def test_simdgroup_matrix_gemm(num, dtype, name):
    M, N, K = 37, 21, 29  # partial tiles on every edge
    g = torch.Generator().manual_seed(1)
    A = torch.randn(M, K, generator=g).to(dtype)
    B = torch.randn(K, N, generator=g).to(dtype)
    C = torch.full((M, N), float("nan"))
    getattr(num, name)(A, B, C, M, N, K, threads=[128 * 2, 3], group_size=[128, 1])
    torch.testing.assert_close(C, A.float() @ B.float(), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Checks a GPU never gives

BOUNDS = HEADER + r"""
kernel void oob_read(device const float* x [[buffer(0)]], device float* o [[buffer(1)]], constant long& n [[buffer(2)]],
                     uint i [[thread_position_in_grid]]) {
    o[i] = x[i + n];
}
kernel void oob_write(device float* o [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    o[i + 1] = 1.0f;
}
kernel void divide(device int* o, constant int& d, uint i [[thread_position_in_grid]]) {
    o[i] = 100 / (d - int(i));
}
kernel void tg_overflow(device float* o, constant long& n, uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float small[8];
    threadgroup float other[8];
    small[tid] = 1.0f;
    other[tid % 8] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    o[tid] = small[tid % 8] + other[tid % 8] + float(n);
}
"""


def test_out_of_bounds_access_raises_naming_kernel_thread_and_argument():
    lib = compile_shader(BOUNDS)
    x, o = torch.randn(64), torch.zeros(64)
    lib.oob_read(x, o, 0, threads=64, group_size=32)  # in bounds: fine
    assert torch.equal(o, x)
    with pytest.raises(MetalSimError) as e:
        lib.oob_read(x, o, 1, threads=64, group_size=32)
    msg = str(e.value)
    assert "oob_read" in msg and "argument 0" in msg and "x" in msg
    assert "thread_position_in_grid=(63,0,0)" in msg
    with pytest.raises(MetalSimError, match=r"argument 0 .*o.*thread_position_in_grid=\(63,0,0\)"):
        lib.oob_write(o, threads=64, group_size=64)
    view = torch.zeros(100)[10:74]  # past the end of the view, still inside its storage
    with pytest.raises(MetalSimError, match="past its end"):
        lib.oob_write(view, threads=64, group_size=64)
    r = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(MetalSimError, match=r"division by zero.*thread_position_in_grid=\(3,0,0\)"):
        lib.divide(r, 3, threads=8, group_size=8, arg_casts={1: "int32"})
    lib.oob_read(x, o, 0, threads=64, group_size=32)  # the process and the harness still work
    assert torch.equal(o, x)


def test_endless_loop_times_out():
    lib = compile_shader(HEADER + """
kernel void spin(device uint* o, constant uint& n, uint i [[thread_position_in_grid]]) {
    uint k = 0;
    while (k != n) k += 2;  // never equal for odd n
    o[i] = k;
}""", timeout=1)
    o = torch.zeros(1, dtype=torch.int32)
    lib.spin(o, 1000, threads=1, group_size=1, arg_casts={1: "int32"})
    assert o.item() == 1000
    with pytest.raises(MetalSimError, match="still running after 1 s"):
        lib.spin(o, 1001, threads=1, group_size=1, arg_casts={1: "int32"})


def test_threadgroup_overflow_is_caught():
    lib = compile_shader(BOUNDS)
    o = torch.zeros(9)
    lib.tg_overflow(o[:8], 0, threads=8, group_size=8)
    assert o[:8].tolist() == [3.0] * 8
    with pytest.raises(MetalSimError, match="past the end of threadgroup variable 'small'"):
        lib.tg_overflow(o, 0, threads=9, group_size=9)


ADDRESS_SPACES = HEADER + r"""
struct Block { half d; uchar qs[16]; };
static float first(threadgroup const float* p) { return p[0]; }
static float scale_of(const device Block& b) { return float(b.d); }
kernel void fine(device const Block* blocks, device float* o, uint i [[thread_position_in_grid]]) {
    threadgroup float t[4];
    t[i % 4] = 1;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    Block b = blocks[i];                   // copying a struct out of device memory is legal Metal
    o[i] = scale_of(blocks[i]) + float(b.qs[0]) + first(t);
}
"""


def test_address_space_check_accepts_legal_metal():
    lib = compile_shader(ADDRESS_SPACES)
    raw = torch.zeros(4, 18, dtype=torch.uint8)
    raw[:, :2] = torch.tensor([1.5, 2.0, -1.0, 0.5]).half().view(torch.uint8).view(4, 2)
    raw[:, 2] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    o = torch.zeros(4)
    lib.fine(raw, o, threads=4, group_size=4)
    assert o.tolist() == [3.5, 5.0, 3.0, 5.5]


@pytest.mark.parametrize(
    "body,match",
    [
        ("o[i] = first(o);", "address space"),  # device pointer where threadgroup is expected
        ("c[i] = 1;", "not assignable"),  # write through constant
    ],
)
def test_address_space_check_rejects(body, match):
    src = HEADER + (
        "static float first(threadgroup const float* p) { return p[0]; }\n"
        "kernel void k(device float* o, constant float* c, uint i [[thread_position_in_grid]]) { " + body + " }\n"
    )
    with pytest.raises(SyntaxError, match=match):
        compile_shader(src)


def test_compile_errors_are_syntax_errors():
    with pytest.raises(SyntaxError, match="undeclared"):
        compile_shader(HEADER + "kernel void k(device float* o) { o[0] = nope; }")
    with pytest.raises(SyntaxError, match="dynamic threadgroup memory"):
        compile_shader(HEADER + "kernel void k(threadgroup float* t [[threadgroup(0)]]) { t[0] = 1; }")


def test_shader_compiler_seam():
    import ferrum_mps.metal as metal
    from ferrum_mps import shaders

    with metal.use_shader_compiler(compile_shader):
        assert shaders.get_shader_compiler() is compile_shader
    assert shaders.get_shader_compiler() is not compile_shader
