//! The cluster's Services and EndpointSlices (discovery.k8s.io/v1) from the
//! Kubernetes API, as a compact index: which Service port a ClusterIP:port
//! is, whether an ip:port is a backend of it, and which pod an IP of any
//! node belongs to.
//!
//! [`run`] lists and watches both resources cluster-wide with kube-rs'
//! watcher (no reflector store: each object is read into a small type that
//! keeps only the fields below, then folded into the index and dropped).
//! Kept per object: a Service's namespace, name, ClusterIPs and TCP ports
//! (number and name); an EndpointSlice's Service, its ports (name, number)
//! and per endpoint its addresses, its pod (targetRef name) and whether it
//! is terminating. A pod whose endpoint turned terminating, or left the
//! slices while terminating, is remembered as deleted for the grace period
//! (`deleted_pod_grace`): traffic to it is traffic to a terminated endpoint.
//! An endpoint that leaves while ready (a selector change, a force delete)
//! is not called deleted: the API does not tell those apart.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    ops::{Deref, DerefMut},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::kube::{DEFAULT_DELETE_GRACE, PodIndex};
use crate::{config::DEFAULT_MAX_ENDPOINTS, event::addr::canonical};

/// One port of one Service: what a ClusterIP:port resolves to. Cheap to
/// clone (one reference count).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServiceRef(Arc<ServicePort>);

#[derive(PartialEq, Eq, Hash)]
struct ServicePort {
    namespace: Box<str>,
    name: Box<str>,
    port: u16,
    /// The port's name ("" when unnamed): EndpointSlice ports carry it.
    port_name: Box<str>,
}

impl ServiceRef {
    pub fn new(namespace: &str, name: &str, port: u16, port_name: &str) -> Self {
        Self(Arc::new(ServicePort {
            namespace: namespace.into(),
            name: name.into(),
            port,
            port_name: port_name.into(),
        }))
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The Service port (the port clients dial on the ClusterIP).
    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// The Service port's name, "" when it has none.
    pub fn port_name(&self) -> &str {
        &self.0.port_name
    }

    /// `namespace/service`, the `peer` label of a ClusterIP.
    pub fn label(&self) -> String {
        format!("{}/{}", self.0.namespace, self.0.name)
    }
}

impl fmt::Debug for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}:{}({})",
            self.0.namespace, self.0.name, self.0.port, self.0.port_name
        )
    }
}

/// Services and endpoints of the cluster, shared between the watch task and
/// the readers like [`PodIndex`]. Empty (every lookup `None`) without the
/// API (`--no-kube`).
#[derive(Clone, Debug)]
pub struct ServiceIndex {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    index: RwLock<Index>,
    /// This node's pods: they name pod IPs first (and say exactly when a
    /// pod of this node was deleted).
    pods: Option<PodIndex>,
    errors: AtomicU64,
    grace: Duration,
}

impl Default for ServiceIndex {
    fn default() -> Self {
        Self::new(None, DEFAULT_DELETE_GRACE)
    }
}

/// What the index holds, for the self-metrics and the scale benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexSize {
    /// ClusterIP:port entries.
    pub service_ports: usize,
    /// Endpoint addresses over all slices.
    pub endpoints: usize,
    /// Pod IPs remembered as deleted (in their grace period).
    pub deleted: usize,
    /// Endpoints of slices left out because the index was full.
    pub refused: usize,
}

impl ServiceIndex {
    /// An empty index; `pods` (this node's pods) name their IPs first;
    /// deleted pods are remembered for `grace`.
    pub fn new(pods: Option<PodIndex>, grace: Duration) -> Self {
        Self::with_max_endpoints(pods, grace, DEFAULT_MAX_ENDPOINTS)
    }

