// Hopper's TMA and mbarriers for the warp-specialised flash forward (flash_forward_ws.cu;
// compile.rs pastes this after flash_wgmma.cuh): a producer thread copies 64 x 64 bf16 boxes
// through a tensor map (ops/tma.rs) into 128-byte-swizzled tiles (flash_wgmma.cuh's layout),
// and consumer warps wait for them on mbarriers.
//   full barriers: the producer arrives with the bytes it expects (arrive.expect_tx); the
//     TMA's bytes complete the phase.
//   empty barriers: one arrival per consumer warp once its products have read the buffer.
// A barrier's phase n completes once; waiters pass parity n & 1.
#pragma once

// The 128-byte CUtensorMap, passed by value (`const __grid_constant__`).
struct __align__(64) FaTmap {
    unsigned long long v[16];
};

#if FA_WG
__device__ __forceinline__ unsigned fw_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void fw_bar_init(unsigned long long* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(fw_smem_addr(b)), "r"(count));
}
__device__ __forceinline__ void fw_bar_expect(unsigned long long* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(fw_smem_addr(b)),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void fw_bar_arrive(unsigned long long* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(fw_smem_addr(b)) : "memory");
}
// Wait until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void fw_bar_wait(unsigned long long* b, unsigned parity) {
    asm volatile(
        "{\n.reg .pred p;\nFW_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra FW_WAIT;\n}\n" ::"r"(fw_smem_addr(b)),
        "r"(parity)
        : "memory");
}
// One arrival per warp (the barriers that consumers release count warps), once every lane of
// the warp is done with what it releases.
__device__ __forceinline__ void fw_warp_arrive(unsigned long long* b, int lane) {
    __syncwarp();
    if (lane == 0) fw_bar_arrive(b);
}
// A stage a consumer skips (a key tile past its diagonal, or every tile when its rows are past
// the document): wait for its copies, so the arrival counts toward that tile's phase of the
// stage's barrier, and release it.
__device__ __forceinline__ void fw_skip_stage(unsigned long long* full_k,
                                              unsigned long long* full_v,
                                              unsigned long long* empty, int n, int stages,
                                              int lane) {
    fw_bar_wait(&full_k[n % stages], (n / stages) & 1);
    fw_bar_wait(&full_v[n % stages], (n / stages) & 1);
    fw_warp_arrive(&empty[n % stages], lane);
}
// One 64 x 64 box at column x, row y of the tensor map into `dst` (1024-byte aligned).
__device__ __forceinline__ void fw_tma(unsigned short* dst, const FaTmap* map, int x, int y,
                                       unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];" ::"r"(fw_smem_addr(dst)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(x), "r"(y), "r"(fw_smem_addr(bar))
        : "memory");
}
// A 64-row tile of D columns starting at column x: D / 64 boxes, one atom each.
template <int D>
__device__ __forceinline__ void fw_tma_tile(unsigned short* dst, const FaTmap* map, int x,
                                            int y, unsigned long long* bar) {
#pragma unroll
    for (int a = 0; a < D / 64; ++a) fw_tma(dst + a * FA_TILE * 64, map, x + 64 * a, y, bar);
}


// The producer's copy of the block's key tile n (rows y.. of K's columns kx and V's columns vx)
// into its stage of the ring, once the consumers have released the stage's previous tile.
template <int D>
__device__ __forceinline__ void fw_load_kv(unsigned short* sK, unsigned short* sV,
                                           unsigned long long* full_k,
                                           unsigned long long* full_v,
                                           unsigned long long* empty, int n, int stages,
                                           const FaTmap* map, int kx, int vx, int y) {
    constexpr unsigned TILE_BYTES = FA_TILE * D * 2;
    const int st = n % stages;
    if (n >= stages) fw_bar_wait(&empty[st], ((n / stages) - 1) & 1);
    fw_bar_expect(&full_k[st], TILE_BYTES);
    fw_tma_tile<D>(sK + st * FA_TILE * D, map, kx, y, &full_k[st]);
    fw_bar_expect(&full_v[st], TILE_BYTES);
    fw_tma_tile<D>(sV + st * FA_TILE * D, map, vx, y, &full_v[st]);
}

// Unit u of a persistent block's list (flash_items.rs ws_schedule: the blocks' offsets, then
// the units as item * heads + head): its item and head.
struct FwUnit {
    int4 item;
    int head;
};
__device__ __forceinline__ FwUnit fw_unit(const int* sched, const int4* items, int u,
                                          int heads) {
    const int code = sched[gridDim.x + 1 + u];
    return {items[code / heads], code % heads};
}

// Shared by the warp-specialised kernels' score stages.
// Pin P's registers (live until its product is done, so a new P cannot take them).
__device__ __forceinline__ void fw_pin_p(unsigned (*p)[4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
        asm volatile("" : "+r"(p[kk][0]), "+r"(p[kk][1]), "+r"(p[kk][2]), "+r"(p[kk][3])::"memory");
}

// Mask the keys past the query on the rows' own (diagonal) tile: s = -inf there.
__device__ __forceinline__ void fw_mask(float* s, int k0, int q, int tig) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (k0 + nb * 8 + 2 * tig + e > q + 8 * r) s[4 * nb + 2 * r + e] = -FA_INF;
}
#endif  // FA_WG
