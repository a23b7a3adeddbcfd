// Fused decode-path kernels around attention and routing (ferrum_mps/ops/norm.py launches them):
//   rms_norm            y = w * T(x * rsqrt(mean(x^2) + eps))                  one threadgroup per row
//   add_rms_norm        s = T(r + x); y = rms_norm(s)                            one threadgroup per row
//   norm_add_rms_norm   s = T(r + rms_norm(x, pre_w)); y = rms_norm(s, w)        one threadgroup per row
//   qk_norm_rope_cache  per-head RMSNorm + RoPE on q and k, k/v into the cache   one threadgroup per head
//   moe_gate_route      router mat-vec + softmax + top-k (+ renormalise)         one threadgroup per token
//
// Decode is latency-bound: every kernel is a single launch, reductions are simd_sum plus one
// threadgroup barrier, accumulation is float32 and values are rounded to the activation dtype T
// exactly where models/layers.py's torch code rounds them. The launchers choose the threadgroup
// width; only the partial-sum arrays are sized at compile time.

// NORM_MAX_SG, ROUTE_NSG and MOE_ROUTE_MAX_E (experts of moe_gate_route: probabilities of one
// simdgroup, ROUTE_PER_LANE per lane) come from the prelude (ferrum_mps.kernels.GEOMETRY).
#define ROUTE_PER_LANE (MOE_ROUTE_MAX_E / 32)
                           // keeps in flight (the whole router matrix is read by one threadgroup)

template <typename T> struct norm_vec4;
template <> struct norm_vec4<float> { typedef float4 type; };
template <> struct norm_vec4<half> { typedef half4 type; };
#if defined(__HAVE_BFLOAT__)
template <> struct norm_vec4<bfloat> { typedef bfloat4 type; };
#endif

// V = 4 consecutive elements as one vector load/store (the launcher checks alignment), or V = 1
// (then lanes y, z, w read as 0 and are never stored): one kernel body serves both.
template <typename T, int V> struct norm_io;

template <typename T> struct norm_io<T, 4> {
    typedef typename norm_vec4<T>::type V4;
    static float4 load(const device T *p) {
        const V4 a = *((const device V4 *)p);
        return float4(float(a.x), float(a.y), float(a.z), float(a.w));
    }
    static void store(device T *p, float4 v) {
        V4 o;
        o.x = T(v.x);
        o.y = T(v.y);
        o.z = T(v.z);
        o.w = T(v.w);
        *((device V4 *)p) = o;
    }
};

template <typename T> struct norm_io<T, 1> {
    static float4 load(const device T *p) { return float4(float(p[0]), 0.0f, 0.0f, 0.0f); }
    static void store(device T *p, float4 v) { p[0] = T(v.x); }
};

// v rounded to T and back: where torch's code holds an intermediate in the activation dtype.
template <typename T> inline float4 norm_round4(float4 v) {
    return float4(float(T(v.x)), float(T(v.y)), float(T(v.z)), float(T(v.w)));
}

template <typename T> inline float norm_round1(float v) { return float(T(v)); }

