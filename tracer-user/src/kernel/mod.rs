//! Stage 2, kernel: the only user of aya. Takes the kernel's BTF and
//! gives attached programs and their streams: [`Kernel::load`] reads the
//! offsets ([`offsets`]) and the kernel's shape ([`shape`]) from BTF, loads
//! the programs built for it and attaches them; the event ring ([`ring`],
//! one reader for every subcommand) and [`Kernel::snapshot`] (the TCP
//! iterator over every network namespace) give decoded events.
//!
//! Hooks (all work on a locked-down kernel without kprobes or fentry):
//! BTF tracepoints `inet_sock_set_state`, `tcp_receive_reset`,
//! `tcp_send_reset` and `inet_sk_error_report`. Programs stay attached for as
//! long as [`Kernel`] lives; dropping it detaches everything.

pub(crate) mod offsets;
pub(crate) mod ring;
pub(crate) mod shape;
mod snapshot;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, MapType, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSockopt, Iter, Program, TracePoint},
};
use tracer_common::{
    CONFIG_GLOBAL, DEFAULT_RING_BYTES, DEFAULT_STATE_HASH_ENTRIES, EVENTS_MAP, KernelOffsets,
    LISTENERS_MAP, LOST_MAP, OFFSETS_GLOBAL, STATE_HASH_MAP, TracerConfig, kind, state_store,
};

use self::{
    offsets::OffsetsError,
    ring::{EventRing, KernelLog},
    shape::{DISARMED_ENV, KernelShape, OLD_HELPERS_ENV},
};
use crate::sys::{self, VMLINUX_BTF};

/// The TCP socket iterator.
pub(crate) const ITER_PROGRAM: &str = "dump_tcp";

/// The setsockopt observer (cgroup program).
pub(crate) const SOCKOPT_PROGRAM: &str = "setsockopt";

/// The getsockopt(SO_ORIGINAL_DST) observer (cgroup program): which thread
/// took a captured connection.
const GETSOCKOPT_PROGRAM: &str = "getsockopt";

/// The accept programs, named as their syscall tracepoints (the fallback
/// of [`GETSOCKOPT_PROGRAM`]).
pub(crate) const ACCEPT_PROGRAMS: [&str; 2] = ["sys_exit_accept4", "sys_exit_accept"];

/// How the thread that took each connection on a capture port is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptWatch {
    /// The proxy's getsockopt(SO_ORIGINAL_DST) on the accepted socket, seen
    /// by a cgroup program at the cgroup v2 root.
    OriginalDst,
    /// The accept syscall tracepoints: how many of [`ACCEPT_PROGRAMS`]
    /// attached.
    Syscalls(usize),
}

impl AcceptWatch {
    /// Programs it attached.
    fn programs(self) -> usize {
        match self {
            Self::OriginalDst => 1,
            Self::Syscalls(n) => n,
        }
    }
}

/// The kernel programs, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Feature probes in the object (loaded, never attached, then unloaded).
const PROBE_SK_STORAGE: &str = "probe_sk_storage";
const PROBE_SOCKET_COOKIE: &str = "probe_socket_cookie";
const PROBE_SOCKOPT_TASK: &str = "probe_sockopt_task";

const PRIVILEGE_HINT: &str = "run as root, or grant CAP_SYS_ADMIN (it covers CAP_BPF and \
                              CAP_PERFMON, which load the programs, and the tracer needs it anyway \
                              to enter network namespaces), CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH \
                              (see deploy/README.md, \"Privileges\"); on kernels 5.9 and 5.10 also \
                              CAP_SYS_RESOURCE";

#[derive(Debug, thiserror::Error)]
pub(crate) enum KernelError {
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
    #[error("skip_programs: {0}")]
    Skip(String),
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
    /// The mesh's (outbound, inbound) capture ports: accepts on them are
    /// reported with the accepting thread.
    pub capture_ports: (u16, u16),
    /// 0: every record wakes the reader (it reads as events happen: trace,
    /// selftest). Otherwise the reader drains the ring on a timer and is
    /// woken only when this many bytes wait unread (the daemon).
    pub wake_bytes: u32,
    /// Optional programs not to attach (by program name).
    pub skip_programs: Vec<String>,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            btf_path: PathBuf::from(VMLINUX_BTF),
            ring_bytes: DEFAULT_RING_BYTES,
            verbose: false,
            sockopts: true,
            capture_ports: (15001, 15006),
            wake_bytes: 0,
            skip_programs: Vec::new(),
        }
    }
}

/// The loaded and attached kernel side.
pub(crate) struct Kernel {
    ebpf: Ebpf,
    /// How accepting threads are known.
    pub accept: AcceptWatch,
    /// Where the setsockopt program is attached (the cgroup v2 root).
    pub sockopt_cgroup: Option<PathBuf>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Names of the kernel's reset reasons, by value.
    pub reset_reasons: HashMap<u32, String>,
    /// The kernel's shape the programs were built for.
    pub shape: KernelShape,
    /// Undecodable TCP iterator records not yet counted in the metrics.
    decode_errors: u64,
}

