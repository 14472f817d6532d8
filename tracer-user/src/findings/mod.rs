//! Stage 5, findings: what the facts mean, in the operator's terms. Takes
//! the evidence the tracker's outcomes and the table's state give (an idle
//! kill by the peer, a stale reuse, a sidecar's chain kill, a connection
//! left in CLOSE_WAIT, ...), one [`Fact`] at a time, and gives the active
//! findings: one per (pattern, namespace, pod, peer), with the timeout the
//! kills agree on, the well-known default it matches (a hint), and the
//! fix. Pure: time comes in as arguments; unit tests drive it with
//! synthetic facts.

mod imbalance;
mod killers;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

pub(crate) use self::{
    imbalance::{MIN_CONNECTIONS, imbalance},
    killers::likely_killer,
};
use crate::track::classify::KeepaliveView;

/// The patterns, each with its own rule (README, "Findings").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Pattern {
    /// The peer closes connections idle for ~T (idle kills by the peer).
    ServerIdleTimeout,
    /// Something on the path drops idle flows after ~T (stale reuses after
    /// a silence, timeouts of idle connections).
    PathExpiry,
    /// The client reuses connections the server already closed (stale
    /// reuses of cause `peer_closed`).
    KeepaliveRace,
    /// The pod's sidecar closes both legs after ~T idle (chain kills of
    /// origin `sidecar`).
    SidecarIdleTimeout,
    /// The app asked for keepalive; the sidecar's upstream leg lacks it.
    SidecarKeepaliveMismatch,
    /// The owner does not close connections its peer closed.
    CloseWaitLeak,
    /// Connects and kills towards pods already deleted from the API.
    StaleEndpoint,
    /// A pod's sidecar holds many times the app's connections.
    SidecarConnectionFanout,
    /// The long-lived connections to one Service concentrate on few of
    /// its backends.
    ConnectionImbalance,
}

impl Pattern {
    #[cfg(test)]
    pub(crate) const ALL: [Self; 9] = [
        Self::ServerIdleTimeout,
        Self::PathExpiry,
        Self::KeepaliveRace,
        Self::SidecarIdleTimeout,
        Self::SidecarKeepaliveMismatch,
        Self::CloseWaitLeak,
        Self::StaleEndpoint,
        Self::SidecarConnectionFanout,
        Self::ConnectionImbalance,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ServerIdleTimeout => "server_idle_timeout",
            Self::PathExpiry => "path_expiry",
            Self::KeepaliveRace => "keepalive_race",
            Self::SidecarIdleTimeout => "sidecar_idle_timeout",
            Self::SidecarKeepaliveMismatch => "sidecar_keepalive_mismatch",
            Self::CloseWaitLeak => "close_wait_leak",
            Self::StaleEndpoint => "stale_endpoint",
            Self::SidecarConnectionFanout => "sidecar_connection_fanout",
            Self::ConnectionImbalance => "connection_imbalance",
        }
    }

    /// Whether the evidence is a timed kill (whose idle times give T).
    fn timed(self) -> bool {
        matches!(
            self,
            Self::ServerIdleTimeout
                | Self::PathExpiry
                | Self::KeepaliveRace
                | Self::SidecarIdleTimeout
        )
    }

    /// The finding in one sentence and what to change, with `t` the
    /// inferred timeout in seconds (for `path_expiry`, the bound on it).
    fn fix(self, t: Option<f64>) -> String {
        let after = t.map_or_else(
            || "a fixed idle time".to_string(),
            |t| format!("~{}", secs(t)),
        );
        let below = t.map_or_else(|| "that idle time".to_string(), secs);
        match self {
            Self::ServerIdleTimeout => format!(
                "The server closes connections idle for {after}. Set the client pool's maximum \
                 idle time (or connection lifetime) below {below}, or raise the server's idle \
                 timeout above the pool's."
            ),
            Self::PathExpiry => format!(
                "Something on the path (NAT, conntrack, load balancer) drops flows idle for at \
                 most {below} (the shortest silence a connection died after: the path's own idle \
                 timeout may be shorter). Turn TCP keepalive on with an idle time below the \
                 path's idle timeout, so at most {below} (socket options, or the namespace's \
                 net.ipv4.tcp_keepalive_time); for a sidecar leg, Istio's DestinationRule \
                 trafficPolicy.connectionPool.tcp.tcpKeepalive."
            ),
            Self::KeepaliveRace => format!(
                "The client reuses connections the server already closed after {after} idle \
                 (the keep-alive race). Set the client's idle timeout below {below}, or the \
                 server's keep-alive timeout above the client's."
            ),
            Self::SidecarIdleTimeout => format!(
                "The pod's sidecar (Envoy) closes connections idle for {after} on both legs. \
                 Make the app's pool retire idle connections before {below}, or raise the \
                 sidecar's idle timeout (Istio: DestinationRule connectionPool idleTimeout, or \
                 ISTIO_META_IDLE_TIMEOUT)."
            ),
            Self::SidecarKeepaliveMismatch => "The app's sockets have TCP keepalive on, the \
                 sidecar's upstream sockets to the same peer have it off: a path idle timeout \
                 kills the upstream leg anyway. Set the sidecar's upstream keepalive (Istio: \
                 DestinationRule trafficPolicy.connectionPool.tcp.tcpKeepalive)."
                .to_string(),
            Self::CloseWaitLeak => "The process does not close connections its peer closed \
                 (CLOSE_WAIT): close the socket when a read returns end-of-file, and have the \
                 pool validate or evict idle connections."
                .to_string(),
            Self::StaleEndpoint => "Clients still connect to pods deleted from the API: their \
                 endpoint list lags (DNS cache TTL, client-side load balancing, mesh endpoint \
                 push). Lower the cache TTL, re-resolve on failure, and give pods a preStop \
                 delay so that they serve while endpoints converge."
                .to_string(),
            Self::SidecarConnectionFanout => "The pod's sidecar holds many times the app's \
                 connections: lower Envoy's --concurrency (each worker pools its own upstream \
                 connections) and its idle timeouts, so that idle upstream connections are \
                 closed."
                .to_string(),
            Self::ConnectionImbalance => "Long-lived connections to this Service pin their \
                 load on few of its pods: connections are balanced once, when they open. Give \
                 them a maximum age (gRPC server MaxConnectionAge, the HTTP server's maximum \
                 requests per connection) so that clients reconnect and spread, or balance per \
                 request (a gRPC client round_robin policy, or a mesh's HTTP/2 balancing)."
                .to_string(),
        }
    }
}

