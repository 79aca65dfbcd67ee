//! `packtrain eval`: the loss of every document of a JSONL file under a Hugging Face model.
//!
//! The model directory is loaded (`model::hf`), the data tokenised with its tokenizer and
//! special tokens (`data::build`, no cache), the documents packed in file order into batches of
//! at most `--tokens-per-batch` tokens (`PackedBatch`), run forward on the CPU backend, and the
//! per-token losses split back into documents by `cu_seqlens`. Packing does not change a
//! document's loss (DESIGN invariant 1), so each line equals the loss of the document run alone.
//!
//! Output, one JSON line per document kept (empty ones are skipped, and counted in the log):
//! `{"doc": i, "tokens": n, "targets": k, "loss_sum": x, "loss_mean": x / k}` (`loss_mean` is
//! null when k = 0). `--save DIR` also writes the loaded model back as a transformers directory.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::config::{Config, DataFormat, LongDocuments};
use crate::data::TokenStore;
use crate::model::hf::{self, LoadOptions, SaveDtype};
use crate::model::{DeviceBatch, Llama};
use crate::packing::{PackedBatch, IGNORE_INDEX};

/// Formats `eval` reads (as `data.format`, plus `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalFormat {
    /// From the first record's keys: `messages`, `input_ids`, `prompt`, `text`.
    Auto,
    Text,
    PromptCompletion,
    Tokens,
    Chat,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// A Hugging Face model directory: config.json, model.safetensors (or index and shards),
    /// tokenizer.json for text formats.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// JSONL file(s) to evaluate, documents numbered across them in order.
    #[arg(long, value_name = "FILE", required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Record format.
    #[arg(long, value_enum, default_value_t = EvalFormat::Auto)]
    pub format: EvalFormat,
    /// Chat template for `chat` records (see README), or `@FILE` to read it from a file.
    #[arg(long, value_name = "TEMPLATE")]
    pub chat_template: Option<String>,
    /// Tokens per packed batch (raised to the longest document if that is longer).
    #[arg(long, default_value_t = 4096)]
    pub tokens_per_batch: usize,
    /// Truncate documents longer than this [default: the model's max_position_embeddings].
    #[arg(long, value_name = "TOKENS")]
    pub max_doc_tokens: Option<usize>,
    /// Write the per-document JSONL here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also save the loaded model as a transformers directory here (replacing a model there).
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,
    /// Dtype of --save [default: the checkpoint's]: f32, bf16, f16.
    #[arg(long, value_name = "DTYPE")]
    pub save_dtype: Option<SaveDtype>,
    /// Largest shard of --save, as transformers' `max_shard_size`: bytes, or a number with
    /// KB, MB, GB (powers of 1000) or KiB, MiB, GiB.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub save_max_shard_size: u64,
    /// Backend: `cpu` (f32 reference) or `cuda` (GPU `--gpu`).
    #[arg(long, value_enum, default_value_t = EvalDevice::Cpu)]
    pub device: EvalDevice,
    /// GPU ordinal for `--device cuda`.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

/// Where `eval` runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalDevice {
    Cpu,
    Cuda,
}

/// `"5GB"`, `"100KB"`, `"2MiB"`, `"123"` as bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "unknown unit in {s:?}; use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 5GB or 100KB"))?;
    let bytes = x * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{s:?}: the size must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// The loss of one document.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DocLoss {
    /// Index in the store (file order, empty documents skipped).
    pub doc: usize,
    /// Tokens n.
    pub tokens: usize,
    /// Positions with a target k.
    pub targets: usize,
    /// Sum of the k token losses (nats).
    pub loss_sum: f64,
    /// `loss_sum / k`, `None` when k = 0.
    pub loss_mean: Option<f64>,
}

