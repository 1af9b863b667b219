// relattn_mma<DT, HD, MW, REL>: flash-style attention with the 2-D decomposed
// relative-position terms added per key tile (the S x S bias is never
// materialized), float16 (DT 0) / bfloat16 (DT 1) on mma.sync m16n8k16:
//
//   logit[i, j] = scale * q_i . k_j + rel_h[i, j / k_w] + rel_w[i, j % k_w]
//   out_i       = sum_j softmax_j(logit[i, :]) v_j
//
// q.k, the softmax statistics and p.v accumulate in float32. HD = head_dim
// rounded up to 16 (columns >= D zero-filled); 4 warps, each owning MW groups
// of 16 query rows (BLOCK_M = 64 * MW); key tiles of 64 double-buffered in
// shared memory by cp.async. Needs common.cuh and mma_sync.cuh before it.

// The bias modes (REL), as families/mma.py's Bias numbers them.
namespace mma_bias {
constexpr int NONE = 0;       // no relative terms
constexpr int KEY_ROWS = 1;   // k_w == 64: rel_w tile-invariant, kept in registers (MW 2: shared
                              // memory); rel_h one value per row per tile
constexpr int GENERIC = 2;    // any k_h, k_w: both terms looked up per key
}

// q, k, v: 16-bit data, element strides (batch, head, row); last-dim stride 1,
// row strides multiples of 8, base 16-byte aligned, D a multiple of 8.
// rel_h: (B*H, Sq, kh) float32 contiguous, rel_w: (B*H, Sq, kw) float32.
// out: (B*H, Sq, D) contiguous.
template <int DT, int HD, int MW, int REL>
__global__ void __launch_bounds__(128)
relattn_mma(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
            const float* __restrict__ rel_h, const float* __restrict__ rel_w,
            u16* __restrict__ out,
            int H, int Sq, int Sk, int D, int kh, int kw,
            long long qsb, long long qsh, long long qss,
            long long ksb, long long ksh, long long kss,
            long long vsb, long long vsh, long long vss,
            float scale_log2, float inv_kw)
{
    constexpr int BM = 64 * MW;
    constexpr int BN = 64;
    constexpr int SROW = HD + 8;          // padded smem row (16 B) -> conflict-free ldmatrix
    constexpr int KQ = HD / 16;           // k-steps over the head dim
    constexpr int ND = HD / 8;            // 8-wide output column blocks
    constexpr int TILE = BN * SROW;       // elements per K (or V) tile

    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    u16* smem = reinterpret_cast<u16*>(ra_smem_raw);

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    const int mtiles = (Sq + BM - 1) / BM;
    const int mt = blockIdx.x % mtiles;
    const int bh = blockIdx.x / mtiles;
    const int b = bh / H, h = bh - b * H;

    const u16* qb = q + b * qsb + h * qsh;
    const u16* kb = k + b * ksb + h * ksh;
    const u16* vb = v + b * vsb + h * vsh;

    // rows owned by this thread: mg in [0, MW), half in {0 (g), 1 (g+8)}
    int rows[MW][2];
#pragma unroll
    for (int mg = 0; mg < MW; ++mg) {
        rows[mg][0] = mt * BM + warp * (16 * MW) + mg * 16 + g;
        rows[mg][1] = rows[mg][0] + 8;
    }

    // ---- Q fragments straight from global (once per block)
    u32 qf[MW][KQ][4];
#pragma unroll
    for (int mg = 0; mg < MW; ++mg) {
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int col = kk * 16 + 2 * t + hf * 8;
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const int r = rows[mg][rr];
                    u32 val = 0u;
                    if (r < Sq && col < D)
                        val = *reinterpret_cast<const u32*>(qb + (long long)r * qss + col);
                    qf[mg][kk][hf * 2 + rr] = val;
                }
            }
        }
    }

    // ---- relative terms
    const float* rh_row[MW][2];
    const float* rw_row[MW][2];
