//! TODO: elementwise (stub: returns Unsupported until written)
#![allow(unused_variables, unused_imports)]

use cudarc::driver::CudaSlice;

use super::unsupported;
use crate::backend::cuda::{CudaBackend, CudaIdx};
use crate::backend::{AdamWStep, AttnDims, BackendError};

#[allow(clippy::too_many_arguments)]
pub fn add_inplace(be: &CudaBackend, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> Result<(), BackendError> {
    Err(unsupported("add_inplace"))
}

#[allow(clippy::too_many_arguments)]
pub fn scale(be: &CudaBackend, buf: &mut CudaSlice<f32>, n: usize, s: f32) -> Result<(), BackendError> {
    Err(unsupported("scale"))
}

