//! `packtrain attention-bench`: our varlen causal attention, forward and backward, timed
//! through the `Backend` trait on the CUDA backend: the kernel-level peer of
//! `bench/attention_bench.py` (PyTorch's FlashAttention-2 varlen and FlexAttention), runnable
//! from the release binary on a machine without cargo.
//!
//! Documents, one set per `--lens` file or per `--tokens` count:
//! - `--lens FILE`: space- (or newline-) separated lengths, as written by
//!   `python3 bench/attention_bench.py --lens-out PREFIX` (`PREFIX.<T>.txt`). This is the way to
//!   time the very documents PyTorch was timed on.
//! - otherwise `--tokens T` (default 16384 and 65536): log-normal lengths drawn like the script's
//!   `lengths()` (median 400, sigma 0.9, rounded, clipped to [1, 4096], seed 0, drawn until they
//!   sum to T, the last one cut to fit), but from our own generator (ChaCha8), not numpy's: the
//!   same distribution, not the same documents.
//!
//! Shapes (H, Hkv, D), default (16, 4, 128) and (32, 8, 64). Buffers: qkv `[T, (H + 2 Hkv) D]`,
//! out and dout `[T, H D]`, dqkv like qkv, in the activation precision (`alloc_act`: bf16 on
//! CUDA, what training uses; `PACKTRAIN_ACTIVATIONS=f32` makes it f32) or, with `--f32`, in f32;
//! lse `[H, T]` always f32 (`alloc`). Inputs uniform in [-1, 1), seed 1.
//!
//! Timing: `--warmup` untimed calls, then `--reps` calls, each timed alone on the host clock
//! around the call and a `synchronize` (so it includes the host work of a call: the work list
//! built from `cu_seqlens` and its upload); the median is reported. Forward first, then the
//! backward on the forward's outputs.
//!
//! TFLOP/s count only causal work: per document of length L, the forward is 2 L^2 D H FLOPs
//! (Q K^T and P V over the lower triangle), the backward 2.5x that, fwd+bwd 3.5x over
//! fwd ms + bwd ms; the same numbers as the script's.
//!
//! The path column is `PACKTRAIN_ATTENTION` as the backend reads it: `auto` (unset: flash for
//! D in {64, 128}, the GEMM path otherwise), `flash` or `gemm` (time both by running twice).
//! A failing row (e.g. out of memory) is printed with its error and the run goes on; the
//! command then fails, naming it. `--json FILE` writes every row and the lengths.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::Serialize;

use super::report::median;
use crate::backend::cuda::CudaBackend;
use crate::backend::{AttnDims, Backend, BackendError};

/// Seed of the generated lengths (the script's `lengths(tokens, seed=0)`).
const LENGTHS_SEED: u64 = 0;
/// Seed of the random inputs.
const INPUTS_SEED: u64 = 1;

/// One head shape: query heads H, kv heads Hkv, head dim D (`HxHkvxD` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
}

impl std::str::FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected HxHkvxD, e.g. 16x4x128");
        let v: Vec<usize> = s
            .split('x')
            .map(|x| x.trim().parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let [h, hkv, d] = v[..] else {
            return Err(bad());
        };
        if h == 0 || hkv == 0 || d == 0 || h % hkv != 0 {
            return Err(format!(
                "{s:?}: H, Hkv and D must be >= 1 and H a multiple of Hkv (H={h}, Hkv={hkv})"
            ));
        }
        Ok(Shape { h, hkv, d })
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct AttentionBenchArgs {
    /// Document lengths, space-separated, from FILE (as written by `bench/attention_bench.py
    /// --lens-out PREFIX`: PREFIX.<T>.txt); repeatable or comma-separated, one set of rows per
    /// file. Replaces --tokens.
    #[arg(
        long,
        value_name = "FILE",
        value_delimiter = ',',
        conflicts_with = "tokens"
    )]
    pub lens: Vec<PathBuf>,
    /// Token counts T, comma-separated: log-normal documents generated like the script's
    /// (same distribution, not the same draws: use --lens for identical documents).
    #[arg(long, value_delimiter = ',', default_value = "16384,65536")]
    pub tokens: Vec<usize>,
    /// Head shapes HxHkvxD, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16x4x128,32x8x64")]
    pub shapes: Vec<Shape>,
    /// f32 buffers instead of the activation precision (bf16 on CUDA).
    #[arg(long)]
    pub f32: bool,
    /// Untimed calls before the timed ones (each of forward and backward).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed calls (each of forward and backward); the median is reported.
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
    /// Write every row and the lengths as one JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

