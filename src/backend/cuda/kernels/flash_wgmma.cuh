// Hopper (sm_90a) warpgroup MMA (`wgmma`) for the flash kernels: what
// flash_forward_wgmma.cu and flash_backward_wgmma.cu share. compile.rs pastes it after
// common.cuh and flash_common.cuh. Everything here is for bf16 tiles; FA_WG is 1 only when
// compiling for sm_90a (elsewhere the entry points compile to a trap and are never launched).
//
// Shared-memory tiles are "128-byte swizzled" as wgmma's descriptors expect: a 64-row tile of
// D bf16 columns is D / 64 atoms of [64 rows][128 bytes]; the 16-byte chunk j of row r lives at
// chunk j ^ (r & 7) of its row (fa_sw). Atoms start on 1024-byte boundaries (the swizzle is
// taken from address bits 7-9). A k16 step inside an atom is the descriptor's start address
// plus 32 bytes; for V (rows = keys) a k16 step is 16 rows = 2048 bytes, and the second atom
// of a D = 128 tile is the descriptor's leading-byte offset (64 rows x 128 bytes).
// Descriptor (PTX "matrix descriptor"): bits 0-13 start address >> 4, 16-29 leading byte
// offset >> 4, 32-45 stride byte offset >> 4 (1024: from one 8-row group to the next),
// 62-63 = 1 (128-byte swizzle).
//
// bf16 only (the f32 entry points stay on mma.sync). The launcher adds 1 KiB of slack to the
// dynamic shared memory so fa_smem_base can align the first tile to 1024 bytes.
//
// wgmma fragments: a warpgroup is the block's 4 warps; in an m64nN product warp w owns rows
// 16 w .. 16 w + 15. The f32 accumulator d[4 j + e] of a thread (g = lane / 4, tig = lane % 4)
// is row g + 8 (e / 2), column 8 j + 2 tig + e % 2: the m16n8k16 C fragment of n-block j, so
// the softmax code of the mma.sync kernels carries over. A from registers takes the m16n8k16 A
// fragment of the warp's 16 rows.
#pragma once

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FA_WG 1
#else
#define FA_WG 0
#endif

// Element offset of (row r, column c) in a swizzled 64-row tile.
__device__ __forceinline__ int fa_sw(int r, int c) {
    return (c >> 6) * (FA_TILE * 64) + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

// Start copying a 64 x D bf16 tile (row r at g + r ld; rows >= valid are zero) into a
// swizzled tile; completes at fa_async_wait.
template <int D>
__device__ __forceinline__ void fa_tile_start_sw(unsigned short* s, const __nv_bfloat16* g,
                                                 long ld, int valid) {
    constexpr int V8 = D / 8;
#pragma unroll
    for (int j = 0; j < FA_TILE * V8 / FA_THREADS; ++j) {
        int i = threadIdx.x + j * FA_THREADS;
        int r = i / V8, c = (i % V8) * 8;
        bool ok = r < valid;
        fa_cp16(s + fa_sw(r, c), g + (ok ? (long)r * ld + c : 0), ok ? 16 : 0);
    }
}

// The block's dynamic shared memory, from its first 1024-byte boundary.
__device__ __forceinline__ unsigned short* fa_smem_base(unsigned short* smem) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    return smem + ((1024u - (a & 1023u)) & 1023u) / 2;
}

