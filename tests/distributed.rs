//! Several CPU ranks as several processes (the `packtrain` binary, started by hand with
//! `RANK`/`WORLD_SIZE`/`MASTER_PORT`, by `launch/local.sh`, or by `launch/mpirun.sh` with the
//! `mpi` feature) against one process on the same documents; faults: a killed or a stalled
//! rank, Ctrl-C.
//!
//! The reference is not a 1-rank run with `micro_steps = 2`: the planner cuts each step into
//! micro-steps of W bins (bins of similar attention cost side by side, shuffled as groups,
//! re-dealt inside a group when the ranks' tokens are uneven, balanced in batches of 64·W bins),
//! so W = 1, G = 2 and W = 2, G = 1 put different documents in the same step
//! (`the_planner_gives_other_steps_to_one_rank_with_two_micro_steps` shows it). The reference
//! is one process replaying the W = 2 plan instead: each step's two bins as two micro-steps of
//! one model (gradients accumulated, one AdamW step), which is what one rank computes for the
//! same global batch.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use packtrain::backend::cpu::CpuBackend;
use packtrain::backend::Backend;
use packtrain::config::Config;
use packtrain::model::{DeviceBatch, Llama, ParamLayout};
use packtrain::packing::{self, PackedBatch, Plan, PlanParams};
use packtrain::train::optimizer::AdamW;
use packtrain::train::{self, checkpoint, schedule};

const BIN: &str = env!("CARGO_BIN_EXE_packtrain");
const LOCAL_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/launch/local.sh");

/// Launcher variables of the environment the tests run in, which would confuse the ranks.
const LAUNCHER_VARS: [&str; 14] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "RUST_LOG",
];

fn clean(cmd: &mut Command) -> &mut Command {
    for k in LAUNCHER_VARS {
        cmd.env_remove(k);
    }
    cmd.env("NO_COLOR", "1")
}

