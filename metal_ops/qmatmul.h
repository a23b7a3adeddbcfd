// Quantized mat-vec / mat-mat building blocks over GGML rows (shared by qlinear.metal and the MoE kernels).
//
// All three take the weight as a byte pointer to its first row plus the row stride in bytes, so an
// indirect (MoE) kernel calls them on one expert's slab: w = experts + e * expert_bytes + row0 * row_bytes.
// Rows at or past `nrows` are never read (the last valid row is re-read instead and its result is
// meant to be dropped by the caller). K must be a multiple of the block size (32 or 256).
//
//   qmv_rows<M, T, NR>(w, row_bytes, nrows, K, y, lane, sums)            m = 1
//       One simdgroup: NR rows . one activation row y[K] (T = float/half/bfloat). M is an mv_<type>
//       trait from quant_blocks.h. On return EVERY lane holds sums[r] (one simd_sum per row).
//   qmv_batch<B, T, NR, MMAX>(w, row_bytes, nrows, K, y, ldy, m, lane, sums)   2 <= m <= MMAX
//       One simdgroup: NR rows . m activation rows (row t at y + t*ldy). Each lane dequantizes 16
//       weights per row into registers (dequant16) and reuses them for all m rows.
//       sums[r*MMAX + t] for t < m, on every lane.
//   qmm_tile<B, T>(w, row_bytes, nrows, K, x, ldx, xrows, m, shmem, tid, sg)       m > 8
//       One threadgroup of QMM_THREADS = 128 threads (4 simdgroups): a QMM_M (32 tokens) x QMM_N
//       (64 weight rows) output tile, K step QMM_K = 32. Token t of the tile is activation row
//       xrows ? xrows[t] : t (row stride ldx); tokens t >= m contribute zeros. Weights are dequantized
//       into threadgroup memory as float (exact, so float32 results match the CPU op to rounding),
//       activations staged as float, products by simdgroup_float8x8. Result left in
//       shmem[t * QMM_N + r] (float), after a threadgroup barrier. shmem: QMM_SHMEM floats (12 KB).

// QMM_N, QMM_M, QMM_K, QMM_THREADS: from the prelude (ferrum_mps.kernels.GEOMETRY).
#define QMM_SHMEM (QMM_N * QMM_K + QMM_M * QMM_K)

template <typename M, typename T, short NR>
inline void qmv_rows(const device uchar *w, ulong row_bytes, int nrows, int K, const device T *y, ushort lane,
                     thread float *sums) {
    typedef typename M::block B;
    const int nb = K / int(M::QK);
    const short p = lane % short(M::LPB);
    const device B *rows[NR];
    float acc[NR];
    for (short r = 0; r < NR; ++r) {
        rows[r] = (const device B *)(w + ulong(min(int(r), nrows - 1)) * row_bytes);
        acc[r] = 0.f;
    }
    typename M::acts a;
    for (int ib = lane / short(M::LPB); ib < nb; ib += 32 / short(M::LPB)) {
        M::load(y + ib * int(M::QK), p, a);  // once per block, reused by all NR rows
        for (short r = 0; r < NR; ++r) acc[r] += M::partial(rows[r] + ib, p, a);
    }
    for (short r = 0; r < NR; ++r) sums[r] = simd_sum(acc[r]);
}

template <typename B, typename T, short NR, short MMAX>
inline void qmv_batch(const device uchar *w, ulong row_bytes, int nrows, int K, const device T *y, ulong ldy, int m,
                      ushort lane, thread float *sums) {
    const int n16 = K / 16;
    const device B *rows[NR];
    float acc[NR * MMAX];
    for (short r = 0; r < NR; ++r) rows[r] = (const device B *)(w + ulong(min(int(r), nrows - 1)) * row_bytes);
    for (short i = 0; i < NR * MMAX; ++i) acc[i] = 0.f;
    float wv[16];
    for (int c = lane; c < n16; c += 32) {
        const int ib = c / int(B::N16);
        const short il = short(c % int(B::N16));
        for (short r = 0; r < NR; ++r) {
            dequant16(rows[r] + ib, il, wv);  // 16 weights in registers, reused by the m tokens
            for (short t = 0; t < MMAX; ++t) {
                if (t >= m) break;
                const device T *yt = y + ulong(t) * ldy + 16 * c;
                float s = 0.f;
                for (short i = 0; i < 16; ++i) s += wv[i] * float(yt[i]);
                acc[r * MMAX + t] += s;
            }
        }
    }
    for (short r = 0; r < NR; ++r)
        for (short t = 0; t < MMAX; ++t)
            if (t < m) sums[r * MMAX + t] = simd_sum(acc[r * MMAX + t]);
}

template <typename B, typename T>
inline void qmm_tile(const device uchar *w, ulong row_bytes, int nrows, int K, const device T *x, ulong ldx,
                     const device int *xrows, int m, threadgroup float *shmem, ushort tid, ushort sg) {
    threadgroup float *ws = shmem;                  // [QMM_K][QMM_N], k-major: the B operand as is
    threadgroup float *xs = shmem + QMM_N * QMM_K;  // [QMM_M][QMM_K]
    // Loader roles: thread -> (weight row, 16-value half of the K step) and (token, 8 values).
    const short wr = tid / 2, wk = 16 * (tid % 2);
    const device B *wrow = (const device B *)(w + ulong(min(int(wr), nrows - 1)) * row_bytes);
    const short xt = tid / 4, xk = 8 * (tid % 4);
    const bool xok = xt < m;
    const device T *xrow = x + (xok ? ulong(xrows ? xrows[xt] : int(xt)) * ldx : 0ul);
    // Compute roles: simdgroup sg -> 16 tokens x 32 rows = 2 x 4 accumulators of 8x8.
    const short r0 = 32 * (sg % 2), t0 = 16 * (sg / 2);
    simdgroup_float8x8 acc[8];
    for (short i = 0; i < 8; ++i) acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
    float wv[16];
    for (int k0 = 0; k0 < K; k0 += QMM_K) {
        const int kk = k0 + wk;
        dequant16(wrow + kk / int(B::QK), short((kk % int(B::QK)) / 16), wv);
        for (short i = 0; i < 16; ++i) ws[(wk + i) * QMM_N + wr] = wv[i];
        for (short i = 0; i < 8; ++i) xs[xt * QMM_K + xk + i] = xok ? float(xrow[k0 + xk + i]) : 0.f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (short k = 0; k < QMM_K; k += 8) {
            simdgroup_float8x8 a[2], b[4];
            for (short i = 0; i < 2; ++i) simdgroup_load(a[i], xs + (t0 + 8 * i) * QMM_K + k, QMM_K);
            for (short j = 0; j < 4; ++j) simdgroup_load(b[j], ws + k * QMM_N + r0 + 8 * j, QMM_N);
            for (short i = 0; i < 2; ++i)
                for (short j = 0; j < 4; ++j) simdgroup_multiply_accumulate(acc[4 * i + j], a[i], b[j], acc[4 * i + j]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (short i = 0; i < 2; ++i)
        for (short j = 0; j < 4; ++j) simdgroup_store(acc[4 * i + j], shmem + (t0 + 8 * i) * QMM_N + r0 + 8 * j, QMM_N);
    threadgroup_barrier(mem_flags::mem_threadgroup);
}
