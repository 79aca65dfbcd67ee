//! The backward of [`Llama`]: the forward of the micro-batch, then the final norm, the layers
//! in reverse (a layer's forward re-run first when activations are recomputed) and the
//! embedding, each op's backward in the reverse order of the list in `mod.rs`. `dres` carries
//! the residual-stream gradient; weight gradients are added (`+=`), so micro-steps accumulate,
//! except in the first backward after `zero_grads`, which writes them (`GradWrite::Overwrite`)
//! instead of zeroing 4 bytes per parameter first.
//! Every other gradient scratch (ds, dgate_up, dn, datt, dqkv) is overwritten by the op that
//! produces it, so none is zeroed first.

use super::{gemm_weight, DeviceBatch, GradsReady, Llama, WeightsReady};
use crate::backend::{Backend, BackendError, GradWrite};

impl<B: Backend> Llama<B> {
    /// Forward and backward of one micro-batch: gradients of `loss_scale * sum_t loss_t` are
    /// *added* to `grads` (so micro-steps accumulate; call [`Llama::zero_grads`] per step).
    /// Returns the unscaled loss sum.
    pub fn forward_backward(
        &mut self,
        be: &B,
        batch: &DeviceBatch<B>,
        loss_scale: f32,
    ) -> Result<f64, BackendError> {
        self.forward_backward_hooked(be, batch, loss_scale, &mut |_| Ok(()), &mut |_, _| Ok(()))
    }

    /// [`Llama::forward_backward`], calling `weights_ready(stage)` before the forward first
    /// reads each stage's weights ([`crate::model::ParamLayout::forward_stages`]; a ZeRO-1 run
    /// waits there for the weights other ranks are still sending), and
    /// `grads_ready(grads, from)` each time the gradients of the tensors `from..` (layout
    /// order) are final for this micro-batch: after the classifier and final norm, then after
    /// each layer's backward (the embedding's comes last, with the return). A data-parallel
    /// run starts summing them across ranks there, overlapping the rest of the backward.
    pub fn forward_backward_hooked<E: From<BackendError>>(
        &mut self,
        be: &B,
        batch: &DeviceBatch<B>,
        loss_scale: f32,
        weights_ready: &mut WeightsReady<'_, E>,
        grads_ready: &mut GradsReady<'_, B, E>,
    ) -> Result<f64, E> {
        if self.act_grads && !self.overwrite_grads {
            return Err(BackendError::Shape {
                op: "Llama::forward_backward",
                message: "the weight gradients are bf16 (with_act_grads) and hold one \
                          micro-step: call zero_grads before each backward"
                    .into(),
            }
            .into());
        }
        // The loss is read back only after the backward is queued, so a device backend runs
        // the whole micro-step without waiting for the host.
        self.forward_inner(be, batch, Some(loss_scale), weights_ready)?;
        let write = self.grad_write();
        let m = self.dims;
        let t = batch.t;
        let n_layers = self.layout.layers.len();

        // Final norm: dres = d r_L (and its activation-precision copy for layer L-1's Wdown).
        be.zero(&mut self.scratch.dres, t * m.c)?;
        be.rmsnorm_backward(
            &mut self.scratch.dres,
            Some(&mut self.scratch.dres_act),
            &mut self.grads[self.layout.ln_f],
            &self.scratch.dn,
            &self.residual[n_layers],
            &self.params[self.layout.ln_f],
            &self.rstd_f,
            t,
            m.c,
            write,
        )?;
        // Everything after the last layer: ln_f, and lm_head when untied (tied, it is the
        // embedding, index 0, final only at the end).
        grads_ready(&mut self.grads, self.layout.ln_f)?;
        for l in (0..n_layers).rev() {
            let slot = if self.recompute {
                self.layer_forward(be, l, 0, batch)?;
                0
            } else {
                l
            };
            self.layer_backward(be, l, slot, batch, write)?;
            grads_ready(&mut self.grads, self.layout.layers[l].first())?;
        }
        be.embedding_backward(
            &mut self.grads[self.layout.embed],
            &self.scratch.dres,
            &batch.tokens,
            t,
            m.c,
        )?;
        self.overwrite_grads = false;
        Ok(self.loss_sum(be, t)?)
    }

