// The fused backward of the float32 attention core on the SIMT cores (plain
// FMA, float32 throughout): the formulas of bwd.cu, in the log2 domain
// (s2 = log2(e) * logit), with the same three kernels:
//
//   relattn_bwd32_stats   lse2[i] = log2 sum_j exp2(s2[i, j])
//   relattn_bwd32_dq      per 64 query rows: delta = dO . O, dq = scale dS K,
//                         d_rel_h, d_rel_w (sums of dS over kx, over ky)
//   relattn_bwd32_dkv     per 64 keys: dk = scale dS^T q, dv = P^T dO
//
// with P = exp2(s2 - lse2), dS = P * (dP - delta), dP = dO V^T. Nothing Sq x
// Sk is stored and every sum has one owner (no atomics in global memory):
// the same bits on every run. The three kernels compute a logit with the same
// operations in the same order (rb32_abt, then rb32_bias), so P is the one
// the log-sum-exp was taken over.
//
// Blocks of 256 threads as 16 x 16 (ty, tx). A thread holds a 4 x 4 block of
// a 64 x 64 tile of logits (rows ty * 4 + a of the block's 64, columns tx * 4
// + c of the tile) and 4 rows x HD / 16 columns (tx + 16 c) of the block's
// gradient rows. Tiles of 64 rows sit in shared memory transposed ([HD][LDT],
// d-major), zero past the last row and past column D. Operands: q, out, dout
// (B*H, Sq, D), k, v (B*H, Sk, D), rel_h (B*H, Sq, kh), rel_w (B*H, Sq, kw),
// lse2 and delta (B*H, Sq), all float32 and contiguous; any D <= HD (HD a
// multiple of 16). Needs common.cuh and bwd_common.cuh before it.

constexpr int RB32_LDT = 68;   // 64 rows + 4: rows of a transposed tile stay 16-byte aligned

// Rows r0 .. r0 + 63 of an (n, D) matrix into dst transposed.
template <int HD>
__device__ __forceinline__ void rb32_load_t(float* dst, const float* src, int r0, int n, int D, int tid) {
    for (int c = tid; c < 64 * HD; c += 256) {
        const int r = c / HD, d = c - r * HD;
        float x = 0.f;
        if (r0 + r < n && d < D) x = __ldg(src + (long long)(r0 + r) * D + d);
        dst[d * RB32_LDT + r] = x;
    }
}

// s[a][c] = sum_d A[d][ra + a] * B[d][rb + c], d ascending (A, B transposed tiles).
template <int HD>
__device__ __forceinline__ void rb32_abt(float (&s)[4][4], const float* A, const float* B, int ra, int rb) {
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[a][c] = 0.f;
#pragma unroll 8
    for (int d = 0; d < HD; ++d) {
        const float4 x = *reinterpret_cast<const float4*>(A + d * RB32_LDT + ra);
        const float4 y = *reinterpret_cast<const float4*>(B + d * RB32_LDT + rb);
        const float xa[4] = {x.x, x.y, x.z, x.w}, yb[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[a][c] = fmaf(xa[a], yb[c], s[a][c]);
    }
}

// A logit's scaled dot product s (q . k) -> s2, with the terms' values of
// its query row at its key's (ky, kx).
template <int REL>
__device__ __forceinline__ float rb32_bias(float s, float scale_log2, const float* rh, const float* rw, int ky,
                                           int kx) {
    const float bias = (REL == bwd_bias::NONE) ? 0.f : (__ldg(rh + ky) + __ldg(rw + kx)) * RA_LOG2E;
    return fmaf(s, scale_log2, bias);
}

// The key (ky, kx) of key j0 + c (the tile's first key j0, tile n).
template <int REL>
__device__ __forceinline__ void rb32_key(int key, int n, int j0, int kw, float inv_kw, int& ky, int& kx) {
    ky = 0;
    kx = 0;
    if (REL == bwd_bias::KEY_ROWS) {
        ky = n;
        kx = key - j0;
    } else if (REL == bwd_bias::GENERIC) {
        ra_split_key(key, kw, inv_kw, ky, kx);
    }
}

// A thread's 4 x 4 block of scaled dot products (columns tx * 4 + c of tile
// n, from key j0) -> s2 of the header, -inf past the last key.
template <int REL>
__device__ __forceinline__ void rb32_logits(float (&s)[4][4], int n, int j0, int Sk, int kw, float inv_kw,
                                            float scale_log2, const float* const (&rh)[4],
                                            const float* const (&rw)[4], int tx) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int key = j0 + tx * 4 + c;
        int ky, kx;
        rb32_key<REL>(key, n, j0, kw, inv_kw, ky, kx);
#pragma unroll
        for (int a = 0; a < 4; ++a)
            s[a][c] = key < Sk ? rb32_bias<REL>(s[a][c], scale_log2, rh[a], rw[a], ky, kx) : -RA_INF;
    }
}

