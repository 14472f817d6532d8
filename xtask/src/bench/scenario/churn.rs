//! Connection churn at the chosen load (section 1 of docs/benchmarks.md) and
//! at several load levels (2, scaling).

use std::{thread, time::Duration};

use anyhow::Result;
use serde::Serialize;

use crate::bench::{
    Args, Ctx,
    procs::{
        loadgen::churn_once,
        tracer::{Config, Tracer, rotated},
    },
};

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
    /// peers: printed lines, i.e. connection ends or state changes).
    pub events: Option<u64>,
    pub lost: Option<u64>,
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
    let out = churn_once(ctx, concurrency, seconds, None)?;
    // The daemon drains what is left at its next 50 ms beat (a scrape
    // drains it at once).
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
        "  round {} {:<18} c={:<3} {:>9.0} conn/s  cpu {:>6}  events {:>9}  lost {:>6}{}",
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
pub fn churn(ctx: &mut Ctx, args: &Args) -> Result<Vec<ChurnRun>> {
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
            if config.is_peer() {
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
pub fn scaling(ctx: &mut Ctx, args: &Args) -> Result<Vec<ChurnRun>> {
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
            if config.is_peer() {
                // A peer's counts cover all levels of this round at once.
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
