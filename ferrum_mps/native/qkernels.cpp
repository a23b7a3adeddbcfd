// Native CPU kernels for GGML-quantized weights: y = x @ W.T on raw GGUF blocks.
//
// Built on first use by ferrum_mps/native/__init__.py, once per instruction-set level
// (baseline / x86-64-v3 / x86-64-v4 / aarch64+dotprod), never for the build machine's own CPU,
// and loaded with ctypes (which releases the GIL around every call).
//
// Scheme (llama.cpp's): each activation row is quantized once to int8, in blocks of 32 with a
// float scale (plus d * code sums per 16 values) for the 32-value block formats, and in blocks of
// 256 with one scale and int16 code sums per 16 (Q8_K) for the K-quants. 32-value formats: each
// weight row is unpacked into int8 codes with a float scale and offset per 16 values (value =
// d16 * q + m16), integer dots per 32 values times the two float scales; Q8_0 is read in place.
// K-quants: integer sub-block scales times exact integer dots, one float step per 256 values (see
// "K-quants"). One activation row (decode) runs fused kernels straight from the raw blocks; more
// rows unpack each weight row once into L1 and reuse it for every activation row (the mat-mat,
// prefill blocking); an MoE call runs the same loop per expert over only the (token, slot) pairs
// routed to that expert. Every path of a type gives the same bits for a row, whatever the batch.
//
// The decode plans at the end run a whole model's one-token step in one call.
//
// No C++ runtime library is used (plain pthreads and malloc): the ziglang compiler builds
// with -nostdlib++ in seconds instead of compiling libc++ first.

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <unistd.h>
#include <time.h>

// fm::atomic without <atomic>: -nostdlib++ drops the C++ headers; the builtins are the same code.
namespace fm {
enum memory_order { memory_order_relaxed = __ATOMIC_RELAXED, memory_order_acquire = __ATOMIC_ACQUIRE,
                    memory_order_release = __ATOMIC_RELEASE, memory_order_acq_rel = __ATOMIC_ACQ_REL,
                    memory_order_seq_cst = __ATOMIC_SEQ_CST };
template <class T>
struct atomic {
    T v;
    atomic() : v() {}
    atomic(T x) : v(x) {}
    T load(memory_order o = memory_order_seq_cst) const { return __atomic_load_n(&v, o); }
    void store(T x, memory_order o = memory_order_seq_cst) { __atomic_store_n(&v, x, o); }
    T fetch_add(T x, memory_order o = memory_order_seq_cst) { return __atomic_fetch_add(&v, x, o); }
    T fetch_sub(T x, memory_order o = memory_order_seq_cst) { return __atomic_fetch_sub(&v, x, o); }
};
}  // namespace fm

#if defined(__AVX2__) || defined(__F16C__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#define FM_EXPORT extern "C" __attribute__((visibility("default")))

// 64-byte aligned buffers (free() releases them): a 64-byte load from a 16-byte aligned malloc
// block splits two cache lines every time.
static void* amalloc(size_t n) {
    void* p = nullptr;
    return posix_memalign(&p, 64, n ? n : 64) == 0 ? p : nullptr;
}

// ---------------------------------------------------------------------------- fp16

static float fp16_soft(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 1024)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if !defined(__F16C__) && !defined(__aarch64__)
static float g_fp16_table[65536];
static fm::atomic<int> g_fp16_ready{0};
static void fp16_init() {
    if (g_fp16_ready.load(fm::memory_order_acquire)) return;
    for (uint32_t i = 0; i < 65536; i++) g_fp16_table[i] = fp16_soft((uint16_t)i);
    g_fp16_ready.store(1, fm::memory_order_release);
}
#else
static void fp16_init() {}
#endif

static inline float h2f(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#else
    return g_fp16_table[h];
#endif
}

// ---------------------------------------------------------------------------- formats

enum {
    T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
};

struct Format {
    int block;    // values per block
    int bytes;    // bytes per block
    int has_min;  // value = d16 * q + m16 with m16 != 0
};

static bool format_of(int t, Format* f) {
    switch (t) {
        case T_Q4_0: *f = {32, 18, 0}; return true;
        case T_Q4_1: *f = {32, 20, 1}; return true;
        case T_Q5_0: *f = {32, 22, 0}; return true;
        case T_Q5_1: *f = {32, 24, 1}; return true;
        case T_Q8_0: *f = {32, 34, 0}; return true;
        case T_Q2_K: *f = {256, 84, 1}; return true;
        case T_Q3_K: *f = {256, 110, 0}; return true;
        case T_Q4_K: *f = {256, 144, 1}; return true;
        case T_Q5_K: *f = {256, 176, 1}; return true;
        case T_Q6_K: *f = {256, 210, 0}; return true;
        default: return false;
    }
}

// Unpack one row of `nb` blocks: codes q[k] (int8), d16[k/16], m16[k/16] (float).
// Element order is GGML's (gguf-py's dequantize order).

static void unpack_q4_0(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float*) {
    for (int64_t b = 0; b < nb; b++, r += 18, q += 32) {
        const float d = h2f(r);
        const uint8_t* qs = r + 2;
        for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)((qs[j] & 15) - 8);
            q[j + 16] = (int8_t)((qs[j] >> 4) - 8);
        }
        d16[2 * b] = d16[2 * b + 1] = d;
    }
}

static void unpack_q4_1(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float* m16) {
    for (int64_t b = 0; b < nb; b++, r += 20, q += 32) {
        const float d = h2f(r), m = h2f(r + 2);
        const uint8_t* qs = r + 4;
        for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(qs[j] & 15);
            q[j + 16] = (int8_t)(qs[j] >> 4);
        }
        d16[2 * b] = d16[2 * b + 1] = d;
        m16[2 * b] = m16[2 * b + 1] = m;
    }
}

static inline void q5_codes(const uint8_t* qs, uint32_t qh, int8_t* q, int off) {
#if defined(__AVX2__)
    // 32 high bits spread to 32 bytes (bit j -> byte j): shuffle the 4 bytes, test each bit.
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bitm = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    v = _mm256_or_si256(v, bitm);
    v = _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));  // 0xff where the bit is set
    __m256i hi = _mm256_and_si256(v, _mm256_set1_epi8(16));
    __m128i lo128 = _mm_loadu_si128((const __m128i*)qs);
    __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(lo128, 4), _mm_set1_epi8(15)), _mm_and_si128(lo128, _mm_set1_epi8(15)));
    __m256i c = _mm256_sub_epi8(_mm256_or_si256(nib, hi), _mm256_set1_epi8((char)off));
    _mm256_storeu_si256((__m256i*)q, c);
#else
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - off);
        q[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off);
    }
#endif
}

static void unpack_q5_0(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float*) {
    for (int64_t b = 0; b < nb; b++, r += 22, q += 32) {
        const float d = h2f(r);
        uint32_t qh;
        memcpy(&qh, r + 2, 4);
        q5_codes(r + 6, qh, q, 16);
        d16[2 * b] = d16[2 * b + 1] = d;
    }
}

static void unpack_q5_1(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float* m16) {
    for (int64_t b = 0; b < nb; b++, r += 24, q += 32) {
        const float d = h2f(r), m = h2f(r + 2);
        uint32_t qh;
        memcpy(&qh, r + 4, 4);
        q5_codes(r + 8, qh, q, 0);
        d16[2 * b] = d16[2 * b + 1] = d;
        m16[2 * b] = m16[2 * b + 1] = m;
    }
}

static void unpack_q8_0(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float*) {
    for (int64_t b = 0; b < nb; b++, r += 34, q += 32) {
        d16[2 * b] = d16[2 * b + 1] = h2f(r);
        memcpy(q, r + 2, 32);
    }
}

static void unpack_q2_k(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float* m16) {
    for (int64_t b = 0; b < nb; b++, r += 84, q += 256, d16 += 16, m16 += 16) {
        const uint8_t* sc = r;
        const uint8_t* qs = r + 16;
        const float d = h2f(r + 80), dmin = h2f(r + 82);
        for (int g = 0; g < 16; g++) {
            d16[g] = d * (float)(sc[g] & 15);
            m16[g] = -(dmin * (float)(sc[g] >> 4));
        }
        for (int n = 0; n < 2; n++) {
            for (int j = 0; j < 4; j++) {
                int8_t* o = q + 128 * n + 32 * j;
                for (int l = 0; l < 32; l++) o[l] = (int8_t)((qs[32 * n + l] >> (2 * j)) & 3);
            }
        }
    }
}

// Q3_K's 12 scale bytes as 16 six-bit scales (0..63; the value's scale is sc - 32).
static inline void q3k_scales(const uint8_t* s, int8_t* sc) {
    uint32_t aux[4];
    memcpy(aux, s, 12);
    const uint32_t k1 = 0x03030303, k2 = 0x0f0f0f0f, tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
    aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
    aux[0] = (aux[0] & k2) | (((tmp >> 0) & k1) << 4);
    aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
    memcpy(sc, aux, 16);
}

static void unpack_q3_k(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float*) {
    for (int64_t b = 0; b < nb; b++, r += 110, q += 256, d16 += 16) {
        const uint8_t* hm = r;
        const uint8_t* qs = r + 32;
        const float d = h2f(r + 108);
        int8_t sc[16];
        q3k_scales(r + 96, sc);
        for (int g = 0; g < 16; g++) d16[g] = d * (float)(sc[g] - 32);
        for (int n = 0; n < 2; n++) {
            for (int j = 0; j < 4; j++) {
                int8_t* o = q + 128 * n + 32 * j;
                const int bit = 4 * n + j;
                for (int l = 0; l < 32; l++)
                    o[l] = (int8_t)(((qs[32 * n + l] >> (2 * j)) & 3) - (((hm[l] >> bit) & 1) ? 0 : 4));
            }
        }
    }
}

static inline void k4_scale_min(int j, const uint8_t* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Q4_K / Q5_K: the 8 sub-blocks' 6-bit scales and mins as per-16-value scale and offset.
static inline void k4_scales(const uint8_t* s, float d, float dmin, float* d16, float* m16) {
    for (int j = 0; j < 8; j++) {
        int sc, m;
        k4_scale_min(j, s, &sc, &m);
        d16[2 * j] = d16[2 * j + 1] = d * (float)sc;
        m16[2 * j] = m16[2 * j + 1] = -(dmin * (float)m);
    }
}

static void unpack_q4_k(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float* m16) {
    for (int64_t b = 0; b < nb; b++, r += 144, q += 256, d16 += 16, m16 += 16) {
        const float d = h2f(r), dmin = h2f(r + 2);
        const uint8_t* s = r + 4;
        const uint8_t* qs = r + 16;
        k4_scales(s, d, dmin, d16, m16);
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 32; l++) {
                q[64 * j + l] = (int8_t)(qs[32 * j + l] & 15);
                q[64 * j + 32 + l] = (int8_t)(qs[32 * j + l] >> 4);
            }
        }
    }
}

static void unpack_q5_k(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float* m16) {
    for (int64_t b = 0; b < nb; b++, r += 176, q += 256, d16 += 16, m16 += 16) {
        const float d = h2f(r), dmin = h2f(r + 2);
        const uint8_t* s = r + 4;
        const uint8_t* qh = r + 16;
        const uint8_t* qs = r + 48;
        k4_scales(s, d, dmin, d16, m16);
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 32; l++) {
                q[64 * j + l] = (int8_t)((qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4));
                q[64 * j + 32 + l] = (int8_t)((qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4));
            }
        }
    }
}

