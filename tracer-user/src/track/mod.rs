//! Stage 4, track: per-connection state, pure and unit-testable. Takes
//! decoded events with their owners and gives the connection table, how
//! each connection ended (classification), the app -> sidecar -> upstream
//! chains, and the reconciliation with the kernel's live sockets (resync).
//! No I/O: tests drive it with synthetic kernel records.

pub mod chains;
pub mod classify;
pub mod table;
