//! The targets the numbers are held against, and how a run did.

use serde::Serialize;

use super::{levels, ratio_of, short, summarize};
use crate::bench::{
    procs::tracer::Config,
    scenario::{
        Results,
        memory::{Resync, mib},
        paced::PacedRun,
    },
};

/// Target: churn throughput with conn-tracer, as a fraction of no tracer,
/// at the churn section's load (16 in flight by default)...
pub const CHURN_RATIO_TARGET: f64 = 0.95;
/// ... and at the highest scaling level (256 in flight by default).
pub const CHURN_RATIO_TARGET_HIGH: f64 = 0.90;
/// Target: daemon RSS with this many tracked connections...
pub const RSS_AT: usize = 100_000;
/// ... at most this many bytes.
pub const RSS_TARGET: u64 = 48 * 1024 * 1024;
/// Target: one `/metrics` render with 100k tracked connections, milliseconds.
pub const RENDER_TARGET_MS: f64 = 10.0;
/// Target: conn-tracer's whole CPU (process + kernel programs) at this
/// paced rate...
pub const PACED_AT: f64 = 10_000.0;
/// ... at most this many millicores.
pub const PACED_TARGET_MCPU: f64 = 20.0;
/// Target: peak daemon RSS with the simulated cluster's index, at most
/// half the DaemonSet's memory limit (the rest is the connection table's).
pub const CLUSTER_RSS_TARGET: u64 = 256 * 1024 * 1024;
/// Target: userspace pipeline events per second on one core.
pub const PIPELINE_TARGET: f64 = 2e6;
/// Target: detection latency of an idle kill, milliseconds.
pub const LATENCY_TARGET_MS: f64 = 1000.0;

/// A target and how this run did against it.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    pub target: String,
    pub value: String,
    pub pass: bool,
}

/// Every target, with this run's value.
pub fn verdicts(r: &Results) -> Vec<Verdict> {
    let mut v = Vec::new();
    churn_verdicts(r, &mut v);
    if let Some((level, sums)) = levels(&r.scaling).into_iter().last() {
        let ct = ratio_of(&sums, Config::ConnTracer);
        let floor = ratio_of(&sums, Config::HooksOnly);
        v.push(Verdict {
            name: format!("churn throughput with conn-tracer / no tracer, {level} in flight"),
            target: format!(">= {CHURN_RATIO_TARGET_HIGH}"),
            value: with_floor(ct, floor, CHURN_RATIO_TARGET_HIGH),
            pass: ct.is_some_and(|x| x >= CHURN_RATIO_TARGET_HIGH),
        });
    }
    v.extend(paced_verdict(r));
    if let Some(t) = &r.tiny_ring {
        v.push(Verdict {
            name: format!("every loss counted with a {}-byte ring", t.ring_bytes),
            target: "lost > 0 and received + lost >= expected".into(),
            value: format!(
                "lost {} (counted), received {} + lost - expected {} = {:+}",
                t.lost, t.received, t.expected, t.excess
            ),
            pass: t.pass,
        });
    }
    if let Some(m) = &r.memory {
        let at = m
            .points
            .iter()
            .filter(|p| p.tracked_target >= RSS_AT)
            .min_by_key(|p| p.tracked_target);
        v.push(Verdict {
            name: format!(
                "daemon RSS with {} tracked connections",
                short(RSS_AT as f64)
            ),
            target: format!("<= {} MiB", RSS_TARGET / 1024 / 1024),
            value: at.map_or("-".into(), |p| {
                format!("{:.1} MiB ({} tracked)", mib(p.rss_bytes), p.tracked)
            }),
            pass: at.is_some_and(|p| p.rss_bytes <= RSS_TARGET),
        });
        v.extend(m.resync.as_ref().map(resync_verdict));
    }
    v.extend(r.cluster.as_ref().map(cluster_verdict));
    if !r.pipeline.is_empty() {
        let worst = r
            .pipeline
            .iter()
            .map(|p| p.events_per_s)
            .fold(f64::INFINITY, f64::min);
        if let Some(big) = r
            .pipeline
            .iter()
            .filter(|p| p.tracked_connections >= RSS_AT as u64)
            .min_by_key(|p| p.tracked_connections)
        {
            v.push(Verdict {
                name: format!(
                    "one /metrics render with {} tracked connections",
                    short(big.tracked_connections as f64)
                ),
                target: format!("<= {RENDER_TARGET_MS} ms"),
                value: format!("{:.2} ms", big.render_metrics_ms),
                pass: big.render_metrics_ms <= RENDER_TARGET_MS,
            });
        }
        v.push(Verdict {
            name: "userspace pipeline on one core (slowest table size)".into(),
            target: ">= 2M events/s".into(),
            value: format!("{:.2}M events/s", worst / 1e6),
            pass: worst >= PIPELINE_TARGET,
        });
    }
    if let Some(l) = &r.latency {
        let max = l.summary.map_or(f64::INFINITY, |s| s.max);
        v.push(Verdict {
            name: "idle-kill detection latency (worst sample)".into(),
            target: "<= 1 s".into(),
            value: format!("{max:.1} ms, {} missed", l.missed),
            pass: max <= LATENCY_TARGET_MS && l.missed == 0,
        });
    }
    v
}

