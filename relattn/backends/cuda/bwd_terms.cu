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

constexpr int RBT_ROWS = 32, RBT_MAXCJ = 8;   // D <= 128

// The row i = bh * Sq + a * sa + b * sb of the m-th row (bh, b) = (m / nb, m % nb)
// that reads table slice a (side h: a = y, b = x, sa = qw, sb = 1; side w: a = x,
// b = y, sa = 1, sb = qw).
__device__ __forceinline__ long long rbt_row(long long m, int nb, int Sq, int a, int sa, int sb) {
    const long long bh = m / nb;
    return bh * Sq + (long long)a * sa + (m - bh * nb) * sb;
}

// Block (row tile, a) of 256 threads = 16 x 16 (tr, tc): thread (tr, tc) owns
// rows tr + 16 i (i < 4) of the block's RBS_ROWS rows (bh, b) and columns
// c = tc + 16 j (j < D / 16, rounded up); R[a]'s rows and the rows' d staged
// RBS_K values of kk at a time.
constexpr int RBS_ROWS = 64, RBS_K = 32, RBS_MAXD = 128;

template <int DT, typename E, bool LAST>
__global__ void __launch_bounds__(256)
relattn_bwd_terms_side(const float* __restrict__ d, const float* __restrict__ R, const float* src, void* dst,
                       int kl, int nbh, int Sq, int nb, int sa, int sb, int D)
{
    __shared__ float sR[RBS_K * RBS_MAXD];
    __shared__ float sd[RBS_ROWS][RBS_K + 1];
    __shared__ long long srow[RBS_ROWS];
    const int a = blockIdx.y, tid = threadIdx.x, tr = tid >> 4, tc = tid & 15;
    const int CJ = (D + 15) / 16, DP = 16 * CJ;
    const long long M = (long long)nbh * nb, m0 = (long long)blockIdx.x * RBS_ROWS;
    const int rows = (int)min((long long)RBS_ROWS, M - m0);
    if (tid < rows) srow[tid] = rbt_row(m0 + tid, nb, Sq, a, sa, sb);
    float acc[4][RBT_MAXCJ];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < RBT_MAXCJ; ++j) acc[i][j] = 0.f;
    const float* Ra = R + (long long)a * kl * D;
    for (int k0 = 0; k0 < kl; k0 += RBS_K) {
        const int kn = min(RBS_K, kl - k0);
        __syncthreads();   // srow written; the previous slice read
        for (int e = tid; e < RBS_K * DP; e += 256) {
            const int kk = e / DP, c = e - kk * DP;
            sR[e] = (kk < kn && c < D) ? Ra[(long long)(k0 + kk) * D + c] : 0.f;
        }
        for (int e = tid; e < RBS_ROWS * RBS_K; e += 256) {
            const int r = e / RBS_K, kk = e - r * RBS_K;
            sd[r][kk] = (r < rows && kk < kn) ? d[srow[r] * kl + k0 + kk] : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < kn; ++kk) {
            float dv[4], rv[RBT_MAXCJ];
#pragma unroll
            for (int i = 0; i < 4; ++i) dv[i] = sd[tr + 16 * i][kk];
#pragma unroll
            for (int j = 0; j < RBT_MAXCJ; ++j) rv[j] = (j < CJ) ? sR[kk * DP + tc + 16 * j] : 0.f;
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < RBT_MAXCJ; ++j)
                    if (j < CJ) acc[i][j] = fmaf(dv[i], rv[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = tr + 16 * i;
        if (r >= rows) continue;
        const long long base = srow[r] * D;
#pragma unroll
        for (int j = 0; j < RBT_MAXCJ; ++j) {
            const int c = tc + 16 * j;
            if (j < CJ && c < D) {
                const float v = src[base + c] + acc[i][j];
                if (LAST) ra_st<DT>((E*)dst + base + c, v);
                else ((float*)dst)[base + c] = v;
            }
        }
    }
}

// Block (a, kk tile, split) of 256 threads = 16 x 16 (tr, tc): thread (tr, tc)
// owns the outputs kk = kk0 + tr + 16 i (i < TI) and c = tc + 16 j (j < D / 16,
// rounded up), a tile of KT = 16 TI values of kk by all D columns, so that each
// staged row costs TI + CJ shared-memory reads for TI * CJ products. Rows (bh, b)
// of the split are staged RBT_ROWS at a time (d's KT columns, q's columns as
// float32, zero-padded), their addresses computed once per row.

template <int DT, typename E, int TI>
__global__ void __launch_bounds__(256)
relattn_bwd_terms_grid(const float* __restrict__ d, const E* __restrict__ q, float* __restrict__ part,
                       int na, int kl, int nbh, int Sq, int nb, int sa, int sb, int D, int splits)
{
    constexpr int KT = 16 * TI;
    extern __shared__ float rbt_smem[];
    const int CJ = (D + 15) / 16, DP = 16 * CJ;
    float* sd = rbt_smem;                          // [RBT_ROWS][KT]
    float* sq = sd + RBT_ROWS * KT;                // [RBT_ROWS][DP]
    long long* srow = (long long*)(sq + RBT_ROWS * DP);   // [RBT_ROWS] row of each staged row
    const int a = blockIdx.x, kk0 = blockIdx.y * KT, split = blockIdx.z, tid = threadIdx.x;
    const int tr = tid >> 4, tc = tid & 15;
    const long long M = (long long)nbh * nb;
    const long long m0 = M * split / splits, m1 = M * (split + 1) / splits;
    float acc[TI][RBT_MAXCJ];
#pragma unroll
    for (int i = 0; i < TI; ++i)
#pragma unroll
        for (int j = 0; j < RBT_MAXCJ; ++j) acc[i][j] = 0.f;
    for (long long m = m0; m < m1; m += RBT_ROWS) {
        const int rows = (int)min((long long)RBT_ROWS, m1 - m);
        __syncthreads();   // the previous rows are read
        if (tid < RBT_ROWS && tid < rows) srow[tid] = rbt_row(m + tid, nb, Sq, a, sa, sb);
        __syncthreads();
        for (int e = tid; e < RBT_ROWS * KT; e += 256) {
            const int r = e / KT, col = e - r * KT;
            sd[e] = (r < rows && kk0 + col < kl) ? d[srow[r] * kl + kk0 + col] : 0.f;
        }
        for (int e = tid; e < RBT_ROWS * DP; e += 256) {
            const int r = e / DP, c = e - r * DP;
            sq[e] = (r < rows && c < D) ? ra_ld<DT>(q + srow[r] * D + c) : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int r = 0; r < rows; ++r) {
            float dv[TI], qv[RBT_MAXCJ];
#pragma unroll
            for (int i = 0; i < TI; ++i) dv[i] = sd[r * KT + tr + 16 * i];
#pragma unroll
            for (int j = 0; j < RBT_MAXCJ; ++j) qv[j] = (j < CJ) ? sq[r * DP + tc + 16 * j] : 0.f;
#pragma unroll
            for (int i = 0; i < TI; ++i)
#pragma unroll
                for (int j = 0; j < RBT_MAXCJ; ++j)
                    if (j < CJ) acc[i][j] = fmaf(dv[i], qv[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < TI; ++i) {
        const int kk = kk0 + tr + 16 * i;
#pragma unroll
        for (int j = 0; j < RBT_MAXCJ; ++j) {
            const int c = tc + 16 * j;
            if (j < CJ && kk < kl && c < D) part[(((long long)split * na + a) * kl + kk) * D + c] = acc[i][j];
        }
    }
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
