//! The Llama model over one packed micro-batch, written once against [`Backend`].
//!
//! Shapes: T packed tokens (no batch dimension), C width, H/Hkv heads, D head dim,
//! QKV = (H + 2 Hkv) D, F SwiGLU width, V vocabulary, L layers.
//!
//! ```text
//! r0 = embed(tokens)
//! layer l:  n1 = rmsnorm(r0) -> qkv = n1 Wqkv^T (+b) -> rope(q, k) -> att = attn(qkv | cu_seqlens)
//!           r1 = r0 + att Wo^T -> n2 = rmsnorm(r1) -> gu = n2 Wgu^T -> s = silu(g) * u
//!           r2 = r1 + s Wdown^T                         (r2 is the next layer's r0)
//! nf = rmsnorm(r_L) -> loss_t = CE(nf Wlm^T, target_t)   (fused, chunked)
//! ```
//! The backward walks the same list in reverse; `dres` carries the residual-stream gradient
//! and every rmsnorm backward adds into it.
//!
//! Precision: parameters, gradients, `dres` and the per-row statistics (rstd, lse, losses) are
//! full precision (`Backend::alloc`); activations, the other gradient scratch and the working
//! copies of the GEMM weights are in the backend's activation precision (`alloc_act`: bf16 on
//! CUDA). The working copies are refreshed from the f32 parameters before the first forward
//! after any change through [`Llama::params_mut`]. The GEMM backwards that read the residual
//! gradient (Wo, Wdown) take `dres_act`, dres rounded to the activation precision, which each
//! rmsnorm backward writes as it updates dres: the very bf16 operand the GEMM would otherwise
//! convert dres into (so the numbers are unchanged), without that extra pass over dres.
//!
//! Memory: a layer keeps n1, rstd1, qkv, att, lse, r1, n2, rstd2 and gate_up for its backward;
//! s = silu(gate) * up is not kept (T F values per layer, 4 GB for TinyLlama at 16384 tokens):
//! the SwiGLU backward writes it again from gate_up, which it reads anyway, before the Wdown
//! weight gradient needs it.

use crate::backend::{AttnDims, Backend, BackendError, GradWrite};
use crate::config::ModelConfig;
use crate::packing::PackedBatch;

use super::params::ParamLayout;

mod backward;

/// A packed batch on the device.
pub struct DeviceBatch<B: Backend> {
    pub tokens: B::IdxBuf,
    pub targets: B::IdxBuf,
    pub positions: B::IdxBuf,
    pub cu_seqlens: B::IdxBuf,
    /// Tokens T.
    pub t: usize,
    /// Documents N.
    pub n_docs: usize,
    pub max_seqlen: usize,
    /// Tokens whose target is not ignored.
    pub num_targets: usize,
}

impl<B: Backend> DeviceBatch<B> {
    /// Buffers for batches of up to `capacity` tokens.
    pub fn new(be: &B, capacity: usize) -> Result<Self, BackendError> {
        Ok(Self {
            tokens: be.alloc_idx(capacity)?,
            targets: be.alloc_idx(capacity)?,
            positions: be.alloc_idx(capacity)?,
            cu_seqlens: be.alloc_idx(capacity + 1)?,
            t: 0,
            n_docs: 0,
            max_seqlen: 0,
            num_targets: 0,
        })
    }

    /// Upload a host batch (it must fit the capacity).
    pub fn upload(&mut self, be: &B, batch: &PackedBatch) -> Result<(), BackendError> {
        let t = batch.tokens.len();
        let tokens: Vec<i32> = batch.tokens.iter().map(|&x| x as i32).collect();
        be.upload_idx(&mut self.tokens, &tokens)?;
        be.upload_idx(&mut self.targets, &batch.targets)?;
        be.upload_idx(&mut self.positions, &batch.position_ids)?;
        be.upload_idx(&mut self.cu_seqlens, &batch.cu_seqlens)?;
        self.t = t;
        self.n_docs = batch.cu_seqlens.len().saturating_sub(1);
        self.max_seqlen = batch.max_seqlen;
        self.num_targets = batch.num_targets;
        Ok(())
    }
}

