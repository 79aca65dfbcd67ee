//! Linear layer: GEMMs through `matrixmultiply` (sgemm for f32, dgemm for f64).
//!
//! Shapes: x `[T, IC]`, w `[OC, IC]` (PyTorch `nn.Linear` layout), out `[T, OC]`.
//!
//! Forward:  out[t, o] = sum_i x[t, i] w[o, i] (+ bias[o])        out overwritten
//! Backward, in two functions (the model runs them apart, see `Backend::matmul_backward`):
//!   input:  dx[t, i]  = sum_o dout[t, o] w[o, i]                 (dx = dout w, overwritten)
//!   weight: dw[o, i] += sum_t dout[t, o] x[t, i]                 (dw = dout^T x)
//!           dbias[o] += sum_t dout[t, o]
//!
//! Every GEMM of the backend goes through [`gemm`] (one thread), [`par_gemm`], which splits
//! the rows of the output into blocks whose size depends only on (m, k, n), so each output
//! element is computed by exactly one task over k in matrixmultiply's fixed order, or
//! [`par_gemm_ksplit`] (weight gradients), which sums fixed slices of k into partials added
//! in slice order. Either way the result is bitwise reproducible whatever the thread count.

use rayon::prelude::*;

use super::Real;

/// The element types `matrixmultiply` multiplies.
pub trait Gemm: Copy {
    /// `c = alpha a b + beta c` on raw strided matrices (matrixmultiply's contract).
    ///
    /// # Safety
    /// `a` (m x k), `b` (k x n) and `c` (m x n) with the given strides must lie inside their
    /// allocations, and `c` must not alias `a` or `b`. When `beta` is zero `c` is not read.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Gemm for f32 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Gemm for f64 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// A read-only strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, F> {
    pub data: &'a [F],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, F> MatRef<'a, F> {
    /// Row-major with leading dimension `ld`.
    pub fn rows(data: &'a [F], ld: usize) -> Self {
        MatRef {
            data,
            rs: ld,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn cols(data: &'a [F], ld: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: ld,
        }
    }
    /// The view starting `r` rows further down.
    fn skip_rows(self, r: usize) -> Self {
        let off = (r * self.rs).min(self.data.len());
        MatRef {
            data: &self.data[off..],
            ..self
        }
    }
}

/// Panics (an internal bug: every op checks lengths first) unless a `rows x cols` view fits.
fn check_view(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * rs + (cols - 1) * cs;
        assert!(
            last < len,
            "gemm: {what} view {rows}x{cols} (rs {rs}, cs {cs}) exceeds {len}"
        );
    }
}

/// `c = alpha a b + beta c` with a `[m, k]`, b `[k, n]`, c `[m, n]` row-major with leading
/// dimension `ldc`. One thread. `beta == 0` overwrites c without reading it.
#[allow(clippy::too_many_arguments)]
pub fn gemm<F: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: F,
    a: MatRef<'_, F>,
    b: MatRef<'_, F>,
    beta: F,
    c: &mut [F],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    check_view("c", c.len(), m, n, ldc, 1);
    if k == 0 {
        for r in 0..m {
            for x in &mut c[r * ldc..r * ldc + n] {
                *x = if beta == F::zero() {
                    F::zero()
                } else {
                    beta * *x
                };
            }
        }
        return;
    }
    check_view("a", a.data.len(), m, k, a.rs, a.cs);
    check_view("b", b.data.len(), k, n, b.rs, b.cs);
    // SAFETY: the three views were bounds-checked just above; `c` is a unique borrow, so it
    // aliases neither `a` nor `b`. Strides are element counts well below isize::MAX since
    // they index into live slices.
    unsafe {
        F::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        )
    }
}

/// Rows of the output per rayon task: one task for small products, otherwise up to 16
/// blocks of a multiple of 8 rows. Depends only on the shape, never on the thread count.
fn rows_per_task(m: usize, k: usize, n: usize) -> usize {
    const MIN_MACS: usize = 1 << 18;
    let macs = m.saturating_mul(k).saturating_mul(n);
    if macs < 2 * MIN_MACS || m < 16 {
        return m.max(1);
    }
    let tasks = (macs / MIN_MACS).clamp(2, 16);
    m.div_ceil(tasks).next_multiple_of(8)
}

