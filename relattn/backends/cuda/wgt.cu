// relattn_wgt<HD, BN, REL>: Hopper (sm_90a) attention with the relative-position
// terms, float32 q, k, v as 3xTF32 on wgmma (m64nNk8 .tf32). Needs common.cuh,
// the wgmma wrappers, sm90_common.cuh and tf32_common.cuh before it.
//
// The same arithmetic as relattn_tf32<HD, 3, ...> (tf32.cu): every
// operand x is split into big = x rounded to TF32 and small = x - big, and
// a.b = a_small.b_big + a_big.b_small + a_big.b_big; each key tile's P V starts
// from zero and is added to the running output with a float32 FMA. One
// warpgroup (64 query rows) per block, two blocks per SM. head_dim <= 64 with
// 64- or 32-key tiles, 80 with 32-key tiles (registers). Per key tile:
//   - the raw K / V tile lands by cp.async (issued one tile ahead);
//   - the block splits it once into four wgmma operands in shared memory
//     (no-swizzle K-major core-matrix layout: 8 rows x 16 bytes per core,
//     K-adjacent cores 128 bytes apart): K big / small as they are, V big /
//     small transposed (rows = columns of V, K = keys), the keys of each
//     8-key group in the order 0 2 4 6 1 3 5 7 so that the S accumulator's
//     fragment is P's A fragment (k slot t <-> key 2 t, t + 4 <-> 2 t + 1);
//   - S = Q K^T with Q's split fragments in registers (split once per
//     block), 3 wgmma per 8 columns; bias, mask, online softmax; P split in
//     registers; O_tile = P V, 3 wgmma per 8 keys; O = alpha O + O_tile.
// REL: the bias mode (wgt_bias below).
// Flags per block (64 rows): a non-finite sum or output, as relattn_tf32's
// first pass, so its SAFE pass redoes those blocks with IEEE semantics.
// q, k, v: float32, last stride 1, row strides multiples of 4, 16-byte
// aligned. rel_h (B*H, Sq, kh), rel_w (B*H, Sq, kw): float32 contiguous.

// The bias modes (REL), as families/wgt.py's Bias numbers them.
namespace wgt_bias {
constexpr int NONE = 0;       // no relative terms (keys past Sk masked)
constexpr int KEY_ROWS = 1;   // k_w == 64: one key row per 64-key tile, or per two 32-key tiles;
                              // rel_w of the thread's columns in registers, rel_h per row and tile
constexpr int WINDOW = 5;     // k_w <= 16: every key row takes 16 slots of the tile (4 key rows
                              // per 64 slots; slots past k_w get rel_w = -inf, key rows past k_h
                              // rel_h = -inf), so a thread's kx values are fixed registers
}

// acc = A B over STEPS k8 steps as 3xTF32 (small x big terms first), A's split
// fragments in registers, B's big / small parts behind two K-major no-swizzle
// descriptors (two cores, 256 bytes, per step); issued, committed and waited for.
template <int N, int STEPS>
__device__ __forceinline__ void ra_wgt_3x(float* acc, const u32 (*abig)[4], const u32 (*asml)[4], u64 dBb, u64 dBs) {
    ra_wg_fence();
#pragma unroll
    for (int ks = 0; ks < STEPS; ++ks) {
        RaWt<N>::rs(acc, asml[ks], dBb + ks * 16, ks > 0 ? 1 : 0);
        RaWt<N>::rs(acc, abig[ks], dBs + ks * 16, 1);
        RaWt<N>::rs(acc, abig[ks], dBb + ks * 16, 1);
    }
    ra_wg_commit();
    ra_wg_wait<0>();
}

