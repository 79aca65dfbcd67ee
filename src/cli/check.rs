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

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::bail;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{AdamWStep, AttnDims, Backend, BackendError};
use crate::config::ModelConfig;
use crate::data::{Document, TokenStore};
use crate::model::{rope_inv_freq, DeviceBatch, Llama, ParamLayout};
use crate::packing::{PackedBatch, IGNORE_INDEX};

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

/// Extra elements at the end of every buffer (the reuse contract: buffers may be longer).
const PAD: usize = 67;

// ---------------------------------------------------------------- cases

/// Downloaded outputs of one case, in order.
pub type Outputs = Vec<(String, Vec<f32>)>;

/// One case run on one backend.
pub struct CaseRun {
    pub name: String,
    /// Key into [`TOLERANCES`].
    pub family: &'static str,
    /// The outputs, or why the case could not run.
    pub result: Result<Outputs, String>,
}

/// Why a case stopped.
enum CaseError {
    Backend(BackendError),
    Check(String),
}

impl From<BackendError> for CaseError {
    fn from(e: BackendError) -> Self {
        CaseError::Backend(e)
    }
}

impl CaseError {
    fn message(self) -> String {
        match self {
            CaseError::Backend(BackendError::Unsupported { .. }) => "unsupported".into(),
            CaseError::Backend(e) => e.to_string(),
            CaseError::Check(m) => m,
        }
    }
}

/// What a case body works with: the backend, its random stream, its outputs, and whether
/// activation-kind buffers come from `alloc_act` (the second pass over the ops).
struct Io<'a, B: Backend> {
    be: &'a B,
    rng: ChaCha8Rng,
    outputs: Outputs,
    act: bool,
}

impl<B: Backend> Io<'_, B> {
    /// `n` values of N(0, std^2).
    fn randn(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut self.rng);
                z * std
            })
            .collect()
    }

    /// `n` values uniform in [lo, hi).
    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(lo..hi)).collect()
    }

    /// An activation-kind buffer (what the model stores with `alloc_act`: activations, their
    /// gradients, the GEMMs' weight copies) holding `data` and then a NaN tail. Full
    /// precision in the first pass, the backend's activation precision in the second.
    fn input(&self, data: &[f32]) -> Result<B::Buf, CaseError> {
        self.fill(data, self.act)
    }

    /// A full-precision buffer (parameters the ops read directly, gradients, rstd, lse,
    /// losses, dres) holding `data` and then a NaN tail, in both passes.
    fn full(&self, data: &[f32]) -> Result<B::Buf, CaseError> {
        self.fill(data, false)
    }

    fn fill(&self, data: &[f32], act: bool) -> Result<B::Buf, CaseError> {
        let len = data.len() + PAD;
        let mut buf = if act {
            self.be.alloc_act(len)?
        } else {
            self.be.alloc(len)?
        };
        let mut host = data.to_vec();
        host.resize(data.len() + PAD, f32::NAN);
        self.be.upload(&mut buf, &host)?;
        Ok(buf)
    }

    /// An index buffer holding `data` and then a tail of zeros (a valid index, so an op
    /// reading past its dims is caught by its outputs, not by a crash).
    fn input_idx(&self, data: &[i32]) -> Result<B::IdxBuf, CaseError> {
        let mut buf = self.be.alloc_idx(data.len() + PAD)?;
        let mut host = data.to_vec();
        host.resize(data.len() + PAD, 0);
        self.be.upload_idx(&mut buf, &host)?;
        Ok(buf)
    }

    /// An activation-kind output of `len` elements the op must overwrite: all NaN.
    fn poisoned(&self, len: usize) -> Result<B::Buf, CaseError> {
        self.input(&vec![f32::NAN; len])
    }

    /// A full-precision output of `len` elements the op must overwrite: all NaN.
    fn poisoned_full(&self, len: usize) -> Result<B::Buf, CaseError> {
        self.full(&vec![f32::NAN; len])
    }

    /// Record output `name` (its leading `len` elements); its tail must still be NaN.
    fn output(&mut self, name: &str, buf: &B::Buf, len: usize) -> Result<(), CaseError> {
        let mut all = self.be.download(buf, len + PAD)?;
        if let Some(i) = all[len..].iter().position(|x| !x.is_nan()) {
            return Err(CaseError::Check(format!(
                "{name}: wrote past its {len} elements (element {})",
                len + i
            )));
        }
        all.truncate(len);
        self.outputs.push((name.to_string(), all));
        Ok(())
    }

    /// Record a host value as an output.
    fn output_host(&mut self, name: &str, values: Vec<f32>) {
        self.outputs.push((name.to_string(), values));
    }
}

