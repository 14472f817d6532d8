//! The tracer process: `conn-tracer trace --json`, its events collected.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    STEP_TIMEOUT, TRACER_READY_LINE, TRACER_READY_TIMEOUT, conn_tracer_bin, in_netns, kill_child,
    lock, wait_child,
};

#[derive(Default)]
struct TraceLog {
    events: Vec<Value>,
    unparsed: Vec<String>,
    stderr: Vec<String>,
    ready: bool,
    stderr_closed: bool,
}

struct Shared {
    log: Mutex<TraceLog>,
    changed: Condvar,
}

/// A running `conn-tracer trace --json` whose stdout is collected as JSON
/// events. Drop stops it (SIGTERM, then SIGKILL) without asserting anything.
pub struct Tracer {
    child: Child,
    shared: Arc<Shared>,
}

impl Tracer {
    /// Starts the tracer and waits until it says its programs are attached.
    pub fn start() -> Self {
        let bin = conn_tracer_bin();
        let mut child = Command::new(&bin)
            .args(["trace", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let shared = Arc::new(Shared {
            log: Mutex::new(TraceLog::default()),
            changed: Condvar::new(),
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&shared);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut log = lock(&sink.log);
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => log.events.push(v),
                    _ => log.unparsed.push(line),
                }
                drop(log);
                sink.changed.notify_all();
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&shared);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = lock(&sink.log);
                log.ready |= line.contains(TRACER_READY_LINE);
                log.stderr.push(line);
                drop(log);
                sink.changed.notify_all();
            }
            lock(&sink.log).stderr_closed = true;
            sink.changed.notify_all();
        });
        let mut tracer = Self { child, shared };
        let deadline = Instant::now() + TRACER_READY_TIMEOUT;
        let mut log = lock(&tracer.shared.log);
        while !log.ready && !log.stderr_closed && Instant::now() < deadline {
            log = tracer
                .shared
                .changed
                .wait_timeout(log, deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let (ready, stderr) = (log.ready, log.stderr.join("\n"));
        drop(log);
        if !ready {
            kill_child(&mut tracer.child);
            panic!(
                "{} trace --json did not print `{TRACER_READY_LINE}` within {TRACER_READY_TIMEOUT:?} \
                 (exit {:?}); stderr:\n{stderr}",
                bin.display(),
                tracer.child.try_wait().ok().flatten()
            );
        }
        tracer
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every event so far, in stdout order.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared.log).events.clone()
    }

    /// Events so far whose `netns` is `inode`, in stdout order.
    pub fn events_in_netns(&self, inode: u64) -> Vec<Value> {
        in_netns(&lock(&self.shared.log).events, inode)
    }

    /// Stdout lines that were not JSON objects.
    pub fn unparsed_lines(&self) -> Vec<String> {
        lock(&self.shared.log).unparsed.clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        lock(&self.shared.log).stderr.clone()
    }

    /// Waits until `done` holds for the events in namespace `inode` and
    /// returns them; panics after `timeout` with what was seen.
    pub fn wait_for_netns(
        &self,
        inode: u64,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        self.wait_for(what, timeout, |all| {
            let mine = in_netns(all, inode);
            done(&mine).then_some(mine)
        })
    }

    /// Waits until `check` returns `Some` for the events so far; panics after
    /// `timeout` with the tracer's stderr.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Value]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut log = lock(&self.shared.log);
        loop {
            if let Some(found) = check(&log.events) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            log = self
                .shared
                .changed
                .wait_timeout(log, left.min(Duration::from_millis(100)))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let events = log.events.len();
        let stderr = log.stderr.join("\n");
        drop(log);
        panic!(
            "timed out after {timeout:?} waiting for {what} ({events} events on the whole host); \
             tracer stderr:\n{stderr}"
        );
    }

    /// Stops the tracer with SIGTERM and returns its exit status (SIGKILL
    /// after [`STEP_TIMEOUT`], which then shows as a signal exit).
    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory preconditions; the pid is our unreaped
        // child, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(status) = wait_child(&mut self.child, STEP_TIMEOUT) {
            return status;
        }
        eprintln!("conn-tracer (pid {pid}) ignored SIGTERM for {STEP_TIMEOUT:?}: SIGKILL");
        let _ = self.child.kill();
        self.child.wait().expect("reap conn-tracer")
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}
