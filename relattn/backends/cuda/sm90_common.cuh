// Helpers of the Hopper (sm_90a) kernels relattn_wg, relattn_ws and
// relattn_wgt: the async-proxy fence, wgmma's fence / commit / wait, the
// shared-memory matrix descriptor, the 16-bit output store of a warpgroup,
// and the mbarrier, TMA (cp.async.bulk.tensor), named-barrier and setmaxnreg
// wrappers. The wgmma instructions themselves are the generated structs
// RaWg<DT, N> / RaWt<N> (_build.wgmma_wrappers), which come before this file.
// Needs common.cuh before it.

__device__ __forceinline__ void ra_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void ra_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void ra_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void ra_wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }

// Shared-memory matrix descriptor, no swizzle: start address, leading and
// stride byte offsets (all in 16-byte units).
// SW: 0 = no swizzle, 1 = 128-byte swizzle (bits 62-63 of the descriptor).
__device__ __forceinline__ u64 ra_desc(u32 addr, u32 lbo, u32 sbo, int sw) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32)
           | (sw ? (1ull << 62) : 0ull);
}

// A warpgroup's finished output rows (this thread's rows g and g + 8 of its
// warp, wgmma accumulator layout: o[4 d + 2 rr + e] is column 8 d + 2 t + e of
// row rr) divided by their softmax sums and stored as DT; rows past Sq and
// columns past D are skipped. ob: this (batch, head)'s output; inv_l: the
// inverse row sums (ra_row_inv). Returns bit rr set where this thread stored
// a non-finite value of row rr (for ra_fix_rows_if, after the kernel's loop):
// the stored bits are tested, as ra_row_nonfinite16 tests them again later,
// three integer operations per pair (a half's exponent field plus one sets
// its sign bit where the field is all ones, +-inf or NaN; no carry crosses
// into the other half).
template <int DT, int HD>
__device__ __forceinline__ int ra_wg_store_rows(u16* ob, const float* o, const float* inv_l, const int* rows,
                                                int Sq, int D, int t) {
    constexpr u32 EXP = DT == 1 ? 0x7f807f80u : 0x7c007c00u, ONE = DT == 1 ? 0x00800080u : 0x04000400u;
    u32 seen[2] = {0u, 0u};
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const float inv = inv_l[rr];
        const int r = rows[rr];
        if (r < Sq) {
#pragma unroll
            for (int d = 0; d < HD / 8; ++d) {
                const int col = d * 8 + 2 * t;
                if (col < D) {
                    const u32 w = ra_pack<DT>(o[4 * d + 2 * rr] * inv, o[4 * d + 2 * rr + 1] * inv);
                    seen[rr] |= (w & EXP) + ONE;
                    *reinterpret_cast<u32*>(ob + (long long)r * D + col) = w;
                }
            }
        }
    }
    return ((seen[0] & 0x80008000u) ? 1 : 0) | ((seen[1] & 0x80008000u) ? 2 : 0);
}

// Each row's log-sum-exp in the log2 domain, lse2 = m + log2(l) from the
// online softmax's running maximum and this thread's part of the row sum
// (the four lanes of a row add theirs), -inf for a row whose logits are all
// -inf: what the fused backward's row pass computes, kept by a forward that
// is asked for it (lb: this (batch, head)'s Sq values; lane t == 0 stores).
__device__ __forceinline__ void ra_store_lse2(float* lb, const float* m_run, const float* l_run, const int* rows,
                                              int Sq, int t) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float l = l_run[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (t == 0 && rows[rr] < Sq) lb[rows[rr]] = (m_run[rr] == -RA_INF) ? -RA_INF : m_run[rr] + __log2f(l);
    }
}

// ---- tiles by cp.async (relattn_wg, the Hopper backward)
// Copy rows [row0, row0 + ROWS) x HD of a 16-bit matrix into the core-matrix
// layout at dst (chunk i of the tile lands at dst + 16 i; rows >= nrows and
// columns >= D are zero-filled).
// With HD == 64 the tile uses the 128-byte swizzle instead: row r (128 bytes)
// at r * 128, its chunk c at position c ^ (r % 8); the tile base is
// 1024-byte aligned. HD == 80 splits the tile: columns 0-63 as that swizzled
// tile (ROWS * 128 bytes), then columns 64-79 in the no-swizzle layout (ROWS
// * 32 bytes: core matrices 128 bytes apart along K, row groups 256 apart).
template <int HD, int ROWS, int NT>
__device__ __forceinline__ void ra_load_tile(u32 dst, const u16* base, long long rstride, int row0, int nrows, int D, int tid) {
    constexpr int CH = HD / 8;
#pragma unroll
    for (int i = tid; i < ROWS * CH; i += NT) {
        int r, c;
        u32 off;
        if (HD == 64) {
            r = i >> 3;
            c = i & 7;
            off = (u32)r * 128u + (u32)((c ^ (r & 7)) << 4);
        } else if (HD == 80) {
            r = i / CH;
            c = i - r * CH;
            off = (c < 8) ? (u32)r * 128u + (u32)((c ^ (r & 7)) << 4)
                          : (u32)ROWS * 128u + (u32)((((r >> 3) * 2 + (c - 8)) << 7) + ((r & 7) << 4));
        } else {
            const int r8 = i & 7, rg = (i >> 3) / CH;
            c = (i >> 3) % CH;
            r = rg * 8 + r8;
            off = (u32)i * 16u;
        }
        const int row = row0 + r, col = c * 8;
        const bool ok = (row < nrows) && (col < D);
        const u16* src = ok ? base + (long long)row * rstride + col : base;
        ra_cp_async16(dst + off, src, ok ? 16 : 0);
    }
}

// ---- mbarriers, TMA, named barriers, register reallocation
// A CUtensorMap (families/ws.py's tensor_map), passed to a kernel by value.
struct __align__(64) RaTmap { u64 w[16]; };

__device__ __forceinline__ void ra_mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void ra_mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void ra_mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void ra_mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}
// TMA: box at coordinates (c0 column, c1 row, c2, c3) of map -> dst; bar counts the bytes
__device__ __forceinline__ void ra_tma_load(u32 dst, const RaTmap* map, u32 bar, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
        :: "r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
}
// 16 zero bytes at shared address a
__device__ __forceinline__ void ra_st_shared_zero16(u32 a) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" :: "r"(a), "r"(0u) : "memory");
}
// makes the mbarriers' initialisation visible before their first use
__device__ __forceinline__ void ra_fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// x, which the compiler cannot see through (it keeps it in a register instead of re-deriving it)
__device__ __forceinline__ int ra_opaque(int x) {
    int r;
    asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}
__device__ __forceinline__ void ra_bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void ra_bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory"); }
template <int R> __device__ __forceinline__ void ra_regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(R)); }
template <int R> __device__ __forceinline__ void ra_regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(R)); }