/// Seconds as people write them: `5 s`, `75 s`, `1 h`.
fn secs(t: f64) -> String {
    if t >= 3600.0 && (t / 3600.0).fract().abs() < 0.05 {
        format!("{:.0} h", t / 3600.0)
    } else if t >= 10.0 {
        format!("{t:.0} s")
    } else {
        format!("{t:.1} s")
    }
}

/// Whom a finding is about: the owner's pod and the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Subject {
    pub namespace: String,
    pub pod: String,
    pub peer: String,
    pub role: String,
    pub direction: String,
}

/// One piece of evidence for a pattern.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fact {
    pub pattern: Pattern,
    pub subject: Subject,
    /// The idle time the kill came after (timed patterns).
    pub idle: Option<Duration>,
    /// The socket's keepalive (for a chain: the app leg's), if known.
    pub keepalive: Option<KeepaliveView>,
    /// Further evidence the rule used (close kind, reason, counts...).
    pub detail: BTreeMap<String, serde_json::Value>,
}

impl Fact {
    pub(crate) fn new(pattern: Pattern, namespace: &str, pod: &str, peer: &str) -> Self {
        Self {
            pattern,
            subject: Subject {
                namespace: namespace.to_string(),
                pod: pod.to_string(),
                peer: peer.to_string(),
                ..Subject::default()
            },
            idle: None,
            keepalive: None,
            detail: BTreeMap::new(),
        }
    }
}

type Key = (Pattern, String, String, String);

/// The idle times kept per finding (the most recent).
const KEPT_IDLES: usize = 32;
/// Kills that must agree for a timeout to be inferred.
const AGREEING_KILLS: usize = 3;
/// How close they must be: 5 % of their median, or one kernel tick.
const AGREEMENT: f64 = 0.05;

#[derive(Debug, Clone)]
struct Entry {
    subject: Subject,
    count: u64,
    first_seen: SystemTime,
    last_seen: SystemTime,
    idles: VecDeque<f64>,
    keepalive: Option<KeepaliveView>,
    detail: BTreeMap<String, serde_json::Value>,
}

/// The findings of one node, bounded in number and expiring.
#[derive(Debug)]
pub(crate) struct Findings {
    entries: HashMap<Key, Entry>,
    expiry: Duration,
    max: usize,
    /// Findings dropped to keep the bound (the least recently seen first).
    pub dropped: u64,
}

/// One finding as `/findings` and `conn-tracer findings --json` give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Finding {
    pub pattern: Pattern,
    #[serde(flatten)]
    pub subject: Subject,
    pub count: u64,
    /// RFC 3339.
    pub first_seen: String,
    pub last_seen: String,
    pub inferred_timeout_s: Option<f64>,
    pub likely_killer: Option<String>,
    pub evidence: serde_json::Value,
    pub fix: String,
}

