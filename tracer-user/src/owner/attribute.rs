//! The attributor: a socket's owner -> its pod, container and role.

use std::{collections::HashMap, net::IpAddr};

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
    /// Container names or process names (thread names as the kernel keeps
    /// them, 15 characters) of sidecars.
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
    fn is_sidecar(&self, owner: &Owner, container: &str) -> bool {
        let comm = owner.comm_str();
        self.uids.contains(&owner.uid) || self.names.iter().any(|n| n == container || *n == comm)
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
}

/// Parsed cgroup paths kept; a node has far fewer live cgroups.
const PARSED_CAP: usize = 65_536;

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
        let services = ServiceIndex::new(pods.clone(), cfg.deleted_pod_grace);
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
        if self.parsed.len() >= PARSED_CAP {
            self.parsed.clear();
        }
        self.parsed.insert(cgroup_id, parsed.clone());
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
        if self.rules.is_sidecar(owner, &a.container) {
            a.role = Role::Sidecar;
        }
        a
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
