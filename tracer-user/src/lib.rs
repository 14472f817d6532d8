//! conn-tracer's userspace agent, as a pipeline. The stages, in the order
//! data flows (a stage imports only earlier ones):
//!
//! 1. [`event`]: ring buffer bytes -> typed events (pure).
//! 2. [`kernel`]: the only user of aya: loading, attaching, the event ring,
//!    the TCP iterator snapshot.
//! 3. [`owner`]: socket -> process -> cgroup -> pod.
//! 4. [`track`]: the connection table, classification, chains, resync (pure).
//! 5. [`metrics`]: the Prometheus contract.
//! 6. `serve`: HTTP (`/metrics`, `/healthz`, `/connections`).
//! 7. [`cmd`]: one module per subcommand, wiring the stages.
//!
//! Beside them: [`sys`] (capabilities, namespaces) and [`config`] (the
//! daemon's settings), which every stage may read.

pub mod config;
pub mod sys;

pub mod cmd;
pub mod event;
pub mod kernel;
pub mod metrics;
pub mod owner;
pub mod track;

#[cfg(test)]
mod fuzzing;
