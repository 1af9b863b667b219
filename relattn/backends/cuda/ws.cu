// relattn_ws<DT, HD, NC, BN, REL, ST, PP, RG, MB, LSE>: the Hopper (sm_90a)
// warp-specialised attention with the relative-position terms, float16 /
// bfloat16, head_dim 64 or 80: TMA loads, wgmma products, persistent blocks.
// Needs common.cuh, the wgmma wrappers and sm90_common.cuh before it.
//
// NC consumer warpgroups (64 query rows each, BLOCK_M = 64 * NC) and one
// producer warp. A single producer thread moves Q once and every K / V tile
// with the tensor-memory accelerator (TMA: cp.async.bulk.tensor, 128-byte
// swizzle, rows past the end zero-filled) into an ST-stage ring guarded by
// mbarriers (full: the tile's bytes landed; empty: every consumer warp is done
// with it). The consumers never issue a load. Per key tile n they issue
//     S(n) = Q K(n)^T   and   O += P(n-1) V(n-1)       (wgmma, two groups)
// then run the bias and the online softmax of S(n) while P V is still on the
// tensor cores, and rescale O once it is done. PP = 1 makes the consumers'
// issue of products a round robin (named barriers 1..NC). RG = 0: the
// producer is one extra warp and every thread keeps the launch's registers
// (at most 168 for NC = 2: 3 warps share one scheduler's register file);
// RG > 0: the producer is a warpgroup that gives its registers up (setmaxnreg)
// so that each consumer thread may hold RG (NC = 2: 240, NC = 3: 160).
// MB: blocks per SM the registers are capped for (__launch_bounds__); the
// persistent grid is MB blocks per SM, so one block's prologue (Q, the
// fused terms) and epilogue overlap another's products (small key grids).
// REL: the bias mode (ws_bias below). LSE: also store each row's log-sum-exp
// (log2 domain) to lse2 for the fused backward; a plain call's instantiation
// (LSE = false) has no trace of it.
// Tensor maps (built by families/ws.py's tensor_map): dims (columns, rows,
// heads, batch) of q, k, v; tq / tk / tv: box 64 columns x BLOCK_M (q) or BN
// (k, v) rows, 128-byte swizzle. HD == 80 (SAM-H) adds tq2 / tk2 / tv2: box 8
// columns, no swizzle, loaded at columns 64 and 72, so a tile is its 64-column
// swizzled part (ROWS x 128 bytes) followed by two ROWS x 16-byte column blocks.
// Persistent: block i computes the row tiles i, i + gridDim.x, ... of the ntot
// (batch, head, row block) tiles (a grid of ntot blocks: one each). The K/V
// ring runs on across a block's tiles, so the producer loads the next tile's
// first K/V stages while the consumers finish the last one, and its Q once
// every consumer's last S of a tile is done (a fourth mbarrier, released
// before that tile's softmax, last P V and store); fused tables are loaded
// once per block.
// Code: RaWsCfg holds the configuration's constants; the kernel initialises
// the mbarriers, then its producer runs ra_ws_producer and its consumers
// ra_ws_consumer_setup once per block and, per row tile, the rows' setup, the
// fused terms (FT), S(0) and the key-tile loop and the store.

// The bias modes (REL), as families/ws.py's Bias numbers them.
namespace ws_bias {
constexpr int NONE = 0;           // no relative terms
constexpr int KEY_ROWS = 1;       // terms given, k_w == 64 (or one 80-key row per tile): rel_w in
                                  // registers, rel_h one value per row per key row
constexpr int FUSED = 4;          // as KEY_ROWS with the terms computed in the kernel from the
                                  // 16-bit tables (at most 128 rows each; k_h <= 64) and the index
                                  // tables of get_rel_pos (idx_h (q_h, k_h), idx_w (q_w, 64))
constexpr int WINDOW = 5;         // as KEY_ROWS for small key grids (16-slot key rows)
constexpr int FUSED_WINDOW = 6;   // as FUSED for small key grids (16-slot key rows, tables of at
                                  // most 32 rows)
constexpr int FUSED_H72 = 7;      // as FUSED where the tables take two passes (SAM-H) but each
                                  // warpgroup's rel_h needs at most 72 table rows: those in one pass
}

