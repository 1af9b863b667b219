// The relative-position terms as their own kernels (terms.py launches them),
// for the attention kernels that take rel_h / rel_w computed:
//   relattn_relterms<DT, BN>          float32 FMA, q float16 / bfloat16 / float32
//   relattn_relterms_mma<DT, HD, TT>  16-bit q on mma.sync, float32 tables as
//                                     hi + lo 16-bit halves
// Needs common.cuh and mma_sync.cuh before it.
//
// rel_h[bh, y*qw + x, ky] = sum_c q[bh, y*qw + x, c] * Rh[y, ky, c]
// rel_w[bh, y*qw + x, kx] = sum_c q[bh, y*qw + x, c] * Rw[x, kx, c]
// float32 accumulation; q is float16 (DT 0), bfloat16 (DT 1) or float32 (DT 2)
// with element strides (batch, head, row) and last stride 1; tables float32
// contiguous (rows, D), row kk of group grp at idx[grp * K + kk] (the int32
// index table of get_rel_pos, or an identity index for gathered tables).
// Grouped GEMM: group = y (rel_h, rows (bh, x)) or x (rel_w,
// rows (bh, y)); output tiles of BM x BN, 256 threads, 4 x CN per thread.
// BN = 64 (BM 64) for large grids; 32 (BM 64) or 16 (BM 128) for small ones
// (SAM's 14 x 14 windows: a 64-column tile would be 78% padding).
template <int DT>
__device__ __forceinline__ float ra_load_f32(const void* p, long long i) {
    if (DT == 2) return reinterpret_cast<const float*>(p)[i];
    const u16 u = reinterpret_cast<const u16*>(p)[i];
    if (DT == 1) return __uint_as_float(((u32)u) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}

template <int DT, int BN>
__global__ void __launch_bounds__(256)
relattn_relterms(const void* __restrict__ q, const float* __restrict__ Rh, const float* __restrict__ Rw,
                 const int* __restrict__ idx_h, const int* __restrict__ idx_w,
                 float* __restrict__ rel_h, float* __restrict__ rel_w,
                 int H, int qh, int qw, int D, int kh, int kw,
                 long long qsb, long long qsh, long long qss, int BH, int nblk_h)
{
    constexpr int CN = (BN >= 64) ? 4 : 2;      // columns per thread
    constexpr int TX = BN / CN, TY = 256 / TX;  // thread grid
    constexpr int BM = 4 * TY;                  // rows per tile, 4 per thread
    static_assert(TX * CN == BN && TX * TY == 256, "tile");
    __shared__ __align__(16) float sA[32][BM + 4];
    __shared__ __align__(16) float sB[32][BN + 4];
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    const int Sq = qh * qw;
    int blk = blockIdx.x;
    const bool is_h = blk < nblk_h;
    if (!is_h) blk -= nblk_h;
    const int G = is_h ? qh : qw;            // groups
    const int inner = is_h ? qw : qh;        // rows per bh within a group
    const int M = BH * inner;
    const int K = is_h ? kh : kw;
    const int mtiles = (M + BM - 1) / BM, ntiles = (K + BN - 1) / BN;
    const int grp = blk / (mtiles * ntiles);
    const int rem = blk - grp * (mtiles * ntiles);
    const int m0 = (rem / ntiles) * BM, n0 = (rem % ntiles) * BN;
    if (grp >= G) return;
    const float* T = is_h ? Rh : Rw;
    const int* idx = (is_h ? idx_h : idx_w) + (long long)grp * K;
    float* outp = is_h ? rel_h : rel_w;

    // q element offset / output offset of each block row (-1: past the end)
    __shared__ long long sQoff[BM];
    __shared__ long long sOoff[BM];
    for (int r = tid; r < BM; r += 256) {
        const int mr = m0 + r;
        long long qo = -1, oo = -1;
        if (mr < M) {
            const int bh = mr / inner, w = mr - (mr / inner) * inner;
            const int i = is_h ? grp * qw + w : w * qw + grp;
            const int b = bh / H, h = bh - (bh / H) * H;
            qo = b * qsb + h * qsh + (long long)i * qss;
            oo = ((long long)bh * Sq + i) * K;
        }
        sQoff[r] = qo;
        sOoff[r] = oo;
    }

    float acc[4][CN];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < CN; ++c) acc[a][c] = 0.f;

    for (int d0 = 0; d0 < D; d0 += 32) {
        __syncthreads();
        const int dd = tid & 31, d = d0 + dd;
#pragma unroll
        for (int it = 0; it < BM / 8; ++it) {
            const int r = (tid >> 5) + it * 8;
            const long long qo = sQoff[r];
            sA[dd][r] = (d < D && qo >= 0) ? ra_load_f32<DT>(q, qo + d) : 0.f;
        }
#pragma unroll
        for (int it = 0; it < BN / 8; ++it) {
            const int r = (tid >> 5) + it * 8, kk = n0 + r;
            sB[dd][r] = (d < D && kk < K) ? __ldg(T + (long long)__ldg(idx + kk) * D + d) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int e = 0; e < 32; ++e) {
            const float4 a4 = *reinterpret_cast<const float4*>(&sA[e][ty * 4]);
            float bv[CN];
            if constexpr (CN == 4) {
                const float4 b4 = *reinterpret_cast<const float4*>(&sB[e][tx * 4]);
                bv[0] = b4.x; bv[1] = b4.y; bv[2] = b4.z; bv[3] = b4.w;
            } else {
                const float2 b2 = *reinterpret_cast<const float2*>(&sB[e][tx * 2]);
                bv[0] = b2.x; bv[1] = b2.y;
            }
            const float av[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int c = 0; c < CN; ++c) acc[a][c] = fmaf(av[a], bv[c], acc[a][c]);
        }
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const long long oo = sOoff[ty * 4 + a];
        if (oo < 0) continue;
#pragma unroll
        for (int c = 0; c < CN; ++c) {
            const int kk = n0 + tx * CN + c;
            if (kk < K) outp[oo + kk] = acc[a][c];
        }
    }
}

