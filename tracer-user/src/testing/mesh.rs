//! A meshed pod as the attributor sees it, for the unit tests: its
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
    kube::{
        DEFAULT_DELETE_GRACE, PodIndex,
        tests::{apply, pod},
    },
    kubelet::tests::{CID, UID, uid_},
    services::ServiceIndex,
};

pub(crate) const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 2);
pub(crate) const DB_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 2);
const PROXY_CID: &str = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b";

pub(crate) struct MeshPod {
    tree: TempTree,
    pods: PodIndex,
    /// The cgroup id of the `app` container.
    pub(crate) app: u64,
    /// The cgroup id of the `istio-proxy` container.
    pub(crate) sidecar: u64,
}

impl MeshPod {
    pub(crate) fn new(tag: &str) -> Self {
        let tree = TempTree::new(tag);
        let pod_dir = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid_!()
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
        apply(
            &pods,
            &pod("shop", "cart-1", UID, &POD_IP.to_string(), &containers),
        );
        apply(
            &pods,
            &pod("db", "redis-0", "uid-db", &DB_IP.to_string(), &[]),
        );
        Self {
            tree,
            pods,
            app,
            sidecar,
        }
    }

    /// An attributor that sees this pod (the default sidecar rules).
    pub(crate) fn attributor(&self) -> Attributor {
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
    pub(crate) fn outbound_chain(&self, base: u64, app_port: u16, db: Ipv4Addr) -> [Sock; 3] {
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
pub(crate) struct Sock {
    pub(crate) cookie: u64,
    /// Connected (else accepted: the owner inherited from the listener).
    pub(crate) outbound: bool,
    pub(crate) local: (Ipv4Addr, u16),
    pub(crate) remote: (Ipv4Addr, u16),
    pub(crate) cgroup_id: u64,
}

impl Sock {
    pub(crate) fn open(&self, ns: u64) -> Event<OpenData> {
        self.place(super::open(ns, self.outbound, 0))
    }

    /// Its SNAPSHOT at `ns`, as the TCP iterator reads it (socket inode
    /// `ino`: the order sockets were created in).
    pub(crate) fn snapshot(&self, ns: u64, ino: u64) -> Event<SnapshotData> {
        let mut ev = self.place(super::snapshot(ns, self.outbound, 0));
        ev.data.ino = ino;
        ev
    }

    /// Its CLOSE at `ns`, the peer's FIN first (`by_peer`) or its own.
    pub(crate) fn close(&self, ns: u64, by_peer: bool) -> Event<CloseData> {
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
