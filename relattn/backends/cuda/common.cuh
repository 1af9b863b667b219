// relattn CUDA prelude, first in every program NVRTC compiles: the types, the
// PTX helpers every kernel family uses (ex2, packing to 16 bits, cp.async,
// key -> (ky, kx)) and the online-softmax step of the tensor-core kernels.
// No headers are included: 16-bit data travels as raw words and conversions
// and tensor-core instructions are inline PTX, so NVRTC alone builds it.
// _build.py puts the shared headers and one or more family files after it.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define RA_INF __int_as_float(0x7f800000)
#define RA_LOG2E 1.4426950408889634f

__device__ __forceinline__ float ra_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// two float32 -> packed float16x2 (DT 0) / bfloat16x2 (DT 1), lo in the low half
template <int DT>
__device__ __forceinline__ u32 ra_pack(float lo, float hi) {
    u32 r;
    if (DT == 1) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

__device__ __forceinline__ u32 ra_smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 ra_a; cvta.to.shared.u64 ra_a, %1; cvt.u32.u64 %0, ra_a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte async copy global -> shared; bytes beyond src_bytes are zero-filled.
__device__ __forceinline__ void ra_cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void ra_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void ra_cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

// key -> (ky, kx) for key < 2^22 without an integer division.
__device__ __forceinline__ void ra_split_key(int key, int kw, float inv_kw, int& ky, int& kx) {
    int y = __float2int_rz(((float)key + 0.5f) * inv_kw);
    int x = key - y * kw;
    if (x < 0) { y -= 1; x += kw; }
    else if (x >= kw) { y += 1; x -= kw; }
    ky = y;
    kx = x;
}

// ---- online softmax, shared by the tensor-core attention kernels
// A thread holds two query rows (rr = 0, 1) of an m16 mma fragment: scores
// s[4 j + 2 rr + e] for j < NB blocks of 8 keys (e = 0, 1), in the log2
// domain but still without off[rr * NU + u], a constant part of the logit of
// row rr over the blocks u * NB / NU ... (u + 1) * NB / NU - 1 (rel_h when
// those keys are one key row: added to the unit's maximum and shift here
// rather than to every score). The rest of a row lives in the lanes sharing
// lane / 4. Updates the running maximum and sum, overwrites s with the
// probabilities exp2(s + off - m) and returns in alpha[rr] the factor for the
// running output: exactly 1 when the row maximum did not change.
template <int NB, int NU = 1>
__device__ __forceinline__ void ra_online_softmax(float* s, const float* off, float* m_run, float* l_run,
                                                  float* alpha) {
    constexpr int JU = NB / NU;   // blocks per unit
    static_assert(JU * NU == NB, "units of whole 8-key blocks");
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        float mx = -RA_INF;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
            float mu = -RA_INF;
#pragma unroll
            for (int j = u * JU; j < (u + 1) * JU; ++j) mu = fmaxf(mu, fmaxf(s[4 * j + 2 * rr], s[4 * j + 2 * rr + 1]));
            mx = fmaxf(mx, mu + off[rr * NU + u]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[rr], mx);
        const float m_use = (m_new == -RA_INF) ? 0.f : m_new;
        alpha[rr] = (m_new == m_run[rr]) ? 1.f : ra_exp2(m_run[rr] - m_use);
        m_run[rr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
            const float shift = m_use - off[rr * NU + u];
#pragma unroll
            for (int j = u * JU; j < (u + 1) * JU; ++j) {
                const float p0 = ra_exp2(s[4 * j + 2 * rr] - shift);
                const float p1 = ra_exp2(s[4 * j + 2 * rr + 1] - shift);
                s[4 * j + 2 * rr] = p0;
                s[4 * j + 2 * rr + 1] = p1;
                sum += p0 + p1;
            }
        }
        l_run[rr] = l_run[rr] * alpha[rr] + sum;
    }
}

// o[4 d + 2 rr + e] *= alpha[rr] for d < ND: the running output of the two
// rows, skipped when no row of the warp changed its maximum (alpha == 1),
// unless ALWAYS: then the multiplies stay in the tile's straight-line code
// (no vote and branch between the softmax and the next products: measured
// faster in relattn_ws; the same bits, x * 1 is x).
template <int ND, bool ALWAYS = false>
__device__ __forceinline__ void ra_rescale(float* o, const float* alpha) {
    if (ALWAYS || __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[4 * d + e] *= alpha[e >> 1];
    }
}

