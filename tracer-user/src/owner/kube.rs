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
        Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
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

/// How long a deleted pod keeps its labels: long enough for the connections
/// it had open to be reported closed.
pub const DEFAULT_DELETE_GRACE: Duration = Duration::from_mins(2);

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
        let pod = index.pods.get(index.by_ip.get(&canonical_ip(ip))?)?;
        Some((pod.namespace.clone(), pod.name.clone()))
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
        self.shared
            .index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.shared
            .index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
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
    pub fn take_forgotten(&self, now: Instant) -> Vec<(String, String)> {
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

    /// How often deleted pods past their grace are dropped.
    fn purge_interval(&self) -> Duration {
        (self.shared.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(10))
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
                if let Ok(ip) = ip.parse::<IpAddr>().map(canonical_ip)
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
pub fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, bare)| bare)
}

/// IPv4-mapped IPv6 addresses (what a dual-stack socket reports for an IPv4
/// peer) as IPv4, so both spellings find the pod.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The node this daemon runs on: `NODE_NAME` (set it from the downward API,
/// `spec.nodeName`), else the hostname, which is the node name on most but
/// not all clusters.
pub fn default_node_name() -> String {
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
pub fn watcher_config(node_name: &str) -> watcher::Config {
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
    let config = match source {
        KubeSource::Disabled => return Ok(()),
        KubeSource::InCluster => Config::incluster()?,
        KubeSource::Url(url) => match url.parse() {
            Ok(uri) => Config::new(uri),
            Err(source) => return Err(KubeError::BadUrl { url, source }),
        },
    };
    if node_name.trim().is_empty() {
        return Err(KubeError::NoNodeName);
    }
    let api: Api<Pod> = Api::all(Client::try_from(config)?);
    let mut events = pin!(watcher::watcher(api, watcher_config(&node_name)).default_backoff());
    let mut purge = tokio::time::interval(index.purge_interval());
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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

/// Runs [`run`] on the tokio runtime; a failure to start is logged and the
/// daemon goes on without pod labels.
pub fn spawn(
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
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use serde_json::{Value, json};

    use super::*;

    fn pod(ns: &str, name: &str, uid: &str, ip: &str, containers: &[(&str, &str)]) -> Value {
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

    fn status(name: &str, id: &str) -> Value {
        json!({
            "name": name, "containerID": id, "image": "busybox", "imageID": "",
            "ready": true, "restartCount": 0, "state": {"running": {}},
        })
    }

    fn typed(v: &Value) -> Pod {
        serde_json::from_value(v.clone()).expect("valid Pod JSON")
    }

    fn apply(index: &PodIndex, v: &Value) {
        index.apply(Event::Apply(typed(v)), Instant::now());
    }

    #[expect(
        clippy::unnecessary_wraps,
        reason = "compared with what lookups return"
    )]
    fn nsname(ns: &str, pod: &str) -> Option<(String, String)> {
        Some((ns.to_owned(), pod.to_owned()))
    }

    const CONTAINERD: &str = "4f3c2b1a0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a";
    const CRIO: &str = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b";
    const DOCKER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn container_ids_of_every_runtime_resolve_bare_and_prefixed() {
        let index = PodIndex::new();
        apply(
            &index,
            &pod(
                "shop",
                "cart-1",
                "uid-1",
                "10.244.1.5",
                &[
                    ("app", &format!("containerd://{CONTAINERD}")),
                    ("istio-proxy", &format!("cri-o://{CRIO}")),
                    ("legacy", &format!("docker://{DOCKER}")),
                ],
            ),
        );
        let want = |container: &str| {
            Some(PodRef {
                namespace: "shop".into(),
                pod: "cart-1".into(),
                container: container.into(),
                pod_uid: "uid-1".into(),
            })
        };
        assert_eq!(index.lookup_container(CONTAINERD), want("app"));
        assert_eq!(index.lookup_container(CRIO), want("istio-proxy"));
        assert_eq!(index.lookup_container(DOCKER), want("legacy"));
        assert_eq!(
            index.lookup_container(&format!("cri-o://{CRIO}")),
            want("istio-proxy")
        );
        assert_eq!(index.lookup_container("feedface"), None);
        assert_eq!(index.pods(), 1);
        assert_eq!(bare_container_id("containerd://abc"), "abc");
        assert_eq!(bare_container_id("abc"), "abc");
    }

    #[test]
    fn containers_not_started_yet_have_no_id() {
        let index = PodIndex::new();
        let mut p = pod("ns", "p", "uid-1", "10.244.1.5", &[("app", "")]);
        p["status"]["containerStatuses"][0]
            .as_object_mut()
            .unwrap()
            .remove("containerID");
        apply(&index, &p);
        assert!(index.read().by_container.is_empty());
        assert_eq!(index.container_names_of("uid-1"), ["app"]);
    }

    #[test]
    fn pod_ips_index_both_families_and_skip_host_network() {
        let index = PodIndex::new();
        let mut dual = pod("web", "front-1", "uid-1", "10.244.1.7", &[]);
        dual["status"]["podIPs"] = json!([{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}]);
        apply(&index, &dual);
        let mut host = pod("kube-system", "kube-proxy-x", "uid-2", "192.0.2.10", &[]);
        host["spec"]["hostNetwork"] = json!(true);
        apply(&index, &host);

        let v4 = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7));
        assert_eq!(index.lookup_ip(v4), nsname("web", "front-1"));
        let v6: IpAddr = "fd00:10:244:1::7".parse().unwrap();
        assert_eq!(index.lookup_ip(v6), nsname("web", "front-1"));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 244, 1, 7).to_ipv6_mapped());
        assert_eq!(index.lookup_ip(mapped), nsname("web", "front-1"));
        assert_eq!(index.lookup_ip("192.0.2.10".parse().unwrap()), None);
        assert_eq!(index.lookup_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)), None);
        assert_eq!(
            index.lookup_pod_uid("uid-2"),
            nsname("kube-system", "kube-proxy-x")
        );
    }

    #[test]
    fn init_ephemeral_and_restarted_containers_are_indexed() {
        let index = PodIndex::new();
        let mut p = pod(
            "db",
            "mysql-0",
            "1234-5678",
            "10.244.1.9",
            &[("mysql", "containerd://aaa")],
        );
        p["spec"]["initContainers"] = json!([{"name": "init-perms", "image": "busybox"}]);
        p["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox"}]);
        p["status"]["initContainerStatuses"] = json!([status("init-perms", "containerd://iii")]);
        p["status"]["ephemeralContainerStatuses"] = json!([status("debugger", "containerd://eee")]);
        p["status"]["containerStatuses"][0]["restartCount"] = json!(1);
        p["status"]["containerStatuses"][0]["lastState"] =
            json!({"terminated": {"exitCode": 137, "containerID": "containerd://old"}});
        apply(&index, &p);

        let container = |id: &str| index.lookup_container(id).map(|r| r.container);
        assert_eq!(container("iii").as_deref(), Some("init-perms"));
        assert_eq!(container("aaa").as_deref(), Some("mysql"));
        assert_eq!(container("old").as_deref(), Some("mysql"));
        assert_eq!(container("eee").as_deref(), Some("debugger"));
        assert_eq!(
            index.container_names_of("1234-5678"),
            ["init-perms", "mysql", "debugger"]
        );
        assert_eq!(index.lookup_pod_uid("1234_5678"), nsname("db", "mysql-0"));
        assert!(index.container_names_of("nope").is_empty());
    }

    #[test]
    fn deleted_pods_are_forgotten_once_a_grace_period_after_their_purge() {
        let grace = Duration::from_mins(2);
        let index = PodIndex::with_grace(grace);
        let gone = pod(
            "ns",
            "gone",
            "uid-1",
            "10.244.1.5",
            &[("app", "containerd://a")],
        );
        let back = pod(
            "ns",
            "web-0",
            "uid-2",
            "10.244.1.6",
            &[("app", "containerd://b")],
        );
        apply(&index, &gone);
        apply(&index, &back);
        let t0 = Instant::now();
        index.apply(Event::Delete(typed(&gone)), t0);
        index.apply(Event::Delete(typed(&back)), t0);
        // A StatefulSet's pod comes back under the same name, new uid.
        let again = pod(
            "ns",
            "web-0",
            "uid-3",
            "10.244.1.7",
            &[("app", "containerd://c")],
        );
        apply(&index, &again);

        index.purge(t0 + grace);
        assert!(index.take_forgotten(t0 + grace).is_empty(), "too early");
        assert!(
            index
                .take_forgotten(t0 + grace + grace.mul_f64(0.99))
                .is_empty(),
            "too early"
        );
        assert_eq!(
            index.take_forgotten(t0 + grace + grace),
            vec![("ns".to_string(), "gone".to_string())],
            "web-0 exists again: its series stay"
        );
        assert!(index.take_forgotten(t0 + grace * 3).is_empty(), "only once");
    }

    #[test]
    fn deleted_pods_keep_labels_for_the_grace_period() {
        let grace = Duration::from_mins(2);
        let index = PodIndex::with_grace(grace);
        let p = pod(
            "ns",
            "gone",
            "uid-1",
            "10.244.1.5",
            &[("app", "containerd://abc")],
        );
        apply(&index, &p);
        let t0 = Instant::now();
        index.apply(Event::Delete(typed(&p)), t0);

        assert_eq!(index.pods(), 0);
        index.purge(t0 + grace.mul_f64(0.99));
        assert_eq!(index.lookup_container("abc").unwrap().pod, "gone");
        assert_eq!(
            index.lookup_ip("10.244.1.5".parse().unwrap()),
            nsname("ns", "gone")
        );

        index.purge(t0 + grace);
        assert_eq!(index.lookup_container("abc"), None);
        assert_eq!(index.lookup_ip("10.244.1.5".parse().unwrap()), None);
        assert_eq!(index.lookup_pod_uid("uid-1"), None);
        assert!(index.read().pods.is_empty(), "memory is released");
    }

    #[test]
    fn a_new_pod_takes_over_the_ip_of_a_deleted_or_finished_one() {
        let index = PodIndex::new();
        let old = pod("ns", "old", "uid-1", "10.244.1.5", &[]);
        apply(&index, &old);
        index.apply(Event::Delete(typed(&old)), Instant::now());
        let mut done = pod("ns", "job", "uid-0", "10.244.1.5", &[]);
        done["status"]["phase"] = json!("Succeeded");
        apply(&index, &done);
        let ip = "10.244.1.5".parse().unwrap();
        assert_eq!(
            index.lookup_ip(ip),
            nsname("ns", "old"),
            "deleted beats finished"
        );

        apply(&index, &pod("ns", "new", "uid-2", "10.244.1.5", &[]));
        assert_eq!(index.lookup_ip(ip), nsname("ns", "new"));
    }

    #[test]
    fn a_relist_replaces_the_index_only_once_complete() {
        let index = PodIndex::new();
        let a = pod(
            "ns",
            "a",
            "uid-a",
            "10.244.1.1",
            &[("app", "containerd://aa")],
        );
        let b = pod(
            "ns",
            "b",
            "uid-b",
            "10.244.1.2",
            &[("app", "containerd://bb")],
        );
        let c = pod(
            "ns",
            "c",
            "uid-c",
            "10.244.1.3",
            &[("app", "containerd://cc")],
        );
        let t0 = Instant::now();
        index.apply(Event::Init, t0);
        index.apply(Event::InitApply(typed(&a)), t0);
        index.apply(Event::InitApply(typed(&b)), t0);
        assert!(!index.synced());
        assert_eq!(index.pods(), 0, "nothing before the first list is complete");
        index.apply(Event::InitDone, t0);
        assert!(index.synced());
        assert_eq!(index.pods(), 2);

        // A relist that fails half way leaves the index as it was.
        index.apply(Event::Init, t0);
        index.apply(Event::InitApply(typed(&c)), t0);
        assert_eq!(index.lookup_container("aa").unwrap().pod, "a");
        assert_eq!(index.lookup_container("cc"), None);
        // The retry lists b and c: a was deleted meanwhile and gets its grace.
        index.apply(Event::Init, t0);
        index.apply(Event::InitApply(typed(&b)), t0);
        index.apply(Event::InitApply(typed(&c)), t0);
        index.apply(Event::InitDone, t0);
        assert_eq!(index.pods(), 2);
        assert_eq!(index.lookup_container("aa").unwrap().pod, "a");
        assert_eq!(index.lookup_container("cc").unwrap().pod, "c");
        index.purge(t0 + DEFAULT_DELETE_GRACE);
        assert_eq!(index.lookup_container("aa"), None);
        assert_eq!(index.lookup_container("bb").unwrap().pod, "b");
    }

    #[test]
    fn watcher_selects_this_node_with_list_then_watch() {
        let config = watcher_config("node-a");
        assert_eq!(
            config.field_selector.as_deref(),
            Some("spec.nodeName=node-a")
        );
        assert_eq!(config.initial_list_strategy, InitialListStrategy::ListWatch);
    }

    #[tokio::test]
    async fn sources_that_cannot_work_say_what_to_do() {
        let index = PodIndex::new();
        run(KubeSource::Disabled, String::new(), index.clone())
            .await
            .expect("--no-kube is not an error");
        let err = run(
            KubeSource::Url("http://127.0.0.1:1".into()),
            String::new(),
            index,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--node-name"), "{err}");
        let err = run(
            KubeSource::Url("not a url".into()),
            "n".into(),
            PodIndex::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--kube-api"), "{err}");
    }

    /// The https path (in-cluster) builds its rustls client and reports a
    /// failed handshake as a counted, retried error rather than a panic.
    #[tokio::test]
    async fn https_sources_use_rustls_and_count_handshake_failures() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and hangs up: no TLS server behind it.
        let server = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        });
        let index = PodIndex::new();
        let url = format!("https://127.0.0.1:{port}");
        let watcher = tokio::spawn(run(KubeSource::Url(url), "node-a".into(), index.clone()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while index.errors() == 0 && !watcher.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !watcher.is_finished(),
            "the watcher gave up: {:?}",
            watcher.await
        );
        assert!(index.errors() >= 1, "no error counted in 20 s");
        assert!(!index.synced());
        watcher.abort();
        server.abort();
    }

    #[tokio::test]
    async fn in_cluster_outside_a_cluster_names_the_flags() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return; // really in a pod: the in-cluster config may well work
        }
        let err = run(KubeSource::InCluster, "n".into(), PodIndex::new())
            .await
            .unwrap_err();
        assert!(matches!(err, KubeError::InCluster(_)), "{err}");
        assert!(err.to_string().contains("--no-kube"), "{err}");
    }
}