// relattn_ws's fused terms: G = Q T^T over table rows row0 .. row0 + N - 1
// (row0 a multiple of 8; T: TR rows, 64 columns 128-byte swizzled, SPL: a
// 16-column part after them) into this warpgroup's float32 scratch rows
// gRow (the thread's rows g and g + 8), between named barriers on bar (WAIT:
// also before writing, so that the previous pass's reads are done)
// (issue only: the caller fences before and commits / waits after)
template <int DT, int N, bool SPL>
__device__ __forceinline__ void ra_ws_g_issue(float* acc, u32 table, int row0, int TR, u64 dQ, u64 dQB) {
    const u64 dT = ra_desc(table + (u32)row0 * 128u, 16u, 1024u, 1);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) RaWg<DT, N>::ss(acc, dQ + ks * 2, dT + ks * 2, ks > 0 ? 1 : 0);
    if (SPL) RaWg<DT, N>::ss(acc, dQB, ra_desc(table + (u32)TR * 128u + (u32)row0 * 16u, (u32)TR * 16u, 128u, 0), 1);
}
// (the finished products into the scratch rows, then a barrier)
// (SW: __syncwarp() instead: a scratch row is written and read only by the
// quad of threads that holds its accumulator row)
template <int N, bool WAIT, bool SW = false>
__device__ __forceinline__ void ra_ws_g_store(const float* acc, float* const* gRow, int t, int bar) {
    if (WAIT) {
        if (SW) __syncwarp();
        else ra_bar_sync(bar, 128);
    }
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
            *reinterpret_cast<float2*>(gRow[rr] + j * 8 + 2 * t) = make_float2(acc[4 * j + 2 * rr], acc[4 * j + 2 * rr + 1]);
    if (SW) __syncwarp();
    else ra_bar_sync(bar, 128);
}
template <int DT, int N, bool SPL, bool WAIT>
__device__ __forceinline__ void ra_ws_gemm_rows(u32 table, int row0, int TR, u64 dQ, u64 dQB, float* const* gRow,
                                                int t, int bar) {
    float acc[N / 2];
    ra_wg_fence();
    ra_ws_g_issue<DT, N, SPL>(acc, table, row0, TR, dQ, dQB);
    ra_wg_commit();
    ra_wg_wait<0>();
    ra_ws_g_store<N, WAIT>(acc, gRow, t, bar);
}

// ---- the kernel's compile-time configuration, shared by its parts
template <int DT_, int HD_, int NC_, int BN_, int REL_, int ST_, int PP_, int RG_>
struct RaWsCfg {
    static constexpr int DT = DT_, HD = HD_, NC = NC_, BN = BN_, REL = REL_, ST = ST_, PP = PP_, RG = RG_;
    static constexpr int BM = 64 * NC;
    static constexpr int NS = BN / 8;
    static constexpr bool SPL = (HD == 80);                // columns 64-79 as a second, unswizzled part
    static constexpr u32 QBYTES = BM * HD * 2;
    static constexpr u32 TBYTES = BN * HD * 2;
    // WIN (WINDOW / FUSED_WINDOW, small key grids: k_w <= 16, k_h * 16 slots):
    // every key row occupies KP = 16 slots of a tile (TMA boxes of k_w rows;
    // slots past k_w stay zero and get rel_w = -inf), so a slot's kx is fixed
    // per register as with k_w == 64 (KP = 64, where slots are keys)
    static constexpr bool WIN = (REL == ws_bias::WINDOW || REL == ws_bias::FUSED_WINDOW);
    // BN 80 (KEY_ROWS, head_dim 64): key tiles of one 80-key row (k_w = 80, SAM
    // at 1280 px), rel_w of the thread's 20 columns per row in registers
    static constexpr int KP = WIN ? 16 : (BN == 80 ? 80 : 64);   // key slots per key row
    static_assert(BN != 80 || (HD == 64 && (REL == ws_bias::NONE || REL == ws_bias::KEY_ROWS)),
                  "80-key rows: head_dim 64, terms given");
    // FT: the terms computed here; RB: rel_w in registers, rel_h per key row
    static constexpr bool FT = (REL == ws_bias::FUSED || REL == ws_bias::FUSED_WINDOW || REL == ws_bias::FUSED_H72);
    static constexpr bool RB = (REL == ws_bias::KEY_ROWS || REL == ws_bias::WINDOW || FT);
    // HB (FUSED_H72): as FUSED in two passes, but rel_h in one pass of 72 table
    // rows from this warpgroup's first row's smallest index (rounded down to
    // 8); the host takes it where every warpgroup's rows need at most those 72
    static constexpr bool HB = (REL == ws_bias::FUSED_H72);
    // G1 (FUSED_WINDOW): both G products are issued with S(0) in one commit
    // group, so a row tile pays one round trip to the tensor cores before its
    // first softmax instead of three
    static constexpr bool G1 = (REL == ws_bias::FUSED_WINDOW);
    static constexpr int NU = RB ? BN / KP : 1;            // key rows per tile
    static constexpr int NW = KP / 4;                      // rel_w values per row and thread
    static constexpr int KHM = WIN ? 16 : 64;              // k_h at most (FT's rel_h gather)
    // FT: G = Q T^T in NH passes of GN table rows (one pass when the scratch
    // of 64 x (128 + 8) floats per consumer fits, else two of 64 + 8; WIN: one
    // of 32, its tables have at most 31 rows); GS: the scratch's row stride in
    // floats (NH: the same rule as families/ws.py's table_passes)
    static constexpr int NH = HB ? 2 : (WIN || BM * HD * 2 + 2 * ST * BN * HD * 2 + 1024 + 2 * 128 * HD * 2
                                        + NC * 64 * 136 * 4 <= 227 * 1024 - 1024) ? 1 : 2;
    static constexpr int HN = 72;                          // HB: rel_h's table rows
    static constexpr int GN = WIN ? 32 : 128 / NH;
    static constexpr int TR = WIN ? 32 : 128;              // table rows copied
    static constexpr u32 TABBYTES = TR * HD * 2;           // FT: one table
    // (WIN: 36, so that the 8 rows a warp reads per key row hit 8 banks, and
    // three blocks of (1, 64, 3) fit an SM)
    static constexpr int GS = WIN ? 36 : HB ? HN + 8 : GN + 8;
};

