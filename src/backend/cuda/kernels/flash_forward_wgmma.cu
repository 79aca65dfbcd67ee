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
// warpgroup and runs 64xN products asynchronously, so the softmax of one key tile overlaps
// the P V product of the previous one (FlashAttention-3's intra-warpgroup pipelining): V lags
// K by a step, hence 2 K and 3 V tile buffers.

#if FA_WG
template <int D>
__device__ __forceinline__ void flash_fwd_wg(__nv_bfloat16* __restrict__ out,
                                             float* __restrict__ lse,
                                             const __nv_bfloat16* __restrict__ qkv,
                                             const int4* __restrict__ items, int T, int H,
                                             int Hkv, float scale_log2) {
    constexpr int TD = FA_TILE * D;  // elements of one tile
    extern __shared__ __align__(16) unsigned short fa_smem_wg[];
    unsigned short* sQ = fa_smem_base(fa_smem_wg);
    unsigned short* kring = sQ + TD;     // K tiles: 2 buffers
    unsigned short* vring = kring + 2 * TD;  // V tiles: 3 buffers (V lags K by one step)
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
    fa_tile_start_sw<D>(kring, kb, W, L);
    fa_tile_start_sw<D>(vring, vb, W, L);
    fa_async_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f};

    // Tile kt's K and V in shared memory, tile kt + 1's copies started. The first barrier: every
    // warp is past step kt - 1, so K_{kt-1} and V_{kt-2} (the buffers refilled) are free.
    auto tiles_ready = [&](int kt) {
        __syncthreads();
        if (kt < qt) {
            const long next = (long)(kt + 1) * FA_TILE * W;
            const int valid = L - (kt + 1) * FA_TILE;
            fa_tile_start_sw<D>(kring + ((kt + 1) & 1) * TD, kb + next, W, valid);
            fa_tile_start_sw<D>(vring + ((kt + 1) % 3) * TD, vb + next, W, valid);
            fa_async_commit();
            fa_async_wait<1>();  // tile kt's copies are done, tile kt + 1's in flight
        } else {
            fa_async_wait<0>();
        }
        fa_proxy_fence();
        __syncthreads();
    };
    // S = Q K_kt^T (s[4 nb + e]: the m16n8 C fragment of key block nb of this warp's rows), one
    // commit group; the caller has fenced.
    auto issue_s = [&](float* s, int kt) {
        const unsigned short* sK = kring + (kt & 1) * TD;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int off = (kk >> 2) * FA_TILE * 64 + (kk & 3) * 16;
            fa_wgmma_ss_n64(s, fa_desc(sQ + off, 16), fa_desc(sK + off, 16), kk);
        }
        fa_wg_commit();
    };
    // O += P V_kt (P as bf16 A fragments), one commit group; the caller has fenced.
    auto issue_pv = [&](const unsigned (*p)[4], int kt) {
        const unsigned short* sV = vring + (kt % 3) * TD;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fa_wgmma_rs_d<D>(o, p[kk], sV + kk * 16 * 64);
        fa_wg_commit();
    };
    // Online softmax of S_kt (exp2 domain, causal mask on the diagonal tile): m, l updated,
    // P (f32) into e, alpha[r] = the factor O's row r must be rescaled by.
    auto softmax = [&](const float* s, int kt, float* e, float* alpha) {
        const int k0 = kt * FA_TILE;
        const bool diag = kt == qt;
        // The scaled, masked score of accumulator i (row r = (i / 2) % 2). s is only read: its
        // registers are a wgmma's, and ptxas serializes wgmmas around other writes to them.
        auto score = [&](int i, int q) {
            const float x = s[i] * scale_log2;
            return diag && k0 + (i / 4) * 8 + 2 * tig + (i & 1) > q ? -FA_INF : x;
        };
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int q = q0 + warp * 16 + g + r * 8;
            float mx = -FA_INF;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int c = 0; c < 2; ++c) mx = fmaxf(mx, score(4 * nb + 2 * r + c, q));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mn = fmaxf(m[r], mx);  // finite: key 0 is in tile 0 of every row
            alpha[r] = exp2f(m[r] - mn);
            m[r] = mn;
            float sum = 0.f;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int i = 4 * nb + 2 * r + c;
                    e[i] = exp2f(score(i, q) - mn);
                    sum += e[i];
                }
            l[r] = l[r] * alpha[r] + sum;
        }
    };
    // P as the bf16 A fragments of the P V product's four k-steps.
    auto pack = [&](const float* e, unsigned (*p)[4]) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int i = 0; i < 4; ++i) p[kk][i] = fa_pack(e[8 * kk + 2 * i], e[8 * kk + 2 * i + 1]);
    };

    // Step 0: S_0 and its softmax (O is still zero). Steps kt >= 1: S_kt and O += P_{kt-1}
    // V_{kt-1} are issued together; the softmax of S_kt runs while the P V product is still on
    // the tensor cores; once it is done O is rescaled and P_kt packed into the registers the
    // product read (writing them earlier would make ptxas serialize the two). The last P V
    // follows the loop.
    unsigned p[4][4];
    float alpha[2];
    {
        float s[32], e[32];
        tiles_ready(0);
        fa_wg_fence();
        issue_s(s, 0);
        fa_wg_wait<0>();
        fa_pin<32>(s);
        softmax(s, 0, e, alpha);
        pack(e, p);
    }
    for (int kt = 1; kt <= qt; ++kt) {
        float s[32], e[32];
        tiles_ready(kt);
        fa_pin<D / 2>(o);
        fa_wg_fence();
        issue_s(s, kt);
        issue_pv(p, kt - 1);
        fa_wg_wait<1>();  // S_kt is done (groups complete in order); P V may still run
        fa_pin<32>(s);
        softmax(s, kt, e, alpha);
        fa_wg_wait<0>();
        fa_pin<D / 2>(o);
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                o[4 * i + 2 * r] *= alpha[r];
                o[4 * i + 2 * r + 1] *= alpha[r];
            }
        pack(e, p);
    }
    fa_pin<D / 2>(o);
    fa_wg_fence();
    issue_pv(p, qt);
    fa_wg_wait<0>();
    fa_pin<D / 2>(o);
    const long HD = (long)H * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lr = l[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        const int q = q0 + warp * 16 + g + r * 8;
        if (q < L) {
            const float inv = 1.f / lr;
            __nv_bfloat16* orow = out + (long)(start + q) * HD + (long)h * D + 2 * tig;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                fa_st2(orow + i * 8, o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
            if (tig == 0) lse[(long)h * T + start + q] = (m[r] + log2f(lr)) * FA_LN2;
        }
    }
}
#endif  // FA_WG

#if FA_WG
#define FA_FWD_WG_BODY(D) flash_fwd_wg<D>(out, lse, qkv, items, T, H, Hkv, scale_log2);
#else
#define FA_FWD_WG_BODY(D) asm volatile("trap;");
#endif
#define FA_FWD_WG_ENTRY(NAME, D)                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                  \
        NAME(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, const int4* items,     \
             int T, int H, int Hkv, float scale_log2) {                                       \
        FA_FWD_WG_BODY(D)                                                                     \
    }
FA_FWD_WG_ENTRY(flash_fwd_wg_d64_bf16, 64)
FA_FWD_WG_ENTRY(flash_fwd_wg_d128_bf16, 128)
