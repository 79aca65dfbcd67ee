//! The `Backend` trait: the coarse ops the model is written against, each with an explicit
//! forward and backward. No autograd: `model` calls the backwards in reverse order.
//!
//! Shape letters (used in every doc comment and in variable names):
//! T packed tokens of one micro-batch, C model width, H query heads, Hkv key/value heads,
//! D head dim, QKV = (H + 2 Hkv) D, F SwiGLU hidden width, V vocabulary, N documents.
//! Tensors are row-major and flat; a `[T, C]` buffer holds row t at `t * C`.
//!
//! Contract (as llm.c's): a backward *accumulates* (`+=`) into parameter gradients and into
//! the input gradients marked "+=" below (the residual stream, inputs read by several ops);
//! every other output is *overwritten*. Buffers may be longer than the op needs: an op reads
//! and writes only the leading elements its dims describe, so buffers sized for the largest
//! micro-batch are reused for every smaller one.
//!
//! Buffers belong to the backend (`Buf` for floats, full precision from `alloc` or the
//! activation precision from `alloc_act`; `IdxBuf` for i32 indices); the host sees values only through `upload`/`download`, so a
//! device backend runs a whole step without host round trips except `sum_squares`.

pub mod cpu;
pub mod cuda;

use thiserror::Error;

/// Any failure of a backend op.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
    #[error("{op} is not implemented by the {backend} backend")]
    Unsupported {
        op: &'static str,
        backend: &'static str,
    },
    #[error("{backend} backend unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
    },
    #[error("{op}: device error: {message}")]
    Device { op: &'static str, message: String },
}

/// Hyper-parameters of one AdamW update of one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (already 0 for tensors excluded from decay).
    pub weight_decay: f32,
    /// Multiplier applied to the gradient first (1/global target count times the clip factor).
    pub grad_scale: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
}

/// One tensor of [`Backend::adamw_tensors`]: its parameter, gradient and moments (`n`
/// elements each), the working copy to write the new parameter into (rounded to its
/// precision), if it has one, and its decoupled weight decay (0 where excluded from decay).
pub struct AdamWTensor<'a, Buf> {
    pub param: &'a mut Buf,
    pub grad: &'a Buf,
    pub m: &'a mut Buf,
    pub v: &'a mut Buf,
    pub working: Option<&'a mut Buf>,
    pub n: usize,
    pub weight_decay: f32,
}

/// [`Backend::adamw_tensors`] one tensor at a time (its default, and a device backend's
/// fallback).
pub fn adamw_each<B: Backend + ?Sized>(
    be: &B,
    tensors: &mut [AdamWTensor<'_, B::Buf>],
    hp: AdamWStep,
) -> Result<(), BackendError> {
    for t in tensors.iter_mut() {
        let hp = AdamWStep {
            weight_decay: t.weight_decay,
            ..hp
        };
        match t.working.as_deref_mut() {
            Some(w) => be.adamw_with_copy(t.param, t.grad, t.m, t.v, w, t.n, hp)?,
            None => be.adamw(t.param, t.grad, t.m, t.v, t.n, hp)?,
        }
    }
    Ok(())
}

/// Dims of the attention ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Packed tokens T.
    pub t: usize,
    /// Query heads H.
    pub h: usize,
    /// Key/value heads Hkv (divides H).
    pub hkv: usize,
    /// Head dim D.
    pub d: usize,
    /// Documents N (`cu_seqlens` holds N + 1 entries).
    pub n_docs: usize,
    /// Longest document: an upper bound on every length in `cu_seqlens` (a longer document
    /// is an error; empty documents are allowed).
    pub max_seqlen: usize,
}

impl AttnDims {
    /// Width of one row of the fused qkv buffer: (H + 2 Hkv) D.
    pub fn qkv_width(&self) -> usize {
        (self.h + 2 * self.hkv) * self.d
    }
}

/// Check `cu_seqlens` (its leading N + 1 entries): starts at 0, never decreases, ends at T, no
/// document longer than `max_seqlen`. Every backend's attention calls this before it trusts
/// the offsets; the error names the op and the offending document.
pub fn check_cu_seqlens(op: &'static str, cu: &[i32], dims: &AttnDims) -> Result<(), BackendError> {
    let shape = |message: String| BackendError::Shape { op, message };
    let n1 = dims
        .n_docs
        .checked_add(1)
        .ok_or_else(|| shape("n_docs overflows".into()))?;
    if cu.len() < n1 {
        return Err(shape(format!(
            "cu_seqlens [N + 1] holds {} entries, {n1} needed",
            cu.len()
        )));
    }
    let cu = &cu[..n1];
    if cu[0] != 0 {
        return Err(shape(format!("cu_seqlens[0] = {}, must be 0", cu[0])));
    }
    for (n, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(shape(format!(
                "cu_seqlens decreases at document {n}: {} -> {}",
                w[0], w[1]
            )));
        }
        let len = (w[1] - w[0]) as usize;
        if len > dims.max_seqlen {
            return Err(shape(format!(
                "document {n} has length {len} > max_seqlen {}",
                dims.max_seqlen
            )));
        }
    }
    if cu[dims.n_docs] as usize != dims.t {
        return Err(shape(format!(
            "cu_seqlens ends at {}, must end at T = {}",
            cu[dims.n_docs], dims.t
        )));
    }
    Ok(())
}

