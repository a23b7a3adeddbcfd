// Prelude of the Metal-on-CPU harness: replaces <metal_stdlib> for kernels compiled as
// C++ by clang. Only what compute kernels for LLM inference use, with Metal semantics:
// half rounds after every operation (-ffloat16-excess-precision=none), vector casts
// convert (the translator rewrites them to __msl_cv / __msl_make), simd operations see
// only the active lanes, threadgroup memory is shared by the group and poisoned.
#pragma once
#include "msl_rt.h"

#define __MSLI inline __attribute__((always_inline))

extern "C" __attribute__((visibility("default"))) MslApi* __msl_api = 0;

// ---- address spaces and keywords ---------------------------------------------------
#define kernel
#define thread
#ifdef __MSL_CHECK_AS
// Type-check pass only: clang's address spaces reject what the Metal compiler rejects
// (a device pointer where a threadgroup pointer is expected, writes to constant, ...).
#define device __attribute__((address_space(1)))
#define constant const __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant
#define threadgroup
#endif
#define threadgroup_imageblock
#define ray_data
#define object_data

// ---- scalar and vector types ---------------------------------------------------------
typedef _Float16 half;
#if defined(__clang_major__) && __clang_major__ >= 17
#define __MSL_HAS_BFLOAT 1
typedef __bf16 bfloat;
#endif
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef long intptr_t;
typedef unsigned long uintptr_t;

#define __MSL_VEC(T, name)                                                         \
    typedef T name##2 __attribute__((ext_vector_type(2)));                         \
    typedef T name##3 __attribute__((ext_vector_type(3)));                         \
    typedef T name##4 __attribute__((ext_vector_type(4)));                         \
    typedef T packed_##name##2 __attribute__((ext_vector_type(2), aligned(sizeof(T)))); \
    typedef T packed_##name##4 __attribute__((ext_vector_type(4), aligned(sizeof(T))));
__MSL_VEC(float, float)
__MSL_VEC(half, half)
__MSL_VEC(int, int)
__MSL_VEC(uint, uint)
__MSL_VEC(short, short)
__MSL_VEC(ushort, ushort)
__MSL_VEC(char, char)
__MSL_VEC(uchar, uchar)
__MSL_VEC(long, long)
__MSL_VEC(ulong, ulong)
#ifdef __MSL_HAS_BFLOAT
__MSL_VEC(bfloat, bfloat)
#endif
// packed_T3: 3 elements without the 4th of padding (12 bytes for float), converting to T3.
template <class T> struct __msl_packed3 {
    T x, y, z;
    typedef T __attribute__((ext_vector_type(3))) V;
    __msl_packed3() = default;
    __msl_packed3(V v) : x(v.x), y(v.y), z(v.z) {}
    operator V() const { return V{x, y, z}; }
    T& operator[](int i) { return (&x)[i]; }
    T operator[](int i) const { return (&x)[i]; }
};
typedef __msl_packed3<float> packed_float3;
typedef __msl_packed3<half> packed_half3;
typedef __msl_packed3<int> packed_int3;
typedef __msl_packed3<uint> packed_uint3;
typedef __msl_packed3<short> packed_short3;
typedef __msl_packed3<ushort> packed_ushort3;
typedef __msl_packed3<char> packed_char3;
typedef __msl_packed3<uchar> packed_uchar3;
typedef bool bool2 __attribute__((ext_vector_type(2)));
typedef bool bool3 __attribute__((ext_vector_type(3)));
typedef bool bool4 __attribute__((ext_vector_type(4)));

#if defined(__MSL_HAS_BFLOAT) && !defined(__MSL_CHECK_AS)
// float -> bfloat conversion helper the compiler calls but not every libgcc ships.
extern "C" __attribute__((weak)) __bf16 __truncsfbf2(float f) {
    uint u = __builtin_bit_cast(uint, f);
    ushort r;
    if ((u & 0x7fffffffu) > 0x7f800000u) r = (ushort)((u >> 16) | 0x40);
    else r = (ushort)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return __builtin_bit_cast(__bf16, r);
}
#endif

namespace metal {
template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));

// ---- minimal type traits ----------------------------------------------------------------
template <class T, T v> struct integral_constant { static constexpr T value = v; };
typedef integral_constant<bool, true> true_type;
typedef integral_constant<bool, false> false_type;
template <class A, class B> struct is_same : false_type {};
template <class A> struct is_same<A, A> : true_type {};
template <class A, class B> constexpr bool is_same_v = is_same<A, B>::value;
template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <bool B, class T = void> using enable_if_t = typename enable_if<B, T>::type;
template <bool B, class T, class F> struct conditional { typedef T type; };
template <class T, class F> struct conditional<false, T, F> { typedef F type; };
template <bool B, class T, class F> using conditional_t = typename conditional<B, T, F>::type;
template <class T> struct remove_reference { typedef T type; };
template <class T> struct remove_reference<T&> { typedef T type; };
template <class T> struct remove_cv { typedef T type; };
template <class T> struct remove_cv<const T> { typedef T type; };
template <class T> struct remove_cv<volatile T> { typedef T type; };
template <class T> struct remove_cv<const volatile T> { typedef T type; };
template <class T> using remove_cv_t = typename remove_cv<T>::type;

template <class T> struct __vt { typedef T E; static constexpr int n = 1; };
template <class T, int N> struct __vt<T __attribute__((ext_vector_type(N)))> { typedef T E; static constexpr int n = N; };
template <class T> using __elem_t = typename __vt<T>::E;
template <class T> constexpr bool __is_fp = is_same_v<remove_cv_t<T>, float> || is_same_v<remove_cv_t<T>, half> ||
#ifdef __MSL_HAS_BFLOAT
                                            is_same_v<remove_cv_t<T>, bfloat> ||
