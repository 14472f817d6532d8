//! A meshed pod as the attributor sees it, for the unit tests and the
//! pipeline benchmark: its
//! containers' cgroup directories under a temporary mount (their inode
//! numbers are the owners' cgroup ids) and the node's pods in an index.
//! Pod `shop/cart-1` (10.231.1.2) runs `app` and `istio-proxy`; pod
//! `db/redis-0` (10.231.2.2) is the database it talks to.

use std::net::Ipv4Addr;

use tracer_common::{CloseData, Event, OpenData, SnapshotData, tcp_state};

use super::TempTree;
use crate::owner::{
    attribute::{Attributor, SidecarRules},
    cgroup::CgroupPaths,
    kube::{DEFAULT_DELETE_GRACE, PodIndex},
    services::ServiceIndex,
};

/// The app pod's UID, and its container ids.
const UID: &str = "24850f06-820e-40dc-a2dd-9c841ee51216";
const CID: &str = "1f2e3d4c5b6a79880f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a6978";

pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 2);
pub const DB_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 2);
const PROXY_CID: &str = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b";

pub struct MeshPod {
    tree: TempTree,
    pods: PodIndex,
    /// The cgroup id of the `app` container.
    pub app: u64,
    /// The cgroup id of the `istio-proxy` container.
    pub sidecar: u64,
}

impl MeshPod {
    pub fn new(tag: &str) -> Self {
        let tree = TempTree::new(tag);
        let pod_dir = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        );
        let app = tree.mkdir(&format!("{pod_dir}/cri-containerd-{CID}.scope"));
        let sidecar = tree.mkdir(&format!("{pod_dir}/cri-containerd-{PROXY_CID}.scope"));
        let pods = PodIndex::new();
        let containers = [
            ("app", format!("containerd://{CID}")),
            ("istio-proxy", format!("containerd://{PROXY_CID}")),
        ];
        let containers: Vec<(&str, &str)> =
            containers.iter().map(|(n, id)| (*n, id.as_str())).collect();
        pods.apply_json(&pod(
            "shop",
            "cart-1",
            UID,
            &POD_IP.to_string(),
            &containers,
        ));
        pods.apply_json(&pod("db", "redis-0", "uid-db", &DB_IP.to_string(), &[]));
        Self {
            tree,
            pods,
            app,
            sidecar,
        }
    }

    /// An attributor that sees this pod (the default sidecar rules).
    pub fn attributor(&self) -> Attributor {
        Attributor::new(
            Some(CgroupPaths::new(self.tree.0.clone())),
            Some(self.pods.clone()),
            ServiceIndex::new(Some(self.pods.clone()), DEFAULT_DELETE_GRACE),
            SidecarRules::default(),
        )
    }

    /// The sockets of an outbound chain to `db`:6379, in the order the kernel reports them: the app's socket (cookie
    /// `base + 1`, source port `app_port`), the sidecar's accept of it on
    /// 15001 (`base + 2`), the sidecar's own socket to the database
    /// (`base + 3`).
    pub fn outbound_chain(&self, base: u64, app_port: u16, db: Ipv4Addr) -> [Sock; 3] {
        [
            Sock {
                cookie: base + 1,
                outbound: true,
                local: (POD_IP, app_port),
                remote: (db, 6379),
                cgroup_id: self.app,
            },
            Sock {
                cookie: base + 2,
                outbound: false,
                local: (Ipv4Addr::LOCALHOST, 15001),
                remote: (POD_IP, app_port),
                cgroup_id: self.sidecar,
            },
            Sock {
                cookie: base + 3,
                outbound: true,
                local: (POD_IP, app_port + 1000),
                remote: (db, 6379),
                cgroup_id: self.sidecar,
            },
        ]
    }
}

/// One socket of the pod; its records are [`super::open`] and
/// [`super::close`] moved to its addresses and cgroup.
#[derive(Debug, Clone, Copy)]
pub struct Sock {
    pub cookie: u64,
    /// Connected (else accepted: the owner inherited from the listener).
    pub outbound: bool,
    pub local: (Ipv4Addr, u16),
    pub remote: (Ipv4Addr, u16),
    pub cgroup_id: u64,
}

impl Sock {
    pub fn open(&self, ns: u64) -> Event<OpenData> {
        self.place(super::open(ns, self.outbound, 0))
    }

    /// Its SNAPSHOT at `ns`, as the TCP iterator reads it (socket inode
    /// `ino`: the order sockets were created in).
    pub fn snapshot(&self, ns: u64, ino: u64) -> Event<SnapshotData> {
        let mut ev = self.place(super::snapshot(ns, self.outbound, 0));
        ev.data.ino = ino;
        ev
    }

    /// Its CLOSE at `ns`, the peer's FIN first (`by_peer`) or its own.
    pub fn close(&self, ns: u64, by_peer: bool) -> Event<CloseData> {
        let mut ev = self.place(super::close(ns, self.outbound, 0, false));
        ev.data.first_close_state = if by_peer {
            tcp_state::CLOSE_WAIT
        } else {
            tcp_state::FIN_WAIT1
        };
        ev
    }

    fn place<T>(&self, mut ev: Event<T>) -> Event<T> {
        let sock = &mut ev.info.sock;
        sock.saddr[..4].copy_from_slice(&self.local.0.octets());
        sock.daddr[..4].copy_from_slice(&self.remote.0.octets());
        (sock.sport, sock.dport) = (self.local.1, self.remote.1);
        ev.info.cookie = self.cookie;
        ev.info.owner.cgroup_id = self.cgroup_id;
        ev
    }
}

/// A running pod as the API serves it (`containers`: name, container ID).
pub(crate) fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    ip: &str,
    containers: &[(&str, &str)],
) -> serde_json::Value {
    use serde_json::json;
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid, "resourceVersion": "1"},
        "spec": {
            "nodeName": "node-a",
            "containers": containers.iter().map(|(n, _)| json!({"name": n, "image": "busybox"})).collect::<Vec<_>>(),
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "containerStatuses": containers.iter().map(|(n, id)| status(n, id)).collect::<Vec<_>>(),
        },
    })
}

/// A running container's status as the API serves it.
pub(crate) fn status(name: &str, id: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name, "containerID": id, "image": "busybox", "imageID": "",
        "ready": true, "restartCount": 0, "state": {"running": {}},
    })
}
