// AdamW, and the sum of squares of gradient clipping.
//
// adamw_step, per element i < n of param, grad, m, v [n] (param, m, v updated in place, grad
// read only):
//   g  = grad_scale grad                        (1 / global target count times the clip factor)
//   m  = beta1 m + (1 - beta1) g                (first moment)
//   v  = beta2 v + (1 - beta2) g^2              (second moment)
//   m̂  = m / bc1,  v̂ = v / bc2                  (bias corrections bc = 1 - beta^step, computed
//                                                on the host in f64 and passed as f32)
//   p -= lr (m̂ / (sqrt(v̂) + eps) + weight_decay p)   (decoupled weight decay)
// Each line is the CPU's, in the same order, in f32 (IEEE division and sqrt: no fast math).
// adamw_step_copy also stores the new p into `working` (the GEMMs' bf16 copy, rounded to nearest
// even): one pass instead of a second kernel re-reading all of p.
// Launch: grid-stride over a 64-bit n, at most 65536 blocks of 256 threads.
//
// sum_squares_partial: partials[b] = sum of x[i]^2 over the i that block b's threads visit
// (grid-stride), overwritten. Squares and sums are in f64 (as the CPU's), the block reduction
// in a fixed shuffle pattern, so for a given grid each partial is bitwise reproducible; the
// host sums the partials of every buffer in a fixed order (ops/adamw.rs). Launch: 256
// threads, min(ceil(n / 256), 1024) blocks, a function of n only.

__device__ __forceinline__ float adamw_one(float* param, const float* grad, float* m, float* v,
                                           long long i, float lr, float beta1, float beta2,
                                           float eps, float weight_decay, float grad_scale,
                                           float bc1, float bc2) {
    float g = grad_scale * grad[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * g;      // first moment
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;  // second moment
    m[i] = mi;
    v[i] = vi;
    float m_hat = mi / bc1;  // bias corrections
    float v_hat = vi / bc2;
    float p = param[i];
    p = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
    param[i] = p;
    return p;
}

extern "C" __global__ void adamw_step(float* param, const float* grad, float* m, float* v,
                                      long long n, float lr, float beta1, float beta2, float eps,
                                      float weight_decay, float grad_scale, float bc1,
                                      float bc2) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        adamw_one(param, grad, m, v, i, lr, beta1, beta2, eps, weight_decay, grad_scale, bc1, bc2);
}

extern "C" __global__ void adamw_step_copy(float* param, const float* grad, float* m, float* v,
                                           Ten working, long long n, float lr, float beta1,
                                           float beta2, float eps, float weight_decay,
                                           float grad_scale, float bc1, float bc2) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        st(working, i,
           adamw_one(param, grad, m, v, i, lr, beta1, beta2, eps, weight_decay, grad_scale, bc1,
                     bc2));
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void sum_squares_partial(double* partials, const float* x, long long n) {
    __shared__ double scratch[32];
    long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double xi = (double)x[i];
        acc += xi * xi;
    }
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
