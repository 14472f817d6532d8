//! `cargo xtask bench`: conn-tracer's cost, measured side by side with no
//! tracer and with a bpftrace peer, in one run on this machine, and written
//! to docs/benchmarks.md (tables), docs/bench/*.svg (charts) and
//! docs/bench/summary.json (the same numbers and the exact command).
//!
//! Configurations are interleaved (round r runs every configuration once,
//! in an order rotated by r) so that machine drift and other load hit each
//! configuration alike; ratios are taken within a round.
//!
//! `scenario` holds the measured sections, `procs` the processes they start
//! (the tracers under test, the load generator) and what /proc says about
//! them, `report` what is written from the results.
#![expect(
    clippy::cast_precision_loss,
    reason = "connection counts, sizes and pixels stay far below 2^52"
)]

mod procs;
mod report;
mod scenario;
mod stats;

use std::{fs, path::PathBuf, process::Command, time::Instant};

use anyhow::{Result, bail};

use self::scenario::{Results, churn, cluster, latency, loss, memory, paced, pipeline, syscalls};
use crate::{
    cmd::{cargo, display, is_root, run, target_dir, workspace_root},
    setup,
};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Rounds of the churn comparison (each runs every configuration once).
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// Measured seconds of each churn run.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Connections in flight in the churn runs (the highest load level by default).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Load levels (connections in flight) of the scaling runs.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    pub levels: Vec<usize>,
    /// Rounds of the scaling runs.
    #[arg(long, default_value_t = 3)]
    pub level_rounds: usize,
    /// Measured seconds of each scaling run.
    #[arg(long, default_value_t = 2.0)]
    pub level_seconds: f64,
    /// Tracked connections (sockets the daemon tracks; a loopback
    /// connection is two) at which to measure memory.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,50000,100000,200000"
    )]
    pub memory: Vec<usize>,
    /// Idle kills timed for the detection latency.
    #[arg(long, default_value_t = 20)]
    pub latency_samples: usize,
    /// Seconds of each userspace pipeline measurement.
    #[arg(long, default_value_t = 3.0)]
    pub pipeline_seconds: f64,
    /// Paced rates (connections/s) at which the tracers' whole CPU cost is measured.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub paced_rates: Vec<f64>,
    /// Measured seconds of each paced run.
    #[arg(long, default_value_t = 5.0)]
    pub paced_seconds: f64,
    /// Ring buffer size of the deliberate-loss run (the smallest the kernel takes is a page).
    #[arg(long, default_value_t = 4096)]
    pub tiny_ring: u32,
    /// Pods of the simulated cluster of the cluster-index section.
    #[arg(long, default_value_t = 150_000)]
    pub cluster_pods: usize,
    /// Services of the simulated cluster (each pod backs one).
    #[arg(long, default_value_t = 10_000)]
    pub cluster_services: usize,
    /// Nodes of the simulated cluster (the daemon's node has pods/nodes of them).
    #[arg(long, default_value_t = 5_000)]
    pub cluster_nodes: usize,
    /// Sections to skip (churn, scaling, paced, syscalls, memory, latency, loss, pipeline,
    /// cluster).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Where docs/benchmarks.md and docs/bench/ go (default: the workspace's docs/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not install missing packages (bpftrace); fail instead.
    #[arg(long)]
    pub no_install: bool,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    pub strict: bool,
}

/// Debian packages only the benchmarks need (not installed by `setup`, so
/// that test runs do not pull them in).
const BENCH_PACKAGES: &[setup::DebianPackage] = &[
    setup::DebianPackage {
        name: "bpftrace",
        command: "bpftrace",
    },
    setup::DebianPackage {
        name: "iproute2",
        command: "ss",
    },
    // The C peers, tcplife and tcpstates.
    setup::DebianPackage {
        name: "libbpf-tools",
        command: "tcplife",
    },
    setup::DebianPackage {
        name: "bpftool",
        command: "bpftool",
    },
];

/// Paths and settings every section needs.
struct Ctx {
    tracer: PathBuf,
    loadgen: PathBuf,
    /// The fake apiserver of the cluster section.
    fake_kube: PathBuf,
    work: PathBuf,
    bpftrace_script: PathBuf,
    runs: usize,
}

