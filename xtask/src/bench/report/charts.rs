//! The charts (docs/bench/*.svg): what each one shows of a run's results.

use super::{
    ConfigSummary, levels, ratio_of, summarize,
    svg::{BarChart, LineChart, Target, short},
    targets::{CHURN_RATIO_TARGET, PIPELINE_TARGET, RSS_TARGET},
};
use crate::bench::{
    procs::tracer::Config,
    scenario::{
        Results,
        memory::{MemoryPoint, mib},
    },
};

#[expect(clippy::too_many_lines, reason = "one chart after another")]
pub fn charts(r: &Results) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let churn = summarize(&r.churn);
    if !r.churn.is_empty() {
        let none = churn
            .iter()
            .find(|s| s.config == Config::NoTracer)
            .and_then(|s| s.conn_per_s);
        out.push((
            "churn.svg",
            BarChart {
                title: "Loopback connection churn (median of rounds; whiskers: min-max)".into(),
                y_label: "connections / s".into(),
                categories: churn.iter().map(|s| s.config.name().to_string()).collect(),
                series: vec!["connections/s".into()],
                values: vec![
                    churn
                        .iter()
                        .map(|s| s.conn_per_s.map(|x| x.median))
                        .collect(),
                ],
                ranges: vec![
                    churn
                        .iter()
                        .map(|s| s.conn_per_s.map(|x| (x.min, x.max)))
                        .collect(),
                ],
                target: none.map(|n| Target {
                    value: n.median * CHURN_RATIO_TARGET,
                    label: format!("target: {CHURN_RATIO_TARGET} x no tracer"),
                }),
            }
            .render(),
        ));
        let traced: Vec<&ConfigSummary> = churn
            .iter()
            .filter(|s| s.cpu_s_per_100k.is_some())
            .collect();
        out.push((
            "cpu.svg",
            BarChart {
                title: "Tracer process CPU per 100k connections (median; whiskers: min-max)".into(),
                y_label: "CPU seconds".into(),
                categories: traced.iter().map(|s| s.config.name().to_string()).collect(),
                series: vec!["CPU s / 100k connections".into()],
                values: vec![
                    traced
                        .iter()
                        .map(|s| s.cpu_s_per_100k.map(|x| x.median))
                        .collect(),
                ],
                ranges: vec![
                    traced
                        .iter()
                        .map(|s| s.cpu_s_per_100k.map(|x| (x.min, x.max)))
                        .collect(),
                ],
                target: None,
            }
            .render(),
        ));
    }
    if !r.scaling.is_empty() {
        let lv = levels(&r.scaling);
        // Levels grow by factors: drawn evenly, one step each.
        let series = [Config::ConnTracer, Config::Bpftrace]
            .iter()
            .map(|&c| {
                let pts = lv
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, s))| Some((i as f64, ratio_of(s, c)?)))
                    .collect();
                (c.name().to_string(), pts)
            })
            .collect();
        let x_ticks = Some(
            lv.iter()
                .enumerate()
                .map(|(i, (l, _))| (i as f64, l.to_string()))
                .collect(),
        );
        out.push((
            "scaling.svg",
            LineChart {
                title: "Churn throughput relative to no tracer, by load".into(),
                x_label: "connections in flight (load level)".into(),
                y_label: "throughput / no tracer".into(),
                series,
                target: Some(Target {
                    value: CHURN_RATIO_TARGET,
                    label: format!("target {CHURN_RATIO_TARGET}"),
                }),
                y_from_zero: false,
                x_ticks,
            }
            .render(),
        ));
    }
    if let Some(m) = &r.memory {
        let pts = |f: &dyn Fn(&MemoryPoint) -> u64| {
            m.points
                .iter()
                .map(|p| (p.tracked as f64, mib(f(p))))
                .collect::<Vec<_>>()
        };
        out.push((
            "memory.svg",
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
                    label: "RSS target 64 MiB".into(),
                }),
                y_from_zero: true,
                x_ticks: None,
            }
            .render(),
        ));
    }
    if !r.pipeline.is_empty() {
        out.push((
            "pipeline.svg",
            BarChart {
                title: "Userspace pipeline, one core: decode + classify + aggregate".into(),
                y_label: "events / s".into(),
                categories: r
                    .pipeline
                    .iter()
                    .map(|p| format!("{} tracked", short(p.tracked_connections as f64)))
                    .collect(),
                series: vec!["events/s".into()],
                values: vec![r.pipeline.iter().map(|p| Some(p.events_per_s)).collect()],
                ranges: vec![vec![None; r.pipeline.len()]],
                target: Some(Target {
                    value: PIPELINE_TARGET,
                    label: "target 2M events/s".into(),
                }),
            }
            .render(),
        ));
    }
    if let Some(l) = &r.latency {
        out.push((
            "latency.svg",
            BarChart {
                title: "Idle kill to /metrics, each sample (target <= 1000 ms)".into(),
                y_label: "milliseconds".into(),
                categories: (1..=l.samples_ms.len()).map(|i| i.to_string()).collect(),
                series: vec!["latency".into()],
                values: vec![l.samples_ms.iter().map(|&x| Some(x)).collect()],
                ranges: vec![vec![None; l.samples_ms.len()]],
                target: None,
            }
            .render(),
        ));
    }
    out
}
