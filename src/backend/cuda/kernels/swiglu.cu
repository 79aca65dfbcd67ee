// SwiGLU.
//
// Shapes: gate_up, dgate_up [T, 2F] (gate in columns 0..F, up in F..2F of each row);
// out, dout [T, F]. Nothing extra is saved: the backward reads gate_up again.
//   swiglu_forward:  s = sigmoid(gate), silu = gate s,  out = silu up            overwritten
//   swiglu_backward: dgate = dout up s (1 + gate (1 - s)),  dup = dout silu   overwritten
//                    and, when the optional `out` is present (out.p != nullptr), out = silu up
//                    as the forward computes it ((gate s) up, bitwise the forward's value),
//                    overwritten: the model's Wdown weight gradient reads it, and the forward
//                    does not keep it. One more store of a value already in registers, instead
//                    of a separate forward pass re-reading gate_up (T 2F) and writing out.
// sigmoid(x) = 1 / (1 + expf(-x)) with the precise expf (the CPU uses a 2-ulp Cephes exp):
// x < -88 gives expf = inf, s = 0, as on the CPU.
//
// Launch (both): grid (T, ceil(F / blockDim.x)), one thread per (t, f): row t is blockIdx.x
// (no integer division); gate, up, out and the two halves of dgate_up are each read or
// written by 32 consecutive elements per warp.
// The `_vec8` kernels (F % 8 == 0, 16-byte aligned buffers; ops/swiglu.rs decides): grid
// (T, ceil(F / 8 / blockDim.x)), one thread per 8 consecutive f of row t, every tensor moved
// with 16-byte accesses (`ld8`/`st8`). Same f32 math per element as the scalar kernels, so
// the results are bitwise the same. Why: the scalar kernels issue one 2-byte access per
// tensor per thread on bf16, which keeps far more loads in flight per byte than the memory
// system needs (337 us forward / 419 us backward at T = 16384, F = 5632 on an H100, well
// under its bandwidth).

__device__ __forceinline__ float swiglu_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_forward(Ten out, Ten gate_up, int T, int F) {
    int t = blockIdx.x;
    int f = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || f >= F) return;
    long long row2 = (long long)t * 2 * F;
    float g = ld(gate_up, row2 + f), u = ld(gate_up, row2 + F + f);
    st(out, (long long)t * F + f, g * swiglu_sigmoid(g) * u);
}

extern "C" __global__ void swiglu_backward(Ten dgate_up, Ten out, Ten dout, Ten gate_up, int T,
                                           int F) {
    int t = blockIdx.x;
    int f = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || f >= F) return;
    long long row2 = (long long)t * 2 * F;
    float g = ld(gate_up, row2 + f), u = ld(gate_up, row2 + F + f);
    float d = ld(dout, (long long)t * F + f);
    float s = swiglu_sigmoid(g);
    st(dgate_up, row2 + f, d * u * s * (1.0f + g * (1.0f - s)));
    st(dgate_up, row2 + F + f, d * g * s);
    if (out.p) st(out, (long long)t * F + f, g * s * u);
}

extern "C" __global__ void swiglu_forward_vec8(Ten out, Ten gate_up, int T, int F) {
    int t = blockIdx.x;
    int f = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (t >= T || f >= F) return;
    long long row2 = (long long)t * 2 * F;
    float g[8], u[8], o[8];
    ld8(gate_up, row2 + f, g);
    ld8(gate_up, row2 + F + f, u);
#pragma unroll
    for (int k = 0; k < 8; k++) o[k] = g[k] * swiglu_sigmoid(g[k]) * u[k];
    st8(out, (long long)t * F + f, o);
}

extern "C" __global__ void swiglu_backward_vec8(Ten dgate_up, Ten out, Ten dout, Ten gate_up,
                                                int T, int F) {
    int t = blockIdx.x;
    int f = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (t >= T || f >= F) return;
    long long row2 = (long long)t * 2 * F;
    float g[8], u[8], d[8], dg[8], du[8];
    ld8(gate_up, row2 + f, g);
    ld8(gate_up, row2 + F + f, u);
    ld8(dout, (long long)t * F + f, d);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float s = swiglu_sigmoid(g[k]);
        dg[k] = d[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
        du[k] = d[k] * g[k] * s;
        g[k] = g[k] * s * u[k];  // out = silu up; g[k] is not read again
    }
    st8(dgate_up, row2 + f, dg);
    st8(dgate_up, row2 + F + f, du);
    if (out.p) st8(out, (long long)t * F + f, g);
}
