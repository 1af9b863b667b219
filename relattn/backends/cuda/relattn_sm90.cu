// relattn Hopper kernel (sm_90a): flash attention with 2-D decomposed relative
// position terms on warpgroup tensor-core instructions (wgmma).
//
//   logit[i, j] = scale * q_i . k_j + rel_h[i, j / k_w] + rel_w[i, j % k_w]
//   out_i       = sum_j softmax_j(logit[i, :]) v_j
//
// Built by NVRTC for -arch=sm_90a only (see _sm90.py), after the shared
// prelude relattn_common.cuh and the wgmma wrappers (struct RaWg<DT, N>)
// that _sm90.py generates.
//
// Kernel relattn_wg<DT, HD, NWG, BN, REL, ST>
//   DT  0 = float16, 1 = bfloat16 (16-bit data as raw words)
//   HD  head_dim rounded up to 16 (columns >= D read as zeros)
//   NWG warpgroups per block, each owning 64 query rows (BLOCK_M = 64 * NWG)
//   BN  keys per tile (64 or 128)
//   ST  K/V shared-memory stages (2: double buffering, 3: two tiles in flight)
//   REL 0 = no relative terms, 1 = k_w == 64 (rel_w kept in registers, rel_h
//       one value per row per 64 keys), 2 = generic (rel_h / rel_w rows of the
//       block's queries cached in shared memory), 3 = k_w == BN (one whole key
//       row per tile: rel_w in registers, rel_h one value per row per tile)
//
// Per key tile: S = Q K^T (wgmma, both operands in shared memory), the bias
// and the online softmax in registers (float32), O += P V (wgmma, P from
// registers, V in shared memory read N-major). K/V tiles are double-buffered
// with cp.async. Shared-memory operands use the no-swizzle canonical layout:
// 8 rows x 16 bytes "core matrices" of 128 contiguous bytes; chunk c (16
// bytes) of row r of a tile lives at byte ((r / 8) * (HD / 8) + c) * 128 +
// (r % 8) * 16, so K-adjacent core matrices are 128 bytes apart and row
// groups HD * 16 bytes apart (the same formula for Q, K and V).

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

// q, k, v: 16-bit data, element strides (batch, head, row); last-dim stride 1,
// row strides multiples of 8, 16-byte aligned base, D a multiple of 8.
// rel_h: (B*H, Sq, kh) float32, rel_w: (B*H, Sq, kw) float32, contiguous.
// out: (B*H, Sq, D) contiguous. lbo/sbo: descriptor strides (bytes) of the
// K-major operands (Q, K) and of the N-major V.
// A warpgroup's finished output rows (this thread's rows g and g + 8 of its
// warp, wgmma accumulator layout: o[4 d + 2 rr + e] is column 8 d + 2 t + e of
// row rr) divided by their softmax sums and stored as DT; rows past Sq and
// columns past D are skipped. ob: this (batch, head)'s output; inv_l: the
// inverse row sums (ra_row_inv).
template <int DT, int HD>
__device__ __forceinline__ void ra_wg_store_rows(u16* ob, const float* o, const float* inv_l, const int* rows,
                                                 int Sq, int D, int t) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const float inv = inv_l[rr];
        const int r = rows[rr];
        if (r < Sq) {
#pragma unroll
            for (int d = 0; d < HD / 8; ++d) {
                const int col = d * 8 + 2 * t;
                if (col < D)
                    *reinterpret_cast<u32*>(ob + (long long)r * D + col) =
                        ra_pack<DT>(o[4 * d + 2 * rr] * inv, o[4 * d + 2 * rr + 1] * inv);
            }
        }
    }
}

