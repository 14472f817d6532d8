//! Pod metadata of this node from the Kubernetes API: which pod and container
//! a container id, a pod uid or a pod IP belongs to.
//!
//! [`run`] lists and watches the pods scheduled on this node
//! (`spec.nodeName=<node>`) with kube-rs' watcher and keeps a [`PodIndex`]
//! that the rest of the daemon reads synchronously. The index outlives API
//! trouble: errors are counted and retried with the watcher's default
//! backoff, and a relist replaces the index only once it is complete. Deleted
//! pods stay for a grace period so that connections closing as their pod goes
//! away still get labels.

use std::{
    collections::{HashMap, hash_map::Entry},
    net::IpAddr,
    pin::pin,
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::{
    Api, Client, Config,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event, InitialListStrategy},
    },
};

pub(crate) use crate::config::DEFAULT_DELETE_GRACE;
use crate::event::addr::canonical;

/// Most dropped pods queued for [`PodIndex::take_forgotten`]; the daemon
/// takes them every resync, so this only bounds a queue nobody drains.
const MAX_FORGOTTEN: usize = 10_000;

/// Where pod metadata comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KubeSource {
    /// The service-account config every pod gets (KUBERNETES_SERVICE_HOST,
    /// token and CA under /var/run/secrets/kubernetes.io/serviceaccount).
    #[default]
    InCluster,
    /// `--kube-api URL`: plain http allowed, no authentication (tests,
    /// `kubectl proxy`).
    Url(String),
    /// `--no-kube`: no pod metadata; every connection is `host`.
    Disabled,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "not running in a Kubernetes pod ({0}): pass --kube-api URL (e.g. of `kubectl proxy`) or --no-kube"
    )]
    InCluster(#[from] kube::config::InClusterError),
    #[error("--kube-api {url:?} is not a URL: {source}")]
    BadUrl {
        url: String,
        source: hyper::http::uri::InvalidUri,
    },
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error(
        "the node name is empty: pass --node-name or set NODE_NAME from the downward API (spec.nodeName)"
    )]
    NoNodeName,
}

/// The pod and container a container id belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub pod_uid: String,
}

/// Pods of this node, shared between the watcher task and the readers.
/// Cloning is cheap and every clone sees the same pods.
#[derive(Clone, Debug)]
pub struct PodIndex {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    index: RwLock<Index>,
    errors: AtomicU64,
    grace: Duration,
}

impl Default for PodIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl PodIndex {
    /// An empty index whose deleted pods are kept for [`DEFAULT_DELETE_GRACE`].
    pub fn new() -> Self {
        Self::with_grace(DEFAULT_DELETE_GRACE)
    }

