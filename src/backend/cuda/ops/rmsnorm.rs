//! TODO: rmsnorm (stub: returns Unsupported until written)
#![allow(unused_variables, unused_imports)]

use cudarc::driver::CudaSlice;

use super::unsupported;
use crate::backend::cuda::{CudaBackend, CudaIdx};
use crate::backend::{AdamWStep, AttnDims, BackendError};

#[allow(clippy::too_many_arguments)]
pub fn forward(be: &CudaBackend, out: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, x: &CudaSlice<f32>, weight: &CudaSlice<f32>, t: usize, c: usize, eps: f32) -> Result<(), BackendError> {
    Err(unsupported("rmsnorm_forward"))
}

#[allow(clippy::too_many_arguments)]
pub fn backward(be: &CudaBackend, dx: &mut CudaSlice<f32>, dweight: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, x: &CudaSlice<f32>, weight: &CudaSlice<f32>, rstd: &CudaSlice<f32>, t: usize, c: usize) -> Result<(), BackendError> {
    Err(unsupported("rmsnorm_backward"))
}

