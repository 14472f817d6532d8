//! Builds the kernel programs (tracer-ebpf) for the bpf target with the
//! nightly toolchain and bpf-linker, the aya-template way; `main` embeds the
//! object with `include_bytes_aligned!`. `cargo xtask setup` installs what
//! this needs.
//!
//! aya-build forwards every line of the nested cargo build as a
//! `cargo:warning` (about 150 `Compiling ...` lines on a fresh build, which
//! hide real warnings). So the build runs in a child process of this
//! script, and its progress lines are shown only when it fails; compiler
//! diagnostics of the kernel programs and cargo's directives always pass.
use std::{
    path::Path,
    process::{Command, ExitCode},
};

/// Set in the child that runs aya-build.
const CHILD: &str = "CONN_TRACER_EBPF_BUILD_CHILD";

fn main() -> ExitCode {
    if std::env::var_os(CHILD).is_some() {
        return match build() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("cargo:warning={e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let exe = std::env::current_exe().expect("the build script knows its own path");
    let out = match Command::new(exe).env(CHILD, "1").output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("cannot run the kernel program build: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        let progress = line.strip_prefix("cargo:warning=").is_some_and(is_progress);
        if out.status.success() && progress {
            continue;
        }
        println!("{line}");
    }
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("building the kernel programs (tracer-ebpf) failed: see the warnings above");
        ExitCode::FAILURE
    }
}

/// A progress line of the nested cargo (`Compiling x`, `Finished ...`).
fn is_progress(line: &str) -> bool {
    let word = line.trim_start().split(' ').next().unwrap_or_default();
    line.starts_with(' ')
        && matches!(
            word,
            "Compiling"
                | "Finished"
                | "Fresh"
                | "Running"
                | "Blocking"
                | "Updating"
                | "Downloading"
                | "Downloaded"
                | "Locking"
                | "Adding"
                | "Checking"
        )
}

fn build() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tracer-user sits inside the workspace")
        .join("tracer-ebpf");
    let root = root.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
