// Rotary position embedding, Hugging Face "rotate_half" layout, in place on the fused qkv.
//
// Shapes: qkv, dqkv [T, QKV] with each row [q: H D | k: Hkv D | v: Hkv D], QKV = (H + 2 Hkv) D;
// positions [T] (i32); inv_freq [D/2]. The first NH = H + Hkv heads (q and k) are rotated;
// v is untouched. For head x (D values) of row t and j in 0..D/2, a = positions[t] inv_freq[j]
// (an f32 product, as the CPU), on the pair (x1, x2) = (x[j], x[j + D/2]):
//   rope_forward:  x[j] = x1 cos a - x2 sin a,   x[j + D/2] = x2 cos a + x1 sin a
//   rope_backward: the transpose (rotation by -a) on dq and dk of dqkv:
//                  g[j] = g1 cos a + g2 sin a,   g[j + D/2] = g2 cos a - g1 sin a
// Both overwrite in place; nothing is saved (the backward recomputes the angles).
//
// Rounding: with s = sin a (forward) or -sin a (backward, an exact negation) and c = cos a,
//   y1 = fma(x1, c, -(x2 s)),   y2 = fma(x1, s, x2 c)
// spelled with explicit intrinsics (rope_pair, in common.cuh: the flash kernels that fuse RoPE
// use it too) so the compiler cannot contract the layouts differently: they give bitwise the
// same results. It is the contraction the plain `x1 c - x2 s`, `x2 c + x1 s` compiled to
// before (nvcc 13, sm_90a), so the scalar kernels' results did not change either. sincosf is
// the precise one (no fast math): positions reach ~1e5, where __sincosf's error is large.
//
// Launches (ops/rope.rs picks, from D and the alignment only, never the dtypes, so an f32
// and a bf16 buffer always take the same layout):
//   rope_forward, rope_backward: grid (T, ceil(D/2 / blockDim.x)), one thread per (t, j): it
//     computes sin/cos once and walks the NH heads of the row, so a warp touches 32
//     consecutive elements of each half. At D = 64 that is blocks of 32 threads moving bf16
//     2 bytes per access: 84 us per call (forward or backward) at T = 16384, H = 32, Hkv = 4,
//     D = 64, bf16 on an H100, ~1.8 TB/s. Kept for D % 16 != 0 or unaligned buffers.
//   rope_forward_vec8, rope_backward_vec8 (D % 16 == 0, 16-byte aligned qkv and inv_freq):
//     one warp per row, blocks of 8 warps (grid ceil(T / 8)). L = D/16 lanes per head; lane
//     owns j = 8 (lane mod L) .. + 8 of the first half and the same 8 of the second half, so
//     each half is one 16-byte access in bf16 (two in f32, ld8/st8). It computes its 8
//     angles once and walks heads h0 = lane / L, h0 + HS, ... with HS = 32 / L heads side by
//     side (D = 64: 8, so each lane rotates 4 or 5 of the 36 heads), two heads per step so
//     four 16-byte loads are in flight before the first store. Lanes past HS L idle (D = 96:
//     2 of 32). For D > 512 (L > 32) a lane takes slots lane, lane + 32, ... of one head at
//     a time. The cost: the HS lanes sharing a j each compute its sincosf (8 times per row
//     at D = 64 instead of once), a few hundred instructions per row next to 9 KB moved.
//     79 registers, no spills (ptxas 13.0, sm_90a). 44.5 us per call against the scalar
//     kernels' 83.8 us, same run on an H200 (the TinyLlama shape above, bf16: 3.4 TB/s).

__device__ __forceinline__ void rope_rotate(Ten qkv, const int* positions, Ten inv_freq,
                                            int T, int NH, int QKV, int D, float sign) {
    int t = blockIdx.x;
    int half = D >> 1;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || j >= half) return;
    float a = __fmul_rn((float)positions[t], ld(inv_freq, j));
    float s, c;
    sincosf(a, &s, &c);
    s *= sign;
    long long row = (long long)t * QKV;
    for (int h = 0; h < NH; h++) {
        long long i1 = row + (long long)h * D + j, i2 = i1 + half;
        float a1 = ld(qkv, i1), a2 = ld(qkv, i2);
        rope_pair(a1, a2, c, s);
        st(qkv, i1, a1);
        st(qkv, i2, a2);
    }
}

