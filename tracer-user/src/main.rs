//! The `conn-tracer` command.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use conn_tracer::{check, kernel::KernelOptions, offsets::VMLINUX_BTF, trace};
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
    /// Probe the kernel and this process for everything the tracer needs;
    /// exit 0 when all is there, 1 otherwise.
    Check {
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
}

impl From<KernelArgs> for KernelOptions {
    fn from(a: KernelArgs) -> Self {
        Self {
            btf_path: a.btf,
            ring_bytes: a.ring_bytes,
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
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("conn-tracer: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = trace::TraceOptions {
                kernel: kernel.into(),
                json,
            };
            match runtime.block_on(trace::run(opts)) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("conn-tracer: {e:#}");
                    ExitCode::FAILURE
                }
            }
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
    }
}
