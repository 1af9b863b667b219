// relattn_wg<DT, HD, NWG, BN, REL, ST>: Hopper (sm_90a) attention with the 2-D
// decomposed relative-position terms on warpgroup tensor-core instructions
// (wgmma), one or two warpgroups per block, K / V tiles by cp.async. Needs
// common.cuh, the wgmma wrappers and sm90_common.cuh before it.
//
//   logit[i, j] = scale * q_i . k_j + rel_h[i, j / k_w] + rel_w[i, j % k_w]
//   out_i       = sum_j softmax_j(logit[i, :]) v_j
//
//   DT  0 = float16, 1 = bfloat16 (16-bit data as raw words)
//   HD  head_dim rounded up to 16 (columns >= D read as zeros)
//   NWG warpgroups per block, each owning 64 query rows (BLOCK_M = 64 * NWG)
//   BN  keys per tile (64 or 128)
//   ST  K/V shared-memory stages (2: double buffering, 3: two tiles in flight)
//   REL the bias mode (wg_bias below)
//
// Per key tile: S = Q K^T (wgmma, both operands in shared memory), the bias
// and the online softmax in registers (float32), O += P V (wgmma, P from
// registers, V in shared memory read N-major). K/V tiles are double-buffered
// with cp.async. Shared-memory operands use the no-swizzle canonical layout:
// 8 rows x 16 bytes "core matrices" of 128 contiguous bytes; chunk c (16
// bytes) of row r of a tile lives at byte ((r / 8) * (HD / 8) + c) * 128 +
// (r % 8) * 16, so K-adjacent core matrices are 128 bytes apart and row
// groups HD * 16 bytes apart (the same formula for Q, K and V).

// The bias modes (REL), as families/wg.py's Bias numbers them.
namespace wg_bias {
constexpr int NONE = 0;        // no relative terms
constexpr int KEY_ROWS = 1;    // k_w == 64: rel_w kept in registers, rel_h one value per row per
                               // 64 keys
constexpr int GENERIC = 2;     // any k_h, k_w: the rel_h / rel_w rows of the block's queries
                               // cached in shared memory
constexpr int WHOLE_ROW = 3;   // k_w == BN: one whole key row per tile, rel_w in registers, rel_h
                               // one value per row per tile
}

// q, k, v: 16-bit data, element strides (batch, head, row); last-dim stride 1,
// row strides multiples of 8, 16-byte aligned base, D a multiple of 8.
// rel_h: (B*H, Sq, kh) float32, rel_w: (B*H, Sq, kw) float32, contiguous.
// out: (B*H, Sq, D) contiguous. lbo/sbo: descriptor strides (bytes) of the
// K-major operands (Q, K) and of the N-major V.

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
    // KEY_ROWS / WHOLE_ROW: k_w known at compile time (KWC), rel_w of a thread's columns
    // in registers, NU whole key rows per tile
    constexpr bool RREG = (REL == wg_bias::KEY_ROWS || REL == wg_bias::WHOLE_ROW);
    constexpr int KWC = (REL == wg_bias::KEY_ROWS) ? 64 : BN;
    constexpr int RW8 = KWC / 8;            // 8-column blocks of one key row
    constexpr int NU = RREG ? BN / KWC : 1;
    extern __shared__ __align__(128) unsigned char ra_smem_raw[];
    const u32 sraw = ra_smem_addr(ra_smem_raw);
    const u32 sbase = (sraw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
    const u32 sQ = sbase;
    const u32 sKV = sbase + QBYTES;         // stage s: K at sKV + 2 s TBYTES, V after it
    float* sRel = reinterpret_cast<float*>(ra_smem_raw + (sbase - sraw) + QBYTES + 2 * ST * TBYTES);   // GENERIC

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
    // RREG: rel_w[i, c] for this thread's columns c = 8 j + 2 t + e (j < RW8)
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
    // GENERIC: rows of rel_h (kh floats) then rel_w (kw floats) per block row
    const int relw = (kh + kw) | 1;   // odd row stride: rows g = 0..7 on distinct banks
    if (REL == wg_bias::GENERIC) {
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
        // rel_h for this tile (RREG: one ky per key row of the tile)
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
        if (REL == wg_bias::GENERIC) {
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
        // GENERIC carries rel_h in the scores, RREG per key row in off
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
    u16* ob = out + (long long)bh * Sq * D;
    const int bad = ra_wg_store_rows<DT, HD>(ob, o, inv_l, rows, Sq, D, t);
    // the rows left non-finite are recomputed exactly (ra_exact_row)
    const auto src = ra_given_terms_src<DT>(qb, kb, vb, qss, kss, vss, REL != wg_bias::NONE, rel_h, rel_w, bh,
                                            Sq, Sk, D, kh, kw);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
        ra_fix_rows_if<4>((bad >> rr) & 1, rows[rr], [&](int row) {
            ra_exact_row<DT>(src, row, scale_log2, ob + (long long)row * D, tid & 31);
        });
}
