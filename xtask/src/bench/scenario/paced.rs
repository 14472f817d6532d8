//! CPU at realistic rates (section 5): the churn paced at a fixed number of
//! connections per second, and each tracer's whole cost: its process's CPU
//! plus the run time of its kernel programs (`kernel.bpf_stats_enabled`,
//! switched on for this section only: it adds two clock reads per program
//! run, so the throughput sections run without it). The programs see every
//! TCP socket on the host: what other processes' connections cost them
//! (measured over a quiet second before each run) is taken off. Also the wake-ups
//! (inter-processor interrupts from /proc/interrupts) per connection, and
//! conn-tracer's programs one by one (ns per call, calls per connection).

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    bench::{
        Args, Ctx,
        procs::{
            ProgStats, ipis,
            loadgen::{ChurnOut, churn_once},
            progs_of,
            tracer::{Config, Tracer},
        },
    },
    cmd::probe,
};

/// The configurations of this section: no tracer for the interrupts'
/// baseline, the hooks' floor, then every tracer.
const CONFIGS: [Config; 6] = Config::ALL;

/// One kernel program's share of a paced run, less what other processes'
/// connections cost it (measured over [`QUIET`] just before, pro rata).
#[derive(Debug, Clone, Serialize)]
pub struct ProgRun {
    pub name: String,
    pub calls: u64,
    pub run_time_ns: u64,
    /// Calls and run time over the quiet window before the run.
    pub background_calls: u64,
    pub background_ns: u64,
}

/// The quiet window before each paced run.
const QUIET: Duration = Duration::from_secs(1);

/// (calls, run time) of a program since `before`.
fn delta(now: &ProgStats, before: Option<&ProgStats>) -> (u64, u64) {
    (
        now.run_cnt - before.map_or(0, |b| b.run_cnt),
        now.run_time_ns - before.map_or(0, |b| b.run_time_ns),
    )
}

/// One paced run: the load generator's report, and what the tracer cost.
#[derive(Debug, Clone, Serialize)]
pub struct PacedRun {
    pub config: Config,
    /// Connections per second asked for (`out` has those made).
    pub rate: f64,
    pub out: ChurnOut,
    pub cost: Cost,
}

/// What a tracer cost over a paced run.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// CPU seconds of its process, and run time of its kernel programs (ns).
    pub cpu_s: Option<f64>,
    pub bpf_ns: Option<u64>,
    pub programs: Vec<ProgRun>,
    /// IRQ work, function call and rescheduling interrupts (all CPUs, the
    /// whole host).
    pub ipis: (u64, u64, u64),
}

impl PacedRun {
    /// The tracer's whole cost in millicores: process CPU plus kernel
    /// program run time, over the run's wall time.
    pub fn millicores(&self) -> Option<f64> {
        let cpu = self.cost.cpu_s? + self.cost.bpf_ns? as f64 / 1e9;
        (self.out.total_seconds > 0.0).then(|| cpu / self.out.total_seconds * 1000.0)
    }

    /// Interrupts (IRQ work + function call + rescheduling) per connection.
    pub fn ipis_per_conn(&self) -> f64 {
        let (a, b, c) = self.cost.ipis;
        (a + b + c) as f64 / self.out.total_connections.max(1) as f64
    }
}

/// `kernel.bpf_stats_enabled`, set to 1 while this lives, then put back.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let before = fs::read_to_string(BPF_STATS).context(BPF_STATS)?;
        fs::write(BPF_STATS, "1").context("cannot enable kernel.bpf_stats_enabled")?;
        Ok(Self(before.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.0);
    }
}

/// A program's name, from bpftool (its id when bpftool cannot say).
fn prog_name(id: u64) -> String {
    probe(Command::new("bpftool").args(["prog", "show", "id", &id.to_string(), "--json"]))
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["name"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("prog {id}"))
}

fn prog_stats(pid: Option<u32>) -> BTreeMap<u64, ProgStats> {
    pid.and_then(|p| progs_of(p).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.id, p))
        .collect()
}

/// 5. Paced churn at each rate of `--paced-rates`, every configuration.
pub fn paced(ctx: &mut Ctx, args: &Args) -> Result<Vec<PacedRun>> {
    println!(
        "== paced: {:?} connections/s, {} s each, kernel program stats on",
        args.paced_rates, args.paced_seconds
    );
    let _stats = BpfStats::enable()?;
    let mut runs = Vec::new();
    for config in CONFIGS {
        let mut tracer = Tracer::start(ctx, config, &[])?;
        let mut names = BTreeMap::new();
        let mut mine = Vec::new();
        for &rate in &args.paced_rates {
            // The programs see every TCP socket of the host: other
            // processes' connections (this machine is shared) are measured
            // over a quiet second first and taken off, pro rata.
            let quiet0 = prog_stats(tracer.pid());
            let quiet_started = Instant::now();
            thread::sleep(QUIET);
            let quiet1 = prog_stats(tracer.pid());
            let quiet_s = quiet_started.elapsed().as_secs_f64();
            let (lost0, progs0, cpu0, ipi0) = (
                tracer.counts()?.1,
                prog_stats(tracer.pid()),
                tracer.cpu(),
                ipis(),
            );
            let out = churn_once(ctx, args.concurrency, args.paced_seconds, Some(rate))?;
            let (cpu1, ipi1, progs1) = (tracer.cpu(), ipis(), prog_stats(tracer.pid()));
            thread::sleep(Duration::from_millis(50));
            let lost1 = tracer.counts()?.1;
            let programs: Vec<ProgRun> = progs1
                .values()
                .map(|p| {
                    let d = delta(p, progs0.get(&p.id));
                    let q1 = quiet1.get(&p.id).copied().unwrap_or(*p);
                    let bg = delta(&q1, quiet0.get(&p.id));
                    let scale = out.total_seconds / quiet_s;
                    ProgRun {
                        name: names.entry(p.id).or_insert_with(|| prog_name(p.id)).clone(),
                        calls: d.0.saturating_sub((bg.0 as f64 * scale) as u64),
                        run_time_ns: d.1.saturating_sub((bg.1 as f64 * scale) as u64),
                        background_calls: bg.0,
                        background_ns: bg.1,
                    }
                })
                .collect();
            let bpf_ns =
                (config != Config::NoTracer).then(|| programs.iter().map(|p| p.run_time_ns).sum());
            let run = PacedRun {
                config,
                rate,
                out,
                cost: Cost {
                    cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
                    bpf_ns,
                    programs,
                    ipis: (ipi1.0 - ipi0.0, ipi1.1 - ipi0.1, ipi1.2 - ipi0.2),
                },
            };
            if let Some(lost) = lost0.zip(lost1).map(|(a, b)| b.saturating_sub(a))
                && lost > 0
            {
                println!("  {}: {lost} events lost", config.name());
            }
            println!(
                "  {:<18} {:>6.0} conn/s: {} mCPU ({} process + {} kernel programs), \
                 {:.2} interrupts/connection",
                config.name(),
                run.out.conn_per_s,
                run.millicores().map_or("-".into(), |m| format!("{m:.1}")),
                run.cost.cpu_s.map_or("-".into(), |c| format!("{c:.3}s")),
                run.cost
                    .bpf_ns
                    .map_or("-".into(), |n| format!("{:.3}s", n as f64 / 1e9)),
                run.ipis_per_conn()
            );
            mine.push(run);
        }
        let (_, lost) = tracer.stop()?;
        if let Some(lost) = lost.filter(|&l| l > 0) {
            println!("  {}: {lost} events lost", config.name());
        }
        runs.extend(mine);
    }
    Ok(runs)
}
