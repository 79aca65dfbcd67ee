// Varlen causal flash attention, forward (shared layouts, work lists and helpers in
// flash_common.cuh, pasted in front by compile.rs).
//
// Item = (document, 64-row query tile qt), per query head; loops over key tiles 0..=qt (only
//   the diagonal tile is masked), online softmax in registers (exp2 domain); out and lse
//   (natural log) are written once.

template <int D, typename E>
__device__ __forceinline__ void flash_fwd(E* __restrict__ out, float* __restrict__ lse,
                                          const E* __restrict__ qkv,
                                          const int4* __restrict__ items, int T, int H, int Hkv,
                                          float scale_log2) {
    constexpr int S = D + 8;
    constexpr int NB = FaPipe<D>::FWD;
    extern __shared__ __align__(16) unsigned short fa_smem[];
    unsigned short* sQ = fa_smem;  // then NB (K, V) tile pairs
    const int4 it = items[blockIdx.x / H];
    const int h = blockIdx.x % H;
    const int start = it.x, L = it.y, qt = it.z;
    const int hk = h / (H / Hkv);
    const long W = (long)(H + 2 * Hkv) * D;
    const int q0 = qt * FA_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;

    const E* kb = qkv + (long)start * W + (long)(H + hk) * D;
    const E* vb = qkv + (long)start * W + (long)(H + Hkv + hk) * D;
    // Q and the first K, V tiles; later tiles are started one iteration ahead.
    fa_tile_start<D, 8>(sQ, qkv + (long)(start + q0) * W + (long)h * D, W, L - q0);
    fa_tile_start<D, 8>(sQ + FA_TILE * S, kb, W, L);
    fa_tile_start<D, 8>(sQ + 2 * FA_TILE * S, vb, W, L);
    fa_async_commit();

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f};

    for (int kt = 0; kt <= qt; ++kt) {
        const int k0 = kt * FA_TILE;
        __syncthreads();  // the buffer about to be refilled is no longer read
        unsigned short* sK = fa_kv_step<D, NB>(sQ + FA_TILE * S, kb, vb, W, kt, qt, L);
        unsigned short* sV = sK + FA_TILE * S;
        __syncthreads();

        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[4];
            fa_ldsm(a, fa_a_addr(sQ, S, warp * 16, kk * 16, lane));
#pragma unroll
            for (int nb = 0; nb < 4; ++nb) {
                unsigned b[4];
                fa_ldsm(b, fa_b_addr(sK, S, nb * 16, kk * 16, lane));
                fa_mma(s[2 * nb], a, b);
                fa_mma(s[2 * nb + 1], a, b + 2);
            }
        }
        const bool diag = kt == qt;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int q = q0 + warp * 16 + g + r * 8;
            float mx = -FA_INF;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = s[nb][2 * r + e] * scale_log2;
                    if (diag && k0 + nb * 8 + 2 * tig + e > q) x = -FA_INF;
                    s[nb][2 * r + e] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mn = fmaxf(m[r], mx);  // finite: key 0 is in tile 0 of every row
            const float alpha = exp2f(m[r] - mn);
            m[r] = mn;
            float sum = 0.f;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float p = exp2f(s[nb][2 * r + e] - mn);
                    s[nb][2 * r + e] = p;
                    sum += p;
                }
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[i][2 * r] *= alpha;
                o[i][2 * r + 1] *= alpha;
            }
        }
        // O += P V: P (C fragments of two n-blocks) is the A fragment of one k-step.
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
                fa_ldsm_t(b, fa_a_addr(sV, S, kk * 16, nd * 16, lane));
                fa_mma(o[2 * nd], a, b);
                fa_mma(o[2 * nd + 1], a, b + 2);
            }
        }
    }
    const long HD = (long)H * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        const int q = q0 + warp * 16 + g + r * 8;
        if (q < L) {
            const float inv = 1.f / lr;
            E* orow = out + (long)(start + q) * HD + (long)h * D + 2 * tig;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                fa_st2(orow + i * 8, o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
            if (tig == 0) lse[(long)h * T + start + q] = (m[r] + log2f(lr)) * FA_LN2;
        }
    }
}

#define FA_FWD_ENTRY(NAME, D, E)                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                  \
        NAME(E* out, float* lse, const E* qkv, const int4* items, int T, int H, int Hkv,      \
             float scale_log2) {                                                              \
        flash_fwd<D, E>(out, lse, qkv, items, T, H, Hkv, scale_log2);                          \
    }
FA_FWD_ENTRY(flash_fwd_d64, 64, float)
FA_FWD_ENTRY(flash_fwd_d128, 128, float)
FA_FWD_ENTRY(flash_fwd_d64_bf16, 64, __nv_bfloat16)
FA_FWD_ENTRY(flash_fwd_d128_bf16, 128, __nv_bfloat16)
