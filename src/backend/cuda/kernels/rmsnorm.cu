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
//   rmsnorm_backward_vec8 (the model's path: C % 8 == 0, aligned, 4 C floats of shared memory
//     per warp fit): dx as rmsnorm_backward_dx_vec8 and dweight's partials in the same pass.
//     Blocks of RMSNORM_FUSED_WARPS warps own RMSNORM_FUSED_ROWS consecutive rows; warp w
//     takes rows w, w + WARPS, ... ascending and adds g x rstd into its own shared row of C
//     floats (each lane only its own columns: no atomics, no races); at the end the block sums
//     the warps' rows in warp order into partial[block, c].
//     Why: a separate dweight pass re-read dout and x (6 bytes per element; 2.5 ms of
//     TinyLlama's step on an H100), which the dx pass has in registers anyway.
//   rmsnorm_backward_dweight_partial (the other layouts): grid (ceil(C / 128), ceil(T / ROWS)),
//     one thread per column of a block of ROWS = 256 rows, summing over its rows in ascending
//     t into partial[block, c].
//   rmsnorm_backward_dweight_reduce: dweight[c] += sum over b of partial[b, c]; a block of
//     32 columns x 32 lanes, lane y summing b = y, y + 32, ... ascending, then the 32 in order.
//   dweight is therefore deterministic (a fixed order that does not depend on scheduling); no
//   atomics anywhere. It is not the CPU reference's order (blocks of 256 rows, sequential
//   within each), so the two agree to rounding.
// Considered, not measured: one thread per column looping over all T (as bias_add_backward):
//   simpler, but only C threads in flight (16 blocks of 128 at C = 2048) each walking T rows.
// The math is fp32 throughout; 1 / sqrtf (IEEE) rather than rsqrtf, as the CPU.

#define RMSNORM_ROWS 256  // rows per dweight partial; must equal ROWS in ops/rmsnorm.rs
// The fused backward's block: must equal FUSED_WARPS and FUSED_ROWS in ops/rmsnorm.rs.
#define RMSNORM_FUSED_WARPS 4
#define RMSNORM_FUSED_ROWS 32
#define RMSNORM_REDUCE_COLS 32
#define RMSNORM_REDUCE_LANES 32

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

// One row t of the `_vec8` backward (one warp): dx += ..., dx_copy = dx; with dw_row (this
// warp's shared row of C floats) also dw_row[c] += g x rstd.
__device__ __forceinline__ void rmsnorm_backward_row_vec8(Ten dx, Ten dx_copy, Ten dout, Ten x,
                                                          Ten weight, Ten rstd, int t, int C,
                                                          float* dw_row) {
    int lane = threadIdx.x & 31;
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
        for (int j = 0; j < 8; j++) {
            d[j] = rnd(dx, d[j] + rs * g[j] * w[j] - k * v[j]);
            if (dw_row) dw_row[c + j] += g[j] * v[j] * rs;
        }
        st8(dx, i, d);  // already rounded: stored exactly
        if (dx_copy.p) st8(dx_copy, i, d);
    }
}

extern "C" __global__ void rmsnorm_backward_dx_vec8(Ten dx, Ten dx_copy, Ten dout, Ten x,
                                                    Ten weight, Ten rstd, int T, int C) {
    int warps = blockDim.x >> 5;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    rmsnorm_backward_row_vec8(dx, dx_copy, dout, x, weight, rstd, t, C, nullptr);
}

// partial: an f32 [ceil(T / RMSNORM_FUSED_ROWS), C] scratch, every element overwritten; dynamic
// shared memory: RMSNORM_FUSED_WARPS C floats.
extern "C" __global__ void __launch_bounds__(32 * RMSNORM_FUSED_WARPS)
    rmsnorm_backward_vec8(float* partial, Ten dx, Ten dx_copy, Ten dout, Ten x, Ten weight,
                          Ten rstd, int T, int C) {
    extern __shared__ float dw_rows[];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* mine = dw_rows + (long long)warp * C;
    for (int c = lane * 8; c < C; c += 256) {
#pragma unroll
        for (int j = 0; j < 8; j++) mine[c + j] = 0.0f;
    }
    int t0 = blockIdx.x * RMSNORM_FUSED_ROWS;
    for (int r = warp; r < RMSNORM_FUSED_ROWS && t0 + r < T; r += RMSNORM_FUSED_WARPS)
        rmsnorm_backward_row_vec8(dx, dx_copy, dout, x, weight, rstd, t0 + r, C, mine);
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = 0.0f;
#pragma unroll
        for (int u = 0; u < RMSNORM_FUSED_WARPS; u++) s += dw_rows[(long long)u * C + c];
        partial[(long long)blockIdx.x * C + c] = s;
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

// Block (RMSNORM_REDUCE_COLS, RMSNORM_REDUCE_LANES), grid ceil(C / RMSNORM_REDUCE_COLS).
extern "C" __global__ void rmsnorm_backward_dweight_reduce(Ten dweight, const float* partial,
                                                           int blocks, int C) {
    __shared__ float sums[RMSNORM_REDUCE_LANES][RMSNORM_REDUCE_COLS];
    int c = blockIdx.x * RMSNORM_REDUCE_COLS + threadIdx.x;
    float s = 0.0f;
    if (c < C)
        for (int b = threadIdx.y; b < blocks; b += RMSNORM_REDUCE_LANES)
            s += partial[(long long)b * C + c];
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y != 0 || c >= C) return;
    float d = ld(dweight, c);
#pragma unroll
    for (int y = 0; y < RMSNORM_REDUCE_LANES; y++) d += sums[y][threadIdx.x];
    st(dweight, c, d);
}
