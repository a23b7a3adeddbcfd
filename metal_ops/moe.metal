// Mixture-of-Experts kernels: routing, expert dispatch without host round trips.
//
// A (token, slot) pair p = t * k + s is one of the k experts picked for token t. Expert stacks
// are GGUF 3-D tensors of raw blocks [E, out, in / QK]; expert e's slab starts at row e * out.
// Expert ids are only ever read on the GPU: an id outside [0, E) makes its pair contribute
// nothing (rows of zeros in moe_mv), it is never used to address memory.
//
// Few tokens: indirect mat-vec, one grid z-slice per pair (or per token when the weighted sum
// over slots is fused into the down projection). Many tokens: moe_bucket sorts pairs by expert
// on the GPU into fixed-size buffers and lists 32-pair tiles; the indirect mat-mat kernels run
// one threadgroup per (row tile, pair tile) and the tiles past the last used one exit at once.
//
// Built on qmatmul.h: qmv_rows (mat-vec of one simdgroup) and qmm_tile (a 64-row x 32-token
// mat-mat tile with gathered activation rows), both called on one expert's slab.

// MOE_NSG (simdgroups per mat-vec threadgroup), MOE_NR (weight rows per simdgroup), QMM_*:
// launch geometry from the prelude (ferrum_mps.kernels.GEOMETRY), read by the launcher too.
#define MOE_TP QMM_M    // pairs per mat-mat tile
#define MOE_ROUTE_PER_LANE (MOE_ROUTE_MAX_E / 32)

inline float moe_silu(float g) { return g / (1.0f + exp(-g)); }

// ---------------------------------------------------------------------------------------------
// Routing: one simdgroup per token. Each lane keeps up to MOE_ROUTE_PER_LANE probabilities in
// registers (E <= MOE_ROUTE_MAX_E, from the prelude); top-k is k rounds of a simdgroup argmax.
// Equal values resolve to the lowest expert index, as torch.topk does: strict > within a lane
// (ascending index), simd_min across lanes.
// A token with a NaN or +inf logit, or only -inf ones, gets no expert: ids -1, weights 0.