#endif
                                            is_same_v<remove_cv_t<T>, double>;
template <class T> constexpr bool is_floating_point_v = __is_fp<T>;
template <class T> constexpr bool is_integral_v = !__is_fp<T> && __vt<T>::n == 1 && (T)1 / (T)2 == (T)0;
template <class T> constexpr bool is_signed_v = (T)-1 < (T)0;
template <class T> constexpr bool is_unsigned_v = !is_signed_v<T>;
template <class T> constexpr bool is_scalar_v = __vt<T>::n == 1;
template <class T> constexpr bool is_vector_v = __vt<T>::n != 1;
template <class T> struct make_unsigned;
template <> struct make_unsigned<char> { typedef uchar type; };
template <> struct make_unsigned<uchar> { typedef uchar type; };
template <> struct make_unsigned<short> { typedef ushort type; };
template <> struct make_unsigned<ushort> { typedef ushort type; };
template <> struct make_unsigned<int> { typedef uint type; };
template <> struct make_unsigned<uint> { typedef uint type; };
template <> struct make_unsigned<long> { typedef ulong type; };
template <> struct make_unsigned<ulong> { typedef ulong type; };
template <class T> using make_unsigned_t = typename make_unsigned<T>::type;

// ---- conversions: Metal vector casts convert element-wise ------------------------------
template <class To, class From> __MSLI To __msl_cv(From x) {
    if constexpr (__vt<To>::n == 1) {
        static_assert(__vt<From>::n == 1, "Metal cannot cast a vector to a scalar");
        return (To)x;
    } else if constexpr (__vt<From>::n == 1) {
        return (To)(__elem_t<To>)x;
    } else {
        static_assert(__vt<From>::n == __vt<To>::n, "Metal vector cast between different lengths");
        return __builtin_convertvector(x, To);
    }
}
// Converting a comparison: clang's vector masks are -1/0, Metal's bool vectors give 1/0.
template <class To, class From> __MSLI To __msl_cvb(From x) {
    if constexpr (__vt<From>::n == 1) return __msl_cv<To>(x);
    else return __msl_cv<To>(x & (From)(__elem_t<From>)1);
}
template <class E, class A> __MSLI void __msl_put(E* buf, int& i, A a) {
    if constexpr (__vt<A>::n == 1) buf[i++] = (E)a;
    else
        for (int k = 0; k < __vt<A>::n; k++) buf[i++] = (E)a[k];
}
// float4(a, b.xy, c) and friends.
template <class V, class... A> __MSLI V __msl_make(A... a) {
    if constexpr (sizeof...(A) == 0) {
        return (V)(__elem_t<V>)0;
    } else if constexpr (sizeof...(A) == 1) {
        return __msl_cv<V>(a...);
    } else {
        static_assert((__vt<A>::n + ...) == __vt<V>::n, "wrong number of vector constructor components");
        typedef __elem_t<V> E;
        E buf[__vt<V>::n];
        int i = 0;
        (__msl_put<E>(buf, i, a), ...);
        V r;
        for (int k = 0; k < __vt<V>::n; k++) r[k] = buf[k];
        return r;
    }
}
template <class T, class U> __MSLI T as_type(U u) {
    static_assert(sizeof(T) == sizeof(U), "as_type between types of different sizes");
    return __builtin_bit_cast(T, u);
}
template <class T, class U> __MSLI T convert_type(U u) { return __msl_cv<T>(u); }

// ---- element-wise helpers ----------------------------------------------------------------
template <class T, class F> __MSLI T __msl_map1(T x, F f) {
    if constexpr (__vt<T>::n == 1) return (T)f(x);
    else {
        T r;
        for (int i = 0; i < __vt<T>::n; i++) r[i] = (__elem_t<T>)f((__elem_t<T>)x[i]);
        return r;
    }
}
template <class T, class F> __MSLI T __msl_map2(T a, T b, F f) {
    if constexpr (__vt<T>::n == 1) return (T)f(a, b);
    else {
        T r;
        for (int i = 0; i < __vt<T>::n; i++) r[i] = (__elem_t<T>)f((__elem_t<T>)a[i], (__elem_t<T>)b[i]);
        return r;
    }
}
template <class T, class F> __MSLI T __msl_map3(T a, T b, T c, F f) {
    if constexpr (__vt<T>::n == 1) return (T)f(a, b, c);
    else {
        T r;
        for (int i = 0; i < __vt<T>::n; i++)
            r[i] = (__elem_t<T>)f((__elem_t<T>)a[i], (__elem_t<T>)b[i], (__elem_t<T>)c[i]);
        return r;
    }
}
template <class A, class B> struct __msl_sc {
    typedef conditional_t<is_same_v<A, B>, A,
                          conditional_t<__is_fp<A> && !__is_fp<B>, A,
                                        conditional_t<__is_fp<B> && !__is_fp<A>, B,
                                                      conditional_t<(sizeof(A) >= sizeof(B)), A, B>>>>
        type;
};
// Common type of mixed arguments: a vector wins over a scalar (fmax(0, v)).
template <class A, class B> using __msl_common_t =
    conditional_t<(__vt<A>::n > 1), A, conditional_t<(__vt<B>::n > 1), B, typename __msl_sc<A, B>::type>>;
template <class A, class B, class C> using __msl_common3_t = __msl_common_t<__msl_common_t<A, B>, C>;