// Descriptor of a 128-byte-swizzled operand starting at p; lbo: bytes from one 64-column atom
// to the next (MN-major operands wider than 64; unused by K-major ones).
__device__ __forceinline__ unsigned long long fa_desc(const unsigned short* p, unsigned lbo) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    return (unsigned long long)((a & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

#if FA_WG
__device__ __forceinline__ void fa_wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void fa_wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void fa_wg_wait0() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Shared-memory writes of the generic proxy (cp.async, st.shared) made visible to wgmma's reads.
__device__ __forceinline__ void fa_proxy_fence() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// One step of the double-buffered K/V pipeline over key tiles 0..=last (forward and dQ): tile
// kt's K, then V, live in pair kt % 2 of `kv` (swizzled tiles of D columns). Waits until every
// warp is past step kt - 1 (the pair refilled next is free), starts tile kt + 1's copies, waits
// for tile kt's and makes them visible to wgmma. Returns K of tile kt (V follows it).
template <int D>
__device__ __forceinline__ unsigned short* fa_kv_step_sw(unsigned short* kv,
                                                         const __nv_bfloat16* kb,
                                                         const __nv_bfloat16* vb, long W, int kt,
                                                         int last, int L) {
    constexpr int TD = FA_TILE * D;
    const int k0 = kt * FA_TILE;
    __syncthreads();
    if (kt < last) {
        unsigned short* nK = kv + 2 * ((kt + 1) & 1) * TD;
        fa_tile_start_sw<D>(nK, kb + (long)(k0 + FA_TILE) * W, W, L - k0 - FA_TILE);
        fa_tile_start_sw<D>(nK + TD, vb + (long)(k0 + FA_TILE) * W, W, L - k0 - FA_TILE);
        fa_async_commit();
        fa_async_wait<1>();
    } else {
        fa_async_wait<0>();
    }
    fa_proxy_fence();
    __syncthreads();
    return kv + 2 * (kt & 1) * TD;
}

// Pin accumulator registers in program order: the compiler sees wgmma's results as ready when
// the instruction is issued, so reads after wgmma.wait_group (and writes before
// wgmma.fence) are ordered through these empty statements.
template <int N>
__device__ __forceinline__ void fa_pin(float* d) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d[0..16) = A B (accumulate = 0) or d += A B over one k16 step: A (64 x 16) and B (32 x 16,
// i.e. B^T) both K-major, from shared memory.
__device__ __forceinline__ void fa_wgmma_ss_n32(float* d, unsigned long long da,
                                                 unsigned long long db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
        "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(da), "l"(db), "r"(accumulate));
}

// d[0..32) = A B (accumulate = 0) or d += A B over one k16 step: A (64 x 16) and B (64 x 16,
// i.e. B^T) both K-major, from shared memory.
__device__ __forceinline__ void fa_wgmma_ss_n64(float* d, unsigned long long da,
                                                 unsigned long long db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate));
}

// d[0..32) += A B over one k16 step: A (64 x 16) from registers (a[0..4) = the m16n8k16 A
// fragment of this warp's 16 rows), B (16 x 64) from shared memory, MN-major (transposed).
__device__ __forceinline__ void fa_wgmma_rs_n64(float* d, const unsigned* a,
                                                  unsigned long long db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// d[0..64) += A B over one k16 step: A (64 x 16) from registers (a[0..4) = the m16n8k16 A
// fragment of this warp's 16 rows), B (16 x 128) from shared memory, MN-major (transposed).
__device__ __forceinline__ void fa_wgmma_rs_n128(float* d, const unsigned* a,
                                                  unsigned long long db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// d += A B with B a 16-row slice of an MN-major D-column tile.
template <int D>
__device__ __forceinline__ void fa_wgmma_rs_d(float* d, const unsigned* a,
                                              const unsigned short* b) {
    if constexpr (D == 64)
        fa_wgmma_rs_n64(d, a, fa_desc(b, FA_TILE * 128));
    else
        fa_wgmma_rs_n128(d, a, fa_desc(b, FA_TILE * 128));
}

// RoPE's backward fused into the wgmma kernels (Backend::attention_rope_backward): rope.cu's
// inverse rotation of the pairs (j, j + D/2) of dQ's and dK's heads by a = positions[t]
// inv_freq[j], with cos a and sin a read from the table rope_table wrote (rope[t D/2 + j]) and
// rope_pair's math, applied to the f32 accumulators before their one rounding to bf16: the
// pass of rope_backward over dqkv is gone. (A sincosf per pair instead of the table made these
// kernels slower than the pass they save; rotating q in the forward kernel the same way saved
// nothing: BENCHMARKS.md.) A null table means no rotation.
//
// The inverse rotation (by -a, rope_backward's) of one accumulator row of dQ or dK,
// scaled by `scale` first, in registers before the store. acc holds row r (0: g, 1: g + 8) of
// the thread at acc[4 i + 2 r + e] = column 8 i + 2 tig + e; a column j < D/2 pairs with
// j + D/2, i.e. i + D/16 in the same thread. `rope` points at the row's D/2 (cos, sin).
template <int D>
__device__ __forceinline__ void fa_rope_back_row(float* acc, int r, float scale,
                                                 const float2* rope, int tig) {
#pragma unroll
    for (int i = 0; i < D / 16; ++i) {
        const float4 c = reinterpret_cast<const float4*>(rope)[4 * i + tig];  // j = 8 i + 2 tig
        float y1 = acc[4 * i + 2 * r] * scale, y2 = acc[4 * (i + D / 16) + 2 * r] * scale;
        rope_pair(y1, y2, c.x, -c.y);
        acc[4 * i + 2 * r] = y1;
        acc[4 * (i + D / 16) + 2 * r] = y2;
        y1 = acc[4 * i + 2 * r + 1] * scale, y2 = acc[4 * (i + D / 16) + 2 * r + 1] * scale;
        rope_pair(y1, y2, c.z, -c.w);
        acc[4 * i + 2 * r + 1] = y1;
        acc[4 * (i + D / 16) + 2 * r + 1] = y2;
    }
}


// Epilogues and score stages the one-warpgroup and warp-specialised kernels share.
//
// Row r (0: g, 1: g + 8) of a warp's O accumulator divided by the row's l (summed over the
// row's 4 lanes: every lane must call), stored to `orow` (the row's D columns of this head) with
// lse = (m + log2 l) ln 2 at *lse_at, when `valid` (the row is in the document).
template <int D>
__device__ __forceinline__ void fa_store_o_row(const float* o, int r, float m, float l,
                                               bool valid, __nv_bfloat16* orow, float* lse_at,
                                               int tig) {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (!valid) return;
    const float inv = 1.f / l;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
        fa_st2(orow + 2 * tig + i * 8, o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
    if (tig == 0) *lse_at = (m + log2f(l)) * FA_LN2;
}

// Row r of a dQ or dK accumulator times `scale`, rotated back by RoPE when `rope` (the row's
// D / 2 cos/sin pairs) is set, stored to `row` (the row's D columns of this head) in bf16.
template <int D>
__device__ __forceinline__ void fa_store_grad_row(float* acc, int r, float scale,
                                                  const float2* rope, __nv_bfloat16* row,
                                                  int tig) {
    float sc = scale;
    if (rope) {
        fa_rope_back_row<D>(acc, r, scale, rope, tig);
        sc = 1.f;
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
        fa_st2(row + 2 * tig + i * 8, acc[4 * i + 2 * r] * sc, acc[4 * i + 2 * r + 1] * sc);
}

// The dK/dV kernels' score stage for QC query columns (sT[4 nb + e]: key g + 8 (e >> 1) of the
// warp's 16, query nb 8 + 2 tig + (e & 1); masked scores already -inf):
// P^T = exp2(S^T scale log2 e - lse log2 e) into sT, dS^T = P^T (dP^T - dsum) into dpT, with
// lse and dsum of the QC queries in sL, sD.
template <int QC>
__device__ __forceinline__ void fa_dkdv_scores(float* sT, float* dpT, const float* sL,
                                               const float* sD, float scale_log2, int tig) {
#pragma unroll
    for (int nb = 0; nb < QC / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int ql = nb * 8 + 2 * tig + (e & 1);
            const float p = exp2f(fmaf(sT[4 * nb + e], scale_log2, -sL[ql] * FA_LOG2E));
            sT[4 * nb + e] = p;
            dpT[4 * nb + e] = p * (dpT[4 * nb + e] - sD[ql]);
        }
}

#endif  // FA_WG
