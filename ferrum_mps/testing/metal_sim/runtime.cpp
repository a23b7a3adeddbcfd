// Fiber runtime of the Metal-on-CPU harness: runs each threadgroup's threads as
// cooperative fibers. A thread runs until it reaches a simd operation, a barrier or
// its end; the scheduler then performs the simd operations of the simdgroups over the
// lanes that reached the same call site (the active lanes) and releases barriers once
// every thread of the group waits at the same one. Faults (out-of-bounds accesses to
// the guard pages around each buffer, division by zero, fiber stack overflow) become
// error messages instead of crashing the Python process.
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <pthread.h>
#include <unistd.h>

#include "msl_rt.h"

#if defined(__APPLE__)
#define MSL_SYM(x) "_" #x
#else
#define MSL_SYM(x) #x
#endif

extern "C" void msl_switch(void** save_sp, void* to_sp);
extern "C" void __msl_fiber_main(void);

#if defined(__x86_64__)
__asm__(
    ".text\n"
    ".globl " MSL_SYM(msl_switch) "\n"
    ".p2align 4\n" MSL_SYM(msl_switch) ":\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n");
#elif defined(__aarch64__)
__asm__(
    ".text\n"
    ".globl " MSL_SYM(msl_switch) "\n"
    ".p2align 4\n" MSL_SYM(msl_switch) ":\n"
    "  sub sp, sp, #160\n"
    "  stp x19, x20, [sp, #0]\n"
    "  stp x21, x22, [sp, #16]\n"
    "  stp x23, x24, [sp, #32]\n"
    "  stp x25, x26, [sp, #48]\n"
    "  stp x27, x28, [sp, #64]\n"
    "  stp x29, x30, [sp, #80]\n"
    "  stp d8, d9, [sp, #96]\n"
    "  stp d10, d11, [sp, #112]\n"
    "  stp d12, d13, [sp, #128]\n"
    "  stp d14, d15, [sp, #144]\n"
    "  mov x2, sp\n"
    "  str x2, [x0]\n"
    "  mov sp, x1\n"
    "  ldp x19, x20, [sp, #0]\n"
    "  ldp x21, x22, [sp, #16]\n"
    "  ldp x23, x24, [sp, #32]\n"
    "  ldp x25, x26, [sp, #48]\n"
    "  ldp x27, x28, [sp, #64]\n"
    "  ldp x29, x30, [sp, #80]\n"
    "  ldp d8, d9, [sp, #96]\n"
    "  ldp d10, d11, [sp, #112]\n"
    "  ldp d12, d13, [sp, #128]\n"
    "  ldp d14, d15, [sp, #144]\n"
    "  add sp, sp, #160\n"
    "  ret\n");
#else
#error "metal_sim runtime: only x86_64 and aarch64 are supported"
#endif

#define MAX_THREADS 1024
#define STACK_SIZE (256 * 1024)
#define TG_LIMIT 32768
#define TG_SLOTS 512

struct MslRegion {
    char* map;        // whole mapping, guard pages included
    uint64_t maplen;
    char* data;
    uint64_t size;
    const char* label;
};

static MslApi g_api;
static MslGrid g_grid;
static MslThread* g_threads;
static char* g_stacks;
static size_t g_page;
static void* g_sched_sp;
static void (*g_thunk)(void**);
static void** g_bufs;
static int g_err;
static char g_msg[2048];
static sigjmp_buf g_jmp;
static volatile sig_atomic_t g_in_dispatch;
static pthread_t g_dispatch_thread;
static struct sigaction g_old_actions[5];
static volatile void* g_fault_addr;
static volatile int g_fault_sig;
static const MslRegion* g_regions;
static int g_nregions;
alignas(64) static unsigned char g_tg_arena[2 * TG_LIMIT];
static void* g_tg_slot[TG_SLOTS];
static uint64_t g_tg_used;
static char* g_altstack;
static int g_in_fiber;
static int g_watchdog_s;

