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

#![warn(unreachable_pub)]

// The leaves.
pub(crate) mod sys;
// (imports only `sys`)
pub(crate) mod config;

// The stages, in data-flow order.
pub(crate) mod event;
// 2.
pub(crate) mod kernel;
// 3.
pub(crate) mod owner;
// 4.
pub(crate) mod track;
// 5.
pub(crate) mod findings;
// 6.
pub(crate) mod metrics;
// 7.
pub(crate) mod serve;
// 8.
pub mod cmd;

#[cfg(test)]
mod fuzzing;
#[doc(hidden)]
pub mod testing;

// The public surface: what the binary (`main.rs`: the subcommands in
// [`cmd`], the settings), the pipeline benchmark (decode, the daemon's
// state) and the tests outside the crate (the pod index, the config file)
// use. Everything else is crate-private.
pub use self::{
    config::{Config, Overrides},
    event::{ConnEvent, decode},
    kernel::KernelOptions,
    metrics::State,
    owner::{
        attribute::Attributor,
        kube::{KubeSource, PodIndex, PodRef, run as watch_pods},
        services::{IndexSize, ServiceIndex, ServiceRef, run as watch_services},
    },
    sys::{
        VMLINUX_BTF,
        cgroup::{CgroupNsJoin, join_host_cgroup_namespace},
    },
};