// Sum over the 16 lanes that share ty (lanes 16 apart hold another ty).
__device__ __forceinline__ float rb32_sum16(float x) {
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---- relattn_bwd32_stats: lse2 of every query row
template <int HD, int REL>
__global__ void __launch_bounds__(256)
relattn_bwd32_stats(const float* __restrict__ q, const float* __restrict__ k,
                    const float* __restrict__ rel_h, const float* __restrict__ rel_w, float* __restrict__ lse2,
                    int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw)
{
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    float* sQ = reinterpret_cast<float*>(ra_smem_raw);   // [HD][LDT]
    float* sK = sQ + HD * RB32_LDT;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int mtiles = (Sq + 63) / 64;
    const int bh = blockIdx.x / mtiles;
    const int m0 = (blockIdx.x - bh * mtiles) * 64;
    const long long qrow0 = (long long)bh * Sq;
    const float* kb = k + (long long)bh * Sk * D;
    rb32_load_t<HD>(sQ, q + qrow0 * D, m0, Sq, D, tid);
    const float* rh[4];
    const float* rw[4];
    float m_run[4], l_run[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const long long row = qrow0 + min(m0 + ty * 4 + a, Sq - 1);
        rh[a] = rel_h + row * kh;
        rw[a] = rel_w + row * kw;
        m_run[a] = -RA_INF;
        l_run[a] = 0.f;
    }
    const int ntiles = (Sk + 63) / 64;
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * 64;
        __syncthreads();   // the last tile consumed (and sQ stored)
        rb32_load_t<HD>(sK, kb, j0, Sk, D, tid);
        __syncthreads();
        float s[4][4];
        rb32_abt<HD>(s, sQ, sK, ty * 4, tx * 4);
        rb32_logits<REL>(s, n, j0, Sk, kw, inv_kw, scale_log2, rh, rw, tx);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            float mx = fmaxf(fmaxf(s[a][0], s[a][1]), fmaxf(s[a][2], s[a][3]));
#pragma unroll
            for (int o = 1; o < 16; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_new = fmaxf(m_run[a], mx);
            const float m_use = (m_new == -RA_INF) ? 0.f : m_new;
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < 4; ++c) sum += ra_exp2(s[a][c] - m_use);
            l_run[a] = l_run[a] * ra_exp2(m_run[a] - m_use) + sum;
            m_run[a] = m_new;
        }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const float l = rb32_sum16(l_run[a]);
        const int r = m0 + ty * 4 + a;
        if (tx == 0 && r < Sq) lse2[qrow0 + r] = (m_run[a] == -RA_INF) ? -RA_INF : m_run[a] + __log2f(l);
    }
}

