//! Running a Kubernetes container by hand, for the image tests: what a pod
//! spec and an image config mean to the container runtime
//! ([`from_pod`], the rules of kubelet and containerd), carried out by the
//! `ct-container` helper binary.
//!
//! The spec is derived from the manifest alone (user, capabilities,
//! no_new_privs, read-only root, hostPID/hostNetwork, volume mounts,
//! command and arguments, environment): nothing about privileges is
//! written twice. Not reproduced: the seccomp profile (`RuntimeDefault`),
//! AppArmor/SELinux, resource limits, and kubelet's own mounts
//! (/etc/hosts, /etc/resolv.conf, the service account token).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_yaml::Value as Yaml;

/// One bind mount into the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    /// The path inside the container.
    pub target: String,
    /// Read-only, and so is every mount below it (stricter than
    /// Kubernetes' default `readOnly`, which leaves sub-mounts writable).
    pub read_only: bool,
}

/// What `ct-container` does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The image's unpacked root filesystem (a new container).
    pub rootfs: PathBuf,
    /// Run in the container of this pid instead (`kubectl exec`).
    pub join: Option<u32>,
    pub argv: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Capability numbers (linux/capability.h) in the bounding, permitted
    /// and effective sets.
    pub caps: Vec<u32>,
    pub no_new_privs: bool,
    pub read_only_root: bool,
    pub host_pid: bool,
    /// The pod's network namespace; `None`: the host's (`hostNetwork`).
    pub netns: Option<PathBuf>,
    /// The cgroup v2 directory of the container.
    pub cgroup: Option<PathBuf>,
    pub mounts: Vec<BindMount>,
    pub hostname: String,
}

/// Capability names of the Kubernetes API (no `CAP_` prefix) by number.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// containerd's (and CRI-O's) default capabilities of a container, which
/// `securityContext.capabilities` drops from and adds to.
pub const RUNTIME_DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The number of a capability by its Kubernetes name (`SYS_ADMIN`).
pub fn capability_number(name: &str) -> u32 {
    let name = name.strip_prefix("CAP_").unwrap_or(name);
    CAPABILITIES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .unwrap_or_else(|| panic!("unknown capability {name}")) as u32
}

/// The parts of an image's config (OCI `config` object) a runtime uses.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub user: String,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
}

impl ImageConfig {
    /// From an OCI image config blob.
    pub fn from_oci(config: &serde_json::Value) -> Self {
        let c = &config["config"];
        let list = |key: &str| -> Vec<String> {
            c[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        Self {
            user: c["User"].as_str().unwrap_or_default().to_owned(),
            env: list("Env"),
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_owned(),
        }
    }
}

/// What the test provides that a cluster would: the node's name, the
/// pod's network namespace and cgroup, and a directory per ConfigMap.
pub struct PodContext<'a> {
    pub node_name: &'a str,
    pub pod_netns: &'a Path,
    pub cgroup: &'a Path,
    pub config_maps: &'a BTreeMap<String, PathBuf>,
}

/// `$(VAR)` in a command or argument, expanded from the container's
/// environment as kubelet does (`$$` is a literal `$`; unknown variables
/// stay as written).
pub fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
            && let Some(value) = env.get(&body[..end])
        {
            out.push_str(value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| match s.as_str() {
            Some(s) => s.to_owned(),
            None => panic!("not a string: {s:?}"),
        })
        .collect()
}

/// The spec of container `name` of `pod` (a PodSpec, e.g. a DaemonSet's
/// `spec.template.spec`) for image `image` unpacked at `rootfs`.
pub fn from_pod(
    pod: &Yaml,
    name: &str,
    image: &ImageConfig,
    rootfs: &Path,
    ctx: &PodContext<'_>,
) -> ContainerSpec {
    let c = pod["containers"]
        .as_sequence()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"));
    let sc = &c["securityContext"];
    assert_ne!(
        sc["privileged"].as_bool(),
        Some(true),
        "a privileged container is not run by this helper"
    );
    let env = env_of(c, image, ctx);
    let (uid, gid) = user_of(sc, image);
    ContainerSpec {
        rootfs: rootfs.to_owned(),
        join: None,
        argv: argv_of(c, image, &env),
        env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: c["workingDir"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| (!image.working_dir.is_empty()).then(|| image.working_dir.clone()))
            .unwrap_or_else(|| "/".to_owned()),
        uid,
        gid,
        caps: caps_of(sc),
        // Kubernetes sets no_new_privs unless privilege escalation is allowed.
        no_new_privs: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
        read_only_root: sc["readOnlyRootFilesystem"].as_bool() == Some(true),
        host_pid: pod["hostPID"].as_bool() == Some(true),
        netns: (pod["hostNetwork"].as_bool() != Some(true)).then(|| ctx.pod_netns.to_owned()),
        cgroup: Some(ctx.cgroup.to_owned()),
        mounts: mounts_of(pod, c, ctx),
        hostname: format!("{name}-{}", ctx.node_name),
    }
}

/// The image's environment, then the container's.
fn env_of(c: &Yaml, image: &ImageConfig, ctx: &PodContext<'_>) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = image
        .env
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let key = e["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => ctx.node_name.to_owned(),
                other => panic!("env {key}: valueFrom {other:?} is not provided here"),
            }
        };
        env.insert(key, value);
    }
    env
}

