// Varlen causal attention with GQA: the non-GEMM parts (see ops/attention_gemm.rs for the GEMMs).
//
// Layouts (row-major, f32):
//   qkv  [T, W], W = (H + 2 Hkv) D, row t = [q: H D | k: Hkv D | v: Hkv D]
//   out  [T, H D], dout the same; lse [H, T]
//   kx, vx, dkx, dvx [T, H D]: k / v expanded per query head (only when G = H / Hkv > 1):
//        kx[t, h D + d] = qkv[t W + (H + h / G) D + d]
//   scratch S, P [nh, L, L]: the scores of one span (rows s..s+L of the packed batch) for the
//        query heads h0..h0+nh; element (hl, i, j) at (hl L + i) L + j, hl = h - h0.
//
// A span is one document, or several consecutive short documents run together (the host
// merges them to save launches). Query row i of a span (global row s + i) sees the keys
// j0(i)..=i, where s + j0(i) = the start of its own document, found by a binary search of
// cu[n_lo..=n_hi] (the cu_seqlens entries bounding the span: cu[n_lo] = s, cu[n_hi] = s + L).
// Every other entry of a row (another document, or above the diagonal) is written as 0, so
// the GEMMs that read P / dS over the whole span add exact zeros for them.
//
// Row kernels: one warp per (span row, head), 4 warps per block; grid (ceil(L / 4), nh).
// No __syncthreads, so a warp past the last row simply returns.

#define ATTN_ROWS_PER_BLOCK 4
// -inf (NVRTC has no math.h, so no INFINITY).
#define ATTN_NEG_INF (__int_as_float((int)0xff800000))

// Local index of the first key row that span row i may see (the start of its document).
__device__ __forceinline__ int attn_doc_start(const int* __restrict__ cu, int n_lo, int n_hi, int s,
                                              int i) {
    int g = s + i;
    // Invariant: cu[lo] <= g < cu[hi]. (cu[n_lo] = s <= g and g < s + L = cu[n_hi].)
    int lo = n_lo, hi = n_hi;
    while (hi - lo > 1) {
        int mid = lo + ((hi - lo) >> 1);
        if (cu[mid] <= g) lo = mid;
        else hi = mid;
    }
    return cu[lo] - s;
}

// Forward softmax, in place. S holds the scaled scores scale q_i . k_j (the GEMM's alpha);
// writes P[i, j] = exp(S - max) / sum over j0 <= j <= i, 0 elsewhere in the row (all L
// columns), and lse[h T + s + i] = max + log(sum).
extern "C" __global__ void attn_softmax_fwd(float* __restrict__ S, float* __restrict__ lse,
                                            const int* __restrict__ cu, int n_lo, int n_hi, int s,
                                            int L, int h0, int T) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int i = blockIdx.x * ATTN_ROWS_PER_BLOCK + warp;
    if (i >= L) return;
    int hl = blockIdx.y;
    float* row = S + ((size_t)hl * L + i) * (size_t)L;
    int j0 = attn_doc_start(cu, n_lo, n_hi, s, i);

    // One pass: per-lane running max m and sum z of exp(x - m).
    float m = ATTN_NEG_INF, z = 0.0f;
    for (int j = j0 + lane; j <= i; j += 32) {
        float x = row[j];
        if (x > m) {
            z = z * expf(m - x) + 1.0f;
            m = x;
        } else {
            z += expf(x - m);
        }
    }
    float mx = warp_max(m);
    float zs = (m == ATTN_NEG_INF) ? 0.0f : z * expf(m - mx);
    float sum = warp_sum(zs);
    float inv = 1.0f / sum;
    if (lane == 0) lse[(size_t)(h0 + hl) * T + s + i] = mx + logf(sum);
    for (int j = lane; j < L; j += 32) {
        row[j] = (j >= j0 && j <= i) ? expf(row[j] - mx) * inv : 0.0f;
    }
}