impl Default for AttentionBenchArgs {
    fn default() -> Self {
        AttentionBenchArgs {
            lens: Vec::new(),
            tokens: vec![16384, 65536],
            shapes: vec![
                Shape {
                    h: 16,
                    hkv: 4,
                    d: 128,
                },
                Shape {
                    h: 32,
                    hkv: 8,
                    d: 64,
                },
            ],
            f32: false,
            warmup: 3,
            reps: 20,
            json: None,
            gpu: 0,
        }
    }
}

// ---------------------------------------------------------------- documents

/// One set of documents: where its lengths came from, and the lengths.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocSet {
    /// The `--lens` file, or `generated`.
    pub source: String,
    pub lens: Vec<usize>,
}

/// Log-normal lengths (median 400, sigma 0.9, rounded, clipped to [1, 4096]) drawn from
/// ChaCha8 `seed` until they sum to `tokens`, the last one cut to fit.
pub fn lengths(tokens: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut left = tokens;
    while left > 0 {
        let z: f64 = StandardNormal.sample(&mut rng);
        let n = ((400f64.ln() + 0.9 * z).exp().round() as usize).clamp(1, 4096);
        let n = n.min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// The lengths in `path`: whitespace-separated positive integers, at least one, summing to
/// at most `i32::MAX` (cu_seqlens is int32).
pub fn read_lens(path: &Path) -> anyhow::Result<Vec<usize>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lens = text
        .split_whitespace()
        .enumerate()
        .map(|(i, w)| match w.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(anyhow!(
                "{}: length {} is {w:?}, expected a positive integer",
                path.display(),
                i + 1
            )),
        })
        .collect::<anyhow::Result<Vec<usize>>>()?;
    if lens.is_empty() {
        bail!("{}: no lengths", path.display());
    }
    let total: usize = lens.iter().sum();
    if total > i32::MAX as usize {
        bail!(
            "{}: {total} tokens do not fit int32 cu_seqlens",
            path.display()
        );
    }
    Ok(lens)
}

/// The document sets of a run: one per `--lens` file, else one per `--tokens` count.
pub fn doc_sets(args: &AttentionBenchArgs) -> anyhow::Result<Vec<DocSet>> {
    if !args.lens.is_empty() {
        return args
            .lens
            .iter()
            .map(|p| {
                Ok(DocSet {
                    source: p.display().to_string(),
                    lens: read_lens(p)?,
                })
            })
            .collect();
    }
    args.tokens
        .iter()
        .map(|&t| {
            if t == 0 || t > i32::MAX as usize {
                bail!("--tokens {t}: must be in 1..={}", i32::MAX);
            }
            Ok(DocSet {
                source: "generated".into(),
                lens: lengths(t, LENGTHS_SEED),
            })
        })
        .collect()
}

/// Causal forward FLOPs: the sum over documents of 2 L^2 D H.
pub fn forward_flops(lens: &[usize], shape: Shape) -> f64 {
    let l2: f64 = lens.iter().map(|&l| (l as f64) * (l as f64)).sum();
    2.0 * l2 * (shape.d * shape.h) as f64
}

// ---------------------------------------------------------------- timing

/// Median milliseconds of one forward and one backward call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub fwd_ms: f64,
    pub bwd_ms: f64,
}

/// `n` uniform values in [-1, 1): chunk k from ChaCha8 `seed`, stream `stream + k`.
fn uniform(n: usize, seed: u64, stream: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let mut v = vec![0.0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(k, chunk)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream((stream << 32) | k as u64);
        for x in chunk {
            *x = rng.random_range(-1.0..1.0);
        }
    });
    v
}

/// Median ms of `reps` calls of `f`, each timed alone with a synchronize, after `warmup`.
fn median_ms<B: Backend>(
    be: &B,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<(), BackendError>,
) -> Result<f64, BackendError> {
    for _ in 0..warmup {
        f()?;
    }
    be.synchronize()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        be.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&ms))
}

