// Varlen causal flash attention, forward, warp-specialised for Hopper (sm_90a): the math and
// outputs of flash_forward_wgmma.cu (online softmax in the exp2 domain, O and the log-sum-exp
// per row), organised as FlashAttention-3 organises its forward.
//
// Why: the one-warpgroup kernel reads a 64 x D K tile and V tile from L2 for every 64 query
// rows, 16 bytes per 1000 FLOPs; at D = 128 and 65536 tokens Nsight Compute showed its L2 74 %
// busy and its tensor pipes 37 % active. Here a block owns 128 query rows (two consumer
// warpgroups of 64 rows each) that share every K and V tile: half the L2 traffic per FLOP.
// Built for D = 128 only: at D = 64 (half the product work per score, the same softmax) two
// consumer warpgroups per SM hid less of the softmax than the one-warpgroup kernel's four
// blocks per SM did (BENCHMARKS.md).
//
// Block: three warpgroups (384 threads), one block per SM, persistent.
//   warpgroup 0, the producer: one thread issues every copy as a TMA bulk tensor copy (the
//     tensor map, ops/tma.rs, views qkv as [T rows][W columns] bf16, boxes of 64 rows x 64
//     columns with the 128-byte swizzle: exactly the tile layout of flash_wgmma.cuh; rows past
//     T read as 0, rows of the next document are masked or multiply P = 0) into a ring of
//     FW_STAGES (K, V) tile pairs and FW_QBUF Q buffers; it gives its registers to the
//     consumers (setmaxnreg 24).
//   warpgroups 1 and 2, the consumers (setmaxnreg 240): query rows 64 c .. 64 c + 63 of the
//     block's 128-row tile. Per key tile kt they issue S = Q K^T for kt and O += P V for kt - 1
//     together, so the softmax of tile kt runs while the tensor cores do P V of kt - 1.
// Handshakes are mbarriers (flash_ws.cuh): full_k / full_v (the TMA's byte count completes
// them), empty (one arrival per consumer warp once its products have read the stage), q_full /
// q_empty for Q.
//
// Scheduling: units are (128-row query tile, head) pairs; the host deals them to gridDim.x
// blocks longest first onto the least loaded block (flash_items.rs, `ws_schedule`) and hands
// each block its list: sched[b] .. sched[b + 1] index into sched's unit list (item * H + h).
// A unit's key tiles are 0 ..= 2 i + 1 for query tile i (64-key tiles): consumer 0 stops at its
// diagonal 2 i, consumer 1 at 2 i + 1; a consumer whose rows are all past the document waits
// and releases the tiles without computing.

#if FA_WG
// (K, V) stages and Q buffers: 4 and 2 (192 KB at D = 128) ran the 65536-token benchmark
// 10 % faster than 2 and 1 (BENCHMARKS.md); the second Q buffer lets the producer load the
// next unit's Q and first tiles while the consumers finish the last ones.
#define FW_STAGES 4
#define FW_QBUF 2


// Online softmax of one S tile (s: this warp's 16 rows of 64 keys, raw Q K^T, masked keys at
// -inf) into P (bf16 A fragments of the P V product): with c = scale log2 e,
// m' = max(m, c max_j s_j), p_j = 2^(c s_j - m') (one FFMA and one MUFU.EX2 per score),
// l' = l alpha + sum_j p_j, alpha = 2^(m - m') = the factor O's rows must be scaled by.
// Does not touch O: a P V product may still be reading the previous P.
__device__ __forceinline__ void fw_softmax(float* s, float scale_log2, float* m, float* l,
                                           float* alpha, unsigned (*p)[4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -FA_INF;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
            mx = fmaxf(mx, fmaxf(s[4 * nb + 2 * r], s[4 * nb + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[r], mx * scale_log2);  // finite: key 0 is in every row's tile 0
        alpha[r] = exp2f(m[r] - mn);
        m[r] = mn;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float x = exp2f(fmaf(s[4 * nb + 2 * r + e], scale_log2, -mn));
                s[4 * nb + 2 * r + e] = x;
                sum += x;
            }
        l[r] = l[r] * alpha[r] + sum;
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        p[kk][0] = fa_pack(s[8 * kk + 0], s[8 * kk + 1]);
        p[kk][1] = fa_pack(s[8 * kk + 2], s[8 * kk + 3]);
        p[kk][2] = fa_pack(s[8 * kk + 4], s[8 * kk + 5]);
        p[kk][3] = fa_pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// O's rows times alpha, skipped when no row of the warp has a new maximum (alpha = 1
// everywhere): past a document's first tiles a row's maximum rarely moves, and the rescale is
// D / 2 multiplies per thread per tile, as many as the softmax's exponentials at D = 128.
template <int D>
__device__ __forceinline__ void fw_rescale(float* o, const float* alpha) {
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        o[4 * i] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
    }
}


// S = Q K^T for one 64-key tile, issued (not waited for).
template <int D>
__device__ __forceinline__ void fw_issue_s(float* s, const unsigned short* sQ,
                                           const unsigned short* sK) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int off = (kk >> 2) * FA_TILE * 64 + (kk & 3) * 16;
        fa_wgmma_ss_n64(s, fa_desc(sQ + off, 16), fa_desc(sK + off, 16), kk);
    }
}