    /// An empty index whose deleted pods are kept for `grace`.
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                index: RwLock::default(),
                errors: AtomicU64::new(0),
                grace,
            }),
        }
    }

    /// The pod and container of a container id, bare (`4f3c...`) or as the
    /// API writes it (`containerd://4f3c...`, `cri-o://...`, `docker://...`).
    pub fn lookup_container(&self, container_id: &str) -> Option<PodRef> {
        let index = self.read();
        let (uid, container) = index.by_container.get(bare_container_id(container_id))?;
        let pod = index.pods.get(uid)?;
        Some(PodRef {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: container.clone(),
            pod_uid: uid.clone(),
        })
    }

    /// `(namespace, pod)` of a pod uid. Accepts the systemd cgroup driver's
    /// spelling with `_` for `-` (`kubepods-pod1234_5678.slice`).
    pub fn lookup_pod_uid(&self, uid: &str) -> Option<(String, String)> {
        let index = self.read();
        let pod = if uid.contains('_') {
            index.pods.get(&uid.replace('_', "-"))
        } else {
            index.pods.get(uid)
        }?;
        Some((pod.namespace.clone(), pod.name.clone()))
    }

    /// `(namespace, pod)` of a pod IP. hostNetwork pods are left out: their
    /// IP is the node's. When a deleted or finished pod's IP has been given
    /// to a new pod, the running pod wins.
    pub fn lookup_ip(&self, ip: IpAddr) -> Option<(String, String)> {
        let index = self.read();
        let pod = index.pods.get(index.by_ip.get(&canonical(ip))?)?;
        Some((pod.namespace.clone(), pod.name.clone()))
    }

    /// Whether the pod holding `ip` was deleted (and is in its grace
    /// period); false for unknown addresses and running pods.
    pub(crate) fn ip_deleted(&self, ip: IpAddr) -> bool {
        let index = self.read();
        index
            .by_ip
            .get(&canonical(ip))
            .and_then(|uid| index.pods.get(uid))
            .is_some_and(|p| p.deleted_at.is_some())
    }

    /// Names of the pod's containers: init containers, then the app
    /// containers, then ephemeral ones, each in spec order. Empty for an
    /// unknown pod.
    pub fn container_names_of(&self, pod_uid: &str) -> Vec<String> {
        self.read()
            .pods
            .get(pod_uid)
            .map(|p| p.containers.clone())
            .unwrap_or_default()
    }

    /// Kubernetes API errors so far (each one was retried).
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    /// Pods on the node now, without the deleted ones still in their grace
    /// period.
    pub fn pods(&self) -> usize {
        self.read()
            .pods
            .values()
            .filter(|p| p.deleted_at.is_none())
            .count()
    }

    /// True once a first complete list of the node's pods has been read.
    pub fn synced(&self) -> bool {
        self.read().synced
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        super::read(&self.shared.index)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        super::write(&self.shared.index)
    }

    /// Applies one Pod as the API serves it (JSON): the unit tests' and the
    /// pipeline benchmark's pods.
    pub(crate) fn apply_json(&self, pod: &serde_json::Value) {
        let pod: Pod = serde_json::from_value(pod.clone()).expect("valid Pod JSON");
        self.apply(Event::Apply(pod), Instant::now());
    }

    fn apply(&self, event: Event<Pod>, now: Instant) {
        let mut index = self.write();
        match event {
            // A (re)list starts: the pods known so far stay readable until
            // the new list is complete.
            Event::Init => index.pending = Some(HashMap::new()),
            Event::InitApply(pod) => {
                let (uid, entry) = PodEntry::from_pod(&pod);
                index.pending.get_or_insert_default().insert(uid, entry);
            }
            Event::InitDone => index.replace_with_pending(now),
            Event::Apply(pod) => {
                let (uid, entry) = PodEntry::from_pod(&pod);
                index.pods.insert(uid, entry);
                index.rebuild();
            }
            Event::Delete(pod) => {
                let (uid, mut entry) = PodEntry::from_pod(&pod);
                entry.deleted_at = Some(now);
                index.pods.insert(uid, entry);
                index.rebuild();
            }
        }
    }

    /// Drops the pods deleted at least the grace period before `now`, and
    /// queues their names for [`PodIndex::take_forgotten`].
    fn purge(&self, now: Instant) {
        let grace = self.shared.grace;
        let mut index = self.write();
        let mut gone = Vec::new();
        index.pods.retain(|_, p| {
            let keep = p.deleted_at.is_none_or(|at| now.duration_since(at) < grace);
            if !keep {
                gone.push((p.namespace.clone(), p.name.clone()));
            }
            keep
        });
        if gone.is_empty() {
            return;
        }
        index.rebuild();
        for (namespace, pod) in gone {
            // A pod of the same name that exists again (a StatefulSet's) keeps
            // its series.
            if index.has_pod(&namespace, &pod) {
                continue;
            }
            if index.forgotten.len() >= MAX_FORGOTTEN {
                index.forgotten.pop_front();
            }
            index.forgotten.push_back((now, namespace, pod));
        }
    }

    /// Pods (namespace, name) dropped from the index at least the grace
    /// period before `now`: their metric series can go. Each is returned
    /// once. The second grace period lets Prometheus scrape the counts of
    /// connections that closed while the pod was going away.
    pub(crate) fn take_forgotten(&self, now: Instant) -> Vec<(String, String)> {
        let grace = self.shared.grace;
        let mut index = self.write();
        let mut out = Vec::new();
        while let Some((at, _, _)) = index.forgotten.front() {
            if now.duration_since(*at) < grace {
                break;
            }
            if let Some((_, namespace, pod)) = index.forgotten.pop_front() {
                // Unless it came back meanwhile.
                if !index.has_pod(&namespace, &pod) {
                    out.push((namespace, pod));
                }
            }
        }
        out
    }

    fn record_error(&self, err: &watcher::Error) {
        let n = self.shared.errors.fetch_add(1, Ordering::Relaxed) + 1;
        log::warn!(
            "kubernetes API: {err} (error {n}); retrying with backoff, pod labels known so far are kept"
        );
    }
}