// Float functions: computed in float, rounded to the argument's type (half).
#define __MSL_F1(name, expr)                                                                         \
    template <class T> __MSLI T name(T x) {                                                          \
        return __msl_map1(x, [](auto e) { float v = (float)e; return (decltype(e))(expr); });        \
    }
__MSL_F1(fabs, __builtin_fabsf(v))
__MSL_F1(ceil, __builtin_ceilf(v))
__MSL_F1(floor, __builtin_floorf(v))
__MSL_F1(round, __builtin_roundf(v))
__MSL_F1(rint, __builtin_rintf(v))
__MSL_F1(trunc, __builtin_truncf(v))
__MSL_F1(sqrt, __builtin_sqrtf(v))
__MSL_F1(rsqrt, 1.0f / __builtin_sqrtf(v))
__MSL_F1(exp, __builtin_expf(v))
__MSL_F1(exp2, __builtin_exp2f(v))
__MSL_F1(exp10, __builtin_powf(10.0f, v))
__MSL_F1(log, __builtin_logf(v))
__MSL_F1(log2, __builtin_log2f(v))
__MSL_F1(log10, __builtin_log10f(v))
__MSL_F1(sin, __builtin_sinf(v))
__MSL_F1(cos, __builtin_cosf(v))
__MSL_F1(tan, __builtin_tanf(v))
__MSL_F1(asin, __builtin_asinf(v))
__MSL_F1(acos, __builtin_acosf(v))
__MSL_F1(atan, __builtin_atanf(v))
__MSL_F1(sinh, __builtin_sinhf(v))
__MSL_F1(cosh, __builtin_coshf(v))
__MSL_F1(tanh, __builtin_tanhf(v))
__MSL_F1(fract, v - __builtin_floorf(v))
__MSL_F1(saturate, v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v))
__MSL_F1(sign, v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f))
__MSL_F1(erf, __builtin_erff(v))
#undef __MSL_F1

#define __MSL_F2(name, expr)                                                                      \
    template <class A, class B> __MSLI __msl_common_t<A, B> name(A a, B b) {                      \
        typedef __msl_common_t<A, B> R;                                                           \
        return __msl_map2(__msl_cv<R>(a), __msl_cv<R>(b), [](auto ea, auto eb) {                  \
            float x = (float)ea, y = (float)eb;                                                   \
            return (decltype(ea))(expr);                                                          \
        });                                                                                       \
    }
__MSL_F2(pow, __builtin_powf(x, y))
__MSL_F2(powr, __builtin_powf(x, y))
__MSL_F2(fmod, __builtin_fmodf(x, y))
__MSL_F2(atan2, __builtin_atan2f(x, y))
__MSL_F2(copysign, __builtin_copysignf(x, y))
__MSL_F2(fmin, __builtin_fminf(x, y))
__MSL_F2(fmax, __builtin_fmaxf(x, y))
__MSL_F2(fdim, x > y ? x - y : 0.0f)
__MSL_F2(step, y < x ? 0.0f : 1.0f)
#undef __MSL_F2

template <class A, class B, class C> __MSLI __msl_common3_t<A, B, C> fma(A a, B b, C c) {
    typedef __msl_common3_t<A, B, C> R;
    return __msl_map3(__msl_cv<R>(a), __msl_cv<R>(b), __msl_cv<R>(c),
                      [](auto x, auto y, auto z) { return (decltype(x))__builtin_fmaf((float)x, (float)y, (float)z); });
}
template <class A, class B, class C> __MSLI __msl_common3_t<A, B, C> mad(A a, B b, C c) { return fma(a, b, c); }

// min/max/clamp/abs work on integers too.
template <class A, class B> __MSLI __msl_common_t<A, B> min(A a, B b) {
    typedef __msl_common_t<A, B> R;
    return __msl_map2(__msl_cv<R>(a), __msl_cv<R>(b), [](auto x, auto y) { return y < x ? y : x; });
}
template <class A, class B> __MSLI __msl_common_t<A, B> max(A a, B b) {
    typedef __msl_common_t<A, B> R;
    return __msl_map2(__msl_cv<R>(a), __msl_cv<R>(b), [](auto x, auto y) { return x < y ? y : x; });
}
template <class A, class B, class C> __MSLI __msl_common3_t<A, B, C> clamp(A x, B lo, C hi) {
    typedef __msl_common3_t<A, B, C> R;
    return min(max(__msl_cv<R>(x), __msl_cv<R>(lo)), __msl_cv<R>(hi));
}
template <class T> __MSLI T abs(T x) {
    return __msl_map1(x, [](auto e) { return (decltype(e))(e < (decltype(e))0 ? -e : e); });
}
template <class A, class B, class C> __MSLI __msl_common_t<A, B> mix(A x, B y, C a) {
    typedef __msl_common_t<A, B> R;
    return __msl_cv<R>(x) + (__msl_cv<R>(y) - __msl_cv<R>(x)) * __msl_cv<R>(a);
}
template <class A, class B, class C> __MSLI C smoothstep(A e0, B e1, C x) {
    C t = clamp((x - __msl_cv<C>(e0)) / (__msl_cv<C>(e1) - __msl_cv<C>(e0)), 0, 1);
    return t * t * ((__elem_t<C>)3 - (__elem_t<C>)2 * t);
}
template <class T> __MSLI auto isnan(T x) { return x != x; }
template <class T> __MSLI auto isinf(T x) { return fabs(x) == (T)__builtin_inff(); }
template <class T> __MSLI auto isfinite(T x) { return !(isnan(x)) && !(isinf(x)); }
template <class T> __MSLI auto signbit(T x) { return x < (T)0; }

