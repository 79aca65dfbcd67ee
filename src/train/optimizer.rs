//! AdamW state (fp32 moments per parameter tensor) and one update of the whole model.

use crate::backend::{AdamWStep, Backend, BackendError};
use crate::config::TrainConfig;
use crate::model::ParamLayout;

/// (m, v) on the host, one vector per parameter tensor in layout order.
pub type HostMoments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// First and second moments, one buffer per parameter tensor, and the step count.
pub struct AdamW<B: Backend> {
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    /// Updates done so far (the next update is step + 1, for bias correction).
    pub step: u64,
}

impl<B: Backend> AdamW<B> {
    /// Zeroed moments.
    pub fn new(be: &B, layout: &ParamLayout) -> Result<Self, BackendError> {
        let alloc = || -> Result<Vec<B::Buf>, BackendError> {
            layout.specs.iter().map(|s| be.alloc(s.numel())).collect()
        };
        Ok(Self {
            m: alloc()?,
            v: alloc()?,
            step: 0,
        })
    }

    /// Moments restored from host copies (layout order).
    pub fn from_host(
        be: &B,
        layout: &ParamLayout,
        m: &[Vec<f32>],
        v: &[Vec<f32>],
        step: u64,
    ) -> Result<Self, BackendError> {
        let mut opt = Self::new(be, layout)?;
        for (i, spec) in layout.specs.iter().enumerate() {
            if m[i].len() != spec.numel() || v[i].len() != spec.numel() {
                return Err(BackendError::Shape {
                    op: "AdamW::from_host",
                    message: format!(
                        "moments of {} do not match its shape {:?}",
                        spec.name, spec.shape
                    ),
                });
            }
            be.upload(&mut opt.m[i], &m[i])?;
            be.upload(&mut opt.v[i], &v[i])?;
        }
        opt.step = step;
        Ok(opt)
    }

    /// Update every parameter: `grad_scale` multiplies the gradients first (the clip factor).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        be: &B,
        layout: &ParamLayout,
        params: &mut [B::Buf],
        grads: &[B::Buf],
        cfg: &TrainConfig,
        lr: f64,
        grad_scale: f32,
    ) -> Result<(), BackendError> {
        self.step += 1;
        for (i, spec) in layout.specs.iter().enumerate() {
            let wd = if layout.decays(i, cfg.decay_norms_and_embeddings) {
                cfg.weight_decay
            } else {
                0.0
            };
            let hp = AdamWStep {
                lr: lr as f32,
                beta1: cfg.beta1 as f32,
                beta2: cfg.beta2 as f32,
                eps: cfg.eps as f32,
                weight_decay: wd as f32,
                grad_scale,
                step: self.step,
            };
            be.adamw(
                &mut params[i],
                &grads[i],
                &mut self.m[i],
                &mut self.v[i],
                spec.numel(),
                hp,
            )?;
        }
        Ok(())
    }

    /// Host copies of (m, v), layout order.
    pub fn to_host(&self, be: &B, layout: &ParamLayout) -> Result<HostMoments, BackendError> {
        let get = |bufs: &[B::Buf]| -> Result<Vec<Vec<f32>>, BackendError> {
            bufs.iter()
                .zip(&layout.specs)
                .map(|(b, s)| be.download(b, s.numel()))
                .collect()
        };
        Ok((get(&self.m)?, get(&self.v)?))
    }
}
