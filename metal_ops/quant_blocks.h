// GGML block formats and register-level dequantization (shared by every ferrum Metal library).
//
// API (see /work/status/linear.md):
//   blk_<type>                      the block struct, byte-exact with ggml (sizeof == GGML_QUANT_SIZES[type][1])
//   QK_OF(blk) / QK16_OF(blk)       values per block / 16-value chunks per block (enum members QK, N16)
//   dequant16(const device blk*, short il, thread float *w)
//                                   values [16*il, 16*il+16) of one block, in natural order, as float.
//                                   Used by the dequantize/get_rows kernels, the small-batch mat-vec and
//                                   the mat-mat tile loader; exact (same float ops as gguf-py).
//   mv_<type>                       lane-level mat-vec traits for the m = 1 kernels (see qmatmul.h):
//                                   LPB lanes per block, each lane keeps NV activations in registers,
//                                   load() once per block, partial() once per weight row.
//
// Every block is 2-byte aligned (all sizes are even, the widest load is 16 bits), so a weight
// buffer may start at any even byte offset.

#include <metal_stdlib>
using namespace metal;

#define QK_K 256

struct blk_q4_0 { half d; uchar qs[16];                       enum { QK = 32,   N16 = 2  }; };
struct blk_q4_1 { half d; half m; uchar qs[16];               enum { QK = 32,   N16 = 2  }; };
struct blk_q5_0 { half d; uchar qh[4]; uchar qs[16];          enum { QK = 32,   N16 = 2  }; };
struct blk_q5_1 { half d; half m; uchar qh[4]; uchar qs[16];  enum { QK = 32,   N16 = 2  }; };
struct blk_q8_0 { half d; char qs[32];                        enum { QK = 32,   N16 = 2  }; };
struct blk_q2_K { uchar scales[16]; uchar qs[64]; half d; half dmin;              enum { QK = QK_K, N16 = 16 }; };
struct blk_q3_K { uchar hmask[32]; uchar qs[64]; uchar scales[12]; half d;        enum { QK = QK_K, N16 = 16 }; };
struct blk_q4_K { half d; half dmin; uchar scales[12]; uchar qs[128];             enum { QK = QK_K, N16 = 16 }; };
struct blk_q5_K { half d; half dmin; uchar scales[12]; uchar qh[32]; uchar qs[128]; enum { QK = QK_K, N16 = 16 }; };
struct blk_q6_K { uchar ql[128]; uchar qh[64]; char scales[16]; half d;           enum { QK = QK_K, N16 = 16 }; };
struct blk_iq4_nl { half d; uchar qs[16];                                       enum { QK = 32,   N16 = 2  }; };
struct blk_iq4_xs { half d; ushort scales_h; uchar scales_l[4]; uchar qs[128];  enum { QK = QK_K, N16 = 16 }; };
// Unquantized rows seen as 16-value "blocks" so the same gather/dequant kernels handle them.
struct blk_f16  { half v[16];   enum { QK = 16, N16 = 1 }; };
struct blk_bf16 { ushort v[16]; enum { QK = 16, N16 = 1 }; };

// ---------------------------------------------------------------------------------------------
// dequant16: 16 consecutive values of a block.

inline void dequant16(const device blk_q4_0 *b, short il, thread float *w) {
    const float d = b->d;
    for (short i = 0; i < 16; ++i) {
        const int q = il ? (b->qs[i] >> 4) : (b->qs[i] & 0x0F);
        w[i] = d * float(q - 8);
    }
}

inline void dequant16(const device blk_q4_1 *b, short il, thread float *w) {
    const float d = b->d, m = b->m;
    for (short i = 0; i < 16; ++i) {
        const int q = il ? (b->qs[i] >> 4) : (b->qs[i] & 0x0F);
        w[i] = d * float(q) + m;
    }
}

inline uint q5_high_bits(const device uchar *qh) {
    return uint(qh[0]) | (uint(qh[1]) << 8) | (uint(qh[2]) << 16) | (uint(qh[3]) << 24);
}

inline void dequant16(const device blk_q5_0 *b, short il, thread float *w) {
    const float d = b->d;
    const uint qh = q5_high_bits(b->qh) >> (16 * il);
    for (short i = 0; i < 16; ++i) {
        const int lo = il ? (b->qs[i] >> 4) : (b->qs[i] & 0x0F);
        const int q = lo | int(((qh >> i) & 1u) << 4);
        w[i] = d * float(q - 16);
    }
}

