"""Run the CUDA kernels of ``relattn/backends/cuda`` on the host, for tests:
the SIMT kernels, the ``mma.sync`` ones and the Hopper ones (``wgmma``, TMA,
mbarriers).

The kernel source is compiled by the host's C++ compiler under a prelude that
defines what such kernels use of CUDA: ``threadIdx`` / ``blockIdx`` /
``blockDim`` / ``gridDim``, ``__syncthreads``, static and dynamic shared
memory, vector types, bit casts and a few atomics. A launch runs the blocks one
after another; a block's threads are real threads (one per CUDA thread), so a
barrier is a real barrier and a missing one can show as a wrong answer.
Warp-level operations are warp collectives: shuffles and ballots, ``ldmatrix``
and ``mma.sync`` (m16n8k16 float16 / bfloat16, m16n8k8 TF32), in PTX's
fragment layouts; ``wgmma`` is a warpgroup's product with its shared-memory
operands read through their descriptors (no swizzle or the 128-byte one,
K- or MN-major) and its accumulators in PTX's layout; the products' sums are
float64, rounded once. Shared-memory addresses are 32-bit as in PTX (a base
index and an offset; dynamic shared memory is base 0, 1024-byte aligned, so
that descriptors hold its offsets); a thread's ``cp.async`` copies land when
it waits for their commit group (so a tile read before its wait shows the
bytes that were there before), TMA copies at once (completing their
mbarrier's transaction bytes); mbarriers keep arrival counts, transaction
bytes and phases; named barriers count threads.
Dynamic shared memory is filled with NaN bytes before each block, so a read
of what no thread wrote shows (``SIMT_EMU_FILL`` sets another byte: a finite
one shows such reads in kernels that recompute rows left non-finite); static
shared memory keeps its bytes from one block to the next (zeros at first). Host pointers stand for device pointers:
numpy arrays are passed as they are.

What it cannot run: inline PTX other than the helpers :data:`HOST_COMMON`
replaces (a top-level definition holding ``asm`` is removed from the source,
so kernels keep their PTX in such helpers), and the 64- and 32-byte swizzles.
Paths guarded by ``__CUDA_ARCH__`` take their pre-sm_80 form.
With ``SIMT_EMU_JITTER`` set (a seed, read when the library loads) the
copies land at issue instead, the earliest the GPU may land them, and threads
pause up to a millisecond at random before barriers and shared-memory reads:
schedules where a missing barrier shows come up. Other memory-model questions
(visibility without a barrier between blocks, atomics' ordering) are not what
it checks; it checks the kernels' arithmetic, indexing and layouts.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types

import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <map>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __restrict__ __restrict

struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;

namespace emu {
inline unsigned char* dynamic_smem = nullptr;
inline std::barrier<>* block_barrier = nullptr;
struct Warp {   // a warp's barrier and the slots its lanes exchange values through
    std::unique_ptr<std::barrier<>> bar;
    unsigned long long slot[32];
    unsigned frag[32][6];   // the operands of a warp-wide matrix instruction (mma.sync, ldmatrix)
};
inline Warp* warps = nullptr;
struct AsyncCopy { unsigned char* dst; const unsigned char* src; int bytes, size; };
inline thread_local std::vector<AsyncCopy> cp_open;                // cp.async issued, not yet committed
inline thread_local std::vector<std::vector<AsyncCopy>> cp_groups;  // committed groups, oldest first
inline void cp_land(const std::vector<AsyncCopy>& group) {
    for (const AsyncCopy& c : group) {
        if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
        std::memset(c.dst + c.bytes, 0, c.size - c.bytes);
    }
}
inline void cp_finish() {   // a thread's end: what it never waited for lands
    for (const auto& g : cp_groups) cp_land(g);
    cp_land(cp_open);
    cp_groups.clear();
    cp_open.clear();
}
struct Named {   // a block's named barriers (bar.sync / bar.arrive with a thread count)
    std::mutex mu;
    std::condition_variable cv;
    int arrived[16] = {};
    unsigned gen[16] = {};
};
inline Named* named = nullptr;
inline std::atomic<int> block_or[2];   // __syncthreads_or's two alternating slots
inline thread_local int block_or_turn = 0;
inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
template <class T> T exchange(T v, unsigned src) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    Warp& w = warps[linear_tid() / 32];
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.slot[linear_tid() % 32] = bits;
    w.bar->arrive_and_wait();
    bits = w.slot[src % 32];
    w.bar->arrive_and_wait();
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}
// mbarriers' lock, and the TMA copies in flight by the mbarrier that counts
// their bytes: (shared destination, global source or null for a zero) per
// 16-bit element
inline std::mutex mbar_mu;
inline std::map<unsigned char*, std::vector<std::pair<unsigned char*, const unsigned char*>>> tma_flight;
// A fault (an address or a use the GPU would not take) is recorded, the launch
// goes on, and the launch's caller gets the first fault's message.
inline std::mutex fault_mu;
inline std::string fault_text;
inline void fault(const std::string& what) {
    std::lock_guard<std::mutex> g(fault_mu);
    if (fault_text.empty()) fault_text = what;
}
// Shared-memory addresses as PTX's 32-bit ones: base index << 24 | offset,
// the bases (a block's dynamic buffer, static arrays) registered on first use
// (under a lock) and read without one (a slot is written before the count
// that publishes it).
inline std::mutex smem_mu;
inline unsigned char* smem_bases[256];
inline std::atomic<unsigned> smem_count{0};
inline unsigned smem_encode(const void* p) {
    auto* c = (unsigned char*)p;
    std::lock_guard<std::mutex> g(smem_mu);
    const unsigned n = smem_count.load();
    for (unsigned i = 0; i < n; ++i)
        if (c >= smem_bases[i] && c - smem_bases[i] < (1 << 23)) return (i << 24) | (unsigned)(c - smem_bases[i]);
    if (n >= 255) { fault("more than 255 shared-memory bases"); return 0; }
    smem_bases[n] = c;
    smem_count.store(n + 1);
    return n << 24;
}
inline unsigned char* smem_decode(unsigned a) {
    if ((a >> 24) >= smem_count.load()) {
        fault("a shared-memory address that no pointer gave");
        return smem_bases[0];
    }
    return smem_bases[a >> 24] + (a & 0xffffffu);
}
}
namespace emu {
// SIMT_EMU_JITTER (a seed): threads pause up to a millisecond now and then before barriers and
// shared-memory reads, and cp.async copies land at issue (the earliest they may), so that
// schedules that expose a missing barrier come up more often
inline const unsigned jitter = [] { const char* e = std::getenv("SIMT_EMU_JITTER"); return e ? (unsigned)std::atoi(e) : 0u; }();
// SIMT_EMU_FILL: the byte dynamic shared memory holds before each block (default 0xff: NaN
// in every float type, so that a read of what no thread wrote shows; a finite one such as
// 0x41 shows such reads in kernels that recompute a row left non-finite)
inline const int fill = [] { const char* e = std::getenv("SIMT_EMU_FILL"); return e ? (int)std::strtol(e, nullptr, 0) : 0xff; }();
inline thread_local unsigned long long jitter_state = 0;
inline void jitter_pause() {
    if (!jitter) return;
    if (!jitter_state) jitter_state = 0x9e3779b97f4a7c15ull * (linear_tid() + 1) + jitter;
    jitter_state ^= jitter_state << 13; jitter_state ^= jitter_state >> 7; jitter_state ^= jitter_state << 17;
    if ((jitter_state & 15u) == 0) std::this_thread::sleep_for(std::chrono::microseconds(jitter_state >> 54));
}
}
inline void __syncthreads() { emu::jitter_pause(); emu::block_barrier->arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
    const int turn = emu::block_or_turn;
    emu::block_or_turn ^= 1;
    if (pred) emu::block_or[turn].fetch_or(1);
    __syncthreads();
    const int r = emu::block_or[turn].load();
    __syncthreads();
    if (emu::linear_tid() == 0) emu::block_or[turn].store(0);   // reused two calls on, after a barrier
    return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warps[emu::linear_tid() / 32].bar->arrive_and_wait(); }
template <class T> T __shfl_sync(unsigned, T v, int src, int = 32) { return emu::exchange(v, (unsigned)src); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m, int = 32) {
    return emu::exchange(v, (emu::linear_tid() % 32) ^ (unsigned)m); }
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) {
    const unsigned l = emu::linear_tid() % 32; return emu::exchange(v, l + d < 32 ? l + d : l); }
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d, int = 32) {
    const unsigned l = emu::linear_tid() % 32; return emu::exchange(v, l >= d ? l - d : l); }
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned b = 0;
    for (unsigned l = 0; l < 32; ++l) {   // one exchange per lane: simple, and rare in these kernels
        const int p = emu::exchange(pred ? 1 : 0, l);
        b |= (p ? 1u : 0u) << l;
    }
    return b; }
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0u; }
inline int __all_sync(unsigned m, int pred) { return __ballot_sync(m, !pred) == 0u; }
inline unsigned __vcmpeq4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 32; i += 8) r |= (((a >> i) & 0xffu) == ((b >> i) & 0xffu) ? 0xffu : 0u) << i;
    return r; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long b = (unsigned long long)y << 32 | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((b >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r; }
inline int __ffs(unsigned x) { return x ? __builtin_ctz(x) + 1 : 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class A, class B> inline auto min(A a, B b) {
    using C = std::common_type_t<A, B>; return (C)a < (C)b ? (C)a : (C)b; }
template <class A, class B> inline auto max(A a, B b) {
    using C = std::common_type_t<A, B>; return (C)a < (C)b ? (C)b : (C)a; }

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline long long __double_as_longlong(double d) { long long u; std::memcpy(&u, &d, 8); return u; }
inline double __longlong_as_double(long long u) { double d; std::memcpy(&d, &u, 8); return d; }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __frcp_rn(float x) { return 1.0f / x; }
// the fast-math intrinsics, as macros: glibc declares some of these names itself
#define __fdividef(a, b) ((float)(a) / (float)(b))
#define __expf(x) std::exp((float)(x))
#define __logf(x) std::log((float)(x))
#define __log2f(x) std::log2((float)(x))
#define __powf(a, b) std::pow((float)(a), (float)(b))

inline int atomicMin(int* p, int v) {
    std::atomic_ref<int> a(*p); int old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old; }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline float atomicAdd(float* p, float v) {
    std::atomic_ref<float> a(*p); float old = a.load();
    while (!a.compare_exchange_weak(old, old + v)) {}
    return old; }

namespace emu {
template <typename... A, std::size_t... I>
void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

// blocks in order, each by bx * by * bz threads; returns 0
template <typename... A>
int launch(void (*k)(A...), dim3 grid, dim3 block, std::size_t smem, void** args) {
    const unsigned n = block.x * block.y * block.z;
    gridDim = grid; blockDim = block;
    std::vector<unsigned char> dyn(smem + 1024);
    unsigned char* const dyn_base = dyn.data() + (1024 - reinterpret_cast<std::uintptr_t>(dyn.data()) % 1024) % 1024;
    {   // dynamic shared memory is base 0: its addresses are offsets, as wgmma's descriptors hold them
        std::lock_guard<std::mutex> g(smem_mu);
        smem_bases[0] = dyn_base;
        smem_count.store(1);
    }
    {
        std::lock_guard<std::mutex> g(mbar_mu);
        tma_flight.clear();
    }
    std::barrier<> start(n + 1), end(n + 1);
    bool done = false;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (;;) {
                start.arrive_and_wait();
                if (done) return;
                block_or_turn = 0;
                call(k, args, std::index_sequence_for<A...>{});
                cp_finish();
                block_barrier->arrive_and_drop();   // an exited thread no longer holds barriers up
                warps[t / 32].bar->arrive_and_drop();
                end.arrive_and_wait();
            }
        });
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::memset(dyn.data(), fill, dyn.size());
                dynamic_smem = dyn_base;   // 1024-byte aligned, as the swizzled layouts need
                auto bar = std::make_unique<std::barrier<>>(n);
                block_barrier = bar.get();
                std::vector<Warp> ws((n + 31) / 32);
                for (unsigned w = 0; w < ws.size(); ++w)
                    ws[w].bar = std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w));
                warps = ws.data();
                auto nb = std::make_unique<Named>();
                named = nb.get();
                block_or[0] = 0;
                block_or[1] = 0;
                blockIdx = dim3{x, y, z};
                start.arrive_and_wait();
                end.arrive_and_wait();
            }
    done = true;
    start.arrive_and_wait();
    for (auto& th : threads) th.join();
    std::lock_guard<std::mutex> g(fault_mu);
    return fault_text.empty() ? 0 : 1;
}

// launch() under a watchdog: a kernel that does not finish in `seconds` (a
// barrier some thread never reaches, an mbarrier phase that never completes)
// ends the process with a message instead of hanging the test run
template <typename... A>
int launch_watched(void (*k)(A...), dim3 grid, dim3 block, std::size_t smem, void** args, const char* name,
                   unsigned seconds) {
    std::mutex mu;
    std::condition_variable cv;
    bool finished = false;
    std::thread dog([&] {
        std::unique_lock<std::mutex> lk(mu);
        if (!cv.wait_for(lk, std::chrono::seconds(seconds), [&] { return finished; })) {
            std::fprintf(stderr, "simt_emu: %s did not finish in %u s (a barrier that not every thread "
                                 "reaches?)\n", name, seconds);
            std::fflush(stderr);
            std::abort();
        }
    });
    {
        std::lock_guard<std::mutex> g(fault_mu);
        fault_text.clear();
    }
    const int status = launch(k, grid, block, smem, args);
    {
        std::lock_guard<std::mutex> lk(mu);
        finished = true;
    }
    cv.notify_all();
    dog.join();
    return status;
}
}  // namespace emu
extern "C" const char* relattn_emu_fault() { return emu::fault_text.c_str(); }
namespace emu {
}  // namespace emu
"""

