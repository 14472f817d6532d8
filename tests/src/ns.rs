//! Network namespaces, the processes tests run in them, and cgroups.

use std::{
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{STEP_TIMEOUT, kill_child, lock, run_checked, unique_suffix, wait_child};

/// A named network namespace (`ip netns add ct-test-...`) with `lo` up,
/// deleted on drop.
pub struct NetNs {
    name: String,
    inode: u64,
}

impl NetNs {
    pub fn new() -> Self {
        let name = format!("ct-test-{}", unique_suffix());
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        // From here on, drop deletes the namespace whatever fails next.
        let mut ns = Self { name, inode: 0 };
        run_checked(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        let path = format!("/run/netns/{}", ns.name);
        ns.inode = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {path}: {e}"))
            .ino();
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Inode number of the namespace, what the tracer reports as `netns`.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` on a new thread that is inside the namespace: the sockets it
    /// creates (and the threads and processes it starts) live there.
    pub fn spawn_in<T, F>(&self, f: F) -> thread::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        thread::spawn(move || {
            // SAFETY: setns on a namespace fd we own; affects this thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            drop(ns);
            f()
        })
    }

    /// `program` run inside the namespace. `ip netns exec` execs it in place,
    /// so the spawned child's pid is the program's pid.
    /// Sets sysctl `key` to `value` in this namespace (the `net.*` ones
    /// are the namespace's own).
    pub fn set_sysctl(&self, key: &str, value: &str) {
        let assignment = format!("{key}={value}");
        crate::servers::run_in(self.name(), "sysctl", &["-q", "-w", &assignment]);
    }

    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// A `ct-peer` (or any) process whose stdout lines the test waits for,
/// killed by pid on drop if still running.
pub struct Peer {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    /// Spawns `cmd` with stdin, stdout and stderr piped; `label` names it in failures.
    pub fn spawn(label: &str, mut cmd: Command) -> Self {
        let (mut child, stdout, stderr_pipe) = crate::spawn_piped(&mut cmd, Stdio::piped(), label);
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                lock(&sink).push(line);
            }
        });
        Self {
            label: label.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn describe(&mut self) -> String {
        let status = self.child.try_wait().ok().flatten();
        format!(
            "{} (pid {}, exit {status:?}); stdout so far: {:?}; stderr: {:?}",
            self.label,
            self.child.id(),
            self.seen,
            lock(&self.stderr)
        )
    }

    /// Waits for the next stdout line, which must start with one of
    /// `words`, and returns all its words.
    pub fn expect_line_any(&mut self, words: &[&str]) -> Vec<String> {
        match self.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                let all: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
                assert!(
                    all.first().is_some_and(|w| words.contains(&w.as_str())),
                    "expected one of {words:?} from {}",
                    self.describe()
                );
                all
            }
            Err(e) => panic!(
                "no {words:?} line within {STEP_TIMEOUT:?} ({e:?}) from {}",
                self.describe()
            ),
        }
    }

    /// Waits for the next stdout line, which must start with the word
    /// `word`, and returns the words after it.
    pub fn expect_line(&mut self, word: &str) -> Vec<String> {
        match self.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                let mut words = line.split_whitespace().map(str::to_owned);
                let first = words.next();
                assert!(
                    first.as_deref() == Some(word),
                    "expected a `{word} ...` line from {}",
                    self.describe()
                );
                words.collect()
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no `{word}` line within {STEP_TIMEOUT:?} from {}",
                    self.describe()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "stdout closed before a `{word}` line from {}",
                    self.describe()
                )
            }
        }
    }

    /// Like [`Peer::expect_line`] for a line `word PORT ...`: returns PORT.
    pub fn expect_port(&mut self, word: &str) -> u16 {
        let words = self.expect_line(word);
        match words.first().map(|w| w.parse::<u16>()) {
            Some(Ok(port)) => port,
            _ => panic!(
                "`{word}` line without a port: {words:?} from {}",
                self.describe()
            ),
        }
    }

    /// Lets a peer that waits on stdin (`--pause-before-*`) go on.
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        if let Err(e) = stdin.write_all(b"go\n").and_then(|()| stdin.flush()) {
            panic!("cannot write the go line ({e}) to {}", self.describe());
        }
    }

    /// Waits (bounded) for the peer to exit and asserts it exited 0.
    pub fn wait_success(&mut self) {
        match wait_child(&mut self.child, STEP_TIMEOUT) {
            Some(status) if status.success() => {}
            Some(_) => {
                thread::sleep(Duration::from_millis(50));
                panic!("peer failed: {}", self.describe());
            }
            None => panic!(
                "peer still running after {STEP_TIMEOUT:?}: {}",
                self.describe()
            ),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stdin.take();
        kill_child(&mut self.child);
    }
}

/// The cgroup v2 mount point, read from /proc/mounts (hybrid hosts mount it
/// at /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Inode of the cgroup v2 directory that `pid` belongs to: what the tracer
/// must report as `cgroup_id` for a socket that process owns.
pub fn cgroup_inode_of(pid: u32) -> u64 {
    let mount = cgroup2_mount().expect("no cgroup2 mount in /proc/mounts");
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in /proc/{pid}/cgroup: {text}"));
    let dir = mount.join(rel.trim_start_matches('/'));
    fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
        .ino()
}

/// A cgroup v2 directory `conn-tracer-test-...` at the root of the cgroup2
/// mount. Drop moves what is left in it to the parent and removes it.
pub struct Cgroup {
    path: PathBuf,
    parent: PathBuf,
    inode: u64,
}

impl Cgroup {
    pub fn new() -> Self {
        let parent = cgroup2_mount().expect("no cgroup2 mount in /proc/mounts");
        let path = parent.join(format!("conn-tracer-test-{}", unique_suffix()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let inode = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .ino();
        Self {
            path,
            parent,
            inode,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's inode, which is the cgroup id `bpf_get_current_cgroup_id` returns.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Moves the process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move pid {pid} into {}: {e}", procs.display()));
    }

    /// Pids in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let parent_procs = self.parent.join("cgroup.procs");
        for pid in self.pids() {
            if let Err(e) = fs::write(&parent_procs, pid.to_string()) {
                eprintln!(
                    "warning: moving pid {pid} back to {}: {e}",
                    parent_procs.display()
                );
            }
        }
        // A process that just exited can keep the cgroup busy for a moment.
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("warning: rmdir {}: {e}", self.path.display());
                    return;
                }
            }
        }
    }
}
