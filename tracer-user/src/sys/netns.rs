//! Network namespaces of the host, and running code inside one. The kernel's
//! TCP iterator walks the sockets of the namespace its reader was created
//! in, so a host-wide snapshot visits each namespace in turn.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

/// "net:[4026531833]" -> 4026531833.
pub(crate) fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Every network namespace in use: one path per namespace inode, from the
/// processes and threads in /proc (a DaemonSet needs hostPID to see pods
/// here) and the named namespaces in /run/netns.
pub(crate) fn list() -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    let mut add = |path: PathBuf| match fs::read_link(&path) {
        Ok(link) => {
            if let Some(ino) = parse_ns_link(&link.to_string_lossy()) {
                out.entry(ino).or_insert(path);
            }
        }
        Err(e) if crate::sys::caps::is_denied(&e) => {
            crate::sys::caps::denied(
                crate::sys::caps::Denied::ProcLink,
                &format!("readlink {}: {e}", path.display()),
            );
        }
        Err(_) => {} // the process or thread is gone
    };
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            add(e.path().join("ns/net"));
            // /proc/<pid>/ns/net is the main thread's. Another thread can be
            // in a namespace of its own (unshare or setns on one thread, as
            // Go programs do on a locked OS thread), and may be the only
            // thing that keeps it: then only its task entry leads there.
            if let Ok(tasks) = fs::read_dir(e.path().join("task")) {
                for t in tasks.flatten().filter(|t| t.file_name() != name) {
                    add(t.path().join("ns/net"));
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(meta) = fs::metadata(&path) {
                out.entry(std::os::unix::fs::MetadataExt::ino(&meta))
                    .or_insert(path);
            }
        }
    }
    out
}

/// Moves the calling thread into the network namespace at `path`.
pub(crate) fn enter(path: &Path) -> std::io::Result<()> {
    let f = fs::File::open(path)?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_links() {
        for (link, want) in [
            ("net:[4026531833]", Some(4_026_531_833)),
            ("mnt:[4026531833]", None),
            ("net:[x]", None),
        ] {
            assert_eq!(parse_ns_link(link), want, "{link}");
        }
    }

    /// A namespace that only a non-main thread is in.
    #[test]
    fn a_namespace_only_a_thread_is_in_is_listed_when_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: unshare(CLONE_NEWNET) needs root");
            return;
        }
        let (ino, listed) = std::thread::spawn(|| {
            // SAFETY: affects only this thread, which ends right after.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let link = fs::read_link("/proc/thread-self/ns/net").expect("own netns");
            let ino = parse_ns_link(&link.to_string_lossy()).expect("parses");
            (ino, list().contains_key(&ino))
        })
        .join()
        .expect("thread");
        assert!(
            listed,
            "netns {ino}, which only a thread is in, is not listed"
        );
    }

    #[test]
    fn own_namespace_is_listed() {
        let own = fs::read_link("/proc/self/ns/net").expect("own netns");
        let ino = parse_ns_link(&own.to_string_lossy()).expect("parses");
        assert!(list().contains_key(&ino));
    }
}
