// Element-wise ops and bias (every float tensor a `Ten`: f32 or bf16 storage, f32 math).
//   add_inplace:       acc[i] += x[i]                            (i < n; +=, the residual)
//   scale_inplace:     buf[i] *= s                               (i < n; in place)
//   convert:           dst[i] = src[i]                           (i < n; between precisions)
//   bias_add_forward:  out[t, o] += bias[o]                      (out [T, OC])
//   bias_add_backward: dbias[o] += sum_t dout[t, o]               (+=, one thread per column)
// The n-element kernels: grid-stride loops over a 64-bit n, launched with at most 65536
// blocks of 256 threads (ops/elementwise.rs).

extern "C" __global__ void add_inplace(Ten acc, Ten x, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        st(acc, i, ld(acc, i) + ld(x, i));
}

extern "C" __global__ void scale_inplace(Ten buf, long long n, float s) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        st(buf, i, ld(buf, i) * s);
}

extern "C" __global__ void convert(Ten dst, Ten src, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        st(dst, i, ld(src, i));
}

extern "C" __global__ void bias_add_forward(Ten out, Ten bias, int T, int OC) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)T * OC) st(out, i, ld(out, i) + ld(bias, i % OC));
}

extern "C" __global__ void bias_add_backward(Ten dbias, Ten dout, int T, int OC) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= OC) return;
    float s = 0.0f;
    for (int t = 0; t < T; t++) s += ld(dout, (long long)t * OC + o);
    st(dbias, o, ld(dbias, o) + s);
}