# What replaces, on the host, the helpers of the CUDA sources written in inline
# PTX (removed by host_source): the same results, IEEE-rounded as the PTX is
# (ex2.approx's last bits aside), 16-bit stores rounding as cvt.rn does
# (bfloat16: to nearest even, NaN kept quiet).
HOST_COMMON = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

inline float ra_exp2(float x) { return std::exp2(x); }
template <int DT> inline float ra_ld(const u16* p) {
    if (DT == 1) return __uint_as_float((u32)*p << 16);
    _Float16 h; std::memcpy(&h, p, 2); return (float)h;
}
template <int DT> inline void ra_st(u16* p, float x) {
    if (DT == 1) {
        const u32 u = __float_as_uint(x);
        *p = (u & 0x7fffffffu) > 0x7f800000u ? (u16)((u >> 16) | 0x40u)
                                              : (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
        const _Float16 h = (_Float16)x; std::memcpy(p, &h, 2);
    }
}
inline float ra_ieee_fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float ra_ieee_add(float a, float b) { volatile float r = a + b; return r; }
inline float ra_ieee_sub(float a, float b) { volatile float r = a - b; return r; }
inline float ra_ieee_div(float a, float b) { volatile float r = a / b; return r; }
inline float ra_ieee_exp(float x) { return (float)std::exp((double)x); }
template <int DT> inline float ra_from16(u16 u) { return ra_ld<DT>(&u); }
template <int DT> inline u16 ra_to16(float x) { u16 r; ra_st<DT>(&r, x); return r; }
template <int DT> inline float ra_load_f32(const void* p, long long i) {
    if (DT == 2) return reinterpret_cast<const float*>(p)[i];
    return ra_ld<DT>(reinterpret_cast<const u16*>(p) + i);
}
inline float ra_f16_lo(u32 h) { return ra_from16<0>((u16)h); }
template <int DT> inline u32 ra_pack(float lo, float hi) { return (u32)ra_to16<DT>(lo) | (u32)ra_to16<DT>(hi) << 16; }

// shared memory: addresses, and cp.async: a thread's copies (zero-filled past
// src_bytes) land when it waits for their group (wait_group N lands every
// committed group but the newest N; copies not committed wait for the
// thread's end), not at issue, so a tile read before its wait, or a wait that
// counts its groups wrong, shows the bytes that were there before
inline u32 ra_smem_addr(const void* p) { return emu::smem_encode(p); }
inline void ra_cp_async_n(u32 dst, const void* src, int src_bytes, int n) {
    const emu::AsyncCopy c{emu::smem_decode(dst), static_cast<const unsigned char*>(src),
                           std::min(std::max(src_bytes, 0), n), n};
    if (emu::jitter) emu::cp_land({c});   // the earliest a copy may land: a reader not done with the stage shows
    else emu::cp_open.push_back(c);
}
inline void ra_cp_async16(u32 dst, const void* src, int src_bytes) { ra_cp_async_n(dst, src, src_bytes, 16); }
inline void rb_cp_async4(u32 dst, const void* src, int src_bytes) { ra_cp_async_n(dst, src, src_bytes, 4); }
inline void ra_cp_commit() {
    emu::cp_groups.push_back(std::move(emu::cp_open));
    emu::cp_open.clear();
}
template <int N> inline void ra_cp_wait() {
    while (emu::cp_groups.size() > (std::size_t)N) {
        emu::cp_land(emu::cp_groups.front());
        emu::cp_groups.erase(emu::cp_groups.begin());
    }
}
template <bool ASYNC> inline void rb_fence_async() {}

// mma.sync and ldmatrix as warp collectives: each lane posts its operands
// (emu::Warp::frag), the warp meets, each lane reads the others' and computes
// its own part of the result, the warp meets again.
inline emu::Warp& ra_warp_post(const u32* v, int n) {
    emu::Warp& w = emu::warps[emu::linear_tid() / 32];
    std::memcpy(w.frag[emu::linear_tid() % 32], v, 4 * n);
    w.bar->arrive_and_wait();
    return w;
}
// x4: lanes 8 i .. 8 i + 7 give matrix i's row addresses; lane l gets, of each
// matrix, row l / 4's columns 2 (l % 4), + 1 (trans: column l / 4 of rows 2 (l % 4), + 1)
inline void ra_ldsm_any(u32 (&r)[4], u32 addr, bool trans) {
    emu::jitter_pause();
    emu::Warp& w = ra_warp_post(&addr, 1);
    const unsigned l = emu::linear_tid() % 32;
    for (int i = 0; i < 4; ++i) {
        u16 e[2];
        for (int h = 0; h < 2; ++h) {
            const unsigned row = trans ? 2 * (l % 4) + h : l / 4, col = trans ? l / 4 : 2 * (l % 4) + h;
            std::memcpy(&e[h], emu::smem_decode(w.frag[8 * i + row][0]) + 2 * col, 2);
        }
        r[i] = (u32)e[0] | (u32)e[1] << 16;
    }
    w.bar->arrive_and_wait();
}
// ---- wgmma (sm_90a) as a warpgroup's product, issued and completed at once
// (fence, commit and wait nothing). Operands in shared memory by descriptor:
// start, leading and stride byte offsets, no swizzle or the 128-byte one (the
// address's bits 4-6 XOR its bits 7-9, on offsets of the 1024-byte aligned
// dynamic shared memory); K-major (transpose 0) or MN-major (transpose 1)
// canonical layouts of eb-byte elements. The accumulator of a thread: d[4 j +
// 2 h + e] is row 16 w + g + 8 h, column 8 j + 2 t + e of the 64 x N result
// (w: the warp in the warpgroup).
inline const unsigned char* ra_wg_elem(u64 desc, int mn, int k, bool kmajor, int eb) {
    const u32 start = (u32)(desc & 0x3fffu) << 4, lbo = (u32)((desc >> 16) & 0x3fffu) << 4;
    const u32 sbo = (u32)((desc >> 32) & 0x3fffu) << 4;
    const int sw = (int)(desc >> 62), T = 16 / eb;
    u32 a;
    if (sw == 0) {
        a = kmajor ? start + (mn % 8) * 16 + (mn / 8) * sbo + (k % T) * eb + (k / T) * lbo
                   : start + (mn % T) * eb + (mn / T) * sbo + (k % 8) * 16 + (k / 8) * lbo;
    } else if (sw == 1) {
        const int W = 128 / eb;
        a = kmajor ? start + (mn % 8) * 128 + (mn / 8) * sbo + k * eb
                   : start + (mn % W) * eb + (mn / W) * lbo + (k % 8) * 128 + (k / 8) * sbo;
        a ^= ((a >> 7) & 7u) << 4;
    } else {
        emu::fault("a wgmma descriptor with the 64- or 32-byte swizzle (not emulated)");
        a = start;
    }
    return emu::smem_decode(a);
}
// DT 0 float16, 1 bfloat16, 2 TF32 (float32 with its low 13 bits dropped)
template <int DT> inline double ra_wg_value(const unsigned char* p) {
    if (DT == 2) { u32 u; std::memcpy(&u, p, 4); return (double)__uint_as_float(u & 0xffffe000u); }
    u16 h; std::memcpy(&h, p, 2); return (double)ra_from16<DT>(h);
}
template <int DT> inline double ra_wg_reg(u32 r, int half) {
    if (DT == 2) return (double)__uint_as_float(r & 0xffffe000u);
    return (double)ra_from16<DT>((u16)(r >> (16 * half)));
}
// d = (acc ? d : 0) + A B^T, K = 16 (16-bit) or 8 (TF32); A from shared
// memory (a null) or from the warp's fragments a (mma.sync's A layout)
template <int DT, int N>
inline void ra_wg_product(float* d, const u32* a, u64 da, u64 db, bool b_kmajor, int acc) {
    constexpr int K = DT == 2 ? 8 : 16, EB = DT == 2 ? 4 : 2;
    const unsigned tid = emu::linear_tid(), l = tid % 32, g = l / 4, t = l % 4, w = (tid / 32) % 4;
    emu::Warp* warp = nullptr;
    emu::jitter_pause();
    if (a) warp = &ra_warp_post(a, 4);
    float out[N / 2];
    for (int i = 0; i < N / 2; ++i) {
        const int h = (i % 4) / 2, rloc = g + 8 * h, row = 16 * w + rloc, col = 8 * (i / 4) + 2 * t + i % 2;
        double sum = 0.0;
        for (int k = 0; k < K; ++k) {
            double x;
            if (a) {
                const int kq = DT == 2 ? k % 4 : (k % 8) / 2, hi = DT == 2 ? k >= 4 : k >= 8;
                x = ra_wg_reg<DT>(warp->frag[(rloc % 8) * 4 + kq][h + 2 * hi], k % 2);
            } else {
                x = ra_wg_value<DT>(ra_wg_elem(da, row, k, true, EB));
            }
            sum += x * ra_wg_value<DT>(ra_wg_elem(db, col, k, b_kmajor, EB));
        }
        out[i] = (float)(sum + (acc ? (double)d[i] : 0.0));
    }
    if (a) warp->bar->arrive_and_wait();
    for (int i = 0; i < N / 2; ++i) d[i] = out[i];
}
template <int DT, int N> struct RaWg {
    static void ss(float* d, u64 da, u64 db, int acc) { ra_wg_product<DT, N>(d, nullptr, da, db, true, acc); }
    static void rs(float* d, const u32* a, u64 db, int acc) { ra_wg_product<DT, N>(d, a, 0, db, false, acc); }
};
template <int N> struct RaWt {
    static void rs(float* d, const u32* a, u64 db, int acc) { ra_wg_product<2, N>(d, a, 0, db, true, acc); }
};
// mbarriers: the state in the barrier's 8 bytes of shared memory (bits 0-11
// the arrival count, 12-23 the arrivals pending, 24 the phase; then the
// transaction bytes pending), changed under one lock; a phase completes when
// no arrival and no byte is pending
inline void ra_mbar_update(u32 bar, int arrivals, int tx) {
    std::lock_guard<std::mutex> g(emu::mbar_mu);
    unsigned char* p = emu::smem_decode(bar);
    u32 st; int pend_tx;
    std::memcpy(&st, p, 4); std::memcpy(&pend_tx, p + 4, 4);
    int pending = (int)((st >> 12) & 0xfffu) - arrivals;
    pend_tx += tx;
    if (pending < 0) {
        emu::fault("an mbarrier arrived on more times than its count in one phase");
        pending = 0;
    }
    if (pending == 0 && pend_tx == 0) st = ((st & 0x1000000u) ^ 0x1000000u) | ((st & 0xfffu) << 12) | (st & 0xfffu);
    else st = (st & 0x1000fffu) | ((u32)pending << 12);
    std::memcpy(p, &st, 4); std::memcpy(p + 4, &pend_tx, 4);
}
inline void ra_mbar_init(u32 bar, u32 count) {
    std::lock_guard<std::mutex> g(emu::mbar_mu);
    const u32 st = (count & 0xfffu) | (count & 0xfffu) << 12;
    const int zero = 0;
    unsigned char* p = emu::smem_decode(bar);
    std::memcpy(p, &st, 4); std::memcpy(p + 4, &zero, 4);
}
inline void ra_mbar_expect(u32 bar, u32 bytes) { ra_mbar_update(bar, 1, (int)bytes); }
inline void ra_mbar_arrive(u32 bar) { ra_mbar_update(bar, 1, 0); }
inline void ra_mbar_wait(u32 bar, u32 parity) {   // until the phase of that parity completed
    emu::jitter_pause();
    for (;;) {
        {
            std::lock_guard<std::mutex> g(emu::mbar_mu);
            unsigned char* p = emu::smem_decode(bar);
            u32 st;
            std::memcpy(&st, p, 4);
            if (((st >> 24) & 1u) != (parity & 1u)) {
                // the phase's TMA copies land when a waiter sees it complete (the latest they may)
                auto it = emu::tma_flight.find(p);
                if (it != emu::tma_flight.end()) {
                    for (auto& [dst, src] : it->second) {
                        if (src) std::memcpy(dst, src, 2);
                        else std::memset(dst, 0, 2);
                    }
                    emu::tma_flight.erase(it);
                }
                return;
            }
        }
        std::this_thread::yield();
    }
}
// TMA: the tensor map as host_tensor_map_encoder writes it (w[0] the
// address, w[1..4] the dims, w[5..7] the byte strides of dims 1-3, w[8..11]
// the box, w[12] 1 for the 128-byte swizzle); 16-bit elements; a box
// row of box[0] elements at dst + 2 box[0] r, swizzled on the address's bits;
// out-of-range elements zero. The bytes complete on bar at once; the copies
// land when a thread's wait on bar sees its phase complete (the latest they
// may), or under jitter at issue (the earliest)
template <class M>
inline void ra_tma_load(u32 dst, const M* map, u32 bar, int c0, int c1, int c2, int c3) {
    const u64* w = reinterpret_cast<const u64*>(map);
    const unsigned char* g = reinterpret_cast<const unsigned char*>(w[0]);
    const long long c[4] = {c0, c1, c2, c3};
    int bytes = 0;
    emu::jitter_pause();
    std::vector<std::pair<unsigned char*, const unsigned char*>> copies;
    for (u64 i3 = 0; i3 < w[11]; ++i3)
        for (u64 i2 = 0; i2 < w[10]; ++i2)
            for (u64 r = 0; r < w[9]; ++r)
                for (u64 e = 0; e < w[8]; ++e) {
                    const long long x[4] = {c[0] + (long long)e, c[1] + (long long)r, c[2] + (long long)i2,
                                            c[3] + (long long)i3};
                    bool in = true;
                    for (int d = 0; d < 4; ++d) in = in && x[d] >= 0 && x[d] < (long long)w[1 + d];
                    const unsigned char* src = in ? g + 2 * x[0] + x[1] * w[5] + x[2] * w[6] + x[3] * w[7] : nullptr;
                    u32 a = dst + (u32)(2 * (e + w[8] * (r + w[9] * (i2 + w[10] * i3))));
                    if (w[12]) a ^= ((a >> 7) & 7u) << 4;
                    copies.emplace_back(emu::smem_decode(a), src);
                    bytes += 2;
                }
    if (emu::jitter) {   // the earliest the copies may land: at issue
        for (auto& [d, src] : copies) {
            if (src) std::memcpy(d, src, 2);
            else std::memset(d, 0, 2);
        }
    } else {
        std::lock_guard<std::mutex> g(emu::mbar_mu);
        auto& flight = emu::tma_flight[emu::smem_decode(bar)];
        flight.insert(flight.end(), copies.begin(), copies.end());
    }
    ra_mbar_update(bar, 0, -bytes);
}
// named barrier id of n threads: the n-th arrival releases it; bar.sync waits for that
inline void ra_named_barrier(int id, int n, bool wait) {
    emu::Named& b = *emu::named;
    std::unique_lock<std::mutex> lk(b.mu);
    const unsigned gen = b.gen[id];
    if (++b.arrived[id] == n) {
        b.arrived[id] = 0;
        ++b.gen[id];
        b.cv.notify_all();
    } else if (wait) {
        b.cv.wait(lk, [&] { return b.gen[id] != gen; });
    }
}
inline void ra_bar_sync(int id, int n) { ra_named_barrier(id, n, true); }
inline void ra_bar_arrive(int id, int n) { ra_named_barrier(id, n, false); }
inline void ra_st_shared_zero16(u32 a) { std::memset(emu::smem_decode(a), 0, 16); }
inline void ra_fence_mbar_init() {}
inline int ra_opaque(int x) { return x; }
template <int R> inline void ra_regs_dec() {}
template <int R> inline void ra_regs_inc() {}
inline void ra_wg_fence() {}
inline void ra_wg_commit() {}
template <int N> inline void ra_wg_wait() {}
inline void ra_fence_proxy_async() {}

// mma.sync m16n8k8 TF32 (the values' low 13 bits dropped): a0 .. a3 rows g,
// g + 8 x columns t, t + 4; b0, b1 rows t, t + 4 of column g; C as m16n8k16's
inline void ra_mma_tf32(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    const u32 mine[6] = {a0, a1, a2, a3, b0, b1};
    emu::Warp& w = ra_warp_post(mine, 6);
    const unsigned l = emu::linear_tid() % 32, g = l / 4, t = l % 4;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
        double sum = 0.0;
        for (int k = 0; k < 8; ++k)
            sum += ra_wg_reg<2>(w.frag[(row % 8) * 4 + k % 4][(row >= 8) + 2 * (k >= 4)], 0)
                   * ra_wg_reg<2>(w.frag[col * 4 + k % 4][4 + (k >= 4)], 0);
        out[e] = (float)(sum + (double)c[e]);
    }
    w.bar->arrive_and_wait();
    for (int e = 0; e < 4; ++e) c[e] = out[e];
}

