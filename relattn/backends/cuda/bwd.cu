// The fused backward of the 16-bit attention core (float16 DT 0, bfloat16 DT 1)
// on mma.sync m16n8k16 with float32 accumulation. Per (batch*head) bh, in the
// log2 domain (s2 = log2(e) * logit):
//
//   s2[i, j]  = scale_log2 * q_i . k_j + log2(e) * (rel_h[i, ky] + rel_w[i, kx])
//   P = exp2(s2 - lse2)    dP = dO V^T    dS = P * (dP - delta)
//   lse2[i]   = log2 sum_j exp2(s2[i, j]),  delta_i = sum_j P_ij dP_ij
//                                                     (relattn_bwd_rows: both in one pass, online;
//                                                     or lse2 from the forward and delta_i = dO_i . O_i,
//                                                     relattn_bwd_delta)
//   dq = scale dS K, d_rel_h[i, ky] = sum_kx dS, d_rel_w[i, kx] = sum_ky dS
//                                                     (relattn_bwd_dq: query-major)
//   dk = scale dS^T q, dv = P^T dO                    (relattn_bwd_dkv: key-major)
//
// The row pass's delta is the exact rowsum(P * dP) in float32; dO . O with O
// rounded to 16 bits (where the forward kept lse2: one pass less) puts that
// rounding into the terms' gradients, which sum dS over part of a row, at
// about 1e-3 of their size. Nothing Sq x Sk is stored: each kernel
// recomputes its tiles of S and P. Every sum is owned by one block (no
// atomics), so results are the same bits on every run. Operands: q, dout
// (B*H, Sq, D), k, v (B*H, Sk, D) 16-bit, contiguous, D a multiple of 8; HD =
// D rounded up to 16 (columns >= D zero). rel_h (B*H, Sq, kh) and rel_w
// (B*H, Sq, kw) float32, read through shared memory: the query-major kernels
// hold their 64 rows' terms for the whole loop, the key-major one stages
// each query tile's terms, lse2 and delta with the tile. lse2, delta (B*H,
// Sq) float32. Gradients contiguous: dq and the terms' float32, dk and dv in
// the inputs' 16-bit type (rounded once). Blocks of 4 warps, each warp
// 16 rows (queries or keys) of a 64-row block; tiles of 64 double-buffered in
// shared memory by cp.async. Needs common.cuh, mma_sync.cuh, bwd_common.cuh
// and bwd16.cuh before it.

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
// memory (padded rows of HD + 8; b's tile after a's) by cp.async, uncommitted;
// rows >= n and columns >= D zero-filled. Chunk c = tid + 128 k of the tile
// is row c / CH, column c % CH (CH = HD / 8): where D == HD a warp reads 512
// contiguous bytes. Where CH is a power of two a thread keeps its column from
// tile to tile and the copies unroll (row tid / CH + k 128 / CH); head_dim
// 80's rows split as 8 + 2 chunks for the same lose that contiguity (slower
// in dq: docs/kernels.md).
template <int HD, bool TWO>
__device__ __forceinline__ void rb_load(u16* dst, const u16* a, const u16* b, int r0, int n, int D, int tid) {
    constexpr int SROW = HD + 8, TILE = 64 * SROW, CH = HD / 8;
    auto copy = [&](int r, int col) {
        const bool ok = (r0 + r < n) && (col < D);
        const long long off = ok ? (long long)(r0 + r) * D + col : 0;
        ra_cp_async16(ra_smem_addr(dst + r * SROW + col), a + off, ok ? 16 : 0);
        if (TWO) ra_cp_async16(ra_smem_addr(dst + TILE + r * SROW + col), b + off, ok ? 16 : 0);
    };
    if constexpr ((CH & (CH - 1)) == 0) {
        const int col = (tid & (CH - 1)) * 8, r = tid / CH;
#pragma unroll
        for (int k = 0; k < 64 * CH / 128; ++k) copy(r + k * (128 / CH), col);
    } else {
        for (int c = tid; c < 64 * CH; c += 128) {
            const int r = c / CH;
            copy(r, (c - r * CH) * 8);
        }
    }
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

// ---- relattn_bwd_delta: delta_i = dO_i . O_i from the stored 16-bit output,
// where the forward kept each row's lse2 (no row pass): one warp per row,
// float32 products of the 16-bit pairs, a fixed order of sums.
template <int DT>
__global__ void __launch_bounds__(128)
relattn_bwd_delta(const u16* __restrict__ dout, const u16* __restrict__ out, float* __restrict__ delta,
                  long long rows, int D)
{
    const long long r = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const u32* a = reinterpret_cast<const u32*>(dout + r * D);
    const u32* b = reinterpret_cast<const u32*>(out + r * D);
    auto f32 = [](u32 h) -> float {   // the 16-bit value in h's low half
        return DT == 1 ? __uint_as_float(h << 16) : ra_f16_lo(h);
    };
    float sum = 0.f;
    for (int c = lane; c < D / 2; c += 32) {
        const u32 x = a[c], y = b[c];
        sum = fmaf(f32(x), f32(y), sum);
        sum = fmaf(f32(x >> 16), f32(y >> 16), sum);
    }
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    if (lane == 0) delta[r] = sum;
}

// ---- relattn_bwd_rows: lse2 of every query row, and with DELTA its delta
// (the online rowsum of P * dP, rescaled with the running maximum as l)
template <int DT, int HD, int REL, bool DELTA>
__global__ void __launch_bounds__(128)
relattn_bwd_rows(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                 const u16* __restrict__ dout, const float* __restrict__ rel_h, const float* __restrict__ rel_w,
                 float* __restrict__ lse2, float* __restrict__ delta,
                 int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw)
{
    constexpr int SROW = HD + 8, KQ = HD / 16, TILE = 64 * SROW, STAGE = (DELTA ? 2 : 1) * TILE;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    u16* smem = reinterpret_cast<u16*>(ra_smem_raw);
    float* sRH = reinterpret_cast<float*>(smem + 2 * STAGE);
    float* sRW = sRH + 64 * kh;
    const int SW = rb_sw_q(REL, kw);
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
    if constexpr (DELTA) rb_frags<KQ>(of, dout + qrow0 * D, r0, Sq, D, g, t);
    const float* rh[2];
    const float* rw[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        rh[rr] = sRH + (warp * 16 + g + 8 * rr) * kh;
        rw[rr] = sRW + (warp * 16 + g + 8 * rr) * SW;
    }
    const int mi = lane >> 3, ri = lane & 7;
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;
    float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f}, a_run[2] = {0.f, 0.f};
    const float off[2] = {0.f, 0.f};
    const int ntiles = (Sk + 63) / 64;
    auto load = [&](int n, int stage) {
        rb_load<HD, DELTA>(smem + stage * STAGE, kb, vb, n * 64, Sk, D, tid);
        ra_cp_commit();
    };
    rb_load_terms<REL>(sRH, sRW, rel_h + qrow0 * kh, rel_w + qrow0 * kw, b0, Sq, kh, kw, tid);
    load(0, 0);
    for (int n = 0; n < ntiles; ++n) {
        const u16* cK = smem + rb_next(n, ntiles, load) * STAGE;
        float s[8][4];
        rb_abt<DT, KQ, HD>(s, qf, ra_smem_addr(cK + k_off));
        rb_query_logits<REL>(s, n * 64, Sk, kw, inv_kw, scale_log2, rh, rw, t);
        float alpha[2];
        ra_online_softmax<8>(&s[0][0], off, m_run, l_run, alpha);   // s: exp2(s2 - running max)
        if constexpr (DELTA) {
            float dp[8][4];
            rb_abt<DT, KQ, HD>(dp, of, ra_smem_addr(cK + TILE + k_off));
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < 8; ++j) sum += s[j][2 * rr] * dp[j][2 * rr] + s[j][2 * rr + 1] * dp[j][2 * rr + 1];
                a_run[rr] = a_run[rr] * alpha[rr] + sum;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float l = l_run[rr], a = a_run[rr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        a += __shfl_xor_sync(0xffffffffu, a, 2);
        const int r = r0 + g + 8 * rr;
        if (t == 0 && r < Sq) {
            lse2[qrow0 + r] = (m_run[rr] == -RA_INF) ? -RA_INF : m_run[rr] + __log2f(l);
            if constexpr (DELTA) delta[qrow0 + r] = a / l;
        }
    }
}

// ---- relattn_bwd_dq: dq and the terms' gradients, per block of 64 query rows
// Shared memory: the K / V stages, the staged terms (rb_sw_q), then in the
// generic mode the 64 rows' d_rel_h (64, kh), d_rel_w (64, kw) and each
// warp's dS tile (16, RB_DS) for their sums.
template <int DT, int HD, int REL>
__global__ void __launch_bounds__(128)
relattn_bwd_dq(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
               const u16* __restrict__ dout, const float* __restrict__ rel_h, const float* __restrict__ rel_w,
               const float* __restrict__ lse2, const float* __restrict__ delta,
               float* __restrict__ dq, float* __restrict__ d_rel_h, float* __restrict__ d_rel_w,
               int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale)
{
    constexpr int SROW = HD + 8, KQ = HD / 16, ND = HD / 8, TILE = 64 * SROW, STAGE = 2 * TILE;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    u16* smem = reinterpret_cast<u16*>(ra_smem_raw);
    const int SW = rb_sw_q(REL, kw);
    float* sRH = reinterpret_cast<float*>(smem + 2 * STAGE);
    float* sRW = sRH + 64 * kh;
    float* sDH = sRW + 64 * SW;      // GENERIC
    float* sDW = sDH + 64 * kh;
    float* sDS = sDW + 64 * kw;
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
    rb_query_rows(rh, rw, lse, dl, sRH, sRW, lse2, delta, qrow0, r0, Sq, kh, SW, warp, g);
    if constexpr (REL == bwd_bias::GENERIC)
        for (int c = tid; c < 64 * (kh + kw); c += 128) sDH[c] = 0.f;   // seen after the loop's first barrier
    const int mi = lane >> 3, ri = lane & 7;
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;
    const int t_off = ((mi & 1) * 8 + ri) * SROW + (mi >> 1) * 8;

    float acc[ND][4], dw[REL == bwd_bias::KEY_ROWS ? 8 : 1][4];   // KEY_ROWS: d_rel_w of the thread's 16 columns
    rb_zero(acc);
    rb_zero(dw);

    const int ntiles = (Sk + 63) / 64;
    auto load = [&](int n, int stage) {
        rb_load<HD, true>(smem + stage * STAGE, kb, vb, n * 64, Sk, D, tid);
        ra_cp_commit();
    };
    rb_load_terms<REL>(sRH, sRW, rel_h + qrow0 * kh, rel_w + qrow0 * kw, b0, Sq, kh, kw, tid);
    load(0, 0);
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * 64;
        const u16* cK = smem + rb_next(n, ntiles, load) * STAGE;
        const u16* cV = cK + TILE;

        float s[8][4], dp[8][4];
        rb_abt<DT, KQ, HD>(s, qf, ra_smem_addr(cK + k_off));
        rb_query_logits<REL>(s, j0, Sk, kw, inv_kw, scale_log2, rh, rw, t);
        rb_abt<DT, KQ, HD>(dp, of, ra_smem_addr(cV + k_off));
        rb_query_ds(s, dp, lse, dl);
        rb_query_terms<REL>(s, dw, d_rel_h, qrow0, r0, Sq, kh, kw, n, Sk, sDS + warp * 16 * RB_DS,
                            sDH + warp * 16 * kh, sDW + warp * 16 * kw, lane, g, t);

        rb_xb<DT, HD>(acc, s, ra_smem_addr(cK + t_off));    // dq += dS K
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    rb_store_dq<REL, ND>(acc, dw, dq, d_rel_w, qrow0, r0, Sq, D, kw, scale, g, t);
    if constexpr (REL == bwd_bias::GENERIC) {
        __syncthreads();
        const int rows = min(64, Sq - b0);
        for (int c = tid; c < rows * kh; c += 128) d_rel_h[(qrow0 + b0) * kh + c] = sDH[c];
        for (int c = tid; c < rows * kw; c += 128) d_rel_w[(qrow0 + b0) * kw + c] = sDW[c];
    }
}

// ---- relattn_bwd_dkv: dk and dv, per block of 64 keys
// Each stage holds a query tile's q and dO, then (float32) its rows' lse2
// (64), delta (64), the terms of the block's keys: rel_h columns ky_lo ..
// ky_lo + nh - 1 (64, nh) and rel_w (64, rb_sw_k).
template <int DT, int HD, int REL>
__global__ void __launch_bounds__(128)
relattn_bwd_dkv(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                const u16* __restrict__ dout, const float* __restrict__ rel_h, const float* __restrict__ rel_w,
                const float* __restrict__ lse2, const float* __restrict__ delta,
                u16* __restrict__ dk, u16* __restrict__ dv,
                int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale, int nh)
{
    constexpr int SROW = HD + 8, KQ = HD / 16, ND = HD / 8, TILE = 64 * SROW, STAGE = 2 * TILE;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    u16* smem = reinterpret_cast<u16*>(ra_smem_raw);
    const int SW = rb_sw_k(REL, kw);
    const int NH = REL == bwd_bias::KEY_ROWS ? 1 : nh;
    const int FST = 128 + (REL == bwd_bias::NONE ? 0 : 64 * (NH + SW));   // floats of a stage
    float* fsm = reinterpret_cast<float*>(smem + 2 * STAGE);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int ktiles = (Sk + 63) / 64;
    const int bh = blockIdx.x / ktiles;
    const int kb0 = (blockIdx.x - bh * ktiles) * 64;
    const int key0 = kb0 + warp * 16;
    const long long qrow0 = (long long)bh * Sq;
    const u16* qb = q + qrow0 * D;
    const u16* ob = dout + qrow0 * D;

    u32 kf[KQ][4], vf[KQ][4];
    rb_frags<KQ>(kf, k + (long long)bh * Sk * D, key0, Sk, D, g, t);
    rb_frags<KQ>(vf, v + (long long)bh * Sk * D, key0, Sk, D, g, t);
    const int ky_lo = (REL == bwd_bias::NONE) ? 0 : kb0 / kw;
    int hcol[2], wcol[2];   // the thread's keys' columns in the staged terms
    rb_key_cols<REL>(hcol, wcol, key0, Sk, kw, inv_kw, ky_lo, g);
    const int mi = lane >> 3, ri = lane & 7;
    const int k_off = ((mi >> 1) * 8 + ri) * SROW + (mi & 1) * 8;
    const int t_off = ((mi & 1) * 8 + ri) * SROW + (mi >> 1) * 8;

    float ak[ND][4], av[ND][4];
    rb_zero(ak);
    rb_zero(av);

    const int ntiles = (Sq + 63) / 64;
    auto load = [&](int n, int stage) {
        const int i0 = n * 64;
        rb_load<HD, true>(smem + stage * STAGE, qb, ob, i0, Sq, D, tid);
        rb_stage_f32<REL, 1>(fsm + stage * FST, lse2 + qrow0, delta + qrow0, rel_h + qrow0 * kh, rel_w + qrow0 * kw,
                             i0, Sq, kh, kw, ky_lo, NH, SW, tid);
        ra_cp_commit();
    };
    load(0, 0);
    for (int n = 0; n < ntiles; ++n) {
        const int i0 = n * 64, stage = rb_next(n, ntiles, load);
        const u16* cQ = smem + stage * STAGE;
        const u16* cO = cQ + TILE;
        const float* sL = fsm + stage * FST;
        const float* sD = sL + 64;
        const float* sRH = sL + 128;
        const float* sRW = sRH + 64 * NH;

        float s[8][4], dp[8][4];                  // transposed: rows keys, columns queries
        rb_abt<DT, KQ, HD>(s, kf, ra_smem_addr(cQ + k_off));
        rb_abt<DT, KQ, HD>(dp, vf, ra_smem_addr(cO + k_off));
        rb_key_probs<REL>(s, dp, i0, Sq, sL, sD, sRH, sRW, NH, SW, hcol, wcol, scale_log2, t);   // P^T, dS^T
        rb_xb<DT, HD>(av, s, ra_smem_addr(cO + t_off));    // dv += P^T dO
        rb_xb<DT, HD>(ak, dp, ra_smem_addr(cQ + t_off));   // dk += dS^T q
        __syncthreads();
    }

    rb_store_dkv<DT, ND>(ak, av, dk, dv, bh, key0, Sk, D, scale, g, t);
}
