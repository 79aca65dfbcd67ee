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
// Fused with the residual add (add_rmsnorm_forward, the second norm of a layer):
//   acc[t, c] += x[t, c]  (acc becomes the residual sum, +=), then rstd, out = rmsnorm(acc)
//   as rmsnorm_forward. The sum is rounded to acc's precision before the norm uses it, so the
//   norm reads exactly what is stored in acc: out, rstd and acc are bitwise those of
//   add_inplace then rmsnorm_forward with the same buffers (the same f32 ops in the same
//   order, see "Row layouts"). Saves one read of acc from DRAM and a launch.
//
// Kernels and launches:
//   rmsnorm_forward, add_rmsnorm_forward, rmsnorm_backward_dx (and their `_vec8` twins): one
//     warp per row (blocks of 8 warps, grid ceil(T / 8)); the row sum is a warp_sum. The row
//     is read twice (sum, then write); the second pass mostly hits L1/L2.
//   Row layouts: the scalar kernels stride the row by lane (c = lane, lane + 32, ...); the
//     `_vec8` kernels (C % 8 == 0 and 16-byte aligned buffers; ops/rmsnorm.rs decides, from C
//     and the alignment only, never the dtypes, so a fused and an unfused forward always take
//     the same layout) give each lane 8 consecutive columns per 256 (c = 8 lane + 256 k + j),
//     moved with 16-byte accesses (ld8/st8). A lane's partial sum runs k, then j ascending.
//     Why: the scalar kernels move bf16 2 bytes per access (rmsnorm_forward 92 us,
//     rmsnorm_backward_dx 216 us at T = 16384, C = 2048 on an H100).
//   Squares are summed with an explicit fmaf so the fused and the plain forward cannot be
//   contracted differently by the compiler.
//   dweight, two ways, both deterministic (fixed orders that depend on T and C only, no
//   atomics), both ending in rmsnorm_backward_dweight_reduce (one thread per column,
//   dweight[c] += partial[b, c] for b ascending):
//   - fused, rmsnorm_backward_fused_g{1,2,4,8} (the `_vec8` layout with C <= 256 G): the dx
//     kernel also accumulates dweight, so dout and x are read once for both. A block of 8
//     warps owns RMSNORM_FUSED_ROWS = 64 consecutive rows; warp w takes rows t0 + w, t0 + w + 8,
//     ... (8 rows, ascending; the 8 warps of a block work on neighbouring rows at once). Each
//     lane keeps acc[k][j] += g x rstd for its own columns (c = 8 lane + 256 k + j) in
//     registers across its rows; then the warps add their acc into one shared row of C floats
//     in warp order (w = 0 stores, 1..7 add, a barrier between) and the block writes
//     partial[block, c]. Order per column: rows of a warp ascending, warps 0..7, blocks in order
//     (the CPU sums t ascending in blocks of 256, so the two differ by f32 reassociation only).
//     64 rows per block: 256 blocks at T = 16384 (about two per SM of an H100), and the
//     partials stay small (256 x C f32, 2 MB at C = 2048; the reduce reads them from L2).
//     Registers (ptxas -v, sm_90, no spills): g1 72, g2 80, g4 104, g8 151. g8 (C = 2048,
//     TinyLlama) keeps 64 accumulators per lane, so one 8-warp block fits an SM; capping it
//     at 128 registers for two (__launch_bounds__(256, 2)) spills 92 bytes, so it is not
//     capped. Why one block should still stream (reasoned, not measured): ptxas issues the
//     first pass's loads of all 8 groups at once (a whole row of dout and x, 8 KB per warp in
//     bf16, ~64 KB per SM in flight, where Little's law asks ~20 KB of an H100 SM); the
//     second pass it cannot hoist (a group's loads wait for the previous group's dx stores,
//     not provably disjoint), so the first pass also prefetches dx's row into L1
//     (prefetch.global.L1, no registers) and the second pass hits L1 for dx, dout, x and
//     weight instead of waiting a DRAM round trip per group. The combine is ~1 us of a
//     block's ~70 us. G = 16 (C = 4096) would need 128 accumulators on top of the hoisted
//     loads, near the 255-register limit; above C = 2048, and for the scalar layout, the
//     two-kernel path below runs instead.
//   - two kernels, rmsnorm_backward_dx (or `_vec8`) then rmsnorm_backward_dweight_partial:
//     grid (ceil(C / 128), ceil(T / ROWS)), one thread per column of a block of ROWS = 256
//     rows, summing over its rows in ascending t into partial[block, c] (overwritten, a
//     [ceil(T / ROWS), C] scratch): the CPU reference's order exactly. It reads dout and x a
//     second time (2 T C elements).
// Considered, not measured: one thread per column looping over all T (as bias_add_backward):
//   simpler, but only C threads in flight (16 blocks of 128 at C = 2048) each walking T rows.
// The math is fp32 throughout; 1 / sqrtf (IEEE) rather than rsqrtf, as the CPU.

#define RMSNORM_ROWS 256  // rows per dweight partial; must equal ROWS in ops/rmsnorm.rs
#define RMSNORM_FUSED_ROWS 64  // rows per block of the fused kernel; FUSED_ROWS in ops/rmsnorm.rs

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

// Pass 1 adds, rounds to acc's precision, stores and sums the squares of the stored values;
// pass 2 re-reads acc (this thread's own writes, mostly from L1/L2) for out.
extern "C" __global__ void add_rmsnorm_forward(Ten out, Ten rstd, Ten acc, Ten x, Ten weight,
                                               int T, int C, float eps) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    long long row = (long long)t * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = rnd(acc, ld(acc, row + c) + ld(x, row + c));
        st(acc, row + c, v);
        ss = fmaf(v, v, ss);
    }
    float rs = rmsnorm_rstd(ss, C, eps);
    if (lane == 0) st(rstd, t, rs);
    for (int c = lane; c < C; c += 32) st(out, row + c, ld(acc, row + c) * rs * ld(weight, c));
}

