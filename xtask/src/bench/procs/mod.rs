//! The processes a benchmark starts, and what /proc says about them: CPU
//! time, resident memory, the eBPF maps they hold. `tracer` starts and stops
//! the tracers under test, `loadgen` the load generator; both through
//! `Proc`, which ends its child by pid.

pub mod loadgen;
pub mod tracer;

use std::{
    fs,
    path::Path,
    process::{Child, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// A child process that is ended (by its pid, never by name) when dropped,
/// so that an error or a panic half-way leaves nothing running.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn new(name: &str, child: Child) -> Self {
        Self {
            name: name.to_string(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until stopped")
    }

    /// Whether it already exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends `signal`, waits up to `grace` for the exit, then SIGKILL.
    pub fn stop(&mut self, signal: i32, grace: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let pid = libc::pid_t::try_from(child.id()).context("pid")?;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: {} (pid {pid}) did not exit within {grace:?}; killing it",
            self.name
        );
        let _ = child.kill();
        Ok(Some(child.wait()?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(libc::SIGTERM, Duration::from_secs(5));
        }
    }
}

/// User + system CPU seconds a process has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    cpu_from_stat(&stat, clock_ticks()).with_context(|| format!("parsing /proc/{pid}/stat"))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line, in seconds.
/// The command name (field 2) may hold spaces and parentheses: fields are
/// counted after its last `)`.
pub fn cpu_from_stat(stat: &str, ticks_per_s: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_s)
}

/// A `/proc/PID/status` value in kB (`VmRSS`, `VmHWM`), as bytes.
pub fn status_bytes(pid: u32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    status_value(&status, key)
        .map(|kb| kb * 1024)
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

fn status_value(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

/// One eBPF map a process holds, from its fdinfo.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapInfo {
    pub map_type: u32,
    pub max_entries: u64,
    /// What the kernel charges for the map itself (`memlock`). For socket
    /// storage this is the map only: each socket's value is charged to
    /// that socket (see `ss -m`, `o`).
    pub memlock: u64,
}

impl MapInfo {
    pub fn type_name(&self) -> &'static str {
        match self.map_type {
            1 => "hash",
            2 => "array",
            4 => "perf_event_array",
            6 => "percpu_array",
            24 => "sk_storage",
            27 => "ringbuf",
            _ => "other",
        }
    }
}

/// The eBPF maps `pid` holds open.
pub fn maps_of(pid: u32) -> Result<Vec<MapInfo>> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&dir).with_context(|| dir.clone())? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if target != Path::new("anon_inode:bpf-map") {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if let Some(map) = parse_map_fdinfo(&info) {
            out.push(map);
        }
    }
    Ok(out)
}

fn parse_map_fdinfo(info: &str) -> Option<MapInfo> {
    let get = |key: &str| {
        info.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    Some(MapInfo {
        map_type: u32::try_from(get("map_type")?).ok()?,
        max_entries: get("max_entries").unwrap_or(0),
        memlock: get("memlock").unwrap_or(0),
    })
}

/// Processes other than `ours` that hold eBPF programs: other tracers on
/// this machine add their own cost to every configuration. (pid, comm,
/// programs held.)
pub fn other_bpf_holders(ours: &[u32]) -> Vec<(u32, String, usize)> {
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if ours.contains(&pid) || pid == std::process::id() {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let held = fds
            .flatten()
            .filter(|fd| {
                fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("anon_inode:bpf-prog"))
            })
            .count();
        if held > 0 {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push((pid, comm.trim().to_string(), held));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_from_a_stat_line_with_an_awkward_name() {
        let stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 100 1000000 200 18446744073709551615";
        assert_eq!(cpu_from_stat(stat, 100.0), Some(3.0));
        assert_eq!(cpu_from_stat("garbage", 100.0), None);
    }

    #[test]
    fn status_and_fdinfo_fields() {
        let status = "Name:\tconn-tracer\nVmHWM:\t   40960 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(status_value(status, "VmRSS"), Some(20480));
        assert_eq!(status_value(status, "VmHWM"), Some(40960));
        assert_eq!(status_value(status, "VmSwap"), None);
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2063\nmap_type:\t27\n\
                    key_size:\t0\nvalue_size:\t0\nmax_entries:\t4194304\nmap_flags:\t0x0\n\
                    map_extra:\t0x0\nmemlock:\t4202496\nmap_id:\t88\nfrozen:\t0\n";
        let m = parse_map_fdinfo(info).unwrap();
        assert_eq!(
            (m.map_type, m.max_entries, m.memlock),
            (27, 4_194_304, 4_202_496)
        );
        assert_eq!(m.type_name(), "ringbuf");
        assert!(parse_map_fdinfo("pos:\t0\n").is_none());
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(status_bytes(me, "VmRSS").unwrap() > 0);
        assert!(maps_of(me).unwrap().is_empty());
    }
}
