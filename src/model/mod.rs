//! The Llama model: parameter layout, the forward/backward over a `Backend`, weights on disk.

pub mod hf;
mod llama;
pub mod params;
pub mod weights;

pub use llama::{rope_inv_freq, rope_inv_freq_for, DeviceBatch, Llama};
pub use params::{ParamKind, ParamLayout, ParamSpec};
