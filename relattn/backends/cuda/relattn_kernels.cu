// relattn CUDA kernels: flash-style attention with 2-D decomposed relative
// position terms added per key tile (the S x S bias is never materialized).
//
//   logit[i, j] = scale * q_i . k_j + rel_h[i, j / k_w] + rel_w[i, j % k_w]
//   out_i       = sum_j softmax_j(logit[i, :]) v_j
//
// Compiled at run time by NVRTC through cupy.RawModule after the shared
// prelude relattn_common.cuh (types, PTX helpers); no headers are
// included (half-precision data travels as raw 16-bit words, conversions and
// tensor-core instructions are inline PTX), so it builds with NVRTC alone.
//
// Kernels
//   relattn_mma<DT, HD, MW, REL>  float16 (DT=0) / bfloat16 (DT=1) on tensor
//       cores (mma.sync m16n8k16); q.k, softmax statistics and p.v accumulate
//       in float32. HD = head_dim rounded up to 16 (columns >= D zero-filled),
//       4 warps, each warp owns MW groups of 16 query rows (BLOCK_M = 64*MW),
//       key tiles of 64 double-buffered in shared memory via cp.async.
//   relattn_simt<T, HD, REL>    float32 / float64, exact (plain FMA), SIMT.
//
// REL: 0 = no relative terms, 1 = k_w == 64 (rel_w tile-invariant, kept in
// registers; rel_h one value per row per tile), 2 = generic (any k_h, k_w).



// ---------------------------------------------------------------- PTX helpers
template <int DT>
__device__ __forceinline__ void ra_mma(float* c, const u32* a, u32 b0, u32 b1) {
    if (DT == 1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ void ra_ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void ra_ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// ------------------------------------------------------------ tensor-core kernel
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
    // REL == 1: rel_w[i, c] for this thread's 16 key columns, times log2(e);
    // in registers for MW == 1, in shared memory (after the K/V stages) for MW == 2.
    constexpr bool RW_SMEM = (REL == 1 && MW == 2);
    constexpr int SRW = 72;                         // padded row of the rel_w cache (floats)
    float* sRW = reinterpret_cast<float*>(smem + 4 * TILE);
    float rwc[(REL == 1 && !RW_SMEM) ? MW : 1][(REL == 1 && !RW_SMEM) ? 2 : 1][(REL == 1 && !RW_SMEM) ? 16 : 1];
    if (RW_SMEM) {
        for (int c = tid; c < BM * 32; c += 128) {
            const int r = c >> 5, cc = (c & 31) * 2;
            const int row = min(mt * BM + r, Sq - 1);
            const float2 w2 = *reinterpret_cast<const float2*>(rel_w + ((long long)bh * Sq + row) * kw + cc);
            *reinterpret_cast<float2*>(sRW + r * SRW + cc) = make_float2(w2.x * RA_LOG2E, w2.y * RA_LOG2E);
        }
        // made visible by the first __syncthreads() of the tile loop
    } else if (REL == 1) {
#pragma unroll
        for (int mg = 0; mg < MW; ++mg)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float2 w2 = *reinterpret_cast<const float2*>(rw_row[mg][rr] + j * 8 + 2 * t);
                    rwc[(REL == 1 && !RW_SMEM) ? mg : 0][(REL == 1 && !RW_SMEM) ? rr : 0][(REL == 1 && !RW_SMEM) ? 2 * j : 0] = w2.x * RA_LOG2E;
                    rwc[(REL == 1 && !RW_SMEM) ? mg : 0][(REL == 1 && !RW_SMEM) ? rr : 0][(REL == 1 && !RW_SMEM) ? 2 * j + 1 : 0] = w2.y * RA_LOG2E;
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
        // rel_h for this tile (REL == 1: one ky per tile)
        float rh1[MW][2];
        if (REL == 1) {
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
        if (REL == 2) {
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
                            float bias = 0.f;   // rel_h (REL 1): added to the row maximum
                            if (REL == 1)
                                bias = rwc[(REL == 1 && !RW_SMEM) ? mg : 0][(REL == 1 && !RW_SMEM) ? rr : 0][(REL == 1 && !RW_SMEM) ? 2 * j + e : 0];
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
            if (REL == 1) {
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

    // ---- finalize and store
    u16* ob = out + (long long)bh * Sq * D;
#pragma unroll
    for (int mg = 0; mg < MW; ++mg) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const float inv = ra_row_inv(l_run[mg][rr]);
            const int r = rows[mg][rr];
            if (r < Sq) {
#pragma unroll
                for (int d = 0; d < ND; ++d) {
                    const int col = d * 8 + 2 * t;
                    if (col < D)
                        *reinterpret_cast<u32*>(ob + (long long)r * D + col) =
                            ra_pack<DT>(o[mg][d][rr * 2] * inv, o[mg][d][rr * 2 + 1] * inv);
                }
            }
        }
    }
}

// ------------------------------------------------------- small-grid kernel
// relattn_win<DT, HD, KWP, FUSE>: float16 / bfloat16 on mma.sync for key grids
// with k_w <= KWP (16 or 32) and k_h * KWP <= 256 slots, e.g. SAM's 14 x 14
// windows. The whole K and V of one (batch, head) stay in shared memory
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

        u16* ob = out + (long long)bh * Sq * D;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const float inv = ra_row_inv(l_run[rr]);
            if (rows[rr] < Sq) {
#pragma unroll
                for (int d = 0; d < ND; ++d) {
                    const int col = d * 8 + 2 * t;
                    if (col < D)
                        *reinterpret_cast<u32*>(ob + (long long)rows[rr] * D + col) =
                            ra_pack<DT>(o[d][rr * 2] * inv, o[d][rr * 2 + 1] * inv);
                }
            }
        }
    }
}

