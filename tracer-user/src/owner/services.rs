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
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::IpAddr,
    ops::{Deref, DerefMut},
    pin::pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event, InitialListStrategy},
    },
};
use serde::{Deserialize, Deserializer};

use super::kube::{DEFAULT_DELETE_GRACE, KubeError, KubeSource, PodIndex};
use crate::{config::DEFAULT_MAX_ENDPOINTS, event::addr::canonical};

/// The label an EndpointSlice names its Service by.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// EndpointSlices per list page: a slice holds up to 100 endpoints (1,000
/// at most), so a page is a few MiB of JSON at worst while it is read.
const SLICE_PAGE: u32 = 100;

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

    /// Folds one watch event of a resource into the index. A relist
    /// (`Init` .. `InitDone`) replaces the resource's objects only once it
    /// is complete; until then the old ones answer.
    fn apply<W: Watched>(&self, event: Event<W>, now: Instant) {
        let mut index = self.write();
        match event {
            Event::Init => W::listing(&mut index).pending = Some(HashMap::new()),
            Event::InitApply(obj) => {
                let (key, entry) = obj.entry();
                let listing = W::listing(&mut index);
                listing.pending.get_or_insert_default().insert(key, entry);
            }
            Event::InitDone => {
                let fresh = W::listing(&mut index).pending.take().unwrap_or_default();
                for key in W::keys(&index) {
                    if !fresh.contains_key(&key) {
                        W::put(&mut index, &key, None, now);
                    }
                }
                let listed = fresh.len();
                for (key, entry) in fresh {
                    W::put(&mut index, &key, Some(entry), now);
                }
                W::listing(&mut index).synced = true;
                log::info!("kubernetes: {listed} {} in the cluster", W::WHAT);
            }
            Event::Apply(obj) => {
                let (key, entry) = obj.entry();
                W::put(&mut index, &key, Some(entry), now);
            }
            Event::Delete(obj) => W::put(&mut index, &obj.key(), None, now),
        }
    }

    /// Forgets the deleted pods whose grace period is over.
    fn purge(&self, now: Instant) {
        let grace = self.shared.grace;
        self.write()
            .deleted
            .retain(|_, gone| now.duration_since(gone.at) < grace);
    }

    fn record_error(&self, what: &str, err: &watcher::Error) {
        let n = self.shared.errors.fetch_add(1, Ordering::Relaxed) + 1;
        log::warn!(
            "kubernetes API ({what}): {err} (error {n}); retrying with backoff, what is known so far is kept"
        );
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
            self.apply(Event::Apply(obj), now);
        }
        for v in slices {
            let obj: SliceObj = serde_json::from_value(v.clone()).expect("EndpointSlice JSON");
            self.apply(Event::Apply(obj), now);
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

/// A watched resource: how its objects become index entries.
trait Watched {
    type Entry;
    /// Its plural, for the log.
    const WHAT: &'static str;
    fn key(&self) -> Key;
    fn entry(&self) -> (Key, Self::Entry);
    fn listing(index: &mut Index) -> &mut Listing<Self::Entry>;
    /// The keys of its objects in the index.
    fn keys(index: &Index) -> Vec<Key>;
    /// Replaces (with `None` removes) the entry of `key`.
    fn put(index: &mut Index, key: &Key, entry: Option<Self::Entry>, now: Instant);
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

/// Lists then watches Services and EndpointSlices of the whole cluster
/// into `index` until the task is dropped. Returns at once for
/// [`KubeSource::Disabled`], and with an error only when no client can be
/// built; API errors once running are logged, counted and retried.
pub async fn run(source: KubeSource, index: ServiceIndex) -> Result<(), KubeError> {
    let Some(client) = super::kube::client(source)? else {
        return Ok(());
    };
    let list_watch = || watcher::Config {
        initial_list_strategy: InitialListStrategy::ListWatch,
        ..watcher::Config::default()
    };
    let services: Api<ServiceObj> = Api::all(client.clone());
    let slices: Api<SliceObj> = Api::all(client);
    let mut services = pin!(watcher::watcher(services, list_watch()).default_backoff());
    let slice_config = list_watch().page_size(SLICE_PAGE);
    let mut slices = pin!(watcher::watcher(slices, slice_config).default_backoff());
    let mut purge = super::purge_timer(index.shared.grace);
    loop {
        tokio::select! {
            event = services.next() => match event {
                Some(Ok(event)) => index.apply(event, Instant::now()),
                Some(Err(err)) => index.record_error("services", &err),
                None => return Ok(()),
            },
            event = slices.next() => match event {
                Some(Ok(event)) => index.apply(event, Instant::now()),
                Some(Err(err)) => index.record_error("endpointslices", &err),
                None => return Ok(()),
            },
            _ = purge.tick() => index.purge(Instant::now()),
        }
    }
}

/// Runs [`run`] on the tokio runtime; a failure to start is logged and the
/// daemon goes on without Service names and remote pods.
pub(crate) fn spawn(source: KubeSource, index: ServiceIndex) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(err) = run(source, index).await {
            log::warn!("no Service or EndpointSlice metadata: {err}");
        }
    })
}

// The API objects, reduced to the fields the index keeps: serde skips the
// rest (managedFields, annotations, status, ...) while reading.

/// Metadata without managedFields, annotations or labels other than the
/// Service name.
fn lite_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    struct Lite {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
    }
    let lite = Option::<Lite>::deserialize(d)?.unwrap_or_default();
    let labels = lite
        .labels
        .and_then(|mut l| l.remove_entry(SERVICE_NAME_LABEL))
        .map(|kv| BTreeMap::from([kv]));
    Ok(ObjectMeta {
        name: lite.name,
        namespace: lite.namespace,
        uid: lite.uid,
        resource_version: lite.resource_version,
        labels,
        ..ObjectMeta::default()
    })
}

