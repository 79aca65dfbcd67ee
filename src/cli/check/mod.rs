//! `packtrain check`: every backend op, then the whole model, against the CPU reference.
//!
//! [`op_cases`] runs one list of cases on a backend: each case draws its inputs from a ChaCha8
//! stream keyed on (seed, case name), so both backends see the same inputs, runs one op (or the
//! model) and downloads its outputs. The list is run on the CPU reference and on the backend
//! under test and compared output by output: relative error `‖out − ref‖ / ‖ref‖` (absolute
//! when `‖ref‖ = 0`) against the op family's tolerance in [`TOLERANCES`]. Adding an op is one
//! `c.case(..)` entry.
//!
//! What else each case checks, beside the values:
//! - outputs that an op overwrites are filled with NaN first, so an element it fails to write
//!   shows up as non-finite; outputs it accumulates into (`+=`) start from random values, so
//!   an op that overwrites instead of adding is caught;
//! - every buffer is longer than the op's dims (the reuse contract of `Backend`): inputs carry
//!   a NaN tail (an op reading past its dims turns its outputs NaN) and an output's tail must
//!   still be NaN afterwards (an op writing past its dims fails);
//! - packed inputs are ragged: a document of length 1, an empty document (attention), totals
//!   T that are not multiples of 32, 64 or 128, long and short documents side by side.
//!
//! An op the backend does not have (`BackendError::Unsupported`) is a failure "unsupported";
//! any other error or a panic is a failure with its message. The exit code is non-zero on any
//! failure.
//!
//! Files: this one the flags, the tolerances and `run`; `harness.rs` what a case works with
//! (inputs, poisoned outputs, the two passes); `cases.rs` the op cases; `model_case.rs` the
//! whole-model case; `compare.rs` the comparison and the report table.

use anyhow::bail;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;

mod cases;
mod compare;
mod harness;
mod model_case;

pub use cases::op_cases;
pub use compare::{compare, rel_error, render, Row};
pub use harness::{CaseRun, Outputs, ACT_SUFFIX};
pub use model_case::check_model_config;

/// The backend to check against the CPU reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckDevice {
    /// The CUDA backend on GPU `--gpu`.
    Cuda,
    /// The CPU backend against itself (a smoke test of the check: everything passes).
    Cpu,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Backend to check.
    #[arg(long, value_enum, default_value_t = CheckDevice::Cuda)]
    pub device: CheckDevice,
    /// Seed of every random input.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPU ordinal (`--device cuda`).
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Run only the cases whose name contains this text.
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
}

/// Maximum relative error per op family, and why. The GPU runs its GEMMs on bf16 tensor cores
/// (`CUBLAS_COMPUTE_32F_FAST_16BF` and the attention kernels): each operand is rounded to 8
/// significant bits (relative 2^-9 ≈ 2e-3) and the products summed in f32, so a GEMM's output
/// is off by a few 1e-3 in norm; 1e-2 leaves room for that and for errors that add up through
/// a chain of GEMMs, while a wrong index, mask or formula gives errors of order 1. The other
/// ops are f32 on both sides and differ only in the order of additions and the last bit of
/// exp/sqrt/sin: 1e-5 is ~100 f32 ulps of room for reordered sums over a few thousand terms.
pub const TOLERANCES: &[(&str, f64, &str)] = &[
    ("matmul", 1e-2, "bf16 tensor-core GEMM, f32 accumulation"),
    ("attention", 1e-2, "QK^T and PV GEMMs on bf16 tensor cores"),
    ("classifier", 1e-2, "lm_head GEMMs on bf16 tensor cores"),
    (
        "model",
        2e-2,
        "bf16 GEMMs and bf16 activation storage through every layer; the weight gradients of a \
         randomly initialised model are sums with heavy cancellation (softmax ~ uniform minus \
         one-hot), which turns the 2^-9 roundings into ~1e-2 relative (1.0e-2 to 1.3e-2 measured \
         on an H100; ~3e-3 with PACKTRAIN_ACTIVATIONS=f32)",
    ),
    (
        "embedding",
        1e-5,
        "f32 gather / scatter-add: only the order of additions differs",
    ),
    ("rmsnorm", 1e-5, "f32 reductions over C in another order"),
    ("rope", 1e-5, "f32 sin/cos of the same f32 angle"),
    ("swiglu", 1e-5, "f32 exp"),
    ("add", 1e-5, "f32 elementwise"),
    ("scale", 1e-5, "f32 elementwise"),
    ("memory", 1e-5, "copy and zero are exact"),
    ("adamw", 1e-5, "f32 elementwise (sqrt, powi of the betas)"),
    (
        "adamw_copy",
        1e-5,
        "AdamW as above plus the copy of the new weights (exact in the full-precision pass)",
    ),
    ("sum_squares", 1e-5, "f32 partial sums, summed in f64"),
    (
        "act",
        1e-2,
        "the second pass: activations stored in the backend's activation precision (bf16 on \
         CUDA: inputs and outputs rounded to 8 significant bits, 2^-9 relative)",
    ),
];

fn tolerance(family: &str) -> f64 {
    TOLERANCES
        .iter()
        .find(|(f, _, _)| *f == family)
        .map(|(_, tol, _)| *tol)
        .unwrap_or(1e-5)
}

/// Run `packtrain check`.
pub fn run(args: &CheckArgs) -> anyhow::Result<()> {
    let only = args.only.as_deref();
    let cpu = CpuBackend::new();
    let (label, test) = match args.device {
        CheckDevice::Cpu => ("cpu".to_string(), op_cases(&cpu, args.seed, only)),
        CheckDevice::Cuda => {
            let be =
                CudaBackend::new(args.gpu).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
            let label = format!("cuda ({}, {})", be.device_name, be.arch);
            (label, op_cases(&be, args.seed, only))
        }
    };
    let reference = op_cases(&cpu, args.seed, only);
    let rows = compare(&test, &reference);
    println!(
        "packtrain check: {label} against the CPU reference, seed {}\n",
        args.seed
    );
    print!("{}", render(&rows));
    let failed = rows.iter().filter(|r| r.failure.is_some()).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    if rows.is_empty() {
        bail!(
            "no case matched --only {:?}",
            args.only.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamLayout;

    #[test]
    fn cpu_against_itself_passes_everything() {
        let cpu = CpuBackend::new();
        let a = op_cases(&cpu, 3, None);
        let b = op_cases(&cpu, 3, None);
        let rows = compare(&a, &b);
        let failed: Vec<&Row> = rows.iter().filter(|r| r.failure.is_some()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(rows.iter().all(|r| r.rel == Some(0.0)));
        // Every gradient of the model is compared.
        let layout = ParamLayout::new(&check_model_config());
        let grads = rows
            .iter()
            .filter(|r| r.case == "model[forward_backward]" && r.output.starts_with("d "))
            .count();
        assert_eq!(grads, layout.specs.len());
    }
}