template <class A, class B> __MSLI __elem_t<A> dot(A a, B b) {
    static_assert(__vt<A>::n > 1, "dot takes vectors");
    __elem_t<A> s = a[0] * b[0];
    for (int i = 1; i < __vt<A>::n; i++) s += a[i] * b[i];
    return s;
}
template <class T> __MSLI __elem_t<T> length(T v) { return sqrt(dot(v, v)); }
template <class T> __MSLI __elem_t<T> length_squared(T v) { return dot(v, v); }
template <class T> __MSLI __elem_t<T> distance(T a, T b) { return length(a - b); }
template <class T> __MSLI T normalize(T v) { return v * rsqrt(dot(v, v)); }
template <class T> __MSLI bool all(T v) {
    if constexpr (__vt<T>::n == 1) return (bool)v;
    else {
        for (int i = 0; i < __vt<T>::n; i++)
            if (!v[i]) return false;
        return true;
    }
}
template <class T> __MSLI bool any(T v) {
    if constexpr (__vt<T>::n == 1) return (bool)v;
    else {
        for (int i = 0; i < __vt<T>::n; i++)
            if (v[i]) return true;
        return false;
    }
}
template <class T, class C> __MSLI T select(T a, T b, C c) {
    if constexpr (__vt<C>::n == 1) return c ? b : a;
    else {
        T r;
        for (int i = 0; i < __vt<T>::n; i++) r[i] = c[i] ? b[i] : a[i];
        return r;
    }
}

// ---- integer functions -------------------------------------------------------------------
template <class T> __MSLI T popcount(T x) {
    return __msl_map1(x, [](auto e) { return (decltype(e))__builtin_popcountll((unsigned long long)make_unsigned_t<decltype(e)>(e)); });
}
template <class T> __MSLI T clz(T x) {
    return __msl_map1(x, [](auto e) {
        typedef make_unsigned_t<decltype(e)> U;
        U u = (U)e;
        return (decltype(e))(u ? __builtin_clzll((unsigned long long)u) - (64 - 8 * (int)sizeof(U)) : 8 * (int)sizeof(U));
    });
}
template <class T> __MSLI T ctz(T x) {
    return __msl_map1(x, [](auto e) {
        typedef make_unsigned_t<decltype(e)> U;
        U u = (U)e;
        return (decltype(e))(u ? __builtin_ctzll((unsigned long long)u) : 8 * (int)sizeof(U));
    });
}
template <class T> __MSLI T extract_bits(T x, uint offset, uint bits) {
    return __msl_map1(x, [=](auto e) {
        typedef decltype(e) E;
        typedef make_unsigned_t<E> U;
        if (bits == 0) return (E)0;
        U u = (U)((U)e >> offset);
        if (bits >= 8 * sizeof(U)) return (E)u;
        U m = (U)(((U)1 << bits) - 1);
        if constexpr (is_signed_v<E>) {
            U v = u & m;
            U s = (U)1 << (bits - 1);
            return (E)((v ^ s) - s);
        }
        return (E)(u & m);
    });
}
template <class T> __MSLI T insert_bits(T base, T insert, uint offset, uint bits) {
    typedef make_unsigned_t<__elem_t<T>> U;
    U m = bits >= 8 * sizeof(U) ? (U)~(U)0 : (U)((((U)1 << bits) - 1) << offset);
    return __msl_map2(base, insert, [=](auto b, auto i) {
        return (decltype(b))(((U)b & (U)~m) | (((U)i << offset) & m));
    });
}
template <class T> __MSLI T mulhi(T a, T b) {
    return __msl_map2(a, b, [](auto x, auto y) { return (decltype(x))(((__int128)x * (__int128)y) >> (8 * sizeof(x))); });
}
template <class T> __MSLI T rotate(T v, T s) {
    return __msl_map2(v, s, [](auto x, auto y) {
        typedef make_unsigned_t<decltype(x)> U;
        const int w = 8 * sizeof(U);
        int k = (int)((U)y % w);
        return (decltype(x))(k ? (U)(((U)x << k) | ((U)x >> (w - k))) : (U)x);
    });
}
template <class T> __MSLI T absdiff(T a, T b) { return a > b ? a - b : b - a; }

#define __MSL_FNS                                                                                  \
    using metal::cos; using metal::exp; using metal::exp2; using metal::log; using metal::log2;           \
    using metal::pow; using metal::powr; using metal::rsqrt; using metal::sin; using metal::sqrt;         \
    using metal::tanh; using metal::fma; using metal::fmax; using metal::fmin; using metal::tan;          \
    using metal::exp10; using metal::log10; using metal::fabs; using metal::floor; using metal::ceil;
namespace precise { __MSL_FNS }
namespace fast { __MSL_FNS }
#undef __MSL_FNS

// ---- numeric limits and constants --------------------------------------------------------
template <class T> struct numeric_limits;
template <> struct numeric_limits<float> {
    static constexpr float max() { return 3.40282347e+38f; }
    static constexpr float min() { return 1.17549435e-38f; }
    static constexpr float lowest() { return -3.40282347e+38f; }
    static constexpr float infinity() { return __builtin_inff(); }
    static constexpr float quiet_NaN() { return __builtin_nanf(""); }
    static constexpr float epsilon() { return 1.1920929e-7f; }
};
template <> struct numeric_limits<half> {
    static constexpr half max() { return (half)65504.0f; }
    static constexpr half min() { return (half)6.10351562e-05f; }
    static constexpr half lowest() { return (half)-65504.0f; }
    static constexpr half infinity() { return (half)__builtin_inff(); }
    static constexpr half quiet_NaN() { return (half)__builtin_nanf(""); }
    static constexpr half epsilon() { return (half)0.0009765625f; }
};
#define __MSL_ILIM(T, lo, hi)                                   \
    template <> struct numeric_limits<T> {                      \
        static constexpr T max() { return hi; }                 \
        static constexpr T min() { return lo; }                 \
        static constexpr T lowest() { return lo; }              \
    };