template <int HD, int BN, int REL>
__global__ void __launch_bounds__(128, 2)
relattn_wgt(RA_F32_KERNEL_PARAMS)
{
    static_assert(HD % 16 == 0 && HD <= 80 && (HD <= 64 || BN == 32), "head_dim 16 .. 64, or 80 with 32-key tiles");
    static_assert((BN == 32 || BN == 64) && (REL != wgt_bias::WINDOW || BN % 16 == 0), "key tile");
    constexpr int KC = HD / 4;                 // 16-byte chunks of a K row
    constexpr int ND = HD / 8;                 // 8-column blocks of the output
    constexpr int NS = BN / 8;                 // 8-key blocks of a tile
    constexpr int KS = HD / 8;                 // k8 steps of S = Q K^T
    constexpr int VROW = HD + ((16 - HD % 32) + 32) % 32;   // raw V row (floats): == 16 mod 32 banks
    constexpr bool KR = (REL == wgt_bias::KEY_ROWS), WIN = (REL == wgt_bias::WINDOW);
    constexpr int NU = WIN ? BN / 16 : 1;                   // key rows per tile (WIN)
    constexpr int RH = 64 / BN;                // KR: tiles per key row (2: halves)
    // shared memory (byte offsets from the 128-byte aligned base): the raw K
    // tile (core-matrix layout), the raw V tile (rows of VROW floats), then K
    // big, K small, V^T big, V^T small
    constexpr u32 OPB = BN * HD * 4;           // bytes of one split operand
    constexpr u32 OVR = OPB, OKB = OVR + BN * VROW * 4, OKS = OKB + OPB, OVB = OKS + OPB, OVS = OVB + OPB;
    extern __shared__ __align__(128) unsigned char ra_smem_raw[];
    const u32 sraw = ra_smem_addr(ra_smem_raw);
    const u32 sbase = (sraw + 127u) & ~127u;   // shared-space address of offset 0
    unsigned char* pbase = ra_smem_raw + (sbase - sraw);   // generic pointer to it
    const float* pVr = reinterpret_cast<const float*>(pbase + OVR);

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    const int mtiles = (Sq + 63) / 64;
    const int mt = blockIdx.x % mtiles;
    const int bh = blockIdx.x / mtiles;
    const int b = bh / H, h = bh - b * H;
    const int m0 = mt * 64;
    const float* qb = q + b * qsb + h * qsh;
    const float* kb = k + b * ksb + h * ksh;
    const float* vb = v + b * vsb + h * vsh;

    // key of tile slot s (or -1: padding), tile n
    auto slot_key = [&](int n, int s) -> int {
        if (WIN) {
            const int gs = n * BN + s, ky = gs >> 4, kx = gs & 15;
            return (kx < kw && ky < kh) ? ky * kw + kx : -1;
        }
        const int key = n * BN + s;
        return key < Sk ? key : -1;
    };
    const int ntiles = WIN ? (kh * 16 + BN - 1) / BN : (Sk + BN - 1) / BN;
    auto load_tile = [&](int n) {
        for (int i = tid; i < BN * KC; i += 128) {
            // K: chunk i of the core-matrix layout (8 rows of a row group, then chunks, then groups)
            const int r8 = i & 7, c = (i >> 3) % KC, rg = (i >> 3) / KC;
            const int key = slot_key(n, rg * 8 + r8), col = c * 4;
            const bool ok = key >= 0 && col < D;
            ra_cp_async16(sbase + (u32)i * 16u, ok ? kb + (long long)key * kss + col : kb, ok ? 16 : 0);
            // V: row-major rows of VROW floats
            const int r = i / KC, cv = (i - (i / KC) * KC) * 4;
            const int keyv = slot_key(n, r);
            const bool okv = keyv >= 0 && cv < D;
            ra_cp_async16(sbase + OVR + (u32)(r * VROW + cv) * 4u, okv ? vb + (long long)keyv * vss + cv : vb, okv ? 16 : 0);
        }
        ra_cp_commit();
    };
    load_tile(0);

    // ---- Q fragments (rows g, g + 8 of this warp; k slot t <-> column 8 ks + t,
    //      t + 4 <-> 8 ks + t + 4), split once
    const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    u32 qbig[KS][4], qsml[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        float a[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = rows[e & 1], col = ks * 8 + t + (e >> 1) * 4;
            a[e] = (r < Sq && col < D) ? __ldg(qb + (long long)r * qss + col) : 0.f;
        }
        ra_split_tf32<3, 4>(a, qbig[ks], qsml[ks]);
    }

    // ---- relative terms (log2 domain)
    const float* rh_row[2];
    float rwc[2][KR ? 16 : WIN ? 4 : 1];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = min(rows[rr], Sq - 1);
        rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
        const float* wrow = rel_w + ((long long)bh * Sq + r) * kw;
        if (KR) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float2 w2 = __ldg(reinterpret_cast<const float2*>(wrow + j * 8 + 2 * t));
                rwc[rr][KR ? 2 * j : 0] = w2.x * RA_LOG2E;
                rwc[rr][KR ? 2 * j + 1 : 0] = w2.y * RA_LOG2E;
            }
        } else if (WIN) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int kx = (i >> 1) * 8 + 2 * t + (i & 1);
                rwc[rr][WIN ? i : 0] = kx < kw ? __ldg(wrow + kx) * RA_LOG2E : -RA_INF;
            }
        }
    }

    float o[ND * 4];
