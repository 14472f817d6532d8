//! One boot under `qemu-system-x86_64 -accel tcg`, its console captured to
//! a file, killed by PID when it overruns its time.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::cmd::display;

/// The kernel command line. `lockdown=integrity` as on this project's
/// machines and on Secure Boot nodes, where Debian's kernels lock down by
/// themselves: kprobes and fentry are off the table there, so the matrix
/// must not pass on them. `panic=-1` with `-no-reboot` ends the boot on a
/// panic (e.g. /init dying) instead of hanging.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 lockdown=integrity";

/// Guest memory in MiB: 1 GiB, or more for a large initramfs, which
/// takes twice its size while it unpacks and its size after.
pub fn memory_mib(initrd_bytes: u64) -> u64 {
    (256 + 3 * initrd_bytes.div_ceil(1 << 20)).max(1024)
}

pub struct Boot {
    pub took: Duration,
    pub timed_out: bool,
}

/// Kills and reaps qemu however the boot ends (an error, a panic), so no
/// qemu outlives the boot.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Boots `vmlinuz` with `initrd`, the console (and qemu's own messages)
/// going to `log`. KVM is not used: /dev/kvm here is a nested PVM
/// hypervisor that stock kernels cannot boot under.
pub fn boot(vmlinuz: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<Boot> {
    let memory = memory_mib(initrd.metadata()?.len());
    let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", &format!("{memory}M")])
        .args(["-nographic", "-no-reboot"])
        // No NIC: the loopback is all the steps use.
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", CMDLINE]);
    println!("$ {} > {}", display(&cmd), log.display());
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    // SIGKILL to qemu if we die without reaping it (even by SIGKILL).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    let mut qemu = Qemu(child);
    loop {
        if qemu.0.try_wait()?.is_some() {
            return Ok(Boot {
                took: start.elapsed(),
                timed_out: false,
            });
        }
        if start.elapsed() > timeout {
            eprintln!(
                "kernels: qemu (pid {}) still running after {} s: killed",
                qemu.0.id(),
                timeout.as_secs()
            );
            drop(qemu);
            return Ok(Boot {
                took: start.elapsed(),
                timed_out: true,
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_a_gib_unless_the_initramfs_needs_more() {
        assert_eq!(memory_mib(22 << 20), 1024);
        assert_eq!(memory_mib(300 << 20), 256 + 900);
    }
}