template <int DT, int HD, int NWG, int BN, int REL, int ST>
__global__ void __launch_bounds__(128 * NWG, (NWG == 1) ? (BN <= 64 ? (HD <= 64 ? 4 : 3) : (BN <= 96 ? 3 : 2)) : ((NWG == 2 && BN == 64) ? 2 : 1))
relattn_wg(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
           const float* __restrict__ rel_h, const float* __restrict__ rel_w,
           u16* __restrict__ out,
           int H, int Sq, int Sk, int D, int kh, int kw,
           long long qsb, long long qsh, long long qss,
           long long ksb, long long ksh, long long kss,
           long long vsb, long long vsh, long long vss,
           float scale_log2, float inv_kw,
           int kq_lbo, int kq_sbo, int v_lbo, int v_sbo)
{
    constexpr int NT = 128 * NWG;
    constexpr int BM = 64 * NWG;
    constexpr int CH = HD / 8;
    constexpr int NS = BN / 8;              // 8-key column blocks per tile
    constexpr u32 QBYTES = BM * HD * 2;
    constexpr u32 TBYTES = BN * HD * 2;     // one K or V tile

    constexpr bool SPL = (HD == 80);        // split tiles: 64 swizzled columns + 16 unswizzled
    constexpr int SW = (HD == 64 || SPL) ? 1 : 0;   // 128-byte swizzle for 128-byte rows
    constexpr int HDA = SPL ? 64 : HD;      // columns of the (first) K-major part
    // REL 1 / 3: k_w known at compile time (KWC), rel_w of a thread's columns
    // in registers, NU whole key rows per tile
    constexpr bool RREG = (REL == 1 || REL == 3);
    constexpr int KWC = (REL == 1) ? 64 : BN;
    constexpr int RW8 = KWC / 8;            // 8-column blocks of one key row
    constexpr int NU = RREG ? BN / KWC : 1;
    extern __shared__ __align__(128) unsigned char ra_smem_raw[];
    const u32 sraw = ra_smem_addr(ra_smem_raw);
    const u32 sbase = (sraw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
    const u32 sQ = sbase;
    const u32 sKV = sbase + QBYTES;         // stage s: K at sKV + 2 s TBYTES, V after it
    float* sRel = reinterpret_cast<float*>(ra_smem_raw + (sbase - sraw) + QBYTES + 2 * ST * TBYTES);   // REL == 2

    const int tid = threadIdx.x;
    const int wg = tid >> 7, wt = tid & 127;
    const int wq = wt >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    const int mtiles = (Sq + BM - 1) / BM;
    const int mt = blockIdx.x % mtiles;
    const int bh = blockIdx.x / mtiles;
    const int b = bh / H, h = bh - b * H;
    const int m0 = mt * BM;

    const u16* qb = q + b * qsb + h * qsh;
    const u16* kb = k + b * ksb + h * ksh;
    const u16* vb = v + b * vsb + h * vsh;

    // block rows owned by this thread (rr = 0: g, rr = 1: g + 8)
    const int lrow0 = wg * 64 + wq * 16 + g;
    int rows[2] = {m0 + lrow0, m0 + lrow0 + 8};

    // ---- Q tile and the first ST - 1 K/V tiles (one commit group each)
    const int ntiles = (Sk + BN - 1) / BN;
    ra_load_tile<HD, BM, NT>(sQ, qb, qss, m0, Sq, D, tid);
#pragma unroll
    for (int st = 0; st < ST - 1; ++st) {
        if (st < ntiles) {
            const u32 dst = sKV + (u32)st * 2u * TBYTES;
            ra_load_tile<HD, BN, NT>(dst, kb, kss, st * BN, Sk, D, tid);
            ra_load_tile<HD, BN, NT>(dst + TBYTES, vb, vss, st * BN, Sk, D, tid);
        }
        ra_cp_commit();
    }

    // ---- relative terms (log2 domain)
    const float* rh_row[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = min(rows[rr], Sq - 1);
        rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
    }
    // REL 1 / 3: rel_w[i, c] for this thread's columns c = 8 j + 2 t + e (j < RW8)
    float rwc[2][RREG ? 2 * RW8 : 1];
    if (RREG) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = min(rows[rr], Sq - 1);
            const float* wrow = rel_w + ((long long)bh * Sq + r) * kw;
#pragma unroll
            for (int j = 0; j < RW8; ++j) {
                const float2 w2 = *reinterpret_cast<const float2*>(wrow + j * 8 + 2 * t);
                rwc[rr][RREG ? 2 * j : 0] = w2.x * RA_LOG2E;
                rwc[rr][RREG ? 2 * j + 1 : 0] = w2.y * RA_LOG2E;
            }
        }
    }
    // REL == 2: rows of rel_h (kh floats) then rel_w (kw floats) per block row
    const int relw = (kh + kw) | 1;   // odd row stride: rows g = 0..7 on distinct banks
    if (REL == 2) {
        for (int i = tid; i < BM * relw; i += NT) {
            const int r = i / relw, c = i - r * relw;
            const int row = min(m0 + r, Sq - 1);
            const float val = (c < kh) ? rel_h[((long long)bh * Sq + row) * kh + c]
                                       : rel_w[((long long)bh * Sq + row) * kw + (c - kh)];
            sRel[i] = val * RA_LOG2E;
        }
        // visible after the first barrier of the tile loop
    }

    float o[HD / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
    float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f};

    const u64 dQ = ra_desc(sQ + (u32)wg * 64u * HDA * 2u, (u32)kq_lbo, (u32)kq_sbo, SW);
    // SPL: the 16-column part of this warpgroup's Q rows (no swizzle: core
    // matrices 128 bytes apart along K, 8-row groups 256 bytes apart)
    const u64 dQB = ra_desc(sQ + (u32)BM * 128u + (u32)wg * 64u * 32u, 128u, 256u, 0);
    // descriptor advance per 16 columns (K-major) and per 16 keys (V), 16-byte units
    constexpr u64 KSTEP = SW ? 2 : 16;
    constexpr u64 VSTEP = 2 * (HDA / 8) * 8;
    constexpr u64 VSTEPB = 2 * 2 * 8;       // SPL: 16 keys of the 16-column part

    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * BN;
        const u32 cur = sKV + (u32)(n % ST) * 2u * TBYTES;
        // rel_h for this tile (REL 1 / 3: one ky per key row of the tile)
        float rh1[2][NU];
        if (RREG) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int u = 0; u < NU; ++u) {
                    const int ky = min(j0 / KWC + u, kh - 1);
                    rh1[rr][u] = __ldg(rh_row[rr] + ky) * RA_LOG2E;
                }
        }
        // prefetch tile n + ST - 1 into the stage freed at the end of iteration n - 1
        const int nl = n + ST - 1;
        if (nl < ntiles) {
            const u32 nxt = sKV + (u32)(nl % ST) * 2u * TBYTES;
            ra_load_tile<HD, BN, NT>(nxt, kb, kss, nl * BN, Sk, D, tid);
            ra_load_tile<HD, BN, NT>(nxt + TBYTES, vb, vss, nl * BN, Sk, D, tid);
        }
        ra_cp_commit();          // possibly empty: keeps one group per tile
        ra_cp_wait<ST - 1>();    // tile n has landed
        ra_fence_proxy_async();
        __syncthreads();

        // ---- S = Q K^T
        float s[BN / 2];
        const u64 dK = ra_desc(cur, (u32)kq_lbo, (u32)kq_sbo, SW);
        ra_wg_fence();
