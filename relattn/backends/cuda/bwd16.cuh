// What the 16-bit fused backward kernels share (bwd.cu on mma.sync, bwd_wg.cu
// on wgmma, sm_90a): the loaders of a tile's float32 rows and of the rows'
// terms, the two-stage tile pipeline, a block's per-thread set-up (its rows'
// terms, lse2 and delta; its keys' term columns), the logits, dS and terms'
// gradients of a query-major tile (the accumulator layout of an m16n8
// product, which is also a warpgroup product's, warp by warp), P and dS of a
// key-major one, and the dq / dk / dv stores. Needs common.cuh and
// bwd_common.cuh before it.

// Row strides (floats) of staged rel_w rows in the key-rows mode (k_w 64):
// conflict-free float2 reads query-major (8 g + 2 t), scalar reads key-major (8 t + g).
constexpr int RB_SW_Q = 72, RB_SW_K = 68;

// Columns c0 .. c0 + cols - 1 of rows r0 .. r0 + 63 of a float32 matrix
// with rows of len values, into dst (row stride ld) by cp.async,
// uncommitted; rows >= n zero-filled. VEC: 16-byte copies (cols, len, c0
// and ld multiples of 4, src 16-byte aligned).
template <bool VEC>
__device__ __forceinline__ void rb_load_f32(float* dst, int ld, const float* src, int len, int c0, int cols, int r0,
                                            int n, int tid) {
    constexpr int W = VEC ? 4 : 1;
    const int per = cols / W;
    for (int c = tid; c < 64 * per; c += 128) {
        const int r = c / per, col = (c - r * per) * W;
        const bool ok = r0 + r < n;
        const float* s = src + (ok ? (long long)(r0 + r) * len + c0 + col : 0);
        if (VEC) ra_cp_async16(ra_smem_addr(dst + r * ld + col), s, ok ? 16 : 0);
        else rb_cp_async4(ra_smem_addr(dst + r * ld + col), s, ok ? 4 : 0);
    }
}

// The terms of 64 query rows from r0 (of Sq) into shared memory, uncommitted:
// rel_h rows (kh values, stride kh), rel_w rows (kw values, stride
// RB_SW_Q in the key-rows mode, else kw).
template <int REL>
__device__ __forceinline__ void rb_load_terms(float* sRH, float* sRW, const float* rel_h, const float* rel_w,
                                              int r0, int Sq, int kh, int kw, int tid) {
    if (REL == bwd_bias::NONE) return;
    rb_load_f32<false>(sRH, kh, rel_h, kh, 0, kh, r0, Sq, tid);
    if (REL == bwd_bias::KEY_ROWS) rb_load_f32<true>(sRW, RB_SW_Q, rel_w, kw, 0, kw, r0, Sq, tid);
    else rb_load_f32<false>(sRW, kw, rel_w, kw, 0, kw, r0, Sq, tid);
}

// The keys of a warp's accumulator columns in the 64-key tile from j0: for
// column j * 8 + 2 t + e, key(j, e, ky, kx) below Sk, past(j, e) beyond it.
template <int REL, typename Key, typename Past>
__device__ __forceinline__ void rb_tile_keys(int j0, int Sk, int kw, float inv_kw, int t, Key&& key, Past&& past) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int n = j0 + j * 8 + 2 * t + e;
            if (n < Sk) {
                int ky = 0, kx = 0;
                if (REL != bwd_bias::NONE) ra_split_key(n, kw, inv_kw, ky, kx);
                key(j, e, ky, kx);
            } else {
                past(j, e);
            }
        }
}