// ---- producer: one thread moves Q and every K / V tile of this block's row
// tiles by TMA into the ring, in the order the consumers free the buffers
// (scalars by reference, as the kernel's lambdas captured them: taken by
// value, they changed the kernel's generated code)
template <class C>
__device__ __forceinline__ void ra_ws_producer(const RaTmap& tq, const RaTmap& tk, const RaTmap& tv,
                                               const RaTmap& tq2, const RaTmap& tk2, const RaTmap& tv2,
                                               const u32& sQ, const u32& sKV, const u32& bfull, const u32& bempty,
                                               const u32& bq, const u32& bqe, const int& H, const int& kw,
                                               const int& mtiles, const int& ntiles, const int& ntot) {
    constexpr int ST = C::ST, BN = C::BN, BM = C::BM, NU = C::NU, KP = C::KP, HD = C::HD;
    constexpr u32 TBYTES = C::TBYTES, QBYTES = C::QBYTES;
    constexpr bool SPL = C::SPL, WIN = C::WIN;
    int it = 0;   // K/V tiles issued by this block (the ring's position)
    int tc = 0;
    for (int tile = blockIdx.x; tile < ntot; tile += gridDim.x, ++tc) {
        const int mt = tile % mtiles, bh = tile / mtiles;
        const int b = bh / H, h = bh - b * H, m0 = mt * BM;
        auto load_kv = [&](int n) {
            const int gi = it + n, s = gi % ST;
            if (gi >= ST) ra_mbar_wait(bempty + 8u * s, ((gi / ST) - 1) & 1);
            const u32 dst = sKV + (u32)s * 2u * TBYTES;
            if (WIN) {   // NU key rows of k_w keys (boxes of k_w rows), 16 slots each
                ra_mbar_expect(bfull + 8u * s, 2u * NU * (u32)kw * HD * 2u);
#pragma unroll
                for (int u = 0; u < NU; ++u) {
                    const int r0 = (n * NU + u) * kw;
                    const u32 du = dst + (u32)u * KP * 128u;
                    ra_tma_load(du, &tk, bfull + 8u * s, 0, r0, h, b);
                    ra_tma_load(du + TBYTES, &tv, bfull + 8u * s, 0, r0, h, b);
                    if (SPL) {
                        const u32 d2 = dst + BN * 128u + (u32)u * KP * 16u;
                        ra_tma_load(d2, &tk2, bfull + 8u * s, 64, r0, h, b);
                        ra_tma_load(d2 + BN * 16u, &tk2, bfull + 8u * s, 72, r0, h, b);
                        ra_tma_load(d2 + TBYTES, &tv2, bfull + 8u * s, 64, r0, h, b);
                        ra_tma_load(d2 + TBYTES + BN * 16u, &tv2, bfull + 8u * s, 72, r0, h, b);
                    }
                }
                return;
            }
            ra_mbar_expect(bfull + 8u * s, 2u * TBYTES);
            ra_tma_load(dst, &tk, bfull + 8u * s, 0, n * BN, h, b);
            ra_tma_load(dst + TBYTES, &tv, bfull + 8u * s, 0, n * BN, h, b);
            if (SPL) {
                ra_tma_load(dst + BN * 128u, &tk2, bfull + 8u * s, 64, n * BN, h, b);
                ra_tma_load(dst + BN * 144u, &tk2, bfull + 8u * s, 72, n * BN, h, b);
                ra_tma_load(dst + TBYTES + BN * 128u, &tv2, bfull + 8u * s, 64, n * BN, h, b);
                ra_tma_load(dst + TBYTES + BN * 144u, &tv2, bfull + 8u * s, 72, n * BN, h, b);
            }
        };
        auto load_q = [&]() {
            ra_mbar_expect(bq, QBYTES);
            ra_tma_load(sQ, &tq, bq, 0, m0, h, b);
            if (SPL) {   // columns 64-71 and 72-79: ROWS x 16 bytes each
                ra_tma_load(sQ + BM * 128u, &tq2, bq, 64, m0, h, b);
                ra_tma_load(sQ + BM * 144u, &tq2, bq, 72, m0, h, b);
            }
        };
        // later tiles, in the order the consumers free the buffers:
        // the stages the previous tile released before its last S
        // (or never used), Q once that last S is done, then the rest
        const int pre = tc ? min(ntiles, max(ST - 2, ST - ntiles)) : 0;
        for (int n = 0; n < pre; ++n) load_kv(n);
        if (tc) ra_mbar_wait(bqe, (tc - 1) & 1);
        load_q();
        for (int n = pre; n < ntiles; ++n) load_kv(n);
        it += ntiles;
    }
}