#pragma unroll
        for (int ks = 0; ks < HDA / 16; ++ks)
            RaWg<DT, BN>::ss(s, dQ + ks * KSTEP, dK + ks * KSTEP, ks > 0 ? 1 : 0);
        if (SPL) RaWg<DT, BN>::ss(s, dQB, ra_desc(cur + (u32)BN * 128u, 128u, 256u, 0), 1);
        ra_wg_commit();
        ra_wg_wait<0>();

        // ---- scale, relative terms, key mask (log2 domain)
        if (REL == 2) {
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = j0 + j * 8 + 2 * t + e;
                    if (key < Sk) {
                        int ky, kx;
                        ra_split_key(key, kw, inv_kw, ky, kx);
#pragma unroll
                        for (int rr = 0; rr < 2; ++rr) {
                            const float* rl = sRel + (lrow0 + rr * 8) * relw;
                            s[4 * j + 2 * rr + e] = fmaf(s[4 * j + 2 * rr + e], scale_log2, rl[ky] + rl[kh + kx]);
                        }
                    } else {
                        s[4 * j + e] = -RA_INF;
                        s[4 * j + 2 + e] = -RA_INF;
                    }
                }
        } else {
            // one key row per tile (NU == 1): rel_h joins the row maximum instead
#pragma unroll
            for (int j = 0; j < NS; ++j)
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float bias = 0.f;
                        if (RREG) bias = rwc[rr][RREG ? 2 * (j % RW8) + e : 0];
                        s[4 * j + 2 * rr + e] = fmaf(s[4 * j + 2 * rr + e], scale_log2, bias);
                    }
            if (j0 + BN > Sk) {
#pragma unroll
                for (int j = 0; j < NS; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (j0 + j * 8 + 2 * t + e >= Sk) {
                            s[4 * j + e] = -RA_INF;
                            s[4 * j + 2 + e] = -RA_INF;
                        }
            }
        }

        // ---- online softmax (a row's scores live in the 4 lanes sharing g);
        // REL 2 carries rel_h in the scores, REL 1 / 3 per key row in off
        float off[2 * NU], alpha[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int u = 0; u < NU; ++u) off[rr * NU + u] = RREG ? rh1[rr][u] : 0.f;
        ra_online_softmax<NS, NU>(s, off, m_run, l_run, alpha);
        ra_rescale<HD / 8>(o, alpha);

        // ---- O += P V
        u32 p[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            p[kk][0] = ra_pack<DT>(s[8 * kk + 0], s[8 * kk + 1]);
            p[kk][1] = ra_pack<DT>(s[8 * kk + 2], s[8 * kk + 3]);
            p[kk][2] = ra_pack<DT>(s[8 * kk + 4], s[8 * kk + 5]);
            p[kk][3] = ra_pack<DT>(s[8 * kk + 6], s[8 * kk + 7]);
        }
        const u64 dV = ra_desc(cur + TBYTES, (u32)v_lbo, (u32)v_sbo, SW);
        ra_wg_fence();
        if (SPL) {
            // N = 64 (swizzled part) and N = 16 (unswizzled part, N-major: 8-key
            // groups 256 bytes apart, 8-column core matrices 128 apart)
            const u64 dVB = ra_desc(cur + TBYTES + (u32)BN * 128u, 256u, 128u, 0);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                RaWg<DT, 64>::rs(o, p[kk], dV + kk * VSTEP, 1);
                RaWg<DT, 16>::rs(o + 32, p[kk], dVB + kk * VSTEPB, 1);
            }
        } else {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                RaWg<DT, HD>::rs(o, p[kk], dV + kk * VSTEP, 1);
        }
        ra_wg_commit();
        ra_wg_wait<0>();
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    // ---- finalize and store
    const float inv_l[2] = {ra_row_inv(l_run[0]), ra_row_inv(l_run[1])};
    ra_wg_store_rows<DT, HD>(out + (long long)bh * Sq * D, o, inv_l, rows, Sq, D, t);
}

