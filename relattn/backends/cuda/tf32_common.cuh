// Shared by the float32 tensor-core kernels relattn_tf32 (tf32.cu, mma.sync)
// and relattn_wgt (wgt.cu, Hopper wgmma): their kernel parameters, the TF32
// big / small split of 3xTF32 and the non-finite check that flags a block for
// the IEEE-safe second pass.
//
// Their common parameters (families/tf32.py's launcher passes them): q, k, v
// float32 with element strides (batch, head, row); the terms (B*H, Sq, kh / kw);
// out (B*H, Sq, D); flags per 64-row block for the IEEE-safe second pass.

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
