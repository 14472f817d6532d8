//! Loading and attaching the kernel programs, and access to their maps.
//!
//! Hooks (all work on a locked-down kernel without kprobes or fentry):
//! BTF tracepoints `inet_sock_set_state`, `tcp_receive_reset`,
//! `tcp_send_reset` and `inet_sk_error_report`. Programs stay attached for as
//! long as [`Kernel`] lives; dropping it detaches everything.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSockopt, Iter},
};
use tracer_common::{
    CONFIG_GLOBAL, DEFAULT_RING_BYTES, EVENTS_MAP, KernelOffsets, LOST_MAP, OFFSETS_GLOBAL,
    TracerConfig, kind,
};

use crate::offsets::{self, OffsetsError};

/// Everything loaded: the BTF tracepoints, the setsockopt observer and the
/// TCP iterator.
pub const PROGRAM_COUNT: usize = PROGRAMS.len() + 2;

/// The TCP socket iterator.
pub const ITER_PROGRAM: &str = "dump_tcp";

/// The setsockopt observer (cgroup program).
pub const SOCKOPT_PROGRAM: &str = "setsockopt";

/// The kernel programs, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// (program, BTF tracepoint, what it is for)
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    (
        "inet_sock_set_state",
        "inet_sock_set_state",
        "TCP state transitions and socket owners",
    ),
    ("tcp_receive_reset", "tcp_receive_reset", "resets received"),
    ("tcp_send_reset", "tcp_send_reset", "resets sent"),
    (
        "inet_sk_error_report",
        "inet_sk_error_report",
        "socket errors",
    ),
];

const PRIVILEGE_HINT: &str = "run as root, or grant CAP_SYS_ADMIN (it covers CAP_BPF and \
                              CAP_PERFMON, which load the programs, and the tracer needs it anyway \
                              to enter network namespaces), CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH \
                              (see deploy/README.md, \"Privileges\"); on kernels 5.9 and 5.10 also \
                              CAP_SYS_RESOURCE";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    /// The BTF file read, but lacks something (not a `source`: the message
    /// says it, and a chain would repeat it).
    #[error("{path}: {error}")]
    BtfContent { path: String, error: OffsetsError },
    #[error("cannot parse kernel BTF at {path}: {source}")]
    Btf {
        path: String,
        source: Box<aya::BtfError>,
    },
    #[error(
        "ring buffer size {0} is invalid: it must be a power of two and a multiple of the page \
         size (e.g. 4194304 for 4 MiB)"
    )]
    RingSize(u32),
    #[error("loading the eBPF object failed: {source}; {hint}")]
    Load {
        source: Box<aya::EbpfError>,
        hint: &'static str,
    },
    #[error("kernel program {program} ({tracepoint}) failed to load or attach: {source}; {hint}")]
    Program {
        program: &'static str,
        tracepoint: &'static str,
        source: Box<aya::programs::ProgramError>,
        hint: &'static str,
    },
    #[error(
        "no cgroup v2 hierarchy in /proc/mounts: mount one (e.g. `mount -t cgroup2 none \
         /sys/fs/cgroup/unified`) or run without socket option tracing"
    )]
    NoCgroup2,
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("reading the TCP socket iterator failed: {0}")]
    Iter(String),
    #[error("eBPF map {0} is missing from the object (build mismatch)")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

/// How to load the programs.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Kernel BTF (for offsets and tracepoint types).
    pub btf_path: PathBuf,
    /// Size of the event ring buffer in bytes.
    pub ring_bytes: u32,
    /// Send every state change, reset and error (trace), not only opens,
    /// closes and socket options (daemon).
    pub verbose: bool,
    /// Watch keepalive socket options: attach the setsockopt program to the
    /// cgroup v2 root found in /proc/mounts.
    pub sockopts: bool,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            btf_path: PathBuf::from(offsets::VMLINUX_BTF),
            ring_bytes: DEFAULT_RING_BYTES,
            verbose: false,
            sockopts: true,
        }
    }
}

/// Checks a ring buffer size the way the kernel will.
pub fn valid_ring_size(bytes: u32) -> bool {
    let page = page_size();
    bytes.is_power_of_two() && bytes >= page && bytes.is_multiple_of(page)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(p).unwrap_or(4096)
}

/// The loaded and attached kernel side.
pub struct Kernel {
    ebpf: Ebpf,
    /// Where the setsockopt program is attached (the cgroup v2 root).
    pub sockopt_cgroup: Option<PathBuf>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Names of the kernel's reset reasons, by value.
    pub reset_reasons: HashMap<u32, String>,
    /// The offsets handed to the programs.
    pub offsets: KernelOffsets,
    /// Undecodable TCP iterator records not yet counted in the metrics.
    decode_errors: u64,
}