/// A Kubernetes resource type of the watch, read as the small type it is.
macro_rules! lite_resource {
    ($ty:ident, $group:literal, $version:literal, $kind:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind((): &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group((): &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version((): &()) -> Cow<'_, str> {
                $version.into()
            }
            fn plural((): &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        impl $ty {
            fn object_key(&self) -> Key {
                let m = &self.metadata;
                let ns = m.namespace.as_deref().unwrap_or_default();
                format!("{ns}/{}", m.name.as_deref().unwrap_or_default()).into()
            }

            fn namespace(&self) -> &str {
                self.metadata.namespace.as_deref().unwrap_or_default()
            }
        }
    };
}

/// A core/v1 Service: its ClusterIPs and TCP ports.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ServiceObj {
    #[serde(deserialize_with = "lite_meta", default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<ServiceSpec>,
}
lite_resource!(ServiceObj, "", "v1", "Service", "services");

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct ServiceSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    ports: Option<Vec<NamedPort>>,
}

/// A Service port or an EndpointSlice port: name, number, protocol.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct NamedPort {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

impl NamedPort {
    /// (name, number) of a TCP port (TCP is the default protocol).
    fn tcp(&self) -> Option<(&str, u16)> {
        let tcp = self.protocol.as_deref().is_none_or(|p| p == "TCP");
        let port = u16::try_from(self.port?).ok().filter(|&p| p != 0)?;
        tcp.then(|| (self.name.as_deref().unwrap_or_default(), port))
    }
}

impl Watched for ServiceObj {
    type Entry = ServicePorts;
    const WHAT: &'static str = "services";

    fn key(&self) -> Key {
        self.object_key()
    }

    /// Its key and the ClusterIP:port entries it makes (none for headless
    /// and ExternalName Services).
    fn entry(&self) -> (Key, ServicePorts) {
        let key = self.key();
        let Some(spec) = &self.spec else {
            return (key, Vec::new());
        };
        if spec.kind.as_deref() == Some("ExternalName") {
            return (key, Vec::new());
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
        for ip in listed.chain(spec.cluster_ip.as_deref()) {
            // "None" (headless) and "" do not parse.
            if let Ok(ip) = ip.parse::<IpAddr>().map(canonical)
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        let name = self.metadata.name.as_deref().unwrap_or_default();
        let mut out = Vec::new();
        for (port_name, port) in spec.ports.iter().flatten().filter_map(NamedPort::tcp) {
            let svc = ServiceRef::new(self.namespace(), name, port, port_name);
            out.extend(ips.iter().map(|ip| ((*ip, port), svc.clone())));
        }
        (key, out)
    }

    fn listing(index: &mut Index) -> &mut Listing<ServicePorts> {
        &mut index.service_list
    }

    fn keys(index: &Index) -> Vec<Key> {
        index.services.keys().cloned().collect()
    }

    fn put(index: &mut Index, key: &Key, entry: Option<ServicePorts>, _: Instant) {
        index.replace_service(key, entry);
    }
}

/// A discovery.k8s.io/v1 EndpointSlice: its Service, ports and endpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SliceObj {
    #[serde(deserialize_with = "lite_meta", default)]
    metadata: ObjectMeta,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default)]
    endpoints: Option<Vec<EndpointObj>>,
    #[serde(default)]
    ports: Option<Vec<NamedPort>>,
}
lite_resource!(
    SliceObj,
    "discovery.k8s.io",
    "v1",
    "EndpointSlice",
    "endpointslices"
);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct EndpointObj {
    addresses: Option<Vec<String>>,
    conditions: Option<Conditions>,
    target_ref: Option<TargetRef>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct Conditions {
    terminating: Option<bool>,
    ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct TargetRef {
    kind: Option<String>,
    name: Option<String>,
}

impl Watched for SliceObj {
    type Entry = Slice;
    const WHAT: &'static str = "endpoint slices";

    fn key(&self) -> Key {
        self.object_key()
    }

    fn listing(index: &mut Index) -> &mut Listing<Slice> {
        &mut index.slice_list
    }

    /// Indexed and refused ones: a relist forgets both when they are gone.
    fn keys(index: &Index) -> Vec<Key> {
        index
            .slices
            .keys()
            .chain(index.refused.keys())
            .cloned()
            .collect()
    }

    fn put(index: &mut Index, key: &Key, entry: Option<Slice>, now: Instant) {
        index.replace_slice(key, entry, now);
    }

    fn entry(&self) -> (Key, Slice) {
        let ip_slice = matches!(self.address_type.as_deref(), Some("IPv4" | "IPv6") | None);
        let mut endpoints = Vec::new();
        for e in self.endpoints.iter().flatten().filter(|_| ip_slice) {
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref())
                .map(Box::from);
            let terminating = e
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for ip in e.addresses.iter().flatten() {
                if let Ok(ip) = ip.parse::<IpAddr>().map(canonical) {
                    endpoints.push(Endpoint {
                        ip,
                        pod: pod.clone(),
                        terminating,
                        ready,
                    });
                }
            }
        }
        let ports = self
            .ports
            .iter()
            .flatten()
            .filter_map(NamedPort::tcp)
            .map(|(name, port)| (Box::from(name), port))
            .collect();
        let service = self
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|s| Box::from(s.as_str()));
        (
            self.key(),
            Slice {
                namespace: self.namespace().into(),
                service,
                ports,
                endpoints: endpoints.into(),
            },
        )
    }
}

#[cfg(test)]
pub(crate) mod tests;
