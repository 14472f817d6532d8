//! Which Kubernetes pod and container a cgroup v2 path belongs to.
//!
//! The kernel programs report `bpf_get_current_cgroup_id()`, the inode number
//! of the task's cgroup v2 directory. [`CgroupPaths`] turns that id into a path
//! relative to the cgroup2 mount, and [`parse_cgroup_path`] reads the pod UID,
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

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The container runtime that named a container cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl Runtime {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Docker => "docker",
        }
    }
}

/// A pod's QoS class, as the kubelet's cgroup layout encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// Label value, as Kubernetes spells the class.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }
}

/// What a cgroup path says about the pod and container it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodContainer {
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
pub fn parse_cgroup_path(path: &str) -> Option<PodContainer> {
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

/// Bounds on [`CgroupPaths`] rescans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimits {
    /// Misses within this long of the last rescan return `None` rather than
    /// rescan, so a flood of unknown ids cannot keep the walker busy.
    pub min_interval: Duration,
    /// Directories deeper than this below the mount are not visited. Pod
    /// containers sit at depth 4 to 5, 7 or so under a kind node's prefix.
    pub max_depth: usize,
    /// A rescan stops after this many directories; this also bounds the cache.
    pub max_dirs: usize,
}

impl Default for ScanLimits {
    /// One rescan a second at most, depth 16, 200,000 directories.
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            max_depth: 16,
            max_dirs: 200_000,
        }
    }
}

/// Maps cgroup v2 ids (directory inode numbers, what `bpf_get_current_cgroup_id`
/// returns on 64-bit kernels) to paths relative to the cgroup2 mount (`/` for
/// the root, `/kubepods.slice/...` below it). The cache is the result of the
/// last walk of the hierarchy, replaced wholesale by the next one. Cgroup ids
/// are not reused, so an entry never goes wrong, only stale.
#[derive(Debug)]
pub struct CgroupPaths {
    mount: PathBuf,
    limits: ScanLimits,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
    rescans: u64,
    truncated: bool,
}

impl CgroupPaths {
    /// For the cgroup2 hierarchy mounted at `mount` (see
    /// [`crate::sys::cgroup::cgroup2_mount`]), with the default limits. Nothing is
    /// read until the first [`resolve`](Self::resolve).
    pub fn new(mount: PathBuf) -> Self {
        Self::with_limits(mount, ScanLimits::default())
    }

    pub fn with_limits(mount: PathBuf, limits: ScanLimits) -> Self {
        Self {
            mount,
            limits,
            by_id: HashMap::new(),
            last_scan: None,
            rescans: 0,
            truncated: false,
        }
    }

    /// The path of cgroup `id` relative to the mount. A miss rescans the
    /// hierarchy unless the last rescan was less than `min_interval` ago, in
    /// which case it returns `None` and a later call may find it.
    pub fn resolve(&mut self, id: u64) -> Option<String> {
        self.resolve_at(id, Instant::now())
    }

    /// [`resolve`](Self::resolve) with the caller's clock (tests drive it).
    pub fn resolve_at(&mut self, id: u64, now: Instant) -> Option<String> {
        if let Some(path) = self.by_id.get(&id) {
            return Some(path.clone());
        }
        let recent = self
            .last_scan
            .is_some_and(|last| now.saturating_duration_since(last) < self.limits.min_interval);
        if recent {
            return None;
        }
        self.rescan(now);
        self.by_id.get(&id).cloned()
    }

    /// The cgroup2 mount this resolves ids under.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// How many times the hierarchy was walked (a metric).
    pub fn rescans(&self) -> u64 {
        self.rescans
    }

    /// Whether the last walk stopped at `max_dirs` before seeing everything.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    fn rescan(&mut self, now: Instant) {
        let (by_id, truncated) = scan(&self.mount, self.limits);
        if truncated && !self.truncated {
            log::warn!(
                "cgroup walk of {} stopped at {} directories: connections in the rest will \
                 carry no pod; raise the directory limit if this node really has that many cgroups",
                self.mount.display(),
                self.limits.max_dirs
            );
        }
        self.by_id = by_id;
        self.truncated = truncated;
        self.last_scan = Some(now);
        self.rescans += 1;
    }
}

