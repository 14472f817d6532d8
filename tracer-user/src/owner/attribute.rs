//! Who a socket belongs to, as metric labels: pod attribution, role,
//! direction and peer, with every open-ended label capped.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    ops::RangeInclusive,
};

use tracer_common::{Owner, owner_flags};

/// The pod, container and role of a socket's owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Attribution {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub role: Role,
    /// The pod's UID (from the cgroup path), empty outside pods. Not a label:
    /// chains are matched within one pod.
    pub pod_uid: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Role {
    App,
    Sidecar,
    /// Not in a pod.
    #[default]
    Host,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::App => "app",
            Self::Sidecar => "sidecar",
            Self::Host => "host",
        }
    }
}

/// What makes a process in a pod the mesh sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarRules {
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
        let comm = crate::event::comm_str(&owner.comm);
        self.uids.contains(&owner.uid) || self.names.iter().any(|n| n == container || *n == comm)
    }
}

/// Maps socket owners to pods, containers and roles: the owner's cgroup v2
/// id -> its cgroup path -> pod UID and container ID (kubelet layouts) ->
/// namespace, pod and container names (Kubernetes API).
pub struct Attributor {
    cgroups: Option<crate::owner::podid::CgroupPaths>,
    pods: Option<crate::owner::kube::PodIndex>,
    rules: SidecarRules,
    /// cgroup id -> parsed path; bounded, rebuilt when full.
    parsed: HashMap<u64, Option<crate::owner::podid::PodContainer>>,
}

/// Parsed cgroup paths kept; a node has far fewer live cgroups.
const PARSED_CAP: usize = 65_536;

impl Attributor {
    pub fn new(
        cgroups: Option<crate::owner::podid::CgroupPaths>,
        pods: Option<crate::owner::kube::PodIndex>,
        rules: SidecarRules,
    ) -> Self {
        Self {
            cgroups,
            pods,
            rules,
            parsed: HashMap::new(),
        }
    }

    /// Every socket a host socket (no cgroup hierarchy to read).
    pub fn host_only() -> Self {
        Self::new(None, None, SidecarRules::default())
    }

    pub fn pods(&self) -> Option<&crate::owner::kube::PodIndex> {
        self.pods.as_ref()
    }

    pub fn cgroup_rescans(&self) -> u64 {
        self.cgroups
            .as_ref()
            .map_or(0, crate::owner::podid::CgroupPaths::rescans)
    }

    fn pod_container(&mut self, owner: &Owner) -> Option<crate::owner::podid::PodContainer> {
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
        let parsed = crate::owner::podid::parse_cgroup_path(&path);
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
        let Some(path) = cgroup_v2_path(&text) else {
            crate::owner::procfs::malformed(&file, "no `0::/path` line", &text);
            return None;
        };
        let meta = std::fs::metadata(mount.join(path.trim_start_matches('/'))).ok()?;
        (std::os::unix::fs::MetadataExt::ino(&meta) == cgroup_id).then(|| path.to_string())
    }