/// Collects the cases of one backend.
struct Cases<'a, B: Backend> {
    be: &'a B,
    seed: u64,
    only: Option<&'a str>,
    runs: Vec<CaseRun>,
    /// The activation-precision pass: names get [`ACT_SUFFIX`], tolerances the "act" family.
    act: bool,
}

/// Suffix of the cases of the activation-precision pass.
pub const ACT_SUFFIX: &str = " [act]";

/// Families that run in the full-precision pass only: their buffers are all full precision
/// in the model (or, for the model, it picks its own precisions).
const FULL_ONLY: &[&str] = &["adamw", "sum_squares", "model"];

/// FNV-1a of a case name: the key of its random stream.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl<B: Backend> Cases<'_, B> {
    /// Run one case: `body` makes its inputs, runs the op and records its outputs.
    fn case(
        &mut self,
        name: impl Into<String>,
        family: &'static str,
        body: impl FnOnce(&mut Io<B>) -> Result<(), CaseError>,
    ) {
        let name = name.into();
        if self.only.is_some_and(|o| !name.contains(o)) || (self.act && FULL_ONLY.contains(&family))
        {
            return;
        }
        let mut io = Io {
            be: self.be,
            // Both passes draw the same inputs.
            rng: ChaCha8Rng::seed_from_u64(self.seed ^ name_key(&name)),
            outputs: Vec::new(),
            act: self.act,
        };
        let result = match catch_unwind(AssertUnwindSafe(|| body(&mut io))) {
            Ok(Ok(())) => Ok(io.outputs),
            Ok(Err(e)) => Err(e.message()),
            Err(panic) => Err(format!("panicked: {}", panic_message(&panic))),
        };
        let (name, family) = match self.act {
            true => (name + ACT_SUFFIX, "act"),
            false => (name, family),
        };
        self.runs.push(CaseRun {
            name,
            family,
            result,
        });
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// Ragged document lengths summing to about `total`: a document of length 1 in the middle,
/// one of length 0 when `empty` (attention allows them), long and short ones, and a total that
/// is not a multiple of 32 (so neither of 64 nor 128).
fn ragged_lengths(rng: &mut ChaCha8Rng, n_docs: usize, total: usize, empty: bool) -> Vec<usize> {
    let mean = (total / n_docs.max(1)).max(2);
    let mut lens: Vec<usize> = (0..n_docs).map(|_| rng.random_range(2..2 * mean)).collect();
    // One long document (several 64-row tiles), one of length 1, maybe an empty one.
    lens[0] = 3 * mean + 5;
    lens[n_docs / 2] = 1;
    if empty && n_docs > 3 {
        lens[n_docs / 2 + 1] = 0;
    }
    if lens.iter().sum::<usize>().is_multiple_of(32) {
        lens[1] += 1;
    }
    lens
}

fn cu_of(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().copied().unwrap_or(0) + l as i32);
    }
    cu
}

fn positions_of(lens: &[usize]) -> Vec<i32> {
    lens.iter().flat_map(|&l| 0..l as i32).collect()
}

/// Op-level shapes: C, V, F and the packed batch of the op cases.
const C: usize = 256;
const V: usize = 1000;
const F: usize = 688;
const OP_DOCS: usize = 12;
const OP_TOKENS: usize = 1100;

/// The small model of the whole-model case.
pub fn check_model_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 1000,
        d_model: 256,
        n_layers: 2,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 32,
        ffn_dim: 688,
        tie_embeddings: false,
        // Larger than the usual 0.02 so attention is not nearly uniform.
        init_std: 0.05,
        ..ModelConfig::default()
    }
}

/// Every case on backend `be`, inputs from `seed`.
pub fn op_cases<B: Backend>(be: &B, seed: u64, only: Option<&str>) -> Vec<CaseRun> {
    let mut c = Cases {
        be,
        seed,
        only,
        runs: Vec::new(),
        act: false,
    };
    op_list(&mut c);
    c.act = true;
    op_list(&mut c);
    c.runs
}

