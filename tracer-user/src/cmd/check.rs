//! `conn-tracer check`: does this kernel and this process have what the
//! tracer needs? One row per feature: ok; degraded (the tracer runs, and
//! the row says what it sees less of); or MISSING (the tracer cannot run:
//! the row says what to do). Exit 0 unless something is MISSING.

use std::{fmt, path::Path};

use crate::{
    kernel::{
        self, AcceptWatch, Kernel, KernelOptions, offsets,
        shape::{KernelShape, PROGRAMS},
    },
    sys::{
        caps::{self, CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, has},
        cgroup,
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Not required; shown for information.
    Info,
    /// The tracer runs without it and sees less (the detail says what).
    Degraded,
    /// The tracer cannot run without it.
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

impl Probe {
    fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.status {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Degraded => "degraded",
            Status::Missing => "MISSING",
        };
        write!(f, "{tag:<8} {:<36} {}", self.name, self.detail)
    }
}

/// Whether a capability set can load and attach the tracer's programs.
pub(crate) fn privileges_probe(caps: Option<u64>) -> Probe {
    let name = "privileges";
    let Some(caps) = caps else {
        return Probe::new(
            name,
            Status::Missing,
            "cannot read CapEff from /proc/self/status",
        );
    };
    let bpf = has(caps, CAP_BPF) || has(caps, CAP_SYS_ADMIN);
    let perfmon = has(caps, CAP_PERFMON) || has(caps, CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !bpf {
        missing.push("CAP_BPF");
    }
    if !perfmon {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        let extra = if has(caps, CAP_SYS_RESOURCE) {
            ""
        } else {
            " (no CAP_SYS_RESOURCE: fine on 5.11+)"
        };
        Probe::new(
            name,
            Status::Ok,
            format!("CapEff={caps:#x}: can load BPF tracing programs{extra}"),
        )
    } else {
        Probe::new(
            name,
            Status::Missing,
            format!(
                "CapEff={caps:#x} lacks {}: run as root or grant those capabilities",
                missing.join(", ")
            ),
        )
    }
}

/// Runs every probe. `btf_path` is the kernel BTF to use.
pub fn run_probes(btf_path: &Path) -> Vec<Probe> {
    let mut probes = Vec::new();
    let caps = caps::effective();
    probes.push(privileges_probe(caps));
    if let Some(caps) = caps {
        let gaps = caps::gaps(caps);
        if gaps.is_empty() {
            probes.push(Probe::new(
                "namespaces and owners",
                Status::Ok,
                "CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: every network \
                 namespace and socket owner is visible",
            ));
        }
        // Degraded, not fatal: the daemon runs and says the same at start.
        for gap in gaps {
            probes.push(Probe::new("namespaces and owners", Status::Degraded, gap));
        }
    }

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    probes.push(Probe::new(
        "kernel",
        Status::Info,
        format!("Linux {}", release.trim()),
    ));
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .map_or_else(|_| "not reported".to_string(), |s| s.trim().to_string());
    probes.push(Probe::new(
        "lockdown",
        Status::Info,
        format!("{lockdown} (conn-tracer needs no kprobes or fentry, so lockdown is fine)"),
    ));

    let btf_ok = btf_probes(btf_path, &mut probes);

    for (name, need, supported) in kernel::map_support() {
        probes.push(match supported {
            Ok(true) => Probe::new(format!("map {name}"), Status::Ok, "supported"),
            Ok(false) => Probe::new(
                format!("map {name}"),
                Status::Missing,
                format!("not supported: needs {need}"),
            ),
            Err(e) => Probe::new(
                format!("map {name}"),
                Status::Missing,
                format!("probe failed: {e}"),
            ),
        });
    }

    let cgroup2 = matches!(cgroup::cgroup2_mount(), Ok(Some(_)));
    probes.push(match cgroup::cgroup2_mount() {
        Ok(Some(p)) => Probe::new(
            "cgroup v2",
            Status::Ok,
            format!("mounted at {}", p.display()),
        ),
        Ok(None) => Probe::new(
            "cgroup v2",
            Status::Degraded,
            "no cgroup2 mount in /proc/mounts: no pod or container of any socket, and keepalive \
             options are not watched as they are set (`run --no-sockopts`); mount it (e.g. \
             `mount -t cgroup2 none /sys/fs/cgroup`)",
        ),
        Err(e) => Probe::new(
            "cgroup v2",
            Status::Degraded,
            format!("cannot read /proc/mounts: {e}"),
        ),
    });

    // The decisive probe: load and attach the real programs (BTF tracepoints,
    // BPF_PROG_TYPE_TRACING), then detach. aya's generic program-type probe
    // is not used: on locked-down kernels it tries fentry, which is refused.
    if btf_ok {
        load_probes(btf_path, cgroup2, &mut probes);
    }
    probes
}

/// Loads and attaches the real programs for this kernel's shape: the rows
/// of the helpers the probes found, and the decisive "load and attach".
fn load_probes(btf_path: &Path, cgroup2: bool, probes: &mut Vec<Probe>) {
    let opts = KernelOptions {
        btf_path: btf_path.to_path_buf(),
        sockopts: cgroup2,
        ..KernelOptions::default()
    };
    let k = match Kernel::load(&opts) {
        Ok(k) => k,
        Err(e) => {
            probes.push(Probe::new(
                "load and attach",
                Status::Missing,
                e.to_string(),
            ));
            return;
        }
    };
    let degraded = k.shape.degradations();
    for (feature, ok) in [
        (
            "socket storage in tracing programs",
            "bpf_sk_storage_get: owners and lifecycle facts live with each socket",
        ),
        (
            "socket cookies in tracing programs",
            "bpf_get_socket_cookie: connection ids are the kernel's socket cookies",
        ),
        (
            "task of setsockopt calls",
            "keepalive options set with setsockopt name the process that set them",
        ),
        (
            "reset reasons",
            "tcp_send_reset gives the kernel's reason for each reset",
        ),
    ] {
        probes.push(match degraded.iter().find(|d| d.feature == feature) {
            Some(d) => Probe::new(feature, Status::Degraded, d.lost.clone()),
            None => Probe::new(feature, Status::Ok, ok),
        });
    }
    probes.push(accept_probe(k.accept));
    probes.push(Probe::new(
        "load and attach",
        Status::Ok,
        format!(
            "{} programs loaded, attached and detached",
            k.program_count()
        ),
    ));
}

/// How the sidecar thread that took each captured connection is known: the
/// getsockopt observer, or how many of the accept syscall tracepoints
/// (found through tracefs) attached.
fn accept_probe(watch: AcceptWatch) -> Probe {
    const NAME: &str = "accepting threads";
    match watch {
        AcceptWatch::OriginalDst => Probe::new(
            NAME,
            Status::Ok,
            "cgroup getsockopt(SO_ORIGINAL_DST): the sidecar thread that took each captured \
             connection is known, so its upstream leg is paired by thread; no syscall \
             tracepoint is attached",
        ),
        AcceptWatch::Syscalls(n) if n == kernel::ACCEPT_PROGRAMS.len() => Probe::new(
            NAME,
            Status::Ok,
            "syscalls:sys_exit_accept4 and sys_exit_accept (cgroup programs cannot ask for the \
             task before Linux 5.11, or --no-sockopts): the sidecar thread that accepted each \
             captured connection is known; while attached, every system call on the node \
             takes the kernel's traced path (about 45-60 ns more a call)",
        ),
        AcceptWatch::Syscalls(attached) => Probe::new(
            NAME,
            Status::Degraded,
            format!(
                "{attached} of {} accept syscall tracepoints attached (is tracefs mounted at \
                 /sys/kernel/tracing or /sys/kernel/debug/tracing? the DaemonSet mounts the \
                 host's): a sidecar's two sockets are paired by order, and links among several \
                 fitting chains are inferred",
                kernel::ACCEPT_PROGRAMS.len()
            ),
        ),
    }
}

/// Kernel BTF, the struct offsets it gives, and the tracepoints' types;
/// true when all are there (loading the programs can only work then).
fn btf_probes(btf_path: &Path, probes: &mut Vec<Probe>) -> bool {
    match offsets::load_btf(btf_path) {
        Ok(btf) => {
            probes.push(Probe::new(
                "kernel BTF",
                Status::Ok,
                btf_path.display().to_string(),
            ));
            let mut all = true;
            match offsets::kernel_offsets(&btf) {
                Ok(o) => probes.push(Probe::new(
                    "struct offsets",
                    Status::Ok,
                    format!(
                        "sock_common, sock, net resolved from BTF (skc_family@{}, sk_protocol@{}, \
                         sk_err@{}, net.ns.inum@{})",
                        o.skc_family, o.sk_protocol, o.sk_err, o.net_ns_inum
                    ),
                )),
                Err(e) => {
                    all = false;
                    probes.push(Probe::new("struct offsets", Status::Missing, e.to_string()));
                }
            }
            match KernelShape::from_btf(&btf, &[]) {
                Ok(shape) => {
                    for hook in PROGRAMS {
                        let name = format!("tracepoint {}", hook.tracepoint);
                        if let Some((_, why)) = shape
                            .missing_hooks
                            .iter()
                            .find(|(h, _)| h.program == hook.program)
                        {
                            probes.push(Probe::new(
                                name,
                                Status::Degraded,
                                format!("{why}: {}", hook.without),
                            ));
                            continue;
                        }
                        let args = offsets::tracepoint_args(&btf, hook.tracepoint)
                            .ok()
                            .flatten()
                            .unwrap_or_default();
                        let args: Vec<String> = args.iter().map(ToString::to_string).collect();
                        probes.push(Probe::new(
                            name,
                            Status::Ok,
                            format!("{} ({})", hook.what, args.join(", ")),
                        ));
                    }
                }
                Err(e) => {
                    all = false;
                    probes.push(Probe::new("tracepoints", Status::Missing, e.to_string()));
                }
            }
            all
        }
        Err(e) => {
            probes.push(Probe::new("kernel BTF", Status::Missing, e.to_string()));
            false
        }
    }
}

/// True when every required probe passed.
pub fn all_ok(probes: &[Probe]) -> bool {
    probes.iter().all(|p| p.status != Status::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(caps::parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(caps::parse_cap_eff("Name: x\n"), None);
        assert_eq!(caps::parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn privilege_probe_names_what_is_missing() {
        assert_eq!(privileges_probe(Some(0x1ff_ffff_ffff)).status, Status::Ok);
        let none = privileges_probe(Some(0));
        assert_eq!(none.status, Status::Missing);
        assert!(
            none.detail.contains("CAP_BPF") && none.detail.contains("CAP_PERFMON"),
            "{}",
            none.detail
        );
        let bpf_perfmon = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(privileges_probe(Some(bpf_perfmon)).status, Status::Ok);
        assert_eq!(
            privileges_probe(Some(1 << CAP_SYS_ADMIN)).status,
            Status::Ok
        );
        assert_eq!(privileges_probe(None).status, Status::Missing);
    }

    #[test]
    fn accept_probe_is_degraded_unless_both_attached() {
        assert_eq!(accept_probe(AcceptWatch::OriginalDst).status, Status::Ok);
        assert_eq!(accept_probe(AcceptWatch::Syscalls(2)).status, Status::Ok);
        for attached in [0, 1] {
            let p = accept_probe(AcceptWatch::Syscalls(attached));
            assert_eq!(p.status, Status::Degraded);
            assert!(p.detail.contains("tracefs"), "{}", p.detail);
        }
    }

    #[test]
    fn all_ok_ignores_info() {
        let p = |s| Probe::new("x", s, "");
        assert!(all_ok(&[p(Status::Ok), p(Status::Info)]));
        assert!(!all_ok(&[p(Status::Ok), p(Status::Missing)]));
        assert!(p(Status::Missing).to_string().starts_with("MISSING"));
    }
}