/// What one process computes for the global batch of the `world`-rank plan (module docs).
struct Reference {
    losses: Vec<f64>,
    weights: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn reference(c: &Config, world: usize) -> Reference {
    let store = packtrain::data::load(c).unwrap();
    let lengths = store.lengths();
    let targets = train::doc_target_counts(&store);
    let params = PlanParams::from_config(c, world);
    let plans = packing::plan_epochs(&lengths, &params, c.train.epochs).unwrap();
    let steps: Vec<(&Plan, usize)> = plans
        .iter()
        .flat_map(|p| (0..p.num_steps()).map(move |s| (p, s)))
        .collect();
    let total = match c.train.max_steps {
        0 => steps.len(),
        n => steps.len().min(n),
    };
    let be = CpuBackend::new();
    let layout = ParamLayout::new(&c.model);
    let budget = c.packing.tokens_per_micro_batch;
    let weights = layout.init(&c.model, c.seed);
    let mut model = Llama::new(&be, &c.model, &weights, budget, c.train.recompute).unwrap();
    let mut opt = AdamW::new(&be, &layout).unwrap();
    let mut batch = DeviceBatch::new(&be, budget).unwrap();
    let mut losses = Vec::new();
    for (step, &(plan, s)) in steps.iter().take(total).enumerate() {
        let bins: Vec<&[u32]> = (0..world)
            .flat_map(|r| (0..c.packing.micro_steps).map(move |g| plan.bin(s, r, g)))
            .collect();
        let step_targets: u64 = bins
            .iter()
            .flat_map(|b| b.iter())
            .map(|&d| targets[d as usize] as u64)
            .sum();
        model.zero_grads(&be).unwrap();
        let mut loss_sum = 0.0;
        for docs in bins {
            batch
                .upload(&be, &PackedBatch::assemble(docs, &store).unwrap())
                .unwrap();
            loss_sum += model
                .forward_backward(&be, &batch, 1.0 / step_targets as f32)
                .unwrap();
        }
        let norms: Vec<(&Vec<f32>, usize)> = model
            .grads
            .iter()
            .zip(&layout.specs)
            .map(|(g, s)| (g, s.numel()))
            .collect();
        let norm = be.sum_squares(&norms).unwrap().sqrt();
        let clip = c.train.grad_clip;
        let scale = if clip > 0.0 && norm > clip {
            clip / norm
        } else {
            1.0
        };
        let lr = schedule::learning_rate(&c.train, step, total);
        let (params, working, grads) = model.update_view();
        opt.update(
            &be,
            &layout,
            params,
            working,
            grads,
            &c.train,
            lr,
            scale as f32,
        )
        .unwrap();
        losses.push(loss_sum / step_targets as f64);
    }
    let (m, v) = opt.to_host(&be, &layout).unwrap();
    Reference {
        losses,
        weights: model.weights_to_host(&be).unwrap(),
        m,
        v,
    }
}

/// The small config for 2 ranks × 1 micro-step (2 bins per step).
fn two_rank_config(dir: &Path) -> Config {
    let mut c = small_run_config(&dir.join("cache"));
    c.packing.micro_steps = 1;
    c.dist.timeout_s = 30;
    c
}

fn write_config(dir: &Path, c: &Config) -> PathBuf {
    let path = dir.join(format!("{}.toml", c.name));
    std::fs::write(&path, c.to_toml()).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `world` ranks of `packtrain train` by hand; each one's stderr goes to `out/rank-R.log`.
fn spawn_ranks(config: &Path, out: &Path, world: usize, args: &[&str]) -> Vec<Child> {
    std::fs::create_dir_all(out).unwrap();
    let port = free_port().to_string();
    (0..world)
        .map(|r| {
            let log = std::fs::File::create(out.join(format!("rank-{r}.log"))).unwrap();
            clean(&mut Command::new(BIN))
                .args(["train", "--quiet", "--config"])
                .arg(config)
                .arg("--out")
                .arg(out)
                .args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap()
        })
        .collect()
}

fn wait_ok(children: Vec<Child>, out: &Path) {
    for (r, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        let log = std::fs::read_to_string(out.join(format!("rank-{r}.log"))).unwrap_or_default();
        assert!(status.success(), "rank {r}: {status}\n{log}");
    }
}

fn metrics_losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

/// Every step's per-rank forward + backward times were gathered: the slowest rank's is at
/// least the mean, and both are positive (a rank's zero slot would pull the mean down).
fn assert_rank_times(run_dir: &Path) {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let (max, mean) = (
            v["compute_ms_max"].as_f64().unwrap(),
            v["compute_ms_mean"].as_f64().unwrap(),
        );
        assert!(mean > 0.0 && max >= mean, "{l}");
    }
}

fn assert_matches(run_dir: &Path, c: &Config, want: &Reference, moments: bool) {
    assert_rank_times(run_dir);
    let got = metrics_losses(run_dir);
    assert_eq!(got.len(), want.losses.len(), "steps");
    for (i, (a, b)) in got.iter().zip(&want.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "step {}: loss {a} with several ranks, {b} in one process",
            i + 1
        );
    }
    let layout = ParamLayout::new(&c.model);
    let ck = checkpoint::load(run_dir, c, &layout).unwrap();
    for (i, s) in layout.specs.iter().enumerate() {
        let e = rel_err(&ck.weights[i], &want.weights[i]);
        assert!(e <= 1e-5, "{}: weights differ by {e:e}", s.name);
        if moments {
            let (em, ev) = (rel_err(&ck.m[i], &want.m[i]), rel_err(&ck.v[i], &want.v[i]));
            assert!(
                em <= 1e-5 && ev <= 1e-5,
                "{}: moments differ by {em:e}, {ev:e}",
                s.name
            );
        }
    }
}

#[test]
fn the_planner_gives_other_steps_to_one_rank_with_two_micro_steps() {
    let dir = tempfile::tempdir().unwrap();
    let c = two_rank_config(dir.path());
    let lengths = packtrain::data::load(&c).unwrap().lengths();
    let step_docs = |world: usize, micro: usize| -> Vec<Vec<u32>> {
        let mut p = PlanParams::from_config(&c, world);
        p.micro_steps = micro;
        let plan = &packing::plan_epochs(&lengths, &p, 1).unwrap()[0];
        (0..plan.num_steps())
            .map(|s| {
                let mut d: Vec<u32> = (0..world)
                    .flat_map(|r| (0..micro).flat_map(move |g| plan.bin(s, r, g).to_vec()))
                    .collect();
                d.sort_unstable();
                d
            })
            .collect()
    };
    assert_ne!(step_docs(2, 1), step_docs(1, 2));
}

/// 2 ranks (launch/local.sh) train the loss curve and the weights of one process on the same
/// global batches.
#[test]
fn two_ranks_through_local_sh_match_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let c = two_rank_config(dir.path());
    let want = reference(&c, 2);
    assert!(want.losses.len() >= 6, "{} steps", want.losses.len());
    let cfg = write_config(dir.path(), &c);
    let run = dir.path().join("run");
    let out = clean(&mut Command::new("bash"))
        .arg(LOCAL_SH)
        .arg("2")
        .arg(&cfg)
        .args(["--quiet", "--out"])
        .arg(&run)
        .env("PACKTRAIN_BIN", BIN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    assert!(stderr.contains("TCP communicator"), "{stderr}");
    assert_matches(&run, &c, &want, false);
}

