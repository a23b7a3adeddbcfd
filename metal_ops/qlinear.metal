// ferrum::qlinear on MPS: y[m, N] = x[m, K] . W[N, K]^T with W as raw GGML rows (quant_blocks.h,
// qmatmul.h are prepended). One dispatch per call; the host picks the kernel by m:
//   mv_<type>_<dt>   m = 1       threads [64, ceil(N/4)], group [64, 1]: 2 simdgroups x MV_NR rows
//   mvb_<type>_<dt>  2 <= m <= 8 threads [64, ceil(N/4)], group [64, 1]: 2 simdgroups x MVB_NR rows
//   mm_<type>_<dt>   m > 8       threads [128 * ceil(N/64), ceil(m/32)], group [128, 1]
// Arguments: raw, x (contiguous [m, K]), out ([m, N], x's dtype), K, N (, m).

#define N_SG 2
#define MV_NR 2
#define MVB_NR 2
#define MVB_MMAX 8

template <typename M, typename T>
kernel void k_mv(const device uchar *raw [[buffer(0)]], const device T *x [[buffer(1)]], device T *out [[buffer(2)]],
                 constant long &K [[buffer(3)]], constant long &N [[buffer(4)]],
                 uint2 tg [[threadgroup_position_in_grid]], ushort sg [[simdgroup_index_in_threadgroup]],
                 ushort lane [[thread_index_in_simdgroup]]) {
    const int row0 = (int(tg.y) * N_SG + sg) * MV_NR;
    if (row0 >= N) return;  // whole simdgroup: no barrier in this kernel
    const ulong rb = ulong(K / M::QK) * sizeof(typename M::block);
    float s[MV_NR];
    qmv_rows<M, T, MV_NR>(raw + ulong(row0) * rb, rb, int(N) - row0, int(K), x, lane, s);
    if (lane == 0)
        for (short r = 0; r < MV_NR; ++r)
            if (row0 + r < N) out[row0 + r] = T(s[r]);
}

template <typename B, typename T>
kernel void k_mvb(const device uchar *raw [[buffer(0)]], const device T *x [[buffer(1)]], device T *out [[buffer(2)]],
                  constant long &K [[buffer(3)]], constant long &N [[buffer(4)]], constant long &m [[buffer(5)]],
                  uint2 tg [[threadgroup_position_in_grid]], ushort sg [[simdgroup_index_in_threadgroup]],
                  ushort lane [[thread_index_in_simdgroup]]) {
    const int row0 = (int(tg.y) * N_SG + sg) * MVB_NR;
    if (row0 >= N) return;
    const ulong rb = ulong(K / B::QK) * sizeof(B);
    const int mm = m < MVB_MMAX ? int(m) : MVB_MMAX;
    float s[MVB_NR * MVB_MMAX];
    qmv_batch<B, T, MVB_NR, MVB_MMAX>(raw + ulong(row0) * rb, rb, int(N) - row0, int(K), x, ulong(K), mm, lane, s);
    if (lane == 0)
        for (short r = 0; r < MVB_NR; ++r)
            for (short t = 0; t < mm; ++t)
                if (row0 + r < N) out[ulong(t) * ulong(N) + row0 + r] = T(s[r * MVB_MMAX + t]);
}

template <typename B, typename T>
kernel void k_mm(const device uchar *raw [[buffer(0)]], const device T *x [[buffer(1)]], device T *out [[buffer(2)]],
                 constant long &K [[buffer(3)]], constant long &N [[buffer(4)]], constant long &m [[buffer(5)]],
                 uint2 tg [[threadgroup_position_in_grid]], ushort tid [[thread_index_in_threadgroup]],
                 ushort sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float shmem[QMM_SHMEM];
    const int n0 = int(tg.x) * QMM_N, m0 = int(tg.y) * QMM_M;
    const ulong rb = ulong(K / B::QK) * sizeof(B);
    qmm_tile<B, T>(raw + ulong(n0) * rb, rb, int(N) - n0, int(K), x + ulong(m0) * ulong(K), ulong(K), nullptr,
                   int(m) - m0, shmem, tid, sg);
    for (short i = tid; i < QMM_M * QMM_N; i += QMM_THREADS) {
        const int t = i / QMM_N, r = i % QMM_N;
        if (m0 + t < m && n0 + r < N) out[ulong(m0 + t) * ulong(N) + n0 + r] = T(shmem[i]);
    }
}

