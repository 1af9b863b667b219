// The pullback through the relative-position terms on the GPU, from the
// fused backward's float32 terms' gradients dh (B*H, Sq, kh) and dw (B*H, Sq,
// kw), with the gathered tables Rh (qh, kh, D) and Rw (qw, kw, D) in float32
// and the query i = y * qw + x:
//
//   relattn_bwd_terms_side    dq's terms part, one side per launch: a batched product over the rows
//                             (bh, b) that share one table slice a, dst[i] = src[i] + sum_kk d[i, kk] R[a, kk]:
//                             first side w into dq (float32, in place), then side h from it rounded once
//                             to q's type, so dq_out = (dq + sum_kx dw Rw[x, kx]) + sum_ky dh Rh[y, ky]
//   relattn_bwd_terms_grid    one side's gathered-table gradient dR[a, kk] = sum over (bh, b) of
//                             d[i, kk] q[i] (side h: a = y, b = x, d = dh; side w: a = x, b = y, d = dw),
//                             a split of the (bh, b) rows per blockIdx.z into part[split]
//   relattn_bwd_terms_scatter the adjoint of SAM's gather: g[r] = sum over the positions p = a * kl + kk
//                             that read table row r (slots[t, r], padded with the zero position) and
//                             over the splits of part[split, p]
//
// Every sum has one owner and a fixed order: the same bits on every run.
// DT 0 float16, 1 bfloat16 (E u16), 2 float32 (E float). Needs common.cuh.

constexpr int RBT_ROWS = 32;   // rows staged at a time by the grid kernel (D <= 128)

// The row i = bh * Sq + a * sa + b * sb of the m-th row (bh, b) = (m / nb, m % nb)
// that reads table slice a (side h: a = y, b = x, sa = qw, sb = 1; side w: a = x,
// b = y, sa = 1, sb = qw).
__device__ __forceinline__ long long rbt_row(long long m, int nb, int Sq, int a, int sa, int sb) {
    const long long bh = m / nb;
    return bh * Sq + (long long)a * sa + (m - bh * nb) * sb;
}

// The columns 4 tc .. 4 tc + 3 of one row: a float4 where D is a multiple of 4
// (rows 16-byte aligned), else one value at a time; columns >= D are zero.
__device__ __forceinline__ float4 rbt_ld4(const float* p, int c, int D) {
    if ((D & 3) == 0) return c < D ? *reinterpret_cast<const float4*>(p + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    return make_float4(c < D ? p[c] : 0.f, c + 1 < D ? p[c + 1] : 0.f, c + 2 < D ? p[c + 2] : 0.f,
                       c + 3 < D ? p[c + 3] : 0.f);
}

// Global -> shared copies of 4 or 16 bytes, zero-filled where !ok: cp.async on
// sm_80 and later (every copy of a stage in flight at once, then one wait),
// plain loads and stores before it. src must be a valid address even where !ok.
__device__ __forceinline__ void rbt_cp4(void* dst, const void* src, bool ok) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src), "r"(ok ? 4 : 0));
#else
    *reinterpret_cast<u32*>(dst) = ok ? *reinterpret_cast<const u32*>(src) : 0u;
#endif
}
__device__ __forceinline__ void rbt_cp16(void* dst, const void* src, bool ok) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src), "r"(ok ? 16 : 0));
#else
    *reinterpret_cast<uint4*>(dst) = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void rbt_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void rbt_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}

// Four consecutive 16-bit (DT 0 / 1) or float32 values of shared memory as float32.
template <int DT>
__device__ __forceinline__ float4 rbt_sh4(const u16* p) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    if (DT == 1)
        return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                           __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u));
    return make_float4(ra_ld<DT>(p), ra_ld<DT>(p + 1), ra_ld<DT>(p + 2), ra_ld<DT>(p + 3));
}
template <int DT>
__device__ __forceinline__ float4 rbt_sh4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Block (row tile, a) of 128 threads = 8 x 16 (tr, tc): thread (tr, tc) owns
// rows tr + 8 i (i < 8) of the block's RBS_ROWS rows (bh, b) and columns
// 4 tc + 64 j + (0..3) (j < NJ, NJ = D / 64 rounded up): per value of kk 8
// shared-memory reads of d and NJ float4 reads of R for 32 NJ products. R[a]'s
// rows and the rows' d are staged RbsCfg<NJ>::K values of kk at a time, all of
// a stage's copies in flight at once; the thread's src values are loaded into
// registers before the products, so that their latency hides behind them.
constexpr int RBS_ROWS = 64;
template <int NJ> struct RbsCfg {
    static constexpr int K = 64 / NJ, LD = K + 4;   // LD: rows tr and tr + 1 four banks apart
};