/// The paced-CPU target, with the same run's floor (the hooks alone).
fn paced_verdict(r: &Results) -> Option<Verdict> {
    let run = r
        .paced
        .iter()
        .filter(|p| p.config == Config::ConnTracer && p.rate >= PACED_AT)
        .min_by(|a, b| a.rate.total_cmp(&b.rate))?;
    let m = run.millicores();
    let floor = r
        .paced
        .iter()
        .find(|p| p.config == Config::HooksOnly && p.rate.total_cmp(&run.rate).is_eq())
        .and_then(PacedRun::millicores);
    Some(Verdict {
        name: format!(
            "conn-tracer CPU (process + kernel programs) at {} connections/s",
            short(run.rate)
        ),
        target: format!("<= {PACED_TARGET_MCPU} mCPU"),
        value: m.map_or("-".into(), |m| {
            let floor = floor.map_or(String::new(), |f| {
                floor_note(&format!("{f:.1} mCPU"), f > PACED_TARGET_MCPU)
            });
            format!(
                "{m:.1} mCPU at {:.0} connections/s{floor}",
                run.out.conn_per_s
            )
        }),
        pass: m.is_some_and(|m| m <= PACED_TARGET_MCPU),
    })
}

/// A churn ratio with the same run's floor (the hooks alone, disarmed) and
/// what it says: where the floor itself is below the target, no tracer on
/// these hooks can reach it on this machine.
fn with_floor(ratio: Option<f64>, floor: Option<f64>, target: f64) -> String {
    let mut s = ratio.map_or("-".into(), |x| format!("{x:.3}"));
    if let Some(f) = floor {
        s += &floor_note(&format!("{f:.3}"), f < target);
    }
    s
}

/// "; the hooks' floor VALUE", and whether the floor alone misses the target.
fn floor_note(value: &str, misses: bool) -> String {
    let mut s = format!("; the hooks' floor {value}");
    if misses {
        s += ": the floor alone misses the target";
    }
    s
}

/// The churn section's targets: the ratio, the peers, no loss.
fn churn_verdicts(r: &Results, v: &mut Vec<Verdict>) {
    let churn = summarize(&r.churn);
    if !r.churn.is_empty() {
        let ct = ratio_of(&churn, Config::ConnTracer);
        v.push(Verdict {
            name: "churn throughput with conn-tracer / no tracer (median of rounds)".into(),
            target: format!(">= {CHURN_RATIO_TARGET}"),
            value: with_floor(ct, ratio_of(&churn, Config::HooksOnly), CHURN_RATIO_TARGET),
            pass: ct.is_some_and(|x| x >= CHURN_RATIO_TARGET),
        });
        for peer in Config::PEERS {
            let pt = ratio_of(&churn, peer);
            v.push(Verdict {
                name: format!("churn throughput, conn-tracer vs the {} peer", peer.name()),
                target: format!("> {}", peer.name()),
                value: format!(
                    "{} vs {}",
                    ct.map_or("-".into(), |x| format!("{x:.3}")),
                    pt.map_or("-".into(), |x| format!("{x:.3}"))
                ),
                pass: ct.zip(pt).is_some_and(|(c, p)| c > p),
            });
        }
        let ct_runs = r
            .churn
            .iter()
            .chain(&r.scaling)
            .filter(|x| x.config == Config::ConnTracer);
        let (events, lost) = ct_runs.fold((0, 0), |(e, l), x| {
            (e + x.events.unwrap_or(0), l + x.lost.unwrap_or(0))
        });
        v.push(Verdict {
            name: "events lost at the highest churn, default ring (all churn and scaling runs)"
                .into(),
            target: "0".into(),
            value: format!("{lost} of {events}"),
            pass: lost == 0 && events > 0,
        });
    }
}

/// The cluster-index target.
fn cluster_verdict(c: &crate::bench::scenario::cluster::Cluster) -> Verdict {
    Verdict {
        name: format!(
            "daemon peak RSS with the index of {} pods / {} Services",
            short(c.pods as f64),
            short(c.services as f64)
        ),
        target: format!("<= {} MiB", CLUSTER_RSS_TARGET / 1024 / 1024),
        value: format!(
            "{:.1} MiB through a relist ({} endpoints indexed)",
            mib(c.relist_hwm_bytes),
            c.indexed_endpoints
        ),
        pass: c.relist_hwm_bytes <= CLUSTER_RSS_TARGET
            && c.indexed_endpoints >= c.endpoints as u64
            && c.relist_endpoints >= c.endpoints as u64,
    }
}

/// The periodic resync: stated, and a full table not churned by it.
fn resync_verdict(rs: &Resync) -> Verdict {
    Verdict {
        name: format!(
            "periodic resync with {} tracked: duration and CPU stated; a full table not churned",
            short(rs.tracked as f64)
        ),
        target: "evictions over resyncs <= opens and ends".into(),
        value: format!(
            "{:.0} ms, {:.0} ms CPU; {} evictions, {} opens/ends, {} left out over {} resyncs",
            rs.duration_median_s * 1e3,
            rs.cpu_median_s * 1e3,
            rs.full_evictions,
            rs.full_inserts,
            rs.full_not_added,
            rs.full_resyncs
        ),
        pass: rs.full_resyncs > 0 && rs.full_not_added > 0 && rs.full_evictions <= rs.full_inserts,
    }
}
