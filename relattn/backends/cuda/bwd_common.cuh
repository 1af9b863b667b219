// What the fused backward kernels share (bwd.cu: 16-bit on the tensor cores,
// bwd32.cu: float32 on the SIMT cores).

// The bias modes (REL), as backward.py's Bias numbers them.
namespace bwd_bias {
constexpr int NONE = 0;       // no relative terms
constexpr int KEY_ROWS = 1;   // k_w == 64 and Sk % 64 == 0: key tile n is key row ky = n
constexpr int GENERIC = 2;    // any grid: (ky, kx) per key; the terms' gradients summed in shared memory
}

// 4-byte async copy global -> shared (cp.async.ca); zero-filled when src_bytes is 0.
__device__ __forceinline__ void rb_cp_async4(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes));
}