impl Kernel {
    /// Resolves offsets and the kernel's shape from BTF, probes which
    /// helpers tracing programs may call, loads the programs built for that
    /// shape and attaches them all.
    pub(crate) fn load(opts: &KernelOptions) -> Result<Self, KernelError> {
        if !sys::valid_ring_size(opts.ring_bytes) {
            return Err(KernelError::RingSize(opts.ring_bytes));
        }
        shape::check_skippable(&opts.skip_programs).map_err(KernelError::Skip)?;
        let btf = offsets::load_btf(&opts.btf_path)?;
        let in_file = |error| KernelError::BtfContent {
            path: opts.btf_path.display().to_string(),
            error,
        };
        let mut offsets = offsets::kernel_offsets(&btf).map_err(in_file)?;
        if shape::switch_on(DISARMED_ENV) {
            log::warn!(
                "{DISARMED_ENV}=1: the kernel programs are attached but return at once: \
                 nothing is traced (a benchmark's floor)"
            );
            offsets.ready = 0;
        }
        let mut shape = KernelShape::from_btf(&btf, &opts.skip_programs).map_err(in_file)?;
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
            &shape.config(opts.verbose, id_secret, opts.capture_ports, opts.wake_bytes),
        )?;
        if shape::switch_on(OLD_HELPERS_ENV) {
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
                &shape.config(opts.verbose, id_secret, opts.capture_ports, opts.wake_bytes),
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
            let (prog, err) =
                program_of::<BtfTracePoint>(&mut ebpf, program, tracepoint, PRIVILEGE_HINT)?;
            prog.load(tracepoint, &aya_btf).map_err(err)?;
            prog.attach().map_err(err)?;
            log::debug!("attached {program} to tp_btf/{tracepoint}");
        }
        let sockopt_cgroup = if opts.sockopts {
            Some(attach_sockopt(&mut ebpf, SOCKOPT_PROGRAM)?)
        } else {
            None
        };
        let accept = watch_accepts(&mut ebpf, opts.sockopts && shape.sockopt_task);
        let (prog, err) = program_of::<Iter>(&mut ebpf, ITER_PROGRAM, "iter/tcp", PRIVILEGE_HINT)?;
        prog.load("tcp", &aya_btf).map_err(err)?;
        Ok(Self {
            ebpf,
            accept,
            sockopt_cgroup,
            logger,
            reset_reasons,
            shape,
            decode_errors: 0,
        })
    }

    /// Programs loaded: the BTF tracepoints this kernel has, the
    /// setsockopt observer (unless disabled), the accept watch and the TCP
    /// iterator.
    pub(crate) fn program_count(&self) -> usize {
        self.shape.hooks.len()
            + usize::from(self.sockopt_cgroup.is_some())
            + self.accept.programs()
            + 1
    }

    /// The event ring buffer; can be taken once.
    pub(crate) fn take_events(&mut self) -> Result<EventRing, KernelError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or(KernelError::MissingMap(EVENTS_MAP))?;
        RingBuf::try_from(map)
            .map(EventRing::new)
            .map_err(|source| KernelError::Map {
                name: EVENTS_MAP,
                source: Box::new(source),
            })
    }

    /// The kernel log stream (aya-log), registered with tokio; can be taken
    /// once (later it is empty).
    pub(crate) fn take_log(&mut self) -> std::io::Result<KernelLog> {
        KernelLog::new(self.logger.take())
    }

    /// Events the kernel could not put in the ring buffer, per kind (index =
    /// kind number), summed over CPUs.
    pub(crate) fn lost_events(&self) -> Result<Vec<u64>, KernelError> {
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

    /// Total of [`Self::lost_events`].
    pub(crate) fn lost_total(&self) -> Result<u64, KernelError> {
        Ok(self.lost_events()?.iter().sum())
    }

    /// Name of a reset reason value, or the number when BTF has no name;
    /// empty when the kernel gave none.
    pub(crate) fn reset_reason_name(&self, reason: u32) -> String {
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
    probe_with(ebpf, program, |prog: &mut BtfTracePoint| {
        prog.load("inet_sock_set_state", btf)?;
        let _ = prog.unload();
        Ok(())
    })
}

/// Whether the cgroup setsockopt feature probe `program` loads (then unloads it).
fn probe_sockopt(ebpf: &mut Ebpf, program: &str) -> bool {
    probe_with(ebpf, program, |prog: &mut CgroupSockopt| {
        prog.load()?;
        let _ = prog.unload();
        Ok(())
    })
}

/// Whether `load` succeeds on feature probe `program` as its kind `T`.
fn probe_with<'a, T>(
    ebpf: &'a mut Ebpf,
    program: &str,
    load: impl FnOnce(&mut T) -> Result<(), aya::programs::ProgramError>,
) -> bool
where
    T: 'a,
    &'a mut T: TryFrom<&'a mut Program>,
{
    let Some(prog) = ebpf.program_mut(program) else {
        log::warn!("feature probe {program} missing from the object (build mismatch)");
        return false;
    };
    let prog: Result<&mut T, _> = prog.try_into();
    let Ok(prog) = prog else {
        return false;
    };
    match load(prog) {
        Ok(()) => true,
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

/// The getsockopt(SO_ORIGINAL_DST) observer where cgroup programs may ask
/// for the calling task (5.11+) and cgroup programs are allowed
/// (`cgroup_programs`), else (or if it cannot attach) the accept syscall
/// tracepoints, which put every system call on the node on the traced slow
/// path while attached.
fn watch_accepts(ebpf: &mut Ebpf, cgroup_programs: bool) -> AcceptWatch {
    if cgroup_programs {
        match attach_sockopt(ebpf, GETSOCKOPT_PROGRAM) {
            Ok(_) => return AcceptWatch::OriginalDst,
            Err(e) => log::warn!("{e}: watching accepts with the syscall tracepoints instead"),
        }
    }
    AcceptWatch::Syscalls(attach_accept(ebpf))
}

/// The accept programs on `syscalls:sys_exit_accept4` and `sys_exit_accept`
/// (which thread accepted a connection on a capture port); returns how many
/// attached. Optional: syscall tracepoints are found through tracefs, which
/// a container may not have mounted; without them a sidecar's two sockets
/// are paired by order, and such links are marked inferred.
fn attach_accept(ebpf: &mut Ebpf) -> usize {
    let mut attached = 0;
    for program in ACCEPT_PROGRAMS {
        let res = program_of::<TracePoint>(ebpf, program, program, PRIVILEGE_HINT).and_then(
            |(prog, err)| {
                prog.load().map_err(err)?;
                prog.attach("syscalls", program).map_err(err)?;
                Ok(())
            },
        );
        match res {
            Ok(()) => {
                attached += 1;
                log::debug!("attached {program} to tracepoint/syscalls/{program}");
            }
            Err(e) => log::warn!(
                "{e}: which sidecar thread accepted a connection is not known (is tracefs \
                 mounted?); its chain links are inferred where several fit"
            ),
        }
    }
    attached
}

/// Program `program` of the object as its kind `T`, and what its failures
/// (loading it where `tracepoint` says, attaching it) are reported as.
pub(super) fn program_of<'a, T>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
    tracepoint: &'static str,
    hint: &'static str,
) -> Result<
    (
        &'a mut T,
        impl Fn(aya::programs::ProgramError) -> KernelError + Copy,
    ),
    KernelError,
>
where
    &'a mut T: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    let err = move |source| KernelError::Program {
        program,
        tracepoint,
        source: Box::new(source),
        hint,
    };
    let prog = ebpf
        .program_mut(program)
        .ok_or(KernelError::MissingMap(program))?
        .try_into()
        .map_err(err)?;
    Ok((prog, err))
}