    /// Like [`Self::new`], indexing at most `max_endpoints` endpoints: a
    /// slice that would pass it is left out (and counted) until it changes.
    pub fn with_max_endpoints(
        pods: Option<PodIndex>,
        grace: Duration,
        max_endpoints: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                index: RwLock::new(Index {
                    max_endpoints,
                    ..Index::default()
                }),
                pods,
                errors: AtomicU64::new(0),
                grace,
            }),
        }
    }

    /// The Service port a ClusterIP:port is.
    pub fn service_at(&self, ip: IpAddr, port: u16) -> Option<ServiceRef> {
        self.read()
            .by_cluster_ip
            .get(&(canonical(ip), port))
            .cloned()
    }

    /// Whether ip:port is an endpoint (ready or not) of `svc` with the
    /// target port of that Service port.
    pub fn is_backend(&self, svc: &ServiceRef, ip: IpAddr, port: u16) -> bool {
        let index = self.read();
        let Some(keys) = index.by_ip.get(&canonical(ip)) else {
            return false;
        };
        keys.iter().filter_map(|k| index.slices.get(k)).any(|s| {
            *s.namespace == *svc.namespace()
                && s.service.as_deref() == Some(svc.name())
                && s.ports
                    .iter()
                    .any(|(name, p)| **name == *svc.port_name() && *p == port)
        })
    }

    /// `(namespace, pod)` of a pod IP anywhere in the cluster: this node's
    /// pods, then the pods EndpointSlices name (`targetRef`), then the pods
    /// remembered as deleted. `None` for an IP that endpoints of two live
    /// pods share (hostNetwork pods on one node).
    pub fn pod_at(&self, ip: IpAddr) -> Option<(String, String)> {
        let ip = canonical(ip);
        if let Some(found) = self.shared.pods.as_ref().and_then(|p| p.lookup_ip(ip)) {
            return Some(found);
        }
        let index = self.read();
        let mut best: Option<(&Slice, &Endpoint)> = None;
        let mut ambiguous = false;
        for slice in index.by_ip.get(&ip).into_iter().flatten() {
            let Some(slice) = index.slices.get(slice) else {
                continue;
            };
            for e in slice
                .endpoints
                .iter()
                .filter(|e| e.ip == ip && e.pod.is_some())
            {
                match best {
                    // A live endpoint over a terminating one (an IP given to
                    // a new pod while the old one terminates).
                    None => best = Some((slice, e)),
                    Some((_, b)) if b.terminating && !e.terminating => {
                        best = Some((slice, e));
                        ambiguous = false;
                    }
                    // Two pods at once on one IP: hostNetwork pods, whose IP
                    // is their node's. Which one a port reaches is not known
                    // here: no name rather than a wrong one.
                    Some((bs, b)) if b.terminating == e.terminating => {
                        ambiguous |= b.pod != e.pod || bs.namespace != slice.namespace;
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some((slice, e)) = best {
            if ambiguous {
                return None;
            }
            return Some((slice.namespace.to_string(), e.pod.as_deref()?.to_owned()));
        }
        let gone = index.deleted.get(&ip)?;
        Some((gone.namespace.to_string(), gone.pod.to_string()))
    }

    /// Whether `ip` is a pod IP whose pod was deleted less than the grace
    /// period ago. This node's pod watch decides for its pods; elsewhere,
    /// the EndpointSlices.
    pub fn ip_deleted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if let Some(pods) = &self.shared.pods
            && pods.lookup_ip(ip).is_some()
        {
            return pods.ip_deleted(ip);
        }
        self.read().deleted.contains_key(&ip)
    }

    /// What the index holds now.
    pub fn size(&self) -> IndexSize {
        let index = self.read();
        IndexSize {
            service_ports: index.by_cluster_ip.len(),
            endpoints: index.endpoints,
            deleted: index.deleted.len(),
            refused: index.refused.values().sum(),
        }
    }

    /// True once first complete lists of both Services and EndpointSlices
    /// have been read.
    pub fn synced(&self) -> bool {
        let index = self.read();
        index.service_list.synced && index.slice_list.synced
    }

    /// Kubernetes API errors so far (each one was retried).
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    fn read(&self) -> impl Deref<Target = Index> + '_ {
        super::read(&self.shared.index)
    }

    fn write(&self) -> impl DerefMut<Target = Index> + '_ {
        super::write(&self.shared.index)
    }
}

/// A Service port as its EndpointSlices name it: namespace, Service name
/// and port name ("" when unnamed). Headless Services have one too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSet {
    pub namespace: String,
    pub service: String,
    pub port_name: String,
}

/// One ready endpoint of a [`BackendSet`]: address, target port, pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    pub pod: Option<String>,
}

