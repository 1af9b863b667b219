// relattn_bwd_wg_dq / relattn_bwd_wg_dkv: bwd.cu's fused 16-bit backward
// (relattn_bwd_dq / relattn_bwd_dkv, same arguments, same formulas) on
// Hopper's warpgroup products (wgmma, sm_90a), head_dim 64 and 80. A
// warpgroup owns 64 rows (queries in dq, keys in dkv) and reads each operand
// tile from shared memory once per product, where bwd.cu's four warps each
// read the whole tile for their 16 rows. NWG warpgroups share a block's
// tiles. Per tile, in the log2 domain of bwd.cu's header:
//
//   dq  (query-major): S = Q K^T, dP = dO V^T       (both operands in shared memory)
//                      dS = P * (dP - delta)         (registers; the terms' sums as bwd.cu's)
//                      dq += dS K                    (dS from registers, K read N-major)
//   dkv (key-major):   S^T = K Q^T, dP^T = V dO^T    (both operands in shared memory)
//                      dv += P^T dO, dk += dS^T Q    (P^T, dS^T from registers, dO, Q N-major)
//
// The accumulator layout of a warpgroup's m64nN product is, warp by warp,
// mma.sync's m16n8 layout repeated along N (s[j][e]: block j of 8 columns),
// so bwd.cu's logits, masks and terms' sums apply unchanged. In dkv each
// product is its own commit group, so that P's exponentials overlap V dO^T
// and dS overlaps dv += P^T dO (4% to 6% faster at SAM's global grids, 3%
// in its windows, than waiting for both products); in dq the same overlap
// of the exponentials with dO V^T measured 0% to 3% slower, and every step
// waits for all products before it. Tiles use ra_load_tile's layout (sm90_common.cuh,
// as relattn_wg's): the first 64 columns with the 128-byte swizzle, head_dim
// 80's last 16 unswizzled after them; 1024-byte aligned.
// Launched by backward.py's fused_core_backward(kernels="wg"). Needs
// common.cuh, the wgmma wrappers, sm90_common.cuh, bwd_common.cuh and
// bwd16.cuh before it.

// ---- the in-loop copies, each thread's share fixed from tile to tile
// A thread's chunks of a 16-bit tile of ROWS rows x HD in ra_load_tile's
// layout: the same shared offset -> (row, column) map, dealt so that a
// thread keeps its column and its place in a row group on every tile. Its
// chunk k of the swizzled part (columns 0-63) is row r + k NT / 8 at offset
// off + 16 k NT; of head_dim 80's tail (columns 64-79), row rt + k NT / 2 at
// offt + 16 k NT. Set up once per block; copy() then costs per chunk a row
// bound, an address and the copy, where ra_load_tile derives each chunk's
// row and offset from the thread index on every tile. Rows >= nrows and
// columns >= D are zero-filled. At head_dim 80 a warp reads 4 rows' first
// 128 bytes (rows are 160 apart), not 512 contiguous bytes.
template <int HD, int ROWS, int NT>
struct RbTileRows {
    static_assert(HD == 64 || HD == 80, "head_dim 64 or 80");
    static_assert(ROWS * 8 % NT == 0 && NT % 16 == 0, "whole chunks per thread");
    static constexpr int K = ROWS * 8 / NT, KT = HD == 80 ? (ROWS * 2 + NT - 1) / NT : 0;
    int r, rt, col, colt;
    u32 off, offt;

    __device__ __forceinline__ RbTileRows(int tid) {
        const int c = tid & 7, c2 = tid & 1;
        r = tid >> 3;
        col = c * 8;
        off = (u32)r * 128u + (u32)((c ^ (r & 7)) << 4);
        rt = tid >> 1;
        colt = 64 + c2 * 8;
        offt = (u32)ROWS * 128u + (u32)((((rt >> 3) * 2 + c2) << 7) + ((rt & 7) << 4));
    }