static void unpack_q6_k(const uint8_t* r, int64_t nb, int8_t* q, float* d16, float*) {
    for (int64_t b = 0; b < nb; b++, r += 210, q += 256, d16 += 16) {
        const uint8_t* ql = r;
        const uint8_t* qh = r + 128;
        const int8_t* sc = (const int8_t*)(r + 192);
        const float d = h2f(r + 208);
        for (int g = 0; g < 16; g++) d16[g] = d * (float)sc[g];
        for (int n = 0; n < 2; n++) {
            const uint8_t* L = ql + 64 * n;
            const uint8_t* H = qh + 32 * n;
            int8_t* o = q + 128 * n;
            for (int l = 0; l < 32; l++) {
                o[l] = (int8_t)(((L[l] & 15) | (((H[l] >> 0) & 3) << 4)) - 32);
                o[l + 32] = (int8_t)(((L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4)) - 32);
                o[l + 64] = (int8_t)(((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32);
                o[l + 96] = (int8_t)(((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32);
            }
        }
    }
}

typedef void (*UnpackFn)(const uint8_t*, int64_t, int8_t*, float*, float*);

static UnpackFn unpack_of(int t) {
    switch (t) {
        case T_Q4_0: return unpack_q4_0;
        case T_Q4_1: return unpack_q4_1;
        case T_Q5_0: return unpack_q5_0;
        case T_Q5_1: return unpack_q5_1;
        case T_Q8_0: return unpack_q8_0;
        case T_Q2_K: return unpack_q2_k;
        case T_Q3_K: return unpack_q3_k;
        case T_Q4_K: return unpack_q4_k;
        case T_Q5_K: return unpack_q5_k;
        case T_Q6_K: return unpack_q6_k;
        default: return nullptr;
    }
}

// ---------------------------------------------------------------------------- activations

// One activation row quantized twice (each costs little next to the products it feeds):
//  - per 32 values, int8 codes with a float scale and d * (sum of codes) per 16: for the 32-value
//    block formats (Q4_0 ... Q8_0);
//  - per 256 values, int8 codes with one float scale and int16 sums of codes per 16 (llama.cpp's
//    Q8_K): for the K-quants, whose integer sub-block scales then multiply exact integer dot
//    products, one float step per 256 values (see "K-quants" below).
struct QRow {
    int8_t* q;
    float* d32;
    float* s16;
    int8_t* kq;
    float* kd;
    int16_t* kbs;
};

// Buffers for `rows` quantized rows of k values (k % 32 == 0; the K layout needs k % 256 == 0).
struct Acts {
    int8_t *q = nullptr, *kq = nullptr;
    float *d32 = nullptr, *s16 = nullptr, *kd = nullptr;
    int16_t* kbs = nullptr;
    int64_t k = 0;
};

static QRow acts_row(const Acts& A, int64_t i) {
    const int64_t k = A.k;
    return QRow{A.q + i * k, A.d32 + i * (k / 32), A.s16 + i * (k / 16), A.kq + i * k, A.kd + i * (k / 256),
                A.kbs + i * (k / 16)};
}

static void acts_free(Acts* A) {
    free(A->q); free(A->kq); free(A->d32); free(A->s16); free(A->kd); free(A->kbs);
    *A = Acts{};
}

static bool acts_alloc(Acts* A, int64_t rows, int64_t k) {
    acts_free(A);
    A->k = k;
    A->q = (int8_t*)amalloc(rows * k + 64);
    A->kq = (int8_t*)amalloc(rows * k + 64);
    A->d32 = (float*)malloc(sizeof(float) * (rows * (k / 32) + 1));
    A->s16 = (float*)malloc(sizeof(float) * (rows * (k / 16) + 1));
    A->kd = (float*)malloc(sizeof(float) * (rows * (k / 256) + 1));
    A->kbs = (int16_t*)malloc(sizeof(int16_t) * (rows * (k / 16) + 1));
    if (A->q && A->kq && A->d32 && A->s16 && A->kd && A->kbs) return true;
    acts_free(A);
    return false;
}

// Codes of n values (n % 8 == 0) scaled by id, rounded to nearest even (lrintf and cvtps agree), and the
// sums of each 16; amax of n values. The AVX2 and the portable code give the same bits.
static float amax_of(const float* x, int64_t n) {
    float m = 0.f;
    int64_t j = 0;
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) v = _mm256_max_ps(v, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    m = _mm_cvtss_f32(h);
#endif
    for (; j < n; j++) m = fmaxf(m, fabsf(x[j]));
    return m;
}

static void codes_of(const float* x, int64_t n, float id, int8_t* q, int32_t* sums16) {
    int64_t j = 0;
#if defined(__AVX2__)
    const __m256 vid = _mm256_set1_ps(id);
    for (; j + 16 <= n; j += 16) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vid));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), vid));
        __m256i s = _mm256_add_epi32(a, b);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        sums16[j / 16] = _mm_cvtsi128_si32(t);
        const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);  // 16 int16 in order
        const __m128i p8 = _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
        _mm_storeu_si128((__m128i*)(q + j), p8);
    }
#endif
    for (; j < n; j += 16) {
        int32_t s = 0;
        for (int i = 0; i < 16; i++) {
            const int v = (int)lrintf(x[j + i] * id);
            q[j + i] = (int8_t)v;
            s += v;
        }
        sums16[j / 16] = s;
    }
}

static void quantize_row(const float* x, int64_t k, QRow o) {
    int32_t sums[16];
    for (int64_t b = 0; b < k / 32; b++) {
        const float d = amax_of(x + 32 * b, 32) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        codes_of(x + 32 * b, 32, id, o.q + 32 * b, sums);
        // Sums of the quantized values (not of x), as llama.cpp's Q8_1/Q8_K: the offset term
        // then cancels exactly against the code term; with exact sums Q5_1's error is 3x larger.
        o.d32[b] = d;
        o.s16[2 * b] = d * (float)sums[0];
        o.s16[2 * b + 1] = d * (float)sums[1];
    }
    if (k % 256) return;
    for (int64_t b = 0; b < k / 256; b++) {
        const float d = amax_of(x + 256 * b, 256) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        codes_of(x + 256 * b, 256, id, o.kq + 256 * b, sums);
        o.kd[b] = d;
        for (int g = 0; g < 16; g++) o.kbs[16 * b + g] = (int16_t)sums[g];
    }
}

// ---------------------------------------------------------------------------- dot products

#if defined(__AVX2__)
static inline __m256i dot32_i8(const int8_t* w, const int8_t* a) {
    const __m256i vw = _mm256_loadu_si256((const __m256i*)w);
    const __m256i va = _mm256_loadu_si256((const __m256i*)a);
    // |w| * (a with w's sign): unsigned x signed pairs; |sum| <= 2*128*127 fits int16.
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(vw, vw), _mm256_sign_epi8(va, vw));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));  // lanes 0-3: values 0-15, 4-7: 16-31
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// sum over blocks b: (d16[2b] * isum(lo16) + d16[2b+1] * isum(hi16)) * d32[b]
//
// Every path (this one, the in-place Q8_0 one and the 4-row one) accumulates in the same
// order with the same operations, so a row's result does not depend on how many rows a
// call has (prefill and decode agree bit for bit) nor on the thread count.
static float dot_unpacked(const int8_t* w, const float* d16, const QRow& a, int64_t nb32) {
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb32; b++) {
        const __m256i p = dot32_i8(w + 32 * b, a.q + 32 * b);
        const __m256 sw = _mm256_set_m128(_mm_set1_ps(d16[2 * b + 1]), _mm_set1_ps(d16[2 * b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sw, _mm256_set1_ps(a.d32[b])), acc);
    }
    return hsum8(acc);
#else
    float acc = 0.f;
    for (int64_t b = 0; b < nb32; b++) {
        int32_t s0 = 0, s1 = 0;
        const int8_t* wb = w + 32 * b;
        const int8_t* ab = a.q + 32 * b;
        for (int j = 0; j < 16; j++) s0 += (int32_t)wb[j] * (int32_t)ab[j];
        for (int j = 16; j < 32; j++) s1 += (int32_t)wb[j] * (int32_t)ab[j];
        acc += (float)s0 * (d16[2 * b] * a.d32[b]) + (float)s1 * (d16[2 * b + 1] * a.d32[b]);
    }
    return acc;
#endif
}

// Q8_0 weights read in place (34-byte blocks: fp16 scale, 32 int8).
static float dot_q8_0(const uint8_t* r, const QRow& a, int64_t nb32) {
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb32; b++) {
        const __m256i p = dot32_i8((const int8_t*)(r + 34 * b + 2), a.q + 32 * b);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(_mm256_set1_ps(h2f(r + 34 * b)), _mm256_set1_ps(a.d32[b])), acc);
    }
    return hsum8(acc);
#else
    float acc = 0.f;
    for (int64_t b = 0; b < nb32; b++) {
        const int8_t* wb = (const int8_t*)(r + 34 * b + 2);
        const int8_t* ab = a.q + 32 * b;
        int32_t s0 = 0, s1 = 0;
        for (int j = 0; j < 16; j++) s0 += (int32_t)wb[j] * (int32_t)ab[j];
        for (int j = 16; j < 32; j++) s1 += (int32_t)wb[j] * (int32_t)ab[j];
        const float d = h2f(r + 34 * b) * a.d32[b];
        acc += (float)s0 * d + (float)s1 * d;
    }
    return acc;
#endif
}

static inline float dot_min(const float* m16, const float* s16, int64_t n16) {
    float acc = 0.f;
    int64_t g = 0;
#if defined(__AVX2__)
    // Not left to the compiler: without -ffast-math it keeps a float reduction scalar, and
    // this loop made Q4_K/Q5_K 2x slower than Q6_K (measured 11.6 vs 21 GMAC/s at m=1).
    __m256 v = _mm256_setzero_ps();
    for (; g + 8 <= n16; g += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(m16 + g), _mm256_loadu_ps(s16 + g), v);
    acc = hsum8(v);
#endif
    for (; g < n16; g++) acc += m16[g] * s16[g];
    return acc;
}

#if defined(__AVX2__)
// Four activation rows against one unpacked weight row: each weight block is loaded once
// for four products (the mat-mat path; measured ~1.5x over four single dots).
static void dot_unpacked4(const int8_t* w, const float* d16, const QRow* a, int64_t nb32, float* out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb32; b++) {
        const __m256i vw = _mm256_loadu_si256((const __m256i*)(w + 32 * b));
        const __m256i aw = _mm256_sign_epi8(vw, vw);
        const __m256 sw = _mm256_set_m128(_mm_set1_ps(d16[2 * b + 1]), _mm_set1_ps(d16[2 * b]));
        for (int r = 0; r < 4; r++) {
            const __m256i va = _mm256_loadu_si256((const __m256i*)(a[r].q + 32 * b));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(va, vw)), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sw, _mm256_set1_ps(a[r].d32[b])), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum8(acc[r]);
}
#endif

// ---------------------------------------------------------------------------- fused m < 4 dots
//
// Decode (1-3 activation rows): the codes of each 32-value block are built in registers
// straight from the GGML block, as llama.cpp's vec_dot kernels do, instead of unpacking the
// row to memory first. Each block gives the same eight int32 lane sums (integer, exact)
// and goes through the same float operations in the same block order as dot_unpacked
// (+ dot_min over the same m16 array), so a row's result stays bit-identical to the
// unpacked and 4-row paths: decode == prefill still holds. The portable build keeps the
// unpack path (the reference the SIMD build is tested against).

typedef float (*FusedFn)(const uint8_t* row, const QRow& a, int64_t k, float* m16);

#if defined(__AVX2__)
// dot32_i8 on codes already in a register.
static inline __m256i dot32_reg(__m256i vw, const int8_t* a) {
    const __m256i va = _mm256_loadu_si256((const __m256i*)a);
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(vw, vw), _mm256_sign_epi8(va, vw));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// dot_unpacked's per-block float step (same operations, same order).
static inline __m256 fma_block(__m256i p, float dlo, float dhi, float d32, __m256 acc) {
    const __m256 sw = _mm256_set_m128(_mm_set1_ps(dhi), _mm_set1_ps(dlo));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sw, _mm256_set1_ps(d32)), acc);
}

static inline __m256i q5_vec(const uint8_t* qs, uint32_t qh, int off) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bitm = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    v = _mm256_cmpeq_epi8(_mm256_or_si256(v, bitm), _mm256_set1_epi64x(-1));
    const __m256i hi = _mm256_and_si256(v, _mm256_set1_epi8(16));
    const __m128i lo128 = _mm_loadu_si128((const __m128i*)qs);
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(lo128, 4), _mm_set1_epi8(15)),
                                         _mm_and_si128(lo128, _mm_set1_epi8(15)));
    return _mm256_sub_epi8(_mm256_or_si256(nib, hi), _mm256_set1_epi8((char)off));
}

