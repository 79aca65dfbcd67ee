//! `packtrain attention-dump`: one backend's varlen attention, forward and backward, on random
//! packed inputs, written to disk for `bench/attention_parity.py`, which runs PyTorch's
//! FlashAttention-2 varlen and an fp64 reference on the same inputs and compares.
//!
//! The cases ([`cases`]) are ragged on purpose: documents of length 1 (first, middle, last),
//! lengths and totals T that are not multiples of 64, T from about 1000 to 5000, and a
//! 4096-token document between short ones; shapes (H, Hkv, D) = (8, 2, 64), (16, 4, 128) and
//! (4, 4, 128) (GQA with groups of 4, and plain multi-head). Inputs are uniform random values
//! rounded to bf16 (q, k, v in [-2, 2), dout in [-1, 1)), so a bf16 backend holds them
//! exactly and PyTorch sees the very same numbers; each case draws from its own ChaCha8
//! stream of `--seed`. qkv, dout, out and dqkv are activation buffers (`alloc_act`), as in
//! training: bf16 on CUDA, so the dump checks the kernels training runs (`PACKTRAIN_ACTIVATIONS=f32`
//! dumps the f32 kernels instead); lse is f32.
//!
//! Layout of DIR (existing files of the same names are overwritten): one `case_<i>/` per
//! case, i = 0, 1, ..., each holding
//!
//! | file | shape | what |
//! | --- | --- | --- |
//! | `meta.json` | | `{"t", "h", "hkv", "d", "n_docs", "max_seqlen", "backend", "seed", "lens"}` |
//! | `qkv.f32` | `[T, (H + 2 Hkv) D]` | input, each row `[q: H D \| k: Hkv D \| v: Hkv D]` |
//! | `dout.f32` | `[T, H D]` | upstream gradient |
//! | `cu_seqlens.i32` | `[N + 1]` | document offsets |
//! | `out.f32` | `[T, H D]` | `attention_forward` output |
//! | `lse.f32` | `[H, T]` | `attention_forward` log-sum-exp of the scaled scores (natural log) |
//! | `dqkv.f32` | `[T, (H + 2 Hkv) D]` | `attention_backward`: `[dq \| dk \| dv]`, as qkv |
//!
//! Raw little-endian f32 / i32, row-major, no header. Only the `Backend` trait is used, so
//! every backend dumps the same way.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{AttnDims, Backend, BackendError};

/// The backend whose attention is dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DumpDevice {
    /// The CUDA backend on GPU `--gpu`.
    Cuda,
    /// The f32 CPU reference (checks the parity script itself).
    Cpu,
}

#[derive(clap::Args, Debug, Clone)]
pub struct AttentionDumpArgs {
    /// Backend to run.
    #[arg(long, value_enum, default_value_t = DumpDevice::Cuda)]
    pub device: DumpDevice,
    /// Directory to write (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Seed of the document lengths and of every input.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPU ordinal (`--device cuda`).
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

/// A failure while dumping: the backend op of a case, or a file.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("case_{case} (T={t}, H={h}, Hkv={hkv}, D={d})")]
    Backend {
        case: usize,
        t: usize,
        h: usize,
        hkv: usize,
        d: usize,
        #[source]
        source: BackendError,
    },
    #[error("writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One case: a head shape and the lengths of the packed documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpCase {
    /// Query heads H.
    pub h: usize,
    /// Key/value heads Hkv.
    pub hkv: usize,
    /// Head dim D.
    pub d: usize,
    /// Document lengths, in packing order (all > 0).
    pub lens: Vec<usize>,
}

impl DumpCase {
    /// The attention dims of this case (T = sum of the lengths).
    pub fn dims(&self) -> AttnDims {
        AttnDims {
            t: self.lens.iter().sum(),
            h: self.h,
            hkv: self.hkv,
            d: self.d,
            n_docs: self.lens.len(),
            max_seqlen: self.lens.iter().copied().max().unwrap_or(0),
        }
    }

    /// `[0, l0, l0 + l1, ..., T]`.
    pub fn cu_seqlens(&self) -> Vec<i32> {
        let mut cu = Vec::with_capacity(self.lens.len() + 1);
        let mut acc = 0i32;
        cu.push(acc);
        for &l in &self.lens {
            acc += l as i32;
            cu.push(acc);
        }
        cu
    }
}

