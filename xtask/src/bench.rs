//! `cargo xtask bench`: conn-tracer's cost, measured side by side with no
//! tracer and with a bpftrace peer, in one run on this machine, and written
//! to docs/benchmarks.md (tables), docs/bench/*.svg (charts) and
//! docs/bench/summary.json (the same numbers and the exact command).
//!
//! Configurations are interleaved (round r runs every configuration once,
//! in an order rotated by r) so that machine drift and other load hit each
//! configuration alike; ratios are taken within a round.
#![expect(
    clippy::cast_precision_loss,
    reason = "connection counts, sizes and pixels stay far below 2^52"
)]

mod procs;
mod report;
pub mod stats;
pub mod svg;

use std::{
    fs,
    io::{BufRead, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use loadgen::metrics::{Scraper, sum};
use serde::Serialize;
use serde_json::Value;

use self::{
    procs::{MapInfo, Proc},
    stats::Summary,
};
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
    /// Ring buffer size of the deliberate-loss run (the smallest the kernel takes is a page).
    #[arg(long, default_value_t = 4096)]
    pub tiny_ring: u32,
    /// Sections to skip (churn, scaling, memory, latency, loss, pipeline).
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
];

/// The peer: a tcplife-style bpftrace script on the `sock:inet_sock_set_state`
/// tracepoint (kprobes do not work on every kernel): birth time on the first
/// state below FIN_WAIT1, owner on SYN_SENT/LAST_ACK, one printed line per
/// connection end (as conn-tracer sends one summary per end).
const BPFTRACE_SCRIPT: &str = r#"BEGIN { printf("ready\n"); }

tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
  $sk = args->skaddr;
  if (args->newstate < 4 && @birth[$sk] == 0) {
    @birth[$sk] = nsecs;
  }
  if (args->newstate == 2 || args->newstate == 9) {
    @pid[$sk] = pid;
    @comm[$sk] = comm;
  }
  if (args->newstate == 7) {
    $b = @birth[$sk];
    if ($b != 0) {
      printf("end %d %s %d %d %d\n", @pid[$sk], @comm[$sk], args->sport, args->dport,
             (nsecs - $b) / 1000);
    }
    delete(@birth[$sk]);
    delete(@pid[$sk]);
    delete(@comm[$sk]);
  }
}

END { clear(@birth); clear(@pid); clear(@comm); }
"#;

/// The three configurations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    #[default]
    NoTracer,
    ConnTracer,
    Bpftrace,
}

impl Config {
    pub const ALL: [Self; 3] = [Self::NoTracer, Self::ConnTracer, Self::Bpftrace];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoTracer => "no tracer",
            Self::ConnTracer => "conn-tracer",
            Self::Bpftrace => "bpftrace",
        }
    }
}

/// The order of the configurations in round `round`: rotated, so that
/// each runs first, second and last equally often.
pub fn rotated<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    let n = items.len();
    (0..n).map(|i| items[(i + round) % n]).collect()
}

/// Paths and settings every section needs.
struct Ctx {
    tracer: PathBuf,
    loadgen: PathBuf,
    work: PathBuf,
    bpftrace_script: PathBuf,
    runs: usize,
}

/// One churn run.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnRun {
    pub round: usize,
    pub config: Config,
    pub concurrency: usize,
    pub conn_per_s: f64,
    /// Connections during the measured seconds.
    pub connections: u64,
    /// Connections during the whole run (warm-up included), for CPU per connection.
    pub total_connections: u64,
    pub errors: u64,
    /// CPU seconds the tracer process used during the run.
    pub tracer_cpu_s: Option<f64>,
    /// Events the tracer received (conn-tracer: open + close + sockopt;
    /// bpftrace: printed connection ends).
    pub events: Option<u64>,
    pub lost: Option<u64>,
}

/// Detection latency samples.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples_ms: Vec<f64>,
    pub missed: u64,
    pub summary: Option<Summary>,
    pub p95_ms: f64,
    pub poll_us: u64,
}

