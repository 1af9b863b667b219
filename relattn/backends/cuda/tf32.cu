// relattn_tf32<HD, SPLIT, REL, SAFE, SH>: attention with the relative-position
// terms in float32 on the TF32 tensor cores (mma.sync m16n8k8), as 3xTF32 or
// plain TF32, with an IEEE-safe second pass. Needs common.cuh and
// tf32_common.cuh before it.
//
// SPLIT = 3: every operand x is split into big = x rounded to TF32 (10-bit
// mantissa, to nearest) and small = x - big (exact in float32; the tensor
// core reads its top 10 mantissa bits), and a.b = a_big.b_big + a_big.b_small
// + a_small.b_big (3xTF32: float32-level error). SPLIT = 1: plain TF32
// (opt-in; ~1e-3 relative error, like PyTorch's allow_tf32).
// 4 warps x 16 query rows, 64-key tiles double-buffered with cp.async.
// The k index of each m16n8k8 product is free to map to any column as long as
// A and B agree: k slot t <-> column 2t and slot t + 4 <-> column 2t + 1 of
// each 8-column group. Then Q and K fragments are float2 loads, and for
// O += P V (k = keys) S's accumulator fragment is exactly P's A fragment.
// O is accumulated in two levels: each key tile's P V starts from zero and is
// added to O with a float32 FMA (the tensor cores' float32 accumulation
// truncates; a running O over hundreds of key blocks would collect that bias).
// q, k, v: float32, last stride 1, row strides multiples of 4, 16-byte aligned
// (the caller copies otherwise). rel_h / rel_w: float32 contiguous.

// The bias modes (REL), as families/tf32.py's Bias numbers them.
namespace tf32_bias {
constexpr int NONE = 0;       // no relative terms
constexpr int KEY_ROWS = 1;   // k_w == 64: rel_w of the tile's key row in registers, rel_h one value
                              // per row per tile
constexpr int GENERIC = 2;    // any k_h, k_w: both terms looked up per key
}