inline void ra_ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    u32 r[4]; ra_ldsm_any(r, addr, false); r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
inline void ra_ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    u32 r[4]; ra_ldsm_any(r, addr, true); r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
// m16n8k16, A row-major (a[0..3]: rows g, g + 8 x columns 2 t, 2 t + 8), B
// column-major (b0, b1: rows 2 t, 2 t + 8 of column g), C: rows g, g + 8 x
// columns 2 t, 2 t + 1 (g = lane / 4, t = lane % 4); products exact, their sum
// in double, rounded once to float32 (the tensor cores' sums are not IEEE's)
template <int DT> inline void ra_mma(float* c, const u32* a, u32 b0, u32 b1) {
    const u32 mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    emu::Warp& w = ra_warp_post(mine, 6);
    const unsigned l = emu::linear_tid() % 32, g = l / 4, t = l % 4;
    auto half = [&](unsigned lane, int reg, int k) {
        return ra_from16<DT>((u16)(w.frag[lane][reg] >> (16 * (k % 2))));
    };
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) {
            const double x = half((row % 8) * 4 + (k % 8) / 2, (row >= 8) + 2 * (k >= 8), k);
            const double y = half(col * 4 + (k % 8) / 2, 4 + (k >= 8), k);
            sum += x * y;
        }
        out[e] = (float)(sum + (double)c[e]);
    }
    w.bar->arrive_and_wait();
    for (int e = 0; e < 4; ++e) c[e] = out[e];
}
"""

_DYNAMIC = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;")


def compiler() -> str | None:
    """The host C++ compiler (``$CXX``, else g++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _top_level(text: str):
    """``(start, end)`` of each top-level declaration of ``text`` (C++ with
    comments and string literals skipped): from the end of the one before to
    its closing brace or semicolon at depth 0."""
    spans, depth, start, i, n = [], 0, 0, 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i) or c == "#" and (i == 0 or text[i - 1] == "\n"):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 1
        elif c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
                start = i + 1
        elif c == ";" and depth == 0:
            spans.append((start, i + 1))
            start = i + 1
        i += 1
    return spans