/// Attaches a sockopt observer (`setsockopt` or `getsockopt`, named as its
/// hook) at the cgroup v2 root, alongside any other programs there: it sees
/// every process's calls.
fn attach_sockopt(ebpf: &mut Ebpf, program: &'static str) -> Result<PathBuf, KernelError> {
    let root = sys::cgroup::cgroup2_mount()
        .ok()
        .flatten()
        .ok_or(KernelError::NoCgroup2)?;
    let dir = std::fs::File::open(&root).map_err(|source| KernelError::Cgroup {
        path: root.display().to_string(),
        source,
    })?;
    let hint = "loading a cgroup sockopt program needs CAP_NET_ADMIN (or CAP_SYS_ADMIN) \
                besides CAP_BPF; or run with --no-sockopts";
    let section = if program == GETSOCKOPT_PROGRAM {
        "cgroup/getsockopt"
    } else {
        "cgroup/setsockopt"
    };
    let (prog, err) = program_of::<CgroupSockopt>(ebpf, program, section, hint)?;
    prog.load().map_err(err)?;
    // On 5.7+ aya attaches with a bpf_link, which always coexists with other
    // programs on the cgroup and refuses attach flags: `Single` means "no
    // flags" there. (Older kernels are below our ring buffer floor anyway.)
    prog.attach(&dir, CgroupAttachMode::Single).map_err(err)?;
    log::debug!("attached {program} to {section} at {}", root.display());
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

/// Whether this kernel has the map types the programs need: (name, the
/// kernel that brought it, supported or why the probe failed).
pub(crate) fn map_support() -> [(&'static str, &'static str, Result<bool, String>); 2] {
    [
        (MapType::RingBuf, "ring buffer", "Linux 5.8+"),
        (
            MapType::SkStorage,
            "socket storage",
            "Linux 5.2+ (BPF_F_CLONE: 5.4+)",
        ),
    ]
    .map(|(map, name, need)| {
        (
            name,
            need,
            aya::sys::is_map_supported(map).map_err(|e| e.to_string()),
        )
    })
}