/// Kubernetes: `command` replaces the ENTRYPOINT, `args` the CMD (a
/// `command` alone drops the CMD).
fn argv_of(c: &Yaml, image: &ImageConfig, env: &BTreeMap<String, String>) -> Vec<String> {
    let command = strings(&c["command"]);
    let arguments = strings(&c["args"]);
    let mut out = if command.is_empty() {
        image.entrypoint.clone()
    } else {
        command
    };
    out.extend(if arguments.is_empty() && c["command"].is_null() {
        image.cmd.clone()
    } else {
        arguments
    });
    out.iter().map(|a| expand(a, env)).collect()
}

/// runAsUser/runAsGroup, else the image's USER (numeric here).
fn user_of(sc: &Yaml, image: &ImageConfig) -> (u32, u32) {
    let (user, group) = match image.user.split_once(':') {
        Some((u, g)) => (u.parse().ok(), g.parse().ok()),
        None => (image.user.parse().ok(), None),
    };
    let id = |key: &str, fallback: Option<u32>| {
        sc[key]
            .as_u64()
            .map(|v| u32::try_from(v).expect("id fits"))
            .or(fallback)
            .unwrap_or(0)
    };
    let uid = id("runAsUser", user);
    // A runAsUser replaces the image's USER group too (0 without an
    // /etc/passwd entry, as this image has none).
    let gid = if sc["runAsUser"].is_null() {
        id("runAsGroup", group)
    } else {
        id("runAsGroup", Some(0))
    };
    if sc["runAsNonRoot"].as_bool() == Some(true) {
        assert_ne!(uid, 0, "runAsNonRoot with uid 0 would not start");
    }
    (uid, gid)
}

/// The runtime's default set, minus `drop`, plus `add`.
fn caps_of(sc: &Yaml) -> Vec<u32> {
    let drop = strings(&sc["capabilities"]["drop"]);
    let mut caps: Vec<u32> = if drop.iter().any(|d| d == "ALL") {
        Vec::new()
    } else {
        RUNTIME_DEFAULT_CAPS
            .iter()
            .filter(|c| !drop.iter().any(|d| d == *c))
            .map(|c| capability_number(c))
            .collect()
    };
    for add in strings(&sc["capabilities"]["add"]) {
        let n = capability_number(&add);
        if !caps.contains(&n) {
            caps.push(n);
        }
    }
    caps.sort_unstable();
    caps
}

/// The volume mounts: hostPath as is, configMap from the test's directory.
fn mounts_of(pod: &Yaml, c: &Yaml, ctx: &PodContext<'_>) -> Vec<BindMount> {
    let volumes: BTreeMap<String, &Yaml> = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().expect("volume name").to_owned(), v))
        .collect();
    c["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|m| {
            let vname = m["name"].as_str().expect("volumeMount name");
            let v = volumes
                .get(vname)
                .unwrap_or_else(|| panic!("volumeMount {vname}: no such volume"));
            let source = if let Some(path) = v["hostPath"]["path"].as_str() {
                let path = PathBuf::from(path);
                if v["hostPath"]["type"] == "Directory" {
                    assert!(
                        path.is_dir(),
                        "hostPath {} is not a directory",
                        path.display()
                    );
                }
                path
            } else if let Some(cm) = v["configMap"]["name"].as_str() {
                ctx.config_maps
                    .get(cm)
                    .unwrap_or_else(|| panic!("no ConfigMap {cm} given"))
                    .clone()
            } else {
                panic!("volume {vname}: only hostPath and configMap are provided here");
            };
            assert!(
                m["subPath"].is_null(),
                "volumeMount {vname}: subPath is not supported here"
            );
            BindMount {
                source,
                target: m["mountPath"].as_str().expect("mountPath").to_owned(),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
            }
        })
        .collect()
}

impl ContainerSpec {
    /// `kubectl exec` of `argv` into the running container `pid` (same user,
    /// capabilities and no_new_privs; the container's namespaces and cgroup).
    #[must_use]
    pub fn exec_in(&self, pid: u32, argv: &[&str]) -> Self {
        let mut spec = self.clone();
        spec.join = Some(pid);
        spec.argv = argv.iter().map(|a| (*a).to_owned()).collect();
        spec
    }
}

/// A process started by `ct-container`, SIGKILLed on drop if still running.
/// Its stderr is echoed to the test's and kept.
pub struct Container {
    child: Child,
    stderr: Arc<Mutex<String>>,
    spec_file: PathBuf,
}