template <int DT, typename E, bool LAST, int NJ>
__global__ void __launch_bounds__(128)
relattn_bwd_terms_side(const float* __restrict__ d, const float* __restrict__ R, const float* src, void* dst,
                       int kl, int nbh, int Sq, int nb, int sa, int sb, int D)
{
    constexpr int K = RbsCfg<NJ>::K, LD = RbsCfg<NJ>::LD, DP = 64 * NJ;
    __shared__ __align__(16) float sR[K * DP];
    __shared__ __align__(16) float sd[RBS_ROWS * LD];
    __shared__ long long srow[RBS_ROWS];
    const int a = blockIdx.y, tid = threadIdx.x, tr = tid >> 4, tc = tid & 15;
    const long long M = (long long)nbh * nb, m0 = (long long)blockIdx.x * RBS_ROWS;
    const int rows = (int)min((long long)RBS_ROWS, M - m0);
    if (tid < RBS_ROWS) srow[tid] = rbt_row(m0 + min(tid, rows - 1), nb, Sq, a, sa, sb);
    __syncthreads();
    float4 s4[8][NJ];   // src, the sum's other term
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int r = tr + 8 * i, c = 64 * j + 4 * tc;
            s4[i][j] = (r < rows && c < D) ? rbt_ld4(src + srow[r] * D, c, D) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    float acc[8][4 * NJ];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4 * NJ; ++j) acc[i][j] = 0.f;
    const float* Ra = R + (long long)a * kl * D;
    for (int k0 = 0; k0 < kl; k0 += K) {
        const int kn = min(K, kl - k0);
        if (k0) __syncthreads();   // the previous stage read
        if ((D & 3) == 0) {
            for (int e = tid; e < K * DP / 4; e += 128) {
                const int kk = e / (DP / 4), c = 4 * (e % (DP / 4));
                const bool ok = kk < kn && c < D;
                rbt_cp16(sR + kk * DP + c, ok ? Ra + (long long)(k0 + kk) * D + c : Ra, ok);
            }
        } else {
            for (int e = tid; e < K * DP; e += 128) {
                const int kk = e / DP, c = e % DP;
                const bool ok = kk < kn && c < D;
                rbt_cp4(sR + e, ok ? Ra + (long long)(k0 + kk) * D + c : Ra, ok);
            }
        }
        for (int e = tid; e < RBS_ROWS * K; e += 128) {
            const int r = e / K, kk = e % K;
            const bool ok = r < rows && kk < kn;
            rbt_cp4(sd + r * LD + kk, ok ? d + srow[r] * kl + k0 + kk : d, ok);
        }
        rbt_commit();
        rbt_wait<0>();
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < kn; ++kk) {
            float dv[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) dv[i] = sd[(tr + 8 * i) * LD + kk];
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const float4 rv = *reinterpret_cast<const float4*>(sR + kk * DP + 64 * j + 4 * tc);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    acc[i][4 * j] = fmaf(dv[i], rv.x, acc[i][4 * j]);
                    acc[i][4 * j + 1] = fmaf(dv[i], rv.y, acc[i][4 * j + 1]);
                    acc[i][4 * j + 2] = fmaf(dv[i], rv.z, acc[i][4 * j + 2]);
                    acc[i][4 * j + 3] = fmaf(dv[i], rv.w, acc[i][4 * j + 3]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int r = tr + 8 * i;
        if (r >= rows) continue;
        const long long base = srow[r] * D;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int c = 64 * j + 4 * tc;
            if (c >= D) continue;
            const float v[4] = {s4[i][j].x + acc[i][4 * j], s4[i][j].y + acc[i][4 * j + 1],
                                s4[i][j].z + acc[i][4 * j + 2], s4[i][j].w + acc[i][4 * j + 3]};
            if ((D & 3) == 0) {   // the four columns in one store
                if (LAST && DT < 2) {
                    u16 h[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) ra_st<DT>(h + e, v[e]);
                    *reinterpret_cast<uint2*>((u16*)dst + base + c) =
                        make_uint2((u32)h[0] | ((u32)h[1] << 16), (u32)h[2] | ((u32)h[3] << 16));
                } else {
                    *reinterpret_cast<float4*>((float*)dst + base + c) = make_float4(v[0], v[1], v[2], v[3]);
                }
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (c + e < D) {
                        if (LAST) ra_st<DT>((E*)dst + base + c + e, v[e]);
                        else ((float*)dst)[base + c + e] = v[e];
                    }
            }
        }
    }
}

