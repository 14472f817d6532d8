//! Daemon configuration: a TOML file (every key optional, documented
//! defaults) with command-line flags on top.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};
use tracer_common::DEFAULT_RING_BYTES;

use crate::sys::{VMLINUX_BTF, valid_ring_size};

/// How long a deleted pod keeps its labels: long enough for the connections
/// it had open to be reported closed.
pub(crate) const DEFAULT_DELETE_GRACE: Duration = Duration::from_mins(2);
/// Endpoints the cluster-wide Service index holds at most by default: ~180
/// MiB at the measured ~370 bytes each (docs/benchmarks.md, cluster index).
pub(crate) const DEFAULT_MAX_ENDPOINTS: usize = 500_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}, line {line}: {message} (in `{text}`)")]
    Syntax {
        path: String,
        line: usize,
        /// The offending line, shortened.
        text: String,
        message: String,
    },
    #[error("config file {path}: {key} = {value}: {message}")]
    Key {
        path: String,
        key: String,
        /// The value as written, shortened.
        value: String,
        message: String,
    },
    #[error("invalid setting {key} = {value}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// Everything the daemon can be told. Defaults are chosen for a node agent
/// that must stay small: see each field.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP server (`/metrics`, `/healthz`, `/connections`).
    /// Default 127.0.0.1:9090; the DaemonSet listens on the pod IP.
    pub listen: SocketAddr,
    /// A connection that ends after at least this long with no payload
    /// either way, by the peer or by a timeout, is an idle kill. Default 60s.
    #[serde(deserialize_with = "duration")]
    pub idle_threshold: Duration,
    /// A connection whose peer closed it this long ago and whose owner has
    /// not closed it counts in `conntracer_close_wait_connections` (the
    /// leak). Default 60s: conntrack's CLOSE_WAIT expiry, after which the
    /// owner's own FIN no longer reaches a NAT'd peer.
    #[serde(deserialize_with = "duration")]
    pub close_wait_threshold: Duration,
    /// Most connections tracked at once (~300 bytes each); past it the
    /// oldest are dropped from the table and counted. Default 262144.
    pub max_connections: usize,
    /// Most distinct `peer` label values; later peers are reported as
    /// `peer="other"` and counted. Default 500.
    pub max_peers: usize,
    /// A `peer` value's place is freed when no open connection uses it and
    /// no kill, stale reuse or connect failure named it for this long (its
    /// series are removed then). Default 10m.
    #[serde(deserialize_with = "duration")]
    pub peer_hold: Duration,
    /// Most endpoints of the cluster's EndpointSlices indexed (~370 bytes
    /// each); slices past it are left out and counted. Default 500000.
    pub max_cluster_endpoints: usize,
    /// Most distinct `value` label values of the sockopt metric. Default 100.
    pub max_sockopt_values: usize,
    /// Kernel event ring buffer size in bytes (power of two). Default 4 MiB.
    pub ring_bytes: u32,
    /// The kernel's HZ, when it cannot be detected (it normally is).
    pub kernel_hz: Option<u32>,
    /// Kernel BTF. Default /sys/kernel/btf/vmlinux.
    pub btf: PathBuf,
    /// Watch keepalive socket options and SO_ORIGINAL_DST lookups (attaches
    /// programs at the cgroup v2 root). Default true.
    pub trace_sockopts: bool,
    /// Optional kernel programs not to attach (`tcp_probe`: the per-segment
    /// goodbye detection), to trade what they see for their cost.
    /// Default none.
    pub skip_programs: Vec<String>,
    /// Kubernetes API base URL (plain http allowed, no auth: `kubectl proxy`,
    /// tests). Default: the in-cluster service-account config.
    pub kube_api: Option<String>,
    /// Run without pod metadata (host and container-ID labels only).
    pub no_kube: bool,
    /// This node's name, for the pod watch. Default: $NODE_NAME (downward
    /// API), else the hostname.
    pub node_name: Option<String>,
    /// Owner uids that make a process in a pod the mesh sidecar. Default [1337].
    pub sidecar_uids: Vec<u32>,
    /// Container or process names that make a process the sidecar.
    /// Default: `istio-proxy` and `envoy`.
    pub sidecar_names: Vec<String>,
    /// The sidecar's outbound and inbound capture ports (Istio: 15001, 15006).
    pub outbound_capture_port: u16,
    pub inbound_capture_port: u16,
    /// How often the table is reconciled with the kernel's sockets (missed
    /// closes removed, owners of older sockets found). Default 30s.
    #[serde(deserialize_with = "duration")]
    pub resync_interval: Duration,
    /// At start, join the cgroup namespace of this process, so that the
    /// cgroup paths read in /proc are the host's. Default 1 (the host's init,
    /// with `hostPID`); 0 leaves the daemon in its own.
    pub cgroupns_pid: u32,
    /// How long a deleted pod keeps its labels (connections still closing
    /// as it goes are named), and then how long its series stay before they
    /// are removed from /metrics. Default 2m (series go 4 min after the pod).
    #[serde(deserialize_with = "duration")]
    pub deleted_pod_grace: Duration,
    /// A finding expires this long after its last evidence. Default 1h.
    #[serde(deserialize_with = "duration")]
    pub findings_expiry: Duration,
    /// Most findings kept at once; past it the least recently seen goes.
    /// Default 1000.
    pub max_findings: usize,
    /// `connection_imbalance`: the busiest ready backend of a Service port
    /// holding at least this many times the mean of its backends' long-lived
    /// connections (at least 20 of them, and no chance spread) is a
    /// finding. Default 2.0; at least 1.
    pub imbalance_factor: f64,
    /// A connection open at least this long is long-lived (for
    /// `connection_imbalance`): short ones are balanced as they come and go.
    /// Default 5m.
    #[serde(deserialize_with = "duration")]
    pub imbalance_min_age: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            idle_threshold: Duration::from_mins(1),
            close_wait_threshold: Duration::from_mins(1),
            max_connections: 262_144,
            max_peers: 500,
            peer_hold: Duration::from_mins(10),
            max_cluster_endpoints: DEFAULT_MAX_ENDPOINTS,
            max_sockopt_values: 100,
            ring_bytes: DEFAULT_RING_BYTES,
            kernel_hz: None,
            btf: PathBuf::from(VMLINUX_BTF),
            trace_sockopts: true,
            skip_programs: Vec::new(),
            kube_api: None,
            no_kube: false,
            node_name: None,
            sidecar_uids: vec![1337],
            sidecar_names: vec!["istio-proxy".into(), "envoy".into()],
            outbound_capture_port: 15001,
            inbound_capture_port: 15006,
            resync_interval: Duration::from_secs(30),
            cgroupns_pid: 1,
            deleted_pod_grace: DEFAULT_DELETE_GRACE,
            findings_expiry: Duration::from_hours(1),
            max_findings: 1000,
            imbalance_factor: 2.0,
            imbalance_min_age: Duration::from_mins(5),
        }
    }
}