impl Findings {
    pub(crate) fn new(expiry: Duration, max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            expiry,
            max: max.max(1),
            dropped: 0,
        }
    }

    /// One more kill, reuse or failure for its finding.
    pub(crate) fn observe(&mut self, fact: Fact, now: SystemTime) {
        self.record(fact, now, None);
    }

    /// A state that holds now (a leak, a mismatch, a fanout) with `n`
    /// connections in it: the finding's count is `n`, not a running sum.
    pub(crate) fn observe_state(&mut self, fact: Fact, n: u64, now: SystemTime) {
        self.record(fact, now, Some(n));
    }

    fn record(&mut self, fact: Fact, now: SystemTime, set: Option<u64>) {
        let s = &fact.subject;
        let key = (
            fact.pattern,
            s.namespace.clone(),
            s.pod.clone(),
            s.peer.clone(),
        );
        if !self.entries.contains_key(&key)
            && self.entries.len() >= self.max
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
            self.dropped += 1;
        }
        let e = self.entries.entry(key).or_insert_with(|| Entry {
            subject: fact.subject.clone(),
            count: 0,
            first_seen: now,
            last_seen: now,
            idles: VecDeque::new(),
            keepalive: None,
            detail: BTreeMap::new(),
        });
        e.count = set.unwrap_or(e.count + 1);
        e.last_seen = now;
        if let Some(idle) = fact.idle {
            if e.idles.len() == KEPT_IDLES {
                e.idles.pop_front();
            }
            e.idles.push_back(idle.as_secs_f64());
        }
        if fact.keepalive.is_some() {
            e.keepalive = fact.keepalive;
        }
        e.detail.extend(fact.detail);
    }

    /// Drops the findings whose evidence stopped `expiry` ago.
    pub(crate) fn expire(&mut self, now: SystemTime) {
        let expiry = self.expiry;
        self.entries.retain(|_, e| {
            now.duration_since(e.last_seen)
                .map_or(true, |since| since < expiry)
        });
    }

    /// The active findings, sorted; `tick` is one kernel clock tick (the
    /// resolution of the idle times).
    pub(crate) fn list(&mut self, now: SystemTime, tick: Duration) -> Vec<Finding> {
        self.expire(now);
        let mut out: Vec<Finding> = self
            .entries
            .iter()
            .map(|((pattern, _, _, _), e)| {
                let idles: Vec<f64> = e.idles.iter().copied().collect();
                // A path drops an idle flow at its timeout, unseen: the
                // endpoints learn of it only at their next packet, after a
                // silence of their own choosing. Each silence bounds the
                // timeout from above; none measures it.
                let (t, bound) = match pattern {
                    Pattern::PathExpiry => (None, idles.iter().copied().reduce(f64::min)),
                    p if p.timed() => (inferred_timeout(&idles, tick.as_secs_f64()), None),
                    _ => (None, None),
                };
                let mut evidence = serde_json::Map::new();
                if pattern.timed() {
                    evidence.insert("idle_s".into(), serde_json::json!(idles));
                }
                if let Some(b) = bound {
                    evidence.insert("expiry_at_most_s".into(), serde_json::json!(b));
                }
                if let Some(ka) = &e.keepalive {
                    evidence.insert(
                        "keepalive".into(),
                        serde_json::to_value(ka).unwrap_or_default(),
                    );
                }
                for (k, v) in &e.detail {
                    evidence.insert(k.clone(), v.clone());
                }
                Finding {
                    pattern: *pattern,
                    subject: e.subject.clone(),
                    count: e.count,
                    first_seen: rfc3339(e.first_seen),
                    last_seen: rfc3339(e.last_seen),
                    inferred_timeout_s: t,
                    likely_killer: t
                        .map(|t| likely_killer(*pattern, t).unwrap_or("unknown").to_string()),
                    evidence: serde_json::Value::Object(evidence),
                    fix: pattern.fix(t.or(bound)),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            let key = |f: &Finding| {
                let s = &f.subject;
                (
                    f.pattern,
                    s.namespace.clone(),
                    s.pod.clone(),
                    s.peer.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        out
    }

    /// (pattern, namespace, pod, peer) of every active finding, for the gauge.
    pub(crate) fn keys(&mut self, now: SystemTime) -> Vec<(Pattern, String, String, String)> {
        self.expire(now);
        self.entries.keys().cloned().collect()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The timeout the kills agree on: the median of those within 5 % (or one
/// tick) of the median of all, when at least [`AGREEING_KILLS`] do.
pub(crate) fn inferred_timeout(idles: &[f64], tick_s: f64) -> Option<f64> {
    if idles.len() < AGREEING_KILLS {
        return None;
    }
    let m = median(idles)?;
    let within = (m * AGREEMENT).max(tick_s);
    let agreeing: Vec<f64> = idles
        .iter()
        .copied()
        .filter(|x| (x - m).abs() <= within)
        .collect();
    if agreeing.len() < AGREEING_KILLS {
        return None;
    }
    median(&agreeing)
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}