__device__ __forceinline__ void ra_mma_tf32(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// c[j] += a . b[j] for N column blocks j with SPLIT products each (small x
// big terms first: least significant), issued term by term over j so that
// consecutive products never wait on the same accumulator. abx / bbx: the big
// parts for the cross products (ab / bb, or the SAFE split's bigx).
template <int SPLIT, int N>
__device__ __forceinline__ void ra_mma_split(float (*c)[4], const u32* ab, const u32* as,
                                             const u32 (*bb)[2], const u32 (*bs)[2],
                                             const u32* abx, const u32 (*bbx)[2]) {
    if (SPLIT == 3) {
#pragma unroll
        for (int j = 0; j < N; ++j) ra_mma_tf32(c[j], as[0], as[1], as[2], as[3], bbx[j][0], bbx[j][1]);
#pragma unroll
        for (int j = 0; j < N; ++j) ra_mma_tf32(c[j], abx[0], abx[1], abx[2], abx[3], bs[j][0], bs[j][1]);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) ra_mma_tf32(c[j], ab[0], ab[1], ab[2], ab[3], bb[j][0], bb[j][1]);
}

// SAFE: the same kernel with the IEEE-safe split, run as a second pass over
// the blocks whose first pass flagged a non-finite l or o (an infinite q, k or
// v element makes the fast split's small part inf - inf = NaN where IEEE
// arithmetic gives +-inf or a zero weight; every such NaN reaches l or o). The
// first pass writes flags[block] (also when the true result is non-finite:
// the second pass then reproduces it exactly); the second pass leaves
// unflagged blocks at once.
// SH (SPLIT 3, not SAFE): 8 warps x 16 rows per block, and each K / V tile is
// split once per block into shared memory (the warps of SH 0 each split every
// element they read): the raw tile lands by cp.async, the block splits it
// into a stage of uint4 fragments (K: big c, big c + 1, small c, small c + 1
// per key and column pair; V: big, big, small, small of keys 2 t, 2 t + 1 per
// key pair and column), then loads the next raw tile while it computes. The
// flags are written per 64 rows, as the SH 0 grid of the SAFE pass reads them.
template <int HD, int SPLIT, int REL, int SAFE, int SH>
__global__ void __launch_bounds__(SH ? 256 : 128)
relattn_tf32(RA_F32_KERNEL_PARAMS)
{
    static_assert(!SH || (SPLIT == 3 && !SAFE), "SH: the fast 3xTF32 pass");
    constexpr int NT = SH ? 256 : 128;
    constexpr int BM = NT / 2, BN = 64;    // 16 rows per warp
    constexpr int QROW = HD + 8;           // Q / K rows: float2 fragments on distinct banks
    constexpr int VROW = HD + 4;           // V rows: banks 8 t + g
    constexpr int KT = BN * QROW, VT = BN * VROW;
    constexpr int ND = HD / 8;             // output column blocks
    // SH: split stage rows in uint4, padded so a quarter warp's 16-byte loads
    // meet distinct banks (K: rows g, g + 1 64 bytes apart mod 128; V: key
    // pairs t 32 bytes apart)
    constexpr int KSROW = HD / 2 + 4, VSROW = HD + 2;

    if (SAFE && flags[blockIdx.x] == 0) return;

    extern __shared__ __align__(16) unsigned char ra_smem_raw[];
    float* sQ = reinterpret_cast<float*>(ra_smem_raw);
    float* sKV = sQ + BM * QROW;           // stage s: K at sKV + s (KT + VT), V after it (SH: one stage)
    uint4* sKs = reinterpret_cast<uint4*>(sKV + (SH ? 1 : 2) * (KT + VT));
    uint4* sVs = sKs + BN * KSROW;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    const int mtiles = (Sq + BM - 1) / BM;
    const int mt = blockIdx.x % mtiles;
    const int bh = blockIdx.x / mtiles;
    const int b = bh / H, h = bh - b * H;
    const int m0 = mt * BM;
    const float* qb = q + b * qsb + h * qsh;
    const float* kb = k + b * ksb + h * ksh;
    const float* vb = v + b * vsb + h * vsh;

    auto load_rows = [&](float* dst, int drow, const float* src, long long sstride, int row0, int nrows,
                         int count = 64) {
        constexpr int CH = HD / 4;         // 16-byte chunks per row
        for (int c = tid; c < count * CH; c += NT) {
            const int r = c / CH, col = (c - (c / CH) * CH) * 4;
            const int row = row0 + r;
            const bool ok = (row < nrows) && (col < D);
            const float* s = ok ? src + (long long)row * sstride + col : src;
            ra_cp_async16(ra_smem_addr(dst + r * drow + col), s, ok ? 16 : 0);
        }
    };
    auto load_tile = [&](int stage, int j0) {
        float* dK = sKV + stage * (KT + VT);
        load_rows(dK, QROW, kb, kss, j0, Sk);
        load_rows(dK + KT, VROW, vb, vss, j0, Sk);
        ra_cp_commit();
    };

    load_rows(sQ, QROW, qb, qss, m0, Sq, BM);
    load_tile(0, 0);   // the Q copies join this commit group
    // SH: the raw tile -> the split stage (every element once per block)
    auto split_tile = [&]() {
        constexpr int CP = HD / 2;
        for (int i = tid; i < BN * CP; i += NT) {
            const int key = i / CP, cp = i - (i / CP) * CP;
            const float2 x2 = *reinterpret_cast<const float2*>(sKV + key * QROW + 2 * cp);
            const float x[2] = {x2.x, x2.y};
            u32 bg[2], sm[2];
            ra_split_tf32<3, 2>(x, bg, sm);
            sKs[key * KSROW + cp] = make_uint4(bg[0], bg[1], sm[0], sm[1]);
        }
        for (int i = tid; i < (BN / 2) * HD; i += NT) {
            const int kp = i / HD, c = i - (i / HD) * HD;
            const float x[2] = {sKV[KT + 2 * kp * VROW + c], sKV[KT + (2 * kp + 1) * VROW + c]};
            u32 bg[2], sm[2];
            ra_split_tf32<3, 2>(x, bg, sm);
            sVs[kp * VSROW + c] = make_uint4(bg[0], bg[1], sm[0], sm[1]);
        }
    };

    int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    const float* rh_row[2];
    const float* rw_row[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = min(rows[rr], Sq - 1);
        rh_row[rr] = rel_h + ((long long)bh * Sq + r) * kh;
        rw_row[rr] = rel_w + ((long long)bh * Sq + r) * kw;
    }
    // KR (KEY_ROWS, k_w == 64): rel_w of this thread's keys nb * 8 + 2 t (+ 1), log2 domain
    constexpr bool KR = (REL == tf32_bias::KEY_ROWS);
    float rwc[2][KR ? 8 : 1][2];
    if (KR) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) {
                const float2 w2 = __ldg(reinterpret_cast<const float2*>(rw_row[rr] + nb * 8 + 2 * t));
                rwc[rr][KR ? nb : 0][0] = w2.x * RA_LOG2E;
                rwc[rr][KR ? nb : 0][1] = w2.y * RA_LOG2E;
            }
    }

    float o[ND][4];
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
    float m_run[2] = {-RA_INF, -RA_INF}, l_run[2] = {0.f, 0.f};

    const float* qw = sQ + (warp * 16 + g) * QROW + 2 * t;   // this thread's Q rows g and g + 8
    const int ntiles = (Sk + BN - 1) / BN;
    for (int n = 0; n < ntiles; ++n) {
        const int j0 = n * BN;
        float rh1[2];
        if (KR) {
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) rh1[rr] = __ldg(rh_row[rr] + min(n, kh - 1)) * RA_LOG2E;
        }
        if (SH) {
            ra_cp_wait<0>();
            __syncthreads();   // raw tile n landed; every warp is done with tile n - 1's split stage
            split_tile();
            __syncthreads();
            if (n + 1 < ntiles) load_tile(0, j0 + BN);
        } else if (n + 1 < ntiles) {
            load_tile((n + 1) & 1, j0 + BN);
            ra_cp_wait<1>();
        } else {
            ra_cp_wait<0>();
        }
        if (!SH) __syncthreads();
        // SH: a warp whose 16 rows all lie past Sq only splits and meets the barriers
        if (SH && m0 + warp * 16 >= Sq) continue;
        const float* cK = sKV + (SH ? 0 : (n & 1) * (KT + VT));
        const float* cV = cK + KT;

        // ---- S = Q K^T
        float s[8][4];
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HD / 8; ++ks) {
            const float2 q0 = *reinterpret_cast<const float2*>(qw + ks * 8);
            const float2 q1 = *reinterpret_cast<const float2*>(qw + 8 * QROW + ks * 8);
            const float a[4] = {q0.x, q1.x, q0.y, q1.y};
            u32 ab[4], as[4], abx[SAFE ? 4 : 1];
            ra_split_tf32<SPLIT, 4, SAFE != 0>(a, ab, as, abx);
            constexpr int NG = SAFE ? 2 : 8;   // column blocks split at a time (registers)
#pragma unroll
            for (int n0 = 0; n0 < 8; n0 += NG) {
                u32 bb[NG][2], bs[NG][2], bbx[SAFE ? NG : 1][2];
#pragma unroll
                for (int i = 0; i < NG; ++i) {
                    if (SH) {
                        const uint4 kq = sKs[((n0 + i) * 8 + g) * KSROW + ks * 4 + t];
                        bb[i][0] = kq.x;
                        bb[i][1] = kq.y;
                        bs[i][0] = kq.z;
                        bs[i][1] = kq.w;
                    } else {
                        const float2 k2 = *reinterpret_cast<const float2*>(cK + ((n0 + i) * 8 + g) * QROW + ks * 8 + 2 * t);
                        const float bk[2] = {k2.x, k2.y};
                        ra_split_tf32<SPLIT, 2, SAFE != 0>(bk, bb[i], bs[i], bbx[SAFE ? i : 0]);
                    }
                }
                ra_mma_split<SPLIT, NG>(s + n0, ab, as, bb, bs, SAFE ? abx : ab, SAFE ? bbx : bb);
            }
        }

        // ---- scale, relative terms, mask; element (nb, e): row rr = e >> 1,
        //      key j0 + nb * 8 + 2 t + (e & 1)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int rr = e >> 1, hi = e & 1;
                const int key = j0 + nb * 8 + 2 * t + hi;
                float bias = 0.f;
                if (KR) {
                    bias = rwc[rr][KR ? nb : 0][hi];   // rel_h: added to the row maximum
                } else if (REL == tf32_bias::GENERIC) {
                    if (key < Sk) {
                        int ky, kx;
                        ra_split_key(key, kw, inv_kw, ky, kx);
                        bias = (__ldg(rh_row[rr] + ky) + __ldg(rw_row[rr] + kx)) * RA_LOG2E;
                    }
                }
                s[nb][e] = (key < Sk) ? fmaf(s[nb][e], scale_log2, bias) : -RA_INF;
            }

        // ---- online softmax
        float alpha_r[2];
        {
            float off[2] = {0.f, 0.f};
            if (KR) {
                off[0] = rh1[0];
                off[1] = rh1[1];
            }
            ra_online_softmax<8>(&s[0][0], off, m_run, l_run, alpha_r);
        }

        // ---- O = alpha O + P V (k slot t <-> key nb * 8 + 2 t, t + 4 <-> 2 t + 1,
        //      so P's A fragment is s[nb] reordered); this tile's product starts
        //      from zero (see above)
        float ot[ND][4];
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) ot[d][e] = 0.f;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            const float a[4] = {s[nb][0], s[nb][2], s[nb][1], s[nb][3]};
            u32 ab[4], as[4], abx[SAFE ? 4 : 1];
            ra_split_tf32<SPLIT, 4, SAFE != 0>(a, ab, as, abx);
            const float* vr = cV + (nb * 8 + 2 * t) * VROW + g;
            // column blocks in groups of 8 (ND = 8, 10, 12, 14 or 16 ...)
