// Varlen causal flash attention, backward dK/dV, warp-specialised for Hopper (sm_90a), D = 128:
// the math and outputs of flash_bwd_dkdv_wg (flash_backward_wgmma.cu) organised as
// flash_forward_ws.cu organises the forward.
//
// Why: at D = 128 the one-warpgroup dK/dV kernel keeps dK and dV (128 registers) next to its
// score tiles within 255 registers only with 32 query columns per score product; those m64n32
// products read both operands from shared memory, 47 bytes per 1000 FLOPs, above the 31 at
// which an SM's shared memory keeps up with its tensor cores. Here the consumers get 240
// registers (the producer gives up its own), enough for 64 query columns (31 bytes per 1000
// FLOPs, 23 over the whole step), and two consumers share every Q and dO tile.
//
// Block: three warpgroups, one persistent block per SM. Units are (128-key tile, kv head):
//   warpgroup 0, the producer: per unit, the consumers' K and V tiles (keys 128 j + 64 c ..);
//     per step (query head, 64-row query tile from the diagonal on) Q and dO by TMA
//     (flash_ws.cuh), and the lse and dsum rows (dsum from flash_backward_dq_ws.cu, which runs
//     first) by its warp's plain loads, into a ring of FW_DSTAGES stages. (A one-row f32
//     tensor map for those rows faulted with an illegal instruction on the H100.)
//   warpgroups 1 and 2, the consumers: keys 64 c .. 64 c + 63 of the unit. Per step:
//     S^T = K Q^T, dP^T = V dO^T            wgmma m64n64, both operands from shared memory
//     P^T = exp2(S^T scale log2 e - lse log2 e), dS^T = P^T (dP^T - dsum)
//     dV += P^T dO, dK += dS^T Q            wgmma m64n128, A from registers
//   Consumer 1 skips the unit's first query tile (all its keys are past those queries).
// The TMA reads the next document's rows past the end of this one, so queries past the
// document are masked (P = 0, dS = 0) on the document's last query tile; keys past it only
// reach dK and dV rows that are not stored.
// dK is scaled by 1 / sqrt(D) and, with `rope`, rotated back by RoPE; both round to bf16 once.

#if FA_WG
#define FW_DSTAGES 4

// Ping-pong (PP): the consumers take turns to issue their products (named barrier 1 + c is
// consumer c's turn: its 128 threads wait, the other's 128 arrive), so one's element-wise
// work runs under the other's products instead of both idling the tensor cores together:
// they start every step together, since they wait for the same stage. (At 65536 tokens:
// 2.53-2.64 ms against 2.55-2.65 without, BENCHMARKS.md; the entry keeps it on.)
template <bool PP>
__device__ __forceinline__ void fw_turn_wait(int c) {
    if constexpr (PP) asm volatile("bar.sync %0, 256;" ::"r"(1 + c) : "memory");
}
template <bool PP>
__device__ __forceinline__ void fw_turn_pass(int c) {
    if constexpr (PP) asm volatile("bar.arrive %0, 256;" ::"r"(2 - c) : "memory");
}

