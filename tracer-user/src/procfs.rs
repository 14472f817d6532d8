//! Owners of sockets the kernel programs never saw open (opened before the
//! daemon started), found the way `ss -p` does: the socket inode in
//! `/proc/<pid>/fd` links, then that process's uid, name and cgroup.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
    time::{Duration, Instant},
};

use tracer_common::{COMM_LEN, Owner, owner_flags};

/// Bounds on one scan of /proc: a node with more open files than this is
/// only partly resolved (and says so in the log).
#[derive(Debug, Clone, Copy)]
pub struct ScanBudget {
    pub max_fds: usize,
    pub max_time: Duration,
}

impl Default for ScanBudget {
    fn default() -> Self {
        Self {
            max_fds: 2_000_000,
            max_time: Duration::from_secs(5),
        }
    }
}

/// `socket:[12345]` -> 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The real uid and gid from `/proc/<pid>/status` text (what
/// `bpf_get_current_uid_gid` reports).
pub fn uid_gid(status: &str) -> Option<(u32, u32)> {
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// Finds the process holding each socket inode in `wanted`. The first
/// process found wins (a socket shared after fork has several).
/// `cgroup_mount` turns `/proc/<pid>/cgroup` into the cgroup id (the
/// directory's inode), as the kernel programs report it.
pub fn socket_owners<S: std::hash::BuildHasher>(
    wanted: &HashSet<u64, S>,
    cgroup_mount: Option<&Path>,
    budget: ScanBudget,
) -> HashMap<u64, Owner> {
    let mut out = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    let started = Instant::now();
    let mut fds = 0usize;
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    'procs: for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let fd_dir = p.path().join("fd");
        let entries = match fs::read_dir(&fd_dir) {
            Ok(entries) => entries,
            Err(e) => {
                if crate::caps::is_denied(&e) {
                    crate::caps::denied(
                        crate::caps::Denied::FdDir,
                        &format!("reading {}: {e}", fd_dir.display()),
                    );
                }
                continue; // gone, or not ours to read
            }
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            fds += 1;
            if fds > budget.max_fds || started.elapsed() > budget.max_time {
                log::warn!(
                    "stopped looking for socket owners in /proc after {fds} descriptors and {:?}",
                    started.elapsed()
                );
                break 'procs;
            }
            let link = match fs::read_link(e.path()) {
                Ok(link) => link,
                Err(err) => {
                    if crate::caps::is_denied(&err) {
                        crate::caps::denied(
                            crate::caps::Denied::ProcLink,
                            &format!("readlink {}: {err}", e.path().display()),
                        );
                    }
                    continue;
                }
            };
            if let Some(ino) = socket_inode(&link.to_string_lossy())
                && wanted.contains(&ino)
                && !out.contains_key(&ino)
            {
                found.push(ino);
            }
        }
        if found.is_empty() {
            continue;
        }
        let Some(owner) = process_owner(pid, cgroup_mount) else {
            continue;
        };
        for ino in found {
            out.insert(ino, owner);
        }
        if out.len() == wanted.len() {
            break;
        }
    }
    out
}

/// What the kernel programs would have captured for `pid`, from /proc.
pub fn process_owner(pid: u32, cgroup_mount: Option<&Path>) -> Option<Owner> {
    let base = Path::new("/proc").join(pid.to_string());
    let (uid, gid) = uid_gid(&fs::read_to_string(base.join("status")).ok()?)?;
    let comm_text = fs::read_to_string(base.join("comm")).unwrap_or_default();
    let mut comm = [0u8; COMM_LEN];
    let bytes = comm_text.trim_end_matches('\n').as_bytes();
    let n = bytes.len().min(COMM_LEN - 1);
    comm[..n].copy_from_slice(&bytes[..n]);
    let cgroup_id = cgroup_mount
        .and_then(|mount| {
            let text = fs::read_to_string(base.join("cgroup")).ok()?;
            let path = crate::labels::cgroup_v2_path(&text)?;
            let meta = fs::metadata(mount.join(path.trim_start_matches('/'))).ok()?;
            Some(std::os::unix::fs::MetadataExt::ino(&meta))
        })
        .unwrap_or(0);
    Some(Owner {
        pid,
        tid: pid,
        uid,
        gid,
        cgroup_id,
        comm,
        // Known, but from /proc after the fact rather than at connect time.
        flags: owner_flags::KNOWN | owner_flags::FROM_PROC,
        pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn parses_fd_links_and_status() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        let status = "Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t50\t51\t50\t50\n";
        assert_eq!(uid_gid(status), Some((1000, 50)));
        assert_eq!(uid_gid("Name: x\\n"), None);
    }

    /// This test process's own listening socket is found, with its pid.
    #[test]
    fn finds_the_owner_of_our_own_socket() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let link = fs::read_link(format!("/proc/self/fd/{fd}")).expect("fd link");
        let ino = socket_inode(&link.to_string_lossy()).expect("a socket");
        let owners = socket_owners(&HashSet::from([ino]), None, ScanBudget::default());
        let owner = owners.get(&ino).expect("found");
        assert_eq!(owner.pid, std::process::id());
        assert_eq!(owner.flags & owner_flags::FROM_PROC, owner_flags::FROM_PROC);
        assert!(socket_owners(&HashSet::new(), None, ScanBudget::default()).is_empty());
    }
}
