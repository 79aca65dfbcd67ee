//! packtrain: packed, varlen-attention training for Llama-family models.
//!
//! The path of one step (DESIGN.md): `config` → `data::TokenStore` → `packing::Plan` →
//! `packing::PackedBatch` → `model` forward/backward on a `backend::Backend` → `dist`
//! all-reduce → `train` (scale, clip, AdamW).

pub mod backend;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod model;
pub mod packing;
pub mod train;