// Backends of Services, for the connection-imbalance finding.
impl ServiceIndex {
    /// The Service ports whose EndpointSlices list ip:port (ready or not).
    pub fn backend_sets_of(&self, ip: IpAddr, port: u16) -> Vec<BackendSet> {
        let index = self.read();
        let mut out = Vec::new();
        for slice in index.by_ip.get(&canonical(ip)).into_iter().flatten() {
            let Some(s) = index.slices.get(slice) else {
                continue;
            };
            let Some(service) = s.service.as_deref() else {
                continue;
            };
            for (name, _) in s.ports.iter().filter(|(_, p)| *p == port) {
                let set = BackendSet {
                    namespace: s.namespace.to_string(),
                    service: service.to_owned(),
                    port_name: name.to_string(),
                };
                if !out.contains(&set) {
                    out.push(set);
                }
            }
        }
        out
    }

    /// The ready, not terminating endpoints of `set` over all its slices
    /// (one scan of the slices: call it for few sets).
    pub fn ready_backends(&self, set: &BackendSet) -> Vec<Backend> {
        let index = self.read();
        let mut out = Vec::new();
        let of_set = index.slices.values().filter(|s| {
            *s.namespace == *set.namespace && s.service.as_deref() == Some(set.service.as_str())
        });
        for s in of_set {
            let Some(&(_, port)) = s.ports.iter().find(|(n, _)| **n == *set.port_name) else {
                continue;
            };
            for e in s.endpoints.iter().filter(|e| e.ready && !e.terminating) {
                out.push(Backend {
                    ip: e.ip,
                    port,
                    pod: e.pod.as_deref().map(str::to_owned),
                });
            }
        }
        out
    }
}

#[cfg(test)]
impl ServiceIndex {
    /// Applies Services and EndpointSlices (API JSON) as their watches
    /// would: for the tests of the stages that read the index.
    pub(crate) fn apply_json(&self, services: &[serde_json::Value], slices: &[serde_json::Value]) {
        let now = Instant::now();
        for v in services {
            let obj: ServiceObj = serde_json::from_value(v.clone()).expect("Service JSON");
            self.apply(kube::runtime::watcher::Event::Apply(obj), now);
        }
        for v in slices {
            let obj: SliceObj = serde_json::from_value(v.clone()).expect("EndpointSlice JSON");
            self.apply(kube::runtime::watcher::Event::Apply(obj), now);
        }
    }
}

/// `namespace/name` of an object.
type Key = Arc<str>;

/// The ClusterIP:port entries of one Service.
type ServicePorts = Vec<((IpAddr, u16), ServiceRef)>;

#[derive(Debug, Default)]
struct Index {
    /// Service -> the ClusterIP:port entries it made.
    services: HashMap<Key, ServicePorts>,
    by_cluster_ip: HashMap<(IpAddr, u16), ServiceRef>,
    slices: HashMap<Key, Slice>,
    /// Endpoint address -> the slices that list it.
    by_ip: HashMap<IpAddr, Vec<Key>>,
    /// Pod IPs whose pod was deleted (terminating or gone), since when.
    deleted: HashMap<IpAddr, Gone>,
    service_list: Listing<ServicePorts>,
    slice_list: Listing<Slice>,
    /// Endpoints in `slices`, and the most there may be.
    endpoints: usize,
    max_endpoints: usize,
    /// Slices left out because the index was full: their endpoint counts.
    refused: HashMap<Key, usize>,
}

/// The list of one resource in progress, and whether one was complete.
#[derive(Debug)]
struct Listing<T> {
    /// The entries read between `Init` and `InitDone`.
    pending: Option<HashMap<Key, T>>,
    synced: bool,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self {
            pending: None,
            synced: false,
        }
    }
}

#[derive(Debug)]
struct Slice {
    namespace: Box<str>,
    /// The Service it belongs to (its `kubernetes.io/service-name`).
    service: Option<Box<str>>,
    /// (port name, port number) of the endpoints: the target ports.
    ports: Box<[(Box<str>, u16)]>,
    endpoints: Box<[Endpoint]>,
}

#[derive(Debug)]
struct Endpoint {
    ip: IpAddr,
    /// The pod's name (`targetRef` of kind Pod).
    pod: Option<Box<str>>,
    terminating: bool,
    /// `conditions.ready` (unknown counts as ready, as the API says).
    ready: bool,
}

#[derive(Debug)]
struct Gone {
    at: Instant,
    namespace: Box<str>,
    pod: Box<str>,
}

