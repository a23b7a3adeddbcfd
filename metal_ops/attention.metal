// ferrum::decode_attention on MPS: attention of a few new queries over a preallocated K/V cache,
// flash-decoding style (quant_blocks.h and qmatmul.h are prepended but not used here).
//
// Launch 1, attn_split_<dt>: threads [ATT_THREADS, nsplit, B * T * Hkv * nhg], group [ATT_THREADS, 1, 1].
//   One threadgroup = (batch b, query t, kv head, group of hg <= ATT_HMAX query heads of that kv head,
//   split). Query t sits at cache slot p = pos[t] and sees the slots [lo, p] (lo = p - window + 1 with
//   a window), minus those whose attention_mask is 0 (slot p itself always stays; slots past the
//   mask's length stay too). That range is cut
//   into nsplit equal chunks (of at least one block) on the GPU, so no slot past p (the unused tail of the cache) and none
//   before the window is ever read, and no host sync is needed to know p.
//   Per step of ATT_BLOCK = 128 keys, thread i owns key i: its K row is read once (by 4 lanes,
//   coalesced) and dotted with all hg query heads (GQA without repeating K/V), then online softmax in float32 (running max m and sum
//   l per head, kept identically in every thread), then thread i owns (head, dim) outputs
//   i, i + 128, ... and reads each V row once for all heads (coalesced along D).
//   direct = 1 (one split): normalises and writes out [B, T, Hq * D] itself: one launch in all.
//   Else it writes the unnormalised partial output and (m, l) per split for launch 2.
// Launch 2, attn_reduce_<dt>: threads [ATT_RTHREADS, B * T * Hq], group [ATT_RTHREADS, 1]: one
//   threadgroup per output row merges the nsplit partials (weights exp(m_i - max m)); an empty split
//   (a short context in a long cache) writes only l = 0 and its output is never read.
// "No score yet" is a large finite negative, never -inf: Metal may compile with fast math, under
// which infinities are not guaranteed to compare or propagate.

// ATT_THREADS, ATT_BLOCK, ATT_HMAX, ATT_DMAX, ATT_RTHREADS come from the prelude (ferrum_mps.kernels.GEOMETRY).
#define ATT_NSG (ATT_THREADS / 32)
#define ATT_ACC ((ATT_HMAX * ATT_DMAX) / ATT_THREADS)
#define ATT_NEG (-3.0e38f)

inline bool attn_keep(device const uchar *mask, long esize, long row, long s) {
    device const uchar *e = mask + (row + s) * esize;
    uchar any = 0;
    for (long i = 0; i < esize; ++i) any |= e[i];
    return any != 0;
}

