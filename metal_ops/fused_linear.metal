// Multi-weight mat-vecs for decode (quant_blocks.h and qmatmul.h are prepended): several GGML weights
// that read the same activations, in ONE launch, each weight keeping its own quant type.
//
//   qkv_mv_<dt>  / qkv_mvb_<dt>      m = 1 / 2 <= m <= 8: q, k, v projections of x [m, K].
//       threads [64, gq + gk + gv], group [64, 1]; g* = ceil(rows / 4). Threadgroup y picks the
//       weight (the first gq groups are q, then k, then v); its 2 simdgroups x FMV_NR rows run the
//       ordinary per-type rows routine (qmv_rows / qmv_batch of qmatmul.h) on that weight.
//   gate_up_mv_<dt> / gate_up_mvb_<dt>   act(x Wg^T) * (x Wu^T), act 0 = silu, 1 = gelu (tanh form).
//       threads [64, ceil(I / 4)], group [64, 1]: a simdgroup computes the same FMV_NR rows of gate
//       and of up and writes act(g) * u from float32 sums.
// The quant type is a runtime argument (GGML type id), uniform per simdgroup: one kernel per
// activation dtype covers every mix of the types below (real Q4_K_M files put Q6_K on attn_v / some
// ffn tensors and Q5_0 / Q8_0 where a row is not a multiple of 256). Other types: the host calls
// qlinear per weight instead.

// FMV_NSG, FMV_NR, FMV_MMAX come from the prelude (ferrum_mps.kernels.GEOMETRY).

// gguf.GGMLQuantizationType ids
#define GT_Q4_0 2
#define GT_Q5_0 6
#define GT_Q8_0 8
#define GT_Q4_K 12
#define GT_Q5_K 13
#define GT_Q6_K 14

// NR rows of one weight (bytes from w, rb bytes per row, nrows valid) times m activation rows.
// Result s[r * FMV_MMAX + t] on every lane.
template <typename T, bool BATCH>
inline void fmv_rows(long qt, const device uchar *w, ulong rb, int nrows, int K, const device T *x, int m, ushort lane,
                     thread float *s) {
    if (BATCH) {
        switch (qt) {
        case GT_Q4_0: qmv_batch<blk_q4_0, T, FMV_NR, FMV_MMAX>(w, rb, nrows, K, x, ulong(K), m, lane, s); break;
        case GT_Q5_0: qmv_batch<blk_q5_0, T, FMV_NR, FMV_MMAX>(w, rb, nrows, K, x, ulong(K), m, lane, s); break;
        case GT_Q8_0: qmv_batch<blk_q8_0, T, FMV_NR, FMV_MMAX>(w, rb, nrows, K, x, ulong(K), m, lane, s); break;
        case GT_Q4_K: qmv_batch<blk_q4_K, T, FMV_NR, FMV_MMAX>(w, rb, nrows, K, x, ulong(K), m, lane, s); break;
        case GT_Q5_K: qmv_batch<blk_q5_K, T, FMV_NR, FMV_MMAX>(w, rb, nrows, K, x, ulong(K), m, lane, s); break;
        default:      qmv_batch<blk_q6_K, T, FMV_NR, FMV_MMAX>(w, rb, nrows, K, x, ulong(K), m, lane, s); break;
        }
    } else {
        float r1[FMV_NR];
        switch (qt) {
        case GT_Q4_0: qmv_rows<mv_q4_0, T, FMV_NR>(w, rb, nrows, K, x, lane, r1); break;
        case GT_Q5_0: qmv_rows<mv_q5_0, T, FMV_NR>(w, rb, nrows, K, x, lane, r1); break;
        case GT_Q8_0: qmv_rows<mv_q8_0, T, FMV_NR>(w, rb, nrows, K, x, lane, r1); break;
        case GT_Q4_K: qmv_rows<mv_q4_K, T, FMV_NR>(w, rb, nrows, K, x, lane, r1); break;
        case GT_Q5_K: qmv_rows<mv_q5_K, T, FMV_NR>(w, rb, nrows, K, x, lane, r1); break;
        default:      qmv_rows<mv_q6_K, T, FMV_NR>(w, rb, nrows, K, x, lane, r1); break;
        }
        for (short r = 0; r < FMV_NR; ++r) s[r * FMV_MMAX] = r1[r];
    }
}