// ===========================================================================
// Warp-specialised kernel relattn_ws<DT, HD, NC, BN, REL, ST, PP, RG, MB> (head_dim 64 or 80)
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
// REL 0 = no terms, 1 = k_w == 64 (rel_w in registers, rel_h one value per row
// per 64 keys), 4 = as 1 with the terms computed in the kernel from the
// 16-bit tables (at most 128 rows each; k_h <= 64) and the index tables of
// get_rel_pos (idx_h (q_h, k_h), idx_w (q_w, 64)), 7 = 4 where the tables
// take two passes (SAM-H) but each warpgroup's rel_h needs at most 72 table
// rows: those in one pass, 5 / 6 = 1 / 4 for small key grids (16-slot key rows).
// Tensor maps (built by _sm90.tensor_map): dims (columns, rows, heads, batch)
// of q, k, v; tq / tk / tv: box 64 columns x BLOCK_M (q) or BN (k, v) rows,
// 128-byte swizzle. HD == 80 (SAM-H) adds tq2 / tk2 / tv2: box 8 columns,
// no swizzle, loaded at columns 64 and 72, so a tile is its 64-column swizzled
// part (ROWS x 128 bytes) followed by two ROWS x 16-byte column blocks.
// Persistent: block i computes the row tiles i, i + gridDim.x, ... of the ntot
// (batch, head, row block) tiles (a grid of ntot blocks: one each). The K/V
// ring runs on across a block's tiles, so the producer loads the next tile's
// first K/V stages while the consumers finish the last one, and its Q once
// every consumer's last S of a tile is done (a fourth mbarrier, released
// before that tile's softmax, last P V and store); fused tables are loaded
// once per block.
// ===========================================================================
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
__device__ __forceinline__ void ra_bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void ra_bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(n) : "memory"); }
template <int R> __device__ __forceinline__ void ra_regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(R)); }
template <int R> __device__ __forceinline__ void ra_regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(R)); }

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

