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
    programs::BtfTracePoint,
};
use tracer_common::{
    DEFAULT_RING_BYTES, EVENTS_MAP, KernelOffsets, LOST_MAP, OFFSETS_GLOBAL, kind,
};

use crate::offsets::{self, OffsetsError};

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

const PRIVILEGE_HINT: &str = "run as root, or with CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE \
                              (CAP_SYS_ADMIN on kernels before 5.8)";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
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
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            btf_path: PathBuf::from(offsets::VMLINUX_BTF),
            ring_bytes: DEFAULT_RING_BYTES,
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
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Names of the kernel's reset reasons, by value.
    pub reset_reasons: HashMap<u32, String>,
    /// The offsets handed to the programs.
    pub offsets: KernelOffsets,
}

impl Kernel {
    /// Resolves offsets from BTF, loads the programs and attaches them all.
    pub fn load(opts: &KernelOptions) -> Result<Self, KernelError> {
        if !valid_ring_size(opts.ring_bytes) {
            return Err(KernelError::RingSize(opts.ring_bytes));
        }
        let btf = offsets::load_btf(&opts.btf_path)?;
        let offsets = offsets::kernel_offsets(&btf)?;
        let reset_reasons = offsets::reset_reasons(&btf);
        drop(btf);
        let aya_btf = parse_aya_btf(&opts.btf_path)?;
        raise_memlock_limit();

        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global(OFFSETS_GLOBAL, &offsets, true)
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
        Ok(Self {
            ebpf,
            logger,
            reset_reasons,
            offsets,
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