inline void dequant16(const device blk_q5_1 *b, short il, thread float *w) {
    const float d = b->d, m = b->m;
    const uint qh = q5_high_bits(b->qh) >> (16 * il);
    for (short i = 0; i < 16; ++i) {
        const int lo = il ? (b->qs[i] >> 4) : (b->qs[i] & 0x0F);
        const int q = lo | int(((qh >> i) & 1u) << 4);
        w[i] = d * float(q) + m;
    }
}

inline void dequant16(const device blk_q8_0 *b, short il, thread float *w) {
    const float d = b->d;
    for (short i = 0; i < 16; ++i) {
        w[i] = d * float(b->qs[16 * il + i]);
    }
}

// K-quants with 16-value sub-blocks (Q2_K, Q3_K, Q6_K): value p = 128*n + 32*j + l sits in
// byte (32*n + l) at bit pair j, and its scale index is p / 16 = il.
inline void dequant16(const device blk_q2_K *b, short il, thread float *w) {
    const short n = il / 8, j = (il % 8) / 2, l0 = 16 * (il % 2);
    const uchar sc = b->scales[il];
    const float dl = float(b->d) * float(sc & 0x0F);
    const float ml = float(b->dmin) * float(sc >> 4);
    for (short i = 0; i < 16; ++i) {
        const int q = (b->qs[32 * n + l0 + i] >> (2 * j)) & 3;
        w[i] = dl * float(q) - ml;
    }
}

