//! Daemon configuration: a TOML file (every key optional, documented
//! defaults) with command-line flags on top.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};
use tracer_common::DEFAULT_RING_BYTES;

use crate::{kernel, offsets::VMLINUX_BTF};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
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
    /// Most connections tracked at once (~300 bytes each); past it the
    /// oldest are dropped from the table and counted. Default 262144.
    pub max_connections: usize,
    /// Most distinct `peer` label values; later peers are reported as
    /// `peer="other"` and counted. Default 500.
    pub max_peers: usize,
    /// Most distinct `value` label values of the sockopt metric. Default 100.
    pub max_sockopt_values: usize,
    /// Kernel event ring buffer size in bytes (power of two). Default 4 MiB.
    pub ring_bytes: u32,
    /// The kernel's HZ, when it cannot be detected (it normally is).
    pub kernel_hz: Option<u32>,
    /// Kernel BTF. Default /sys/kernel/btf/vmlinux.
    pub btf: PathBuf,
    /// Watch keepalive socket options (attaches a program at the cgroup v2
    /// root). Default true.
    pub trace_sockopts: bool,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            idle_threshold: Duration::from_mins(1),
            max_connections: 262_144,
            max_peers: 500,
            max_sockopt_values: 100,
            ring_bytes: DEFAULT_RING_BYTES,
            kernel_hz: None,
            btf: PathBuf::from(VMLINUX_BTF),
            trace_sockopts: true,
            kube_api: None,
            no_kube: false,
            node_name: None,
            sidecar_uids: vec![1337],
            sidecar_names: vec!["istio-proxy".into(), "envoy".into()],
            outbound_capture_port: 15001,
            inbound_capture_port: 15006,
            resync_interval: Duration::from_secs(30),
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// "30s", "1m30s", "500ms", "2h".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 30s, 500ms, 1m"))
}

/// Flags that override the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub idle_threshold: Option<Duration>,
    pub max_connections: Option<usize>,
    pub max_peers: Option<usize>,
    pub ring_bytes: Option<u32>,
    pub btf: Option<PathBuf>,
    pub max_sockopt_values: Option<usize>,
    pub kernel_hz: Option<u32>,
    /// `--no-sockopts`: do not attach the setsockopt observer.
    pub no_sockopts: bool,
    pub kube_api: Option<String>,
    pub no_kube: bool,
    pub node_name: Option<String>,
    /// Replace the sidecar uids / names when non-empty.
    pub sidecar_uids: Vec<u32>,
    pub sidecar_names: Vec<String>,
    pub resync_interval: Option<Duration>,
}

impl Config {
    /// Parses TOML text (`path` is for messages).
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Reads `path` if given (else defaults), applies `flags`, validates.
    pub fn load(path: Option<&std::path::Path>, flags: &Overrides) -> Result<Self, ConfigError> {
        let mut cfg = match path {
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

    pub fn apply(&mut self, f: &Overrides) {
        if let Some(v) = f.listen {
            self.listen = v;
        }
        if let Some(v) = f.idle_threshold {
            self.idle_threshold = v;
        }
        if let Some(v) = f.max_connections {
            self.max_connections = v;
        }
        if let Some(v) = f.max_peers {
            self.max_peers = v;
        }
        if let Some(v) = f.ring_bytes {
            self.ring_bytes = v;
        }
        if let Some(v) = &f.btf {
            self.btf.clone_from(v);
        }
        if let Some(v) = f.max_sockopt_values {
            self.max_sockopt_values = v;
        }
        if let Some(v) = f.kernel_hz {
            self.kernel_hz = Some(v);
        }
        if let Some(v) = f.resync_interval {
            self.resync_interval = v;
        }
        if f.no_sockopts {
            self.trace_sockopts = false;
        }
        if let Some(v) = &f.kube_api {
            self.kube_api = Some(v.clone());
        }
        if f.no_kube {
            self.no_kube = true;
        }
        if let Some(v) = &f.node_name {
            self.node_name = Some(v.clone());
        }
        if !f.sidecar_uids.is_empty() {
            self.sidecar_uids.clone_from(&f.sidecar_uids);
        }
        if !f.sidecar_names.is_empty() {
            self.sidecar_names.clone_from(&f.sidecar_names);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, value: String, why| Err(ConfigError::Invalid { key, value, why });
        if self.idle_threshold.is_zero() {
            return bad("idle_threshold", "0".into(), "must be more than zero");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "0".into(), "must be at least 1");
        }
        if self.max_peers == 0 {
            return bad("max_peers", "0".into(), "must be at least 1");
        }
        if self.max_sockopt_values == 0 {
            return bad("max_sockopt_values", "0".into(), "must be at least 1");
        }
        if !kernel::valid_ring_size(self.ring_bytes) {
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
        if self.outbound_capture_port == 0 || self.inbound_capture_port == 0 {
            return bad(
                "outbound_capture_port",
                "0".into(),
                "capture ports must be set",
            );
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
        assert!(parse_duration("0.5s").is_err() || parse_duration("500ms").is_ok());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::load(
            Some(std::path::Path::new("/nope/x.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nope/x.toml"), "{err}");
    }
}
