// The fused backward of the 16-bit attention core (float16 DT 0, bfloat16 DT 1)
// on mma.sync m16n8k16 with float32 accumulation. Per (batch*head) bh, in the
// log2 domain (s2 = log2(e) * logit):
//
//   s2[i, j]  = scale_log2 * q_i . k_j + log2(e) * (rel_h[i, ky] + rel_w[i, kx])
//   lse2[i]   = log2 sum_j exp2(s2[i, j])              (relattn_bwd_stats)
//   P = exp2(s2 - lse2)    dP = dO V^T    dS = P * (dP - delta),  delta_i = dO_i . O_i
//   dq = scale dS K, d_rel_h[i, ky] = sum_kx dS, d_rel_w[i, kx] = sum_ky dS
//                                                     (relattn_bwd_dq: query-major)
//   dk = scale dS^T q, dv = P^T dO                    (relattn_bwd_dkv: key-major)
//
// Nothing Sq x Sk is stored: each kernel recomputes its tiles of S and P. Every
// sum is owned by one block (no atomics in global memory), so results are the
// same bits on every run. Operands: q, dout (B*H, Sq, D), k, v (B*H, Sk, D)
// 16-bit, contiguous, D a multiple of 8; HD = D rounded up to 16 (columns >= D
// zero). rel_h (B*H, Sq, kh) and rel_w (B*H, Sq, kw) float32. lse2, delta
// (B*H, Sq) float32 (delta written by relattn_bwd_dq, which runs first). Gradients float32, contiguous. Blocks of 4 warps, each
// warp 16 rows (queries or keys) of a 64-row block; tiles of 64 double-buffered
// in shared memory by cp.async. Needs common.cuh, mma_sync.cuh and bwd_common.cuh before it.

// ---- loads
// A-operand fragments of a warp's rows r0 .. r0 + 15 of an (n, D) matrix
// with row stride D; rows >= n and columns >= D zero.
template <int KQ>
__device__ __forceinline__ void rb_frags(u32 (&f)[KQ][4], const u16* base, int r0, int n, int D, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int col = kk * 16 + 2 * t + hf * 8;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const int r = r0 + g + 8 * rr;
                u32 val = 0u;
                if (r < n && col < D) val = *reinterpret_cast<const u32*>(base + (long long)r * D + col);
                f[kk][hf * 2 + rr] = val;
            }
        }
}

// Rows r0 .. r0 + 63 of one (a) or two (a, b) (n, D) matrices into shared
// memory (padded rows of HD + 8; b's tile after a's), by cp.async, as one
// commit group; rows >= n zero-filled.
template <int HD, bool TWO>
__device__ __forceinline__ void rb_load(u16* dst, const u16* a, const u16* b, int r0, int n, int D, int tid) {
    constexpr int SROW = HD + 8, TILE = 64 * SROW, CH = HD / 8;
    for (int c = tid; c < 64 * CH; c += 128) {
        const int r = c / CH, col = (c - r * CH) * 8;
        const bool ok = (r0 + r < n) && (col < D);
        const long long off = ok ? (long long)(r0 + r) * D + col : 0;
        ra_cp_async16(ra_smem_addr(dst + r * SROW + col), a + off, ok ? 16 : 0);
        if (TWO) ra_cp_async16(ra_smem_addr(dst + TILE + r * SROW + col), b + off, ok ? 16 : 0);
    }
    ra_cp_commit();
}

// Tile n of ntiles (64 rows each, one or two matrices per stage, two stages):
// starts the load of tile n + 1 into the other stage, waits for tile n and
// makes it visible to the block; returns tile n's stage. The loop's first
// tile is loaded before it (rb_load at stage 0).
template <int HD, bool TWO>
__device__ __forceinline__ const u16* rb_next(u16* smem, const u16* a, const u16* b, int n, int ntiles, int rows,
                                              int D, int tid) {
    constexpr int STAGE = (TWO ? 2 : 1) * 64 * (HD + 8);
    if (n + 1 < ntiles) {
        rb_load<HD, TWO>(smem + ((n + 1) & 1) * STAGE, a, b, (n + 1) * 64, rows, D, tid);
        ra_cp_wait<1>();
    } else {
        ra_cp_wait<0>();
    }
    __syncthreads();
    return smem + (n & 1) * STAGE;
}