/// Consecutive runs of documents (in store order) of at most `budget` tokens each; a document
/// longer than the budget gets a bin of its own.
pub fn sequential_bins(lengths: &[u32], budget: usize) -> Vec<Vec<u32>> {
    let mut bins: Vec<Vec<u32>> = Vec::new();
    let mut fill = 0usize;
    for (i, &len) in lengths.iter().enumerate() {
        let len = len as usize;
        match bins.last_mut() {
            Some(bin) if fill + len <= budget => {
                bin.push(i as u32);
                fill += len;
            }
            _ => {
                bins.push(vec![i as u32]);
                fill = len;
            }
        }
    }
    bins
}

/// Per-document losses of every document of `store`, packed `budget` tokens at a time.
/// `model` must have capacity for the largest bin.
pub fn document_losses<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    store: &TokenStore,
    budget: usize,
) -> anyhow::Result<Vec<DocLoss>> {
    let bins = sequential_bins(&store.lengths(), budget);
    let capacity = model.capacity();
    let mut batch = DeviceBatch::new(be, capacity)?;
    let mut out = Vec::with_capacity(store.num_docs());
    for bin in bins {
        let packed = PackedBatch::assemble(&bin, store)?;
        let t = packed.num_tokens();
        if t > capacity {
            bail!("a batch of {t} tokens exceeds the model's capacity {capacity}");
        }
        batch.upload(be, &packed)?;
        model.forward(be, &batch)?;
        let losses = model.token_losses(be, t)?;
        for (k, &doc) in packed.doc_ids.iter().enumerate() {
            let (s, e) = (
                packed.cu_seqlens[k] as usize,
                packed.cu_seqlens[k + 1] as usize,
            );
            let targets = packed.targets[s..e]
                .iter()
                .filter(|&&x| x != IGNORE_INDEX)
                .count();
            let loss_sum: f64 = losses[s..e].iter().map(|&x| x as f64).sum();
            out.push(DocLoss {
                doc: doc as usize,
                tokens: e - s,
                targets,
                loss_sum,
                loss_mean: (targets > 0).then(|| loss_sum / targets as f64),
            });
        }
    }
    Ok(out)
}

/// The format of the first record of `path`, from its keys.
fn detect_format(path: &Path) -> anyhow::Result<DataFormat> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))?;
        let has = |k: &str| v.get(k).is_some();
        return Ok(if has("messages") {
            DataFormat::Chat
        } else if has("input_ids") {
            DataFormat::Tokens
        } else if has("prompt") && has("completion") {
            DataFormat::PromptCompletion
        } else if has("text") {
            DataFormat::Text
        } else {
            bail!(
                "{}:{}: cannot tell the format (no `messages`, `input_ids`, `prompt`/`completion` \
                 or `text` field); pass --format",
                path.display(),
                i + 1
            )
        });
    }
    bail!("{}: no records", path.display())
}