/// `meta.json` of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseMeta {
    pub t: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
    pub n_docs: usize,
    pub max_seqlen: usize,
    /// The backend that computed the outputs, e.g. `cpu` or `cuda (NVIDIA H100 ..., sm_90)`.
    pub backend: String,
    pub seed: u64,
    pub lens: Vec<usize>,
}

/// Ragged lengths summing to about `target`: a length-1 document first, in the middle and
/// last, a 65, and uniform lengths in 2..=700 between; the total is never a multiple of 64.
fn ragged_lens(rng: &mut ChaCha8Rng, target: usize) -> Vec<usize> {
    let mut lens = vec![1, 65];
    while lens.iter().sum::<usize>() + 1 < target {
        lens.push(rng.random_range(2..=700));
    }
    lens.insert(lens.len() / 2, 1);
    lens.push(1);
    if lens.iter().sum::<usize>() % 64 == 0 {
        lens.push(3);
    }
    lens
}

/// A 4096-token document between short ones (so it starts at an offset that is not a multiple
/// of 64), then a length-1 document and a few more.
fn long_lens(rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut lens: Vec<usize> = (0..3).map(|_| rng.random_range(2..=150)).collect();
    lens.push(4096);
    lens.push(1);
    lens.extend((0..2).map(|_| rng.random_range(2..=150)));
    if lens.iter().sum::<usize>() % 64 == 0 {
        lens.push(3);
    }
    lens
}

/// The cases `attention-dump` writes, drawn from `seed`.
pub fn cases(seed: u64) -> Vec<DumpCase> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let case = |h, hkv, d, lens| DumpCase { h, hkv, d, lens };
    vec![
        case(8, 2, 64, ragged_lens(&mut rng, 1500)),
        case(16, 4, 128, ragged_lens(&mut rng, 3000)),
        case(4, 4, 128, ragged_lens(&mut rng, 2000)),
        case(8, 2, 64, long_lens(&mut rng)),
        case(16, 4, 128, long_lens(&mut rng)),
    ]
}

/// `n` uniform values in `[-a, a)`, rounded to the nearest bf16.
fn bf16_uniform(rng: &mut ChaCha8Rng, n: usize, a: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-a..a)).to_f32())
        .collect()
}

/// Inputs and outputs of one case, as written.
#[derive(Debug, Clone)]
pub struct CaseData {
    pub dims: AttnDims,
    pub cu_seqlens: Vec<i32>,
    /// `[T, (H + 2 Hkv) D]`.
    pub qkv: Vec<f32>,
    /// `[T, H D]`.
    pub dout: Vec<f32>,
    /// `[T, H D]`.
    pub out: Vec<f32>,
    /// `[H, T]`.
    pub lse: Vec<f32>,
    /// `[T, (H + 2 Hkv) D]`.
    pub dqkv: Vec<f32>,
}

/// Draw case `index`'s inputs (stream `index + 1` of `seed`) and run the backend's attention
/// forward and backward on them.
pub fn run_case<B: Backend>(
    be: &B,
    case: &DumpCase,
    index: usize,
    seed: u64,
) -> Result<CaseData, DumpError> {
    let dims = case.dims();
    let AttnDims { t, h, hkv, d, .. } = dims;
    let wrap = |source| DumpError::Backend {
        case: index,
        t,
        h,
        hkv,
        d,
        source,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64 + 1);
    let w = dims.qkv_width();
    let mut data = CaseData {
        dims,
        cu_seqlens: case.cu_seqlens(),
        qkv: bf16_uniform(&mut rng, t * w, 2.0),
        dout: bf16_uniform(&mut rng, t * h * d, 1.0),
        out: Vec::new(),
        lse: Vec::new(),
        dqkv: Vec::new(),
    };
    forward_backward(be, &mut data).map_err(wrap)?;
    Ok(data)
}