#pragma unroll
    for (int mg = 0; mg < MW; ++mg)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = min(rows[mg][rr], Sq - 1);
            rh_row[mg][rr] = rel_h + ((long long)bh * Sq + r) * kh;
            rw_row[mg][rr] = rel_w + ((long long)bh * Sq + r) * kw;
        }
    // KR (KEY_ROWS): rel_w[i, c] for this thread's 16 key columns, times log2(e);
    // in registers (RW_REG) for MW == 1, in shared memory (after the K/V
    // stages, RW_SMEM) for MW == 2.
    constexpr bool KR = (REL == mma_bias::KEY_ROWS);
    constexpr bool RW_SMEM = (KR && MW == 2);
    constexpr bool RW_REG = (KR && !RW_SMEM);
    constexpr int SRW = 72;                         // padded row of the rel_w cache (floats)
    float* sRW = reinterpret_cast<float*>(smem + 4 * TILE);
    float rwc[RW_REG ? MW : 1][RW_REG ? 2 : 1][RW_REG ? 16 : 1];
    if (RW_SMEM) {
        for (int c = tid; c < BM * 32; c += 128) {
            const int r = c >> 5, cc = (c & 31) * 2;
            const int row = min(mt * BM + r, Sq - 1);
            const float2 w2 = *reinterpret_cast<const float2*>(rel_w + ((long long)bh * Sq + row) * kw + cc);
            *reinterpret_cast<float2*>(sRW + r * SRW + cc) = make_float2(w2.x * RA_LOG2E, w2.y * RA_LOG2E);
        }
        // made visible by the first __syncthreads() of the tile loop
    } else if (KR) {
#pragma unroll
        for (int mg = 0; mg < MW; ++mg)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float2 w2 = *reinterpret_cast<const float2*>(rw_row[mg][rr] + j * 8 + 2 * t);
                    rwc[RW_REG ? mg : 0][RW_REG ? rr : 0][RW_REG ? 2 * j : 0] = w2.x * RA_LOG2E;
                    rwc[RW_REG ? mg : 0][RW_REG ? rr : 0][RW_REG ? 2 * j + 1 : 0] = w2.y * RA_LOG2E;
                }
    }

    // ---- tile loader
    auto load_tile = [&](int stage, int j0) {
        u16* dK = smem + stage * 2 * TILE;
        u16* dV = dK + TILE;
        constexpr int CH = HD / 8;
#pragma unroll
        for (int c = tid; c < BN * CH; c += 128) {
            const int r = c / CH, cc = c - (c / CH) * CH;
            const int key = j0 + r, col = cc * 8;
            const bool ok = (key < Sk) && (col < D);
            const u16* sk = ok ? kb + (long long)key * kss + col : kb;
            const u16* sv = ok ? vb + (long long)key * vss + col : vb;
            ra_cp_async16(ra_smem_addr(dK + r * SROW + col), sk, ok ? 16 : 0);
            ra_cp_async16(ra_smem_addr(dV + r * SROW + col), sv, ok ? 16 : 0);
        }
        ra_cp_commit();
    };

    float o[MW][ND][4];
#pragma unroll
    for (int mg = 0; mg < MW; ++mg)
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mg][d][e] = 0.f;
    float m_run[MW][2], l_run[MW][2];
#pragma unroll
    for (int mg = 0; mg < MW; ++mg)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) { m_run[mg][rr] = -RA_INF; l_run[mg][rr] = 0.f; }

    // per-lane ldmatrix offsets (elements)
    const int mi = lane >> 3, ri = lane & 7;
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;   // K: non-trans
    const int v_off = ((mi & 1) * 8 + ri) * SROW + (mi >> 1) * 8;   // V: trans

    const int ntiles = (Sk + BN - 1) / BN;
    load_tile(0, 0);

    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * BN;
        // rel_h for this tile (KR: one ky per tile)
        float rh1[MW][2];
        if (KR) {
#pragma unroll
            for (int mg = 0; mg < MW; ++mg)
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) rh1[mg][rr] = __ldg(rh_row[mg][rr] + n) * RA_LOG2E;
        }
        if (n + 1 < ntiles) {
            load_tile((n + 1) & 1, j0 + BN);
            ra_cp_wait<1>();
        } else {
            ra_cp_wait<0>();
        }
        __syncthreads();

        const u16* cK = smem + (n & 1) * 2 * TILE;
        const u16* cV = cK + TILE;
        const u32 kaddr = ra_smem_addr(cK + k_off);
        const u32 vaddr = ra_smem_addr(cV + v_off);

        // ---- S = Q K^T
        float s[MW][8][4];
