// AdamW, and the sum of squares of gradient clipping.
//
// adamw_step, per element i < n of param, grad, m, v [n] (param, m, v updated in place, grad
// read only; grad f32, or bf16 when a single micro-step's GEMMs wrote it so):
//   g  = grad_scale grad                        (1 / global target count times the clip factor)
//   m  = beta1 m + (1 - beta1) g                (first moment)
//   v  = beta2 v + (1 - beta2) g^2              (second moment)
//   m̂  = m / bc1,  v̂ = v / bc2                  (bias corrections bc = 1 - beta^step, computed
//                                                on the host in f64 and passed as f32)
//   p -= lr (m̂ / (sqrt(v̂) + eps) + weight_decay p)   (decoupled weight decay)
// Each line is the CPU's, in the same order, in f32 (IEEE division and sqrt: no fast math).
// adamw_step_copy also stores the new p into `working` (the GEMMs' bf16 copy, rounded to nearest
// even): one pass instead of a second kernel re-reading all of p.
// Launch: grid-stride over a 64-bit n, at most 65536 blocks of 256 threads (adamw_step_vec8:
// over n / 8 groups of 8).
//
// sum_squares_partial: partials[b] = sum of x[i]^2 over the i that block b's threads visit
// (grid-stride), overwritten; x f32 (sum_squares_partial_vec4 reads float4s) or bf16
// (sum_squares_partial_bf16, sum_squares_partial_bf16x8: 8 per 16-byte load; bf16 weight
// gradients). Squares and sums are in f64 (as the CPU's), the block reduction
// in a fixed shuffle pattern, so for a given grid each partial is bitwise reproducible; the
// host sums the partials of every buffer in a fixed order (ops/adamw.rs). Launch: 256
// threads, min(ceil(n / 256), 1024) blocks, a function of n only (also for the vec4 twin).

// The update of one element held in registers (the scalar and the vec8 kernels share it, so
// both compute the same bits).
__device__ __forceinline__ void adamw_math(float& p, float grad, float& m, float& v, float lr,
                                           float beta1, float beta2, float eps,
                                           float weight_decay, float grad_scale, float bc1,
                                           float bc2) {
    float g = grad_scale * grad;
    m = beta1 * m + (1.0f - beta1) * g;      // first moment
    v = beta2 * v + (1.0f - beta2) * g * g;  // second moment
    float m_hat = m / bc1;                   // bias corrections
    float v_hat = v / bc2;
    p = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
}

__device__ __forceinline__ float adamw_one(float* param, const Ten& grad, float* m, float* v,
                                           long long i, float lr, float beta1, float beta2,
                                           float eps, float weight_decay, float grad_scale,
                                           float bc1, float bc2) {
    float p = param[i], mi = m[i], vi = v[i];
    adamw_math(p, ld(grad, i), mi, vi, lr, beta1, beta2, eps, weight_decay, grad_scale, bc1, bc2);
    m[i] = mi;
    v[i] = vi;
    param[i] = p;
    return p;
}

extern "C" __global__ void adamw_step(float* param, Ten grad, float* m, float* v,
                                      long long n, float lr, float beta1, float beta2, float eps,
                                      float weight_decay, float grad_scale, float bc1,
                                      float bc2) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        adamw_one(param, grad, m, v, i, lr, beta1, beta2, eps, weight_decay, grad_scale, bc1, bc2);
}

extern "C" __global__ void adamw_step_copy(float* param, Ten grad, float* m, float* v,
                                           Ten working, long long n, float lr, float beta1,
                                           float beta2, float eps, float weight_decay,
                                           float grad_scale, float bc1, float bc2) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        st(working, i,
           adamw_one(param, grad, m, v, i, lr, beta1, beta2, eps, weight_decay, grad_scale, bc1,
                     bc2));
}

// adamw_step(_copy) over 8 consecutive elements per thread and grid-stride step (n = 8 n8,
// 16-byte aligned buffers: ops/adamw.rs checks): 16-byte accesses put four times the bytes in
// flight per instruction of the scalar kernels (which reached ~2.6 TB/s on an H100).
// `working` absent (p == nullptr) skips the copy.
__device__ __forceinline__ void ld8f(const float* p, long long e, float x[8]) {
    const float4* q = reinterpret_cast<const float4*>(p + e);
    float4 a = q[0], b = q[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
__device__ __forceinline__ void st8f(float* p, long long e, const float x[8]) {
    float4* q = reinterpret_cast<float4*>(p + e);
    q[0] = make_float4(x[0], x[1], x[2], x[3]);
    q[1] = make_float4(x[4], x[5], x[6], x[7]);
}

// Elements e .. e + 8 of one tensor (the vec8 kernels' step).
__device__ __forceinline__ void adamw_eight(float* param, Ten grad, float* m, float* v,
                                            Ten working, long long e, float lr,
                                            float beta1, float beta2, float eps,
                                            float weight_decay, float grad_scale, float bc1,
                                            float bc2) {
    float p[8], g[8], mi[8], vi[8];
    ld8f(param, e, p);
    ld8(grad, e, g);
    ld8f(m, e, mi);
    ld8f(v, e, vi);
#pragma unroll
    for (int k = 0; k < 8; ++k)
        adamw_math(p[k], g[k], mi[k], vi[k], lr, beta1, beta2, eps, weight_decay, grad_scale,
                   bc1, bc2);
    st8f(param, e, p);
    st8f(m, e, mi);
    st8f(v, e, vi);
    if (working.p) st8(working, e, p);
}

extern "C" __global__ void adamw_step_vec8(float* param, Ten grad, float* m, float* v,
                                           Ten working, long long n8, float lr, float beta1,
                                           float beta2, float eps, float weight_decay,
                                           float grad_scale, float bc1, float bc2) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride)
        adamw_eight(param, grad, m, v, working, i * 8, lr, beta1, beta2, eps, weight_decay,
                    grad_scale, bc1, bc2);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ void ss_block_store(double* partials, double acc) {
    __shared__ double scratch[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    acc = warp_sum_f64(acc);
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nwarps = (blockDim.x + 31) >> 5;
        acc = lane < nwarps ? scratch[lane] : 0.0;
        acc = warp_sum_f64(acc);
        if (lane == 0) partials[blockIdx.x] = acc;
    }
}

extern "C" __global__ void sum_squares_partial(double* partials, const float* x, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double xi = (double)x[i];
        acc += xi * xi;
    }
    ss_block_store(partials, acc);
}