/// Upload `data`'s inputs, run `attention_forward` then `attention_backward`, and download
/// the outputs into `data.out`, `data.lse` and `data.dqkv`.
fn forward_backward<B: Backend>(be: &B, data: &mut CaseData) -> Result<(), BackendError> {
    let dims = data.dims;
    let (t, hd, w) = (dims.t, dims.h * dims.d, dims.qkv_width());
    let mut qkv = be.alloc_act(t * w)?;
    be.upload(&mut qkv, &data.qkv)?;
    let mut dout = be.alloc_act(t * hd)?;
    be.upload(&mut dout, &data.dout)?;
    let mut cu = be.alloc_idx(data.cu_seqlens.len())?;
    be.upload_idx(&mut cu, &data.cu_seqlens)?;
    let mut out = be.alloc_act(t * hd)?;
    let mut lse = be.alloc(dims.h * t)?;
    let mut dqkv = be.alloc_act(t * w)?;
    be.attention_forward(&mut out, &mut lse, &qkv, &cu, dims)?;
    be.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &cu, dims)?;
    be.synchronize()?;
    data.out = be.download(&out, t * hd)?;
    data.lse = be.download(&lse, dims.h * t)?;
    data.dqkv = be.download(&dqkv, t * w)?;
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DumpError + '_ {
    move |source| DumpError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `values` as raw little-endian 4-byte words.
fn write_words<const N: usize>(
    path: &Path,
    values: impl ExactSizeIterator<Item = [u8; N]>,
) -> Result<(), DumpError> {
    let mut bytes = Vec::with_capacity(values.len() * N);
    for v in values {
        bytes.extend_from_slice(&v);
    }
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// Write one case's directory `dir` (created if missing).
pub fn write_case(
    dir: &Path,
    data: &CaseData,
    lens: &[usize],
    backend: &str,
    seed: u64,
) -> Result<(), DumpError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let meta = CaseMeta {
        t: data.dims.t,
        h: data.dims.h,
        hkv: data.dims.hkv,
        d: data.dims.d,
        n_docs: data.dims.n_docs,
        max_seqlen: data.dims.max_seqlen,
        backend: backend.to_string(),
        seed,
        lens: lens.to_vec(),
    };
    let path = dir.join("meta.json");
    let json = serde_json::to_vec_pretty(&meta).map_err(|source| DumpError::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&path, json).map_err(io_err(&path))?;
    let f32s: [(&str, &[f32]); 5] = [
        ("qkv.f32", &data.qkv),
        ("dout.f32", &data.dout),
        ("out.f32", &data.out),
        ("lse.f32", &data.lse),
        ("dqkv.f32", &data.dqkv),
    ];
    for (name, values) in f32s {
        write_words(&dir.join(name), values.iter().map(|x| x.to_le_bytes()))?;
    }
    write_words(
        &dir.join("cu_seqlens.i32"),
        data.cu_seqlens.iter().map(|x| x.to_le_bytes()),
    )
}

/// Run every case on `be` and write `dir/case_<i>/`. `backend` names the backend in
/// `meta.json`. Returns each case's dims, in order.
pub fn write_dump<B: Backend>(
    be: &B,
    backend: &str,
    dir: &Path,
    cases: &[DumpCase],
    seed: u64,
) -> Result<Vec<AttnDims>, DumpError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut written = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        let data = run_case(be, case, i, seed)?;
        write_case(
            &dir.join(format!("case_{i}")),
            &data,
            &case.lens,
            backend,
            seed,
        )?;
        written.push(data.dims);
    }
    Ok(written)
}

