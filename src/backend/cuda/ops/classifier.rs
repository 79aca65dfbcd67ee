//! TODO: classifier (stub: returns Unsupported until written)
#![allow(unused_variables, unused_imports)]

use cudarc::driver::CudaSlice;

use super::unsupported;
use crate::backend::cuda::{CudaBackend, CudaIdx};
use crate::backend::{AdamWStep, AttnDims, BackendError};

#[allow(clippy::too_many_arguments)]
pub fn forward_backward(be: &CudaBackend, losses: &mut CudaSlice<f32>, grads: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>, x: &CudaSlice<f32>, w: &CudaSlice<f32>, targets: &CudaIdx, loss_scale: f32, t: usize, c: usize, v: usize) -> Result<(), BackendError> {
    Err(unsupported("classifier"))
}