// ---- relattn_bwd32_dq: dq and the terms' gradients, per block of 64 query rows
template <int HD, int REL>
__global__ void __launch_bounds__(256)
relattn_bwd32_dq(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                 const float* __restrict__ out, const float* __restrict__ dout,
                 const float* __restrict__ rel_h, const float* __restrict__ rel_w,
                 const float* __restrict__ lse2, float* __restrict__ delta,
                 float* __restrict__ dq, float* __restrict__ d_rel_h, float* __restrict__ d_rel_w,
                 int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale)
{
    constexpr int NC = HD / 16, T = HD * RB32_LDT;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    float* sQ = reinterpret_cast<float*>(ra_smem_raw);   // the block's q rows, transposed
    float* sO = sQ + T;                                  // its dO rows, transposed
    float* sK = sO + T;                                  // the key tile, transposed
    float* sV = sK + T;                                  // the value tile, transposed
    float* sS = sV + T;                                  // dS, key-major: [64 keys][LDT]
    float* sDH = sS + 64 * RB32_LDT;                     // GENERIC: (64, kh) then (64, kw)
    float* sDW = sDH + 64 * kh;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int mtiles = (Sq + 63) / 64;
    const int bh = blockIdx.x / mtiles;
    const int m0 = (blockIdx.x - bh * mtiles) * 64;
    const long long qrow0 = (long long)bh * Sq;
    const float* kb = k + (long long)bh * Sk * D;
    const float* vb = v + (long long)bh * Sk * D;
    rb32_load_t<HD>(sQ, q + qrow0 * D, m0, Sq, D, tid);
    rb32_load_t<HD>(sO, dout + qrow0 * D, m0, Sq, D, tid);
    if (REL == bwd_bias::GENERIC)
        for (int c = tid; c < 64 * (kh + kw); c += 256) sDH[c] = 0.f;

    const float* rh[4];
    const float* rw[4];
    float lse[4], dl[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int r = m0 + ty * 4 + a;
        const long long row = qrow0 + min(r, Sq - 1);
        rh[a] = rel_h + row * kh;
        rw[a] = rel_w + row * kw;
        lse[a] = lse2[row];
        float sum = 0.f;   // delta = dO . O: this lane's columns, then the 16 lanes'
        for (int col = tx; col < D; col += 16) sum = fmaf(dout[row * D + col], out[row * D + col], sum);
        dl[a] = rb32_sum16(sum);
        if (tx == 0 && r < Sq) delta[row] = dl[a];   // read by relattn_bwd32_dkv
    }

    float acc[4][NC];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[a][c] = 0.f;
    constexpr int NW = REL == bwd_bias::KEY_ROWS ? 4 : 1;
    float dw[4][NW];   // KEY_ROWS: d_rel_w of the thread's rows at kx = tx * 4 + c
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < NW; ++c) dw[a][c] = 0.f;

    const int ntiles = (Sk + 63) / 64;
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * 64;
        __syncthreads();   // the last tile consumed (and sQ, sO, sDH stored)
        rb32_load_t<HD>(sK, kb, j0, Sk, D, tid);
        rb32_load_t<HD>(sV, vb, j0, Sk, D, tid);
        __syncthreads();
        float s[4][4], dp[4][4];
        rb32_abt<HD>(s, sQ, sK, ty * 4, tx * 4);
        rb32_abt<HD>(dp, sO, sV, ty * 4, tx * 4);
        rb32_logits<REL>(s, n, j0, Sk, kw, inv_kw, scale_log2, rh, rw, tx);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int key = j0 + tx * 4 + c;
            int ky, kx;
            rb32_key<REL>(key, n, j0, kw, inv_kw, ky, kx);
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                float ds = 0.f;   // past the last key: nothing
                if (key < Sk) {
                    ds = ra_exp2(s[a][c] - lse[a]) * (dp[a][c] - dl[a]);
                    if (REL == bwd_bias::GENERIC) {
                        atomicAdd(sDH + (ty * 4 + a) * kh + ky, ds);
                        atomicAdd(sDW + (ty * 4 + a) * kw + kx, ds);
                    }
                }
                s[a][c] = ds;
            }
        }
        if (REL == bwd_bias::KEY_ROWS) {   // the tile is key row n: d_rel_h[., n] is the row's sum
#pragma unroll
            for (int a = 0; a < 4; ++a) {
                const float sum = rb32_sum16((s[a][0] + s[a][1]) + (s[a][2] + s[a][3]));
#pragma unroll
                for (int c = 0; c < 4; ++c) dw[a][c] += s[a][c];
                const int r = m0 + ty * 4 + a;
                if (tx == 0 && r < Sq) d_rel_h[(qrow0 + r) * kh + n] = sum;
            }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c)
            *reinterpret_cast<float4*>(sS + (tx * 4 + c) * RB32_LDT + ty * 4) =
                make_float4(s[0][c], s[1][c], s[2][c], s[3][c]);
        __syncthreads();
        // dq += dS K: key j of the tile, the thread's columns tx + 16 c
#pragma unroll 4
        for (int j = 0; j < 64; ++j) {
            const float4 x = *reinterpret_cast<const float4*>(sS + j * RB32_LDT + ty * 4);
            const float xa[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const float kv = sK[(tx + 16 * c) * RB32_LDT + j];
#pragma unroll
                for (int a = 0; a < 4; ++a) acc[a][c] = fmaf(xa[a], kv, acc[a][c]);
            }
        }
    }

#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int r = m0 + ty * 4 + a;
        if (r >= Sq) continue;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int col = tx + 16 * c;
            if (col < D) dq[(qrow0 + r) * D + col] = acc[a][c] * scale;
        }
        if (REL == bwd_bias::KEY_ROWS)
#pragma unroll
            for (int c = 0; c < NW; ++c) d_rel_w[(qrow0 + r) * kw + tx * 4 + c] = dw[a][c];
    }
    if (REL == bwd_bias::GENERIC) {
        __syncthreads();
        const int rows = min(64, Sq - m0);
        for (int c = tid; c < rows * kh; c += 256) d_rel_h[(qrow0 + m0) * kh + c] = sDH[c];
        for (int c = tid; c < rows * kw; c += 256) d_rel_w[(qrow0 + m0) * kw + c] = sDW[c];
    }
}