static float fused_q5_0(const uint8_t* r, const QRow& a, int64_t k, float*) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / 32; b++, r += 22) {
        uint32_t qh;
        memcpy(&qh, r + 2, 4);
        const float d = h2f(r);
        acc = fma_block(dot32_reg(q5_vec(r + 6, qh, 16), a.q + 32 * b), d, d, a.d32[b], acc);
    }
    return hsum8(acc);
}

#endif


// ---------------------------------------------------------------------------- K-quants
//
// A K-quant row as unsigned codes u (0..63) with, per 16 values, an integer scale sc and min mn, and
// per 256 values float d and dm: value = d * sc * u - dm * mn. (Q6_K: u = q + 32, mn = 32 sc, dm = d;
// Q3_K: u = q + 4, mn = 4 sc, dm = d.) Against Q8_K activations (a = kd * kq) a block of 256 is
//     (d * kd) * isum - (dm * kd) * imin,   isum = sum sc * (u . kq)_16,   imin = sum mn * kbs_16
// with both sums exact int32, so every path (fused from the raw blocks for one activation row,
// unpacked once per weight row for more, AVX2 or portable) gives the same bits. This is llama.cpp's
// scheme; against per-32 float scales (the previous kernels here) it halves the work per 32 values
// (one maddubs and one madd into an int32 accumulator instead of two signs, maddubs, madd, a
// conversion and two float multiplies).

struct KRow {
    uint8_t* u;
    int16_t* sc;
    int16_t* mn;
    float* d;
    float* dm;
};

// A row's running sum in 8 float lanes, no horizontal sum per block (that was the longest dependency
// chain of the K kernels, then a third of a 4-row dot's instructions): the code term's integer lanes
// of each block (lane L = values 4L..4L+3 of every 32-value chunk, as maddubs + madd fold them)
// times d * kd, and the min term's lanes (lane L = groups 2L and 2L + 1, as madd folds mn * bs)
// times dm * kd, each added lane-wise across blocks and summed at the end. The portable code keeps
// the same lanes and additions, so every build and path gives the same bits.
struct KAcc {
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float m[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
};

static inline void kacc_add(KAcc& A, const int32_t* lanes, const int32_t* min_lanes, float d, float dm, float kd) {
    const float dk = d * kd, mk = dm * kd;
    for (int L = 0; L < 8; L++) A.v[L] = A.v[L] + (float)lanes[L] * dk;
    for (int L = 0; L < 8; L++) A.m[L] = A.m[L] + (float)min_lanes[L] * mk;
}

static inline float hsum8_scalar(const float* v) {  // hsum8's order
    const float t0 = v[0] + v[4], t1 = v[1] + v[5], t2 = v[2] + v[6], t3 = v[3] + v[7];
    return (t0 + t2) + (t1 + t3);
}

static inline float kacc_sum(const KAcc& A) { return hsum8_scalar(A.v) - hsum8_scalar(A.m); }

static inline void k_min_lanes(const int16_t* mn, const int16_t* bs, int32_t* out) {
    for (int L = 0; L < 8; L++) out[L] = (int32_t)mn[2 * L] * bs[2 * L] + (int32_t)mn[2 * L + 1] * bs[2 * L + 1];
}

#if defined(__AVX2__)
// sum sc * (u . a) over 32 values: |u . a| per pair <= 2 * 63 * 127 fits maddubs' int16.
static inline __m256i k_madd(__m256i u, const int8_t* a, __m256i sc2) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i*)a)), sc2);
}

// kacc_add / kacc_sum on a vector accumulator (the same operations lane by lane).
struct KAccV {
    __m256 v = _mm256_setzero_ps();
    __m256 m = _mm256_setzero_ps();
};

static inline void kacc_add(KAccV& A, __m256i lanes, __m256i min_lanes, float d, float dm, float kd) {
    A.v = _mm256_add_ps(A.v, _mm256_mul_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(d * kd)));
    A.m = _mm256_add_ps(A.m, _mm256_mul_ps(_mm256_cvtepi32_ps(min_lanes), _mm256_set1_ps(dm * kd)));
}

static inline float kacc_sum(const KAccV& A) { return hsum8(A.v) - hsum8(A.m); }

// mn16[g] * bs[g] folded in pairs of groups (int16 x int16, exact): the min term's 8 lanes.
static inline __m256i min_lanes(__m256i mn16, const int16_t* bs) {
    return _mm256_madd_epi16(mn16, _mm256_loadu_si256((const __m256i*)bs));
}

// Shuffle mask taking int16 lane g of each 128-bit half to lanes 0-7 and lane g + 1 to lanes 8-15.
static inline __m256i pair_mask(int g) {
    return _mm256_set_m128i(_mm_set1_epi16((short)(0x0100 + 0x0202 * (g + 1))), _mm_set1_epi16((short)(0x0100 + 0x0202 * g)));
}

// Q4_K's 12 scale bytes as 8 scales (bytes 0-7) and 8 mins (bytes 8-15), each 6 bits.
static inline __m128i q4k_scales_mins(const uint8_t* s) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    const uint32_t a = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = a;
    u[0] &= m1;
    return _mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]);
}

// 8 int16 values, each twice: 16 lanes (a per-32 value's two 16-value groups).
static inline __m256i twice16(__m128i v8) {
    return _mm256_set_m128i(_mm_unpackhi_epi16(v8, v8), _mm_unpacklo_epi16(v8, v8));
}

// Q6_K half n of a block (128 values) as 4 x 32 unsigned codes (0..63).
static inline void q6k_codes(const uint8_t* r, int n, __m256i* c) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    const __m256i L0 = _mm256_loadu_si256((const __m256i*)(r + 64 * n));
    const __m256i L1 = _mm256_loadu_si256((const __m256i*)(r + 64 * n + 32));
    const __m256i H = _mm256_loadu_si256((const __m256i*)(r + 128 + 32 * n));
    c[0] = _mm256_or_si256(_mm256_and_si256(L0, m4), _mm256_slli_epi16(_mm256_and_si256(H, m3), 4));
    c[1] = _mm256_or_si256(_mm256_and_si256(L1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 2), m3), 4));
    c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 4), m3), 4));
    c[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 6), m3), 4));
}

#if defined(__AVX512BW__)
// x86-64-v4 (AVX-512): 64 values per maddubs/madd, half the instructions of the AVX2 code. Int16
// lane l of a 64-value chunk's maddubs pairs covers values 2l and 2l + 1; these tables give each
// lane's scale index for vpermw: per-16 scales of chunk c (IDX16), per-32 sub-block scales (IDX32,
// Q4_K). Folding the 16 int32 lanes' halves gives exactly the AVX2 code's 8 lanes (integers), so
// both builds return the same bits.
alignas(64) static const int16_t IDX16[4][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};
alignas(64) static const int16_t IDX32[4][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7}};

// acc + sum sc * (u . a) over 64 values (AVX512-VNNI's vpdpwssd: the madd and the add in one).
static inline __m512i k_acc512(__m512i acc, __m512i u, const int8_t* a, __m512i sc) {
    return _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(u, _mm512_loadu_si512(a)), sc);
}

static inline __m512i join256(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

static inline __m256i fold512(__m512i z) {
    return _mm256_add_epi32(_mm512_castsi512_si256(z), _mm512_extracti64x4_epi64(z, 1));
}

static inline __m512i lane_scales(const int16_t (*idx)[32], int c, __m512i sc) {
    return _mm512_permutexvar_epi16(_mm512_load_si512(idx[c]), sc);
}
#endif
#endif

static void kunpack_q2_k(const uint8_t* r, int64_t nb, KRow o) {
    for (int64_t b = 0; b < nb; b++, r += 84) {
        const uint8_t* qs = r + 16;
        o.d[b] = h2f(r + 80);
        o.dm[b] = h2f(r + 82);
        for (int g = 0; g < 16; g++) {
            o.sc[16 * b + g] = r[g] & 15;
            o.mn[16 * b + g] = r[g] >> 4;
        }
        uint8_t* u = o.u + 256 * b;
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) u[128 * n + 32 * j + l] = (qs[32 * n + l] >> (2 * j)) & 3;
    }
}

static void kunpack_q3_k(const uint8_t* r, int64_t nb, KRow o) {
    for (int64_t b = 0; b < nb; b++, r += 110) {
        const uint8_t* hm = r;
        const uint8_t* qs = r + 32;
        int8_t sc[16];
        q3k_scales(r + 96, sc);
        o.d[b] = o.dm[b] = h2f(r + 108);
        for (int g = 0; g < 16; g++) {
            o.sc[16 * b + g] = (int16_t)(sc[g] - 32);
            o.mn[16 * b + g] = (int16_t)(4 * (sc[g] - 32));
        }
        uint8_t* u = o.u + 256 * b;
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++)
                    u[128 * n + 32 * j + l] = ((qs[32 * n + l] >> (2 * j)) & 3) | (((hm[l] >> (4 * n + j)) & 1) << 2);
    }
}

static inline void k4_int_scales(const uint8_t* s, int64_t b, KRow o) {
    for (int j = 0; j < 8; j++) {
        int sc, m;
        k4_scale_min(j, s, &sc, &m);
        o.sc[16 * b + 2 * j] = o.sc[16 * b + 2 * j + 1] = (int16_t)sc;
        o.mn[16 * b + 2 * j] = o.mn[16 * b + 2 * j + 1] = (int16_t)m;
    }
}

static void kunpack_q4_k(const uint8_t* r, int64_t nb, KRow o) {
    for (int64_t b = 0; b < nb; b++, r += 144) {
        o.d[b] = h2f(r);
        o.dm[b] = h2f(r + 2);
#if defined(__AVX2__)  // the scalar loops did not vectorise: ~120 ns a 2048-value row, 2x the fused dot
        const __m128i sm = q4k_scales_mins(r + 4);
        _mm256_storeu_si256((__m256i*)(o.sc + 16 * b), twice16(_mm_cvtepu8_epi16(sm)));
        _mm256_storeu_si256((__m256i*)(o.mn + 16 * b), twice16(_mm_cvtepu8_epi16(_mm_srli_si128(sm, 8))));
        const __m256i m4 = _mm256_set1_epi8(15);
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(r + 16 + 32 * j));
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#if defined(__AVX512BW__)  // stored as the dots load it: a load spanning two stores is not forwarded
            _mm512_storeu_si512(o.u + 256 * b + 64 * j, join256(lo, hi));
#else
            _mm256_storeu_si256((__m256i*)(o.u + 256 * b + 64 * j), lo);
            _mm256_storeu_si256((__m256i*)(o.u + 256 * b + 64 * j + 32), hi);
#endif
        }
        continue;
#endif
        k4_int_scales(r + 4, b, o);
        const uint8_t* qs = r + 16;
        uint8_t* u = o.u + 256 * b;
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                u[64 * j + l] = qs[32 * j + l] & 15;
                u[64 * j + 32 + l] = qs[32 * j + l] >> 4;
            }
    }
}

static void kunpack_q5_k(const uint8_t* r, int64_t nb, KRow o) {
    for (int64_t b = 0; b < nb; b++, r += 176) {
        o.d[b] = h2f(r);
        o.dm[b] = h2f(r + 2);
        k4_int_scales(r + 4, b, o);
        const uint8_t* qh = r + 16;
        const uint8_t* qs = r + 48;
        uint8_t* u = o.u + 256 * b;
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                u[64 * j + l] = (qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4);
                u[64 * j + 32 + l] = (qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
            }
    }
}

static void kunpack_q6_k(const uint8_t* r, int64_t nb, KRow o) {
    for (int64_t b = 0; b < nb; b++, r += 210) {
        const uint8_t* ql = r;
        const uint8_t* qh = r + 128;
        const int8_t* sc = (const int8_t*)(r + 192);
        o.d[b] = o.dm[b] = h2f(r + 208);
#if defined(__AVX2__)
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)sc));
        _mm256_storeu_si256((__m256i*)(o.sc + 16 * b), sc16);
        _mm256_storeu_si256((__m256i*)(o.mn + 16 * b), _mm256_slli_epi16(sc16, 5));
        for (int n = 0; n < 2; n++) {
            __m256i c[4];
            q6k_codes(r, n, c);
#if defined(__AVX512BW__)
            _mm512_storeu_si512(o.u + 256 * b + 128 * n, join256(c[0], c[1]));
            _mm512_storeu_si512(o.u + 256 * b + 128 * n + 64, join256(c[2], c[3]));
#else
            for (int i = 0; i < 4; i++) _mm256_storeu_si256((__m256i*)(o.u + 256 * b + 128 * n + 32 * i), c[i]);
#endif
        }
        continue;
