//! `ct-container SPEC.json`: runs one process the way a container runtime
//! (runc under containerd or CRI-O) runs a Kubernetes container, for the
//! image tests, where `podman run` cannot (crun cannot set RLIMIT_NPROC in
//! this sandbox). SPEC is an [`integration_tests::container::ContainerSpec`]
//! that `container::from_pod` makes from the manifests; this binary only
//! carries it out, then execs the process in place (its pid is the
//! container's).
//!
//! A new container: its cgroup, the pod's network namespace, new mount,
//! UTS, IPC and cgroup namespaces (the host's PID namespace: only
//! `hostPID: true` pods are supported), the image's root filesystem with a
//! fresh /proc, a /dev tmpfs with the usual devices, a read-only sysfs,
//! the runtime's masked and read-only paths, the volume mounts, the root
//! remounted read-only if asked, pivot_root; then the user, exactly the
//! capability set given (bounding, permitted, effective; inheritable and
//! ambient empty, as containerd sets them) and no_new_privs.
//!
//! `join`: `kubectl exec` into a running container instead: its cgroup and
//! namespaces, then the same user, capabilities and no_new_privs.

use std::{
    ffi::CString,
    fs, io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use integration_tests::container::ContainerSpec;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: ct-container SPEC.json");
        return ExitCode::from(2);
    };
    let spec: ContainerSpec = match fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("ct-container: {}: {e}", Path::new(&path).display());
            return ExitCode::from(2);
        }
    };
    let error = match start(&spec) {
        Ok(error) => error,
        Err(e) => {
            eprintln!("ct-container: {e}");
            return ExitCode::from(125);
        }
    };
    eprintln!("ct-container: exec {:?}: {error}", spec.argv);
    ExitCode::from(127)
}

type Result<T> = std::result::Result<T, String>;

/// Sets everything up and execs; returns only the exec's error.
fn start(spec: &ContainerSpec) -> Result<io::Error> {
    if let Some(cgroup) = &spec.cgroup {
        // "0": the writing process itself.
        fs::write(cgroup.join("cgroup.procs"), "0")
            .map_err(|e| format!("enter cgroup {}: {e}", cgroup.display()))?;
    }
    match spec.join {
        Some(pid) => join(pid)?,
        None => create(spec)?,
    }
    let last_cap: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(|e| format!("read cap_last_cap: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("cap_last_cap: {e}"))?;
    std::env::set_current_dir(&spec.cwd).map_err(|e| format!("chdir {}: {e}", spec.cwd))?;
    identity(spec.uid, spec.gid)?;
    capabilities(&spec.caps, last_cap)?;
    if spec.no_new_privs {
        // SAFETY: prctl with integer arguments only.
        check(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            "PR_SET_NO_NEW_PRIVS",
        )?;
    }
    let (program, args) = spec.argv.split_first().ok_or("empty argv")?;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear();
    for kv in &spec.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        cmd.env(k, v);
    }
    Ok(cmd.exec())
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    }
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in paths")
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let source_c = source.map(cstr);
    let target_c = cstr(target);
    let fstype_c = fstype.map(|s| CString::new(s).expect("fstype"));
    let data_c = data.map(|s| CString::new(s).expect("data"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null.
    let rc = unsafe {
        libc::mount(
            ptr(&source_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check(
        rc,
        &format!(
            "mount {} on {} ({fstype:?}, flags {flags:#x})",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display()
        ),
    )
}

/// `mount_setattr(target, AT_RECURSIVE, {attr_set: MOUNT_ATTR_RDONLY})`:
/// the mount and every mount below it read-only.
fn read_only_recursive(target: &Path) -> Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let path = cstr(target);
    // SAFETY: a valid path string and a mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            &raw const attr,
            size_of::<MountAttr>(),
        )
    };
    check(
        if rc == 0 { 0 } else { -1 },
        &format!("mount_setattr ro {}", target.display()),
    )
}

fn setns_path(path: &Path, kind: libc::c_int) -> Result<()> {
    let file = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: setns on a namespace fd we own.
    check(
        unsafe { libc::setns(file.as_raw_fd(), kind) },
        &format!("setns {}", path.display()),
    )
}

/// runc's defaults for a container that is not privileged (containerd's
/// and CRI-O's OCI spec): paths hidden, and paths read-only.
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn create(spec: &ContainerSpec) -> Result<()> {
    if !spec.host_pid {
        return Err("only hostPID containers are supported".into());
    }
    if let Some(netns) = &spec.netns {
        setns_path(netns, libc::CLONE_NEWNET)?;
    }
    // SAFETY: unshare with flags only; this process is single-threaded.
    check(
        unsafe {
            libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWCGROUP,
            )
        },
        "unshare",
    )?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = &spec.rootfs;
    mount(Some(root), root, None, libc::MS_BIND | libc::MS_REC, None)?;
    // Mount points, made in the container's own copy of the image as a
    // runtime makes them in its writable layer.
    for dir in ["proc", "sys", "dev"]
        .into_iter()
        .map(|d| root.join(d))
        .chain(spec.mounts.iter().map(|m| inside(root, &m.target)))
    {
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        }
    }
    runtime_mounts(root)?;
    for m in &spec.mounts {
        let target = inside(root, &m.target);
        mount(
            Some(&m.source),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        if m.read_only {
            read_only_recursive(&target)?;
        }
    }
    if spec.read_only_root {
        mount(
            None,
            root,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            None,
        )?;
    }
    pivot(root)?;
    let name = spec.hostname.as_bytes();
    // SAFETY: a buffer of the length passed.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        "sethostname",
    )
}

