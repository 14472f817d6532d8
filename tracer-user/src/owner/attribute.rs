//! The attributor: a socket's owner -> its pod, container and role.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    time::{Duration, Instant},
};

use tracer_common::Owner;

use super::{
    cgroup::CgroupPaths,
    kube::{KubeSource, PodIndex},
    kubelet::{self, PodContainer},
    procfs,
    services::{ServiceIndex, ServiceRef},
};
use crate::{config::Config, event::addr::canonical, sys};

/// The pod, container and role of a socket's owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Attribution {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub role: Role,
    /// The pod's UID (from the cgroup path), empty outside pods. Not a label:
    /// chains are matched within one pod.
    pub pod_uid: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    App,
    Sidecar,
    /// Not in a pod.
    #[default]
    Host,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::App => "app",
            Self::Sidecar => "sidecar",
            Self::Host => "host",
        }
    }
}

/// What makes a process in a pod the mesh sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SidecarRules {
    /// Owner uids of sidecars (Istio runs its proxy as 1337).
    pub uids: Vec<u32>,
    /// Container names, process names (the thread-group leader's comm, 15
    /// characters) or executable names of sidecars.
    pub names: Vec<String>,
}

impl Default for SidecarRules {
    fn default() -> Self {
        Self {
            uids: vec![1337],
            names: vec!["istio-proxy".into(), "envoy".into()],
        }
    }
}

impl SidecarRules {
    /// Whether the owner is the sidecar: by its uid (as the host and as its
    /// user namespace see it), its container's name, or its process's name
    /// or executable. Without the process (gone), the socket's thread name
    /// stands in for the process name.
    pub(crate) fn is_sidecar(
        &self,
        owner: &Owner,
        container: &str,
        process: Option<&procfs::Process>,
    ) -> bool {
        let uid = |u: u32| self.uids.contains(&u);
        let name = |n: &str| !n.is_empty() && self.names.iter().any(|x| x == n);
        match process {
            Some(p) => {
                uid(owner.uid)
                    || p.uid_inside.is_some_and(uid)
                    || name(container)
                    || name(&p.comm)
                    || name(&p.exe)
            }
            None => uid(owner.uid) || name(container) || name(&owner.comm_str()),
        }
    }
}

/// Maps socket owners to pods, containers and roles: the owner's cgroup v2
/// id -> its cgroup path -> pod UID and container ID (kubelet layouts) ->
/// namespace, pod and container names (Kubernetes API).
pub struct Attributor {
    cgroups: Option<CgroupPaths>,
    pods: Option<PodIndex>,
    /// The cluster's Services and endpoints (empty without the API).
    services: ServiceIndex,
    rules: SidecarRules,
    /// cgroup id -> parsed path; bounded, rebuilt when full.
    parsed: HashMap<u64, Option<PodContainer>>,
    /// (pid, cgroup id) -> the process's name, executable and namespaced
    /// uid, read once; bounded, rebuilt when full.
    processes: HashMap<(u32, u64), Option<procfs::Process>>,
    /// (pid, cgroup id) -> when its /proc entry was last found missing (or
    /// in another cgroup): asked again only after [`ABSENT_RETRY`], so the
    /// events of sockets whose process is gone (the closes after an exit,
    /// every socket of a daemon without the host's PID namespace) do not
    /// each cost a failed open of /proc. Bounded, rebuilt when full.
    absent: HashMap<(u32, u64), Instant>,
}

/// How long a process found missing from /proc is taken as missing.
const ABSENT_RETRY: Duration = Duration::from_secs(1);

/// Inserts into a cache of at most `cap` entries, emptied when full (the
/// entries are cheap to learn again).
fn insert_bounded<K: Hash + Eq, V>(map: &mut HashMap<K, V>, cap: usize, key: K, value: V) {
    if map.len() >= cap {
        map.clear();
    }
    map.insert(key, value);
}

/// Parsed cgroup paths kept; a node has far fewer live cgroups.
const PARSED_CAP: usize = 65_536;
/// Processes whose facts are kept.
const PROCESSES_CAP: usize = 16_384;

impl Attributor {
    pub(crate) fn new(
        cgroups: Option<CgroupPaths>,
        pods: Option<PodIndex>,
        services: ServiceIndex,
        rules: SidecarRules,
    ) -> Self {
        Self {
            cgroups,
            pods,
            services,
            rules,
            parsed: HashMap::new(),
            processes: HashMap::new(),
            absent: HashMap::new(),
        }
    }

