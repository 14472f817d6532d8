//! Loading and attaching the kernel programs, and access to their maps.
//!
//! Hooks (all work on a locked-down kernel without kprobes or fentry):
//! BTF tracepoints `inet_sock_set_state`, `tcp_receive_reset`,
//! `tcp_send_reset` and `inet_sk_error_report`. Programs stay attached for as
//! long as [`Kernel`] lives; dropping it detaches everything.

pub mod offsets;

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
    CONFIG_GLOBAL, DEFAULT_RING_BYTES, DEFAULT_STATE_HASH_ENTRIES, EVENTS_MAP, KernelOffsets,
    LISTENERS_MAP, LOST_MAP, NO_ARG, OFFSETS_GLOBAL, RESET_REASON_ARG, STATE_HASH_MAP,
    TracerConfig, kind, state_store,
};

use self::offsets::{OffsetsError, TpArg};

/// The TCP socket iterator.
pub const ITER_PROGRAM: &str = "dump_tcp";

/// The setsockopt observer (cgroup program).
pub const SOCKOPT_PROGRAM: &str = "setsockopt";

/// The kernel programs, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// What a tracepoint program reads of its tracepoint's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgUse {
    /// Argument 0 is the socket (`struct sock *`).
    Sock,
    /// Argument 0 is the socket, 1 and 2 the old and new state (`int`).
    SockStates,
}

/// One BTF tracepoint program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub program: &'static str,
    pub tracepoint: &'static str,
    pub what: &'static str,
    /// Without it the tracer cannot run; else the feature degrades.
    pub required: bool,
    pub args: ArgUse,
    /// What is lost where the kernel lacks the tracepoint.
    pub without: &'static str,
}

/// The BTF tracepoint programs.
pub const PROGRAMS: &[Hook] = &[
    Hook {
        program: "inet_sock_set_state",
        tracepoint: "inet_sock_set_state",
        what: "TCP state transitions and socket owners",
        required: true,
        args: ArgUse::SockStates,
        without: "",
    },
    Hook {
        program: "tcp_receive_reset",
        tracepoint: "tcp_receive_reset",
        what: "resets received",
        required: false,
        args: ArgUse::Sock,
        without: "resets received are not seen as they arrive: a connection ended by a reset \
                  is told from its error (ECONNRESET) at close",
    },
    Hook {
        program: "tcp_send_reset",
        tracepoint: "tcp_send_reset",
        what: "resets sent",
        required: false,
        args: ArgUse::Sock,
        without: "resets this host sends are not seen",
    },
    Hook {
        program: "inet_sk_error_report",
        tracepoint: "inet_sk_error_report",
        what: "socket errors",
        required: false,
        args: ArgUse::Sock,
        without: "`trace` shows no live socket-error events (the tracepoint is Linux 5.14+); \
                  each connection's close summary still carries its error (sk_err)",
    },
];

/// Set to 1, the programs use what kernels before 5.11 offer (no socket
/// storage or cookies in tracing programs) on any kernel: for tests of
/// those fallbacks on a newer kernel.
pub const OLD_HELPERS_ENV: &str = "CONN_TRACER_OLD_HELPERS";

/// Feature probes in the object (loaded, never attached, then unloaded).
const PROBE_SK_STORAGE: &str = "probe_sk_storage";
const PROBE_SOCKET_COOKIE: &str = "probe_socket_cookie";
const PROBE_SOCKOPT_TASK: &str = "probe_sockopt_task";

/// What the running kernel offers the programs, from its BTF and from
/// feature probes. The programs branch on it (the `CONFIG` global).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelShape {
    /// Hooks whose tracepoint exists with the arguments the program reads.
    pub hooks: Vec<Hook>,
    /// Hooks left out, with why.
    pub missing_hooks: Vec<(Hook, String)>,
    /// Position of `tcp_send_reset`'s `enum sk_rst_reason` argument (6.10+).
    pub reset_reason_arg: Option<u32>,
    /// `bpf_sk_storage_get` works in tracing programs (5.11+).
    pub sk_storage: bool,
    /// `bpf_get_socket_cookie` works in tracing programs (5.12+).
    pub socket_cookie: bool,
    /// The setsockopt program may ask for the task's pid and name (5.11+).
    pub sockopt_task: bool,
}