impl Container {
    /// Starts `spec` with `helper`, the `ct-container` binary (an
    /// integration test's `env!("CARGO_BIN_EXE_ct-container")`); its stdout
    /// and stderr are kept together ([`Self::stderr`]).
    pub fn start(helper: &Path, spec: &ContainerSpec) -> Self {
        let file =
            std::env::temp_dir().join(format!("ct-container-{}.json", crate::unique_suffix()));
        std::fs::write(&file, serde_json::to_vec_pretty(spec).expect("spec JSON"))
            .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        // Its stdout and stderr, in one pipe (`conn-tracer check` writes
        // its table to stdout).
        let (output, writer) = std::io::pipe().expect("pipe");
        let child = Command::new(helper)
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("pipe"))
            .stderr(writer)
            .spawn()
            .expect("spawn ct-container");
        let stderr = crate::tee_lines(output, "[container] ");
        Self {
            child,
            stderr,
            spec_file: file,
        }
    }

    /// Runs `spec` to its end (bounded by `timeout`): exit code and output.
    pub fn run(helper: &Path, spec: &ContainerSpec, timeout: Duration) -> (Option<i32>, String) {
        let mut c = Self::start(helper, spec);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                return (status.code(), c.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "{:?} still running after {timeout:?}:\n{}",
                spec.argv,
                c.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr(&self) -> String {
        crate::lock(&self.stderr).clone()
    }

    /// SIGTERM (what the kubelet sends), then waits at most `timeout`:
    /// the exit code, `None` if it had to be killed.
    pub fn stop(mut self, timeout: Duration) -> Option<i32> {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.spec_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_expands_dollar_parentheses() {
        let env: BTreeMap<String, String> = [("NODE_NAME".to_owned(), "n1".to_owned())].into();
        assert_eq!(expand("--node-name=$(NODE_NAME)", &env), "--node-name=n1");
        assert_eq!(
            expand("$$(NODE_NAME) $(OTHER) $", &env),
            "$(NODE_NAME) $(OTHER) $"
        );
    }

    #[test]
    fn capability_numbers_follow_linux() {
        assert_eq!(capability_number("SYS_ADMIN"), 21);
        assert_eq!(capability_number("CAP_SYS_PTRACE"), 19);
        assert_eq!(capability_number("dac_read_search"), 2);
        assert_eq!(capability_number("BPF"), 39);
    }

    #[test]
    fn a_pod_spec_becomes_what_the_runtime_runs() {
        let pod: Yaml = serde_yaml::from_str(
            "hostPID: true\n\
             containers:\n\
             - name: c\n  args: [run, --node=$(NODE_NAME)]\n  \
               env: [{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]\n  \
               securityContext:\n    runAsUser: 0\n    allowPrivilegeEscalation: false\n    \
               readOnlyRootFilesystem: true\n    capabilities: {drop: [ALL], add: [SYS_ADMIN, BPF]}\n  \
               volumeMounts: [{name: btf, mountPath: /sys/kernel/btf, readOnly: true}, \
                              {name: cfg, mountPath: /etc/x}]\n\
             volumes:\n- {name: btf, hostPath: {path: /sys/kernel/btf}}\n\
             - {name: cfg, configMap: {name: cm}}\n",
        )
        .unwrap();
        let image = ImageConfig {
            user: "65532:65532".into(),
            env: vec!["PATH=/usr/local/bin".into()],
            entrypoint: vec!["/bin/x".into()],
            cmd: vec!["default".into()],
            working_dir: String::new(),
        };
        let cms: BTreeMap<String, PathBuf> = [("cm".to_owned(), PathBuf::from("/tmp/cm"))].into();
        let ctx = PodContext {
            node_name: "n1",
            pod_netns: Path::new("/run/netns/p"),
            cgroup: Path::new("/sys/fs/cgroup/p"),
            config_maps: &cms,
        };
        let spec = from_pod(&pod, "c", &image, Path::new("/r"), &ctx);
        assert_eq!(spec.argv, ["/bin/x", "run", "--node=n1"]);
        assert_eq!((spec.uid, spec.gid), (0, 0));
        assert_eq!(spec.caps, [21, 39]);
        assert!(spec.no_new_privs && spec.read_only_root && spec.host_pid);
        assert_eq!(spec.netns.as_deref(), Some(Path::new("/run/netns/p")));
        assert_eq!(
            spec.mounts,
            [
                BindMount {
                    source: "/sys/kernel/btf".into(),
                    target: "/sys/kernel/btf".into(),
                    read_only: true
                },
                BindMount {
                    source: "/tmp/cm".into(),
                    target: "/etc/x".into(),
                    read_only: false
                }
            ]
        );
        assert!(spec.env.contains(&"NODE_NAME=n1".to_owned()));
    }
}