/// How an op stores a weight gradient: added to what the buffer holds (`Add`: micro-steps
/// accumulate), or written over it (`Overwrite`: the first micro-step of a step, so the
/// gradients need no zeroing pass first; whatever the buffer held, NaN included, is never
/// read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradWrite {
    Add,
    Overwrite,
}

/// Coarse ops with forward and backward. `Result` everywhere: a device op can fail.
pub trait Backend {
    /// Float buffer (activations, parameters, gradients, optimizer moments), full precision
    /// (`alloc`) or the activation precision (`alloc_act`); every op accepts either for any
    /// float argument (the CUDA backend's two kinds; the CPU's are both f32).
    type Buf;
    /// i32 buffer (token ids, targets, positions, `cu_seqlens`).
    type IdxBuf;

    fn name(&self) -> &'static str;

    // ---------------------------------------------------------------- memory
    /// A zeroed buffer of `len` floats in full precision (f32): parameters, gradients,
    /// optimizer moments, per-row statistics.
    fn alloc(&self, len: usize) -> Result<Self::Buf, BackendError>;
    /// A zeroed buffer of `len` floats in the backend's activation precision (bf16 on CUDA, f32
    /// on the CPU): activations, their gradients, and the working copies of the weights the
    /// GEMMs read. Every op accepts either kind of buffer for any float argument; values
    /// stored into a lower-precision buffer are rounded (to nearest even).
    fn alloc_act(&self, len: usize) -> Result<Self::Buf, BackendError> {
        self.alloc(len)
    }
    /// Whether `alloc_act` buffers are f32 (then the model needs no working copies of its
    /// weights).
    fn activations_are_f32(&self) -> bool {
        true
    }
    /// A zeroed buffer of `len` i32.
    fn alloc_idx(&self, len: usize) -> Result<Self::IdxBuf, BackendError>;
    /// Length of a buffer in elements.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Write `src` into the leading elements of `dst`.
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<(), BackendError>;
    /// Write `src` into the leading elements of `dst`.
    fn upload_idx(&self, dst: &mut Self::IdxBuf, src: &[i32]) -> Result<(), BackendError>;
    /// Read the leading `len` elements.
    fn download(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>, BackendError>;
    /// Set the leading `len` elements to zero.
    fn zero(&self, buf: &mut Self::Buf, len: usize) -> Result<(), BackendError>;
    /// `dst[..len] = src[..len]`, converting between precisions where they differ.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize) -> Result<(), BackendError>;
    /// Wait for every queued op (a no-op on the CPU).
    fn synchronize(&self) -> Result<(), BackendError>;

    // ---------------------------------------------------------------- embedding
    /// `out[t, :] = wte[tokens[t], :]`. out `[T, C]` overwritten, wte `[V, C]`. A token
    /// outside `0..V` is an error (the CPU backend can only check it against `len(wte) / C`).
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        tokens: &Self::IdxBuf,
        wte: &Self::Buf,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError>;
    /// `dwte[tokens[t], :] += dout[t, :]`.
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dout: &Self::Buf,
        tokens: &Self::IdxBuf,
        t: usize,
        c: usize,
    ) -> Result<(), BackendError>;

