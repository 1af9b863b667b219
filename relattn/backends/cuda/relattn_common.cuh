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