impl Kernel {
    /// Resolves offsets from BTF, loads the programs and attaches them all.
    pub fn load(opts: &KernelOptions) -> Result<Self, KernelError> {
        if !valid_ring_size(opts.ring_bytes) {
            return Err(KernelError::RingSize(opts.ring_bytes));
        }
        let btf = offsets::load_btf(&opts.btf_path)?;
        let in_file = |error| KernelError::BtfContent {
            path: opts.btf_path.display().to_string(),
            error,
        };
        let offsets = offsets::kernel_offsets(&btf).map_err(in_file)?;
        let hooks: Vec<(&str, &str)> = PROGRAMS.iter().map(|&(_, tp, what)| (tp, what)).collect();
        offsets::check_tracepoints(&btf, &hooks).map_err(in_file)?;
        let reset_reasons = offsets::reset_reasons(&btf);
        drop(btf);
        let aya_btf = parse_aya_btf(&opts.btf_path)?;
        raise_memlock_limit();

        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global(OFFSETS_GLOBAL, &offsets, true)
            .override_global(
                CONFIG_GLOBAL,
                &TracerConfig {
                    verbose: u32::from(opts.verbose),
                    pad: 0,
                },
                true,
            )
            .map_max_entries(EVENTS_MAP, opts.ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(|source| KernelError::Load {
                source: Box::new(source),
                hint: PRIVILEGE_HINT,
            })?;
        // The logger must live as long as the programs (it owns the log map).
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("kernel-side logging unavailable: {e}");
                None
            }
        };
        for &(program, tracepoint, _) in PROGRAMS {
            let err = |source| KernelError::Program {
                program,
                tracepoint,
                source: Box::new(source),
                hint: PRIVILEGE_HINT,
            };
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(program)
                .ok_or(KernelError::MissingMap(program))?
                .try_into()
                .map_err(err)?;
            prog.load(tracepoint, &aya_btf).map_err(err)?;
            prog.attach().map_err(err)?;
            log::debug!("attached {program} to tp_btf/{tracepoint}");
        }
        let sockopt_cgroup = if opts.sockopts {
            Some(attach_sockopt(&mut ebpf)?)
        } else {
            None
        };
        {
            let err = |source| KernelError::Program {
                program: ITER_PROGRAM,
                tracepoint: "iter/tcp",
                source: Box::new(source),
                hint: PRIVILEGE_HINT,
            };
            let prog: &mut Iter = ebpf
                .program_mut(ITER_PROGRAM)
                .ok_or(KernelError::MissingMap(ITER_PROGRAM))?
                .try_into()
                .map_err(err)?;
            prog.load("tcp", &aya_btf).map_err(err)?;
        }
        Ok(Self {
            ebpf,
            sockopt_cgroup,
            logger,
            reset_reasons,
            offsets,
            decode_errors: 0,
        })
    }

    /// The event ring buffer; can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or(KernelError::MissingMap(EVENTS_MAP))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map {
            name: EVENTS_MAP,
            source: Box::new(source),
        })
    }

    /// The kernel log stream (aya-log), if any; can be taken once.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Events the kernel could not put in the ring buffer, per kind (index =
    /// kind number), summed over CPUs.
    pub fn lost_events(&self) -> Result<Vec<u64>, KernelError> {
        let map = self
            .ebpf
            .map(LOST_MAP)
            .ok_or(KernelError::MissingMap(LOST_MAP))?;
        let err = |source| KernelError::Map {
            name: LOST_MAP,
            source: Box::new(source),
        };
        let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(err)?;
        let mut lost = Vec::with_capacity(kind::SLOTS as usize);
        for i in 0..kind::SLOTS {
            let per_cpu = array.get(&i, 0).map_err(err)?;
            lost.push(per_cpu.iter().sum());
        }
        Ok(lost)
    }

    /// Every live TCP connection on the host, as the kernel's TCP iterator
    /// sees it right now: one pass over each network namespace's sockets,
    /// from a short-lived thread that enters each namespace in turn (the
    /// iterator walks the namespace its reader is created in).
    pub fn snapshot(&mut self) -> Result<Vec<crate::event::ConnEvent>, KernelError> {
        let err = |source| KernelError::Program {
            program: ITER_PROGRAM,
            tracepoint: "iter/tcp",
            source: Box::new(source),
            hint: PRIVILEGE_HINT,
        };
        let prog: &mut Iter = self
            .ebpf
            .program_mut(ITER_PROGRAM)
            .ok_or(KernelError::MissingMap(ITER_PROGRAM))?
            .try_into()
            .map_err(err)?;
        // Our own namespace first, without setns (which needs CAP_SYS_ADMIN
        // even there): then a tracer without it still sees the host's.
        let own = std::fs::read_link("/proc/self/ns/net")
            .ok()
            .and_then(|l| crate::netns::parse_ns_link(&l.to_string_lossy()));
        let mut namespaces: Vec<(u64, Option<PathBuf>)> = crate::netns::list()
            .into_iter()
            .filter(|(ino, _)| Some(*ino) != own)
            .map(|(ino, path)| (ino, Some(path)))
            .collect();
        if let Some(own) = own {
            namespaces.insert(0, (own, None));
        }
        let size = size_of::<tracer_common::Event<tracer_common::SnapshotData>>();
        let (events, bad) = std::thread::scope(|scope| {
            scope
                .spawn(
                    move || -> Result<(Vec<crate::event::ConnEvent>, u64), KernelError> {
                        let (mut out, mut bad) = (Vec::new(), 0u64);
                        for (ino, path) in &namespaces {
                            if let Some(path) = path
                                && let Err(e) = crate::netns::enter(path)
                            {
                                let detail =
                                    format!("skipping netns {ino} ({}): {e}", path.display());
                                if crate::caps::is_denied(&e) {
                                    crate::caps::denied(crate::caps::Denied::Setns, &detail);
                                } else {
                                    // Namespaces come and go with their processes.
                                    log::debug!("{detail}");
                                }
                                continue;
                            }
                            let link_id = prog.attach().map_err(err)?;
                            let link = prog.take_link(link_id).map_err(err)?;
                            let mut file = link
                                .into_file()
                                .map_err(|e| KernelError::Iter(e.to_string()))?;
                            let mut bytes = Vec::new();
                            std::io::Read::read_to_end(&mut file, &mut bytes)
                                .map_err(|e| KernelError::Iter(e.to_string()))?;
                            for record in bytes.chunks_exact(size) {
                                match crate::event::decode(record) {
                                    Ok(ev) => out.push(ev),
                                    Err(e) => {
                                        bad += 1;
                                        if bad == 1 {
                                            log::warn!(
                                                "skipping undecodable TCP iterator record: {e}"
                                            );
                                        }
                                    }
                                }
                            }
                        }
                        Ok((out, bad))
                    },
                )
                .join()
                .unwrap_or_else(|_| Err(KernelError::Iter("snapshot thread panicked".into())))
        })?;
        self.decode_errors += bad;
        Ok(events)
    }

    /// Records of the TCP iterator that could not be decoded since the last
    /// call (they count in `conntracer_decode_errors_total`).
    pub fn take_decode_errors(&mut self) -> u64 {
        std::mem::take(&mut self.decode_errors)
    }

    /// Total of [`Self::lost_events`].
    pub fn lost_total(&self) -> Result<u64, KernelError> {
        Ok(self.lost_events()?.iter().sum())
    }

    /// Name of a reset reason value, or the number when BTF has no name.
    pub fn reset_reason_name(&self, reason: u32) -> String {
        self.reset_reasons
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| reason.to_string())
    }
}

