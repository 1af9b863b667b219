// relattn_simt<T, HD, REL>: attention with the relative-position terms in
// float32 / float64 on the SIMT cores (plain FMA, no tensor cores); strided
// loads, any key grid. Needs common.cuh before it.
//
// 256 threads as 16 x 16; each thread owns a 4 x 4 block of the 64 x 64 score
// tile and 4 rows x HD/16 columns of O. q, k, v: element strides (batch, head,
// row, col). rel_*: contiguous, type T.

// The bias modes (REL), as families/simt.py's Bias numbers them.
namespace simt_bias {
constexpr int NONE = 0;       // no relative terms
constexpr int GENERIC = 2;    // any k_h, k_w: both terms looked up per key
}

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
                if (REL != simt_bias::NONE && key < Sk) ra_split_key(key, kw, inv_kw, ky, kx);
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    T bv = (T)0;
                    if (REL != simt_bias::NONE && key < Sk) bv = (rh_row[a][ky] + rw_row[a][kx]) * LOG2E;
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
    bool bad[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        T l = l_run[a];
#pragma unroll
        for (int off = 1; off < 16; off <<= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
        const T inv = (T)1 / l;
        const int row = m0 + ty * 4 + a;
        bad[a] = false;
        if (row < Sq) {
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const int col = tx + 16 * c;
                if (col < D) {
                    const T x = o[a][c] * inv;
                    ob[(long long)row * D + col] = x;
                    bad[a] |= !ra_finite(x);
                }
            }
        }
    }
    // the rows left non-finite are recomputed exactly (ra_exact_row; 16 lanes per row)
    auto src = ra_given_terms_src<0>(qb, kb, vb, qss, kss, vss, REL != simt_bias::NONE, rel_h, rel_w, bh, Sq, Sk,
                                     D, kh, kw);
    src.qsd = qsd;
    src.ksd = ksd;
    src.vsd = vsd;
#pragma unroll
    for (int a = 0; a < 4; ++a)
        ra_fix_rows_if<16>(bad[a], m0 + ty * 4 + a, [&](int r) {
            ra_exact_row<0>(src, r, scale_log2, ob + (long long)r * D, tid & 31);
        });
}
