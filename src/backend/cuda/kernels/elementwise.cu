// Element-wise ops and bias.
//   add_inplace:       acc[i] += x[i]                            (i < n; +=, the residual)
//   scale_inplace:     buf[i] *= s                               (i < n; in place)
//   bias_add_forward:  out[t, o] += bias[o]                      (out [T, OC])
//   bias_add_backward: dbias[o] += sum_t dout[t, o]               (+=, one thread per column)
// add_inplace and scale_inplace: grid-stride loops over a 64-bit n, launched with at most
// 65536 blocks of 256 threads (ops/elementwise.rs).

extern "C" __global__ void add_inplace(float* acc, const float* x, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        acc[i] += x[i];
}

extern "C" __global__ void scale_inplace(float* buf, long long n, float s) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        buf[i] *= s;
}

extern "C" __global__ void bias_add_forward(float* out, const float* bias, int T, int OC) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)T * OC) out[i] += bias[i % OC];
}

extern "C" __global__ void bias_add_backward(float* dbias, const float* dout, int T, int OC) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= OC) return;
    float s = 0.0f;
    for (int t = 0; t < T; t++) s += dout[(long)t * OC + o];
    dbias[o] += s;
}
