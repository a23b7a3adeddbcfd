// The interface between compiled kernel libraries and the fiber runtime (runtime.cpp).
// Kernel libraries include no system header: they reach the runtime only through
// the function table `__msl_api`, which Python fills in after loading the library.
#pragma once

typedef unsigned int __msl_u32;
typedef unsigned long long __msl_u64;
typedef long long __msl_i64;

#define MSL_SLOT 64

enum { MSL_READY = 0, MSL_SIMD = 1, MSL_BARRIER = 2, MSL_DONE = 3 };

struct MslThread;
typedef void (*MslSimdFn)(struct MslThread* lane0, __msl_u32 active_mask);

struct MslThread {
    void* sp;               // saved stack pointer while switched out
    int state;
    __msl_u32 index;        // thread_index_in_threadgroup
    __msl_u32 tpitg[3];     // thread_position_in_threadgroup
    __msl_u32 tpig[3];      // thread_position_in_grid
    __msl_u32 lane, sgitg;  // thread_index_in_simdgroup, simdgroup_index_in_threadgroup
    __msl_u64 nbarrier;     // barriers passed (catches barriers reached in different loop trips)
    __msl_u64 site;         // source position (line, column) of the simd operation or barrier
    __msl_u64 nsimd;        // simd operations done
    __msl_u64 visited;      // bloom filter of the sites of those operations
    MslSimdFn fn;
    __msl_i64 arg;
    char* stack_lo;
    char* stack_hi;
    alignas(64) unsigned char in[MSL_SLOT];
    alignas(64) unsigned char out[MSL_SLOT];
};

struct MslGrid {
    __msl_u32 tgpig[3];   // threadgroup_position_in_grid
    __msl_u32 tptg[3];    // threads_per_threadgroup (this group; smaller at a partial edge)
    __msl_u32 dtptg[3];   // dispatch_threads_per_threadgroup
    __msl_u32 tgpg[3];    // threadgroups_per_grid
    __msl_u32 tpg[3];     // threads_per_grid
    __msl_u32 nthreads;   // threads in this group
    __msl_u32 nsimd;      // simdgroups in this group
    __msl_u32 dnsimd;     // simdgroups in a full group
};

struct MslApi {
    struct MslThread* cur;
    struct MslGrid* grid;
    void (*simd_wait)(__msl_u64 site);  // after filling cur->in/arg/fn: wait for the simdgroup
    void (*barrier)(__msl_u64 site);    // threadgroup_barrier
    void* (*tg_alloc)(int id, __msl_u64 size, __msl_u64 align);
    void (*fail)(const char* msg);    // abort the dispatch with an error
};
