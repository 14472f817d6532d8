//! What a tracer adds to every system call on the host (section "syscalls"):
//! the cost of one cheap system call (`getppid`, a tight loop in this
//! process), with no tracer, with conn-tracer as it runs by default, and
//! with conn-tracer's fallback for Linux 5.10 (`--no-sockopts`: the accept
//! syscall tracepoints instead of the cgroup getsockopt observer). While
//! any syscall tracepoint is attached the kernel sends every system call of
//! every process through its traced entry and exit: a cost no program's
//! run time (`bpf_stats`) shows. Rounds interleave the configurations; each
//! measures after the host settles from the start (and the previous stop),
//! and keeps its fastest loop (noise only ever adds).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;

use crate::bench::{
    Args, Ctx,
    procs::tracer::{Config, Tracer, rotated},
    stats::percentile,
};

/// Calls timed per sample.
const CALLS: u32 = 2_000_000;
/// Loops per configuration and round (the fastest is kept).
const SAMPLES: usize = 5;
/// Pause after a tracer starts (and the previous one stopped) before the loops.
const SETTLE: Duration = Duration::from_secs(2);

/// One configuration's cost of a system call, over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct SyscallCost {
    pub name: String,
    /// ns per `getppid` of each round (its fastest loop).
    pub ns_per_call: Vec<f64>,
}

impl SyscallCost {
    /// The median over the rounds.
    pub fn median(&self) -> f64 {
        percentile(&self.ns_per_call, 50.0)
    }
}

/// The configurations: (name, tracer, its extra arguments).
fn configs() -> [(&'static str, Config, Vec<String>); 3] {
    [
        ("no tracer", Config::NoTracer, Vec::new()),
        ("conn-tracer (default)", Config::ConnTracer, Vec::new()),
        (
            "conn-tracer --no-sockopts (the 5.10 fallback: accept syscall tracepoints)",
            Config::ConnTracer,
            vec!["--no-sockopts".into()],
        ),
    ]
}

/// ns per `getppid` call: the fastest of [`SAMPLES`] loops of [`CALLS`].
#[expect(clippy::cast_precision_loss, reason = "nanoseconds of a few seconds")]
fn getppid_ns() -> f64 {
    (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..CALLS {
                // SAFETY: a system call without arguments or side effects.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            t.elapsed().as_nanos() as f64 / f64::from(CALLS)
        })
        .fold(f64::INFINITY, f64::min)
}

pub fn syscalls(ctx: &mut Ctx, args: &Args) -> Result<Vec<SyscallCost>> {
    println!("== syscalls: ns per getppid() with each configuration attached");
    let configs = configs();
    let mut out: Vec<SyscallCost> = configs
        .iter()
        .map(|(name, ..)| SyscallCost {
            name: (*name).into(),
            ns_per_call: Vec::new(),
        })
        .collect();
    let rounds = args.rounds.min(5);
    let order: Vec<usize> = (0..configs.len()).collect();
    for round in 0..rounds {
        // Rotated like the churn rounds: no configuration always runs
        // right after the same other one stopped.
        for i in rotated(&order, round) {
            let (name, config, extra) = &configs[i];
            let tracer = Tracer::start(ctx, *config, extra)?;
            thread::sleep(SETTLE);
            let ns = getppid_ns();
            tracer.stop()?;
            println!("  round {}: {name}: {ns:.1} ns per call", round + 1);
            out[i].ns_per_call.push(ns);
        }
    }
    Ok(out)
}
