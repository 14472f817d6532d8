//! The initramfs every kernel boots: busybox-static, conn-tracer with
//! exactly the shared libraries `ldd` names (the dynamic loader at its own
//! path), /dev/console and an /init that runs the steps and prints their
//! results between markers ([`super::console`] reads them back).
//!
//! It is an uncompressed newc cpio written here: no cpio package, no root
//! for the device node, and nothing to decompress under TCG.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::console::MARK;
use crate::cmd::ldd;

/// Seconds each step may take inside the guest before busybox `timeout`
/// kills it (exit 143).
pub const CHECK_SECS: u64 = 120;
pub const SELFTEST_SECS: u64 = 300;
/// The whole trace step: start, connection, drain.
pub const TRACE_SECS: u64 = 120;
/// How long the trace step waits for `trace` to say it is attached.
const TRACE_READY_SECS: u64 = 60;
/// What `conn-tracer trace` prints on stderr once attached
/// (tracer-user/src/trace.rs READY_LINE).
const TRACE_READY_LINE: &str = "conn-tracer: tracing";
/// The loopback port of the traced connection.
pub const TRACE_PORT: u16 = 40123;

/// Where conn-tracer sits in the guest.
const GUEST_BIN: &str = "/bin/conn-tracer";

/// The /init script.
fn init_script() -> String {
    format!(
        r#"#!/bin/sh
# /init of the `cargo xtask kernels` initramfs. Every step is bounded by
# busybox timeout; results go to the console between "{MARK}" markers.
/bin/busybox --install -s /bin
# Plain text on the console: no colours in clap's messages.
export PATH=/bin TERM=dumb NO_COLOR=1
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
# /sys/kernel/security/lockdown, which `check` reports.
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
ip link set lo up
# Warnings and worse still reach the console (a WARN splat from a kernel
# program is a finding); notices no longer break into the step output.
echo 5 > /proc/sys/kernel/printk
# Guest uptime in seconds, on every marker that ends something.
up() {{ cut -d' ' -f1 /proc/uptime; }}
echo "{MARK} uname $(uname -r) up=$(up)"
echo "{MARK} cmdline $(cat /proc/cmdline)"

step() {{
    name=$1; secs=$2; shift 2
    echo "{MARK} begin $name up=$(up)"
    timeout "$secs" "$@" </dev/null 2>&1
    rc=$?
    echo "{MARK} end $name exit=$rc up=$(up)"
}}
step check {CHECK_SECS} {GUEST_BIN} check
step selftest {SELFTEST_SECS} {GUEST_BIN} selftest

echo "{MARK} begin trace up=$(up)"
timeout {TRACE_SECS} {GUEST_BIN} trace --json </dev/null >/tmp/trace.json 2>/tmp/trace.err &
tracer=$!
ready=no
i=0
while [ $i -lt {ready_polls} ] && kill -0 $tracer 2>/dev/null; do
    if grep -q '{TRACE_READY_LINE}' /tmp/trace.err; then ready=yes; break; fi
    sleep 0.1; i=$((i+1))
done
if [ $ready = yes ]; then
    timeout 30 nc -l -p {TRACE_PORT} </dev/null >/tmp/nc.out &
    listener=$!
    i=0
    while [ $i -lt 50 ] && ! netstat -ltn | grep -q ':{TRACE_PORT} '; do sleep 0.1; i=$((i+1)); done
    echo "hello from cargo xtask kernels" | timeout 30 nc 127.0.0.1 {TRACE_PORT}
    wait $listener
    echo "listener received: $(cat /tmp/nc.out)"
    # Let the last transitions reach the tracer's output.
    sleep 2
fi
kill -INT $tracer 2>/dev/null
wait $tracer
rc=$?
cat /tmp/trace.err
cat /tmp/trace.json
events=$(grep -cE '[^0-9]{TRACE_PORT}([^0-9]|$)' /tmp/trace.json)
echo "{MARK} end trace exit=$rc ready=$ready port={TRACE_PORT} events=$events up=$(up)"
echo "{MARK} done"
poweroff -f
"#,
        ready_polls = TRACE_READY_SECS * 10,
    )
}