/// One way this kernel makes the tracer see less, and what is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degradation {
    pub feature: String,
    pub lost: String,
}

impl KernelShape {
    /// Reads the tracepoints' prototypes from BTF. Fails when a required
    /// one is missing or has other arguments than the program reads.
    pub fn from_btf(btf: &btf_rs::Btf) -> Result<Self, OffsetsError> {
        let mut shape = Self {
            hooks: Vec::new(),
            missing_hooks: Vec::new(),
            reset_reason_arg: None,
            sk_storage: true,
            socket_cookie: true,
            sockopt_task: true,
        };
        for hook in PROGRAMS {
            let why = match offsets::tracepoint_args(btf, hook.tracepoint)? {
                None => format!(
                    "this kernel has no tracepoint {} (no btf_trace_{0} in BTF)",
                    hook.tracepoint
                ),
                Some(args) => match args_fit(hook.args, &args) {
                    Ok(()) => {
                        if hook.program == "tcp_send_reset" {
                            // Read from one position only (see the program).
                            shape.reset_reason_arg = args
                                .iter()
                                .position(|a| *a == TpArg::Enum("sk_rst_reason".into()))
                                .and_then(|i| u32::try_from(i).ok())
                                .filter(|&i| i == RESET_REASON_ARG);
                        }
                        shape.hooks.push(*hook);
                        continue;
                    }
                    Err(why) => why,
                },
            };
            if hook.required {
                return Err(OffsetsError::NoTracepoint {
                    typedef: format!("btf_trace_{}", hook.tracepoint),
                    tracepoint: hook.tracepoint.to_string(),
                    what: format!("{} ({why})", hook.what),
                });
            }
            shape.missing_hooks.push((*hook, why));
        }
        Ok(shape)
    }

    /// The load-time switches for this shape.
    fn config(&self, verbose: bool, id_secret: u64) -> TracerConfig {
        TracerConfig {
            verbose: u32::from(verbose),
            state_store: if self.sk_storage {
                state_store::SK_STORAGE
            } else {
                state_store::HASH
            },
            cookie_helper: u32::from(self.socket_cookie),
            reset_reason_arg: self.reset_reason_arg.unwrap_or(NO_ARG),
            id_secret,
            sockopt_task: u32::from(self.sockopt_task),
            pad: 0,
        }
    }

    /// What this kernel costs the tracer, feature by feature.
    pub fn degradations(&self) -> Vec<Degradation> {
        let mut out = Vec::new();
        for (hook, why) in &self.missing_hooks {
            out.push(Degradation {
                feature: format!("tracepoint {}", hook.tracepoint),
                lost: format!("{why}: {}", hook.without),
            });
        }
        if self.hooks.iter().any(|h| h.program == "tcp_send_reset")
            && self.reset_reason_arg.is_none()
        {
            out.push(Degradation {
                feature: "reset reasons".into(),
                lost: "tcp_send_reset has no reason argument before Linux 6.10: resets sent \
                       carry no reason"
                    .into(),
            });
        }
        if !self.sk_storage {
            out.push(Degradation {
                feature: "socket storage in tracing programs".into(),
                lost: format!(
                    "not before Linux 5.11: socket owners and lifecycle facts are kept in a map \
                     keyed by the socket's address instead (at most {DEFAULT_STATE_HASH_ENTRIES} \
                     sockets at once; more are counted in conntracer_events_lost_total and \
                     reported without owner); accepted sockets take the owner of the listener \
                     on their namespace and port (with SO_REUSEPORT listeners of different \
                     processes on one port, the newest one's); keepalive options set with \
                     setsockopt are counted but not tied to their connection (its close \
                     summary reads them from the socket either way)"
                ),
            });
        }
        if !self.sockopt_task {
            out.push(Degradation {
                feature: "task of setsockopt calls".into(),
                lost: "cgroup programs cannot ask for the calling task before Linux 5.11: \
                       keepalive options set with setsockopt are attributed by cgroup (pod, \
                       container) and uid, with no pid or process name"
                    .into(),
            });
        }
        if !self.socket_cookie {
            out.push(Degradation {
                feature: "socket cookies in tracing programs".into(),
                lost: "not before Linux 5.12: connection ids are made from the socket's \
                       address and creation time (mixed with a random key), not the kernel's \
                       cookie; a socket older than the tracer has one from its address alone, \
                       which a later socket at the same address can repeat"
                    .into(),
            });
        }
        out
    }
}

