//! The cgroup path cache: cgroup v2 ids -> paths under the cgroup2 mount,
//! from walks of the hierarchy (bounded and rate-limited).

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Bounds on [`CgroupPaths`] rescans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanLimits {
    /// Misses within this long of the last rescan return `None` rather than
    /// rescan, so a flood of unknown ids cannot keep the walker busy.
    pub min_interval: Duration,
    /// Directories deeper than this below the mount are not visited. Pod
    /// containers sit at depth 4 to 5, 7 or so under a kind node's prefix.
    pub max_depth: usize,
    /// A rescan stops after this many directories; this also bounds the cache.
    pub max_dirs: usize,
}

impl Default for ScanLimits {
    /// One rescan a second at most, depth 16, 200,000 directories.
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            max_depth: 16,
            max_dirs: 200_000,
        }
    }
}

/// Maps cgroup v2 ids (directory inode numbers, what `bpf_get_current_cgroup_id`
/// returns on 64-bit kernels) to paths relative to the cgroup2 mount (`/` for
/// the root, `/kubepods.slice/...` below it). The cache is the result of the
/// last walk of the hierarchy, replaced wholesale by the next one. Cgroup ids
/// are not reused, so an entry never goes wrong, only stale.
#[derive(Debug)]
pub(crate) struct CgroupPaths {
    mount: PathBuf,
    limits: ScanLimits,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
    rescans: u64,
    truncated: bool,
}

impl CgroupPaths {
    /// For the cgroup2 hierarchy mounted at `mount` (see
    /// [`crate::sys::cgroup::cgroup2_mount`]), with the default limits. Nothing is
    /// read until the first [`resolve`](Self::resolve).
    pub(crate) fn new(mount: PathBuf) -> Self {
        Self::with_limits(mount, ScanLimits::default())
    }

    pub(crate) fn with_limits(mount: PathBuf, limits: ScanLimits) -> Self {
        Self {
            mount,
            limits,
            by_id: HashMap::new(),
            last_scan: None,
            rescans: 0,
            truncated: false,
        }
    }

    /// The path of cgroup `id` relative to the mount. A miss rescans the
    /// hierarchy unless the last rescan was less than `min_interval` ago, in
    /// which case it returns `None` and a later call may find it.
    pub(crate) fn resolve(&mut self, id: u64) -> Option<String> {
        self.resolve_at(id, Instant::now())
    }

    /// [`resolve`](Self::resolve) with the caller's clock (tests drive it).
    pub(crate) fn resolve_at(&mut self, id: u64, now: Instant) -> Option<String> {
        if let Some(path) = self.by_id.get(&id) {
            return Some(path.clone());
        }
        let recent = self
            .last_scan
            .is_some_and(|last| now.saturating_duration_since(last) < self.limits.min_interval);
        if recent {
            return None;
        }
        self.rescan(now);
        self.by_id.get(&id).cloned()
    }

    /// The cgroup2 mount this resolves ids under.
    pub(crate) fn mount(&self) -> &Path {
        &self.mount
    }

    /// How many times the hierarchy was walked (a metric).
    pub(crate) fn rescans(&self) -> u64 {
        self.rescans
    }

    /// Whether the last walk stopped at `max_dirs` before seeing everything.
    #[cfg(test)]
    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }

    fn rescan(&mut self, now: Instant) {
        let (by_id, truncated) = scan(&self.mount, self.limits);
        if truncated && !self.truncated {
            log::warn!(
                "cgroup walk of {} stopped at {} directories: connections in the rest will \
                 carry no pod; raise the directory limit if this node really has that many cgroups",
                self.mount.display(),
                self.limits.max_dirs
            );
        }
        self.by_id = by_id;
        self.truncated = truncated;
        self.last_scan = Some(now);
        self.rescans += 1;
    }
}

/// Walks the hierarchy under `mount`; cgroups that vanish mid-walk are skipped.
fn scan(mount: &Path, limits: ScanLimits) -> (HashMap<u64, String>, bool) {
    let mut by_id = HashMap::new();
    let root = match fs::metadata(mount) {
        Ok(meta) => meta,
        Err(e) => {
            log::debug!("cgroup mount {}: {e}", mount.display());
            return (by_id, false);
        }
    };
    if limits.max_dirs == 0 {
        return (by_id, true);
    }
    by_id.insert(root.ino(), "/".to_owned());
    let mut stack = vec![(mount.to_path_buf(), String::new(), 0_usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        if depth >= limits.max_depth {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // file_type does not follow symlinks; cgroupfs has none anyway.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if by_id.len() >= limits.max_dirs {
                return (by_id, true);
            }
            let child = format!("{rel}/{}", entry.file_name().to_string_lossy());
            by_id.insert(meta.ino(), child.clone());
            stack.push((entry.path(), child, depth + 1));
        }
    }
    (by_id, false)
}

/// The pod and container of cgroup `cgroup_id`, if it is a pod's.
#[cfg(test)]
pub(crate) fn resolve_pod(
    paths: &mut CgroupPaths,
    cgroup_id: u64,
) -> Option<super::kubelet::PodContainer> {
    super::kubelet::parse_cgroup_path(&paths.resolve(cgroup_id)?)
}

#[cfg(test)]
mod tests;
