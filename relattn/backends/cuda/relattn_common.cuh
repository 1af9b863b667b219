// relattn CUDA prelude: types and PTX helpers shared by relattn_kernels.cu and
// relattn_sm90.cu. Not compiled on its own: both loaders (cupy_gpu._read_source,
// _sm90.source) put this text in front of their kernel file.

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
// (no vote and branch between the softmax and the next products; relattn_ws:
// H100, SAM-B global 0.1314 -> 0.1300 ms, SAM-H 0.2154 -> 0.2081, four rounds;
// the same bits, x * 1 is x).
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

// ---- float32 on tensor cores (relattn_tf32, relattn_wgt)
// Their common parameters (cupy_gpu._tf32_plan passes them): q, k, v float32
// with element strides (batch, head, row); the terms (B*H, Sq, kh / kw); out
// (B*H, Sq, D); flags per 64-row block for the IEEE-safe second pass.
// The fast 3xTF32 pass's flag for its IEEE-safe rerun: a non-finite row sum
// (the thread's two rows) or any of its N running-output values.
template <int N>
__device__ __forceinline__ bool ra_nonfinite(const float* l_run, const float* o) {
    bool bad = false;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) bad |= !(fabsf(l_run[rr]) < RA_INF);
#pragma unroll
    for (int i = 0; i < N; ++i) bad |= !(fabsf(o[i]) < RA_INF);
    return bad;
}

#define RA_F32_KERNEL_PARAMS                                                              \
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, \
    const float* __restrict__ rel_h, const float* __restrict__ rel_w,                     \
    float* __restrict__ out, int* __restrict__ flags,                                     \
    int H, int Sq, int Sk, int D, int kh, int kw,                                         \
    long long qsb, long long qsh, long long qss,                                          \
    long long ksb, long long ksh, long long kss,                                          \
    long long vsb, long long vsh, long long vss,                                          \
    float scale_log2, float inv_kw

// x -> big (TF32, nearest, ties away: add half an ulp of the 10-bit mantissa
// and clear the 13 low bits) and small = x - big (SPLIT == 3 only).
// The fast form turns an infinite x into small = inf - inf = NaN, and its big
// part meets the other operand's small part (0 * inf = NaN). SAFE keeps IEEE
// semantics for non-finite and near-overflow x: big = x (NaN quieted so the
// tensor core still sees a NaN), small = 0, and bigx, the big part used in
// the two cross products, = 0; a non-finite x then enters only big x big.
template <int SPLIT, int N, bool SAFE = false>
__device__ __forceinline__ void ra_split_tf32(const float* x, u32* big, u32* small, u32* bigx = nullptr) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const u32 xb = __float_as_uint(x[i]);
        u32 bg = (xb + 0x1000u) & 0xffffe000u;
        bool fin = true;
        if (SAFE) {
            fin = (xb & 0x7f800000u) != 0x7f800000u;
            if (!fin) bg = xb | ((xb & 0x007fffffu) ? 0x00400000u : 0u);
            else if ((bg & 0x7f800000u) == 0x7f800000u) bg = xb & 0xffffe000u;   // rounding overflowed
            bigx[i] = fin ? bg : 0u;
        }
        big[i] = bg;
        if (SPLIT == 3) small[i] = fin ? __float_as_uint(x[i] - __uint_as_float(bg)) : 0u;
    }
}