/// The 8-rank config: enough documents for several steps of 8 bins.
fn eight_rank_config(dir: &Path) -> Config {
    let mut c = two_rank_config(dir);
    c.data.synthetic.num_docs = 600;
    c.train.epochs = 1;
    c
}

/// Issue 8's correctness check on CPU ranks: 8 ranks (launch/local.sh 8, ZeRO-1 on, so each
/// rank owns the AdamW state of an eighth of the tensors) train the loss curve, the weights and
/// the moments of one process replaying the 8-rank plan.
#[test]
fn eight_ranks_with_zero1_through_local_sh_match_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = eight_rank_config(dir.path());
    c.dist.zero1 = true;
    let want = reference(&c, 8);
    assert!(want.losses.len() >= 5, "{} steps", want.losses.len());
    let cfg = write_config(dir.path(), &c);
    let run = dir.path().join("run");
    let out = clean(&mut Command::new("bash"))
        .arg(LOCAL_SH)
        .arg("8")
        .arg(&cfg)
        .args(["--quiet", "--out"])
        .arg(&run)
        .env("PACKTRAIN_BIN", BIN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    assert_matches(&run, &c, &want, true);
}

/// The same with ZeRO-1 (each rank keeps the moments of half the tensors): the checkpoint
/// (written mid-run and at the end, gathered on rank 0) holds the moments of one process,
/// and stopping and resuming gives bitwise the weights of the uninterrupted run.
#[test]
fn zero1_two_ranks_match_one_process_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = two_rank_config(dir.path());
    c.name = "zero1".into();
    c.dist.zero1 = true;
    c.train.checkpoint_every = 4;
    let want = reference(&c, 2);
    let cfg = write_config(dir.path(), &c);

    let straight = dir.path().join("straight");
    wait_ok(spawn_ranks(&cfg, &straight, 2, &[]), &straight);
    assert_matches(&straight, &c, &want, true);

    let split = dir.path().join("split");
    wait_ok(spawn_ranks(&cfg, &split, 2, &["--stop-after", "5"]), &split);
    let resume = split.to_str().unwrap();
    wait_ok(spawn_ranks(&cfg, &split, 2, &["--resume", resume]), &split);
    let layout = ParamLayout::new(&c.model);
    let (a, b) = (
        checkpoint::load(&straight, &c, &layout).unwrap(),
        checkpoint::load(&split, &c, &layout).unwrap(),
    );
    assert_eq!(a.state.step, b.state.step);
    assert!(a.weights == b.weights, "resumed weights differ");
    assert!(a.m == b.m && a.v == b.v, "resumed moments differ");
}

/// `launch/local.sh` with a long run, its stderr lines on a channel (and all of it at the end).
struct Launched {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    run: PathBuf,
    _dir: tempfile::TempDir,
}

fn launch_long_run(timeout_s: u64) -> Launched {
    launch_long_run_with(LOCAL_SH, timeout_s, &[])
}

/// `script 2 CONFIG --quiet --out RUN` (a launcher) on a run much longer than the tests wait.
fn launch_long_run_with(script: &str, timeout_s: u64, env: &[(&str, &str)]) -> Launched {
    let dir = tempfile::tempdir().unwrap();
    let mut c = two_rank_config(dir.path());
    c.train.epochs = 400; // far more than the test waits for
    c.dist.timeout_s = timeout_s;
    let cfg = write_config(dir.path(), &c);
    let run = dir.path().join("run");
    let mut child = clean(&mut Command::new("bash"))
        .arg(script)
        .arg("2")
        .arg(&cfg)
        .args(["--quiet", "--out"])
        .arg(&run)
        .env("PACKTRAIN_BIN", BIN)
        .env("PACKTRAIN_GRACE_S", "2")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Launched {
        child,
        lines,
        seen: Vec::new(),
        run,
        _dir: dir,
    }
}