/// Run `packtrain eval`.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let dir = &args.model;
    // The config first (for the vocabulary); the window check waits for the real lengths.
    let any_length = LoadOptions {
        max_seq_len: Some(0),
    };
    let hf_config = hf::read_config(dir, &any_length)?;

    let format = match args.format {
        EvalFormat::Auto => detect_format(&args.data[0])?,
        EvalFormat::Text => DataFormat::Text,
        EvalFormat::PromptCompletion => DataFormat::PromptCompletion,
        EvalFormat::Tokens => DataFormat::Tokens,
        EvalFormat::Chat => DataFormat::Chat,
    };
    let mut config = Config {
        model: hf_config.model.clone(),
        ..Config::default()
    };
    let d = &mut config.data;
    d.format = format;
    d.paths = args.data.clone();
    d.max_doc_tokens = args
        .max_doc_tokens
        .unwrap_or(hf_config.max_position_embeddings)
        .max(2);
    d.long_documents = LongDocuments::Truncate;
    if format != DataFormat::Tokens {
        let tok = dir.join("tokenizer.json");
        if !tok.is_file() {
            bail!(
                "{}: no tokenizer.json, needed for --format {format:?} (token-id data needs none)",
                dir.display()
            );
        }
        d.tokenizer = Some(tok);
        let specials = hf::read_specials(dir)?;
        d.bos_token_id = specials.bos_to_add();
        d.eos_token_id = specials.eos_to_add();
    }
    if format == DataFormat::Chat {
        let t = args
            .chat_template
            .as_deref()
            .context("--format chat needs --chat-template")?;
        d.chat_template = Some(match t.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("reading the chat template {file}"))?,
            None => t.to_string(),
        });
    }
    config.packing.tokens_per_micro_batch = args.tokens_per_batch.max(d.max_doc_tokens);
    config.validate()?;
    let store = crate::data::build(&config)?;
    let r = store.report();
    if r.empty_skipped > 0 || r.truncated > 0 {
        tracing::warn!(
            empty_skipped = r.empty_skipped,
            truncated = r.truncated,
            max_doc_tokens = config.data.max_doc_tokens,
            "some records are not evaluated as read (doc numbers skip empty records)"
        );
    }

    let longest = store.lengths().iter().copied().max().unwrap_or(0) as usize;
    let model_files = hf::load_dir(
        dir,
        &LoadOptions {
            max_seq_len: Some(longest),
        },
    )?;
    let budget = args.tokens_per_batch.max(longest).max(1);
    let losses = match args.device {
        EvalDevice::Cpu => {
            let be = CpuBackend::new();
            let mut model = Llama::new(
                &be,
                model_files.config(),
                &model_files.weights,
                budget,
                false,
            )?;
            document_losses(&be, &mut model, &store, budget)?
        }
        EvalDevice::Cuda => {
            let be = crate::backend::cuda::CudaBackend::new(args.gpu)?;
            let mut model = Llama::new(
                &be,
                model_files.config(),
                &model_files.weights,
                budget,
                false,
            )?;
            document_losses(&be, &mut model, &store, budget)?
        }
    };

    let mut sink: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for l in &losses {
        writeln!(sink, "{}", serde_json::to_string(l)?)?;
    }
    sink.flush()?;
    let (sum, targets): (f64, usize) = losses
        .iter()
        .fold((0.0, 0), |(s, k), l| (s + l.loss_sum, k + l.targets));
    let mean = sum / targets.max(1) as f64;
    tracing::info!(
        docs = losses.len(),
        tokens = r.tokens,
        targets,
        loss = format!("{mean:.6}"),
        ppl = format!("{:.4}", mean.exp()),
        "eval done"
    );

    if let Some(out) = &args.save {
        let mut opts = model_files.save_options();
        if let Some(dt) = args.save_dtype {
            opts.dtype = dt;
        }
        opts.max_shard_bytes = args.save_max_shard_size;
        hf::save_dir(out, model_files.config(), &model_files.weights, &opts)?;
        tracing::info!(dir = %out.display(), dtype = opts.dtype.torch_name(), "model saved");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_keep_order_and_budget() {
        assert_eq!(
            sequential_bins(&[3, 4, 2, 9, 1, 1], 8),
            vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]
        );
        assert!(sequential_bins(&[], 8).is_empty());
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("100KB"), Ok(100_000));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("0.5 MB"), Ok(500_000));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("GB").is_err() && parse_size("0").is_err());
    }

    #[test]
    fn format_is_detected_from_keys() {
        let dir = tempfile::tempdir().unwrap();
        for (line, want) in [
            (r#"{"messages": []}"#, DataFormat::Chat),
            (r#"{"input_ids": [1]}"#, DataFormat::Tokens),
            (
                r#"{"prompt": "a", "completion": "b"}"#,
                DataFormat::PromptCompletion,
            ),
            (r#"{"text": "a"}"#, DataFormat::Text),
        ] {
            let p = dir.path().join("d.jsonl");
            std::fs::write(&p, format!("\n{line}\n")).unwrap();
            assert_eq!(detect_format(&p).unwrap(), want, "{line}");
        }
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"body\": 1}\n").unwrap();
        let e = detect_format(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("--format"), "{e}");
    }
}