#pragma unroll
    for (int i = 0; i < ND * 4; ++i) o[i] = 0.f;
    float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f};
    // descriptors: K-major, no swizzle; K-adjacent cores 128 B apart, 8-row groups KC (or BN / 4) x 128 B
    const u64 dKb = ra_desc(sbase + OKB, 128u, (u32)KC * 128u, 0), dKs = ra_desc(sbase + OKS, 128u, (u32)KC * 128u, 0);
    const u64 dVb = ra_desc(sbase + OVB, 128u, (u32)(BN / 4) * 128u, 0);
    const u64 dVs = ra_desc(sbase + OVS, 128u, (u32)(BN / 4) * 128u, 0);

    for (int n = 0; n < ntiles; ++n) {
        // rel_h of this tile's key rows (KR: one, WIN: NU)
        float off[2 * NU];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int u = 0; u < NU; ++u) {
                float x = 0.f;
                if (KR) x = __ldg(rh_row[rr] + min(n / RH, kh - 1)) * RA_LOG2E;
                if (WIN) {
                    const int ky = n * NU + u;
                    x = ky < kh ? __ldg(rh_row[rr] + ky) * RA_LOG2E : -RA_INF;
                }
                off[rr * NU + u] = x;
            }
        ra_cp_wait<0>();
        __syncthreads();   // raw tile n landed; every warp is done with tile n - 1's operands

        // ---- split the raw tile into the four operands
        for (int i = tid; i < BN * KC; i += 128) {
            const float4 x4 = *reinterpret_cast<const float4*>(pbase + i * 16);
            const float x[4] = {x4.x, x4.y, x4.z, x4.w};
            u32 bg[4], sm[4];
            ra_split_tf32<3, 4>(x, bg, sm);
            *reinterpret_cast<uint4*>(pbase + OKB + i * 16) = make_uint4(bg[0], bg[1], bg[2], bg[3]);
            *reinterpret_cast<uint4*>(pbase + OKS + i * 16) = make_uint4(sm[0], sm[1], sm[2], sm[3]);
        }
        for (int i = tid; i < HD * NS * 2; i += 128) {
            // 4 keys (8 j + 2 m + e, m < 4) of column d -> one 16-byte chunk of V^T row d
            const int d = ((i >> 4) % ND) * 8 + (i & 7), e = (i >> 3) & 1, j = (i >> 4) / ND;
            float x[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) x[m] = pVr[(8 * j + 2 * m + e) * VROW + d];
            u32 bg[4], sm[4];
            ra_split_tf32<3, 4>(x, bg, sm);
            const u32 off16 = (u32)(((d >> 3) * (BN / 4) + 2 * j + e) * 128 + (d & 7) * 16);
            *reinterpret_cast<uint4*>(pbase + OVB + off16) = make_uint4(bg[0], bg[1], bg[2], bg[3]);
            *reinterpret_cast<uint4*>(pbase + OVS + off16) = make_uint4(sm[0], sm[1], sm[2], sm[3]);
        }
        ra_fence_proxy_async();
        __syncthreads();   // operands visible to the tensor cores; the raw buffers are free
        if (n + 1 < ntiles) load_tile(n + 1);

        // ---- S = Q K^T (small x big terms first)
        float s[NS * 4];
        ra_wgt_3x<BN, KS>(s, qbig, qsml, dKb, dKs);

        // ---- scale, relative terms, mask (log2 domain); s[4 j + 2 rr + e]: row rr,
        //      tile slot 8 j + 2 t + e
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float bias = 0.f;
                    if (KR) {   // RH == 2: the second half of the key row on odd tiles
                        const int jj = KR ? 2 * j + e : 0;
                        bias = (RH == 2 && (n & 1)) ? rwc[rr][KR ? jj + 2 * NS : 0] : rwc[rr][jj];
                    }
                    if (WIN) bias = rwc[rr][WIN ? 2 * (j & 1) + e : 0];
                    float x = fmaf(s[4 * j + 2 * rr + e], scale_log2, bias);
                    if (REL == wgt_bias::NONE && n * BN + 8 * j + 2 * t + e >= Sk) x = -RA_INF;
                    s[4 * j + 2 * rr + e] = x;
                }
        float alpha[2];
        ra_online_softmax<NS, NU>(s, off, m_run, l_run, alpha);

        // ---- O_tile = P V (P's A fragment: k slot t <-> key 8 kk + 2 t, t + 4 <-> 8 kk + 2 t + 1)
        u32 pbig[NS][4], psml[NS][4];
#pragma unroll
        for (int kk = 0; kk < NS; ++kk) {
            const float a[4] = {s[4 * kk], s[4 * kk + 2], s[4 * kk + 1], s[4 * kk + 3]};
            ra_split_tf32<3, 4>(a, pbig[kk], psml[kk]);
        }
        float ot[ND * 4];
        ra_wgt_3x<HD, NS>(ot, pbig, psml, dVb, dVs);
#pragma unroll
        for (int i = 0; i < ND * 4; ++i) o[i] = fmaf(o[i], alpha[(i >> 1) & 1], ot[i]);
    }

    const bool bad = __syncthreads_or(ra_nonfinite<ND * 4>(l_run, o));
    if (tid == 0) flags[blockIdx.x] = bad ? 1 : 0;

    const float inv_l[2] = {ra_row_inv(l_run[0]), ra_row_inv(l_run[1])};
    float* ob = out + (long long)bh * Sq * D;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        if (rows[rr] < Sq) {
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                const int col = d * 8 + 2 * t;
                if (col < D)
                    *reinterpret_cast<float2*>(ob + (long long)rows[rr] * D + col) =
                        make_float2(o[4 * d + 2 * rr] * inv_l[rr], o[4 * d + 2 * rr + 1] * inv_l[rr]);
            }
        }
    }
}