static void describe_thread(const MslThread* t, char* out, size_t n) {
    if (!t) {
        snprintf(out, n, "(no thread)");
        return;
    }
    snprintf(out, n,
             "thread_position_in_grid=(%u,%u,%u) [threadgroup (%u,%u,%u), "
             "thread_index_in_threadgroup %u]",
             t->tpig[0], t->tpig[1], t->tpig[2], g_grid.tgpig[0], g_grid.tgpig[1], g_grid.tgpig[2],
             t->index);
}

static void fail_msg(const char* msg) {
    if (g_err) return;
    char who[256];
    describe_thread(g_api.cur, who, sizeof who);
    snprintf(g_msg, sizeof g_msg, "%s (%s)", msg, who);
    g_err = 1;
}

extern "C" void __msl_fiber_main(void) {
    MslThread* t = g_api.cur;
    g_thunk(g_bufs);
    t->state = MSL_DONE;
    msl_switch(&t->sp, g_sched_sp);
    __builtin_trap();
}

static inline void yield_to_scheduler(void) {
    MslThread* t = g_api.cur;
    msl_switch(&t->sp, g_sched_sp);
}

static inline __msl_u64 site_bit(__msl_u64 site) { return 1ull << ((site * 0x9E3779B97F4A7C15ull) >> 58); }

static void api_simd_wait(__msl_u64 site) {
    MslThread* t = g_api.cur;
    t->site = site;
    t->nsimd++;
    t->visited |= site_bit(site);
    t->state = MSL_SIMD;
    yield_to_scheduler();
}

static void api_barrier(__msl_u64 site) {
    MslThread* t = g_api.cur;
    t->site = site;
    t->state = MSL_BARRIER;
    t->nbarrier++;
    yield_to_scheduler();
}

static void api_fail(const char* msg) {
    fail_msg(msg);
    if (!g_in_fiber) return;  // called by a simd operation the scheduler runs
    g_api.cur->state = MSL_DONE;
    yield_to_scheduler();
    __builtin_trap();
}

// Each threadgroup variable is followed by a red zone; a write past its end is caught at
// the next barrier or at the end of the group.
#define REDZONE 32
static uint64_t g_tg_arena_used;
static int g_tg_ids[TG_SLOTS];
static uint64_t g_tg_size[TG_SLOTS];
static int g_tg_n;

static void* api_tg_alloc(int id, __msl_u64 size, __msl_u64 align) {
    if (id < 0 || id >= TG_SLOTS) api_fail("too many threadgroup variables");
    if (!g_tg_slot[id]) {
        if (align < 16) align = 16;
        uint64_t off = (g_tg_arena_used + align - 1) & ~(align - 1);
        g_tg_used += size;
        if (g_tg_used > TG_LIMIT || off + size + REDZONE > sizeof g_tg_arena) {
            char m[160];
            snprintf(m, sizeof m, "threadgroup memory exceeds the 32 KB limit (%llu bytes requested)",
                     (unsigned long long)g_tg_used);
            api_fail(m);
        }
        // Poison: uninitialised threadgroup memory reads as NaN (float/half) or all ones.
        memset(g_tg_arena + off, 0xFF, size);
        memset(g_tg_arena + off + size, 0xA5, REDZONE);
        g_tg_slot[id] = g_tg_arena + off;
        g_tg_size[id] = size;
        g_tg_ids[g_tg_n++] = id;
        g_tg_arena_used = off + size + REDZONE;
    }
    return g_tg_slot[id];
}

