//! The charts (docs/bench/*.svg): what each one shows of a run's results.

use anyhow::Result;

use super::{
    ConfigSummary, levels,
    plot::{Bar, BarChart, LineChart, Target},
    ratio_of, short, summarize,
    targets::{CHURN_RATIO_TARGET, CHURN_RATIO_TARGET_HIGH, PIPELINE_TARGET, RSS_TARGET},
};
use crate::bench::{
    procs::tracer::Config,
    scenario::{
        Results,
        churn::ChurnRun,
        latency::Latency,
        memory::{Memory, MemoryPoint, mib},
        pipeline::Pipeline,
    },
    stats::Summary,
};

/// (file name, SVG) of every chart the results have data for.
pub fn charts(r: &Results) -> Result<Vec<(&'static str, String)>> {
    let mut out = Vec::new();
    if !r.churn.is_empty() {
        let sums = summarize(&r.churn);
        out.push(("churn.svg", churn(&sums).render()?));
        out.push(("cpu.svg", cpu(&sums).render()?));
    }
    if !r.scaling.is_empty() {
        out.push(("scaling.svg", scaling(&r.scaling).render()?));
    }
    if let Some(m) = &r.memory {
        out.push(("memory.svg", memory(m).render()?));
    }
    if !r.pipeline.is_empty() {
        out.push(("pipeline.svg", pipeline(&r.pipeline).render()?));
    }
    if let Some(l) = &r.latency {
        out.push(("latency.svg", latency(l).render()?));
    }
    Ok(out)
}

/// A bar per configuration: the median, whiskers from min to max.
fn summary_bars<'a>(
    sums: impl Iterator<Item = &'a ConfigSummary>,
    of: impl Fn(&ConfigSummary) -> Option<Summary>,
) -> Vec<Bar> {
    sums.map(|s| Bar {
        label: s.config.name().to_string(),
        value: of(s).map(|x| x.median),
        range: of(s).map(|x| (x.min, x.max)),
    })
    .collect()
}

/// A bar per value, no whiskers.
fn plain_bars(bars: impl Iterator<Item = (String, f64)>) -> Vec<Bar> {
    bars.map(|(label, v)| Bar {
        label,
        value: Some(v),
        range: None,
    })
    .collect()
}

fn churn(sums: &[ConfigSummary]) -> BarChart {
    let none = sums
        .iter()
        .find(|s| s.config == Config::NoTracer)
        .and_then(|s| s.conn_per_s);
    BarChart {
        title: "Loopback connection churn (median of rounds; whiskers: min-max)".into(),
        y_label: "connections / s".into(),
        bars: summary_bars(sums.iter(), |s| s.conn_per_s),
        target: none.map(|n| Target {
            value: n.median * CHURN_RATIO_TARGET,
            label: format!("target: {CHURN_RATIO_TARGET} x no tracer"),
        }),
    }
}

fn cpu(sums: &[ConfigSummary]) -> BarChart {
    let traced = sums.iter().filter(|s| s.cpu_s_per_100k.is_some());
    BarChart {
        title: "Tracer process CPU per 100k connections (median; whiskers: min-max)".into(),
        y_label: "CPU seconds".into(),
        bars: summary_bars(traced, |s| s.cpu_s_per_100k),
        target: None,
    }
}

fn scaling(runs: &[ChurnRun]) -> LineChart {
    let lv = levels(runs);
    // Levels grow by factors: drawn evenly, one step each.
    let series = [Config::ConnTracer, Config::HooksOnly]
        .iter()
        .chain(&Config::PEERS)
        .map(|&c| {
            let pts = lv
                .iter()
                .enumerate()
                .filter_map(|(i, (_, s))| Some((i as f64, ratio_of(s, c)?)))
                .collect();
            (c.name().to_string(), pts)
        })
        .collect();
    let x_ticks = lv
        .iter()
        .enumerate()
        .map(|(i, (l, _))| (i as f64, l.to_string()))
        .collect();
    LineChart {
        title: "Churn throughput relative to no tracer, by load".into(),
        x_label: "connections in flight (load level)".into(),
        y_label: "throughput / no tracer".into(),
        series,
        target: Some(Target {
            value: CHURN_RATIO_TARGET_HIGH,
            label: format!("target {CHURN_RATIO_TARGET_HIGH} at the highest load"),
        }),
        y_from_zero: false,
        x_ticks: Some(x_ticks),
    }
}

fn memory(m: &Memory) -> LineChart {
    let pts = |f: &dyn Fn(&MemoryPoint) -> u64| {
        m.points
            .iter()
            .map(|p| (p.tracked as f64, mib(f(p))))
            .collect::<Vec<_>>()
    };
    LineChart {
        title: "Memory by tracked connections".into(),
        x_label: "tracked connections".into(),
        y_label: "MiB".into(),
        series: vec![
            ("daemon RSS".into(), pts(&|p| p.rss_bytes)),
            (
                "kernel: maps + socket storage".into(),
                pts(&|p| p.map_bytes + p.sk_storage_bytes),
            ),
        ],
        target: Some(Target {
            value: mib(RSS_TARGET),
            label: format!("RSS target {} MiB", RSS_TARGET / 1024 / 1024),
        }),
        y_from_zero: true,
        x_ticks: None,
    }
}

fn pipeline(runs: &[Pipeline]) -> BarChart {
    BarChart {
        title: "Userspace pipeline, one core: decode + classify + aggregate".into(),
        y_label: "events / s".into(),
        bars: plain_bars(runs.iter().map(|p| {
            (
                format!("{} tracked", short(p.tracked_connections as f64)),
                p.events_per_s,
            )
        })),
        target: Some(Target {
            value: PIPELINE_TARGET,
            label: "target 2M events/s".into(),
        }),
    }
}

fn latency(l: &Latency) -> BarChart {
    BarChart {
        title: "Idle kill to /metrics, each sample (target <= 1000 ms)".into(),
        y_label: "milliseconds".into(),
        bars: plain_bars(
            l.samples_ms
                .iter()
                .enumerate()
                .map(|(i, &ms)| ((i + 1).to_string(), ms)),
        ),
        target: None,
    }
}
