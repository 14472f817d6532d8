//! Stage 8, cmd: one module per subcommand, each only wiring the stages
//! together; `main.rs` parses the command line and dispatches here.

pub mod check;
pub mod connections;
pub mod findings;
pub mod run;
pub mod selftest;
pub mod trace;

use anyhow::Context as _;

use crate::kernel::{
    Kernel,
    ring::{AsyncRing, KernelLog},
};

/// What `run` and `trace` read: the event ring, polled on the runtime, and
/// the kernel programs' log.
fn streams(kernel: &mut Kernel) -> anyhow::Result<(AsyncRing, KernelLog)> {
    let ring = kernel
        .take_events()?
        .into_async()
        .context("cannot poll the event ring buffer")?;
    let log = kernel
        .take_log()
        .context("cannot poll the kernel log buffer")?;
    Ok((ring, log))
}
