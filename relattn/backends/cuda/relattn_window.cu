// SAM's window partition and its inverse as single copy kernels (CuPy path of
// relattn.window), the heads' merge, and a copy of rows between strided
// layouts. W: the word moved per thread (1, 2, 4, 8 or 16 bytes; the caller
// picks the largest dividing a token's bytes and both base addresses).
// Token rows are cw words; every index is 64-bit.
//
// relattn_window_partition: out (B * nh * nw, ws, ws, ocw) from x (B, H, W, cw)
// contiguous, zero past H / W (the bottom / right padding). ocw >= cw: words
// cw .. ocw - 1 of every token (padding tokens too) are a tail whose first
// 16-bit value has the bits `one` and the rest zero: with the tail [1, 0, ..]
// a product with a weight whose tail column is the bias adds the bias inside
// the product's float32 sum (the layer's projections). ocw == cw: no tail.
// relattn_window_unpartition: out (B, H, W, cw) from windows (B * nh * nw, ws,
// ws, cw) contiguous, the padding cropped.

struct ra_w16 { unsigned int a, b, c, d; };

// A word whose first (lowest-addressed) 16 bits are `low`, the rest zero
// (little-endian); 1-byte words never carry a tail.
template <typename T> __device__ __forceinline__ T ra_low_word(unsigned int low) { return T(low); }
template <> __device__ __forceinline__ ra_w16 ra_low_word<ra_w16>(unsigned int low) { return ra_w16{low, 0u, 0u, 0u}; }

template <typename T>
__global__ void relattn_window_partition(const T* __restrict__ x, T* __restrict__ out, long long total,
                                         int H, int W, int ws, int nh, int nw, int cw, int ocw, unsigned int one)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / ocw;
        const int c = (int)(i - t * ocw);
        if (c >= cw) {   // the tail
            out[i] = ra_low_word<T>(c == cw ? one : 0u);
            continue;
        }
        const int j = (int)(t % ws); t /= ws;
        const int r = (int)(t % ws); t /= ws;
        const int wx = (int)(t % nw); t /= nw;
        const int wy = (int)(t % nh);
        const long long b = t / nh;
        const int y = wy * ws + r, xx = wx * ws + j;
        out[i] = (y < H && xx < W) ? x[((b * H + y) * W + xx) * cw + c] : ra_low_word<T>(0u);
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

// relattn_window_merge_heads: out (B, S, heads * dw + tail) from the attention's
// a (B, heads, S, dw) contiguous (H, W, ws, nh, nw as (heads, S, unused));
// ocw - heads * dw words of tail as relattn_window_partition's.
template <typename T>
__global__ void relattn_window_merge_heads(const T* __restrict__ a, T* __restrict__ out, long long total,
                                           int heads, int S, int, int, int, int dw, int ocw, unsigned int one)
{
    const int cw = heads * dw;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / ocw;
        const int c = (int)(i - t * ocw);
        if (c >= cw) {
            out[i] = ra_low_word<T>(c == cw ? one : 0u);
            continue;
        }
        const int s = (int)(t % S);
        const long long b = t / S;
        const int h = c / dw, d = c - h * dw;
        out[i] = a[((b * heads + h) * S + s) * dw + d];
    }
}

// relattn_copy_rows: dst[k0, k1, k2, c] = src[k0, k1, k2, c], rows of cw words
// contiguous on both sides, the three outer axes strided (in words) on either
// side (src s0, s1, s2; dst d0, d1, d2); total = n0 * n1 * n2 * cw. The
// heads' splits and merges of the layer's backward (a (B, S, heads, D) view
// to (B, heads, S, D) and back, into a strided slot of a wider buffer too).
template <typename T>
__global__ void relattn_copy_rows(const T* __restrict__ src, T* __restrict__ dst, long long total, int n1, int n2,
                                  int cw, long long s0, long long s1, long long s2, long long d0, long long d1,
                                  long long d2)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / cw;
        const int c = (int)(i - t * cw);
        const int k2 = (int)(t % n2); t /= n2;
        const int k1 = (int)(t % n1);
        const long long k0 = t / n1;
        dst[k0 * d0 + k1 * d1 + k2 * d2 + c] = src[k0 * s0 + k1 * s1 + k2 * s2 + c];
    }
}