/// What every runtime mounts: /proc, /dev (the usual devices, /dev/shm),
/// a read-only /sys, and runc's masked and read-only paths.
fn runtime_mounts(root: &Path) -> Result<()> {
    let none = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some(Path::new("proc")),
        &root.join("proc"),
        Some("proc"),
        none,
        None,
    )?;
    let dev = root.join("dev");
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    for name in DEVICES {
        let device = dev.join(name);
        fs::write(&device, b"").map_err(|e| format!("create {}: {e}", device.display()))?;
        mount(
            Some(&Path::new("/dev").join(name)),
            &device,
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(|e| format!("mkdir {}: {e}", shm.display()))?;
    mount(
        Some(Path::new("shm")),
        &shm,
        Some("tmpfs"),
        none,
        Some("mode=1777,size=65536k"),
    )?;
    mount(
        Some(Path::new("sysfs")),
        &root.join("sys"),
        Some("sysfs"),
        none | libc::MS_RDONLY,
        None,
    )?;
    for path in MASKED.iter().map(|p| inside(root, p)) {
        if path.is_dir() {
            mount(
                Some(Path::new("tmpfs")),
                &path,
                Some("tmpfs"),
                libc::MS_RDONLY,
                None,
            )?;
        } else if path.exists() {
            mount(Some(&dev.join("null")), &path, None, libc::MS_BIND, None)?;
        }
    }
    for path in READ_ONLY.iter().map(|p| inside(root, p)) {
        if path.exists() {
            mount(Some(&path), &path, None, libc::MS_BIND | libc::MS_REC, None)?;
            mount(
                None,
                &path,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                None,
            )?;
        }
    }
    Ok(())
}

/// `root` becomes the root; the old one is detached.
fn pivot(root: &Path) -> Result<()> {
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    let dot = c".";
    // SAFETY: pivot_root(".", ".") stacks the old root under the new one;
    // it is then detached.
    check(
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int,
        "pivot_root",
    )?;
    // SAFETY: unmounting the old root stacked on ".".
    check(
        unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) },
        "umount old root",
    )?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
}

/// The namespaces of the container whose process is `pid`, mount last
/// (it changes the root and the working directory to the container's).
fn join(pid: u32) -> Result<()> {
    for (ns, kind) in [
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        setns_path(Path::new(&format!("/proc/{pid}/ns/{ns}")), kind)?;
    }
    Ok(())
}

fn identity(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain syscalls with integer arguments and a one-element list.
    unsafe {
        check(libc::setgroups(1, &raw const gid), "setgroups")?;
        check(libc::setresgid(gid, gid, gid), "setresgid")?;
        check(libc::setresuid(uid, uid, uid), "setresuid")?;
    }
    Ok(())
}

/// Exactly `keep` in the bounding, permitted and effective sets; the
/// inheritable and ambient sets empty.
fn capabilities(keep: &[u32], last_cap: u32) -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    for cap in (0..=last_cap).filter(|c| !keep.contains(c)) {
        // SAFETY: prctl with integer arguments only.
        check(
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) },
            &format!("drop capability {cap} from the bounding set"),
        )?;
    }
    let mask: u64 = keep.iter().fold(0, |m, c| m | (1 << c));
    let half = |shift: u32| Data {
        effective: (mask >> shift) as u32,
        permitted: (mask >> shift) as u32,
        inheritable: 0,
    };
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [half(0), half(32)];
    // SAFETY: a version-3 header and the two data words it asks for.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
    check(rc as libc::c_int, "capset")?;
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        },
        "clear ambient capabilities",
    )
}