typedef decltype(k_mv<mv_q4_K, float>) k_mv_f32_t;
typedef decltype(k_mv<mv_q4_K, half>) k_mv_f16_t;
typedef decltype(k_mvb<blk_q4_K, float>) k_mvb_f32_t;
typedef decltype(k_mvb<blk_q4_K, half>) k_mvb_f16_t;
typedef decltype(k_mm<blk_q4_K, float>) k_mm_f32_t;
typedef decltype(k_mm<blk_q4_K, half>) k_mm_f16_t;

// Explicit instantiations, one literal host name each (kernels are looked up by name).
template [[host_name("mv_q4_0_f32")]] kernel k_mv_f32_t k_mv<mv_q4_0, float>;
template [[host_name("mv_q5_0_f32")]] kernel k_mv_f32_t k_mv<mv_q5_0, float>;
template [[host_name("mv_q4_1_f32")]] kernel k_mv_f32_t k_mv<mv_q4_1, float>;
template [[host_name("mv_q5_1_f32")]] kernel k_mv_f32_t k_mv<mv_q5_1, float>;
template [[host_name("mv_q2_k_f32")]] kernel k_mv_f32_t k_mv<mv_q2_K, float>;
template [[host_name("mv_q3_k_f32")]] kernel k_mv_f32_t k_mv<mv_q3_K, float>;
template [[host_name("mv_q8_0_f32")]] kernel k_mv_f32_t k_mv<mv_q8_0, float>;
template [[host_name("mv_q4_k_f32")]] kernel k_mv_f32_t k_mv<mv_q4_K, float>;
template [[host_name("mv_q5_k_f32")]] kernel k_mv_f32_t k_mv<mv_q5_K, float>;
template [[host_name("mv_q6_k_f32")]] kernel k_mv_f32_t k_mv<mv_q6_K, float>;
template [[host_name("mvb_q4_0_f32")]] kernel k_mvb_f32_t k_mvb<blk_q4_0, float>;
template [[host_name("mvb_q4_1_f32")]] kernel k_mvb_f32_t k_mvb<blk_q4_1, float>;
template [[host_name("mvb_q5_0_f32")]] kernel k_mvb_f32_t k_mvb<blk_q5_0, float>;
template [[host_name("mvb_q5_1_f32")]] kernel k_mvb_f32_t k_mvb<blk_q5_1, float>;
template [[host_name("mvb_q8_0_f32")]] kernel k_mvb_f32_t k_mvb<blk_q8_0, float>;
template [[host_name("mvb_q2_k_f32")]] kernel k_mvb_f32_t k_mvb<blk_q2_K, float>;
template [[host_name("mvb_q3_k_f32")]] kernel k_mvb_f32_t k_mvb<blk_q3_K, float>;
template [[host_name("mvb_q4_k_f32")]] kernel k_mvb_f32_t k_mvb<blk_q4_K, float>;
template [[host_name("mvb_q5_k_f32")]] kernel k_mvb_f32_t k_mvb<blk_q5_K, float>;
template [[host_name("mvb_q6_k_f32")]] kernel k_mvb_f32_t k_mvb<blk_q6_K, float>;
template [[host_name("mvb_iq4_nl_f32")]] kernel k_mvb_f32_t k_mvb<blk_iq4_nl, float>;
template [[host_name("mvb_iq4_xs_f32")]] kernel k_mvb_f32_t k_mvb<blk_iq4_xs, float>;
template [[host_name("mm_q4_0_f32")]] kernel k_mm_f32_t k_mm<blk_q4_0, float>;
template [[host_name("mm_q4_1_f32")]] kernel k_mm_f32_t k_mm<blk_q4_1, float>;
template [[host_name("mm_q5_0_f32")]] kernel k_mm_f32_t k_mm<blk_q5_0, float>;
template [[host_name("mm_q5_1_f32")]] kernel k_mm_f32_t k_mm<blk_q5_1, float>;
template [[host_name("mm_q8_0_f32")]] kernel k_mm_f32_t k_mm<blk_q8_0, float>;
template [[host_name("mm_q2_k_f32")]] kernel k_mm_f32_t k_mm<blk_q2_K, float>;
template [[host_name("mm_q3_k_f32")]] kernel k_mm_f32_t k_mm<blk_q3_K, float>;
template [[host_name("mm_q4_k_f32")]] kernel k_mm_f32_t k_mm<blk_q4_K, float>;
template [[host_name("mm_q5_k_f32")]] kernel k_mm_f32_t k_mm<blk_q5_K, float>;
template [[host_name("mm_q6_k_f32")]] kernel k_mm_f32_t k_mm<blk_q6_K, float>;
template [[host_name("mm_iq4_nl_f32")]] kernel k_mm_f32_t k_mm<blk_iq4_nl, float>;
template [[host_name("mm_iq4_xs_f32")]] kernel k_mm_f32_t k_mm<blk_iq4_xs, float>;
template [[host_name("mv_q4_0_f16")]] kernel k_mv_f16_t k_mv<mv_q4_0, half>;
template [[host_name("mv_q5_0_f16")]] kernel k_mv_f16_t k_mv<mv_q5_0, half>;
template [[host_name("mv_q4_1_f16")]] kernel k_mv_f16_t k_mv<mv_q4_1, half>;
template [[host_name("mv_q5_1_f16")]] kernel k_mv_f16_t k_mv<mv_q5_1, half>;
template [[host_name("mv_q2_k_f16")]] kernel k_mv_f16_t k_mv<mv_q2_K, half>;
template [[host_name("mv_q3_k_f16")]] kernel k_mv_f16_t k_mv<mv_q3_K, half>;
template [[host_name("mv_q8_0_f16")]] kernel k_mv_f16_t k_mv<mv_q8_0, half>;
template [[host_name("mv_q4_k_f16")]] kernel k_mv_f16_t k_mv<mv_q4_K, half>;
template [[host_name("mv_q5_k_f16")]] kernel k_mv_f16_t k_mv<mv_q5_K, half>;
template [[host_name("mv_q6_k_f16")]] kernel k_mv_f16_t k_mv<mv_q6_K, half>;
template [[host_name("mvb_q4_0_f16")]] kernel k_mvb_f16_t k_mvb<blk_q4_0, half>;
template [[host_name("mvb_q4_1_f16")]] kernel k_mvb_f16_t k_mvb<blk_q4_1, half>;
template [[host_name("mvb_q5_0_f16")]] kernel k_mvb_f16_t k_mvb<blk_q5_0, half>;
template [[host_name("mvb_q5_1_f16")]] kernel k_mvb_f16_t k_mvb<blk_q5_1, half>;
template [[host_name("mvb_q8_0_f16")]] kernel k_mvb_f16_t k_mvb<blk_q8_0, half>;
template [[host_name("mvb_q2_k_f16")]] kernel k_mvb_f16_t k_mvb<blk_q2_K, half>;
template [[host_name("mvb_q3_k_f16")]] kernel k_mvb_f16_t k_mvb<blk_q3_K, half>;
template [[host_name("mvb_q4_k_f16")]] kernel k_mvb_f16_t k_mvb<blk_q4_K, half>;
template [[host_name("mvb_q5_k_f16")]] kernel k_mvb_f16_t k_mvb<blk_q5_K, half>;
template [[host_name("mvb_q6_k_f16")]] kernel k_mvb_f16_t k_mvb<blk_q6_K, half>;
template [[host_name("mvb_iq4_nl_f16")]] kernel k_mvb_f16_t k_mvb<blk_iq4_nl, half>;
template [[host_name("mvb_iq4_xs_f16")]] kernel k_mvb_f16_t k_mvb<blk_iq4_xs, half>;
template [[host_name("mm_q4_0_f16")]] kernel k_mm_f16_t k_mm<blk_q4_0, half>;
template [[host_name("mm_q4_1_f16")]] kernel k_mm_f16_t k_mm<blk_q4_1, half>;
template [[host_name("mm_q5_0_f16")]] kernel k_mm_f16_t k_mm<blk_q5_0, half>;
template [[host_name("mm_q5_1_f16")]] kernel k_mm_f16_t k_mm<blk_q5_1, half>;
template [[host_name("mm_q8_0_f16")]] kernel k_mm_f16_t k_mm<blk_q8_0, half>;
template [[host_name("mm_q2_k_f16")]] kernel k_mm_f16_t k_mm<blk_q2_K, half>;
template [[host_name("mm_q3_k_f16")]] kernel k_mm_f16_t k_mm<blk_q3_K, half>;
template [[host_name("mm_q4_k_f16")]] kernel k_mm_f16_t k_mm<blk_q4_K, half>;
template [[host_name("mm_q5_k_f16")]] kernel k_mm_f16_t k_mm<blk_q5_K, half>;
template [[host_name("mm_q6_k_f16")]] kernel k_mm_f16_t k_mm<blk_q6_K, half>;
template [[host_name("mm_iq4_nl_f16")]] kernel k_mm_f16_t k_mm<blk_iq4_nl, half>;
template [[host_name("mm_iq4_xs_f16")]] kernel k_mm_f16_t k_mm<blk_iq4_xs, half>;