// 1 / (the row's sum over the 4 lanes that share it).
__device__ __forceinline__ float ra_row_inv(float l) {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    return 1.f / l;
}

// ---- the exact slow path for rows the fast path leaves non-finite
// The kernels are built with --use_fast_math (flush to zero, approximate exp2
// and division) and multiply unnormalised weights, rounded to the tensor
// cores' input type, by the values: a weight below that type's range meets an
// infinite value as 0 x inf = NaN, where the formula's tiny weight gives inf
// (and an unnormalised sum of huge values can overflow where the formula's
// normalised one does not). Either way the row's output is not finite, while
// every row whose output the formula gives finite the fast path gives finite
// too (a non-finite input a row meets makes its fast output non-finite). So
// each kernel checks its rows at the store, and the warp holding a
// non-finite row recomputes it with the formula's operations in their order
// (spec/REFERENCE.md): logits (scale q) . k + rel_h + rel_w, the row max
// (NaN if any logit is NaN, as numpy's max), exp(logit - max), their sum,
// each weight divided by it, the weights times v; in IEEE arithmetic (no
// flush to zero; exp rounded from double precision) in the compute type
// (float32; float64 for float64 data). Clean rows never take this path.

__device__ __forceinline__ float ra_ieee_fma(float a, float b, float c) {
    float r;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
}
__device__ __forceinline__ double ra_ieee_fma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float ra_ieee_add(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ double ra_ieee_add(double a, double b) { return a + b; }
__device__ __forceinline__ float ra_ieee_sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ double ra_ieee_sub(double a, double b) { return a - b; }
__device__ __forceinline__ float ra_ieee_div(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ double ra_ieee_div(double a, double b) { return a / b; }
__device__ __forceinline__ float ra_ieee_exp(float x) {
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(exp((double)x)));
    return r;
}
__device__ __forceinline__ double ra_ieee_exp(double x) { return exp(x); }
__device__ __forceinline__ bool ra_isnan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ bool ra_isnan(double x) {
    return (__double_as_longlong(x) & 0x7fffffffffffffffll) > 0x7ff0000000000000ll;
}
__device__ __forceinline__ bool ra_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool ra_finite(double x) {
    return (__double_as_longlong(x) & 0x7ff0000000000000ll) != 0x7ff0000000000000ll;
}
__device__ __forceinline__ float ra_nan(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double ra_nan(double) { return __longlong_as_double(0x7ff8000000000000ll); }

// Element loads and stores of the slow path: 16-bit data (DT 0 float16,
// DT 1 bfloat16) as float32, float32 and float64 as themselves.
template <int DT> __device__ __forceinline__ float ra_ld(const u16* p) {
    const u16 x = *p;
    if (DT == 1) return __uint_as_float((u32)x << 16);
    float f;
    asm("{ .reg .b16 ra_h; mov.b16 ra_h, %1; cvt.f32.f16 %0, ra_h; }" : "=f"(f) : "h"(x));
    return f;
}
// the float16 value in h's low half, as float32
__device__ __forceinline__ float ra_f16_lo(u32 h) {
    float f;
    asm("{ .reg .b16 ra_h; cvt.u16.u32 ra_h, %1; cvt.f32.f16 %0, ra_h; }" : "=f"(f) : "r"(h));
    return f;
}
template <int DT> __device__ __forceinline__ float ra_ld(const float* p) { return *p; }
template <int DT> __device__ __forceinline__ double ra_ld(const double* p) { return *p; }
template <int DT> __device__ __forceinline__ void ra_st(u16* p, float x) {
    u16 r;
    if (DT == 1) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    *p = r;
}
template <int DT> __device__ __forceinline__ void ra_st(float* p, float x) { *p = x; }
template <int DT> __device__ __forceinline__ void ra_st(double* p, double x) { *p = x; }

template <typename E> struct RaWork { typedef float T; };   // the compute type of data E
template <> struct RaWork<double> { typedef double T; };

// Where one (batch, head)'s inputs live for the slow path: q, k, v (rows at
// q + r * qss, ..., D columns qsd, ... apart) and the relative terms,
// given (rel_h (Sq, k_h) and rel_w (Sq, k_w) rows of type TT; null: none) or
// fused (th / tw: the tables' rows of D values of E, gathered through
// get_rel_pos's index tables idx_h (q_h, k_h) and idx_w (q_w, k_w)).
template <int DT, typename E, typename TT>
struct RaRowSrc {
    const E* q;
    const E* k;
    const E* v;
    long long qss, kss, vss;
    const TT* rel_h;
    const TT* rel_w;
    const E* th;
    const E* tw;
    const int* idx_h;
    const int* idx_w;
    int qw, Sk, D, kh, kw;
    long long qsd = 1, ksd = 1, vsd = 1;   // column strides
};

// The slow path's source for a kernel that reads given terms: (batch, head)
// bh's rows of rel_h (Sq, kh) and rel_w (Sq, kw), or none (terms false).
template <int DT, typename E, typename TT>
__device__ __forceinline__ RaRowSrc<DT, E, TT> ra_given_terms_src(const E* q, const E* k, const E* v, long long qss,
                                                                  long long kss, long long vss, bool terms,
                                                                  const TT* rel_h, const TT* rel_w, int bh, int Sq,
                                                                  int Sk, int D, int kh, int kw) {
    return {q, k, v, qss, kss, vss,
            terms ? rel_h + (long long)bh * Sq * kh : nullptr,
            terms ? rel_w + (long long)bh * Sq * kw : nullptr,
            nullptr, nullptr, nullptr, nullptr, 0, Sk, D, kh, kw};
}

// logit[r, j] in the formula's order: ((scale q_r) . k_j + rel_h[r, ky]) + rel_w[r, kx]
template <int DT, typename E, typename TT, typename W>
__device__ __forceinline__ W ra_exact_logit(const RaRowSrc<DT, E, TT>& s, int r, int j, W scale) {
    const E* qr = s.q + (long long)r * s.qss;
    const E* kr = s.k + (long long)j * s.kss;
    W acc = 0;
    for (int c = 0; c < s.D; ++c)
        acc = ra_ieee_fma((W)(scale * ra_ld<DT>(qr + c * s.qsd)), (W)ra_ld<DT>(kr + c * s.ksd), acc);
    if (s.rel_h != nullptr || s.th != nullptr) {
        const int ky = j / s.kw, kx = j - ky * s.kw;
        W bh = 0, bw = 0;
        if (s.th != nullptr) {
            const int y = r / s.qw, x = r - y * s.qw;
            const E* hr = s.th + (long long)s.idx_h[y * s.kh + ky] * s.D;
            const E* wr = s.tw + (long long)s.idx_w[x * s.kw + kx] * s.D;
            for (int c = 0; c < s.D; ++c) {
                const W qc = ra_ld<DT>(qr + c * s.qsd);
                bh = ra_ieee_fma(qc, (W)ra_ld<DT>(hr + c), bh);
                bw = ra_ieee_fma(qc, (W)ra_ld<DT>(wr + c), bw);
            }
        } else {
            bh = (W)s.rel_h[(long long)r * s.kh + ky];
            bw = (W)s.rel_w[(long long)r * s.kw + kx];
        }
        acc = ra_ieee_add(ra_ieee_add(acc, bh), bw);
    }
    return acc;
}

// Whether a stored 16-bit value (DT 0 float16, DT 1 bfloat16) is +-inf or NaN.
template <int DT>
__device__ __forceinline__ bool ra_nonfinite16(u32 bits) {
    constexpr u32 E = DT == 1 ? 0x7f80u : 0x7c00u;
    return (bits & E) == E;
}

// Whether this thread's columns (8 d + 2 t, + 1 for d < HD / 8, below D) of the
// stored 16-bit row orow hold a non-finite value: the check the persistent
// kernels repeat after their loop for the rows of the tiles they flagged.
template <int DT, int HD>
__device__ __forceinline__ bool ra_row_nonfinite16(const u16* orow, int D, int t) {
    bool bad = false;
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) {
        const int col = d * 8 + 2 * t;
        if (col < D) {
            const u32 w = *reinterpret_cast<const u32*>(orow + col);
            bad |= ra_nonfinite16<DT>(w & 0xffffu) || ra_nonfinite16<DT>(w >> 16);
        }
    }
    return bad;
}

// The scale of the logits in natural units, from the kernels' scale * log2(e).
__device__ __forceinline__ float ra_scale_from_log2(float scale_log2) {
    return (float)((double)scale_log2 * 0.6931471805599453);   // x ln(2)
}
__device__ __forceinline__ double ra_scale_from_log2(double scale_log2) { return scale_log2 * 0.6931471805599453; }

// Row r of the output, recomputed by the whole warp (lane: its lane) into
// orow[0 .. D): see the section comment. scale_log2: the kernel's scale of
// the logits times log2(e). Two forms, by what ptxas -v shows per family:
// ra_exact_row is a call (one copy of the slow path, off the hot code: where
// it is inlined, relattn_win drops to 128 registers and spills 250-290
// bytes); relattn_ws inlines it (ra_exact_row_inline: the call cost its
// 128-register configurations a ~300-byte stack frame and 4-40 bytes of
// spills, none inlined).
template <int DT, typename E, typename TT>
__device__ __forceinline__ void ra_exact_row_inline(const RaRowSrc<DT, E, TT> s, int r,
                                                    typename RaWork<E>::T scale_log2, E* orow, int lane) {
    typedef typename RaWork<E>::T W;
    const W scale = ra_scale_from_log2(scale_log2);
    W m = -(W)RA_INF;
    bool nan = false;
    for (int j = lane; j < s.Sk; j += 32) {
        const W x = ra_exact_logit<DT>(s, r, j, scale);
        nan |= ra_isnan(x);
        m = x > m ? x : m;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const W y = __shfl_xor_sync(0xffffffffu, m, o);
        m = y > m ? y : m;
    }
    if (__any_sync(0xffffffffu, nan)) m = ra_nan(m);
    W l = 0;
    for (int j = lane; j < s.Sk; j += 32) l = ra_ieee_add(l, ra_ieee_exp(ra_ieee_sub(ra_exact_logit<DT>(s, r, j, scale), m)));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l = ra_ieee_add(l, __shfl_xor_sync(0xffffffffu, l, o));
    for (int c0 = 0; c0 < s.D; c0 += 32) {
        const int c = c0 + lane;
        W acc = 0;
        for (int j0 = 0; j0 < s.Sk; j0 += 32) {
            const int j = j0 + lane;
            W p = 0;
            if (j < s.Sk) p = ra_ieee_div(ra_ieee_exp(ra_ieee_sub(ra_exact_logit<DT>(s, r, j, scale), m)), l);
            const int n = min(32, s.Sk - j0);
            for (int i = 0; i < n; ++i) {
                const W pi = __shfl_sync(0xffffffffu, p, i);
                if (c < s.D) acc = ra_ieee_fma(pi, (W)ra_ld<DT>(s.v + (long long)(j0 + i) * s.vss + c * s.vsd), acc);
            }
        }
        if (c < s.D) ra_st<DT>(orow + c, acc);
    }
}

template <int DT, typename E, typename TT>
__device__ __noinline__ void ra_exact_row(const RaRowSrc<DT, E, TT> s, int r, typename RaWork<E>::T scale_log2, E* orow,
                                          int lane) {
    ra_exact_row_inline<DT>(s, r, scale_log2, orow, lane);
}

// After the fast store: the rows of this warp with a non-finite output (bad:
// this thread saw one in its columns of its row `row`; LPR lanes, aligned,
// share a row) each recomputed once by fix(row), with the whole warp.
template <int LPR, typename Fix>
__device__ __forceinline__ void ra_fix_rows_if(bool bad, int row, Fix&& fix) {
    u32 b = __ballot_sync(0xffffffffu, bad);
    while (b != 0u) {
        const int src = __ffs(b) - 1;
        const int r = __shfl_sync(0xffffffffu, row, src);
        b &= ~((LPR == 32 ? 0xffffffffu : ((1u << LPR) - 1u)) << (src & ~(LPR - 1)));
        fix(r);
    }
}
