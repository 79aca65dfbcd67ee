//! The `packtrain` command line. `main` calls `run`; an error is printed once with its cause
//! chain and the process exits non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use packtrain::cli::plan::PlanArgs;
use packtrain::config::{Config, DeviceKind};
use packtrain::dist;
use packtrain::train::{self, TrainOptions};

/// The default run's config, built into the binary so `packtrain train` works from anywhere.
const TINY_CPU: &str = include_str!("../configs/tiny-cpu.toml");

#[derive(Parser)]
#[command(
    name = "packtrain",
    version,
    about = "Packed, varlen-attention training for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (default: configs/tiny-cpu.toml on the synthetic corpus).
    Train(TrainArgs),
    /// Plan the packing of a corpus and report efficiency and balance.
    Plan(PlanArgs),
    /// Per-document loss of a Hugging Face model on a JSONL file.
    Eval(packtrain::cli::eval::EvalArgs),
    /// Check every op of a backend, and the whole model, against the CPU reference.
    Check(packtrain::cli::check::CheckArgs),
    /// Training-step throughput, MFU and peak memory of llama-160m and tinyllama-1.1b on a GPU.
    Bench(packtrain::cli::bench::BenchArgs),
    /// Time our varlen attention, forward and backward, on packed log-normal documents (GPU).
    AttentionBench(packtrain::cli::bench::attention::AttentionBenchArgs),
    /// Run a backend's attention on random packed inputs and write inputs and outputs for
    /// bench/attention_parity.py.
    AttentionDump(packtrain::cli::attention_dump::AttentionDumpArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Config file (TOML); the built-in tiny-cpu config when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory (default runs/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from a run directory (its latest checkpoint) or a checkpoint directory.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop with a checkpoint after this many steps (the schedule still spans the whole run).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Override the config's device.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(packtrain::cli::progress::SuspendingStderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => train_cmd(args),
        Command::Plan(args) => packtrain::cli::plan::run(&args),
        Command::Eval(args) => packtrain::cli::eval::run(&args),
        Command::Check(args) => packtrain::cli::check::run(&args),
        Command::Bench(args) => packtrain::cli::bench::run(&args),
        Command::AttentionBench(args) => packtrain::cli::bench::attention::run(&args),
        Command::AttentionDump(args) => packtrain::cli::attention_dump::run(&args),
    }
}

fn train_cmd(args: TrainArgs) -> anyhow::Result<()> {
    let mut config = match (&args.config, &args.resume) {
        (Some(path), _) => Config::load(path)?,
        // A resumed run reads the config it was started with.
        (None, Some(dir)) if dir.join("config.toml").is_file() => {
            Config::load(&dir.join("config.toml"))?
        }
        _ => Config::parse(TINY_CPU).context("the built-in tiny-cpu config")?,
    };
    if let Some(d) = args.device {
        config.device = match d {
            DeviceArg::Auto => DeviceKind::Auto,
            DeviceArg::Cpu => DeviceKind::Cpu,
            DeviceArg::Cuda => DeviceKind::Cuda,
        };
    }
    let run_dir = args
        .out
        .clone()
        .or_else(|| {
            args.resume
                .clone()
                .filter(|d| d.join("config.toml").is_file())
        })
        .unwrap_or_else(|| PathBuf::from("runs").join(&config.name));
    let opts = TrainOptions {
        config,
        run_dir,
        resume: args.resume,
        stop_after: args.stop_after,
        progress: !args.quiet,
    };
    // Rank, world and the communicator from MPI or the launcher's environment (src/dist).
    let comm = dist::bootstrap(&opts.config.dist)?;
    let summary = dist::tag_rank(comm.as_ref(), train::train(&opts, comm.as_ref()))?;
    if comm.is_root() {
        println!("\npacktrain: run summary\n{}", summary.table());
    }
    Ok(())
}