__MSL_ILIM(char, -128, 127)
__MSL_ILIM(uchar, 0, 255)
__MSL_ILIM(short, -32768, 32767)
__MSL_ILIM(ushort, 0, 65535)
__MSL_ILIM(int, (-2147483647 - 1), 2147483647)
__MSL_ILIM(uint, 0u, 4294967295u)
__MSL_ILIM(long, (-9223372036854775807L - 1), 9223372036854775807L)
__MSL_ILIM(ulong, 0ul, 18446744073709551615ul)
#undef __MSL_ILIM

// ---- barriers -----------------------------------------------------------------------------
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8, mem_object_data = 16 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((int)a | (int)b); }
// A simd operation or barrier is identified by its source position (the default
// arguments are evaluated at the caller): robust to the optimizer merging or
// duplicating calls, unlike return addresses.
#define __MSL_SITE_PARAMS uint __line = __builtin_LINE(), uint __col = __builtin_COLUMN()
#define __MSL_SITE (((__msl_u64)__line << 16) | __col)
__MSLI void threadgroup_barrier(mem_flags = mem_flags::mem_none, __MSL_SITE_PARAMS) { __msl_api->barrier(__MSL_SITE); }
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel, memory_order_seq_cst };
enum class thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
__MSLI void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope::thread_scope_device) {}

// ---- simdgroup functions ---------------------------------------------------------------
// A lane stores its operand in its slot and waits; the scheduler runs `fn` once over the
// lanes that reached the same call site (the active ones) and writes each lane's result.
template <class T> __MSLI T __msl_ld(const MslThread* l, int i) { T v; __builtin_memcpy(&v, l[i].in, sizeof(T)); return v; }
template <class T> __MSLI void __msl_st(MslThread* l, int i, T v) { __builtin_memcpy(l[i].out, &v, sizeof(T)); }
template <class T> __MSLI T __msl_simd(T x, __msl_i64 arg, MslSimdFn fn, __msl_u64 site) {
    static_assert(sizeof(T) <= MSL_SLOT, "simd operand too large");
    MslThread* t = __msl_api->cur;
    __builtin_memcpy(t->in, &x, sizeof(T));
    t->arg = arg;
    t->fn = fn;
    __msl_api->simd_wait(site);
    T r;
    __builtin_memcpy(&r, t->out, sizeof(T));
    return r;
}
static void __msl_op_nop(MslThread*, __msl_u32) {}
__MSLI void simdgroup_barrier(mem_flags = mem_flags::mem_none, __MSL_SITE_PARAMS) { __msl_simd<int>(0, 0, __msl_op_nop, __MSL_SITE); }

enum { __MSL_SUM, __MSL_PROD, __MSL_MIN, __MSL_MAX, __MSL_AND, __MSL_OR, __MSL_XOR };
template <class T, int OP> __MSLI T __msl_combine(T a, T b) {
    if constexpr (OP == __MSL_SUM) return a + b;
    else if constexpr (OP == __MSL_PROD) return a * b;
    else if constexpr (OP == __MSL_MIN) return min(a, b);
    else if constexpr (OP == __MSL_MAX) return max(a, b);
    else if constexpr (OP == __MSL_AND) return a & b;
    else if constexpr (OP == __MSL_OR) return a | b;
    else return a ^ b;
}
template <class T, int OP> static void __msl_op_reduce(MslThread* l, __msl_u32 m) {
    T r{};
    if constexpr (OP == __MSL_SUM) {
        // Pairwise tree (inactive lanes add zero), like a hardware butterfly.
        T v[32];
        for (int i = 0; i < 32; i++) v[i] = (m >> i & 1) ? __msl_ld<T>(l, i) : (T)(__elem_t<T>)0;
        for (int s = 16; s > 0; s >>= 1)
            for (int i = 0; i < s; i++) v[i] = v[i] + v[i + s];
        r = v[0];
    } else {
        bool first = true;
        for (int i = 0; i < 32; i++)
            if (m >> i & 1) {
                T x = __msl_ld<T>(l, i);
                r = first ? x : __msl_combine<T, OP>(r, x);
                first = false;
            }
    }
    for (int i = 0; i < 32; i++)
        if (m >> i & 1) __msl_st<T>(l, i, r);
}
template <class T, bool INCLUSIVE, int OP> static void __msl_op_prefix(MslThread* l, __msl_u32 m) {
    T acc = (T)(__elem_t<T>)(OP == __MSL_PROD ? 1 : 0);
    for (int i = 0; i < 32; i++)
        if (m >> i & 1) {
            T x = __msl_ld<T>(l, i);
            if (INCLUSIVE) acc = __msl_combine<T, OP>(acc, x);
            __msl_st<T>(l, i, acc);
            if (!INCLUSIVE) acc = __msl_combine<T, OP>(acc, x);
        }
}
enum { __MSL_IDX, __MSL_DOWN, __MSL_UP, __MSL_XORL, __MSL_ROTD, __MSL_ROTU, __MSL_FIRST };
template <class T, int KIND> static void __msl_op_shuffle(MslThread* l, __msl_u32 m) {
    int first = __builtin_ctz(m);
    for (int i = 0; i < 32; i++) {
        if (!(m >> i & 1)) continue;
        long a = (long)l[i].arg, s;
        if (KIND == __MSL_IDX) s = a;
        else if (KIND == __MSL_DOWN) s = i + a < 32 ? i + a : i;  // upper lanes keep their value
        else if (KIND == __MSL_UP) s = i - a >= 0 ? i - a : i;
        else if (KIND == __MSL_XORL) s = i ^ a;
        else if (KIND == __MSL_ROTD) s = (i + a) & 31;
        else if (KIND == __MSL_ROTU) s = (i - a) & 31;
        else s = first;
        if (s >= 0 && s < 32 && (m >> s & 1)) __builtin_memcpy(l[i].out, l[s].in, sizeof(T));
        else __builtin_memset(l[i].out, 0xFF, sizeof(T));  // inactive source lane: poison
    }
}

