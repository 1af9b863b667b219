// relattn_win<DT, HD, KWP, FUSE>: attention with the relative-position terms
// for small key grids, float16 / bfloat16 on mma.sync. Needs common.cuh and
// mma_sync.cuh before it.
//
// Key grids with k_w <= KWP (16 or 32) and k_h * KWP <= 256 slots, e.g. SAM's
// 14 x 14 windows. The whole K and V of one (batch, head) stay in shared memory
// (dense, one row per key, loaded as one cp.async group per key tile; when
// every warp has a first query slice, that slice starts on tile 0 while the
// later tiles are in flight). The products see every key row padded to KWP
// slots: slot ky * KWP + kx reads K's shared row ky * k_w + kx, which for
// kx >= k_w is a key of the next row (KWP - k_w zero rows follow the last),
// masked by rel_w = -inf, and V's zero row there. Q is read one slice ahead.
// A key tile is TR = 64 / KWP whole key rows, so a thread's column (j, e) has
// key row j / (KWP / 8) of the tile and kx = (j % (KWP / 8)) * 8 + 2 t + e:
// rel_w is read once per query slice into registers, rel_h once per tile, and
// no per-score index arithmetic is left. Each warp runs 16-query slices
// (slice = group * SPB + warp + 4 i); blocks are (batch * head, group).
// FUSE = 0: rel_h / rel_w are given (same data contract as relattn_mma).
// FUSE = 1: the terms are computed here (KWP 16, tables of at most 32 rows):
// the tables (T: (L, D) 16-bit rows of q's dtype, dense, 16-byte aligned) sit
// in shared memory; per slice, G = Q T^T on the tensor cores for each table
// (float32 accumulation: the arithmetic of relattn_relterms_mma on 16-bit
// tables) goes to a per-warp scratch and is gathered through get_rel_pos's
// index tables idx_h (q_h, k_h) and idx_w (q_w, k_w):
// rel_h[i, ky] = G_h[i, idx_h[i / q_w, ky]].

// The scratch's index of (row, column): 8-column groups XOR-swizzled by row.
__device__ __forceinline__ int ra_win_swz(int row, int c) { return row * 32 + (c ^ ((row & 3) << 3)); }

// G = Q T^T for one table (16 query rows x 32 table rows; ldmatrix rows from
// tbase, as for K) into the warp's scratch (16 x 32 floats, 8-column groups
// XOR-swizzled by row: conflict-free float2 stores).
template <int DT, int HD>
__device__ __forceinline__ void ra_win_table_g(float* sg, const u32 (*qf)[4], u32 tbase, int L, int g, int t)
{
    constexpr int SROW = HD + 8;
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
            if (jp * 16 < L) {
                u32 b0, b1, b2, b3;
                ra_ldsm_x4(b0, b1, b2, b3, tbase + (u32)((jp * 16 * SROW + kk * 16) * 2));
                ra_mma<DT>(acc[2 * jp], qf[kk], b0, b1);
                ra_mma<DT>(acc[2 * jp + 1], qf[kk], b2, b3);
            }
        }
#pragma unroll
    for (int nb = 0; nb < 4; ++nb) {
        *reinterpret_cast<float2*>(sg + ra_win_swz(g, nb * 8 + 2 * t)) = make_float2(acc[nb][0], acc[nb][1]);
        *reinterpret_cast<float2*>(sg + ra_win_swz(g + 8, nb * 8 + 2 * t)) = make_float2(acc[nb][2], acc[nb][3]);
    }
    __syncwarp();
}

// A warp's A fragments of Q rows r0 and r0 + 8 (rows >= Sq and columns >= D: zero).
template <int KQ>
__device__ __forceinline__ void ra_win_load_q(u32 (*qf)[4], const u16* __restrict__ qb, int r0, int Sq,
                                              long long qss, int D, int t)
{
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int col = kk * 16 + 2 * t + hf * 8;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const int r = r0 + 8 * rr;
                qf[kk][hf * 2 + rr] = (r < Sq && col < D)
                    ? *reinterpret_cast<const u32*>(qb + (long long)r * qss + col) : 0u;
            }
        }
}

