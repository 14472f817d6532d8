//! `conn-loadgen`: the load `cargo xtask bench` puts on conn-tracer, all of
//! it over loopback.
//!
//! - `churn`: open, exchange a few bytes and close connections as fast as
//!   the machine allows, for a fixed time, from N client threads against N
//!   in-process servers.
//! - `hold`: open N connections, keep them open until stdin closes (the
//!   daemon's memory with that many tracked connections).
//! - `idle-kill`: let connections go idle, end them from the server side and
//!   time how long the daemon's `/metrics` takes to count the idle kill.
//!
//! Every mode prints one JSON object on stdout when it is done (`hold`
//! prints it when the connections are open), so that the bench can read it.

mod churn;
mod hold;
mod idle;

use std::{io::Write as _, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "conn-loadgen",
    about = "Loopback TCP load for conn-tracer benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Connect, send a few bytes, read them back, close; repeat until the time is up.
    Churn(churn::Args),
    /// Open N connections and hold them until stdin closes.
    Hold(hold::Args),
    /// Time from idle kills (the server closes idle connections) to the metric change.
    IdleKill(idle::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().mode {
        Mode::Churn(args) => churn::run(&args),
        Mode::Hold(args) => hold::run(&args),
        Mode::IdleKill(args) => idle::run(&args),
    };
    match result {
        Ok(report) => {
            // The reader may be gone by now (the bench reads `hold`'s first line only).
            let _ = writeln!(std::io::stdout(), "{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("conn-loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}
