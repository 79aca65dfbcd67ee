// Varlen causal flash attention with GQA (FlashAttention-2 style), head dims 64 and 128: what
// the forward (flash_forward.cu) and the backward (flash_backward.cu) share. compile.rs pastes
// this header after common.cuh in front of each flash_*.cu, so each compiles on its own.
//
// Layouts (row-major; qkv, out, dout, dqkv share one element type E, f32 or bf16, and each
// kernel has an f32 and a `_bf16` entry point; f32 tiles are rounded to bf16 in shared memory):
//   qkv  [T, W], W = (H + 2 Hkv) D, row t = [q: H D | k: Hkv D | v: Hkv D]
//   out, dout [T, H D]; lse, dsum [H, T] (f32); dqkv [T, W]
// Query head h reads kv head h / G, G = H / Hkv. Query i of a document sees keys 0..=i of it.
//
// Work lists (built on the host from cu_seqlens, longest work first), one int4 per item:
//   {document start row, document length L, tile index, 0}. A block handles one item and one
//   head: block b -> item b / heads, head b % heads (heads sharing a kv head run side by side).
// Tensor cores: mma.sync m16n8k16 bf16 -> f32. 4 warps; each warp owns 16 rows of the tile
//   (query rows forward, key rows backward).
//
// Here: the tile constants, bf16 packing and the MMA, ldmatrix and its address patterns,
// element-type loads and stores, cp.async, the tile loaders and the pipeline depths (FaPipe).
#pragma once

#define FA_TILE 64
#define FA_THREADS 128
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_INF __int_as_float(0x7f800000)

// Two floats as a bf16x2 word: lo in the low half (the lower column of an MMA fragment).
__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c += a b: A 16x16 row-major (4 regs), B 16x8 col-major (2 regs), C 16x8 f32.
__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void fa_ldsm(unsigned* r, const unsigned short* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void fa_ldsm_t(unsigned* r, const unsigned short* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// Address helpers for a tile stored [row][col] bf16 with row stride S (elements); lane's
// ldmatrix row address for the 16x16 block at (r0, c0).
// A operand (rows = M, cols = K): matrices (r0,c0) (r0+8,c0) (r0,c0+8) (r0+8,c0+8).
__device__ __forceinline__ const unsigned short* fa_a_addr(const unsigned short* t, int S, int r0,
                                                           int c0, int lane) {
    return t + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + c0 + (lane >> 4) * 8;
}
// B operand from a tile stored [n][k] (non-trans): r[0..1] = b of n-block r0, r[2..3] = b of
// n-block r0 + 8, k-step c0. Matrices (r0,c0) (r0,c0+8) (r0+8,c0) (r0+8,c0+8).
__device__ __forceinline__ const unsigned short* fa_b_addr(const unsigned short* t, int S, int r0,
                                                           int c0, int lane) {
    return t + (r0 + (lane & 7) + (lane >> 4) * 8) * S + c0 + ((lane >> 3) & 1) * 8;
}
// B operand from a tile stored [k][n] (trans): rows k0.., cols n0..; r[0..1] = b of n-block
// n0, r[2..3] = b of n-block n0 + 8. Same addresses as the A pattern (trans load).
// A operand from a tile stored [k][m] (trans): matrices (k0,m0) (k0,m0+8) (k0+8,m0) (k0+8,m0+8)
// give a0..a3.
__device__ __forceinline__ const unsigned short* fa_at_addr(const unsigned short* t, int S, int k0,
                                                            int m0, int lane) {
    return t + (k0 + (lane & 7) + (lane >> 4) * 8) * S + m0 + ((lane >> 3) & 1) * 8;
}

// Element-type helpers: 4 consecutive elements in and out of global memory.
struct Fa4 {  // 4 elements as loaded: f32 as float4, bf16 as two bf16x2 words
    float4 f;
    uint2 b;
};
__device__ __forceinline__ void fa_ld4(Fa4& v, const float* p) {
    v.f = __ldg(reinterpret_cast<const float4*>(p));
}
__device__ __forceinline__ void fa_ld4(Fa4& v, const __nv_bfloat16* p) {
    v.b = __ldg(reinterpret_cast<const uint2*>(p));
}
__device__ __forceinline__ uint2 fa_bf16x4(const Fa4& v, const float*) {
    return make_uint2(fa_pack(v.f.x, v.f.y), fa_pack(v.f.z, v.f.w));
}
__device__ __forceinline__ uint2 fa_bf16x4(const Fa4& v, const __nv_bfloat16*) { return v.b; }
__device__ __forceinline__ float4 fa_f32x4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 fa_f32x4(const __nv_bfloat16* p) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                       __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}
// Two consecutive elements (a at p[0], b at p[1]).
__device__ __forceinline__ void fa_st2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void fa_st2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = fa_pack(a, b);
}