/// Attaches the setsockopt observer at the cgroup v2 root, alongside any
/// other programs there: it sees every process's options.
fn attach_sockopt(ebpf: &mut Ebpf) -> Result<PathBuf, KernelError> {
    let root = crate::cgroup::cgroup2_mount()
        .ok()
        .flatten()
        .ok_or(KernelError::NoCgroup2)?;
    let dir = std::fs::File::open(&root).map_err(|source| KernelError::Cgroup {
        path: root.display().to_string(),
        source,
    })?;
    let err = |source| KernelError::Program {
        program: SOCKOPT_PROGRAM,
        tracepoint: "cgroup/setsockopt",
        source: Box::new(source),
        hint: "loading a cgroup/setsockopt program needs CAP_NET_ADMIN (or CAP_SYS_ADMIN) \
               besides CAP_BPF; or run with --no-sockopts",
    };
    let prog: &mut CgroupSockopt = ebpf
        .program_mut(SOCKOPT_PROGRAM)
        .ok_or(KernelError::MissingMap(SOCKOPT_PROGRAM))?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(err)?;
    // On 5.7+ aya attaches with a bpf_link, which always coexists with other
    // programs on the cgroup and refuses attach flags: `Single` means "no
    // flags" there. (Older kernels are below our ring buffer floor anyway.)
    prog.attach(&dir, CgroupAttachMode::Single).map_err(err)?;
    log::debug!(
        "attached {SOCKOPT_PROGRAM} to cgroup/setsockopt at {}",
        root.display()
    );
    Ok(root)
}

pub(crate) fn parse_aya_btf(path: &Path) -> Result<Btf, KernelError> {
    Btf::parse_file(path, aya::Endianness::default()).map_err(|source| KernelError::Btf {
        path: path.display().to_string(),
        source: Box::new(source),
    })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it there.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer; failure is harmless on 5.11+.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) };
    if ret != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_follow_kernel_rules() {
        assert!(valid_ring_size(DEFAULT_RING_BYTES));
        assert!(valid_ring_size(4096));
        assert!(!valid_ring_size(4097));
        assert!(!valid_ring_size(1024));
        assert!(!valid_ring_size(0));
        assert!(!valid_ring_size(3 * 4096));
    }
}
