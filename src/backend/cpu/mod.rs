//! The f32 reference backend: the oracle every other backend is tested against.
//!
//! The math lives in plain functions generic over the float type ([`Real`]: f32 here, f64 in
//! the finite-difference tests), one op per file, forward above backward, the formulas in
//! each file's header. [`CpuBackend`] is thin: it checks every length and index (a short
//! buffer or a bad dim is a `BackendError::Shape` naming the op, never a panic), then calls
//! them on the leading elements of its `Vec<f32>` buffers.
//!
//! Determinism: rayon is used only where each output element is computed by exactly one
//! task, over blocks whose size depends on the shapes (never on the thread count), and every
//! cross-task reduction is added in block order. Results are bitwise reproducible run to run
//! and across thread counts (tested below).

pub mod adamw;
pub mod add;
pub mod attention;
pub mod classifier;
pub mod embedding;
pub mod exp;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use num_traits::Float;

use super::{AdamWStep, AttnDims, Backend, BackendError, GradWrite};
use exp::Exp;
use matmul::Gemm;

/// The float types the CPU kernels run in (f32 for training, f64 for gradient checks).
pub trait Real: Float + Gemm + Exp + Send + Sync + std::fmt::Debug + 'static {}
impl<F: Float + Gemm + Exp + Send + Sync + std::fmt::Debug + 'static> Real for F {}

/// The CPU backend. Stateless; rayon's global pool supplies the threads.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

// ---------------------------------------------------------------- checks

fn shape(op: &'static str, message: String) -> BackendError {
    BackendError::Shape { op, message }
}

/// The product of `dims`, or an error if it overflows.
fn prod(op: &'static str, dims: &[usize]) -> Result<usize, BackendError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| shape(op, format!("dims {dims:?} overflow usize")))
}

/// `buf` must hold at least the product of `dims` elements; `what` names it with its shape
/// letters, e.g. "x [T, C]". Returns that product.
fn need<T>(op: &'static str, what: &str, buf: &[T], dims: &[usize]) -> Result<usize, BackendError> {
    let n = prod(op, dims)?;
    if buf.len() < n {
        return Err(shape(
            op,
            format!(
                "{what} = {dims:?} needs {n} elements, the buffer holds {}",
                buf.len()
            ),
        ));
    }
    Ok(n)
}

/// H, Hkv, D non-zero and Hkv dividing H.
fn check_heads(op: &'static str, dims: &AttnDims) -> Result<(), BackendError> {
    let heads = dims.hkv.checked_mul(2).and_then(|k| k.checked_add(dims.h));
    let heads = heads.ok_or_else(|| {
        shape(
            op,
            format!("H = {} + 2 Hkv = {} overflows", dims.h, dims.hkv),
        )
    })?;
    if dims.h == 0 || dims.hkv == 0 || dims.d == 0 || !dims.h.is_multiple_of(dims.hkv) {
        return Err(shape(
            op,
            format!(
                "need H, Hkv, D > 0 with Hkv dividing H, got H = {}, Hkv = {}, D = {}",
                dims.h, dims.hkv, dims.d
            ),
        ));
    }
    prod(op, &[heads, dims.d])?;
    Ok(())
}

/// `cu_seqlens` `[N + 1]`: starts at 0, never decreases, ends at T, no document longer than
/// max_seqlen. Returns the leading N + 1 entries.
fn check_cu<'a>(
    op: &'static str,
    cu: &'a [i32],
    dims: &AttnDims,
) -> Result<&'a [i32], BackendError> {
    crate::backend::check_cu_seqlens(op, cu, dims)?;
    Ok(&cu[..dims.n_docs + 1])
}