    // Rows row0 .. row0 + ROWS - 1 of the matrix at base (row stride
    // rstride) into the tile at dst; uncommitted.
    __device__ __forceinline__ void copy(u32 dst, const u16* base, long long rstride, int row0, int nrows,
                                         int D) const {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int row = row0 + r + k * (NT / 8);
            const bool ok = row < nrows && col < D;
            ra_cp_async16(dst + off + (u32)(k * NT * 16), ok ? base + row * rstride + col : base, ok ? 16 : 0);
        }
#pragma unroll
        for (int k = 0; k < KT; ++k) {
            const int rr = rt + k * (NT / 2);
            if (KT * NT > ROWS * 2 && rr >= ROWS) break;
            const int row = row0 + rr;
            const bool ok = row < nrows && colt < D;
            ra_cp_async16(dst + offt + (u32)(k * NT * 16), ok ? base + row * rstride + colt : base, ok ? 16 : 0);
        }
    }
};

// Descriptors of a tile of ROWS rows in ra_load_tile's layout at base.
// K-major (the head dim is the reduction): rows r0 .. r0 + 63, the swizzled
// part (advance 2 per 16 columns) and head_dim 80's tail. N-major (the rows
// are the reduction, the head dim the output columns): advance kk * RB_NSTEP
// (RB_NSTEP_TAIL) per 16 rows.
constexpr u64 RB_NSTEP = 128, RB_NSTEP_TAIL = 32;
template <int ROWS>
__device__ __forceinline__ u64 rb_kmaj(u32 base, int r0) { return ra_desc(base + (u32)r0 * 128u, 16u, 1024u, 1); }
template <int ROWS>
__device__ __forceinline__ u64 rb_kmaj_tail(u32 base, int r0) {
    return ra_desc(base + (u32)ROWS * 128u + (u32)r0 * 32u, 128u, 256u, 0);
}
__device__ __forceinline__ u64 rb_nmaj(u32 base) { return ra_desc(base, 8192u, 1024u, 1); }
template <int ROWS>
__device__ __forceinline__ u64 rb_nmaj_tail(u32 base) { return ra_desc(base + (u32)ROWS * 128u, 256u, 128u, 0); }

// acc (64 rows x 64 columns, float32) = A B^T over the head dim: A rows r0 ..
// of a tile of AROWS rows at a, B the 64 rows of a tile of BROWS rows at b;
// uncommitted (the caller fences before and commits after).
template <int DT, int HD, int AROWS, int BROWS>
__device__ __forceinline__ void rb_wg_abt(float (&acc)[8][4], u32 a, int r0, u32 b) {
    const u64 da = rb_kmaj<AROWS>(a, r0), db = rb_kmaj<BROWS>(b, 0);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) RaWg<DT, 64>::ss(&acc[0][0], da + 2 * ks, db + 2 * ks, ks > 0 ? 1 : 0);
    if constexpr (HD == 80) RaWg<DT, 64>::ss(&acc[0][0], rb_kmaj_tail<AROWS>(a, r0), rb_kmaj_tail<BROWS>(b, 0), 1);
}

// x (64 rows x 64, the accumulator layout) as the A operand of the next
// product: four k16 fragments, rounded to 16 bits.
template <int DT>
__device__ __forceinline__ void rb_wg_frags(u32 (&f)[4][4], const float (&x)[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        f[kk][0] = ra_pack<DT>(x[2 * kk][0], x[2 * kk][1]);
        f[kk][1] = ra_pack<DT>(x[2 * kk][2], x[2 * kk][3]);
        f[kk][2] = ra_pack<DT>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        f[kk][3] = ra_pack<DT>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
    }
}

// acc (64 rows x HD, 8-column blocks) += X B: X the fragments of rb_wg_frags (64 x 64), B the
// 64 rows x HD of a tile of BROWS rows at b, read N-major; uncommitted.
template <int DT, int HD, int BROWS>
__device__ __forceinline__ void rb_wg_xb(float (&acc)[HD / 8][4], const u32 (&x)[4][4], u32 b) {
    const u64 db = rb_nmaj(b);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        RaWg<DT, 64>::rs(&acc[0][0], x[kk], db + kk * RB_NSTEP, 1);
        if constexpr (HD == 80) RaWg<DT, 16>::rs(&acc[8][0], x[kk], rb_nmaj_tail<BROWS>(b) + kk * RB_NSTEP_TAIL, 1);
    }
}

