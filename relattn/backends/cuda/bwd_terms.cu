// The pullback through the relative-position terms on the GPU, from the
// fused backward's float32 terms' gradients dh (B*H, Sq, kh) and dw (B*H, Sq,
// kw), with the gathered tables Rh (qh, kh, D) and Rw (qw, kw, D) in float32
// and the query i = y * qw + x:
//
//   relattn_bwd_terms_dq      dq_out = dq + (sum_ky dh[i, ky] Rh[y, ky] + sum_kx dw[i, kx] Rw[x, kx]),
//                             rounded once to q's type
//   relattn_bwd_terms_grid    one side's gathered-table gradient dR[a, kk] = sum over (bh, b) of
//                             d[i, kk] q[i] (side h: a = y, b = x, d = dh; side w: a = x, b = y, d = dw),
//                             a split of the (bh) range per blockIdx.z into part[split]
//   relattn_bwd_terms_scatter the adjoint of SAM's gather: g[r] = sum over the positions p = a * kl + kk
//                             that read table row r (slots[t, r], padded with the zero position) and
//                             over the splits of part[split, p]
//
// Every sum has one owner and a fixed order: the same bits on every run.
// DT 0 float16, 1 bfloat16 (E u16), 2 float32 (E float). Needs common.cuh.

template <int DT, typename E>
__global__ void __launch_bounds__(256)
relattn_bwd_terms_dq(const float* __restrict__ dq, const float* __restrict__ dh, const float* __restrict__ dw,
                     const float* __restrict__ Rh, const float* __restrict__ Rw, E* __restrict__ out,
                     long long n, int Sq, int qw, int D, int kh, int kw)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;   // over B*H*Sq*D
    if (idx >= n) return;
    const long long row = idx / D;
    const int c = (int)(idx - row * D);
    const int i = (int)(row % Sq), y = i / qw, x = i - y * qw;
    const float* h = dh + row * kh;
    const float* w = dw + row * kw;
    const float* th = Rh + (long long)y * kh * D + c;
    const float* tw = Rw + (long long)x * kw * D + c;
    float a = 0.f, b = 0.f;
    for (int j = 0; j < kh; ++j) a = fmaf(h[j], th[(long long)j * D], a);
    for (int j = 0; j < kw; ++j) b = fmaf(w[j], tw[(long long)j * D], b);
    ra_st<DT>(out + idx, dq[idx] + (a + b));
}

// Block (a, kk chunk, split) of 256 threads: outputs (kk, c) for KC values of
// kk from blockIdx.y * KC (KC = 16 * 256 / D, each thread 16 outputs), rows
// (bh, b) of its split staged 16 at a time in shared memory (d's KC columns
// and q's D columns).
constexpr int RBT_ROWS = 16, RBT_OUT = 16;

template <int DT, typename E>
__global__ void __launch_bounds__(256)
relattn_bwd_terms_grid(const float* __restrict__ d, const E* __restrict__ q, float* __restrict__ part,
                       int na, int kl, int nbh, int Sq, int nb, int sa, int sb, int D, int splits)
{
    extern __shared__ float rbt_smem[];
    const int KC = RBT_OUT * 256 / D;
    float* sd = rbt_smem;                  // [RBT_ROWS][KC]
    float* sq = sd + RBT_ROWS * KC;        // [RBT_ROWS][D]
    const int a = blockIdx.x, kk0 = blockIdx.y * KC, split = blockIdx.z, tid = threadIdx.x;
    const int kn = min(KC, kl - kk0);
    const long long m0 = (long long)nbh * split / splits * nb, m1 = (long long)nbh * (split + 1) / splits * nb;
    float acc[RBT_OUT];
#pragma unroll
    for (int o = 0; o < RBT_OUT; ++o) acc[o] = 0.f;
    for (long long m = m0; m < m1; m += RBT_ROWS) {
        const int rows = (int)min((long long)RBT_ROWS, m1 - m);
        __syncthreads();
        for (int e = tid; e < RBT_ROWS * (KC + D); e += 256) {
            const int r = e / (KC + D), col = e - r * (KC + D);
            float val = 0.f;
            if (r < rows) {
                const long long mm = m + r;
                const int bh = (int)(mm / nb), b = (int)(mm - (long long)bh * nb);
                const long long row = (long long)bh * Sq + a * sa + b * sb;
                if (col < KC) val = (col < kn) ? d[row * kl + kk0 + col] : 0.f;
                else val = ra_ld<DT>(q + row * D + (col - KC));
            }
            if (col < KC) sd[r * KC + col] = val;
            else sq[r * D + col - KC] = val;
        }
        __syncthreads();
        for (int r = 0; r < rows; ++r) {
#pragma unroll
            for (int o = 0; o < RBT_OUT; ++o) {
                const int out = tid + o * 256, kk = out / D, c = out - kk * D;
                acc[o] = fmaf(sd[r * KC + kk], sq[r * D + c], acc[o]);
            }
        }
    }
#pragma unroll
    for (int o = 0; o < RBT_OUT; ++o) {
        const int out = tid + o * 256, kk = out / D, c = out - kk * D;
        if (kk < kn) part[(((long long)split * na + a) * kl + kk0 + kk) * D + c] = acc[o];
    }
}

__global__ void __launch_bounds__(128)
relattn_bwd_terms_scatter(const float* __restrict__ part, const long long* __restrict__ slots, float* __restrict__ g,
                          int width, int rows, long long pad, long long positions, int D, int splits)
{
    const int r = blockIdx.x;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float acc = 0.f;
        for (int t = 0; t < width; ++t) {
            const long long p = slots[(long long)t * rows + r];
            if (p == pad) break;
            for (int s = 0; s < splits; ++s) acc += part[(s * positions + p) * D + c];
        }
        g[(long long)r * D + c] = acc;
    }
}