template <int DT, int HD, int NC, int BN, int REL, int ST, int PP, int RG, int MB>
__global__ void __launch_bounds__(128 * NC + (RG ? 128 : 32), MB)
relattn_ws(const __grid_constant__ RaTmap tq, const __grid_constant__ RaTmap tk, const __grid_constant__ RaTmap tv,
           const __grid_constant__ RaTmap tq2, const __grid_constant__ RaTmap tk2, const __grid_constant__ RaTmap tv2,
           const float* __restrict__ rel_h, const float* __restrict__ rel_w,
           const u16* __restrict__ th, const u16* __restrict__ tw,
           const int* __restrict__ idx_h, const int* __restrict__ idx_w, int Lh, int Lw, int qw,
           u16* __restrict__ out, int H, int Sq, int Sk, int D, int kh, int kw, float scale_log2, int ntot)
{
    constexpr int BM = 64 * NC;
    constexpr int NS = BN / 8;
    constexpr bool SPL = (HD == 80);                // columns 64-79 as a second, unswizzled part
    constexpr u32 QBYTES = BM * HD * 2;
    constexpr u32 TBYTES = BN * HD * 2;
    // WIN (REL 5 / 6, small key grids: k_w <= 16, k_h * 16 slots): every key
    // row occupies KP = 16 slots of a tile (TMA boxes of k_w rows; slots past
    // k_w stay zero and get rel_w = -inf), so a slot's kx is fixed per
    // register as with k_w == 64 (KP = 64, where slots are keys)
    constexpr bool WIN = (REL == 5 || REL == 6);
    // BN 80 (REL 1, head_dim 64): key tiles of one 80-key row (k_w = 80, SAM at
    // 1280 px), rel_w of the thread's 20 columns per row in registers
    constexpr int KP = WIN ? 16 : (BN == 80 ? 80 : 64);   // key slots per key row
    static_assert(BN != 80 || (HD == 64 && !WIN && REL <= 1), "80-key rows: head_dim 64, terms given");
    constexpr bool RB = (REL == 1 || REL == 4 || REL == 7 || WIN);   // rel_w in registers, rel_h per key row
    constexpr bool FT = (REL == 4 || REL == 6 || REL == 7);   // terms computed here
    // REL 7: as 4 in two passes, but rel_h in one pass of 72 table rows from
    // this warpgroup's first row's smallest index (rounded down to 8); the
    // host takes it where every warpgroup's rows need at most those 72 rows
    constexpr bool HB = (REL == 7);
    // G1 (rel 6): both G products are issued with S(0) in one commit group, so
    // a row tile pays one round trip to the tensor cores before its first
    // softmax instead of three
    constexpr bool G1 = (REL == 6);
    constexpr int NU = RB ? BN / KP : 1;            // key rows per tile
    constexpr int NW = KP / 4;                      // rel_w values per row and thread
    constexpr int KHM = WIN ? 16 : 64;              // k_h at most (FT's rel_h gather)
    // FT: G = Q T^T in NH passes of GN table rows (one pass when the scratch
    // of 64 x (128 + 8) floats per consumer fits, else two of 64 + 8; WIN: one
    // of 32, its tables have at most 31 rows); GS: the scratch's row stride in
    // floats (NH: the same rule as _sm90.ws_table_passes)
    constexpr int NH = HB ? 2 : (WIN || BM * HD * 2 + 2 * ST * BN * HD * 2 + 1024 + 2 * 128 * HD * 2 + NC * 64 * 136 * 4
                        <= 227 * 1024 - 1024) ? 1 : 2;
    constexpr int HN = 72;                          // HB: rel_h's table rows
    constexpr int GN = WIN ? 32 : 128 / NH;
    constexpr int TR = WIN ? 32 : 128;              // table rows copied
    constexpr u32 TABBYTES = TR * HD * 2;           // FT: one table
    // (WIN: 36, so that the 8 rows a warp reads per key row hit 8 banks, and
    // three blocks of (1, 64, 3) fit an SM)
    constexpr int GS = WIN ? 36 : HB ? HN + 8 : GN + 8;
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
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (tid >= 128 * NC) {
        // ---- producer: the block's last warp (RG: warpgroup), one thread
        if (RG) ra_regs_dec<(NC == 2) ? 24 : 32>();
        if (tid == 128 * NC) {
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
    if (WIN) {
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
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" :: "r"(a), "r"(0u) : "memory");
        }
    }
    if (FT) {   // the two tables, once per block
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
    if (WIN || FT) {
        ra_fence_proxy_async();
        ra_bar_sync(NC + 1, 128 * NC);   // the zeros and the tables in place for every consumer's products
    }

    // G = Q T^T over GN table rows per pass (NH passes: the whole table, or
    // halves when shared memory is short), each value gathered in the pass
    // that holds its table row
    // (rows row0 .. row0 + N - 1 of the table, row0 a multiple of 8: ra_ws_gemm_rows)
    // rel_h (log2 domain) of each row into its scratch row, read per key tile
    // (after every read of the scratch: __syncwarp for the G1 path's reads,
    // a warpgroup barrier for the others)
    auto put_rel_h = [&](const float (&hv)[2][KHM / 4]) {
        if (G1) __syncwarp();
        else ra_bar_sync(NC + 2 + c, 128);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int m = 0; m < KHM / 4; ++m) gRow[rr][t + 4 * m] = hv[rr][m];
        __syncwarp();
    };
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
    auto turn_wait = [&]() { if (PP) ra_bar_sync(1 + c, 128 * 2); };
    auto turn_pass = [&](bool final_turn) {
        if (PP && !(final_turn && c == NC - 1)) ra_bar_arrive(1 + (c + 1) % NC, 128 * 2);
    };

    int it = 0;   // K/V tiles consumed by this block
    int tc = 0;
    for (int tile = blockIdx.x; tile < ntot; tile += gridDim.x, ++tc) {
        const int mt = tile % mtiles, bh = tile / mtiles, m0 = mt * BM;
        rows[0] = m0 + lrow0;
        rows[1] = m0 + lrow0 + 8;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = min(rows[rr], Sq - 1);
            rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
            if (REL == 1 || REL == 5) {   // rel_w of this thread's key columns; WIN: -inf past k_w
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
        // q - k + k_size - 1 is computed instead: H100, SAM-B 0.1337-0.1348 ->
        // 0.1306-0.1317 ms, SAM-H 0.2149-0.2173 -> 0.2114-0.2140; the windows
        // keep the loads, with which they ran 3% faster)
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
                put_rel_h(hv);
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
                put_rel_h(hv);
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

        // ---- finalize and store
        ra_wg_store_rows<DT, HD>(out + (long long)bh * Sq * D, o, inv_l, rows, Sq, D, t);
    }
}

// ===========================================================================
// relattn_wgt<HD, BN, REL>: float32 q, k, v as 3xTF32 on wgmma (m64nNk8 .tf32)
//
// The same arithmetic as relattn_tf32<HD, 3, ...> (relattn_kernels.cu): every
// operand x is split into big = x rounded to TF32 and small = x - big, and
// a.b = a_small.b_big + a_big.b_small + a_big.b_big; each key tile's P V starts
// from zero and is added to the running output with a float32 FMA. One
// warpgroup (64 query rows) per block, two blocks per SM. head_dim <= 64 with
// 64- or 32-key tiles, 80 with 32-key tiles (registers). Per key tile:
//   - the raw K / V tile lands by cp.async (issued one tile ahead);
//   - the block splits it once into four wgmma operands in shared memory
//     (no-swizzle K-major core-matrix layout: 8 rows x 16 bytes per core,
//     K-adjacent cores 128 bytes apart): K big / small as they are, V big /
//     small transposed (rows = columns of V, K = keys), the keys of each
//     8-key group in the order 0 2 4 6 1 3 5 7 so that the S accumulator's
//     fragment is P's A fragment (k slot t <-> key 2 t, t + 4 <-> 2 t + 1);
//   - S = Q K^T with Q's split fragments in registers (split once per
//     block), 3 wgmma per 8 columns; bias, mask, online softmax; P split in
//     registers; O_tile = P V, 3 wgmma per 8 keys; O = alpha O + O_tile.
// REL 0 = no terms (keys past Sk masked), 1 = k_w == 64 (one key row per
// 64-key tile, or per two 32-key tiles: rel_w of the thread's columns in
// registers, rel_h per row and tile),
// 5 = k_w <= 16: every key row takes 16 slots of the tile (4 key rows per 64
// slots; slots past k_w get rel_w = -inf, key rows past k_h rel_h = -inf), so
// a thread's kx values are fixed registers.
// Flags per block (64 rows): a non-finite sum or output, as relattn_tf32's
// first pass, so its SAFE pass redoes those blocks with IEEE semantics.
// q, k, v: float32, last stride 1, row strides multiples of 4, 16-byte
// aligned. rel_h (B*H, Sq, kh), rel_w (B*H, Sq, kw): float32 contiguous.
// ===========================================================================
// acc = A B over STEPS k8 steps as 3xTF32 (small x big terms first), A's split
// fragments in registers, B's big / small parts behind two K-major no-swizzle
// descriptors (two cores, 256 bytes, per step); issued, committed and waited for.
template <int N, int STEPS>
__device__ __forceinline__ void ra_wgt_3x(float* acc, const u32 (*abig)[4], const u32 (*asml)[4], u64 dBb, u64 dBs) {
    ra_wg_fence();
#pragma unroll
    for (int ks = 0; ks < STEPS; ++ks) {
        RaWt<N>::rs(acc, asml[ks], dBb + ks * 16, ks > 0 ? 1 : 0);
        RaWt<N>::rs(acc, abig[ks], dBs + ks * 16, 1);
        RaWt<N>::rs(acc, abig[ks], dBb + ks * 16, 1);
    }
    ra_wg_commit();
    ra_wg_wait<0>();
}

template <int HD, int BN, int REL>
__global__ void __launch_bounds__(128, 2)
relattn_wgt(RA_F32_KERNEL_PARAMS)
{
    static_assert(HD % 16 == 0 && HD <= 80 && (HD <= 64 || BN == 32), "head_dim 16 .. 64, or 80 with 32-key tiles");
    static_assert((BN == 32 || BN == 64) && (REL != 5 || BN % 16 == 0), "key tile");
    constexpr int KC = HD / 4;                 // 16-byte chunks of a K row
    constexpr int ND = HD / 8;                 // 8-column blocks of the output
    constexpr int NS = BN / 8;                 // 8-key blocks of a tile
    constexpr int KS = HD / 8;                 // k8 steps of S = Q K^T
    constexpr int VROW = HD + ((16 - HD % 32) + 32) % 32;   // raw V row (floats): == 16 mod 32 banks
    constexpr int NU = (REL == 5) ? BN / 16 : 1;            // key rows per tile (REL 5)
    constexpr int RH = 64 / BN;                // REL 1: tiles per key row (2: halves)
    // shared memory (byte offsets from the 128-byte aligned base): the raw K
    // tile (core-matrix layout), the raw V tile (rows of VROW floats), then K
    // big, K small, V^T big, V^T small
    constexpr u32 OPB = BN * HD * 4;           // bytes of one split operand
    constexpr u32 OVR = OPB, OKB = OVR + BN * VROW * 4, OKS = OKB + OPB, OVB = OKS + OPB, OVS = OVB + OPB;
    extern __shared__ __align__(128) unsigned char ra_smem_raw[];
    const u32 sraw = ra_smem_addr(ra_smem_raw);
    const u32 sbase = (sraw + 127u) & ~127u;   // shared-space address of offset 0
    unsigned char* pbase = ra_smem_raw + (sbase - sraw);   // generic pointer to it
    const float* pVr = reinterpret_cast<const float*>(pbase + OVR);

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    const int mtiles = (Sq + 63) / 64;
    const int mt = blockIdx.x % mtiles;
    const int bh = blockIdx.x / mtiles;
    const int b = bh / H, h = bh - b * H;
    const int m0 = mt * 64;
    const float* qb = q + b * qsb + h * qsh;
    const float* kb = k + b * ksb + h * ksh;
    const float* vb = v + b * vsb + h * vsh;

    // key of tile slot s (or -1: padding), tile n
    auto slot_key = [&](int n, int s) -> int {
        if (REL == 5) {
            const int gs = n * BN + s, ky = gs >> 4, kx = gs & 15;
            return (kx < kw && ky < kh) ? ky * kw + kx : -1;
        }
        const int key = n * BN + s;
        return key < Sk ? key : -1;
    };
    const int ntiles = (REL == 5) ? (kh * 16 + BN - 1) / BN : (Sk + BN - 1) / BN;
    auto load_tile = [&](int n) {
        for (int i = tid; i < BN * KC; i += 128) {
            // K: chunk i of the core-matrix layout (8 rows of a row group, then chunks, then groups)
            const int r8 = i & 7, c = (i >> 3) % KC, rg = (i >> 3) / KC;
            const int key = slot_key(n, rg * 8 + r8), col = c * 4;
            const bool ok = key >= 0 && col < D;
            ra_cp_async16(sbase + (u32)i * 16u, ok ? kb + (long long)key * kss + col : kb, ok ? 16 : 0);
            // V: row-major rows of VROW floats
            const int r = i / KC, cv = (i - (i / KC) * KC) * 4;
            const int keyv = slot_key(n, r);
            const bool okv = keyv >= 0 && cv < D;
            ra_cp_async16(sbase + OVR + (u32)(r * VROW + cv) * 4u, okv ? vb + (long long)keyv * vss + cv : vb, okv ? 16 : 0);
        }
        ra_cp_commit();
    };
    load_tile(0);

    // ---- Q fragments (rows g, g + 8 of this warp; k slot t <-> column 8 ks + t,
    //      t + 4 <-> 8 ks + t + 4), split once
    const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    u32 qbig[KS][4], qsml[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        float a[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = rows[e & 1], col = ks * 8 + t + (e >> 1) * 4;
            a[e] = (r < Sq && col < D) ? __ldg(qb + (long long)r * qss + col) : 0.f;
        }
        ra_split_tf32<3, 4>(a, qbig[ks], qsml[ks]);
    }

    // ---- relative terms (log2 domain)
    const float* rh_row[2];
    float rwc[2][(REL == 1) ? 16 : (REL == 5) ? 4 : 1];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = min(rows[rr], Sq - 1);
        rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
        const float* wrow = rel_w + ((long long)bh * Sq + r) * kw;
        if (REL == 1) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float2 w2 = __ldg(reinterpret_cast<const float2*>(wrow + j * 8 + 2 * t));
                rwc[rr][(REL == 1) ? 2 * j : 0] = w2.x * RA_LOG2E;
                rwc[rr][(REL == 1) ? 2 * j + 1 : 0] = w2.y * RA_LOG2E;
            }
        } else if (REL == 5) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int kx = (i >> 1) * 8 + 2 * t + (i & 1);
                rwc[rr][(REL == 5) ? i : 0] = kx < kw ? __ldg(wrow + kx) * RA_LOG2E : -RA_INF;
            }
        }
    }

    float o[ND * 4];