#endif
        for (int g = 0; g < 16; g++) {
            o.sc[16 * b + g] = sc[g];
            o.mn[16 * b + g] = (int16_t)(32 * sc[g]);
        }
        for (int n = 0; n < 2; n++) {
            const uint8_t* L = ql + 64 * n;
            const uint8_t* H = qh + 32 * n;
            uint8_t* u = o.u + 256 * b + 128 * n;
            for (int l = 0; l < 32; l++) {
                u[l] = (L[l] & 15) | (((H[l] >> 0) & 3) << 4);
                u[l + 32] = (L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4);
                u[l + 64] = (L[l] >> 4) | (((H[l] >> 4) & 3) << 4);
                u[l + 96] = (L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4);
            }
        }
    }
}

typedef void (*KUnpackFn)(const uint8_t*, int64_t, KRow);

static KUnpackFn kunpack_of(int t) {
    switch (t) {
        case T_Q2_K: return kunpack_q2_k;
        case T_Q3_K: return kunpack_q3_k;
        case T_Q4_K: return kunpack_q4_k;
        case T_Q5_K: return kunpack_q5_k;
        case T_Q6_K: return kunpack_q6_k;
        default: return nullptr;
    }
}

// An unpacked K row against one activation row.
static float kdot(const KRow& w, const QRow& a, int64_t nb) {
#if defined(__AVX2__)
    KAccV A;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* u = w.u + 256 * b;
        const int8_t* q = a.kq + 256 * b;
        const int16_t* sc = w.sc + 16 * b;
#if defined(__AVX512BW__)
        const __m512i sc512 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)sc));
        __m512i z = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++)
            z = k_acc512(z, _mm512_loadu_si512(u + 64 * c), q + 64 * c, lane_scales(IDX16, c, sc512));
        const __m256i s = fold512(z);
#else
        __m256i s = _mm256_setzero_si256();
        const __m256i h[2] = {_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)sc)),
                              _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(sc + 8)))};
        for (int i = 0; i < 8; i++)
            s = _mm256_add_epi32(s, k_madd(_mm256_loadu_si256((const __m256i*)(u + 32 * i)), q + 32 * i,
                                           _mm256_shuffle_epi8(h[i / 4], pair_mask(2 * (i % 4)))));
#endif
        kacc_add(A, s, min_lanes(_mm256_loadu_si256((const __m256i*)(w.mn + 16 * b)), a.kbs + 16 * b), w.d[b], w.dm[b], a.kd[b]);
    }
    return kacc_sum(A);
#else
    KAcc A;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* u = w.u + 256 * b;
        const int8_t* q = a.kq + 256 * b;
        int32_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int i = 0; i < 8; i++)
            for (int L = 0; L < 8; L++) {
                int32_t d = 0;
                for (int t = 0; t < 4; t++) d += (int32_t)u[32 * i + 4 * L + t] * (int32_t)q[32 * i + 4 * L + t];
                lanes[L] += w.sc[16 * b + 2 * i + (L >= 4)] * d;
            }
        int32_t mins[8];
        k_min_lanes(w.mn + 16 * b, a.kbs + 16 * b, mins);
        kacc_add(A, lanes, mins, w.d[b], w.dm[b], a.kd[b]);
    }
    return kacc_sum(A);
#endif
}

#if defined(__AVX2__)
// Four activation rows against one unpacked K row: each weight vector loaded once for four products.
static void kdot4(const KRow& w, const QRow* a, int64_t nb, float* out) {
    KAccV A[4];
    for (int64_t b = 0; b < nb; b++) {
        const int16_t* sc = w.sc + 16 * b;
#if defined(__AVX512BW__)
        __m512i z[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        const __m512i sc512 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)sc));
        for (int c = 0; c < 4; c++) {
            const __m512i u = _mm512_loadu_si512(w.u + 256 * b + 64 * c);
            const __m512i s4 = lane_scales(IDX16, c, sc512);
            for (int r = 0; r < 4; r++) z[r] = k_acc512(z[r], u, a[r].kq + 256 * b + 64 * c, s4);
        }
        const __m256i s[4] = {fold512(z[0]), fold512(z[1]), fold512(z[2]), fold512(z[3])};
#else
        __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        const __m256i h[2] = {_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)sc)),
                              _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(sc + 8)))};
        for (int i = 0; i < 8; i++) {
            const __m256i u = _mm256_loadu_si256((const __m256i*)(w.u + 256 * b + 32 * i));
            const __m256i sc2 = _mm256_shuffle_epi8(h[i / 4], pair_mask(2 * (i % 4)));
            for (int r = 0; r < 4; r++) s[r] = _mm256_add_epi32(s[r], k_madd(u, a[r].kq + 256 * b + 32 * i, sc2));
        }
#endif
        const __m256i mn = _mm256_loadu_si256((const __m256i*)(w.mn + 16 * b));
        for (int r = 0; r < 4; r++) kacc_add(A[r], s[r], min_lanes(mn, a[r].kbs + 16 * b), w.d[b], w.dm[b], a[r].kd[b]);
    }
    for (int r = 0; r < 4; r++) out[r] = kacc_sum(A[r]);
}

// Fused one-row kernels straight from the GGML blocks (decode): the same integer sums and float
// steps as kunpack + kdot. Scales reach the lanes by byte shuffles of one load per block and the
// min term is one madd (as llama.cpp's kernels): building them per 32 values from scalars was ~60%
// of the instructions (Q6_K lm_head of 151936 x 2048, 1 thread: 12.2 ms before).

// R activation rows at once (R <= 3: an MoE expert's few pairs in prefill): the codes of each chunk
// are built once from the raw block for all R rows (unpacking the row first cost more at R = 2).
template <int R>
static void fused_q4_k_r(const uint8_t* r, const QRow* a, int64_t k, float* out) {
    KAccV A[R];
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int64_t b = 0; b < k / 256; b++, r += 144) {
        const __m128i sm = q4k_scales_mins(r + 4);
        __m256i s[R];
#if defined(__AVX512BW__)
        const __m512i sc512 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
        __m512i z[R];
        for (int i = 0; i < R; i++) z[i] = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(r + 16 + 32 * j));
            const __m512i u = join256(_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
            const __m512i sj = lane_scales(IDX32, j, sc512);
            for (int i = 0; i < R; i++) z[i] = k_acc512(z[i], u, a[i].kq + 256 * b + 64 * j, sj);
        }
        for (int i = 0; i < R; i++) s[i] = fold512(z[i]);
#else
        // int16 scales of sub-block j in both 128-bit halves; a shuffle broadcasts one to 16 lanes.
        const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        for (int i = 0; i < R; i++) s[i] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(r + 16 + 32 * j));
            const __m256i s0 = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * j))));
            const __m256i s1 = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * j + 1))));
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            for (int i = 0; i < R; i++) {
                const int8_t* q = a[i].kq + 256 * b + 64 * j;
                s[i] = _mm256_add_epi32(s[i], _mm256_add_epi32(k_madd(lo, q, s0), k_madd(hi, q + 32, s1)));
            }
        }
#endif
        const __m256i mn16 = twice16(_mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));  // each sub-block's min twice
        const float d = h2f(r), dm = h2f(r + 2);
        for (int i = 0; i < R; i++) kacc_add(A[i], s[i], min_lanes(mn16, a[i].kbs + 16 * b), d, dm, a[i].kd[b]);
    }
    for (int i = 0; i < R; i++) out[i] = kacc_sum(A[i]);
}

template <int R>
static void fused_q6_k_r(const uint8_t* r, const QRow* a, int64_t k, float* out) {
    KAccV A[R];
    for (int64_t b = 0; b < k / 256; b++, r += 210) {
        const __m128i sc8 = _mm_loadu_si128((const __m128i*)(r + 192));  // 16 int8 scales
        __m256i s[R];
#if defined(__AVX512BW__)
        const __m512i sc512 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8));
        __m512i z[R];
        for (int i = 0; i < R; i++) z[i] = _mm512_setzero_si512();
        for (int n = 0; n < 2; n++) {
            __m256i c[4];
            q6k_codes(r, n, c);
            const __m512i u0 = join256(c[0], c[1]), u1 = join256(c[2], c[3]);
            const __m512i s0 = lane_scales(IDX16, 2 * n, sc512), s1 = lane_scales(IDX16, 2 * n + 1, sc512);
            for (int i = 0; i < R; i++) {
                const int8_t* q = a[i].kq + 256 * b + 128 * n;
                z[i] = k_acc512(k_acc512(z[i], u0, q, s0), u1, q + 64, s1);
            }
        }
        for (int i = 0; i < R; i++) s[i] = fold512(z[i]);
#else
        for (int i = 0; i < R; i++) s[i] = _mm256_setzero_si256();
        for (int n = 0; n < 2; n++) {
            __m256i c[4];
            q6k_codes(r, n, c);
            for (int j = 0; j < 4; j++) {
                const int g = 8 * n + 2 * j;
                // bytes 0-7 scale g, 8-15 scale g + 1, widened: int16 lanes 0-7 and 8-15
                const __m128i pick = _mm_set_epi64x(0x0101010101010101LL * (g + 1), 0x0101010101010101LL * g);
                const __m256i sg = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pick));
                for (int i = 0; i < R; i++)
                    s[i] = _mm256_add_epi32(s[i], k_madd(c[j], a[i].kq + 256 * b + 128 * n + 32 * j, sg));
            }
        }
#endif
        const __m256i mn16 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(sc8), 5);  // 32 * scale (|.| <= 4096)
        const float d = h2f(r + 208);
        for (int i = 0; i < R; i++) kacc_add(A[i], s[i], min_lanes(mn16, a[i].kbs + 16 * b), d, d, a[i].kd[b]);
    }
    for (int i = 0; i < R; i++) out[i] = kacc_sum(A[i]);
}

static float fused_q4_k(const uint8_t* r, const QRow& a, int64_t k, float*) {
    float y;
    fused_q4_k_r<1>(r, &a, k, &y);
    return y;
}

static float fused_q6_k(const uint8_t* r, const QRow& a, int64_t k, float*) {
    float y;
    fused_q6_k_r<1>(r, &a, k, &y);
    return y;
}

// Up to 3 activation rows through the fused kernels (Q4_K, Q6_K); false for other types.
static bool fused_k_rows(int qtype, const uint8_t* row, const QRow* a, int n, int64_t k, float* out) {
    if (qtype != T_Q4_K && qtype != T_Q6_K) return false;
    const bool q4 = qtype == T_Q4_K;
    switch (n) {
        case 1: q4 ? fused_q4_k_r<1>(row, a, k, out) : fused_q6_k_r<1>(row, a, k, out); return true;
        case 2: q4 ? fused_q4_k_r<2>(row, a, k, out) : fused_q6_k_r<2>(row, a, k, out); return true;
        case 3: q4 ? fused_q4_k_r<3>(row, a, k, out) : fused_q6_k_r<3>(row, a, k, out); return true;
        default: return false;
    }
}
#endif

// ---------------------------------------------------------------------------- thread pool
//
// A small persistent pool: workers spin briefly after a job (decode issues ~10 calls per
// layer, and a futex wake-up costs more than a small mat-vec), then sleep on a condition
// variable. One job at a time; a concurrent caller runs its job on its own thread.

typedef void (*TaskFn)(void* ctx, int64_t task);

enum { MAX_WORKERS = 63 };

struct Pool {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;
    fm::atomic<uint64_t> gen{0};
    fm::atomic<uint64_t> next{0};  // job << 32 | next task index
    fm::atomic<uint64_t> desc{0};  // job << 32 | number of tasks
    fm::atomic<int64_t> done{0};   // tasks of the current job finished
    fm::atomic<int> active{0};     // workers with a smaller index take part in the current job
    uint64_t job = 0;
    TaskFn fn = nullptr;
    void* ctx = nullptr;
    int nworkers = 0;
    pid_t pid = 0;
};

static Pool g_pool;

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static double now_us() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