def _without_asm(text: str) -> str:
    """``text`` without its top-level definitions that hold inline assembly
    (their preprocessor lines kept); :data:`HOST_COMMON` stands for those the
    kernels call."""
    out, last = [], 0
    for a, b in _top_level(text):
        seg = text[a:b]
        if re.search(r"\basm\b", seg):
            out.append(text[last:a])
            out.append("\n" + "".join(line for line in seg.splitlines(True) if line.lstrip().startswith("#")) + "\n")
            last = b
    out.append(text[last:])
    return "".join(out)


def host_source(cuda_text: str, cxx: str | None = None) -> str:
    """``cuda_text`` for the host: its conditionals resolved by the host's
    preprocessor without ``__CUDA_ARCH__`` (the pre-sm_80 paths), the
    definitions written in inline PTX removed (:data:`HOST_COMMON` replaces
    them), dynamic shared memory as a pointer to the block's buffer."""
    cxx = cxx or compiler()
    res = subprocess.run([cxx, "-E", "-P", "-x", "c++", "-"], input=cuda_text, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"host preprocessing failed:\n{res.stderr[-4000:]}")
    text = _without_asm(res.stdout)
    return _DYNAMIC.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ({m.group(1)}*)emu::dynamic_smem;", text)


class Emulator:
    """The kernels ``names`` (instantiations, as NVRTC would be asked for them)
    of ``cuda_text``, compiled for the host; :meth:`launch` runs one. A launch
    that runs longer than ``timeout`` seconds (a deadlock) ends the process
    with a message naming the kernel."""

    def __init__(self, cuda_text: str, names, *, opt="-O1", timeout=300):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++ or clang++) found")
        self.names = list(names)
        wrappers = "\n".join(
            f'extern "C" int relattn_emu_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f"unsigned bz, unsigned long smem, void** args) {{ return emu::launch_watched(&{n}, dim3{{gx, gy, gz}}, "
            f"dim3{{bx, by, bz}}, smem, args, \"{n}\", {int(timeout)}u); }}" for i, n in enumerate(self.names))
        text = PRELUDE + HOST_COMMON + host_source(cuda_text, cxx) + "\n" + wrappers + "\n"
        digest = hashlib.sha256((cxx + opt + text).encode()).hexdigest()[:20]
        root = os.path.join(tempfile.gettempdir(), "relattn-simt-emu")
        os.makedirs(root, exist_ok=True)
        lib = os.path.join(root, f"{digest}.so")
        if not os.path.exists(lib):
            src = os.path.join(root, f"{digest}.cpp")
            with open(src, "w", encoding="utf-8") as fh:
                fh.write(text)
            tmp = f"{lib}.{os.getpid()}"
            res = subprocess.run([cxx, "-std=c++20", opt, "-fPIC", "-shared", "-pthread", "-w", src, "-o", tmp],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"host compile failed:\n{res.stderr[-6000:]}")
            os.replace(tmp, lib)
        self._lib = ctypes.CDLL(lib)
        self._fns = {}
        for i, n in enumerate(self.names):
            fn = getattr(self._lib, f"relattn_emu_{i}")
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulong, ctypes.c_void_p]
            self._fns[n] = fn
        self._lib.relattn_emu_fault.restype = ctypes.c_char_p

    def launch(self, name, grid, block, smem, args):
        """Run kernel ``name`` on ``grid`` blocks (an int or up to three) of
        ``block`` threads with ``smem`` bytes of dynamic shared memory;
        ``args`` in the kernel's order: numpy arrays (their data pointer) or
        numpy scalars of the parameter's type (np.int32, np.int64,
        np.float32), or None for a null pointer."""
        keep, ptrs = [], []
        for a in args:
            if a is None or isinstance(a, np.ndarray):
                c = ctypes.c_void_p(None if a is None else a.ctypes.data)
            elif isinstance(a, np.generic):
                c = np.ctypeslib.as_ctypes(np.array(a).reshape(1))
            else:
                raise TypeError(f"args: numpy arrays or numpy scalars, got {type(a).__name__}")
            keep.append(c)
            ptrs.append(ctypes.cast(ctypes.pointer(c), ctypes.c_void_p))
        argv = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        self.launch_raw(name, grid, block, smem, argv)

    def launch_raw(self, name, grid, block, smem, argv):
        """:meth:`launch` with the kernel's parameters as CUDA takes them: an
        array of pointers to each parameter's value (``argv``)."""
        g = (tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)) + (1, 1)
        b = (tuple(block) if isinstance(block, (tuple, list)) else (block,)) + (1, 1)
        if self._fns[name](*(int(x) for x in g[:3]), *(int(x) for x in b[:3]), int(smem), argv):
            raise RuntimeError(f"simt_emu: {self._lib.relattn_emu_fault().decode()}, in {name}")