/// Memory at one level of held connections.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPoint {
    pub tracked_target: usize,
    /// `conntracer_tracked_connections` when measured.
    pub tracked: u64,
    pub loopback_connections: usize,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
    /// The daemon's eBPF maps (ring buffer, counters, the storage map itself).
    pub map_bytes: u64,
    /// Socket storage charged to the held sockets (`ss -m` `o`), minus what
    /// the same sockets carry without conn-tracer.
    pub sk_storage_bytes: u64,
    pub sockets_measured: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub baseline_rss_bytes: u64,
    pub points: Vec<MemoryPoint>,
    /// Socket storage per socket without conn-tracer (other tracers on the host).
    pub storage_without_tracer_per_socket: f64,
    pub maps: Vec<MapInfo>,
}

/// One userspace pipeline measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Pipeline {
    pub tracked_connections: u64,
    pub events_per_s: f64,
    pub ns_per_event: f64,
    pub decode_only_events_per_s: f64,
    pub render_metrics_ms: f64,
    pub cpu: Option<u64>,
}

/// The deliberate-loss run with a tiny ring.
#[derive(Debug, Clone, Serialize)]
pub struct TinyRing {
    pub ring_bytes: u32,
    pub connections: u64,
    /// 4 per loopback connection: open and close of both sockets.
    pub expected: u64,
    /// open + close events the daemon received.
    pub received: u64,
    pub lost: u64,
    /// open + close events per second from the rest of the host, measured
    /// just before the run.
    pub background_per_s: f64,
    pub seconds: f64,
    /// received + lost - expected: other hosts' events if >= 0; events that
    /// went missing without being counted if < 0.
    pub excess: i64,
    pub pass: bool,
}