template <typename T, bool BATCH>
kernel void qkv_mv(
    device const uchar *wq [[buffer(0)]],
    device const uchar *wk [[buffer(1)]],
    device const uchar *wv [[buffer(2)]],
    device const T *x [[buffer(3)]],
    device T *yq [[buffer(4)]],
    device T *yk [[buffer(5)]],
    device T *yv [[buffer(6)]],
    constant long &K [[buffer(7)]],
    constant long &nq [[buffer(8)]],
    constant long &nkv [[buffer(9)]],
    constant long &m [[buffer(10)]],
    constant long &qtq [[buffer(11)]],
    constant long &qtk [[buffer(12)]],
    constant long &qtv [[buffer(13)]],
    constant long &rbq [[buffer(14)]],
    constant long &rbk [[buffer(15)]],
    constant long &rbv [[buffer(16)]],
    uint2 tg [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]])
{
    const long per_group = FMV_NSG * FMV_NR;
    const long gq = (nq + per_group - 1) / per_group, gkv = (nkv + per_group - 1) / per_group;
    long g = tg.y;
    device const uchar *w = wq;
    device T *y = yq;
    long n = nq, qt = qtq, rb = rbq;
    if (g >= gq + gkv) {
        g -= gq + gkv; w = wv; y = yv; n = nkv; qt = qtv; rb = rbv;
    } else if (g >= gq) {
        g -= gq; w = wk; y = yk; n = nkv; qt = qtk; rb = rbk;
    }
    const long row0 = (g * FMV_NSG + sg) * FMV_NR;
    if (row0 >= n) return;  // whole simdgroup: no barrier in this kernel
    const int mm = BATCH ? int(min(m, long(FMV_MMAX))) : 1;
    float s[FMV_NR * FMV_MMAX];
    fmv_rows<T, BATCH>(qt, w + ulong(row0) * ulong(rb), ulong(rb), int(n - row0), int(K), x, mm, lane, s);
    if (lane == 0)
        for (short r = 0; r < FMV_NR; ++r)
            for (short t = 0; t < mm; ++t)
                if (row0 + r < n) y[t * n + row0 + r] = T(s[r * FMV_MMAX + t]);
}

inline float fmv_act(long act, float g) {
    if (act == 0) return g / (1.0f + exp(-g));
    // gelu, tanh approximation; tanh(z) = 1 - 2 / (exp(2z) + 1) stays finite for any z
    const float z = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (2.0f - 2.0f / (exp(2.0f * z) + 1.0f));
}

template <typename T, bool BATCH>
kernel void gate_up_mv(
    device const uchar *wg [[buffer(0)]],
    device const uchar *wu [[buffer(1)]],
    device const T *x [[buffer(2)]],
    device T *y [[buffer(3)]],
    constant long &K [[buffer(4)]],
    constant long &I [[buffer(5)]],
    constant long &m [[buffer(6)]],
    constant long &qtg [[buffer(7)]],
    constant long &qtu [[buffer(8)]],
    constant long &rbg [[buffer(9)]],
    constant long &rbu [[buffer(10)]],
    constant long &act [[buffer(11)]],
    uint2 tg [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]])
{
    const long row0 = (long(tg.y) * FMV_NSG + sg) * FMV_NR;
    if (row0 >= I) return;
    const int mm = BATCH ? int(min(m, long(FMV_MMAX))) : 1;
    const int nr = int(I - row0);
    float g[FMV_NR * FMV_MMAX], u[FMV_NR * FMV_MMAX];
    fmv_rows<T, BATCH>(qtg, wg + ulong(row0) * ulong(rbg), ulong(rbg), nr, int(K), x, mm, lane, g);
    fmv_rows<T, BATCH>(qtu, wu + ulong(row0) * ulong(rbu), ulong(rbu), nr, int(K), x, mm, lane, u);
    if (lane == 0)
        for (short r = 0; r < FMV_NR; ++r)
            for (short t = 0; t < mm; ++t)
                if (row0 + r < I) y[t * I + row0 + r] = T(fmv_act(act, g[r * FMV_MMAX + t]) * u[r * FMV_MMAX + t]);
}

#define FMV_INST(T, TN)                                                                                       \
    template [[host_name("qkv_mv_" #TN)]] kernel void qkv_mv<T, false>(                                       \
        device const uchar *, device const uchar *, device const uchar *, device const T *, device T *,       \
        device T *, device T *, constant long &, constant long &, constant long &, constant long &,           \
        constant long &, constant long &, constant long &, constant long &, constant long &, constant long &, \
        uint2, ushort, ushort);                                                                               \
    template [[host_name("qkv_mvb_" #TN)]] kernel void qkv_mv<T, true>(                                       \
        device const uchar *, device const uchar *, device const uchar *, device const T *, device T *,       \
        device T *, device T *, constant long &, constant long &, constant long &, constant long &,           \
        constant long &, constant long &, constant long &, constant long &, constant long &, constant long &, \
        uint2, ushort, ushort);                                                                               \
    template [[host_name("gate_up_mv_" #TN)]] kernel void gate_up_mv<T, false>(                               \
        device const uchar *, device const uchar *, device const T *, device T *, constant long &,            \
        constant long &, constant long &, constant long &, constant long &, constant long &, constant long &, \
        constant long &, uint2, ushort, ushort);                                                              \
    template [[host_name("gate_up_mvb_" #TN)]] kernel void gate_up_mv<T, true>(                               \
        device const uchar *, device const uchar *, device const T *, device T *, constant long &,            \
        constant long &, constant long &, constant long &, constant long &, constant long &, constant long &, \
        constant long &, uint2, ushort, ushort);

FMV_INST(float, f32)
FMV_INST(half, f16)
#if defined(__HAVE_BFLOAT__)
FMV_INST(bfloat, bf16)
#endif