/// Run `packtrain attention-dump`.
pub fn run(args: &AttentionDumpArgs) -> anyhow::Result<()> {
    let cases = cases(args.seed);
    let (label, written) = match args.device {
        DumpDevice::Cpu => {
            let be = CpuBackend::new();
            let label = "cpu".to_string();
            let written = write_dump(&be, &label, &args.out, &cases, args.seed)?;
            (label, written)
        }
        DumpDevice::Cuda => {
            let be = CudaBackend::new(args.gpu).map_err(|e| anyhow!("--device cuda: {e}"))?;
            let act = if be.activations_are_f32() {
                "f32"
            } else {
                "bf16"
            };
            let label = format!("cuda ({}, {}, {act} activations)", be.device_name, be.arch);
            let written = write_dump(&be, &label, &args.out, &cases, args.seed)?;
            (label, written)
        }
    };
    println!(
        "packtrain attention-dump: {label}, seed {}, {} cases in {}",
        args.seed,
        written.len(),
        args.out.display()
    );
    for (i, dims) in written.iter().enumerate() {
        println!(
            "  case_{i}: T={}, {} documents (longest {}), H={} Hkv={} D={}",
            dims.t, dims.n_docs, dims.max_seqlen, dims.h, dims.hkv, dims.d
        );
    }
    println!(
        "compare: python3 bench/attention_parity.py {}",
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_f32(path: &Path) -> Vec<f32> {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes.len() % 4, 0, "{}", path.display());
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn default_cases_are_ragged() {
        for seed in 0..50 {
            check_ragged(&cases(seed));
        }
        assert_eq!(cases(3), cases(3), "deterministic");
    }

    fn check_ragged(cases: &[DumpCase]) {
        let shapes: Vec<_> = cases.iter().map(|c| (c.h, c.hkv, c.d)).collect();
        for s in [(8, 2, 64), (16, 4, 128), (4, 4, 128)] {
            assert!(shapes.contains(&s), "shape {s:?} missing");
        }
        for c in cases {
            let dims = c.dims();
            assert!((1000..=5000).contains(&dims.t), "T = {}", dims.t);
            assert_ne!(dims.t % 64, 0);
            assert!(c.lens.contains(&1));
            assert!(c.lens.iter().all(|&l| l > 0));
            assert!(c.lens.iter().any(|&l| l % 64 != 0));
            assert_eq!(*c.cu_seqlens().last().unwrap() as usize, dims.t);
        }
        assert!(cases.iter().any(|c| c.lens.contains(&4096)));
    }

    #[test]
    fn cpu_dump_writes_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = vec![
            DumpCase {
                h: 4,
                hkv: 2,
                d: 8,
                lens: vec![1, 70, 3, 1],
            },
            DumpCase {
                h: 2,
                hkv: 2,
                d: 16,
                lens: vec![5, 1, 130],
            },
        ];
        let be = CpuBackend::new();
        let written = write_dump(&be, "cpu", dir.path(), &cases, 7).unwrap();
        assert_eq!(written.len(), 2);
        for (i, case) in cases.iter().enumerate() {
            let d = dir.path().join(format!("case_{i}"));
            let dims = case.dims();
            let (t, w, hd) = (dims.t, dims.qkv_width(), dims.h * dims.d);
            let meta: CaseMeta =
                serde_json::from_slice(&std::fs::read(d.join("meta.json")).unwrap()).unwrap();
            let want = CaseMeta {
                t,
                h: case.h,
                hkv: case.hkv,
                d: case.d,
                n_docs: case.lens.len(),
                max_seqlen: *case.lens.iter().max().unwrap(),
                backend: "cpu".into(),
                seed: 7,
                lens: case.lens.clone(),
            };
            assert_eq!(meta, want);
            for (name, words) in [
                ("qkv.f32", t * w),
                ("dout.f32", t * hd),
                ("out.f32", t * hd),
                ("lse.f32", dims.h * t),
                ("dqkv.f32", t * w),
                ("cu_seqlens.i32", case.lens.len() + 1),
            ] {
                let len = std::fs::metadata(d.join(name)).unwrap().len();
                assert_eq!(len, 4 * words as u64, "case_{i}/{name}");
            }
            let cu = std::fs::read(d.join("cu_seqlens.i32")).unwrap();
            let cu: Vec<i32> = cu
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(cu, case.cu_seqlens());
            for x in read_f32(&d.join("qkv.f32")) {
                assert_eq!(bf16::from_f32(x).to_f32(), x, "not bf16-representable");
            }
            // The files hold the backend's outputs: rerun and compare bitwise (the CPU
            // backend is deterministic).
            let again = run_case(&be, case, i, 7).unwrap();
            assert_eq!(read_f32(&d.join("out.f32")), again.out);
            assert_eq!(read_f32(&d.join("lse.f32")), again.lse);
            assert_eq!(read_f32(&d.join("dqkv.f32")), again.dqkv);
            assert!(again.dqkv.iter().all(|x| x.is_finite()));
            // A length-1 first document: its query sees only itself, so out = v of that token.
            if case.lens[0] == 1 {
                let v0 = &again.qkv[(case.h + case.hkv) * case.d..][..case.d];
                assert_eq!(&again.out[..case.d], v0);
            }
        }
    }

    #[test]
    fn unwritable_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let cases = vec![DumpCase {
            h: 1,
            hkv: 1,
            d: 4,
            lens: vec![2],
        }];
        let err = write_dump(&CpuBackend::new(), "cpu", &file, &cases, 0).unwrap_err();
        assert!(matches!(err, DumpError::Io { .. }), "{err}");
        assert!(err.to_string().contains("not-a-dir"));
    }
}
