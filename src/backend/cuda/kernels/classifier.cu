// Softmax cross-entropy over the logits of one chunk of rows (see ops/classifier.rs; the
// GEMMs around it run on cuBLAS).
//
// logits [bt, V] f32 (row r = packed token r0 + r), targets [T] (i32, < 0 = ignore), losses
// [T]. Per row, with z = logits[r], tg = targets[r0 + r], mx = max_j z_j:
//   losses[r0 + r] = mx + log sum_j exp(z_j - mx) - z_tg        (0 if tg < 0)
//   with grads: dlogits[r, j] = loss_scale (softmax(z)_j - [j == tg])   (all 0 if tg < 0)
//     computed as p = exp(z_j - mx) (loss_scale / sum), then p - loss_scale at j == tg.
// dlogits [bt, V] is f32 or bf16 (the precision of the GEMM operands that read it next); when
// it is the logits buffer itself (f32), every read of a row comes before the block barriers
// and every write after them. losses, dlogits overwritten. expf / logf are the precise ones.
//
// Kernels, one block of CLS_THREADS per row:
//   classifier_xent_vec4 (V % 4 == 0, V <= 4 CLS_VEC4 CLS_THREADS = 32768, 16-byte aligned
//     logits and dlogits; ops/classifier.rs decides): the row lives in registers. Thread i
//     holds float4 i, i + CLS_THREADS, ... (CLS_VEC4 = 16 slots, the loads all issued before
//     the first use: the whole row in flight); block max; exp(z - mx) in place and its block
//     sum (a thread's part summed slot by slot, x y z w); then dlogits straight from the
//     registers (float4 stores for f32, 8-byte stores of 4 bf16) and the loss. The logits
//     are read once from DRAM and each exp is taken once. 104 registers, no spills (ptxas
//     13.0, sm_90a): one block per SM, so a row's phases (load, reduce, exp, store) do not
//     overlap on its SM, but the SMs drift apart and HBM stays busy. 221 us per 4194 x 32000
//     chunk (f32 logits, bf16 dlogits) against the streaming kernel's 579 us, same run on an
//     H200 (3.6 TB/s).
//   classifier_xent (any V and alignment): one pass of a per-thread online max and sum of
//     exp (rescaling the sum when the max grows), then a second read of the row for dlogits
//     with a second exp, scalar 4-byte loads. 622 us per chunk of 4194 rows at V = 32000 on
//     an H100 (537 MB of f32 logits read, 268 MB of bf16 dlogits written: ~1.3 TB/s), which
//     is why the register kernel exists.
// The two sum exp(z - mx) in different orders (the online one per thread with rescaling), so
// their losses and dlogits agree to f32 rounding, not bitwise.

#define CLS_THREADS 512  // must equal THREADS in ops/classifier.rs
#define CLS_VEC4 16      // float4 per thread of classifier_xent_vec4; must equal VEC4 there
// -inf (NVRTC has no math.h, so no INFINITY).
#define CLS_NEG_INF (__int_as_float((int)0xff800000))

// Block-wide max / sum with the result broadcast to every thread. `sh` holds 33 floats.
__device__ __forceinline__ float cls_block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < nw) ? sh[lane] : CLS_NEG_INF;
        v = warp_max(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

__device__ __forceinline__ float cls_block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < nw) ? sh[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

extern "C" __global__ void __launch_bounds__(CLS_THREADS)
    classifier_xent(const float* logits, Ten dlogits, Ten losses,
                    const int* __restrict__ targets, int r0, int V, float loss_scale,
                    int with_grads) {
    __shared__ float sh[33];
    int r = blockIdx.x;
    const float* row = logits + (size_t)r * V;
    long long drow = (long long)r * V;
    int tg = targets[r0 + r];
    if (tg < 0) {  // the whole block leaves together: no barrier is skipped
        if (threadIdx.x == 0) st(losses, r0 + r, 0.0f);
        if (with_grads)
            for (int j = threadIdx.x; j < V; j += blockDim.x) st(dlogits, drow + j, 0.0f);
        return;
    }
    // Read before the barriers inside the reductions; the row is written only after them.
    float zt = row[tg];

    // One pass: per-thread running max m and sum z of exp(x - m).
    float m = CLS_NEG_INF, z = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float x = row[j];
        if (x > m) {
            z = z * expf(m - x) + 1.0f;
            m = x;
        } else {
            z += expf(x - m);
        }
    }
    float mx = cls_block_max(m, sh);
    float zs = (m == CLS_NEG_INF) ? 0.0f : z * expf(m - mx);
    float sum = cls_block_sum(zs, sh);
    if (threadIdx.x == 0) st(losses, r0 + r, mx + logf(sum) - zt);
    if (with_grads) {
        float k = loss_scale / sum;
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            float p = expf(row[j] - mx) * k;
            st(dlogits, drow + j, (j == tg) ? p - loss_scale : p);
        }
    }
}