#pragma unroll
    for (int i = 0; i < ND * 4; ++i) o[i] = 0.f;
    float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f};
    // descriptors: K-major, no swizzle; K-adjacent cores 128 B apart, 8-row groups KC (or BN / 4) x 128 B
    const u64 dKb = ra_desc(sbase + OKB, 128u, (u32)KC * 128u, 0), dKs = ra_desc(sbase + OKS, 128u, (u32)KC * 128u, 0);
    const u64 dVb = ra_desc(sbase + OVB, 128u, (u32)(BN / 4) * 128u, 0);
    const u64 dVs = ra_desc(sbase + OVS, 128u, (u32)(BN / 4) * 128u, 0);

    for (int n = 0; n < ntiles; ++n) {
        // rel_h of this tile's key rows (REL 1: one, REL 5: NU)
        float off[2 * NU];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int u = 0; u < NU; ++u) {
                float x = 0.f;
                if (REL == 1) x = __ldg(rh_row[rr] + min(n / RH, kh - 1)) * RA_LOG2E;
                if (REL == 5) {
                    const int ky = n * NU + u;
                    x = ky < kh ? __ldg(rh_row[rr] + ky) * RA_LOG2E : -RA_INF;
                }
                off[rr * NU + u] = x;
            }
        ra_cp_wait<0>();
        __syncthreads();   // raw tile n landed; every warp is done with tile n - 1's operands

        // ---- split the raw tile into the four operands
        for (int i = tid; i < BN * KC; i += 128) {
            const float4 x4 = *reinterpret_cast<const float4*>(pbase + i * 16);
            const float x[4] = {x4.x, x4.y, x4.z, x4.w};
            u32 bg[4], sm[4];
            ra_split_tf32<3, 4>(x, bg, sm);
            *reinterpret_cast<uint4*>(pbase + OKB + i * 16) = make_uint4(bg[0], bg[1], bg[2], bg[3]);
            *reinterpret_cast<uint4*>(pbase + OKS + i * 16) = make_uint4(sm[0], sm[1], sm[2], sm[3]);
        }
        for (int i = tid; i < HD * NS * 2; i += 128) {
            // 4 keys (8 j + 2 m + e, m < 4) of column d -> one 16-byte chunk of V^T row d
            const int d = ((i >> 4) % ND) * 8 + (i & 7), e = (i >> 3) & 1, j = (i >> 4) / ND;
            float x[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) x[m] = pVr[(8 * j + 2 * m + e) * VROW + d];
            u32 bg[4], sm[4];
            ra_split_tf32<3, 4>(x, bg, sm);
            const u32 off16 = (u32)(((d >> 3) * (BN / 4) + 2 * j + e) * 128 + (d & 7) * 16);
            *reinterpret_cast<uint4*>(pbase + OVB + off16) = make_uint4(bg[0], bg[1], bg[2], bg[3]);
            *reinterpret_cast<uint4*>(pbase + OVS + off16) = make_uint4(sm[0], sm[1], sm[2], sm[3]);
        }
        ra_fence_proxy_async();
        __syncthreads();   // operands visible to the tensor cores; the raw buffers are free
        if (n + 1 < ntiles) load_tile(n + 1);

        // ---- S = Q K^T (small x big terms first)
        float s[NS * 4];
        ra_wgt_3x<BN, KS>(s, qbig, qsml, dKb, dKs);

        // ---- scale, relative terms, mask (log2 domain); s[4 j + 2 rr + e]: row rr,
        //      tile slot 8 j + 2 t + e
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float bias = 0.f;
                    if (REL == 1) {   // RH == 2: the second half of the key row on odd tiles
                        const int jj = (REL == 1) ? 2 * j + e : 0;
                        bias = (RH == 2 && (n & 1)) ? rwc[rr][(REL == 1) ? jj + 2 * NS : 0] : rwc[rr][jj];
                    }
                    if (REL == 5) bias = rwc[rr][(REL == 5) ? 2 * (j & 1) + e : 0];
                    float x = fmaf(s[4 * j + 2 * rr + e], scale_log2, bias);
                    if (REL == 0 && n * BN + 8 * j + 2 * t + e >= Sk) x = -RA_INF;
                    s[4 * j + 2 * rr + e] = x;
                }
        float alpha[2];
        ra_online_softmax<NS, NU>(s, off, m_run, l_run, alpha);

        // ---- O_tile = P V (P's A fragment: k slot t <-> key 8 kk + 2 t, t + 4 <-> 8 kk + 2 t + 1)
        u32 pbig[NS][4], psml[NS][4];
