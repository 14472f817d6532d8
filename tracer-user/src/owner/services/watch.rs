//! The watch: Services and EndpointSlices listed then watched cluster-wide
//! (kube-rs' watcher, no reflector store), each object read into a small
//! type that keeps only the fields the index needs (serde skips the rest),
//! then folded into the [`ServiceIndex`] and dropped.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    pin::pin,
    sync::atomic::Ordering,
    time::Instant,
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

use super::{Endpoint, Index, Key, Listing, ServiceIndex, ServicePorts, ServiceRef, Slice};
use crate::{
    event::addr::canonical,
    owner::kube::{KubeError, KubeSource},
};

/// The label an EndpointSlice names its Service by.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// EndpointSlices per list page: a slice holds up to 100 endpoints (1,000
/// at most), so a page is a few MiB of JSON at worst while it is read.
const SLICE_PAGE: u32 = 100;

impl ServiceIndex {
    /// Folds one watch event of a resource into the index. A relist
    /// (`Init` .. `InitDone`) replaces the resource's objects only once it
    /// is complete; until then the old ones answer.
    pub(super) fn apply<W: Watched>(&self, event: Event<W>, now: Instant) {
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
    pub(super) fn purge(&self, now: Instant) {
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

/// A watched resource: how its objects become index entries.
pub(super) trait Watched {
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

/// Lists then watches Services and EndpointSlices of the whole cluster
/// into `index` until the task is dropped. Returns at once for
/// [`KubeSource::Disabled`], and with an error only when no client can be
/// built; API errors once running are logged, counted and retried.
pub async fn run(source: KubeSource, index: ServiceIndex) -> Result<(), KubeError> {
    let Some(client) = crate::owner::kube::client(source)? else {
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
    let mut purge = crate::owner::purge_timer(index.shared.grace);
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
    pub(super) metadata: ObjectMeta,
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
    pub(super) metadata: ObjectMeta,
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