template <class T> __MSLI T simd_sum(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_reduce<T, __MSL_SUM>, __MSL_SITE); }
template <class T> __MSLI T simd_product(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_reduce<T, __MSL_PROD>, __MSL_SITE); }
template <class T> __MSLI T simd_min(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_reduce<T, __MSL_MIN>, __MSL_SITE); }
template <class T> __MSLI T simd_max(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_reduce<T, __MSL_MAX>, __MSL_SITE); }
template <class T> __MSLI T simd_and(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_reduce<T, __MSL_AND>, __MSL_SITE); }
template <class T> __MSLI T simd_or(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_reduce<T, __MSL_OR>, __MSL_SITE); }
template <class T> __MSLI T simd_xor(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_reduce<T, __MSL_XOR>, __MSL_SITE); }
template <class T> __MSLI T simd_prefix_inclusive_sum(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_prefix<T, true, __MSL_SUM>, __MSL_SITE); }
template <class T> __MSLI T simd_prefix_exclusive_sum(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_prefix<T, false, __MSL_SUM>, __MSL_SITE); }
template <class T> __MSLI T simd_prefix_inclusive_product(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_prefix<T, true, __MSL_PROD>, __MSL_SITE); }
template <class T> __MSLI T simd_prefix_exclusive_product(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_prefix<T, false, __MSL_PROD>, __MSL_SITE); }
template <class T> __MSLI T simd_shuffle(T x, ushort lane, __MSL_SITE_PARAMS) { return __msl_simd(x, lane, __msl_op_shuffle<T, __MSL_IDX>, __MSL_SITE); }
template <class T> __MSLI T simd_broadcast(T x, ushort lane, __MSL_SITE_PARAMS) { return __msl_simd(x, lane, __msl_op_shuffle<T, __MSL_IDX>, __MSL_SITE); }
template <class T> __MSLI T simd_broadcast_first(T x, __MSL_SITE_PARAMS) { return __msl_simd(x, 0, __msl_op_shuffle<T, __MSL_FIRST>, __MSL_SITE); }
template <class T> __MSLI T simd_shuffle_down(T x, ushort d, __MSL_SITE_PARAMS) { return __msl_simd(x, d, __msl_op_shuffle<T, __MSL_DOWN>, __MSL_SITE); }
template <class T> __MSLI T simd_shuffle_up(T x, ushort d, __MSL_SITE_PARAMS) { return __msl_simd(x, d, __msl_op_shuffle<T, __MSL_UP>, __MSL_SITE); }
template <class T> __MSLI T simd_shuffle_xor(T x, ushort mask, __MSL_SITE_PARAMS) { return __msl_simd(x, mask, __msl_op_shuffle<T, __MSL_XORL>, __MSL_SITE); }
template <class T> __MSLI T simd_shuffle_rotate_down(T x, ushort d, __MSL_SITE_PARAMS) { return __msl_simd(x, d, __msl_op_shuffle<T, __MSL_ROTD>, __MSL_SITE); }
template <class T> __MSLI T simd_shuffle_rotate_up(T x, ushort d, __MSL_SITE_PARAMS) { return __msl_simd(x, d, __msl_op_shuffle<T, __MSL_ROTU>, __MSL_SITE); }

struct simd_vote {
    __msl_u64 v, active;
    explicit operator ulong() const { return (ulong)v; }
    explicit operator uint() const { return (uint)v; }
    bool all() const { return v == active; }
    bool any() const { return v != 0; }
};
static void __msl_op_vote(MslThread* l, __msl_u32 m) {
    __msl_u64 v[2] = {0, m};
    for (int i = 0; i < 32; i++)
        if ((m >> i & 1) && l[i].in[0]) v[0] |= 1ull << i;
    for (int i = 0; i < 32; i++)
        if (m >> i & 1) __builtin_memcpy(l[i].out, v, 16);
}
struct __msl_vote2 { __msl_u64 v, active; };
__MSLI simd_vote simd_ballot(bool b, __MSL_SITE_PARAMS) {
    __msl_vote2 r = __msl_simd(__msl_vote2{(__msl_u64)b, 0}, 0, __msl_op_vote, __MSL_SITE);
    return simd_vote{r.v, r.active};
}
__MSLI bool simd_any(bool b, __MSL_SITE_PARAMS) { return simd_ballot(b, __line, __col).any(); }
__MSLI bool simd_all(bool b, __MSL_SITE_PARAMS) { return simd_ballot(b, __line, __col).all(); }
__MSLI simd_vote simd_active_threads_mask(__MSL_SITE_PARAMS) {
    simd_vote r = simd_ballot(true, __line, __col);
    return simd_vote{r.active, r.active};
}
__MSLI bool simd_is_first(__MSL_SITE_PARAMS) {
    __msl_u64 m = simd_ballot(true, __line, __col).active;
    return __msl_api->cur->lane == (uint)__builtin_ctzll(m);
}
__MSLI bool simd_is_helper_thread() { return false; }

