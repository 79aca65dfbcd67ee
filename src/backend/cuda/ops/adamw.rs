//! TODO: adamw (stub: returns Unsupported until written)
#![allow(unused_variables, unused_imports)]

use cudarc::driver::CudaSlice;

use super::unsupported;
use crate::backend::cuda::{CudaBackend, CudaIdx};
use crate::backend::{AdamWStep, AttnDims, BackendError};

pub fn sum_squares(be: &CudaBackend, bufs: &[(&CudaSlice<f32>, usize)]) -> Result<f64, BackendError> {
    Err(unsupported("sum_squares"))
}

pub fn step(be: &CudaBackend, param: &mut CudaSlice<f32>, grad: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, n: usize, hp: AdamWStep) -> Result<(), BackendError> {
    Err(unsupported("adamw"))
}
