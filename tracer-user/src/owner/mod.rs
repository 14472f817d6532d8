//! Stage 3, owner: socket -> process -> cgroup -> pod. Takes the owner the
//! kernel captured with a socket (pid, uid, comm, cgroup id), or finds it
//! in /proc for sockets older than the tracer ([`procfs`]), and gives its
//! pod, container and role ([`attribute`]): cgroup id -> cgroup path (the
//! path cache, [`cgroup`]) -> pod UID and container ID (the kubelet path
//! parser, [`kubelet`]) -> namespace, pod and container names (the
//! Kubernetes index and watch, [`kube`]) -> app, sidecar or host (the
//! sidecar rules).

pub(crate) mod attribute;
pub(crate) mod cgroup;
pub(crate) mod kube;
pub(crate) mod kubelet;
pub(crate) mod procfs;