// ---- products
// acc (the warp's 16 rows x the tile's 64 rows, as 8 blocks of 8 columns) =
// A (fragments af: 16 rows x HD) times the tile transposed. `addr`: the
// tile's shared address plus this lane's non-transposed ldmatrix offset.
template <int DT, int KQ, int HD>
__device__ __forceinline__ void rb_abt(float (&acc)[8][4], const u32 (&af)[KQ][4], u32 addr) {
    constexpr int SROW = HD + 8;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk)
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
            u32 b0, b1, b2, b3;
            ra_ldsm_x4(b0, b1, b2, b3, addr + (u32)((jp * 16 * SROW + kk * 16) * 2));
            ra_mma<DT>(acc[2 * jp], af[kk], b0, b1);
            ra_mma<DT>(acc[2 * jp + 1], af[kk], b2, b3);
        }
}

// acc (16 rows x HD, ND blocks of 8 columns) += X (16 rows x 64, the
// accumulator layout of rb_abt, rounded to 16 bits) times the tile (64 x HD).
// `addr`: the tile's shared address plus this lane's transposed offset.
template <int DT, int HD>
__device__ __forceinline__ void rb_xb(float (&acc)[HD / 8][4], const float (&x)[8][4], u32 addr) {
    constexpr int SROW = HD + 8, ND = HD / 8;
#pragma unroll
    for (int kk2 = 0; kk2 < 4; ++kk2) {
        u32 a[4];
        a[0] = ra_pack<DT>(x[2 * kk2][0], x[2 * kk2][1]);
        a[1] = ra_pack<DT>(x[2 * kk2][2], x[2 * kk2][3]);
        a[2] = ra_pack<DT>(x[2 * kk2 + 1][0], x[2 * kk2 + 1][1]);
        a[3] = ra_pack<DT>(x[2 * kk2 + 1][2], x[2 * kk2 + 1][3]);
#pragma unroll
        for (int dp = 0; dp < ND / 2; ++dp) {
            u32 b0, b1, b2, b3;
            ra_ldsm_x4_t(b0, b1, b2, b3, addr + (u32)((kk2 * 16 * SROW + dp * 16) * 2));
            ra_mma<DT>(acc[2 * dp], a, b0, b1);
            ra_mma<DT>(acc[2 * dp + 1], a, b2, b3);
        }
    }
}

// The keys of a warp's accumulator columns in the 64-key tile from j0: for
// column j * 8 + 2 t + e, key(j, e, ky, kx) below Sk, past(j, e) beyond it.
// KEY_ROWS: the tile is key row j0 / 64, kx the column.
template <int REL, typename Key, typename Past>
__device__ __forceinline__ void rb_tile_keys(int j0, int Sk, int kw, float inv_kw, int t, Key&& key, Past&& past) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int n = j0 + j * 8 + 2 * t + e;
            if (n < Sk) {
                int ky = 0, kx = 0;
                if (REL == bwd_bias::KEY_ROWS) {
                    ky = j0 >> 6;
                    kx = n - j0;
                } else if (REL == bwd_bias::GENERIC) {
                    ra_split_key(n, kw, inv_kw, ky, kx);
                }
                key(j, e, ky, kx);
            } else {
                past(j, e);
            }
        }
}

// s (a warp's query rows x 64 keys from key j0) -> s2 of the header, -inf
// beyond the last key. rh[rr], rw[rr]: the terms' rows of the thread's rows.
template <int REL>
__device__ __forceinline__ void rb_query_logits(float (&s)[8][4], int j0, int Sk, int kw, float inv_kw,
                                                float scale_log2, const float* const (&rh)[2],
                                                const float* const (&rw)[2], int t) {
    rb_tile_keys<REL>(j0, Sk, kw, inv_kw, t,
        [&](int j, int e, int ky, int kx) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const float bias = (REL == bwd_bias::NONE) ? 0.f
                    : (__ldg(rh[rr] + ky) + __ldg(rw[rr] + kx)) * RA_LOG2E;
                s[j][2 * rr + e] = fmaf(s[j][2 * rr + e], scale_log2, bias);
            }
        },
        [&](int j, int e) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) s[j][2 * rr + e] = -RA_INF;
        });
}