// Quadgroups: 4 consecutive lanes; the shuffles reuse the simd ones within the quad.
template <class T> __MSLI T quad_shuffle(T x, ushort i, __MSL_SITE_PARAMS) {
    uint base = __msl_api->cur->lane & ~3u;
    return simd_shuffle(x, (ushort)(base + (i & 3)), __line, __col);
}
template <class T> __MSLI T quad_shuffle_xor(T x, ushort m, __MSL_SITE_PARAMS) {
    return simd_shuffle_xor(x, (ushort)(m & 3), __line, __col);
}
template <class T> __MSLI T quad_broadcast(T x, ushort i, __MSL_SITE_PARAMS) { return quad_shuffle(x, i, __line, __col); }
template <class T> __MSLI T quad_sum(T x, __MSL_SITE_PARAMS) {
    x = x + quad_shuffle_xor(x, 1, __line, __col);
    return x + quad_shuffle_xor(x, 2, __line, __col + 1);
}

// ---- atomics ----------------------------------------------------------------------------
// Fibers run one at a time and never switch inside an operation: plain code is atomic.
template <class T> struct _atomic { T __v; };
template <class T> using atomic = _atomic<T>;
typedef _atomic<int> atomic_int;
typedef _atomic<uint> atomic_uint;
typedef _atomic<float> atomic_float;
typedef _atomic<bool> atomic_bool;
typedef _atomic<ulong> atomic_ulong;
typedef _atomic<long> atomic_long;
template <class A, class T> __MSLI void atomic_store_explicit(A* o, T v, memory_order = memory_order_relaxed) { o->__v = v; }
template <class A> __MSLI auto atomic_load_explicit(A* o, memory_order = memory_order_relaxed) { return o->__v; }
template <class A, class T> __MSLI auto atomic_exchange_explicit(A* o, T v, memory_order = memory_order_relaxed) {
    auto old = o->__v;
    o->__v = v;
    return old;
}
#define __MSL_AFETCH(name, expr)                                                                 \
    template <class A, class T> __MSLI auto atomic_fetch_##name##_explicit(A* o, T v, memory_order = memory_order_relaxed) { \
        auto old = o->__v;                                                                       \
        auto b = (decltype(old))v;                                                               \
        o->__v = (expr);                                                                         \
        return old;                                                                              \
    }
__MSL_AFETCH(add, old + b)
__MSL_AFETCH(sub, old - b)
__MSL_AFETCH(and, old & b)
__MSL_AFETCH(or, old | b)
__MSL_AFETCH(xor, old ^ b)
__MSL_AFETCH(min, b < old ? b : old)
__MSL_AFETCH(max, old < b ? b : old)
#undef __MSL_AFETCH
template <class A, class E, class T>
__MSLI bool atomic_compare_exchange_weak_explicit(A* o, E* expected, T desired, memory_order = memory_order_relaxed,
                                                  memory_order = memory_order_relaxed) {
    if (o->__v == *expected) {
        o->__v = desired;
        return true;
    }
    *expected = o->__v;
    return false;
}
template <class A, class E, class T>
__MSLI bool atomic_compare_exchange_strong_explicit(A* o, E* expected, T desired, memory_order m1 = memory_order_relaxed,
                                                    memory_order m2 = memory_order_relaxed) {
    return atomic_compare_exchange_weak_explicit(o, expected, desired, m1, m2);
}

// ---- simdgroup matrices -------------------------------------------------------------------
// Every lane holds the whole 8x8 matrix: loads, stores and products need no lane
// exchange, which keeps them cheap under fibers. (The real per-lane layout is private to
// the hardware; kernels must not depend on it.)
template <class T, int R, int C> struct simdgroup_matrix {
    T e[R * C];
    simdgroup_matrix() = default;
    constexpr simdgroup_matrix(T v) {
        for (int i = 0; i < R * C; i++) e[i] = (i / C == i % C) ? v : (T)0;
    }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
#ifdef __MSL_HAS_BFLOAT
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
#endif
template <class T, int R, int C> __MSLI simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
    simdgroup_matrix<T, R, C> m;
    for (int i = 0; i < R * C; i++) m.e[i] = v;
    return m;
}
template <class T, int R, int C, class P>
__MSLI void simdgroup_load(thread simdgroup_matrix<T, R, C>& d, const P* src, ulong elements_per_row = C,
                           ulong2 matrix_origin = 0, bool transpose_matrix = false) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            ulong row = transpose_matrix ? c : r, col = transpose_matrix ? r : c;
            d.e[r * C + c] = (T)src[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col];
        }
}
template <class T, int R, int C, class P>
__MSLI void simdgroup_store(thread const simdgroup_matrix<T, R, C>& a, P* dst, ulong elements_per_row = C,
                            ulong2 matrix_origin = 0, bool transpose_matrix = false) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            ulong row = transpose_matrix ? c : r, col = transpose_matrix ? r : c;
            dst[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col] = (P)a.e[r * C + c];
        }
}
template <class TD, class TA, class TB, class TC, int M, int N, int K>
__MSLI void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, M, N>& d, thread const simdgroup_matrix<TA, M, K>& a,
                                          thread const simdgroup_matrix<TB, K, N>& b,
                                          thread const simdgroup_matrix<TC, M, N>& c) {
    simdgroup_matrix<TD, M, N> r;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = (float)c.e[i * N + j];
            for (int k = 0; k < K; k++) s = __builtin_fmaf((float)a.e[i * K + k], (float)b.e[k * N + j], s);
            r.e[i * N + j] = (TD)s;
        }
    d = r;
}
template <class TD, class TA, class TB, int M, int N, int K>
__MSLI void simdgroup_multiply(thread simdgroup_matrix<TD, M, N>& d, thread const simdgroup_matrix<TA, M, K>& a,
                               thread const simdgroup_matrix<TB, K, N>& b) {
    simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, M, N>((TD)0));
}
}  // namespace metal