// s (a warp's query rows x 64 keys from key j0) -> s2 of the header, -inf
// beyond the last key. rh[rr], rw[rr]: the staged terms' rows (shared
// memory) of the thread's rows. The key-rows mode has whole tiles: key row
// j0 / 64, kx the column.
template <int REL>
__device__ __forceinline__ void rb_query_logits(float (&s)[8][4], int j0, int Sk, int kw, float inv_kw,
                                                float scale_log2, const float* const (&rh)[2],
                                                const float* const (&rw)[2], int t) {
    if constexpr (REL == bwd_bias::KEY_ROWS) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const float h = rh[rr][j0 >> 6];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float2 w = *reinterpret_cast<const float2*>(rw[rr] + j * 8 + 2 * t);
                s[j][2 * rr] = fmaf(s[j][2 * rr], scale_log2, (h + w.x) * RA_LOG2E);
                s[j][2 * rr + 1] = fmaf(s[j][2 * rr + 1], scale_log2, (h + w.y) * RA_LOG2E);
            }
        }
    } else {
        rb_tile_keys<REL>(j0, Sk, kw, inv_kw, t,
            [&](int j, int e, int ky, int kx) {
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const float bias = (REL == bwd_bias::NONE) ? 0.f : (rh[rr][ky] + rw[rr][kx]) * RA_LOG2E;
                    s[j][2 * rr + e] = fmaf(s[j][2 * rr + e], scale_log2, bias);
                }
            },
            [&](int j, int e) {
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) s[j][2 * rr + e] = -RA_INF;
            });
    }
}

// The key-major kernels' per-tile float32 stage (64 query rows from i0, of
// Sq; rows past Sq zero-filled) for a block of 128 NWG threads and 64 NWG
// keys, each thread's copies fixed from tile to tile: lse2 (64) and delta
// (64), then the terms of the block's keys, rel_h columns ky_lo .. of stride
// nh and rel_w rows of stride SW (the layouts rb_key_probs reads). The
// key-rows mode's shapes are compile-time: nh = NWG, k_w = 64 (16-byte
// copies, stride RB_SW_K); the generic mode deals a row's columns to the
// NT / 64 threads of that row. lse2 .. rel_w: this (batch, head)'s rows.
template <int REL, int NWG>
__device__ __forceinline__ void rb_stage_f32(float* f, const float* lse2, const float* delta, const float* rel_h,
                                             const float* rel_w, int i0, int Sq, int kh, int kw, int ky_lo, int nh,
                                             int SW, int tid) {
    constexpr int NT = 128 * NWG;
    if (tid < 128) {
        const int r = tid & 63, row = i0 + r;
        const bool ok = row < Sq;
        const float* src = (tid < 64 ? lse2 : delta) + (ok ? row : 0);
        rb_cp_async4(ra_smem_addr(f + tid), src, ok ? 4 : 0);
    }
    if constexpr (REL == bwd_bias::KEY_ROWS) {
        float* sRH = f + 128;
        float* sRW = sRH + 64 * NWG;
        if (tid < 64 * NWG) {   // rel_h: 64 rows x NWG key rows
            const int r = tid / NWG, c = tid - r * NWG, row = i0 + r;
            const bool ok = row < Sq && c < kh - ky_lo;
            rb_cp_async4(ra_smem_addr(sRH + tid), rel_h + (ok ? (long long)row * kh + ky_lo + c : 0), ok ? 4 : 0);
        }
        const int c = (tid & 15) * 4;   // rel_w: 64 rows x 16 chunks of 4
#pragma unroll
        for (int k = 0; k < 64 * 16 / NT; ++k) {
            const int r = (tid >> 4) + k * (NT / 16), row = i0 + r;
            const bool ok = row < Sq;
            ra_cp_async16(ra_smem_addr(sRW + r * RB_SW_K + c), rel_w + (ok ? (long long)row * 64 + c : 0), ok ? 16 : 0);
        }
    } else if constexpr (REL == bwd_bias::GENERIC) {
        float* sRH = f + 128;
        float* sRW = sRH + 64 * nh;
        const int r = tid & 63, row = i0 + r, hcols = min(nh, kh - ky_lo);
        const bool ok = row < Sq;
        const float* h = rel_h + (ok ? (long long)row * kh + ky_lo : 0);
        const float* w = rel_w + (ok ? (long long)row * kw : 0);
        for (int c = tid >> 6; c < hcols; c += NT / 64) rb_cp_async4(ra_smem_addr(sRH + r * nh + c), h + (ok ? c : 0), ok ? 4 : 0);
        for (int c = tid >> 6; c < kw; c += NT / 64) rb_cp_async4(ra_smem_addr(sRW + r * SW + c), w + (ok ? c : 0), ok ? 4 : 0);
    }
}

