//! SwiGLU.
//!
//! Shapes: gate_up, dgate_up `[T, 2F]` (gate in columns 0..F, up in F..2F); out, dout `[T, F]`.
//!
//! Forward:  s = sigmoid(gate), silu = gate s,  out = silu up                   overwritten
//! Backward: dgate = dout up s (1 + gate (1 - s)),  dup = dout silu            overwritten

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

/// dgate_up `[T, 2F]` overwritten.
pub fn swiglu_backward<F: Real>(dgate_up: &mut [F], dout: &[F], gate_up: &[F], f: usize) {
    if f == 0 {
        return;
    }
    dgate_up
        .par_chunks_mut(ROWS * 2 * f)
        .zip(dout.par_chunks(ROWS * f))
        .zip(gate_up.par_chunks(ROWS * 2 * f))
        .for_each(|((dgu, dout), gu)| {
            for ((dgu, d), gu) in dgu
                .chunks_exact_mut(2 * f)
                .zip(dout.chunks_exact(f))
                .zip(gu.chunks_exact(2 * f))
            {
                let (dgate, dup) = dgu.split_at_mut(f);
                let (gate, up) = gu.split_at(f);
                for i in 0..f {
                    let (g, u) = (gate[i], up[i]);
                    let s = sigmoid(g);
                    dgate[i] = d[i] * u * s * (F::one() + g * (F::one() - s));
                    dup[i] = d[i] * g * s;
                }
            }
        });
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
        swiglu_backward(&mut dgu, &g, &gu, f);
        check_grad("swiglu dgate_up", &dgu, &gu, |gu| {
            let mut out = vec![0.0; t * f];
            swiglu_forward(&mut out, gu, f);
            dot(&out, &g)
        });
    }
}
