//! What the helper processes `ct-client` and `ct-peer` share: their common
//! arguments, the lines tests wait for, the thread name, the go line on
//! stdin.

use std::{
    ffi::CString,
    io::{self, BufRead as _, Write as _},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// The arguments of every helper process (flattened into its command line).
#[derive(clap::Args)]
pub struct HelperArgs {
    /// Thread name to set with `prctl(PR_SET_NAME)` before anything else (at most 15 bytes).
    #[arg(long, global = true)]
    pub comm: Option<String>,
    /// Bound on every blocking step (connect, accept, each read, waiting for stdin).
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout_secs: u64,
}

impl HelperArgs {
    /// Names the thread (`--comm`) and returns the bound on blocking steps.
    pub fn start(&self) -> Result<Duration> {
        if let Some(comm) = &self.comm {
            set_comm(comm)?;
        }
        Ok(Duration::from_secs(self.timeout_secs))
    }
}

/// Prints a line the tests wait for, at once.
pub fn say(line: &str) {
    let mut out = io::stdout().lock();
    // The tests wait for these lines; a closed stdout only means nobody waits.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Names this thread (the kernel's `comm`, as owners are reported).
pub fn set_comm(comm: &str) -> Result<()> {
    let name = CString::new(comm).context("--comm must not contain NUL")?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15
    // bytes by the kernel) that outlives the call.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("prctl(PR_SET_NAME)");
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one (raising the hard limit
/// needs CAP_SYS_RESOURCE, which CI may not have) and returns it.
pub fn raise_fd_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
            return Err(io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    Ok(lim.rlim_cur)
}

/// Blocks until a line arrives on stdin, at most `timeout`.
pub fn wait_go(timeout: Duration) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(io::stdin().lock().read_line(&mut line));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => bail!("stdin closed before the go line"),
        Ok(Err(e)) => Err(e).context("reading the go line from stdin"),
        Err(_) => bail!("no go line on stdin within {timeout:?}"),
    }
}