#if defined(__HAVE_BFLOAT__)
typedef decltype(k_mv<mv_q4_K, bfloat>) k_mv_bf16_t;
typedef decltype(k_mvb<blk_q4_K, bfloat>) k_mvb_bf16_t;
typedef decltype(k_mm<blk_q4_K, bfloat>) k_mm_bf16_t;
template [[host_name("mv_q4_0_bf16")]] kernel k_mv_bf16_t k_mv<mv_q4_0, bfloat>;
template [[host_name("mv_q5_0_bf16")]] kernel k_mv_bf16_t k_mv<mv_q5_0, bfloat>;
template [[host_name("mv_q4_1_bf16")]] kernel k_mv_bf16_t k_mv<mv_q4_1, bfloat>;
template [[host_name("mv_q5_1_bf16")]] kernel k_mv_bf16_t k_mv<mv_q5_1, bfloat>;
template [[host_name("mv_q2_k_bf16")]] kernel k_mv_bf16_t k_mv<mv_q2_K, bfloat>;
template [[host_name("mv_q3_k_bf16")]] kernel k_mv_bf16_t k_mv<mv_q3_K, bfloat>;
template [[host_name("mv_q8_0_bf16")]] kernel k_mv_bf16_t k_mv<mv_q8_0, bfloat>;
template [[host_name("mv_q4_k_bf16")]] kernel k_mv_bf16_t k_mv<mv_q4_K, bfloat>;
template [[host_name("mv_q5_k_bf16")]] kernel k_mv_bf16_t k_mv<mv_q5_K, bfloat>;
template [[host_name("mv_q6_k_bf16")]] kernel k_mv_bf16_t k_mv<mv_q6_K, bfloat>;
template [[host_name("mvb_q4_0_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q4_0, bfloat>;
template [[host_name("mvb_q4_1_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q4_1, bfloat>;
template [[host_name("mvb_q5_0_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q5_0, bfloat>;
template [[host_name("mvb_q5_1_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q5_1, bfloat>;
template [[host_name("mvb_q8_0_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q8_0, bfloat>;
template [[host_name("mvb_q2_k_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q2_K, bfloat>;
template [[host_name("mvb_q3_k_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q3_K, bfloat>;
template [[host_name("mvb_q4_k_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q4_K, bfloat>;
template [[host_name("mvb_q5_k_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q5_K, bfloat>;
template [[host_name("mvb_q6_k_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_q6_K, bfloat>;
template [[host_name("mvb_iq4_nl_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_iq4_nl, bfloat>;
template [[host_name("mvb_iq4_xs_bf16")]] kernel k_mvb_bf16_t k_mvb<blk_iq4_xs, bfloat>;
template [[host_name("mm_q4_0_bf16")]] kernel k_mm_bf16_t k_mm<blk_q4_0, bfloat>;
template [[host_name("mm_q4_1_bf16")]] kernel k_mm_bf16_t k_mm<blk_q4_1, bfloat>;
template [[host_name("mm_q5_0_bf16")]] kernel k_mm_bf16_t k_mm<blk_q5_0, bfloat>;
template [[host_name("mm_q5_1_bf16")]] kernel k_mm_bf16_t k_mm<blk_q5_1, bfloat>;
template [[host_name("mm_q8_0_bf16")]] kernel k_mm_bf16_t k_mm<blk_q8_0, bfloat>;
template [[host_name("mm_q2_k_bf16")]] kernel k_mm_bf16_t k_mm<blk_q2_K, bfloat>;
template [[host_name("mm_q3_k_bf16")]] kernel k_mm_bf16_t k_mm<blk_q3_K, bfloat>;
template [[host_name("mm_q4_k_bf16")]] kernel k_mm_bf16_t k_mm<blk_q4_K, bfloat>;
template [[host_name("mm_q5_k_bf16")]] kernel k_mm_bf16_t k_mm<blk_q5_K, bfloat>;
template [[host_name("mm_q6_k_bf16")]] kernel k_mm_bf16_t k_mm<blk_q6_K, bfloat>;
template [[host_name("mm_iq4_nl_bf16")]] kernel k_mm_bf16_t k_mm<blk_iq4_nl, bfloat>;
template [[host_name("mm_iq4_xs_bf16")]] kernel k_mm_bf16_t k_mm<blk_iq4_xs, bfloat>;
#endif