    /// Attribution as configured: the cgroup v2 hierarchy for pod and
    /// container IDs, and (unless disabled) a pod watch for their names and
    /// a cluster-wide Service and EndpointSlice watch for the peers, spawned
    /// on the tokio runtime.
    pub(crate) fn from_config(cfg: &Config) -> Self {
        let cgroups = if let Ok(Some(mount)) = sys::cgroup::cgroup2_mount() {
            Some(CgroupPaths::new(mount))
        } else {
            log::warn!("no cgroup v2 hierarchy: every connection is a host connection");
            None
        };
        let source = if cfg.no_kube {
            KubeSource::Disabled
        } else if let Some(url) = &cfg.kube_api {
            KubeSource::Url(url.clone())
        } else {
            KubeSource::InCluster
        };
        let pods = (source != KubeSource::Disabled).then(|| {
            let index = PodIndex::with_grace(cfg.deleted_pod_grace);
            let node = cfg
                .node_name
                .clone()
                .unwrap_or_else(super::kube::default_node_name);
            log::info!("watching the pods of node {node:?} ({source:?})");
            super::kube::spawn(source.clone(), node, index.clone());
            index
        });
        let services = ServiceIndex::with_max_endpoints(
            pods.clone(),
            cfg.deleted_pod_grace,
            cfg.max_cluster_endpoints,
        );
        if source != KubeSource::Disabled {
            super::services::spawn(source, services.clone());
        }
        let rules = SidecarRules {
            uids: cfg.sidecar_uids.clone(),
            names: cfg.sidecar_names.clone(),
        };
        Self::new(cgroups, pods, services, rules)
    }

    /// Every socket a host socket (no cgroup hierarchy to read).
    pub fn host_only() -> Self {
        Self::new(None, None, ServiceIndex::default(), SidecarRules::default())
    }

    pub(crate) fn pods(&self) -> Option<&PodIndex> {
        self.pods.as_ref()
    }

    pub(crate) fn services(&self) -> &ServiceIndex {
        &self.services
    }

    pub(crate) fn cgroup_rescans(&self) -> u64 {
        self.cgroups.as_ref().map_or(0, CgroupPaths::rescans)
    }

    fn pod_container(&mut self, owner: &Owner) -> Option<PodContainer> {
        let cgroup_id = owner.cgroup_id;
        if cgroup_id == 0 {
            return None;
        }
        if let Some(hit) = self.parsed.get(&cgroup_id) {
            return hit.clone();
        }
        // The owner's own /proc entry names its cgroup at once (no walk of
        // the hierarchy); it counts only if that directory is the owner's
        // cgroup (the process may have moved, or its pid been reused).
        let path = self
            .path_from_proc(owner.pid, cgroup_id)
            .or_else(|| self.cgroups.as_mut()?.resolve(cgroup_id))?;
        let parsed = kubelet::parse_cgroup_path(&path);
        insert_bounded(&mut self.parsed, PARSED_CAP, cgroup_id, parsed.clone());
        parsed
    }

    fn path_from_proc(&self, pid: u32, cgroup_id: u64) -> Option<String> {
        if pid == 0 {
            return None;
        }
        let mount = self.cgroups.as_ref()?.mount();
        let file = format!("/proc/{pid}/cgroup");
        let text = std::fs::read_to_string(&file).ok()?;
        let Some(path) = procfs::cgroup_v2_path(&text) else {
            procfs::malformed(&file, "no `0::/path` line", &text);
            return None;
        };
        let meta = std::fs::metadata(mount.join(path.trim_start_matches('/'))).ok()?;
        (std::os::unix::fs::MetadataExt::ino(&meta) == cgroup_id).then(|| path.to_string())
    }

    /// The owner's pod, container and role.
    pub(crate) fn attribute(&mut self, owner: &Owner) -> Attribution {
        let Some(pc) = self.pod_container(owner) else {
            return Attribution::default();
        };
        let mut a = Attribution {
            pod_uid: pc.pod_uid.clone(),
            role: Role::App,
            ..Attribution::default()
        };
        let known = pc
            .container_id
            .as_deref()
            .and_then(|id| self.pods.as_ref()?.lookup_container(id));
        if let Some(r) = known {
            a.namespace = r.namespace;
            a.pod = r.pod;
            a.container = r.container;
        } else {
            if let Some((ns, pod)) = self
                .pods
                .as_ref()
                .and_then(|p| p.lookup_pod_uid(&pc.pod_uid))
            {
                a.namespace = ns;
                a.pod = pod;
            }
            // Without pod metadata, the container ID (short form, as
            // `crictl ps` shows it) is the container label.
            if let Some(id) = &pc.container_id {
                a.container = id.chars().take(12).collect();
            }
        }
        let process = self.process(owner);
        if self.rules.is_sidecar(owner, &a.container, process.as_ref()) {
            a.role = Role::Sidecar;
        }
        a
    }

