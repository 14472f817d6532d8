//! The kubelet path parser: which Kubernetes pod and container a cgroup v2
//! path belongs to.
//!
//! The kernel programs report `bpf_get_current_cgroup_id()`, the inode number
//! of the task's cgroup v2 directory. [`CgroupPaths`](super::cgroup::CgroupPaths)
//! turns that id into a path relative to the cgroup2 mount, and
//! [`parse_cgroup_path`] reads the pod UID,
//! container id, runtime and QoS class out of the path the kubelet and the
//! container runtime built. Nothing here talks to the API server or a CRI
//! socket: names, namespaces and labels come later, keyed by pod UID.
//!
//! Layouts understood (`<uid>` is the pod UID, `<u_i_d>` the same with `_` for
//! `-`, because systemd reads `-` in a unit name as a step in the hierarchy;
//! `<id>` is a 64-hex container id; `<qos>` is `burstable` or `besteffort`,
//! absent for Guaranteed pods, which sit directly under kubepods):
//!
//! | driver / runtime | container cgroup |
//! | --- | --- |
//! | systemd, containerd | `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<u_i_d>.slice/cri-containerd-<id>.scope` |
//! | systemd, CRI-O | `.../kubepods-<qos>-pod<u_i_d>.slice/crio-<id>.scope` (may have a `container` child) |
//! | systemd, CRI-O monitor | `.../kubepods-<qos>-pod<u_i_d>.slice/crio-conmon-<id>.scope`: pod level, not the container |
//! | systemd, Docker (dockershim, cri-dockerd) | `.../kubepods-<qos>-pod<u_i_d>.slice/docker-<id>.scope` |
//! | systemd, Guaranteed | `/kubepods.slice/kubepods-pod<u_i_d>.slice/<container>` |
//! | systemd, kubelet `--cgroup-root=/kubelet` (kind) | `/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-<qos>.slice/kubelet-kubepods-<qos>-pod<u_i_d>.slice/<container>` |
//! | containerd's literal systemd cgroupsPath (nested in containerd.service) | `/system.slice/containerd.service/kubepods-<qos>-pod<u_i_d>.slice:cri-containerd:<id>` |
//! | cgroupfs, containerd or Docker | `/kubepods/<qos>/pod<uid>/<id>` (runtime not told by the path) |
//! | cgroupfs, CRI-O | `/kubepods/<qos>/pod<uid>/crio-<id>`, monitor `crio-conmon-<id>` |
//! | cgroupfs, Guaranteed | `/kubepods/pod<uid>/<id>` |
//! | cgroupfs, kubelet cgroup root (kind, k3s in Docker) | `/kubelet/kubepods/<qos>/pod<uid>/<id>` |
//! | pod-level cgroup (any driver) | the pod directory itself: `container_id` is `None` |
//!
//! Any prefix before the kubepods part is accepted: a hybrid host's mount
//! path (`/sys/fs/cgroup/unified/...`), a kind or k3d node seen from the host
//! (`/system.slice/docker-<node>.scope/...`). When pods nest (a kind cluster
//! inside a pod), the outermost pod wins: it is the one this node's kubelet
//! and API server know. Directories below the container cgroup (CRI-O's
//! `container`, cgroups a container makes for itself) count as the container.
//!
//! Pod UIDs are UUIDs except for static pods, whose UID is the 32-hex md5 the
//! kubelet computes from the manifest (kubelet `config/common.go`, also the
//! mirror pod's `kubernetes.io/config.hash` annotation). UUIDs come back
//! lowercase with dashes; static-pod hashes are kept as the 32 hex they are,
//! since inserting dashes would match nothing.

/// The container runtime that named a container cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl Runtime {
    /// Label value.
    #[cfg(test)]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Docker => "docker",
        }
    }
}

/// A pod's QoS class, as the kubelet's cgroup layout encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// Label value, as Kubernetes spells the class.
    #[cfg(test)]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }
}

/// What a cgroup path says about the pod and container it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PodContainer {
    /// Lowercase UUID with dashes, or a static pod's 32-hex config hash.
    pub pod_uid: String,
    /// Bare 64-hex container id, no runtime prefix. `None` for the pod-level
    /// cgroup, CRI-O's conmon scope, and children the runtime did not name.
    pub container_id: Option<String>,
    /// The runtime, where the path tells it (cgroupfs paths do not, except
    /// CRI-O's). `Some(CriO)` with no container id is a conmon scope.
    pub runtime: Option<Runtime>,
    pub qos: Qos,
}