template <int D>
__device__ __forceinline__ void fw_issue_pv(float* o, unsigned (*p)[4],
                                            const unsigned short* sV) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) fa_wgmma_rs_d<D>(o, p[kk], sV + kk * 16 * 64);
}

template <int D>
__device__ __forceinline__ void flash_fwd_ws(const FaTmap* map, __nv_bfloat16* __restrict__ out,
                                             float* __restrict__ lse,
                                             const int4* __restrict__ items,
                                             const int* __restrict__ sched, int T, int H,
                                             int Hkv, float scale_log2) {
    constexpr int TD = FA_TILE * D;  // elements of one 64-row tile
    constexpr unsigned TILE_BYTES = TD * 2;
    constexpr int STAGES = FW_STAGES, QBUF = FW_QBUF;
    extern __shared__ __align__(16) unsigned short fa_smem_wg[];
    __shared__ unsigned long long full_k[STAGES], full_v[STAGES], empty[STAGES];
    __shared__ unsigned long long q_full[QBUF], q_empty[QBUF];
    unsigned short* sQ = fa_smem_base(fa_smem_wg);  // QBUF x two 64-row tiles
    unsigned short* sK = sQ + QBUF * 2 * TD;        // STAGES tiles
    unsigned short* sV = sK + STAGES * TD;          // STAGES tiles
    const int wg = threadIdx.x >> 7;
    const int first = sched[blockIdx.x], end = sched[blockIdx.x + 1];
    const int G = H / Hkv;

    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; ++i) {
            fw_bar_init(&full_k[i], 1);
            fw_bar_init(&full_v[i], 1);
            fw_bar_init(&empty[i], 8);  // one arrival per consumer warp
        }
        for (int i = 0; i < QBUF; ++i) {
            fw_bar_init(&q_full[i], 1);
            fw_bar_init(&q_empty[i], 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (threadIdx.x != 0) return;
        asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<unsigned long long>(map))
                     : "memory");
        int n = 0;  // key tiles loaded so far by this block
        for (int u = first; u < end; ++u) {
            const FwUnit unit = fw_unit(sched, items, u, H);
            const int4 it = unit.item;
            const int h = unit.head, hk = h / G;
            const int start = it.x, L = it.y, q0 = it.z * 2 * FA_TILE;
            const int last = 2 * it.z + (q0 + FA_TILE < L ? 1 : 0);
            const int j = u - first, qb = j % QBUF;
            if (j >= QBUF) fw_bar_wait(&q_empty[qb], (j / QBUF - 1) & 1);
            unsigned short* q = sQ + qb * 2 * TD;
            fw_bar_expect(&q_full[qb], 2 * TILE_BYTES);
            fw_tma_tile<D>(q, map, h * D, start + q0, &q_full[qb]);
            fw_tma_tile<D>(q + TD, map, h * D, start + q0 + FA_TILE, &q_full[qb]);
            for (int kt = 0; kt <= last; ++kt, ++n)
                fw_load_kv<D>(sK, sV, full_k, full_v, empty, n, STAGES, map, (H + hk) * D,
                              (H + Hkv + hk) * D, start + kt * FA_TILE);
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int c = wg - 1;  // rows 64 c .. 64 c + 63 of the tile
    const int t = threadIdx.x & 127;
    const int warp = t >> 5, lane = t & 31, g = lane >> 2, tig = lane & 3;
    int n = 0;
    for (int u = first; u < end; ++u) {
        const FwUnit unit = fw_unit(sched, items, u, H);
        const int4 it = unit.item;
        const int h = unit.head;
        const int start = it.x, L = it.y, q0 = it.z * 2 * FA_TILE;
        const int last = 2 * it.z + (q0 + FA_TILE < L ? 1 : 0);  // the block's last key tile
        const int rows0 = q0 + c * FA_TILE;                         // this warpgroup's first row
        const int mine = rows0 < L ? 2 * it.z + c : -1;             // its last key tile
        const int q = rows0 + warp * 16 + g;                        // row of s[.. 2 r ..]: q + 8 r
        const int j = u - first, qb = j % QBUF;
        const unsigned short* myQ = sQ + qb * 2 * TD + c * TD;
        fw_bar_wait(&q_full[qb], (j / QBUF) & 1);

        float o[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
        float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f}, alpha[2];
        unsigned p[4][4];
        float s[32];
        int kt = 0;
        if (mine >= 0) {
            // Tile 0: S alone.
            fw_bar_wait(&full_k[n % STAGES], (n / STAGES) & 1);
            fa_wg_fence();
            fw_issue_s<D>(s, myQ, sK + (n % STAGES) * TD);
            fa_wg_commit();
            fa_wg_wait0();
            fa_pin<32>(s);
            if (mine == 0) {
                fw_warp_arrive(&q_empty[qb], lane);
            }
            if (mine == 0) fw_mask(s, 0, q, tig);
            fw_softmax(s, scale_log2, m, l, alpha, p);
            // Tiles 1 ..= mine: S of kt with P V of kt - 1. P alternates between two
            // register sets (no copy: a copy into the set a product is reading would make ptxas
            // serialise the products).
            unsigned p2[4][4];
            auto step = [&](int k, unsigned (&pin)[4][4], unsigned (&pout)[4][4]) {
                const int cur = n + k, prev = cur - 1;
                fw_bar_wait(&full_k[cur % STAGES], (cur / STAGES) & 1);
                fw_bar_wait(&full_v[prev % STAGES], (prev / STAGES) & 1);
                fa_pin<D / 2>(o);
                fa_wg_fence();
                fw_issue_s<D>(s, myQ, sK + (cur % STAGES) * TD);
                fa_wg_commit();
                fw_issue_pv<D>(o, pin, sV + (prev % STAGES) * TD);
                fa_wg_commit();
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                fa_pin<32>(s);
                if (k == mine) {
                    fw_warp_arrive(&q_empty[qb], lane);
                }
                if (k == mine) fw_mask(s, k * FA_TILE, q, tig);
                fw_softmax(s, scale_log2, m, l, alpha, pout);
                fa_wg_wait0();
                fa_pin<D / 2>(o);
                fw_pin_p(pin);  // live until its product is done: pout cannot take its registers
                fw_warp_arrive(&empty[prev % STAGES], lane);
                fw_rescale<D>(o, alpha);
            };
            auto last_pv = [&](unsigned (&pin)[4][4]) {
                const int lt = n + mine;
                fw_bar_wait(&full_v[lt % STAGES], (lt / STAGES) & 1);
                fa_pin<D / 2>(o);
                fa_wg_fence();
                fw_issue_pv<D>(o, pin, sV + (lt % STAGES) * TD);
                fa_wg_commit();
                fa_wg_wait0();
                fa_pin<D / 2>(o);
                fw_warp_arrive(&empty[lt % STAGES], lane);
            };
            for (kt = 1; kt + 1 <= mine; kt += 2) {
                step(kt, p, p2);
                step(kt + 1, p2, p);
            }
            if (kt <= mine) {
                step(kt, p, p2);
                last_pv(p2);  // P V of the last tile
            } else {
                last_pv(p);
            }
            kt = mine + 1;
        } else {
            fw_warp_arrive(&q_empty[qb], lane);
        }
        // Tiles this warpgroup does not need: past its diagonal, or all when its rows are past
        // the document.
        for (; kt <= last; ++kt) fw_skip_stage(full_k, full_v, empty, n + kt, STAGES, lane);
        n += last + 1;

        if (mine >= 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const long tok = start + q + 8 * r;
                fa_store_o_row<D>(o, r, m[r], l[r], q + 8 * r < L,
                                  out + tok * H * D + (long)h * D, lse + (long)h * T + tok, tig);
            }
        }
    }
}
#endif  // FA_WG

#if FA_WG
#define FA_FWD_WS_BODY(D) flash_fwd_ws<D>(&map, out, lse, items, sched, T, H, Hkv, scale_log2);
#else
#define FA_FWD_WS_BODY(D) asm volatile("trap;");
#endif
// D = 128 only: at D = 64 the one-warpgroup kernel (four blocks per SM) stayed faster.
extern "C" __global__ void __launch_bounds__(384, 1)
    flash_fwd_ws_d128_bf16(const __grid_constant__ FaTmap map, __nv_bfloat16* out, float* lse,
                           const int4* items, const int* sched, int T, int H, int Hkv,
                           float scale_log2) {
    FA_FWD_WS_BODY(128)
}