// Eight pairs (x1[k], x2[k]) with angles (c[k], s[k]).
__device__ __forceinline__ void rope_pair8(float x1[8], float x2[8], const float c[8],
                                           const float s[8]) {
#pragma unroll
    for (int k = 0; k < 8; k++) rope_pair(x1[k], x2[k], c[k], s[k]);
}

__device__ __forceinline__ void rope_rotate_vec8(Ten qkv, const int* positions, Ten inv_freq,
                                                 int T, int NH, int QKV, int D, float sign) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int t = blockIdx.x * warps + (threadIdx.x >> 5);
    int half = D >> 1, L = D >> 4;
    int hs = L < 32 ? 32 / L : 1;  // heads side by side in the warp
    if (t >= T || lane >= hs * L) return;
    int h0 = L < 32 ? lane / L : 0;
    float pos = (float)positions[t];
    long long row = (long long)t * QKV;
    long long hstep = (long long)hs * D;
    // One pass unless L > 32.
    for (int slot = L < 32 ? lane % L : lane; slot < L; slot += 32) {
        int j = 8 * slot;
        float f[8], c[8], s[8];
        ld8(inv_freq, j, f);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            sincosf(__fmul_rn(pos, f[k]), &s[k], &c[k]);
            s[k] *= sign;
        }
        long long i = row + (long long)h0 * D + j;  // x[j] of head h
        int h = h0;
        for (; h + hs < NH; h += 2 * hs, i += 2 * hstep) {
            float a1[8], a2[8], b1[8], b2[8];
            ld8(qkv, i, a1);
            ld8(qkv, i + half, a2);
            ld8(qkv, i + hstep, b1);
            ld8(qkv, i + hstep + half, b2);
            rope_pair8(a1, a2, c, s);
            rope_pair8(b1, b2, c, s);
            st8(qkv, i, a1);
            st8(qkv, i + half, a2);
            st8(qkv, i + hstep, b1);
            st8(qkv, i + hstep + half, b2);
        }
        if (h < NH) {
            float a1[8], a2[8];
            ld8(qkv, i, a1);
            ld8(qkv, i + half, a2);
            rope_pair8(a1, a2, c, s);
            st8(qkv, i, a1);
            st8(qkv, i + half, a2);
        }
    }
}

extern "C" __global__ void rope_forward(Ten qkv, const int* positions, Ten inv_freq, int T,
                                        int NH, int QKV, int D) {
    rope_rotate(qkv, positions, inv_freq, T, NH, QKV, D, 1.0f);
}

extern "C" __global__ void rope_forward_vec8(Ten qkv, const int* positions, Ten inv_freq, int T,
                                             int NH, int QKV, int D) {
    rope_rotate_vec8(qkv, positions, inv_freq, T, NH, QKV, D, 1.0f);
}

extern "C" __global__ void rope_backward(Ten dqkv, const int* positions, Ten inv_freq, int T,
                                         int NH, int QKV, int D) {
    rope_rotate(dqkv, positions, inv_freq, T, NH, QKV, D, -1.0f);
}

extern "C" __global__ void rope_backward_vec8(Ten dqkv, const int* positions, Ten inv_freq,
                                              int T, int NH, int QKV, int D) {
    rope_rotate_vec8(dqkv, positions, inv_freq, T, NH, QKV, D, -1.0f);
}

// The angles' cosines and sines for the flash kernels that fuse RoPE's backward
// (flash_wgmma.cuh): table[t half + j] = (cos a, sin a) with a = positions[t] inv_freq[j],
// j < half = D/2: the same f32 values the kernels above compute. One thread per (t, j),
// grid-stride over n = T half.
extern "C" __global__ void rope_table(float2* table, const int* positions, Ten inv_freq,
                                      long long n, int half) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / half;
        const int j = (int)(i - t * half);
        float s, c;
        sincosf(__fmul_rn((float)positions[t], ld(inv_freq, j)), &s, &c);
        table[i] = make_float2(c, s);
    }
}