#pragma unroll
            for (int d0 = 0; d0 < ND; d0 += (SAFE ? 2 : 8)) {
                constexpr int G8 = SAFE ? 2 : 8;
                u32 bb[G8][2], bs[G8][2], bbx[SAFE ? G8 : 1][2];
#pragma unroll
                for (int i = 0; i < G8; ++i) {
                    const int d = min(d0 + i, ND - 1);
                    if (SH) {
                        const uint4 vq = sVs[(nb * 4 + t) * VSROW + d * 8 + g];
                        bb[i][0] = vq.x;
                        bb[i][1] = vq.y;
                        bs[i][0] = vq.z;
                        bs[i][1] = vq.w;
                    } else {
                        const float bv[2] = {vr[d * 8], vr[VROW + d * 8]};
                        ra_split_tf32<SPLIT, 2, SAFE != 0>(bv, bb[i], bs[i], bbx[SAFE ? i : 0]);
                    }
                }
                if (d0 + G8 <= ND) {
                    ra_mma_split<SPLIT, G8>(ot + d0, ab, as, bb, bs, SAFE ? abx : ab, SAFE ? bbx : bb);
                } else {
                    ra_mma_split<SPLIT, (ND % G8 == 0) ? 1 : ND % G8>(ot + d0, ab, as, bb, bs,
                                                                      SAFE ? abx : ab, SAFE ? bbx : bb);
                }
            }
        }
