//! Stage 3, owner: socket -> process -> cgroup -> pod. Takes the owner the
//! kernel captured with a socket (pid, uid, comm, cgroup id), or finds it in
//! /proc for sockets older than the tracer, and gives its pod, container and
//! role (app, sidecar or host): cgroup id -> cgroup path (path cache) -> pod
//! UID and container ID (kubelet path parser) -> namespace and names
//! (Kubernetes index and watch) -> role (sidecar rules).

pub mod attribute;
pub mod kube;
pub mod podid;
pub mod procfs;
