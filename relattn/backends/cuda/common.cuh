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
