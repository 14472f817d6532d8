use std::{fs, os::unix::fs::MetadataExt, path::PathBuf};

use super::*;
use crate::owner::kubelet::{
    Qos::Guaranteed,
    Runtime::CriO,
    tests::{CID, UID, expected, uid_},
};

/// A directory tree under the temp dir, removed on drop.
struct TempTree(PathBuf);

impl TempTree {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let root = std::env::temp_dir().join(format!(
            "conn-tracer-podid-{tag}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&root).unwrap();
        Self(root)
    }

    /// Makes `rel` (and its parents); returns its inode number.
    fn mkdir(&self, rel: &str) -> u64 {
        let p = self.0.join(rel.trim_start_matches('/'));
        fs::create_dir_all(&p).unwrap();
        fs::metadata(&p).unwrap().ino()
    }

    fn ino(&self, rel: &str) -> u64 {
        fs::metadata(self.0.join(rel.trim_start_matches('/')))
            .unwrap()
            .ino()
    }

    fn paths(&self) -> CgroupPaths {
        CgroupPaths::new(self.0.clone())
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn resolves_ids_of_a_directory_tree() {
    let tree = TempTree::new("resolve");
    let pod = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uid_!()
    );
    let ctr = format!("{pod}/cri-containerd-{CID}.scope");
    let sshd = "/system.slice/sshd.service";
    let (ctr_id, sshd_id) = (tree.mkdir(&ctr), tree.mkdir(sshd));
    let pod_id = tree.ino(&pod);
    let file = tree.0.join("system.slice/cgroup.procs");
    fs::write(&file, "1\n").unwrap();
    let file_id = fs::metadata(&file).unwrap().ino();

    let mut paths = tree.paths();
    assert_eq!(
        paths.rescans(),
        0,
        "nothing is read before the first lookup"
    );
    assert_eq!(paths.resolve(ctr_id).as_deref(), Some(ctr.as_str()));
    assert_eq!(paths.resolve(pod_id).as_deref(), Some(pod.as_str()));
    assert_eq!(paths.resolve(sshd_id).as_deref(), Some(sshd));
    assert_eq!(paths.resolve(tree.ino("/")).as_deref(), Some("/"));
    assert_eq!(
        paths.resolve(tree.ino("/kubepods.slice")).as_deref(),
        Some("/kubepods.slice")
    );
    assert_eq!(paths.rescans(), 1, "one walk served every lookup");
    assert_eq!(paths.resolve(file_id), None, "files are not cgroups");
    assert!(!paths.truncated());
}

#[test]
fn unknown_ids_rescan_at_most_once_per_interval() {
    let tree = TempTree::new("ratelimit");
    let known = tree.mkdir("/system.slice");
    let mut paths = tree.paths();
    let t0 = Instant::now();
    assert_eq!(
        paths.resolve_at(known, t0).as_deref(),
        Some("/system.slice")
    );
    assert_eq!(paths.rescans(), 1);

    let late = tree.mkdir("/kubepods/besteffort");
    assert_eq!(
        paths.resolve_at(late, t0 + Duration::from_millis(100)),
        None
    );
    // A flood of ids nobody has: no walk until the interval is over.
    for bogus in 1_000_000_000..1_000_010_000 {
        assert_eq!(
            paths.resolve_at(bogus, t0 + Duration::from_millis(500)),
            None
        );
    }
    assert_eq!(paths.rescans(), 1);
    assert_eq!(
        paths
            .resolve_at(known, t0 + Duration::from_millis(600))
            .as_deref(),
        Some("/system.slice"),
        "hits need no walk"
    );

    assert_eq!(
        paths
            .resolve_at(late, t0 + Duration::from_secs(1))
            .as_deref(),
        Some("/kubepods/besteffort")
    );
    assert_eq!(paths.rescans(), 2);
    assert_eq!(
        paths.resolve_at(u64::MAX, t0 + Duration::from_millis(1500)),
        None
    );
    assert_eq!(paths.rescans(), 2);
    assert_eq!(
        paths.resolve_at(u64::MAX, t0 + Duration::from_secs(3)),
        None
    );
    assert_eq!(paths.rescans(), 3);
}

#[test]
fn rescan_replaces_the_cache() {
    let tree = TempTree::new("replace");
    let gone = tree.mkdir("/kubepods/pod-gone");
    let stays = tree.mkdir("/kubepods/stays");
    let mut paths = tree.paths();
    let t0 = Instant::now();
    assert_eq!(
        paths.resolve_at(gone, t0).as_deref(),
        Some("/kubepods/pod-gone")
    );
    fs::remove_dir(tree.0.join("kubepods/pod-gone")).unwrap();
    // Still cached: ids are never reused, so the entry is stale, not wrong.
    assert_eq!(
        paths.resolve_at(gone, t0).as_deref(),
        Some("/kubepods/pod-gone")
    );
    // A miss after the interval walks again and drops what is gone.
    assert_eq!(
        paths.resolve_at(u64::MAX, t0 + Duration::from_secs(2)),
        None
    );
    assert_eq!(paths.rescans(), 2);
    assert_eq!(
        paths
            .resolve_at(stays, t0 + Duration::from_secs(2))
            .as_deref(),
        Some("/kubepods/stays")
    );
    assert_eq!(paths.resolve_at(gone, t0 + Duration::from_secs(2)), None);
}

#[test]
fn walk_is_bounded_by_depth_and_directory_count() {
    let tree = TempTree::new("bounds");
    let deep: Vec<String> = (1..=18).map(|d| format!("d{d}")).collect();
    let rel = |depth: usize| format!("/{}", deep[..depth].join("/"));
    tree.mkdir(&rel(18));
    let mut paths = tree.paths();
    assert_eq!(paths.resolve(tree.ino(&rel(16))), Some(rel(16)));
    assert_eq!(
        paths.resolve_at(tree.ino(&rel(17)), Instant::now() + Duration::from_secs(5)),
        None
    );
    assert!(!paths.truncated());

    let limits = ScanLimits {
        max_dirs: 5,
        ..ScanLimits::default()
    };
    let mut small = CgroupPaths::with_limits(tree.0.clone(), limits);
    let found = (0..=18)
        .filter(|&d| {
            small
                .resolve_at(
                    tree.ino(&if d == 0 { "/".into() } else { rel(d) }),
                    Instant::now(),
                )
                .is_some()
        })
        .count();
    assert_eq!(found, 5, "root plus four directories");
    assert!(small.truncated());
    assert_eq!(small.rescans(), 1);
}

#[test]
fn missing_mount_resolves_nothing() {
    let mut paths = CgroupPaths::new(PathBuf::from("/nonexistent/conn-tracer/cgroup"));
    assert_eq!(paths.resolve(1), None);
    assert_eq!(paths.rescans(), 1);
}

#[test]
fn resolve_pod_reads_the_tree() {
    let tree = TempTree::new("pod");
    let pod = format!("/kubepods.slice/kubepods-pod{}.slice", uid_!());
    let ctr = tree.mkdir(&format!("{pod}/crio-{CID}.scope/container"));
    let conmon = tree.mkdir(&format!("{pod}/crio-conmon-{CID}.scope"));
    let sshd = tree.mkdir("/system.slice/sshd.service");
    let mut paths = tree.paths();
    assert_eq!(
        resolve_pod(&mut paths, ctr),
        Some(expected((UID, Some(CID), Some(CriO), Guaranteed)))
    );
    assert_eq!(
        resolve_pod(&mut paths, conmon),
        Some(expected((UID, None, Some(CriO), Guaranteed)))
    );
    assert_eq!(
        resolve_pod(&mut paths, tree.ino(&pod)),
        Some(expected((UID, None, None, Guaranteed)))
    );
    assert_eq!(resolve_pod(&mut paths, sshd), None);
    assert_eq!(paths.rescans(), 1);
}

/// Needs a cgroup2 mount (not root); skips with a reason where there is
/// none, except in CI.
#[test]
fn resolves_live_cgroup2_root_and_own_cgroup_when_mounted() {
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let Some(mount) = crate::sys::cgroup::cgroup2_mount_in(&mounts) else {
        assert!(!in_ci, "no cgroup2 mount in /proc/mounts");
        eprintln!("skipped: no cgroup2 mount in /proc/mounts");
        return;
    };
    let mut paths = CgroupPaths::new(mount.clone());
    let root = fs::metadata(&mount).unwrap().ino();
    assert_eq!(paths.resolve(root).as_deref(), Some("/"));

    // Our own cgroup, from "0::<path>", when it is under this mount (a
    // process in a cgroup namespace sees a path relative to its own root).
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return;
    };
    if let Ok(meta) = fs::metadata(mount.join(rel.trim_start_matches('/'))) {
        let want = if rel.is_empty() { "/" } else { rel };
        assert_eq!(paths.resolve(meta.ino()).as_deref(), Some(want));
    }
}