// ------------------------------------------------------------ exact SIMT kernel
// float32 / float64, plain FMA. 256 threads as 16 x 16; each thread owns a
// 4 x 4 block of the 64 x 64 score tile and 4 rows x HD/16 columns of O.
// q, k, v: element strides (batch, head, row, col). rel_*: contiguous, type T.
template <typename T> __device__ __forceinline__ T ra_exp2_t(T x);
template <> __device__ __forceinline__ float ra_exp2_t<float>(float x) { return ra_exp2(x); }
template <> __device__ __forceinline__ double ra_exp2_t<double>(double x) { return exp2(x); }

template <typename T, int HD, int REL>
__global__ void __launch_bounds__(256)
relattn_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
             const T* __restrict__ rel_h, const T* __restrict__ rel_w,
             T* __restrict__ out,
             int H, int Sq, int Sk, int D, int kh, int kw,
             long long qsb, long long qsh, long long qss, long long qsd,
             long long ksb, long long ksh, long long kss, long long ksd,
             long long vsb, long long vsh, long long vss, long long vsd,
             T scale_log2, float inv_kw)
{
    constexpr int BM = 64, BN = 64;
    constexpr int NC = HD / 16;            // output columns per thread
    constexpr int LDT = BM + 4;            // transposed tiles: [HD][LDT]
    const T LOG2E = (T)1.4426950408889634;
    const T NEG_INF = -(T)RA_INF;

    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    T* sQ = reinterpret_cast<T*>(ra_smem_raw);   // [HD][LDT]  (d-major, rows contiguous)
    T* sK = sQ + HD * LDT;                       // [HD][LDT]  (d-major, keys contiguous)
    T* sV = sK + HD * LDT;                       // [BN][HD]
    T* sP = sV + BN * HD;                        // [BN][LDT]  (key-major, rows contiguous)

    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;

    const int mtiles = (Sq + BM - 1) / BM;
    const int mt = blockIdx.x % mtiles;
    const int bh = blockIdx.x / mtiles;
    const int b = bh / H, h = bh - b * H;
    const T* qb = q + b * qsb + h * qsh;
    const T* kb = k + b * ksb + h * ksh;
    const T* vb = v + b * vsb + h * vsh;
    const int m0 = mt * BM;

    // load Q tile transposed (zero-padded)
    for (int c = tid; c < BM * HD; c += 256) {
        const int r = c / HD, d = c - (c / HD) * HD;
        const int row = m0 + r;
        T val = (T)0;
        if (row < Sq && d < D) val = qb[(long long)row * qss + (long long)d * qsd];
        sQ[d * LDT + r] = val;
    }

    const T* rh_row[4];
    const T* rw_row[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int r = min(m0 + ty * 4 + a, Sq - 1);
        rh_row[a] = rel_h + ((long long)bh * Sq + r) * kh;
        rw_row[a] = rel_w + ((long long)bh * Sq + r) * kw;
    }

    T o[4][NC];
    T m_run[4], l_run[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        m_run[a] = NEG_INF;
        l_run[a] = (T)0;
#pragma unroll
        for (int c = 0; c < NC; ++c) o[a][c] = (T)0;
    }

    const int ntiles = (Sk + BN - 1) / BN;
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * BN;
        __syncthreads();   // previous tile fully consumed (and Q stored)
        for (int c = tid; c < BN * HD; c += 256) {
            const int r = c / HD, d = c - (c / HD) * HD;
            const int key = j0 + r;
            T kvl = (T)0, vvl = (T)0;
            if (key < Sk && d < D) {
                kvl = kb[(long long)key * kss + (long long)d * ksd];
                vvl = vb[(long long)key * vss + (long long)d * vsd];
            }
            sK[d * LDT + r] = kvl;
            sV[r * HD + d] = vvl;
        }
        __syncthreads();

        // relative terms for this tile (-inf past Sk); fetched before the q.k
        // loop where registers allow (hides the load latency), else after it
        constexpr bool PREFETCH = (HD <= 64) && sizeof(T) == 4;
        T bias[4][4];
        auto fetch_bias = [&]() {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int key = j0 + tx * 4 + c;
                int ky = 0, kx = 0;
                if (REL && key < Sk) ra_split_key(key, kw, inv_kw, ky, kx);
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    T bv = (T)0;
                    if (REL && key < Sk) bv = (rh_row[a][ky] + rw_row[a][kx]) * LOG2E;
                    bias[a][c] = (key < Sk) ? bv : NEG_INF;
                }
            }
        };
        if (PREFETCH) fetch_bias();

        T s[4][4];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[a][c] = (T)0;
