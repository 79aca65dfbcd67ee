//! `packtrain plan`: the packing report.
//!
//! Plans one epoch of a corpus (a config's data, a file of lengths, or N synthetic log-normal
//! lengths) and prints documents, tokens, bins, steps, efficiency, per-rank imbalance,
//! leftovers and the planning time (planning only: reading the lengths is not timed).
//! `--json` prints one JSON object instead; `--plot FILE.png` draws the bin fill distribution
//! and the per-rank load of every step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use plotters::prelude::*;

use crate::config::{Config, Leftovers, SyntheticConfig};
use crate::packing::{PackingError, Plan, PlanParams, PlanStats};

/// Where the document lengths come from: exactly one of these.
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct PlanSource {
    /// A run config: its data (through the token cache), `[packing]` section and seed.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A text file of document lengths, one integer per line (blank lines are skipped).
    #[arg(long, value_name = "FILE")]
    pub lengths: Option<PathBuf>,
    /// N log-normal lengths (median 400, sigma 0.9, clipped to [16, 4096]) drawn from the seed.
    #[arg(long, value_name = "N")]
    pub synthetic: Option<usize>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    #[command(flatten)]
    pub source: PlanSource,
    /// Per-rank token budget B of one micro-batch [default: 16384, or the config's].
    #[arg(long, value_name = "TOKENS")]
    pub tokens_per_micro_batch: Option<usize>,
    /// Ranks W.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Micro-steps G per optimizer step [default: 1, or the config's].
    #[arg(long)]
    pub micro_steps: Option<usize>,
    /// Seed of the shuffles (and of --synthetic lengths) [default: 0, or the config's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Epoch to plan; with carried leftovers the epochs before it are planned first (untimed).
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Documents that cannot fill a last whole step [default: carry, or the config's].
    #[arg(long, value_parser = ["carry", "drop"])]
    pub leftovers: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw the bin fill histogram and the per-rank load of each step into this PNG.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
}

/// Run `packtrain plan`.
pub fn run(args: &PlanArgs) -> anyhow::Result<()> {
    // Lengths and params (not timed).
    let read_start = Instant::now();
    let (lengths, mut params, source, lines) = read_source(args)?;
    let read_seconds = read_start.elapsed().as_secs_f64();
    if let Some(b) = args.tokens_per_micro_batch {
        params.tokens_per_micro_batch = b;
    }
    if let Some(g) = args.micro_steps {
        params.micro_steps = g;
    }
    if let Some(s) = args.seed {
        params.seed = s;
    }
    if let Some(l) = &args.leftovers {
        params.leftovers = if l == "drop" {
            Leftovers::Drop
        } else {
            Leftovers::Carry
        };
    }
    params.world_size = args.world_size;
    let with_line = |e: PackingError| -> anyhow::Error {
        match (&e, &lines) {
            (PackingError::DocTooLong { doc, .. }, Some((path, lines))) => anyhow::Error::new(
                e.clone(),
            )
            .context(format!("{}:{}", path.display(), lines[*doc as usize])),
            _ => e.into(),
        }
    };

    // Carried documents of the epochs before (not timed), then the plan itself (timed).
    let mut carried = Vec::new();
    if params.leftovers == Leftovers::Carry {
        for e in 0..args.epoch {
            carried = Plan::new(&lengths, &params, e, &carried)
                .map_err(with_line)?
                .leftover()
                .to_vec();
        }
    }
    let t = Instant::now();
    let plan = Plan::new(&lengths, &params, args.epoch, &carried).map_err(with_line)?;
    let plan_seconds = t.elapsed().as_secs_f64();
    let stats = plan.stats(&lengths);

    if args.json {
        let mut obj = serde_json::to_value(&stats)?;
        if let Some(m) = obj.as_object_mut() {
            m.insert("source".into(), source.clone().into());
            m.insert(
                "tokens_per_micro_batch".into(),
                params.tokens_per_micro_batch.into(),
            );
            m.insert("world_size".into(), params.world_size.into());
            m.insert("micro_steps".into(), params.micro_steps.into());
            m.insert("seed".into(), params.seed.into());
            m.insert("leftovers".into(), leftovers_name(params.leftovers).into());
            m.insert("plan_seconds".into(), plan_seconds.into());
            m.insert("read_seconds".into(), read_seconds.into());
        }
        println!("{obj}");
    } else {
        print!(
            "{}",
            report(&stats, &params, &source, plan_seconds, read_seconds)
        );
    }
    if let Some(path) = &args.plot {
        plot(path, &plan, &lengths, &stats)
            .with_context(|| format!("drawing {}", path.display()))?;
        if !args.json {
            println!("plot        {}", path.display());
        }
    }
    Ok(())
}

/// Line numbers of a lengths file, to name the line of a bad document.
type Lines = Option<(PathBuf, Vec<usize>)>;

fn read_source(args: &PlanArgs) -> anyhow::Result<(Vec<u32>, PlanParams, String, Lines)> {
    let defaults = PlanParams {
        tokens_per_micro_batch: 16384,
        micro_steps: 1,
        world_size: 1,
        seed: 0,
        leftovers: Leftovers::Carry,
    };
    let s = &args.source;
    if let Some(path) = &s.config {
        let config = Config::load(path)?;
        let store = crate::data::load(&config)
            .with_context(|| format!("loading the data of {}", path.display()))?;
        let params = PlanParams::from_config(&config, args.world_size);
        return Ok((
            store.lengths(),
            params,
            format!("config {}", path.display()),
            None,
        ));
    }
    if let Some(path) = &s.lengths {
        let (lengths, lines) = read_lengths(path)?;
        return Ok((
            lengths,
            defaults,
            format!("lengths {}", path.display()),
            Some((path.clone(), lines)),
        ));
    }
    if let Some(n) = s.synthetic {
        let seed = args.seed.unwrap_or(defaults.seed);
        let lengths = crate::data::synthetic_lengths(&SyntheticConfig::default(), n, seed);
        return Ok((
            lengths,
            defaults,
            format!("synthetic log-normal (median 400, sigma 0.9, [16, 4096]), seed {seed}"),
            None,
        ));
    }
    bail!("give one of --config, --lengths or --synthetic")
}

/// One positive integer per line; blank lines skipped. Errors name the file and line.
pub fn read_lengths(path: &Path) -> anyhow::Result<(Vec<u32>, Vec<usize>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_lengths(&text).map_err(|(line, msg)| anyhow::anyhow!("{}:{line}: {msg}", path.display()))
}

/// Lengths and their 1-based line numbers, or (line, message).
fn parse_lengths(text: &str) -> Result<(Vec<u32>, Vec<usize>), (usize, String)> {
    let mut lengths = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let word = line.trim();
        if word.is_empty() {
            continue;
        }
        let len: u32 = word.parse().map_err(|_| {
            (
                i + 1,
                format!(
                    "{word:?} is not a document length (an integer in [1, {}])",
                    u32::MAX
                ),
            )
        })?;
        if len == 0 {
            return Err((i + 1, "a document length must be >= 1".into()));
        }
        lengths.push(len);
        lines.push(i + 1);
    }
    Ok((lengths, lines))
}

