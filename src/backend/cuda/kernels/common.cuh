// Shared by every kernel file (NVRTC pastes it in front of each one).
// Shape letters: T packed tokens, C width, H/Hkv heads, D head dim, QKV = (H + 2 Hkv) D,
// F SwiGLU width, V vocabulary. Buffers are row-major; indices are i32.
#pragma once
#include <cuda_bf16.h>

// A float tensor whose storage is f32 or bf16, chosen per buffer at run time (Rust: `Ten` in
// buf.rs, same 16-byte layout). Kernels do their math in f32: `ld` widens, `st` rounds to
// nearest even. The dtype test is uniform across a launch, so the branch costs no divergence.
// An optional output that is absent comes as p == nullptr (`CudaBackend::ten_opt`); kernels
// test `t.p` (uniform too) and skip its stores.
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

// The value `v` becomes when stored into `t` (bf16: rounded to nearest even, then widened):
// what a later `ld` of that element returns.
__device__ __forceinline__ float rnd(const Ten& t, float v) {
    return t.bf16 ? __bfloat162float(__float2bfloat16_rn(v)) : v;
}

// Eight consecutive elements i..i+8 in one go: one 16-byte load/store for bf16, two for f32.
// Needs i % 8 == 0 and a 16-byte aligned base (launchers check both; allocations are
// 256-byte aligned), so the vector access is aligned in either precision. Same values as
// eight `ld` / `st` calls.
__device__ __forceinline__ void ld8(const Ten& t, long long i, float v[8]) {
    if (t.bf16) {
        uint4 r = *reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(t.p) + i);
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            v[2 * k] = f.x;
            v[2 * k + 1] = f.y;
        }
    } else {
        const float4* q = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(t.p) + i);
        float4 a = q[0], b = q[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
}

__device__ __forceinline__ void st8(const Ten& t, long long i, const float v[8]) {
    if (t.bf16) {
        uint4 r;
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(t.p) + i) = r;
    } else {
        float4* q = reinterpret_cast<float4*>(reinterpret_cast<float*>(t.p) + i);
        q[0] = make_float4(v[0], v[1], v[2], v[3]);
        q[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
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

// One RoPE pair (x1, x2) = (x[j], x[j + D/2]) rotated by the angle with cosine c and sine s:
// rope.cu's math and rounding (see its "Rounding"), shared with the flash backward kernels
// that fuse RoPE's backward.
__device__ __forceinline__ void rope_pair(float& x1, float& x2, float c, float s) {
    float y1 = __fmaf_rn(x1, c, -__fmul_rn(x2, s));
    float y2 = __fmaf_rn(x1, s, __fmul_rn(x2, c));
    x1 = y1;
    x2 = y2;
}