/// Property tests of what turns a Kubernetes API object into labels
/// (`cargo xtask fuzz kube` runs them long): pods with missing, empty or
/// odd fields, and arbitrary JSON, never panic the index, and every
/// container id a pod reports finds that pod.
#[cfg(test)]
mod fuzz {
    use proptest::{prelude::*, sample::select};
    use serde_json::{Map, Value, json};

    use super::*;

    /// A string field: absent, empty, ordinary or odd.
    fn text() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![
            Just(String::new()),
            "[a-z0-9-]{1,12}",
            any::<String>(),
        ])
    }

    fn container_id() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![
            "(containerd|cri-o|docker)://[0-9a-f]{64}",
            "[0-9a-f]{1,64}",
            Just("containerd://".to_string()),
            Just("://".to_string()),
            Just(String::new()),
            any::<String>(),
        ])
    }

    fn ip() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_string()),
            any::<[u8; 16]>().prop_map(|b| std::net::Ipv6Addr::from(b).to_string()),
            Just("10.244.1.5".to_string()),
            Just("not-an-ip".to_string()),
            Just(String::new()),
        ]
    }

    fn put(obj: &mut Map<String, Value>, key: &str, v: Option<Value>) {
        if let Some(v) = v {
            obj.insert(key.to_string(), v);
        }
    }

    prop_compose! {
        fn arb_status()(
            name in "[a-z]{1,6}",
            id in container_id(),
            previous in container_id(),
        ) -> Value {
            let mut s = json!({
                "name": name, "image": "i", "imageID": "", "ready": true, "restartCount": 0,
            });
            let obj = s.as_object_mut().expect("object");
            put(obj, "containerID", id.map(Value::String));
            if let Some(p) = previous {
                obj.insert("lastState".into(), json!({"terminated": {"exitCode": 1, "containerID": p}}));
            }
            s
        }
    }

    prop_compose! {
        /// A well-typed Pod in which any field may be missing, empty or odd.
        fn arb_pod()(
            ns in text(), name in text(), uid in text(),
            containers in prop::collection::vec("[a-z]{0,6}", 0..3),
            has_spec in any::<bool>(), has_status in any::<bool>(),
            host_network in prop::option::of(any::<bool>()),
            phase in prop::option::of(select(&["Pending", "Running", "Succeeded", "Failed", "", "Weird"][..])),
            pod_ip in prop::option::of(ip()),
            pod_ips in prop::option::of(prop::collection::vec(ip(), 0..3)),
            statuses in prop::collection::vec(arb_status(), 0..3),
            init in prop::collection::vec(arb_status(), 0..2),
        ) -> Value {
            let mut meta = Map::new();
            put(&mut meta, "namespace", ns.map(Value::String));
            put(&mut meta, "name", name.map(Value::String));
            put(&mut meta, "uid", uid.map(Value::String));
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta});
            if has_spec {
                let mut spec = json!({
                    "containers": containers.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
                });
                put(spec.as_object_mut().expect("object"), "hostNetwork", host_network.map(Value::Bool));
                pod["spec"] = spec;
            }
            if has_status {
                let mut status = Map::new();
                put(&mut status, "phase", phase.map(|p| Value::String(p.into())));
                put(&mut status, "podIP", pod_ip.map(Value::String));
                put(&mut status, "podIPs", pod_ips.map(|v| v.into_iter().map(|ip| json!({"ip": ip})).collect()));
                status.insert("containerStatuses".into(), Value::Array(statuses));
                status.insert("initContainerStatuses".into(), Value::Array(init));
                pod["status"] = Value::Object(status);
            }
            pod
        }
    }

    /// Arbitrary JSON, shaped a little like a Pod now and then.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        select(
                            &[
                                "metadata",
                                "spec",
                                "status",
                                "uid",
                                "name",
                                "namespace",
                                "containers",
                                "containerStatuses",
                                "containerID",
                                "podIP",
                                "podIPs",
                                "ip",
                                "hostNetwork",
                                "phase"
                            ][..]
                        )
                        .prop_map(str::to_string),
                        "[a-zA-Z]{1,8}",
                    ],
                    inner,
                    0..4,
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Applies `pod` as each kind of watch event and checks the lookups.
    fn exercise(pod: &Pod) -> Result<(), TestCaseError> {
        let index = PodIndex::with_grace(Duration::ZERO);
        let t0 = Instant::now();
        index.apply(Event::Init, t0);
        index.apply(Event::InitApply(pod.clone()), t0);
        index.apply(Event::InitDone, t0);
        index.apply(Event::Apply(pod.clone()), t0);
        let (uid, entry) = PodEntry::from_pod(pod);
        prop_assert!(!uid.is_empty(), "a pod is always keyed");
        for (id, _) in &entry.container_ids {
            let found = index.lookup_container(id).expect("an indexed container id");
            let names: Vec<&String> = entry
                .container_ids
                .iter()
                .filter(|(i, _)| i == id)
                .map(|(_, n)| n)
                .collect();
            prop_assert!(names.contains(&&found.container));
            prop_assert_eq!(&found.pod_uid, &uid);
        }
        for ip in &entry.ips {
            prop_assert!(index.lookup_ip(*ip).is_some());
        }
        if !uid.contains('_') {
            // (`_` is read as the systemd spelling of `-`.)
            prop_assert_eq!(
                index.lookup_pod_uid(&uid),
                Some((entry.namespace.clone(), entry.name.clone()))
            );
        }
        let _ = index.container_names_of(&uid);
        index.apply(Event::Delete(pod.clone()), t0);
        index.purge(t0 + Duration::from_secs(1));
        prop_assert_eq!(index.pods(), 0);
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(256))]

        #[test]
        fn pods_with_missing_or_odd_fields_never_panic(v in arb_pod()) {
            let pod: Pod = serde_json::from_value(v.clone())
                .map_err(|e| TestCaseError::fail(format!("{e}: {v}")))?;
            exercise(&pod)?;
        }

        /// Arbitrary JSON is a Pod (then as above) or a deserialisation
        /// error, which the watcher counts and retries, never a panic.
        #[test]
        fn arbitrary_json_never_panics(v in any_json()) {
            if let Ok(pod) = serde_json::from_value::<Pod>(v) {
                exercise(&pod)?;
            }
        }

        #[test]
        fn container_ids_never_panic(id in any::<String>()) {
            let bare = bare_container_id(&id);
            prop_assert!(id.ends_with(bare));
            prop_assert_eq!(PodIndex::new().lookup_container(&id), None);
        }
    }
}