// The query-major kernels' staged terms: rel_h rows (64, kh), then rel_w
// rows (64, RB_SW_Q in the key-rows mode, else kw), after the tiles.
__host__ __device__ constexpr int rb_sw_q(int rel, int kw) { return rel == bwd_bias::KEY_ROWS ? RB_SW_Q : kw; }

// A warp's dS tile (16, RB_DS) for the generic mode's sums.
constexpr int RB_DS = 68;

// The generic mode's terms' gradients of one tile, for a warp's 16 rows:
// its dS (the accumulator layout) goes to the warp's (16, RB_DS) tile ds,
// then lane by lane each (row, ky) of the tile sums its keys (a run of
// consecutive keys) into dh (16, kh) and each (row, kx) its keys (kw apart)
// into dw (16, kw). Keys j0 .. jend - 1; every sum in float32, one owner.
__device__ __forceinline__ void rb_dq_generic_terms(const float (&s)[8][4], float* ds, float* dh, float* dw, int j0,
                                                    int jend, int kh, int kw, int lane, int g, int t) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[(g + 8 * (e >> 1)) * RB_DS + j * 8 + 2 * t + (e & 1)] = s[j][e];
    __syncwarp();
    const int ky_lo = j0 / kw, nky = (jend - 1) / kw - ky_lo + 1, n = jend - j0;
    for (int task = lane; task < 16 * nky; task += 32) {
        const int r = task & 15, ky = ky_lo + (task >> 4);
        const int a = max(j0, ky * kw) - j0, b = min(jend, (ky + 1) * kw) - j0;
        float sum = 0.f;
        for (int c = a; c < b; ++c) sum += ds[r * RB_DS + c];
        dh[r * kh + ky] += sum;
    }
    const int first = j0 % kw;
    for (int task = lane; task < 16 * kw; task += 32) {
        const int r = task & 15, kx = task >> 4;
        int c = kx - first;
        if (c < 0) c += kw;
        float sum = 0.f;
        for (; c < n; c += kw) sum += ds[r * RB_DS + c];
        dw[r * kw + kx] += sum;
    }
    __syncwarp();
}

// The key-major kernels' staged rel_w rows: stride RB_SW_K in the key-rows mode, else kw.
__host__ __device__ constexpr int rb_sw_k(int rel, int kw) { return rel == bwd_bias::KEY_ROWS ? RB_SW_K : kw; }