#pragma unroll
        for (int kk = 0; kk < NS; ++kk) {
            const float a[4] = {s[4 * kk], s[4 * kk + 2], s[4 * kk + 1], s[4 * kk + 3]};
            ra_split_tf32<3, 4>(a, pbig[kk], psml[kk]);
        }
        float ot[ND * 4];
        ra_wgt_3x<HD, NS>(ot, pbig, psml, dVb, dVs);
#pragma unroll
        for (int i = 0; i < ND * 4; ++i) o[i] = fmaf(o[i], alpha[(i >> 1) & 1], ot[i]);
    }

    const bool bad = __syncthreads_or(ra_nonfinite<ND * 4>(l_run, o));
    if (tid == 0) flags[blockIdx.x] = bad ? 1 : 0;

    const float inv_l[2] = {ra_row_inv(l_run[0]), ra_row_inv(l_run[1])};
    float* ob = out + (long long)bh * Sq * D;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        if (rows[rr] < Sq) {
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                const int col = d * 8 + 2 * t;
                if (col < D)
                    *reinterpret_cast<float2*>(ob + (long long)rows[rr] * D + col) =
                        make_float2(o[4 * d + 2 * rr] * inv_l[rr], o[4 * d + 2 * rr + 1] * inv_l[rr]);
            }
        }
    }
}