/// Time `attention_forward` and then `attention_backward` (on the forward's outputs) over the
/// documents `lens` packed end to end, with `shape`'s heads; f32 buffers when `f32`, else the
/// backend's activation precision (lse is f32 either way).
pub fn time_attention<B: Backend>(
    be: &B,
    lens: &[usize],
    shape: Shape,
    f32: bool,
    warmup: usize,
    reps: usize,
) -> Result<Timing, BackendError> {
    let t: usize = lens.iter().sum();
    let dims = AttnDims {
        t,
        h: shape.h,
        hkv: shape.hkv,
        d: shape.d,
        n_docs: lens.len(),
        max_seqlen: lens.iter().copied().max().unwrap_or(0),
    };
    let (w, hd) = (dims.qkv_width(), shape.h * shape.d);
    let mut cu = Vec::with_capacity(lens.len() + 1);
    cu.push(0i32);
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l as i32);
    }
    let alloc = |n| if f32 { be.alloc(n) } else { be.alloc_act(n) };
    let mut qkv = alloc(t * w)?;
    be.upload(&mut qkv, &uniform(t * w, INPUTS_SEED, 0))?;
    let mut dout = alloc(t * hd)?;
    be.upload(&mut dout, &uniform(t * hd, INPUTS_SEED, 1))?;
    let mut cu_seqlens = be.alloc_idx(cu.len())?;
    be.upload_idx(&mut cu_seqlens, &cu)?;
    let mut out = alloc(t * hd)?;
    let mut lse = be.alloc(shape.h * t)?;
    let mut dqkv = alloc(t * w)?;
    let fwd_ms = median_ms(be, warmup, reps, || {
        be.attention_forward(&mut out, &mut lse, &qkv, &cu_seqlens, dims)
    })?;
    // reps >= 1, so out and lse hold the forward of these inputs.
    let bwd_ms = median_ms(be, warmup, reps, || {
        be.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &cu_seqlens, dims)
    })?;
    Ok(Timing { fwd_ms, bwd_ms })
}

// ---------------------------------------------------------------- report

/// One row of the table (and of `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub source: String,
    pub tokens: usize,
    pub docs: usize,
    pub longest: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
    /// `PACKTRAIN_ATTENTION`: auto, flash or gemm.
    pub path: String,
    pub dtype: String,
    /// Causal forward FLOPs (2 L^2 D H summed over documents).
    pub flops_fwd: f64,
    pub fwd_ms: Option<f64>,
    pub bwd_ms: Option<f64>,
    pub fwd_tflops: Option<f64>,
    pub bwd_tflops: Option<f64>,
    pub fwd_bwd_tflops: Option<f64>,
    pub error: Option<String>,
}

impl Row {
    fn new(set: &DocSet, shape: Shape, path: &str, dtype: &str) -> Row {
        Row {
            implementation: "packtrain",
            source: set.source.clone(),
            tokens: set.lens.iter().sum(),
            docs: set.lens.len(),
            longest: set.lens.iter().copied().max().unwrap_or(0),
            h: shape.h,
            hkv: shape.hkv,
            d: shape.d,
            path: path.to_string(),
            dtype: dtype.to_string(),
            flops_fwd: forward_flops(&set.lens, shape),
            fwd_ms: None,
            bwd_ms: None,
            fwd_tflops: None,
            bwd_tflops: None,
            fwd_bwd_tflops: None,
            error: None,
        }
    }

    /// Fill in the times and the TFLOP/s (forward, 2.5x backward, 3.5x both).
    fn timed(mut self, t: Timing) -> Row {
        let f = self.flops_fwd;
        self.fwd_ms = Some(t.fwd_ms);
        self.bwd_ms = Some(t.bwd_ms);
        self.fwd_tflops = Some(f / t.fwd_ms / 1e9);
        self.bwd_tflops = Some(2.5 * f / t.bwd_ms / 1e9);
        self.fwd_bwd_tflops = Some(3.5 * f / (t.fwd_ms + t.bwd_ms) / 1e9);
        self
    }
}

const HEADER: &str = "| T | docs | longest | shape | path | dtype | fwd ms | fwd TFLOP/s | bwd ms \
    | bwd TFLOP/s | fwd+bwd TFLOP/s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- \
    | --- | --- |";