// 64 rows x D of E (row r at g + r ld) -> bf16 tile (row stride D + 8); rows >= valid are 0.
// Loads go in batches of B 4-element vectors per thread.
template <int D, int B, typename E>
__device__ __forceinline__ void fa_load_tile(unsigned short* s, const E* g, long ld, int valid) {
    constexpr int V4 = D / 4;
    constexpr int N = FA_TILE * V4 / FA_THREADS;
    static_assert(N % B == 0, "batch must divide the loads per thread");
#pragma unroll 1
    for (int j0 = 0; j0 < N; j0 += B) {
        Fa4 v[B];
#pragma unroll
        for (int j = 0; j < B; ++j) {
            int i = threadIdx.x + (j0 + j) * FA_THREADS;
            int r = i / V4, c = (i % V4) * 4;
            v[j].f = make_float4(0.f, 0.f, 0.f, 0.f);
            v[j].b = make_uint2(0u, 0u);
            if (r < valid) fa_ld4(v[j], g + (long)r * ld + c);
        }
#pragma unroll
        for (int j = 0; j < B; ++j) {
            int i = threadIdx.x + (j0 + j) * FA_THREADS;
            int r = i / V4, c = (i % V4) * 4;
            *reinterpret_cast<uint2*>(s + r * (D + 8) + c) = fa_bf16x4(v[j], g);
        }
    }
}

// Asynchronous copies (sm_80+): a 16-byte or 4-byte global -> shared copy that completes at
// fa_async_wait; `bytes` = 0 copies nothing and zero-fills the destination.
__device__ __forceinline__ void fa_cp16(void* dst, const void* src, int bytes) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void fa_cp4(void* dst, const void* src, int bytes) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void fa_async_commit() { asm volatile("cp.async.commit_group;"); }
// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void fa_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Start loading a 64 x D tile (as fa_load_tile): bf16 rows go by cp.async straight into shared
// memory (complete at fa_async_wait, so the copy overlaps whatever the block computes
// meanwhile); f32 rows must be rounded, so they load synchronously through registers.
template <int D, int B>
__device__ __forceinline__ void fa_tile_start(unsigned short* s, const float* g, long ld,
                                              int valid) {
    fa_load_tile<D, B>(s, g, ld, valid);
}
template <int D, int B>
__device__ __forceinline__ void fa_tile_start(unsigned short* s, const __nv_bfloat16* g, long ld,
                                              int valid) {
    constexpr int V8 = D / 8;  // 16-byte chunks per row
#pragma unroll
    for (int j = 0; j < FA_TILE * V8 / FA_THREADS; ++j) {
        int i = threadIdx.x + j * FA_THREADS;
        int r = i / V8, c = (i % V8) * 8;
        bool ok = r < valid;
        fa_cp16(s + r * (D + 8) + c, g + (ok ? (long)r * ld + c : 0), ok ? 16 : 0);
    }
}

// K/V (forward) and Q/dO (backward) tiles are double-buffered where shared memory allows it:
// the next tile's copies are in flight while the current one is computed. At D = 128 the
// extra tiles would cost blocks per SM (the backward its second), so it stays single-buffered
// until measured otherwise.
// Must match the shared-memory sizes in ops/flash_attention.rs.
template <int D>
struct FaPipe {
    static constexpr int FWD = D == 64 ? 2 : 1;
    static constexpr int BWD = D == 64 ? 2 : 1;
};

// One step of the K/V pipeline over key tiles 0..=last: tile kt's K (then its V) lives in buffer
// kt % NB of `kv` (pairs of 64-row tiles, K first). With two buffers this starts the next
// tile's copies and waits for tile kt's; with one it loads tile kt now (tile 0 was started
// before the loop). Returns K of tile kt. The caller syncs the block before (the buffer being
// refilled is free) and after (the tile is visible to every warp).
template <int D, int NB, typename E>
__device__ __forceinline__ unsigned short* fa_kv_step(unsigned short* kv, const E* kb,
                                                      const E* vb, long W, int kt, int last,
                                                      int L) {
    constexpr int S = D + 8;
    const int k0 = kt * FA_TILE;
    unsigned short* sK = kv + 2 * (kt % NB) * FA_TILE * S;
    if (kt < last && NB == 2) {
        unsigned short* nK = kv + 2 * ((kt + 1) % NB) * FA_TILE * S;
        fa_tile_start<D, 8>(nK, kb + (long)(k0 + FA_TILE) * W, W, L - k0 - FA_TILE);
        fa_tile_start<D, 8>(nK + FA_TILE * S, vb + (long)(k0 + FA_TILE) * W, W,
                            L - k0 - FA_TILE);
        fa_async_commit();
        fa_async_wait<1>();  // tile kt's copies are done, the next one's in flight
    } else {
        if (NB == 1 && kt > 0) {
            fa_tile_start<D, 8>(sK, kb + (long)k0 * W, W, L - k0);
            fa_tile_start<D, 8>(sK + FA_TILE * S, vb + (long)k0 * W, W, L - k0);
            fa_async_commit();
        }
        fa_async_wait<0>();
    }
    return sK;
}