impl Launched {
    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// The pid local.sh reports for `rank`.
    fn pid(&mut self, rank: usize) -> u32 {
        let tag = format!("local.sh: rank {rank}: pid ");
        let t0 = Instant::now();
        loop {
            self.drain();
            if let Some(l) = self.seen.iter().find(|l| l.starts_with(&tag)) {
                return l[tag.len()..].split(' ').next().unwrap().parse().unwrap();
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", self.seen);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until rank 0 has logged `steps` steps.
    fn wait_steps(&mut self, steps: usize) {
        let t0 = Instant::now();
        let metrics = self.run.join("metrics.jsonl");
        loop {
            let n = std::fs::read_to_string(&metrics)
                .map(|s| s.lines().count())
                .unwrap_or(0);
            if n >= steps {
                return;
            }
            self.drain();
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no progress: {:?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// local.sh's exit code, within `limit` (killing it otherwise), and everything it printed.
    fn finish(mut self, limit: Duration) -> (Option<i32>, Duration, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.drain();
                panic!("local.sh still running after {limit:?}: {:#?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = t0.elapsed();
        // The reader thread ends when every writer of the pipe has exited.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        (status.code(), took, self.seen.join("\n"))
    }
}

fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A rank killed mid-run: rank 0 names it at its next collective (a closed socket is an error
/// at once), and local.sh exits non-zero with the killed rank's code.
#[test]
fn a_killed_rank_stops_local_sh_and_the_other_ranks() {
    let timeout_s = 4;
    let mut l = launch_long_run(timeout_s);
    let (p0, p1) = (l.pid(0), l.pid(1));
    l.wait_steps(3);
    signal("-KILL", p1);
    let (code, took, log) = l.finish(Duration::from_secs(timeout_s + 20));
    assert_eq!(code, Some(137), "{log}");
    assert!(
        log.contains("rank 0/2: rank 1 closed its connection"),
        "{log}"
    );
    assert!(log.contains("local.sh: rank 1 (pid"), "{log}");
    assert!(took < Duration::from_secs(timeout_s + 5), "{took:?}\n{log}");
    assert!(!alive(p0), "rank 0 outlived local.sh");
}

/// A stalled rank (SIGSTOP): rank 0 names it after dist.timeout_s, local.sh stops it and exits
/// with rank 0's code.
#[test]
fn a_stalled_rank_is_named_within_the_timeout() {
    let timeout_s = 2;
    let mut l = launch_long_run(timeout_s);
    let (p0, p1) = (l.pid(0), l.pid(1));
    l.wait_steps(3);
    signal("-STOP", p1);
    let (code, took, log) = l.finish(Duration::from_secs(timeout_s + 30));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "rank 0/2: rank 1 did not answer within {timeout_s} s"
        )),
        "{log}"
    );
    // timeout + local.sh's grace (2 s) + its SIGTERM + slack
    assert!(took < Duration::from_secs(timeout_s + 8), "{took:?}\n{log}");
    assert!(!alive(p0) && !alive(p1), "a rank outlived local.sh");
}

/// Ctrl-C (here SIGTERM) to local.sh reaches every rank.
#[test]
fn local_sh_forwards_sigterm_to_every_rank() {
    let mut l = launch_long_run(30);
    let (p0, p1) = (l.pid(0), l.pid(1));
    l.wait_steps(2);
    signal("-TERM", l.child.id());
    let (code, took, log) = l.finish(Duration::from_secs(20));
    assert_eq!(code, Some(143), "{log}");
    assert!(log.contains("got SIGTERM; stopping every rank"), "{log}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!alive(p0) && !alive(p1), "a rank outlived local.sh");
}

/// With the `mpi` feature: the collectives and the training under `mpirun -np 2`.
#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use packtrain::dist;

    const MPIRUN_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/launch/mpirun.sh");

    /// Run by `mpi_collectives_under_mpirun_np_2` as 2 MPI ranks; ignored otherwise.
    #[test]
    #[ignore = "an MPI rank: run under mpirun by mpi_collectives_under_mpirun_np_2"]
    fn mpi_rank_collectives() {
        let cfg = packtrain::config::DistConfig {
            timeout_s: 20,
            ..Default::default()
        };
        let comm = dist::bootstrap(&cfg).unwrap();
        let (rank, world) = (comm.rank(), comm.world_size());
        assert_eq!(world, 2, "started by mpirun -np 2");
        let mut x: Vec<f32> = (0..10).map(|i| (i * (rank + 1)) as f32).collect();
        comm.all_reduce_sum(&mut x).unwrap();
        let full: Vec<f32> = (0..10).map(|i| (i * 3) as f32).collect();
        assert_eq!(x, full);
        let mut s = [rank as f64 + 0.25];
        comm.all_reduce_sum_f64(&mut s).unwrap();
        assert_eq!(s, [1.5]);
        let counts = [3usize, 7];
        let mut y: Vec<f32> = (0..10).map(|i| (i * (rank + 1)) as f32).collect();
        comm.reduce_scatter_sum(&mut y, &counts).unwrap();
        let off = [0, 3][rank];
        assert_eq!(y[off..off + counts[rank]], full[off..off + counts[rank]]);
        let mut z = vec![-1.0f32; 10];
        z[off..off + counts[rank]].copy_from_slice(&full[off..off + counts[rank]]);
        let mut g = z.clone();
        comm.all_gather(&mut z, &counts).unwrap();
        assert_eq!(z, full);
        comm.gather_to_root(&mut g, &counts).unwrap();
        if rank == 0 {
            assert_eq!(g, full);
        }
        println!("mpi rank {rank}/{world}: collectives ok");
    }

    #[test]
    fn mpi_collectives_under_mpirun_np_2() {
        let exe = std::env::current_exe().unwrap();
        let out = clean(&mut Command::new("mpirun"))
            .args(["-np", "2", "--oversubscribe", "--allow-run-as-root"])
            .arg(&exe)
            .args([
                "--ignored",
                "--exact",
                "mpi::mpi_rank_collectives",
                "--nocapture",
            ])
            .output()
            .expect("mpirun (apt-get install openmpi-bin libopenmpi-dev)");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        for r in 0..2 {
            assert!(
                text.contains(&format!("mpi rank {r}/2: collectives ok")),
                "{text}"
            );
        }
    }

    /// launch/mpirun.sh 2: MPI_Allreduce sums (in MPI's order) give the loss curve and the
    /// weights of one process, with and without ZeRO-1.
    #[test]
    fn mpi_two_ranks_through_mpirun_sh_match_one_process() {
        for zero1 in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = two_rank_config(dir.path());
            c.dist.zero1 = zero1;
            let want = reference(&c, 2);
            let cfg = write_config(dir.path(), &c);
            let run = dir.path().join("run");
            let out = clean(&mut Command::new("bash"))
                .arg(MPIRUN_SH)
                .arg("2")
                .arg(&cfg)
                .args(["--quiet", "--out"])
                .arg(&run)
                .env("PACKTRAIN_BIN", BIN)
                .env("MPIRUN_ARGS", "--oversubscribe")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{}\n{stderr}", out.status);
            assert!(stderr.contains("MPI communicator"), "{stderr}");
            assert_matches(&run, &c, &want, zero1);
        }
    }

    /// `mpirun -np 8` (oversubscribed on CI's two cores): the loss curve and the weights of one
    /// process replaying the 8-rank plan (issue 8's correctness check on CPU ranks).
    #[test]
    fn mpi_eight_ranks_through_mpirun_sh_match_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let c = eight_rank_config(dir.path());
        let want = reference(&c, 8);
        let cfg = write_config(dir.path(), &c);
        let run = dir.path().join("run");
        let out = clean(&mut Command::new("bash"))
            .arg(MPIRUN_SH)
            .arg("8")
            .arg(&cfg)
            .args(["--quiet", "--out"])
            .arg(&run)
            .env("PACKTRAIN_BIN", BIN)
            .env("MPIRUN_ARGS", "--oversubscribe")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}\n{stderr}", out.status);
        assert!(stderr.contains("MPI communicator"), "{stderr}");
        assert_matches(&run, &c, &want, false);
    }

    /// The pid of the process whose environment has all of `vars`.
    fn find_process(vars: &[String]) -> Option<u32> {
        std::fs::read_dir("/proc").ok()?.find_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            let env: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            vars.iter()
                .all(|v| env.contains(&v.as_bytes()))
                .then_some(pid)
        })
    }

