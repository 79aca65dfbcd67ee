// Varlen causal flash attention, forward, on Hopper's warpgroup MMA (sm_90a `wgmma`): the
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
// bf16 only (the f32 entry points stay on mma.sync); built for sm_90a only: other
// architectures compile these entry points to a trap and ops/flash_attention.rs never
// launches them there.

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

__device__ __forceinline__ unsigned long long fa_desc(const unsigned short* p, unsigned lbo) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    return (unsigned long long)((a & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

#if FA_WG
__device__ __forceinline__ void fa_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
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
// Pin accumulator registers in program order: the compiler sees wgmma's results as ready when
// the instruction is issued, so reads after wgmma.wait_group (and writes before
// wgmma.fence) are ordered through these empty statements.
template <int N>
__device__ __forceinline__ void fa_pin(float* d) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d[0..32) = A B (accumulate = 0) or d += A B over one k16 step: A (64 x 16, K-major) and
// B (64 x 16, K-major, i.e. B^T row-major) from shared memory.
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

template <int D>
__device__ __forceinline__ void flash_fwd_wg(__nv_bfloat16* __restrict__ out,
                                             float* __restrict__ lse,
                                             const __nv_bfloat16* __restrict__ qkv,
                                             const int4* __restrict__ items, int T, int H,
                                             int Hkv, float scale_log2) {
    constexpr int TD = FA_TILE * D;  // elements of one tile
    extern __shared__ __align__(1024) unsigned short fa_smem_wg[];
    // The atoms need 1024-byte alignment; the launcher adds 1 KiB of slack.
    const unsigned pad = (1024u - ((unsigned)__cvta_generic_to_shared(fa_smem_wg) & 1023u)) & 1023u;
    unsigned short* sQ = fa_smem_wg + pad / 2;
    unsigned short* kv = sQ + TD;  // two (K, V) tile pairs: the pipeline's double buffer
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
    fa_tile_start_sw<D>(kv + TD, vb, W, L);
    fa_async_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f};

    for (int kt = 0; kt <= qt; ++kt) {
        const int k0 = kt * FA_TILE;
        __syncthreads();  // every wgmma reading the buffer about to be refilled has completed
        unsigned short* sK = kv + 2 * (kt & 1) * TD;
        unsigned short* sV = sK + TD;
        if (kt < qt) {
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

        const bool diag = kt == qt;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int q = q0 + warp * 16 + g + r * 8;
            float mx = -FA_INF;
#pragma unroll
            for (int nb = 0; nb < 8; ++nb)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float x = s[4 * nb + 2 * r + e] * scale_log2;
                    if (diag && k0 + nb * 8 + 2 * tig + e > q) x = -FA_INF;
                    s[4 * nb + 2 * r + e] = x;
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
                    float p = exp2f(s[4 * nb + 2 * r + e] - mn);
                    s[4 * nb + 2 * r + e] = p;
                    sum += p;
                }
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                o[4 * i + 2 * r] *= alpha;
                o[4 * i + 2 * r + 1] *= alpha;
            }
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
        for (int kk = 0; kk < 4; ++kk) {
            if constexpr (D == 64)
                fa_wgmma_rs_n64(o, a[kk], fa_desc(sV + kk * 16 * 64, FA_TILE * 128));
            else
                fa_wgmma_rs_n128(o, a[kk], fa_desc(sV + kk * 16 * 64, FA_TILE * 128));
        }
        fa_wg_commit();
        fa_wg_wait0();
        fa_pin<D / 2>(o);
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