/// Whether a tracepoint's arguments are what a program reads.
fn args_fit(uses: ArgUse, args: &[TpArg]) -> Result<(), String> {
    let sock = TpArg::Ptr("sock".into());
    let ok = match uses {
        ArgUse::Sock => args.first() == Some(&sock),
        ArgUse::SockStates => {
            args.len() >= 3
                && args[0] == sock
                && args[1] == TpArg::Int(4)
                && args[2] == TpArg::Int(4)
        }
    };
    if ok {
        Ok(())
    } else {
        let want = match uses {
            ArgUse::Sock => "(struct sock *, ...)",
            ArgUse::SockStates => "(struct sock *, int32, int32, ...)",
        };
        let have: Vec<String> = args.iter().map(ToString::to_string).collect();
        Err(format!(
            "its arguments are ({}), the program reads {want}",
            have.join(", ")
        ))
    }
}

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
    /// The kernel's shape the programs were built for.
    pub shape: KernelShape,
    /// Undecodable TCP iterator records not yet counted in the metrics.
    decode_errors: u64,
}

impl Kernel {
    /// Resolves offsets and the kernel's shape from BTF, probes which
    /// helpers tracing programs may call, loads the programs built for that
    /// shape and attaches them all.
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
        let mut shape = KernelShape::from_btf(&btf).map_err(in_file)?;
        let reset_reasons = offsets::reset_reasons(&btf);
        drop(btf);
        let aya_btf = parse_aya_btf(&opts.btf_path)?;
        raise_memlock_limit();
        let id_secret = random_u64();