// Tasks are handed out by one counter and the caller waits for the count of finished
// tasks, not for the workers: a worker descheduled on a busy machine never delays a job
// it has not started (the caller runs those tasks itself). Task tickets carry the job
// number, so a late worker's ticket from a finished job is never taken for a task of the
// next one; fn/ctx are written before desc/next (release) and read after them (acquire).
static void run_tasks(Pool* p) {
    for (;;) {
        const uint64_t v = p->next.fetch_add(1, fm::memory_order_acq_rel);
        const uint64_t d = p->desc.load(fm::memory_order_acquire);
        if ((v >> 32) != (d >> 32) || (v & 0xffffffffu) >= (d & 0xffffffffu)) break;
        p->fn(p->ctx, (int64_t)(v & 0xffffffffu));
        p->done.fetch_add(1, fm::memory_order_acq_rel);
    }
}

// Idle workers poll (yielding) this long before sleeping: decode issues a call every
// ~50 us and a futex wake-up costs more than a small mat-vec.
static const double SPIN_US = 100.0;

static void* worker_main(void* arg) {
    const int idx = (int)(intptr_t)arg;
    Pool* p = &g_pool;
    uint64_t seen = p->gen.load(fm::memory_order_acquire);
    for (;;) {
        double t0 = -1;
        for (int i = 0;; i++) {
            if (p->gen.load(fm::memory_order_acquire) != seen) break;
            if ((i & 255) == 255) {
                // Yield while waiting: torch's own OpenMP workers run between our calls on the
                // same cores, and a pure spin would take their time slice.
                sched_yield();
                if (t0 < 0) {
                    t0 = now_us();
                } else if (now_us() - t0 > SPIN_US) {
                    pthread_mutex_lock(&p->mu);
                    while (p->gen.load(fm::memory_order_acquire) == seen) pthread_cond_wait(&p->cv, &p->mu);
                    pthread_mutex_unlock(&p->mu);
                    break;
                }
            }
            cpu_relax();
        }
        seen = p->gen.load(fm::memory_order_acquire);
        if (idx < p->active.load(fm::memory_order_acquire)) run_tasks(p);
    }
    return nullptr;
}

static void parallel_for(int64_t ntasks, int nthreads, TaskFn fn, void* ctx) {
    Pool* p = &g_pool;
    if (nthreads > MAX_WORKERS + 1) nthreads = MAX_WORKERS + 1;
    if (nthreads > ntasks) nthreads = (int)ntasks;
    if (nthreads <= 1 || ntasks >= (1LL << 31) || pthread_mutex_trylock(&p->busy) != 0) {  // busy: another thread's job
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    const pid_t pid = getpid();
    if (p->pid != pid) {  // first call, or a forked child: the parent's workers do not exist here
        p->pid = pid;
        p->nworkers = 0;
    }
    while (p->nworkers < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, worker_main, (void*)(intptr_t)p->nworkers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        p->nworkers++;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->job = (p->job + 1) & 0xffffffffu;
    p->done.store(0, fm::memory_order_release);
    p->active.store(nthreads - 1, fm::memory_order_release);
    p->desc.store(p->job << 32 | (uint64_t)ntasks, fm::memory_order_release);
    p->next.store(p->job << 32, fm::memory_order_release);
    pthread_mutex_lock(&p->mu);
    p->gen.fetch_add(1, fm::memory_order_acq_rel);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p);
    for (int i = 0; p->done.load(fm::memory_order_acquire) < ntasks; i++) {
        if (i > 2000) sched_yield();  // the worker holding the last task may be descheduled
        else cpu_relax();
    }
    pthread_mutex_unlock(&p->busy);
}

// ---------------------------------------------------------------------------- mat-mul core

// One expert's work: weight rows [r0, r1) of W (n x k) against the activation rows listed
// in `rows` (indices into the quantized activations), results to out[pair * n + r].
struct Job {
    int qtype;
    Format fmt;
    UnpackFn unpack;
    int64_t n, k, row_bytes;
    const Acts* acts;   // quantized activation rows
    float* out;         // [npairs, n]
    // tasks: (expert weight base, r0, r1, first index into pair list, count)
    const uint8_t** tw;
    int64_t* tr0;
    int64_t* tr1;
    int64_t* tp0;
    int64_t* tpn;
    const int64_t* pairs;  // output row of each entry
    const int64_t* xrow;   // activation row of each entry
};

struct Scratch {
    int8_t* q = nullptr;  // 32-value formats: codes, float scale and offset per 16
    float* d16 = nullptr;
    float* m16 = nullptr;
    uint8_t* u = nullptr;  // K-quants: a KRow
    int16_t *sc = nullptr, *mn = nullptr;
    float *d = nullptr, *dm = nullptr;
    int64_t cap = 0;
    KRow krow() const { return KRow{u, sc, mn, d, dm}; }
};
static __thread Scratch t_scratch;

static bool scratch_reserve(int64_t k) {
    Scratch& s = t_scratch;
    if (s.cap >= k) return true;
    free(s.q); free(s.d16); free(s.m16); free(s.u); free(s.sc); free(s.mn); free(s.d); free(s.dm);
    s.q = (int8_t*)amalloc(k + 64);
    s.d16 = (float*)malloc(sizeof(float) * (k / 16 + 4));
    s.m16 = (float*)calloc(k / 16 + 4, sizeof(float));
    s.u = (uint8_t*)amalloc(k + 64);
    s.sc = (int16_t*)malloc(sizeof(int16_t) * (k / 16 + 4));
    s.mn = (int16_t*)malloc(sizeof(int16_t) * (k / 16 + 4));
    s.d = (float*)malloc(sizeof(float) * (k / 256 + 4));
    s.dm = (float*)malloc(sizeof(float) * (k / 256 + 4));
    if (!s.q || !s.d16 || !s.m16 || !s.u || !s.sc || !s.mn || !s.d || !s.dm) {
        s.cap = 0;
        return false;
    }
    s.cap = k;
    return true;
}

// One weight matrix: n rows of raw GGML blocks of k values.
struct MatRef {
    int qtype;
    Format fmt;
    UnpackFn unpack;
    KUnpackFn kunpack;  // K-quants (the integer-scale path), else null
    const uint8_t* w;
    int64_t n, k, row_bytes;
};

static bool mat_ref(int qtype, const uint8_t* w, int64_t n, int64_t k, MatRef* m) {
    Format f;
    if (!format_of(qtype, &f) || k % f.block || k % 32) return false;
    *m = MatRef{qtype, f, unpack_of(qtype), kunpack_of(qtype), w, n, k, k / f.block * f.bytes};
    return true;
}

// Rows [r0, r1) with one fused kernel (a template argument, so the kernel inlines into the row
// loop: an indirect call per row cost ~1 ms per token on the 262144-row lm_head).
template <FusedFn F>
static void fused_rows(const MatRef& M, int64_t r0, int64_t r1, const QRow& a, float* out, float* m16) {
    for (int64_t r = r0; r < r1; r++) out[r] = F(M.w + r * M.row_bytes, a, M.k, m16);
}

// One activation row against weight rows [r0, r1): out[r] = row r . a. Decode's mat-vec, shared
// by the grouped mat-mul (a task with one row) and the decode plans, so both give the same bits.
// Not inlined into its callers: a larger job_task stopped clang inlining dot_q8_0 there (lm_head
// m=2 went from 8.2 to 10.5 ms).
__attribute__((noinline)) static void dot_rows_1(const MatRef& M, int64_t r0, int64_t r1, const QRow& a, float* out) {
    const int64_t k = M.k, nb32 = k / 32;
    if (M.qtype == T_Q8_0) {  // in place
        for (int64_t r = r0; r < r1; r++) out[r] = dot_q8_0(M.w + r * M.row_bytes, a, nb32);
        return;
    }
    if (!scratch_reserve(k)) abort();  // out of memory for k bytes: nothing sane to return
    Scratch& s = t_scratch;
#if defined(__AVX2__)
    switch (M.qtype) {
        case T_Q5_0: fused_rows<fused_q5_0>(M, r0, r1, a, out, s.m16); return;
        case T_Q4_K: fused_rows<fused_q4_k>(M, r0, r1, a, out, s.m16); return;
        case T_Q6_K: fused_rows<fused_q6_k>(M, r0, r1, a, out, s.m16); return;
        default: break;
    }
#endif
    if (M.kunpack) {
        for (int64_t r = r0; r < r1; r++) {
            M.kunpack(M.w + r * M.row_bytes, k / 256, s.krow());
            out[r] = kdot(s.krow(), a, k / 256);
        }
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        M.unpack(M.w + r * M.row_bytes, k / M.fmt.block, s.q, s.d16, s.m16);
        float v = dot_unpacked(s.q, s.d16, a, nb32);
        if (M.fmt.has_min) v += dot_min(s.m16, a.s16, k / 16);
        out[r] = v;
    }
}

static void job_task(void* ctx, int64_t t) {
    const Job* J = (const Job*)ctx;
    const int64_t k = J->k, nb32 = k / 32, n16 = k / 16, nb = k / J->fmt.block;
    const uint8_t* w = J->tw[t];
    const int64_t p0 = J->tp0[t], pn = J->tpn[t];
    const MatRef M{J->qtype, J->fmt, J->unpack, kunpack_of(J->qtype), w, J->n, k, J->row_bytes};
    if (pn == 1) {  // one activation row: in place
        dot_rows_1(M, J->tr0[t], J->tr1[t], acts_row(*J->acts, J->xrow[p0]), J->out + J->pairs[p0] * J->n);
        return;
    }
    if (J->qtype == T_Q8_0 && pn < 4) {  // in place; from 4 rows on, the blocked path below wins
        for (int64_t r = J->tr0[t]; r < J->tr1[t]; r++) {
            const uint8_t* row = w + r * J->row_bytes;
            for (int64_t i = p0; i < p0 + pn; i++)
                J->out[J->pairs[i] * J->n + r] = dot_q8_0(row, acts_row(*J->acts, J->xrow[i]), nb32);
        }
        return;
    }
#if defined(__AVX2__)
    // Q6_K with up to 3 rows, Q4_K with up to 4: codes built once from the raw block for all rows.
    // Unpacking the row first costs more until more rows share it (Q4_K, 4 rows: 105 -> 95 ns a
    // 2048-value row; at 8 rows both ways measured the same).
    const int64_t fused_max = J->qtype == T_Q4_K ? 4 : J->qtype == T_Q6_K ? 3 : 0;
    if (pn <= fused_max) {
        QRow a[4];
        float v[4];
        for (int64_t i = 0; i < pn; i++) a[i] = acts_row(*J->acts, J->xrow[p0 + i]);
        for (int64_t r = J->tr0[t]; r < J->tr1[t]; r++) {
            const uint8_t* row = w + r * J->row_bytes;
            int64_t i = 0;
            for (; i + 4 <= pn; i += 4) fused_q4_k_r<4>(row, a + i, k, v + i);
            if (i < pn) fused_k_rows(J->qtype, row, a + i, (int)(pn - i), k, v + i);
            for (int64_t j = 0; j < pn; j++) J->out[J->pairs[p0 + j] * J->n + r] = v[j];
        }
        return;
    }
#endif
    // Two or more activation rows: unpacking the weight row once and reusing it measured faster than
    // in-place dots (the Q5_0 codes cost as much as the dot product).
    if (!scratch_reserve(k)) abort();
    Scratch& s = t_scratch;
    for (int64_t r = J->tr0[t]; r < J->tr1[t]; r++) {
        int64_t i = p0;
        if (M.kunpack) {
            M.kunpack(w + r * J->row_bytes, k / 256, s.krow());
#if defined(__AVX2__)
            for (; i + 4 <= p0 + pn; i += 4) {
                QRow a[4];
                for (int j = 0; j < 4; j++) a[j] = acts_row(*J->acts, J->xrow[i + j]);
                float v[4];
                kdot4(s.krow(), a, k / 256, v);
                for (int j = 0; j < 4; j++) J->out[J->pairs[i + j] * J->n + r] = v[j];
            }
#endif
            for (; i < p0 + pn; i++) J->out[J->pairs[i] * J->n + r] = kdot(s.krow(), acts_row(*J->acts, J->xrow[i]), k / 256);
            continue;
        }
        J->unpack(w + r * J->row_bytes, nb, s.q, s.d16, s.m16);
#if defined(__AVX2__)
        for (; i + 4 <= p0 + pn; i += 4) {
            QRow a[4];
            for (int j = 0; j < 4; j++) a[j] = acts_row(*J->acts, J->xrow[i + j]);
            float v[4];
            dot_unpacked4(s.q, s.d16, a, nb32, v);
            for (int j = 0; j < 4; j++) {
                if (J->fmt.has_min) v[j] += dot_min(s.m16, a[j].s16, n16);
                J->out[J->pairs[i + j] * J->n + r] = v[j];
            }
        }
#endif
        for (; i < p0 + pn; i++) {
            const QRow a = acts_row(*J->acts, J->xrow[i]);
            float v = dot_unpacked(s.q, s.d16, a, nb32);
            if (J->fmt.has_min) v += dot_min(s.m16, a.s16, n16);
            J->out[J->pairs[i] * J->n + r] = v;
        }
    }
}

struct QuantJob {
    const float* x;
    const Acts* acts;
};

static void quant_task(void* ctx, int64_t t) {
    const QuantJob* Q = (const QuantJob*)ctx;
    quantize_row(Q->x + t * Q->acts->k, Q->acts->k, acts_row(*Q->acts, t));
}

// Rows per task: enough tasks to balance threads, few enough that each task's bytes
// (its weight rows) amortise the scheduling.
static int64_t rows_per_task(int64_t n, int64_t k, int64_t npairs, int nthreads) {
    int64_t r = n / (8 * (int64_t)nthreads);
    const int64_t min_rows = 4;
    if (r < min_rows) r = min_rows;
    (void)k;
    (void)npairs;
    return r;
}

// Grouped mat-mul. Experts e in [0, E) with weights w + e * n * row_bytes; entry i
// (0 <= i < npairs) multiplies activation row xrow_of[i] by expert eid[i]'s W.T into out row i.
static int grouped_matmul(int qtype, const uint8_t* w, int64_t E, int64_t n, int64_t k, const float* x,
                          int64_t xrows, const int32_t* eid, const int64_t* xrow_of, int64_t npairs, float* out,
                          int nthreads) {
    Format fmt;
    if (!format_of(qtype, &fmt)) return 1;
    if (k % fmt.block || k % 32) return 2;
    fp16_init();
    const int64_t row_bytes = k / fmt.block * fmt.bytes;
    int rc = 0;
    Acts acts;
    const bool acts_ok = acts_alloc(&acts, xrows, k);
    int64_t* count = (int64_t*)calloc(E + 1, sizeof(int64_t));
    int64_t* order = (int64_t*)malloc(sizeof(int64_t) * (npairs + 1));
    int64_t* xr = (int64_t*)malloc(sizeof(int64_t) * (npairs + 1));
    const uint8_t** tw = nullptr;
    int64_t *tr0 = nullptr, *tr1 = nullptr, *tp0 = nullptr, *tpn = nullptr;
    if (!acts_ok || !count || !order || !xr) { rc = 3; goto done; }
    {
        QuantJob qj{x, &acts};
        parallel_for(xrows, xrows * k >= (1 << 16) ? nthreads : 1, quant_task, &qj);
        // counting sort of entries by expert (stable)
        // An id outside [0, E) (NO_EXPERT, -1) selects nothing: its output row is zeros.
        for (int64_t i = 0; i < npairs; i++) {
            if (eid[i] >= 0 && eid[i] < E) count[eid[i] + 1]++;
            else memset(out + i * n, 0, sizeof(float) * n);
        }
        for (int64_t e = 0; e < E; e++) count[e + 1] += count[e];
        {
            int64_t* pos = (int64_t*)malloc(sizeof(int64_t) * (E + 1));
            if (!pos) { rc = 3; goto done; }
            memcpy(pos, count, sizeof(int64_t) * (E + 1));
            for (int64_t i = 0; i < npairs; i++) {
                if (eid[i] < 0 || eid[i] >= E) continue;
                const int64_t j = pos[eid[i]]++;
                order[j] = i;
                xr[j] = xrow_of[i];
            }
            free(pos);
        }
        int64_t used = 0, most = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t c = count[e + 1] - count[e];
            if (c) { used++; if (c > most) most = c; }
        }
        const int64_t rpt = rows_per_task(n, k, npairs, nthreads);
        const int64_t per_expert = (n + rpt - 1) / rpt, ntasks = used * per_expert;
        tw = (const uint8_t**)malloc(sizeof(void*) * (ntasks + 1));
        tr0 = (int64_t*)malloc(sizeof(int64_t) * (ntasks + 1));
        tr1 = (int64_t*)malloc(sizeof(int64_t) * (ntasks + 1));
        tp0 = (int64_t*)malloc(sizeof(int64_t) * (ntasks + 1));
        tpn = (int64_t*)malloc(sizeof(int64_t) * (ntasks + 1));
        if (!tw || !tr0 || !tr1 || !tp0 || !tpn) { rc = 3; goto done; }
        int64_t t = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t c = count[e + 1] - count[e];
            if (!c) continue;
            for (int64_t r = 0; r < n; r += rpt, t++) {
                tw[t] = w + e * n * row_bytes;
                tr0[t] = r;
                tr1[t] = r + rpt < n ? r + rpt : n;
                tp0[t] = count[e];
                tpn[t] = c;
            }
        }
        Job J{qtype, fmt, unpack_of(qtype), n, k, row_bytes, &acts, out, tw, tr0, tr1, tp0, tpn, order, xr};
        // Tiny products: one thread (a wake-up costs more than the work).
        const int nt = n * k * (most < 4 ? most : 4) < (1 << 17) ? 1 : nthreads;
        parallel_for(ntasks, nt, job_task, &J);
    }