    /// The owner's process facts, from /proc while it lives (cached by pid
    /// and cgroup, so that a reused pid in another cgroup is read again).
    fn process(&mut self, owner: &Owner) -> Option<procfs::Process> {
        if owner.pid == 0 {
            return None;
        }
        let key = (owner.pid, owner.cgroup_id);
        if let Some(hit) = self.processes.get(&key) {
            return hit.clone();
        }
        let now = Instant::now();
        if self
            .absent
            .get(&key)
            .is_some_and(|&at| now.duration_since(at) < ABSENT_RETRY)
        {
            return None;
        }
        // Only the process that owns the socket: its /proc entry must be in
        // the socket owner's cgroup (not a reused pid, nor another pid
        // namespace's process when the daemon runs without hostPID).
        let facts = self
            .path_from_proc(owner.pid, owner.cgroup_id)
            .and_then(|_| procfs::process(owner.pid, owner.uid));
        if facts.is_none() {
            insert_bounded(&mut self.absent, PROCESSES_CAP, key, now);
            return None;
        }
        self.absent.remove(&key);
        insert_bounded(&mut self.processes, PROCESSES_CAP, key, facts.clone());
        facts
    }

    /// Whether `ip` is the address of a pod deleted from the API (still in
    /// its grace period): traffic to a terminated endpoint. This node's
    /// pods from the pod watch, any other from the EndpointSlices.
    pub(crate) fn peer_deleted(&self, ip: IpAddr) -> bool {
        self.services.ip_deleted(canonical(ip))
    }

    /// `namespace/pod` of a pod IP anywhere in the cluster, if known.
    pub(crate) fn peer_pod(&self, ip: IpAddr) -> Option<String> {
        let (ns, pod) = self.services.pod_at(canonical(ip))?;
        Some(format!("{ns}/{pod}"))
    }

    /// The Service port a ClusterIP:port is, if it is one.
    pub(crate) fn peer_service(&self, ip: IpAddr, port: u16) -> Option<ServiceRef> {
        self.services.service_at(ip, port)
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::COMM_LEN;

    use super::*;

    fn owner(uid: u32, thread: &str) -> Owner {
        let mut comm = [0u8; COMM_LEN];
        comm[..thread.len()].copy_from_slice(thread.as_bytes());
        Owner {
            pid: 4242,
            uid,
            comm,
            ..Owner::default()
        }
    }

    fn process(comm: &str, exe: &str, uid_inside: Option<u32>) -> procfs::Process {
        procfs::Process {
            comm: comm.into(),
            exe: exe.into(),
            uid_inside,
        }
    }

    #[test]
    fn the_sidecar_is_told_by_its_process_not_the_sockets_thread() {
        let rules = SidecarRules::default();
        // Envoy as another uid: its worker thread opened the socket.
        let worker = owner(1000, "wrk:worker_0");
        assert!(rules.is_sidecar(&worker, "", Some(&process("envoy", "envoy", Some(1000)))));
        // Renamed process, the executable still says what it is.
        let p = process("pilot-agent-x", "envoy", Some(1000));
        assert!(rules.is_sidecar(&worker, "", Some(&p)));
        // A thread named envoy in an app process is not the sidecar.
        let app = process("java", "java", Some(1000));
        assert!(!rules.is_sidecar(&owner(1000, "envoy"), "", Some(&app)));
        // The container name from the API.
        assert!(rules.is_sidecar(&owner(1000, "java"), "istio-proxy", Some(&app)));
        // Gone from /proc: the thread name stands in.
        assert!(rules.is_sidecar(&owner(1000, "envoy"), "", None));
        assert!(!rules.is_sidecar(&worker, "app", None));
    }

    #[test]
    fn uid_1337_counts_as_the_pods_user_namespace_sees_it() {
        let rules = SidecarRules::default();
        // A user-namespaced pod: host uid 3_801_088 + 1337 is 1337 inside.
        let map = "         0    3801088      65536\n";
        let kuid = 3_801_088 + 1337;
        let inside = procfs::uid_inside(map, kuid);
        assert_eq!(inside, Some(1337));
        let envoy = process("envoy", "envoy", inside);
        assert!(rules.is_sidecar(&owner(kuid, "wrk:worker_1"), "", Some(&envoy)));
        let app = process("app", "app", procfs::uid_inside(map, 3_801_088 + 1000));
        assert!(!rules.is_sidecar(&owner(3_801_088 + 1000, "app"), "", Some(&app)));
        // Without a user namespace the host uid is the uid.
        assert!(rules.is_sidecar(&owner(1337, "wrk:worker_1"), "", Some(&app)));
    }
}
