//! Stage 7, cmd: one module per subcommand, each only wiring the stages
//! together; `main.rs` parses the command line and dispatches here.

pub mod check;
pub mod connections;
pub mod run;
pub mod selftest;
pub mod trace;