/// A newc ("070701") cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    dirs: BTreeSet<String>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Cpio {
    /// A regular file (its parent directories first, once each).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, S_IFREG | mode, (0, 0), data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, S_IFCHR | mode, (major, minor), &[]);
    }

    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        self.parents(path);
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
    }

    fn parents(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name = path.trim_start_matches('/');
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: reproducible archives
            u32::try_from(data.len()).expect("initramfs files are below 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short names"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// Header + name, and data, each end on a 4-byte boundary.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

/// Copies `bin` to `dir/conn-tracer` (a later build cannot change it under
/// the boots), without debug info where binutils' strip is installed: a
/// debug build's is most of its size, and the guest holds the whole
/// initramfs in memory.
pub fn stage(bin: &Path, dir: &Path) -> Result<PathBuf> {
    let staged = dir.join("conn-tracer");
    if let Some(strip) = crate::cmd::find_program("strip") {
        let mut cmd = Command::new(strip);
        cmd.arg("--strip-debug").arg("-o").arg(&staged).arg(bin);
        crate::cmd::run(&mut cmd)?;
    } else {
        fs::copy(bin, &staged)
            .with_context(|| format!("cannot copy {} to {}", bin.display(), staged.display()))?;
    }
    Ok(staged)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes the initramfs for `conn_tracer` to `out`; returns its size.
pub fn build(conn_tracer: &Path, out: &Path) -> Result<u64> {
    let busybox = crate::cmd::find_program("busybox")
        .context("busybox is missing: install busybox-static (`cargo xtask setup` does)")?;
    if !ldd(&busybox)?.is_empty() {
        bail!(
            "{} is dynamically linked: install busybox-static (the initramfs has no libc \
             for it)",
            busybox.display()
        );
    }
    let mut cpio = Cpio::default();
    for dir in ["dev", "proc", "sys", "tmp", "run", "bin"] {
        cpio.dir(dir);
    }
    // The kernel opens it for /init's stdin, stdout and stderr.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("bin/busybox", 0o755, &read(&busybox)?);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, init_script().as_bytes());
    cpio.file(GUEST_BIN, 0o755, &read(conn_tracer)?);
    let libs = ldd(conn_tracer)?;
    println!(
        "initramfs: busybox {}, conn-tracer {}, libraries {}",
        busybox.display(),
        conn_tracer.display(),
        libs.iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for lib in &libs {
        // At the path ldd names (the loader's own search path), with the
        // content of the file it resolves to.
        let guest = lib.to_str().context("library path is not UTF-8")?;
        cpio.file(guest, 0o755, &read(lib)?);
    }
    let bytes = cpio.finish();
    fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdevmajor, rdevminor, data) of each entry.
    type Entry = (String, u32, u32, u32, Vec<u8>);

    /// Reads a newc archive back, checking the alignment on the way.
    fn entries(archive: &[u8]) -> Vec<Entry> {
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(at % 4, 0, "entry at unaligned offset {at}");
            assert_eq!(&archive[at..at + 6], b"070701");
            let field = |i: usize| hex(&archive[at + 6 + i * 8..at + 14 + i * 8]);
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_at = at + 110;
            let name = &archive[name_at..name_at + namesize as usize - 1];
            assert_eq!(archive[name_at + namesize as usize - 1], 0);
            let data_at = (name_at + namesize as usize).next_multiple_of(4);
            let data = archive[data_at..data_at + size as usize].to_vec();
            at = (data_at + size as usize).next_multiple_of(4);
            let name = String::from_utf8(name.to_vec()).unwrap();
            if name == "TRAILER!!!" {
                assert_eq!(at, archive.len());
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn cpio_is_newc_with_parents_first_and_aligned() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("lib/x86_64-linux-gnu/libc.so.6", 0o755, b"elf");
        cpio.file("/init", 0o755, b"#!/bin/sh\n");
        cpio.symlink("bin/sh", "busybox");
        cpio.char_device("dev/console", 0o600, 5, 1);
        let archive = cpio.finish();
        // The first header, byte for byte: ino 1, a directory, nlink 2,
        // name "bin\0" (4 bytes), so the name ends at 114 -> padded to 116.
        let header = concat!(
            "070701", "00000001", "000041ed", "00000000", "00000000", "00000002", "00000000",
            "00000000", "00000000", "00000000", "00000000", "00000000", "00000004", "00000000",
        );
        assert_eq!(&archive[..110], header.as_bytes());
        assert_eq!(&archive[110..116], b"bin\0\0\0");
        let got: Vec<(String, u32, u32, u32, Vec<u8>)> = entries(&archive);
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "init",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(got[3].1, 0o100_755);
        assert_eq!(got[3].4, b"elf");
        assert_eq!(got[4].4, b"#!/bin/sh\n");
        assert_eq!(
            (got[5].1, got[5].4.as_slice()),
            (0o120_777, &b"busybox"[..])
        );
        assert_eq!((got[7].1, got[7].2, got[7].3), (0o020_600, 5, 1));
    }

    #[test]
    fn init_marks_every_step_and_bounds_it() {
        let init = init_script();
        assert!(init.starts_with("#!/bin/sh\n"));
        for needle in [
            "step check 120 /bin/conn-tracer check",
            "step selftest 300 /bin/conn-tracer selftest",
            "timeout 120 /bin/conn-tracer trace --json",
            "@@conn-tracer-kernels end trace exit=$rc ready=$ready port=40123 events=$events up=$(up)",
            "@@conn-tracer-kernels done",
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup",
            "ip link set lo up",
            "poweroff -f",
        ] {
            assert!(init.contains(needle), "no `{needle}` in /init:\n{init}");
        }
    }
}