done:
    acts_free(&acts);
    free(count); free(order); free(xr);
    free(tw); free(tr0); free(tr1); free(tp0); free(tpn);
    return rc;
}

// ---------------------------------------------------------------------------- exports

FM_EXPORT int fm_abi_version(void) { return 5; }

FM_EXPORT int fm_supported(int qtype) {
    Format f;
    return format_of(qtype, &f) ? 1 : 0;
}

// out[m, n] = x[m, k] @ W.T, W = n rows of raw GGML blocks.
FM_EXPORT int fm_qmatmul(int qtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, float* out,
                         int nthreads) {
    if (m <= 0 || n <= 0) return 0;
    int32_t* eid = (int32_t*)calloc(m, sizeof(int32_t));
    int64_t* xr = (int64_t*)malloc(sizeof(int64_t) * m);
    if (!eid || !xr) { free(eid); free(xr); return 3; }
    for (int64_t i = 0; i < m; i++) xr[i] = i;
    const int rc = grouped_matmul(qtype, w, 1, n, k, x, m, eid, xr, m, out, nthreads);
    free(eid);
    free(xr);
    return rc;
}

// out[p, n] = x[xrow(p)] @ W[ids[p]].T for p < npairs; xrow(p) = p (per_slot) or p / topk.
// A pair whose id is outside [0, E) (NO_EXPERT) gets a row of zeros.
FM_EXPORT int fm_moe_matmul(int qtype, const uint8_t* w, int64_t E, int64_t n, int64_t k, const float* x,
                            int64_t xrows, const int32_t* ids, int64_t npairs, int64_t topk, int per_slot, float* out,
                            int nthreads) {
    if (npairs <= 0 || n <= 0) return 0;
    int64_t* xr = (int64_t*)malloc(sizeof(int64_t) * npairs);
    if (!xr) return 3;
    for (int64_t p = 0; p < npairs; p++) xr[p] = per_slot ? p : p / topk;
    const int rc = grouped_matmul(qtype, w, E, n, k, x, xrows, ids, xr, npairs, out, nthreads);
    free(xr);
    return rc;
}

struct DeqJob {
    UnpackFn unpack;
    Format fmt;
    const uint8_t* w;
    int64_t k, row_bytes;
    const int64_t* ids;
    float* out;
};

static void deq_task(void* ctx, int64_t t) {
    const DeqJob* D = (const DeqJob*)ctx;
    const int64_t k = D->k;
    if (!scratch_reserve(k)) abort();
    Scratch& s = t_scratch;
    D->unpack(D->w + D->ids[t] * D->row_bytes, k / D->fmt.block, s.q, s.d16, s.m16);
    float* o = D->out + t * k;
    for (int64_t g = 0; g < k / 16; g++) {
        const float d = s.d16[g], m = D->fmt.has_min ? s.m16[g] : 0.f;
        for (int j = 0; j < 16; j++) o[16 * g + j] = d * (float)s.q[16 * g + j] + m;
    }
}

// out[i, k] = row ids[i] of the GGML table w (ids checked by the caller).
FM_EXPORT int fm_get_rows(int qtype, const uint8_t* w, int64_t k, const int64_t* ids, int64_t nids, float* out,
                          int nthreads) {
    Format fmt;
    if (!format_of(qtype, &fmt)) return 1;
    if (k % fmt.block || k % 32) return 2;
    fp16_init();
    DeqJob D{unpack_of(qtype), fmt, w, k, k / fmt.block * fmt.bytes, ids, out};
    parallel_for(nids, nids * k >= (1 << 16) ? nthreads : 1, deq_task, &D);
    return 0;
}

// ---------------------------------------------------------------------------- decode-step helpers
//
// One decode token (B = T = 1, float32) of ferrum::qk_norm_rope_cache: per-head RMSNorm (when a
// weight is given), RoPE at one position, k/v written to cache slot `slot`, rotated q out. The torch
// version is ~35 small ops (70 us a call, ~1.3 ms of a Gemma CPU token); this is the same
// arithmetic in the same roundings (no fma: -ffp-contract=off), except the sum of squares' order.

static void norm_rope_head(const float* x, const float* w, float eps, const float* cs, const float* sn, int64_t D,
                           int interleaved, float* o) {
    float scale = 1.f;
    if (w) {
        float ss = 0.f;
        for (int64_t j = 0; j < D; j++) ss += x[j] * x[j];
        scale = 1.f / sqrtf(ss / (float)D + eps);
    }
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + h;
        const float x1 = w ? w[a] * (x[a] * scale) : x[a], x2 = w ? w[b] * (x[b] * scale) : x[b];
        o[a] = x1 * cs[i] - x2 * sn[i];
        o[b] = x2 * cs[i] + x1 * sn[i];
    }
}

// q [Hq, D], k and v [Hkv, D]; caches [Hkv, S, D] contiguous; qw/kw [D] or null; angle i =
// (float)position * inv_freq[i] (cosf/sinf may differ from torch's by an ulp).
FM_EXPORT int fm_qk_norm_rope_cache(const float* q, const float* k, const float* v, int64_t Hq, int64_t Hkv, int64_t D,
                                    const float* qw, const float* kw, float eps, const float* inv_freq, int64_t position,
                                    int interleaved, float* kc, float* vc, int64_t S, int64_t slot, float* qout) {
    if (D % 2 || D > 2048 || slot < 0 || slot >= S) return 2;
    float cs[1024], sn[1024];
    for (int64_t i = 0; i < D / 2; i++) {
        const float f = (float)position * inv_freq[i];
        cs[i] = cosf(f);
        sn[i] = sinf(f);
    }
    for (int64_t h = 0; h < Hq; h++) norm_rope_head(q + h * D, qw, eps, cs, sn, D, interleaved, qout + h * D);
    for (int64_t h = 0; h < Hkv; h++) {
        norm_rope_head(k + h * D, kw, eps, cs, sn, D, interleaved, kc + (h * S + slot) * D);
        memcpy(vc + (h * S + slot) * D, v + h * D, sizeof(float) * D);
    }
    return 0;
}

// ferrum::add_rms_norm on float32 rows (36 calls per Gemma token at ~40 us of torch ops each, ~1.4 ms):
// x' = pre ? rms(x, pre) : x; s = residual + x'; normed = rms(s, w); rms(v, g) = g * (v * (1 / sqrt(mean(v^2) + eps))).
static inline float rms_scale(const float* v, int64_t H, float eps) {
    float ss = 0.f;
    for (int64_t j = 0; j < H; j++) ss += v[j] * v[j];
    return 1.f / sqrtf(ss / (float)H + eps);
}

// Rows [0, rows) of a row-wise op, split over the pool when there is enough work (prefill: the norms,
// activations and MoE combine were ~8% of a 64-token A3B prefill on one thread). A row's result
// never depends on the split.
typedef void (*RowFn)(const void* args, int64_t r0, int64_t r1);
struct RowJob {
    RowFn fn;
    const void* args;
    int64_t rows, per;
};

