//! AdamW state (fp32 moments per parameter tensor) and one update of the whole model, or,
//! under ZeRO-1 (`dist.zero1`), of this rank's shard: a contiguous range of whole parameter
//! tensors ([`shard_ranges`]), whose moments are the only ones this rank keeps.

use std::ops::Range;

use crate::backend::{AdamWStep, AdamWTensor, Backend, BackendError};
use crate::config::TrainConfig;
use crate::model::ParamLayout;

/// (m, v) on the host, one vector per parameter tensor in layout order.
pub type HostMoments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// ZeRO-1 shards: rank r updates the parameter tensors `ranges[r]`, consecutive in layout
/// order and together all of them, with about `total / world` elements each (whole tensors, so
/// a rank may get none when there are more ranks than tensors).
pub fn shard_ranges(numels: &[usize], world: usize) -> Vec<Range<usize>> {
    let world = world.max(1);
    let total: usize = numels.iter().sum();
    let mut cut = vec![0usize; world + 1];
    let (mut i, mut acc) = (0usize, 0usize);
    for (r, c) in cut.iter_mut().enumerate().skip(1) {
        let target = (total as u128 * r as u128 / world as u128) as usize;
        // Take tensor i while that brings the cumulative count closer to the target.
        while i < numels.len() && (acc + numels[i]).abs_diff(target) <= acc.abs_diff(target) {
            acc += numels[i];
            i += 1;
        }
        *c = i;
    }
    cut[world] = numels.len();
    (0..world).map(|r| cut[r]..cut[r + 1]).collect()
}

/// First and second moments, one buffer per parameter tensor this rank updates, and the step
/// count.
pub struct AdamW<B: Backend> {
    /// Moments of the tensors `owned`, in order (`m[k]` belongs to tensor `owned.start + k`).
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    /// Updates done so far (the next update is step + 1, for bias correction).
    pub step: u64,
    /// The parameter tensors this rank updates: all of them, or its ZeRO-1 shard.
    pub owned: Range<usize>,
}

impl<B: Backend> AdamW<B> {
    /// Zeroed moments for every tensor.
    pub fn new(be: &B, layout: &ParamLayout) -> Result<Self, BackendError> {
        Self::new_shard(be, layout, 0..layout.specs.len())
    }

    /// Zeroed moments for the tensors `owned` only (ZeRO-1).
    pub fn new_shard(
        be: &B,
        layout: &ParamLayout,
        owned: Range<usize>,
    ) -> Result<Self, BackendError> {
        let alloc = || -> Result<Vec<B::Buf>, BackendError> {
            layout.specs[owned.clone()]
                .iter()
                .map(|s| be.alloc(s.numel()))
                .collect()
        };
        Ok(Self {
            m: alloc()?,
            v: alloc()?,
            step: 0,
            owned,
        })
    }

    /// Moments restored from host copies (layout order, every tensor).
    pub fn from_host(
        be: &B,
        layout: &ParamLayout,
        m: &[Vec<f32>],
        v: &[Vec<f32>],
        step: u64,
    ) -> Result<Self, BackendError> {
        Self::from_host_shard(be, layout, 0..layout.specs.len(), m, v, step)
    }

    /// The moments of the tensors `owned` from host copies of every tensor's (layout order).
    pub fn from_host_shard(
        be: &B,
        layout: &ParamLayout,
        owned: Range<usize>,
        m: &[Vec<f32>],
        v: &[Vec<f32>],
        step: u64,
    ) -> Result<Self, BackendError> {
        let mut opt = Self::new_shard(be, layout, owned.clone())?;
        if m.len() != layout.specs.len() || v.len() != layout.specs.len() {
            return Err(BackendError::Shape {
                op: "AdamW::from_host",
                message: format!(
                    "{} and {} moment tensors for {} parameters",
                    m.len(),
                    v.len(),
                    layout.specs.len()
                ),
            });
        }
        for (k, i) in owned.enumerate() {
            let spec = &layout.specs[i];
            if m[i].len() != spec.numel() || v[i].len() != spec.numel() {
                return Err(BackendError::Shape {
                    op: "AdamW::from_host",
                    message: format!(
                        "moments of {} do not match its shape {:?}",
                        spec.name, spec.shape
                    ),
                });
            }
            be.upload(&mut opt.m[k], &m[i])?;
            be.upload(&mut opt.v[k], &v[i])?;
        }
        opt.step = step;
        Ok(opt)
    }