#pragma unroll 8
        for (int d = 0; d < HD; ++d) {
            T qa[4], kb4[4];
#pragma unroll
            for (int a = 0; a < 4; ++a) qa[a] = sQ[d * LDT + ty * 4 + a];
#pragma unroll
            for (int c = 0; c < 4; ++c) kb4[c] = sK[d * LDT + tx * 4 + c];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[a][c] = fma(qa[a], kb4[c], s[a][c]);
        }

        if (!PREFETCH) fetch_bias();
        // scale + relative terms + mask (bias is -inf past Sk), log2 domain
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int a = 0; a < 4; ++a) s[a][c] = fma(s[a][c], scale_log2, bias[a][c]);

        // online softmax: a row's 64 scores live in the 16 lanes sharing ty
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            T mx = s[a][0];
#pragma unroll
            for (int c = 1; c < 4; ++c) mx = (s[a][c] > mx) ? s[a][c] : mx;
#pragma unroll
            for (int off = 1; off < 16; off <<= 1) {
                const T o2 = __shfl_xor_sync(0xffffffffu, mx, off);
                mx = (o2 > mx) ? o2 : mx;
            }
            const T m_new = (m_run[a] > mx) ? m_run[a] : mx;
            const T m_use = (m_new == NEG_INF) ? (T)0 : m_new;
            const T alpha = ra_exp2_t<T>(m_run[a] - m_use);
            m_run[a] = m_new;
            T sum = (T)0;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const T p = ra_exp2_t<T>(s[a][c] - m_use);
                s[a][c] = p;
                sum += p;
            }
            l_run[a] = l_run[a] * alpha + sum;   // per-thread partial
#pragma unroll
            for (int c = 0; c < NC; ++c) o[a][c] *= alpha;
        }
        // P to shared, key-major
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int a = 0; a < 4; ++a) sP[(tx * 4 + c) * LDT + ty * 4 + a] = s[a][c];
        __syncthreads();

        // O += P V ; thread's columns: tx + 16 * c
#pragma unroll 4
        for (int key = 0; key < BN; ++key) {
            T pa[4], vb4[NC];
#pragma unroll
            for (int a = 0; a < 4; ++a) pa[a] = sP[key * LDT + ty * 4 + a];
#pragma unroll
            for (int c = 0; c < NC; ++c) vb4[c] = sV[key * HD + tx + 16 * c];
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int c = 0; c < NC; ++c) o[a][c] = fma(pa[a], vb4[c], o[a][c]);
        }
    }

    T* ob = out + (long long)bh * Sq * D;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        T l = l_run[a];
#pragma unroll
        for (int off = 1; off < 16; off <<= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
        const T inv = (T)1 / l;
        const int row = m0 + ty * 4 + a;
        if (row < Sq) {
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const int col = tx + 16 * c;
                if (col < D) ob[(long long)row * D + col] = o[a][c] * inv;
            }
        }
    }
}