// ---------------------------------------------------------------- the backend

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type IdxBuf = Vec<i32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>, BackendError> {
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|e| BackendError::Device {
            op: "alloc",
            message: format!("cannot allocate {len} f32: {e}"),
        })?;
        v.resize(len, 0.0);
        Ok(v)
    }

    fn alloc_idx(&self, len: usize) -> Result<Vec<i32>, BackendError> {
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|e| BackendError::Device {
            op: "alloc_idx",
            message: format!("cannot allocate {len} i32: {e}"),
        })?;
        v.resize(len, 0);
        Ok(v)
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn upload(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<(), BackendError> {
        let n = need("upload", "dst [len]", dst, &[src.len()])?;
        dst[..n].copy_from_slice(src);
        Ok(())
    }

    fn upload_idx(&self, dst: &mut Vec<i32>, src: &[i32]) -> Result<(), BackendError> {
        let n = need("upload_idx", "dst [len]", dst, &[src.len()])?;
        dst[..n].copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &Vec<f32>, len: usize) -> Result<Vec<f32>, BackendError> {
        need("download", "src [len]", src, &[len])?;
        Ok(src[..len].to_vec())
    }

    fn zero(&self, buf: &mut Vec<f32>, len: usize) -> Result<(), BackendError> {
        need("zero", "buf [len]", buf, &[len])?;
        buf[..len].fill(0.0);
        Ok(())
    }

    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> Result<(), BackendError> {
        need("copy", "dst [len]", dst, &[len])?;
        need("copy", "src [len]", src, &[len])?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        tokens: &Vec<i32>,
        wte: &Vec<f32>,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError> {
        const OP: &str = "embedding_forward";
        let n = need(OP, "out [T, C]", out, &[t, c])?;
        check_tokens(OP, tokens, wte, t, c)?;
        embedding::embedding_forward(&mut out[..n], &tokens[..t], wte, c);
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: &mut Vec<f32>,
        dout: &Vec<f32>,
        tokens: &Vec<i32>,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError> {
        const OP: &str = "embedding_backward";
        let n = need(OP, "dout [T, C]", dout, &[t, c])?;
        check_tokens(OP, tokens, dwte, t, c)?;
        embedding::embedding_backward(dwte, &dout[..n], &tokens[..t], c);
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        t: usize,
        c: usize,
        eps: f32,
    ) -> Result<(), BackendError> {
        const OP: &str = "rmsnorm_forward";
        let n = need(OP, "out [T, C]", out, &[t, c])?;
        need(OP, "rstd [T]", rstd, &[t])?;
        need(OP, "x [T, C]", x, &[t, c])?;
        need(OP, "weight [C]", weight, &[c])?;
        rmsnorm::rmsnorm_forward(&mut out[..n], &mut rstd[..t], &x[..n], &weight[..c], c, eps);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<f32>,
        dx_copy: Option<&mut Vec<f32>>,
        dweight: &mut Vec<f32>,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rstd: &Vec<f32>,
        t: usize,
        c: usize,
        dweight_write: GradWrite,
    ) -> Result<(), BackendError> {
        const OP: &str = "rmsnorm_backward";
        let n = need(OP, "dx [T, C]", dx, &[t, c])?;
        if let Some(cp) = dx_copy.as_deref() {
            need(OP, "dx_copy [T, C]", cp, &[t, c])?;
        }
        need(OP, "dweight [C]", dweight, &[c])?;
        need(OP, "dout [T, C]", dout, &[t, c])?;
        need(OP, "x [T, C]", x, &[t, c])?;
        need(OP, "weight [C]", weight, &[c])?;
        need(OP, "rstd [T]", rstd, &[t])?;
        if dweight_write == GradWrite::Overwrite {
            dweight[..c].fill(0.0);
        }
        rmsnorm::rmsnorm_backward(
            &mut dx[..n],
            dx_copy.map(|cp| &mut cp[..n]),
            &mut dweight[..c],
            &dout[..n],
            &x[..n],
            &weight[..c],
            &rstd[..t],
            c,
        );
        Ok(())
    }

    fn matmul_forward(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError> {
        const OP: &str = "matmul_forward";
        let n = need(OP, "out [T, OC]", out, &[t, oc])?;
        let nx = need(OP, "x [T, IC]", x, &[t, ic])?;
        let nw = need(OP, "w [OC, IC]", w, &[oc, ic])?;
        if let Some(b) = bias {
            need(OP, "bias [OC]", b, &[oc])?;
        }
        let bias = bias.map(|b| &b[..oc]);
        matmul::matmul_forward(&mut out[..n], &x[..nx], &w[..nw], bias, t, ic, oc);
        Ok(())
    }

    fn matmul_backward_input(
        &self,
        dx: &mut Vec<f32>,
        dout: &Vec<f32>,
        w: &Vec<f32>,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError> {
        const OP: &str = "matmul_backward_input";
        let nx = need(OP, "dx [T, IC]", dx, &[t, ic])?;
        let no = need(OP, "dout [T, OC]", dout, &[t, oc])?;
        let nw = need(OP, "w [OC, IC]", w, &[oc, ic])?;
        matmul::matmul_backward_input(&mut dx[..nx], &dout[..no], &w[..nw], t, ic, oc);
        Ok(())
    }

    fn matmul_backward_weight(
        &self,
        dw: &mut Vec<f32>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        t: usize,
        ic: usize,
        oc: usize,
        write: GradWrite,
    ) -> Result<(), BackendError> {
        const OP: &str = "matmul_backward_weight";
        let nw = need(OP, "dw [OC, IC]", dw, &[oc, ic])?;
        if let Some(db) = dbias.as_deref() {
            need(OP, "dbias [OC]", db, &[oc])?;
        }
        let no = need(OP, "dout [T, OC]", dout, &[t, oc])?;
        let nx = need(OP, "x [T, IC]", x, &[t, ic])?;
        let mut dbias = dbias;
        if write == GradWrite::Overwrite {
            dw[..nw].fill(0.0);
            if let Some(db) = dbias.as_deref_mut() {
                db[..oc].fill(0.0);
            }
        }
        matmul::matmul_backward_weight(
            &mut dw[..nw],
            dbias.map(|db| &mut db[..oc]),
            &dout[..no],
            &x[..nx],
            t,
            ic,
            oc,
        );
        Ok(())
    }

    fn rope_forward(
        &self,
        qkv: &mut Vec<f32>,
        positions: &Vec<i32>,
        inv_freq: &Vec<f32>,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        let n = check_rope("rope_forward", qkv, positions, inv_freq, &dims)?;
        rope::rope_forward(&mut qkv[..n], &positions[..dims.t], inv_freq, dims);
        Ok(())
    }

    fn rope_backward(
        &self,
        dqkv: &mut Vec<f32>,
        positions: &Vec<i32>,
        inv_freq: &Vec<f32>,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        let n = check_rope("rope_backward", dqkv, positions, inv_freq, &dims)?;
        rope::rope_backward(&mut dqkv[..n], &positions[..dims.t], inv_freq, dims);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        qkv: &Vec<f32>,
        cu_seqlens: &Vec<i32>,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        const OP: &str = "attention_forward";
        check_heads(OP, &dims)?;
        let cu = check_cu(OP, cu_seqlens, &dims)?;
        let (t, h, d, w) = (dims.t, dims.h, dims.d, dims.qkv_width());
        let no = need(OP, "out [T, H D]", out, &[t, h * d])?;
        let nl = need(OP, "lse [H, T]", lse, &[h, t])?;
        let nq = need(OP, "qkv [T, QKV]", qkv, &[t, w])?;
        attention::attention_forward(&mut out[..no], &mut lse[..nl], &qkv[..nq], cu, dims);
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        cu_seqlens: &Vec<i32>,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        const OP: &str = "attention_backward";
        check_heads(OP, &dims)?;
        let cu = check_cu(OP, cu_seqlens, &dims)?;
        let (t, h, d, w) = (dims.t, dims.h, dims.d, dims.qkv_width());
        let nq = need(OP, "dqkv [T, QKV]", dqkv, &[t, w])?;
        let no = need(OP, "dout [T, H D]", dout, &[t, h * d])?;
        need(OP, "qkv [T, QKV]", qkv, &[t, w])?;
        need(OP, "out [T, H D]", out, &[t, h * d])?;
        let nl = need(OP, "lse [H, T]", lse, &[h, t])?;
        attention::attention_backward(
            &mut dqkv[..nq],
            &dout[..no],
            &qkv[..nq],
            &out[..no],
            &lse[..nl],
            cu,
            dims,
        );
        Ok(())
    }

    fn swiglu_forward(
        &self,
        out: &mut Vec<f32>,
        gate_up: &Vec<f32>,
        t: usize,
        f: usize,
    ) -> Result<(), BackendError> {
        const OP: &str = "swiglu_forward";
        let n = need(OP, "out [T, F]", out, &[t, f])?;
        let ng = need(OP, "gate_up [T, 2F]", gate_up, &[t, 2, f])?;
        swiglu::swiglu_forward(&mut out[..n], &gate_up[..ng], f);
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgate_up: &mut Vec<f32>,
        s: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        gate_up: &Vec<f32>,
        t: usize,
        f: usize,
    ) -> Result<(), BackendError> {
        const OP: &str = "swiglu_backward";
        let ng = need(OP, "dgate_up [T, 2F]", dgate_up, &[t, 2, f])?;
        if let Some(s) = s.as_deref() {
            need(OP, "s [T, F]", s, &[t, f])?;
        }
        let n = need(OP, "dout [T, F]", dout, &[t, f])?;
        need(OP, "gate_up [T, 2F]", gate_up, &[t, 2, f])?;
        swiglu::swiglu_backward(
            &mut dgate_up[..ng],
            s.map(|s| &mut s[..n]),
            &dout[..n],
            &gate_up[..ng],
            f,
        );
        Ok(())
    }

    fn add_inplace(&self, acc: &mut Vec<f32>, x: &Vec<f32>, n: usize) -> Result<(), BackendError> {
        need("add_inplace", "acc [n]", acc, &[n])?;
        need("add_inplace", "x [n]", x, &[n])?;
        add::add_inplace(&mut acc[..n], &x[..n]);
        Ok(())
    }

    fn classifier(
        &self,
        losses: &mut Vec<f32>,
        grads: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        targets: &Vec<i32>,
        loss_scale: f32,
        t: usize,
        c: usize,
        v: usize,
        dw_write: GradWrite,
    ) -> Result<(), BackendError> {
        const OP: &str = "classifier";
        need(OP, "losses [T]", losses, &[t])?;
        let nx = need(OP, "x [T, C]", x, &[t, c])?;
        let nw = need(OP, "w [V, C]", w, &[v, c])?;
        need(OP, "targets [T]", targets, &[t])?;
        if let Some((i, &tg)) = targets[..t]
            .iter()
            .enumerate()
            .find(|&(_, &tg)| tg >= 0 && tg as usize >= v)
        {
            return Err(shape(OP, format!("targets[{i}] = {tg} is not < V = {v}")));
        }
        if let Some((dx, dw)) = grads.as_ref() {
            need(OP, "dx [T, C]", dx, &[t, c])?;
            need(OP, "dw [V, C]", dw, &[v, c])?;
        }
        let grads = grads.map(|(dx, dw)| {
            if dw_write == GradWrite::Overwrite {
                dw[..nw].fill(0.0);
            }
            (&mut dx[..nx], &mut dw[..nw])
        });
        classifier::classifier(
            &mut losses[..t],
            grads,
            &x[..nx],
            &w[..nw],
            &targets[..t],
            loss_scale,
            t,
            c,
            v,
        );
        Ok(())
    }

    fn sum_squares(&self, bufs: &[(&Vec<f32>, usize)]) -> Result<f64, BackendError> {
        let mut total = 0.0;
        for (i, &(buf, len)) in bufs.iter().enumerate() {
            need("sum_squares", &format!("buffer {i} [len]"), buf, &[len])?;
            total += adamw::sum_squares(&buf[..len]);
        }
        Ok(total)
    }

    fn scale(&self, buf: &mut Vec<f32>, n: usize, s: f32) -> Result<(), BackendError> {
        need("scale", "buf [n]", buf, &[n])?;
        adamw::scale(&mut buf[..n], s);
        Ok(())
    }

    fn adamw(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        n: usize,
        hp: AdamWStep,
    ) -> Result<(), BackendError> {
        const OP: &str = "adamw";
        need(OP, "param [n]", param, &[n])?;
        need(OP, "grad [n]", grad, &[n])?;
        need(OP, "m [n]", m, &[n])?;
        need(OP, "v [n]", v, &[n])?;
        if hp.step == 0 {
            return Err(shape(OP, "step is 1-based, got 0".into()));
        }
        adamw::adamw(&mut param[..n], &grad[..n], &mut m[..n], &mut v[..n], hp);
        Ok(())
    }
}

/// tokens `[T]` each in 0..V, with V = wte.len() / C rows available in `wte`.
fn check_tokens(
    op: &'static str,
    tokens: &[i32],
    wte: &[f32],
    t: usize,
    c: usize,
) -> Result<(), BackendError> {
    need(op, "tokens [T]", tokens, &[t])?;
    if c == 0 {
        return Ok(());
    }
    let rows = wte.len() / c;
    if let Some((i, &tok)) = tokens[..t]
        .iter()
        .enumerate()
        .find(|&(_, &tok)| tok < 0 || tok as usize >= rows)
    {
        return Err(shape(
            op,
            format!("tokens[{i}] = {tok} is outside the embedding table of {rows} rows of C = {c}"),
        ));
    }
    Ok(())
}

/// Checks of the RoPE ops; returns T * QKV.
fn check_rope(
    op: &'static str,
    qkv: &[f32],
    positions: &[i32],
    inv_freq: &[f32],
    dims: &AttnDims,
) -> Result<usize, BackendError> {
    check_heads(op, dims)?;
    if !dims.d.is_multiple_of(2) {
        return Err(shape(op, format!("head dim D = {} must be even", dims.d)));
    }
    need(op, "positions [T]", positions, &[dims.t])?;
    need(op, "inv_freq [D/2]", inv_freq, &[dims.d / 2])?;
    need(op, "qkv [T, QKV]", qkv, &[dims.t, dims.qkv_width()])
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