/// [`gemm`] parallelised over blocks of rows of c (see [`rows_per_task`]).
#[allow(clippy::too_many_arguments)]
pub fn par_gemm<F: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: F,
    a: MatRef<'_, F>,
    b: MatRef<'_, F>,
    beta: F,
    c: &mut [F],
    ldc: usize,
) {
    let rows = rows_per_task(m, k, n);
    if rows >= m {
        return gemm(m, k, n, alpha, a, b, beta, c, ldc);
    }
    check_view("c", c.len(), m, n, ldc, 1);
    let used = (m - 1) * ldc + n;
    c[..used]
        .par_chunks_mut(rows * ldc)
        .enumerate()
        .for_each(|(blk, cb)| {
            let r0 = blk * rows;
            let mb = rows.min(m - r0);
            gemm(mb, k, n, alpha, a.skip_rows(r0), b, beta, cb, ldc);
        });
}

/// Rows of k per task of [`par_gemm_ksplit`] (fixed: the summation order depends on it only).
const K_CHUNK: usize = 1024;

/// `c += a b` with c `[m, n]` row-major (ldc = n), for a long k and a small c (weight
/// gradients: k = T). Splitting the rows of c would make every task repack all of b; here
/// each task multiplies one `K_CHUNK` slice of k into its own partial, and the partials are
/// added in chunk order, then into c once.
pub fn par_gemm_ksplit<F: Real>(
    m: usize,
    k: usize,
    n: usize,
    a: MatRef<'_, F>,
    b: MatRef<'_, F>,
    c: &mut [F],
) {
    if k <= K_CHUNK {
        return par_gemm(m, k, n, F::one(), a, b, F::one(), c, n);
    }
    let partials: Vec<Vec<F>> = (0..k.div_ceil(K_CHUNK))
        .into_par_iter()
        .map(|blk| {
            let k0 = blk * K_CHUNK;
            let kb = K_CHUNK.min(k - k0);
            let ab = MatRef {
                data: &a.data[(k0 * a.cs).min(a.data.len())..],
                ..a
            };
            let bb = b.skip_rows(k0);
            let mut part = vec![F::zero(); m * n];
            gemm(m, kb, n, F::one(), ab, bb, F::zero(), &mut part, n);
            part
        })
        .collect();
    let (first, rest) = partials
        .split_first()
        .expect("k > K_CHUNK gives two chunks");
    let mut sum = first.clone();
    for p in rest {
        for (s, x) in sum.iter_mut().zip(p) {
            *s = *s + *x;
        }
    }
    for (c, s) in c[..m * n].iter_mut().zip(&sum) {
        *c = *c + *s;
    }
}

/// `out = x w^T (+ bias)`: x `[T, IC]`, w `[OC, IC]`, out `[T, OC]` overwritten.
pub fn matmul_forward<F: Real>(
    out: &mut [F],
    x: &[F],
    w: &[F],
    bias: Option<&[F]>,
    t: usize,
    ic: usize,
    oc: usize,
) {
    par_gemm(
        t,
        ic,
        oc,
        F::one(),
        MatRef::rows(x, ic),
        MatRef::cols(w, ic),
        F::zero(),
        out,
        oc,
    );
    if let (Some(bias), true) = (bias, oc > 0) {
        out[..t * oc].par_chunks_mut(oc).for_each(|row| {
            for (o, b) in row.iter_mut().zip(bias) {
                *o = *o + *b;
            }
        });
    }
}

/// dx `[T, IC]` = dout w, overwritten (never read).
pub fn matmul_backward_input<F: Real>(
    dx: &mut [F],
    dout: &[F],
    w: &[F],
    t: usize,
    ic: usize,
    oc: usize,
) {
    // dx[t, i] = sum_o dout[t, o] w[o, i]; beta 0, so the old dx is not read (the caller
    // needs no zeroing pass, and garbage there cannot leak in).
    par_gemm(
        t,
        oc,
        ic,
        F::one(),
        MatRef::rows(dout, oc),
        MatRef::rows(w, ic),
        F::zero(),
        dx,
        ic,
    );
}