static int check_redzones(const char* when) {
    for (int k = 0; k < g_tg_n; k++) {
        int id = g_tg_ids[k];
        const unsigned char* z = (const unsigned char*)g_tg_slot[id] + g_tg_size[id];
        for (int b = 0; b < REDZONE; b++)
            if (z[b] != 0xA5) {
                snprintf(g_msg, sizeof g_msg,
                         "threadgroup memory written out of bounds: byte %d past the end of threadgroup "
                         "variable #%d (%llu bytes), found %s of threadgroup (%u,%u,%u)", b, id,
                         (unsigned long long)g_tg_size[id], when, g_grid.tgpig[0], g_grid.tgpig[1], g_grid.tgpig[2]);
                g_err = 1;
                return 1;
            }
    }
    return 0;
}

extern "C" MslApi* msl_api(void) {
    g_api.grid = &g_grid;
    g_api.simd_wait = api_simd_wait;
    g_api.barrier = api_barrier;
    g_api.tg_alloc = api_tg_alloc;
    g_api.fail = api_fail;
    return &g_api;
}

static int ensure_stacks(void) {
    if (g_threads) return 0;
    g_page = (size_t)sysconf(_SC_PAGESIZE);
    size_t per = STACK_SIZE + g_page;
    void* m = mmap(0, per * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return -1;
    g_stacks = (char*)m;
    for (int i = 0; i < MAX_THREADS; i++) mprotect(g_stacks + i * per, g_page, PROT_NONE);  // overflow guard
    void* tm = mmap(0, sizeof(MslThread) * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tm == MAP_FAILED) return -1;
    g_threads = (MslThread*)tm;
    for (int i = 0; i < MAX_THREADS; i++) {
        g_threads[i].stack_lo = g_stacks + i * per + g_page;
        g_threads[i].stack_hi = g_stacks + (i + 1) * per;
    }
    g_altstack = (char*)malloc(256 * 1024);
    return g_altstack ? 0 : -1;
}

static void init_thread(MslThread* t, uint32_t i) {
    t->state = MSL_READY;
    t->index = i;
    t->tpitg[0] = i % g_grid.tptg[0];
    t->tpitg[1] = (i / g_grid.tptg[0]) % g_grid.tptg[1];
    t->tpitg[2] = i / (g_grid.tptg[0] * g_grid.tptg[1]);
    for (int d = 0; d < 3; d++) t->tpig[d] = g_grid.tgpig[d] * g_grid.dtptg[d] + t->tpitg[d];
    t->lane = i % 32;
    t->sgitg = i / 32;
    t->nbarrier = 0;
    t->site = 0;
    t->nsimd = 0;
    t->visited = 0;
    // Staggered tops: equal offsets modulo 4 KB would fight over the same cache sets.
    void** sp = (void**)(((uintptr_t)t->stack_hi - (i % 61) * 80) & ~(uintptr_t)15);
#if defined(__x86_64__)
    *--sp = 0;                             // fake return address: keeps the ABI stack alignment
    *--sp = (void*)&__msl_fiber_main;      // msl_switch returns here
    for (int k = 0; k < 6; k++) *--sp = 0; // rbp rbx r12-r15; rbp = 0 ends the frame chain
#else
    sp -= 20;
    memset(sp, 0, 160);
    sp[11] = (void*)&__msl_fiber_main;     // x30; x29 = 0 ends the frame chain
#endif
    t->sp = sp;
}

static int same_site(const MslThread* a, const MslThread* b) { return a->site == b->site; }

// Which waiting lanes of a simdgroup form the active set: those at the same site, the
// site chosen like a SIMT reconvergence stack would: (1) a site other waiting lanes have
// already passed (a loop's body before the lanes that left the loop); (2) lanes that
// have done fewer simd operations (the else branch runs before lanes that finished the
// if branch go on); (3) the earlier site in the source.
static int pick_site(MslThread* th, uint32_t lo, uint32_t hi) {
    int cand[32], nc = 0;
    __msl_u64 vis[32];
    for (uint32_t i = lo; i < hi; i++) {
        if (th[i].state != MSL_SIMD) continue;
        int k = 0;
        while (k < nc && th[cand[k]].site != th[i].site) k++;
        if (k == nc) {
            cand[nc] = (int)i;
            vis[nc++] = th[i].visited;
        } else {
            vis[k] |= th[i].visited;
            if (th[i].nsimd < th[cand[k]].nsimd) cand[k] = (int)i;
        }
    }
    if (nc <= 1) return nc ? cand[0] : -1;
    int best = 0, best_behind = -1;
    for (int k = 0; k < nc; k++) {
        int behind = 0;
        __msl_u64 bk = site_bit(th[cand[k]].site);
        for (int j = 0; j < nc; j++)
            if (j != k && (vis[j] & bk) && !(vis[k] & site_bit(th[cand[j]].site))) behind++;
        const MslThread *a = &th[cand[k]], *b = &th[cand[best]];
        int better;
        if (best_behind < 0) better = 1;
        else if (behind != best_behind) better = behind > best_behind;
        else if (a->nsimd != b->nsimd) better = a->nsimd < b->nsimd;
        else better = a->site < b->site;
        if (better) {
            best = k;
            best_behind = behind;
        }
    }
    return cand[best];
}

static int run_group(void) {
    uint32_t n = g_grid.nthreads;
    MslThread* th = g_threads;
    for (uint32_t i = 0; i < n; i++) init_thread(&th[i], i);
    for (int k = 0; k < g_tg_n; k++) g_tg_slot[g_tg_ids[k]] = 0;
    g_tg_n = 0;
    g_tg_used = 0;
    g_tg_arena_used = 0;
    for (;;) {
        for (uint32_t i = 0; i < n; i++) {
            if (th[i].state != MSL_READY) continue;
            g_api.cur = &th[i];
            g_in_fiber = 1;
            msl_switch(&g_sched_sp, th[i].sp);
            g_in_fiber = 0;
            if (g_err) return 1;
        }
        g_api.cur = 0;
        int progressed = 0;
        for (uint32_t g = 0; g * 32 < n; g++) {
            uint32_t lo = g * 32, hi = lo + 32 < n ? lo + 32 : n;
            int best = pick_site(th, lo, hi);
            if (best < 0) continue;
            uint32_t mask = 0;
            for (uint32_t i = lo; i < hi; i++)
                if (th[i].state == MSL_SIMD && same_site(&th[i], &th[best])) mask |= 1u << (i - lo);
            g_api.cur = &th[best];
            th[best].fn(&th[lo], mask);
            g_api.cur = 0;
            if (g_err) return 1;
            for (uint32_t i = lo; i < hi; i++)
                if (mask >> (i - lo) & 1) th[i].state = MSL_READY;
            progressed = 1;
        }
        if (progressed) continue;
        int first_wait = -1, first_done = -1;
        for (uint32_t i = 0; i < n; i++) {
            if (th[i].state == MSL_BARRIER && first_wait < 0) first_wait = (int)i;
            if (th[i].state == MSL_DONE && first_done < 0) first_done = (int)i;
        }
        if (first_wait < 0) return check_redzones("at the end");
        char a[256], b[256];
        if (first_done >= 0) {
            describe_thread(&th[first_done], a, sizeof a);
            describe_thread(&th[first_wait], b, sizeof b);
            snprintf(g_msg, sizeof g_msg,
                     "threadgroup_barrier deadlock: %s returned while %s waits at a threadgroup_barrier "
                     "(every thread of a threadgroup must reach every barrier)", a, b);
            g_err = 1;
            return 1;
        }
        for (uint32_t i = 0; i < n; i++) {
            if (!same_site(&th[i], &th[first_wait]) || th[i].nbarrier != th[first_wait].nbarrier) {
                describe_thread(&th[first_wait], a, sizeof a);
                describe_thread(&th[i], b, sizeof b);
                snprintf(g_msg, sizeof g_msg,
                         "threads wait at different threadgroup_barriers: %s at barrier #%llu, %s at barrier #%llu "
                         "(a different call site or loop trip; barriers must be in uniform control flow)",
                         a, (unsigned long long)th[first_wait].nbarrier, b, (unsigned long long)th[i].nbarrier);
                g_err = 1;
                return 1;
            }
        }
        if (check_redzones("at a threadgroup_barrier")) return 1;
        for (uint32_t i = 0; i < n; i++) th[i].state = MSL_READY;
    }
}

static void on_fault(int sig, siginfo_t* si, void* ctx) {
    (void)ctx;
    if (!g_in_dispatch || !pthread_equal(pthread_self(), g_dispatch_thread)) {
        // Not ours (another thread, or outside a launch): hand it to the previous handler
        // by reinstalling it; the faulting instruction runs again and reaches it.
        const int sigs[5] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGPROF};
        for (int k = 0; k < 5; k++)
            if (sigs[k] == sig) sigaction(sig, &g_old_actions[k], 0);
        return;
    }
    g_fault_addr = si->si_addr;
    g_fault_sig = sig;
    siglongjmp(g_jmp, 1);
}

