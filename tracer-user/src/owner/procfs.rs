//! Owners of sockets the kernel programs never saw open (opened before the
//! daemon started), found the way `ss -p` does: the socket inode in
//! `/proc/<pid>/fd` links, then that process's uid, name and cgroup.

use std::{
    collections::{HashMap, HashSet},
    fs,
    ops::RangeInclusive,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tracer_common::{COMM_LEN, Owner, owner_flags};

use crate::sys::caps;

/// Bounds on one scan of /proc: a node with more open files than this is
/// only partly resolved (and says so in the log).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanBudget {
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

/// `/proc` entries whose content could not be parsed, since start
/// (`conntracer_proc_errors_total`).
static MALFORMED: AtomicU64 = AtomicU64::new(0);

/// How many `/proc` entries could not be parsed so far.
pub(crate) fn malformed_total() -> u64 {
    MALFORMED.load(Ordering::Relaxed)
}

/// Counts a `/proc` file whose content does not parse (the entry is skipped)
/// and logs it: the first 10, then every 1000th.
pub(crate) fn malformed(file: &str, what: &str, content: &str) {
    let n = MALFORMED.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 10 || n.is_multiple_of(1000) {
        let shown: String = content.chars().take(120).collect();
        log::warn!(
            "skipping {file}: {what} (read {shown:?}); {n} unparsable /proc entries so far \
             (conntracer_proc_errors_total)"
        );
    }
}

/// `socket:[12345]` -> 12345 (decimal digits only, as the kernel writes it).
pub(crate) fn socket_inode(link: &str) -> Option<u64> {
    let digits = link.strip_prefix("socket:[")?.strip_suffix(']')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The real uid and gid from `/proc/<pid>/status` text (what
/// `bpf_get_current_uid_gid` reports).
pub(crate) fn uid_gid(status: &str) -> Option<(u32, u32)> {
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
/// directory's inode), as the kernel programs report it. Also says
/// whether the scan was complete (read every descriptor, within `budget`):
/// only then is a socket not found held by no process this daemon sees.
pub(crate) fn socket_owners<S: std::hash::BuildHasher>(
    wanted: &HashSet<u64, S>,
    cgroup_mount: Option<&Path>,
    budget: ScanBudget,
) -> (HashMap<u64, Owner>, bool) {
    let mut out = HashMap::new();
    if wanted.is_empty() {
        return (out, true);
    }
    let started = Instant::now();
    let mut fds = 0usize;
    let Ok(procs) = fs::read_dir("/proc") else {
        return (out, false);
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let fd_dir = p.path().join("fd");
        let entries = match fs::read_dir(&fd_dir) {
            Ok(entries) => entries,
            Err(e) => {
                if caps::is_denied(&e) {
                    caps::denied(
                        caps::Denied::FdDir,
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
                return (out, false);
            }
            let link = match fs::read_link(e.path()) {
                Ok(link) => link,
                Err(err) => {
                    if caps::is_denied(&err) {
                        caps::denied(
                            caps::Denied::ProcLink,
                            &format!("readlink {}: {err}", e.path().display()),
                        );
                    }
                    continue; // closed meanwhile, or not ours to read
                }
            };
            let link = link.to_string_lossy();
            match socket_inode(&link) {
                Some(ino) if wanted.contains(&ino) && !out.contains_key(&ino) => found.push(ino),
                None if link.starts_with("socket:") => {
                    malformed(
                        &e.path().display().to_string(),
                        "not a socket:[inode] link",
                        &link,
                    );
                }
                _ => {}
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
    (out, true)
}

/// What the kernel programs would have captured for `pid`, from /proc.
pub(crate) fn process_owner(pid: u32, cgroup_mount: Option<&Path>) -> Option<Owner> {
    let base = Path::new("/proc").join(pid.to_string());
    // A process that is gone is no error; one whose status does not parse is.
    let status = fs::read_to_string(base.join("status")).ok()?;
    let Some((uid, gid)) = uid_gid(&status) else {
        malformed(
            &base.join("status").display().to_string(),
            "no numeric Uid:/Gid: lines",
            &status,
        );
        return None;
    };
    let comm_text = fs::read_to_string(base.join("comm")).unwrap_or_default();
    let mut comm = [0u8; COMM_LEN];
    let bytes = comm_text.trim_end_matches('\n').as_bytes();
    let n = bytes.len().min(COMM_LEN - 1);
    comm[..n].copy_from_slice(&bytes[..n]);
    let cgroup_id = cgroup_mount
        .and_then(|mount| {
            let text = fs::read_to_string(base.join("cgroup")).ok()?;
            let Some(path) = cgroup_v2_path(&text) else {
                malformed(
                    &base.join("cgroup").display().to_string(),
                    "no `0::/path` line",
                    &text,
                );
                return None;
            };
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

/// What makes a process a sidecar beyond its socket's thread: the
/// process's own name (its thread-group leader's comm; Envoy opens sockets
/// from `wrk:worker_N` threads), its executable's file name, and its uid as
/// its user namespace sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Process {
    pub comm: String,
    pub exe: String,
    /// The uid inside the process's user namespace; `None` when its map
    /// does not cover the uid.
    pub uid_inside: Option<u32>,
}

/// [`Process`] facts of `pid` whose kernel uid is `uid`; `None` once it is
/// gone. (`/proc/<pid>/uid_map` read from the host's user namespace maps
/// the pod's uids to the host's.)
pub(crate) fn process(pid: u32, uid: u32) -> Option<Process> {
    let base = Path::new("/proc").join(pid.to_string());
    let comm = fs::read_to_string(base.join("comm")).ok()?;
    let exe = fs::read_link(base.join("exe"))
        .ok()
        .and_then(|p| Some(exe_name(p.file_name()?.to_str()?).to_owned()))
        .unwrap_or_default();
    let uid_inside = fs::read_to_string(base.join("uid_map"))
        .ok()
        .and_then(|map| uid_inside(&map, uid));
    Some(Process {
        comm: comm.trim_end_matches('\n').to_owned(),
        exe,
        uid_inside,
    })
}

/// An executable's name as `/proc/<pid>/exe` links it: a binary replaced
/// on disk while running is shown as `name (deleted)`.
fn exe_name(file: &str) -> &str {
    file.strip_suffix(" (deleted)").unwrap_or(file)
}

/// The uid inside a user namespace of `kuid` (a uid of the reader's
/// namespace), from `uid_map` text: lines `inside outside count`.
pub(crate) fn uid_inside(uid_map: &str, kuid: u32) -> Option<u32> {
    uid_map.lines().find_map(|line| {
        let mut f = line.split_whitespace().map(|n| n.parse::<u64>().ok());
        let (inside, outside, count) = (f.next()??, f.next()??, f.next()??);
        let k = u64::from(kuid);
        (outside..outside.saturating_add(count))
            .contains(&k)
            .then(|| u32::try_from(inside + (k - outside)).ok())?
    })
}

/// The cgroup v2 path in `/proc/<pid>/cgroup` text (the `0::` line).
pub(crate) fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
}

/// The local ephemeral port range (`net.ipv4.ip_local_port_range`).
pub(crate) fn ephemeral_ports() -> RangeInclusive<u16> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or(32768..=60999)
}

pub(crate) fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi).then_some(lo..=hi)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn uid_maps_translate_host_uids_into_the_namespace() {
        let init = "         0          0 4294967295\n";
        assert_eq!(uid_inside(init, 1337), Some(1337));
        let pod = "         0    3801088      65536\n";
        assert_eq!(uid_inside(pod, 3_801_088), Some(0));
        assert_eq!(uid_inside(pod, 3_801_088 + 65_535), Some(65_535));
        assert_eq!(uid_inside(pod, 3_801_088 + 65_536), None, "past the range");
        assert_eq!(uid_inside(pod, 1337), None, "not mapped");
        let split = "0 100000 1000\n1337 5000 1\n";
        assert_eq!(uid_inside(split, 5000), Some(1337));
        assert_eq!(uid_inside("garbage\n", 0), None);
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let me = process(std::process::id(), 0).expect("this process");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(me.exe, exe.file_name().unwrap().to_str().unwrap());
        assert!(!me.comm.is_empty() && me.comm.len() <= 15, "{me:?}");
        assert_eq!(exe_name("envoy (deleted)"), "envoy");
        assert!(process(u32::MAX, 0).is_none());
    }

    /// The process's name is its leader's, whatever thread asks: a worker
    /// thread named like Envoy's (`wrk:worker_0`) does not rename it.
    #[test]
    fn a_worker_threads_name_is_not_the_process_name() {
        let leader = process(std::process::id(), 0).expect("this process").comm;
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("wrk:worker_0".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let own = fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
                let facts = process(std::process::id(), 0).expect("this process");
                tx.send((own, facts.comm)).unwrap();
            })
            .unwrap();
        let (thread_comm, process_comm) = rx.recv().unwrap();
        worker.join().unwrap();
        assert_eq!(thread_comm.trim_end(), "wrk:worker_0");
        assert_eq!(process_comm, leader);
        assert_ne!(process_comm, "wrk:worker_0");
    }

    #[test]
    fn parses_fd_links_and_status() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        let status = "Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t50\t51\t50\t50\n";
        assert_eq!(uid_gid(status), Some((1000, 50)));
        assert_eq!(uid_gid("Name: x\\n"), None);
    }

    #[test]
    fn cgroup_v2_line_of_proc_pid_cgroup() {
        let hybrid =
            "12:pids:/user.slice\n1:name=systemd:/init.scope\n0::/kubepods.slice/x.scope\n";
        assert_eq!(cgroup_v2_path(hybrid), Some("/kubepods.slice/x.scope"));
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(cgroup_v2_path("1:cpu:/a\n"), None);
        assert_eq!(cgroup_v2_path("0::garbage"), None);
    }

    #[test]
    fn port_range_parses() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("9 1"), None);
        assert_eq!(parse_port_range("x"), None);
    }

    /// This test process's own listening socket is found, with its pid.
    #[test]
    fn finds_the_owner_of_our_own_socket() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let link = fs::read_link(format!("/proc/self/fd/{fd}")).expect("fd link");
        let ino = socket_inode(&link.to_string_lossy()).expect("a socket");
        let (owners, complete) = socket_owners(&HashSet::from([ino]), None, ScanBudget::default());
        assert!(complete);
        let owner = owners.get(&ino).expect("found");
        assert_eq!(owner.pid, std::process::id());
        assert_eq!(owner.flags & owner_flags::FROM_PROC, owner_flags::FROM_PROC);
        assert!(
            socket_owners(&HashSet::new(), None, ScanBudget::default())
                .0
                .is_empty()
        );
    }
}

/// Property tests of the /proc parsers (`cargo xtask fuzz procfs` runs them
/// long): fd links, `status`, `cgroup`, `CapEff` and the port range, as the
/// kernel writes them, mutated, and arbitrary.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// A `status` file as the kernel writes it, with the real, effective,
    /// saved and filesystem ids.
    fn status_text(name: &str, uids: [u32; 4], gids: [u32; 4]) -> String {
        let join = |v: [u32; 4]| v.map(|x| x.to_string()).join("\t");
        format!(
            "Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\nPid:\t42\n\
             PPid:\t1\nUid:\t{}\nGid:\t{}\nFDSize:\t64\nCapEff:\t000001ffffffffff\n",
            join(uids),
            join(gids)
        )
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(512))]

        #[test]
        fn fd_links_parse_exactly(ino in any::<u64>()) {
            prop_assert_eq!(socket_inode(&format!("socket:[{ino}]")), Some(ino));
            prop_assert_eq!(socket_inode(&format!("pipe:[{ino}]")), None);
            prop_assert_eq!(socket_inode(&format!("anon_inode:[{ino}]")), None);
        }

        /// Arbitrary and mutated links: an inode only from `socket:[digits]`.
        #[test]
        fn mutated_fd_links_never_panic(
            ino in any::<u64>(),
            at in any::<prop::sample::Index>(),
            c in prop_oneof![Just('['), Just(']'), Just('+'), Just('-'), Just(' '), Just('9'), any::<char>()],
            op in 0u8..3,
            other in any::<String>(),
        ) {
            let mut chars: Vec<char> = format!("socket:[{ino}]").chars().collect();
            let i = at.index(chars.len());
            match op {
                0 => { chars.remove(i); }
                1 => chars[i] = c,
                _ => chars.insert(i, c),
            }
            let link: String = chars.into_iter().collect();
            for l in [link.as_str(), other.as_str()] {
                if let Some(n) = socket_inode(l) {
                    let digits = &l["socket:[".len()..l.len() - 1];
                    prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{l:?}");
                    prop_assert_eq!(digits.parse::<u64>().ok(), Some(n));
                }
            }
        }

        #[test]
        fn status_gives_the_real_ids(
            uids in prop::array::uniform4(any::<u32>()),
            gids in prop::array::uniform4(any::<u32>()),
            name in "[ -~]{0,15}",
        ) {
            let text = status_text(&name, uids, gids);
            prop_assert_eq!(uid_gid(&text), Some((uids[0], gids[0])));
            prop_assert_eq!(caps::parse_cap_eff(&text), Some(0x1ff_ffff_ffff));
        }

        /// Truncated or edited status text, and arbitrary text: ids or
        /// `None`, never a panic.
        #[test]
        fn mutated_status_never_panics(
            uids in prop::array::uniform4(any::<u32>()),
            cut in any::<prop::sample::Index>(),
            junk in "[ -~\t\n]{0,20}",
            other in any::<String>(),
        ) {
            let text = status_text("x", uids, uids);
            let mut at = cut.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let edited = format!("{}{junk}{}", &text[..at], &text[at..]);
            for t in [&text[..at], edited.as_str(), other.as_str()] {
                let _ = uid_gid(t);
                let _ = caps::parse_cap_eff(t);
            }
        }

        /// `/proc/<pid>/cgroup` of a hybrid or v2 host, lines in any order:
        /// the v2 path is found.
        #[test]
        fn cgroup_files_give_the_v2_path(
            path in "(/[a-zA-Z0-9_.:@-]{1,20}){0,6}",
            v1 in prop::collection::vec(("[0-9]{1,2}", "[a-z_,=]{0,20}", "(/[a-z0-9.-]{1,10}){0,3}"), 0..12),
            at in any::<prop::sample::Index>(),
        ) {
            let path = if path.is_empty() { "/".to_string() } else { path };
            let mut lines: Vec<String> = v1
                .iter()
                .filter(|(id, _, _)| id != "0")
                .map(|(id, ctl, p)| format!("{id}:{ctl}:{p}"))
                .collect();
            let i = at.index(lines.len() + 1);
            lines.insert(i, format!("0::{path}"));
            let text = lines.join("\n") + "\n";
            prop_assert_eq!(cgroup_v2_path(&text), Some(path.as_str()));
        }

        /// Any text: a path starting with `/` on one line, or `None`.
        #[test]
        fn arbitrary_cgroup_files_never_panic(text in any::<String>(), soup in "([0-9]:{0,2}[a-z/ ]{0,6}\n?){0,8}") {
            for t in [text.as_str(), soup.as_str()] {
                if let Some(p) = cgroup_v2_path(t) {
                    prop_assert!(p.starts_with('/') && !p.contains('\n'), "{p:?}");
                }
            }
        }

        #[test]
        fn port_ranges_never_panic(lo in any::<u16>(), hi in any::<u16>(), text in any::<String>()) {
            let parsed = parse_port_range(&format!("{lo}\t{hi}\n"));
            prop_assert_eq!(parsed, (lo <= hi).then_some(lo..=hi));
            if let Some(r) = parse_port_range(&text) {
                prop_assert!(r.start() <= r.end());
            }
        }
    }

    #[test]
    fn malformed_entries_are_counted() {
        let before = malformed_total();
        malformed("/proc/1/status", "test", "garbage");
        assert!(malformed_total() > before);
    }
}