// ---- consumers, once per block: WIN zeroes the slots no TMA box writes, FT
// copies the two tables; then a barrier of every consumer thread
template <class C>
__device__ __forceinline__ void ra_ws_consumer_setup(u32 sKV, u32 sT, const u16* __restrict__ th,
                                                     const u16* __restrict__ tw, int Lh, int Lw, int D, int kw,
                                                     int tid) {
    constexpr int ST = C::ST, BN = C::BN, NC = C::NC, NU = C::NU, KP = C::KP, HD = C::HD, TR = C::TR;
    constexpr u32 TBYTES = C::TBYTES, TABBYTES = C::TABBYTES;
    constexpr bool SPL = C::SPL;
    if (C::WIN) {
        // the slots no TMA box writes (k_w .. 15 of each key row) are zeroed
        // once per block, while the producer's first loads are in flight (they
        // write other bytes): each slot's 128-byte swizzled row (a row keeps
        // its 128-byte line under the swizzle) and, SPL, its 16 bytes in
        // each of the two 8-column boxes
        constexpr int CPR = SPL ? 10 : 8;           // 16-byte chunks per slot
        const int pad = KP - kw;
        for (int i = tid; i < 2 * ST * NU * pad * CPR; i += 128 * NC) {
            const int ch = i % CPR, r = kw + (i / CPR) % pad, u = (i / (CPR * pad)) % NU;
            const u32 base = sKV + (u32)(i / (CPR * pad * NU)) * TBYTES;   // K / V of a stage
            const u32 slot = (u32)(u * KP + r);
            const u32 a = ch < 8 ? base + slot * 128u + (u32)ch * 16u : base + BN * 128u + (u32)(ch - 8) * BN * 16u + slot * 16u;
            ra_st_shared_zero16(a);
        }
    }
    if (C::FT) {   // the two tables, once per block
        constexpr int CH = HD / 8;
        for (int i = tid; i < 2 * TR * CH; i += 128 * NC) {
            const int tb = i / (TR * CH), r = (i / CH) % TR, ch = i % CH;
            const u16* src = tb ? tw : th;
            const bool ok = r < (tb ? Lw : Lh) && ch * 8 < D;
            const u32 off = (ch < 8) ? (u32)r * 128u + (u32)((ch ^ (r & 7)) << 4)
                                     : TR * 128u + (u32)(ch - 8) * TR * 16u + (u32)r * 16u;
            ra_cp_async16(sT + (u32)tb * TABBYTES + off, ok ? src + (long long)r * D + ch * 8 : src, ok ? 16 : 0);
        }
        ra_cp_commit();
        ra_cp_wait<0>();
    }
    if (C::WIN || C::FT) {
        ra_fence_proxy_async();
        ra_bar_sync(NC + 1, 128 * NC);   // the zeros and the tables in place for every consumer's products
    }
}

// ---- FT: rel_h (log2 domain) of each row into its scratch row, read per key tile
// (after every read of the scratch: __syncwarp for the G1 path's reads, a
// warpgroup barrier for the others)
template <class C>
__device__ __forceinline__ void ra_ws_put_rel_h(float* const* gRow, const float (&hv)[2][C::KHM / 4], int t, int c) {
    if (C::G1) __syncwarp();
    else ra_bar_sync(C::NC + 2 + c, 128);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
#pragma unroll
        for (int m = 0; m < C::KHM / 4; ++m) gRow[rr][t + 4 * m] = hv[rr][m];
    __syncwarp();
}