// ------------------------------------------------------------ relative terms
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
// so the result matches float32 arithmetic to ~2^-17 relative. Blocks of 128
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
                const u16 l0 = ra_to16<DT>(x[2 * e] - ra_from16<DT>(h0));
                const u16 l1 = ra_to16<DT>(x[2 * e + 1] - ra_from16<DT>(h1));
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
            sBl[r * SROW + d] = ra_to16<DT>(x - ra_from16<DT>(hi));
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

// ------------------------------------------- float32 on tensor cores (TF32)
// relattn_tf32<HD, SPLIT, REL>: float32 q, k, v on mma.sync m16n8k8 TF32.
// SPLIT = 3: every operand x is split into big = x rounded to TF32 (10-bit
// mantissa, to nearest) and small = x - big (exact in float32; the tensor
// core reads its top 10 mantissa bits), and a.b = a_big.b_big + a_big.b_small
// + a_small.b_big (3xTF32: float32-level error). SPLIT = 1: plain TF32
// (opt-in; ~1e-3 relative error, like PyTorch's allow_tf32).
// 4 warps x 16 query rows, 64-key tiles double-buffered with cp.async.
// The k index of each m16n8k8 product is free to map to any column as long as
// A and B agree: k slot t <-> column 2t and slot t + 4 <-> column 2t + 1 of
// each 8-column group. Then Q and K fragments are float2 loads, and for
// O += P V (k = keys) S's accumulator fragment is exactly P's A fragment.
// O is accumulated in two levels: each key tile's P V starts from zero and is
// added to O with a float32 FMA (the tensor cores' float32 accumulation
// truncates; a running O over hundreds of key blocks would collect that bias).
// q, k, v: float32, last stride 1, row strides multiples of 4, 16-byte aligned
// (the caller copies otherwise). rel_h / rel_w: float32 contiguous.
__device__ __forceinline__ void ra_mma_tf32(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// c[j] += a . b[j] for N column blocks j with SPLIT products each (small x
// big terms first: least significant), issued term by term over j so that
// consecutive products never wait on the same accumulator. abx / bbx: the big
// parts for the cross products (ab / bb, or the SAFE split's bigx).
template <int SPLIT, int N>
__device__ __forceinline__ void ra_mma_split(float (*c)[4], const u32* ab, const u32* as,
                                             const u32 (*bb)[2], const u32 (*bs)[2],
                                             const u32* abx, const u32 (*bbx)[2]) {
    if (SPLIT == 3) {
#pragma unroll
        for (int j = 0; j < N; ++j) ra_mma_tf32(c[j], as[0], as[1], as[2], as[3], bbx[j][0], bbx[j][1]);
#pragma unroll
        for (int j = 0; j < N; ++j) ra_mma_tf32(c[j], abx[0], abx[1], abx[2], abx[3], bs[j][0], bs[j][1]);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) ra_mma_tf32(c[j], ab[0], ab[1], ab[2], ab[3], bb[j][0], bb[j][1]);
}

// SAFE: the same kernel with the IEEE-safe split, run as a second pass over
// the blocks whose first pass flagged a non-finite l or o (an infinite q, k or
// v element makes the fast split's small part inf - inf = NaN where IEEE
// arithmetic gives +-inf or a zero weight; every such NaN reaches l or o). The
// first pass writes flags[block] (also when the true result is non-finite:
// the second pass then reproduces it exactly); the second pass leaves
// unflagged blocks at once.
// SH (SPLIT 3, not SAFE): 8 warps x 16 rows per block, and each K / V tile is
// split once per block into shared memory (the warps of SH 0 each split every
// element they read): the raw tile lands by cp.async, the block splits it
// into a stage of uint4 fragments (K: big c, big c + 1, small c, small c + 1
// per key and column pair; V: big, big, small, small of keys 2 t, 2 t + 1 per
// key pair and column), then loads the next raw tile while it computes. The
// flags are written per 64 rows, as the SH 0 grid of the SAFE pass reads them.
template <int HD, int SPLIT, int REL, int SAFE, int SH>
__global__ void __launch_bounds__(SH ? 256 : 128)
relattn_tf32(RA_F32_KERNEL_PARAMS)
{
    static_assert(!SH || (SPLIT == 3 && !SAFE), "SH: the fast 3xTF32 pass");
    constexpr int NT = SH ? 256 : 128;
    constexpr int BM = NT / 2, BN = 64;    // 16 rows per warp
    constexpr int QROW = HD + 8;           // Q / K rows: float2 fragments on distinct banks
    constexpr int VROW = HD + 4;           // V rows: banks 8 t + g
    constexpr int KT = BN * QROW, VT = BN * VROW;
    constexpr int ND = HD / 8;             // output column blocks
    // SH: split stage rows in uint4, padded so a quarter warp's 16-byte loads
    // meet distinct banks (K: rows g, g + 1 64 bytes apart mod 128; V: key
    // pairs t 32 bytes apart)
    constexpr int KSROW = HD / 2 + 4, VSROW = HD + 2;

    if (SAFE && flags[blockIdx.x] == 0) return;

    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    float* sQ = reinterpret_cast<float*>(ra_smem_raw);
    float* sKV = sQ + BM * QROW;           // stage s: K at sKV + s (KT + VT), V after it (SH: one stage)
    uint4* sKs = reinterpret_cast<uint4*>(sKV + (SH ? 1 : 2) * (KT + VT));
    uint4* sVs = sKs + BN * KSROW;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    const int mtiles = (Sq + BM - 1) / BM;
    const int mt = blockIdx.x % mtiles;
    const int bh = blockIdx.x / mtiles;
    const int b = bh / H, h = bh - b * H;
    const int m0 = mt * BM;
    const float* qb = q + b * qsb + h * qsh;
    const float* kb = k + b * ksb + h * ksh;
    const float* vb = v + b * vsb + h * vsh;

    auto load_rows = [&](float* dst, int drow, const float* src, long long sstride, int row0, int nrows,
                         int count = 64) {
        constexpr int CH = HD / 4;         // 16-byte chunks per row
        for (int c = tid; c < count * CH; c += NT) {
            const int r = c / CH, col = (c - (c / CH) * CH) * 4;
            const int row = row0 + r;
            const bool ok = (row < nrows) && (col < D);
            const float* s = ok ? src + (long long)row * sstride + col : src;
            ra_cp_async16(ra_smem_addr(dst + r * drow + col), s, ok ? 16 : 0);
        }
    };
    auto load_tile = [&](int stage, int j0) {
        float* dK = sKV + stage * (KT + VT);
        load_rows(dK, QROW, kb, kss, j0, Sk);
        load_rows(dK + KT, VROW, vb, vss, j0, Sk);
        ra_cp_commit();
    };

    load_rows(sQ, QROW, qb, qss, m0, Sq, BM);
    load_tile(0, 0);   // the Q copies join this commit group
    // SH: the raw tile -> the split stage (every element once per block)
    auto split_tile = [&]() {
        constexpr int CP = HD / 2;
        for (int i = tid; i < BN * CP; i += NT) {
            const int key = i / CP, cp = i - (i / CP) * CP;
            const float2 x2 = *reinterpret_cast<const float2*>(sKV + key * QROW + 2 * cp);
            const float x[2] = {x2.x, x2.y};
            u32 bg[2], sm[2];
            ra_split_tf32<3, 2>(x, bg, sm);
            sKs[key * KSROW + cp] = make_uint4(bg[0], bg[1], sm[0], sm[1]);
        }
        for (int i = tid; i < (BN / 2) * HD; i += NT) {
            const int kp = i / HD, c = i - (i / HD) * HD;
            const float x[2] = {sKV[KT + 2 * kp * VROW + c], sKV[KT + (2 * kp + 1) * VROW + c]};
            u32 bg[2], sm[2];
            ra_split_tf32<3, 2>(x, bg, sm);
            sVs[kp * VSROW + c] = make_uint4(bg[0], bg[1], sm[0], sm[1]);
        }
    };

    int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    const float* rh_row[2];
    const float* rw_row[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = min(rows[rr], Sq - 1);
        rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
        rw_row[rr] = rel_w + ((long long)bh * Sq + r) * kw;
    }
    // REL == 1 (k_w == 64): rel_w of this thread's keys nb * 8 + 2 t (+ 1), log2 domain
    float rwc[2][(REL == 1) ? 8 : 1][2];
    if (REL == 1) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) {
                const float2 w2 = __ldg(reinterpret_cast<const float2*>(rw_row[rr] + nb * 8 + 2 * t));
                rwc[rr][(REL == 1) ? nb : 0][0] = w2.x * RA_LOG2E;
                rwc[rr][(REL == 1) ? nb : 0][1] = w2.y * RA_LOG2E;
            }
    }

    float o[ND][4];
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
    float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f};

    const float* qw = sQ + (warp * 16 + g) * QROW + 2 * t;   // this thread's Q rows g and g + 8
    const int ntiles = (Sk + BN - 1) / BN;
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * BN;
        float rh1[2];
        if (REL == 1) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) rh1[rr] = __ldg(rh_row[rr] + min(n, kh - 1)) * RA_LOG2E;
        }
        if (SH) {
            ra_cp_wait<0>();
            __syncthreads();   // raw tile n landed; every warp is done with tile n - 1's split stage
            split_tile();
            __syncthreads();
            if (n + 1 < ntiles) load_tile(0, j0 + BN);
        } else if (n + 1 < ntiles) {
            load_tile((n + 1) & 1, j0 + BN);
            ra_cp_wait<1>();
        } else {
            ra_cp_wait<0>();
        }
        if (!SH) __syncthreads();
        // SH: a warp whose 16 rows all lie past Sq only splits and meets the barriers
        if (SH && m0 + warp * 16 >= Sq) continue;
        const float* cK = sKV + (SH ? 0 : (n & 1) * (KT + VT));
        const float* cV = cK + KT;

        // ---- S = Q K^T
        float s[8][4];
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HD / 8; ++ks) {
            const float2 q0 = *reinterpret_cast<const float2*>(qw + ks * 8);
            const float2 q1 = *reinterpret_cast<const float2*>(qw + 8 * QROW + ks * 8);
            const float a[4] = {q0.x, q1.x, q0.y, q1.y};
            u32 ab[4], as[4], abx[SAFE ? 4 : 1];
            ra_split_tf32<SPLIT, 4, SAFE != 0>(a, ab, as, abx);
            constexpr int NG = SAFE ? 2 : 8;   // column blocks split at a time (registers)
#pragma unroll
            for (int n0 = 0; n0 < 8; n0 += NG) {
                u32 bb[NG][2], bs[NG][2], bbx[SAFE ? NG : 1][2];
#pragma unroll
                for (int i = 0; i < NG; ++i) {
                    if (SH) {
                        const uint4 kq = sKs[((n0 + i) * 8 + g) * KSROW + ks * 4 + t];
                        bb[i][0] = kq.x;
                        bb[i][1] = kq.y;
                        bs[i][0] = kq.z;
                        bs[i][1] = kq.w;
                    } else {
                        const float2 k2 = *reinterpret_cast<const float2*>(cK + ((n0 + i) * 8 + g) * QROW + ks * 8 + 2 * t);
                        const float bk[2] = {k2.x, k2.y};
                        ra_split_tf32<SPLIT, 2, SAFE != 0>(bk, bb[i], bs[i], bbx[SAFE ? i : 0]);
                    }
                }
                ra_mma_split<SPLIT, NG>(s + n0, ab, as, bb, bs, SAFE ? abx : ab, SAFE ? bbx : bb);
            }
        }

        // ---- scale, relative terms, mask; element (nb, e): row rr = e >> 1,
        //      key j0 + nb * 8 + 2 t + (e & 1)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int rr = e >> 1, hi = e & 1;
                const int key = j0 + nb * 8 + 2 * t + hi;
                float bias = 0.f;
                if (REL == 1) {
                    bias = rwc[rr][(REL == 1) ? nb : 0][hi];   // rel_h: added to the row maximum
                } else if (REL == 2) {
                    if (key < Sk) {
                        int ky, kx;
                        ra_split_key(key, kw, inv_kw, ky, kx);
                        bias = (__ldg(rh_row[rr] + ky) + __ldg(rw_row[rr] + kx)) * RA_LOG2E;
                    }
                }
                s[nb][e] = (key < Sk) ? fmaf(s[nb][e], scale_log2, bias) : -RA_INF;
            }

        // ---- online softmax
        float alpha_r[2];
        {
            float off[2] = {0.f, 0.f};
            if (REL == 1) {
                off[0] = rh1[0];
                off[1] = rh1[1];
            }
            ra_online_softmax<8>(&s[0][0], off, m_run, l_run, alpha_r);
        }

        // ---- O = alpha O + P V (k slot t <-> key nb * 8 + 2 t, t + 4 <-> 2 t + 1,
        //      so P's A fragment is s[nb] reordered); this tile's product starts
        //      from zero (see above)
        float ot[ND][4];
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) ot[d][e] = 0.f;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            const float a[4] = {s[nb][0], s[nb][2], s[nb][1], s[nb][3]};
            u32 ab[4], as[4], abx[SAFE ? 4 : 1];
            ra_split_tf32<SPLIT, 4, SAFE != 0>(a, ab, as, abx);
            const float* vr = cV + (nb * 8 + 2 * t) * VROW + g;
            // column blocks in groups of 8 (ND = 8, 10, 12, 14 or 16 ...)
