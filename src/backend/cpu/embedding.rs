//! Token embedding lookup.
//!
//! Shapes: tokens `[T]` (i32, each in 0..V), wte `[V, C]`, out `[T, C]`.
//!
//! Forward:  out[t, :] = wte[tokens[t], :]          out overwritten
//! Backward: dwte[tokens[t], :] += dout[t, :]       t ascending (a fixed order: a token that
//!                                                  repeats accumulates in the same order)

use rayon::prelude::*;

use super::Real;

/// `out[t, :] = wte[tokens[t], :]`. Tokens must already be checked to lie in `wte`.
pub fn embedding_forward<F: Real>(out: &mut [F], tokens: &[i32], wte: &[F], c: usize) {
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .zip(tokens.par_iter())
        .for_each(|(row, &tok)| {
            let tok = tok as usize;
            row.copy_from_slice(&wte[tok * c..(tok + 1) * c]);
        });
}

/// `dwte[tokens[t], :] += dout[t, :]`, sequential over t.
pub fn embedding_backward<F: Real>(dwte: &mut [F], dout: &[F], tokens: &[i32], c: usize) {
    if c == 0 {
        return;
    }
    for (g, &tok) in dout.chunks_exact(c).zip(tokens) {
        let tok = tok as usize;
        for (d, g) in dwte[tok * c..(tok + 1) * c].iter_mut().zip(g) {
            *d = *d + *g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn embedding_gradients_match_finite_differences() {
        let mut rng = rng(10);
        let (t, c, v) = (11, 6, 5);
        // Repeated tokens on purpose: their gradients must add up.
        let tokens: Vec<i32> = (0..t).map(|i| ((i * 7) % v) as i32).collect();
        let wte = randn(&mut rng, v * c);
        let g = randn(&mut rng, t * c);
        let mut dwte = vec![0.0; v * c];
        embedding_backward(&mut dwte, &g, &tokens, c);
        check_grad("embedding dwte", &dwte, &wte, |w| {
            let mut out = vec![0.0; t * c];
            embedding_forward(&mut out, &tokens, w, c);
            dot(&out, &g)
        });
    }
}
