// Shared by every kernel file (NVRTC pastes it in front of each one).
// Shape letters: T packed tokens, C width, H/Hkv heads, D head dim, QKV = (H + 2 Hkv) D,
// F SwiGLU width, V vocabulary. Buffers are row-major; indices are i32.
#pragma once
#include <cuda_bf16.h>

// A float tensor whose storage is f32 or bf16, chosen per buffer at run time (Rust: `Ten` in
// buf.rs, same 16-byte layout). Kernels do their math in f32: `ld` widens, `st` rounds to
// nearest even. The dtype test is uniform across a launch, so the branch costs no divergence.
struct Ten {
    void* p;
    int bf16;
    int pad;
};

__device__ __forceinline__ float ld(const Ten& t, long long i) {
    return t.bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(t.p)[i])
                  : reinterpret_cast<const float*>(t.p)[i];
}

__device__ __forceinline__ void st(const Ten& t, long long i, float v) {
    if (t.bf16)
        reinterpret_cast<__nv_bfloat16*>(t.p)[i] = __float2bfloat16_rn(v);
    else
        reinterpret_cast<float*>(t.p)[i] = v;
}

// Sum over a warp (all 32 lanes get the result).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max over a warp (all 32 lanes get the result).
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads; `scratch` holds 32 floats of shared memory.
// Every thread gets the result: each warp re-reads all the warp partials.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