template <int DT, int HD, int KWP, int FUSE>
__global__ void __launch_bounds__(128)
relattn_win(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
            const float* __restrict__ rel_h, const float* __restrict__ rel_w,
            const u16* __restrict__ th, const u16* __restrict__ tw,
            const int* __restrict__ idx_h, const int* __restrict__ idx_w,
            u16* __restrict__ out,
            int H, int Sq, int Sk, int D, int kh, int kw,
            long long qsb, long long qsh, long long qss,
            long long ksb, long long ksh, long long kss,
            long long vsb, long long vsh, long long vss,
            float scale_log2, int groups, int spb, int Lh, int Lw, int qw)
{
    constexpr int SROW = HD + 8;          // padded smem row (16 B) -> conflict-free ldmatrix
    constexpr int KQ = HD / 16;
    constexpr int ND = HD / 8;
    constexpr int KB = KWP / 8;           // 8-column blocks per key row
    constexpr int TR = 64 / KWP;          // key rows per 64-column tile
    constexpr int HP = KWP / 16;          // 16-slot blocks per key row
    constexpr int CH = HD / 8;            // 16-byte chunks per row
    static_assert(!FUSE || KWP == 16, "fused terms: 16-slot key rows");

    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    const int xr = KWP - kw;                                         // zero rows after the keys of K
    u16* sK = reinterpret_cast<u16*>(ra_smem_raw);
    u16* sV = sK + (Sk + xr) * SROW;                                 // V: one zero row after the keys
    u16* sT = sV + (Sk + 1) * SROW;                                  // FUSE: tables h, w (32 rows each)
    float* sG = reinterpret_cast<float*>(sT + 2 * 32 * SROW);        // FUSE: 4 x 16 x 32 scratch
    unsigned char* sIh = reinterpret_cast<unsigned char*>(sG + 4 * 16 * 32);
    unsigned char* sIw = sIh + 256;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int grp = blockIdx.x % groups;
    const int bh = blockIdx.x / groups;
    const int b = bh / H, h = bh - b * H;
    const u16* qb = q + b * qsb + h * qsh;
    const u16* kb = k + b * ksb + h * ksh;
    const u16* vb = v + b * vsb + h * vsh;
    const int ntiles = (kh + TR - 1) / TR;   // <= 4 (k_h * KWP <= 256)
    const int nsl = (Sq + 15) / 16;
    // every warp has a first slice: the first round waits tile by tile
    const bool staged = nsl - grp * spb >= 4 && spb >= 4;

    // ---- K and V (one cp.async group per key tile; the zero row and the
    // tables go with the first)
    for (int n = 0; n < ntiles; ++n) {
        const int c1 = min(kh, (n + 1) * TR) * kw * CH;
        for (int c = n * TR * kw * CH + tid; c < c1; c += 128) {
            const int key = c / CH, col = (c - (c / CH) * CH) * 8;
            const bool ok = col < D;
            ra_cp_async16(ra_smem_addr(sK + key * SROW + col), ok ? kb + (long long)key * kss + col : kb, ok ? 16 : 0);
            ra_cp_async16(ra_smem_addr(sV + key * SROW + col), ok ? vb + (long long)key * vss + col : vb, ok ? 16 : 0);
        }
        if (n == 0) {
            for (int c = tid; c < xr * CH; c += 128)
                *reinterpret_cast<uint4*>(sK + Sk * SROW + (c / CH) * SROW + (c % CH) * 8) = make_uint4(0u, 0u, 0u, 0u);
            if (tid < CH) *reinterpret_cast<uint4*>(sV + Sk * SROW + tid * 8) = make_uint4(0u, 0u, 0u, 0u);
            if constexpr (FUSE) {
                for (int c = tid; c < 2 * 32 * CH; c += 128) {
                    const int tb = c / (32 * CH), r = (c / CH) & 31, col = (c - (c / CH) * CH) * 8;
                    const u16* src = tb ? tw : th;
                    const bool ok = r < (tb ? Lw : Lh) && col < D;
                    ra_cp_async16(ra_smem_addr(sT + (tb * 32 + r) * SROW + col), ok ? src + (long long)r * D + col : src,
                                  ok ? 16 : 0);
                }
            }
        }
        ra_cp_commit();
    }
    if constexpr (FUSE) {
        const int qh = Sq / qw;
        for (int i = tid; i < qh * kh; i += 128) sIh[i] = (unsigned char)__ldg(idx_h + i);
        for (int i = tid; i < qw * kw; i += 128) sIw[i] = (unsigned char)__ldg(idx_w + i);
    }
    if (!staged) ra_cp_wait<0>();
    __syncthreads();   // index tables, zero rows (and without staging K / V) visible to every warp

    // ldmatrix row addresses: lane (mi, ri) reads slot kx = hh * 16 + (8-row
    // matrix) + ri of 16-slot block hh of key row ky. K: shared row ky * k_w + kx,
    // past k_w a key of the next row (zero rows after the last): its score
    // gets rel_w = -inf (a non-finite key there gives the NaN its own slot
    // gives). V: past k_w the zero row, so P = 0 there meets 0, not a key's inf.
    const int mi = lane >> 3, ri = lane & 7;
    const u32 kstep = (u32)(kw * SROW * 2);
    u32 kbase[HP], vbase[HP], vstep[HP];
#pragma unroll
    for (int hh = 0; hh < HP; ++hh) {
        const int kxv = hh * 16 + (mi & 1) * 8 + ri;
        kbase[hh] = ra_smem_addr(sK + (hh * 16 + (mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8);
        vbase[hh] = ra_smem_addr(sV + (kxv < kw ? kxv * SROW : Sk * SROW) + (mi >> 1) * 8);
        vstep[hh] = kxv < kw ? kstep : 0u;
    }
    const u32 tbase = ra_smem_addr(sT + ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8);
    float* sg = sG + warp * 16 * 32;

    u32 qn[KQ][4];
    ra_win_load_q<KQ>(qn, qb, (grp * spb + warp) * 16 + g, Sq, qss, D, t);
    bool flagged = false;   // a row of this thread stored non-finite
    for (int si = warp; si < spb; si += 4) {
        const int sl = grp * spb + si;
        if (sl >= nsl) break;
        const int rows[2] = {sl * 16 + g, sl * 16 + g + 8};

        // Q fragments straight from global, loaded one slice ahead
        u32 qf[KQ][4];
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk)
#pragma unroll
            for (int e = 0; e < 4; ++e) qf[kk][e] = qn[kk][e];
        if (si + 4 < spb) ra_win_load_q<KQ>(qn, qb, sl * 16 + 64 + g, Sq, qss, D, t);
        // rel_w of this thread's KWP / 4 key columns (kx >= k_w: masked), log2 domain
        const float* rh_row[2];
        int ih_row[2];
        float rwc[2][KB][2];
        if constexpr (FUSE) {
            if (staged && si == warp) {   // tables in group 0
                switch (ntiles) {
                    case 1: ra_cp_wait<0>(); break;
                    case 2: ra_cp_wait<1>(); break;
                    case 3: ra_cp_wait<2>(); break;
                    default: ra_cp_wait<3>(); break;
                }
                __syncthreads();
            }
            __syncwarp();   // the previous slice's reads of the scratch are done
            ra_win_table_g<DT, HD>(sg, qf, tbase + (u32)(32 * SROW * 2), Lw, g, t);
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = min(rows[rr], Sq - 1);
            const float* wrow = rel_w + ((long long)bh * Sq + r) * kw;
            const unsigned char* iw = sIw;
            if constexpr (FUSE) {
                const int qy = r / qw;
                ih_row[rr] = qy * kh;
                iw = sIw + (r - qy * qw) * kw;
            } else {
                rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
            }
#pragma unroll
            for (int jj = 0; jj < KB; ++jj)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kx = jj * 8 + 2 * t + e;
                    float x = -RA_INF;
                    if (kx < kw)
                        x = (FUSE ? sg[ra_win_swz(g + 8 * rr, iw[kx])] : __ldg(wrow + kx)) * RA_LOG2E;
                    rwc[rr][jj][e] = x;
                }
        }
        if constexpr (FUSE) {
            __syncwarp();
            ra_win_table_g<DT, HD>(sg, qf, tbase, Lh, g, t);
        }
        float o[ND][4];
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
        float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f};

        for (int n = 0; n < ntiles; ++n) {
            if (staged && si == warp && (n > 0 || !FUSE)) {   // first round: key tile n has landed
                switch (ntiles - 1 - n) {
                    case 0: ra_cp_wait<0>(); break;
                    case 1: ra_cp_wait<1>(); break;
                    case 2: ra_cp_wait<2>(); break;
                    default: ra_cp_wait<3>(); break;
                }
                __syncthreads();
            }
            const int ky0 = n * TR;
            const int jv = min(TR, kh - ky0) * KB;     // column blocks holding keys
            float rh1[2][TR];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int u = 0; u < TR; ++u) {
                    float x = -RA_INF;
                    if (ky0 + u < kh)
                        x = (FUSE ? sg[ra_win_swz(g + 8 * rr, sIh[ih_row[rr] + ky0 + u])]
                                  : __ldg(rh_row[rr] + ky0 + u)) * RA_LOG2E;
                    rh1[rr][u] = x;
                }

            float s[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KQ; ++kk)
#pragma unroll
                for (int jp = 0; jp < 4; ++jp) {
                    if (2 * jp < jv) {
                        const int hh = jp % HP;
                        u32 b0, b1, b2, b3;
                        ra_ldsm_x4(b0, b1, b2, b3, kbase[hh] + (u32)(ky0 + jp / HP) * kstep + (u32)(kk * 32));
                        ra_mma<DT>(s[2 * jp], qf[kk], b0, b1);
                        ra_mma<DT>(s[2 * jp + 1], qf[kk], b2, b3);
                    }
                }
            // scale + bias (compile-time indices), masked slots -> -inf
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        s[j][rr * 2 + e] = fmaf(s[j][rr * 2 + e], scale_log2, rh1[rr][j / KB] + rwc[rr][j % KB][e]);

            {
                const float off[2] = {0.f, 0.f};
                float alpha[2];
                ra_online_softmax<8>(&s[0][0], off, m_run, l_run, alpha);
                ra_rescale<ND>(&o[0][0], alpha);
            }

#pragma unroll
            for (int kk2 = 0; kk2 < 4; ++kk2) {
                if (2 * kk2 < jv) {
                    const int hh = kk2 % HP;
                    const u32 vaddr = vbase[hh] + (u32)(ky0 + kk2 / HP) * vstep[hh];
                    u32 pa[4];
                    pa[0] = ra_pack<DT>(s[2 * kk2][0], s[2 * kk2][1]);
                    pa[1] = ra_pack<DT>(s[2 * kk2][2], s[2 * kk2][3]);
                    pa[2] = ra_pack<DT>(s[2 * kk2 + 1][0], s[2 * kk2 + 1][1]);
                    pa[3] = ra_pack<DT>(s[2 * kk2 + 1][2], s[2 * kk2 + 1][3]);
#pragma unroll
                    for (int dp = 0; dp < ND / 2; ++dp) {
                        u32 b0, b1, b2, b3;
                        ra_ldsm_x4_t(b0, b1, b2, b3, vaddr + (u32)(dp * 32));
                        ra_mma<DT>(o[2 * dp], pa, b0, b1);
                        ra_mma<DT>(o[2 * dp + 1], pa, b2, b3);
                    }
                }
            }
        }

        // store (a non-finite row: flagged, recomputed after the loop)
        u16* ob = out + (long long)bh * Sq * D;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const float inv = ra_row_inv(l_run[rr]);
            if (rows[rr] < Sq) {
#pragma unroll
                for (int d = 0; d < ND; ++d) {
                    const int col = d * 8 + 2 * t;
                    if (col < D) {
                        const float x0 = o[d][rr * 2] * inv, x1 = o[d][rr * 2 + 1] * inv;
                        flagged |= !(ra_finite(x0) && ra_finite(x1));
                        *reinterpret_cast<u32*>(ob + (long long)rows[rr] * D + col) = ra_pack<DT>(x0, x1);
                    }
                }
            }
        }
    }

    // The rows this warp stored non-finite, recomputed exactly (ra_exact_row)
    // after the loop: the warp looks at its rows of every slice again.
    if (__any_sync(0xffffffffu, flagged)) {
        u16* ob = out + (long long)bh * Sq * D;
        const RaRowSrc<DT, u16, float> src{qb, kb, vb, qss, kss, vss,
                                           FUSE ? nullptr : rel_h + (long long)bh * Sq * kh,
                                           FUSE ? nullptr : rel_w + (long long)bh * Sq * kw,
                                           FUSE ? th : nullptr, FUSE ? tw : nullptr, idx_h, idx_w,
                                           qw, Sk, D, kh, kw};
        for (int si = warp; si < spb && grp * spb + si < nsl; si += 4) {
#pragma unroll 1
            for (int rr = 0; rr < 2; ++rr) {
                const int r = (grp * spb + si) * 16 + g + 8 * rr;
                const bool bad = r < Sq && ra_row_nonfinite16<DT, HD>(ob + (long long)r * D, D, t);
                ra_fix_rows_if<4>(bad, r, [&](int row) {
                    ra_exact_row<DT>(src, row, scale_log2, ob + (long long)row * D, lane);
                });
            }
        }
    }
}
