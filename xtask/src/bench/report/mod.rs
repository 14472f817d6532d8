//! What a run writes: docs/benchmarks.md (`markdown`), docs/bench/*.svg
//! (`charts` says what each shows, `plot` draws them with plotters) and
//! docs/bench/summary.json, from the scenarios' results, with the verdicts
//! against the targets (`targets`).

mod charts;
mod markdown;
mod plot;
mod targets;

use std::{collections::BTreeMap, fs, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

pub use self::targets::{Verdict, verdicts};
use crate::{
    bench::{
        Args,
        procs::tracer::Config,
        scenario::{Results, churn::ChurnRun},
        stats::Summary,
    },
    cmd::{probe, workspace_root},
};

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub commit: String,
    pub load_average_at_start: String,
}

impl Machine {
    pub fn probe() -> Self {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
            .unwrap_or("?")
            .trim()
            .to_string();
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let mem_kb: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0);
        let git = |args: &[&str]| {
            probe(Command::new("git").current_dir(workspace_root()).args(args))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let mut commit = git(&["rev-parse", "--short=12", "HEAD"]);
        if !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            commit.push_str(" (with uncommitted changes)");
        }
        Self {
            date: probe(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
                .unwrap_or_default()
                .trim()
                .to_string(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu_model,
            cpus,
            memory_gib: mem_kb / 1024.0 / 1024.0,
            commit,
            load_average_at_start: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// Per-configuration summary of churn runs.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    pub config: Config,
    pub conn_per_s: Option<Summary>,
    /// Throughput / no-tracer throughput of the same round.
    pub ratio: Option<Summary>,
    pub cpu_s_per_100k: Option<Summary>,
    pub events: u64,
    pub lost: u64,
    pub runs: usize,
}

/// Summaries of `runs` (one concurrency level) per configuration.
pub fn summarize(runs: &[ChurnRun]) -> Vec<ConfigSummary> {
    let base: BTreeMap<usize, f64> = runs
        .iter()
        .filter(|r| r.config == Config::NoTracer)
        .map(|r| (r.round, r.conn_per_s))
        .collect();
    Config::ALL
        .iter()
        .map(|&config| {
            let mine: Vec<&ChurnRun> = runs.iter().filter(|r| r.config == config).collect();
            let rates: Vec<f64> = mine.iter().map(|r| r.conn_per_s).collect();
            let ratios: Vec<f64> = mine
                .iter()
                .filter_map(|r| Some(r.conn_per_s / base.get(&r.round)?))
                .collect();
            let cpu: Vec<f64> = mine
                .iter()
                .filter_map(|r| {
                    let c = r.tracer_cpu_s?;
                    (r.total_connections > 0).then(|| c / r.total_connections as f64 * 1e5)
                })
                .collect();
            ConfigSummary {
                config,
                conn_per_s: Summary::of(&rates),
                ratio: Summary::of(&ratios),
                cpu_s_per_100k: Summary::of(&cpu),
                events: mine.iter().filter_map(|r| r.events).sum(),
                lost: mine.iter().filter_map(|r| r.lost).sum(),
                runs: mine.len(),
            }
        })
        .collect()
}

fn ratio_of(summaries: &[ConfigSummary], config: Config) -> Option<f64> {
    summaries
        .iter()
        .find(|s| s.config == config)
        .and_then(|s| s.ratio)
        .map(|r| r.median)
}

/// One run, ready to write.
pub struct Report<'a> {
    pub out: &'a Path,
    pub command: &'a str,
    pub machine: &'a Machine,
    pub args: &'a Args,
    pub results: &'a Results,
    pub verdicts: &'a [Verdict],
    pub other_tracers: Vec<(u32, String, usize)>,
    pub took: Duration,
}

pub fn write(rep: &Report<'_>) -> Result<()> {
    let dir = rep.out.join("bench");
    fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let charts = charts::charts(rep.results)?;
    for (name, svg) in &charts {
        fs::write(dir.join(name), svg)?;
    }
    let mut other: Vec<String> = rep
        .other_tracers
        .iter()
        .map(|(pid, comm, n)| format!("{comm} (pid {pid}, {n} programs)"))
        .collect();
    other.sort();
    other.dedup();
    let summary = json!({
        "command": rep.command,
        "machine": rep.machine,
        "took_seconds": rep.took.as_secs_f64(),
        "other_bpf_holders": other,
        "targets": rep.verdicts,
        "churn": summarize(&rep.results.churn),
        "scaling": levels(&rep.results.scaling),
        "results": rep.results,
    });
    fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let md = markdown::markdown(rep, &charts, &other);
    fs::write(rep.out.join("benchmarks.md"), md)?;
    Ok(())
}

/// Scaling summaries by load level.
fn levels(runs: &[ChurnRun]) -> Vec<(usize, Vec<ConfigSummary>)> {
    let mut lv: Vec<usize> = runs.iter().map(|r| r.concurrency).collect();
    lv.sort_unstable();
    lv.dedup();
    lv.into_iter()
        .map(|l| {
            let at: Vec<ChurnRun> = runs
                .iter()
                .filter(|r| r.concurrency == l)
                .cloned()
                .collect();
            (l, summarize(&at))
        })
        .collect()
}

/// A short human form: 1234 -> "1234", 45678 -> "45.7k", 2500000 -> "2.5M",
/// 0.981 -> "0.981" (axis ticks, bar values, chart and target names).
pub fn short(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = if scaled.abs() >= 100.0 || scaled.fract() == 0.0 {
        0
    } else if scaled.abs() >= 10.0 {
        1
    } else if scaled.abs() >= 1.0 {
        2
    } else {
        3
    };
    let text = format!("{scaled:.digits$}");
    // 2.50 -> 2.5, 3.00 -> 3
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers() {
        assert_eq!(short(0.0), "0");
        assert_eq!(short(0.981), "0.981");
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(64.0), "64");
        assert_eq!(short(1234.0), "1234");
        assert_eq!(short(45_000.0), "45k");
        assert_eq!(short(45_678.0), "45.7k");
        assert_eq!(short(2_500_000.0), "2.5M");
        assert_eq!(short(-12_000.0), "-12k");
    }
}
