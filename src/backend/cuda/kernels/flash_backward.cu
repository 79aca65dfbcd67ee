// Varlen causal flash attention, backward (shared layouts, work lists and helpers in
// flash_common.cuh, pasted in front by compile.rs).
//
// flash_bwd_pre computes dsum = rowsum(dO * O) (and zeroes the atomic dQ accumulator).
// Item = (document, 64-row key tile kt), per kv head; loops over the G query heads of that kv
//   head and the query tiles kt.. of the document, so dK, dV accumulate in registers in a fixed
//   order (deterministic) and are written once. dQ, two ways:
//   - separate (default): flash_bwd_dkdv skips it, and flash_bwd_dq owns a (document, query
//     tile, query head) like the forward, loops over the key tiles 0..=qt recomputing S and
//     dP (two GEMMs more than the atomic way) and writes dQ once: no atomics, deterministic,
//     no scratch;
//   - atomic (PACKTRAIN_FLASH_DQ=atomic): flash_bwd also computes dS K for its key tile and
//     adds it with f32 atomics into dqacc (row stride ldq), which flash_bwd_pre zeroes first:
//     dqkv's q columns themselves when E is f32, else an f32 [T, H D] scratch that
//     flash_bwd_post rounds into dqkv's q columns.

// dsum[h, t] = dout[t, h] . out[t, h]; dqacc's row t, head h zeroed (row stride ldq).
// A (t, h) row of D elements is D / 8 consecutive lanes, 8 elements (one 16-byte bf16 load)
// each, so a warp covers 32 / (D / 8) rows and every lane is busy (D in {64, 128}; the launcher
// sizes the grid as ceil(T H / (32 / (D / 8))) warps).
template <typename E>
__device__ __forceinline__ void flash_bwd_pre(float* __restrict__ dqacc, long ldq,
                                              float* __restrict__ dsum,
                                              const E* __restrict__ dout,
                                              const E* __restrict__ out, int T, int H, int D) {
    const int G = D / 8;  // lanes per row: 8 or 16
    const long lane_g = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const long row = lane_g / G;  // (t, h) row, t-major
    const int part = (int)(lane_g % G);
    const bool live = row < (long)T * H;
    float acc = 0.f;
    if (live) {
        const long t = row / H;
        const int h = (int)(row % H);
        const long at = t * (long)H * D + (long)h * D + part * 8;
        float4 a0 = fa_f32x4(dout + at), a1 = fa_f32x4(dout + at + 4);
        float4 b0 = fa_f32x4(out + at), b1 = fa_f32x4(out + at + 4);
        acc = a0.x * b0.x + a0.y * b0.y + a0.z * b0.z + a0.w * b0.w + a1.x * b1.x + a1.y * b1.y +
              a1.z * b1.z + a1.w * b1.w;
        if (dqacc) {
            float* dq = dqacc + t * ldq + (long)h * D + part * 8;
            *reinterpret_cast<float4*>(dq) = make_float4(0.f, 0.f, 0.f, 0.f);
            *reinterpret_cast<float4*>(dq + 4) = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    // Sum over the row's G lanes (a G-aligned group of the warp; all lanes take part).
    for (int o = G / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (live && part == 0) {
        const long t = row / H;
        const int h = (int)(row % H);
        dsum[(long)h * T + t] = acc;
    }
}

extern "C" __global__ void flash_bwd_pre_f32(float* dqacc, long long ldq, float* dsum,
                                             const float* dout, const float* out, int T, int H,
                                             int D) {
    flash_bwd_pre<float>(dqacc, ldq, dsum, dout, out, T, H, D);
}

extern "C" __global__ void flash_bwd_pre_bf16(float* dqacc, long long ldq, float* dsum,
                                              const __nv_bfloat16* dout,
                                              const __nv_bfloat16* out, int T, int H, int D) {
    flash_bwd_pre<__nv_bfloat16>(dqacc, ldq, dsum, dout, out, T, H, D);
}

// dqkv[t, q columns] = bf16(dqacc[t, :]) for dqacc [T, H D] f32, 8 elements per thread (two
// 16-byte loads, one 16-byte store; H D is a multiple of 64).
extern "C" __global__ void flash_bwd_post_bf16(__nv_bfloat16* dqkv, const float* dqacc, int T,
                                               int H, int Hkv, int D) {
    const long HD = (long)H * D, W = (long)(H + 2 * Hkv) * D;
    const long i = 8 * ((long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= (long)T * HD) return;
    const long t = i / HD, c = i % HD;
    const float4 a = *reinterpret_cast<const float4*>(dqacc + i);
    const float4 b = *reinterpret_cast<const float4*>(dqacc + i + 4);
    *reinterpret_cast<uint4*>(dqkv + t * W + c) =
        make_uint4(fa_pack(a.x, a.y), fa_pack(a.z, a.w), fa_pack(b.x, b.y), fa_pack(b.z, b.w));
}

__device__ __forceinline__ void fa_atomic_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Query columns per pass of the S / dP stage (bounds the live score registers).
template <int D>
struct FaBwdCfg {
    static constexpr int QC = 32;
};

template <int D, typename E, bool DQ>
__device__ __forceinline__ void flash_bwd(E* __restrict__ dqkv, float* __restrict__ dqacc,
                                          long ldq, const E* __restrict__ dout,
                                          const E* __restrict__ qkv,
                                          const float* __restrict__ lse,
                                          const float* __restrict__ dsum,
                                          const int4* __restrict__ items, int T, int H, int Hkv,
                                          float scale, float scale_log2) {
    constexpr int S = D + 8;
    constexpr int SP = FA_TILE + 8;  // row stride of the dS^T tile
    constexpr int QC = FaBwdCfg<D>::QC;
    constexpr int NB = FaPipe<D>::BWD;
    extern __shared__ __align__(16) unsigned short fa_smem[];
    unsigned short* sK = fa_smem;
    unsigned short* sV = sK + FA_TILE * S;
    unsigned short* sQ0 = sV + FA_TILE * S;        // NB (Q, dO) tile pairs
    unsigned short* sP = sQ0 + 2 * NB * FA_TILE * S;  // dS^T [key][query] (DQ only)
    float* sL0 = reinterpret_cast<float*>(sP + (DQ ? FA_TILE * SP : 0));  // NB lse rows
    float* sD0 = sL0 + NB * FA_TILE;                            // NB dsum rows

    const int4 it = items[blockIdx.x / Hkv];
    const int hk = blockIdx.x % Hkv;
    const int start = it.x, L = it.y, kt = it.z;
    const int G = H / Hkv;
    const long W = (long)(H + 2 * Hkv) * D, HD = (long)H * D;
    const int k0 = kt * FA_TILE;
    const int nq = (L + FA_TILE - 1) / FA_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;

    // Steps j = 0 .. G (nq - kt): query head hk G + j / (nq - kt), query tile kt + j % (nq - kt).
    const int span = nq - kt, steps = G * span;
    // Start step j's Q, dO, lse, dsum into buffer j % NB (one commit group).
    auto start_step = [&](int j) {
        const int hq = hk * G + j / span, q0 = (kt + j % span) * FA_TILE;
        unsigned short* bQ = sQ0 + 2 * (j % NB) * FA_TILE * S;
        fa_tile_start<D, 4>(bQ, qkv + (long)(start + q0) * W + (long)hq * D, W, L - q0);
        fa_tile_start<D, 4>(bQ + FA_TILE * S, dout + (long)(start + q0) * HD + (long)hq * D, HD,
                            L - q0);
        if (threadIdx.x < FA_TILE) {
            // Rows past the document read nothing (zero-filled; masked where used).
            const bool ok = q0 + (int)threadIdx.x < L;
            const long idx = ok ? (long)hq * T + start + q0 + threadIdx.x : 0;
            fa_cp4(sL0 + (j % NB) * FA_TILE + threadIdx.x, lse + idx, ok ? 4 : 0);
            fa_cp4(sD0 + (j % NB) * FA_TILE + threadIdx.x, dsum + idx, ok ? 4 : 0);
        }
        fa_async_commit();
    };
    fa_tile_start<D, 4>(sK, qkv + (long)(start + k0) * W + (long)(H + hk) * D, W, L - k0);
    fa_tile_start<D, 4>(sV, qkv + (long)(start + k0) * W + (long)(H + Hkv + hk) * D, W, L - k0);
    start_step(0);  // joins K and V's copies in one group

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

    for (int j = 0; j < steps; ++j) {
        {
            const int hq = hk * G + j / span, qt = kt + j % span;
            const int q0 = qt * FA_TILE;
            unsigned short* sQ = sQ0 + 2 * (j % NB) * FA_TILE * S;
            unsigned short* sO = sQ + FA_TILE * S;  // dO
            const float* sL = sL0 + (j % NB) * FA_TILE;
            const float* sD = sD0 + (j % NB) * FA_TILE;
            __syncthreads();  // the buffer about to be refilled, and sP, are no longer read
            if (NB == 2 && j + 1 < steps) {
                start_step(j + 1);
                fa_async_wait<1>();  // step j's copies are done, step j + 1's in flight
            } else {
                if (NB == 1 && j > 0) start_step(j);
                fa_async_wait<0>();
            }
            __syncthreads();
            const bool diag = qt == kt;
#pragma unroll
            for (int qc = 0; qc < FA_TILE / QC; ++qc) {
                // S^T, dP^T for this warp's 16 keys x QC queries.
                float s[QC / 8][4], dp[QC / 8][4];
#pragma unroll
                for (int i = 0; i < QC / 8; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    unsigned ak[4], av[4];
                    fa_ldsm(ak, fa_a_addr(sK, S, warp * 16, kk * 16, lane));
                    fa_ldsm(av, fa_a_addr(sV, S, warp * 16, kk * 16, lane));
#pragma unroll
                    for (int nb = 0; nb < QC / 16; ++nb) {
                        unsigned b[4];
                        fa_ldsm(b, fa_b_addr(sQ, S, qc * QC + nb * 16, kk * 16, lane));
                        fa_mma(s[2 * nb], ak, b);
                        fa_mma(s[2 * nb + 1], ak, b + 2);
                        fa_ldsm(b, fa_b_addr(sO, S, qc * QC + nb * 16, kk * 16, lane));
                        fa_mma(dp[2 * nb], av, b);
                        fa_mma(dp[2 * nb + 1], av, b + 2);
                    }
                }
                // P^T = exp2(S^T scale log2 e - lse2[q]); dS^T = P^T (dP^T - dsum[q]).
#pragma unroll
                for (int nb = 0; nb < QC / 8; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int ql = qc * QC + nb * 8 + 2 * tig + (e & 1);
                        const int key = k0 + warp * 16 + g + (e >> 1) * 8;
                        float p = exp2f(s[nb][e] * scale_log2 - sL[ql] * FA_LOG2E);
                        if ((diag && key > q0 + ql) || q0 + ql >= L) p = 0.f;
                        s[nb][e] = p;
                        dp[nb][e] = p * (dp[nb][e] - sD[ql]);
                    }
                // dV += P^T dO, dK += dS^T Q (K dim = queries), and dS^T to shared memory.
#pragma unroll
                for (int kk = 0; kk < QC / 16; ++kk) {
                    unsigned ap[4], as[4];
                    ap[0] = fa_pack(s[2 * kk][0], s[2 * kk][1]);
                    ap[1] = fa_pack(s[2 * kk][2], s[2 * kk][3]);
                    ap[2] = fa_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                    ap[3] = fa_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
                    as[0] = fa_pack(dp[2 * kk][0], dp[2 * kk][1]);
                    as[1] = fa_pack(dp[2 * kk][2], dp[2 * kk][3]);
                    as[2] = fa_pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
                    as[3] = fa_pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
                    const int qb = qc * QC + kk * 16;
                    if (DQ) {
                        unsigned short* prow = sP + (warp * 16 + g) * SP + qb + 2 * tig;
                        *reinterpret_cast<unsigned*>(prow) = as[0];
                        *reinterpret_cast<unsigned*>(prow + 8 * SP) = as[1];
                        *reinterpret_cast<unsigned*>(prow + 8) = as[2];
                        *reinterpret_cast<unsigned*>(prow + 8 * SP + 8) = as[3];
                    }
#pragma unroll
                    for (int nd = 0; nd < D / 16; ++nd) {
                        unsigned b[4];
                        fa_ldsm_t(b, fa_a_addr(sO, S, qb, nd * 16, lane));
                        fa_mma(dv[2 * nd], ap, b);
                        fa_mma(dv[2 * nd + 1], ap, b + 2);
                        fa_ldsm_t(b, fa_a_addr(sQ, S, qb, nd * 16, lane));
                        fa_mma(dk[2 * nd], as, b);
                        fa_mma(dk[2 * nd + 1], as, b + 2);
                    }
                }
            }
            if (!DQ) continue;
            __syncthreads();  // dS^T complete
            // dQ [warp's 16 queries, D] += scale dS K, in chunks of 64 columns.
            const int qa = q0 + warp * 16 + g;
#pragma unroll
            for (int dc = 0; dc < D / 64; ++dc) {
                float acc[8][4];
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < FA_TILE / 16; ++kk) {
                    unsigned a[4];
                    fa_ldsm_t(a, fa_at_addr(sP, SP, kk * 16, warp * 16, lane));
#pragma unroll
                    for (int nd = 0; nd < 4; ++nd) {
                        unsigned b[4];
                        fa_ldsm_t(b, fa_a_addr(sK, S, kk * 16, dc * 64 + nd * 16, lane));
                        fa_mma(acc[2 * nd], a, b);
                        fa_mma(acc[2 * nd + 1], a, b + 2);
                    }
                }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int q = qa + r * 8;
                    if (q < L) {
                        float* dq = dqacc + (long)(start + q) * ldq + (long)hq * D + dc * 64 + 2 * tig;
#pragma unroll
                        for (int i = 0; i < 8; ++i)
                            fa_atomic_add2(dq + i * 8, acc[i][2 * r] * scale,
                                           acc[i][2 * r + 1] * scale);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = k0 + warp * 16 + g + r * 8;
        if (key < L) {
            E* row = dqkv + (long)(start + key) * W + 2 * tig;
            E* dkr = row + (long)(H + hk) * D;
            E* dvr = row + (long)(H + Hkv + hk) * D;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                fa_st2(dkr + i * 8, dk[i][2 * r] * scale, dk[i][2 * r + 1] * scale);
                fa_st2(dvr + i * 8, dv[i][2 * r], dv[i][2 * r + 1]);
            }
        }
    }
}

// MINB: blocks per SM the registers must allow (3 at D = 64: without the bound the pipelined
// bf16 kernel takes 173 registers, which fits only 2).
#define FA_BWD_ENTRY(NAME, D, E, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, MINB)                            \
        NAME(E* dqkv, float* dqacc, long long ldq, const E* dout, const E* qkv,               \
             const float* lse, const float* dsum, const int4* items, int T, int H, int Hkv,   \
             float scale, float scale_log2) {                                                 \
        flash_bwd<D, E, DQ>(dqkv, dqacc, ldq, dout, qkv, lse, dsum, items, T, H, Hkv, scale,  \
                            scale_log2);                                                      \
    }
#define DQ true
FA_BWD_ENTRY(flash_bwd_d64, 64, float, 3)
FA_BWD_ENTRY(flash_bwd_d128, 128, float, 2)
FA_BWD_ENTRY(flash_bwd_d64_bf16, 64, __nv_bfloat16, 3)
FA_BWD_ENTRY(flash_bwd_d128_bf16, 128, __nv_bfloat16, 2)
#undef DQ
#define DQ false
FA_BWD_ENTRY(flash_bwd_dkdv_d64, 64, float, 3)
FA_BWD_ENTRY(flash_bwd_dkdv_d128, 128, float, 2)
FA_BWD_ENTRY(flash_bwd_dkdv_d64_bf16, 64, __nv_bfloat16, 3)
FA_BWD_ENTRY(flash_bwd_dkdv_d128_bf16, 128, __nv_bfloat16, 2)
#undef DQ

// dQ without atomics: one block per (document, 64-row query tile, query head), as the forward;
// over the key tiles kt = 0..=qt (the same double-buffered K/V pipeline):
//   S = Q K^T, dP = dO V^T, P = exp2(S scale log2 e - lse log2 e) (causal mask on the diagonal
//   tile), dS = P (dP - dsum), dQ += dS K;  finally dqkv's q columns = scale dQ.
template <int D, typename E>
__device__ __forceinline__ void flash_bwd_dq(E* __restrict__ dqkv, const E* __restrict__ dout,
                                             const E* __restrict__ qkv,
                                             const float* __restrict__ lse,
                                             const float* __restrict__ dsum,
                                             const int4* __restrict__ items, int T, int H,
                                             int Hkv, float scale, float scale_log2) {
    constexpr int S = D + 8;
    constexpr int NB = FaPipe<D>::FWD;
    extern __shared__ __align__(16) unsigned short fa_smem[];
    unsigned short* sQ = fa_smem;
    unsigned short* sO = sQ + FA_TILE * S;   // dO
    unsigned short* sKV = sO + FA_TILE * S;  // NB (K, V) tile pairs
    const int4 it = items[blockIdx.x / H];
    const int h = blockIdx.x % H;
    const int start = it.x, L = it.y, qt = it.z;
    const int hk = h / (H / Hkv);
    const long W = (long)(H + 2 * Hkv) * D, HD = (long)H * D;
    const int q0 = qt * FA_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const E* kb = qkv + (long)start * W + (long)(H + hk) * D;
    const E* vb = qkv + (long)start * W + (long)(H + Hkv + hk) * D;

    fa_tile_start<D, 8>(sQ, qkv + (long)(start + q0) * W + (long)h * D, W, L - q0);
    fa_tile_start<D, 8>(sO, dout + (long)(start + q0) * HD + (long)h * D, HD, L - q0);
    fa_tile_start<D, 8>(sKV, kb, W, L);
    fa_tile_start<D, 8>(sKV + FA_TILE * S, vb, W, L);
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
    float dq[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

    for (int kt = 0; kt <= qt; ++kt) {
        const int k0 = kt * FA_TILE;
        __syncthreads();  // the buffer about to be refilled is no longer read
        unsigned short* sK = fa_kv_step<D, NB>(sKV, kb, vb, W, kt, qt, L);
        unsigned short* sV = sK + FA_TILE * S;
        __syncthreads();

        // S = Q K^T and dP = dO V^T for the warp's 16 queries x 64 keys.
        float s[8][4], dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned aq[4], ao[4];
            fa_ldsm(aq, fa_a_addr(sQ, S, warp * 16, kk * 16, lane));
            fa_ldsm(ao, fa_a_addr(sO, S, warp * 16, kk * 16, lane));
#pragma unroll
            for (int nb = 0; nb < 4; ++nb) {
                unsigned b[4];
                fa_ldsm(b, fa_b_addr(sK, S, nb * 16, kk * 16, lane));
                fa_mma(s[2 * nb], aq, b);
                fa_mma(s[2 * nb + 1], aq, b + 2);
                fa_ldsm(b, fa_b_addr(sV, S, nb * 16, kk * 16, lane));
                fa_mma(dp[2 * nb], ao, b);
                fa_mma(dp[2 * nb + 1], ao, b + 2);
            }
        }
        const bool diag = kt == qt;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int q = q0 + warp * 16 + g + r * 8;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = k0 + nb * 8 + 2 * tig + e;
                    float p = exp2f(s[nb][2 * r + e] * scale_log2 - lse2[r]);
                    if ((diag && key > q) || q >= L) p = 0.f;
                    s[nb][2 * r + e] = p * (dp[nb][2 * r + e] - dsr[r]);  // dS
                }
        }
        // dQ += dS K: dS (C fragments of two n-blocks) is the A fragment of one k-step.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned a[4];
            a[0] = fa_pack(s[2 * kk][0], s[2 * kk][1]);
            a[1] = fa_pack(s[2 * kk][2], s[2 * kk][3]);
            a[2] = fa_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = fa_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int nd = 0; nd < D / 16; ++nd) {
                unsigned b[4];
                fa_ldsm_t(b, fa_a_addr(sK, S, kk * 16, nd * 16, lane));
                fa_mma(dq[2 * nd], a, b);
                fa_mma(dq[2 * nd + 1], a, b + 2);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q0 + warp * 16 + g + r * 8;
        if (q < L) {
            E* row = dqkv + (long)(start + q) * W + (long)h * D + 2 * tig;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                fa_st2(row + i * 8, dq[i][2 * r] * scale, dq[i][2 * r + 1] * scale);
        }
    }
}

#define FA_DQ_ENTRY(NAME, D, E, MINB)                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, MINB)                            \
        NAME(E* dqkv, const E* dout, const E* qkv, const float* lse, const float* dsum,        \
             const int4* items, int T, int H, int Hkv, float scale, float scale_log2) {        \
        flash_bwd_dq<D, E>(dqkv, dout, qkv, lse, dsum, items, T, H, Hkv, scale, scale_log2);  \
    }
FA_DQ_ENTRY(flash_bwd_dq_d64, 64, float, 3)
FA_DQ_ENTRY(flash_bwd_dq_d128, 128, float, 2)
FA_DQ_ENTRY(flash_bwd_dq_d64_bf16, 64, __nv_bfloat16, 3)
FA_DQ_ENTRY(flash_bwd_dq_d128_bf16, 128, __nv_bfloat16, 2)
