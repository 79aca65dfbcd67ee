//! TODO: swiglu (stub: returns Unsupported until written)
#![allow(unused_variables, unused_imports)]

use cudarc::driver::CudaSlice;

use super::unsupported;
use crate::backend::cuda::{CudaBackend, CudaIdx};
use crate::backend::{AdamWStep, AttnDims, BackendError};

#[allow(clippy::too_many_arguments)]
pub fn forward(be: &CudaBackend, out: &mut CudaSlice<f32>, gate_up: &CudaSlice<f32>, t: usize, f: usize) -> Result<(), BackendError> {
    Err(unsupported("swiglu_forward"))
}

#[allow(clippy::too_many_arguments)]
pub fn backward(be: &CudaBackend, dgate_up: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, gate_up: &CudaSlice<f32>, t: usize, f: usize) -> Result<(), BackendError> {
    Err(unsupported("swiglu_backward"))
}