// ---- relattn_bwd_stats: lse2 of every query row
template <int DT, int HD, int REL>
__global__ void __launch_bounds__(128)
relattn_bwd_stats(const u16* __restrict__ q, const u16* __restrict__ k,
                  const float* __restrict__ rel_h, const float* __restrict__ rel_w, float* __restrict__ lse2,
                  int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw)
{
    constexpr int SROW = HD + 8, KQ = HD / 16;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    u16* smem = reinterpret_cast<u16*>(ra_smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int mtiles = (Sq + 63) / 64;
    const int bh = blockIdx.x / mtiles;
    const int r0 = (blockIdx.x - bh * mtiles) * 64 + warp * 16;
    const u16* qb = q + (long long)bh * Sq * D;
    const u16* kb = k + (long long)bh * Sk * D;

    u32 qf[KQ][4];
    rb_frags<KQ>(qf, qb, r0, Sq, D, g, t);
    const float* rh[2];
    const float* rw[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const long long row = (long long)bh * Sq + min(r0 + g + 8 * rr, Sq - 1);
        rh[rr] = rel_h + row * kh;
        rw[rr] = rel_w + row * kw;
    }
    const int mi = lane >> 3, ri = lane & 7;
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;
    float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f};
    const float off[2] = {0.f, 0.f};
    const int ntiles = (Sk + 63) / 64;
    rb_load<HD, false>(smem, kb, kb, 0, Sk, D, tid);
    for (int n = 0; n < ntiles; ++n) {
        const u16* cK = rb_next<HD, false>(smem, kb, kb, n, ntiles, Sk, D, tid);
        float s[8][4];
        rb_abt<DT, KQ, HD>(s, qf, ra_smem_addr(cK + k_off));
        rb_query_logits<REL>(s, n * 64, Sk, kw, inv_kw, scale_log2, rh, rw, t);
        float alpha[2];
        ra_online_softmax<8>(&s[0][0], off, m_run, l_run, alpha);
        __syncthreads();
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float l = l_run[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int r = r0 + g + 8 * rr;
        if (t == 0 && r < Sq)
            lse2[(long long)bh * Sq + r] = (m_run[rr] == -RA_INF) ? -RA_INF : m_run[rr] + __log2f(l);
    }
}

// ---- relattn_bwd_dq: dq and the terms' gradients, per block of 64 query rows
template <int DT, int HD, int REL>
__global__ void __launch_bounds__(128)
relattn_bwd_dq(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
               const u16* __restrict__ out, const u16* __restrict__ dout,
               const float* __restrict__ rel_h, const float* __restrict__ rel_w,
               const float* __restrict__ lse2, float* __restrict__ delta,
               float* __restrict__ dq, float* __restrict__ d_rel_h, float* __restrict__ d_rel_w,
               int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale)
{
    constexpr int SROW = HD + 8, KQ = HD / 16, ND = HD / 8, TILE = 64 * SROW;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    u16* smem = reinterpret_cast<u16*>(ra_smem_raw);
    float* sDH = reinterpret_cast<float*>(smem + 4 * TILE);   // GENERIC: (64, kh) then (64, kw)
    float* sDW = sDH + 64 * kh;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int mtiles = (Sq + 63) / 64;
    const int bh = blockIdx.x / mtiles;
    const int b0 = (blockIdx.x - bh * mtiles) * 64;
    const int r0 = b0 + warp * 16;
    const long long qrow0 = (long long)bh * Sq;
    const u16* kb = k + (long long)bh * Sk * D;
    const u16* vb = v + (long long)bh * Sk * D;

    u32 qf[KQ][4], of[KQ][4];
    rb_frags<KQ>(qf, q + qrow0 * D, r0, Sq, D, g, t);
    rb_frags<KQ>(of, dout + qrow0 * D, r0, Sq, D, g, t);
    const float* rh[2];
    const float* rw[2];
    float lse[2], dl[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const long long row = qrow0 + min(r0 + g + 8 * rr, Sq - 1);
        rh[rr] = rel_h + row * kh;
        rw[rr] = rel_w + row * kw;
        lse[rr] = lse2[row];
        // delta = dO . O over the row's columns (this thread's 2 of every 8, then the quad's)
        float sum = 0.f;
        for (int col = 2 * t; col < D; col += 8)
            sum += ra_ld<DT>(dout + row * D + col) * ra_ld<DT>(out + row * D + col)
                 + ra_ld<DT>(dout + row * D + col + 1) * ra_ld<DT>(out + row * D + col + 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        dl[rr] = sum;
        if (t == 0 && r0 + g + 8 * rr < Sq) delta[row] = sum;   // read by relattn_bwd_dkv
    }
    if (REL == bwd_bias::GENERIC)
        for (int c = tid; c < 64 * (kh + kw); c += 128) sDH[c] = 0.f;   // seen after the loop's first barrier
    const int mi = lane >> 3, ri = lane & 7;
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;
    const int t_off = ((mi & 1) * 8 + ri) * SROW + (mi >> 1) * 8;

    float acc[ND][4];
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[d][e] = 0.f;
    float dw[REL == bwd_bias::KEY_ROWS ? 8 : 1][4];   // KEY_ROWS: d_rel_w of the thread's 16 columns
#pragma unroll
    for (int j = 0; j < (REL == bwd_bias::KEY_ROWS ? 8 : 1); ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dw[j][e] = 0.f;

    const int ntiles = (Sk + 63) / 64;
    rb_load<HD, true>(smem, kb, vb, 0, Sk, D, tid);
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * 64;
        const u16* cK = rb_next<HD, true>(smem, kb, vb, n, ntiles, Sk, D, tid);
        const u16* cV = cK + TILE;

        float s[8][4], dp[8][4];
        rb_abt<DT, KQ, HD>(s, qf, ra_smem_addr(cK + k_off));
        rb_query_logits<REL>(s, j0, Sk, kw, inv_kw, scale_log2, rh, rw, t);
        rb_abt<DT, KQ, HD>(dp, of, ra_smem_addr(cV + k_off));
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = ra_exp2(s[j][e] - lse[e >> 1]);
                s[j][e] = p * (dp[j][e] - dl[e >> 1]);      // dS
            }

        if (REL == bwd_bias::KEY_ROWS) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    sum += s[j][2 * rr] + s[j][2 * rr + 1];
                    dw[j][2 * rr] += s[j][2 * rr];
                    dw[j][2 * rr + 1] += s[j][2 * rr + 1];
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                const int r = r0 + g + 8 * rr;
                if (t == 0 && r < Sq) d_rel_h[(qrow0 + r) * kh + n] = sum;
            }
        } else if (REL == bwd_bias::GENERIC) {
            rb_tile_keys<REL>(j0, Sk, kw, inv_kw, t,
                [&](int j, int e, int ky, int kx) {
#pragma unroll
                    for (int rr = 0; rr < 2; ++rr) {
                        const int lr = warp * 16 + g + 8 * rr;
                        atomicAdd(sDH + lr * kh + ky, s[j][2 * rr + e]);
                        atomicAdd(sDW + lr * kw + kx, s[j][2 * rr + e]);
                    }
                },
                [](int, int) {});
        }

        rb_xb<DT, HD>(acc, s, ra_smem_addr(cK + t_off));    // dq += dS K
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = r0 + g + 8 * rr;
        if (r >= Sq) continue;
        float* dst = dq + (qrow0 + r) * D;
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            const int col = d * 8 + 2 * t;
            if (col < D)
                *reinterpret_cast<float2*>(dst + col) = make_float2(acc[d][2 * rr] * scale, acc[d][2 * rr + 1] * scale);
        }
        if (REL == bwd_bias::KEY_ROWS) {
            float* wdst = d_rel_w + (qrow0 + r) * kw;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                *reinterpret_cast<float2*>(wdst + j * 8 + 2 * t) = make_float2(dw[j][2 * rr], dw[j][2 * rr + 1]);
        }
    }
    if (REL == bwd_bias::GENERIC) {
        __syncthreads();
        const int rows = min(64, Sq - b0);
        for (int c = tid; c < rows * kh; c += 128) d_rel_h[(qrow0 + b0) * kh + c] = sDH[c];
        for (int c = tid; c < rows * kw; c += 128) d_rel_w[(qrow0 + b0) * kw + c] = sDW[c];
    }
}