/// `cargo xtask bench`.
pub fn bench(args: &Args) -> Result<()> {
    let started = Instant::now();
    if !is_root() {
        bail!(
            "the benchmarks load eBPF programs (conn-tracer, bpftrace) and raise file limits: \
             run `cargo xtask bench` as root"
        );
    }
    validate(args)?;
    let command = reproduce_command();
    println!("== bench: {command}");
    setup::ensure_toolchain()?;
    if args.no_install {
        setup::check_packages(BENCH_PACKAGES)?;
    } else {
        setup::ensure_packages(BENCH_PACKAGES)?;
    }
    let _ = setup::ensure_tracefs()?;
    run(cargo().args(["build", "--release", "-p", "tracer-user", "-p", "loadgen"]))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "integration-tests",
        "--bin",
        "ct-fake-kube",
    ]))?;

    let target = target_dir()?;
    let work = target.join("bench");
    fs::create_dir_all(&work)?;
    let bpftrace_script = work.join("tcplife.bt");
    fs::write(&bpftrace_script, procs::tracer::BPFTRACE_SCRIPT)?;
    let mut ctx = Ctx {
        tracer: target.join("release").join("conn-tracer"),
        loadgen: target.join("release").join("conn-loadgen"),
        fake_kube: target.join("release").join("ct-fake-kube"),
        work,
        bpftrace_script,
        runs: 0,
    };
    let machine = report::Machine::probe();
    let others = procs::other_bpf_holders(&[]);
    if !others.is_empty() {
        println!(
            "bench: note: other processes hold eBPF programs (they cost every configuration \
             alike): {others:?}"
        );
    }
    let results = sections(&mut ctx, args)?;
    let others_after = procs::other_bpf_holders(&[]);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs"));
    let verdicts = report::verdicts(&results);
    report::write(&report::Report {
        out: &out,
        command: &command,
        machine: &machine,
        args,
        results: &results,
        verdicts: &verdicts,
        other_tracers: others.into_iter().chain(others_after).collect(),
        took: started.elapsed(),
    })?;
    println!();
    println!("== targets");
    for v in &verdicts {
        println!(
            "  {:<4}  {}: {} (target {})",
            if v.pass { "PASS" } else { "FAIL" },
            v.name,
            v.value,
            v.target
        );
    }
    println!(
        "bench: wrote {} and {} in {:.0} s",
        out.join("benchmarks.md").display(),
        out.join("bench").display(),
        started.elapsed().as_secs_f64()
    );
    if args.strict && verdicts.iter().any(|v| !v.pass) {
        bail!("targets missed (see above)");
    }
    Ok(())
}

/// Runs every section not skipped.
fn sections(ctx: &mut Ctx, args: &Args) -> Result<Results> {
    let skip = |s: &str| args.skip.iter().any(|x| x == s);
    let mut results = Results::default();
    if !skip("churn") {
        results.churn = churn::churn(ctx, args)?;
    }
    if !skip("scaling") {
        results.scaling = churn::scaling(ctx, args)?;
    }
    if !skip("paced") {
        results.paced = paced::paced(ctx, args)?;
    }
    if !skip("syscalls") {
        results.syscalls = syscalls::syscalls(ctx, args)?;
    }
    if !skip("loss") {
        results.tiny_ring = Some(loss::tiny_ring(ctx, args)?);
    }
    if !skip("latency") {
        results.latency = Some(latency::latency(ctx, args)?);
    }
    if !skip("memory") {
        results.memory = Some(memory::memory(ctx, args)?);
    }
    if !skip("cluster") {
        results.cluster = Some(cluster::cluster(ctx, args)?);
    }
    if !skip("pipeline") {
        results.pipeline = pipeline::pipeline(args)?;
    }
    Ok(results)
}

fn validate(a: &Args) -> Result<()> {
    anyhow::ensure!((1..=50).contains(&a.rounds), "--rounds must be 1-50");
    anyhow::ensure!(
        (1..=20).contains(&a.level_rounds),
        "--level-rounds must be 1-20"
    );
    for (name, s) in [
        ("--seconds", a.seconds),
        ("--level-seconds", a.level_seconds),
        ("--pipeline-seconds", a.pipeline_seconds),
        ("--paced-seconds", a.paced_seconds),
    ] {
        anyhow::ensure!(s > 0.0 && s <= 120.0, "{name} must be in (0, 120]");
    }
    anyhow::ensure!(
        (1..=4096).contains(&a.concurrency) && a.levels.iter().all(|l| (1..=4096).contains(l)),
        "--concurrency and --levels must be 1-4096"
    );
    anyhow::ensure!(
        a.paced_rates.iter().all(|r| (1.0..=100_000.0).contains(r)),
        "--paced-rates must be 1-100000 connections/s"
    );
    anyhow::ensure!(
        a.memory.iter().all(|m| (2..=400_000).contains(m)),
        "--memory levels must be 2-400000 tracked connections"
    );
    anyhow::ensure!(
        (1..=500).contains(&a.latency_samples),
        "--latency-samples must be 1-500"
    );
    anyhow::ensure!(
        a.cluster_pods <= 1_000_000 && (1..=100_000).contains(&a.cluster_services),
        "--cluster-pods must be at most 1000000 and --cluster-services 1-100000"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&a.cluster_nodes),
        "--cluster-nodes must be 1-100000"
    );
    Ok(())
}

/// The command line that reproduces this run.
fn reproduce_command() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cmd = Command::new("cargo");
    cmd.arg("xtask").args(&args);
    display(&cmd)
}
