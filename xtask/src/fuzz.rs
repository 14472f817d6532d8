//! `cargo xtask fuzz`: the property tests that fuzz conn-tracer's parsers
//! of untrusted input, run with many more cases than `cargo test` gives
//! them. They are ordinary `proptest` tests in tracer-user (modules named
//! `fuzz`); this only picks them and sets `PROPTEST_CASES`.

use std::{fmt::Write as _, time::Instant};

use anyhow::{Result, bail};

use crate::{
    cmd::{cargo, run},
    setup,
};

/// (target, test filter, what it feeds).
pub const TARGETS: &[(&str, &str, &str)] = &[
    (
        "event",
        "event::fuzz::",
        "kernel ring buffer records: arbitrary bytes; valid records of every kind, cut, \
         with their kind changed or fields corrupted",
    ),
    (
        "podid",
        "owner::kubelet::fuzz::",
        "cgroup paths: arbitrary strings; kubelet paths of every driver, runtime and QoS \
         class with random ids, and edited",
    ),
    (
        "config",
        "config::fuzz::",
        "the TOML config: arbitrary text; documents of known keys with values of any type \
         (every error must name its key)",
    ),
    (
        "procfs",
        "owner::procfs::fuzz::",
        "/proc contents: fd links (socket:[N]), status Uid/Gid/CapEff, cgroup files, the \
         port range; well-formed, edited and arbitrary",
    ),
    (
        "kube",
        "owner::kube::fuzz::",
        "Kubernetes Pod objects with missing, empty or odd fields, and arbitrary JSON",
    ),
];

/// The `--help` text's list of targets.
pub fn targets_help() -> String {
    let mut s = String::from("Targets:\n");
    for (name, _, what) in TARGETS {
        let _ = writeln!(s, "  {name:<8} {what}");
    }
    s
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = targets_help())]
pub struct Args {
    /// Cases per property (PROPTEST_CASES).
    #[arg(long, default_value_t = 100_000)]
    pub cases: u32,
    /// Targets to run (default: all); see the list below.
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
}

/// The test filters of `targets` (all when empty); unknown names are an error.
pub fn filters(targets: &[String]) -> Result<Vec<&'static str>> {
    if targets.is_empty() {
        return Ok(TARGETS.iter().map(|(_, filter, _)| *filter).collect());
    }
    let mut out = Vec::new();
    for t in targets {
        let Some((_, filter, _)) = TARGETS.iter().find(|(name, _, _)| name == t) else {
            let names: Vec<&str> = TARGETS.iter().map(|(name, _, _)| *name).collect();
            bail!(
                "unknown fuzz target {t:?}: the targets are {}",
                names.join(", ")
            );
        };
        if !out.contains(filter) {
            out.push(*filter);
        }
    }
    Ok(out)
}

pub fn fuzz(args: &Args) -> Result<()> {
    let filters = filters(&args.targets)?;
    // tracer-user's build script builds the kernel programs.
    setup::ensure_toolchain()?;
    println!("== fuzz ({} cases per property)", args.cases);
    let start = Instant::now();
    let mut cmd = cargo();
    cmd.args(["test", "-p", "tracer-user", "--lib", "--"])
        .args(&filters)
        .env("PROPTEST_CASES", args.cases.to_string());
    run(&mut cmd)?;
    println!(
        "fuzz: every property held for {} cases ({}) in {:.0} s",
        args.cases,
        filters.join(" "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_test_filters() {
        assert_eq!(filters(&[]).unwrap().len(), TARGETS.len());
        assert_eq!(
            filters(&["config".into(), "event".into(), "config".into()]).unwrap(),
            ["config::fuzz::", "event::fuzz::"]
        );
        let err = filters(&["nope".into()]).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("podid"), "{err}");
        let help = targets_help();
        for (name, _, _) in TARGETS {
            assert!(help.contains(name), "{help}");
        }
    }
}
