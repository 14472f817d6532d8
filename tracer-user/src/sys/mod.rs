//! The system around the pipeline, used by every stage: Linux
//! capabilities (what a missing one costs, one table for `check` and
//! `run`), network and cgroup namespaces, the cgroup v2 mount.

pub mod caps;
pub mod cgroup;
pub mod netns;