/// Walks the hierarchy under `mount`; cgroups that vanish mid-walk are skipped.
fn scan(mount: &Path, limits: ScanLimits) -> (HashMap<u64, String>, bool) {
    let mut by_id = HashMap::new();
    let root = match fs::metadata(mount) {
        Ok(meta) => meta,
        Err(e) => {
            log::debug!("cgroup mount {}: {e}", mount.display());
            return (by_id, false);
        }
    };
    if limits.max_dirs == 0 {
        return (by_id, true);
    }
    by_id.insert(root.ino(), "/".to_owned());
    let mut stack = vec![(mount.to_path_buf(), String::new(), 0_usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        if depth >= limits.max_depth {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // file_type does not follow symlinks; cgroupfs has none anyway.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if by_id.len() >= limits.max_dirs {
                return (by_id, true);
            }
            let child = format!("{rel}/{}", entry.file_name().to_string_lossy());
            by_id.insert(meta.ino(), child.clone());
            stack.push((entry.path(), child, depth + 1));
        }
    }
    (by_id, false)
}

/// The pod and container of cgroup `cgroup_id`, if it is a pod's.
pub fn resolve_pod(paths: &mut CgroupPaths, cgroup_id: u64) -> Option<PodContainer> {
    parse_cgroup_path(&paths.resolve(cgroup_id)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made-up ids in the real shapes.
    macro_rules! uid {
        () => {
            "24850f06-820e-40dc-a2dd-9c841ee51216"
        };
    }
    macro_rules! uid_ {
        () => {
            "24850f06_820e_40dc_a2dd_9c841ee51216"
        };
    }
    macro_rules! cid {
        () => {
            "5a2ba19129284e1d4a35fb1b60f170c505b01f5adb9c47e7f3c7ad4c67bb001b"
        };
    }
    macro_rules! node {
        () => {
            "65540938c4f65cacdd206a2d9fe8f9e151d9e5168376555d9a2afc3b69dbc68c"
        };
    }
    macro_rules! static_uid {
        () => {
            "77a32fa00f9b81fcc7ca003f2e6a1a36"
        };
    }
    const UID: &str = uid!();
    const CID: &str = cid!();

    use Qos::{BestEffort, Burstable, Guaranteed};
    use Runtime::{Containerd, CriO, Docker};

    pub(super) type Expected = (&'static str, Option<&'static str>, Option<Runtime>, Qos);

    /// (path, (pod uid, container id, runtime, qos)); sources in the module doc
    /// and the report: kubelet cgroup_manager_linux.go / qos naming, coroot
    /// node-agent and Datadog agent test fixtures, kind node layouts.
    pub(super) const LAYOUTS: &[(&str, Expected)] = &[
        // systemd driver
        (
            concat!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
                uid_!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Containerd), Burstable),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod",
                uid_!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Containerd), BestEffort),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-pod",
                uid_!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Containerd), Guaranteed),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
                uid_!(),
                ".slice/crio-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(CriO), Burstable),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
                uid_!(),
                ".slice/crio-",
                cid!(),
                ".scope/container"
            ),
            (UID, Some(CID), Some(CriO), Burstable),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-pod",
                uid_!(),
                ".slice/crio-conmon-",
                cid!(),
                ".scope"
            ),
            (UID, None, Some(CriO), Guaranteed),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod",
                uid_!(),
                ".slice/docker-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Docker), BestEffort),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
                uid_!(),
                ".slice"
            ),
            (UID, None, None, Burstable),
        ),
        (
            concat!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
                static_uid!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope"
            ),
            (static_uid!(), Some(CID), Some(Containerd), Burstable),
        ),
        // hybrid host: path under /sys/fs/cgroup/unified
        (
            concat!(
                "/sys/fs/cgroup/unified/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod",
                uid_!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Containerd), BestEffort),
        ),
        // kind: kubelet --cgroup-root=/kubelet, inside the node and from the host
        (
            concat!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod",
                uid_!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Containerd), Burstable),
        ),
        (
            concat!(
                "/system.slice/docker-",
                node!(),
                ".scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod",
                uid_!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Containerd), Guaranteed),
        ),
        // containerd's literal "slice:prefix:id" under containerd.service
        (
            concat!(
                "/system.slice/containerd.service/kubepods-burstable-pod",
                uid_!(),
                ".slice:cri-containerd:",
                cid!()
            ),
            (UID, Some(CID), Some(Containerd), Burstable),
        ),
        // cgroupfs driver
        (
            concat!("/kubepods/burstable/pod", uid!(), "/", cid!()),
            (UID, Some(CID), None, Burstable),
        ),
        (
            concat!("/kubepods/pod", uid!(), "/", cid!()),
            (UID, Some(CID), None, Guaranteed),
        ),
        (
            concat!(
                "/kubepods/besteffort/pod",
                uid!(),
                "/",
                cid!(),
                "/kube-proxy"
            ),
            (UID, Some(CID), None, BestEffort),
        ),
        (
            concat!("/kubepods/burstable/pod", uid!(), "/crio-", cid!()),
            (UID, Some(CID), Some(CriO), Burstable),
        ),
        (
            concat!("/kubepods/pod", uid!(), "/crio-conmon-", cid!()),
            (UID, None, Some(CriO), Guaranteed),
        ),
        (
            concat!("/kubepods/besteffort/pod", uid!()),
            (UID, None, None, BestEffort),
        ),
        (
            concat!("/kubepods/burstable/pod", static_uid!(), "/", cid!()),
            (static_uid!(), Some(CID), None, Burstable),
        ),
        // cgroupfs with a kubelet cgroup root (kind), and k3s in Docker from the host
        (
            concat!("/kubelet/kubepods/burstable/pod", uid!(), "/", cid!()),
            (UID, Some(CID), None, Burstable),
        ),
        (
            concat!(
                "/system.slice/docker-",
                node!(),
                ".scope/kubepods/besteffort/pod",
                uid!(),
                "/",
                cid!()
            ),
            (UID, Some(CID), None, BestEffort),
        ),
        // no leading slash, trailing slash
        (
            concat!("kubepods/pod", uid!(), "/", cid!(), "/"),
            (UID, Some(CID), None, Guaranteed),
        ),
        // a pod child the runtime did not name is the pod, not a container
        (
            concat!(
                "/kubepods.slice/kubepods-pod",
                uid_!(),
                ".slice/var-lib-x.mount"
            ),
            (UID, None, None, Guaranteed),
        ),
        // nested clusters: the outer pod is the one this node knows
        (
            concat!(
                "/kubepods.slice/kubepods-pod",
                uid_!(),
                ".slice/cri-containerd-",
                cid!(),
                ".scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod2daf1958_b3e7_44c5_b37e_460795c1095e.slice/cri-containerd-",
                node!(),
                ".scope"
            ),
            (UID, Some(CID), Some(Containerd), Guaranteed),
        ),
    ];

    fn expected((uid, cid, runtime, qos): Expected) -> PodContainer {
        PodContainer {
            pod_uid: uid.to_owned(),
            container_id: cid.map(str::to_owned),
            runtime,
            qos,
        }
    }

    #[test]
    fn parses_kubelet_cgroup_layouts() {
        assert!(LAYOUTS.len() >= 15);
        for &(path, want) in LAYOUTS {
            assert_eq!(parse_cgroup_path(path), Some(expected(want)), "{path}");
        }
    }

    #[test]
    fn uppercase_ids_come_back_lowercase() {
        let path = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{}.scope",
            uid_!().to_ascii_uppercase(),
            CID.to_ascii_uppercase()
        );
        let pc = parse_cgroup_path(&path).unwrap();
        assert_eq!(pc.pod_uid, UID);
        assert_eq!(pc.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn labels_spell_classes_and_runtimes() {
        assert_eq!(BestEffort.as_str(), "BestEffort");
        assert_eq!(Guaranteed.as_str(), "Guaranteed");
        assert_eq!(Burstable.as_str(), "Burstable");
        assert_eq!(Containerd.as_str(), "containerd");
        assert_eq!(CriO.as_str(), "cri-o");
        assert_eq!(Docker.as_str(), "docker");
    }

    #[test]
    fn non_pod_paths_are_none() {
        let not_pods = [
            String::new(),
            "/".into(),
            "//".into(),
            "/init.scope".into(),
            "/system.slice/sshd.service".into(),
            "/system.slice/containerd.service".into(),
            "/user.slice/user-1000.slice/session-3.scope".into(),
            "/user.slice/user-1000.slice/user@1000.service/app.slice".into(),
            "/kubepods.slice".into(),
            "/kubepods.slice/kubepods-burstable.slice".into(),
            "/kubepods.slice/kubepods-besteffort.slice".into(),
            "/kubepods".into(),
            "/kubepods/burstable".into(),
            "/kubelet.slice/kubelet-kubepods.slice".into(),
            format!("/system.slice/docker-{CID}.scope"),
            format!("/docker/{CID}"),
            format!("/machine.slice/libpod-{CID}.scope"),
            // a pod-looking name outside kubepods
            format!("/user.slice/user-pod{}.slice", uid_!()),
            format!("/docker/pod{UID}/{CID}"),
            format!("/pod{UID}/{CID}"),
            // unknown QoS classes
            format!("/kubepods/gold/pod{UID}/{CID}"),
            format!(
                "/kubepods.slice/kubepods-gold.slice/kubepods-gold-pod{}.slice",
                uid_!()
            ),
            format!("/kubepods/burstable/extra/pod{UID}/{CID}"),
            // malformed UIDs: not hex, short, wrong separators for the driver
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podNOTAUUID.slice".into(),
            format!("/kubepods.slice/kubepods-pod{}.slice", &uid_!()[..35]),
            format!("/kubepods.slice/kubepods-pod{UID}.slice"),
            format!("/kubepods/pod{}/{CID}", uid_!()),
            "/kubepods/podzzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz".into(),
            format!("/kubepods/pod{UID}x/{CID}"),
            // slice name without the pod part
            "/kubepods.slice/kubepods-pod.slice".into(),
            "/kubepods.slice/kubepods-.slice".into(),
        ];
        for path in &not_pods {
            assert_eq!(parse_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn malformed_container_ids_leave_the_pod() {
        for leaf in [
            format!("cri-containerd-{}.scope", &CID[..63]),
            format!("cri-containerd-{CID}0.scope"),
            "crio-xyz.scope".into(),
            format!("docker-{}g.scope", &CID[..63]),
            "kube-proxy".into(),
            format!("crio-conmon-{}.scope", &CID[..10]),
        ] {
            let path = format!("/kubepods.slice/kubepods-pod{}.slice/{leaf}", uid_!());
            assert_eq!(
                parse_cgroup_path(&path),
                Some(expected((UID, None, None, Guaranteed))),
                "{path}"
            );
        }
        let colon = format!("/kubepods-pod{}.slice:runc:{CID}", uid_!());
        assert_eq!(
            parse_cgroup_path(&colon),
            Some(expected((UID, None, None, Guaranteed)))
        );
    }

    /// What any `Some` must look like, whatever the input.
    pub(super) fn assert_well_formed(pc: &PodContainer, input: &str) {
        let uid_ok = canonical_uid(&pc.pod_uid).as_deref() == Some(pc.pod_uid.as_str());
        assert!(uid_ok, "uid {:?} from {input:?}", pc.pod_uid);
        if let Some(id) = &pc.container_id {
            let ok = id.len() == 64 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
            assert!(ok, "container id {id:?} from {input:?}");
        }
    }

    /// A directory tree under the temp dir, removed on drop.
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let root = std::env::temp_dir().join(format!(
                "conn-tracer-podid-{tag}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&root).unwrap();
            Self(root)
        }

        /// Makes `rel` (and its parents); returns its inode number.
        fn mkdir(&self, rel: &str) -> u64 {
            let p = self.0.join(rel.trim_start_matches('/'));
            fs::create_dir_all(&p).unwrap();
            fs::metadata(&p).unwrap().ino()
        }

        fn ino(&self, rel: &str) -> u64 {
            fs::metadata(self.0.join(rel.trim_start_matches('/')))
                .unwrap()
                .ino()
        }

        fn paths(&self) -> CgroupPaths {
            CgroupPaths::new(self.0.clone())
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolves_ids_of_a_directory_tree() {
        let tree = TempTree::new("resolve");
        let pod = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid_!()
        );
        let ctr = format!("{pod}/cri-containerd-{CID}.scope");
        let sshd = "/system.slice/sshd.service";
        let (ctr_id, sshd_id) = (tree.mkdir(&ctr), tree.mkdir(sshd));
        let pod_id = tree.ino(&pod);
        let file = tree.0.join("system.slice/cgroup.procs");
        fs::write(&file, "1\n").unwrap();
        let file_id = fs::metadata(&file).unwrap().ino();

        let mut paths = tree.paths();
        assert_eq!(
            paths.rescans(),
            0,
            "nothing is read before the first lookup"
        );
        assert_eq!(paths.resolve(ctr_id).as_deref(), Some(ctr.as_str()));
        assert_eq!(paths.resolve(pod_id).as_deref(), Some(pod.as_str()));
        assert_eq!(paths.resolve(sshd_id).as_deref(), Some(sshd));
        assert_eq!(paths.resolve(tree.ino("/")).as_deref(), Some("/"));
        assert_eq!(
            paths.resolve(tree.ino("/kubepods.slice")).as_deref(),
            Some("/kubepods.slice")
        );
        assert_eq!(paths.rescans(), 1, "one walk served every lookup");
        assert_eq!(paths.resolve(file_id), None, "files are not cgroups");
        assert!(!paths.truncated());
    }

    #[test]
    fn unknown_ids_rescan_at_most_once_per_interval() {
        let tree = TempTree::new("ratelimit");
        let known = tree.mkdir("/system.slice");
        let mut paths = tree.paths();
        let t0 = Instant::now();
        assert_eq!(
            paths.resolve_at(known, t0).as_deref(),
            Some("/system.slice")
        );
        assert_eq!(paths.rescans(), 1);

        let late = tree.mkdir("/kubepods/besteffort");
        assert_eq!(
            paths.resolve_at(late, t0 + Duration::from_millis(100)),
            None
        );
        // A flood of ids nobody has: no walk until the interval is over.
        for bogus in 1_000_000_000..1_000_010_000 {
            assert_eq!(
                paths.resolve_at(bogus, t0 + Duration::from_millis(500)),
                None
            );
        }
        assert_eq!(paths.rescans(), 1);
        assert_eq!(
            paths
                .resolve_at(known, t0 + Duration::from_millis(600))
                .as_deref(),
            Some("/system.slice"),
            "hits need no walk"
        );

        assert_eq!(
            paths
                .resolve_at(late, t0 + Duration::from_secs(1))
                .as_deref(),
            Some("/kubepods/besteffort")
        );
        assert_eq!(paths.rescans(), 2);
        assert_eq!(
            paths.resolve_at(u64::MAX, t0 + Duration::from_millis(1500)),
            None
        );
        assert_eq!(paths.rescans(), 2);
        assert_eq!(
            paths.resolve_at(u64::MAX, t0 + Duration::from_secs(3)),
            None
        );
        assert_eq!(paths.rescans(), 3);
    }

    #[test]
    fn rescan_replaces_the_cache() {
        let tree = TempTree::new("replace");
        let gone = tree.mkdir("/kubepods/pod-gone");
        let stays = tree.mkdir("/kubepods/stays");
        let mut paths = tree.paths();
        let t0 = Instant::now();
        assert_eq!(
            paths.resolve_at(gone, t0).as_deref(),
            Some("/kubepods/pod-gone")
        );
        fs::remove_dir(tree.0.join("kubepods/pod-gone")).unwrap();
        // Still cached: ids are never reused, so the entry is stale, not wrong.
        assert_eq!(
            paths.resolve_at(gone, t0).as_deref(),
            Some("/kubepods/pod-gone")
        );
        // A miss after the interval walks again and drops what is gone.
        assert_eq!(
            paths.resolve_at(u64::MAX, t0 + Duration::from_secs(2)),
            None
        );
        assert_eq!(paths.rescans(), 2);
        assert_eq!(
            paths
                .resolve_at(stays, t0 + Duration::from_secs(2))
                .as_deref(),
            Some("/kubepods/stays")
        );
        assert_eq!(paths.resolve_at(gone, t0 + Duration::from_secs(2)), None);
    }

    #[test]
    fn walk_is_bounded_by_depth_and_directory_count() {
        let tree = TempTree::new("bounds");
        let deep: Vec<String> = (1..=18).map(|d| format!("d{d}")).collect();
        let rel = |depth: usize| format!("/{}", deep[..depth].join("/"));
        tree.mkdir(&rel(18));
        let mut paths = tree.paths();
        assert_eq!(paths.resolve(tree.ino(&rel(16))), Some(rel(16)));
        assert_eq!(
            paths.resolve_at(tree.ino(&rel(17)), Instant::now() + Duration::from_secs(5)),
            None
        );
        assert!(!paths.truncated());

        let limits = ScanLimits {
            max_dirs: 5,
            ..ScanLimits::default()
        };
        let mut small = CgroupPaths::with_limits(tree.0.clone(), limits);
        let found = (0..=18)
            .filter(|&d| {
                small
                    .resolve_at(
                        tree.ino(&if d == 0 { "/".into() } else { rel(d) }),
                        Instant::now(),
                    )
                    .is_some()
            })
            .count();
        assert_eq!(found, 5, "root plus four directories");
        assert!(small.truncated());
        assert_eq!(small.rescans(), 1);
    }

    #[test]
    fn missing_mount_resolves_nothing() {
        let mut paths = CgroupPaths::new(PathBuf::from("/nonexistent/conn-tracer/cgroup"));
        assert_eq!(paths.resolve(1), None);
        assert_eq!(paths.rescans(), 1);
    }

    #[test]
    fn resolve_pod_reads_the_tree() {
        let tree = TempTree::new("pod");
        let pod = format!("/kubepods.slice/kubepods-pod{}.slice", uid_!());
        let ctr = tree.mkdir(&format!("{pod}/crio-{CID}.scope/container"));
        let conmon = tree.mkdir(&format!("{pod}/crio-conmon-{CID}.scope"));
        let sshd = tree.mkdir("/system.slice/sshd.service");
        let mut paths = tree.paths();
        assert_eq!(
            resolve_pod(&mut paths, ctr),
            Some(expected((UID, Some(CID), Some(CriO), Guaranteed)))
        );
        assert_eq!(
            resolve_pod(&mut paths, conmon),
            Some(expected((UID, None, Some(CriO), Guaranteed)))
        );
        assert_eq!(
            resolve_pod(&mut paths, tree.ino(&pod)),
            Some(expected((UID, None, None, Guaranteed)))
        );
        assert_eq!(resolve_pod(&mut paths, sshd), None);
        assert_eq!(paths.rescans(), 1);
    }

    /// Needs a cgroup2 mount (not root); skips with a reason where there is
    /// none, except in CI.
    #[test]
    fn resolves_live_cgroup2_root_and_own_cgroup_when_mounted() {
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let Some(mount) = crate::sys::cgroup::cgroup2_mount_in(&mounts) else {
            assert!(!in_ci, "no cgroup2 mount in /proc/mounts");
            eprintln!("skipped: no cgroup2 mount in /proc/mounts");
            return;
        };
        let mut paths = CgroupPaths::new(mount.clone());
        let root = fs::metadata(&mount).unwrap().ino();
        assert_eq!(paths.resolve(root).as_deref(), Some("/"));

        // Our own cgroup, from "0::<path>", when it is under this mount (a
        // process in a cgroup namespace sees a path relative to its own root).
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            return;
        };
        if let Ok(meta) = fs::metadata(mount.join(rel.trim_start_matches('/'))) {
            let want = if rel.is_empty() { "/" } else { rel };
            assert_eq!(paths.resolve(meta.ino()).as_deref(), Some(want));
        }
    }
}

/// Property tests of the cgroup path parser (`cargo xtask fuzz podid` runs
/// them long): any path is a pod or `None`, never a panic; kubelet paths of
/// every driver, runtime and QoS class, with random ids, parse to their pod
/// UID and container ID.
#[cfg(test)]
mod fuzz {
    use proptest::{array, prelude::*, sample::select};

    use super::{tests::assert_well_formed, *};

    fn hex(bytes: &[u8], upper: bool) -> String {
        bytes
            .iter()
            .map(|b| {
                if upper {
                    format!("{b:02X}")
                } else {
                    format!("{b:02x}")
                }
            })
            .collect()
    }

    /// A pod UID as the API writes it (UUID, or a static pod's hash), maybe
    /// uppercased, and its canonical form.
    fn arb_uid() -> impl Strategy<Value = (String, String)> {
        (array::uniform16(any::<u8>()), any::<bool>(), any::<bool>()).prop_map(
            |(b, upper, is_static)| {
                let h = hex(&b, upper);
                let raw = if is_static {
                    h
                } else {
                    format!(
                        "{}-{}-{}-{}-{}",
                        &h[..8],
                        &h[8..12],
                        &h[12..16],
                        &h[16..20],
                        &h[20..]
                    )
                };
                (raw.clone(), raw.to_ascii_lowercase())
            },
        )
    }

    fn arb_cid() -> impl Strategy<Value = (String, String)> {
        (array::uniform32(any::<u8>()), any::<bool>()).prop_map(|(b, upper)| {
            let raw = hex(&b, upper);
            (raw.clone(), raw.to_ascii_lowercase())
        })
    }

    #[derive(Debug, Clone, Copy)]
    enum Driver {
        Systemd,
        Cgroupfs,
        /// containerd's literal `slice:prefix:id` directory.
        Literal,
    }

    /// What sits under the pod's cgroup.
    #[derive(Debug, Clone, Copy)]
    enum Leaf {
        PodLevel,
        Containerd,
        CriO,
        Docker,
        Conmon,
        Bare,
        Unnamed,
    }

    /// A kubelet-made path with random ids, and what it must parse to.
    #[expect(
        clippy::too_many_lines,
        reason = "one table: every driver by every leaf"
    )]
    fn arb_kubelet_path() -> impl Strategy<Value = (String, PodContainer)> {
        (
            arb_uid(),
            arb_cid(),
            select(&[Qos::Guaranteed, Qos::Burstable, Qos::BestEffort][..]),
            select(&[Driver::Systemd, Driver::Cgroupfs, Driver::Literal][..]),
            select(
                &[
                    Leaf::PodLevel,
                    Leaf::Containerd,
                    Leaf::CriO,
                    Leaf::Docker,
                    Leaf::Conmon,
                    Leaf::Bare,
                    Leaf::Unnamed,
                ][..],
            ),
            any::<bool>(),
            select(
                &[
                    "",
                    "/sys/fs/cgroup/unified",
                    "/system.slice/docker-0123456789abcdef.scope",
                ][..],
            ),
            select(&["", "/", "/container", "/a/b"][..]),
        )
            .prop_map(
                |(
                    (uid, want_uid),
                    (cid, want_cid),
                    qos,
                    driver,
                    leaf,
                    kubelet_root,
                    prefix,
                    child,
                )| {
                    let q = match qos {
                        Qos::Guaranteed => "",
                        Qos::Burstable => "burstable",
                        Qos::BestEffort => "besteffort",
                    };
                    let (runtime, container_id) = match (driver, leaf) {
                        (_, Leaf::PodLevel | Leaf::Unnamed)
                        | (Driver::Literal, Leaf::Conmon | Leaf::Bare) => (None, None),
                        (_, Leaf::Containerd) => {
                            (Some(Runtime::Containerd), Some(want_cid.clone()))
                        }
                        (_, Leaf::CriO) => (Some(Runtime::CriO), Some(want_cid.clone())),
                        (_, Leaf::Docker) => (Some(Runtime::Docker), Some(want_cid.clone())),
                        (_, Leaf::Conmon) => (Some(Runtime::CriO), None),
                        (_, Leaf::Bare) => (None, Some(want_cid.clone())),
                    };
                    let path = match driver {
                        Driver::Systemd | Driver::Literal => {
                            let kp = if kubelet_root {
                                "kubelet-kubepods"
                            } else {
                                "kubepods"
                            };
                            let class = if q.is_empty() {
                                kp.to_string()
                            } else {
                                format!("{kp}-{q}")
                            };
                            let pod = format!("{class}-pod{}.slice", uid.replace('-', "_"));
                            if let Driver::Literal = driver {
                                let leaf = match leaf {
                                    Leaf::Containerd => format!(":cri-containerd:{cid}"),
                                    Leaf::CriO => format!(":crio:{cid}"),
                                    Leaf::Docker => format!(":docker:{cid}"),
                                    Leaf::Conmon => format!(":runc:{cid}"),
                                    Leaf::Bare => format!(":{cid}"),
                                    Leaf::PodLevel | Leaf::Unnamed => ":".to_string(),
                                };
                                format!(
                                    "{prefix}/system.slice/containerd.service/{pod}{leaf}{child}"
                                )
                            } else {
                                let root = if kubelet_root { "/kubelet.slice" } else { "" };
                                let parents = if q.is_empty() {
                                    format!("{root}/{kp}.slice")
                                } else {
                                    format!("{root}/{kp}.slice/{class}.slice")
                                };
                                let leaf = match leaf {
                                    Leaf::PodLevel => String::new(),
                                    Leaf::Containerd => format!("/cri-containerd-{cid}.scope"),
                                    Leaf::CriO => format!("/crio-{cid}.scope"),
                                    Leaf::Docker => format!("/docker-{cid}.scope"),
                                    Leaf::Conmon => format!("/crio-conmon-{cid}.scope"),
                                    Leaf::Bare => format!("/{cid}"),
                                    Leaf::Unnamed => "/var-lib-x.mount".to_string(),
                                };
                                let child = if leaf.is_empty() { "" } else { child };
                                format!("{prefix}{parents}/{pod}{leaf}{child}")
                            }
                        }
                        Driver::Cgroupfs => {
                            let root = if kubelet_root { "/kubelet" } else { "" };
                            let class = if q.is_empty() {
                                String::new()
                            } else {
                                format!("/{q}")
                            };
                            let leaf = match leaf {
                                Leaf::PodLevel => String::new(),
                                Leaf::Containerd => format!("/cri-containerd-{cid}.scope"),
                                Leaf::CriO => format!("/crio-{cid}"),
                                Leaf::Docker => format!("/docker-{cid}.scope"),
                                Leaf::Conmon => format!("/crio-conmon-{cid}"),
                                Leaf::Bare => format!("/{cid}"),
                                Leaf::Unnamed => "/kube-proxy".to_string(),
                            };
                            let child = if leaf.is_empty() { "" } else { child };
                            format!("{prefix}{root}/kubepods{class}/pod{uid}{leaf}{child}")
                        }
                    };
                    let want = PodContainer {
                        pod_uid: want_uid,
                        container_id,
                        runtime,
                        qos,
                    };
                    (path, want)
                },
            )
    }

    /// One random edit: delete, replace or insert a character that matters
    /// to the parser.
    fn mutate(path: &str, edits: &[(prop::sample::Index, u8, char)]) -> String {
        let mut chars: Vec<char> = path.chars().collect();
        for (at, op, c) in edits {
            let at = at.index(chars.len() + 1);
            match op % 3 {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 if at < chars.len() => chars[at] = *c,
                _ => chars.insert(at, *c),
            }
        }
        chars.into_iter().collect()
    }

    fn arb_edit() -> impl Strategy<Value = (prop::sample::Index, u8, char)> {
        (
            any::<prop::sample::Index>(),
            any::<u8>(),
            prop_oneof![
                select(&['/', '-', '_', ':', '.', 'a', 'F', 'G', '0', '\0', 'é'][..]),
                any::<char>(),
            ],
        )
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(512))]

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            if let Some(pc) = parse_cgroup_path(&s) {
                assert_well_formed(&pc, &s);
            }
        }

        /// Directory names that almost are the kubelet's, glued at random.
        #[test]
        fn component_soup_never_panics(parts in prop::collection::vec(
            prop_oneof![
                select(&[
                    "kubepods", "kubepods.slice", "kubepods-burstable.slice", "burstable",
                    "besteffort", "kubelet", "kubelet.slice", "pod", ".slice", ".scope", "-", "_",
                    ":", "cri-containerd-", "crio-", "crio-conmon-", "docker-", "system.slice",
                    "/", "//", "\\x2d", "0",
                ][..]).prop_map(str::to_string),
                "[0-9a-fA-F_-]{0,40}",
                any::<String>(),
            ],
            0..12,
        )) {
            let s: String = parts.concat();
            if let Some(pc) = parse_cgroup_path(&s) {
                assert_well_formed(&pc, &s);
            }
        }

        /// Well-formed paths of every layout parse to the right pod and container.
        #[test]
        fn kubelet_paths_parse_to_their_pod_and_container((path, want) in arb_kubelet_path()) {
            prop_assert_eq!(parse_cgroup_path(&path), Some(want), "{}", path);
        }

        /// Kubelet paths with a few random edits: a pod or `None`, never a
        /// panic, and any pod found is well formed.
        #[test]
        fn mutated_kubelet_paths_never_panic(
            (path, _) in arb_kubelet_path(),
            edits in prop::collection::vec(arb_edit(), 1..5),
        ) {
            let s = mutate(&path, &edits);
            if let Some(pc) = parse_cgroup_path(&s) {
                assert_well_formed(&pc, &s);
            }
        }

        /// The documented layouts, edited.
        #[test]
        fn mutated_documented_layouts_never_panic(
            which in any::<prop::sample::Index>(),
            edits in prop::collection::vec(arb_edit(), 1..5),
        ) {
            let (path, _) = tests::LAYOUTS[which.index(tests::LAYOUTS.len())];
            let s = mutate(path, &edits);
            if let Some(pc) = parse_cgroup_path(&s) {
                assert_well_formed(&pc, &s);
            }
        }
    }
}