// Block (a, kk tile, split) of 128 threads = 8 x 16 (tr, tc): thread (tr, tc)
// owns the outputs kk = kk0 + tr + 8 i (i < KI) and columns 4 tc + 64 j +
// (0..3) (j < NJ), a tile of KT = 8 KI values of kk by all D columns: per
// staged row KI shared-memory reads of d and NJ 4-value reads of q for
// 4 KI NJ products. Rows (bh, b) of the split go RBT_ROWS at a time through
// two stages (dynamic shared memory, rbt_grid_smem): d's KT columns as
// float32 and q's columns as stored, every copy of the next stage in flight
// while the current one is summed; the rows' addresses computed once per row.
template <typename E>
__host__ __device__ constexpr int rbt_grid_smem(int KT, int DP) {
    return 2 * RBT_ROWS * (KT * 4 + DP * (int)sizeof(E)) + 2 * RBT_ROWS * 8;
}

template <int DT, typename E, int KI, int NJ>
__global__ void __launch_bounds__(128)
relattn_bwd_terms_grid(const float* __restrict__ d, const E* __restrict__ q, float* __restrict__ part,
                       int na, int kl, int nbh, int Sq, int nb, int sa, int sb, int D, int splits)
{
    constexpr int KT = 8 * KI, DP = 64 * NJ, PER = 4 / (int)sizeof(E);   // PER: values of q per 4-byte copy
    extern __shared__ __align__(16) unsigned char rbt_smem[];
    float* sd = reinterpret_cast<float*>(rbt_smem);                            // [2][RBT_ROWS][KT]
    E* sq = reinterpret_cast<E*>(sd + 2 * RBT_ROWS * KT);                      // [2][RBT_ROWS][DP]
    long long* srow = reinterpret_cast<long long*>(sq + 2 * RBT_ROWS * DP);   // [2][RBT_ROWS]
    const int a = blockIdx.x, kk0 = blockIdx.y * KT, split = blockIdx.z, tid = threadIdx.x;
    const int tr = tid >> 4, tc = tid & 15;
    const long long M = (long long)nbh * nb;
    const long long m0 = M * split / splits, m1 = M * (split + 1) / splits;
    const int nchunks = (int)((m1 - m0 + RBT_ROWS - 1) / RBT_ROWS);
    const bool pairs = D % PER == 0;   // q's rows start on 4 bytes: 4-byte copies
    // stage n of the split's rows into buffer n & 1 (its row addresses first)
    auto issue = [&](int n) {
        const int buf = n & 1;
        const long long m = m0 + (long long)n * RBT_ROWS;
        const int rows = (int)min((long long)RBT_ROWS, m1 - m);
        long long* sr = srow + buf * RBT_ROWS;
        if (tid < RBT_ROWS) sr[tid] = rbt_row(m + min(tid, rows - 1), nb, Sq, a, sa, sb);
        __syncthreads();
        float* dd = sd + buf * RBT_ROWS * KT;
        E* qq = sq + buf * RBT_ROWS * DP;
        for (int e = tid; e < RBT_ROWS * KT; e += 128) {
            const int r = e / KT, col = e % KT;
            const bool ok = r < rows && kk0 + col < kl;
            rbt_cp4(dd + e, ok ? d + sr[r] * kl + kk0 + col : d, ok);
        }
        if (pairs) {
            for (int e = tid; e < RBT_ROWS * DP / PER; e += 128) {
                const int r = e / (DP / PER), c = PER * (e % (DP / PER));
                const bool ok = r < rows && c < D;
                rbt_cp4(qq + r * DP + c, ok ? q + sr[r] * D + c : q, ok);
            }
        } else {   // odd 16-bit rows: one value at a time, synchronously
            for (int e = tid; e < RBT_ROWS * DP; e += 128) {
                const int r = e / DP, c = e % DP;
                qq[e] = (r < rows && c < D) ? q[sr[r] * D + c] : E(0);
            }
        }
        rbt_commit();
    };
    float acc[KI][4 * NJ];
#pragma unroll
    for (int i = 0; i < KI; ++i)
#pragma unroll
        for (int j = 0; j < 4 * NJ; ++j) acc[i][j] = 0.f;
    if (nchunks > 0) issue(0);
    for (int n = 0; n < nchunks; ++n) {
        if (n + 1 < nchunks) {
            issue(n + 1);   // buffer (n + 1) & 1 was last read by stage n - 1, before the barrier below
            rbt_wait<1>();
        } else {
            rbt_wait<0>();
        }
        __syncthreads();
        const int buf = n & 1;
        const int rows = (int)min((long long)RBT_ROWS, m1 - (m0 + (long long)n * RBT_ROWS));
        const float* dd = sd + buf * RBT_ROWS * KT;
        const E* qq = sq + buf * RBT_ROWS * DP;
#pragma unroll 4
        for (int r = 0; r < rows; ++r) {
            float dv[KI];
#pragma unroll
            for (int i = 0; i < KI; ++i) dv[i] = dd[r * KT + tr + 8 * i];
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const float4 qv = rbt_sh4<DT>(qq + r * DP + 64 * j + 4 * tc);
#pragma unroll
                for (int i = 0; i < KI; ++i) {
                    acc[i][4 * j] = fmaf(dv[i], qv.x, acc[i][4 * j]);
                    acc[i][4 * j + 1] = fmaf(dv[i], qv.y, acc[i][4 * j + 1]);
                    acc[i][4 * j + 2] = fmaf(dv[i], qv.z, acc[i][4 * j + 2]);
                    acc[i][4 * j + 3] = fmaf(dv[i], qv.w, acc[i][4 * j + 3]);
                }
            }
        }
        __syncthreads();   // buffer n & 1 read: stage n + 2 may fill it
    }
