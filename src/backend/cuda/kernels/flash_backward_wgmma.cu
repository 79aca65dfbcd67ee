// Varlen causal flash attention, backward, on Hopper's warpgroup MMA (sm_90a `wgmma`; helpers
// and the shared-memory layout in flash_wgmma.cuh, pasted in front by compile.rs): the
// flash_bwd_dkdv and flash_bwd_dq kernels of flash_backward.cu (same items, same math, same
// outputs, dsum from the same flash_bwd_pre) with every product a wgmma.
//
//   dK/dV, per (document, 64-row key tile, kv head); A = this block's 64 keys, over the G query
//   heads and the query tiles from the diagonal on (Q, dO, lse, dsum double-buffered):
//     S^T = K Q^T, dP^T = V dO^T          A and B from shared memory (B = the Q / dO tile)
//     P^T = exp2(S^T scale log2 e - lse log2 e) (causal mask on the diagonal tile),
//     dS^T = P^T (dP^T - dsum)
//     dV += P^T dO, dK += dS^T Q          A from the accumulators, B = dO / Q, MN-major
//   dQ, per (document, 64-row query tile, query head), over key tiles 0..=qt (K, V
//   double-buffered):
//     S = Q K^T, dP = dO V^T (shared memory), dS = P (dP - dsum), dQ += dS K (B = K, MN-major)
//   then dK, dQ are scaled by 1 / sqrt(D) once at the end, as in the mma.sync kernels.
// With `rope` set (Backend::attention_rope_backward), dK and dQ are also rotated back by RoPE
// (fa_rope_back_row) before their one rounding to bf16: rope_backward's pass over dqkv is gone.
// A dK/dV item may be one part of a key tile split by query head (ops/flash_items.rs: item.w =
// S | part << 4 | slot << 8, 0 for a whole tile): the block walks its G / S heads only and
// stores f32 partial sums to `part` slot `slot + part` ([Hkv][2][64][D] per slot), which
// flash_bwd_dkdv_reduce adds up.
// At D = 128 the dK/dV kernel's score stage runs in two halves of 32 queries (QC), as the
// mma.sync kernel does, to bound the live accumulators next to dK and dV (128 registers).

#if FA_WG
template <int D>
struct FaWgBwd {
    static constexpr int QC = D == 64 ? 64 : 32;  // query columns per score pass (dK/dV)
};

// d (+)= A B^T over one k16 step with n = QC (32 or 64) columns.
template <int QC>
__device__ __forceinline__ void fa_wgmma_ss_q(float* d, unsigned long long a,
                                              unsigned long long b, int accumulate) {
    if constexpr (QC == 64)
        fa_wgmma_ss_n64(d, a, b, accumulate);
    else
        fa_wgmma_ss_n32(d, a, b, accumulate);
}

// Element offset of k16 step kk (columns 16 kk ..) of a swizzled tile, as a K-major operand.
__device__ __forceinline__ int fa_k16(int kk) { return (kk >> 2) * FA_TILE * 64 + (kk & 3) * 16; }

