//! Memory (section 2, scaling): the daemon's RSS and the kernel's socket
//! storage and maps with many connections held open.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use loadgen::metrics::sum;
use serde::Serialize;

use crate::bench::{
    Args, Ctx,
    procs::{
        self, MapInfo,
        loadgen::Held,
        tracer::{Config, Tracer},
    },
    stats,
};

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
    /// The periodic resync with the largest level held.
    pub resync: Option<Resync>,
}

/// Resyncs of a daemon tracking every held connection, then of one whose
/// table holds half of them.
#[derive(Debug, Clone, Serialize)]
pub struct Resync {
    pub tracked: u64,
    pub interval_s: u64,
    /// The last resync's wall and CPU time (`conntracer_resync_duration_seconds`,
    /// `conntracer_resync_cpu_seconds`), over `samples` resyncs: median and max.
    pub samples: usize,
    pub duration_median_s: f64,
    pub duration_max_s: f64,
    pub cpu_median_s: f64,
    pub cpu_max_s: f64,
    /// The daemon's RSS after them.
    pub rss_bytes: u64,
    /// The daemon with `--max-connections full_cap`: over `full_resyncs`
    /// resyncs, table evictions, the opens and ends that may have caused
    /// them, and sockets the resyncs left out.
    pub full_cap: u64,
    pub full_resyncs: u64,
    pub full_evictions: u64,
    pub full_inserts: u64,
    pub full_not_added: u64,
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
pub fn memory(ctx: &mut Ctx, args: &Args) -> Result<Memory> {
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
    // At the level the RSS target is set for (100k tracked), else the largest.
    let at = levels
        .iter()
        .copied()
        .find(|&l| l >= RESYNC_AT)
        .or(levels.last().copied());
    let resync = match at {
        Some(level) => Some(resync(ctx, level.div_ceil(2))?),
        None => None,
    };
    Ok(Memory {
        baseline_rss_bytes,
        points,
        storage_without_tracer_per_socket: without,
        maps,
        resync,
    })
}

/// Tracked connections the resync is measured with (the RSS target's).
const RESYNC_AT: usize = 100_000;

/// Resyncs completed by the daemon (`conntracer_resyncs_total`).
fn resyncs(text: &str) -> f64 {
    sum(text, "conntracer_resyncs_total", &[])
}

/// Waits (bounded) for `n` more resyncs than `text` shows; the metrics after.
fn after_resyncs(tracer: &mut Tracer, text: &str, n: f64, interval: u64) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs((n as u64 + 2) * interval + 30);
    loop {
        let now = tracer.drained_metrics()?.unwrap_or_default();
        if resyncs(&now) >= resyncs(text) + n {
            return Ok(now);
        }
        anyhow::ensure!(Instant::now() < deadline, "no resync within the deadline");
        thread::sleep(Duration::from_millis(200));
    }
}

/// 2b'. The periodic resync with `pairs` loopback connections held: its
/// duration and CPU, and that a full table is not churned by it.
fn resync(ctx: &mut Ctx, pairs: usize) -> Result<Resync> {
    const INTERVAL: u64 = 5;
    const SAMPLES: usize = 3;
    println!("== resync: {} held connections", 2 * pairs);
    let held = Held::open(ctx, pairs)?;
    let interval = ["--resync-interval".to_string(), format!("{INTERVAL}s")];
    let mut tracer = Tracer::start(ctx, Config::ConnTracer, &interval)?;
    let pid = tracer.pid().context("no daemon pid")?;
    // The start-up resync found them all; then each periodic one.
    let mut text = tracer.drained_metrics()?.unwrap_or_default();
    let tracked = sum(&text, "conntracer_tracked_connections", &[]) as u64;
    let (mut durations, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        text = after_resyncs(&mut tracer, &text, 1.0, INTERVAL)?;
        durations.push(sum(&text, "conntracer_resync_duration_seconds", &[]));
        cpus.push(sum(&text, "conntracer_resync_cpu_seconds", &[]));
    }
    let rss_bytes = procs::status_bytes(pid, "VmRSS")?;
    tracer.stop()?;

    // A table with room for half of them: the evicted stay out.
    let full_cap = (pairs as u64).max(1);
    let args = [
        interval[0].clone(),
        interval[1].clone(),
        "--max-connections".to_string(),
        full_cap.to_string(),
    ];
    let mut full = Tracer::start(ctx, Config::ConnTracer, &args)?;
    let first = after_resyncs(&mut full, "", 1.0, INTERVAL)?;
    let last = after_resyncs(&mut full, &first, SAMPLES as f64, INTERVAL)?;
    let delta = |name: &str, labels: &[&str]| {
        (sum(&last, name, labels) - sum(&first, name, labels)).max(0.0) as u64
    };
    let r = Resync {
        tracked,
        interval_s: INTERVAL,
        samples: SAMPLES,
        duration_median_s: stats::percentile(&durations, 50.0),
        duration_max_s: durations.iter().copied().fold(0.0, f64::max),
        cpu_median_s: stats::percentile(&cpus, 50.0),
        cpu_max_s: cpus.iter().copied().fold(0.0, f64::max),
        rss_bytes,
        full_cap,
        full_resyncs: (resyncs(&last) - resyncs(&first)) as u64,
        full_evictions: delta("conntracer_table_evictions_total", &[]),
        full_inserts: delta("conntracer_events_total", &["kind=\"open\""])
            + delta("conntracer_events_total", &["kind=\"end\""]),
        full_not_added: delta("conntracer_resync_not_added_total", &[]),
    };
    full.stop()?;
    held.release()?;
    println!(
        "  {} tracked: resync {:.0} ms (max {:.0}), CPU {:.0} ms (max {:.0}); full table of {}: \
         {} resyncs, {} evictions ({} opens/ends), {} left out",
        r.tracked,
        r.duration_median_s * 1e3,
        r.duration_max_s * 1e3,
        r.cpu_median_s * 1e3,
        r.cpu_max_s * 1e3,
        r.full_cap,
        r.full_resyncs,
        r.full_evictions,
        r.full_inserts,
        r.full_not_added
    );
    Ok(r)
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