#pragma unroll
        for (int d = 0; d < ND; ++d)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[d][e] = fmaf(o[d][e], alpha_r[e >> 1], ot[d][e]);
        if (!SH) __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    if (!SAFE && SPLIT == 3) {
        bool bad = ra_nonfinite<ND * 4>(l_run, &o[0][0]);
        if (SH) {   // one flag per 64 rows (warps 0-3, 4-7): the SAFE pass's blocks
            const int b0 = __syncthreads_or(bad && warp < 4), b1 = __syncthreads_or(bad && warp >= 4);
            const int mt64 = (Sq + 63) / 64;
            if (tid < 2 && 2 * mt + tid < mt64) flags[bh * mt64 + 2 * mt + tid] = (tid ? b1 : b0) ? 1 : 0;
        } else {
            bad = __syncthreads_or(bad);
            if (tid == 0) flags[blockIdx.x] = bad ? 1 : 0;
        }
    }

    float* ob = out + (long long)bh * Sq * D;
    bool bad[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const float inv = ra_row_inv(l_run[rr]);
        const int r = rows[rr];
        // SAFE: rewrite only the rows the first pass left non-finite. Every
        // non-finite input a row meets turns the fast split's products into NaN,
        // so a finite first-pass row is already that row's result; the rows of a
        // flagged block then keep the bits of a clean run, whichever kernel
        // (relattn_tf32 or Hopper's relattn_wgt) made the first pass.
        bool redo = true;
        if (SAFE) {
            bool nf = false;
            if (r < Sq) {
#pragma unroll
                for (int d = 0; d < ND; ++d) {
                    const int col = d * 8 + 2 * t;
                    if (col < D) nf |= !(fabsf(ob[(long long)r * D + col]) < RA_INF);
                    if (col + 1 < D) nf |= !(fabsf(ob[(long long)r * D + col + 1]) < RA_INF);
                }
            }
            nf |= __shfl_xor_sync(0xffffffffu, (int)nf, 1) != 0;
            nf |= __shfl_xor_sync(0xffffffffu, (int)nf, 2) != 0;
            redo = nf;
        }
        bad[rr] = false;
        if (r < Sq && redo) {
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                const int col = d * 8 + 2 * t;
                const float x0 = o[d][2 * rr] * inv, x1 = o[d][2 * rr + 1] * inv;
                if (col < D) ob[(long long)r * D + col] = x0;
                if (col + 1 < D) ob[(long long)r * D + col + 1] = x1;
                bad[rr] |= (col < D && !ra_finite(x0)) || (col + 1 < D && !ra_finite(x1));
            }
        }
    }
    // the rows still not finite are recomputed exactly (ra_exact_row); not in
    // the fast 3xTF32 pass, whose non-finite rows the IEEE-safe pass redoes
    if (SAFE || SPLIT != 3) {
        const auto src = ra_given_terms_src<0>(qb, kb, vb, qss, kss, vss, REL != tf32_bias::NONE, rel_h, rel_w,
                                               bh, Sq, Sk, D, kh, kw);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
            ra_fix_rows_if<4>(bad[rr], rows[rr], [&](int row) {
                ra_exact_row<0>(src, row, scale_log2, ob + (long long)row * D, lane);
            });
    }
}