// Makes the block's shared-memory writes visible to the async proxy (wgmma).
template <bool ASYNC>
__device__ __forceinline__ void rb_fence_async() {
    if constexpr (ASYNC) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Tile n of ntiles in a two-stage cp.async pipeline: load(n + 1, its
// stage) issues and commits the next tile's copies; waits for tile n and
// makes it visible to the block (ASYNC: to its wgmma products too, the async
// proxy); returns tile n's stage. The first tile is loaded (load(0, 0))
// before the loop.
template <bool ASYNC = false, typename Load>
__device__ __forceinline__ int rb_next(int n, int ntiles, Load&& load) {
    if (n + 1 < ntiles) {
        load(n + 1, (n + 1) & 1);
        ra_cp_wait<1>();
    } else {
        ra_cp_wait<0>();
    }
    rb_fence_async<ASYNC>();
    __syncthreads();
    return n & 1;
}

// ---- a block's set-up
template <int N>
__device__ __forceinline__ void rb_zero(float (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[i][e] = 0.f;
}

// A query-major thread's two rows (r0 + g, r0 + g + 8 of Sq; past Sq the
// last): their staged terms' rows rh, rw (row l of the block at sRH + l kh,
// sRW + l SW; warp's rows from 16 warp), lse2 and delta.
__device__ __forceinline__ void rb_query_rows(const float* (&rh)[2], const float* (&rw)[2], float (&lse)[2],
                                              float (&dl)[2], const float* sRH, const float* sRW,
                                              const float* lse2, const float* delta, long long qrow0, int r0,
                                              int Sq, int kh, int SW, int warp, int g) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const long long row = qrow0 + min(r0 + g + 8 * rr, Sq - 1);
        rh[rr] = sRH + (warp * 16 + g + 8 * rr) * kh;
        rw[rr] = sRW + (warp * 16 + g + 8 * rr) * SW;
        lse[rr] = lse2[row];
        dl[rr] = delta[row];
    }
}

// A key-major thread's two keys (key0 + g, key0 + g + 8 of Sk; past Sk the
// last): their columns in the staged terms, rel_h's from key row ky_lo.
template <int REL>
__device__ __forceinline__ void rb_key_cols(int (&hcol)[2], int (&wcol)[2], int key0, int Sk, int kw, float inv_kw,
                                            int ky_lo, int g) {
    hcol[0] = hcol[1] = wcol[0] = wcol[1] = 0;
    if constexpr (REL != bwd_bias::NONE) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            int ky, kx;
            ra_split_key(min(key0 + g + 8 * rr, Sk - 1), kw, inv_kw, ky, kx);
            hcol[rr] = ky - ky_lo;
            wcol[rr] = kx;
        }
    }
}

// ---- the query-major tile (a warp's rows x 64 keys, the accumulator layout)
// dS = P (dP - delta), P = exp2(s2 - lse2), in place of the logits s2.
__device__ __forceinline__ void rb_query_ds(float (&s)[8][4], const float (&dp)[8][4], const float (&lse)[2],
                                            const float (&dl)[2]) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = ra_exp2(s[j][e] - lse[e >> 1]);
            s[j][e] = p * (dp[j][e] - dl[e >> 1]);
        }
}

// The terms' gradients of key tile n (keys 64 n .. of Sk) from its dS: the
// key-rows mode stores the rows' d_rel_h of key row n (sums over the row's
// four lanes) and adds each column to dw (d_rel_w of the thread's 16
// columns); the generic mode sums through the warp's dS tile into the
// block's rows (rb_dq_generic_terms: sds, sdh, sdw). qrow0: this (batch,
// head)'s first row of d_rel_h; r0: the warp's first row.
template <int REL>
__device__ __forceinline__ void rb_query_terms(const float (&s)[8][4], float (&dw)[REL == bwd_bias::KEY_ROWS ? 8 : 1][4],
                                               float* d_rel_h, long long qrow0, int r0, int Sq, int kh, int kw, int n, int Sk,
                                               float* sds, float* sdh, float* sdw, int lane, int g, int t) {
    if constexpr (REL == bwd_bias::KEY_ROWS) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                sum += s[j][2 * rr] + s[j][2 * rr + 1];
                dw[j][2 * rr] += s[j][2 * rr];
                dw[j][2 * rr + 1] += s[j][2 * rr + 1];
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int r = r0 + g + 8 * rr;
            if (t == 0 && r < Sq) d_rel_h[(qrow0 + r) * kh + n] = sum;
        }
    } else if constexpr (REL == bwd_bias::GENERIC) {
        rb_dq_generic_terms(s, sds, sdh, sdw, n * 64, min(n * 64 + 64, Sk), kh, kw, lane, g, t);
    }
}

// The warp's rows of dq (scale times acc, columns < D) and, in the key-rows
// mode, of d_rel_w (dw); qrow0: this (batch, head)'s first row.
template <int REL, int ND>
__device__ __forceinline__ void rb_store_dq(const float (&acc)[ND][4],
                                            const float (&dw)[REL == bwd_bias::KEY_ROWS ? 8 : 1][4], float* dq,
                                            float* d_rel_w, long long qrow0, int r0, int Sq, int D, int kw, float scale,
                                            int g, int t) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = r0 + g + 8 * rr;
        if (r >= Sq) continue;
        float* dst = dq + (qrow0 + r) * D;
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            const int col = d * 8 + 2 * t;
            if (col < D)
                *reinterpret_cast<float2*>(dst + col) = make_float2(acc[d][2 * rr] * scale, acc[d][2 * rr + 1] * scale);
        }
        if constexpr (REL == bwd_bias::KEY_ROWS) {
            float* wdst = d_rel_w + (qrow0 + r) * kw;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                *reinterpret_cast<float2*>(wdst + j * 8 + 2 * t) = make_float2(dw[j][2 * rr], dw[j][2 * rr + 1]);
        }
    }
}