/// What one transformer block keeps for its backward.
struct LayerActs<B: Backend> {
    n1: B::Buf,
    rstd1: B::Buf,
    qkv: B::Buf,
    att: B::Buf,
    lse: B::Buf,
    r1: B::Buf,
    n2: B::Buf,
    rstd2: B::Buf,
    gate_up: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    fn new(be: &B, cap: usize, m: &Dims) -> Result<Self, BackendError> {
        Ok(Self {
            n1: be.alloc_act(cap * m.c)?,
            rstd1: be.alloc(cap)?,
            qkv: be.alloc_act(cap * m.qkv)?,
            att: be.alloc_act(cap * m.h * m.d)?,
            lse: be.alloc(cap * m.h)?,
            r1: be.alloc_act(cap * m.c)?,
            n2: be.alloc_act(cap * m.c)?,
            rstd2: be.alloc(cap)?,
            gate_up: be.alloc_act(cap * 2 * m.f)?,
        })
    }
}

/// Scratch shared by all layers: s (forward, and written again by the SwiGLU backward) and
/// the gradients of one layer.
struct Scratch<B: Backend> {
    s: B::Buf,
    dres: B::Buf,
    /// dres in the activation precision, written by every rmsnorm backward beside dres: the
    /// `dout` operand of the Wdown and Wo backward GEMMs.
    dres_act: B::Buf,
    dn: B::Buf,
    dqkv: B::Buf,
    datt: B::Buf,
    dgate_up: B::Buf,
    ds: B::Buf,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    v: usize,
    c: usize,
    h: usize,
    hkv: usize,
    d: usize,
    qkv: usize,
    f: usize,
    eps: f32,
}

/// The model: parameters, their gradients, activation buffers for up to `capacity` tokens.
pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    pub layout: ParamLayout,
    /// f32 master weights, in layout order (read them through [`Llama::params`], change them
    /// through [`Llama::params_mut`]).
    params: Vec<B::Buf>,
    /// Activation-precision copies of the matrices the GEMMs read (`Some` at those indices
    /// when the backend's activations are not f32), and whether they are stale.
    working: Vec<Option<B::Buf>>,
    working_stale: bool,
    pub grads: Vec<B::Buf>,
    dims: Dims,
    capacity: usize,
    recompute: bool,
    inv_freq: B::Buf,
    /// Input of each layer's residual stream (r0 of layer l), plus the final one.
    residual: Vec<B::Buf>,
    /// Per-layer activations (one shared set when recomputing).
    acts: Vec<LayerActs<B>>,
    nf: B::Buf,
    rstd_f: B::Buf,
    /// Per-token loss of the last forward.
    losses: B::Buf,
    scratch: Scratch<B>,
    /// Set by `zero_grads`: the next backward writes every gradient instead of adding to it
    /// (the embedding's, scatter-added, is zeroed by `zero_grads` itself).
    overwrite_grads: bool,
    /// The GEMM matrices' gradients are in the activation precision ([`Llama::with_act_grads`]).
    act_grads: bool,
}

/// The hook of [`Llama::forward_backward_hooked`]: `(grads, from)` says the gradients of
/// tensors `from..` are final.
pub type GradsReady<'a, B, E> = dyn FnMut(&mut [<B as Backend>::Buf], usize) -> Result<(), E> + 'a;

/// The weights hook of [`Llama::forward_backward_hooked`]: called with stage `s` (see
/// [`ParamLayout::forward_stages`]) before the forward first reads that stage's weights, so
/// weights still arriving from other ranks can be waited for there.
pub type WeightsReady<'a, E> = dyn FnMut(usize) -> Result<(), E> + 'a;

