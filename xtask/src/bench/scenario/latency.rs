//! Detection latency (section 4): from a server's close() of an idle
//! connection to the /metrics answer that counts the idle kill.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::bench::{
    Args, Ctx,
    procs::{
        loadgen::loadgen,
        tracer::{Config, Tracer},
    },
    stats::{self, Summary},
};

/// Detection latency samples.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples_ms: Vec<f64>,
    pub missed: u64,
    pub summary: Option<Summary>,
    pub p95_ms: f64,
    pub poll_us: u64,
}

/// 4. Detection latency of idle kills.
pub fn latency(ctx: &mut Ctx, args: &Args) -> Result<Latency> {
    println!(
        "== latency: {} idle kills, from the server's close() to /metrics",
        args.latency_samples
    );
    let tracer = Tracer::start(ctx, Config::ConnTracer, &[])?;
    let listen = tracer
        .metrics_addr()
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