// dS^T = P^T (dP^T - delta) in place of dp (the key-major tile), from
// rb_key_probs' P^T (zero past Sq, where dP^T is zero too: dO's rows there
// are zero-filled). sD: the tile's delta.
__device__ __forceinline__ void rb_wg_key_ds(float (&dp)[8][4], const float (&s)[8][4], const float* sD, int t) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float Dl = sD[j * 8 + 2 * t + e];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) dp[j][2 * rr + e] = s[j][2 * rr + e] * (dp[j][2 * rr + e] - Dl);
        }
}

// ---- dq and the terms' gradients, per block of 64 NWG query rows
// Shared memory (after 1024-byte alignment): the Q and dO tiles (64 NWG, HD),
// two stages of K and V tiles (64, HD), then float32: the rows' terms
// (rb_load_terms per warpgroup: rel_h (64 NWG, kh), rel_w (64 NWG, rb_sw_q)),
// in the generic mode the rows' d_rel_h, d_rel_w and a dS tile per warp.
template <int DT, int HD, int REL, int NWG>
__global__ void __launch_bounds__(128 * NWG)
relattn_bwd_wg_dq(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                  const u16* __restrict__ dout, const float* __restrict__ rel_h, const float* __restrict__ rel_w,
                  const float* __restrict__ lse2, const float* __restrict__ delta,
                  float* __restrict__ dq, float* __restrict__ d_rel_h, float* __restrict__ d_rel_w,
                  int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale)
{
    static_assert(HD == 64 || HD == 80, "head_dim 64 or 80");
    constexpr int NT = 128 * NWG, BM = 64 * NWG, ND = HD / 8;
    constexpr u32 QB = BM * HD * 2, TB = 64 * HD * 2;
    extern __shared__ __align__(128) unsigned char ra_smem_raw[];
    const u32 sraw = ra_smem_addr(ra_smem_raw);
    const u32 sbase = (sraw + 1023u) & ~1023u;
    const u32 sQ = sbase, sO = sbase + QB, sKV = sbase + 2 * QB;   // stage s: K at sKV + 2 s TB, V after it
    const int SW = rb_sw_q(REL, kw);
    float* sRH = reinterpret_cast<float*>(ra_smem_raw + (sbase - sraw) + 2 * QB + 4 * TB);
    float* sRW = sRH + BM * kh;
    float* sDH = sRW + BM * SW;      // GENERIC
    float* sDW = sDH + BM * kh;
    float* sDS = sDW + BM * kw;
    const int tid = threadIdx.x, wg = tid >> 7, wt = tid & 127, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int mtiles = (Sq + BM - 1) / BM;
    const int bh = blockIdx.x / mtiles;
    const int m0 = (blockIdx.x - bh * mtiles) * BM;
    const int r0 = m0 + warp * 16;
    const long long qrow0 = (long long)bh * Sq;
    const u16* kb = k + (long long)bh * Sk * D;
    const u16* vb = v + (long long)bh * Sk * D;

    const RbTileRows<HD, BM, NT> rows_q(tid);
    const RbTileRows<HD, 64, NT> rows_kv(tid);
    rows_q.copy(sQ, q + qrow0 * D, D, m0, Sq, D);
    rows_q.copy(sO, dout + qrow0 * D, D, m0, Sq, D);
    rb_load_terms<REL>(sRH + wg * 64 * kh, sRW + wg * 64 * SW, rel_h + qrow0 * kh, rel_w + qrow0 * kw, m0 + wg * 64,
                       Sq, kh, kw, wt);
    const float* rh[2];
    const float* rw[2];
    float lse[2], dl[2];
    rb_query_rows(rh, rw, lse, dl, sRH, sRW, lse2, delta, qrow0, r0, Sq, kh, SW, warp, g);
    if constexpr (REL == bwd_bias::GENERIC)
        for (int c = tid; c < BM * (kh + kw); c += NT) sDH[c] = 0.f;   // seen after the loop's first barrier

    float acc[ND][4], dw[REL == bwd_bias::KEY_ROWS ? 8 : 1][4];   // KEY_ROWS: d_rel_w of the thread's 16 columns
    rb_zero(acc);
    rb_zero(dw);

    const int ntiles = (Sk + 63) / 64;
    auto load = [&](int n, int stage) {
        const u32 dst = sKV + (u32)stage * 2u * TB;
        rows_kv.copy(dst, kb, D, n * 64, Sk, D);
        rows_kv.copy(dst + TB, vb, D, n * 64, Sk, D);
        ra_cp_commit();
    };
    load(0, 0);   // with the Q, dO tiles and the terms
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * 64;
        const u32 cK = sKV + (u32)rb_next<true>(n, ntiles, load) * 2u * TB, cV = cK + TB;

        float s[8][4], dp[8][4];
        ra_wg_fence();
        rb_wg_abt<DT, HD, BM, 64>(s, sQ, wg * 64, cK);
        rb_wg_abt<DT, HD, BM, 64>(dp, sO, wg * 64, cV);
        ra_wg_commit();
        ra_wg_wait<0>();
        rb_query_logits<REL>(s, j0, Sk, kw, inv_kw, scale_log2, rh, rw, t);
        rb_query_ds(s, dp, lse, dl);
        rb_query_terms<REL>(s, dw, d_rel_h, qrow0, r0, Sq, kh, kw, n, Sk, sDS + warp * 16 * RB_DS,
                            sDH + warp * 16 * kh, sDW + warp * 16 * kw, lane, g, t);

        u32 ds[4][4];
        rb_wg_frags<DT>(ds, s);
        ra_wg_fence();
        rb_wg_xb<DT, HD, 64>(acc, ds, cK);    // dq += dS K
        ra_wg_commit();
        ra_wg_wait<0>();
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    rb_store_dq<REL, ND>(acc, dw, dq, d_rel_w, qrow0, r0, Sq, D, kw, scale, g, t);
    if constexpr (REL == bwd_bias::GENERIC) {
        __syncthreads();
        const int rows = min(BM, Sq - m0);
        for (int c = tid; c < rows * kh; c += NT) d_rel_h[(qrow0 + m0) * kh + c] = sDH[c];
        for (int c = tid; c < rows * kw; c += NT) d_rel_w[(qrow0 + m0) * kw + c] = sDW[c];
    }
}