template <typename T>
kernel void moe_route(
    device const T *logits [[buffer(0)]],
    device float *weights [[buffer(1)]],
    device int *ids [[buffer(2)]],
    constant long &E [[buffer(3)]],
    constant long &K [[buffer(4)]],
    constant long &normalize [[buffer(5)]],
    uint2 tg [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]])
{
    const device T *row = logits + long(tg.y) * E;
    device float *w_out = weights + long(tg.y) * K;
    device int *id_out = ids + long(tg.y) * K;
    float v[MOE_ROUTE_PER_LANE];
    float m = -INFINITY;
    bool undefined = false, any_value = false;  // a NaN / +inf logit; a logit other than -inf
    for (short j = 0; j < MOE_ROUTE_PER_LANE; ++j) {
        const long e = lane + 32 * j;
        v[j] = e < E ? float(row[e]) : -INFINITY;
        // Tested on the bits: fast math may fold isnan() away.
        const uint bits = as_type<uint>(v[j]);
        undefined = undefined || (e < E && bits != 0xff800000u && (bits & 0x7f800000u) == 0x7f800000u);
        any_value = any_value || (e < E && bits != 0xff800000u);
        m = max(m, v[j]);
    }
    if (simd_any(undefined) || !simd_any(any_value)) {
        // The softmax is undefined: no expert for this token (id -1, weight 0), as the CPU op.
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
    for (short j = 0; j < MOE_ROUTE_PER_LANE; ++j) {
        v[j] = (lane + 32 * j < E) ? exp(v[j] - m) : 0.0f;
        s += v[j];
    }
    s = simd_sum(s);
    for (short j = 0; j < MOE_ROUTE_PER_LANE; ++j) {
        // Taken and padding slots sit below every probability (probabilities are >= 0).
        v[j] = (lane + 32 * j < E) ? v[j] / s : -1.0f;
    }
    float total = 0.0f;
    for (long r = 0; r < K; ++r) {
        float best = -2.0f;
        int bi = 0x7fffffff;
        for (short j = 0; j < MOE_ROUTE_PER_LANE; ++j) {
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
// Indirect mat-vec (few tokens). Grid [64, ceil(rows / (MOE_NSG * MOE_NR)), pairs or tokens]:
// each simdgroup reads its pair's expert id and runs qmv_rows on MOE_NR rows of that slab.

template <typename M>
inline ulong moe_row_bytes(long K) { return ulong(K / M::QK) * sizeof(typename M::block); }

// moe_qlinear: y[p, rows] = W_ids[p] x_p (x_p = x[p / k], or x[p] when x has one row per slot).
template <typename M, typename T>
kernel void moe_mv(
    device const uchar *w [[buffer(0)]],
    device const T *x [[buffer(1)]],
    device const int *ids [[buffer(2)]],
    device T *y [[buffer(3)]],
    constant long &in_f [[buffer(4)]],
    constant long &out_f [[buffer(5)]],
    constant long &E [[buffer(6)]],
    constant long &k [[buffer(7)]],
    constant long &x_per_slot [[buffer(8)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]])
{
    const long pair = tg.z;
    const long row0 = (long(tg.y) * MOE_NSG + sg) * MOE_NR;
    if (row0 >= out_f) return;
    const int nr = int(min(long(MOE_NR), out_f - row0));
    const int e = ids[pair];
    device T *yr = y + pair * out_f + row0;
    if (e < 0 || e >= E) {
        if (lane < nr) yr[lane] = T(0.0f);
        return;
    }
    const ulong rb = moe_row_bytes<M>(in_f);
    float acc[MOE_NR];
    qmv_rows<M, T, MOE_NR>(w + (ulong(e) * out_f + row0) * rb, rb, nr, int(in_f),
                           x + (x_per_slot ? pair : pair / k) * in_f, lane, acc);
    if (lane == 0) {
        for (int r = 0; r < nr; ++r) yr[r] = T(acc[r]);
    }
}

// moe_ffn launch 1: h[p, rows] = silu(Wg x_t) * (Wu x_t) in float32, t = p / k.
template <typename MG, typename MU, typename T>
kernel void moe_mv_gate_up(
    device const uchar *wg [[buffer(0)]],
    device const uchar *wu [[buffer(1)]],
    device const T *x [[buffer(2)]],
    device const int *ids [[buffer(3)]],
    device float *h [[buffer(4)]],
    constant long &H [[buffer(5)]],
    constant long &I [[buffer(6)]],
    constant long &E [[buffer(7)]],
    constant long &k [[buffer(8)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]])
{
    const long pair = tg.z;
    const long row0 = (long(tg.y) * MOE_NSG + sg) * MOE_NR;
    if (row0 >= I) return;
    const int nr = int(min(long(MOE_NR), I - row0));
    const int e = ids[pair];
    if (e < 0 || e >= E) return;  // the down kernels skip this pair: its h row is never read
    const device T *xt = x + (pair / k) * H;
    const ulong rbg = moe_row_bytes<MG>(H), rbu = moe_row_bytes<MU>(H);
    float g[MOE_NR], u[MOE_NR];
    qmv_rows<MG, T, MOE_NR>(wg + (ulong(e) * I + row0) * rbg, rbg, nr, int(H), xt, lane, g);
    qmv_rows<MU, T, MOE_NR>(wu + (ulong(e) * I + row0) * rbu, rbu, nr, int(H), xt, lane, u);
    if (lane == 0) {
        for (int r = 0; r < nr; ++r) h[pair * I + row0 + r] = moe_silu(g[r]) * u[r];
    }
}

// moe_ffn launch 2: out[t, rows] = sum_s weights[t, s] * (Wd_ids[t,s] h[t * k + s]). The grid's
// z is the token and the k slots are summed in registers: no atomics, no extra launch.
template <typename M, typename T>
kernel void moe_mv_down_sum(
    device const uchar *wd [[buffer(0)]],
    device const float *h [[buffer(1)]],
    device const float *weights [[buffer(2)]],
    device const int *ids [[buffer(3)]],
    device T *out [[buffer(4)]],
    constant long &H [[buffer(5)]],
    constant long &I [[buffer(6)]],
    constant long &E [[buffer(7)]],
    constant long &k [[buffer(8)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]])
{
    const long t = tg.z;
    const long row0 = (long(tg.y) * MOE_NSG + sg) * MOE_NR;
    if (row0 >= H) return;
    const int nr = int(min(long(MOE_NR), H - row0));
    const ulong rb = moe_row_bytes<M>(I);
    float acc[MOE_NR];
    for (short r = 0; r < MOE_NR; ++r) acc[r] = 0.0f;
    for (long s = 0; s < k; ++s) {
        const long pair = t * k + s;
        const int e = ids[pair];
        if (e < 0 || e >= E) continue;
        float part[MOE_NR];
        qmv_rows<M, float, MOE_NR>(wd + (ulong(e) * H + row0) * rb, rb, nr, int(I), h + pair * I, lane, part);
        const float wt = weights[pair];
        for (short r = 0; r < MOE_NR; ++r) acc[r] += wt * part[r];
    }
    if (lane == 0) {
        for (int r = 0; r < nr; ++r) out[t * H + row0 + r] = T(acc[r]);
    }
}

// ---------------------------------------------------------------------------------------------
// Bucketing (many tokens): one threadgroup. Outputs, all of sizes fixed by (P, E):
//   starts[E]          first position of expert e's pairs in `pairs` (holds the counts first)
//   pairs[P], toks[P]  pair indices grouped by expert (ascending within one) and their tokens p / k
//   tiles[max_tiles,3] (expert, first position in pairs, pairs in tile <= MOE_TP); expert -1 past
//                      the last tile, so those threadgroups of the mat-mat grids exit at once.
// Pairs with an id outside [0, E) are left out. Every thread scans all pairs for its experts:
// P reads per expert, far cheaper than the projections that follow.

kernel void moe_bucket(
    device const int *ids [[buffer(0)]],
    device int *starts [[buffer(1)]],
    device int *pairs [[buffer(2)]],
    device int *toks [[buffer(3)]],
    device int *tiles [[buffer(4)]],
    constant long &P [[buffer(5)]],
    constant long &E [[buffer(6)]],
    constant long &k [[buffer(7)]],
    constant long &max_tiles [[buffer(8)]],
    uint tid [[thread_position_in_threadgroup]],
    uint ntg [[threads_per_threadgroup]])
{
    for (long e = tid; e < E; e += ntg) {
        int c = 0;
        for (long p = 0; p < P; ++p) c += ids[p] == e ? 1 : 0;
        starts[e] = c;
    }
    threadgroup_barrier(mem_flags::mem_device);
    if (tid == 0) {
        int off = 0;
        long nt = 0;
        for (long e = 0; e < E; ++e) {
            const int c = starts[e];
            starts[e] = off;
            for (int j = 0; j < c && nt < max_tiles; j += MOE_TP, ++nt) {
                tiles[3 * nt] = int(e);
                tiles[3 * nt + 1] = off + j;
                tiles[3 * nt + 2] = min(int(MOE_TP), c - j);
            }
            off += c;
        }
        for (; nt < max_tiles; ++nt) tiles[3 * nt] = -1;
    }
    threadgroup_barrier(mem_flags::mem_device);
    for (long e = tid; e < E; e += ntg) {
        int pos = starts[e];
        for (long p = 0; p < P; ++p) {
            if (ids[p] == e) {
                pairs[pos] = int(p);
                toks[pos] = int(p / k);
                ++pos;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Indirect mat-mat (many tokens). Grid [128, ceil(rows / QMM_N), max_tiles]: threadgroup
// (row tile, pair tile) runs qmm_tile on its expert's slab with the tile's activation rows
// gathered through `pairs` / `toks`. Unused tiles return before any barrier (whole group).

// Result element i of a qmm_tile: token i / QMM_N, row i % QMM_N; 16 per thread.
#define MOE_TILE_EACH(i, j, tid) for (short j = 0, i = tid; j < (QMM_M * QMM_N) / QMM_THREADS; ++j, i += QMM_THREADS)

// moe_qlinear: y[p, rows] = W_e x_p for the tile's pairs.
template <typename M, typename T>
kernel void moe_mm(
    device const uchar *w [[buffer(0)]],
    device const T *x [[buffer(1)]],
    device const int *pairs [[buffer(2)]],
    device const int *toks [[buffer(3)]],
    device const int *tiles [[buffer(4)]],
    device T *y [[buffer(5)]],
    constant long &in_f [[buffer(6)]],
    constant long &out_f [[buffer(7)]],
    constant long &x_per_slot [[buffer(8)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]])
{
    const int e = tiles[3 * tg.z];
    if (e < 0) return;
    const int first = tiles[3 * tg.z + 1], n = tiles[3 * tg.z + 2];
    const long row0 = long(tg.y) * QMM_N;
    const int nrows = int(min(long(QMM_N), out_f - row0));
    const ulong rb = moe_row_bytes<M>(in_f);
    threadgroup float shmem[QMM_SHMEM];
    qmm_tile<typename M::block, T>(w + (ulong(e) * out_f + row0) * rb, rb, nrows, int(in_f), x, ulong(in_f),
                                   (x_per_slot ? pairs : toks) + first, n, shmem, tid, sg);
    MOE_TILE_EACH(i, j, tid) {
        const int t = i / QMM_N, r = i % QMM_N;
        if (t < n && r < nrows) y[long(pairs[first + t]) * out_f + row0 + r] = T(shmem[i]);
    }
}

// moe_ffn launch 2: h[p, rows] = silu(Wg x_t) * (Wu x_t), float32. The gate tile is kept in
// registers (16 values per thread) while the up tile reuses the threadgroup memory.
template <typename MG, typename MU, typename T>
kernel void moe_mm_gate_up(
    device const uchar *wg [[buffer(0)]],
    device const uchar *wu [[buffer(1)]],
    device const T *x [[buffer(2)]],
    device const int *pairs [[buffer(3)]],
    device const int *toks [[buffer(4)]],
    device const int *tiles [[buffer(5)]],
    device float *h [[buffer(6)]],
    constant long &H [[buffer(7)]],
    constant long &I [[buffer(8)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]])
{
    const int e = tiles[3 * tg.z];
    if (e < 0) return;
    const int first = tiles[3 * tg.z + 1], n = tiles[3 * tg.z + 2];
    const long row0 = long(tg.y) * QMM_N;
    const int nrows = int(min(long(QMM_N), I - row0));
    const ulong rbg = moe_row_bytes<MG>(H), rbu = moe_row_bytes<MU>(H);
    threadgroup float shmem[QMM_SHMEM];
    float g[(QMM_M * QMM_N) / QMM_THREADS];
    qmm_tile<typename MG::block, T>(wg + (ulong(e) * I + row0) * rbg, rbg, nrows, int(H), x, ulong(H), toks + first, n,
                                    shmem, tid, sg);
    MOE_TILE_EACH(i, j, tid) g[j] = shmem[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    qmm_tile<typename MU::block, T>(wu + (ulong(e) * I + row0) * rbu, rbu, nrows, int(H), x, ulong(H), toks + first, n,
                                    shmem, tid, sg);
    MOE_TILE_EACH(i, j, tid) {
        const int t = i / QMM_N, r = i % QMM_N;
        if (t < n && r < nrows) h[long(pairs[first + t]) * I + row0 + r] = moe_silu(g[j]) * shmem[i];
    }
}

// moe_ffn launch 3: y[p, rows] = weights[p] * (Wd_e h[p]), float32.
template <typename M>
kernel void moe_mm_down(
    device const uchar *wd [[buffer(0)]],
    device const float *h [[buffer(1)]],
    device const int *pairs [[buffer(2)]],
    device const int *tiles [[buffer(3)]],
    device const float *weights [[buffer(4)]],
    device float *y [[buffer(5)]],
    constant long &H [[buffer(6)]],
    constant long &I [[buffer(7)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]])
{
    const int e = tiles[3 * tg.z];
    if (e < 0) return;
    const int first = tiles[3 * tg.z + 1], n = tiles[3 * tg.z + 2];
    const long row0 = long(tg.y) * QMM_N;
    const int nrows = int(min(long(QMM_N), H - row0));
    const ulong rb = moe_row_bytes<M>(I);
    threadgroup float shmem[QMM_SHMEM];
    qmm_tile<typename M::block, float>(wd + (ulong(e) * H + row0) * rb, rb, nrows, int(I), h, ulong(I), pairs + first, n,
                                       shmem, tid, sg);
    MOE_TILE_EACH(i, j, tid) {
        const int t = i / QMM_N, r = i % QMM_N;
        if (t < n && r < nrows) {
            const long p = pairs[first + t];
            y[p * H + row0 + r] = weights[p] * shmem[i];
        }
    }
}

// moe_ffn launch 4: out[t, :] = sum over the token's valid slots of y[t * k + s, :].
template <typename T>
kernel void moe_reduce(
    device const float *y [[buffer(0)]],
    device const int *ids [[buffer(1)]],
    device T *out [[buffer(2)]],
    constant long &ntok [[buffer(3)]],
    constant long &H [[buffer(4)]],
    constant long &k [[buffer(5)]],
    constant long &E [[buffer(6)]],
    uint gid [[thread_position_in_grid]])
{
    if (long(gid) >= ntok * H) return;
    const long t = gid / H, c = gid % H;
    float s = 0.0f;
    for (long j = 0; j < k; ++j) {
        const int e = ids[t * k + j];
        if (e >= 0 && e < E) s += y[(t * k + j) * H + c];
    }
    out[gid] = T(s);
}

// ---------------------------------------------------------------------------------------------
// Instantiations: the registry's "moe" types (FERRUM_TYPES_moe, from the prelude) x activation dtypes.
// Fused gate+up kernels exist for gate type == up type (what llama.cpp writes); the launcher
// falls back to two moe_mv / moe_mm launches otherwise.

#define MOE_INST_T(MT, QN, T, TN)                                                                              \
    template [[host_name("moe_mv_" #QN "_" #TN)]] kernel void moe_mv<MT, T>(                                   \
        device const uchar *, device const T *, device const int *, device T *, constant long &,              \
        constant long &, constant long &, constant long &, constant long &, uint3, ushort, ushort);            \
    template [[host_name("moe_mv_gate_up_" #QN "_" #TN)]] kernel void moe_mv_gate_up<MT, MT, T>(              \
        device const uchar *, device const uchar *, device const T *, device const int *, device float *,     \
        constant long &, constant long &, constant long &, constant long &, uint3, ushort, ushort);           \
    template [[host_name("moe_mv_down_sum_" #QN "_" #TN)]] kernel void moe_mv_down_sum<MT, T>(                 \
        device const uchar *, device const float *, device const float *, device const int *, device T *,     \
        constant long &, constant long &, constant long &, constant long &, uint3, ushort, ushort);           \
    template [[host_name("moe_mm_" #QN "_" #TN)]] kernel void moe_mm<MT, T>(                                   \
        device const uchar *, device const T *, device const int *, device const int *, device const int *,   \
        device T *, constant long &, constant long &, constant long &, uint3, ushort, ushort);                \
    template [[host_name("moe_mm_gate_up_" #QN "_" #TN)]] kernel void moe_mm_gate_up<MT, MT, T>(              \
        device const uchar *, device const uchar *, device const T *, device const int *, device const int *, \
        device const int *, device float *, constant long &, constant long &, uint3, ushort, ushort);

#define MOE_INST(MT, QN)                                                                                       \
    FERRUM_DTYPES(MOE_INST_T, mv_##MT, QN)                                                                     \
    template [[host_name("moe_mm_down_" #QN)]] kernel void moe_mm_down<mv_##MT>(                               \
        device const uchar *, device const float *, device const int *, device const int *,                   \
        device const float *, device float *, constant long &, constant long &, uint3, ushort, ushort);

FERRUM_TYPES_moe(MOE_INST)

#define MOE_INST_SMALL(a, b, T, TN)                                                                            \
    template [[host_name("moe_route_" #TN)]] kernel void moe_route<T>(                                         \
        device const T *, device float *, device int *, constant long &, constant long &, constant long &,    \
        uint2, ushort);                                                                                        \
    template [[host_name("moe_reduce_" #TN)]] kernel void moe_reduce<T>(                                       \
        device const float *, device const int *, device T *, constant long &, constant long &,               \
        constant long &, constant long &, uint);

FERRUM_DTYPES(MOE_INST_SMALL, _, _)