// The same partials' grid over n = 4 n4 elements read as float4 (16-byte aligned x): each
// thread adds its vectors' four squares in element order.
extern "C" __global__ void sum_squares_partial_vec4(double* partials, const float* x,
                                                    long long n4) {
    long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 q = reinterpret_cast<const float4*>(x)[i];
        double a = q.x, b = q.y, c = q.z, d = q.w;
        acc += a * a;
        acc += b * b;
        acc += c * c;
        acc += d * d;
    }
    ss_block_store(partials, acc);
}

// The partials of a bf16 x: scalar, and over n = 8 n8 elements read 8 per 16-byte load
// (16-byte aligned x); same grid as the f32 kernels, a thread adds its squares in element order.
extern "C" __global__ void sum_squares_partial_bf16(double* partials, const __nv_bfloat16* x,
                                                    long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double xi = (double)__bfloat162float(x[i]);
        acc += xi * xi;
    }
    ss_block_store(partials, acc);
}

extern "C" __global__ void sum_squares_partial_bf16x8(double* partials, const __nv_bfloat16* x,
                                                      long long n8) {
    long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
        uint4 r = reinterpret_cast<const uint4*>(x)[i];
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            double a = f.x, b = f.y;
            acc += a * a;
            acc += b * b;
        }
    }
    ss_block_store(partials, acc);
}

// Every tensor of an optimizer step in one launch (adamw_tensors_vec8, sum_squares_tensors):
// the tensors' 8-element groups are numbered one after the other (tensor k holds groups
// starts8[k] .. starts8[k + 1]; every n is a multiple of 8 and every buffer 16-byte aligned,
// which ops/adamw.rs checks, else it launches per tensor). A thread walks its groups
// grid-stride, so the tensor of its next group is at or after the one of its last group: a
// forward scan over starts8 (in shared memory) finds it. Why: 135 launches of one tensor
// each left the GPU idle between them and in each one's last wave (TinyLlama on an H100:
// 0.6 ms of an 11.2 ms update).
#define ADAMW_MAX_TENSORS 2048  // must equal MAX_TENSORS in ops/adamw.rs

// One tensor of adamw_tensors_vec8 (Rust: AdamWDesc in ops/adamw.rs, the same 64 bytes).
struct AdamWDesc {
    float* param;
    float* m;
    float* v;
    Ten grad;
    Ten working;  // p == nullptr: no working copy
    float weight_decay;
    int pad;
};

// The tensor holding group i, scanning forward from k (starts8 ascending, starts8[n] = total).
__device__ __forceinline__ int tensor_of(const long long* starts8, int k, long long i) {
    while (starts8[k + 1] <= i) k++;
    return k;
}

// starts8[0 ..= n] into the block's shared copy; returns the total number of groups.
__device__ __forceinline__ long long load_starts(long long* s_starts, const long long* starts8,
                                                 int n) {
    for (int k = threadIdx.x; k <= n; k += blockDim.x) s_starts[k] = starts8[k];
    __syncthreads();
    return s_starts[n];
}

extern "C" __global__ void adamw_tensors_vec8(const AdamWDesc* descs, const long long* starts8,
                                              int ntensors, float lr, float beta1, float beta2,
                                              float eps, float grad_scale, float bc1,
                                              float bc2) {
    __shared__ long long s_starts[ADAMW_MAX_TENSORS + 1];
    const long long total8 = load_starts(s_starts, starts8, ntensors);
    long long stride = (long long)gridDim.x * blockDim.x;
    int k = 0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total8; i += stride) {
        k = tensor_of(s_starts, k, i);
        const AdamWDesc& d = descs[k];
        adamw_eight(d.param, d.grad, d.m, d.v, d.working, (i - s_starts[k]) * 8, lr, beta1,
                    beta2, eps, d.weight_decay, grad_scale, bc1, bc2);
    }
}

// partials[b] = the sum of squares of the groups block b visits (grid-stride over all
// tensors' groups), in f64 as sum_squares_partial; the grid is a function of the tensors'
// sizes only, so the host's sum of the partials in block order is reproducible.
extern "C" __global__ void sum_squares_tensors(double* partials, const Ten* bufs,
                                               const long long* starts8, int ntensors) {
    __shared__ long long s_starts[ADAMW_MAX_TENSORS + 1];
    const long long total8 = load_starts(s_starts, starts8, ntensors);
    long long stride = (long long)gridDim.x * blockDim.x;
    int k = 0;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total8; i += stride) {
        k = tensor_of(s_starts, k, i);
        float x[8];
        ld8(bufs[k], (i - s_starts[k]) * 8, x);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            double xj = x[j];
            acc += xj * xj;
        }
    }
    ss_block_store(partials, acc);
}