#[derive(Debug, Default)]
struct Index {
    /// By pod uid; deleted pods stay until their grace period is over.
    pods: HashMap<String, PodEntry>,
    /// Bare container id -> (pod uid, container name).
    by_container: HashMap<String, (String, String)>,
    /// Pod IP -> pod uid.
    by_ip: HashMap<IpAddr, String>,
    /// The list in progress between `Init` and `InitDone`.
    pending: Option<HashMap<String, PodEntry>>,
    /// Pods dropped after their grace, when, for [`PodIndex::take_forgotten`].
    forgotten: std::collections::VecDeque<(Instant, String, String)>,
    synced: bool,
}

impl Index {
    /// Whether a pod of this namespace and name is in the index (deleted
    /// ones in their grace included).
    fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.pods
            .values()
            .any(|p| p.namespace == namespace && p.name == name)
    }

    /// Makes the completed list the index. Pods it no longer has were deleted
    /// while the watch was down: they get the grace period like any deletion.
    fn replace_with_pending(&mut self, now: Instant) {
        let Some(fresh) = self.pending.take() else {
            return;
        };
        for (uid, pod) in &mut self.pods {
            if pod.deleted_at.is_none() && !fresh.contains_key(uid) {
                pod.deleted_at = Some(now);
            }
        }
        let listed = fresh.len();
        self.pods.extend(fresh);
        self.synced = true;
        self.rebuild();
        log::info!("kubernetes: {listed} pods on this node");
    }

    /// Recomputes the lookup maps from `pods`. A node runs at most a few
    /// hundred pods, so this is cheaper to get right than incremental
    /// updates that must respect IP reuse and deletion order.
    fn rebuild(&mut self) {
        self.by_container.clear();
        self.by_ip.clear();
        for (uid, pod) in &self.pods {
            for (id, name) in &pod.container_ids {
                self.by_container
                    .insert(id.clone(), (uid.clone(), name.clone()));
            }
            for ip in &pod.ips {
                match self.by_ip.entry(*ip) {
                    Entry::Vacant(v) => {
                        v.insert(uid.clone());
                    }
                    Entry::Occupied(mut o) => {
                        let holder = &self.pods[o.get()];
                        if (pod.ip_rank(), uid) > (holder.ip_rank(), o.get()) {
                            o.insert(uid.clone());
                        }
                    }
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PodEntry {
    namespace: String,
    name: String,
    /// Empty for hostNetwork pods.
    ips: Vec<IpAddr>,
    /// Container names in spec order (init, app, ephemeral).
    containers: Vec<String>,
    /// (bare container id, container name), current and previous instances.
    container_ids: Vec<(String, String)>,
    /// Phase Succeeded or Failed: its IP may already belong to another pod.
    finished: bool,
    deleted_at: Option<Instant>,
}

impl PodEntry {
    /// The pod's uid (namespace/name if it has none) and its entry.
    fn from_pod(pod: &Pod) -> (String, Self) {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let uid = meta
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| format!("{namespace}/{name}"));
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();

        let mut containers = Vec::new();
        if let Some(spec) = spec {
            let init = spec.init_containers.iter().flatten().map(|c| &c.name);
            let app = spec.containers.iter().map(|c| &c.name);
            let ephemeral = spec.ephemeral_containers.iter().flatten().map(|c| &c.name);
            containers.extend(init.chain(app).chain(ephemeral).cloned());
        }

        let mut container_ids = Vec::new();
        if let Some(status) = status {
            let statuses = [
                &status.init_container_statuses,
                &status.container_statuses,
                &status.ephemeral_container_statuses,
            ];
            for cs in statuses.into_iter().flatten().flatten() {
                for id in status_container_ids(cs) {
                    container_ids.push((bare_container_id(id).to_owned(), cs.name.clone()));
                }
            }
        }

        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let mut ips = Vec::new();
        if !host_network && let Some(status) = status {
            let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
            for ip in listed.chain(status.pod_ip.as_deref()) {
                if let Ok(ip) = ip.parse::<IpAddr>().map(canonical)
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
            }
        }
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );

        (
            uid,
            Self {
                namespace,
                name,
                ips,
                containers,
                container_ids,
                finished,
                deleted_at: None,
            },
        )
    }

    /// Which pod keeps an IP two pods claim: a running pod over a deleted
    /// one, and a pod deleted lately over a finished one.
    fn ip_rank(&self) -> u8 {
        match (self.finished, self.deleted_at) {
            (true, _) => 0,
            (false, Some(_)) => 1,
            (false, None) => 2,
        }
    }
}

/// The container ids of a status: the running instance's and, after a
/// restart, the previous one's (its connections may still be closing).
fn status_container_ids(cs: &ContainerStatus) -> impl Iterator<Item = &str> {
    let previous = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.container_id.as_deref());
    cs.container_id
        .as_deref()
        .into_iter()
        .chain(previous)
        .filter(|id| !bare_container_id(id).is_empty())
}

/// `containerd://abc` -> `abc`; a bare id is returned as it is.
pub(crate) fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, bare)| bare)
}