    /// Backward of layer `l`: on entry `dres` = d r2, on exit d r0; weight grads +=.
    fn layer_backward(
        &mut self,
        be: &B,
        l: usize,
        slot: usize,
        batch: &DeviceBatch<B>,
        write: GradWrite,
    ) -> Result<(), BackendError> {
        let m = self.dims;
        let t = batch.t;
        let p = self.layout.layers[l];
        let ad = self.attn_dims(batch);
        let a = &self.acts[slot];
        let s = &mut self.scratch;
        let g = &mut self.grads;
        let w = &self.params;
        let gw = |i| gemm_weight::<B>(&self.working, &self.params, i);

        // r2 = r1 + s Wdown^T. ds = dres Wdown first; the SwiGLU backward then also writes
        // s = silu(gate) up (not kept by the forward) in the same pass over gate_up, and only
        // then dWdown += dres^T s. With `recompute` the layer's forward has just run and left
        // this layer's s in scratch, so the backward writes no second copy. Both GEMMs read
        // dres as `dres_act`, the rounded copy the last rmsnorm backward wrote.
        be.matmul_backward_input(&mut s.ds, &s.dres_act, gw(p.wdown), t, m.f, m.c)?;
        let s_out = (!self.recompute).then_some(&mut s.s);
        be.swiglu_backward(&mut s.dgate_up, s_out, &s.ds, &a.gate_up, t, m.f)?;
        be.matmul_backward_weight(&mut g[p.wdown], None, &s.dres_act, &s.s, t, m.f, m.c, write)?;
        be.matmul_backward(
            &mut s.dn,
            &mut g[p.wgate_up],
            None,
            &s.dgate_up,
            &a.n2,
            gw(p.wgate_up),
            t,
            m.c,
            2 * m.f,
            write,
        )?;
        // dres += rmsnorm'(dn2): now dres = d r1, and dres_act its copy for the Wo backward.
        be.rmsnorm_backward(
            &mut s.dres,
            Some(&mut s.dres_act),
            &mut g[p.ln2],
            &s.dn,
            &a.r1,
            &w[p.ln2],
            &a.rstd2,
            t,
            m.c,
            write,
        )?;

        // r1 = r0 + att Wo^T
        be.matmul_backward(
            &mut s.datt,
            &mut g[p.wo],
            None,
            &s.dres_act,
            &a.att,
            gw(p.wo),
            t,
            m.h * m.d,
            m.c,
            write,
        )?;
        be.attention_rope_backward(
            &mut s.dqkv,
            &s.datt,
            &a.qkv,
            &a.att,
            &a.lse,
            &batch.positions,
            &self.inv_freq,
            &batch.cu_seqlens,
            ad,
        )?;
        match p.bqkv {
            Some(b) => {
                // Two disjoint grads of the same list: split the borrow.
                let (lo, hi) = g.split_at_mut(b.max(p.wqkv));
                let (dw, db) = if p.wqkv < b {
                    (&mut lo[p.wqkv], &mut hi[0])
                } else {
                    (&mut hi[0], &mut lo[b])
                };
                be.matmul_backward(
                    &mut s.dn,
                    dw,
                    Some(db),
                    &s.dqkv,
                    &a.n1,
                    gw(p.wqkv),
                    t,
                    m.c,
                    m.qkv,
                    write,
                )?;
            }
            None => be.matmul_backward(
                &mut s.dn,
                &mut g[p.wqkv],
                None,
                &s.dqkv,
                &a.n1,
                gw(p.wqkv),
                t,
                m.c,
                m.qkv,
                write,
            )?,
        }
        // dres += rmsnorm'(dn1): now dres = d r0, copied for layer l-1's Wdown backward (layer
        // 0's is read only by the embedding backward, which takes the f32 dres).
        be.rmsnorm_backward(
            &mut s.dres,
            (l > 0).then_some(&mut s.dres_act),
            &mut g[p.ln1],
            &s.dn,
            &self.residual[l],
            &w[p.ln1],
            &a.rstd1,
            t,
            m.c,
            write,
        )?;
        Ok(())
    }
}
