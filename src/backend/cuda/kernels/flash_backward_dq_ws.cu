// Varlen causal flash attention, backward dQ and dsum, warp-specialised for Hopper (sm_90a),
// D = 128: the math and output of flash_bwd_dq_wg (flash_backward_wgmma.cu) organised as
// flash_forward_ws.cu organises the forward: two consumer warpgroups (128 query rows) share
// every K and V tile a producer warp copies by TMA (flash_ws.cuh). It runs before the dK/dV
// kernel (flash_backward_ws.cu) and computes dsum = rowsum(dO * O) from the O and dO tiles the
// producer copies with Q, storing it for dK/dV: no flash_bwd_pre pass over dO and O (about 6 %
// of the backward at 65536 tokens).
//
// Per unit (128-row query tile, query head), per consumer c (rows 64 c .. 64 c + 63), over key
// tiles 0 ..= its diagonal:
//   S = Q K^T, dP = dO V^T                wgmma, both operands from shared memory
//   dS = P (dP - dsum), P = exp2(S scale log2 e - lse log2 e) (mask on the diagonal tile)
//   dQ += dS K                            wgmma, A = dS from registers, B = K (MN-major)
// The products of tile k (S, dP) are issued with dQ's of tile k - 1, so the element-wise work
// of tile k runs while the tensor cores do dQ of tile k - 1. dQ is scaled by 1 / sqrt(D) and,
// with `rope`, rotated back by RoPE, then rounded to bf16 once. lse is read per row from
// global memory while Q, dO and O copy.
// Rows past the document (the TMA reads the next document's rows there) compute garbage that
// only their own dQ rows see, and those are not stored.
// Shared memory: Q, dO and O (two 64-row tiles each, one buffer) and FW_BSTAGES (K, V)
// stages: 224 KB.

#if FA_WG
#define FW_BSTAGES 4

// S = Q K^T and dP = dO V^T of one 64-key tile, issued (not waited for).
template <int D>
__device__ __forceinline__ void fw_issue_sdp(float* s, float* dp, const unsigned short* sQ,
                                             const unsigned short* sO, const unsigned short* sK,
                                             const unsigned short* sV) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int off = (kk >> 2) * FA_TILE * 64 + (kk & 3) * 16;
        fa_wgmma_ss_n64(s, fa_desc(sQ + off, 16), fa_desc(sK + off, 16), kk);
        fa_wgmma_ss_n64(dp, fa_desc(sO + off, 16), fa_desc(sV + off, 16), kk);
    }
}

// dS = P (dP - dsum) into A fragments (bf16) of the dQ product.
__device__ __forceinline__ void fw_ds(float* s, const float* dp, float scale_log2,
                                      const float* lse2, const float* dsr, unsigned (*a)[4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = 4 * nb + 2 * r + e;
                const float p = exp2f(fmaf(s[i], scale_log2, -lse2[r]));
                s[i] = p * (dp[i] - dsr[r]);
            }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) a[kk][i] = fa_pack(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
}

template <int D>
__device__ __forceinline__ void fw_issue_dq(float* dq, unsigned (*a)[4], const unsigned short* sK) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) fa_wgmma_rs_d<D>(dq, a[kk], sK + kk * 16 * 64);
}

