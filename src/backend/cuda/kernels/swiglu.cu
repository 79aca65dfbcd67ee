// SwiGLU.
//
// Shapes: gate_up, dgate_up [T, 2F] (gate in columns 0..F, up in F..2F of each row);
// out, dout [T, F]. Nothing extra is saved: the backward reads gate_up again.
//   swiglu_forward:  s = sigmoid(gate), silu = gate s,  out = silu up            overwritten
//   swiglu_backward: dgate = dout up s (1 + gate (1 - s)),  dup = dout silu   overwritten
// sigmoid(x) = 1 / (1 + expf(-x)) with the precise expf (the CPU uses a 2-ulp Cephes exp):
// x < -88 gives expf = inf, s = 0, as on the CPU.
//
// Launch (both): grid (T, ceil(F / blockDim.x)), one thread per (t, f): row t is blockIdx.x
// (no integer division); gate, up, out and the two halves of dgate_up are each read or
// written by 32 consecutive floats per warp.

__device__ __forceinline__ float swiglu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_forward(float* out, const float* gate_up, int T, int F) {
    int t = blockIdx.x;
    int f = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || f >= F) return;
    const float* gu = gate_up + (long)t * 2 * F;
    float g = gu[f], u = gu[F + f];
    out[(long)t * F + f] = g * swiglu_sigmoid(g) * u;
}

extern "C" __global__ void swiglu_backward(float* dgate_up, const float* dout,
                                           const float* gate_up, int T, int F) {
    int t = blockIdx.x;
    int f = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || f >= F) return;
    long row2 = (long)t * 2 * F;
    float g = gate_up[row2 + f], u = gate_up[row2 + F + f];
    float d = dout[(long)t * F + f];
    float s = swiglu_sigmoid(g);
    dgate_up[row2 + f] = d * u * s * (1.0f + g * (1.0f - s));
    dgate_up[row2 + F + f] = d * g * s;
}
