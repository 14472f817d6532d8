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

/// The fdinfo text of every fd of `pid` that is an `anon_inode:<kind>`
/// (`bpf-map`, `bpf-prog`).
fn bpf_fdinfos(pid: u32, kind: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    let want = format!("anon_inode:{kind}");
    for entry in fs::read_dir(&dir).with_context(|| dir.clone())? {
        let entry = entry?;
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if target != Path::new(&want) {
            continue;
        }
        out.push(
            fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ))
            .unwrap_or_default(),
        );
    }
    Ok(out)
}

/// The eBPF maps `pid` holds open.
pub fn maps_of(pid: u32) -> Result<Vec<MapInfo>> {
    Ok(bpf_fdinfos(pid, "bpf-map")?
        .iter()
        .filter_map(|i| parse_map_fdinfo(i))
        .collect())
}

/// A number field of an fdinfo text.
fn fdinfo_u64(info: &str, key: &str) -> Option<u64> {
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().parse::<u64>().ok())?
    })
}

fn parse_map_fdinfo(info: &str) -> Option<MapInfo> {
    let get = |key: &str| fdinfo_u64(info, key);
    Some(MapInfo {
        map_type: u32::try_from(get("map_type")?).ok()?,
        max_entries: get("max_entries").unwrap_or(0),
        memlock: get("memlock").unwrap_or(0),
    })
}

/// One eBPF program's run statistics, from its fdinfo (`run_time_ns` and
/// `run_cnt` count only while `kernel.bpf_stats_enabled` is 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgStats {
    pub id: u64,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The eBPF programs `pid` holds open, by program id (a program held
/// through several fds counts once).
pub fn progs_of(pid: u32) -> Result<Vec<ProgStats>> {
    let mut out: Vec<ProgStats> = bpf_fdinfos(pid, "bpf-prog")?
        .iter()
        .filter_map(|i| parse_prog_fdinfo(i))
        .collect();
    out.sort_by_key(|p| p.id);
    out.dedup_by_key(|p| p.id);
    Ok(out)
}

fn parse_prog_fdinfo(info: &str) -> Option<ProgStats> {
    Some(ProgStats {
        id: fdinfo_u64(info, "prog_id")?,
        run_time_ns: fdinfo_u64(info, "run_time_ns").unwrap_or(0),
        run_cnt: fdinfo_u64(info, "run_cnt").unwrap_or(0),
    })
}

/// Inter-processor interrupts so far, summed over CPUs, from
/// /proc/interrupts: (IRQ work, function call, rescheduling). The ring
/// buffer wakes its reader through IRQ work; on a VM each is an exit.
pub fn ipis() -> (u64, u64, u64) {
    parse_ipis(&fs::read_to_string("/proc/interrupts").unwrap_or_default())
}

fn parse_ipis(text: &str) -> (u64, u64, u64) {
    let row = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                let rest = l.trim_start().strip_prefix(name)?.strip_prefix(':')?;
                Some(
                    rest.split_whitespace()
                        .map_while(|w| w.parse::<u64>().ok())
                        .sum(),
                )
            })
            .unwrap_or(0)
    };
    (row("IWI"), row("CAL"), row("RES"))
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
    fn program_stats_and_ipis() {
        let info = "pos:\t0\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\tab\nmemlock:\t4096\n\
                    prog_id:\t77\nrun_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_prog_fdinfo(info),
            Some(ProgStats {
                id: 77,
                run_time_ns: 123_456,
                run_cnt: 789
            })
        );
        assert!(parse_prog_fdinfo("pos:\t0\n").is_none());
        let interrupts = "           CPU0       CPU1\n  0:         44          0   IO-APIC    2-edge      timer\n\
                          IWI:    2234477    2688792   IRQ work interrupts\n\
                          RES:     715339     591208   Rescheduling interrupts\n\
                          CAL:    1264031     996870   Function call interrupts\n";
        assert_eq!(
            parse_ipis(interrupts),
            (
                2_234_477 + 2_688_792,
                1_264_031 + 996_870,
                715_339 + 591_208
            )
        );
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(status_bytes(me, "VmRSS").unwrap() > 0);
        assert!(maps_of(me).unwrap().is_empty());
        assert!(progs_of(me).unwrap().is_empty());
    }
}
