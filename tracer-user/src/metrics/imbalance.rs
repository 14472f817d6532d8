//! The evidence of `connection_imbalance` at scrape: this node's open,
//! long-lived outbound connections to the ready backends of each Service
//! port (pod IPs the cluster's EndpointSlices list: headless Services,
//! client-side balancing, a sidecar's upstream connections), counted per
//! backend pod, and [`crate::findings::imbalance`]'s verdict on them.
//! Connections to a ClusterIP are not counted: kube-proxy's NAT picks the
//! backend after the socket, which keeps the ClusterIP.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use tracer_common::Owner;

use crate::{
    event::addr::canonical,
    findings::{Fact, MIN_CONNECTIONS, Pattern, imbalance},
    owner::services::BackendSet,
    track::{Direction, Tracker},
};

/// A Service port with enough connections to look at, and its ready
/// backends: (ip, target port) -> the backend's name.
struct Candidate {
    set: BackendSet,
    backends: HashMap<(IpAddr, u16), String>,
}

/// Owners of the long-lived connections, per remote end.
type LongLived = HashMap<(IpAddr, u16), Vec<Owner>>;

/// The findings, each with its number of long-lived connections.
pub(super) fn findings(
    tracker: &mut Tracker,
    factor: f64,
    min_age: Duration,
    now_ns: u64,
) -> Vec<(Fact, u64)> {
    let candidates = candidates(tracker);
    if candidates.is_empty() {
        return Vec::new();
    }
    let long_lived = long_lived(tracker, &candidates, min_age, now_ns);
    candidates
        .into_iter()
        .filter_map(|c| finding(tracker, &c, &long_lived, factor, min_age))
        .collect()
}

/// The Service ports with at least [`MIN_CONNECTIONS`] open outbound
/// connections (of any age) to their endpoints, from the gauges' counts:
/// only those are looked at connection by connection.
fn candidates(tracker: &Tracker) -> Vec<Candidate> {
    let services = tracker.attr.services();
    if services.size().endpoints == 0 {
        return Vec::new();
    }
    let mut per_remote: HashMap<(IpAddr, u16), u64> = HashMap::new();
    for (k, n) in tracker.table.open_counts() {
        if k.dir == Direction::Outbound {
            *per_remote
                .entry((canonical(k.remote), k.remote_port))
                .or_default() += u64::try_from(n).unwrap_or(0);
        }
    }
    let mut per_set: HashMap<BackendSet, u64> = HashMap::new();
    for (&(ip, port), &n) in &per_remote {
        for set in services.backend_sets_of(ip, port) {
            *per_set.entry(set).or_default() += n;
        }
    }
    let mut out: Vec<Candidate> = per_set
        .into_iter()
        .filter(|(_, n)| *n >= MIN_CONNECTIONS)
        .map(|(set, _)| {
            let backends = services
                .ready_backends(&set)
                .into_iter()
                .map(|b| {
                    let name = b.pod.map_or_else(
                        || format!("{}:{}", b.ip, b.port),
                        |pod| format!("{}/{pod}", set.namespace),
                    );
                    ((canonical(b.ip), b.port), name)
                })
                .collect();
            Candidate { set, backends }
        })
        .collect();
    out.sort_by(|a, b| a.set.cmp(&b.set));
    out
}

/// The open connections to the candidates' backends, open at least
/// `min_age` and not closed by their peer.
fn long_lived(
    tracker: &Tracker,
    candidates: &[Candidate],
    min_age: Duration,
    now_ns: u64,
) -> LongLived {
    let wanted: HashSet<(IpAddr, u16)> = candidates
        .iter()
        .flat_map(|c| c.backends.keys().copied())
        .collect();
    let min_ns = u64::try_from(min_age.as_nanos()).unwrap_or(u64::MAX);
    let mut out = LongLived::new();
    for c in tracker.table.iter() {
        let Some(remote) = c.info.sock.remote() else {
            continue;
        };
        let at = (canonical(remote), c.info.sock.dport);
        if c.peer_closed_ns == 0
            && wanted.contains(&at)
            && now_ns.saturating_sub(c.seen_ns()) >= min_ns
            && tracker.table.direction(&c.info) == Direction::Outbound
        {
            out.entry(at).or_default().push(c.info.owner);
        }
    }
    out
}

/// The finding of one candidate, if its connections are imbalanced.
fn finding(
    tracker: &mut Tracker,
    c: &Candidate,
    long_lived: &LongLived,
    factor: f64,
    min_age: Duration,
) -> Option<(Fact, u64)> {
    // Every ready backend counts in the mean, those with none too.
    let mut per_pod: BTreeMap<String, u64> =
        c.backends.values().map(|name| (name.clone(), 0)).collect();
    let mut clients: BTreeMap<String, u64> = BTreeMap::new();
    let mut roles: HashSet<&'static str> = HashSet::new();
    for (at, name) in &c.backends {
        for owner in long_lived.get(at).into_iter().flatten() {
            *per_pod.entry(name.clone()).or_default() += 1;
            let a = tracker.attr.attribute(owner);
            roles.insert(a.role.as_str());
            let client = if a.pod.is_empty() {
                "host".to_string()
            } else {
                format!("{}/{}", a.namespace, a.pod)
            };
            *clients.entry(client).or_default() += 1;
        }
    }
    let found = imbalance(&per_pod, factor)?;
    let set = &c.set;
    let peer = format!("{}/{}", set.namespace, set.service);
    let mut f = Fact::new(Pattern::ConnectionImbalance, &set.namespace, "", &peer);
    f.subject.role = match roles.len() {
        1 => roles.into_iter().next().unwrap_or_default().into(),
        _ => "mixed".into(),
    };
    f.subject.direction = "outbound".into();
    let json = |v: &BTreeMap<String, u64>| serde_json::to_value(v).unwrap_or_default();
    let d = &mut f.detail;
    d.insert("service".into(), peer.clone().into());
    d.insert("port_name".into(), set.port_name.clone().into());
    d.insert("connections_per_pod".into(), json(&per_pod));
    d.insert("ready_backends".into(), per_pod.len().into());
    d.insert("mean".into(), round2(found.mean).into());
    d.insert("busiest".into(), found.busiest.into());
    d.insert("max".into(), found.max.into());
    d.insert("factor".into(), round2(found.factor).into());
    d.insert("threshold_factor".into(), factor.into());
    d.insert("min_age_s".into(), min_age.as_secs_f64().into());
    d.insert("chance_if_random".into(), found.chance_if_random.into());
    d.insert("clients".into(), json(&clients));
    Some((f, found.total))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
