//! The userspace pipeline (section 3): `cargo bench -p tracer-user --bench
//! pipeline` (decode, classify, aggregate on one core), at two table sizes.

use std::{io::Write as _, process::Stdio};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::{
    bench::Args,
    cmd::{cargo, display},
};

/// One userspace pipeline measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Pipeline {
    pub tracked_connections: u64,
    pub events_per_s: f64,
    pub ns_per_event: f64,
    pub decode_only_events_per_s: f64,
    pub render_metrics_ms: f64,
    /// The same stream as app -> sidecar -> upstream chains of a meshed
    /// pod, pod attribution and chain linking on.
    pub mesh_events_per_s: f64,
    pub mesh_ns_per_event: f64,
    pub cpu: Option<u64>,
}

/// 3. The userspace pipeline (tracer-user/benches/pipeline.rs), at two table sizes.
pub fn pipeline(args: &Args) -> Result<Vec<Pipeline>> {
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
            mesh_events_per_s: num("mesh_events_per_s")?,
            mesh_ns_per_event: num("mesh_ns_per_event")?,
            cpu: v["cpu"].as_u64(),
        };
        println!(
            "  {} tracked: {:.2} M events/s ({:.0} ns/event); /metrics render {:.1} ms; \
             meshed pod with chains {:.2} M events/s ({:.0} ns/event)",
            p.tracked_connections,
            p.events_per_s / 1e6,
            p.ns_per_event,
            p.render_metrics_ms,
            p.mesh_events_per_s / 1e6,
            p.mesh_ns_per_event
        );
        out.push(p);
    }
    let _ = std::io::stdout().flush();
    Ok(out)
}
