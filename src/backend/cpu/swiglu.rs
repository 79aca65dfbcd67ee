//! SwiGLU.
//!
//! Shapes: gate_up, dgate_up `[T, 2F]` (gate in columns 0..F, up in F..2F); out, dout `[T, F]`.
//!
//! Forward:  s = sigmoid(gate), silu = gate s,  out = silu up                   overwritten
//! Backward: dgate = dout up s (1 + gate (1 - s)),  dup = dout silu            overwritten
//!           optionally out = silu up as well (the forward's value, bitwise), overwritten:
//!           the model needs it for the next GEMM's weight gradient and does not keep it

use rayon::prelude::*;

use super::Real;

/// Rows per rayon task.
const ROWS: usize = 64;

fn sigmoid<F: Real>(x: F) -> F {
    F::one() / (F::one() + (-x).fexp())
}

/// out `[T, F]` overwritten.
pub fn swiglu_forward<F: Real>(out: &mut [F], gate_up: &[F], f: usize) {
    if f == 0 {
        return;
    }
    out.par_chunks_mut(ROWS * f)
        .zip(gate_up.par_chunks(ROWS * 2 * f))
        .for_each(|(out, gu)| {
            for (o, gu) in out.chunks_exact_mut(f).zip(gu.chunks_exact(2 * f)) {
                let (gate, up) = gu.split_at(f);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g * sigmoid(g) * u;
                }
            }
        });
}

/// dgate_up `[T, 2F]` overwritten; `out` `[T, F]`, when given, overwritten with
/// [`swiglu_forward`]'s output (the same expression, so the same bits).
pub fn swiglu_backward<F: Real>(
    dgate_up: &mut [F],
    out: Option<&mut [F]>,
    dout: &[F],
    gate_up: &[F],
    f: usize,
) {
    if f == 0 {
        return;
    }
    let dgu = dgate_up.par_chunks_mut(ROWS * 2 * f);
    let (d, gu) = (dout.par_chunks(ROWS * f), gate_up.par_chunks(ROWS * 2 * f));
    match out {
        Some(out) => dgu
            .zip(out.par_chunks_mut(ROWS * f))
            .zip(d)
            .zip(gu)
            .for_each(|(((dgu, o), d), gu)| backward_rows(dgu, Some(o), d, gu, f)),
        None => dgu
            .zip(d)
            .zip(gu)
            .for_each(|((dgu, d), gu)| backward_rows(dgu, None, d, gu, f)),
    }
}

/// [`swiglu_backward`] of one block of rows.
fn backward_rows<F: Real>(
    dgate_up: &mut [F],
    mut out: Option<&mut [F]>,
    dout: &[F],
    gate_up: &[F],
    f: usize,
) {
    for (r, ((dgu, d), gu)) in dgate_up
        .chunks_exact_mut(2 * f)
        .zip(dout.chunks_exact(f))
        .zip(gate_up.chunks_exact(2 * f))
        .enumerate()
    {
        let (dgate, dup) = dgu.split_at_mut(f);
        let (gate, up) = gu.split_at(f);
        let mut o = out.as_deref_mut().map(|o| &mut o[r * f..(r + 1) * f]);
        for i in 0..f {
            let (g, u) = (gate[i], up[i]);
            let s = sigmoid(g);
            dgate[i] = d[i] * u * s * (F::one() + g * (F::one() - s));
            dup[i] = d[i] * g * s;
            if let Some(o) = o.as_deref_mut() {
                // (g s) u: the association of swiglu_forward's `g * sigmoid(g) * u`.
                o[i] = g * s * u;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let mut rng = rng(30);
        let (t, f) = (ROWS + 5, 3);
        let gu = randn(&mut rng, t * 2 * f);
        let g = randn(&mut rng, t * f);
        let mut dgu = vec![f64::NAN; t * 2 * f];
        swiglu_backward(&mut dgu, None, &g, &gu, f);
        check_grad("swiglu dgate_up", &dgu, &gu, |gu| {
            let mut out = vec![0.0; t * f];
            swiglu_forward(&mut out, gu, f);
            dot(&out, &g)
        });
    }

    /// The backward's optional output is the forward's, bitwise, and changes nothing else.
    #[test]
    fn swiglu_backward_writes_the_forward_output() {
        let mut rng = rng(31);
        let (t, f) = (2 * ROWS + 7, 5);
        let gu: Vec<f32> = randn(&mut rng, t * 2 * f)
            .iter()
            .map(|&x| 8.0 * x as f32)
            .collect();
        let g: Vec<f32> = randn(&mut rng, t * f).iter().map(|&x| x as f32).collect();
        let mut fwd = vec![f32::NAN; t * f];
        swiglu_forward(&mut fwd, &gu, f);
        let (mut dgu_a, mut dgu_b) = (vec![f32::NAN; t * 2 * f], vec![f32::NAN; t * 2 * f]);
        let mut out = vec![f32::NAN; t * f];
        swiglu_backward(&mut dgu_a, Some(&mut out), &g, &gu, f);
        swiglu_backward(&mut dgu_b, None, &g, &gu, f);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&fwd), "out");
        assert_eq!(bits(&dgu_a), bits(&dgu_b), "dgate_up");
    }
}