template <int D>
__device__ __forceinline__ void flash_bwd_dkdv_wg(__nv_bfloat16* __restrict__ dqkv,
                                                  const __nv_bfloat16* __restrict__ dout,
                                                  const __nv_bfloat16* __restrict__ qkv,
                                                  const float* __restrict__ lse,
                                                  const float* __restrict__ dsum,
                                                  const int4* __restrict__ items, int T, int H,
                                                  int Hkv, float scale, float scale_log2,
                                                  const float2* rope, float* part) {
    constexpr int TD = FA_TILE * D;
    constexpr int QC = FaWgBwd<D>::QC;
    extern __shared__ __align__(16) unsigned short fa_smem_wg[];
    unsigned short* sK = fa_smem_base(fa_smem_wg);
    unsigned short* sV = sK + TD;
    unsigned short* sQ0 = sV + TD;                         // two (Q, dO) tile pairs
    float* sL0 = reinterpret_cast<float*>(sQ0 + 4 * TD);  // two lse rows
    float* sD0 = sL0 + 2 * FA_TILE;                        // two dsum rows

    const int4 it = items[blockIdx.x / Hkv];
    const int hk = blockIdx.x % Hkv;
    const int start = it.x, L = it.y, kt = it.z;
    const int parts = it.w ? (it.w & 15) : 1, pi = (it.w >> 4) & 15, slot = it.w >> 8;
    const int G = H / Hkv, Gp = G / parts;  // this block's query heads: pi Gp .. + Gp
    const long W = (long)(H + 2 * Hkv) * D, HD = (long)H * D;
    const int k0 = kt * FA_TILE;
    const int nq = (L + FA_TILE - 1) / FA_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;

    // Steps j = 0 .. Gp (nq - kt): query head hk G + pi Gp + j / span, query tile
    // kt + j % span.
    const int span = nq - kt, steps = Gp * span;
    auto start_step = [&](int j) {
        const int hq = hk * G + pi * Gp + j / span, q0 = (kt + j % span) * FA_TILE;
        unsigned short* bQ = sQ0 + 2 * (j & 1) * TD;
        fa_tile_start_sw<D>(bQ, qkv + (long)(start + q0) * W + (long)hq * D, W, L - q0);
        fa_tile_start_sw<D>(bQ + TD, dout + (long)(start + q0) * HD + (long)hq * D, HD, L - q0);
        if (threadIdx.x < FA_TILE) {
            const bool ok = q0 + (int)threadIdx.x < L;
            const long idx = ok ? (long)hq * T + start + q0 + threadIdx.x : 0;
            fa_cp4(sL0 + (j & 1) * FA_TILE + threadIdx.x, lse + idx, ok ? 4 : 0);
            fa_cp4(sD0 + (j & 1) * FA_TILE + threadIdx.x, dsum + idx, ok ? 4 : 0);
        }
        fa_async_commit();
    };
    fa_tile_start_sw<D>(sK, qkv + (long)(start + k0) * W + (long)(H + hk) * D, W, L - k0);
    fa_tile_start_sw<D>(sV, qkv + (long)(start + k0) * W + (long)(H + Hkv + hk) * D, W, L - k0);
    start_step(0);  // joins K and V's copies in one group

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

    for (int j = 0; j < steps; ++j) {
        const int q0 = (kt + j % span) * FA_TILE;
        unsigned short* sQ = sQ0 + 2 * (j & 1) * TD;
        unsigned short* sO = sQ + TD;  // dO
        const float* sL = sL0 + (j & 1) * FA_TILE;
        const float* sD = sD0 + (j & 1) * FA_TILE;
        __syncthreads();  // every read of the buffer about to be refilled has completed
        if (j + 1 < steps) {
            start_step(j + 1);
            fa_async_wait<1>();  // step j's copies are done, step j + 1's in flight
        } else {
            fa_async_wait<0>();
        }
        fa_proxy_fence();
        __syncthreads();
        const bool diag = q0 == k0;
#pragma unroll
        for (int qc = 0; qc < FA_TILE / QC; ++qc) {
            // S^T, dP^T: this warp's 16 keys x QC queries (queries qc QC ..).
            float st[QC / 2], dpt[QC / 2];
            fa_wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const int off = fa_k16(kk), offq = off + qc * QC * 64;
                fa_wgmma_ss_q<QC>(st, fa_desc(sK + off, 16), fa_desc(sQ + offq, 16), kk);
                fa_wgmma_ss_q<QC>(dpt, fa_desc(sV + off, 16), fa_desc(sO + offq, 16), kk);
            }
            fa_wg_commit();
            fa_wg_wait0();
            fa_pin<QC / 2>(st);
            fa_pin<QC / 2>(dpt);
            // Masked scores (keys past the query) only on the diagonal tile: -inf, so p = 0.
            // Queries past the document need no mask: their Q, dO, lse and dsum rows are
            // zero-filled, so dS^T = 0 and P^T multiplies a zero dO row.
            if (diag) {
#pragma unroll
                for (int nb = 0; nb < QC / 8; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (warp * 16 + g + (e >> 1) * 8 > qc * QC + nb * 8 + 2 * tig + (e & 1))
                            st[4 * nb + e] = -FA_INF;
            }
            fa_dkdv_scores<QC>(st, dpt, sL + qc * QC, sD + qc * QC, scale_log2, tig);
            unsigned ap[QC / 16][4], as[QC / 16][4];
#pragma unroll
            for (int kk = 0; kk < QC / 16; ++kk)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    ap[kk][i] = fa_pack(st[8 * kk + 2 * i], st[8 * kk + 2 * i + 1]);
                    as[kk][i] = fa_pack(dpt[8 * kk + 2 * i], dpt[8 * kk + 2 * i + 1]);
                }
            // dV += P^T dO, dK += dS^T Q over these QC queries (16 per k-step).
            fa_pin<D / 2>(dv);
            fa_pin<D / 2>(dk);
            fa_wg_fence();
#pragma unroll
            for (int kk = 0; kk < QC / 16; ++kk) {
                const int rows = (qc * QC + kk * 16) * 64;
                fa_wgmma_rs_d<D>(dv, ap[kk], sO + rows);
                fa_wgmma_rs_d<D>(dk, as[kk], sQ + rows);
            }
            fa_wg_commit();
            fa_wg_wait0();
            fa_pin<D / 2>(dv);
            fa_pin<D / 2>(dk);
        }
    }
    // A part's f32 partials: rows of dK, then of dV, of this kv head in its slot.
    float* pk = parts > 1 ? part + ((long)(slot + pi) * Hkv + hk) * 2 * TD : nullptr;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + g + r * 8, key = k0 + row;
        if (key < L) {
            float sc = scale;
            if (rope) {
                // Linear, so rotating each part's partial sum rotates their sum.
                fa_rope_back_row<D>(dk, r, scale, rope + (long)(start + key) * (D / 2), tig);
                sc = 1.f;
            }
            if (pk) {
#pragma unroll
                for (int i = 0; i < D / 8; ++i) {
                    const int c = i * 8 + 2 * tig;
                    *reinterpret_cast<float2*>(pk + row * D + c) =
                        make_float2(dk[4 * i + 2 * r] * sc, dk[4 * i + 2 * r + 1] * sc);
                    *reinterpret_cast<float2*>(pk + TD + row * D + c) =
                        make_float2(dv[4 * i + 2 * r], dv[4 * i + 2 * r + 1]);
                }
                continue;
            }
            __nv_bfloat16* drow = dqkv + (long)(start + key) * W;
            fa_store_grad_row<D>(dk, r, sc, nullptr, drow + (long)(H + hk) * D, tig);
            fa_store_grad_row<D>(dv, r, 1.f, nullptr, drow + (long)(H + Hkv + hk) * D, tig);
        }
    }
}

