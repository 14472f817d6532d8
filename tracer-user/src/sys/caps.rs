//! The Linux capabilities the daemon works with, and the gaps a missing one
//! leaves: checked once at start-up from `/proc/self/status`, and reported
//! (once each, naming the capability) when the kernel actually refuses.
//! Why each is needed: deploy/README.md, "Privileges".

use std::sync::atomic::{AtomicBool, Ordering};

/// Capability numbers (include/uapi/linux/capability.h): the one table of
/// them, for `check` (can the programs load?) and `run` (what is lost?).
pub(crate) const CAP_DAC_READ_SEARCH: u32 = 2;
#[cfg(test)]
pub(crate) const CAP_NET_ADMIN: u32 = 12;
pub(crate) const CAP_SYS_PTRACE: u32 = 19;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
pub(crate) const CAP_SYS_RESOURCE: u32 = 24;
pub(crate) const CAP_PERFMON: u32 = 38;
pub(crate) const CAP_BPF: u32 = 39;

/// What is lost without `CAP_SYS_ADMIN` once the programs are loaded (by
/// `CAP_BPF` + `CAP_PERFMON` + `CAP_NET_ADMIN`).
pub(crate) const NO_SYS_ADMIN: &str = "CAP_SYS_ADMIN is missing: setns() into other network namespaces \
    is refused, so connections older than the tracer in other namespaces (pods) are not found \
    at start-up or by the resync, and /connections lists other namespaces' connections only \
    once they have an event; grant CAP_SYS_ADMIN";

/// What is lost without `CAP_SYS_PTRACE`.
pub(crate) const NO_SYS_PTRACE: &str = "CAP_SYS_PTRACE is missing: the links /proc/<pid>/ns/net and \
    /proc/<pid>/fd/* of processes of other users (or with capabilities the tracer lacks, which \
    includes most root daemons) cannot be read, so their network namespaces are skipped and \
    the owners of connections older than the tracer stay unknown; grant CAP_SYS_PTRACE";

/// What is lost without `CAP_DAC_READ_SEARCH`.
pub(crate) const NO_DAC_READ_SEARCH: &str = "CAP_DAC_READ_SEARCH is missing: the directories \
    /proc/<pid>/fd of processes of other users (mode 0500) cannot be listed, so the owners of \
    their connections older than the tracer stay unknown (\"owner\": \"unknown\"); grant \
    CAP_DAC_READ_SEARCH";

/// The capabilities the tracer runs without once its programs are loaded,
/// each with what is lost, in the order they are reported.
const GAPS: [(u32, &str); 3] = [
    (CAP_SYS_ADMIN, NO_SYS_ADMIN),
    (CAP_SYS_PTRACE, NO_SYS_PTRACE),
    (CAP_DAC_READ_SEARCH, NO_DAC_READ_SEARCH),
];

/// The effective capability mask of this process (`CapEff`), if readable.
pub(crate) fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

/// The effective capability set (`CapEff`) from `/proc/<pid>/status` text.
pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

pub(crate) fn has(mask: u64, cap: u32) -> bool {
    mask & (1u64 << cap) != 0
}

/// The warnings for a process with effective capabilities `mask` that got
/// its programs loaded: one line per missing capability, naming it.
pub(crate) fn gaps(mask: u64) -> Vec<&'static str> {
    GAPS.iter()
        .filter(|(cap, _)| !has(mask, *cap))
        .map(|(_, why)| *why)
        .collect()
}

/// Logs [`gaps`] of this process, once, at start-up.
pub(crate) fn warn_gaps() {
    match effective() {
        Some(mask) => {
            for gap in gaps(mask) {
                log::warn!("{gap}");
            }
        }
        None => log::debug!("cannot read CapEff from /proc/self/status"),
    }
}

/// A refusal the kernel gave at run time, for [`denied`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Denied {
    /// `setns()` into a network namespace (EPERM).
    Setns,
    /// Reading another process's `/proc/<pid>/ns/net` or `/proc/<pid>/fd/N`
    /// link (ptrace access check).
    ProcLink,
    /// Listing another user's `/proc/<pid>/fd` directory (file permissions).
    FdDir,
}

/// Reports a refusal: the first of each kind as a warning naming the
/// capability, later ones at debug level (the resync repeats every 30 s).
pub(crate) fn denied(what: Denied, detail: &str) {
    static SETNS: AtomicBool = AtomicBool::new(false);
    static PROC_LINK: AtomicBool = AtomicBool::new(false);
    static FD_DIR: AtomicBool = AtomicBool::new(false);
    let (seen, (cap, why)) = match what {
        Denied::Setns => (&SETNS, GAPS[0]),
        Denied::ProcLink => (&PROC_LINK, GAPS[1]),
        Denied::FdDir => (&FD_DIR, GAPS[2]),
    };
    if effective().is_some_and(|mask| has(mask, cap)) {
        // Not ours to fix: a security module (Yama, SELinux, AppArmor) or a
        // process in another user namespace.
        log::debug!("permission denied although capability {cap} is granted: {detail}");
    } else if seen.swap(true, Ordering::Relaxed) {
        log::debug!("permission denied: {detail}");
    } else {
        log::warn!("permission denied: {detail}. {why}");
    }
}

/// Whether an I/O error is a permission refusal (EPERM or EACCES).
pub(crate) fn is_denied(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_parses_and_gaps_name_the_capability() {
        let status = "Name:\tconn-tracer\nCapInh:\t0\nCapPrm:\t0000000000280000\n\
                      CapEff:\t0000000000280000\nCapBnd:\t0000000000280000\n";
        let mask = parse_cap_eff(status).expect("CapEff");
        assert!(has(mask, CAP_SYS_ADMIN) && has(mask, CAP_SYS_PTRACE));
        assert!(!has(mask, CAP_BPF));
        assert_eq!(gaps(mask), [NO_DAC_READ_SEARCH]);
        let daemonset = mask | (1 << CAP_DAC_READ_SEARCH);
        assert!(gaps(daemonset).is_empty(), "the DaemonSet's set has no gap");
        let bpf_only = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        let got = gaps(bpf_only);
        assert_eq!(got.len(), 3);
        assert!(got[0].contains("CAP_SYS_ADMIN"));
        assert!(got[1].contains("CAP_SYS_PTRACE"));
        assert!(got[2].contains("CAP_DAC_READ_SEARCH"));
        assert!(parse_cap_eff("Name:\tx\n").is_none());
    }

    #[test]
    fn permission_errors_are_recognised() {
        assert!(is_denied(&std::io::Error::from_raw_os_error(libc::EPERM)));
        assert!(is_denied(&std::io::Error::from_raw_os_error(libc::EACCES)));
        assert!(!is_denied(&std::io::Error::from_raw_os_error(libc::ENOENT)));
    }
}