/// dw `[OC, IC]` += dout^T x; dbias `[OC]` += sum_t dout.
pub fn matmul_backward_weight<F: Real>(
    dw: &mut [F],
    dbias: Option<&mut [F]>,
    dout: &[F],
    x: &[F],
    t: usize,
    ic: usize,
    oc: usize,
) {
    // dw[o, i] += sum_t dout[t, o] x[t, i]: a long, thin reduction over t, split along t.
    par_gemm_ksplit(oc, t, ic, MatRef::cols(dout, oc), MatRef::rows(x, ic), dw);
    // dbias[o] += sum_t dout[t, o], t ascending, summed apart then added once.
    if let (Some(dbias), true) = (dbias, oc > 0) {
        let mut sum = vec![F::zero(); oc];
        for row in dout[..t * oc].chunks_exact(oc) {
            for (s, g) in sum.iter_mut().zip(row) {
                *s = *s + *g;
            }
        }
        for (db, s) in dbias.iter_mut().zip(&sum) {
            *db = *db + *s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// The naive triple loop in f64.
    fn naive(m: usize, k: usize, n: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn par_gemm_matches_naive_on_odd_shapes() {
        let mut rng = rng(1);
        for &(m, k, n) in &[
            (1, 1, 1),
            (37, 5, 3),
            (300, 129, 77),
            (1001, 64, 33),
            (5, 0, 4),
        ] {
            let a = randn(&mut rng, m * k);
            let b = randn(&mut rng, k * n);
            let mut c = vec![f64::NAN; m * n];
            par_gemm(
                m,
                k,
                n,
                1.0,
                MatRef::rows(&a, k),
                MatRef::rows(&b, n),
                0.0,
                &mut c,
                n,
            );
            assert_close("gemm", &c, &naive(m, k, n, &a, &b), 1e-12);
        }
    }

    #[test]
    fn par_gemm_ksplit_matches_naive() {
        let mut rng = rng(3);
        for &(m, k, n) in &[(3, 5, 2), (9, 2 * K_CHUNK + 17, 6)] {
            // a stored transposed ([k, m]), as dout is for dw.
            let at = randn(&mut rng, k * m);
            let b = randn(&mut rng, k * n);
            let a: Vec<f64> = (0..m * k).map(|i| at[(i % k) * m + i / k]).collect();
            let mut c = vec![1.0; m * n];
            par_gemm_ksplit(m, k, n, MatRef::cols(&at, m), MatRef::rows(&b, n), &mut c);
            let want: Vec<f64> = naive(m, k, n, &a, &b).iter().map(|x| x + 1.0).collect();
            assert_close("gemm ksplit", &c, &want, 1e-12);
        }
    }

    // Finite differences in f64: central differences with eps 1e-6 have truncation error
    // O(eps^2) ~ 1e-12 and rounding error ~ 1e-16 / 1e-6 = 1e-10 relative to the loss scale,
    // so a relative tolerance of 1e-6 (on the gradient's max magnitude) is far above the
    // noise and far below any real bug.
    #[test]
    fn matmul_gradients_match_finite_differences() {
        let mut rng = rng(2);
        let (t, ic, oc) = (13, 7, 5);
        let x = randn(&mut rng, t * ic);
        let w = randn(&mut rng, oc * ic);
        let bias = randn(&mut rng, oc);
        let g = randn(&mut rng, t * oc);
        let f = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut out = vec![0.0; t * oc];
            matmul_forward(&mut out, x, w, Some(b), t, ic, oc);
            dot(&out, &g)
        };
        let mut dx = vec![0.0; t * ic];
        let mut dw = vec![0.0; oc * ic];
        let mut db = vec![0.0; oc];
        matmul_backward_input(&mut dx, &g, &w, t, ic, oc);
        matmul_backward_weight(&mut dw, Some(&mut db), &g, &x, t, ic, oc);
        check_grad("matmul dx", &dx, &x, |xp| f(xp, &w, &bias));
        check_grad("matmul dw", &dw, &w, |wp| f(&x, wp, &bias));
        check_grad("matmul dbias", &db, &bias, |bp| f(&x, &w, bp));
    }
}
