//! The kernel's BPF objects as `bpftool` lists them: which programs, maps and
//! links a daemon created, and whether any of them outlive it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The programs conn-tracer loads (function names, as bpftool shows them).
pub const PROGRAMS: &[&str] = &[
    "inet_sock_set_state",
    "tcp_receive_reset",
    "tcp_send_reset",
    "inet_sk_error_report",
    "tcp_probe",
    "setsockopt",
    "dump_tcp",
];

/// The BPF file system, where pins would live.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Programs (id -> name), maps (id -> name) and links (id -> program id).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Objects {
    pub progs: BTreeMap<u64, String>,
    pub maps: BTreeMap<u64, String>,
    pub links: BTreeMap<u64, u64>,
}

fn bpftool(what: &str) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args([what, "show", "--json"])
        .output()
        .unwrap_or_else(|e| panic!("bpftool {what} show: {e}"));
    assert!(
        out.status.success(),
        "bpftool {what} show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    match serde_json::from_str(&text) {
        Ok(Value::Array(v)) => v,
        other => panic!("bpftool {what} show --json: unexpected {other:?}"),
    }
}

fn id(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("bpftool entry without {key}: {v}"))
}

impl Objects {
    /// Everything loaded in the kernel now.
    pub fn now() -> Self {
        Self::now_with_prog_maps().0
    }

    /// [`Objects::now`], and the maps each program uses.
    fn now_with_prog_maps() -> (Self, BTreeMap<u64, Vec<u64>>) {
        let mut o = Self::default();
        let mut prog_maps = BTreeMap::new();
        for p in bpftool("prog") {
            let maps = p["map_ids"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            prog_maps.insert(id(&p, "id"), maps);
            o.progs
                .insert(id(&p, "id"), p["name"].as_str().unwrap_or("").to_string());
        }
        for m in bpftool("map") {
            o.maps
                .insert(id(&m, "id"), m["name"].as_str().unwrap_or("").to_string());
        }
        for l in bpftool("link") {
            o.links
                .insert(id(&l, "id"), l["prog_id"].as_u64().unwrap_or(0));
        }
        (o, prog_maps)
    }

    /// conn-tracer's objects that appeared since `before`: its programs by
    /// name, the maps those programs use, and the links to them.
    pub fn conn_tracer_since(before: &Self) -> Self {
        let (now, prog_maps) = Self::now_with_prog_maps();
        let progs: BTreeMap<u64, String> = now
            .progs
            .into_iter()
            .filter(|(id, name)| {
                !before.progs.contains_key(id) && PROGRAMS.contains(&name.as_str())
            })
            .collect();
        let map_ids: BTreeSet<u64> = progs
            .keys()
            .flat_map(|p| prog_maps.get(p).cloned().unwrap_or_default())
            .collect();
        let maps = now
            .maps
            .into_iter()
            .filter(|(id, _)| map_ids.contains(id))
            .collect();
        let links = now
            .links
            .into_iter()
            .filter(|(_, prog)| progs.contains_key(prog))
            .collect();
        Self { progs, maps, links }
    }

    /// Those of `self` that are still loaded.
    #[must_use]
    pub fn still_loaded(&self) -> Self {
        let now = Self::now();
        Self {
            progs: keep(&self.progs, &now.progs),
            maps: keep(&self.maps, &now.maps),
            links: keep(&self.links, &now.links),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.progs.is_empty() && self.maps.is_empty() && self.links.is_empty()
    }

    /// Waits (at most `timeout`) until none of `self` is loaded any more and
    /// returns what is still loaded then (empty on success). The kernel frees
    /// programs and maps shortly after their last reference goes (RCU and a
    /// work queue), so "gone" is polled for, not expected at once.
    #[must_use]
    pub fn wait_gone(&self, timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.still_loaded();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn keep<V: Clone>(mine: &BTreeMap<u64, V>, now: &BTreeMap<u64, V>) -> BTreeMap<u64, V> {
    mine.iter()
        .filter(|(id, _)| now.contains_key(id))
        .map(|(id, v)| (*id, v.clone()))
        .collect()
}

/// Every path under the BPF file system (pins), bounded in depth and count.
pub fn pins() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    walk(Path::new(BPFFS), 0, &mut out);
    out
}

fn walk(dir: &Path, depth: usize, out: &mut BTreeSet<PathBuf>) {
    if depth > 8 || out.len() > 10_000 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        out.insert(path.clone());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, depth + 1, out);
        }
    }
}