// ------------------------------------------------- relative terms, tensor cores
// Same contract as relattn_relterms for float16 (DT 0) / bfloat16 (DT 1) q, on
// mma.sync: each float32 table value t is split into t_hi + t_lo (both 16-bit,
// t_lo = t - t_hi) and q . t = q . t_hi + q . t_lo is accumulated in float32,
// so the result matches float32 arithmetic to ~2^-17 relative. An infinite or
// NaN t_hi carries the value alone (t_lo = 0: t - t_hi would be NaN and turn a
// masking -inf into NaN); a float32 value beyond float16's range (|t| > 65504)
// with float16 q becomes +-inf. Blocks of 128
// threads compute 64 rows x 64 columns with the whole head dim (HD = D rounded
// up to 16, at most 128) in shared memory; column blocks past K are skipped.
template <int DT>
__device__ __forceinline__ u16 ra_to16(float x) {
    u16 r;
    if (DT == 1) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
template <int DT>
__device__ __forceinline__ float ra_from16(u16 u) {
    if (DT == 1) return __uint_as_float(((u32)u) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
    return f;
}

// t_lo of the split t = t_hi + t_lo, zero where t_hi is not finite.
template <int DT>
__device__ __forceinline__ u16 ra_split_lo(float x, u16 hi) {
    const float h = ra_from16<DT>(hi);
    return ra_finite(h) ? ra_to16<DT>(x - h) : (u16)0;
}

template <int TT>
__device__ __forceinline__ float ra_table_f32(const void* p, long long i) {
    if (TT == 2) return __ldg(reinterpret_cast<const float*>(p) + i);
    const u16 u = __ldg(reinterpret_cast<const unsigned short*>(p) + i);
    return ra_from16<TT>(u);
}

// Tables are the stored (L, D) embeddings (TT: 0 float16, 1 bfloat16, 2
// float32), read through the row index tables idx_h (qh, kh) and idx_w
// (qw, kw): Rh[y, ky, :] = table_h[idx_h[y, ky], :] (get_rel_pos's gather).
template <int DT, int HD, int TT>
__global__ void __launch_bounds__(128)
relattn_relterms_mma(const u16* __restrict__ q, const void* __restrict__ Th, const void* __restrict__ Tw,
                     const int* __restrict__ idx_h, const int* __restrict__ idx_w,
                     float* __restrict__ rel_h, float* __restrict__ rel_w,
                     int H, int qh, int qw, int D, int kh, int kw,
                     long long qsb, long long qsh, long long qss, int BH, int nblk_h, int vec)
{
    constexpr int SROW = HD + 8;
    __shared__ __align__(16) u16 sA[64 * SROW];
    __shared__ __align__(16) u16 sBh[64 * SROW];
    __shared__ __align__(16) u16 sBl[64 * SROW];
    __shared__ long long sQoff[64];
    __shared__ long long sOoff[64];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int Sq = qh * qw;
    int blk = blockIdx.x;
    const bool is_h = blk < nblk_h;
    if (!is_h) blk -= nblk_h;
    const int G = is_h ? qh : qw;
    const int inner = is_h ? qw : qh;
    const int M = BH * inner;
    const int K = is_h ? kh : kw;
    const int mtiles = (M + 63) / 64, ntiles = (K + 63) / 64;
    const int grp = blk / (mtiles * ntiles);
    const int rem = blk - grp * (mtiles * ntiles);
    const int m0 = (rem / ntiles) * 64, n0 = (rem % ntiles) * 64;
    if (grp >= G) return;
    const void* T = is_h ? Th : Tw;
    const int* tidx = (is_h ? idx_h : idx_w) + (long long)grp * K;
    float* outp = is_h ? rel_h : rel_w;
    __shared__ long long sToff[64];

    if (tid < 64) {
        const int mr = m0 + tid;
        long long qo = -1, oo = -1;
        if (mr < M) {
            const int bh = mr / inner, w = mr - (mr / inner) * inner;
            const int i = is_h ? grp * qw + w : w * qw + grp;
            const int b = bh / H, h = bh - (bh / H) * H;
            qo = b * qsb + h * qsh + (long long)i * qss;
            oo = ((long long)bh * Sq + i) * K;
        }
        sQoff[tid] = qo;
        sOoff[tid] = oo;
        const int kk = n0 + tid;
        sToff[tid] = (kk < K) ? (long long)tidx[kk] * D : -1;
    }
    __syncthreads();
    if (vec) {
        // 16-byte loads: q rows, strides and D multiples of 8 elements, 16-byte
        // aligned q and tables (checked by the caller)
        constexpr int CPR = HD / 8;
        for (int c = tid; c < 64 * CPR; c += 128) {
            const int r = c / CPR, d = (c - (c / CPR) * CPR) * 8;
            const long long qo = sQoff[r];
            uint4 a = make_uint4(0u, 0u, 0u, 0u);
            if (qo >= 0 && d < D) a = __ldg(reinterpret_cast<const uint4*>(q + qo + d));
            *reinterpret_cast<uint4*>(sA + r * SROW + d) = a;
            const long long to = sToff[r];
            float x[8];
            if (to >= 0 && d < D) {
                if (TT == 2) {
                    const float4 lo4 = __ldg(reinterpret_cast<const float4*>(reinterpret_cast<const float*>(T) + to + d));
                    const float4 hi4 = __ldg(reinterpret_cast<const float4*>(reinterpret_cast<const float*>(T) + to + d + 4));
                    x[0] = lo4.x; x[1] = lo4.y; x[2] = lo4.z; x[3] = lo4.w;
                    x[4] = hi4.x; x[5] = hi4.y; x[6] = hi4.z; x[7] = hi4.w;
                } else {
                    const uint4 w = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const u16*>(T) + to + d));
                    const u32 wv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        x[2 * e] = ra_from16<TT>((u16)(wv[e] & 0xffffu));
                        x[2 * e + 1] = ra_from16<TT>((u16)(wv[e] >> 16));
                    }
                }
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) x[e] = 0.f;
            }
            u32 ph[4], pl[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u16 h0 = ra_to16<DT>(x[2 * e]), h1 = ra_to16<DT>(x[2 * e + 1]);
                const u16 l0 = ra_split_lo<DT>(x[2 * e], h0), l1 = ra_split_lo<DT>(x[2 * e + 1], h1);
                ph[e] = (u32)h0 | ((u32)h1 << 16);
                pl[e] = (u32)l0 | ((u32)l1 << 16);
            }
            *reinterpret_cast<uint4*>(sBh + r * SROW + d) = make_uint4(ph[0], ph[1], ph[2], ph[3]);
            *reinterpret_cast<uint4*>(sBl + r * SROW + d) = make_uint4(pl[0], pl[1], pl[2], pl[3]);
        }
    } else {
        for (int c = tid; c < 64 * HD; c += 128) {
            const int r = c / HD, d = c - (c / HD) * HD;
            const long long qo = sQoff[r];
            sA[r * SROW + d] = (qo >= 0 && d < D) ? q[qo + d] : (u16)0;
            const long long to = sToff[r];
            const float x = (to >= 0 && d < D) ? ra_table_f32<TT>(T, to + d) : 0.f;
            const u16 hi = ra_to16<DT>(x);
            sBh[r * SROW + d] = hi;
            sBl[r * SROW + d] = ra_split_lo<DT>(x, hi);
        }
    }
    __syncthreads();

    const int ncols = min(64, K - n0);
    const int mi = lane >> 3, ri = lane & 7;
    const u32 a_base = ra_smem_addr(sA + (warp * 16 + (mi & 1) * 8 + ri) * SROW + (mi >> 1) * 8);
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;
    const u32 bh_base = ra_smem_addr(sBh + k_off), bl_base = ra_smem_addr(sBl + k_off);
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
        u32 a[4];
        ra_ldsm_x4(a[0], a[1], a[2], a[3], a_base + (u32)(ks * 16 * 2));
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
            if (jp * 16 < ncols) {
                const u32 off = (u32)((jp * 16 * SROW + ks * 16) * 2);
                u32 b0, b1, b2, b3;
                ra_ldsm_x4(b0, b1, b2, b3, bh_base + off);
                ra_mma<DT>(acc[2 * jp], a, b0, b1);
                ra_mma<DT>(acc[2 * jp + 1], a, b2, b3);
                ra_ldsm_x4(b0, b1, b2, b3, bl_base + off);
                ra_mma<DT>(acc[2 * jp], a, b0, b1);
                ra_mma<DT>(acc[2 * jp + 1], a, b2, b3);
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const long long oo = sOoff[warp * 16 + rr * 8 + g];
        if (oo < 0) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = j * 8 + 2 * t + e;
                if (col < ncols) outp[oo + n0 + col] = acc[j][rr * 2 + e];
            }
    }
}
