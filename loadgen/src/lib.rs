//! Pieces of the load generator that `cargo xtask bench` uses too.

pub mod metrics;

/// Raises this process's open-file limit to at least `want` (soft and hard;
/// raising the hard limit needs CAP_SYS_RESOURCE). Only this process and its
/// children are affected.
pub fn raise_nofile(want: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        anyhow::bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(());
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE; within it, no privilege.
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const new) } != 0 {
        anyhow::bail!(
            "cannot raise the open-file limit to {want} (hard limit {}): {} (raising the \
             hard limit needs CAP_SYS_RESOURCE; /proc/sys/fs/nr_open caps it)",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// User + system CPU seconds this process has used.
#[expect(
    clippy::cast_precision_loss,
    reason = "seconds and microseconds of CPU time"
)]
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &raw mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}