using namespace metal;

#define FLT_MAX 3.40282347e+38f
#define FLT_MIN 1.17549435e-38f
#define FLT_EPSILON 1.1920929e-7f
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)6.10351562e-05f)
#define HALF_EPSILON ((half)0.0009765625f)
#define MAXFLOAT 3.40282347e+38f
#define MAXHALF HALF_MAX
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define M_PI_F 3.14159265358979323846f
#define M_PI_H ((half)3.14159265358979323846f)
#define M_SQRT2_F 1.41421356237309504880f
#define M_LN2_F 0.69314718055994530942f
#define M_LOG2E_F 1.44269504088896340736f
#define M_E_F 2.71828182845904523536f
#define CHAR_BIT 8
#define SCHAR_MAX 127
#define SCHAR_MIN (-128)
#define UCHAR_MAX 255
#define SHRT_MAX 32767
#define SHRT_MIN (-32768)
#define USHRT_MAX 65535
#define INT_MAX 2147483647
#define INT_MIN (-2147483647 - 1)
#define UINT_MAX 4294967295u
#define LONG_MAX 9223372036854775807L
#define ULONG_MAX 18446744073709551615ul

// ---- glue used by the generated entry points ----------------------------------------------
template <class T> using __msl_tgref = T&;
template <class T> using __msl_tgptr = T*;
template <class T> struct __msl_strip_ref { typedef T type; };
template <class T> struct __msl_strip_ref<T&> { typedef T type; };
template <int I, class... P> struct __msl_nth;
template <class H, class... P> struct __msl_nth<0, H, P...> { typedef H type; };
template <int I, class H, class... P> struct __msl_nth<I, H, P...> { typedef typename __msl_nth<I - 1, P...>::type type; };
template <class F, int I> struct __msl_param;
template <class... P, int I> struct __msl_param<void (*)(P...), I> { typedef typename __msl_nth<I, P...>::type type; };
template <class F, int I> using __msl_param_t = typename __msl_param<F, I>::type;

template <class T> struct __msl_bind {
    static T get(void* p) { return *(T*)p; }
};
template <class T> struct __msl_bind<T*> {
    static T* get(void* p) { return (T*)p; }
};
template <class T> struct __msl_bind<T&> {
    static T& get(void* p) { return *(T*)p; }
};
template <class T> __MSLI T __msl_builtin(const uint* v) {
    typedef metal::remove_cv_t<T> U;
    if constexpr (metal::__vt<U>::n == 1) return (U)v[0];
    else if constexpr (metal::__vt<U>::n == 2) return U{(metal::__elem_t<U>)v[0], (metal::__elem_t<U>)v[1]};
    else return U{(metal::__elem_t<U>)v[0], (metal::__elem_t<U>)v[1], (metal::__elem_t<U>)v[2]};
}

// Type facts of a buffer parameter, checked by Python before every launch.
struct __msl_arginfo {
    int is_ptr, is_const, kind, elem_size, nelem, size;
};
template <class T> constexpr int __msl_kind() {
    typedef metal::remove_cv_t<metal::__elem_t<metal::remove_cv_t<T>>> E;
    if constexpr (metal::is_same_v<E, bool>) return 4;
#ifdef __MSL_HAS_BFLOAT
    else if constexpr (metal::is_same_v<E, bfloat>) return 5;
#endif
    else if constexpr (metal::is_same_v<E, void>) return 3;
    else if constexpr (metal::__is_fp<E>) return 2;
    else if constexpr (__is_integral(E)) return metal::is_signed_v<E> ? 0 : 1;
    else return 3;
}
template <class T> constexpr int __msl_sizeof() {
    if constexpr (metal::is_same_v<metal::remove_cv_t<T>, void>) return 0;
    else return (int)sizeof(T);
}
template <class T> struct __msl_ptr { static constexpr bool is = false; typedef T type; };
template <class T> struct __msl_ptr<T*> { static constexpr bool is = true; typedef T type; };
template <class T> struct __msl_ptr<T* const> { static constexpr bool is = true; typedef T type; };
template <class P> constexpr __msl_arginfo __msl_info() {
    if constexpr (__msl_ptr<P>::is) {
        typedef typename __msl_ptr<P>::type T;
        return {1, __is_const(T), __msl_kind<T>(), __msl_sizeof<metal::__elem_t<metal::remove_cv_t<T>>>(),
                metal::__vt<metal::remove_cv_t<T>>::n, __msl_sizeof<T>()};
    } else {
        typedef typename __msl_strip_ref<P>::type T;
        return {0, __is_const(T), __msl_kind<T>(), __msl_sizeof<metal::__elem_t<metal::remove_cv_t<T>>>(),
                metal::__vt<metal::remove_cv_t<T>>::n, __msl_sizeof<T>()};
    }
}
