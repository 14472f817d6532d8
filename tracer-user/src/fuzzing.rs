//! Shared settings of the property tests (`proptest`) that fuzz the parsers
//! of untrusted input: kernel records (`event::fuzz`), cgroup paths
//! (`podid::fuzz`), the config file (`config::fuzz`), /proc contents
//! (`procfs::fuzz`) and Kubernetes pod objects (`kube::fuzz`).
//!
//! Each property runs a few hundred cases in the unit tests, so that
//! `cargo test` stays fast; `cargo xtask fuzz` runs them with many more
//! (`PROPTEST_CASES`, which overrides every default here).

use proptest::test_runner::Config;

/// The environment variable proptest reads its case count from.
pub(crate) const CASES_ENV: &str = "PROPTEST_CASES";

/// `default_cases` cases, unless `PROPTEST_CASES` says otherwise.
pub(crate) fn config(default_cases: u32) -> Config {
    let from_env = std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    Config {
        cases: from_env.unwrap_or(default_cases),
        // A long fuzz run must not stop at proptest's default of 1024
        // rejected inputs: the strategies here reject none, but filters may.
        max_global_rejects: u32::MAX,
        ..Config::default()
    }
}