template <int D>
__device__ __forceinline__ void flash_bwd_dq_wg(__nv_bfloat16* __restrict__ dqkv,
                                                const __nv_bfloat16* __restrict__ dout,
                                                const __nv_bfloat16* __restrict__ qkv,
                                                const float* __restrict__ lse,
                                                const float* __restrict__ dsum,
                                                const int4* __restrict__ items, int T, int H,
                                                int Hkv, float scale, float scale_log2,
                                                const float2* rope) {
    constexpr int TD = FA_TILE * D;
    extern __shared__ __align__(16) unsigned short fa_smem_wg[];
    unsigned short* sQ = fa_smem_base(fa_smem_wg);
    unsigned short* sO = sQ + TD;   // dO
    unsigned short* kv = sO + TD;   // two (K, V) tile pairs
    const int4 it = items[blockIdx.x / H];
    const int h = blockIdx.x % H;
    const int start = it.x, L = it.y, qt = it.z;
    const int hk = h / (H / Hkv);
    const long W = (long)(H + 2 * Hkv) * D, HD = (long)H * D;
    const int q0 = qt * FA_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const __nv_bfloat16* kb = qkv + (long)start * W + (long)(H + hk) * D;
    const __nv_bfloat16* vb = qkv + (long)start * W + (long)(H + Hkv + hk) * D;

    fa_tile_start_sw<D>(sQ, qkv + (long)(start + q0) * W + (long)h * D, W, L - q0);
    fa_tile_start_sw<D>(sO, dout + (long)(start + q0) * HD + (long)h * D, HD, L - q0);
    fa_tile_start_sw<D>(kv, kb, W, L);
    fa_tile_start_sw<D>(kv + TD, vb, W, L);
    fa_async_commit();
    // This thread's two query rows: q0 + warp 16 + g (+ 8).
    float lse2[2], dsr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q0 + warp * 16 + g + r * 8;
        const long idx = (long)h * T + start + q;
        lse2[r] = q < L ? lse[idx] * FA_LOG2E : 0.f;
        dsr[r] = q < L ? dsum[idx] : 0.f;
    }
    float dq[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;

    for (int kt = 0; kt <= qt; ++kt) {
        const int k0 = kt * FA_TILE;
        unsigned short* sK = fa_kv_step_sw<D>(kv, kb, vb, W, kt, qt, L);
        unsigned short* sV = sK + TD;

        // S = Q K^T and dP = dO V^T: this warp's 16 queries x 64 keys.
        float s[32], dp[32];
        fa_wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int off = fa_k16(kk);
            fa_wgmma_ss_n64(s, fa_desc(sQ + off, 16), fa_desc(sK + off, 16), kk);
            fa_wgmma_ss_n64(dp, fa_desc(sO + off, 16), fa_desc(sV + off, 16), kk);
        }
        fa_wg_commit();
        fa_wg_wait0();
        fa_pin<32>(s);
        fa_pin<32>(dp);
        // Masked scores only on the diagonal tile (-inf: p = 0). Rows past the document need
        // no mask: their Q and dO rows are zero-filled and lse, dsum 0, so dS = 1 (0 - 0).
        if (kt == qt) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (nb * 8 + 2 * tig + e > warp * 16 + g + r * 8) s[4 * nb + 2 * r + e] = -FA_INF;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int i = 4 * nb + 2 * r + e;
                    const float p = exp2f(fmaf(s[i], scale_log2, -lse2[r]));
                    s[i] = p * (dp[i] - dsr[r]);  // dS
                }
        unsigned a[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int i = 0; i < 4; ++i) a[kk][i] = fa_pack(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
        // dQ += dS K, one k-step per 16 keys.
        fa_pin<D / 2>(dq);
        fa_wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fa_wgmma_rs_d<D>(dq, a[kk], sK + kk * 16 * 64);
        fa_wg_commit();
        fa_wg_wait0();
        fa_pin<D / 2>(dq);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q0 + warp * 16 + g + r * 8;
        const long tok = start + q;
        if (q < L)
            fa_store_grad_row<D>(dq, r, scale, rope ? rope + tok * (D / 2) : nullptr,
                                 dqkv + tok * W + (long)h * D, tig);
    }
}
#endif  // FA_WG

