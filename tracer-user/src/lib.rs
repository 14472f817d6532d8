//! conn-tracer's userspace agent: loads the kernel programs, decodes their
//! events and presents them. The pure parts (decoding, offsets from BTF,
//! mount parsing) are unit-tested without root.

pub mod cgroup;
pub mod check;
pub mod clock;
pub mod event;
pub mod kernel;
pub mod offsets;
pub mod trace;
