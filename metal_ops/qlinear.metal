// ferrum::qlinear on MPS: y[m, N] = x[m, K] . W[N, K]^T with W as raw GGML rows (quant_blocks.h,
// qmatmul.h are prepended). One dispatch per call; the host picks the kernel by m:
//   mv_<type>_<dt>   m = 1              threads [32 N_SG, ceil(N / (N_SG MV_NR))], group [32 N_SG, 1]
//   mvb_<type>_<dt>  2 <= m <= MVB_MMAX threads [32 N_SG, ceil(N / (N_SG MVB_NR))], group [32 N_SG, 1]
//   mm_<type>_<dt>   m > MVB_MMAX       threads [QMM_THREADS ceil(N/QMM_N), ceil(m/QMM_M)], group [QMM_THREADS, 1]
// Arguments: raw, x (contiguous [m, K]), out ([m, N], x's dtype), K, N (, m).

// N_SG, MV_NR, MVB_NR, MVB_MMAX: launch geometry from the prelude (ferrum_mps.kernels.GEOMETRY).

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

// Instantiations: one per (type of the family in the registry, activation dtype). The type lists
// FERRUM_TYPES_<family> and FERRUM_DTYPES come from the prelude (ferrum_mps.kernels.prelude()).
#define QL_TYPEDEFS(a, b, T, TN)                          \
    typedef decltype(k_mv<mv_q4_K, T>) k_mv_##TN##_t;      \
    typedef decltype(k_mvb<blk_q4_K, T>) k_mvb_##TN##_t;   \
    typedef decltype(k_mm<blk_q4_K, T>) k_mm_##TN##_t;
FERRUM_DTYPES(QL_TYPEDEFS, _, _)

#define QL_MV(CT, QN, T, TN) template [[host_name("mv_" #QN "_" #TN)]] kernel k_mv_##TN##_t k_mv<mv_##CT, T>;
#define QL_MVB(CT, QN, T, TN) template [[host_name("mvb_" #QN "_" #TN)]] kernel k_mvb_##TN##_t k_mvb<blk_##CT, T>;
#define QL_MM(CT, QN, T, TN) template [[host_name("mm_" #QN "_" #TN)]] kernel k_mm_##TN##_t k_mm<blk_##CT, T>;
#define QL_MV_ALL(CT, QN) FERRUM_DTYPES(QL_MV, CT, QN)
#define QL_MVB_ALL(CT, QN) FERRUM_DTYPES(QL_MVB, CT, QN)
#define QL_MM_ALL(CT, QN) FERRUM_DTYPES(QL_MM, CT, QN)
FERRUM_TYPES_mv(QL_MV_ALL)
FERRUM_TYPES_mvb(QL_MVB_ALL)
FERRUM_TYPES_mm(QL_MM_ALL)
