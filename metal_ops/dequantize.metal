// ferrum::dequantize and ferrum::qembedding on MPS (quant_blocks.h is prepended).
//   dequant_<type>_<dt>(raw, out, n16)                 one thread per 16 values, group 256
//   get_rows_<type>(raw, ids int32, out f32, dim, rows, n)  one thread per 16 values of a gathered row;
//                                                     an id outside [0, rows) gives zeros, never a read.

template <typename B, typename T>
kernel void k_dequant(const device uchar *raw [[buffer(0)]], device T *out [[buffer(1)]],
                      constant long &n16 [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
    if (long(gid) >= n16) return;
    float w[16];
    dequant16((const device B *)raw + gid / uint(B::N16), short(gid % uint(B::N16)), w);
    device T *o = out + ulong(gid) * 16;
    for (short i = 0; i < 16; ++i) o[i] = T(w[i]);
}

template <typename B>
kernel void k_get_rows(const device uchar *raw [[buffer(0)]], const device int *ids [[buffer(1)]],
                       device float *out [[buffer(2)]], constant long &dim [[buffer(3)]],
                       constant long &rows [[buffer(4)]], constant long &n [[buffer(5)]],
                       uint gid [[thread_position_in_grid]]) {
    if (long(gid) >= n) return;
    const long per_row = dim / 16;
    const long tok = long(gid) / per_row, c = long(gid) % per_row;
    const int id = ids[tok];
    device float *o = out + ulong(gid) * 16;
    if (id < 0 || long(id) >= rows) {
        for (short i = 0; i < 16; ++i) o[i] = 0.f;
        return;
    }
    const ulong rb = ulong(dim / B::QK) * sizeof(B);
    const device B *row = (const device B *)(raw + ulong(id) * rb);
    float w[16];
    dequant16(row + c / long(B::N16), short(c % long(B::N16)), w);
    for (short i = 0; i < 16; ++i) o[i] = w[i];
}

typedef decltype(k_dequant<blk_q4_K, float>) k_dequant_f32_t;
typedef decltype(k_dequant<blk_q4_K, half>) k_dequant_f16_t;
typedef decltype(k_get_rows<blk_q4_K>) k_get_rows_t;

#define DQ(name, B, dt, T) template [[host_name("dequant_" name "_" #dt)]] kernel k_dequant_##dt##_t k_dequant<B, T>;
#define GR(name, B) template [[host_name("get_rows_" name)]] kernel k_get_rows_t k_get_rows<B>;

#define DQ_ALL(X, dt, T)                    \
    X("q4_0", blk_q4_0, dt, T)              \
    X("q4_1", blk_q4_1, dt, T)              \
    X("q5_0", blk_q5_0, dt, T)              \
    X("q5_1", blk_q5_1, dt, T)              \
    X("q8_0", blk_q8_0, dt, T)              \
    X("q2_k", blk_q2_K, dt, T)              \
    X("q3_k", blk_q3_K, dt, T)              \
    X("q4_k", blk_q4_K, dt, T)              \
    X("q5_k", blk_q5_K, dt, T)              \
    X("q6_k", blk_q6_K, dt, T)              \
    X("f16", blk_f16, dt, T)                \
    X("bf16", blk_bf16, dt, T)

DQ_ALL(DQ, f32, float)
DQ_ALL(DQ, f16, half)

GR("q4_0", blk_q4_0)
GR("q4_1", blk_q4_1)
GR("q5_0", blk_q5_0)
GR("q5_1", blk_q5_1)
GR("q8_0", blk_q8_0)
GR("q2_k", blk_q2_K)
GR("q3_k", blk_q3_K)
GR("q4_k", blk_q4_K)
GR("q5_k", blk_q5_K)
GR("q6_k", blk_q6_K)
GR("f16", blk_f16)
GR("bf16", blk_bf16)

#if defined(__HAVE_BFLOAT__)
typedef decltype(k_dequant<blk_q4_K, bfloat>) k_dequant_bf16_t;
DQ_ALL(DQ, bf16, bfloat)
#endif
