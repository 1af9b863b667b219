// SAM's window partition and its inverse as single copy kernels (CuPy path of
// relattn.window). W: the word moved per thread (1, 2, 4, 8 or 16 bytes; the
// caller picks the largest dividing a token's bytes and both base addresses).
// Token rows are cw words; every index is 64-bit.
//
// relattn_window_partition: out (B * nh * nw, ws, ws, cw) from x (B, H, W, cw)
// contiguous, zero past H / W (the bottom / right padding).
// relattn_window_unpartition: out (B, H, W, cw) from windows (B * nh * nw, ws,
// ws, cw) contiguous, the padding cropped.

struct ra_w16 { unsigned int a, b, c, d; };

template <typename T> __device__ __forceinline__ T ra_zero_word() { return T(0); }
template <> __device__ __forceinline__ ra_w16 ra_zero_word<ra_w16>() { return ra_w16{0u, 0u, 0u, 0u}; }

template <typename T>
__global__ void relattn_window_partition(const T* __restrict__ x, T* __restrict__ out, long long total,
                                         int H, int W, int ws, int nh, int nw, int cw)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / cw;
        const int c = (int)(i - t * cw);
        const int j = (int)(t % ws); t /= ws;
        const int r = (int)(t % ws); t /= ws;
        const int wx = (int)(t % nw); t /= nw;
        const int wy = (int)(t % nh);
        const long long b = t / nh;
        const int y = wy * ws + r, xx = wx * ws + j;
        out[i] = (y < H && xx < W) ? x[((b * H + y) * W + xx) * cw + c] : ra_zero_word<T>();
    }
}

template <typename T>
__global__ void relattn_window_unpartition(const T* __restrict__ win, T* __restrict__ out, long long total,
                                           int H, int W, int ws, int nh, int nw, int cw)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / cw;
        const int c = (int)(i - t * cw);
        const int xx = (int)(t % W); t /= W;
        const int y = (int)(t % H);
        const long long b = t / H;
        const int wy = y / ws, r = y - wy * ws, wx = xx / ws, j = xx - wx * ws;
        out[i] = win[((((b * nh + wy) * nw + wx) * ws + r) * ws + j) * cw + c];
    }
}