class HostArray(np.ndarray):
    """A numpy array that answers ``.data.ptr`` as a CuPy array does."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def host_cupy(driver=None):
    """A module that stands for CuPy where the GPU backend's Python plans
    launches (``cupy.empty``, ``ascontiguousarray``, ``asarray``, streams and
    devices) with :class:`HostArray` s: new arrays are filled with NaN bytes.
    With ``driver`` (a :class:`HostDriver`), ``RawModule`` and ``RawKernel``
    build their kernels as host emulations (:class:`HostKernel` s)."""
    def empty(shape, dtype=np.float32):
        out = np.empty(shape, dtype=dtype)
        out.view(np.uint8)[...] = 0xff
        return out.view(HostArray)

    mod = types.ModuleType("cupy")
    mod.empty = empty
    mod.zeros = lambda shape, dtype=np.float32: np.zeros(shape, dtype=dtype).view(HostArray)
    mod.ascontiguousarray = lambda a, dtype=None: np.ascontiguousarray(a, dtype=dtype).view(HostArray)
    mod.asarray = lambda a, dtype=None: np.array(a, dtype=dtype).view(HostArray)
    for name in ("uint8", "uint16", "uint32", "uint64", "int32", "int64", "float16", "float32", "float64"):
        setattr(mod, name, getattr(np, name))
    if driver is not None:
        class RawModule:
            def __init__(self, code, options=(), name_expressions=()):
                self._emu = Emulator(code, list(name_expressions))

            def get_function(self, name):
                return HostKernel(self._emu, name, driver)

        mod.RawModule = RawModule
        mod.RawKernel = lambda code, name, **kw: HostKernel(Emulator(code, [name]), name, driver)
    stream = types.SimpleNamespace(ptr=0)
    mod.cuda = types.SimpleNamespace(
        get_current_stream=lambda: stream, runtime=types.SimpleNamespace(getDevice=lambda: 0),
        Device=lambda *a: types.SimpleNamespace(id=0))
    return mod


def host_tensor_map_encoder():
    """``(fn, ctypes)`` standing for ``families.ws._tmap_encoder``: ``fn`` takes
    ``cuTensorMapEncodeTiled``'s arguments and writes the map as the host's
    ``ra_tma_load`` reads it (16-bit elements, rank 4), returning 0."""
    def encode(buf, dtype, rank, ptr, dims, strides, box, elem_strides, interleave, swizzle, l2, oob):
        if rank != 4 or swizzle not in (0, 3) or list(elem_strides) != [1, 1, 1, 1]:
            raise ValueError("host tensor maps: rank 4, unit element strides, no or 128-byte swizzle")
        w = np.ctypeslib.as_array((ctypes.c_uint64 * 16).from_address(buf))
        w[:] = 0
        w[0] = ptr.value if isinstance(ptr, ctypes.c_void_p) else int(ptr)
        w[1:5] = list(dims)
        w[5:8] = list(strides)
        w[8:12] = list(box)
        w[12] = 1 if swizzle == 3 else 0
        return 0

    return encode, ctypes


class HostDriver:
    """Stands for the CUDA driver of ``_build.RawLaunch``: ``cuLaunchKernel``
    of a function that :meth:`function` handed out runs that kernel on the host."""

    def __init__(self, emu: Emulator | None = None):
        self.emu = emu
        self._kernels = []

    def function(self, name, emu: Emulator | None = None):
        """What ``RawLaunch`` takes for kernel ``name`` of ``emu`` (default: the driver's)."""
        self._kernels.append((emu or self.emu, name))
        return types.SimpleNamespace(ptr=len(self._kernels))

    def cuLaunchKernel(self, func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        emu, name = self._kernels[func.value - 1]
        emu.launch_raw(name, (gx, gy, gz), (bx, by, bz), smem, params)
        return 0


class HostKernel:
    """Kernel ``name`` of ``emu`` as CuPy's loaded functions are used: called
    as a RawKernel (``fn(grid, block, args, shared_mem=)``), and with a
    ``ptr`` that ``driver`` launches through ``RawLaunch``."""

    def __init__(self, emu: Emulator, name: str, driver: HostDriver):
        self.emu, self.name = emu, name
        self.ptr = driver.function(name, emu).ptr

    def __call__(self, grid, block, args, shared_mem=0):
        self.emu.launch(self.name, grid, block, shared_mem, list(args))