// ---- relattn_bwd_dkv: dk and dv, per block of 64 keys
template <int DT, int HD, int REL>
__global__ void __launch_bounds__(128)
relattn_bwd_dkv(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                const u16* __restrict__ dout, const float* __restrict__ rel_h, const float* __restrict__ rel_w,
                const float* __restrict__ lse2, const float* __restrict__ delta,
                float* __restrict__ dk, float* __restrict__ dv,
                int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale)
{
    constexpr int SROW = HD + 8, KQ = HD / 16, ND = HD / 8, TILE = 64 * SROW;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    u16* smem = reinterpret_cast<u16*>(ra_smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int ktiles = (Sk + 63) / 64;
    const int bh = blockIdx.x / ktiles;
    const int key0 = (blockIdx.x - bh * ktiles) * 64 + warp * 16;
    const long long qrow0 = (long long)bh * Sq;
    const u16* qb = q + qrow0 * D;
    const u16* ob = dout + qrow0 * D;

    u32 kf[KQ][4], vf[KQ][4];
    rb_frags<KQ>(kf, k + (long long)bh * Sk * D, key0, Sk, D, g, t);
    rb_frags<KQ>(vf, v + (long long)bh * Sk * D, key0, Sk, D, g, t);
    int ky[2] = {0, 0}, kx[2] = {0, 0};
    if (REL != bwd_bias::NONE) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) ra_split_key(min(key0 + g + 8 * rr, Sk - 1), kw, inv_kw, ky[rr], kx[rr]);
    }
    const int mi = lane >> 3, ri = lane & 7;
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;
    const int t_off = ((mi & 1) * 8 + ri) * SROW + (mi >> 1) * 8;

    float ak[ND][4], av[ND][4];
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) { ak[d][e] = 0.f; av[d][e] = 0.f; }

    const int ntiles = (Sq + 63) / 64;
    rb_load<HD, true>(smem, qb, ob, 0, Sq, D, tid);
    for (int n = 0; n < ntiles; ++n) {
        const int i0 = n * 64;
        const u16* cQ = rb_next<HD, true>(smem, qb, ob, n, ntiles, Sq, D, tid);
        const u16* cO = cQ + TILE;

        float s[8][4], dp[8][4];                  // transposed: rows keys, columns queries
        rb_abt<DT, KQ, HD>(s, kf, ra_smem_addr(cQ + k_off));
        rb_abt<DT, KQ, HD>(dp, vf, ra_smem_addr(cO + k_off));
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = i0 + j * 8 + 2 * t + e;
                if (i < Sq) {
                    const long long row = qrow0 + i;
                    const float L = __ldg(lse2 + row), Dl = __ldg(delta + row);
#pragma unroll
                    for (int rr = 0; rr < 2; ++rr) {
                        const float bias = (REL == bwd_bias::NONE) ? 0.f
                            : (__ldg(rel_h + row * kh + ky[rr]) + __ldg(rel_w + row * kw + kx[rr])) * RA_LOG2E;
                        const float p = ra_exp2(fmaf(s[j][2 * rr + e], scale_log2, bias) - L);
                        s[j][2 * rr + e] = p;
                        dp[j][2 * rr + e] = p * (dp[j][2 * rr + e] - Dl);   // dS^T
                    }
                } else {
#pragma unroll
                    for (int rr = 0; rr < 2; ++rr) {
                        s[j][2 * rr + e] = 0.f;
                        dp[j][2 * rr + e] = 0.f;
                    }
                }
            }
        rb_xb<DT, HD>(av, s, ra_smem_addr(cO + t_off));    // dv += P^T dO
        rb_xb<DT, HD>(ak, dp, ra_smem_addr(cQ + t_off));   // dk += dS^T q
        __syncthreads();
    }

#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int key = key0 + g + 8 * rr;
        if (key >= Sk) continue;
        const long long base = ((long long)bh * Sk + key) * D;
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            const int col = d * 8 + 2 * t;
            if (col < D) {
                *reinterpret_cast<float2*>(dk + base + col) = make_float2(ak[d][2 * rr] * scale, ak[d][2 * rr + 1] * scale);
                *reinterpret_cast<float2*>(dv + base + col) = make_float2(av[d][2 * rr], av[d][2 * rr + 1]);
            }
        }
    }
}