    /// The owner's pod, container and role.
    pub fn attribute(&mut self, owner: &Owner) -> Attribution {
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

    /// `namespace/pod` of a pod IP of this node, if known.
    pub fn peer_pod(&self, ip: IpAddr) -> Option<String> {
        let (ns, pod) = self.pods.as_ref()?.lookup_ip(canonical(ip))?;
        Some(format!("{ns}/{pod}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// The local ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or(32768..=60999)
}

pub fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi).then_some(lo..=hi)
}

/// Accepted sockets are inbound, connecting ones outbound. For sockets
/// older than the tracer (owner unknown), a local port in the ephemeral
/// range means this side connected.
pub fn direction(owner: &Owner, local_port: u16, ephemeral: &RangeInclusive<u16>) -> Direction {
    if owner.flags & owner_flags::INHERITED != 0 {
        Direction::Inbound
    } else if owner.flags & owner_flags::KNOWN != 0 || ephemeral.contains(&local_port) {
        Direction::Outbound
    } else {
        Direction::Inbound
    }
}

/// v4-mapped IPv6 addresses shown as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// The `peer` label: `ip:port` of the service for outbound connections;
/// the client's `ip` alone for inbound ones (its port is ephemeral and
/// would make the label unbounded).
pub fn peer_label(remote: IpAddr, remote_port: u16, dir: Direction) -> String {
    let ip = canonical(remote);
    match (dir, ip) {
        (Direction::Inbound, ip) => ip.to_string(),
        (Direction::Outbound, IpAddr::V6(v6)) => format!("[{v6}]:{remote_port}"),
        (Direction::Outbound, IpAddr::V4(v4)) => format!("{v4}:{remote_port}"),
    }
}

/// Caps the distinct values of one label: the first `max` values pass,
/// later new ones fold into "other".
#[derive(Debug)]
pub struct LabelCap {
    seen: HashSet<String>,
    max: usize,
    /// Values folded into "other" so far.
    pub overflowed: u64,
}

pub const OTHER: &str = "other";

impl LabelCap {
    pub fn new(max: usize) -> Self {
        Self {
            seen: HashSet::new(),
            max,
            overflowed: 0,
        }
    }

    /// The value to use for `value`.
    pub fn admit(&mut self, value: String) -> String {
        if self.seen.contains(&value) {
            return value;
        }
        if self.seen.len() < self.max {
            self.seen.insert(value.clone());
            return value;
        }
        self.overflowed += 1;
        OTHER.to_string()
    }
}

impl LabelCap {
    /// Frees `value`'s place (a deleted pod's peer name): a later value can
    /// take it. Returns whether it was admitted.
    pub fn forget(&mut self, value: &str) -> bool {
        self.seen.remove(value)
    }
}

/// The cgroup v2 path in `/proc/<pid>/cgroup` text (the `0::` line).
pub fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
}

/// An address for display: `ip:port`, IPv6 in brackets.
pub fn endpoint(ip: IpAddr, port: u16) -> String {
    match canonical(ip) {
        IpAddr::V6(v6) if v6 == Ipv6Addr::UNSPECIFIED => format!("[::]:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        IpAddr::V4(v4) => format!("{v4}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn direction_from_owner_or_port() {
        let eph = 32768..=60999;
        let mut o = Owner {
            flags: owner_flags::KNOWN | owner_flags::INHERITED,
            ..Owner::default()
        };
        assert_eq!(direction(&o, 3306, &eph), Direction::Inbound);
        o.flags = owner_flags::KNOWN;
        assert_eq!(direction(&o, 40000, &eph), Direction::Outbound);
        o.flags = 0;
        assert_eq!(direction(&o, 40000, &eph), Direction::Outbound);
        assert_eq!(direction(&o, 3306, &eph), Direction::Inbound);
    }

    #[test]
    fn peer_labels_are_bounded_by_construction() {
        let v4: IpAddr = Ipv4Addr::new(10, 0, 0, 7).into();
        assert_eq!(peer_label(v4, 3306, Direction::Outbound), "10.0.0.7:3306");
        assert_eq!(peer_label(v4, 51234, Direction::Inbound), "10.0.0.7");
        let mapped: IpAddr = Ipv4Addr::LOCALHOST.to_ipv6_mapped().into();
        assert_eq!(
            peer_label(mapped, 6379, Direction::Outbound),
            "127.0.0.1:6379"
        );
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(peer_label(v6, 80, Direction::Outbound), "[fd00::1]:80");
        assert_eq!(endpoint(v6, 80), "[fd00::1]:80");
    }

    #[test]
    fn cap_folds_new_values_into_other() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.admit("a".into()), "a");
        assert_eq!(cap.admit("b".into()), "b");
        assert_eq!(cap.admit("c".into()), OTHER);
        assert_eq!(cap.admit("a".into()), "a", "known values keep passing");
        assert_eq!(cap.overflowed, 1);
    }

    #[test]
    fn cgroup_v2_line_of_proc_pid_cgroup() {
        let hybrid =
            "12:pids:/user.slice\n1:name=systemd:/init.scope\n0::/kubepods.slice/x.scope\n";
        assert_eq!(cgroup_v2_path(hybrid), Some("/kubepods.slice/x.scope"));
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(cgroup_v2_path("1:cpu:/a\n"), None);
        assert_eq!(cgroup_v2_path("0::garbage"), None);
    }

    #[test]
    fn port_range_parses() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("9 1"), None);
        assert_eq!(parse_port_range("x"), None);
    }
}
