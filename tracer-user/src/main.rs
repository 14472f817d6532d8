//! The `conn-tracer` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use conn_tracer::{
    CgroupNsJoin, Config, KernelOptions, Overrides, VMLINUX_BTF,
    cmd::{check, selftest, trace},
    join_host_cgroup_namespace,
};
use tracer_common::DEFAULT_RING_BYTES;

/// Node-level eBPF TCP connection tracer: which connections were killed for
/// being idle, by whom, after how long, and whether keepalive was on.
#[derive(Debug, Parser)]
#[command(name = "conn-tracer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every TCP connection event on this host live: state changes,
    /// resets and socket errors, with the owning process. Needs root (or
    /// CAP_BPF + CAP_PERFMON). Stops on Ctrl-C / SIGTERM.
    Trace {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        kernel: KernelArgs,
    },
    /// The daemon: track every TCP connection on this host, classify how
    /// each ends (idle kills, stale reuse, keepalive) and serve Prometheus
    /// /metrics, /healthz and /connections (JSON). Needs root (or CAP_BPF,
    /// CAP_PERFMON and CAP_SYS_ADMIN for the cgroup program). Stops on
    /// SIGTERM / Ctrl-C. Flags override the config file.
    Run(Box<Overrides>),
    /// Show a running daemon's connections: state, direction, owner,
    /// keepalive settings, idle seconds and bytes each way.
    Connections {
        /// The daemon's base URL.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9090")]
        from: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a running daemon's findings: which connections die, what
    /// kills them, after how long, and which setting fixes it.
    Findings {
        /// The daemon's base URL.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9090")]
        from: String,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Probe the kernel and this process for everything the tracer needs;
    /// exit 0 when all is there, 1 otherwise.
    Check {
        /// Kernel BTF to read struct layouts and tracepoint types from.
        #[arg(long, value_name = "PATH", default_value = VMLINUX_BTF)]
        btf: PathBuf,
    },
    /// Prove on this kernel that the tracer gives the known answers (needs
    /// root).
    ///
    /// Loads the kernel programs, runs loopback scenarios in a network
    /// namespace of its own (an idle connection closed by its peer, an
    /// owner's own close, a reset, a refused connect, keepalive set by
    /// setsockopt, a connection older than the tracer) through them and the
    /// daemon's classifier, and prints each fact expected vs observed. Needs
    /// root to create the namespace and load eBPF; needs no server; takes a
    /// few seconds. Exit 0: every check matched; 1: some did not; 2: it
    /// cannot run (e.g. the programs do not load: it says why).
    Selftest {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Kernel BTF to read struct layouts and tracepoint types from.
        #[arg(long, value_name = "PATH", default_value = VMLINUX_BTF)]
        btf: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct KernelArgs {
    /// Size of the kernel event ring buffer in bytes (a power of two, at
    /// least one page). Events that do not fit are counted as lost.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_RING_BYTES)]
    ring_bytes: u32,
    /// Kernel BTF to read struct layouts and tracepoint types from.
    #[arg(long, value_name = "PATH", default_value = VMLINUX_BTF)]
    btf: PathBuf,
    /// An optional kernel program not to attach; repeat for several
    /// (`tcp_probe`: no goodbye detection).
    #[arg(long = "skip-program", value_name = "PROGRAM")]
    skip_programs: Vec<String>,
}

impl From<KernelArgs> for KernelOptions {
    fn from(a: KernelArgs) -> Self {
        Self {
            btf_path: a.btf,
            ring_bytes: a.ring_bytes,
            verbose: true,
            wake_bytes: 0,
            skip_programs: a.skip_programs,
            ..KernelOptions::default()
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Trace { json, kernel } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let opts = trace::TraceOptions {
                kernel: kernel.into(),
                json,
            };
            block_on(runtime, trace::run(opts))
        }
        Command::Run(flags) => run_daemon(&flags),
        Command::Connections { from, json } => {
            client_exit(conn_tracer::cmd::connections::run(&from, json))
        }
        Command::Findings { from, json } => {
            client_exit(conn_tracer::cmd::findings::run(&from, json))
        }
        Command::Check { btf } => {
            let probes = check::run_probes(&btf);
            for p in &probes {
                println!("{p}");
            }
            if check::all_ok(&probes) {
                println!("conn-tracer check: all requirements met");
                ExitCode::SUCCESS
            } else {
                println!("conn-tracer check: requirements missing (see MISSING lines)");
                ExitCode::FAILURE
            }
        }
        Command::Selftest { json, btf } => {
            ExitCode::from(selftest::run(&selftest::SelftestOptions {
                btf_path: btf,
                json,
            }))
        }
    }
}

/// `conn-tracer run`: settings from the file and flags, then the daemon.
fn run_daemon(flags: &Overrides) -> ExitCode {
    let cfg = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("conn-tracer: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread exists (see there).
    match join_host_cgroup_namespace(cfg.cgroupns_pid) {
        CgroupNsJoin::AlreadyShared => {}
        CgroupNsJoin::Joined => log::info!(
            "joined the cgroup namespace of pid {}: cgroup paths in /proc are host paths",
            cfg.cgroupns_pid
        ),
        CgroupNsJoin::Failed(why) => log::warn!(
            "staying in this process's own cgroup namespace ({why}): owners' cgroups are found \
             by walking the cgroup hierarchy instead (slower, rate-limited)"
        ),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    block_on(runtime, conn_tracer::cmd::run::run(cfg))
}

/// Runs `task` on `runtime`; says what failed, if anything.
fn block_on<T>(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    task: impl Future<Output = anyhow::Result<T>>,
) -> ExitCode {
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("conn-tracer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conn-tracer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exit of a client subcommand (`connections`, `findings`).
fn client_exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conn-tracer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