/// One markdown table line.
pub fn render_row(r: &Row) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or(String::new(), |x| format!("{x:.p$}"));
    let mut cells = vec![
        r.tokens.to_string(),
        r.docs.to_string(),
        r.longest.to_string(),
        format!("H={} Hkv={} D={}", r.h, r.hkv, r.d),
        r.path.clone(),
        r.dtype.clone(),
    ];
    match &r.error {
        Some(e) => {
            cells.push(format!("failed: {}", e.replace('|', "/")));
            cells.extend(std::iter::repeat_n(String::new(), 4));
        }
        None => cells.extend([
            f(r.fwd_ms, 3),
            f(r.fwd_tflops, 1),
            f(r.bwd_ms, 3),
            f(r.bwd_tflops, 1),
            f(r.fwd_bwd_tflops, 1),
        ]),
    }
    format!("| {} |", cells.join(" | "))
}

/// `--json`'s object.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    device: &'a str,
    warmup: usize,
    reps: usize,
    timing: &'static str,
    flops: &'static str,
    rows: &'a [Row],
    lens: &'a [DocSet],
}

/// Run `packtrain attention-bench`.
pub fn run(args: &AttentionBenchArgs) -> anyhow::Result<()> {
    if args.reps == 0 {
        bail!("--reps must be >= 1");
    }
    if args.shapes.is_empty() {
        bail!("--shapes: at least one HxHkvxD");
    }
    let sets = doc_sets(args)?;
    let be = CudaBackend::new(args.gpu).map_err(|e| {
        anyhow!(
            "packtrain attention-bench needs a CUDA GPU (GPU {}): {e}",
            args.gpu
        )
    })?;
    let device = format!("{} ({})", be.device_name, be.arch);
    let path = std::env::var("PACKTRAIN_ATTENTION").unwrap_or_else(|_| "auto".into());
    let dtype = if args.f32 {
        "f32".to_string()
    } else {
        format!("{:?}", be.act_dtype).to_lowercase()
    };
    println!(
        "packtrain attention-bench: {device}; median of {} host-timed calls (each with a \
         synchronize) after {} warm-up; causal TFLOP/s (2 L^2 D H per document forward, 2.5x \
         backward, 3.5x fwd+bwd)",
        args.reps, args.warmup
    );
    for set in &sets {
        println!(
            "T = {} ({}): {} documents, longest {}",
            set.lens.iter().sum::<usize>(),
            set.source,
            set.lens.len(),
            set.lens.iter().max().copied().unwrap_or(0)
        );
    }
    println!("\n{HEADER}");
    let mut rows = Vec::new();
    for set in &sets {
        for &shape in &args.shapes {
            let row = Row::new(set, shape, &path, &dtype);
            let row = match time_attention(&be, &set.lens, shape, args.f32, args.warmup, args.reps)
            {
                Ok(t) => row.timed(t),
                Err(e) => Row {
                    error: Some(format!("{:#}", anyhow::Error::from(e))),
                    ..row
                },
            };
            println!("{}", render_row(&row));
            rows.push(row);
        }
    }
    if let Some(file) = &args.json {
        let report = JsonReport {
            device: &device,
            warmup: args.warmup,
            reps: args.reps,
            timing: "host clock around each call and a synchronize; median",
            flops: "forward 2*L^2*D*H summed over documents, backward 2.5x, fwd+bwd 3.5x",
            rows: &rows,
            lens: &sets,
        };
        std::fs::write(file, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", file.display()))?;
        println!("wrote {}", file.display());
    }
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let e = r.error.as_ref()?;
            Some(format!(
                "T={} H={} Hkv={} D={}: {e}",
                r.tokens, r.h, r.hkv, r.d
            ))
        })
        .collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AttentionBenchArgs,
    }

    fn parse(argv: &[&str]) -> Result<AttentionBenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_and_their_defaults() {
        let a = parse(&[]).unwrap();
        let d = AttentionBenchArgs::default();
        assert_eq!(
            (&a.tokens, &a.shapes, a.f32, a.warmup, a.reps),
            (&d.tokens, &d.shapes, d.f32, d.warmup, d.reps)
        );
        let a = parse(&[
            "--lens",
            "a.txt,b.txt",
            "--lens",
            "c.txt",
            "--shapes",
            "8x2x64",
        ])
        .unwrap();
        assert_eq!(a.lens.len(), 3);
        assert_eq!(
            a.shapes,
            vec![Shape {
                h: 8,
                hkv: 2,
                d: 64
            }]
        );
        assert!(parse(&["--lens", "a.txt", "--tokens", "100"]).is_err());
        for bad in ["16x4", "16x3x128", "0x1x64", "ax4x128", "16x4x128x2"] {
            let e = bad.parse::<Shape>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn generated_lengths_follow_the_script() {
        for t in [1, 7, 16384, 65536] {
            let lens = lengths(t, 0);
            assert_eq!(lens.iter().sum::<usize>(), t);
            assert!(lens.iter().all(|&l| (1..=4096).contains(&l)));
            assert_eq!(lens, lengths(t, 0));
        }
        // Median 400: over many documents the sample median is close.
        let mut lens = lengths(4_000_000, 0);
        lens.pop();
        lens.sort();
        let m = lens[lens.len() / 2];
        assert!((370..=430).contains(&m), "{m}");
    }

    #[test]
    fn lens_files_are_read_or_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("l.16384.txt");
        std::fs::write(&good, "3 400 1\n12\n").unwrap();
        assert_eq!(read_lens(&good).unwrap(), vec![3, 400, 1, 12]);
        let args = AttentionBenchArgs {
            lens: vec![good.clone()],
            ..Default::default()
        };
        let sets = doc_sets(&args).unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].source, good.display().to_string());
        for (text, want) in [
            ("3 0 1", "length 2"),
            ("3 x", "\"x\""),
            ("  \n", "no lengths"),
        ] {
            let p = dir.path().join("bad.txt");
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", read_lens(&p).unwrap_err());
            assert!(e.contains("bad.txt") && e.contains(want), "{e}");
        }
        let e = format!("{:#}", read_lens(&dir.path().join("missing")).unwrap_err());
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn flops_and_table() {
        let shape = Shape { h: 2, hkv: 1, d: 8 };
        assert_eq!(forward_flops(&[10, 20], shape), 2.0 * 500.0 * 16.0);
        let set = DocSet {
            source: "generated".into(),
            lens: vec![10, 20],
        };
        let r = Row::new(&set, shape, "auto", "bf16").timed(Timing {
            fwd_ms: 1.0,
            bwd_ms: 2.0,
        });
        assert_eq!(r.fwd_tflops, Some(16000.0 / 1e9));
        assert_eq!(r.bwd_tflops, Some(2.5 * 16000.0 / 2.0 / 1e9));
        assert_eq!(r.fwd_bwd_tflops, Some(3.5 * 16000.0 / 3.0 / 1e9));
        let cols = HEADER.lines().next().unwrap().matches(" | ").count();
        assert_eq!(render_row(&r).matches(" | ").count(), cols);
        let failed = Row {
            error: Some("out of memory | oops".into()),
            ..r
        };
        let line = render_row(&failed);
        assert_eq!(line.matches(" | ").count(), cols, "{line}");
        assert!(line.contains("failed: out of memory / oops"));
    }

    #[test]
    fn times_the_cpu_backend() {
        let cpu = CpuBackend::new();
        let t =
            time_attention(&cpu, &[1, 30, 7], Shape { h: 4, hkv: 2, d: 8 }, false, 1, 3).unwrap();
        assert!(t.fwd_ms > 0.0 && t.bwd_ms > 0.0, "{t:?}");
    }

    /// Without CUDA the command fails with an error naming CUDA, not a panic. (Skipped,
    /// loudly, where the CUDA libraries load.)
    #[test]
    fn without_cuda_is_a_clear_error() {
        if crate::backend::cuda::probe_libraries().is_ok() {
            eprintln!("SKIPPED without_cuda_is_a_clear_error: CUDA libraries are present here");
            return;
        }
        let e = format!("{:#}", run(&AttentionBenchArgs::default()).unwrap_err());
        assert!(e.contains("CUDA"), "{e}");
        // Bad arguments are reported before the GPU is looked for.
        let args = AttentionBenchArgs {
            reps: 0,
            ..Default::default()
        };
        assert!(run(&args).unwrap_err().to_string().contains("--reps"));
    }
}