// Backward row kernel, in place on both scratch buffers:
//   S  in: scaled scores;            out: P  = exp(S - lse_i)            (0 outside j0..=i)
//   dP in: dout_i . v_j;             out: dS = P (dP - Di)               (0 outside j0..=i)
// with Di = dout_i . out_i of head h = h0 + hl (out, dout [T, H D]). dS is unscaled: the
// GEMMs for dq and dk take alpha = 1 / sqrt(D).
extern "C" __global__ void attn_softmax_bwd(float* __restrict__ S, float* __restrict__ dP,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ out,
                                            const float* __restrict__ dout,
                                            const int* __restrict__ cu, int n_lo, int n_hi, int s,
                                            int L, int h0, int T, int H, int D) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int i = blockIdx.x * ATTN_ROWS_PER_BLOCK + warp;
    if (i >= L) return;
    int hl = blockIdx.y, h = h0 + hl;
    size_t off = ((size_t)hl * L + i) * (size_t)L;
    float* srow = S + off;
    float* prow = dP + off;
    int j0 = attn_doc_start(cu, n_lo, n_hi, s, i);

    size_t ob = (size_t)(s + i) * ((size_t)H * D) + (size_t)h * D;
    float di = 0.0f;
    for (int d = lane; d < D; d += 32) di += dout[ob + d] * out[ob + d];
    di = warp_sum(di);
    float l = lse[(size_t)h * T + s + i];

    for (int j = lane; j < L; j += 32) {
        if (j >= j0 && j <= i) {
            float p = expf(srow[j] - l);
            srow[j] = p;
            prow[j] = p * (prow[j] - di);
        } else {
            srow[j] = 0.0f;
            prow[j] = 0.0f;
        }
    }
}

// kx, vx [T, H D] from qkv [T, W]: kx[t, h D + d] = k[t, (h / G) D + d], likewise v.
extern "C" __global__ void attn_expand_kv(float* __restrict__ kx, float* __restrict__ vx,
                                          const float* __restrict__ qkv, int T, int H, int Hkv,
                                          int D) {
    size_t hd = (size_t)H * D, w = (size_t)(H + 2 * Hkv) * D;
    size_t n = (size_t)T * hd;
    int G = H / Hkv;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t t = idx / hd;
        int r = (int)(idx - t * hd);
        int h = r / D, d = r - h * D;
        int kv = h / G;
        kx[idx] = qkv[t * w + (size_t)(H + kv) * D + d];
        vx[idx] = qkv[t * w + (size_t)(H + Hkv + kv) * D + d];
    }
}

// dk, dv of dqkv [T, W] (overwritten) = sums over the G query heads of kv head kv of
// dkx, dvx [T, H D]: dqkv[t, (H + kv) D + d] = sum_g dkx[t, (kv G + g) D + d], g ascending.
extern "C" __global__ void attn_reduce_dkv(float* __restrict__ dqkv, const float* __restrict__ dkx,
                                           const float* __restrict__ dvx, int T, int H, int Hkv,
                                           int D) {
    size_t hd = (size_t)H * D, w = (size_t)(H + 2 * Hkv) * D, kd = (size_t)Hkv * D;
    size_t n = (size_t)T * kd;
    int G = H / Hkv;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t t = idx / kd;
        int r = (int)(idx - t * kd);  // = kv D + d
        int kv = r / D, d = r - kv * D;
        const float* pk = dkx + t * hd + (size_t)kv * G * D + d;
        const float* pv = dvx + t * hd + (size_t)kv * G * D + d;
        float sk = 0.0f, sv = 0.0f;
        for (int g = 0; g < G; ++g) {
            sk += pk[(size_t)g * D];
            sv += pv[(size_t)g * D];
        }
        dqkv[t * w + (size_t)H * D + r] = sk;
        dqkv[t * w + (size_t)(H + Hkv) * D + r] = sv;
    }
}
