// ferrum::dequantize and ferrum::qembedding on MPS (quant_blocks.h is prepended).
//   dequant_<type>_<dt>(raw, out, n16)                 one thread per 16 values, group 256
//   get_rows[_i64]_<type>(raw, ids int32 [int64], out f32, dim, rows, n)  one thread per 16 values of a gathered row;
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

template <typename B, typename I>
kernel void k_get_rows(const device uchar *raw [[buffer(0)]], const device I *ids [[buffer(1)]],
                       device float *out [[buffer(2)]], constant long &dim [[buffer(3)]],
                       constant long &rows [[buffer(4)]], constant long &n [[buffer(5)]],
                       uint gid [[thread_position_in_grid]]) {
    if (long(gid) >= n) return;
    const long per_row = dim / 16;
    const long tok = long(gid) / per_row, c = long(gid) % per_row;
    const long id = long(ids[tok]);  // int32 or int64 ids, compared as read: nothing wraps
    device float *o = out + ulong(gid) * 16;
    if (id < 0 || id >= rows) {
        for (short i = 0; i < 16; ++i) o[i] = 0.f;
        return;
    }
    const ulong rb = ulong(dim / B::QK) * sizeof(B);
    const device B *row = (const device B *)(raw + ulong(id) * rb);
    float w[16];
    dequant16(row + c / long(B::N16), short(c % long(B::N16)), w);
    for (short i = 0; i < 16; ++i) o[i] = w[i];
}

// Instantiations: one per type of the family in the registry (x activation dtype for dequant);
// FERRUM_TYPES_<family> and FERRUM_DTYPES come from the prelude (ferrum_mps.kernels.prelude()).
#define DQ_TYPEDEFS(a, b, T, TN) typedef decltype(k_dequant<blk_q4_K, T>) k_dequant_##TN##_t;
FERRUM_DTYPES(DQ_TYPEDEFS, _, _)
typedef decltype(k_get_rows<blk_q4_K, int>) k_get_rows_t;
typedef decltype(k_get_rows<blk_q4_K, long>) k_get_rows_i64_t;

#define DQ_DEQUANT(CT, QN, T, TN) \
    template [[host_name("dequant_" #QN "_" #TN)]] kernel k_dequant_##TN##_t k_dequant<blk_##CT, T>;
#define DQ_DEQUANT_ALL(CT, QN) FERRUM_DTYPES(DQ_DEQUANT, CT, QN)
#define DQ_GET_ROWS(CT, QN)                                                                    \
    template [[host_name("get_rows_" #QN)]] kernel k_get_rows_t k_get_rows<blk_##CT, int>;      \
    template [[host_name("get_rows_i64_" #QN)]] kernel k_get_rows_i64_t k_get_rows<blk_##CT, long>;
FERRUM_TYPES_dequant(DQ_DEQUANT_ALL)
FERRUM_TYPES_get_rows(DQ_GET_ROWS)
