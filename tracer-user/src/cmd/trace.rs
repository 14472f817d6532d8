//! `conn-tracer trace`: every connection event, live.

use std::{
    io::{self, BufWriter, Write as _},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    event::{PortMemo, TraceRecord, clock::WallClock, decode, jiffies::HzTracker},
    kernel::{Kernel, KernelOptions},
};

/// Printed on stderr once every program is attached; tests and scripts wait
/// for it before they make connections.
pub const READY_LINE: &str = "conn-tracer: tracing";

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

/// Registers a ring buffer's fd with tokio for readability.
pub fn readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: aya's RingBuf (and the log ring it wraps) owns its map fd and
    // keeps it open, unchanged, until dropped, which happens only after the
    // AsyncFd that owns it is dropped.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(io::Error::from)
}

pub async fn run(opts: TraceOptions) -> anyhow::Result<TraceStats> {
    let mut kernel = Kernel::load(&opts.kernel).context("cannot start tracing")?;
    let ring = kernel.take_events()?;
    let mut ring = readable(ring).context("cannot poll the event ring buffer")?;
    let mut logger = match kernel.take_logger() {
        Some(l) => Some(readable(l).context("cannot poll the kernel log buffer")?),
        None => None,
    };
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
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    match decode(&item) {
                        Ok(mut ev) => {
                            stats.events += 1;
                            ports.apply(&mut ev);
                            let rec = TraceRecord::new(
                                &ev,
                                clock.rfc3339(ev.info.ts_ns),
                                |r| kernel.reset_reason_name(r),
                                &mut hz,
                            );
                            let line = if opts.json {
                                serde_json::to_string(&rec)?
                            } else {
                                rec.to_line()
                            };
                            if writeln!(out, "{line}").is_err() {
                                return Ok(stats); // stdout closed (e.g. `| head`)
                            }
                        }
                        Err(e) => {
                            stats.decode_errors += 1;
                            if stats.decode_errors <= 10 {
                                eprintln!("conn-tracer: skipping undecodable event: {e}");
                            }
                        }
                    }
                }
                guard.clear_ready();
                if out.flush().is_err() {
                    return Ok(stats);
                }
            }
            guard = async { logger.as_mut().expect("guarded").readable_mut().await },
                if logger.is_some() =>
            {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
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
