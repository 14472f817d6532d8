//! Stage 3, owner: socket -> process -> cgroup -> pod. Takes the owner the
//! kernel captured with a socket (pid, uid, comm, cgroup id), or finds it
//! in /proc for sockets older than the tracer ([`procfs`]), and gives its
//! pod, container and role ([`attribute`]): cgroup id -> cgroup path (the
//! path cache, [`cgroup`]) -> pod UID and container ID (the kubelet path
//! parser, [`kubelet`]) -> namespace, pod and container names (the
//! Kubernetes index and watch, [`kube`]) -> app, sidecar or host (the
//! sidecar rules). For the far end of a connection, [`services`] indexes
//! the cluster's Services and EndpointSlices: which Service a ClusterIP:port
//! is, its backends, and the pod of any pod IP of the cluster.

pub(crate) mod attribute;
pub(crate) mod cgroup;
pub(crate) mod kube;
pub(crate) mod kubelet;
pub(crate) mod procfs;
pub(crate) mod services;

use std::{
    sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

/// Reads an index that a watch task writes; a panicked writer left it
/// consistent (every write is one whole update), so poison is ignored.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes an index (see [`read`]).
fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// The timer of an index's purge of deleted pods past `grace`: a quarter
/// of it, between 50 ms and 10 s.
fn purge_timer(grace: Duration) -> tokio::time::Interval {
    let period = (grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
    let mut timer = tokio::time::interval(period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}
