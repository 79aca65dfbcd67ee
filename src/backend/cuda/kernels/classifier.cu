// Softmax cross-entropy over the logits of one chunk of rows (see ops/classifier.rs; the
// GEMMs around it run on cuBLAS).
//
// logits [bt, V] f32 (row r = packed token r0 + r), targets [T] (i32, < 0 = ignore), losses
// [T]. Per row, with z = logits[r], tg = targets[r0 + r]:
//   losses[r0 + r] = log sum_j exp z_j - z_tg                  (0 if tg < 0)
//   with grads: dlogits[r, j] = loss_scale (softmax(z)_j - [j == tg])   (all 0 if tg < 0)
// dlogits [bt, V] is f32 or bf16 (the precision of the GEMM operands that read it next); when
// it is the logits buffer itself, each thread reads z_j before it overwrites it.
// One block of CLS_THREADS per row.

#define CLS_THREADS 512
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