fn leftovers_name(l: Leftovers) -> &'static str {
    match l {
        Leftovers::Carry => "carry",
        Leftovers::Drop => "drop",
    }
}

fn report(
    s: &PlanStats,
    p: &PlanParams,
    source: &str,
    plan_seconds: f64,
    read_seconds: f64,
) -> String {
    let fate = match p.leftovers {
        Leftovers::Carry => format!("carried into epoch {}", s.epoch + 1),
        Leftovers::Drop => "dropped".to_string(),
    };
    format!(
        "packtrain plan: {source}\n\
         budget      B = {} tokens per rank per micro-step, W = {} ranks, G = {} micro-steps, seed {}, epoch {}\n\
         documents   {} ({} carried in)\n\
         tokens      {}\n\
         bins        {}\n\
         steps       {}\n\
         efficiency  {:.3} %  (real tokens / (bins x B))\n\
         imbalance   tokens     mean {:.4}  max {:.4}  (max/mean over the W ranks of a micro-step)\n\
         \x20           attention  mean {:.4}  max {:.4}  (attention cost = sum of L^2 per bin)\n\
         leftover    {} documents, {} tokens, {fate}\n\
         plan time   {:.3} s  (reading the lengths: {:.3} s, not included)\n",
        p.tokens_per_micro_batch,
        p.world_size,
        p.micro_steps,
        p.seed,
        s.epoch,
        s.documents,
        s.carried_in_docs,
        s.tokens,
        s.bins,
        s.steps,
        100.0 * s.efficiency,
        s.imbalance_tokens.mean,
        s.imbalance_tokens.max,
        s.imbalance_attention.mean,
        s.imbalance_attention.max,
        s.leftover_docs,
        s.leftover_tokens,
        plan_seconds,
        read_seconds,
    )
}

