//! Residual add: `acc[i] += x[i]` (acc and x `[n]`).

use rayon::prelude::*;

use super::Real;

/// Elements per rayon task.
const BLOCK: usize = 1 << 14;

/// `acc += x`.
pub fn add_inplace<F: Real>(acc: &mut [F], x: &[F]) {
    acc.par_chunks_mut(BLOCK)
        .zip(x.par_chunks(BLOCK))
        .for_each(|(a, x)| {
            for (a, &x) in a.iter_mut().zip(x) {
                *a = *a + x;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_inplace_adds() {
        let mut acc: Vec<f64> = (0..BLOCK + 3).map(|i| i as f64).collect();
        let x = vec![0.5; BLOCK + 3];
        add_inplace(&mut acc, &x);
        assert!(acc.iter().enumerate().all(|(i, &a)| a == i as f64 + 0.5));
    }
}
