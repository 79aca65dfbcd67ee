//! TODO: rope (stub: returns Unsupported until written)
#![allow(unused_variables, unused_imports)]

use cudarc::driver::CudaSlice;

use super::unsupported;
use crate::backend::cuda::{CudaBackend, CudaIdx};
use crate::backend::{AdamWStep, AttnDims, BackendError};

#[allow(clippy::too_many_arguments)]
pub fn apply(be: &CudaBackend, qkv: &mut CudaSlice<f32>, positions: &CudaIdx, inv_freq: &CudaSlice<f32>, dims: AttnDims, inverse: bool) -> Result<(), BackendError> {
    Err(unsupported("rope"))
}

