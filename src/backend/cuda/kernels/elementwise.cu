// Element-wise ops and bias.
//   bias_add_forward:  out[t, o] += bias[o]                      (out [T, OC])
//   bias_add_backward: dbias[o] += sum_t dout[t, o]               (+=, one thread per column)

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