/// The node this daemon runs on: `NODE_NAME` (set it from the downward API,
/// `spec.nodeName`), else the hostname, which is the node name on most but
/// not all clusters.
pub(crate) fn default_node_name() -> String {
    if let Some(name) = std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
    {
        return name.trim().to_owned();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The watcher settings: pods of `node_name`, classic paginated list then
/// watch (every apiserver and `kubectl proxy` serve it; streaming lists need
/// a feature gate on older clusters), with watch bookmarks.
pub(crate) fn watcher_config(node_name: &str) -> watcher::Config {
    watcher::Config {
        initial_list_strategy: InitialListStrategy::ListWatch,
        ..watcher::Config::default()
    }
    .fields(&format!("spec.nodeName={node_name}"))
}

/// Keeps `index` up to date with the pods of `node_name` until the task is
/// dropped. Returns at once for [`KubeSource::Disabled`], and with an error
/// only when no client can be built; API errors once running are logged,
/// counted in [`PodIndex::errors`] and retried.
pub async fn run(source: KubeSource, node_name: String, index: PodIndex) -> Result<(), KubeError> {
    let Some(client) = client(source)? else {
        return Ok(());
    };
    if node_name.trim().is_empty() {
        return Err(KubeError::NoNodeName);
    }
    let api: Api<Pod> = Api::all(client);
    let mut events = pin!(watcher::watcher(api, watcher_config(&node_name)).default_backoff());
    let mut purge = super::purge_timer(index.shared.grace);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => index.apply(event, Instant::now()),
                Some(Err(err)) => index.record_error(&err),
                // The watcher retries for ever; an end is not expected.
                None => return Ok(()),
            },
            _ = purge.tick() => index.purge(Instant::now()),
        }
    }
}

/// The API client of a source; `None` for [`KubeSource::Disabled`].
pub(crate) fn client(source: KubeSource) -> Result<Option<Client>, KubeError> {
    let config = match source {
        KubeSource::Disabled => return Ok(None),
        KubeSource::InCluster => Config::incluster()?,
        KubeSource::Url(url) => match url.parse() {
            Ok(uri) => Config::new(uri),
            Err(source) => return Err(KubeError::BadUrl { url, source }),
        },
    };
    Ok(Some(Client::try_from(config)?))
}

/// Runs [`run`] on the tokio runtime; a failure to start is logged and the
/// daemon goes on without pod labels.
pub(crate) fn spawn(
    source: KubeSource,
    node_name: String,
    index: PodIndex,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(err) = run(source, node_name, index).await {
            log::warn!("no pod metadata: {err}");
        }
    })
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
pub(crate) mod tests;