static void describe_fault(void) {
    char who[256];
    describe_thread(g_api.cur, who, sizeof who);
    char* addr = (char*)g_fault_addr;
    if (g_fault_sig == SIGPROF) {
        snprintf(g_msg, sizeof g_msg, "kernel still running after %d s of CPU time (endless loop?) in %s",
                 g_watchdog_s, who);
        return;
    }
    if (g_fault_sig == SIGFPE) {
        snprintf(g_msg, sizeof g_msg, "arithmetic fault (integer division by zero?) in %s", who);
        return;
    }
    for (int r = 0; r < g_nregions; r++) {
        const MslRegion* R = &g_regions[r];
        if (addr >= R->map && addr < R->map + R->maplen) {
            long long off = (long long)(addr - R->data);
            if (off >= (long long)R->size)
                snprintf(g_msg, sizeof g_msg,
                         "out-of-bounds device memory access: %s, byte %lld of a %llu-byte buffer "
                         "(%lld bytes past its end), by %s", R->label, off, (unsigned long long)R->size,
                         off - (long long)R->size, who);
            else
                snprintf(g_msg, sizeof g_msg,
                         "out-of-bounds device memory access: %s, %lld bytes before its start, by %s",
                         R->label, -off, who);
            return;
        }
    }
    MslThread* t = g_api.cur;
    if (t && addr < t->stack_lo && addr >= t->stack_lo - g_page)
        snprintf(g_msg, sizeof g_msg, "fiber stack overflow (over %d KB of locals) in %s", STACK_SIZE / 1024, who);
    else
        snprintf(g_msg, sizeof g_msg, "invalid memory access (signal %d) at address %p in %s", g_fault_sig,
                 (void*)addr, who);
}