static void row_task(void* ctx, int64_t t) {
    const RowJob* J = (const RowJob*)ctx;
    const int64_t r0 = t * J->per, r1 = r0 + J->per < J->rows ? r0 + J->per : J->rows;
    J->fn(J->args, r0, r1);
}

static void parallel_rows(int64_t rows, int64_t work_per_row, int nthreads, RowFn fn, const void* args) {
    const int nt = rows * work_per_row < (1 << 16) ? 1 : nthreads;
    if (nt <= 1 || rows < 2) {
        fn(args, 0, rows);
        return;
    }
    const int64_t per = (rows + 4 * nt - 1) / (4 * nt);
    RowJob J{fn, args, rows, per};
    parallel_for((rows + per - 1) / per, nt, row_task, &J);
}

struct AddNormArgs {
    const float *x, *residual, *pre, *w;
    float eps;
    int64_t H;
    float *normed, *sum;
};

static void add_norm_rows(const void* p, int64_t r0, int64_t r1) {
    const AddNormArgs* A = (const AddNormArgs*)p;
    const int64_t H = A->H;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = A->x + r * H, *residual = A->residual + r * H;
        float *sum = A->sum + r * H, *normed = A->normed + r * H;
        const float px = A->pre ? rms_scale(x, H, A->eps) : 1.f;
        for (int64_t j = 0; j < H; j++) sum[j] = residual[j] + (A->pre ? A->pre[j] * (x[j] * px) : x[j]);
        const float ps = rms_scale(sum, H, A->eps);
        for (int64_t j = 0; j < H; j++) normed[j] = A->w[j] * (sum[j] * ps);
    }
}

FM_EXPORT int fm_add_rms_norm(const float* x, const float* residual, const float* pre, const float* w, float eps,
                              int64_t rows, int64_t H, float* normed, float* sum, int nthreads) {
    if (H <= 0) return 2;
    AddNormArgs A{x, residual, pre, w, eps, H, normed, sum};
    parallel_rows(rows, 4 * H, nthreads, add_norm_rows, &A);
    return 0;
}

// ---------------------------------------------------------------------------- float32 decode helpers
//
// Shared by the ops' native paths (ferrum_mps/native/__init__.py) and the decode plans below, so a
// token computes the same bits through either: greedy text does not depend on which one ran.

struct NormArgs {
    const float *x, *w;
    float eps;
    int64_t H;
    float* out;
};

static void norm_rows(const void* p, int64_t r0, int64_t r1) {
    const NormArgs* A = (const NormArgs*)p;
    for (int64_t r = r0; r < r1; r++) {
        const float* x = A->x + r * A->H;
        float* out = A->out + r * A->H;
        const float s = rms_scale(x, A->H, A->eps);
        for (int64_t j = 0; j < A->H; j++) out[j] = A->w[j] * (x[j] * s);
    }
}

FM_EXPORT int fm_rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t H, float* out, int nthreads) {
    if (H <= 0) return 2;
    NormArgs A{x, w, eps, H, out};
    parallel_rows(rows, 2 * H, nthreads, norm_rows, &A);
    return 0;
}

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

static inline float act_fn(int act, float g) {
    if (act == ACT_SILU) return g / (1.f + expf(-g));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
}

#if defined(__AVX2__)
// exp of 8 floats: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e^r by Cephes' expf polynomial,
// 2^n through the exponent bits; within ~2 ulp of expf. x is clamped to [-87, 88], where 2^n stays a
// normal float: exp(-87) = 1.6e-38 stands for anything smaller, which no caller tells from 0.
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline __m256 act8(int act, __m256 g) {
    const __m256 one = _mm256_set1_ps(1.f);
    if (act == ACT_SILU)  // g / (1 + e^-g)
        return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    // 0.5 g (1 + tanh(y)), tanh(y) = 1 - 2 / (1 + e^2y)
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
    const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(one, exp8(_mm256_add_ps(y, y)))));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, t));
}
#endif

struct ActArgs {
    int act;
    const float *g, *u;
    int64_t n;
    float* out;
};

enum { ACT_CHUNK = 1024 };  // a multiple of 8: every element takes the same (SIMD or tail) path whatever the split

// Chunks [c0, c1) of ACT_CHUNK elements: 8 lanes at a time with AVX2 (scalar tanhf made Gemma's
// prefill gate/up 38 ms of 170: ~16 ns an element); the tail, and the portable build, in libm.
static void act_chunks(const void* p, int64_t c0, int64_t c1) {
    const ActArgs* A = (const ActArgs*)p;
    const int64_t end = c1 * ACT_CHUNK < A->n ? c1 * ACT_CHUNK : A->n;
    int64_t j = c0 * ACT_CHUNK;
#if defined(__AVX2__)
    for (; j + 8 <= end; j += 8)
        _mm256_storeu_ps(A->out + j, _mm256_mul_ps(act8(A->act, _mm256_loadu_ps(A->g + j)), _mm256_loadu_ps(A->u + j)));
#endif
    for (; j < end; j++) A->out[j] = act_fn(A->act, A->g[j]) * A->u[j];
}

// out = act(g) * u, elementwise (out may be g).
FM_EXPORT int fm_act_mul(int act, const float* g, const float* u, int64_t n, float* out, int nthreads) {
    if (act != ACT_SILU && act != ACT_GELU_TANH) return 2;
    ActArgs A{act, g, u, n, out};
    parallel_rows((n + ACT_CHUNK - 1) / ACT_CHUNK, 16 * ACT_CHUNK, nthreads, act_chunks, &A);
    return 0;
}

static inline float dot_f32(const float* a, const float* b, int64_t n) {
    int64_t j = 0;
    float acc = 0.f;
#if defined(__AVX2__)  // four chains: one FMA chain's latency made the MoE router 1.9 ms of a 64-token layer
    __m256 v[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; j + 32 <= n; j += 32)
        for (int c = 0; c < 4; c++)
            v[c] = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8 * c), _mm256_loadu_ps(b + j + 8 * c), v[c]);
    for (; j + 8 <= n; j += 8) v[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), v[0]);
    acc = hsum8(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
#endif
    for (; j < n; j++) acc += a[j] * b[j];
    return acc;
}

// Per-thread float scratch (attention scores, MoE router probabilities and expert rows).
static __thread float* t_f = nullptr;
static __thread int64_t t_fcap = 0;
static float* fscratch(int64_t n) {
    if (n > t_fcap) {
        free(t_f);
        t_f = (float*)malloc(sizeof(float) * (n > 0 ? n : 1));
        t_fcap = t_f ? n : 0;
    }
    return t_f;
}

struct AttnJob {
    const float *q, *kc, *vc;
    float* out;
    int64_t Hq, G, D, S, lo, hi;
    float scale;
};