    // ---------------------------------------------------------------- RMSNorm
    /// `rstd[t] = 1 / sqrt(mean_c x[t,c]^2 + eps)`, `out[t,c] = x[t,c] rstd[t] weight[c]`.
    /// out `[T, C]` and rstd `[T]` overwritten (rstd is saved for the backward).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        weight: &Self::Buf,
        t: usize,
        c: usize,
        eps: f32,
    ) -> Result<(), BackendError>;
    /// dx `[T, C]` += (the residual stream), dweight `[C]` += (or = with
    /// `GradWrite::Overwrite`). With `dx_copy = Some(copy)`,
    /// copy `[T, C]` (typically an `alloc_act` buffer) is also overwritten with the updated dx
    /// (as stored in dx, then rounded to copy's precision), in the same pass. The model passes
    /// it as `dout` to the GEMM backwards that read the residual gradient (Wo, Wdown), so their
    /// operand is this rounded copy: on CUDA exactly the bf16 values the GEMM would otherwise
    /// have converted the f32 dx into, one pass over dx earlier.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Buf,
        dx_copy: Option<&mut Self::Buf>,
        dweight: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        weight: &Self::Buf,
        rstd: &Self::Buf,
        t: usize,
        c: usize,
        dweight_write: GradWrite,
    ) -> Result<(), BackendError>;

    // ---------------------------------------------------------------- linear
    /// `out[t, o] = sum_i x[t, i] w[o, i] (+ bias[o])`: x `[T, IC]`, w `[OC, IC]` (the
    /// PyTorch `nn.Linear` layout), out `[T, OC]` overwritten.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError>;
    /// `out = x w^T + residual` with out, residual `[T, OC]` (different buffers): the Wo and
    /// Wdown projections of a block, which land on the residual stream. The default adds in a
    /// second pass; a device backend adds inside the GEMM (its C operand), saving that pass.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward_residual(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        residual: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError> {
        const OP: &str = "matmul_forward_residual";
        let n = t.checked_mul(oc).ok_or_else(|| BackendError::Shape {
            op: OP,
            message: format!("T = {t} x OC = {oc} overflows"),
        })?;
        if self.len(residual) < n {
            return Err(BackendError::Shape {
                op: OP,
                message: format!("residual [T, OC] holds {}, needs {n}", self.len(residual)),
            });
        }
        self.matmul_forward(out, x, w, None, t, ic, oc)?;
        self.add_inplace(out, residual, n)
    }
    /// The input gradient of `matmul_forward`: dx `[T, IC]` = dout w, overwritten (whatever
    /// dx held, NaN included, is never read); dout `[T, OC]`, w `[OC, IC]`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_input(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        w: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
    ) -> Result<(), BackendError>;
    /// The weight gradients of `matmul_forward`: dw `[OC, IC]` += dout^T x; dbias `[OC]` +=
    /// sum_t dout (= for both with `GradWrite::Overwrite`). dout `[T, OC]`, x `[T, IC]`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_weight(
        &self,
        dw: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        x: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
        write: GradWrite,
    ) -> Result<(), BackendError>;
    /// Both halves: dx `[T, IC]` = dout w, overwritten (never read); dw `[OC, IC]` += dout^T
    /// x; dbias `[OC]` += sum_t dout (dw and dbias as `write` says). The default calls [`Backend::matmul_backward_input`]
    /// then [`Backend::matmul_backward_weight`]; a backend overrides it to share work between
    /// them (the CUDA one converts an f32 dout to the GEMM operand precision once).
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        t: usize,
        ic: usize,
        oc: usize,
        write: GradWrite,
    ) -> Result<(), BackendError> {
        self.matmul_backward_input(dx, dout, w, t, ic, oc)?;
        self.matmul_backward_weight(dw, dbias, dout, x, t, ic, oc, write)
    }

    // ---------------------------------------------------------------- RoPE
    /// Rotate, in place, the q and k heads of the fused qkv buffer `[T, QKV]` (v untouched)
    /// by the angle `positions[t] * inv_freq[j]` on the pairs (j, j + D/2) (the Hugging Face
    /// "rotate_half" layout). inv_freq `[D/2]` carries any rope scaling; D must be even.
    fn rope_forward(
        &self,
        qkv: &mut Self::Buf,
        positions: &Self::IdxBuf,
        inv_freq: &Self::Buf,
        dims: AttnDims,
    ) -> Result<(), BackendError>;
    /// The transpose (inverse) rotation applied in place to dq and dk inside dqkv `[T, QKV]`.
    fn rope_backward(
        &self,
        dqkv: &mut Self::Buf,
        positions: &Self::IdxBuf,
        inv_freq: &Self::Buf,
        dims: AttnDims,
    ) -> Result<(), BackendError>;

    // ---------------------------------------------------------------- attention
    /// Causal attention within each document of `cu_seqlens` (`[N + 1]`, i32, starting at 0,
    /// non-decreasing, ending at T; otherwise an error): query i of a
    /// document sees keys 0..=i of the same document only. Query head h reads kv head
    /// h / (H / Hkv). `out[t, h D..(h+1) D] = softmax(q k^T / sqrt(D)) v`; out `[T, H D]`
    /// and lse `[H, T]` (log-sum-exp of the scaled scores, saved for the backward) overwritten.
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        qkv: &Self::Buf,
        cu_seqlens: &Self::IdxBuf,
        dims: AttnDims,
    ) -> Result<(), BackendError>;
    /// dqkv `[T, QKV]` overwritten (dk, dv summed over the query heads sharing a kv head).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        cu_seqlens: &Self::IdxBuf,
        dims: AttnDims,
    ) -> Result<(), BackendError>;

    /// [`Backend::attention_backward`] (qkv rotated, as the forward left it), then
    /// [`Backend::rope_backward`] on dqkv: the gradient with respect to the unrotated qkv. The
    /// default runs the two; a backend fuses them (the CUDA flash kernels rotate dq and dk
    /// before they store them).
    #[allow(clippy::too_many_arguments)]
    fn attention_rope_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        positions: &Self::IdxBuf,
        inv_freq: &Self::Buf,
        cu_seqlens: &Self::IdxBuf,
        dims: AttnDims,
    ) -> Result<(), BackendError> {
        self.attention_backward(dqkv, dout, qkv, out, lse, cu_seqlens, dims)?;
        self.rope_backward(dqkv, positions, inv_freq, dims)
    }

    // ---------------------------------------------------------------- SwiGLU
    /// gate_up `[T, 2F]` holds gate in columns 0..F and up in F..2F of each row;
    /// `out[t, f] = silu(gate) * up`, out `[T, F]` overwritten.
    fn swiglu_forward(
        &self,
        out: &mut Self::Buf,
        gate_up: &Self::Buf,
        t: usize,
        f: usize,
    ) -> Result<(), BackendError>;
    /// dgate_up `[T, 2F]` overwritten from dout `[T, F]` and gate_up. With `s = Some(out)`,
    /// out `[T, F]` is also overwritten with `swiglu_forward`'s output, bitwise (the same f32
    /// math, rounded to out's precision), in the same pass: the backward of the following
    /// GEMM needs it, and the forward does not keep it.
    fn swiglu_backward(
        &self,
        dgate_up: &mut Self::Buf,
        s: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        gate_up: &Self::Buf,
        t: usize,
        f: usize,
    ) -> Result<(), BackendError>;

    // ---------------------------------------------------------------- residual
    /// `acc[..n] += x[..n]`.
    fn add_inplace(&self, acc: &mut Self::Buf, x: &Self::Buf, n: usize)
        -> Result<(), BackendError>;

    // ---------------------------------------------------------------- lm_head + loss
    /// The classifier, fused so the `[T, V]` probabilities never exist whole: logits =
    /// x w^T (x `[T, C]`, w `[V, C]`), per-token loss `losses[t] = logsumexp(logits[t]) -
    /// logits[t, targets[t]]` (0 where targets[t] < 0, the ignore index), overwritten.
    /// With gradients, `grads = Some((dx, dw))`: dlogits = `loss_scale` (softmax - onehot) on
    /// target rows, 0 elsewhere; dx `[T, C]` overwritten with dlogits w (rows of ignored
    /// targets are 0), dw `[V, C]` += dlogits^T x (= with `GradWrite::Overwrite`). `losses`
    /// are never scaled. A target >= V is an error.
    #[allow(clippy::too_many_arguments)]
    fn classifier(
        &self,
        losses: &mut Self::Buf,
        grads: Option<(&mut Self::Buf, &mut Self::Buf)>,
        x: &Self::Buf,
        w: &Self::Buf,
        targets: &Self::IdxBuf,
        loss_scale: f32,
        t: usize,
        c: usize,
        v: usize,
        dw_write: GradWrite,
    ) -> Result<(), BackendError>;

    // ---------------------------------------------------------------- optimizer
    /// [`Backend::adamw`], also writing the updated parameter into `working` (its copy in the
    /// activation precision, rounded), in the same pass on a device backend. The default runs
    /// `adamw` then `copy`.
    #[allow(clippy::too_many_arguments)]
    fn adamw_with_copy(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        working: &mut Self::Buf,
        n: usize,
        hp: AdamWStep,
    ) -> Result<(), BackendError> {
        self.adamw(param, grad, m, v, n, hp)?;
        self.copy(working, param, n)
    }
    /// One AdamW update of every tensor of `tensors`, with `hp` except for each tensor's own
    /// weight decay. The default runs [`Backend::adamw`] or [`Backend::adamw_with_copy`] per
    /// tensor ([`adamw_each`]); a device backend may update them all in one launch, with the
    /// same results.
    fn adamw_tensors(
        &self,
        tensors: &mut [AdamWTensor<'_, Self::Buf>],
        hp: AdamWStep,
    ) -> Result<(), BackendError> {
        adamw_each(self, tensors, hp)
    }
    /// `sum_b sum_i b[i]^2` over the leading `len` of each buffer, summed in f64 on the host
    /// (the one host sync of a step).
    fn sum_squares(&self, bufs: &[(&Self::Buf, usize)]) -> Result<f64, BackendError>;
    /// `buf[..n] *= s`.
    fn scale(&self, buf: &mut Self::Buf, n: usize, s: f32) -> Result<(), BackendError>;
    /// One AdamW update of `n` elements: g = grad_scale grad; m = b1 m + (1-b1) g;
    /// v = b2 v + (1-b2) g^2; p -= lr (m̂ / (sqrt(v̂) + eps) + wd p), m̂, v̂ bias-corrected.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        n: usize,
        hp: AdamWStep,
    ) -> Result<(), BackendError>;
}
