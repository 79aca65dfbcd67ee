// Token embedding lookup.
//
// Shapes: tokens [T] (i32, each in 0..V), wte, dwte [V, C], out, dout [T, C].
//   embedding_forward:  out[t, c] = wte[tokens[t], c]          out overwritten
//   embedding_backward: dwte[tokens[t], c] += dout[t, c]      dwte += (a weight gradient)
// Nothing is saved for the backward beyond the tokens themselves.
//
// Launch (both): grid (T, ceil(C / blockDim.x)), one thread per (t, c): the row t is
// blockIdx.x (no integer division), the column blockIdx.y * blockDim.x + threadIdx.x, so a
// warp reads and writes 32 consecutive floats of one row.
//
// Tokens are checked on the host against V (from the uploaded copy); the kernels also guard:
// a token outside 0..V gives a zero row forward and adds nothing backward, so a bad index can
// never touch memory outside wte.
//
// NONDETERMINISM: the backward adds with atomicAdd, so a token that repeats within the batch
// sums its dout rows in whatever order the blocks run, and dwte can differ run to run in the
// last bits (the CPU reference adds in ascending t). A deterministic version (sort the tokens,
// segment-sum) is left for later.

extern "C" __global__ void embedding_forward(Ten out, const int* tokens, Ten wte, int T, int C,
                                             int V) {
    int t = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || c >= C) return;
    int tok = tokens[t];
    bool ok = tok >= 0 && tok < V;
    st(out, (long long)t * C + c, ok ? ld(wte, (long long)tok * C + c) : 0.0f);
}

// dwte must be f32 (atomicAdd on f32; the launcher checks).
extern "C" __global__ void embedding_backward(float* dwte, Ten dout, const int* tokens, int T,
                                              int C, int V) {
    int t = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || c >= C) return;
    int tok = tokens[t];
    if (tok < 0 || tok >= V) return;
    atomicAdd(&dwte[(long long)tok * C + c], ld(dout, (long long)t * C + c));
}
