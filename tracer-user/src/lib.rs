//! conn-tracer's userspace agent, as a pipeline. The stages, in the order
//! data flows (a stage imports only earlier ones and the leaves below):
//!
//! 1. [`event`]: ring buffer bytes -> typed events (pure).
//! 2. [`kernel`]: the only user of aya: loading, attaching, the event ring,
//!    the TCP iterator snapshot.
//! 3. [`owner`]: socket -> process -> cgroup -> pod.
//! 4. [`track`]: the connection table, classification, chains, resync.
//! 5. [`metrics`]: the Prometheus contract, fed by the tracker.
//! 6. [`serve`]: HTTP (`/metrics`, `/healthz`, `/connections`).
//! 7. [`cmd`]: one module per subcommand, wiring the stages.
//!
//! Leaves every stage may use: [`sys`] (capabilities, namespaces, the
//! cgroup mount) and [`config`] (the daemon's settings, declared once).

// The leaves.
pub mod sys;
// (imports only `sys`)
pub mod config;

// The stages, in data-flow order.
pub mod event;
// 2.
pub mod kernel;
// 3.
pub mod owner;
// 4.
pub mod track;
// 5.
pub mod metrics;
// 6.
pub mod serve;
// 7.
pub mod cmd;

#[cfg(test)]
mod fuzzing;
#[doc(hidden)]
pub mod testing;