template <typename T>
kernel void attn_split(
    device const T *q [[buffer(0)]],
    device const T *kc [[buffer(1)]],
    device const T *vc [[buffer(2)]],
    device const long *pos [[buffer(3)]],
    device const uchar *mask [[buffer(4)]],
    device T *out [[buffer(5)]],
    device float *part_o [[buffer(6)]],
    device float *part_ml [[buffer(7)]],
    constant long &Tn [[buffer(8)]],
    constant long &Hq [[buffer(9)]],
    constant long &Hkv [[buffer(10)]],
    constant long &S [[buffer(11)]],
    constant long &D [[buffer(12)]],
    constant long &hg [[buffer(13)]],
    constant long &nsplit [[buffer(14)]],
    constant long &window [[buffer(15)]],
    constant long &mask_len [[buffer(16)]],
    constant long &mask_esize [[buffer(17)]],
    constant long &direct [[buffer(18)]],
    constant float &scale [[buffer(19)]],
    uint3 tg [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]])
{
    threadgroup float qs[ATT_HMAX * ATT_DMAX];   // scaled queries, float
    threadgroup float ps[ATT_HMAX * ATT_BLOCK];  // probabilities of the current block
    threadgroup float red[2 * ATT_NSG * ATT_HMAX];  // per simdgroup: block max, block sum

    const long G = Hq / Hkv, nhg = (G + hg - 1) / hg;
    long z = tg.z;
    const long g0 = (z % nhg) * hg;
    z /= nhg;
    const long kvh = z % Hkv;
    z /= Hkv;
    const long t = z % Tn, b = z / Tn;
    const long split = tg.y;
    const int nh = int(min(hg, G - g0));
    const long h0 = kvh * G + g0;  // first query head of this group

    const long p = pos[t];
    const bool p_ok = p >= 0 && p < S;
    const long lo = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
    const long n = p_ok ? p + 1 - lo : 0;
    const long chunk = max((n + nsplit - 1) / nsplit, long(ATT_BLOCK));  // a short context leaves splits empty
    const long s_begin = lo + split * chunk;
    const long s_end = min(lo + n, s_begin + chunk);

    if (s_begin < s_end) {  // uniform over the threadgroup
        for (int i = tid; i < nh * int(D); i += ATT_THREADS) {
            const int h = i / int(D), d = i % int(D);
            qs[i] = scale * float(q[(((b * Hq) + h0 + h) * Tn + t) * D + d]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    device const T *kb = kc + (b * Hkv + kvh) * S * D;
    device const T *vb = vc + (b * Hkv + kvh) * S * D;
    const long mrow = b * mask_len;
    float m_run[ATT_HMAX], l_run[ATT_HMAX], acc[ATT_ACC];
    for (int h = 0; h < ATT_HMAX; ++h) { m_run[h] = ATT_NEG; l_run[h] = 0.f; }
    for (int i = 0; i < ATT_ACC; ++i) acc[i] = 0.f;
    const int nitems = nh * int(D);

    for (long s0 = s_begin; s0 < s_end; s0 += ATT_BLOCK) {
        const int nv = int(min(long(ATT_BLOCK), s_end - s0));
        // 1. scores. Thread tid ends with the scores of key s0 + tid for every head of the group, but
        //    K is read coalesced: 4 lanes per key, lane part c reads elements 16i + 4c .. +3 (a quad
        //    reads 16 contiguous values), 8 keys per pass and 4 passes per simdgroup; the quad's partial
        //    sums meet by 2 xor shuffles and go to the key's owner lane by one shuffle.
        const long s = s0 + tid;
        const bool valid = tid < nv && (s == p || mask_esize == 0 || s >= mask_len || attn_keep(mask, mask_esize, mrow, s));
        float sc[ATT_HMAX];
        for (int h = 0; h < ATT_HMAX; ++h) sc[h] = 0.f;
        const short c = lane % 4;
        for (short r = 0; r < 4; ++r) {
            const int kk = 32 * sg + 8 * r + lane / 4;  // this quad's key in the block
            float part[ATT_HMAX];
            for (int h = 0; h < ATT_HMAX; ++h) part[h] = 0.f;
            if (kk < nv) {
                device const T *kr = kb + (s0 + kk) * D + 4 * c;
                for (int d0 = 0; d0 < int(D); d0 += 16) {
                    const float k0 = float(kr[d0]), k1 = float(kr[d0 + 1]), k2 = float(kr[d0 + 2]), k3 = float(kr[d0 + 3]);
                    for (int h = 0; h < nh; ++h) {
                        threadgroup const float *qh = qs + h * int(D) + d0 + 4 * c;
                        part[h] += qh[0] * k0 + qh[1] * k1 + qh[2] * k2 + qh[3] * k3;
                    }
                }
            }
            for (int h = 0; h < nh; ++h) {
                float x = part[h];
                x += simd_shuffle_xor(x, ushort(1));
                x += simd_shuffle_xor(x, ushort(2));
                x = simd_shuffle(x, ushort(4 * (lane % 8)));  // lane L of pass L / 8 owns key 8 (L / 8) + L % 8
                if (lane / 8 == r) sc[h] = x;
            }
        }
        for (int h = 0; h < nh; ++h) {
            if (!valid) sc[h] = ATT_NEG;
            const float mx = simd_max(sc[h]);
            if (lane == 0) red[sg * ATT_HMAX + h] = mx;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        // 2. new running max, probabilities, block sums
        float alpha[ATT_HMAX];
        for (int h = 0; h < nh; ++h) {
            float m_new = m_run[h];
            for (int j = 0; j < ATT_NSG; ++j) m_new = max(m_new, red[j * ATT_HMAX + h]);
            alpha[h] = exp(m_run[h] - m_new);  // 0 after ATT_NEG, 1 while nothing is valid yet
            m_run[h] = m_new;
            const float pr = valid ? exp(sc[h] - m_new) : 0.f;
            ps[h * ATT_BLOCK + tid] = pr;
            const float sm = simd_sum(pr);
            if (lane == 0) red[(ATT_NSG + sg) * ATT_HMAX + h] = sm;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int h = 0; h < nh; ++h) {
            float sm = 0.f;
            for (int j = 0; j < ATT_NSG; ++j) sm += red[(ATT_NSG + j) * ATT_HMAX + h];
            l_run[h] = l_run[h] * alpha[h] + sm;
        }
        // 3. output += P V: item i = h * D + d, V row read once for the heads
        for (int k = 0; k < ATT_ACC; ++k) {
            const int i = tid + k * ATT_THREADS;
            if (i >= nitems) break;
            const int h = i / int(D), d = i % int(D);
            float a = acc[k] * alpha[h];
            threadgroup const float *ph = ps + h * ATT_BLOCK;
            device const T *vcol = vb + s0 * D + d;
            for (int j = 0; j < nv; ++j) a += ph[j] * float(vcol[long(j) * D]);
            acc[k] = a;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    const long row = (b * Tn + t) * Hq + h0;  // output row of head h0 (heads of a row are contiguous)
    const bool empty = s_begin >= s_end;  // l = 0 tells the reduce to skip this split's output
    for (int k = 0; k < ATT_ACC && !(empty && !direct); ++k) {
        const int i = tid + k * ATT_THREADS;
        if (i >= nitems) break;
        const int h = i / int(D), d = i % int(D);
        if (direct) {
            out[(b * Tn + t) * Hq * D + (h0 + h) * D + d] = T(l_run[h] > 0.f ? acc[k] / l_run[h] : 0.f);
        } else {
            part_o[((row + h) * nsplit + split) * D + d] = acc[k];
        }
    }
    if (!direct && tid < nh) {
        part_ml[((row + tid) * nsplit + split) * 2] = m_run[tid];
        part_ml[((row + tid) * nsplit + split) * 2 + 1] = l_run[tid];
    }
}

template <typename T>
kernel void attn_reduce(
    device const float *part_o [[buffer(0)]],
    device const float *part_ml [[buffer(1)]],
    device T *out [[buffer(2)]],
    constant long &D [[buffer(3)]],
    constant long &nsplit [[buffer(4)]],
    uint2 tg [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]])
{
    const long row = tg.y;  // (b * T + t) * Hq + h: also the row of out viewed as [B * T * Hq, D]
    device const float *ml = part_ml + row * nsplit * 2;
    float mg = ATT_NEG;
    for (long i = 0; i < nsplit; ++i) mg = max(mg, ml[2 * i]);
    float l = 0.f;
    for (long i = 0; i < nsplit; ++i) l += exp(ml[2 * i] - mg) * ml[2 * i + 1];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (long d = tid; d < D; d += ATT_RTHREADS) {
        float o = 0.f;
        for (long i = 0; i < nsplit; ++i)
            if (ml[2 * i + 1] > 0.f) o += exp(ml[2 * i] - mg) * part_o[(row * nsplit + i) * D + d];
        out[row * D + d] = T(o * inv);
    }
}

#define ATT_INST(T, TN)                                                                                       \
    template [[host_name("attn_split_" #TN)]] kernel void attn_split<T>(                                      \
        device const T *, device const T *, device const T *, device const long *, device const uchar *,     \
        device T *, device float *, device float *, constant long &, constant long &, constant long &,       \
        constant long &, constant long &, constant long &, constant long &, constant long &, constant long &, \
        constant long &, constant long &, constant float &, uint3, ushort, ushort, ushort);                  \
    template [[host_name("attn_reduce_" #TN)]] kernel void attn_reduce<T>(                                    \
        device const float *, device const float *, device T *, constant long &, constant long &, uint2, ushort);

ATT_INST(float, f32)
ATT_INST(half, f16)
#if defined(__HAVE_BFLOAT__)
ATT_INST(bfloat, bf16)
#endif
