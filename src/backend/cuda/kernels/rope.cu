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
// Launch: grid (T, ceil(D/2 / blockDim.x)), one thread per (t, j): it computes sin/cos once
// and walks the NH heads of the row, so a warp touches 32 consecutive elements of each half.
// sincosf is the precise one (no fast math): positions reach ~1e5, where __sincosf's error
// is large.

__device__ __forceinline__ void rope_rotate(Ten qkv, const int* positions, Ten inv_freq,
                                            int T, int NH, int QKV, int D, float sign) {
    int t = blockIdx.x;
    int half = D >> 1;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || j >= half) return;
    float a = (float)positions[t] * ld(inv_freq, j);
    float s, c;
    sincosf(a, &s, &c);
    s *= sign;
    long long row = (long long)t * QKV;
    for (int h = 0; h < NH; h++) {
        long long i1 = row + (long long)h * D + j, i2 = i1 + half;
        float a1 = ld(qkv, i1), a2 = ld(qkv, i2);
        st(qkv, i1, a1 * c - a2 * s);
        st(qkv, i2, a2 * c + a1 * s);
    }
}

extern "C" __global__ void rope_forward(Ten qkv, const int* positions, Ten inv_freq, int T,
                                        int NH, int QKV, int D) {
    rope_rotate(qkv, positions, inv_freq, T, NH, QKV, D, 1.0f);
}

extern "C" __global__ void rope_backward(Ten dqkv, const int* positions, Ten inv_freq, int T,
                                         int NH, int QKV, int D) {
    rope_rotate(dqkv, positions, inv_freq, T, NH, QKV, D, -1.0f);
}