/// At most 80 characters of `s`, for messages.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(MAX).collect::<String>())
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// "30s", "1m30s", "500ms", "2h".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 30s, 500ms, 1m"))
}

/// The flags of `conn-tracer run`: each overrides its key of the file
/// (declared once: clap derives the flags from this struct).
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct Overrides {
    /// Address for /metrics, /healthz and /connections [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Idle time after which a connection ended by its peer or by a
    /// timeout counts as an idle kill, e.g. 30s, 5m [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_threshold: Option<Duration>,
    /// How long after the peer closed a connection its owner may keep it
    /// before it counts as a CLOSE_WAIT leak, e.g. 2s, 5m [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub close_wait_threshold: Option<Duration>,
    /// How long a finding stays after its last evidence, e.g. 10m, 1h
    /// [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub findings_expiry: Option<Duration>,
    /// Most findings kept at once [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_findings: Option<usize>,
    /// A Service port's busiest ready backend holding this many times the
    /// mean of its long-lived connections is a connection_imbalance
    /// [default: 2.0].
    #[arg(long, value_name = "FACTOR")]
    pub imbalance_factor: Option<f64>,
    /// How long a connection must be open to count as long-lived for
    /// connection_imbalance, e.g. 1m, 30m [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub imbalance_min_age: Option<Duration>,
    /// TOML configuration file (see README); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Most connections tracked at once [default: 262144].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most distinct `peer` label values before folding into "other" [default: 500].
    #[arg(long, value_name = "N")]
    pub max_peers: Option<usize>,
    /// How long a `peer` value keeps its place after its last kill, stale
    /// reuse or connect failure once no open connection uses it, e.g. 10m
    /// [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub peer_hold: Option<Duration>,
    /// Most endpoints of the cluster-wide EndpointSlice index (about 370
    /// bytes each) [default: 500000].
    #[arg(long, value_name = "N")]
    pub max_cluster_endpoints: Option<usize>,
    /// How often the connection table is reconciled with the kernel's
    /// sockets (closes the daemon missed are dropped and counted), e.g. 30s
    /// [default: 30s, at least 1s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub resync_interval: Option<Duration>,
    /// At start, join this process's cgroup namespace so that cgroup paths
    /// in /proc are host paths (a container has its own); 0: stay
    /// [default: 1, the host's init when run with hostPID].
    #[arg(long, value_name = "PID")]
    pub cgroupns_pid: Option<u32>,
    /// Kernel event ring buffer size in bytes (power of two) [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    pub ring_bytes: Option<u32>,
    /// Kernel BTF [default: /sys/kernel/btf/vmlinux].
    #[arg(long, value_name = "PATH")]
    pub btf: Option<PathBuf>,
    /// Most distinct `value` label values of the sockopt metric [default: 100].
    #[arg(long, value_name = "N")]
    pub max_sockopt_values: Option<usize>,
    /// The kernel's HZ, only if it cannot be detected (it normally is).
    #[arg(long, value_name = "HZ")]
    pub kernel_hz: Option<u32>,
    /// Attach no cgroup program at the cgroup v2 root: keepalive socket
    /// options are not watched (the sockopt metric stays empty), and the
    /// sidecar threads that take captured connections are found with the
    /// accept syscall tracepoints instead of getsockopt(SO_ORIGINAL_DST).
    #[arg(long)]
    pub no_sockopts: bool,
    /// Kubernetes API URL (plain http, no auth, e.g. `kubectl proxy`)
    /// [default: in-cluster service account].
    #[arg(long, value_name = "URL", conflicts_with = "no_kube")]
    pub kube_api: Option<String>,
    /// Run without pod metadata: host and container-ID labels only.
    #[arg(long)]
    pub no_kube: bool,
    /// This node's name for the pod watch [default: $NODE_NAME, else the hostname].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Owner uid of the mesh sidecar; repeat for several [default: 1337].
    #[arg(long = "sidecar-uid", value_name = "UID")]
    pub sidecar_uids: Vec<u32>,
    /// Container or process name of the mesh sidecar; repeat for several
    /// [default: istio-proxy, envoy].
    #[arg(long = "sidecar-name", value_name = "NAME")]
    pub sidecar_names: Vec<String>,
    /// An optional kernel program not to attach; repeat for several
    /// (`tcp_probe`: goodbye messages before a peer's FIN are then not
    /// told from payload, see README "Supported kernels").
    #[arg(long = "skip-program", value_name = "PROGRAM")]
    pub skip_programs: Vec<String>,
}