impl Index {
    /// Replaces (or with `None` removes) a Service's ClusterIP:port entries.
    fn replace_service(&mut self, key: &Key, ports: Option<ServicePorts>) {
        for (at, svc) in self.services.remove(key).into_iter().flatten() {
            // Only if no newer Service took the address meanwhile.
            if self.by_cluster_ip.get(&at) == Some(&svc) {
                self.by_cluster_ip.remove(&at);
            }
        }
        if let Some(ports) = ports {
            for (at, svc) in &ports {
                self.by_cluster_ip.insert(*at, svc.clone());
            }
            self.services.insert(key.clone(), ports);
        }
    }

    /// Replaces (or with `None` removes) a slice, then settles the
    /// deleted state of every address it had or has.
    fn replace_slice(&mut self, key: &Key, new: Option<Slice>, now: Instant) {
        let old = self.slices.remove(key);
        self.endpoints -= old.as_ref().map_or(0, |s| s.endpoints.len());
        self.refused.remove(key);
        // Full: the slice is left out (its old version too: it is stale).
        let new = new.filter(|n| {
            let fits = self.endpoints + n.endpoints.len() <= self.max_endpoints;
            if !fits {
                if self.refused.is_empty() {
                    log::warn!(
                        "kubernetes: the Service index holds its maximum of {} endpoints \
                         (max_cluster_endpoints); EndpointSlice {key} and later ones are left \
                         out: their pods show as addresses",
                        self.max_endpoints
                    );
                }
                self.refused.insert(key.clone(), n.endpoints.len());
            }
            fits
        });
        self.endpoints += new.as_ref().map_or(0, |s| s.endpoints.len());
        let mut was_terminating = HashMap::new();
        if let Some(old) = &old {
            for e in &old.endpoints {
                if let Some(keys) = self.by_ip.get_mut(&e.ip) {
                    keys.retain(|k| k != key);
                    if keys.is_empty() {
                        self.by_ip.remove(&e.ip);
                    }
                }
                if let Some(pod) = &e.pod {
                    let t = was_terminating.entry(e.ip).or_insert((false, None));
                    t.0 |= e.terminating;
                    t.1 = Some((old.namespace.clone(), pod.clone()));
                }
            }
        }
        let mut touched: HashSet<IpAddr> = was_terminating.keys().copied().collect();
        if let Some(new) = new {
            for e in &new.endpoints {
                let keys = self.by_ip.entry(e.ip).or_default();
                if !keys.contains(key) {
                    keys.push(key.clone());
                }
                touched.insert(e.ip);
            }
            self.slices.insert(key.clone(), new);
        }
        for ip in touched {
            let gone = match self.endpoint_state(ip) {
                EndpointState::Live => {
                    self.deleted.remove(&ip);
                    continue;
                }
                EndpointState::Terminating(namespace, pod) => (namespace, pod),
                // Left while terminating: the pod object is gone now.
                EndpointState::Absent => match was_terminating.remove(&ip) {
                    Some((true, Some(pod))) => pod,
                    _ => continue,
                },
            };
            let (namespace, pod) = gone;
            self.deleted.insert(
                ip,
                Gone {
                    at: now,
                    namespace,
                    pod,
                },
            );
        }
    }

    /// What the slices say of a pod IP now.
    fn endpoint_state(&self, ip: IpAddr) -> EndpointState {
        let mut terminating = None;
        for slice in self
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
        {
            for e in slice.endpoints.iter().filter(|e| e.ip == ip) {
                if !e.terminating {
                    return EndpointState::Live;
                }
                if let Some(pod) = &e.pod {
                    terminating = Some((slice.namespace.clone(), pod.clone()));
                }
            }
        }
        match terminating {
            Some((namespace, pod)) => EndpointState::Terminating(namespace, pod),
            None => EndpointState::Absent,
        }
    }
}

enum EndpointState {
    /// A ready or not-ready endpoint that is not terminating: a live pod.
    Live,
    Terminating(Box<str>, Box<str>),
    Absent,
}

mod watch;

pub use watch::run;
pub(crate) use watch::spawn;
#[cfg(test)]
pub(crate) use watch::{ServiceObj, SliceObj};

#[cfg(test)]
pub(crate) mod tests;