template <int DT, int HD, int NC, int BN, int REL, int ST, int PP, int RG, int MB, bool LSE>
__global__ void __launch_bounds__(128 * NC + (RG ? 128 : 32), MB)
relattn_ws(const __grid_constant__ RaTmap tq, const __grid_constant__ RaTmap tk, const __grid_constant__ RaTmap tv,
           const __grid_constant__ RaTmap tq2, const __grid_constant__ RaTmap tk2, const __grid_constant__ RaTmap tv2,
           const float* __restrict__ rel_h, const float* __restrict__ rel_w,
           const u16* __restrict__ th, const u16* __restrict__ tw,
           const int* __restrict__ idx_h, const int* __restrict__ idx_w, int Lh, int Lw, int qw,
           u16* __restrict__ out, int H, int Sq, int Sk, int D, int kh, int kw, float scale_log2, int ntot,
           const u16* __restrict__ qr, const u16* __restrict__ kr, const u16* __restrict__ vr,
           long long qsb, long long qsh, long long qss, long long ksb, long long ksh, long long kss,
           long long vsb, long long vsh, long long vss, float* __restrict__ lse2)
{
    using C = RaWsCfg<DT, HD, NC, BN, REL, ST, PP, RG>;
    constexpr int BM = C::BM, NS = C::NS, KP = C::KP, NU = C::NU, NW = C::NW, KHM = C::KHM, GN = C::GN;
    constexpr int NH = C::NH, HN = C::HN, TR = C::TR, GS = C::GS;
    constexpr u32 QBYTES = C::QBYTES, TBYTES = C::TBYTES, TABBYTES = C::TABBYTES;
    constexpr bool SPL = C::SPL, WIN = C::WIN, FT = C::FT, RB = C::RB, HB = C::HB, G1 = C::G1;
    __shared__ __align__(8) u64 bars[2 * ST + 2];   // full[ST], empty[ST], Q full, Q empty
    extern __shared__ __align__(128) unsigned char ra_smem_raw[];
    const u32 sraw = ra_smem_addr(ra_smem_raw);
    const u32 sbase = (sraw + 1023u) & ~1023u;
    const u32 sQ = sbase, sKV = sbase + QBYTES;     // stage s: K at sKV + 2 s TBYTES, V after it
    // FT: the two tables (128 rows x 64 columns, 16-bit, swizzled) after the
    // stages, then a 64 x GS float32 scratch per consumer warpgroup
    const u32 sT = sKV + 2u * ST * TBYTES;
    const u32 bfull = ra_smem_addr(bars), bempty = bfull + 8u * ST, bq = bfull + 16u * ST, bqe = bq + 8u;

    const int tid = threadIdx.x;
    const int mtiles = (Sq + BM - 1) / BM;
    const int ntiles = WIN ? (kh * KP + BN - 1) / BN : (Sk + BN - 1) / BN;

    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < ST; ++s) {
            ra_mbar_init(bfull + 8u * s, 1);
            ra_mbar_init(bempty + 8u * s, NC * 4);
        }
        ra_mbar_init(bq, 1);
        ra_mbar_init(bqe, NC * 4);
        ra_fence_mbar_init();
    }
    __syncthreads();

    if (tid >= 128 * NC) {
        // ---- producer: the block's last warp (RG: warpgroup), one thread
        if (RG) ra_regs_dec<(NC == 2) ? 24 : 32>();
        if (tid == 128 * NC)
            ra_ws_producer<C>(tq, tk, tv, tq2, tk2, tv2, sQ, sKV, bfull, bempty, bq, bqe, H, kw, mtiles, ntiles, ntot);
        return;
    }

    // ---- consumers
    if (RG) ra_regs_inc<RG>();
    const int c = tid >> 7, wt = tid & 127;
    const int wq = wt >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int lrow0 = c * 64 + wq * 16 + g;

    // per row tile: the rows, their rel_h rows, rel_w (log2 domain), the output
    // and the softmax statistics
    int rows[2];
    const float* rh_row[2];
    float rwc[2][RB ? NW : 1];
    float o[HD / 2];
    float m_run[2], l_run[2];
    u32 p[BN / 16][4];
    const u64 dQ = ra_desc(sQ + (u32)c * 64u * 128u, 16u, 1024u, 1);
    // SPL: this warpgroup's rows of the 16-column part (no swizzle: core
    // matrices of 8 rows x 16 bytes, the two 8-column boxes BM * 16 bytes
    // apart along K, 8-row groups 128 bytes apart)
    const u64 dQB = ra_desc(sQ + BM * 128u + (u32)c * 64u * 16u, BM * 16u, 128u, 0);

    // FT: rel_w[i, kx] = q_i . Tw[idx_w[x_i, kx]] and rel_h likewise, as
    // G = Q T^T over the table rows (wgmma, float32) gathered through the
    // index tables; rel_w lands in registers, rel_h (scaled) in the scratch
    float* sG = reinterpret_cast<float*>(ra_smem_raw + (sbase - sraw) + QBYTES + 2 * ST * TBYTES + 2 * TABBYTES)
                + c * 64 * GS;
    float* gRow[2] = {sG + (wq * 16 + g) * GS, sG + (wq * 16 + g + 8) * GS};
    ra_ws_consumer_setup<C>(sKV, sT, th, tw, Lh, Lw, D, kw, tid);

    // G = Q T^T over GN table rows per pass (NH passes: the whole table, or
    // halves when shared memory is short), each value gathered in the pass
    // that holds its table row
    // (rows row0 .. row0 + N - 1 of the table, row0 a multiple of 8: ra_ws_gemm_rows)
    auto gemm_part = [&](u32 table, int row0) {
        ra_ws_gemm_rows<DT, GN, SPL, (NH > 1)>(table, row0, TR, dQ, dQB, gRow, t, NC + 2 + c);
    };

    // bias, mask and online softmax of S(n) (log2 domain); alpha: the output's factor
    // rel_h of the key rows of tile n (log2 domain), read before the wait for
    // S(n) so that the loads overlap the products (the asm waits are barriers
    // to the compiler: it would not move them up itself)
    auto rel_h_tile = [&](int n, float (&rh1)[2][NU]) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int u = 0; u < NU; ++u) {
                const int ky = n * BN / KP + u;
                if (WIN && ky >= kh) rh1[rr][u] = -RA_INF;   // key rows past k_h: empty slots
                else rh1[rr][u] = FT ? gRow[rr][min(ky, kh - 1)]
                                : RB ? __ldg(rh_row[rr] + min(ky, kh - 1)) * RA_LOG2E : 0.f;
            }
    };
    auto softmax_tile = [&](float* s, int n, float* alpha, const float (&rh1)[2][NU]) {
        const int j0 = n * BN;
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float bias = 0.f;
                    if (RB) bias = rwc[rr][RB ? 2 * (j % (KP / 8)) + e : 0];
                    s[4 * j + 2 * rr + e] = fmaf(s[4 * j + 2 * rr + e], scale_log2, bias);
                }
        if (!WIN && j0 + BN > Sk) {
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (j0 + j * 8 + 2 * t + e >= Sk) {
                        s[4 * j + e] = -RA_INF;
                        s[4 * j + 2 + e] = -RA_INF;
                    }
        }
        // rel_h per key row of the tile: added to the maximum and the shift
        float off[2 * NU];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int u = 0; u < NU; ++u) off[rr * NU + u] = RB ? rh1[rr][u] : 0.f;
        ra_online_softmax<NS, NU>(s, off, m_run, l_run, alpha);
    };
    auto pack_p = [&](const float* s) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            p[kk][0] = ra_pack<DT>(s[8 * kk + 0], s[8 * kk + 1]);
            p[kk][1] = ra_pack<DT>(s[8 * kk + 2], s[8 * kk + 3]);
            p[kk][2] = ra_pack<DT>(s[8 * kk + 4], s[8 * kk + 5]);
            p[kk][3] = ra_pack<DT>(s[8 * kk + 6], s[8 * kk + 7]);
        }
    };
    // gi: the K/V tile's position in the block's ring sequence
    auto issue_s = [&](float* s, int gi) {
        const u64 dK = ra_desc(sKV + (u32)(gi % ST) * 2u * TBYTES, 16u, 1024u, 1);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) RaWg<DT, BN>::ss(s, dQ + ks * 2, dK + ks * 2, ks > 0 ? 1 : 0);
        if (SPL) RaWg<DT, BN>::ss(s, dQB, ra_desc(sKV + (u32)(gi % ST) * 2u * TBYTES + BN * 128u, BN * 16u, 128u, 0), 1);
    };
    auto issue_pv = [&](int gi) {
        const u32 vb = sKV + (u32)(gi % ST) * 2u * TBYTES + TBYTES;
        const u64 dV = ra_desc(vb, 8192u, 1024u, 1);
        // SPL: the 16-column part read N-major: 8-key groups 128 bytes apart,
        // the two 8-column boxes BN * 16 bytes apart
        const u64 dVB = ra_desc(vb + BN * 128u, 128u, BN * 16u, 0);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            RaWg<DT, 64>::rs(o, p[kk], dV + kk * 128, 1);
            if (SPL) RaWg<DT, 16>::rs(o + 32, p[kk], dVB + kk * 16, 1);
        }
    };
    auto release = [&](u32 bar) {   // one arrival per consumer warp
        __syncwarp();
        if (lane == 0) ra_mbar_arrive(bar);
    };
    const int turn_bar = ra_opaque(1 + c);   // held in a register (ptxas would re-derive it from %tid in the key loop)
    auto turn_wait = [&]() { if (PP) ra_bar_sync(turn_bar, 128 * 2); };
    auto turn_pass = [&](bool final_turn) {
        if (PP && !(final_turn && c == NC - 1)) ra_bar_arrive(1 + (c + 1) % NC, 128 * 2);
    };

    int it = 0;   // K/V tiles consumed by this block
    int tc = 0;
    bool flagged = false;   // a row of this thread stored non-finite
    for (int tile = blockIdx.x; tile < ntot; tile += gridDim.x, ++tc) {
        const int mt = tile % mtiles, bh = tile / mtiles, m0 = mt * BM;
        rows[0] = m0 + lrow0;
        rows[1] = m0 + lrow0 + 8;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = min(rows[rr], Sq - 1);
            rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
            if (REL == ws_bias::KEY_ROWS || REL == ws_bias::WINDOW) {   // rel_w of this thread's key columns; WIN: -inf past k_w
                const float* wrow = rel_w + ((long long)bh * Sq + r) * kw;
#pragma unroll
                for (int j = 0; j < KP / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int kx = j * 8 + 2 * t + e;
                        rwc[rr][RB ? 2 * j + e : 0] = (!WIN || kx < kw) ? wrow[kx] * RA_LOG2E : -RA_INF;
                    }
            }
        }