template <int D, bool PP>
__device__ __forceinline__ void flash_bwd_dkdv_ws(const FaTmap* map_qkv, const FaTmap* map_do,
                                                  const float* __restrict__ lse,
                                                  const float* __restrict__ dsum,
                                                  __nv_bfloat16* __restrict__ dqkv,
                                                  const int4* __restrict__ items,
                                                  const int* __restrict__ sched, int T, int H,
                                                  int Hkv, float scale, float scale_log2,
                                                  const float2* rope) {
    constexpr int TD = FA_TILE * D;
    constexpr int QC = FA_TILE;  // query columns per score product
    constexpr int STAGES = FW_DSTAGES;
    constexpr unsigned TILE_BYTES = TD * 2;
    extern __shared__ __align__(16) unsigned short fa_smem_wg[];
    __shared__ unsigned long long full[STAGES], empty[STAGES], kv_full, kv_empty;
    unsigned short* sKV = fa_smem_base(fa_smem_wg);  // K0, V0, K1, V1 (consumer c: 2 c, 2 c + 1)
    unsigned short* sQ = sKV + 4 * TD;               // stage s: Q at 2 s TD, dO at (2 s + 1) TD
    float* sRow = reinterpret_cast<float*>(sQ + 2 * STAGES * TD);  // stage s: lse, dsum rows
    const int wg = threadIdx.x >> 7;
    const int first = sched[blockIdx.x], end = sched[blockIdx.x + 1];
    const int G = H / Hkv;
    const long W = (long)(H + 2 * Hkv) * D;

    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; ++i) {
            fw_bar_init(&full[i], 2);  // the TMA's bytes, and the lse / dsum rows' stores
            fw_bar_init(&empty[i], 8);
        }
        fw_bar_init(&kv_full, 1);
        fw_bar_init(&kv_empty, 8);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        // Warp 0: lane 0 issues the TMA copies; the warp copies each step's lse and dsum rows
        // (f32 rows at h T + t: not 16-byte aligned, so not for the TMA) with plain loads.
        if (threadIdx.x >= 32) return;
        const int lane = threadIdx.x;
        int n = 0;
        for (int u = first; u < end; ++u) {
            const FwUnit unit = fw_unit(sched, items, u, Hkv);
            const int4 it = unit.item;
            const int hk = unit.head;
            const int start = it.x, L = it.y, kt0 = 2 * it.z;
            const int nq = (L + FA_TILE - 1) / FA_TILE;
            if (u > first) fw_bar_wait(&kv_empty, (u - first - 1) & 1);
            if (lane == 0) {
                fw_bar_expect(&kv_full, 4 * TILE_BYTES);
                for (int c = 0; c < 2; ++c) {
                    const int y = start + (kt0 + c) * FA_TILE;
                    fw_tma_tile<D>(sKV + 2 * c * TD, map_qkv, (H + hk) * D, y, &kv_full);
                    fw_tma_tile<D>(sKV + (2 * c + 1) * TD, map_qkv, (H + Hkv + hk) * D, y,
                                   &kv_full);
                }
            }
            for (int hh = 0; hh < G; ++hh) {
                const int hq = hk * G + hh;
                for (int qt = kt0; qt < nq; ++qt, ++n) {
                    const int st = n % STAGES;
                    if (n >= STAGES) fw_bar_wait(&empty[st], ((n / STAGES) - 1) & 1);
                    const int y = start + qt * FA_TILE;
                    if (lane == 0) {
                        fw_bar_expect(&full[st], 2 * TILE_BYTES);
                        fw_tma_tile<D>(sQ + 2 * st * TD, map_qkv, hq * D, y, &full[st]);
                        fw_tma_tile<D>(sQ + (2 * st + 1) * TD, map_do, hq * D, y, &full[st]);
                    }
                    // Rows past the document are the next one's (or 0 past T): masked anyway.
                    float* rl = sRow + 2 * st * FA_TILE;
#pragma unroll
                    for (int i = lane; i < FA_TILE; i += 32) {
                        const bool ok = y + i < T;
                        rl[i] = ok ? lse[(long)hq * T + y + i] : 0.f;
                        rl[FA_TILE + i] = ok ? dsum[(long)hq * T + y + i] : 0.f;
                    }
                    fw_warp_arrive(&full[st], lane);
                }
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int c = wg - 1;
    const int t = threadIdx.x & 127;
    const int warp = t >> 5, lane = t & 31, g = lane >> 2, tig = lane & 3;
    const unsigned short* sK = sKV + 2 * c * TD;
    const unsigned short* sV = sK + TD;
    if (c == 1) fw_turn_pass<PP>(c);  // consumer 0 goes first
    int n = 0;
    for (int u = first; u < end; ++u) {
        const FwUnit unit = fw_unit(sched, items, u, Hkv);
        const int4 it = unit.item;
        const int hk = unit.head;
        const int start = it.x, L = it.y, kt0 = 2 * it.z;
        const int nq = (L + FA_TILE - 1) / FA_TILE;
        const int kt = kt0 + c, k0 = kt * FA_TILE;  // this consumer's key tile
        const bool active = k0 < L;
        fw_bar_wait(&kv_full, (u - first) & 1);

        float dk[D / 2], dv[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
        for (int hh = 0; hh < G; ++hh) {
            for (int qt = kt0; qt < nq; ++qt, ++n) {
                const int st = n % STAGES;
                fw_bar_wait(&full[st], (n / STAGES) & 1);
                if (active && qt >= kt) {
                    const unsigned short* sQt = sQ + 2 * st * TD;
                    const unsigned short* sOt = sQt + TD;
                    const float* sL = sRow + 2 * st * FA_TILE;
                    const float* sD = sL + FA_TILE;
                    const int q0 = qt * FA_TILE;
                    float sT[QC / 2], dpT[QC / 2];
                    fw_turn_wait<PP>(c);
                    fa_wg_fence();
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk) {
                        const int off = (kk >> 2) * FA_TILE * 64 + (kk & 3) * 16;
                        fa_wgmma_ss_n64(sT, fa_desc(sK + off, 16), fa_desc(sQt + off, 16), kk);
                        fa_wgmma_ss_n64(dpT, fa_desc(sV + off, 16), fa_desc(sOt + off, 16), kk);
                    }
                    fa_wg_commit();
                    fw_turn_pass<PP>(c);
                    fa_wg_wait0();
                    fa_pin<QC / 2>(sT);
                    fa_pin<QC / 2>(dpT);
                    // sT[4 nb + e]: key warp 16 + g + 8 (e >> 1) of the tile, query
                    // nb 8 + 2 tig + (e & 1). Mask keys past the query on the diagonal tile and
                    // queries past the document (the next document's rows) on the last.
                    if (qt == kt) {
#pragma unroll
                        for (int nb = 0; nb < QC / 8; ++nb)
#pragma unroll
                            for (int e = 0; e < 4; ++e)
                                if (warp * 16 + g + (e >> 1) * 8 > nb * 8 + 2 * tig + (e & 1))
                                    sT[4 * nb + e] = -FA_INF;
                    }
                    if (q0 + FA_TILE > L) {
#pragma unroll
                        for (int nb = 0; nb < QC / 8; ++nb)
#pragma unroll
                            for (int e = 0; e < 4; ++e)
                                if (q0 + nb * 8 + 2 * tig + (e & 1) >= L) sT[4 * nb + e] = -FA_INF;
                    }
                    unsigned ap[QC / 16][4], as[QC / 16][4];
                    fa_dkdv_scores<QC>(sT, dpT, sL, sD, scale_log2, tig);
#pragma unroll
                    for (int kk = 0; kk < QC / 16; ++kk)
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            ap[kk][i] = fa_pack(sT[8 * kk + 2 * i], sT[8 * kk + 2 * i + 1]);
                            as[kk][i] = fa_pack(dpT[8 * kk + 2 * i], dpT[8 * kk + 2 * i + 1]);
                        }
                    fa_pin<D / 2>(dv);
                    fa_pin<D / 2>(dk);
                    fw_turn_wait<PP>(c);
                    fa_wg_fence();
#pragma unroll
                    for (int kk = 0; kk < QC / 16; ++kk) {
                        fa_wgmma_rs_d<D>(dv, ap[kk], sOt + kk * 16 * 64);
                        fa_wgmma_rs_d<D>(dk, as[kk], sQt + kk * 16 * 64);
                    }
                    fa_wg_commit();
                    fw_turn_pass<PP>(c);
                    fa_wg_wait0();
                    fa_pin<D / 2>(dv);
                    fa_pin<D / 2>(dk);
                } else {
                    // The two turns of a step this consumer skips: both take 2 per step.
                    fw_turn_wait<PP>(c);
                    fw_turn_pass<PP>(c);
                    fw_turn_wait<PP>(c);
                    fw_turn_pass<PP>(c);
                }
                fw_warp_arrive(&empty[st], lane);
            }
        }
        fw_warp_arrive(&kv_empty, lane);

        if (!active) continue;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = k0 + warp * 16 + g + r * 8;
            if (key < L) {
                const long tok = start + key;
                __nv_bfloat16* drow = dqkv + tok * W;
                fa_store_grad_row<D>(dk, r, scale, rope ? rope + tok * (D / 2) : nullptr,
                                     drow + (long)(H + hk) * D, tig);
                fa_store_grad_row<D>(dv, r, 1.f, nullptr, drow + (long)(H + Hkv + hk) * D, tig);
            }
        }
    }
    if (c == 0) fw_turn_wait<PP>(c);  // consumer 1's last pass, so no arrival is left
}
#endif  // FA_WG

#if FA_WG
#define FA_DKDV_WS_BODY(D, PP)                                                                  \
    flash_bwd_dkdv_ws<D, PP>(&map_qkv, &map_do, lse, dsum, dqkv, items, sched, T, H, Hkv,     \
                             scale, scale_log2, rope);
#else
#define FA_DKDV_WS_BODY(D, PP) asm volatile("trap;");
#endif
#define FA_DKDV_WS_ENTRY(NAME, PP)                                                            \
    extern "C" __global__ void __launch_bounds__(384, 1)                                      \
        NAME(const __grid_constant__ FaTmap map_qkv, const __grid_constant__ FaTmap map_do,   \
             const float* lse, const float* dsum, __nv_bfloat16* dqkv, const int4* items,     \
             const int* sched, int T, int H, int Hkv, float scale, float scale_log2,          \
             const float2* rope) {                                                            \
        FA_DKDV_WS_BODY(128, PP)                                                              \
    }
FA_DKDV_WS_ENTRY(flash_bwd_dkdv_ws_d128_bf16, true)