impl Config {
    /// Parses TOML text (`path` is for messages). Every error names the
    /// key it is about (or, for broken TOML, the line).
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            // The line of the error; at the end of the file, the last line
            // with something on it (an unterminated string or array).
            let lines: Vec<&str> = text.split('\n').collect();
            let mut line = text.get(..at).unwrap_or(text).matches('\n').count();
            while line > 0 && lines.get(line).is_none_or(|l| l.trim().is_empty()) {
                line -= 1;
            }
            ConfigError::Syntax {
                path: path.to_string(),
                line: line + 1,
                text: shorten(lines.get(line).map_or("", |l| l.trim())),
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        // One key at a time first, so that a wrong type or value is reported
        // with the key it belongs to (all keys are top-level).
        for (key, value) in &table {
            let one = toml::Table::from_iter([(key.clone(), value.clone())]);
            if let Err(e) = one.try_into::<Self>() {
                return Err(ConfigError::Key {
                    path: path.to_string(),
                    key: key.clone(),
                    value: shorten(&value.to_string()),
                    message: e.message().trim().replace('\n', " "),
                });
            }
        }
        table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Key {
                path: path.to_string(),
                key: "?".into(),
                value: String::new(),
                message: e.message().trim().replace('\n', " "),
            })
    }

    /// Reads the file `flags.config` names, if any (else defaults), applies
    /// the other flags, validates.
    pub fn load(flags: &Overrides) -> Result<Self, ConfigError> {
        let mut cfg = match flags.config.as_deref() {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::from_toml(&text, &p.display().to_string())?
            }
            None => Self::default(),
        };
        cfg.apply(flags);
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn apply(&mut self, f: &Overrides) {
        /// Each override given (`Some`) replaces the setting of its name.
        macro_rules! given {
            ($($name:ident),+ $(,)?) => {
                $(if let Some(v) = &f.$name {
                    self.$name.clone_from(v);
                })+
            };
        }
        given!(
            listen,
            idle_threshold,
            close_wait_threshold,
            findings_expiry,
            max_findings,
            imbalance_factor,
            imbalance_min_age,
            max_connections,
            max_peers,
            peer_hold,
            max_cluster_endpoints,
            ring_bytes,
            btf,
            max_sockopt_values,
            resync_interval,
            cgroupns_pid,
        );
        // Settings that are optional themselves.
        for (setting, given) in [
            (&mut self.kube_api, &f.kube_api),
            (&mut self.node_name, &f.node_name),
        ] {
            if given.is_some() {
                setting.clone_from(given);
            }
        }
        if f.kernel_hz.is_some() {
            self.kernel_hz = f.kernel_hz;
        }
        if f.no_sockopts {
            self.trace_sockopts = false;
        }
        if f.no_kube {
            self.no_kube = true;
        }
        if !f.sidecar_uids.is_empty() {
            self.sidecar_uids.clone_from(&f.sidecar_uids);
        }
        if !f.sidecar_names.is_empty() {
            self.sidecar_names.clone_from(&f.sidecar_names);
        }
        if !f.skip_programs.is_empty() {
            self.skip_programs.clone_from(&f.skip_programs);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, value: String, why| Err(ConfigError::Invalid { key, value, why });
        for (key, zero) in [
            ("close_wait_threshold", self.close_wait_threshold.is_zero()),
            ("idle_threshold", self.idle_threshold.is_zero()),
            ("findings_expiry", self.findings_expiry.is_zero()),
        ] {
            if zero {
                return bad(key, "0".into(), "must be more than zero");
            }
        }
        for (key, count) in [
            ("max_findings", self.max_findings),
            ("max_connections", self.max_connections),
            ("max_peers", self.max_peers),
            ("max_sockopt_values", self.max_sockopt_values),
        ] {
            if count == 0 {
                return bad(key, "0".into(), "must be at least 1");
            }
        }
        // NaN fails this too.
        if !(self.imbalance_factor >= 1.0 && self.imbalance_factor.is_finite()) {
            return bad(
                "imbalance_factor",
                self.imbalance_factor.to_string(),
                "must be a number of at least 1 (the busiest backend's share over the mean)",
            );
        }
        if !valid_ring_size(self.ring_bytes) {
            return bad(
                "ring_bytes",
                self.ring_bytes.to_string(),
                "must be a power of two and a multiple of the page size (e.g. 4194304)",
            );
        }
        if self.no_kube && self.kube_api.is_some() {
            return bad(
                "kube_api",
                self.kube_api.clone().unwrap_or_default(),
                "conflicts with no_kube: choose one",
            );
        }
        if self.resync_interval < Duration::from_secs(1) {
            return bad(
                "resync_interval",
                format!("{:?}", self.resync_interval),
                "must be at least 1s",
            );
        }
        for (key, port) in [
            ("outbound_capture_port", self.outbound_capture_port),
            ("inbound_capture_port", self.inbound_capture_port),
        ] {
            if port == 0 {
                return bad(key, "0".into(), "must be a port (1-65535)");
            }
        }
        if let Some(hz) = self.kernel_hz
            && !(24..=10_000).contains(&hz)
        {
            return bad(
                "kernel_hz",
                hz.to_string(),
                "is not a kernel HZ (100, 250, 300, 1000)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::from_toml("", "x").unwrap(), Config::default());
        Config::default().validate().unwrap();
    }

    #[test]
    fn every_key_parses() {
        let cfg = Config::from_toml(
            r#"
            listen = "0.0.0.0:9102"
            idle_threshold = "1m30s"
            max_connections = 1000
            max_peers = 20
            max_sockopt_values = 5
            ring_bytes = 65536
            kernel_hz = 1000
            btf = "/tmp/vmlinux"
            trace_sockopts = false
            kube_api = "http://127.0.0.1:8001"
            node_name = "node-1"
            sidecar_uids = [1337, 1000]
            sidecar_names = ["istio-proxy"]
            outbound_capture_port = 15001
            inbound_capture_port = 15006
            imbalance_factor = 3.5
            imbalance_min_age = "10m"
            "#,
            "x",
        )
        .unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:9102".parse().unwrap());
        assert_eq!(cfg.idle_threshold, Duration::from_secs(90));
        assert_eq!(
            (cfg.max_connections, cfg.max_peers, cfg.max_sockopt_values),
            (1000, 20, 5)
        );
        assert_eq!((cfg.ring_bytes, cfg.kernel_hz), (65536, Some(1000)));
        assert_eq!(cfg.btf, PathBuf::from("/tmp/vmlinux"));
        assert!(!cfg.trace_sockopts);
        assert_eq!(cfg.kube_api.as_deref(), Some("http://127.0.0.1:8001"));
        assert_eq!(cfg.node_name.as_deref(), Some("node-1"));
        assert_eq!(cfg.sidecar_uids, [1337, 1000]);
        assert_eq!(cfg.sidecar_names, ["istio-proxy"]);
        assert_eq!(
            (cfg.imbalance_factor, cfg.imbalance_min_age),
            (3.5, Duration::from_mins(10))
        );
        cfg.validate().unwrap();
        let both = Config::from_toml("no_kube = true\nkube_api = \"http://x\"", "x").unwrap();
        assert!(
            both.validate()
                .unwrap_err()
                .to_string()
                .contains("conflicts")
        );
    }

    #[test]
    fn flags_override_the_file() {
        let mut cfg = Config::from_toml("idle_threshold = \"5m\"\nmax_peers = 7", "x").unwrap();
        cfg.apply(&Overrides {
            idle_threshold: Some(Duration::from_secs(1)),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..Overrides::default()
        });
        assert_eq!(cfg.idle_threshold, Duration::from_secs(1));
        assert_eq!(cfg.listen.port(), 1);
        assert_eq!(cfg.max_peers, 7, "not overridden");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = Config::from_toml("idle_threshold = \"soon\"", "c.toml").unwrap_err();
        assert!(err.to_string().contains("not a duration"), "{err}");
        let err = Config::from_toml("idel_threshold = \"1s\"", "c.toml").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = Config::from_toml("listen = \"nowhere\"", "c.toml").unwrap_err();
        assert!(err.to_string().contains("c.toml"), "{err}");
        let cfg = Config::from_toml("ring_bytes = 1000", "x").unwrap();
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("power of two"), "{err}");
        let cfg = Config::from_toml("max_connections = 0", "x").unwrap();
        assert!(cfg.validate().is_err());
        for factor in ["0.5", "nan", "inf"] {
            let cfg = Config::from_toml(&format!("imbalance_factor = {factor}"), "x").unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("imbalance_factor"), "{err}");
        }
        assert!(parse_duration("0.5s").is_err() || parse_duration("500ms").is_ok());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::load(&Overrides {
            config: Some("/nope/x.toml".into()),
            ..Overrides::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nope/x.toml"), "{err}");
    }

    /// Every `[default: X]` that `run --help` shows is what `Config::default()`
    /// has: passing X as the flag changes nothing. Defaults that are not
    /// values (the in-cluster config, the node name) are named here.
    #[test]
    fn help_defaults_equal_config_default() {
        use clap::{Args as _, FromArgMatches as _};
        const NOT_VALUES: [&str; 2] = ["kube_api", "node_name"];
        let cmd = Overrides::augment_args(clap::Command::new("run").no_binary_name(true));
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let Some((_, rest)) = help.split_once("[default: ") else {
                continue;
            };
            let id = arg.get_id().as_str();
            if NOT_VALUES.contains(&id) {
                continue;
            }
            let shown = rest.split(']').next().unwrap_or_default();
            let long = format!("--{}", arg.get_long().expect("a long flag"));
            let mut argv = Vec::new();
            if matches!(arg.get_action(), clap::ArgAction::Append) {
                for v in shown.split(", ") {
                    argv.extend([long.clone(), v.to_string()]);
                }
            } else {
                // `30s, at least 1s`: the value is before the comma.
                argv.extend([
                    long,
                    shown.split(',').next().unwrap_or_default().to_string(),
                ]);
            }
            let matches = cmd
                .clone()
                .try_get_matches_from(&argv)
                .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let flags = Overrides::from_arg_matches(&matches).expect("flags");
            let mut cfg = Config::default();
            cfg.apply(&flags);
            assert_eq!(
                cfg,
                Config::default(),
                "{id}: --help says [default: {shown}]"
            );
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} defaults found in --help");
    }
}

/// Property tests of the config parser (`cargo xtask fuzz config` runs them
/// long): any text is a config or an error, and every error about a key
/// names that key.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use toml::{Table, Value};

    use super::*;

    /// Every key, with a strategy for a value it accepts.
    fn valid_value(key: &str) -> BoxedStrategy<Value> {
        let s = |v: &'static [&'static str]| {
            proptest::sample::select(v)
                .prop_map(|v| Value::String(v.into()))
                .boxed()
        };
        let int = |lo: i64, hi: i64| (lo..=hi).prop_map(Value::Integer).boxed();
        match key {
            "listen" => s(&["127.0.0.1:9090", "0.0.0.0:9102", "[::1]:80"]),
            "idle_threshold" | "close_wait_threshold" => s(&["30s", "5m", "1h30m", "500ms"]),
            "resync_interval" => s(&["1s", "30s", "2m"]),
            "max_connections" => int(1, 1 << 24),
            "max_peers" | "max_sockopt_values" | "max_findings" => int(1, 100_000),
            "max_cluster_endpoints" => int(0, 10_000_000),
            "ring_bytes" => (0..12u32).prop_map(|s| Value::Integer(4096 << s)).boxed(),
            "kernel_hz" => proptest::sample::select(&[100, 250, 300, 1000][..])
                .prop_map(Value::Integer)
                .boxed(),
            "btf" => "[a-z/]{1,30}".prop_map(Value::String).boxed(),
            "trace_sockopts" => any::<bool>().prop_map(Value::Boolean).boxed(),
            "no_kube" => Just(Value::Boolean(false)).boxed(),
            "kube_api" => s(&["http://127.0.0.1:8001", "https://10.0.0.1:6443"]),
            "node_name" => "[a-z0-9-]{1,20}".prop_map(Value::String).boxed(),
            "sidecar_uids" => prop::collection::vec(any::<u32>(), 0..3)
                .prop_map(|v| {
                    Value::Array(v.into_iter().map(|u| Value::Integer(u.into())).collect())
                })
                .boxed(),
            "skip_programs" => prop::collection::vec(Just("tcp_probe"), 0..2)
                .prop_map(|v| {
                    Value::Array(v.into_iter().map(|p| Value::String(p.into())).collect())
                })
                .boxed(),
            "sidecar_names" => prop::collection::vec("[a-z-]{1,12}", 0..3)
                .prop_map(|v| Value::Array(v.into_iter().map(Value::String).collect()))
                .boxed(),
            "outbound_capture_port" | "inbound_capture_port" => int(1, 65535),
            "cgroupns_pid" => int(0, 4_194_304),
            "deleted_pod_grace" | "peer_hold" | "findings_expiry" | "imbalance_min_age" => {
                s(&["1s", "2m", "1h"])
            }
            "imbalance_factor" => (1.0..100.0f64).prop_map(Value::Float).boxed(),
            other => unreachable!("no valid value for {other}"),
        }
    }

    const KEYS: &[&str] = &[
        "listen",
        "idle_threshold",
        "close_wait_threshold",
        "max_connections",
        "max_peers",
        "peer_hold",
        "max_cluster_endpoints",
        "max_sockopt_values",
        "ring_bytes",
        "kernel_hz",
        "btf",
        "trace_sockopts",
        "kube_api",
        "no_kube",
        "node_name",
        "sidecar_uids",
        "sidecar_names",
        "skip_programs",
        "outbound_capture_port",
        "inbound_capture_port",
        "resync_interval",
        "cgroupns_pid",
        "deleted_pod_grace",
        "findings_expiry",
        "max_findings",
        "imbalance_factor",
        "imbalance_min_age",
    ];

    /// Any TOML value, of any type, with a bias to the edges.
    fn any_value() -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            any::<i64>().prop_map(Value::Integer),
            prop_oneof![Just(0i64), Just(-1), Just(1), Just(4095), Just(1 << 32)]
                .prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Float),
            any::<bool>().prop_map(Value::Boolean),
            any::<String>().prop_map(Value::String),
            prop_oneof![
                Just("0s"),
                Just("-1s"),
                Just("1"),
                Just("soon"),
                Just("999999999999h"),
                Just("127.0.0.1"),
                Just(":::"),
                Just(""),
                Just("http://x"),
            ]
            .prop_map(|s| Value::String(s.into())),
            Just(Value::Datetime(
                "1979-05-27T07:32:00Z".parse().expect("a TOML datetime")
            )),
        ];
        scalar.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                    .prop_map(|m| Value::Table(m.into_iter().collect())),
            ]
        })
    }

    /// A key the file may hold: a known one, a near miss, or nonsense.
    fn any_key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(KEYS).prop_map(str::to_string),
            1 => proptest::sample::select(KEYS).prop_map(|k| format!("{k}s")),
            1 => "[a-zA-Z_-]{1,20}",
        ]
    }

    /// Every other key with a valid value, in a random subset.
    fn valid_rest() -> impl Strategy<Value = Table> {
        let per_key: Vec<_> = KEYS
            .iter()
            .map(|&k| proptest::option::of(valid_value(k)).prop_map(move |v| (k, v)))
            .collect();
        per_key.prop_map(|kv| {
            kv.into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect()
        })
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let cfg = Config::from_toml(text, "fuzz.toml")?;
        cfg.validate()?;
        Ok(cfg)
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(256))]

        /// Valid values for every key always load.
        #[test]
        fn documents_of_valid_values_load(rest in valid_rest()) {
            let text = toml::to_string(&rest).expect("a TOML document");
            let cfg = load(&text);
            prop_assert!(cfg.is_ok(), "{text}\n{:?}", cfg.err());
        }

        /// One key with a value of any type among valid ones: it loads, or
        /// the error names that key (and the file).
        #[test]
        fn every_error_names_the_offending_key(
            mut rest in valid_rest(),
            key in any_key(),
            value in any_value(),
        ) {
            rest.insert(key.clone(), value);
            let text = toml::to_string(&rest).expect("a TOML document");
            if let Err(e) = load(&text) {
                let msg = e.to_string();
                prop_assert!(msg.contains(&key), "{key:?} not named in: {msg}\n{text}");
                prop_assert!(!msg.contains('\n'), "one line: {msg}");
            }
        }

        /// Any text at all: a config or an error, never a panic; broken TOML
        /// is reported with its line.
        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            match load(&text) {
                Ok(_) | Err(ConfigError::Key { .. } | ConfigError::Invalid { .. }) => {}
                Err(e @ ConfigError::Syntax { line, .. }) => {
                    prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{e}");
                    prop_assert!(e.to_string().contains("fuzz.toml"));
                }
                Err(e @ ConfigError::Read { .. }) => prop_assert!(false, "{e}"),
            }
        }

        /// Lines of `key = <fragment>`: near-valid TOML that reaches the key
        /// errors far more often than random text does.
        #[test]
        fn key_value_soup_never_panics(lines in prop::collection::vec(
            (any_key(), prop_oneof![
                Just("\"30s\"".to_string()), Just("0".to_string()), Just("-5".to_string()),
                Just("[1, \"x\"]".to_string()), Just("{ a = 1 }".to_string()),
                Just("true".to_string()), Just("\"".to_string()), Just("1e400".to_string()),
                Just("0x10".to_string()), Just("\"\\u0000\"".to_string()), "[ -~]{0,12}",
            ]),
            0..6,
        )) {
            let text: String = lines
                .iter()
                .map(|(k, v)| [k.as_str(), " = ", v.as_str(), "\n"].concat())
                .collect();
            if let Err(e) = load(&text) {
                let msg = e.to_string();
                let named = lines.iter().any(|(k, _)| msg.contains(k.as_str()));
                prop_assert!(named, "no key named in: {msg}\n{text}");
            }
        }

        #[test]
        fn durations_never_panic(s in any::<String>()) {
            let _ = parse_duration(&s);
        }
    }
}