#pragma unroll
        for (int mg = 0; mg < MW; ++mg)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mg][j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
            for (int jp = 0; jp < 4; ++jp) {
                u32 b0, b1, b2, b3;
                ra_ldsm_x4(b0, b1, b2, b3, kaddr + (u32)((jp * 16 * SROW + kk * 16) * 2));
#pragma unroll
                for (int mg = 0; mg < MW; ++mg) {
                    ra_mma<DT>(s[mg][2 * jp], qf[mg][kk], b0, b1);
                    ra_mma<DT>(s[mg][2 * jp + 1], qf[mg][kk], b2, b3);
                }
            }
        }

        // ---- scale, relative terms, key mask (log2 domain)
        const bool partial = (j0 + BN > Sk);
        if (REL == mma_bias::GENERIC) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = j0 + j * 8 + 2 * t + e;
                    if (key < Sk) {
                        int ky, kx;
                        ra_split_key(key, kw, inv_kw, ky, kx);
#pragma unroll
                        for (int mg = 0; mg < MW; ++mg)
#pragma unroll
                            for (int rr = 0; rr < 2; ++rr) {
                                const float bias = (__ldg(rh_row[mg][rr] + ky) + __ldg(rw_row[mg][rr] + kx)) * RA_LOG2E;
                                s[mg][j][rr * 2 + e] = fmaf(s[mg][j][rr * 2 + e], scale_log2, bias);
                            }
                    } else {
#pragma unroll
                        for (int mg = 0; mg < MW; ++mg)
#pragma unroll
                            for (int rr = 0; rr < 2; ++rr) s[mg][j][rr * 2 + e] = -RA_INF;
                    }
                }
            }
        } else if (RW_SMEM) {
#pragma unroll
            for (int mg = 0; mg < MW; ++mg)
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const float* wrow = sRW + (warp * (16 * MW) + mg * 16 + rr * 8 + g) * SRW + 2 * t;
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const float2 w2 = *reinterpret_cast<const float2*>(wrow + j * 8);
                        s[mg][j][rr * 2] = fmaf(s[mg][j][rr * 2], scale_log2, w2.x);
                        s[mg][j][rr * 2 + 1] = fmaf(s[mg][j][rr * 2 + 1], scale_log2, w2.y);
                    }
                }
        } else {
#pragma unroll
            for (int mg = 0; mg < MW; ++mg)
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
#pragma unroll
                        for (int rr = 0; rr < 2; ++rr) {
                            float bias = 0.f;   // rel_h (KR): added to the row maximum
                            if (KR)
                                bias = rwc[RW_REG ? mg : 0][RW_REG ? rr : 0][RW_REG ? 2 * j + e : 0];
                            s[mg][j][rr * 2 + e] = fmaf(s[mg][j][rr * 2 + e], scale_log2, bias);
                        }
            if (partial) {
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int key = j0 + j * 8 + 2 * t + e;
                        if (key >= Sk) {
#pragma unroll
                            for (int mg = 0; mg < MW; ++mg)
#pragma unroll
                                for (int rr = 0; rr < 2; ++rr) s[mg][j][rr * 2 + e] = -RA_INF;
                        }
                    }
            }
        }

        // ---- online softmax
#pragma unroll
        for (int mg = 0; mg < MW; ++mg) {
            float off[2] = {0.f, 0.f}, alpha[2];
            if (KR) {
                off[0] = rh1[mg][0];
                off[1] = rh1[mg][1];
            }
            ra_online_softmax<8>(&s[mg][0][0], off, m_run[mg], l_run[mg], alpha);
            ra_rescale<ND>(&o[mg][0][0], alpha);
        }

        // ---- O += P V
#pragma unroll
        for (int kk2 = 0; kk2 < 4; ++kk2) {
            u32 pa[MW][4];
#pragma unroll
            for (int mg = 0; mg < MW; ++mg) {
                pa[mg][0] = ra_pack<DT>(s[mg][2 * kk2][0], s[mg][2 * kk2][1]);
                pa[mg][1] = ra_pack<DT>(s[mg][2 * kk2][2], s[mg][2 * kk2][3]);
                pa[mg][2] = ra_pack<DT>(s[mg][2 * kk2 + 1][0], s[mg][2 * kk2 + 1][1]);
                pa[mg][3] = ra_pack<DT>(s[mg][2 * kk2 + 1][2], s[mg][2 * kk2 + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < ND / 2; ++dp) {
                u32 b0, b1, b2, b3;
                ra_ldsm_x4_t(b0, b1, b2, b3, vaddr + (u32)((kk2 * 16 * SROW + dp * 16) * 2));
#pragma unroll
                for (int mg = 0; mg < MW; ++mg) {
                    ra_mma<DT>(o[mg][2 * dp], pa[mg], b0, b1);
                    ra_mma<DT>(o[mg][2 * dp + 1], pa[mg], b2, b3);
                }
            }
        }
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    // ---- finalize and store; then the rows left non-finite are recomputed exactly
    u16* ob = out + (long long)bh * Sq * D;
    bool bad[MW][2];
#pragma unroll
    for (int mg = 0; mg < MW; ++mg) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const float inv = ra_row_inv(l_run[mg][rr]);
            const int r = rows[mg][rr];
            bad[mg][rr] = false;
            if (r < Sq) {
#pragma unroll
                for (int d = 0; d < ND; ++d) {
                    const int col = d * 8 + 2 * t;
                    if (col < D) {
                        const float x0 = o[mg][d][rr * 2] * inv, x1 = o[mg][d][rr * 2 + 1] * inv;
                        bad[mg][rr] |= !(ra_finite(x0) && ra_finite(x1));
                        *reinterpret_cast<u32*>(ob + (long long)r * D + col) = ra_pack<DT>(x0, x1);
                    }
                }
            }
        }
    }
    const auto src = ra_given_terms_src<DT>(qb, kb, vb, qss, kss, vss, REL != mma_bias::NONE, rel_h, rel_w, bh,
                                            Sq, Sk, D, kh, kw);
#pragma unroll
    for (int mg = 0; mg < MW; ++mg)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
            ra_fix_rows_if<4>(bad[mg][rr], rows[mg][rr], [&](int row) {
                ra_exact_row<DT>(src, row, scale_log2, ob + (long long)row * D, lane);
            });
}