// Four dlogits j..j+4 (j % 4 == 0, 16-byte aligned base): one 16-byte f32 store or one 8-byte
// store of four bf16, each rounded as `st` rounds.
__device__ __forceinline__ void cls_st4(const Ten& t, long long j, float4 v) {
    if (t.bf16) {
        __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
        uint2 u = make_uint2(*reinterpret_cast<unsigned*>(&lo), *reinterpret_cast<unsigned*>(&hi));
        *reinterpret_cast<uint2*>(reinterpret_cast<__nv_bfloat16*>(t.p) + j) = u;
    } else {
        *reinterpret_cast<float4*>(reinterpret_cast<float*>(t.p) + j) = v;
    }
}

// Launched with exactly CLS_THREADS threads (the row layout assumes it).
extern "C" __global__ void __launch_bounds__(CLS_THREADS, 1)
    classifier_xent_vec4(const float* logits, Ten dlogits, Ten losses,
                         const int* __restrict__ targets, int r0, int V, float loss_scale,
                         int with_grads) {
    __shared__ float sh[33];
    int r = blockIdx.x, V4 = V >> 2;
    const float4* row = reinterpret_cast<const float4*>(logits + (size_t)r * V);
    long long drow = (long long)r * V;
    int tg = targets[r0 + r];
    if (tg < 0) {  // the whole block leaves together: no barrier is skipped
        if (threadIdx.x == 0) st(losses, r0 + r, 0.0f);
        if (with_grads)
            for (int q = threadIdx.x; q < V4; q += CLS_THREADS)
                cls_st4(dlogits, drow + 4 * q, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
        return;
    }
    // Read before the barriers inside the reductions; the row is written only after them.
    float zt = threadIdx.x == 0 ? logits[(size_t)r * V + tg] : 0.0f;
    float4 x[CLS_VEC4];
#pragma unroll
    for (int k = 0; k < CLS_VEC4; k++) {
        int q = threadIdx.x + k * CLS_THREADS;
        x[k] = q < V4 ? row[q] : make_float4(CLS_NEG_INF, CLS_NEG_INF, CLS_NEG_INF, CLS_NEG_INF);
    }
    float m = CLS_NEG_INF;
#pragma unroll
    for (int k = 0; k < CLS_VEC4; k++)
        m = fmaxf(fmaxf(m, fmaxf(x[k].x, x[k].y)), fmaxf(x[k].z, x[k].w));
    float mx = cls_block_max(m, sh);
    // x becomes exp(x - mx); the thread's sum runs k ascending, then x, y, z, w.
    float z = 0.0f;
#pragma unroll
    for (int k = 0; k < CLS_VEC4; k++) {
        if (threadIdx.x + k * CLS_THREADS < V4) {
            x[k].x = expf(x[k].x - mx);
            x[k].y = expf(x[k].y - mx);
            x[k].z = expf(x[k].z - mx);
            x[k].w = expf(x[k].w - mx);
            z += x[k].x;
            z += x[k].y;
            z += x[k].z;
            z += x[k].w;
        }
    }
    float sum = cls_block_sum(z, sh);
    if (threadIdx.x == 0) st(losses, r0 + r, mx + logf(sum) - zt);
    if (with_grads) {
        float kp = loss_scale / sum;
#pragma unroll
        for (int k = 0; k < CLS_VEC4; k++) {
            int q = threadIdx.x + k * CLS_THREADS;
            if (q < V4) {
                float4 p = make_float4(x[k].x * kp, x[k].y * kp, x[k].z * kp, x[k].w * kp);
                int d = tg - 4 * q;  // the target's place in this float4, if any
                if (d == 0) p.x -= loss_scale;
                if (d == 1) p.y -= loss_scale;
                if (d == 2) p.z -= loss_scale;
                if (d == 3) p.w -= loss_scale;
                cls_st4(dlogits, drow + 4 * q, p);
            }
        }
    }
}