// Runs the kernel over the grid. Returns 0, or 1 with a message in err.
extern "C" int msl_dispatch(void (*thunk)(void**), void** bufs, const uint32_t* threads, const uint32_t* group,
                            const MslRegion* regions, int nregions, char* err, int errlen, int watchdog_s) {
    if (ensure_stacks() != 0) {
        snprintf(err, errlen, "metal_sim: cannot allocate fiber stacks");
        return 1;
    }
    msl_api();
    g_thunk = thunk;
    g_bufs = bufs;
    g_regions = regions;
    g_nregions = nregions;
    g_err = 0;
    g_msg[0] = 0;
    g_api.cur = 0;
    uint32_t nominal = 1;
    for (int d = 0; d < 3; d++) {
        g_grid.dtptg[d] = group[d];
        g_grid.tpg[d] = threads[d];
        g_grid.tgpg[d] = (threads[d] + group[d] - 1) / group[d];
        nominal *= group[d];
    }
    g_grid.dnsimd = (nominal + 31) / 32;

    stack_t ss, old_ss;
    ss.ss_sp = g_altstack;
    ss.ss_size = 256 * 1024;
    ss.ss_flags = 0;
    sigaltstack(&ss, &old_ss);
    struct sigaction sa;
    struct sigaction* old = g_old_actions;
    g_dispatch_thread = pthread_self();
    const int sigs[5] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGPROF};
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int k = 0; k < 5; k++) sigaction(sigs[k], &sa, &old[k]);
    struct itimerval watchdog, old_timer;
    memset(&watchdog, 0, sizeof watchdog);
    g_watchdog_s = watchdog_s;
    watchdog.it_value.tv_sec = watchdog_s;
    setitimer(ITIMER_PROF, &watchdog, &old_timer);

    int rc = 0;
    if (sigsetjmp(g_jmp, 1)) {
        g_in_dispatch = 0;
        g_in_fiber = 0;
        describe_fault();
        rc = 1;
    } else {
        g_in_dispatch = 1;
        for (uint32_t gz = 0; gz < g_grid.tgpg[2] && !rc; gz++)
            for (uint32_t gy = 0; gy < g_grid.tgpg[1] && !rc; gy++)
                for (uint32_t gx = 0; gx < g_grid.tgpg[0] && !rc; gx++) {
                    const uint32_t gp[3] = {gx, gy, gz};
                    uint32_t nt = 1;
                    for (int d = 0; d < 3; d++) {
                        g_grid.tgpig[d] = gp[d];
                        uint32_t rest = threads[d] - gp[d] * group[d];
                        g_grid.tptg[d] = rest < group[d] ? rest : group[d];
                        nt *= g_grid.tptg[d];
                    }
                    g_grid.nthreads = nt;
                    g_grid.nsimd = (nt + 31) / 32;
                    rc = run_group();
                }
        g_in_dispatch = 0;
    }
    setitimer(ITIMER_PROF, &old_timer, 0);
    for (int k = 0; k < 5; k++) sigaction(sigs[k], &old[k], 0);
    sigaltstack(&old_ss, 0);
    g_api.cur = 0;
    if (rc) snprintf(err, errlen, "%s", g_msg[0] ? g_msg : "kernel failed");
    return rc;
}

