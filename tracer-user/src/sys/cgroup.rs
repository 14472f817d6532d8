//! Where the cgroup v2 hierarchy is mounted.

use std::path::PathBuf;

/// The first cgroup2 mount point in `/proc/mounts`-formatted text. Hybrid
/// hosts mount it at /sys/fs/cgroup/unified, pure v2 hosts (most Kubernetes
/// nodes) at /sys/fs/cgroup: never assume either.
pub(crate) fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(path)))
    })
}

/// The cgroup2 mount of this host.
pub(crate) fn cgroup2_mount() -> std::io::Result<Option<PathBuf>> {
    Ok(cgroup2_mount_in(&std::fs::read_to_string("/proc/mounts")?))
}

/// What [`join_host_cgroup_namespace`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupNsJoin {
    /// This process already shares the target's cgroup namespace (or the
    /// join is turned off).
    AlreadyShared,
    /// It was in its own cgroup namespace (a container's) and joined the
    /// target's.
    Joined,
    /// It could not join; the reason, for the log.
    Failed(String),
}

/// Joins the cgroup namespace of `pid` (1: the host's init, with `hostPID`)
/// when this process has another, as containers do with cgroup v2. `pid` 0
/// does nothing.
///
/// `/proc/<pid>/cgroup` shows paths relative to the *reader's* cgroup
/// namespace root: from inside a container, a pod's cgroup reads as
/// `/../../kubepods.slice/...`, which does not resolve under the host's
/// cgroup mount, so every owner's cgroup id would need the (rate-limited)
/// walk of the whole hierarchy. In pid 1's namespace the paths are the
/// host's. Needs `CAP_SYS_ADMIN`. Call it before any thread starts: a
/// namespace change applies to the calling thread and the threads it
/// creates afterwards.
pub fn join_host_cgroup_namespace(pid: u32) -> CgroupNsJoin {
    if pid == 0 {
        return CgroupNsJoin::AlreadyShared;
    }
    let target = format!("/proc/{pid}/ns/cgroup");
    let own = match std::fs::read_link("/proc/self/ns/cgroup") {
        Ok(l) => l,
        Err(e) => return CgroupNsJoin::Failed(format!("cannot read /proc/self/ns/cgroup: {e}")),
    };
    let init = match std::fs::read_link(&target) {
        Ok(l) => l,
        Err(e) => {
            return CgroupNsJoin::Failed(format!(
                "cannot read {target}: {e} (run with the host's PID namespace and \
                 CAP_SYS_PTRACE, or set cgroupns_pid)"
            ));
        }
    };
    if own == init {
        return CgroupNsJoin::AlreadyShared;
    }
    let file = match std::fs::File::open(&target) {
        Ok(f) => f,
        Err(e) => return CgroupNsJoin::Failed(format!("cannot open {target}: {e}")),
    };
    // SAFETY: setns on a namespace file descriptor we own.
    let rc = unsafe {
        libc::setns(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::CLONE_NEWCGROUP,
        )
    };
    if rc == 0 {
        CgroupNsJoin::Joined
    } else {
        CgroupNsJoin::Failed(format!(
            "setns into the cgroup namespace of pid {pid}: {} (needs CAP_SYS_ADMIN)",
            std::io::Error::last_os_error()
        ))
    }
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_pure_v2_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            cgroup2_mount_in(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(cgroup2_mount_in(""), None);
        assert_eq!(cgroup2_mount_in("garbage\n\n  \n"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        let m = "none /mnt/with\\040space cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(m), Some(PathBuf::from("/mnt/with space")));
        assert_eq!(unescape_mount_path("a\\"), "a\\");
        assert_eq!(unescape_mount_path("a\\04"), "a\\04");
        assert_eq!(unescape_mount_path("\\777"), "\u{fffd}");
    }
}
