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

#define QL_MV(name, M, dt, T) template [[host_name("mv_" name "_" #dt)]] kernel k_mv_##dt##_t k_mv<M, T>;
#define QL_MVB(name, B, dt, T) template [[host_name("mvb_" name "_" #dt)]] kernel k_mvb_##dt##_t k_mvb<B, T>;
#define QL_MM(name, B, dt, T) template [[host_name("mm_" name "_" #dt)]] kernel k_mm_##dt##_t k_mm<B, T>;

#define QL_MV_ALL(dt, T)                    \
    QL_MV("q4_0", mv_q4_0, dt, T)           \
    QL_MV("q5_0", mv_q5_0, dt, T)           \
    QL_MV("q8_0", mv_q8_0, dt, T)           \
    QL_MV("q4_k", mv_q4_K, dt, T)           \
    QL_MV("q5_k", mv_q5_K, dt, T)           \
    QL_MV("q6_k", mv_q6_K, dt, T)

#define QL_BLOCKS(X, dt, T)                 \
    X("q4_0", blk_q4_0, dt, T)              \
    X("q4_1", blk_q4_1, dt, T)              \
    X("q5_0", blk_q5_0, dt, T)              \
    X("q5_1", blk_q5_1, dt, T)              \
    X("q8_0", blk_q8_0, dt, T)              \
    X("q2_k", blk_q2_K, dt, T)              \
    X("q3_k", blk_q3_K, dt, T)              \
    X("q4_k", blk_q4_K, dt, T)              \
    X("q5_k", blk_q5_K, dt, T)              \
    X("q6_k", blk_q6_K, dt, T)

QL_MV_ALL(f32, float)
QL_MV_ALL(f16, half)
QL_BLOCKS(QL_MVB, f32, float)
QL_BLOCKS(QL_MVB, f16, half)
QL_BLOCKS(QL_MM, f32, float)
QL_BLOCKS(QL_MM, f16, half)

#if defined(__HAVE_BFLOAT__)
typedef decltype(k_mv<mv_q4_K, bfloat>) k_mv_bf16_t;
typedef decltype(k_mvb<blk_q4_K, bfloat>) k_mvb_bf16_t;
typedef decltype(k_mm<blk_q4_K, bfloat>) k_mm_bf16_t;
QL_MV_ALL(bf16, bfloat)
QL_BLOCKS(QL_MVB, bf16, bfloat)
QL_BLOCKS(QL_MM, bf16, bfloat)
#endif