template <int D>
__device__ __forceinline__ void flash_bwd_dq_ws(const FaTmap* map_qkv, const FaTmap* map_do,
                                                const FaTmap* map_out,
                                                __nv_bfloat16* __restrict__ dqkv,
                                                const float* __restrict__ lse,
                                                float* __restrict__ dsum,
                                                const int4* __restrict__ items,
                                                const int* __restrict__ sched, int T, int H,
                                                int Hkv, float scale, float scale_log2,
                                                const float2* rope) {
    constexpr int TD = FA_TILE * D;
    constexpr int STAGES = FW_BSTAGES;
    constexpr unsigned TILE_BYTES = TD * 2;
    extern __shared__ __align__(16) unsigned short fa_smem_wg[];
    __shared__ unsigned long long full_k[STAGES], full_v[STAGES], empty[STAGES];
    __shared__ unsigned long long q_full, q_empty;
    unsigned short* sQ = fa_smem_base(fa_smem_wg);  // Q: two 64-row tiles
    unsigned short* sO = sQ + 2 * TD;               // dO: two 64-row tiles
    unsigned short* sOut = sO + 2 * TD;             // O: two 64-row tiles
    unsigned short* sK = sOut + 2 * TD;             // STAGES tiles
    unsigned short* sV = sK + STAGES * TD;          // STAGES tiles
    const int wg = threadIdx.x >> 7;
    const int first = sched[blockIdx.x], end = sched[blockIdx.x + 1];
    const int G = H / Hkv;
    const long W = (long)(H + 2 * Hkv) * D;

    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; ++i) {
            fw_bar_init(&full_k[i], 1);
            fw_bar_init(&full_v[i], 1);
            fw_bar_init(&empty[i], 8);
        }
        fw_bar_init(&q_full, 1);
        fw_bar_init(&q_empty, 8);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x != 0) return;
        int n = 0;
        for (int u = first; u < end; ++u) {
            const FwUnit unit = fw_unit(sched, items, u, H);
            const int4 it = unit.item;
            const int h = unit.head, hk = h / G;
            const int start = it.x, L = it.y, q0 = it.z * 2 * FA_TILE;
            const int last = 2 * it.z + (q0 + FA_TILE < L ? 1 : 0);
            if (u > first) fw_bar_wait(&q_empty, (u - first - 1) & 1);
            fw_bar_expect(&q_full, 6 * TILE_BYTES);
            fw_tma_tile<D>(sQ, map_qkv, h * D, start + q0, &q_full);
            fw_tma_tile<D>(sQ + TD, map_qkv, h * D, start + q0 + FA_TILE, &q_full);
            fw_tma_tile<D>(sO, map_do, h * D, start + q0, &q_full);
            fw_tma_tile<D>(sO + TD, map_do, h * D, start + q0 + FA_TILE, &q_full);
            fw_tma_tile<D>(sOut, map_out, h * D, start + q0, &q_full);
            fw_tma_tile<D>(sOut + TD, map_out, h * D, start + q0 + FA_TILE, &q_full);
            for (int kt = 0; kt <= last; ++kt, ++n)
                fw_load_kv<D>(sK, sV, full_k, full_v, empty, n, STAGES, map_qkv, (H + hk) * D,
                              (H + Hkv + hk) * D, start + kt * FA_TILE);
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int c = wg - 1;
    const int t = threadIdx.x & 127;
    const int warp = t >> 5, lane = t & 31, g = lane >> 2, tig = lane & 3;
    const unsigned short* myQ = sQ + c * TD;
    const unsigned short* myO = sO + c * TD;
    int n = 0;
    for (int u = first; u < end; ++u) {
        const FwUnit unit = fw_unit(sched, items, u, H);
        const int4 it = unit.item;
        const int h = unit.head;
        const int start = it.x, L = it.y, q0 = it.z * 2 * FA_TILE;
        const int last = 2 * it.z + (q0 + FA_TILE < L ? 1 : 0);
        const int rows0 = q0 + c * FA_TILE;
        const int mine = rows0 < L ? 2 * it.z + c : -1;
        const int q = rows0 + warp * 16 + g;  // rows q, q + 8
        float lse2[2], dsr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
            lse2[r] = q + 8 * r < L ? lse[(long)h * T + start + q + 8 * r] * FA_LOG2E : 0.f;
        fw_bar_wait(&q_full, (u - first) & 1);
        // dsum of this thread's rows q, q + 8: lanes tig = 0..3 of a row each sum D / 4
        // columns of dO * O (16-byte chunks of the swizzled tiles), then a shuffle over tig.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = warp * 16 + g + 8 * r;
            float acc = 0.f;
#pragma unroll
            for (int j = 0; j < D / 32; ++j) {
                const int col = (tig + 4 * j) * 8;
                const uint4 a = *reinterpret_cast<const uint4*>(myO + fa_sw(row, col));
                const uint4 b =
                    *reinterpret_cast<const uint4*>(sOut + c * TD + fa_sw(row, col));
                const unsigned av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float2 x =
                        __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&av[i]));
                    const float2 y =
                        __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bv[i]));
                    acc = fmaf(x.x, y.x, fmaf(x.y, y.y, acc));
                }
            }
            acc += __shfl_xor_sync(0xffffffffu, acc, 1);
            acc += __shfl_xor_sync(0xffffffffu, acc, 2);
            const bool ok = q + 8 * r < L;
            dsr[r] = ok ? acc : 0.f;
            if (ok && tig == 0) dsum[(long)h * T + start + q + 8 * r] = acc;
        }

        float dq[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
        float s[32], dp[32];
        unsigned a[4][4], a2[4][4];
        int kt = 0;
        if (mine >= 0) {
            fw_bar_wait(&full_k[n % STAGES], (n / STAGES) & 1);
            fw_bar_wait(&full_v[n % STAGES], (n / STAGES) & 1);
            fa_wg_fence();
            fw_issue_sdp<D>(s, dp, myQ, myO, sK + (n % STAGES) * TD, sV + (n % STAGES) * TD);
            fa_wg_commit();
            fa_wg_wait0();
            fa_pin<32>(s);
            fa_pin<32>(dp);
            if (mine == 0) {
                fw_warp_arrive(&q_empty, lane);
                fw_mask(s, 0, q, tig);
            }
            fw_ds(s, dp, scale_log2, lse2, dsr, a);
            // Tiles 1 ..= mine: S, dP of k with dQ += dS K of k - 1; dS alternates between two
            // register sets, as P does in the forward.
            auto step = [&](int k, unsigned (&ain)[4][4], unsigned (&aout)[4][4]) {
                const int cur = n + k, prev = cur - 1;
                fw_bar_wait(&full_k[cur % STAGES], (cur / STAGES) & 1);
                fw_bar_wait(&full_v[cur % STAGES], (cur / STAGES) & 1);
                fa_pin<D / 2>(dq);
                fa_wg_fence();
                fw_issue_sdp<D>(s, dp, myQ, myO, sK + (cur % STAGES) * TD,
                                sV + (cur % STAGES) * TD);
                fa_wg_commit();
                fw_issue_dq<D>(dq, ain, sK + (prev % STAGES) * TD);
                fa_wg_commit();
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                fa_pin<32>(s);
                fa_pin<32>(dp);
                if (k == mine) {
                    fw_warp_arrive(&q_empty, lane);
                    fw_mask(s, k * FA_TILE, q, tig);
                }
                fw_ds(s, dp, scale_log2, lse2, dsr, aout);
                fa_wg_wait0();
                fa_pin<D / 2>(dq);
                fw_pin_p(ain);
                fw_warp_arrive(&empty[prev % STAGES], lane);
            };
            auto last_dq = [&](unsigned (&ain)[4][4]) {
                const int lt = n + mine;
                fa_pin<D / 2>(dq);
                fa_wg_fence();
                fw_issue_dq<D>(dq, ain, sK + (lt % STAGES) * TD);
                fa_wg_commit();
                fa_wg_wait0();
                fa_pin<D / 2>(dq);
                fw_warp_arrive(&empty[lt % STAGES], lane);
            };
            for (kt = 1; kt + 1 <= mine; kt += 2) {
                step(kt, a, a2);
                step(kt + 1, a2, a);
            }
            if (kt <= mine) {
                step(kt, a, a2);
                last_dq(a2);
            } else {
                last_dq(a);
            }
            kt = mine + 1;
        } else {
            fw_warp_arrive(&q_empty, lane);
        }
        for (; kt <= last; ++kt) fw_skip_stage(full_k, full_v, empty, n + kt, STAGES, lane);
        n += last + 1;

        if (mine >= 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int qr = q + 8 * r;
                const long tok = start + qr;
                if (qr < L)
                    fa_store_grad_row<D>(dq, r, scale, rope ? rope + tok * (D / 2) : nullptr,
                                         dqkv + tok * W + (long)h * D, tig);
            }
        }
    }
}
#endif  // FA_WG

#if FA_WG
#define FA_DQ_WS_BODY(D)                                                                       \
    flash_bwd_dq_ws<D>(&map_qkv, &map_do, &map_out, dqkv, lse, dsum, items, sched, T, H, Hkv,  \
                       scale, scale_log2, rope);
#else
#define FA_DQ_WS_BODY(D) asm volatile("trap;");
#endif
extern "C" __global__ void __launch_bounds__(384, 1)
    flash_bwd_dq_ws_d128_bf16(const __grid_constant__ FaTmap map_qkv,
                              const __grid_constant__ FaTmap map_do,
                              const __grid_constant__ FaTmap map_out, __nv_bfloat16* dqkv,
                              const float* lse, float* dsum, const int4* items, const int* sched,
                              int T, int H, int Hkv, float scale, float scale_log2,
                              const float2* rope) {
    FA_DQ_WS_BODY(128)
}