#if FA_WG
// CALL: the kernel body's call, parenthesised (it has commas).
#define FA_BWD_WG_BODY(CALL) CALL;
#else
#define FA_BWD_WG_BODY(CALL) asm volatile("trap;");
#endif
// The argument lists of flash_bwd_dkdv_* (dqacc, ldq unused: dQ is never atomic here) and of
// flash_bwd_dq_*, so the launcher passes the same arguments to either kernel of a pair, plus
// RoPE's table of cosines and sines (null: no rotation), and for dK/dV the split items'
// partial slots (null when no item is split).
#define FA_DKDV_WG_ENTRY(NAME, D, MINB)                                                       \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, MINB)                            \
        NAME(__nv_bfloat16* dqkv, float*, long long, const __nv_bfloat16* dout,               \
             const __nv_bfloat16* qkv, const float* lse, const float* dsum, const int4* items, \
             int T, int H, int Hkv, float scale, float scale_log2, const float2* rope,        \
             float* part) {                                                                   \
        FA_BWD_WG_BODY((flash_bwd_dkdv_wg<D>(dqkv, dout, qkv, lse, dsum, items, T, H, Hkv,    \
                                             scale, scale_log2, rope, part)))                 \
    }
#define FA_DQ_WG_ENTRY(NAME, D, MINB)                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, MINB)                            \
        NAME(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,        \
             const float* lse, const float* dsum, const int4* items, int T, int H, int Hkv,   \
             float scale, float scale_log2, const float2* rope) {                             \
        FA_BWD_WG_BODY((flash_bwd_dq_wg<D>(dqkv, dout, qkv, lse, dsum, items, T, H, Hkv,      \
                                           scale, scale_log2, rope)))                         \
    }
FA_DKDV_WG_ENTRY(flash_bwd_dkdv_wg_d64_bf16, 64, 3)
FA_DKDV_WG_ENTRY(flash_bwd_dkdv_wg_d128_bf16, 128, 2)
FA_DQ_WG_ENTRY(flash_bwd_dq_wg_d64_bf16, 64, 3)
FA_DQ_WG_ENTRY(flash_bwd_dq_wg_d128_bf16, 128, 2)

// The split dK/dV items' sums (ops/flash_items.rs). Block (u, hk) of item u = {start, len,
// tile, S | slot << 8} of `splits`: each valid row of key tile `tile` of kv head hk gets
// dK = sum over s < S of slot + s's partial, added in that order (deterministic), rounded to
// bf16; dV the same. Generic code: compiled everywhere, launched after the wgmma dK/dV kernel.
extern "C" __global__ void flash_bwd_dkdv_reduce(__nv_bfloat16* dqkv, const float* part,
                                                 const int4* splits, int H, int Hkv, int D) {
    const int4 it = splits[blockIdx.x / Hkv];
    const int hk = blockIdx.x % Hkv;
    const int start = it.x, k0 = it.z * FA_TILE, S = it.w & 255, slot = it.w >> 8;
    const int rows = min(FA_TILE, it.y - k0);
    const long W = (long)(H + 2 * Hkv) * D, TD = (long)FA_TILE * D, PS = (long)Hkv * 2 * TD;
    const float* p0 = part + (long)slot * PS + (long)hk * 2 * TD;
    // Two consecutive columns per step: element e of [2][64][D] (dK rows, then dV rows).
    for (long e = 2 * threadIdx.x; e < 2 * TD; e += 2 * blockDim.x) {
        const int which = (int)(e / TD), row = (int)((e % TD) / D), col = (int)(e % D);
        if (row >= rows) continue;
        float2 acc = *reinterpret_cast<const float2*>(p0 + e);
        for (int s = 1; s < S; ++s) {
            const float2 v = *reinterpret_cast<const float2*>(p0 + s * PS + e);
            acc.x += v.x;
            acc.y += v.y;
        }
        fa_st2(dqkv + (long)(start + k0 + row) * W + (long)(H + which * Hkv + hk) * D + col,
               acc.x, acc.y);
    }
}
