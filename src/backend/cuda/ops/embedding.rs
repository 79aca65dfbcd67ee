//! Token embedding: `out[t, :] = wte[tokens[t], :]` and `dwte[tokens[t], :] += dout[t, :]`
//! (kernels in `embedding.cu`; the backward uses atomicAdd, so a repeated token's rows add in
//! a run-dependent order).

use cudarc::driver::PushKernelArg;

use super::elementwise::{dim_i32, prod, rows_cols};
use super::need;
use crate::backend::cuda::{launch, CudaBackend, CudaBuf, CudaIdx};
use crate::backend::BackendError;

/// tokens `[T]` on the device, every uploaded one in 0..V with V = `wte_len / C` rows
/// (checked on the host copy, so no sync). Returns V as the kernel's i32 (capped: tokens are
/// i32, so rows past i32::MAX cannot be addressed anyway).
fn check_tokens(
    op: &'static str,
    tokens: &CudaIdx,
    wte_len: usize,
    t: usize,
    c: usize,
) -> Result<i32, BackendError> {
    need(op, "tokens [T]", tokens.dev.len(), t)?;
    if tokens.host.len() < t {
        return Err(BackendError::Shape {
            op,
            message: format!(
                "tokens: T = {t} needed but only {} were uploaded",
                tokens.host.len()
            ),
        });
    }
    if c == 0 {
        return Ok(0);
    }
    let rows = wte_len / c;
    if let Some((i, &tok)) = tokens.host[..t]
        .iter()
        .enumerate()
        .find(|&(_, &tok)| tok < 0 || tok as usize >= rows)
    {
        return Err(BackendError::Shape {
            op,
            message: format!(
                "tokens[{i}] = {tok} is outside the embedding table of {rows} rows of C = {c}"
            ),
        });
    }
    Ok(rows.min(i32::MAX as usize) as i32)
}

/// out `[T, C]` overwritten with the rows of wte `[V, C]` named by tokens `[T]`.
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    tokens: &CudaIdx,
    wte: &CudaBuf,
    t: usize,
    c: usize,
) -> Result<(), BackendError> {
    const OP: &str = "embedding_forward";
    need(OP, "out [T, C]", out.len(), prod(OP, &[t, c])?)?;
    let v = check_tokens(OP, tokens, wte.len(), t, c)?;
    if t == 0 || c == 0 {
        return Ok(());
    }
    let (t32, c32) = (dim_i32(OP, "T", t)?, dim_i32(OP, "C", c)?);
    // Checked: out holds T C, tokens T (each in 0..V), wte V C rows by construction of V.
    let (to, tw) = (be.ten(out), be.ten(wte));
    launch(be, "embedding_forward", rows_cols(OP, t, c)?, |a| {
        a.arg(&to)
            .arg(&tokens.dev)
            .arg(&tw)
            .arg(&t32)
            .arg(&c32)
            .arg(&v);
    })
}

/// dwte `[V, C]` += dout `[T, C]` scattered by tokens `[T]` (atomicAdd: not bitwise
/// reproducible where a token repeats).
pub fn backward(
    be: &CudaBackend,
    dwte: &mut CudaBuf,
    dout: &CudaBuf,
    tokens: &CudaIdx,
    t: usize,
    c: usize,
) -> Result<(), BackendError> {
    const OP: &str = "embedding_backward";
    need(OP, "dout [T, C]", dout.len(), prod(OP, &[t, c])?)?;
    let v = check_tokens(OP, tokens, dwte.len(), t, c)?;
    if t == 0 || c == 0 {
        return Ok(());
    }
    let (t32, c32) = (dim_i32(OP, "T", t)?, dim_i32(OP, "C", c)?);
    // Checked: dout holds T C, tokens T (each in 0..V), dwte V C rows by construction of V.
    let dwte = dwte.f32_mut(OP)?;
    let td = be.ten(dout);
    launch(be, "embedding_backward", rows_cols(OP, t, c)?, |a| {
        a.arg(dwte)
            .arg(&td)
            .arg(&tokens.dev)
            .arg(&t32)
            .arg(&c32)
            .arg(&v);
    })
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::gpu_test::*;
    use crate::backend::Backend;

    /// CUDA against the CPU on a GPU only; T = 301 rows, C = 100 (not multiples of a warp or
    /// block), tokens repeating. Forward is a copy (exact); the backward's atomicAdd order
    /// differs from the CPU's ascending t, so 1e-6 relative.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_embedding_matches_cpu() {
        let (be, cpu, mut rng) = setup(51);
        let (t, c, v) = (301, 100, 37);
        let tokens: Vec<i32> = (0..t).map(|i| (i * 7 % v) as i32).collect();
        let (wte, dout, dwte0) = (
            randv(&mut rng, v * c),
            randv(&mut rng, t * c),
            randv(&mut rng, v * c),
        );
        let tok_g = up_idx(&be, &tokens);
        let mut out_c = vec![0.0; t * c];
        cpu.embedding_forward(&mut out_c, &tokens, &wte, t, c)
            .unwrap();
        let mut out_g = up(&be, &vec![f32::NAN; t * c]);
        be.embedding_forward(&mut out_g, &tok_g, &up(&be, &wte), t, c)
            .unwrap();
        close("embedding out", &down(&be, &out_g, t * c), &out_c, 0.0);
        let mut dwte_c = dwte0.clone();
        cpu.embedding_backward(&mut dwte_c, &dout, &tokens, t, c)
            .unwrap();
        let mut dwte_g = up(&be, &dwte0);
        be.embedding_backward(&mut dwte_g, &up(&be, &dout), &tok_g, t, c)
            .unwrap();
        close("embedding dwte", &down(&be, &dwte_g, v * c), &dwte_c, 1e-6);
        // A token outside the table is an error (the spare element of `up` adds no row).
        let bad = up_idx(&be, &[0, v as i32]);
        assert!(be
            .embedding_forward(&mut out_g, &bad, &up(&be, &wte), 2, c)
            .is_err());
    }
}
