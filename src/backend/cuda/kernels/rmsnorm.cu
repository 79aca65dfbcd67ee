// RMSNorm.
//
// Shapes: x, out, dout, dx [T, C]; weight, dweight [C]; rstd [T] (saved for the backward).
//   forward:  rstd[t]   = 1 / sqrt(mean_c x[t, c]^2 + eps)
//             out[t, c] = x[t, c] rstd[t] weight[c]                  out, rstd overwritten
//   backward: with g = dout, gw[c] = g[t, c] weight[c],
//             dx[t, c]   += rstd[t] gw[c] - rstd[t]^3 x[t, c] (sum_k gw[k] x[t, k]) / C
//             dweight[c] += sum_t g[t, c] x[t, c] rstd[t]
//             dx_copy[t, c] = the new dx[t, c] (optional: dx_copy.p == nullptr skips it)
//   dx += (the residual stream), dweight += (a weight gradient), dx_copy overwritten.
//   The new dx is rounded to dx's precision first (a no-op for the model's f32 dres), so the
//   copy is what a later `ld` of dx returns, rounded to the copy's precision: for a bf16 copy
//   of an f32 dx the same bits as converting dx afterwards (elementwise `convert`), without
//   reading dx again. The model's Wo and Wdown backward GEMMs take that copy as their operand.
//
// Kernels and launches:
//   rmsnorm_forward, rmsnorm_backward_dx (and their `_vec8` twins): one warp per row (blocks
//     of 8 warps, grid ceil(T / 8)); the row sum is a warp_sum. The row is read twice (sum,
//     then write); the second pass mostly hits L1/L2.
//   Row layouts: the scalar kernels stride the row by lane (c = lane, lane + 32, ...); the
//     `_vec8` kernels (C % 8 == 0 and 16-byte aligned buffers; ops/rmsnorm.rs decides, from C
//     and the alignment only, never the dtypes) give each lane 8 consecutive columns per 256
//     (c = 8 lane + 256 k + j),
//     moved with 16-byte accesses (ld8/st8). A lane's partial sum runs k, then j ascending.
//     Why: the scalar kernels move bf16 2 bytes per access (rmsnorm_forward 92 us,
//     rmsnorm_backward_dx 216 us at T = 16384, C = 2048 on an H100).
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

// 1 / sqrt(mean of squares + eps) from a lane's partial sum of squares (all lanes get it).
__device__ __forceinline__ float rmsnorm_rstd(float ss, int C, float eps) {
    ss = warp_sum(ss);
    return 1.0f / sqrtf(ss * (1.0f / (float)C) + eps);
}

extern "C" __global__ void rmsnorm_forward(Ten out, Ten rstd, Ten x, Ten weight, int T, int C,
                                           float eps) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    long long row = (long long)t * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = ld(x, row + c);
        ss = fmaf(v, v, ss);
    }
    float rs = rmsnorm_rstd(ss, C, eps);
    if (lane == 0) st(rstd, t, rs);
    for (int c = lane; c < C; c += 32) st(out, row + c, ld(x, row + c) * rs * ld(weight, c));
}

extern "C" __global__ void rmsnorm_forward_vec8(Ten out, Ten rstd, Ten x, Ten weight, int T,
                                                int C, float eps) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    long long row = (long long)t * C;
    float ss = 0.0f, v[8], w[8];
    for (int c = lane * 8; c < C; c += 256) {
        ld8(x, row + c, v);
#pragma unroll
        for (int j = 0; j < 8; j++) ss = fmaf(v[j], v[j], ss);
    }
    float rs = rmsnorm_rstd(ss, C, eps);
    if (lane == 0) st(rstd, t, rs);
    for (int c = lane * 8; c < C; c += 256) {
        ld8(x, row + c, v);
        ld8(weight, c, w);
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = v[j] * rs * w[j];
        st8(out, row + c, v);
    }
}

extern "C" __global__ void rmsnorm_backward_dx(Ten dx, Ten dx_copy, Ten dout, Ten x, Ten weight,
                                               Ten rstd, int T, int C) {
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
        float v = rnd(dx, ld(dx, i) + rs * ld(dout, i) * ld(weight, c) - k * ld(x, i));
        st(dx, i, v);
        if (dx_copy.p) st(dx_copy, i, v);
    }
}

extern "C" __global__ void rmsnorm_backward_dx_vec8(Ten dx, Ten dx_copy, Ten dout, Ten x,
                                                    Ten weight, Ten rstd, int T, int C) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    long long row = (long long)t * C;
    float g[8], w[8], v[8], d[8];
    // sum_k g[k] w[k] x[k]
    float dot = 0.0f;
    for (int c = lane * 8; c < C; c += 256) {
        ld8(dout, row + c, g);
        ld8(weight, c, w);
        ld8(x, row + c, v);
#pragma unroll
        for (int j = 0; j < 8; j++) dot += g[j] * w[j] * v[j];
    }
    dot = warp_sum(dot);
    float rs = ld(rstd, t);
    float k = rs * rs * rs * dot * (1.0f / (float)C);
    for (int c = lane * 8; c < C; c += 256) {
        long long i = row + c;
        ld8(dx, i, d);
        ld8(dout, i, g);
        ld8(weight, c, w);
        ld8(x, i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) d[j] = rnd(dx, d[j] + rs * g[j] * w[j] - k * v[j]);
        st8(dx, i, d);  // already rounded: stored exactly
        if (dx_copy.p) st8(dx_copy, i, d);
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
