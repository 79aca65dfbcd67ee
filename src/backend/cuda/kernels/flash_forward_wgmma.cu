// Varlen causal flash attention, forward, on Hopper's warpgroup MMA (sm_90a `wgmma`; helpers
// and the shared-memory layout in flash_wgmma.cuh, pasted in front by compile.rs): the
// algorithm of flash_forward.cu (same items, same online softmax in the exp2 domain, same
// outputs) with both products issued by the whole 4-warp block as one warpgroup.
//
//   S = Q K^T:  wgmma m64n64k16, A = Q and B = K straight from shared memory (descriptors),
//               D / 16 steps over the head dim.
//   O += P V:   wgmma m64nDk16, A = P from registers (the S accumulator of a warp's 16 rows is,
//               rounded to bf16, the A fragment: the layouts of m16n8k16 and of one warp's
//               slice of m64nN coincide), B = V from shared memory, transposed (MN-major).
// Why: with mma.sync every warp reloads the whole K and V tiles through ldmatrix (4x the
// shared-memory traffic of one read) and issues 16x8 MMAs; wgmma reads each B tile once per
// warpgroup and runs 64xN products asynchronously.

#if FA_WG
template <int D>
__device__ __forceinline__ void flash_fwd_wg(__nv_bfloat16* __restrict__ out,
                                             float* __restrict__ lse,
                                             const __nv_bfloat16* __restrict__ qkv,
                                             const int4* __restrict__ items, int T, int H,
                                             int Hkv, float scale_log2) {
    constexpr int TD = FA_TILE * D;  // elements of one tile
    // D = 128: two K tiles and one V tile (4 tiles with Q, 65 KB: three blocks per SM) instead
    // of two (K, V) pairs (5 tiles, 81 KB: two blocks per SM); V's copy then overlaps only S and
    // the softmax of its own tile.
    constexpr bool VSINGLE = D == 128;
    extern __shared__ __align__(16) unsigned short fa_smem_wg[];
    unsigned short* sQ = fa_smem_base(fa_smem_wg);
    unsigned short* kv = sQ + TD;  // two (K, V) tile pairs (VSINGLE: K, K, V)
    const int4 it = items[blockIdx.x / H];
    const int h = blockIdx.x % H;
    const int start = it.x, L = it.y, qt = it.z;
    const int hk = h / (H / Hkv);
    const long W = (long)(H + 2 * Hkv) * D;
    const int q0 = qt * FA_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;

    const __nv_bfloat16* kb = qkv + (long)start * W + (long)(H + hk) * D;
    const __nv_bfloat16* vb = qkv + (long)start * W + (long)(H + Hkv + hk) * D;
    fa_tile_start_sw<D>(sQ, qkv + (long)(start + q0) * W + (long)h * D, W, L - q0);
    fa_tile_start_sw<D>(kv, kb, W, L);
    if constexpr (!VSINGLE) fa_tile_start_sw<D>(kv + TD, vb, W, L);
    fa_async_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f};

    for (int kt = 0; kt <= qt; ++kt) {
        const int k0 = kt * FA_TILE;
        unsigned short *sK, *sV;
        if constexpr (VSINGLE) {
            // K double-buffered (kv, kv + TD), one V tile after them. Every warp is past the
            // previous tile's S and P V, so K's other buffer and V are free: start V of this
            // tile and K of the next; V is waited for just before P V.
            sK = kv + (kt & 1) * TD;
            sV = kv + 2 * TD;
            fa_async_wait<0>();  // K of this tile (and Q, at kt = 0)
            fa_proxy_fence();
            __syncthreads();
            fa_tile_start_sw<D>(sV, vb + (long)k0 * W, W, L - k0);
            fa_async_commit();
            if (kt < qt)
                fa_tile_start_sw<D>(kv + ((kt + 1) & 1) * TD, kb + (long)(k0 + FA_TILE) * W, W,
                                    L - k0 - FA_TILE);
            fa_async_commit();  // possibly empty: the count of groups stays the same
        } else {
            sK = fa_kv_step_sw<D>(kv, kb, vb, W, kt, qt, L);
            sV = sK + TD;
        }

        // S = Q K^T (s[4 nb + e]: the m16n8 C fragment of key block nb of this warp's rows).
        float s[32];
        fa_wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int off = (kk >> 2) * FA_TILE * 64 + (kk & 3) * 16;
            fa_wgmma_ss_n64(s, fa_desc(sQ + off, 16), fa_desc(sK + off, 16), kk);
        }
        fa_wg_commit();
        fa_wg_wait0();
        fa_pin<32>(s);

        // Mask keys past the query on the diagonal tile only; then, with c = scale log2 e,
        // m' = max(m, c max s), p = 2^(c s - m') (one FFMA and one EX2 per score).
        if (kt == qt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int q = q0 + warp * 16 + g + r * 8;
#pragma unroll
                for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (k0 + nb * 8 + 2 * tig + e > q) s[4 * nb + 2 * r + e] = -FA_INF;
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -FA_INF;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
                mx = fmaxf(mx, fmaxf(s[4 * nb + 2 * r], s[4 * nb + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mn = fmaxf(m[r], mx * scale_log2);  // finite: key 0 is in tile 0
            alpha[r] = exp2f(m[r] - mn);
            m[r] = mn;
            float sum = 0.f;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float p = exp2f(fmaf(s[4 * nb + 2 * r + e], scale_log2, -mn));
                    s[4 * nb + 2 * r + e] = p;
                    sum += p;
                }
            l[r] = l[r] * alpha[r] + sum;
        }
        // O's rows times alpha, skipped when no row of the warp has a new maximum.
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[4 * i] *= alpha[0];
                o[4 * i + 1] *= alpha[0];
                o[4 * i + 2] *= alpha[1];
                o[4 * i + 3] *= alpha[1];
            }
        }
        if constexpr (VSINGLE) {
            fa_async_wait<1>();  // V of this tile (the next K may still be in flight)
            fa_proxy_fence();
            __syncthreads();
        }
        // O += P V, one k16 step per 16 keys.
        unsigned a[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            a[kk][0] = fa_pack(s[8 * kk + 0], s[8 * kk + 1]);
            a[kk][1] = fa_pack(s[8 * kk + 2], s[8 * kk + 3]);
            a[kk][2] = fa_pack(s[8 * kk + 4], s[8 * kk + 5]);
            a[kk][3] = fa_pack(s[8 * kk + 6], s[8 * kk + 7]);
        }
        fa_pin<D / 2>(o);
        fa_wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fa_wgmma_rs_d<D>(o, a[kk], sV + kk * 16 * 64);
        fa_wg_commit();
        fa_wg_wait0();
        fa_pin<D / 2>(o);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q0 + warp * 16 + g + r * 8;
        const long tok = start + q;
        fa_store_o_row<D>(o, r, m[r], l[r], q < L, out + tok * H * D + (long)h * D,
                          lse + (long)h * T + tok, tig);
    }
}
#endif  // FA_WG

#if FA_WG
#define FA_FWD_WG_BODY(D) flash_fwd_wg<D>(out, lse, qkv, items, T, H, Hkv, scale_log2);
#else
#define FA_FWD_WG_BODY(D) asm volatile("trap;");
#endif
#define FA_FWD_WG_ENTRY(NAME, D, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, MINB)                            \
        NAME(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, const int4* items,     \
             int T, int H, int Hkv, float scale_log2) {                                       \
        FA_FWD_WG_BODY(D)                                                                     \
    }
FA_FWD_WG_ENTRY(flash_fwd_wg_d64_bf16, 64, 1)
FA_FWD_WG_ENTRY(flash_fwd_wg_d128_bf16, 128, 3)