extern "C" __global__ void add_rmsnorm_forward_vec8(Ten out, Ten rstd, Ten acc, Ten x,
                                                    Ten weight, int T, int C, float eps) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    if (t >= T) return;
    long long row = (long long)t * C;
    float ss = 0.0f, v[8], w[8];
    for (int c = lane * 8; c < C; c += 256) {
        ld8(acc, row + c, v);
        ld8(x, row + c, w);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            v[j] = rnd(acc, v[j] + w[j]);
            ss = fmaf(v[j], v[j], ss);
        }
        st8(acc, row + c, v);  // already rounded: stored exactly
    }
    float rs = rmsnorm_rstd(ss, C, eps);
    if (lane == 0) st(rstd, t, rs);
    for (int c = lane * 8; c < C; c += 256) {
        ld8(acc, row + c, v);
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

// Start moving element i of t (its cache line) into L1; no register waits for it.
__device__ __forceinline__ void prefetch_l1(const Ten& t, long long i) {
    const char* p = reinterpret_cast<const char*>(t.p) + (t.bf16 ? 2 * i : 4 * i);
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

// dx (and dx_copy) as rmsnorm_backward_dx_vec8, row by row (the same f32 expressions in the
// same order), and partial[blockIdx.x, c] = this block's sum of g x rstd.
// G: groups of 8 columns per lane, C <= 256 G (C % 8 == 0, 16-byte aligned buffers). Needs
// C floats of dynamic shared memory and blockDim.x = 256.
template <int G>
__device__ __forceinline__ void rmsnorm_backward_fused(Ten dx, Ten dx_copy, float* partial,
                                                       Ten dout, Ten x, Ten weight, Ten rstd,
                                                       int T, int C) {
    extern __shared__ float4 sdw_[];  // [C / 4]: the block's dweight row, summed in warp order
    float* sdw = reinterpret_cast<float*>(sdw_);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int t0 = blockIdx.x * RMSNORM_FUSED_ROWS, t1 = min(T, t0 + RMSNORM_FUSED_ROWS);
    float acc[G][8];
#pragma unroll
    for (int k = 0; k < G; k++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[k][j] = 0.0f;
    for (int t = t0 + warp; t < t1; t += 8) {
        long long row = (long long)t * C;
        float g[8], w[8], v[8], d[8];
        // sum_k g[k] w[k] x[k]; and dx's row on its way into L1 (see the prefetch note).
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < G; k++) {
            int c = lane * 8 + 256 * k;
            if (c < C) {
                ld8(dout, row + c, g);
                ld8(weight, c, w);
                ld8(x, row + c, v);
                prefetch_l1(dx, row + c);
#pragma unroll
                for (int j = 0; j < 8; j++) dot += g[j] * w[j] * v[j];
            }
        }
        dot = warp_sum(dot);
        float rs = ld(rstd, t);
        float kr = rs * rs * rs * dot * (1.0f / (float)C);
#pragma unroll
        for (int k = 0; k < G; k++) {
            int c = lane * 8 + 256 * k;
            if (c < C) {
                long long i = row + c;
                ld8(dx, i, d);
                ld8(dout, i, g);
                ld8(weight, c, w);
                ld8(x, i, v);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    d[j] = rnd(dx, d[j] + rs * g[j] * w[j] - kr * v[j]);
                    acc[k][j] += g[j] * v[j] * rs;  // dweight: g x rstd, the partial kernel's order
                }
                st8(dx, i, d);  // already rounded: stored exactly
                if (dx_copy.p) st8(dx_copy, i, d);
            }
        }
    }
    // Warps in order: 0 stores its acc, 1..7 add theirs; a lane touches only its own columns,
    // so a barrier between warps is all the ordering needed. float4 accesses (c % 8 == 0):
    // scalar ones would hit each bank from 8 lanes at once.
    float4* s4 = sdw_;
    for (int w = 0; w < 8; w++) {
        if (warp == w) {
#pragma unroll
            for (int k = 0; k < G; k++) {
                int c = lane * 8 + 256 * k;
                if (c < C) {
                    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
                    if (w > 0) a = s4[c / 4], b = s4[c / 4 + 1];
                    s4[c / 4] = make_float4(a.x + acc[k][0], a.y + acc[k][1], a.z + acc[k][2],
                                            a.w + acc[k][3]);
                    s4[c / 4 + 1] = make_float4(b.x + acc[k][4], b.y + acc[k][5],
                                                b.z + acc[k][6], b.w + acc[k][7]);
                }
            }
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        partial[(long long)blockIdx.x * C + c] = sdw[c];
}

#define RMSNORM_FUSED(G)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        rmsnorm_backward_fused_g##G(Ten dx, Ten dx_copy, float* partial, Ten dout, Ten x,       \
                                    Ten weight, Ten rstd, int T, int C) {                       \
        rmsnorm_backward_fused<G>(dx, dx_copy, partial, dout, x, weight, rstd, T, C);           \
    }
RMSNORM_FUSED(1)
RMSNORM_FUSED(2)
RMSNORM_FUSED(4)
RMSNORM_FUSED(8)

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
    // Unrolled so several loads are in flight; the adds still run b ascending.
#pragma unroll 8
    for (int b = 0; b < blocks; b++) d += partial[(long long)b * C + c];
    st(dweight, c, d);
}