/// A target and how this run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    pub target: String,
    pub value: String,
    pub pass: bool,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Results {
    pub churn: Vec<ChurnRun>,
    pub scaling: Vec<ChurnRun>,
    pub memory: Option<Memory>,
    pub latency: Option<Latency>,
    pub pipeline: Vec<Pipeline>,
    pub tiny_ring: Option<TinyRing>,
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
    ensure_tracefs()?;
    run(cargo().args(["build", "--release", "-p", "tracer-user", "-p", "loadgen"]))?;

    let target = target_dir()?;
    let work = target.join("bench");
    fs::create_dir_all(&work)?;
    let bpftrace_script = work.join("tcplife.bt");
    fs::write(&bpftrace_script, BPFTRACE_SCRIPT)?;
    let mut ctx = Ctx {
        tracer: target.join("release").join("conn-tracer"),
        loadgen: target.join("release").join("conn-loadgen"),
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
    let skip = |s: &str| args.skip.iter().any(|x| x == s);
    let mut results = Results::default();
    if !skip("churn") {
        results.churn = churn(&mut ctx, args)?;
    }
    if !skip("scaling") {
        results.scaling = scaling(&mut ctx, args)?;
    }
    if !skip("loss") {
        results.tiny_ring = Some(tiny_ring(&mut ctx, args)?);
    }
    if !skip("latency") {
        results.latency = Some(latency(&mut ctx, args)?);
    }
    if !skip("memory") {
        results.memory = Some(memory(&mut ctx, args)?);
    }
    if !skip("pipeline") {
        results.pipeline = pipeline(args)?;
    }
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
    ] {
        anyhow::ensure!(s > 0.0 && s <= 120.0, "{name} must be in (0, 120]");
    }
    anyhow::ensure!(
        (1..=4096).contains(&a.concurrency) && a.levels.iter().all(|l| (1..=4096).contains(l)),
        "--concurrency and --levels must be 1-4096"
    );
    anyhow::ensure!(
        a.memory.iter().all(|m| (2..=400_000).contains(m)),
        "--memory levels must be 2-400000 tracked connections"
    );
    anyhow::ensure!(
        (1..=500).contains(&a.latency_samples),
        "--latency-samples must be 1-500"
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

/// bpftrace reads tracepoint formats from tracefs; mount it if nothing did.
/// Left mounted: it is the standard place, and others may use it by now.
fn ensure_tracefs() -> Result<()> {
    let probe = Path::new("/sys/kernel/tracing/events/sock/inet_sock_set_state");
    if probe.exists() || Path::new("/sys/kernel/debug/tracing/events/sock").exists() {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
        .context("bpftrace needs tracefs at /sys/kernel/tracing")
}

/// A free loopback port (the kernel picks it; released before use).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A running tracer of one configuration.
struct Tracer {
    config: Config,
    proc: Option<Proc>,
    metrics: Option<Scraper>,
    out: Option<PathBuf>,
}

impl Tracer {
    fn start(ctx: &mut Ctx, config: Config, extra: &[String]) -> Result<Self> {
        ctx.runs += 1;
        let mut t = Self {
            config,
            proc: None,
            metrics: None,
            out: None,
        };
        match config {
            Config::NoTracer => {}
            Config::ConnTracer => {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
                let log = ctx.work.join(format!("conn-tracer-{}.log", ctx.runs));
                let out = fs::File::create(&log)?;
                let mut cmd = Command::new(&ctx.tracer);
                cmd.args([
                    "run",
                    "--listen",
                    &addr.to_string(),
                    "--idle-threshold",
                    "1s",
                ])
                .arg("--no-kube")
                .args(extra)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
                let child = cmd
                    .spawn()
                    .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
                t.proc = Some(Proc::new("conn-tracer", child));
                let mut scraper = Scraper::new(addr);
                let deadline = Instant::now() + Duration::from_mins(1);
                loop {
                    if scraper.fetch("/healthz").is_ok() {
                        break;
                    }
                    if let Some(status) = t.proc.as_mut().and_then(Proc::exited) {
                        bail!(
                            "conn-tracer exited ({status}) before it was ready: see {}",
                            log.display()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!("conn-tracer not ready within 60 s: see {}", log.display());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                t.metrics = Some(scraper);
            }
            Config::Bpftrace => {
                let out = ctx.work.join(format!("bpftrace-{}.out", ctx.runs));
                let mut cmd = Command::new("bpftrace");
                cmd.arg(&ctx.bpftrace_script)
                    .stdin(Stdio::null())
                    .stdout(fs::File::create(&out)?)
                    .stderr(fs::File::create(ctx.work.join("bpftrace.err"))?);
                let child = cmd
                    .spawn()
                    .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
                t.proc = Some(Proc::new("bpftrace", child));
                // BEGIN runs once every probe is attached.
                let deadline = Instant::now() + Duration::from_secs(90);
                while !fs::read_to_string(&out)?.lines().any(|l| l == "ready") {
                    if let Some(status) = t.proc.as_mut().and_then(Proc::exited) {
                        bail!(
                            "bpftrace exited ({status}) before it was ready: see {}",
                            ctx.work.join("bpftrace.err").display()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!("bpftrace not ready within 90 s");
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                t.out = Some(out);
            }
        }
        Ok(t)
    }

    fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    fn cpu(&self) -> Option<f64> {
        self.pid().and_then(|p| procs::cpu_seconds(p).ok())
    }

    /// conn-tracer's metrics, once its event counts stopped moving (the
    /// ring drained).
    fn drained_metrics(&mut self) -> Result<Option<String>> {
        let Some(scraper) = self.metrics.as_mut() else {
            return Ok(None);
        };
        let mut last = scraper.get()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            thread::sleep(Duration::from_millis(150));
            let now = scraper.get()?;
            let events = |t: &str| sum(t, "conntracer_events_total", &[]) as u64;
            if events(&now) == events(&last) || Instant::now() > deadline {
                return Ok(Some(now));
            }
            last = now;
        }
    }

    /// (events, lost) so far; for bpftrace only after `stop`.
    fn counts(&mut self) -> Result<(Option<u64>, Option<u64>)> {
        Ok(match self.drained_metrics()? {
            Some(text) => (
                Some(sum(&text, "conntracer_events_total", &[]) as u64),
                Some(sum(&text, "conntracer_events_lost_total", &[]) as u64),
            ),
            None => (None, None),
        })
    }

    /// Stops the tracer; for bpftrace, returns its (ends printed, lost).
    fn stop(mut self) -> Result<(Option<u64>, Option<u64>)> {
        let Some(mut proc) = self.proc.take() else {
            return Ok((None, None));
        };
        let signal = if self.config == Config::Bpftrace {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        proc.stop(signal, Duration::from_secs(20))?;
        match &self.out {
            Some(out) => {
                let text = fs::read_to_string(out)?;
                let (ends, lost) = bpftrace_counts(&text);
                let _ = fs::remove_file(out);
                Ok((Some(ends), Some(lost)))
            }
            None => Ok((None, None)),
        }
    }
}

/// (connection ends printed, events bpftrace reported lost) in its output.
pub fn bpftrace_counts(text: &str) -> (u64, u64) {
    let ends = text.lines().filter(|l| l.starts_with("end ")).count() as u64;
    let lost = text
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("Lost ")?;
            rest.strip_suffix(" events")?.trim().parse::<u64>().ok()
        })
        .sum();
    (ends, lost)
}

/// What `conn-loadgen churn` reports.
struct ChurnOut {
    conn_per_s: f64,
    connections: u64,
    total_connections: u64,
    errors: u64,
}

/// Runs the load generator to completion and returns its JSON report.
fn loadgen(ctx: &Ctx, args: &[String]) -> Result<Value> {
    let mut cmd = Command::new(&ctx.loadgen);
    cmd.args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", display(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("loadgen printed {last:?}"))
}

fn churn_once(ctx: &Ctx, concurrency: usize, seconds: f64) -> Result<ChurnOut> {
    let v = loadgen(
        ctx,
        &[
            "churn".into(),
            "--seconds".into(),
            seconds.to_string(),
            "--concurrency".into(),
            concurrency.to_string(),
            "--warmup".into(),
            "0.5".into(),
        ],
    )?;
    let num = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("loadgen output has no {k}"))
    };
    Ok(ChurnOut {
        conn_per_s: num("conn_per_s")?,
        connections: num("connections")? as u64,
        total_connections: num("total_connections")? as u64,
        errors: num("errors")? as u64,
    })
}

/// One measured churn run against a running tracer.
fn measure_churn(
    ctx: &Ctx,
    tracer: &mut Tracer,
    round: usize,
    concurrency: usize,
    seconds: f64,
) -> Result<ChurnRun> {
    let counts0 = tracer.counts()?;
    let cpu0 = tracer.cpu();
    let out = churn_once(ctx, concurrency, seconds)?;
    // The daemon drains what is left within its 5 ms pause.
    thread::sleep(Duration::from_millis(50));
    let cpu1 = tracer.cpu();
    let counts1 = tracer.counts()?;
    let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    Ok(ChurnRun {
        round,
        config: tracer.config,
        concurrency,
        conn_per_s: out.conn_per_s,
        connections: out.connections,
        total_connections: out.total_connections,
        errors: out.errors,
        tracer_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
        events: delta(counts0.0, counts1.0),
        lost: delta(counts0.1, counts1.1),
    })
}

fn print_run(r: &ChurnRun) {
    println!(
        "  round {} {:<12} c={:<3} {:>9.0} conn/s  cpu {:>6}  events {:>9}  lost {:>6}{}",
        r.round,
        r.config.name(),
        r.concurrency,
        r.conn_per_s,
        r.tracer_cpu_s.map_or("-".into(), |c| format!("{c:.2}s")),
        r.events.map_or("-".into(), |e| e.to_string()),
        r.lost.map_or("-".into(), |e| e.to_string()),
        if r.errors > 0 {
            format!("  ({} connect errors)", r.errors)
        } else {
            String::new()
        }
    );
}

/// 1. Connection churn: every configuration once per round, rotated.
fn churn(ctx: &mut Ctx, args: &Args) -> Result<Vec<ChurnRun>> {
    println!(
        "== churn: {} rounds x {} configurations, {} s each, {} connections in flight",
        args.rounds,
        Config::ALL.len(),
        args.seconds,
        args.concurrency
    );
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for config in rotated(&Config::ALL, round) {
            let mut tracer = Tracer::start(ctx, config, &[])?;
            let mut run = measure_churn(ctx, &mut tracer, round, args.concurrency, args.seconds)?;
            let (ends, lost) = tracer.stop()?;
            if config == Config::Bpftrace {
                run.events = ends;
                run.lost = lost;
            }
            print_run(&run);
            runs.push(run);
        }
    }
    Ok(runs)
}

/// 2a. Churn at several load levels; each tracer runs all levels once per round.
fn scaling(ctx: &mut Ctx, args: &Args) -> Result<Vec<ChurnRun>> {
    println!(
        "== scaling: levels {:?} connections in flight, {} rounds, {} s each",
        args.levels, args.level_rounds, args.level_seconds
    );
    let mut runs = Vec::new();
    for round in 0..args.level_rounds {
        for config in rotated(&Config::ALL, round) {
            let mut tracer = Tracer::start(ctx, config, &[])?;
            let mut mine = Vec::new();
            for &level in &args.levels {
                let run = measure_churn(ctx, &mut tracer, round, level, args.level_seconds)?;
                mine.push(run);
            }
            let (ends, lost) = tracer.stop()?;
            if config == Config::Bpftrace {
                // bpftrace's counts cover all levels of this round at once.
                if let Some(last) = mine.last_mut() {
                    last.events = ends;
                    last.lost = lost;
                }
            }
            for r in &mine {
                print_run(r);
            }
            runs.extend(mine);
        }
    }
    Ok(runs)
}

/// Loss accounting with a ring too small for the load.
fn tiny_ring(ctx: &mut Ctx, args: &Args) -> Result<TinyRing> {
    println!(
        "== loss: conn-tracer with a {}-byte ring under full churn",
        args.tiny_ring
    );
    let mut tracer = Tracer::start(
        ctx,
        Config::ConnTracer,
        &["--ring-bytes".into(), args.tiny_ring.to_string()],
    )?;
    let opens_closes = |text: &str| {
        sum(text, "conntracer_events_total", &["kind=\"open\""])
            + sum(text, "conntracer_events_total", &["kind=\"close\""])
    };
    let quiet = Duration::from_secs(2);
    let t0 = tracer.drained_metrics()?.unwrap_or_default();
    thread::sleep(quiet);
    let t1 = tracer.drained_metrics()?.unwrap_or_default();
    let background_per_s = (opens_closes(&t1) - opens_closes(&t0)) / quiet.as_secs_f64();
    let lost0 = sum(&t1, "conntracer_events_lost_total", &[]);
    let started = Instant::now();
    let out = churn_once(ctx, args.concurrency, args.seconds)?;
    let t2 = tracer.drained_metrics()?.unwrap_or_default();
    let seconds = started.elapsed().as_secs_f64();
    tracer.stop()?;
    let received = (opens_closes(&t2) - opens_closes(&t1)) as u64;
    let lost = (sum(&t2, "conntracer_events_lost_total", &[]) - lost0) as u64;
    let expected = 4 * out.total_connections;
    let excess = i64::try_from(received + lost).unwrap_or(i64::MAX)
        - i64::try_from(expected).unwrap_or(i64::MAX);
    // Other processes' connections add events; a missing, uncounted event
    // would make the sum fall short of what the load generator made.
    let allowance = background_per_s.mul_add(seconds * 3.0, 100.0) + expected as f64 * 0.005;
    let pass = lost > 0 && excess >= 0 && (excess as f64) <= allowance;
    let r = TinyRing {
        ring_bytes: args.tiny_ring,
        connections: out.total_connections,
        expected,
        received,
        lost,
        background_per_s,
        seconds,
        excess,
        pass,
    };
    println!(
        "  {} connections: expected {} events, received {}, lost {} (counted), excess {} \
         (background {:.0}/s)",
        r.connections, r.expected, r.received, r.lost, r.excess, r.background_per_s
    );
    Ok(r)
}

/// 4. Detection latency of idle kills.
fn latency(ctx: &mut Ctx, args: &Args) -> Result<Latency> {
    println!(
        "== latency: {} idle kills, from the server's close() to /metrics",
        args.latency_samples
    );
    let tracer = Tracer::start(ctx, Config::ConnTracer, &[])?;
    let listen = tracer
        .metrics
        .as_ref()
        .map(Scraper::addr)
        .context("conn-tracer has no metrics address")?;
    let v = loadgen(
        ctx,
        &[
            "idle-kill".into(),
            "--metrics".into(),
            listen.to_string(),
            "--samples".into(),
            args.latency_samples.to_string(),
            "--idle-ms".into(),
            "1500".into(),
        ],
    )?;
    tracer.stop()?;
    let samples_ms: Vec<f64> = v["samples_ms"]
        .as_array()
        .context("no samples_ms")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let l = Latency {
        summary: Summary::of(&samples_ms),
        p95_ms: stats::percentile(&samples_ms, 95.0),
        missed: v["missed"].as_u64().unwrap_or(0),
        poll_us: v["poll_us"].as_u64().unwrap_or(0),
        samples_ms,
    };
    if let Some(s) = l.summary {
        println!(
            "  median {:.1} ms, p95 {:.1} ms, max {:.1} ms, {} missed",
            s.median, l.p95_ms, s.max, l.missed
        );
    }
    Ok(l)
}

/// `conn-loadgen hold` processes that keep their connections until
/// released. One process can hold as many sockets as its hard open-file
/// limit allows (raising that needs CAP_SYS_RESOURCE, which root may lack
/// in a container): more connections are spread over more processes.
struct Held {
    procs: Vec<Proc>,
    ports: Vec<u16>,
}

/// Loopback connections one `hold` process may keep (two fds each).
fn per_process() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    };
    let fds = usize::try_from(hard.min(400_000)).unwrap_or(1024);
    (fds.saturating_sub(256) / 2).max(100)
}

impl Held {
    fn open(ctx: &Ctx, connections: usize) -> Result<Self> {
        let mut held = Self {
            procs: Vec::new(),
            ports: Vec::new(),
        };
        let chunk = per_process();
        let mut left = connections;
        while left > 0 {
            let n = left.min(chunk);
            left -= n;
            let mut cmd = Command::new(&ctx.loadgen);
            cmd.args(["hold", "--connections", &n.to_string()])
                .args(["--max-seconds", "900"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
            let mut proc = Proc::new("conn-loadgen hold", child);
            let stdout = proc.child_mut().stdout.take().context("stdout")?;
            held.procs.push(proc);
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx
                .recv_timeout(Duration::from_mins(10))
                .context("conn-loadgen hold did not report within 10 minutes")?;
            let v: Value = serde_json::from_str(line.trim()).with_context(|| {
                format!("`{}` printed {line:?} (see its error above)", display(&cmd))
            })?;
            held.ports.extend(
                v["ports"]
                    .as_array()
                    .context("no ports")?
                    .iter()
                    .filter_map(|p| u16::try_from(p.as_u64()?).ok()),
            );
        }
        Ok(held)
    }

    /// Closes the connections (stdin EOF) and waits for the exits.
    fn release(mut self) -> Result<()> {
        for p in &mut self.procs {
            drop(p.child_mut().stdin.take());
        }
        for p in &mut self.procs {
            p.stop(libc::SIGTERM, Duration::from_mins(1))?;
        }
        Ok(())
    }
}

/// Total and count of `ss -m` socket storage (`o`) of established sockets
/// with a local or remote port in `ports`.
fn socket_storage(ports: &[u16]) -> Result<(u64, u64)> {
    let out = Command::new("ss")
        .args(["-tmnH", "state", "established"])
        .output()
        .context("cannot run ss (iproute2)")?;
    Ok(parse_ss_omem(&String::from_utf8_lossy(&out.stdout), ports))
}

/// Sums the `o` field of `skmem:(...)` for sockets whose local or peer port
/// is in `ports`. `ss -tmnH state established` prints each socket on one
/// line and its memory on the next.
pub fn parse_ss_omem(text: &str, ports: &[u16]) -> (u64, u64) {
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
    };
    let (mut total, mut count) = (0, 0);
    let mut wanted = false;
    for line in text.lines() {
        if let Some(mem) = line.trim().strip_prefix("skmem:(") {
            if wanted
                && let Some(o) = mem
                    .trim_end_matches(')')
                    .split(',')
                    .find_map(|f| f.strip_prefix('o')?.parse::<u64>().ok())
            {
                total += o;
                count += 1;
            }
            wanted = false;
        } else {
            let cols: Vec<&str> = line.split_whitespace().collect();
            wanted = cols.len() >= 4
                && cols[cols.len() - 2..]
                    .iter()
                    .any(|a| port_of(a).is_some_and(|p| ports.contains(&p)));
        }
    }
    (total, count)
}

/// 2b. The daemon's memory with many connections open.
fn memory(ctx: &mut Ctx, args: &Args) -> Result<Memory> {
    println!("== memory: tracked connections {:?}", args.memory);
    // What the same kind of sockets carry without conn-tracer (other
    // tracers' storage, if any).
    let probe = Held::open(ctx, 200)?;
    let (o, n) = socket_storage(&probe.ports)?;
    probe.release()?;
    let without = if n > 0 { o as f64 / n as f64 } else { 0.0 };

    let mut tracer = Tracer::start(ctx, Config::ConnTracer, &[])?;
    let pid = tracer.pid().context("no daemon pid")?;
    tracer.drained_metrics()?;
    let baseline_rss_bytes = procs::status_bytes(pid, "VmRSS")?;
    let mut points = Vec::new();
    let mut levels = args.memory.clone();
    levels.sort_unstable();
    for &target in &levels {
        let pairs = target.div_ceil(2);
        let before = tracer.drained_metrics()?.unwrap_or_default();
        let tracked_before = sum(&before, "conntracer_tracked_connections", &[]);
        let held = Held::open(ctx, pairs)?;
        // Wait for the daemon to track them all (bounded).
        let deadline = Instant::now() + Duration::from_mins(2);
        let mut text;
        loop {
            text = tracer.drained_metrics()?.unwrap_or_default();
            let tracked = sum(&text, "conntracer_tracked_connections", &[]);
            if tracked >= tracked_before + (2 * pairs) as f64 * 0.99 || Instant::now() > deadline {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        // A second scrape: the gauges are rebuilt on every scrape.
        let text2 = tracer.drained_metrics()?.unwrap_or(text);
        let (o, count) = socket_storage(&held.ports)?;
        let maps = procs::maps_of(pid)?;
        let point = MemoryPoint {
            tracked_target: target,
            tracked: sum(&text2, "conntracer_tracked_connections", &[]) as u64,
            loopback_connections: pairs,
            rss_bytes: procs::status_bytes(pid, "VmRSS")?,
            hwm_bytes: procs::status_bytes(pid, "VmHWM")?,
            map_bytes: maps.iter().map(|m| m.memlock).sum(),
            sk_storage_bytes: (o as f64 - without * count as f64).max(0.0) as u64,
            sockets_measured: count,
            lost: sum(&text2, "conntracer_events_lost_total", &[]) as u64,
        };
        println!(
            "  {} tracked ({} loopback connections): RSS {:.1} MiB (peak {:.1}), maps {:.1} MiB, \
             socket storage {:.1} MiB over {} sockets, lost {}",
            point.tracked,
            pairs,
            mib(point.rss_bytes),
            mib(point.hwm_bytes),
            mib(point.map_bytes),
            mib(point.sk_storage_bytes),
            point.sockets_measured,
            point.lost
        );
        points.push(point);
        held.release()?;
        // Let the closes drain before the next level.
        let deadline = Instant::now() + Duration::from_mins(1);
        while Instant::now() < deadline {
            let t = tracer.drained_metrics()?.unwrap_or_default();
            if sum(&t, "conntracer_tracked_connections", &[]) <= tracked_before + 1000.0 {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    let maps = procs::maps_of(pid)?;
    tracer.stop()?;
    Ok(Memory {
        baseline_rss_bytes,
        points,
        storage_without_tracer_per_socket: without,
        maps,
    })
}
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// 3. The userspace pipeline (tracer-user/benches/pipeline.rs), at two table sizes.
fn pipeline(args: &Args) -> Result<Vec<Pipeline>> {
    println!("== pipeline: decode + classify + aggregate, one core");
    let mut out = Vec::new();
    for window in [5_000_usize, 50_000] {
        let mut cmd = cargo();
        cmd.args(["bench", "-p", "tracer-user", "--bench", "pipeline", "--"])
            .args(["--json", "--seconds", &args.pipeline_seconds.to_string()])
            .args(["--window", &window.to_string()]);
        println!("$ {}", display(&cmd));
        let o = cmd
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run cargo bench")?;
        if !o.status.success() {
            bail!("`{}` failed ({})", display(&cmd), o.status);
        }
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("the pipeline bench printed no JSON")?;
        let v: Value = serde_json::from_str(line)?;
        let num = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("pipeline output lacks {k}"))
        };
        let p = Pipeline {
            tracked_connections: num("tracked_connections")? as u64,
            events_per_s: num("events_per_s")?,
            ns_per_event: num("ns_per_event")?,
            decode_only_events_per_s: num("decode_only_events_per_s")?,
            render_metrics_ms: num("render_metrics_ms")?,
            cpu: v["cpu"].as_u64(),
        };
        println!(
            "  {} tracked: {:.2} M events/s ({:.0} ns/event); /metrics render {:.1} ms",
            p.tracked_connections,
            p.events_per_s / 1e6,
            p.ns_per_event,
            p.render_metrics_ms
        );
        out.push(p);
    }
    let _ = std::io::stdout().flush();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_puts_every_configuration_in_every_position() {
        let rounds: Vec<Vec<Config>> = (0..3).map(|r| rotated(&Config::ALL, r)).collect();
        for pos in 0..3 {
            let mut at: Vec<Config> = rounds.iter().map(|r| r[pos]).collect();
            at.sort_by_key(|c| c.name());
            at.dedup();
            assert_eq!(at.len(), 3, "position {pos}: {rounds:?}");
        }
        assert_eq!(rotated(&Config::ALL, 3), rotated(&Config::ALL, 0));
    }

    #[test]
    fn bpftrace_output_counts() {
        let text = "Attaching 3 probes...\nready\nend 12 curl 443 5555 120\n\
                    end 13 nginx 80 4444 3\nLost 17 events\nsomething else\nLost 3 events\n";
        assert_eq!(bpftrace_counts(text), (2, 20));
        assert_eq!(bpftrace_counts(""), (0, 0));
    }

    #[test]
    fn socket_storage_of_the_wanted_ports_only() {
        let text = "0      0      127.0.0.1:41329 127.0.0.1:46220\n\
                    \t skmem:(r0,rb131072,t0,tb3939840,f0,w0,o344,bl0,d0)\n\
                    0      0      127.0.0.1:46220 127.0.0.1:41329\n\
                    \t skmem:(r0,rb131072,t0,tb3939840,f0,w0,o300,bl0,d0)\n\
                    0      0      [::1]:22 [::1]:50000\n\
                    \t skmem:(r0,rb131072,t0,tb3939840,f0,w0,o999,bl0,d0)\n";
        assert_eq!(parse_ss_omem(text, &[41329]), (644, 2));
        assert_eq!(parse_ss_omem(text, &[22]), (999, 1));
        assert_eq!(parse_ss_omem(text, &[1]), (0, 0));
    }
}