// One query head over cache slots [lo, hi): softmax(q.k * scale) . v in float32.
static void attn_task(void* ctx, int64_t bh) {
    const AttnJob* J = (const AttnJob*)ctx;
    const int64_t D = J->D, n = J->hi - J->lo, b = bh / J->Hq, h = bh % J->Hq;
    const int64_t Hkv = J->Hq / J->G;
    float* p = fscratch(n);
    if (!p) abort();
    const float* qh = J->q + bh * D;
    const float* K = J->kc + ((b * Hkv + h / J->G) * J->S + J->lo) * D;
    const float* V = J->vc + ((b * Hkv + h / J->G) * J->S + J->lo) * D;
    float mx = -INFINITY;
    for (int64_t s = 0; s < n; s++) {
        p[s] = dot_f32(qh, K + s * D, D) * J->scale;
        mx = p[s] > mx ? p[s] : mx;
    }
    float sum = 0.f;
    for (int64_t s = 0; s < n; s++) sum += (p[s] = expf(p[s] - mx));
    float* o = J->out + bh * D;
    memset(o, 0, sizeof(float) * D);
    for (int64_t s = 0; s < n; s++) {
        const float* v = V + s * D;
        for (int64_t j = 0; j < D; j++) o[j] += p[s] * v[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < D; j++) o[j] *= inv;
}

// One query per (batch, head): q [B, Hq, D], caches [B, Hkv, S, D], slots [lo, hi) -> out [B, Hq, D].
FM_EXPORT int fm_decode_attention(const float* q, const float* kc, const float* vc, int64_t B, int64_t Hq, int64_t Hkv,
                                  int64_t D, int64_t S, int64_t lo, int64_t hi, float scale, float* out, int nthreads) {
    if (Hkv < 1 || Hq % Hkv || lo < 0 || hi <= lo || hi > S) return 2;
    AttnJob J{q, kc, vc, out, Hq, Hq / Hkv, D, S, lo, hi, scale};
    parallel_for(B * Hq, (hi - lo) * D * Hq * B < (1 << 16) ? 1 : nthreads, attn_task, &J);
    return 0;
}

enum { MAX_TOPK = 16 };

struct RouteJob {
    const float *x, *router;
    int64_t H, E, topk;
    int normalize;
    float* w;
    int32_t* ids;
};

static void route_task(void* ctx, int64_t t) {
    const RouteJob* J = (const RouteJob*)ctx;
    const int64_t H = J->H, E = J->E, topk = J->topk;
    const float* x = J->x + t * H;
    float* w = J->w + t * topk;
    int32_t* ids = J->ids + t * topk;
    float* probs = fscratch(E);
    if (!probs) abort();
    float mx = -INFINITY;
    for (int64_t e = 0; e < E; e++) {
        probs[e] = dot_f32(x, J->router + e * H, H);
        mx = probs[e] > mx ? probs[e] : mx;
    }
    float sum = 0.f;
    for (int64_t e = 0; e < E; e++) sum += (probs[e] = expf(probs[e] - mx));
    if (isnan(sum)) {
        for (int64_t s = 0; s < topk; s++) { ids[s] = -1; w[s] = 0.f; }
        return;
    }
    for (int64_t e = 0; e < E; e++) probs[e] /= sum;
    for (int64_t s = 0; s < topk; s++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            bool taken = false;
            for (int64_t r = 0; r < s; r++) taken |= ids[r] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        ids[s] = (int32_t)best;
        w[s] = probs[best];
    }
    if (J->normalize) {
        float ws = 0.f;
        for (int64_t s = 0; s < topk; s++) ws += w[s];
        for (int64_t s = 0; s < topk; s++) w[s] /= ws;
    }
}

// Router of T tokens: probs = softmax(x . router^T) (float32), the top-k with ties to the lower
// expert index, renormalised when asked; a token whose softmax is undefined (a NaN or infinite
// logit) gets ids -1 and weights 0 (ferrum::moe_gate_route's rules). Tokens in parallel.
FM_EXPORT int fm_moe_route(const float* x, const float* router, int64_t T, int64_t H, int64_t E, int64_t topk,
                           int normalize, float* w, int32_t* ids, int nthreads) {
    if (topk < 1 || topk > MAX_TOPK || topk > E) return 2;
    RouteJob J{x, router, H, E, topk, normalize, w, ids};
    parallel_for(T, T * E * H < (1 << 18) ? 1 : nthreads, route_task, &J);
    return 0;
}

// out[t] = sum over slots s (in order) of w[t, s] * y[t, s]: y [T, topk, H].
struct CombineArgs {
    const float *w, *y;
    int64_t topk, H;
    float* out;
};

static void combine_rows(const void* p, int64_t t0, int64_t t1) {
    const CombineArgs* A = (const CombineArgs*)p;
    const int64_t k = A->topk, H = A->H;
    for (int64_t t = t0; t < t1; t++)
        for (int64_t j = 0; j < H; j++) {
            float acc = 0.f;
            for (int64_t s = 0; s < k; s++) acc += A->w[t * k + s] * A->y[(t * k + s) * H + j];
            A->out[t * H + j] = acc;
        }
}

FM_EXPORT int fm_moe_combine(const float* w, const float* y, int64_t T, int64_t topk, int64_t H, float* out,
                             int nthreads) {
    CombineArgs A{w, y, topk, H, out};
    parallel_rows(T, topk * H, nthreads, combine_rows, &A);
    return 0;
}

// ---------------------------------------------------------------------------- decode plans
//
// A model's whole one-token decode step (batch 1, float32) as a list of steps that one call runs:
// models/native_plan.py builds the list from the decoder layers once per cache. Per token, Python
// then pays one ctypes call instead of ~10 dispatched ops per layer, and the pool's threads stay
// hot from step to step instead of handing the cores to torch's OpenMP team between ops.
//
// A step is an op code, PLAN_INTS int64 (integers and pointers) and PLAN_FLOATS float64. PLAN_LAYOUT
// names each op's fields in order; Python reads it (fm_plan_layout) to fill them, so the two sides
// share one description. Per token, `position` (rope) and `slot` (cache slot, attended up to and
// including it) are the call's arguments.

#define PLAN_INTS 24
#define PLAN_FLOATS 2
#define FM_STR_(x) #x
#define FM_STR(x) FM_STR_(x)
enum { PLAN_MAX_MATS = 2 * MAX_TOPK };
struct PlanStep {
    int64_t op;
    int64_t i[PLAN_INTS];
    double f[PLAN_FLOATS];
};

enum { P_RMS_NORM = 1, P_ADD_RMS_NORM, P_MATVEC, P_ACT_MUL, P_QK_ROPE_CACHE, P_ATTENTION, P_MOE };

static const char PLAN_LAYOUT[] =
    "ints " FM_STR(PLAN_INTS) " floats " FM_STR(PLAN_FLOATS) "\n"
    "acts silu gelu_pytorch_tanh\n"
    "1 rms_norm x w H out | eps\n"
    "2 add_rms_norm x residual pre w H normed sum | eps\n"
    "3 matvec x k nmat qtype0 w0 n0 bias0 out0 qtype1 w1 n1 bias1 out1 qtype2 w2 n2 bias2 out2 |\n"
    "4 act_mul act g u n out |\n"
    "5 qk_rope_cache q k v Hq Hkv D qw kw inv_freq interleaved kc vc S qout | eps\n"
    "6 attention q kc vc Hq Hkv D S window out | scale\n"
    "7 moe x H E topk inter normalize router gate_qtype gate_w up_qtype up_w down_qtype down_w act out |\n";

FM_EXPORT const char* fm_plan_layout(void) { return PLAN_LAYOUT; }

// Growable per-thread buffers (the caller's; workers only read them during a step).
struct PlanBufs {
    Acts acts;             // quantized activation rows
    int64_t cap = 0;       // values they hold
    float* f = nullptr;    // float scratch
    int64_t fcap = 0;
};
static __thread PlanBufs t_plan;

// `rows` activation rows of `stride` values (a multiple of 256: the K layout's offsets), grown only.
static bool plan_reserve(int64_t rows, int64_t stride, int64_t floats) {
    PlanBufs& b = t_plan;
    stride = (stride + 255) / 256 * 256;
    if (rows * stride > b.cap) {
        if (!acts_alloc(&b.acts, rows * stride / 256, 256)) { b.cap = 0; return false; }
        b.cap = rows * stride;
    }
    b.acts.k = stride;
    if (floats > b.fcap) {
        free(b.f);
        b.f = (float*)malloc(sizeof(float) * floats);
        b.fcap = b.f ? floats : 0;
        if (!b.fcap) return false;
    }
    return true;
}

static QRow plan_row(int64_t i) { return acts_row(t_plan.acts, i); }

// Mat-vecs of several matrices in one pool job: matrix j's rows against activation row a[j].
struct MatvecJob {
    int nmat = 0;
    MatRef m[PLAN_MAX_MATS];
    QRow a[PLAN_MAX_MATS];
    float* out[PLAN_MAX_MATS];
    const float* bias[PLAN_MAX_MATS];
    int64_t rpt[PLAN_MAX_MATS];
    int64_t first[PLAN_MAX_MATS + 1];  // first task of each matrix
};

static void matvec_task(void* ctx, int64_t t) {
    const MatvecJob* J = (const MatvecJob*)ctx;
    int j = 0;
    while (t >= J->first[j + 1]) j++;
    const MatRef& M = J->m[j];
    const int64_t r0 = (t - J->first[j]) * J->rpt[j], r1 = r0 + J->rpt[j] < M.n ? r0 + J->rpt[j] : M.n;
    dot_rows_1(M, r0, r1, J->a[j], J->out[j]);
    if (J->bias[j])
        for (int64_t r = r0; r < r1; r++) J->out[j][r] += J->bias[j][r];
}

static void run_matvecs(MatvecJob* J, int nthreads) {
    int64_t tasks = 0, work = 0;
    for (int j = 0; j < J->nmat; j++) {
        J->rpt[j] = rows_per_task(J->m[j].n, J->m[j].k, 1, nthreads);
        J->first[j] = tasks;
        tasks += (J->m[j].n + J->rpt[j] - 1) / J->rpt[j];
        work += J->m[j].n * J->m[j].k;
    }
    J->first[J->nmat] = tasks;
    parallel_for(tasks, work < (1 << 17) ? 1 : nthreads, matvec_task, J);  // tiny: a wake-up costs more
}

static int plan_matvec(const int64_t* a, int nthreads) {
    const float* x = (const float*)a[0];
    const int64_t k = a[1], nmat = a[2];
    if (nmat < 1 || nmat > 3 || !plan_reserve(1, k, 0)) return 2;
    quantize_row(x, k, plan_row(0));
    MatvecJob J;
    J.nmat = (int)nmat;
    for (int j = 0; j < nmat; j++) {
        const int64_t* m = a + 3 + 5 * j;
        if (!mat_ref((int)m[0], (const uint8_t*)m[1], m[2], k, &J.m[j])) return 3;
        J.a[j] = plan_row(0);
        J.bias[j] = (const float*)m[3];
        J.out[j] = (float*)m[4];
    }
    run_matvecs(&J, nthreads);
    return 0;
}

// The MoE feed-forward of one token: route, gate/up of the top-k experts in one pool job, act,
// down in another, combine. The same functions (and dot_rows_1) as the ops' native path.
static int plan_moe(const int64_t* a, int nthreads) {
    const float* x = (const float*)a[0];
    const int64_t H = a[1], E = a[2], topk = a[3], inter = a[4];
    const int normalize = (int)a[5], act = (int)a[13];
    float* out = (float*)a[14];
    if (topk > MAX_TOPK || H % 32 || inter % 32) return 2;
    if (!plan_reserve(1 + topk, H > inter ? H : inter, 2 * topk * inter + topk * H)) return 3;
    float* g = t_plan.f;
    float* u = g + topk * inter;
    float* y = u + topk * inter;
    int32_t ids[MAX_TOPK];
    float w[MAX_TOPK];
    const int rc = fm_moe_route(x, (const float*)a[6], 1, H, E, topk, normalize, w, ids, 1);
    if (rc) return rc;
    if (ids[0] < 0) {  // an undefined softmax selects no expert (weight 0): the block adds nothing
        memset(out, 0, sizeof(float) * H);
        return 0;
    }
    quantize_row(x, H, plan_row(0));
    MatvecJob J;
    J.nmat = (int)(2 * topk);
    for (int64_t s = 0; s < topk; s++) {
        MatRef gm, um;
        if (!mat_ref((int)a[7], (const uint8_t*)a[8], inter, H, &gm) || !mat_ref((int)a[9], (const uint8_t*)a[10], inter, H, &um))
            return 4;
        gm.w += ids[s] * inter * gm.row_bytes;
        um.w += ids[s] * inter * um.row_bytes;
        J.m[2 * s] = gm;
        J.m[2 * s + 1] = um;
        J.a[2 * s] = J.a[2 * s + 1] = plan_row(0);
        J.out[2 * s] = g + s * inter;
        J.out[2 * s + 1] = u + s * inter;
        J.bias[2 * s] = J.bias[2 * s + 1] = nullptr;
    }
    run_matvecs(&J, nthreads);
    fm_act_mul(act, g, u, topk * inter, g, 1);
    for (int64_t s = 0; s < topk; s++) quantize_row(g + s * inter, inter, plan_row(1 + s));
    J.nmat = (int)topk;
    for (int64_t s = 0; s < topk; s++) {
        MatRef dm;
        if (!mat_ref((int)a[11], (const uint8_t*)a[12], H, inter, &dm)) return 4;
        dm.w += ids[s] * H * dm.row_bytes;
        J.m[s] = dm;
        J.a[s] = plan_row(1 + s);
        J.out[s] = y + s * H;
        J.bias[s] = nullptr;
    }
    run_matvecs(&J, nthreads);
    return fm_moe_combine(w, y, 1, topk, H, out, 1);
}

static int plan_step(const PlanStep& st, int64_t position, int64_t slot, int nthreads) {
    const int64_t* a = st.i;
    switch (st.op) {
        case P_RMS_NORM:
            return fm_rms_norm((const float*)a[0], (const float*)a[1], (float)st.f[0], 1, a[2], (float*)a[3], 1);
        case P_ADD_RMS_NORM:
            return fm_add_rms_norm((const float*)a[0], (const float*)a[1], (const float*)a[2], (const float*)a[3],
                                   (float)st.f[0], 1, a[4], (float*)a[5], (float*)a[6], 1);
        case P_MATVEC:
            return plan_matvec(a, nthreads);
        case P_ACT_MUL:
            return fm_act_mul((int)a[0], (const float*)a[1], (const float*)a[2], a[3], (float*)a[4], 1);
        case P_QK_ROPE_CACHE:
            return fm_qk_norm_rope_cache((const float*)a[0], (const float*)a[1], (const float*)a[2], a[3], a[4], a[5],
                                         (const float*)a[6], (const float*)a[7], (float)st.f[0], (const float*)a[8],
                                         position, (int)a[9], (float*)a[10], (float*)a[11], a[12], slot, (float*)a[13]);
        case P_ATTENTION: {
            const int64_t Hq = a[3], Hkv = a[4], D = a[5], S = a[6], window = a[7];
            if (Hkv < 1 || Hq % Hkv || slot < 0 || slot >= S) return 2;
            const int64_t hi = slot + 1, lo = window > 0 && hi > window ? hi - window : 0;
            return fm_decode_attention((const float*)a[0], (const float*)a[1], (const float*)a[2], 1, Hq, Hkv, D, S, lo,
                                       hi, (float)st.f[0], (float*)a[8], nthreads);
        }
        case P_MOE:
            return plan_moe(a, nthreads);
        default:
            return 1;
    }
}

// Runs steps [0, nsteps) for one token; 0, or 1000 * (step + 1) + the step's error code.
FM_EXPORT int fm_plan_run(const PlanStep* steps, int64_t nsteps, int64_t position, int64_t slot, int nthreads) {
    fp16_init();
    for (int64_t s = 0; s < nsteps; s++) {
        const int rc = plan_step(steps[s], position, slot, nthreads);
        if (rc) return (int)(1000 * (s + 1) + rc);
    }
    return 0;
}

// A call that exercises the instruction set the library was built for: the loader runs it
// in a subprocess first, so a CPU that lacks an advertised feature fails there, not here.
FM_EXPORT int fm_selftest(void) {
    uint8_t blk[34] = {0, 0x3c};  // fp16 1.0
    for (int j = 0; j < 32; j++) blk[2 + j] = (uint8_t)(j - 16);
    float x[32], y = 0.f;
    for (int j = 0; j < 32; j++) x[j] = 1.f;
    if (fm_qmatmul(T_Q8_0, blk, 1, 32, x, 1, &y, 1) != 0) return 1;
    if (fabsf(y - (-16.f)) >= 0.5f) return 2;
    // A Q4_K block (the K-quant kernels): d = 1, dmin = 0, every sub-block scale 1 and min 0, every
    // code 2: its product with 256 ones is 512, through the fused one-row and the unpacked 4-row code.
    uint8_t k4[144] = {0, 0x3c, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1};
    for (int j = 16; j < 144; j++) k4[j] = 0x22;
    float xs[5 * 256], ys[5];
    for (int j = 0; j < 5 * 256; j++) xs[j] = 1.f;
    for (int m = 1; m <= 5; m += 4) {
        if (fm_qmatmul(T_Q4_K, k4, 1, 256, xs, m, ys, 1) != 0) return 3;
        for (int i = 0; i < m; i++)
            if (fabsf(ys[i] - 512.f) >= 0.5f) return 4;
    }
    return 0;
}