// Sum over the threadgroup of every thread's v; all threads get the same value (same order).
inline float norm_tg_sum(float v, threadgroup float *part, ushort sg, ushort lane, ushort nsg) {
    v = simd_sum(v);
    if (lane == 0) part[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float s = 0.0f;
    for (ushort i = 0; i < nsg; ++i) s += part[i];
    return s;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm over rows of H. Grid [nt, rows]: thread i handles elements V*i, V*(i + nt), ...

template <typename T, int V>
kernel void rms_norm(
    device const T *x [[buffer(0)]],
    device const T *w [[buffer(1)]],
    device T *y [[buffer(2)]],
    constant long &H [[buffer(3)]],
    constant float &eps [[buffer(4)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint2 ntg [[threads_per_threadgroup]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort nsg [[simdgroups_per_threadgroup]])
{
    typedef norm_io<T, V> L;
    threadgroup float part[NORM_MAX_SG];
    const long step = long(ntg.x) * V;
    const device T *xr = x + long(tg.y) * H;
    device T *yr = y + long(tg.y) * H;
    float ss = 0.0f;
    for (long i = long(tid) * V; i < H; i += step) {
        const float4 a = L::load(xr + i);
        ss += dot(a, a);
    }
    const float r = precise::rsqrt(norm_tg_sum(ss, part, sg, lane, nsg) / float(H) + eps);
    for (long i = long(tid) * V; i < H; i += step) {
        L::store(yr + i, L::load(w + i) * norm_round4<T>(L::load(xr + i) * r));
    }
}

// s = TR(r + x), the new residual stream (TR = T, or float for a float32 residual stream under
// half activations); y = w * T(s * rsqrt(mean(s^2) + eps)). Each thread re-reads only the
// elements of s it wrote itself.
template <typename T, typename TR, int V>
kernel void add_rms_norm(
    device const T *x [[buffer(0)]],
    device const TR *res [[buffer(1)]],
    device const T *w [[buffer(2)]],
    device T *y [[buffer(3)]],
    device TR *s [[buffer(4)]],
    constant long &H [[buffer(5)]],
    constant float &eps [[buffer(6)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint2 ntg [[threads_per_threadgroup]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort nsg [[simdgroups_per_threadgroup]])
{
    typedef norm_io<T, V> L;
    typedef norm_io<TR, V> LR;
    threadgroup float part[NORM_MAX_SG];
    const long step = long(ntg.x) * V, off = long(tg.y) * H;
    float ss = 0.0f;
    for (long i = long(tid) * V; i < H; i += step) {
        const float4 a = norm_round4<TR>(LR::load(res + off + i) + L::load(x + off + i));
        LR::store(s + off + i, a);
        ss += dot(a, a);
    }
    const float r = precise::rsqrt(norm_tg_sum(ss, part, sg, lane, nsg) / float(H) + eps);
    for (long i = long(tid) * V; i < H; i += step) {
        L::store(y + off + i, L::load(w + i) * norm_round4<T>(LR::load(s + off + i) * r));
    }
}

// Gemma's sandwich norm fused with the residual add and the next norm (add_rms_norm with a
// pre_weight): xn = T(pw * T(x * rsqrt(mean(x^2) + eps))); s = TR(r + xn);
// y = w * T(s * rsqrt(mean(s^2) + eps)). Two reductions, each with its own partial-sum array
// (no barrier needed between them). Each thread re-reads only the elements it wrote itself.
template <typename T, typename TR, int V>
kernel void norm_add_rms_norm(
    device const T *x [[buffer(0)]],
    device const T *pw [[buffer(1)]],
    device const TR *res [[buffer(2)]],
    device const T *w [[buffer(3)]],
    device T *y [[buffer(4)]],
    device TR *s [[buffer(5)]],
    constant long &H [[buffer(6)]],
    constant float &eps [[buffer(7)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint2 ntg [[threads_per_threadgroup]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort nsg [[simdgroups_per_threadgroup]])
{
    typedef norm_io<T, V> L;
    typedef norm_io<TR, V> LR;
    threadgroup float part_x[NORM_MAX_SG];
    threadgroup float part_s[NORM_MAX_SG];
    const long step = long(ntg.x) * V, off = long(tg.y) * H;
    float ssx = 0.0f;
    for (long i = long(tid) * V; i < H; i += step) {
        const float4 a = L::load(x + off + i);
        ssx += dot(a, a);
    }
    const float rx = precise::rsqrt(norm_tg_sum(ssx, part_x, sg, lane, nsg) / float(H) + eps);
    float ss = 0.0f;
    for (long i = long(tid) * V; i < H; i += step) {
        const float4 xn = norm_round4<T>(L::load(pw + i) * norm_round4<T>(L::load(x + off + i) * rx));
        const float4 a = norm_round4<TR>(LR::load(res + off + i) + xn);
        LR::store(s + off + i, a);
        ss += dot(a, a);
    }
    const float r = precise::rsqrt(norm_tg_sum(ss, part_s, sg, lane, nsg) / float(H) + eps);
    for (long i = long(tid) * V; i < H; i += step) {
        L::store(y + off + i, L::load(w + i) * norm_round4<T>(LR::load(s + off + i) * r));
    }
}

// ---------------------------------------------------------------------------------------------
// q/k RMSNorm + RoPE + cache write. Grid [nt, Hq + Hkv, B * T], nt = D/2 rounded up to 32:
// threadgroup (head h, token bt); thread p < D/2 owns the rotation pair (p, p + D/2)
// (rotate-half) or (2p, 2p + 1) (interleaved), both turned by angle pos * inv_freq[p].
// Heads h < Hq are query heads (out: q_out [B, Hq, T, D]); the others are kv heads, whose
// threadgroup also copies v. A cache slot outside [0, S) is not written (no host check).
//
// dims = [Hq, Hkv, D, T, S, flags, position row stride]; flags: 1 q norm, 2 k norm, 4 interleaved
// pairs. The stride is 0 when every sequence has the same positions (decode_step's expanded
// cache_position: no copy to make it contiguous).

template <typename T, typename TC>
kernel void qk_norm_rope_cache(
    device const T *q [[buffer(0)]],
    device const T *k [[buffer(1)]],
    device const T *v [[buffer(2)]],
    device const T *qw [[buffer(3)]],
    device const T *kw [[buffer(4)]],
    device const float *inv_freq [[buffer(5)]],
    device const long *pos [[buffer(6)]],
    device const long *cache_pos [[buffer(7)]],
    device TC *k_cache [[buffer(8)]],
    device TC *v_cache [[buffer(9)]],
    device T *q_out [[buffer(10)]],
    constant long *dims [[buffer(11)]],
    constant float &eps [[buffer(12)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort nsg [[simdgroups_per_threadgroup]])
{
    threadgroup float part[NORM_MAX_SG];
    const long Hq = dims[0], Hkv = dims[1], D = dims[2], T_ = dims[3], S = dims[4], flags = dims[5], pstride = dims[6];
    const long half_d = D / 2, h = tg.y, bt = tg.z, b = bt / T_, t = bt % T_;
    const bool is_q = h < Hq;
    const long hk = h - Hq;
    const device T *src = is_q ? q + (bt * Hq + h) * D : k + (bt * Hkv + hk) * D;
    const device T *nw = is_q ? qw : kw;
    const bool norm = (flags & (is_q ? 1 : 2)) != 0;
    const bool inter = (flags & 4) != 0;
    const bool active = long(tid) < half_d;
    const long i0 = inter ? 2 * long(tid) : long(tid), i1 = inter ? i0 + 1 : i0 + half_d;
    float a = active ? float(src[i0]) : 0.0f, c = active ? float(src[i1]) : 0.0f;
    if (norm) {  // uniform per threadgroup: every thread reaches the barrier inside norm_tg_sum
        const float r = precise::rsqrt(norm_tg_sum(a * a + c * c, part, sg, lane, nsg) / float(D) + eps);
        if (active) {
            a = norm_round1<T>(float(nw[i0]) * norm_round1<T>(a * r));
            c = norm_round1<T>(float(nw[i1]) * norm_round1<T>(c * r));
        }
    }
    if (!active) return;
    const float ang = float(pos[b * pstride + t]) * inv_freq[tid];
    const float cs = precise::cos(ang), sn = precise::sin(ang);
    const T o0 = T(a * cs - c * sn), o1 = T(c * cs + a * sn);
    if (is_q) {
        device T *dst = q_out + ((b * Hq + h) * T_ + t) * D;
        dst[i0] = o0;
        dst[i1] = o1;
        return;
    }
    const long slot = cache_pos[t];
    if (slot < 0 || slot >= S) return;
    const long c_off = ((b * Hkv + hk) * S + slot) * D;
    k_cache[c_off + i0] = TC(float(o0));  // via float: there is no half <-> bfloat conversion
    k_cache[c_off + i1] = TC(float(o1));
    const device T *vs = v + (bt * Hkv + hk) * D;
    v_cache[c_off + tid] = TC(float(vs[tid]));
    v_cache[c_off + tid + half_d] = TC(float(vs[tid + half_d]));
}

// ---------------------------------------------------------------------------------------------
// Router mat-vec fused into routing. Grid [32 * ROUTE_NSG, T]: simdgroup g computes the logits of
// experts g, g + ROUTE_NSG, ... (rounded to T, as x @ W.T in the activation dtype is), then
// simdgroup 0 routes exactly as moe_route in moe.metal: softmax in float32, k rounds of a
// simdgroup argmax, equal probabilities to the lower expert index, renormalised when asked.
// A token whose softmax is undefined (a NaN or +inf logit, or every logit -inf: torch's softmax
// is NaN there) gets id -1 and weight 0 in every slot: "no expert", which moe_ffn skips.

inline bool route_bad_logit(float l) {  // NaN or +inf, tested on the bits (safe under fast math)
    const uint u = as_type<uint>(l);
    return (u & 0x7fffffffu) > 0x7f800000u || u == 0x7f800000u;
}

template <typename T, typename TW, int V>
kernel void moe_gate_route(
    device const T *x [[buffer(0)]],
    device const TW *w [[buffer(1)]],
    device float *weights [[buffer(2)]],
    device int *ids [[buffer(3)]],
    constant long &H [[buffer(4)]],
    constant long &E [[buffer(5)]],
    constant long &K [[buffer(6)]],
    constant long &normalize [[buffer(7)]],
    uint2 tg [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]])
{
    threadgroup float logit[MOE_ROUTE_MAX_E];
    const device T *xr = x + long(tg.y) * H;
    for (long e = sg; e < E; e += ROUTE_NSG) {
        const device TW *we = w + e * H;
        float acc = 0.0f;
        for (long i = long(lane) * V; i < H; i += 32 * V) {
            acc += dot(norm_io<T, V>::load(xr + i), norm_io<TW, V>::load(we + i));
        }
        acc = simd_sum(acc);
        if (lane == 0) logit[e] = norm_round1<T>(acc);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg != 0) return;

    device float *w_out = weights + long(tg.y) * K;
    device int *id_out = ids + long(tg.y) * K;
    float v[ROUTE_PER_LANE];
    float m = -INFINITY;
    int bad = 0, finite = 0;
    for (short j = 0; j < ROUTE_PER_LANE; ++j) {
        const long e = lane + 32 * j;
        v[j] = e < E ? logit[e] : -INFINITY;
        if (e < E) {
            bad |= int(route_bad_logit(v[j]));
            finite |= int(as_type<uint>(v[j]) != 0xff800000u);
            m = max(m, v[j]);
        }
    }
    if (simd_max(bad) != 0 || simd_max(finite) == 0) {
        if (lane == 0) {
            for (long r = 0; r < K; ++r) {
                w_out[r] = 0.0f;
                id_out[r] = -1;
            }
        }
        return;
    }
    m = simd_max(m);
    float s = 0.0f;
    for (short j = 0; j < ROUTE_PER_LANE; ++j) {
        v[j] = (lane + 32 * j < E) ? exp(v[j] - m) : 0.0f;
        s += v[j];
    }
    s = simd_sum(s);
    for (short j = 0; j < ROUTE_PER_LANE; ++j) {
        // Taken and padding slots sit below every probability (probabilities are >= 0).
        v[j] = (lane + 32 * j < E) ? v[j] / s : -1.0f;
    }
    float total = 0.0f;
    for (long r = 0; r < K; ++r) {
        float best = -2.0f;
        int bi = 0x7fffffff;
        for (short j = 0; j < ROUTE_PER_LANE; ++j) {
            if (v[j] > best) {
                best = v[j];
                bi = lane + 32 * j;
            }
        }
        const float top = simd_max(best);
        const int idx = simd_min(best == top ? bi : 0x7fffffff);
        if (idx < E && idx % 32 == lane) {
            v[idx / 32] = -2.0f;
        }
        if (lane == 0) {
            w_out[r] = top;
            id_out[r] = idx;
        }
        total += top;
    }
    if (normalize && lane == 0) {
        for (long r = 0; r < K; ++r) {
            w_out[r] = w_out[r] / total;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instantiations. Names: <kernel>_<T>[_<cache or weight type>]_v<V>.

#define NORM_ARGS_ROW(T) device const T *, device const T *, device T *, constant long &, constant float &, \
    uint2, uint2, ushort, ushort, ushort, ushort
#define NORM_ARGS_ADD(T, TR) device const T *, device const TR *, device const T *, device T *, device TR *, \
    constant long &, constant float &, uint2, uint2, ushort, ushort, ushort, ushort

#define ADD_INST(T, TN, TR, RN, V)                                                                             \
    template [[host_name("add_rms_norm_" #TN "_" #RN "_v" #V)]] kernel void add_rms_norm<T, TR, V>(          \
        NORM_ARGS_ADD(T, TR)); \
    template [[host_name("norm_add_rms_norm_" #TN "_" #RN "_v" #V)]] kernel void norm_add_rms_norm<T, TR, V>( \
        device const T *, device const T *, device const TR *, device const T *, device T *, device TR *,     \
        constant long &, constant float &, uint2, uint2, ushort, ushort, ushort, ushort);

#define NORM_INST_V(T, TN, V)                                                                                  \
    template [[host_name("rms_norm_" #TN "_v" #V)]] kernel void rms_norm<T, V>(NORM_ARGS_ROW(T));             \
    ADD_INST(T, TN, T, TN, V)

#define QK_INST(T, TN, TC, CN)                                                                                 \
    template [[host_name("qk_norm_rope_cache_" #TN "_" #CN)]] kernel void qk_norm_rope_cache<T, TC>(          \
        device const T *, device const T *, device const T *, device const T *, device const T *,             \
        device const float *, device const long *, device const long *, device TC *, device TC *, device T *, \
        constant long *, constant float &, uint3, ushort, ushort, ushort, ushort);

#define ROUTE_INST(T, TN, TW, WN, V)                                                                           \
    template [[host_name("moe_gate_route_" #TN "_" #WN "_v" #V)]] kernel void moe_gate_route<T, TW, V>(       \
        device const T *, device const TW *, device float *, device int *, constant long &, constant long &,  \
        constant long &, constant long &, uint2, ushort, ushort);

#define NORM_INST(T, TN)                                                                                       \
    NORM_INST_V(T, TN, 1)                                                                                      \
    NORM_INST_V(T, TN, 4)                                                                                      \
    QK_INST(T, TN, float, f32)                                                                                 \
    QK_INST(T, TN, half, f16)                                                                                  \
    ROUTE_INST(T, TN, T, TN, 1)                                                                                \
    ROUTE_INST(T, TN, T, TN, 4)

NORM_INST(float, f32)
NORM_INST(half, f16)
ADD_INST(half, f16, float, f32, 1)
ADD_INST(half, f16, float, f32, 4)
ROUTE_INST(half, f16, float, f32, 1)
ROUTE_INST(half, f16, float, f32, 4)
#if defined(__HAVE_BFLOAT__)
NORM_INST(bfloat, bf16)
ADD_INST(bfloat, bf16, float, f32, 1)
ADD_INST(bfloat, bf16, float, f32, 4)
QK_INST(float, f32, bfloat, bf16)
QK_INST(half, f16, bfloat, bf16)
QK_INST(bfloat, bf16, bfloat, bf16)
ROUTE_INST(bfloat, bf16, float, f32, 1)
ROUTE_INST(bfloat, bf16, float, f32, 4)
#endif