        // Built for a kernel with every helper first; the probes say
        // whether this one has them, and the object is built again for it
        // when it lacks one (kernels before 5.12 only).
        let mut ebpf = load_object(
            opts,
            &aya_btf,
            &offsets,
            &shape.config(opts.verbose, id_secret),
        )?;
        if std::env::var_os(OLD_HELPERS_ENV).is_some_and(|v| v == "1") {
            // Tests run the fallbacks of older kernels on a new one.
            log::warn!("{OLD_HELPERS_ENV}=1: acting as if this kernel were older than 5.11");
            shape.sk_storage = false;
            shape.socket_cookie = false;
            shape.sockopt_task = false;
        } else {
            shape.sk_storage = probe(&mut ebpf, PROBE_SK_STORAGE, &aya_btf);
            shape.socket_cookie = probe(&mut ebpf, PROBE_SOCKET_COOKIE, &aya_btf);
            shape.sockopt_task = !opts.sockopts || probe_sockopt(&mut ebpf, PROBE_SOCKOPT_TASK);
        }
        if !(shape.sk_storage && shape.socket_cookie && shape.sockopt_task) {
            drop(ebpf);
            ebpf = load_object(
                opts,
                &aya_btf,
                &offsets,
                &shape.config(opts.verbose, id_secret),
            )?;
        }
        for d in shape.degradations() {
            log::info!("this kernel: {}: {}", d.feature, d.lost);
        }
        // The logger must live as long as the programs (it owns the log map).
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("kernel-side logging unavailable: {e}");
                None
            }
        };
        for hook in &shape.hooks {
            let (program, tracepoint) = (hook.program, hook.tracepoint);
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
            shape,
            decode_errors: 0,
        })
    }

    /// Programs loaded: the BTF tracepoints this kernel has, the
    /// setsockopt observer (unless disabled) and the TCP iterator.
    pub fn program_count(&self) -> usize {
        self.shape.hooks.len() + usize::from(self.sockopt_cgroup.is_some()) + 1
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
            .and_then(|l| crate::sys::netns::parse_ns_link(&l.to_string_lossy()));
        let mut namespaces: Vec<(u64, Option<PathBuf>)> = crate::sys::netns::list()
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
                                && let Err(e) = crate::sys::netns::enter(path)
                            {
                                let detail =
                                    format!("skipping netns {ino} ({}): {e}", path.display());
                                if crate::sys::caps::is_denied(&e) {
                                    crate::sys::caps::denied(
                                        crate::sys::caps::Denied::Setns,
                                        &detail,
                                    );
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

    /// Name of a reset reason value, or the number when BTF has no name;
    /// empty when the kernel gave none.
    pub fn reset_reason_name(&self, reason: u32) -> String {
        if reason == tracer_common::NO_RESET_REASON {
            return String::new();
        }
        self.reset_reasons
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| reason.to_string())
    }
}

/// Creates the object's maps and reads its programs, for one shape.
fn load_object(
    opts: &KernelOptions,
    btf: &Btf,
    offsets: &KernelOffsets,
    config: &TracerConfig,
) -> Result<Ebpf, KernelError> {
    // The fallback state maps are allocated per entry, but keep their
    // bucket arrays small where they are not used.
    let (states, listeners) = if config.state_store == state_store::HASH {
        (DEFAULT_STATE_HASH_ENTRIES, 16384)
    } else {
        (1, 1)
    };
    EbpfLoader::new()
        .btf(Some(btf))
        .override_global(OFFSETS_GLOBAL, offsets, true)
        .override_global(CONFIG_GLOBAL, config, true)
        .map_max_entries(EVENTS_MAP, opts.ring_bytes)
        .map_max_entries(STATE_HASH_MAP, states)
        .map_max_entries(LISTENERS_MAP, listeners)
        .load(EBPF_OBJECT)
        .map_err(|source| KernelError::Load {
            source: Box::new(source),
            hint: PRIVILEGE_HINT,
        })
}

/// Whether feature probe `program` loads on this kernel (then unloads it).
fn probe(ebpf: &mut Ebpf, program: &str, btf: &Btf) -> bool {
    let Some(prog) = ebpf.program_mut(program) else {
        log::warn!("feature probe {program} missing from the object (build mismatch)");
        return false;
    };
    let prog: Result<&mut BtfTracePoint, _> = prog.try_into();
    let Ok(prog) = prog else {
        return false;
    };
    match prog.load("inet_sock_set_state", btf) {
        Ok(()) => {
            let _ = prog.unload();
            true
        }
        Err(e) => {
            log::debug!("feature probe {program}: not on this kernel: {e}");
            false
        }
    }
}

/// Whether the cgroup setsockopt feature probe `program` loads (then unloads it).
fn probe_sockopt(ebpf: &mut Ebpf, program: &str) -> bool {
    let Some(prog) = ebpf.program_mut(program) else {
        log::warn!("feature probe {program} missing from the object (build mismatch)");
        return false;
    };
    let prog: Result<&mut CgroupSockopt, _> = prog.try_into();
    let Ok(prog) = prog else {
        return false;
    };
    match prog.load() {
        Ok(()) => {
            let _ = prog.unload();
            true
        }
        Err(e) => {
            log::debug!("feature probe {program}: not on this kernel: {e}");
            false
        }
    }
}

/// A random number, for ids that must not show kernel addresses.
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        // No entropy source: still hide addresses behind the clock.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5bd1_e995, |d| d.as_nanos() as u64)
            .rotate_left(29)
    }
}

/// Attaches the setsockopt observer at the cgroup v2 root, alongside any
/// other programs there: it sees every process's options.
fn attach_sockopt(ebpf: &mut Ebpf) -> Result<PathBuf, KernelError> {
    let root = crate::sys::cgroup::cgroup2_mount()
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