    /// Update the tensors `owned` (every tensor without ZeRO-1): `grad_scale` multiplies the
    /// gradients first (the clip factor). A tensor with a working copy (`working[i]`, see
    /// `Llama::update_view`) gets it rewritten by the same fused kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        be: &B,
        layout: &ParamLayout,
        params: &mut [B::Buf],
        working: &mut [Option<B::Buf>],
        grads: &[B::Buf],
        cfg: &TrainConfig,
        lr: f64,
        grad_scale: f32,
    ) -> Result<(), BackendError> {
        let n = layout.specs.len();
        if params.len() != n || working.len() != n || grads.len() != n {
            return Err(BackendError::Shape {
                op: "AdamW::update",
                message: format!(
                    "{} parameters, {} working copies and {} gradients for a layout of {n}",
                    params.len(),
                    working.len(),
                    grads.len()
                ),
            });
        }
        self.step += 1;
        let hp = AdamWStep {
            lr: lr as f32,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            weight_decay: 0.0,
            grad_scale,
            step: self.step,
        };
        let owned = self.owned.clone();
        let mut tensors: Vec<AdamWTensor<'_, B::Buf>> = params[owned.clone()]
            .iter_mut()
            .zip(working[owned.clone()].iter_mut())
            .zip(&grads[owned.clone()])
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(owned)
            .map(|((((param, working), grad), (m, v)), i)| AdamWTensor {
                param,
                grad,
                m,
                v,
                working: working.as_mut(),
                n: layout.specs[i].numel(),
                weight_decay: if layout.decays(i, cfg.decay_norms_and_embeddings) {
                    cfg.weight_decay as f32
                } else {
                    0.0
                },
            })
            .collect();
        be.adamw_tensors(&mut tensors, hp)
    }

    pub fn to_host(&self, be: &B, layout: &ParamLayout) -> Result<HostMoments, BackendError> {
        let get = |bufs: &[B::Buf]| -> Result<Vec<Vec<f32>>, BackendError> {
            let mut out = vec![Vec::new(); layout.specs.len()];
            for (b, i) in bufs.iter().zip(self.owned.clone()) {
                out[i] = be.download(b, layout.specs[i].numel())?;
            }
            Ok(out)
        };
        Ok((get(&self.m)?, get(&self.v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_consecutive_complete_and_balanced() {
        let numels = [100, 10, 10, 10, 50, 50, 10, 100];
        for world in 1..=10 {
            let r = shard_ranges(&numels, world);
            assert_eq!(r.len(), world);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[world - 1].end, numels.len());
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
        }
        let r = shard_ranges(&numels, 2);
        let sizes: Vec<usize> = r.iter().map(|x| numels[x.clone()].iter().sum()).collect();
        assert_eq!(sizes, [180, 160]);
        let r = shard_ranges(&[5], 3);
        assert_eq!(r.iter().map(|x| x.len()).sum::<usize>(), 1);
    }

    /// An update given fewer working copies (or parameters, gradients) than the layout has
    /// tensors is refused, naming the counts, and does not count as a step.
    #[test]
    fn update_with_missing_tensors_is_refused() {
        use crate::backend::cpu::CpuBackend;
        let be = CpuBackend::new();
        let mut cfg = crate::config::Config::default();
        cfg.model.n_layers = 1;
        let layout = ParamLayout::new(&cfg.model);
        let mut opt = AdamW::new(&be, &layout).unwrap();
        let bufs =
            || -> Vec<Vec<f32>> { layout.specs.iter().map(|s| vec![0.0; s.numel()]).collect() };
        let (mut params, grads) = (bufs(), bufs());
        let mut working: Vec<Option<Vec<f32>>> = vec![None; layout.specs.len() - 1];
        let err = opt
            .update(
                &be,
                &layout,
                &mut params,
                &mut working,
                &grads,
                &cfg.train,
                1e-3,
                1.0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("working copies"), "{err}");
        assert_eq!(opt.step, 0);
    }
}
