// RMSNorm.
//
// Shapes: x, out, dout, dx [T, C]; weight, dweight [C]; rstd [T] (saved for the backward).
//   forward:  rstd[t]   = 1 / sqrt(mean_c x[t, c]^2 + eps)
//             out[t, c] = x[t, c] rstd[t] weight[c]                  out, rstd overwritten
//   backward: with g = dout, gw[c] = g[t, c] weight[c],
//             dx[t, c]   += rstd[t] gw[c] - rstd[t]^3 x[t, c] (sum_k gw[k] x[t, k]) / C
//             dweight[c] += sum_t g[t, c] x[t, c] rstd[t]
//   dx += (the residual stream), dweight += (a weight gradient).
//
// Kernels and launches:
//   rmsnorm_forward, rmsnorm_backward_dx: one warp per row (blocks of 8 warps, grid
//     ceil(T / 8)); lanes stride the row (coalesced), the row sum is a warp_sum. The row is
//     read twice (sum, then write); the second pass mostly hits L1/L2.
//   rmsnorm_backward_dweight_partial: grid (ceil(C / 128), ceil(T / ROWS)), one thread per
//     column of a block of ROWS = 256 rows, summing over its rows in ascending t into
//     partial[block, c] (overwritten, a [ceil(T / ROWS), C] scratch).
//   rmsnorm_backward_dweight_reduce: one thread per column, dweight[c] += the partials in
//     block order.
//   dweight is therefore deterministic, in the same order as the CPU reference (blocks of 256
//   rows, t ascending within a block, blocks added in order); no atomics anywhere.
// Considered, not measured: one thread per column looping over all T (as bias_add_backward):
//   simpler, but only C threads in flight (16 blocks of 128 at C = 2048) each walking T rows.
// The math is fp32 throughout; 1 / sqrtf (IEEE) rather than rsqrtf, as the CPU.

#define RMSNORM_ROWS 256  // rows per dweight partial; must equal ROWS in ops/rmsnorm.rs

extern "C" __global__ void rmsnorm_forward(Ten out, Ten rstd, Ten x, Ten weight, int T, int C,
                                           float eps) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    long long row = (long long)t * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = ld(x, row + c);
        ss += v * v;
    }
    ss = warp_sum(ss);
    float rs = 1.0f / sqrtf(ss * (1.0f / (float)C) + eps);
    if (lane == 0) st(rstd, t, rs);
    for (int c = lane; c < C; c += 32) st(out, row + c, ld(x, row + c) * rs * ld(weight, c));
}

extern "C" __global__ void rmsnorm_backward_dx(Ten dx, Ten dout, Ten x, Ten weight, Ten rstd,
                                               int T, int C) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    long long row = (long long)t * C;
    // sum_k g[k] w[k] x[k]
    float dot = 0.0f;
    for (int c = lane; c < C; c += 32) dot += ld(dout, row + c) * ld(weight, c) * ld(x, row + c);
    dot = warp_sum(dot);
    float rs = ld(rstd, t);
    float k = rs * rs * rs * dot * (1.0f / (float)C);
    for (int c = lane; c < C; c += 32) {
        long long i = row + c;
        st(dx, i, ld(dx, i) + rs * ld(dout, i) * ld(weight, c) - k * ld(x, i));
    }
}

// partial is an f32 scratch the launcher allocates.
extern "C" __global__ void rmsnorm_backward_dweight_partial(float* partial, Ten dout, Ten x,
                                                            Ten rstd, int T, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int t0 = blockIdx.y * RMSNORM_ROWS;
    int t1 = min(T, t0 + RMSNORM_ROWS);
    float acc = 0.0f;
    for (int t = t0; t < t1; t++) {
        long long i = (long long)t * C + c;
        acc += ld(dout, i) * ld(x, i) * ld(rstd, t);
    }
    partial[(long long)blockIdx.y * C + c] = acc;
}

extern "C" __global__ void rmsnorm_backward_dweight_reduce(Ten dweight, const float* partial,
                                                           int blocks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float d = ld(dweight, c);
    for (int b = 0; b < blocks; b++) d += partial[(long long)b * C + c];
    st(dweight, c, d);
}
