//! SwiGLU forward and backward (kernels and math in `swiglu.cu`). With F % 8 == 0 (and aligned
//! buffers) the `_vec8` kernels run, one thread per 8 columns with 16-byte accesses; otherwise
//! the scalar ones. Both give bitwise the same values.

use cudarc::driver::PushKernelArg;

use super::elementwise::{dim_i32, prod, rows_cols, vec8_ok};
use super::need;
use crate::backend::cuda::{launch, CudaBackend, CudaBuf};
use crate::backend::BackendError;

/// out `[T, F]` = silu(gate) up, gate_up `[T, 2F]`; overwritten.
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    gate_up: &CudaBuf,
    t: usize,
    f: usize,
) -> Result<(), BackendError> {
    const OP: &str = "swiglu_forward";
    need(OP, "out [T, F]", out.len(), prod(OP, &[t, f])?)?;
    need(OP, "gate_up [T, 2F]", gate_up.len(), prod(OP, &[t, 2, f])?)?;
    if t == 0 || f == 0 {
        return Ok(());
    }
    dim_i32(OP, "2F", 2 * f)?;
    let (t32, f_i32) = (dim_i32(OP, "T", t)?, dim_i32(OP, "F", f)?);
    // Checked: out holds T F, gate_up T 2F (and 2F fits an i32).
    let (to, tg) = (be.ten(out), be.ten(gate_up));
    if vec8_ok(be, f, &[out, gate_up]) {
        // Also checked: F % 8 == 0 and 16-byte aligned buffers; a thread covers f..f + 8.
        return launch(be, "swiglu_forward_vec8", rows_cols(OP, t, f / 8)?, |a| {
            a.arg(&to).arg(&tg).arg(&t32).arg(&f_i32);
        });
    }
    launch(be, "swiglu_forward", rows_cols(OP, t, f)?, |a| {
        a.arg(&to).arg(&tg).arg(&t32).arg(&f_i32);
    })
}

/// dgate_up `[T, 2F]` overwritten from dout `[T, F]` and gate_up `[T, 2F]`; `out` `[T, F]`,
/// when given, overwritten with [`forward`]'s value in the same pass.
pub fn backward(
    be: &CudaBackend,
    dgate_up: &mut CudaBuf,
    out: Option<&mut CudaBuf>,
    dout: &CudaBuf,
    gate_up: &CudaBuf,
    t: usize,
    f: usize,
) -> Result<(), BackendError> {
    const OP: &str = "swiglu_backward";
    let (n, n2) = (prod(OP, &[t, f])?, prod(OP, &[t, 2, f])?);
    need(OP, "dgate_up [T, 2F]", dgate_up.len(), n2)?;
    if let Some(o) = out.as_deref() {
        need(OP, "out [T, F]", o.len(), n)?;
    }
    need(OP, "dout [T, F]", dout.len(), n)?;
    need(OP, "gate_up [T, 2F]", gate_up.len(), n2)?;
    if t == 0 || f == 0 {
        return Ok(());
    }
    dim_i32(OP, "2F", 2 * f)?;
    let (t32, f_i32) = (dim_i32(OP, "T", t)?, dim_i32(OP, "F", f)?);
    let out = out.as_deref();
    // Checked: dgate_up and gate_up hold T 2F, dout and out (when given) T F, and 2F fits an
    // i32; an absent out is a null `Ten` the kernels skip.
    let (tdg, to, tdo, tg) = (
        be.ten(dgate_up),
        be.ten_opt(out),
        be.ten(dout),
        be.ten(gate_up),
    );
    if vec8_ok(be, f, &[dgate_up, dout, gate_up]) && out.is_none_or(|o| vec8_ok(be, f, &[o])) {
        // Also checked: F % 8 == 0 and 16-byte aligned buffers; a thread covers f..f + 8.
        return launch(be, "swiglu_backward_vec8", rows_cols(OP, t, f / 8)?, |a| {
            a.arg(&tdg)
                .arg(&to)
                .arg(&tdo)
                .arg(&tg)
                .arg(&t32)
                .arg(&f_i32);
        });
    }
    launch(be, "swiglu_backward", rows_cols(OP, t, f)?, |a| {
        a.arg(&tdg)
            .arg(&to)
            .arg(&tdo)
            .arg(&tg)
            .arg(&t32)
            .arg(&f_i32);
    })
}

#[cfg(test)]
mod tests {
    use super::super::elementwise::gpu_test::*;
    use crate::backend::Backend;

    /// CUDA against the CPU on a GPU only; T = 301, F = 304 (the `_vec8` kernels: 38 groups
    /// of 8, one column block) and F = 301 (the scalar kernels: two column blocks, the second
    /// ragged), gates scaled to [-10, 10). Tolerance 1e-5 relative: precise expf against the
    /// CPU's 2-ulp Cephes exp, then a handful of f32 multiplies.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_swiglu_matches_cpu() {
        for f in [304, 301] {
            swiglu_case(301, f);
        }
    }

    fn swiglu_case(t: usize, f: usize) {
        let (be, cpu, mut rng) = setup(54);
        let gu: Vec<f32> = randv(&mut rng, t * 2 * f)
            .iter()
            .map(|x| 10.0 * x)
            .collect();
        let dout = randv(&mut rng, t * f);
        let gu_g = up(&be, &gu);
        let mut out_c = vec![0.0; t * f];
        cpu.swiglu_forward(&mut out_c, &gu, t, f).unwrap();
        let mut out_g = up(&be, &vec![f32::NAN; t * f]);
        be.swiglu_forward(&mut out_g, &gu_g, t, f).unwrap();
        close("swiglu out", &down(&be, &out_g, t * f), &out_c, 1e-5);
        let mut dgu_c = vec![0.0; t * 2 * f];
        cpu.swiglu_backward(&mut dgu_c, None, &dout, &gu, t, f)
            .unwrap();
        let dout_g = up(&be, &dout);
        let mut dgu_g = up(&be, &vec![f32::NAN; t * 2 * f]);
        be.swiglu_backward(&mut dgu_g, None, &dout_g, &gu_g, t, f)
            .unwrap();
        let dgu_none = down(&be, &dgu_g, t * 2 * f);
        close("swiglu dgate_up", &dgu_none, &dgu_c, 1e-5);
        // With the optional output: the forward's value bitwise, dgate_up unchanged.
        let mut s_g = up(&be, &vec![f32::NAN; t * f]);
        be.swiglu_backward(&mut dgu_g, Some(&mut s_g), &dout_g, &gu_g, t, f)
            .unwrap();
        assert_eq!(down(&be, &s_g, t * f), down(&be, &out_g, t * f), "s");
        assert_eq!(down(&be, &dgu_g, t * 2 * f), dgu_none, "dgate_up with s");
    }
}