    /// A stalled MPI rank: the others' watchdog ends them after dist.timeout_s, naming the
    /// collective, and mpirun ends the job non-zero.
    #[test]
    fn mpi_a_stalled_rank_ends_the_job_within_the_timeout() {
        let timeout_s = 2;
        let tag = format!("PACKTRAIN_TEST_TAG={}", free_port());
        let mut l = launch_long_run_with(
            MPIRUN_SH,
            timeout_s,
            &[
                ("MPIRUN_ARGS", "--oversubscribe"),
                ("PACKTRAIN_TEST_TAG", &tag["PACKTRAIN_TEST_TAG=".len()..]),
            ],
        );
        l.wait_steps(3);
        let p1 = find_process(&[tag.clone(), "OMPI_COMM_WORLD_RANK=1".into()])
            .expect("rank 1's process");
        signal("-STOP", p1);
        let (code, took, log) = l.finish(Duration::from_secs(timeout_s + 30));
        assert!(code.is_some_and(|c| c != 0), "{code:?}\n{log}");
        assert!(
            log.contains(&format!(
                "rank 0/2: MPI_Allreduce did not complete within {timeout_s} s"
            )),
            "{log}"
        );
        assert!(
            took < Duration::from_secs(timeout_s + 10),
            "{took:?}\n{log}"
        );
        if alive(p1) {
            signal("-KILL", p1);
        }
    }
}