inline int q3_K_scale(const device uchar *s, short is) {
    const int lo = is < 8 ? (s[is] & 0x0F) : (s[is - 8] >> 4);
    const int hi = (s[8 + is % 4] >> (2 * (is / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

inline void dequant16(const device blk_q3_K *b, short il, thread float *w) {
    const short n = il / 8, j = (il % 8) / 2, l0 = 16 * (il % 2);
    const float dl = float(b->d) * float(q3_K_scale(b->scales, il));
    const uchar hm = uchar(1 << (4 * n + j));
    for (short i = 0; i < 16; ++i) {
        const int q = ((b->qs[32 * n + l0 + i] >> (2 * j)) & 3) - ((b->hmask[l0 + i] & hm) ? 0 : 4);
        w[i] = dl * float(q);
    }
}

// Q4_K / Q5_K 6-bit scale and min of sub-block j (0..7).
inline void k4_scale_min(const device uchar *s, short j, thread float &sc, thread float &mn) {
    if (j < 4) {
        sc = float(s[j] & 63);
        mn = float(s[j + 4] & 63);
    } else {
        sc = float((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        mn = float((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

inline void dequant16(const device blk_q4_K *b, short il, thread float *w) {
    const short j = il / 2, l0 = 16 * (il % 2);
    float sc, mn;
    k4_scale_min(b->scales, j, sc, mn);
    const float dl = float(b->d) * sc, ml = float(b->dmin) * mn;
    const device uchar *q = b->qs + 32 * (j / 2) + l0;
    for (short i = 0; i < 16; ++i) {
        const int v = (j & 1) ? (q[i] >> 4) : (q[i] & 0x0F);
        w[i] = dl * float(v) - ml;
    }
}

inline void dequant16(const device blk_q5_K *b, short il, thread float *w) {
    const short j = il / 2, l0 = 16 * (il % 2);
    float sc, mn;
    k4_scale_min(b->scales, j, sc, mn);
    const float dl = float(b->d) * sc, ml = float(b->dmin) * mn;
    const device uchar *q = b->qs + 32 * (j / 2) + l0;
    for (short i = 0; i < 16; ++i) {
        const int v = ((j & 1) ? (q[i] >> 4) : (q[i] & 0x0F)) | (((b->qh[l0 + i] >> j) & 1) << 4);
        w[i] = dl * float(v) - ml;
    }
}

inline void dequant16(const device blk_q6_K *b, short il, thread float *w) {
    const short n = il / 8, k = (il % 8) / 2, l0 = 16 * (il % 2);
    const float dl = float(b->d) * float(b->scales[il]);
    const device uchar *ql = b->ql + 64 * n + 32 * (k & 1) + l0;
    const device uchar *qh = b->qh + 32 * n + l0;
    for (short i = 0; i < 16; ++i) {
        const int lo = (k & 2) ? (ql[i] >> 4) : (ql[i] & 0x0F);
        const int q = (lo | (((qh[i] >> (2 * k)) & 3) << 4)) - 32;
        w[i] = dl * float(q);
    }
}

// The 16 non-linear levels IQ4_NL / IQ4_XS nibbles index (ggml's kvalues_iq4nl).
constant float iq4nl_levels[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                                   1.f,    13.f,   25.f,  38.f,  53.f,  69.f,  89.f,  113.f};

inline void dequant16(const device blk_iq4_nl *b, short il, thread float *w) {
    const float d = b->d;
    for (short i = 0; i < 16; ++i) w[i] = d * iq4nl_levels[il ? (b->qs[i] >> 4) : (b->qs[i] & 0x0F)];
}

// IQ4_XS: sub-block j (32 values, il = 2j + half) has a 6-bit scale (4 low bits in scales_l, 2 high
// bits in scales_h), offset by 32; its 16 qs bytes hold values 0..15 (low nibbles) and 16..31 (high).
inline void dequant16(const device blk_iq4_xs *b, short il, thread float *w) {
    const short j = il / 2;
    const int ls = ((b->scales_l[j / 2] >> (4 * (j % 2))) & 0x0F) | (((b->scales_h >> (2 * j)) & 3) << 4);
    const float dl = float(b->d) * float(ls - 32);
    const device uchar *q = b->qs + 16 * j;
    for (short i = 0; i < 16; ++i) w[i] = dl * iq4nl_levels[(il & 1) ? (q[i] >> 4) : (q[i] & 0x0F)];
}

inline void dequant16(const device blk_f16 *b, short il, thread float *w) {
    for (short i = 0; i < 16; ++i) w[i] = float(b->v[i]);
}

inline void dequant16(const device blk_bf16 *b, short il, thread float *w) {
    for (short i = 0; i < 16; ++i) w[i] = as_type<float>(uint(b->v[i]) << 16);
}

// ---------------------------------------------------------------------------------------------
// Mat-vec traits for m = 1 (decode). A simdgroup walks K with LPB lanes per block and 32/LPB
// blocks per step; each lane loads its NV activations of the block once (load) and reuses them
// for every weight row it computes (dot). Nibbles are isolated with masks, never shifted: the
// 1/16, 1/256, 1/4096 place values are applied once to the sums. Min / offset terms are folded
// into per-sub-block activation sums (sy), so a dot is a handful of FMAs per weight byte.

// Q4_K: lane part p = 4*iq + ir covers sub-blocks {2iq, 2iq+1, 2iq+4, 2iq+5}, positions
// 8ir..8ir+7 of each: 16 bytes of qs (two runs of 8, read as 16-bit words) -> 32 weights.
struct mv_q4_K {
    typedef blk_q4_K block;
    enum { QK = QK_K, LPB = 8, NV = 32 };
    struct acts { float v[32]; float sy[4]; };

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) {
        const short iq = p / 4, ir = p % 4;
        const device T *y = yb + 64 * iq + 8 * ir;
        for (short g = 0; g < 4; ++g) {
            // g: 0 -> +0, 1 -> +32, 2 -> +128, 3 -> +160
            const short off = 32 * (g & 1) + 128 * (g >> 1);
            float s = 0.f;
            for (short i = 0; i < 8; ++i) { a.v[8 * g + i] = float(y[off + i]); s += a.v[8 * g + i]; }
            a.sy[g] = s;
        }
    }

    // Sum over one 8-byte run: lo = sub-block of the low nibbles, hi = of the high nibbles.
    static float2 nibble_sums(const device ushort *q, thread const float *vlo, thread const float *vhi) {
        float e0 = 0.f, o0 = 0.f, e1 = 0.f, o1 = 0.f;
        for (short i = 0; i < 4; ++i) {
            const ushort w = q[i];
            e0 += vlo[2 * i] * float(w & 0x000F);
            o0 += vlo[2 * i + 1] * float(w & 0x0F00);
            e1 += vhi[2 * i] * float(w & 0x00F0);
            o1 += vhi[2 * i + 1] * float(w & 0xF000);
        }
        return float2(e0 + o0 * (1.f / 256.f), (e1 + o1 * (1.f / 256.f)) * (1.f / 16.f));
    }

    // Scales/mins of sub-blocks (2iq, 2iq+1) in .xy and (2iq+4, 2iq+5) in .zw.
    static void scales(const device uchar *s8, short iq, thread float4 &sc, thread float4 &mn) {
        const device ushort *s = (const device ushort *)s8;
        const ushort a = s[iq], b = s[2 + iq], c = s[4 + iq];
        const ushort sl = a & 0x3F3F, ml = b & 0x3F3F;
        const ushort sh = (c & 0x0F0F) | ((a & 0xC0C0) >> 2);
        const ushort mh = ((c >> 4) & 0x0F0F) | ((b & 0xC0C0) >> 2);
        sc = float4(float(sl & 0xFF), float(sl >> 8), float(sh & 0xFF), float(sh >> 8));
        mn = float4(float(ml & 0xFF), float(ml >> 8), float(mh & 0xFF), float(mh >> 8));
    }

    static float partial(const device block *b, short p, thread const acts &a) {
        const short iq = p / 4, ir = p % 4;
        const device ushort *q = (const device ushort *)(b->qs + 32 * iq + 8 * ir);
        const float2 s01 = nibble_sums(q, a.v, a.v + 8);
        const float2 s45 = nibble_sums(q + 32, a.v + 16, a.v + 24);
        float4 sc, mn;
        scales(b->scales, iq, sc, mn);
        const float4 qsum = float4(s01.x, s01.y, s45.x, s45.y);
        return float(b->d) * dot(sc, qsum) - float(b->dmin) * dot(mn, float4(a.sy[0], a.sy[1], a.sy[2], a.sy[3]));
    }
};

// Q5_K: Q4_K's nibbles plus a fifth bit, qh[l] bit j for sub-block j: added as 16 * (sum of the
// activations whose bit is set), selected by mask.
struct mv_q5_K {
    typedef blk_q5_K block;
    enum { QK = QK_K, LPB = 8, NV = 32 };
    typedef mv_q4_K::acts acts;

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) { mv_q4_K::load(yb, p, a); }

    static float partial(const device block *b, short p, thread const acts &a) {
        const short iq = p / 4, ir = p % 4;
        const device ushort *q = (const device ushort *)(b->qs + 32 * iq + 8 * ir);
        const float2 s01 = mv_q4_K::nibble_sums(q, a.v, a.v + 8);
        const float2 s45 = mv_q4_K::nibble_sums(q + 32, a.v + 16, a.v + 24);
        const uchar m0 = uchar(1 << (2 * iq)), m1 = uchar(2 << (2 * iq)), m4 = uchar(16 << (2 * iq)), m5 = uchar(32 << (2 * iq));
        float4 h = float4(0.f);
        const device uchar *qh = b->qh + 8 * ir;
        for (short i = 0; i < 8; ++i) {
            const uchar x = qh[i];
            h[0] += (x & m0) ? a.v[i] : 0.f;
            h[1] += (x & m1) ? a.v[8 + i] : 0.f;
            h[2] += (x & m4) ? a.v[16 + i] : 0.f;
            h[3] += (x & m5) ? a.v[24 + i] : 0.f;
        }
        float4 sc, mn;
        mv_q4_K::scales(b->scales, iq, sc, mn);
        const float4 qsum = float4(s01.x, s01.y, s45.x, s45.y) + 16.f * h;
        return float(b->d) * dot(sc, qsum) - float(b->dmin) * dot(mn, float4(a.sy[0], a.sy[1], a.sy[2], a.sy[3]));
    }
};

// Q6_K: lane part p = 4*n + lq covers positions 128n + 32k + 8lq .. +7 for k = 0..3 (one scale
// each): 8 bytes of each ql run and 8 bytes of qh -> 32 weights. The -32 offset is folded into
// the activation sums.
struct mv_q6_K {
    typedef blk_q6_K block;
    enum { QK = QK_K, LPB = 8, NV = 32 };
    struct acts { float v[32]; float sy[4]; };

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) {
        const device T *y = yb + 128 * (p / 4) + 8 * (p % 4);
        for (short k = 0; k < 4; ++k) {
            float s = 0.f;
            for (short i = 0; i < 8; ++i) { a.v[8 * k + i] = float(y[32 * k + i]); s += a.v[8 * k + i]; }
            a.sy[k] = s;
        }
    }

    static float partial(const device block *b, short p, thread const acts &a) {
        const short n = p / 4, lq = p % 4;
        const device uchar *qa = b->ql + 64 * n + 8 * lq;
        const device uchar *qb = qa + 32;
        const device uchar *qh = b->qh + 32 * n + 8 * lq;
        float4 lo = float4(0.f), hi = float4(0.f);
        for (short i = 0; i < 8; ++i) {
            const uchar x = qa[i], z = qb[i], h = qh[i];
            lo[0] += a.v[i] * float(x & 0x0F);
            lo[1] += a.v[8 + i] * float(z & 0x0F);
            lo[2] += a.v[16 + i] * float(x & 0xF0);
            lo[3] += a.v[24 + i] * float(z & 0xF0);
            hi[0] += a.v[i] * float(h & 0x03);
            hi[1] += a.v[8 + i] * float(h & 0x0C);
            hi[2] += a.v[16 + i] * float(h & 0x30);
            hi[3] += a.v[24 + i] * float(h & 0xC0);
        }
        const float4 q = lo * float4(1.f, 1.f, 1.f / 16.f, 1.f / 16.f) + hi * float4(16.f, 4.f, 1.f, 0.25f);
        const device char *s = b->scales + 8 * n + lq / 2;
        const float4 sc = float4(float(s[0]), float(s[2]), float(s[4]), float(s[6]));
        return float(b->d) * dot(sc, q - 32.f * float4(a.sy[0], a.sy[1], a.sy[2], a.sy[3]));
    }
};

// Q8_0: 4 lanes per block, 8 values each.
struct mv_q8_0 {
    typedef blk_q8_0 block;
    enum { QK = 32, LPB = 4, NV = 8 };
    struct acts { float v[8]; };

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) {
        for (short i = 0; i < 8; ++i) a.v[i] = float(yb[8 * p + i]);
    }

    static float partial(const device block *b, short p, thread const acts &a) {
        const device char *q = b->qs + 8 * p;
        float s = 0.f;
        for (short i = 0; i < 8; ++i) s += a.v[i] * float(q[i]);
        return float(b->d) * s;
    }
};

// Q4_0 / Q5_0: 2 lanes per block; lane p covers bytes 8p..8p+7 -> values 8p+i (low nibbles)
// and 16+8p+i (high nibbles).
struct mv_q4_0 {
    typedef blk_q4_0 block;
    enum { QK = 32, LPB = 2, NV = 16 };
    struct acts { float v[16]; float sy; };

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) {
        float s = 0.f;
        for (short i = 0; i < 8; ++i) {
            a.v[i] = float(yb[8 * p + i]);
            a.v[8 + i] = float(yb[16 + 8 * p + i]);
            s += a.v[i] + a.v[8 + i];
        }
        a.sy = s;
    }

    static float nibbles(const device uchar *qs, short p, thread const acts &a) {
        const device ushort *q = (const device ushort *)(qs + 8 * p);
        const float2 s = mv_q4_K::nibble_sums(q, a.v, a.v + 8);
        return s.x + s.y;
    }

    static float partial(const device block *b, short p, thread const acts &a) {
        return float(b->d) * (nibbles(b->qs, p, a) - 8.f * a.sy);
    }
};

// Sum of the activations whose fifth bit (qh bit p, p = position in the 32-block) is set.
inline float q5_high_sum(const device uchar *qh8, short p, thread const float *v) {
    const device ushort *h16 = (const device ushort *)qh8;
    const uint qh = uint(h16[0]) | (uint(h16[1]) << 16);
    float h = 0.f;
    for (short i = 0; i < 8; ++i) {
        h += (qh & (1u << (8 * p + i))) ? v[i] : 0.f;
        h += (qh & (1u << (16 + 8 * p + i))) ? v[8 + i] : 0.f;
    }
    return h;
}

struct mv_q5_0 {
    typedef blk_q5_0 block;
    enum { QK = 32, LPB = 2, NV = 16 };
    typedef mv_q4_0::acts acts;

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) { mv_q4_0::load(yb, p, a); }

    static float partial(const device block *b, short p, thread const acts &a) {
        return float(b->d) * (mv_q4_0::nibbles(b->qs, p, a) + 16.f * q5_high_sum(b->qh, p, a.v) - 16.f * a.sy);
    }
};

// Q4_1 / Q5_1: w = d*q + m, so the offset term is m * (sum of the activations).
struct mv_q4_1 {
    typedef blk_q4_1 block;
    enum { QK = 32, LPB = 2, NV = 16 };
    typedef mv_q4_0::acts acts;

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) { mv_q4_0::load(yb, p, a); }

    static float partial(const device block *b, short p, thread const acts &a) {
        return float(b->d) * mv_q4_0::nibbles(b->qs, p, a) + float(b->m) * a.sy;
    }
};

struct mv_q5_1 {
    typedef blk_q5_1 block;
    enum { QK = 32, LPB = 2, NV = 16 };
    typedef mv_q4_0::acts acts;

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) { mv_q4_0::load(yb, p, a); }

    static float partial(const device block *b, short p, thread const acts &a) {
        return float(b->d) * (mv_q4_0::nibbles(b->qs, p, a) + 16.f * q5_high_sum(b->qh, p, a.v)) + float(b->m) * a.sy;
    }
};

// Q2_K / Q3_K: same lane layout as Q6_K (part p = 4*n + lq, positions 128n + 32k + 8lq + i,
// scale index 8n + 2k + lq/2). The 2-bit field k is isolated by the mask 3 << 2k and its place
// value 4^k removed once per sum.
struct mv_q2_K {
    typedef blk_q2_K block;
    enum { QK = QK_K, LPB = 8, NV = 32 };
    typedef mv_q6_K::acts acts;

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) { mv_q6_K::load(yb, p, a); }

    static float partial(const device block *b, short p, thread const acts &a) {
        const short n = p / 4, lq = p % 4;
        const device uchar *q = b->qs + 32 * n + 8 * lq;
        float4 s = float4(0.f);
        for (short i = 0; i < 8; ++i) {
            const uchar x = q[i];
            s[0] += a.v[i] * float(x & 0x03);
            s[1] += a.v[8 + i] * float(x & 0x0C);
            s[2] += a.v[16 + i] * float(x & 0x30);
            s[3] += a.v[24 + i] * float(x & 0xC0);
        }
        s *= float4(1.f, 0.25f, 1.f / 16.f, 1.f / 64.f);
        const device uchar *sc8 = b->scales + 8 * n + lq / 2;
        const float4 sc = float4(float(sc8[0] & 0x0F), float(sc8[2] & 0x0F), float(sc8[4] & 0x0F), float(sc8[6] & 0x0F));
        const float4 mn = float4(float(sc8[0] >> 4), float(sc8[2] >> 4), float(sc8[4] >> 4), float(sc8[6] >> 4));
        return float(b->d) * dot(sc, s) - float(b->dmin) * dot(mn, float4(a.sy[0], a.sy[1], a.sy[2], a.sy[3]));
    }
};

struct mv_q3_K {
    typedef blk_q3_K block;
    enum { QK = QK_K, LPB = 8, NV = 32 };
    typedef mv_q6_K::acts acts;

    template <typename T>
    static void load(const device T *yb, short p, thread acts &a) { mv_q6_K::load(yb, p, a); }

    static float partial(const device block *b, short p, thread const acts &a) {
        const short n = p / 4, lq = p % 4;
        const device uchar *q = b->qs + 32 * n + 8 * lq;
        const device uchar *hm = b->hmask + 8 * lq;
        const uchar h0 = uchar(1 << (4 * n)), h1 = uchar(2 << (4 * n)), h2 = uchar(4 << (4 * n)), h3 = uchar(8 << (4 * n));
        float4 s = float4(0.f), h = float4(0.f);
        for (short i = 0; i < 8; ++i) {
            const uchar x = q[i], m = hm[i];
            s[0] += a.v[i] * float(x & 0x03);
            s[1] += a.v[8 + i] * float(x & 0x0C);
            s[2] += a.v[16 + i] * float(x & 0x30);
            s[3] += a.v[24 + i] * float(x & 0xC0);
            h[0] += (m & h0) ? a.v[i] : 0.f;
            h[1] += (m & h1) ? a.v[8 + i] : 0.f;
            h[2] += (m & h2) ? a.v[16 + i] : 0.f;
            h[3] += (m & h3) ? a.v[24 + i] : 0.f;
        }
        // q = low2 - 4 unless the hmask bit is set: sum = s - 4 * (sy - h)
        const float4 sy = float4(a.sy[0], a.sy[1], a.sy[2], a.sy[3]);
        s = s * float4(1.f, 0.25f, 1.f / 16.f, 1.f / 64.f) - 4.f * (sy - h);
        const short is = 8 * n + lq / 2;
        const float4 sc = float4(float(q3_K_scale(b->scales, is)), float(q3_K_scale(b->scales, is + 2)),
                                 float(q3_K_scale(b->scales, is + 4)), float(q3_K_scale(b->scales, is + 6)));
        return float(b->d) * dot(sc, s);
    }
};
