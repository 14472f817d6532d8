//! Lost events: conn-tracer with a ring too small for the load must count
//! every event it could not deliver.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use loadgen::metrics::sum;
use serde::Serialize;

use crate::bench::{
    Args, Ctx,
    procs::{
        loadgen::churn_once,
        tracer::{Config, Tracer},
    },
};

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

/// Loss accounting with a ring too small for the load.
pub fn tiny_ring(ctx: &mut Ctx, args: &Args) -> Result<TinyRing> {
    println!(
        "== loss: conn-tracer with a {}-byte ring under full churn",
        args.tiny_ring
    );
    let mut tracer = Tracer::start(
        ctx,
        Config::ConnTracer,
        &["--ring-bytes".into(), args.tiny_ring.to_string()],
    )?;
    // Every record kind the daemon's loss counter covers: opens, closes,
    // and the `end` record of each connection its peer closes first.
    let opens_closes = |text: &str| {
        sum(text, "conntracer_events_total", &["kind=\"open\""])
            + sum(text, "conntracer_events_total", &["kind=\"close\""])
            + sum(text, "conntracer_events_total", &["kind=\"end\""])
    };
    let quiet = Duration::from_secs(2);
    let t0 = tracer.drained_metrics()?.unwrap_or_default();
    thread::sleep(quiet);
    let t1 = tracer.drained_metrics()?.unwrap_or_default();
    let background_per_s = (opens_closes(&t1) - opens_closes(&t0)) / quiet.as_secs_f64();
    let lost0 = sum(&t1, "conntracer_events_lost_total", &[]);
    let started = Instant::now();
    let out = churn_once(ctx, args.concurrency, args.seconds, None)?;
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
    // A connection makes 4 records (two opens, two closes) and one `end`
    // more when one side's FIN reaches the other first (not on a
    // simultaneous close): `expected` is the floor, up to one `end` per
    // connection comes on top.
    let ends = out.total_connections as f64;
    let allowance = background_per_s.mul_add(seconds * 3.0, 100.0) + expected as f64 * 0.005 + ends;
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