#pragma unroll
    for (int i = 0; i < KI; ++i) {
        const int kk = kk0 + tr + 8 * i;
        if (kk >= kl) continue;
        float* dstp = part + (((long long)split * na + a) * kl + kk) * D;
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 64 * j + 4 * tc + e;
                if (c < D) dstp[c] = acc[i][4 * j + e];
            }
    }
}

// SAM's gather for the pullback: out[p, c] = table[index[p], c] as float32
// (p < P positions (a, kk) of the index table, c < D), one thread per value.
template <int DT, typename E>
__global__ void __launch_bounds__(256)
relattn_bwd_terms_gather(const E* __restrict__ table, const int* __restrict__ index, float* __restrict__ out,
                         int P, int D)
{
    const long long e = (long long)blockIdx.x * 256 + threadIdx.x;
    if (e >= (long long)P * D) return;
    const int p = (int)(e / D), c = (int)(e - (long long)p * D);
    out[e] = ra_ld<DT>(table + (long long)index[p] * D + c);
}

// Block r of 256 threads: table row r's positions (at most RBT_SLOTS of them
// staged in shared memory, the rest read in turn) times the splits, as one
// list of (position, split) pairs, cut into 8 contiguous runs, one per warp;
// lane l sums columns l + 32 j over its run in order, its loads issued
// RBT_LOADS at a time; the 8 warps' sums are then added in warp order.
constexpr int RBT_SLOTS = 256, RBT_LOADS = 8;

__global__ void __launch_bounds__(256)
relattn_bwd_terms_scatter(const float* __restrict__ part, const long long* __restrict__ slots, float* __restrict__ g,
                          int width, int rows, long long pad, long long positions, int D, int splits)
{
    __shared__ long long sp[RBT_SLOTS];
    __shared__ float red[8][128];
    __shared__ int count;
    const int r = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid == 0) count = width;   // or the first pad among the staged slots
    __syncthreads();
    for (int t = tid; t < min(width, RBT_SLOTS); t += 256) {
        const long long p = slots[(long long)t * rows + r];
        sp[t] = p;
        if (p == pad) atomicMin(&count, t);   // positions come first, then the pad
    }
    __syncthreads();
    int n = count;
    if (n > RBT_SLOTS) {   // more positions than staged: count the rest
        n = RBT_SLOTS;
        while (n < width && slots[(long long)n * rows + r] != pad) ++n;
    }
    const int total = n * splits, run = (total + 7) / 8;
    const int e0 = min(total, warp * run), e1 = min(total, e0 + run);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int e = e0; e < e1; e += RBT_LOADS) {
        float v[RBT_LOADS][4];
#pragma unroll
        for (int u = 0; u < RBT_LOADS; ++u) {
            const int ee = e + u, t = ee / splits, s = ee - t * splits;
            const bool ok = ee < e1;
            const long long p = !ok ? 0 : t < RBT_SLOTS ? sp[t] : slots[(long long)t * rows + r];
            const float* src = part + (s * positions + p) * D;
#pragma unroll
            for (int j = 0; j < 4; ++j) v[u][j] = (ok && lane + 32 * j < D) ? src[lane + 32 * j] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < RBT_LOADS; ++u)
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (e + u < e1) acc[j] += v[u][j];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
        if (lane + 32 * j < D) red[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    for (int c = tid; c < D; c += 256) {
        float sum = red[0][c];
        for (int w = 1; w < 8; ++w) sum += red[w][c];
        g[(long long)r * D + c] = sum;
    }
}