/// Every case; run once with full-precision buffers and once with activation-kind buffers
/// from `alloc_act` (see [`Io::input`] and [`Io::full`]).
fn op_list<B: Backend>(c: &mut Cases<B>) {
    // ------------------------------------------------------------ memory
    c.case("copy", "memory", |io| {
        let n = 4099;
        let x = io.randn(n, 1.0);
        // Full precision into activation kind: a conversion in the second pass.
        let xb = io.full(&x)?;
        let mut out = io.poisoned(n)?;
        io.be.copy(&mut out, &xb, n)?;
        io.output("dst", &out, n)
    });
    c.case("zero", "memory", |io| {
        let n = 4099;
        let x = io.randn(n, 1.0);
        let mut b = io.input(&x)?;
        io.be.zero(&mut b, n)?;
        io.output("buf", &b, n)
    });

    // ------------------------------------------------------------ embedding
    c.case("embedding_forward", "embedding", |io| {
        let t = OP_TOKENS + 7;
        let wte = io.randn(V * C, 1.0);
        let tokens: Vec<i32> = (0..t).map(|_| io.rng.random_range(0..V as i32)).collect();
        let (w, tok) = (io.full(&wte)?, io.input_idx(&tokens)?);
        let mut out = io.poisoned(t * C)?;
        io.be.embedding_forward(&mut out, &tok, &w, t, C)?;
        io.output("out", &out, t * C)
    });
    c.case("embedding_backward", "embedding", |io| {
        let t = OP_TOKENS + 7;
        // Half the tokens from a few ids: many rows add into the same dwte row.
        let tokens: Vec<i32> = (0..t)
            .map(|i| {
                let hi = if i % 2 == 0 { 8 } else { V as i32 };
                io.rng.random_range(0..hi)
            })
            .collect();
        let dout = io.randn(t * C, 1.0);
        let dwte0 = io.randn(V * C, 1.0);
        let (tok, d) = (io.input_idx(&tokens)?, io.input(&dout)?);
        let mut dwte = io.full(&dwte0)?;
        io.be.embedding_backward(&mut dwte, &d, &tok, t, C)?;
        io.output("dwte (+=)", &dwte, V * C)
    });

    // ------------------------------------------------------------ rmsnorm
    let t = OP_TOKENS + 3;
    // C = 256 takes the CUDA `_vec8` row kernels (C % 8 == 0), C + 4 the scalar ones.
    for cc in [C, C + 4] {
        let tag = if cc == C { "" } else { "[C%8!=0]" };
        c.case(format!("rmsnorm_forward{tag}"), "rmsnorm", |io| {
            let x = io.randn(t * cc, 2.0);
            let w = io.uniform(cc, 0.5, 1.5);
            let (xb, wb) = (io.input(&x)?, io.full(&w)?);
            let (mut out, mut rstd) = (io.poisoned(t * cc)?, io.poisoned_full(t)?);
            io.be
                .rmsnorm_forward(&mut out, &mut rstd, &xb, &wb, t, cc, 1e-5)?;
            io.output("out", &out, t * cc)?;
            io.output("rstd", &rstd, t)
        });
        c.case(format!("add_rmsnorm_forward{tag}"), "rmsnorm", |io| {
            let (acc0, x) = (io.randn(t * cc, 1.5), io.randn(t * cc, 1.5));
            let w = io.uniform(cc, 0.5, 1.5);
            let (mut acc, xb, wb) = (io.input(&acc0)?, io.input(&x)?, io.full(&w)?);
            let (mut out, mut rstd) = (io.poisoned(t * cc)?, io.poisoned_full(t)?);
            io.be
                .add_rmsnorm_forward(&mut out, &mut rstd, &mut acc, &xb, &wb, t, cc, 1e-5)?;
            io.output("acc (+=)", &acc, t * cc)?;
            io.output("out", &out, t * cc)?;
            io.output("rstd", &rstd, t)
        });
        c.case(format!("rmsnorm_backward{tag}"), "rmsnorm", |io| {
            let x = io.randn(t * cc, 2.0);
            let w = io.uniform(cc, 0.5, 1.5);
            let dout = io.randn(t * cc, 1.0);
            let rstd: Vec<f32> = x
                .chunks(cc)
                .map(|r| {
                    let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cc as f64;
                    (1.0 / (ms + 1e-5).sqrt()) as f32
                })
                .collect();
            let (dx0, dw0) = (io.randn(t * cc, 1.0), io.randn(cc, 1.0));
            let (xb, wb, db, rb) = (
                io.input(&x)?,
                io.full(&w)?,
                io.input(&dout)?,
                io.full(&rstd)?,
            );
            // dx is the model's dres: full precision.
            let (mut dx, mut dw) = (io.full(&dx0)?, io.full(&dw0)?);
            io.be
                .rmsnorm_backward(&mut dx, &mut dw, &db, &xb, &wb, &rb, t, cc)?;
            io.output("dx (+=)", &dx, t * cc)?;
            io.output("dweight (+=)", &dw, cc)
        });
    }

    // ------------------------------------------------------------ matmul
    for (tag, ic, oc, bias) in [
        ("", C, 3 * C / 2, false),
        ("[bias]", C, 3 * C / 2, true),
        ("[odd]", 100, 333, true),
    ] {
        let t = OP_TOKENS + 1;
        c.case(format!("matmul_forward{tag}"), "matmul", |io| {
            let x = io.randn(t * ic, 1.0);
            let w = io.randn(oc * ic, 0.1);
            let b = io.randn(oc, 1.0);
            let (xb, wb, bb) = (io.input(&x)?, io.input(&w)?, io.full(&b)?);
            let mut out = io.poisoned(t * oc)?;
            io.be
                .matmul_forward(&mut out, &xb, &wb, bias.then_some(&bb), t, ic, oc)?;
            io.output("out", &out, t * oc)
        });
        c.case(format!("matmul_backward{tag}"), "matmul", |io| {
            let x = io.randn(t * ic, 1.0);
            let w = io.randn(oc * ic, 0.1);
            let dout = io.randn(t * oc, 1.0);
            let (dx0, dw0, db0) = (
                io.randn(t * ic, 0.1),
                io.randn(oc * ic, 1.0),
                io.randn(oc, 1.0),
            );
            let (xb, wb, dob) = (io.input(&x)?, io.input(&w)?, io.input(&dout)?);
            let (mut dx, mut dw, mut db) = (io.input(&dx0)?, io.full(&dw0)?, io.full(&db0)?);
            io.be.matmul_backward(
                &mut dx,
                &mut dw,
                bias.then_some(&mut db),
                &dob,
                &xb,
                &wb,
                t,
                ic,
                oc,
            )?;
            io.output("dx (+=)", &dx, t * ic)?;
            io.output("dw (+=)", &dw, oc * ic)?;
            if bias {
                io.output("dbias (+=)", &db, oc)?;
            }
            Ok(())
        });
    }

    // ------------------------------------------------------------ rope
    for d in [32usize, 128] {
        let (h, hkv) = (8usize, 2usize);
        c.case(format!("rope_forward[D={d}]"), "rope", |io| {
            let lens = ragged_lengths(&mut io.rng, OP_DOCS, OP_TOKENS, false);
            let dims = attn_dims(&lens, h, hkv, d);
            let qkv = io.randn(dims.t * dims.qkv_width(), 1.0);
            let pos = io.input_idx(&positions_of(&lens))?;
            let inv = io.full(&rope_inv_freq(10000.0, d))?;
            let mut b = io.input(&qkv)?;
            io.be.rope_forward(&mut b, &pos, &inv, dims)?;
            io.output("qkv", &b, dims.t * dims.qkv_width())
        });
        c.case(format!("rope_backward[D={d}]"), "rope", |io| {
            let lens = ragged_lengths(&mut io.rng, OP_DOCS, OP_TOKENS, false);
            let dims = attn_dims(&lens, h, hkv, d);
            let dqkv = io.randn(dims.t * dims.qkv_width(), 1.0);
            let pos = io.input_idx(&positions_of(&lens))?;
            let inv = io.full(&rope_inv_freq(500000.0, d))?;
            let mut b = io.input(&dqkv)?;
            io.be.rope_backward(&mut b, &pos, &inv, dims)?;
            io.output("dqkv", &b, dims.t * dims.qkv_width())
        });
    }

    // ------------------------------------------------------------ attention
    // D = 64 and 128 take the CUDA backend's flash kernels (when enabled), GQA included.
    for (d, h, hkv) in [
        (32usize, 8usize, 2usize),
        (64, 8, 8),
        (64, 8, 2),
        (128, 4, 1),
    ] {
        c.case(
            format!("attention_forward[D={d},H={h},Hkv={hkv}]"),
            "attention",
            |io| {
                let lens = ragged_lengths(&mut io.rng, OP_DOCS, OP_TOKENS, true);
                let dims = attn_dims(&lens, h, hkv, d);
                let qkv = io.randn(dims.t * dims.qkv_width(), 1.0);
                let (qb, cu) = (io.input(&qkv)?, io.input_idx(&cu_of(&lens))?);
                let (mut out, mut lse) =
                    (io.poisoned(dims.t * h * d)?, io.poisoned_full(h * dims.t)?);
                io.be
                    .attention_forward(&mut out, &mut lse, &qb, &cu, dims)?;
                io.output("out", &out, dims.t * h * d)?;
                io.output("lse", &lse, h * dims.t)
            },
        );
        c.case(
            format!("attention_backward[D={d},H={h},Hkv={hkv}]"),
            "attention",
            |io| {
                let lens = ragged_lengths(&mut io.rng, OP_DOCS, OP_TOKENS, true);
                let dims = attn_dims(&lens, h, hkv, d);
                let qkv = io.randn(dims.t * dims.qkv_width(), 1.0);
                let dout = io.randn(dims.t * h * d, 1.0);
                let cu = cu_of(&lens);
                // out and lse of these inputs, from the reference (the same for both backends).
                let (out, lse) = reference_attention(&qkv, &cu, dims)?;
                let (qb, ob, lb, db) = (
                    io.input(&qkv)?,
                    io.input(&out)?,
                    io.full(&lse)?,
                    io.input(&dout)?,
                );
                let cub = io.input_idx(&cu)?;
                let mut dqkv = io.poisoned(dims.t * dims.qkv_width())?;
                io.be
                    .attention_backward(&mut dqkv, &db, &qb, &ob, &lb, &cub, dims)?;
                io.output("dqkv", &dqkv, dims.t * dims.qkv_width())
            },
        );
    }

    // ------------------------------------------------------------ swiglu, add, scale
    let t = OP_TOKENS + 5;
    // F = 688 takes the CUDA `_vec8` kernels (F % 8 == 0), F + 2 the scalar ones.
    for ff in [F, F + 2] {
        let tag = if ff == F { "" } else { "[F%8!=0]" };
        c.case(format!("swiglu_forward{tag}"), "swiglu", |io| {
            let gu = io.randn(t * 2 * ff, 2.0);
            let g = io.input(&gu)?;
            let mut out = io.poisoned(t * ff)?;
            io.be.swiglu_forward(&mut out, &g, t, ff)?;
            io.output("out", &out, t * ff)
        });
        c.case(format!("swiglu_backward{tag}"), "swiglu", |io| {
            let gu = io.randn(t * 2 * ff, 2.0);
            let dout = io.randn(t * ff, 1.0);
            let (g, d) = (io.input(&gu)?, io.input(&dout)?);
            let mut dgu = io.poisoned(t * 2 * ff)?;
            io.be.swiglu_backward(&mut dgu, &d, &g, t, ff)?;
            io.output("dgate_up", &dgu, t * 2 * ff)
        });
    }
    // n = T C takes the CUDA `_vec8` add (n % 8 == 0), T C + 3 the scalar one.
    for (tag, n) in [("", t * C), ("[n%8!=0]", t * C + 3)] {
        c.case(format!("add_inplace{tag}"), "add", |io| {
            let (a0, x) = (io.randn(n, 1.0), io.randn(n, 1.0));
            let (mut a, xb) = (io.input(&a0)?, io.input(&x)?);
            io.be.add_inplace(&mut a, &xb, n)?;
            io.output("acc (+=)", &a, n)
        });
    }
    c.case("scale", "scale", |io| {
        let n = t * C + 1;
        let x = io.randn(n, 1.0);
        let mut b = io.full(&x)?;
        io.be.scale(&mut b, n, 0.37)?;
        io.output("buf", &b, n)
    });

    // ------------------------------------------------------------ classifier
    for grads in [false, true] {
        let name = if grads {
            "classifier[grads]"
        } else {
            "classifier[loss only]"
        };
        c.case(name, "classifier", |io| {
            let t = OP_TOKENS + 9;
            let x = io.randn(t * C, 1.0);
            let w = io.randn(V * C, 0.1);
            // Every 7th target ignored, the last one too (a document end).
            let targets: Vec<i32> = (0..t)
                .map(|i| {
                    if i % 7 == 3 || i + 1 == t {
                        IGNORE_INDEX
                    } else {
                        io.rng.random_range(0..V as i32)
                    }
                })
                .collect();
            let n_targets = targets.iter().filter(|&&x| x >= 0).count();
            let (xb, wb, tb) = (io.input(&x)?, io.input(&w)?, io.input_idx(&targets)?);
            let mut losses = io.poisoned_full(t)?;
            let scale = 1.0 / n_targets as f32;
            if grads {
                let dw0 = io.randn(V * C, 1e-3);
                let (mut dx, mut dw) = (io.poisoned(t * C)?, io.full(&dw0)?);
                io.be.classifier(
                    &mut losses,
                    Some((&mut dx, &mut dw)),
                    &xb,
                    &wb,
                    &tb,
                    scale,
                    t,
                    C,
                    V,
                )?;
                io.output("losses", &losses, t)?;
                io.output("dx", &dx, t * C)?;
                io.output("dw (+=)", &dw, V * C)
            } else {
                io.be
                    .classifier(&mut losses, None, &xb, &wb, &tb, scale, t, C, V)?;
                io.output("losses", &losses, t)
            }
        });
    }

    // ------------------------------------------------------------ optimizer
    c.case("sum_squares", "sum_squares", |io| {
        let sizes = [1usize, 1000, 65_537, 300_001];
        let data: Vec<Vec<f32>> = sizes.iter().map(|&n| io.randn(n, 0.01)).collect();
        let bufs = data
            .iter()
            .map(|d| io.full(d))
            .collect::<Result<Vec<_>, _>>()?;
        let list: Vec<(&B::Buf, usize)> = bufs.iter().zip(sizes).collect();
        let s = io.be.sum_squares(&list)?;
        io.output_host("sum", vec![s as f32]);
        Ok(())
    });
    for (tag, step, zero_moments) in [("[step 1]", 1u64, true), ("[step 7]", 7, false)] {
        c.case(format!("adamw{tag}"), "adamw", |io| {
            let n = 100_003;
            let p0 = io.randn(n, 0.02);
            let g = io.randn(n, 1e-3);
            let (m0, v0) = if zero_moments {
                (vec![0.0; n], vec![0.0; n])
            } else {
                let m = io.randn(n, 1e-3);
                let v = io.uniform(n, 1e-8, 1e-6);
                (m, v)
            };
            let (mut p, gb) = (io.full(&p0)?, io.full(&g)?);
            let (mut m, mut v) = (io.full(&m0)?, io.full(&v0)?);
            let hp = AdamWStep {
                lr: 3e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                grad_scale: 0.7,
                step,
            };
            io.be.adamw(&mut p, &gb, &mut m, &mut v, n, hp)?;
            io.output("param", &p, n)?;
            io.output("m", &m, n)?;
            io.output("v", &v, n)
        });
    }

    // ------------------------------------------------------------ the whole model
    c.case("model[forward_backward]", "model", |io| {
        model_case(io, true)
    });
    c.case("model[forward]", "model", |io| model_case(io, false));
}

