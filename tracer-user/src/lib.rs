//! conn-tracer's userspace agent: loads the kernel programs, decodes their
//! events and presents them. The pure parts (decoding, offsets from BTF,
//! mount parsing) are unit-tested without root.

pub mod caps;
pub mod cgroup;
pub mod chains;
pub mod check;
pub mod classify;
pub mod clock;
pub mod config;
pub mod connections;
pub mod daemon;
pub mod event;
#[cfg(test)]
mod fuzzing;
pub mod jiffies;
pub mod kernel;
pub mod kube;
pub mod labels;
pub mod metrics;
pub mod netns;
pub mod offsets;
pub mod podid;
pub mod procfs;
pub mod selftest;
pub mod table;
pub mod trace;