// ---------------------------------------------------------------------------------------------
// The plot: bin fill histogram, per-rank tokens and attention cost of each step.

/// Buckets of the fill histogram.
const FILL_BUCKETS: usize = 40;

fn plot(path: &Path, plan: &Plan, lengths: &[u32], s: &PlanStats) -> anyhow::Result<()> {
    super::plot_font::register();
    let (w, g, steps) = (plan.world_size(), plan.micro_steps(), plan.num_steps());
    let budget = plan.tokens_per_micro_batch() as f64;
    let len = |d: &u32| lengths[*d as usize] as f64;

    // Fill fraction of every bin, and per step each rank's tokens and attention cost (summed
    // over its G micro-steps) divided by the step's mean over ranks.
    let mut rooms = Vec::with_capacity(s.bins);
    let mut rel_tokens = vec![Vec::with_capacity(steps); w];
    let mut rel_cost = vec![Vec::with_capacity(steps); w];
    for step in 0..steps {
        let mut tok = vec![0.0; w];
        let mut cost = vec![0.0; w];
        for r in 0..w {
            for m in 0..g {
                let bin = plan.bin(step, r, m);
                let t: f64 = bin.iter().map(len).sum();
                rooms.push(plan.tokens_per_micro_batch() as u64 - t as u64);
                tok[r] += t;
                cost[r] += bin.iter().map(|d| len(d) * len(d)).sum::<f64>();
            }
        }
        let (mt, mc) = (mean(&tok), mean(&cost));
        for r in 0..w {
            rel_tokens[r].push(if mt > 0.0 { tok[r] / mt } else { 1.0 });
            rel_cost[r].push(if mc > 0.0 { cost[r] / mc } else { 1.0 });
        }
    }

    let root = BitMapBackend::new(path, (1200, 1350)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));

    // 1. Fill histogram, log counts, x from just below the emptiest bin to 1. Buckets are
    // whole tokens of free room wide, so integer token counts do not alias into gaps.
    let max_room = rooms.iter().copied().max().unwrap_or(0);
    let per_bucket = (max_room + 1).div_ceil(FILL_BUCKETS as u64).max(1);
    let n_buckets = (max_room / per_bucket + 1) as usize;
    let mut counts = vec![0u64; n_buckets];
    for &r in &rooms {
        counts[(r / per_bucket) as usize] += 1;
    }
    let width = per_bucket as f64 / budget;
    let lo = (1.0 - n_buckets as f64 * width).max(0.0);
    let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(
            format!(
                "bin fill (tokens / B): {} bins, efficiency {:.3} %",
                s.bins,
                100.0 * s.efficiency
            ),
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..1.0, (0.5..top * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("fill fraction")
        .y_desc("bins")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .disable_x_mesh()
        .draw()?;
    chart.draw_series(
        counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(k, &c)| {
                // Bucket k: free room in [k, k + 1) x per_bucket tokens.
                let x1 = 1.0 - k as f64 * width;
                Rectangle::new(
                    [((x1 - width).max(lo), 0.5), (x1, c as f64)],
                    BLUE.mix(0.7).filled(),
                )
            }),
    )?;

    // 2–3. Per-rank load of each step relative to the step's mean.
    for (panel, rel, what, imb) in [
        (&panels[1], &rel_tokens, "tokens", s.imbalance_tokens),
        (
            &panels[2],
            &rel_cost,
            "attention cost (sum of L^2)",
            s.imbalance_attention,
        ),
    ] {
        let (ymin, ymax) = rel
            .iter()
            .flatten()
            .fold((1.0f64, 1.0f64), |(a, b), &v| (a.min(v), b.max(v)));
        let pad = ((ymax - ymin) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "per-rank {what} per step / step mean (W = {w}; micro-step max/mean: mean {:.4}, worst {:.4})",
                    imb.mean, imb.max
                ),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0..steps.max(1), (ymin - pad)..(ymax + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("load / mean")
            .draw()?;
        for (r, series) in rel.iter().enumerate() {
            let color = Palette99::pick(r).mix(0.8);
            chart.draw_series(LineSeries::new(
                series.iter().enumerate().map(|(i, &v)| (i, v)),
                color.stroke_width(1),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        plan: PlanArgs,
    }

    fn parse(args: &[&str]) -> Result<PlanArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("plan").chain(args.iter().copied())).map(|c| c.plan)
    }

    #[test]
    fn lengths_file_errors_name_the_line() {
        assert_eq!(
            parse_lengths("3\n\n 5 \n").unwrap(),
            (vec![3, 5], vec![1, 3])
        );
        assert_eq!(parse_lengths("3\nx\n").unwrap_err().0, 2);
        assert_eq!(parse_lengths("3\n-1\n").unwrap_err().0, 2);
        let (line, msg) = parse_lengths("1\n2\n0\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(msg.contains(">= 1"), "{msg}");
    }

    #[test]
    fn exactly_one_source() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--synthetic", "5", "--lengths", "x"]).is_err());
        let a = parse(&["--synthetic", "5", "--world-size", "8"]).unwrap();
        assert_eq!((a.source.synthetic, a.world_size, a.epoch), (Some(5), 8, 0));
        assert!(parse(&["--synthetic", "5", "--leftovers", "keep"]).is_err());
    }

    #[test]
    fn too_long_document_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lengths.txt");
        std::fs::write(&path, "10\n\n20\n99\n").unwrap();
        let p = path.to_str().unwrap();
        let e =
            run(&parse(&["--lengths", p, "--tokens-per-micro-batch", "50"]).unwrap()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("lengths.txt:4") && msg.contains("document 2"),
            "{msg}"
        );
    }

    #[test]
    fn synthetic_plan_with_json_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("plan.png");
        let args = parse(&[
            "--synthetic",
            "3000",
            "--world-size",
            "4",
            "--micro-steps",
            "2",
            "--json",
            "--plot",
            png.to_str().unwrap(),
        ])
        .unwrap();
        run(&args).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }

    /// `packtrain plan --synthetic 1000000 --tokens-per-micro-batch 16384 --world-size 8`
    /// through the library, for when the binary is not buildable; extra flags from
    /// `PLAN_ARGS` (e.g. `PLAN_ARGS="--json"`).
    #[test]
    #[ignore = "release-mode benchmark"]
    fn one_million_synthetic_documents() {
        let extra = std::env::var("PLAN_ARGS").unwrap_or_default();
        let mut args = vec![
            "--synthetic",
            "1000000",
            "--tokens-per-micro-batch",
            "16384",
            "--world-size",
            "8",
        ];
        args.extend(extra.split_whitespace());
        run(&parse(&args).unwrap()).unwrap();
    }
}
