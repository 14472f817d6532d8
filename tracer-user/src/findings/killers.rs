//! Well-known idle timeouts, to name the likely killer of a finding whose
//! inferred timeout matches one within 2 %. A hint, never a fact: any
//! setting can be changed to any value (README, "Findings", has the
//! table with its sources).
//! `path_expiry` infers no timeout (its silences only bound the path's),
//! so the path defaults are listed for the reader, named by no finding.

use super::Pattern;

/// One default: its timeout in seconds, who has it, and the patterns it
/// can explain (a server closes, the path expires, a sidecar closes).
pub(crate) struct Killer {
    pub seconds: f64,
    pub name: &'static str,
    pub patterns: &'static [Pattern],
}

const SERVER: &[Pattern] = &[Pattern::ServerIdleTimeout, Pattern::KeepaliveRace];
const PATH: &[Pattern] = &[Pattern::PathExpiry];
const SIDECAR: &[Pattern] = &[Pattern::SidecarIdleTimeout, Pattern::ServerIdleTimeout];

/// The table, as README documents it.
pub(crate) const KILLERS: &[Killer] = &[
    Killer {
        seconds: 2.0,
        name: "Gunicorn --keep-alive (default 2 s)",
        patterns: SERVER,
    },
    Killer {
        seconds: 5.0,
        name: "Node.js http.Server keepAliveTimeout (default 5 s)",
        patterns: SERVER,
    },
    // Node 20 closes an idle keep-alive connection 1 s after its
    // keepAliveTimeout (measured here: 6.01 s with the default 5 s).
    Killer {
        seconds: 6.0,
        name: "Node.js http.Server keepAliveTimeout (default 5 s, closed 1 s later by Node 20)",
        patterns: SERVER,
    },
    Killer {
        seconds: 60.0,
        name: "AWS Application Load Balancer idle timeout (default 60 s)",
        patterns: SERVER,
    },
    Killer {
        seconds: 75.0,
        name: "nginx keepalive_timeout (default 75 s)",
        patterns: SERVER,
    },
    Killer {
        seconds: 240.0,
        name: "Azure Load Balancer idle timeout (default 4 min)",
        patterns: PATH,
    },
    Killer {
        seconds: 350.0,
        name: "AWS Network Load Balancer TCP idle timeout (350 s)",
        patterns: PATH,
    },
    Killer {
        seconds: 900.0,
        name: "kube-proxy IPVS TCP timeout (default 900 s)",
        patterns: PATH,
    },
    Killer {
        seconds: 1200.0,
        name: "GCP Cloud NAT established TCP idle timeout (default 1200 s)",
        patterns: PATH,
    },
    Killer {
        seconds: 3600.0,
        name: "Envoy idle_timeout (default 1 h)",
        patterns: SIDECAR,
    },
    Killer {
        seconds: 28_800.0,
        name: "MySQL wait_timeout (default 8 h)",
        patterns: SERVER,
    },
];

/// The well-known default `t` seconds matches within 2 %, for `pattern`.
pub(crate) fn likely_killer(pattern: Pattern, t: f64) -> Option<&'static str> {
    KILLERS
        .iter()
        .find(|k| k.patterns.contains(&pattern) && (t - k.seconds).abs() <= k.seconds * 0.02)
        .map(|k| k.name)
}
