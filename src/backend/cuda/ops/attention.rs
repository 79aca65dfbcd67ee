//! TODO: attention (stub: returns Unsupported until written)
#![allow(unused_variables, unused_imports)]

use cudarc::driver::CudaSlice;

use super::unsupported;
use crate::backend::cuda::{CudaBackend, CudaIdx};
use crate::backend::{AdamWStep, AttnDims, BackendError};

#[allow(clippy::too_many_arguments)]
pub fn forward(be: &CudaBackend, out: &mut CudaSlice<f32>, lse: &mut CudaSlice<f32>, qkv: &CudaSlice<f32>, cu_seqlens: &CudaIdx, dims: AttnDims) -> Result<(), BackendError> {
    Err(unsupported("attention_forward"))
}

#[allow(clippy::too_many_arguments)]
pub fn backward(be: &CudaBackend, dqkv: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, qkv: &CudaSlice<f32>, out: &CudaSlice<f32>, lse: &CudaSlice<f32>, cu_seqlens: &CudaIdx, dims: AttnDims) -> Result<(), BackendError> {
    Err(unsupported("attention_backward"))
}