#pragma unroll
        for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            m_run[rr] = -RA_INF;
            l_run[rr] = 0.f;
        }
        if (PP && c == NC - 1) ra_bar_arrive(1, 128 * 2);   // consumer 0 goes first

        // FT: the table rows each value needs (index tables read while Q lands;
        // where the global kernels' q and key grids are equal, SAM's index
        // q - k + k_size - 1 is computed instead, measured faster there; the
        // windows keep the loads, measured faster with them)
        // (WIN: -1 for the slots past k_w, whose rel_w is -inf)
        int cw[2][NW], chh[2][KHM / 4];
        if (FT) {
            const bool same = !WIN && qw == kw && Sq == kh * kw;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const int r = min(rows[rr], Sq - 1);
                const int qy = r / qw, qx = r - qy * qw;
#pragma unroll
                for (int j = 0; j < NW; ++j) {
                    const int kx = (j >> 1) * 8 + 2 * t + (j & 1);
                    cw[rr][j] = (WIN && kx >= kw) ? -1 : same ? qx - kx + kw - 1 : __ldg(idx_w + qx * kw + kx);
                }
#pragma unroll
                for (int j = 0; j < KHM / 4; ++j) {
                    const int ky = t + 4 * j;
                    chh[rr][j] = ky >= kh ? -1 : same ? qy - ky + kh - 1 : __ldg(idx_h + qy * kh + ky);
                }
            }
            ra_mbar_wait(bq, tc & 1);
            float hv[2][KHM / 4];
            if (!G1) {   // (G1: the G products come with S(0) below)
#pragma unroll
                for (int part = 0; part < NH; ++part) {
                    gemm_part(sT + TABBYTES, part * GN);   // rel_w: this thread's 16 columns
#pragma unroll
                    for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                        for (int j = 0; j < NW; ++j) {
                            const int col = cw[rr][j];
                            if (WIN && col < 0) rwc[rr][RB ? j : 0] = -RA_INF;
                            else if (NH == 1 || col / GN == part) rwc[rr][RB ? j : 0] = gRow[rr][col % GN] * RA_LOG2E;
                        }
                }
                if (NH == 1) ra_bar_sync(NC + 2 + c, 128);   // every read of the rel_w scratch is done
                if (HB) {   // rel_h: the 72 table rows from hb
                    const int hb = __ldg(idx_h + (min(m0 + c * 64, Sq - 1) / qw) * kh + kh - 1) & ~7;
                    ra_ws_gemm_rows<DT, HN, SPL, true>(sT, hb, TR, dQ, dQB, gRow, t, NC + 2 + c);
#pragma unroll
                    for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                        for (int m = 0; m < KHM / 4; ++m) {
                            const int col = chh[rr][m];
                            hv[rr][m] = col >= 0 ? gRow[rr][col - hb] * RA_LOG2E : 0.f;
                        }
                } else {
#pragma unroll
                    for (int part = 0; part < NH; ++part) {
                        gemm_part(sT, part * GN);   // rel_h: key rows t, t + 4, ...
#pragma unroll
                        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                            for (int m = 0; m < KHM / 4; ++m) {
                                const int col = chh[rr][m];
                                if (part == 0) hv[rr][m] = 0.f;
                                if (col >= 0 && (NH == 1 || col / GN == part)) hv[rr][m] = gRow[rr][col % GN] * RA_LOG2E;
                            }
                    }
                }
                ra_ws_put_rel_h<C>(gRow, hv, t, c);
            }
        } else {
            ra_mbar_wait(bq, tc & 1);
        }

        // Tile 0: S(0) alone. Tile n > 0: S(n) = Q K(n)^T and O += P(n-1) V(n-1)
        // as two commit groups; the softmax of S(n) runs while P V is still on the
        // tensor cores (wait<1>), the output is rescaled after it (wait<0>). Then
        // the trailing P V. (No branch around a wgmma: ptxas would serialise them.)
        {
            float s[BN / 2], alpha[2];
            float gw[G1 ? GN / 2 : 1], gh[G1 ? GN / 2 : 1];
            ra_mbar_wait(bfull + 8u * (u32)(it % ST), (u32)((it / ST) & 1));
            turn_wait();
            ra_wg_fence();
            if (G1) {   // G = Q T^T for both tables (GN = 32 rows each) with S(0)
                ra_ws_g_issue<DT, GN, SPL>(gw, sT + TABBYTES, 0, TR, dQ, dQB);
                ra_ws_g_issue<DT, GN, SPL>(gh, sT, 0, TR, dQ, dQB);
            }
            issue_s(s, it);
            ra_wg_commit();
            turn_pass(false);
            if (!G1) {
                float rh1[2][NU];
                rel_h_tile(0, rh1);
                ra_wg_wait<0>();
                if (ntiles == 1) release(bqe);   // Q's last reader is done
                softmax_tile(s, 0, alpha, rh1);
            } else {
                ra_wg_wait<0>();
                if (ntiles == 1) release(bqe);   // Q's last reader is done
                // rel_w into registers, then rel_h into this row's scratch row
                ra_ws_g_store<GN, false, true>(gw, gRow, t, NC + 2 + c);
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                    for (int j = 0; j < NW; ++j) {
                        const int col = cw[rr][j];
                        rwc[rr][RB ? j : 0] = col < 0 ? -RA_INF : gRow[rr][col] * RA_LOG2E;
                    }
                float hv[2][KHM / 4];
                ra_ws_g_store<GN, true, true>(gh, gRow, t, NC + 2 + c);   // after every rel_w read
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                    for (int m = 0; m < KHM / 4; ++m) {
                        const int col = chh[rr][m];
                        hv[rr][m] = col >= 0 ? gRow[rr][col] * RA_LOG2E : 0.f;
                    }
                ra_ws_put_rel_h<C>(gRow, hv, t, c);
                float rh1[2][NU];
                rel_h_tile(0, rh1);
                softmax_tile(s, 0, alpha, rh1);
            }
            pack_p(s);
        }
        for (int n = 1; n < ntiles; ++n) {
            const int gi = it + n;
            float s[BN / 2], alpha[2];
            ra_mbar_wait(bfull + 8u * (u32)(gi % ST), (u32)((gi / ST) & 1));
            turn_wait();
            ra_wg_fence();
            issue_s(s, gi);
            ra_wg_commit();
            issue_pv(gi - 1);
            ra_wg_commit();
            turn_pass(false);
            float rh1[2][NU];
            rel_h_tile(n, rh1);
            ra_wg_wait<1>();
            if (n == ntiles - 1) release(bqe);   // S(n) done: Q's last reader (the producer may load the next Q)
            softmax_tile(s, n, alpha, rh1);
            ra_wg_wait<0>();
            // every wgmma of this warpgroup reading the previous stage is complete
            release(bempty + 8u * (u32)((gi - 1) % ST));
            ra_rescale<HD / 8, true>(o, alpha);
            pack_p(s);
        }
        turn_wait();
        ra_wg_fence();
        issue_pv(it + ntiles - 1);
        ra_wg_commit();
        turn_pass(true);
        // the rows' sums and their inverses while the last P V runs
        const float inv_l[2] = {ra_row_inv(l_run[0]), ra_row_inv(l_run[1])};
        ra_wg_wait<0>();
        // the last stage is free: the producer may refill it while this
        // tile's output is stored
        release(bempty + 8u * (u32)((it + ntiles - 1) % ST));
        it += ntiles;

        // ---- finalize and store (a non-finite row: flagged, recomputed after the loop)
        flagged |= ra_wg_store_rows<DT, HD>(out + (long long)bh * Sq * D, o, inv_l, rows, Sq, D, t) != 0;
        if constexpr (LSE) ra_store_lse2(lse2 + (long long)bh * Sq, m_run, l_run, rows, Sq, t);
    }

    // The rows this block's warps stored non-finite, recomputed exactly
    // (ra_exact_row_inline) once the loop is done, so that nothing of the slow path
    // is live in it: the warps that flagged one look at their rows of every
    // tile again (the stored output tells which) and fix those.
    if (__any_sync(0xffffffffu, flagged)) {
        for (int tile = blockIdx.x; tile < ntot; tile += gridDim.x) {
            const int mt = tile % mtiles, bh = tile / mtiles, m0 = mt * BM;
            const int b = bh / H, h = bh - b * H;
            u16* ob = out + (long long)bh * Sq * D;
            const bool terms = (REL != ws_bias::NONE) && !FT;
            const RaRowSrc<DT, u16, float> src{qr + b * qsb + h * qsh, kr + b * ksb + h * ksh, vr + b * vsb + h * vsh,
                                               qss, kss, vss,
                                               terms ? rel_h + (long long)bh * Sq * kh : nullptr,
                                               terms ? rel_w + (long long)bh * Sq * kw : nullptr,
                                               FT ? th : nullptr, FT ? tw : nullptr, idx_h, idx_w, qw, Sk, D, kh, kw};
#pragma unroll 1
            for (int rr = 0; rr < 2; ++rr) {
                const int r = m0 + lrow0 + 8 * rr;
                const bool bad = r < Sq && ra_row_nonfinite16<DT, HD>(ob + (long long)r * D, D, t);
                ra_fix_rows_if<4>(bad, r, [&](int row) {
                    ra_exact_row_inline<DT>(src, row, scale_log2, ob + (long long)row * D, lane);
                });
            }
        }
    }
}