// ---- relattn_bwd32_dkv: dk and dv, per block of 64 keys
template <int HD, int REL>
__global__ void __launch_bounds__(256)
relattn_bwd32_dkv(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                  const float* __restrict__ dout, const float* __restrict__ rel_h, const float* __restrict__ rel_w,
                  const float* __restrict__ lse2, const float* __restrict__ delta,
                  float* __restrict__ dk, float* __restrict__ dv,
                  int Sq, int Sk, int D, int kh, int kw, float scale_log2, float inv_kw, float scale)
{
    constexpr int NC = HD / 16, T = HD * RB32_LDT;
    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    float* sK = reinterpret_cast<float*>(ra_smem_raw);   // the block's keys, transposed
    float* sV = sK + T;                                  // its values, transposed
    float* sQ = sV + T;                                  // the query tile, transposed
    float* sO = sQ + T;                                  // its dO rows, transposed
    float* sP = sO + T;                                  // P, query-major: [64 queries][LDT keys]
    float* sD = sP + 64 * RB32_LDT;                      // dS, the same
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int ktiles = (Sk + 63) / 64;
    const int bh = blockIdx.x / ktiles;
    const int kt = blockIdx.x - bh * ktiles;
    const int key0 = kt * 64;
    const long long qrow0 = (long long)bh * Sq;
    const float* qb = q + qrow0 * D;
    const float* ob = dout + qrow0 * D;
    rb32_load_t<HD>(sK, k + (long long)bh * Sk * D, key0, Sk, D, tid);
    rb32_load_t<HD>(sV, v + (long long)bh * Sk * D, key0, Sk, D, tid);
    int ky[4], kx[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int key = min(key0 + ty * 4 + a, Sk - 1);
        rb32_key<REL>(key, kt, key0, kw, inv_kw, ky[a], kx[a]);
    }

    float ak[4][NC], av[4][NC];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < NC; ++c) { ak[a][c] = 0.f; av[a][c] = 0.f; }

    const int ntiles = (Sq + 63) / 64;
    for (int n = 0; n < ntiles; ++n) {
        const int i0 = n * 64;
        __syncthreads();   // the last tile consumed (and sK, sV stored)
        rb32_load_t<HD>(sQ, qb, i0, Sq, D, tid);
        rb32_load_t<HD>(sO, ob, i0, Sq, D, tid);
        __syncthreads();
        float s[4][4], dp[4][4];   // transposed: rows keys, columns queries
        rb32_abt<HD>(s, sK, sQ, ty * 4, tx * 4);
        rb32_abt<HD>(dp, sV, sO, ty * 4, tx * 4);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int i = i0 + tx * 4 + c;
            if (i < Sq) {
                const long long row = qrow0 + i;
                const float L = __ldg(lse2 + row), Dl = __ldg(delta + row);
                const float* rh = rel_h + row * kh;
                const float* rw = rel_w + row * kw;
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    const float p = ra_exp2(rb32_bias<REL>(s[a][c], scale_log2, rh, rw, ky[a], kx[a]) - L);
                    s[a][c] = p;
                    dp[a][c] = p * (dp[a][c] - Dl);
                }
            } else {
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    s[a][c] = 0.f;
                    dp[a][c] = 0.f;
                }
            }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            *reinterpret_cast<float4*>(sP + (tx * 4 + c) * RB32_LDT + ty * 4) =
                make_float4(s[0][c], s[1][c], s[2][c], s[3][c]);
            *reinterpret_cast<float4*>(sD + (tx * 4 + c) * RB32_LDT + ty * 4) =
                make_float4(dp[0][c], dp[1][c], dp[2][c], dp[3][c]);
        }
        __syncthreads();
        // dv += P^T dO, dk += dS^T q: query i of the tile, the thread's columns tx + 16 c
#pragma unroll 4
        for (int i = 0; i < 64; ++i) {
            const float4 x = *reinterpret_cast<const float4*>(sP + i * RB32_LDT + ty * 4);
            const float4 y = *reinterpret_cast<const float4*>(sD + i * RB32_LDT + ty * 4);
            const float pa[4] = {x.x, x.y, x.z, x.w}, da[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const float ov = sO[(tx + 16 * c) * RB32_LDT + i];
                const float qv = sQ[(tx + 16 * c) * RB32_LDT + i];
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    av[a][c] = fmaf(pa[a], ov, av[a][c]);
                    ak[a][c] = fmaf(da[a], qv, ak[a][c]);
                }
            }
        }
    }

#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int key = key0 + ty * 4 + a;
        if (key >= Sk) continue;
        const long long base = ((long long)bh * Sk + key) * D;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int col = tx + 16 * c;
            if (col < D) {
                dk[base + col] = ak[a][c] * scale;
                dv[base + col] = av[a][c];
            }
        }
    }
}
