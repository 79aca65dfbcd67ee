//! What a case body works with ([`Io`]): its backend, a random stream keyed on the case name,
//! inputs with a NaN tail, poisoned outputs, and the recorded outputs; [`Cases`] runs the
//! bodies, catching errors and panics, once per pass (full precision, then activation kind).

use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::backend::{Backend, BackendError};

/// Extra elements at the end of every buffer (the reuse contract: buffers may be longer).
const PAD: usize = 67;

/// Downloaded outputs of one case, in order.
pub type Outputs = Vec<(String, Vec<f32>)>;

/// One case run on one backend.
pub struct CaseRun {
    pub name: String,
    /// Key into [`super::TOLERANCES`].
    pub family: &'static str,
    /// The outputs, or why the case could not run.
    pub result: Result<Outputs, String>,
}

/// Why a case stopped.
pub(super) enum CaseError {
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
pub(super) struct Io<'a, B: Backend> {
    pub(super) be: &'a B,
    pub(super) rng: ChaCha8Rng,
    pub(super) outputs: Outputs,
    pub(super) act: bool,
}

impl<B: Backend> Io<'_, B> {
    /// `n` values of N(0, std^2).
    pub(super) fn randn(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut self.rng);
                z * std
            })
            .collect()
    }

    /// `n` values uniform in [lo, hi).
    pub(super) fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(lo..hi)).collect()
    }

    /// An activation-kind buffer (what the model stores with `alloc_act`: activations, their
    /// gradients, the GEMMs' weight copies) holding `data` and then a NaN tail. Full
    /// precision in the first pass, the backend's activation precision in the second.
    pub(super) fn input(&self, data: &[f32]) -> Result<B::Buf, CaseError> {
        self.fill(data, self.act)
    }

    /// A full-precision buffer (parameters the ops read directly, gradients, rstd, lse,
    /// losses, dres) holding `data` and then a NaN tail, in both passes.
    pub(super) fn full(&self, data: &[f32]) -> Result<B::Buf, CaseError> {
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
    pub(super) fn input_idx(&self, data: &[i32]) -> Result<B::IdxBuf, CaseError> {
        let mut buf = self.be.alloc_idx(data.len() + PAD)?;
        let mut host = data.to_vec();
        host.resize(data.len() + PAD, 0);
        self.be.upload_idx(&mut buf, &host)?;
        Ok(buf)
    }

    /// An activation-kind output of `len` elements the op must overwrite: all NaN.
    pub(super) fn poisoned(&self, len: usize) -> Result<B::Buf, CaseError> {
        self.input(&vec![f32::NAN; len])
    }

    /// A full-precision output of `len` elements the op must overwrite: all NaN.
    pub(super) fn poisoned_full(&self, len: usize) -> Result<B::Buf, CaseError> {
        self.full(&vec![f32::NAN; len])
    }

    /// Record output `name` (its leading `len` elements); its tail must still be NaN.
    pub(super) fn output(&mut self, name: &str, buf: &B::Buf, len: usize) -> Result<(), CaseError> {
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
    pub(super) fn output_host(&mut self, name: &str, values: Vec<f32>) {
        self.outputs.push((name.to_string(), values));
    }
}

/// Collects the cases of one backend.
pub(super) struct Cases<'a, B: Backend> {
    pub(super) be: &'a B,
    pub(super) seed: u64,
    pub(super) only: Option<&'a str>,
    pub(super) runs: Vec<CaseRun>,
    /// The activation-precision pass: names get [`ACT_SUFFIX`], tolerances the "act" family.
    pub(super) act: bool,
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
    pub(super) fn case(
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
pub(super) fn ragged_lengths(
    rng: &mut ChaCha8Rng,
    n_docs: usize,
    total: usize,
    empty: bool,
) -> Vec<usize> {
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

pub(super) fn cu_of(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().copied().unwrap_or(0) + l as i32);
    }
    cu
}

pub(super) fn positions_of(lens: &[usize]) -> Vec<i32> {
    lens.iter().flat_map(|&l| 0..l as i32).collect()
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::cli::check::compare;

    #[test]
    fn ragged_lengths_have_the_edge_cases() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            let l = ragged_lengths(&mut rng, 12, 1100, true);
            assert!(l.contains(&1) && l.contains(&0));
            assert!(!l.iter().sum::<usize>().is_multiple_of(32));
        }
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
