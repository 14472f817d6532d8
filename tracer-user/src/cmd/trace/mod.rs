//! `conn-tracer trace`: every connection event, live. Wires the kernel's
//! event ring to stdout: each event, its addresses completed from earlier
//! events of its socket ([`memo`]), printed as JSON or text ([`record`]).

mod memo;
mod record;
#[cfg(test)]
mod tests;

use std::{
    io::{self, BufWriter, Write as _},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

pub(crate) use self::{memo::PortMemo, record::TraceRecord};
use crate::{
    event::{clock::WallClock, jiffies::HzTracker},
    kernel::{Kernel, KernelOptions},
};

/// Printed on stderr once every program is attached; tests and scripts wait
/// for it before they make connections.
pub(crate) const READY_LINE: &str = "conn-tracer: tracing";

/// Open sockets whose local port `trace` remembers (~40 bytes each).
const PORT_MEMO_CAP: usize = 1 << 18;

#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub kernel: KernelOptions,
    pub json: bool,
}

/// Counts of what the trace saw, reported at exit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TraceStats {
    pub events: u64,
    pub decode_errors: u64,
    pub lost: u64,
}

pub async fn run(opts: TraceOptions) -> anyhow::Result<TraceStats> {
    let mut kernel = Kernel::load(&opts.kernel).context("cannot start tracing")?;
    let (mut ring, mut log) = super::streams(&mut kernel)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let clock = WallClock::now();
    let mut out = BufWriter::new(io::stdout().lock());
    let mut stats = TraceStats::default();
    let mut reported_lost = 0u64;
    let mut ports = PortMemo::new(PORT_MEMO_CAP);
    let mut hz = HzTracker::new(None);

    eprintln!(
        "{READY_LINE} ({} programs attached; Ctrl-C to stop)",
        kernel.program_count()
    );
    loop {
        tokio::select! {
            drained = ring.when_ready(|r| {
                let mut closed = false;
                let mut failed = None;
                r.drain(|ev| match ev {
                    Ok(mut ev) => {
                        if closed || failed.is_some() {
                            return;
                        }
                        stats.events += 1;
                        ports.apply(&mut ev);
                        let rec = TraceRecord::new(
                            &ev,
                            clock.rfc3339(ev.info.ts_ns),
                            |r| kernel.reset_reason_name(r),
                            &mut hz,
                        );
                        let line = if opts.json {
                            match serde_json::to_string(&rec) {
                                Ok(l) => l,
                                Err(e) => {
                                    failed = Some(e);
                                    return;
                                }
                            }
                        } else {
                            rec.to_line()
                        };
                        // stdout closed (e.g. `| head`)
                        closed = writeln!(out, "{line}").is_err();
                    }
                    Err(e) => {
                        stats.decode_errors += 1;
                        if stats.decode_errors <= 10 {
                            eprintln!("conn-tracer: skipping undecodable event: {e}");
                        }
                    }
                });
                (closed, failed)
            }) => {
                let (closed, failed) = drained?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                if closed || out.flush().is_err() {
                    return Ok(stats);
                }
            }
            flushed = log.flush_when_ready() => flushed?,
            _ = tick.tick() => {
                let lost = kernel.lost_total()?;
                if lost > reported_lost {
                    eprintln!(
                        "conn-tracer: {} events lost in the kernel (ring buffer full; {} so far); \
                         raise --ring-bytes",
                        lost - reported_lost, lost
                    );
                    reported_lost = lost;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    let _ = out.flush();
    stats.lost = kernel.lost_total()?;
    drop(kernel); // detaches every program
    eprintln!(
        "conn-tracer: stopped; {} events, {} lost in the kernel, {} undecodable",
        stats.events, stats.lost, stats.decode_errors
    );
    Ok(stats)
}
