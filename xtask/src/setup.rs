//! `cargo xtask setup`: installs, only where missing, what building the kernel
//! programs and running the tests need. Safe to run any number of times.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{find_program, is_root, probe, run};

/// The toolchain aya-build builds tracer-ebpf with (`rustup run nightly ...`).
const NIGHTLY: &str = "nightly";

/// bpf-linker 0.11+ needs a system LLVM 22/23 that Debian does not ship;
/// 0.10.3 brings its own (rust-llvm-22 feature).
const BPF_LINKER_VERSION: &str = "0.10.3";

/// A Debian package the tests need, and a command whose presence shows it is
/// installed.
struct DebianPackage {
    name: &'static str,
    command: &'static str,
}

/// Every Debian package the tests need, in one place: the servers the later
/// end-to-end tests drive (mariadb-server, redis-server, ...) go here.
const DEBIAN_PACKAGES: &[DebianPackage] = &[
    // Network namespaces and veth pairs for the integration tests.
    DebianPackage {
        name: "iproute2",
        command: "ip",
    },
];

/// `cargo xtask setup`.
pub fn setup() -> Result<()> {
    println!("== setup");
    ensure_all()
}

/// Checks every piece and installs the missing ones, saying which.
pub fn ensure_all() -> Result<()> {
    let mut done = Vec::new();
    check_nightly()?;
    if ensure_rust_src()? {
        done.push("rust-src");
    }
    if ensure_bpf_linker()? {
        done.push("bpf-linker");
    }
    if ensure_debian_packages()? {
        done.push("Debian packages");
    }
    if done.is_empty() {
        println!("setup: everything already installed, nothing done");
    } else {
        println!("setup: installed {}", done.join(", "));
    }
    Ok(())
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

/// The bpf-linker version on PATH, e.g. `Some("0.10.3")`.
fn bpf_linker_version() -> Option<String> {
    let out = probe(Command::new("bpf-linker").arg("--version"))?;
    parse_version(&out).map(str::to_owned)
}

/// `0.10.3` from `bpf-linker 0.10.3`.
fn parse_version(out: &str) -> Option<&str> {
    out.split_whitespace().nth(1)
}

/// Installs bpf-linker unless the one on PATH is the pinned version. Returns
/// whether it installed it.
fn ensure_bpf_linker() -> Result<bool> {
    match bpf_linker_version() {
        Some(version) if version == BPF_LINKER_VERSION => {
            println!("bpf-linker: {version} present, skipped");
            return Ok(false);
        }
        Some(version) => println!("bpf-linker: {version} found, {BPF_LINKER_VERSION} needed"),
        None => println!("bpf-linker: not found, installing {BPF_LINKER_VERSION}"),
    }
    // --force: replace a different version, even one cargo did not install.
    run(Command::new("cargo").args([
        "+nightly",
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))?;
    match bpf_linker_version() {
        Some(version) if version == BPF_LINKER_VERSION => Ok(true),
        found => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but `bpf-linker --version` now reports \
             {found:?}: put cargo's bin directory (~/.cargo/bin) first on PATH"
        ),
    }
}

/// Installs the Debian packages whose command is missing, with one
/// `apt-get update` first. Returns whether it installed any.
fn ensure_debian_packages() -> Result<bool> {
    let mut missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        if let Some(path) = find_program(package.command) {
            let (name, command) = (package.name, package.command);
            println!("{name} ({command}): present at {}, skipped", path.display());
        } else {
            println!("{} ({}): missing", package.name, package.command);
            missing.push(package.name);
        }
    }
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
    apt_get(&install)?;
    Ok(true)
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