// ---- the key-major tile (a warp's keys x 64 queries from i0)
// P^T in place of the products s and (DS) dS^T in place of dp, the queries
// past Sq zero; i: the thread's first query (column 2 t). L, Dl: the tile's
// lse2 and delta from that column; h[rr], w[rr]: the staged terms of key rr
// from that column (rows nh and SW floats apart), so that every read below
// is at a fixed offset.
template <int REL, bool DS>
__device__ __forceinline__ void rb_key_probs_at(float (&s)[8][4], float (&dp)[8][4], int i, int Sq, const float* L,
                                                const float* Dl, const float* const (&h)[2],
                                                const float* const (&w)[2], int nh, int SW, float scale_log2) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = j * 8 + e;
            if (i + c < Sq) {
                const float lse = L[c], dl = DS ? Dl[c] : 0.f;
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const float bias = (REL == bwd_bias::NONE) ? 0.f : (h[rr][c * nh] + w[rr][c * SW]) * RA_LOG2E;
                    const float p = ra_exp2(fmaf(s[j][2 * rr + e], scale_log2, bias) - lse);
                    s[j][2 * rr + e] = p;
                    if (DS) dp[j][2 * rr + e] = p * (dp[j][2 * rr + e] - dl);
                }
            } else {
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    s[j][2 * rr + e] = 0.f;
                    if (DS) dp[j][2 * rr + e] = 0.f;
                }
            }
        }
}

// P^T and (DS) dS^T of the tile of queries from i0 (rb_key_probs_at). sL,
// sD: the tile's lse2 and delta; sRH (64, nh) and sRW (64, SW): its staged
// terms; hcol, wcol: the columns there of the thread's two keys.
template <int REL, bool DS = true>
__device__ __forceinline__ void rb_key_probs(float (&s)[8][4], float (&dp)[8][4], int i0, int Sq, const float* sL,
                                             const float* sD, const float* sRH, const float* sRW, int nh, int SW,
                                             const int (&hcol)[2], const int (&wcol)[2], float scale_log2, int t) {
    const int c0 = 2 * t;
    const float* h[2] = {sRH + c0 * nh + hcol[0], sRH + c0 * nh + hcol[1]};
    const float* w[2] = {sRW + c0 * SW + wcol[0], sRW + c0 * SW + wcol[1]};
    rb_key_probs_at<REL, DS>(s, dp, i0 + c0, Sq, sL + c0, sD + c0, h, w, nh, SW, scale_log2);
}

// The warp's keys' dk (scale times ak) and dv (av), rounded once to DT;
// columns < D. bh: the (batch, head); key0: the warp's first key.
template <int DT, int ND>
__device__ __forceinline__ void rb_store_dkv(const float (&ak)[ND][4], const float (&av)[ND][4], u16* dk, u16* dv,
                                             int bh, int key0, int Sk, int D, float scale, int g, int t) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int key = key0 + g + 8 * rr;
        if (key >= Sk) continue;
        const long long base = ((long long)bh * Sk + key) * D;
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            const int col = d * 8 + 2 * t;
            if (col < D) {
                *reinterpret_cast<u32*>(dk + base + col) = ra_pack<DT>(ak[d][2 * rr] * scale, ak[d][2 * rr + 1] * scale);
                *reinterpret_cast<u32*>(dv + base + col) = ra_pack<DT>(av[d][2 * rr], av[d][2 * rr + 1]);
            }
        }
    }
}