/// Pod and container of a cgroup v2 path (relative to the cgroup2 mount, or
/// with any prefix before the kubepods part). `None` if it is not a pod's.
pub(crate) fn parse_cgroup_path(path: &str) -> Option<PodContainer> {
    let mut comps = path.split('/').filter(|c| !c.is_empty());
    let (mut parent, mut grandparent) = (None, None);
    while let Some(comp) = comps.next() {
        let found = if let Some((slice, leaf)) = comp.split_once(':') {
            // containerd given a systemd-style cgroupsPath it could not hand to
            // systemd uses "slice:prefix:id" verbatim as one directory name.
            systemd_pod_slice(slice).map(|(uid, qos)| (uid, qos, colon_leaf(leaf)))
        } else if let Some((uid, qos)) =
            systemd_pod_slice(comp).or_else(|| cgroupfs_pod(grandparent, parent, comp))
        {
            Some((uid, qos, comps.next().map_or((None, None), scope_leaf)))
        } else {
            None
        };
        if let Some((pod_uid, qos, (runtime, container_id))) = found {
            return Some(PodContainer {
                pod_uid,
                container_id,
                runtime,
                qos,
            });
        }
        grandparent = parent;
        parent = Some(comp);
    }
    None
}

/// `[<root>-]kubepods[-<qos>]-pod<u_i_d>.slice`: systemd flattens every parent
/// slice into a child's name, so the name alone carries the whole hierarchy.
fn systemd_pod_slice(comp: &str) -> Option<(String, Qos)> {
    let name = comp.strip_suffix(".slice")?;
    let (parents, last) = name.rsplit_once('-')?;
    let uid = last.strip_prefix("pod")?;
    let (kubepods, qos) = if let Some(p) = parents.strip_suffix("-burstable") {
        (p, Qos::Burstable)
    } else if let Some(p) = parents.strip_suffix("-besteffort") {
        (p, Qos::BestEffort)
    } else {
        (parents, Qos::Guaranteed)
    };
    if kubepods != "kubepods" && !kubepods.ends_with("-kubepods") {
        return None;
    }
    Some((canonical_uid(&uid.replace('_', "-"))?, qos))
}

/// `kubepods/[<qos>/]pod<uid>`: the parent directories carry the class.
fn cgroupfs_pod(
    grandparent: Option<&str>,
    parent: Option<&str>,
    comp: &str,
) -> Option<(String, Qos)> {
    let uid = comp.strip_prefix("pod")?;
    let qos = match (grandparent, parent?) {
        (_, "kubepods") => Qos::Guaranteed,
        (Some("kubepods"), "burstable") => Qos::Burstable,
        (Some("kubepods"), "besteffort") => Qos::BestEffort,
        _ => return None,
    };
    Some((canonical_uid(uid)?, qos))
}

/// The directory under a pod's: `<prefix>-<id>[.scope]` or a bare id.
fn scope_leaf(comp: &str) -> (Option<Runtime>, Option<String>) {
    let name = comp.strip_suffix(".scope").unwrap_or(comp);
    if let Some(id) = name.strip_prefix("crio-conmon-") {
        // conmon watches the container from the pod's cgroup; it is not it.
        return (container_id(id).map(|_| Runtime::CriO), None);
    }
    for (prefix, runtime) in [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ] {
        if let Some(id) = name.strip_prefix(prefix) {
            return container_id(id).map_or((None, None), |id| (Some(runtime), Some(id)));
        }
    }
    (None, container_id(name))
}

/// `<prefix>:<id>` of containerd's literal cgroupsPath.
fn colon_leaf(leaf: &str) -> (Option<Runtime>, Option<String>) {
    let Some((prefix, id)) = leaf.split_once(':') else {
        return (None, None);
    };
    let runtime = match prefix {
        "cri-containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        _ => return (None, None),
    };
    container_id(id).map_or((None, None), |id| (Some(runtime), Some(id)))
}

/// A 8-4-4-4-12 UUID or a static pod's 32-hex hash, lowercased.
fn canonical_uid(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let ok = match b.len() {
        36 => b.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        }),
        32 => b.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    };
    ok.then(|| raw.to_ascii_lowercase())
}

/// Docker, containerd and CRI-O ids are 64 hex digits.
fn container_id(raw: &str) -> Option<String> {
    (raw.len() == 64 && raw.bytes().all(|c| c.is_ascii_hexdigit()))
        .then(|| raw.to_ascii_lowercase())
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
pub(crate) mod tests;