static char* pool_take(uint64_t len);

// Device buffers live in their own mapping, ending right at a PROT_NONE page, so an
// access past the end faults (and is reported) instead of reading a neighbour.
// The buffer ends exactly at the guard page when `size` is a multiple of `align`.
extern "C" char* msl_guarded_alloc(uint64_t size, uint64_t align, char** map_out, uint64_t* maplen_out) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uint64_t padded = size + 15;
    uint64_t data_pages = (padded + page - 1) / page * page;
    if (data_pages == 0) data_pages = page;
    uint64_t len = data_pages + 2 * page;
    char* base = pool_take(len);
    if (!base) {
        void* m = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return 0;
        base = (char*)m;
        mprotect(base, page, PROT_NONE);
        mprotect(base + page + data_pages, page, PROT_NONE);
    }
    *map_out = base;
    *maplen_out = len;
    char* end = base + page + data_pages;
    char* start = end - size;
    start = (char*)((uintptr_t)start & ~(uintptr_t)(align - 1));
    return start;
}

// Freed mappings are kept for reuse: fresh pages cost a fault each, per launch.
#define POOL 32
static char* g_pool_map[POOL];
static uint64_t g_pool_len[POOL];

extern "C" void msl_guarded_free(char* map, uint64_t maplen) {
    for (int k = 0; k < POOL; k++)
        if (!g_pool_map[k]) {
            g_pool_map[k] = map;
            g_pool_len[k] = maplen;
            return;
        }
    munmap(map, maplen);
}

static char* pool_take(uint64_t len) {
    for (int k = 0; k < POOL; k++)
        if (g_pool_map[k] && g_pool_len[k] == len) {
            char* m = g_pool_map[k];
            g_pool_map[k] = 0;
            return m;
        }
    return 0;
}
