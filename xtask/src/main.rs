//! `cargo xtask`: conn-tracer chores (toolchain setup, build, run, test,
//! bench, fuzz, the kernel matrix, the container image).
//!
//! Not a second build system: every step is a plain rustup, cargo or apt-get
//! command, printed before it runs, so any of them can be run by hand.

mod bench;
mod cmd;
mod fuzz;
mod image;
mod kernels;
mod setup;
mod test;

use std::{os::unix::process::CommandExt, process::ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::cmd::{CommandFailed, cargo, display, find_program, is_root, run, target_dir};

/// What `cargo xtask run` passes to conn-tracer when given no arguments.
const DEFAULT_RUN_ARGS: &[&str] = &[
    "run",
    "--listen",
    "127.0.0.1:9090",
    "--idle-threshold",
    "60s",
];

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "conn-tracer chores: setup, build, run, test, bench, fuzz, kernels, image"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: rust-src for nightly, bpf-linker 0.10.3, the
    /// Debian packages the tests need. Does nothing when all are there.
    Setup,
    /// Set up, then build conn-tracer (package tracer-user).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build in release mode and run conn-tracer on this host as root
    /// (through sudo when not root).
    Run {
        /// Arguments for conn-tracer, after `--` (default: `trace`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then fmt, clippy, the licence check (cargo deny), build, the
    /// image (`image`), the whole test suite and the kernel matrix
    /// (`kernels` on the debug build). The integration tests need root;
    /// without it (and without CI) they skip.
    Test,
    /// Benchmarks (as root): churn overhead against no tracer and a bpftrace
    /// peer, scaling, memory, userspace throughput, detection latency, lost
    /// events. Writes docs/benchmarks.md, docs/bench/*.svg and
    /// docs/bench/summary.json.
    Bench(bench::Args),
    /// Fuzz the parsers of untrusted input (kernel records, cgroup paths,
    /// the config file, /proc, Kubernetes pods): their property tests with
    /// many cases. Without TARGET, all of them.
    Fuzz(fuzz::Args),
    /// Boot conn-tracer on Debian's 5.10, 6.1, 6.12 and 6.18 kernels under
    /// qemu (TCG) and print a matrix of `check`, `selftest` and a traced
    /// loopback connection on each. Images are cached under
    /// target/kernels/; the matrix goes to target/kernels/matrix.txt.
    Kernels(kernels::Args),
    /// Build the container image offline (podman, FROM scratch: the release
    /// binary, the shared libraries it loads, their licences and sources;
    /// labels, user and entrypoint from deploy/Dockerfile's final stage) and
    /// write target/image/conn-tracer-VERSION.tar, an OCI archive with a
    /// Docker manifest that docker load, podman load and ctr import accept.
    Image(image::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build { release } => setup::setup().and_then(|()| build(release)),
        Task::Run { args } => run_tracer(&args),
        Task::Test => test::test(),
        Task::Bench(args) => bench::bench(&args),
        Task::Fuzz(args) => fuzz::fuzz(&args),
        Task::Kernels(args) => kernels::kernels(&args),
        Task::Image(args) => image::image(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::from(
                error
                    .downcast_ref::<CommandFailed>()
                    .map_or(1, CommandFailed::exit_code),
            )
        }
    }
}

/// `cargo build -p tracer-user`; tracer-user's build.rs builds the kernel
/// programs with aya-build.
fn build(release: bool) -> Result<()> {
    println!("== build{}", if release { " (release)" } else { "" });
    let mut cmd = cargo();
    cmd.args(["build", "-p", "tracer-user"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// Builds conn-tracer in release mode and replaces this process with it, so
/// that signals and the exit status are the tracer's own.
fn run_tracer(args: &[String]) -> Result<()> {
    // Loading eBPF programs needs root: find out before a long build.
    let sudo = if is_root() {
        None
    } else {
        Some(find_program("sudo").context(
            "conn-tracer loads eBPF programs and needs root, and sudo is not installed: \
             run `cargo xtask run` as root",
        )?)
    };
    setup::setup()?;
    build(true)?;
    let bin = target_dir()?.join("release").join("conn-tracer");
    let mut cmd = match sudo {
        None => std::process::Command::new(&bin),
        Some(sudo) => {
            let mut cmd = std::process::Command::new(sudo);
            cmd.arg("--").arg(&bin);
            cmd
        }
    };
    if args.is_empty() {
        cmd.args(DEFAULT_RUN_ARGS);
    } else {
        cmd.args(args);
    }
    println!("== run");
    println!("$ {}", display(&cmd));
    let error = cmd.exec();
    bail!("cannot run `{}`: {error}", display(&cmd))
}