fn attn_dims(lens: &[usize], h: usize, hkv: usize, d: usize) -> AttnDims {
    AttnDims {
        t: lens.iter().sum(),
        h,
        hkv,
        d,
        n_docs: lens.len(),
        max_seqlen: lens.iter().copied().max().unwrap_or(0),
    }
}

/// out `[T, H D]` and lse `[H, T]` of the CPU backend.
fn reference_attention(
    qkv: &[f32],
    cu: &[i32],
    dims: AttnDims,
) -> Result<(Vec<f32>, Vec<f32>), CaseError> {
    let cpu = CpuBackend::new();
    let mut out = vec![0.0; dims.t * dims.h * dims.d];
    let mut lse = vec![0.0; dims.h * dims.t];
    cpu.attention_forward(&mut out, &mut lse, &qkv.to_vec(), &cu.to_vec(), dims)?;
    Ok((out, lse))
}

/// The small Llama on one packed batch of ~20 ragged documents (T ~ 3000, one document of
/// length 1, one with its first half masked out of the loss): loss, per-token losses and
/// (with `grads`) every parameter gradient.
fn model_case<B: Backend>(io: &mut Io<B>, grads: bool) -> Result<(), CaseError> {
    let cfg = check_model_config();
    let lens = ragged_lengths(&mut io.rng, 20, 3000, false);
    let docs: Vec<Document> = lens
        .iter()
        .enumerate()
        .map(|(k, &l)| {
            let tokens: Vec<u32> = (0..l)
                .map(|_| io.rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            // Document 2: a "prompt" half that is not in the loss.
            let labels = (k == 2).then(|| (0..l).map(|i| i >= l / 2).collect());
            Document { tokens, labels }
        })
        .collect();
    let store = TokenStore::from_documents(&docs);
    let bin: Vec<u32> = (0..docs.len() as u32).collect();
    let packed = PackedBatch::assemble(&bin, &store)
        .map_err(|e| CaseError::Check(format!("assemble: {e}")))?;
    let t = packed.num_tokens();

    let layout = ParamLayout::new(&cfg);
    let weights = layout.init(&cfg, io.rng.random());
    // Capacity above T: the model's buffers are longer than the batch.
    let mut model = Llama::new(io.be, &cfg, &weights, t + 37, false)?;
    let mut batch = DeviceBatch::new(io.be, t + 37)?;
    batch.upload(io.be, &packed)?;
    let loss = if grads {
        model.zero_grads(io.be)?;
        model.forward_backward(io.be, &batch, 1.0 / packed.num_targets.max(1) as f32)?
    } else {
        model.forward(io.be, &batch)?
    };
    io.output_host("loss_sum", vec![loss as f32]);
    io.output_host("token_losses", model.token_losses(io.be, t)?);
    if grads {
        for (spec, g) in layout.specs.iter().zip(model.grads_to_host(io.be)?) {
            io.output_host(&format!("d {}", spec.name), g);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- comparison

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub case: String,
    pub output: String,
    /// Relative error (absolute when the reference is 0); None when not compared.
    pub rel: Option<f64>,
    pub tol: f64,
    /// None: pass; Some(why): fail.
    pub failure: Option<String>,
}

/// `‖a − b‖ / ‖b‖` in f64 (`‖a − b‖` when `‖b‖ = 0`).
pub fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    }
}

/// Compare the runs of the backend under test with the reference's, output by output.
pub fn compare(test: &[CaseRun], reference: &[CaseRun]) -> Vec<Row> {
    let by_name: BTreeMap<&str, &CaseRun> =
        reference.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut rows = Vec::new();
    for run in test {
        let tol = tolerance(run.family);
        let row = |output: &str, rel, failure| Row {
            case: run.name.clone(),
            output: output.to_string(),
            rel,
            tol,
            failure,
        };
        let Some(reference) = by_name.get(run.name.as_str()) else {
            rows.push(row("-", None, Some("no reference run".into())));
            continue;
        };
        let outputs = match (&run.result, &reference.result) {
            (Err(e), _) => {
                rows.push(row("-", None, Some(e.clone())));
                continue;
            }
            (Ok(_), Err(e)) => {
                rows.push(row("-", None, Some(format!("the reference failed: {e}"))));
                continue;
            }
            (Ok(out), Ok(refs)) => (out, refs),
        };
        let (out, refs) = outputs;
        if out.len() != refs.len() {
            rows.push(row(
                "-",
                None,
                Some(format!(
                    "{} outputs, the reference has {}",
                    out.len(),
                    refs.len()
                )),
            ));
            continue;
        }
        for ((name, o), (_, r)) in out.iter().zip(refs) {
            if o.len() != r.len() {
                rows.push(row(
                    name,
                    None,
                    Some(format!("{} values, the reference has {}", o.len(), r.len())),
                ));
                continue;
            }
            if let Some(i) = o.iter().position(|x| !x.is_finite()) {
                let bad = o.iter().filter(|x| !x.is_finite()).count();
                rows.push(row(
                    name,
                    None,
                    Some(format!("{bad} non-finite (first at {i}: not written?)")),
                ));
                continue;
            }
            if let Some(i) = r.iter().position(|x| !x.is_finite()) {
                rows.push(row(
                    name,
                    None,
                    Some(format!("the reference is non-finite at {i}")),
                ));
                continue;
            }
            let rel = rel_error(o, r);
            let failure = (rel > tol).then(|| "above tolerance".to_string());
            rows.push(row(name, Some(rel), failure));
        }
    }
    rows
}

/// The report table; the last line is "N passed, M failed".
pub fn render(rows: &[Row]) -> String {
    let w_case = rows.iter().map(|r| r.case.len()).max().unwrap_or(4).max(4);
    let w_out = rows
        .iter()
        .map(|r| r.output.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = format!(
        "{:<w_case$}  {:<w_out$}  {:>10}  {:>7}  result\n",
        "op", "output", "rel err", "tol"
    );
    for r in rows {
        let rel = r.rel.map_or("-".to_string(), |e| format!("{e:.3e}"));
        let result = match &r.failure {
            None => "PASS".to_string(),
            Some(why) => format!("FAIL {why}"),
        };
        s += &format!(
            "{:<w_case$}  {:<w_out$}  {:>10}  {:>7.0e}  {}\n",
            r.case, r.output, rel, r.tol, result
        );
    }
    let failed = rows.iter().filter(|r| r.failure.is_some()).count();
    s += &format!("{} passed, {} failed\n", rows.len() - failed, failed);
    s
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

    #[test]
    fn ragged_lengths_have_the_edge_cases() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            let l = ragged_lengths(&mut rng, 12, 1100, true);
            assert!(l.contains(&1) && l.contains(&0));
            assert!(!l.iter().sum::<usize>().is_multiple_of(32));
        }
    }

    #[test]
    fn errors_and_bad_values_fail() {
        let ok = |v: Vec<f32>| CaseRun {
            name: "x".into(),
            family: "add",
            result: Ok(vec![("out".into(), v)]),
        };
        let reference = [ok(vec![1.0, 2.0])];
        let unsupported = CaseRun {
            name: "x".into(),
            family: "add",
            result: Err("unsupported".into()),
        };
        for (run, why) in [
            (ok(vec![1.0, f32::NAN]), "non-finite"),
            (ok(vec![1.0, 2.1]), "above tolerance"),
            (unsupported, "unsupported"),
        ] {
            let rows = compare(&[run], &reference);
            assert!(
                rows[0].failure.as_deref().unwrap().contains(why),
                "{rows:?}"
            );
        }
        let rows = compare(&[ok(vec![1.0, 2.0 + 1e-7])], &reference);
        assert!(rows[0].failure.is_none());
        assert!(render(&rows).ends_with("1 passed, 0 failed\n"));
    }

    /// An op writing past its dims, one leaving an output unwritten and one the backend does
    /// not have: each is a failure with its reason.
    #[test]
    fn out_of_bounds_and_unwritten_elements_are_caught() {
        let cpu = CpuBackend::new();
        let mut c = Cases {
            be: &cpu,
            seed: 0,
            only: None,
            runs: Vec::new(),
            act: false,
        };
        c.case("past the end", "add", |io| {
            let b = io.input(&[1.0, 2.0, 3.0])?;
            io.output("out", &b, 2)
        });
        c.case("unwritten", "add", |io| {
            let b = io.poisoned(3)?;
            io.output("out", &b, 3)
        });
        c.case("stub", "add", |_| {
            Err(BackendError::Unsupported {
                op: "add_inplace",
                backend: "cuda",
            }
            .into())
        });
        let runs = c.runs;
        assert!(runs[0].result.as_ref().unwrap_err().contains("wrote past"));
        assert_eq!(runs[2].result.as_ref().unwrap_err(), "unsupported");
        let rows = compare(&runs[1..], &runs[1..]);
        assert!(rows[0].failure.as_deref().unwrap().contains("non-finite"));
    }
}