/// [`Llama::update_view`]: master weights, working copies, gradients.
pub type UpdateView<'a, B> = (
    &'a mut [<B as Backend>::Buf],
    &'a mut [Option<<B as Backend>::Buf>],
    &'a [<B as Backend>::Buf],
);

/// The buffer a GEMM reads for parameter `i`: its working copy, else the master (a free
/// function, so it borrows only these two fields).
fn gemm_weight<'a, B: Backend>(
    working: &'a [Option<B::Buf>],
    params: &'a [B::Buf],
    i: usize,
) -> &'a B::Buf {
    working[i].as_ref().unwrap_or(&params[i])
}

/// RoPE inverse frequencies `theta^(-2j/D)`, j < D/2.
pub fn rope_inv_freq(theta: f64, d: usize) -> Vec<f32> {
    (0..d / 2)
        .map(|j| theta.powf(-((2 * j) as f64) / d as f64) as f32)
        .collect()
}

/// RoPE inverse frequencies of a model: [`rope_inv_freq`] of its `rope_theta` and head dim,
/// rescaled by `rope_scaling` when set (Llama 3.1's `llama3` scheme, formula in
/// [`crate::config::RopeScaling`], computed as transformers does, in f64 here).
pub fn rope_inv_freq_for(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim();
    let base = (0..d / 2).map(|j| config.rope_theta.powf(-((2 * j) as f64) / d as f64));
    let Some(r) = &config.rope_scaling else {
        return base.map(|f| f as f32).collect();
    };
    let old_len = r.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_len / r.low_freq_factor;
    let high_freq_wavelen = old_len / r.high_freq_factor;
    base.map(|f| {
        let wavelen = 2.0 * std::f64::consts::PI / f;
        let scaled = if wavelen > low_freq_wavelen {
            f / r.factor
        } else if wavelen < high_freq_wavelen {
            f
        } else {
            let s =
                (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
            (1.0 - s) * f / r.factor + s * f
        };
        scaled as f32
    })
    .collect()
}

impl<B: Backend> Llama<B> {
    /// A model with the given host weights (in `ParamLayout` order), for batches of up to
    /// `capacity` tokens.
    pub fn new(
        be: &B,
        config: &ModelConfig,
        weights: &[Vec<f32>],
        capacity: usize,
        recompute: bool,
    ) -> Result<Self, BackendError> {
        let layout = ParamLayout::new(config);
        if weights.len() != layout.specs.len() {
            return Err(BackendError::Shape {
                op: "Llama::new",
                message: format!(
                    "{} weight tensors given, the layout has {}",
                    weights.len(),
                    layout.specs.len()
                ),
            });
        }
        let d = config.head_dim();
        let dims = Dims {
            v: config.vocab_size,
            c: config.d_model,
            h: config.n_heads,
            hkv: config.n_kv_heads,
            d,
            qkv: (config.n_heads + 2 * config.n_kv_heads) * d,
            f: config.ffn_dim,
            eps: config.rms_norm_eps as f32,
        };
        let mut params = Vec::with_capacity(weights.len());
        let mut grads = Vec::with_capacity(weights.len());
        for (spec, w) in layout.specs.iter().zip(weights) {
            if w.len() != spec.numel() {
                return Err(BackendError::Shape {
                    op: "Llama::new",
                    message: format!(
                        "{} has {} values, shape {:?} needs {}",
                        spec.name,
                        w.len(),
                        spec.shape,
                        spec.numel()
                    ),
                });
            }
            let mut p = be.alloc(w.len())?;
            be.upload(&mut p, w)?;
            params.push(p);
            grads.push(be.alloc(w.len())?);
        }
        let gemm_weights = layout.gemm_weights();
        let working = (0..params.len())
            .map(
                |i| match gemm_weights.contains(&i) && !be.activations_are_f32() {
                    true => be.alloc_act(layout.specs[i].numel()).map(Some),
                    false => Ok(None),
                },
            )
            .collect::<Result<_, _>>()?;
        let mut inv_freq = be.alloc(d / 2)?;
        be.upload(&mut inv_freq, &rope_inv_freq_for(config))?;
        let cap = capacity.max(1);
        let n_act_sets = if recompute { 1 } else { config.n_layers };
        let residual = (0..=config.n_layers)
            .map(|_| be.alloc_act(cap * dims.c))
            .collect::<Result<_, _>>()?;
        let acts = (0..n_act_sets)
            .map(|_| LayerActs::new(be, cap, &dims))
            .collect::<Result<_, _>>()?;
        let scratch = Scratch {
            s: be.alloc_act(cap * dims.f)?,
            dres: be.alloc(cap * dims.c)?,
            dres_act: be.alloc_act(cap * dims.c)?,
            dn: be.alloc_act(cap * dims.c)?,
            dqkv: be.alloc_act(cap * dims.qkv)?,
            datt: be.alloc_act(cap * dims.h * dims.d)?,
            dgate_up: be.alloc_act(cap * 2 * dims.f)?,
            ds: be.alloc_act(cap * dims.f)?,
        };
        Ok(Self {
            config: config.clone(),
            layout,
            params,
            working,
            working_stale: true,
            grads,
            dims,
            capacity: cap,
            recompute,
            inv_freq,
            residual,
            acts,
            nf: be.alloc_act(cap * dims.c)?,
            rstd_f: be.alloc(cap)?,
            losses: be.alloc(cap)?,
            scratch,
            overwrite_grads: false,
            act_grads: false,
        })
    }

    /// Keeps the GEMM matrices' gradients in the activation precision (bf16 on the CUDA
    /// backend; nothing changes where activations are f32), for runs of one micro-step per
    /// optimizer step. They then hold what the bf16 GEMMs produce, which is what torch's
    /// autocast computes before it upcasts, and every reader (the gradient norm, AdamW, the
    /// ranks' sum) moves half the bytes. A second micro-step would add into them and round
    /// again, so the backward refuses to add: each needs [`Llama::zero_grads`] first. The
    /// layers' matrices only: the lm_head's gradient stays f32, since the classifier adds it
    /// up over chunks of tokens (and a tied one is the embedding's, which the backward
    /// scatter-adds into).
    /// (Where activations are f32 the gradients stay f32, but the one-micro-step rule holds
    /// all the same, so a run behaves alike on every backend.)
    pub fn with_act_grads(mut self, be: &B) -> Result<Self, BackendError> {
        if !be.activations_are_f32() {
            for i in self.layout.gemm_weights() {
                if i != self.layout.lm_head {
                    self.grads[i] = be.alloc_act(self.layout.specs[i].numel())?;
                }
            }
        }
        self.act_grads = true;
        Ok(self)
    }

    /// How the next backward stores the weight gradients (see `zero_grads`).
    fn grad_write(&self) -> GradWrite {
        if self.overwrite_grads {
            GradWrite::Overwrite
        } else {
            GradWrite::Add
        }
    }

    /// Largest batch (tokens) this model's buffers hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The f32 master weights, in layout order.
    pub fn params(&self) -> &[B::Buf] {
        &self.params
    }

    /// The master weights for changing (optimizer, checkpoint load); the GEMMs' working
    /// copies are refreshed before the next forward.
    pub fn params_mut(&mut self) -> &mut [B::Buf] {
        self.working_stale = true;
        &mut self.params
    }

    /// The optimizer's view: master weights, their working copies (`Some` for the GEMM
    /// matrices when activations are not f32) and the gradients. The caller must write the
    /// working copy of every parameter it changes (`Backend::adamw_with_copy` does); a caller
    /// that changes weights any other way afterwards uses [`Llama::params_mut`], which marks
    /// every working copy stale again.
    pub fn update_view(&mut self) -> UpdateView<'_, B> {
        self.working_stale = false;
        (&mut self.params, &mut self.working, &self.grads)
    }

    /// Copy (round) the master weights into the working copies if they changed.
    fn refresh_working(&mut self, be: &B) -> Result<(), BackendError> {
        if !self.working_stale {
            return Ok(());
        }
        for ((w, p), spec) in self
            .working
            .iter_mut()
            .zip(&self.params)
            .zip(&self.layout.specs)
        {
            if let Some(w) = w {
                be.copy(w, p, spec.numel())?;
            }
        }
        self.working_stale = false;
        Ok(())
    }

    fn attn_dims(&self, batch: &DeviceBatch<B>) -> AttnDims {
        AttnDims {
            t: batch.t,
            h: self.dims.h,
            hkv: self.dims.hkv,
            d: self.dims.d,
            n_docs: batch.n_docs,
            max_seqlen: batch.max_seqlen,
        }
    }

    fn check_capacity(&self, batch: &DeviceBatch<B>) -> Result<(), BackendError> {
        if batch.t > self.capacity {
            return Err(BackendError::Shape {
                op: "Llama",
                message: format!(
                    "batch of {} tokens exceeds the model's capacity {}",
                    batch.t, self.capacity
                ),
            });
        }
        Ok(())
    }

    /// Forward of layer `l` from `residual[l]` into `residual[l + 1]`, keeping its activations
    /// in `acts[slot]`.
    fn layer_forward(
        &mut self,
        be: &B,
        l: usize,
        slot: usize,
        batch: &DeviceBatch<B>,
    ) -> Result<(), BackendError> {
        let m = self.dims;
        let t = batch.t;
        let p = self.layout.layers[l];
        let ad = self.attn_dims(batch);
        let (before, after) = self.residual.split_at_mut(l + 1);
        let r0 = &before[l];
        let r2 = &mut after[0];
        let a = &mut self.acts[slot];
        be.rmsnorm_forward(
            &mut a.n1,
            &mut a.rstd1,
            r0,
            &self.params[p.ln1],
            t,
            m.c,
            m.eps,
        )?;
        let gw = |i| gemm_weight::<B>(&self.working, &self.params, i);
        let bias = p.bqkv.map(|b| &self.params[b]);
        be.matmul_forward(&mut a.qkv, &a.n1, gw(p.wqkv), bias, t, m.c, m.qkv)?;
        be.rope_forward(&mut a.qkv, &batch.positions, &self.inv_freq, ad)?;
        be.attention_forward(&mut a.att, &mut a.lse, &a.qkv, &batch.cu_seqlens, ad)?;
        // r1 = r0 + att Wo^T and r2 = r1 + s Wdown^T: the residual is added inside the GEMM
        // (a device backend's epilogue), not in a pass of its own.
        be.matmul_forward_residual(&mut a.r1, &a.att, gw(p.wo), r0, t, m.h * m.d, m.c)?;
        be.rmsnorm_forward(
            &mut a.n2,
            &mut a.rstd2,
            &a.r1,
            &self.params[p.ln2],
            t,
            m.c,
            m.eps,
        )?;
        be.matmul_forward(&mut a.gate_up, &a.n2, gw(p.wgate_up), None, t, m.c, 2 * m.f)?;
        let sbuf = &mut self.scratch.s;
        be.swiglu_forward(sbuf, &a.gate_up, t, m.f)?;
        be.matmul_forward_residual(r2, sbuf, gw(p.wdown), &a.r1, t, m.f, m.c)?;
        Ok(())
    }

    /// Forward through every layer and the loss. Per-token losses are kept (see
    /// [`Llama::token_losses`]); returns their sum (unscaled).
    pub fn forward(&mut self, be: &B, batch: &DeviceBatch<B>) -> Result<f64, BackendError> {
        self.forward_inner(be, batch, None, &mut |_| Ok::<(), BackendError>(()))?;
        self.loss_sum(be, batch.t)
    }

    fn forward_inner<E: From<BackendError>>(
        &mut self,
        be: &B,
        batch: &DeviceBatch<B>,
        loss_scale: Option<f32>,
        weights_ready: &mut WeightsReady<'_, E>,
    ) -> Result<(), E> {
        self.check_capacity(batch)?;
        if self.working_stale && self.working.iter().any(Option::is_some) {
            // The refresh reads every master: all of them must have arrived.
            weights_ready(usize::MAX)?;
        }
        self.refresh_working(be)?;
        let m = self.dims;
        let t = batch.t;
        weights_ready(0)?;
        be.embedding_forward(
            &mut self.residual[0],
            &batch.tokens,
            &self.params[self.layout.embed],
            t,
            m.c,
        )?;
        for l in 0..self.layout.layers.len() {
            let slot = if self.recompute { 0 } else { l };
            weights_ready(l + 1)?;
            self.layer_forward(be, l, slot, batch)?;
        }
        let last = self.layout.layers.len();
        weights_ready(last + 1)?;
        be.rmsnorm_forward(
            &mut self.nf,
            &mut self.rstd_f,
            &self.residual[last],
            &self.params[self.layout.ln_f],
            t,
            m.c,
            m.eps,
        )?;
        let write = self.grad_write();
        let lm = self.layout.lm_head;
        let w_lm = gemm_weight::<B>(&self.working, &self.params, lm);
        match loss_scale {
            None => be.classifier(
                &mut self.losses,
                None,
                &self.nf,
                w_lm,
                &batch.targets,
                0.0,
                t,
                m.c,
                m.v,
                write,
            )?,
            Some(scale) => {
                // dnf lands in scratch.dn; the lm_head gradient accumulates into its grad.
                let (dn, dw) = (&mut self.scratch.dn, &mut self.grads[lm]);
                be.classifier(
                    &mut self.losses,
                    Some((dn, dw)),
                    &self.nf,
                    w_lm,
                    &batch.targets,
                    scale,
                    t,
                    m.c,
                    m.v,
                    write,
                )?
            }
        }
        Ok(())
    }

    /// Sum of the per-token losses of the last forward (a host sync on a device backend).
    fn loss_sum(&self, be: &B, t: usize) -> Result<f64, BackendError> {
        let losses = be.download(&self.losses, t)?;
        Ok(losses.iter().map(|&x| x as f64).sum())
    }

    /// Per-token losses of the last forward (0 at ignored targets).
    pub fn token_losses(&self, be: &B, t: usize) -> Result<Vec<f32>, BackendError> {
        be.download(&self.losses, t)
    }

    /// Start an optimizer step: the next backward writes the gradients instead of adding to
    /// them (its ops overwrite: cuBLAS with beta 0, so 4.4 GB of memsets per step are saved on
    /// TinyLlama). Only the embedding's gradient, which the backward scatter-adds into, is
    /// zeroed here, unless it is tied to the lm_head, whose classifier backward writes it
    /// first.
    pub fn zero_grads(&mut self, be: &B) -> Result<(), BackendError> {
        self.overwrite_grads = true;
        let embed = self.layout.embed;
        if self.layout.lm_head != embed {
            be.zero(&mut self.grads[embed], self.layout.specs[embed].numel())?;
        }
        Ok(())
    }

    /// Host copies of the parameters, in layout order.
    pub fn weights_to_host(&self, be: &B) -> Result<Vec<Vec<f32>>, BackendError> {
        self.params
            .iter()
            .zip(&self.layout.specs)
            .map(|(p, s)| be.download(p, s.numel()))
            .collect()
    }

    /// Host copies of the gradients, in layout order.
    pub fn grads_to_host(&self, be: &B) -> Result<Vec<Vec<f32>>, BackendError> {
        self.grads
            .iter()
            .zip(&self.layout.specs)
            .map(|(p, s)| be.download(p, s.numel()))
            .collect()
    }
}