// ---- dk and dv, per block of 64 NWG keys
// Shared memory (after 1024-byte alignment): the block's K and V tiles (64
// NWG, HD), two stages of a query tile's q and dO (64, HD), then float32 per
// stage its rows' lse2 (64), delta (64) and the terms of the block's keys:
// rel_h columns ky_lo .. ky_lo + nh - 1 (64, nh) and rel_w (64, rb_sw_k).
// nh: NWG in the key-rows mode, else min(kh, (64 NWG - 1) / kw + 2).
template <int DT, int HD, int REL, int NWG>
__global__ void __launch_bounds__(128 * NWG)
relattn_bwd_wg_dkv(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                   const u16* __restrict__ dout, const float* __restrict__ rel_h, const float* __restrict__ rel_w,
                   const float* __restrict__ lse2, const float* __restrict__ delta,
                   u16* __restrict__ dk, u16* __restrict__ dv,
                   int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale, int nh)
{
    static_assert(HD == 64 || HD == 80, "head_dim 64 or 80");
    constexpr int NT = 128 * NWG, NK = 64 * NWG, ND = HD / 8;
    constexpr u32 KB = NK * HD * 2, QB = 64 * HD * 2;
    extern __shared__ __align__(128) unsigned char ra_smem_raw[];
    const u32 sraw = ra_smem_addr(ra_smem_raw);
    const u32 sbase = (sraw + 1023u) & ~1023u;
    const u32 sK = sbase, sV = sbase + KB, sST = sbase + 2 * KB;   // stage s: q at sST + 2 s QB, dO after it
    const int SW = rb_sw_k(REL, kw);
    const int NH = REL == bwd_bias::KEY_ROWS ? NWG : nh;
    const int FST = 128 + (REL == bwd_bias::NONE ? 0 : 64 * (NH + SW));   // floats of a stage
    float* fsm = reinterpret_cast<float*>(ra_smem_raw + (sbase - sraw) + 2 * KB + 4 * QB);
    const int tid = threadIdx.x, wg = tid >> 7, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int ktiles = (Sk + NK - 1) / NK;
    const int bh = blockIdx.x / ktiles;
    const int kb0 = (blockIdx.x - bh * ktiles) * NK;
    const int key0 = kb0 + warp * 16;
    const long long qrow0 = (long long)bh * Sq;
    const u16* qb = q + qrow0 * D;
    const u16* ob = dout + qrow0 * D;

    const RbTileRows<HD, NK, NT> rows_k(tid);
    const RbTileRows<HD, 64, NT> rows_q(tid);
    rows_k.copy(sK, k + (long long)bh * Sk * D, D, kb0, Sk, D);
    rows_k.copy(sV, v + (long long)bh * Sk * D, D, kb0, Sk, D);
    const int ky_lo = (REL == bwd_bias::NONE) ? 0 : kb0 / kw;
    int hcol[2], wcol[2];   // the thread's keys' columns in the staged terms
    rb_key_cols<REL>(hcol, wcol, key0, Sk, kw, inv_kw, ky_lo, g);

    float ak[ND][4], av[ND][4];
    rb_zero(ak);
    rb_zero(av);

    const int ntiles = (Sq + 63) / 64;
    auto load = [&](int n, int stage) {
        const int i0 = n * 64;
        const u32 dst = sST + (u32)stage * 2u * QB;
        rows_q.copy(dst, qb, D, i0, Sq, D);
        rows_q.copy(dst + QB, ob, D, i0, Sq, D);
        rb_stage_f32<REL, NWG>(fsm + stage * FST, lse2 + qrow0, delta + qrow0, rel_h + qrow0 * kh, rel_w + qrow0 * kw,
                               i0, Sq, kh, kw, ky_lo, NH, SW, tid);
        ra_cp_commit();
    };
    load(0, 0);   // with the K and V tiles
    for (int n = 0; n < ntiles; ++n) {
        const int i0 = n * 64, stage = rb_next<true>(n, ntiles, load);
        const u32 cQ = sST + (u32)stage * 2u * QB, cO = cQ + QB;
        const float* sL = fsm + stage * FST;
        const float* sD = sL + 64;
        const float* sRH = sL + 128;
        const float* sRW = sRH + 64 * NH;

        float s[8][4], dp[8][4];                  // transposed: rows keys, columns queries
        u32 pf[4][4], df[4][4];
        ra_wg_fence();
        rb_wg_abt<DT, HD, NK, 64>(s, sK, wg * 64, cQ);
        ra_wg_commit();
        rb_wg_abt<DT, HD, NK, 64>(dp, sV, wg * 64, cO);
        ra_wg_commit();
        ra_wg_wait<1>();    // S^T; dP^T may be in flight
        rb_key_probs<REL, false>(s, dp, i0, Sq, sL, sD, sRH, sRW, NH, SW, hcol, wcol, scale_log2, t);   // P^T
        rb_wg_frags<DT>(pf, s);
        ra_wg_fence();
        rb_wg_xb<DT, HD, 64>(av, pf, cO);   // dv += P^T dO
        ra_wg_commit();
        ra_wg_wait<1>();    // dP^T; dv's products may be in flight
        rb_wg_key_ds(dp, s, sD, t);
        rb_wg_frags<DT>(df, dp);
        ra_wg_fence();
        rb_wg_xb<DT, HD, 64>(ak, df, cQ);   // dk += dS^T q
        ra_wg_commit();
        ra_wg_wait<0>();
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    rb_store_dkv<DT, ND>(ak, av, dk, dv, bh, key0, Sk, D, scale, g, t);
}
