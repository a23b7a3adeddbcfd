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

// Explicit instantiations, one literal host name each.
template [[host_name("dequant_q4_0_f32")]] kernel k_dequant_f32_t k_dequant<blk_q4_0, float>;
template [[host_name("dequant_q4_1_f32")]] kernel k_dequant_f32_t k_dequant<blk_q4_1, float>;
template [[host_name("dequant_q5_0_f32")]] kernel k_dequant_f32_t k_dequant<blk_q5_0, float>;
template [[host_name("dequant_q5_1_f32")]] kernel k_dequant_f32_t k_dequant<blk_q5_1, float>;
template [[host_name("dequant_q8_0_f32")]] kernel k_dequant_f32_t k_dequant<blk_q8_0, float>;
template [[host_name("dequant_q2_k_f32")]] kernel k_dequant_f32_t k_dequant<blk_q2_K, float>;
template [[host_name("dequant_q3_k_f32")]] kernel k_dequant_f32_t k_dequant<blk_q3_K, float>;
template [[host_name("dequant_q4_k_f32")]] kernel k_dequant_f32_t k_dequant<blk_q4_K, float>;
template [[host_name("dequant_q5_k_f32")]] kernel k_dequant_f32_t k_dequant<blk_q5_K, float>;
template [[host_name("dequant_q6_k_f32")]] kernel k_dequant_f32_t k_dequant<blk_q6_K, float>;
template [[host_name("dequant_iq4_nl_f32")]] kernel k_dequant_f32_t k_dequant<blk_iq4_nl, float>;
template [[host_name("dequant_iq4_xs_f32")]] kernel k_dequant_f32_t k_dequant<blk_iq4_xs, float>;
template [[host_name("dequant_f16_f32")]] kernel k_dequant_f32_t k_dequant<blk_f16, float>;
template [[host_name("dequant_bf16_f32")]] kernel k_dequant_f32_t k_dequant<blk_bf16, float>;
template [[host_name("dequant_q4_0_f16")]] kernel k_dequant_f16_t k_dequant<blk_q4_0, half>;
template [[host_name("dequant_q4_1_f16")]] kernel k_dequant_f16_t k_dequant<blk_q4_1, half>;
template [[host_name("dequant_q5_0_f16")]] kernel k_dequant_f16_t k_dequant<blk_q5_0, half>;
template [[host_name("dequant_q5_1_f16")]] kernel k_dequant_f16_t k_dequant<blk_q5_1, half>;
template [[host_name("dequant_q8_0_f16")]] kernel k_dequant_f16_t k_dequant<blk_q8_0, half>;
template [[host_name("dequant_q2_k_f16")]] kernel k_dequant_f16_t k_dequant<blk_q2_K, half>;
template [[host_name("dequant_q3_k_f16")]] kernel k_dequant_f16_t k_dequant<blk_q3_K, half>;
template [[host_name("dequant_q4_k_f16")]] kernel k_dequant_f16_t k_dequant<blk_q4_K, half>;
template [[host_name("dequant_q5_k_f16")]] kernel k_dequant_f16_t k_dequant<blk_q5_K, half>;
template [[host_name("dequant_q6_k_f16")]] kernel k_dequant_f16_t k_dequant<blk_q6_K, half>;
template [[host_name("dequant_iq4_nl_f16")]] kernel k_dequant_f16_t k_dequant<blk_iq4_nl, half>;
template [[host_name("dequant_iq4_xs_f16")]] kernel k_dequant_f16_t k_dequant<blk_iq4_xs, half>;
template [[host_name("dequant_f16_f16")]] kernel k_dequant_f16_t k_dequant<blk_f16, half>;
template [[host_name("dequant_bf16_f16")]] kernel k_dequant_f16_t k_dequant<blk_bf16, half>;
template [[host_name("get_rows_q4_0")]] kernel k_get_rows_t k_get_rows<blk_q4_0>;
template [[host_name("get_rows_q4_1")]] kernel k_get_rows_t k_get_rows<blk_q4_1>;
template [[host_name("get_rows_q5_0")]] kernel k_get_rows_t k_get_rows<blk_q5_0>;
template [[host_name("get_rows_q5_1")]] kernel k_get_rows_t k_get_rows<blk_q5_1>;
template [[host_name("get_rows_q8_0")]] kernel k_get_rows_t k_get_rows<blk_q8_0>;
template [[host_name("get_rows_q2_k")]] kernel k_get_rows_t k_get_rows<blk_q2_K>;
template [[host_name("get_rows_q3_k")]] kernel k_get_rows_t k_get_rows<blk_q3_K>;
template [[host_name("get_rows_q4_k")]] kernel k_get_rows_t k_get_rows<blk_q4_K>;
template [[host_name("get_rows_q5_k")]] kernel k_get_rows_t k_get_rows<blk_q5_K>;
template [[host_name("get_rows_q6_k")]] kernel k_get_rows_t k_get_rows<blk_q6_K>;
template [[host_name("get_rows_iq4_nl")]] kernel k_get_rows_t k_get_rows<blk_iq4_nl>;
template [[host_name("get_rows_iq4_xs")]] kernel k_get_rows_t k_get_rows<blk_iq4_xs>;
template [[host_name("get_rows_f16")]] kernel k_get_rows_t k_get_rows<blk_f16>;
template [[host_name("get_rows_bf16")]] kernel k_get_rows_t k_get_rows<blk_bf16>;

#if defined(__HAVE_BFLOAT__)
typedef decltype(k_dequant<blk_q4_K, bfloat>) k_dequant_bf16_t;
template [[host_name("dequant_q4_0_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q4_0, bfloat>;
template [[host_name("dequant_q4_1_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q4_1, bfloat>;
template [[host_name("dequant_q5_0_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q5_0, bfloat>;
template [[host_name("dequant_q5_1_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q5_1, bfloat>;
template [[host_name("dequant_q8_0_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q8_0, bfloat>;
template [[host_name("dequant_q2_k_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q2_K, bfloat>;
template [[host_name("dequant_q3_k_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q3_K, bfloat>;
template [[host_name("dequant_q4_k_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q4_K, bfloat>;
template [[host_name("dequant_q5_k_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q5_K, bfloat>;
template [[host_name("dequant_q6_k_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_q6_K, bfloat>;
template [[host_name("dequant_iq4_nl_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_iq4_nl, bfloat>;
template [[host_name("dequant_iq4_xs_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_iq4_xs, bfloat>;
template [[host_name("dequant_f16_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_f16, bfloat>;
template [[host_name("dequant_bf16_bf16")]] kernel k_dequant_bf16_t k_dequant<blk_bf16, bfloat>;
#endif
