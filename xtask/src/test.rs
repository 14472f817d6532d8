//! `cargo xtask test`: what CI runs (`.ci/run`). A failed format check,
//! lint or licence check does not stop the run, nor does one failed test
//! binary the others (`--no-fail-fast`), so one run reports everything;
//! only a failed build skips the image, the tests and the kernel matrix.

use std::{
    env,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Error, Result};

use crate::{
    cmd::{cargo, is_root, probe, run, target_dir},
    image, kernels, setup,
};

enum Outcome {
    Passed,
    Failed(Error),
    Skipped(&'static str),
}

struct Step {
    name: &'static str,
    outcome: Outcome,
    took: Duration,
}

fn step(name: &'static str, f: impl FnOnce() -> Result<()>) -> Step {
    println!("== {name}");
    let start = Instant::now();
    let outcome = match f() {
        Ok(()) => Outcome::Passed,
        Err(error) => {
            eprintln!("{name}: {error:#}");
            Outcome::Failed(error)
        }
    };
    Step {
        name,
        outcome,
        took: start.elapsed(),
    }
}

fn skipped(name: &'static str, reason: &'static str) -> Step {
    println!("== {name}: skipped, {reason}");
    Step {
        name,
        outcome: Outcome::Skipped(reason),
        took: Duration::ZERO,
    }
}

/// `cargo fmt --check`, with nightly's rustfmt when it has one: rustfmt.toml
/// asks for import grouping, which only nightly rustfmt applies.
fn fmt_step() -> Step {
    let has_rustfmt =
        |toolchain: &[&str]| probe(cargo().args(toolchain).args(["fmt", "--version"])).is_some();
    let toolchain: &[&str] = if has_rustfmt(&["+nightly"]) {
        &["+nightly"]
    } else if has_rustfmt(&[]) {
        &[]
    } else {
        return skipped(
            "fmt",
            "rustfmt not installed (rustup component add rustfmt)",
        );
    };
    step("fmt", || {
        if toolchain.is_empty() {
            println!("nightly has no rustfmt; stable's ignores the import options");
        }
        run(cargo().args(toolchain).args(["fmt", "--all", "--check"]))
    })
}

/// `cargo deny check licenses` (deny.toml) over what the binary is built
/// from, offline: only the crates' own metadata and licence files.
fn licences() -> Result<()> {
    // cargo-deny reads every package of the lock file from the local
    // registry; this fetches the missing ones (crates.io only).
    run(cargo().args(["fetch", "--locked", "--quiet"]))?;
    run(cargo().args([
        "deny",
        "--offline",
        "--manifest-path",
        "tracer-user/Cargo.toml",
        "check",
        "licenses",
    ]))
}

/// `cargo xtask image` (its own release build); the archive's path.
fn image_step(archive: &mut Option<PathBuf>) -> Result<()> {
    let project = image::Project::read(None)?;
    let bin = image::build_release(&project)?;
    let built = image::build(&bin, &project)?;
    println!(
        "image: {} ({:.1} MB unpacked) in {}",
        built.reference,
        image::mb(built.rootfs_bytes),
        built.archive.display()
    );
    *archive = Some(built.archive);
    Ok(())
}

pub fn test() -> Result<()> {
    let ci = env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    let root = is_root();
    let mut steps = Vec::new();

    steps.push(step("setup", setup::ensure_all));
    if matches!(steps[0].outcome, Outcome::Passed) {
        steps.push(fmt_step());
        steps.push(step("clippy", || {
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }));
        steps.push(step("licenses", licences));
        let build_step = step("build", || {
            run(cargo().args(["build", "-p", "tracer-user"]))
        });
        let built = matches!(build_step.outcome, Outcome::Passed);
        steps.push(build_step);
        // The image users deploy (its own release build); the image tests
        // unpack and run it.
        let mut archive = None;
        steps.push(if built {
            step("image", || image_step(&mut archive))
        } else {
            skipped("image", "the build failed")
        });
        steps.push(if built {
            step("test", || {
                let bin = target_dir()?.join("debug").join("conn-tracer");
                // CI (and the rest of the environment) is inherited: the
                // integration tests must not skip in CI. Without a fresh
                // image the image tests find none (and fail in CI) rather
                // than test an old one.
                run(cargo()
                    .args(["test", "--workspace", "--no-fail-fast"])
                    .env("CONN_TRACER_BIN", bin)
                    .env("CONN_TRACER_IMAGE", archive.unwrap_or_default()))
            })
        } else {
            skipped("test", "the build failed")
        });
        steps.push(if built {
            step("kernels", || {
                // The build's binary: its kernel programs are the release
                // build's (aya-build always builds them with --release), and
                // it spares CI a second, release build of the userspace.
                let bin = target_dir()?.join("debug").join("conn-tracer");
                kernels::kernels(&kernels::Args {
                    bin: Some(bin),
                    ..kernels::Args::default()
                })
            })
        } else {
            skipped("kernels", "the build failed")
        });
    }

    println!();
    println!("== summary");
    for Step {
        name,
        outcome,
        took,
    } in &steps
    {
        let (verdict, detail) = match outcome {
            Outcome::Passed => ("ok", String::new()),
            Outcome::Failed(error) => ("FAILED", format!("  {error:#}")),
            Outcome::Skipped(reason) => ("skipped", format!("  {reason}")),
        };
        println!(
            "  {verdict:<8} {name:<7} {:>7.1}s{detail}",
            took.as_secs_f64()
        );
    }
    println!(
        "  integration tests: {}",
        match (root, ci) {
            (true, _) => "included (running as root)",
            (false, false) => "those that need root skip themselves (not root, CI unset)",
            (false, true) => "those that need root fail (not root, CI set)",
        }
    );

    let total = steps.len();
    let mut failed: Vec<(&str, Error)> = steps
        .into_iter()
        .filter_map(|s| match s.outcome {
            Outcome::Failed(error) => Some((s.name, error)),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        println!("test: all {total} steps passed");
        return Ok(());
    }
    let names: Vec<&str> = failed.iter().map(|(name, _)| *name).collect();
    println!("test: FAILED ({})", names.join(", "));
    // The first failure is the error, so its command's exit code becomes ours.
    Err(failed.swap_remove(0).1)
}