#pragma unroll
            for (int d0 = 0; d0 < ND; d0 += (SAFE ? 2 : 8)) {
                constexpr int G8 = SAFE ? 2 : 8;
                u32 bb[G8][2], bs[G8][2], bbx[SAFE ? G8 : 1][2];
#pragma unroll
                for (int i = 0; i < G8; ++i) {
                    const int d = min(d0 + i, ND - 1);
                    if (SH) {
                        const uint4 vq = sVs[(nb * 4 + t) * VSROW + d * 8 + g];
                        bb[i][0] = vq.x;
                        bb[i][1] = vq.y;
                        bs[i][0] = vq.z;
                        bs[i][1] = vq.w;
                    } else {
                        const float bv[2] = {vr[d * 8], vr[VROW + d * 8]};
                        ra_split_tf32<SPLIT, 2, SAFE != 0>(bv, bb[i], bs[i], bbx[SAFE ? i : 0]);
                    }
                }
                if (d0 + G8 <= ND) {
                    ra_mma_split<SPLIT, G8>(ot + d0, ab, as, bb, bs, SAFE ? abx : ab, SAFE ? bbx : bb);
                } else {
                    ra_mma_split<SPLIT, (ND % G8 == 0) ? 1 : ND % G8>(ot + d0, ab, as, bb, bs,
                                                                      SAFE ? abx : ab, SAFE ? bbx : bb);
                }
            }
        }
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[d][e] = fmaf(o[d][e], alpha_r[e >> 1], ot[d][e]);
        if (!SH) __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    if (!SAFE && SPLIT == 3) {
        bool bad = ra_nonfinite<ND * 4>(l_run, &o[0][0]);
        if (SH) {   // one flag per 64 rows (warps 0-3, 4-7): the SAFE pass's blocks
            const int b0 = __syncthreads_or(bad && warp < 4), b1 = __syncthreads_or(bad && warp >= 4);
            const int mt64 = (Sq + 63) / 64;
            if (tid < 2 && 2 * mt + tid < mt64) flags[bh * mt64 + 2 * mt + tid] = (tid ? b1 : b0) ? 1 : 0;
        } else {
            bad = __syncthreads_or(bad);
            if (tid == 0) flags[blockIdx.x] = bad ? 1 : 0;
        }
    }

    float* ob = out + (long long)bh * Sq * D;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const float inv = ra_row_inv(l_run[rr]);
        const int r = rows[rr];
        // SAFE: rewrite only the rows the first pass left non-finite. Every
        // non-finite input a row meets turns the fast split's products into NaN,
        // so a finite first-pass row is already that row's result; the rows of a
        // flagged block then keep the bits of a clean run, whichever kernel
        // (relattn_tf32 or Hopper's relattn_wgt) made the first pass.
        bool redo = true;
        if (SAFE) {
            bool nf = false;
            if (r < Sq) {
#pragma unroll
                for (int d = 0; d < ND; ++d) {
                    const int col = d * 8 + 2 * t;
                    if (col < D) nf |= !(fabsf(ob[(long long)r * D + col]) < RA_INF);
                    if (col + 1 < D) nf |= !(fabsf(ob[(long long)r * D + col + 1]) < RA_INF);
                }
            }
            nf |= __shfl_xor_sync(0xffffffffu, (int)nf, 1) != 0;
            nf |= __shfl_xor_sync(0xffffffffu, (int)nf, 2) != 0;
            redo = nf;
        }
        if (r < Sq && redo) {
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                const int col = d * 8 + 2 * t;
                if (col < D) ob[(long long)r * D + col] = o[d][2 * rr] * inv;
                if (col + 1 < D) ob[(long long)r * D + col + 1] = o[d][2 * rr + 1] * inv;
            }
        }
    }
}
