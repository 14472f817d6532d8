//! `cargo xtask kernels`: conn-tracer booted on the kernels production
//! nodes run, and a matrix of what works on each.
//!
//! Debian's kernel packages (by name, newest of each series, cached under
//! `target/kernels/`) -> one initramfs (busybox-static, conn-tracer and its
//! libraries, an /init that runs `check`, `selftest` and a `trace` of one
//! loopback connection) -> one qemu TCG boot per kernel, one after another
//! -> the markers of each console log -> `target/kernels/matrix.txt`.

mod apt;
mod boot;
mod console;
mod initramfs;
mod matrix;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use self::{
    apt::{Image, Mirrors, PrivateApt},
    matrix::Outcome,
};
use crate::cmd::{cargo, run, target_dir};

/// Where a suite is served from: the machine's `.../debian` or
/// `.../debian-security` mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    Debian,
    Security,
}

/// The flavour booted: Debian's cloud kernel. It has everything the matrix
/// needs built in (BTF, BPF syscall, cgroup BPF, network namespaces, the
/// 8250 serial console: [`apt::missing_config`] checks each image), boots
/// a little faster under TCG than the generic amd64 flavour (~10.4 s vs
/// ~11.2 s to a shell for 6.12 on this machine: fewer drivers probe), and
/// is a third of its download (6.12: 34 MB vs 107 MB; 6.18: 49 vs 167).
/// Cloud nodes run it, too.
const FLAVOUR: &str = "cloud-amd64";

/// A kernel series of the matrix.
pub struct Series {
    /// What `--kernel` takes, e.g. `6.1`.
    pub name: &'static str,
    /// The package name's version part, `{}` standing for the ABI number
    /// that grows with each update.
    abi: &'static str,
    /// The suites that carry it.
    pub suites: &'static [(Archive, &'static str)],
    /// Distributions that ship this kernel (or one close to it).
    pub like: &'static str,
}

/// Bookworm's own suites (this machine's configured ones) carry 6.1 and,
/// since 12.11, 6.12; bullseye-security carries 5.10 and trixie-backports
/// 6.18. Ubuntu's 5.15 and 6.8 are not in Debian's archive: 5.10 and 6.1
/// bracket them.
pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        abi: "5.10.0-{}",
        suites: &[(Archive::Security, "bullseye-security")],
        like: "Debian 11, Amazon Linux 2",
    },
    Series {
        name: "6.1",
        abi: "6.1.0-{}",
        suites: &[
            (Archive::Debian, "bookworm"),
            (Archive::Security, "bookworm-security"),
        ],
        like: "Debian 12, Amazon Linux 2023, Bottlerocket, GKE COS",
    },
    Series {
        name: "6.12",
        abi: "6.12.{}+deb12",
        suites: &[
            (Archive::Debian, "bookworm"),
            (Archive::Security, "bookworm-security"),
        ],
        like: "Debian 12 (6.12 update), Debian 13",
    },
    Series {
        name: "6.18",
        abi: "6.18.{}+deb13",
        suites: &[(Archive::Debian, "trixie-backports")],
        like: "Debian 13 backports, current distributions",
    },
];

impl Series {
    /// `apt-cache search` regex of the series' packages (signed and unsigned).
    fn package_regex(&self) -> String {
        let (before, after) = self.abi.split_once("{}").expect("abi has {}");
        let escape = |s: &str| s.replace('.', r"\.").replace('+', r"\+");
        format!(
            "^linux-image-{}[0-9]+{}-{FLAVOUR}(-unsigned)?$",
            escape(before),
            escape(after)
        )
    }

    /// The ABI number of `package` if it is this series' flavour.
    fn abi_of(&self, package: &str) -> Option<u64> {
        let rest = package.strip_prefix("linux-image-")?;
        let rest = rest.strip_suffix("-unsigned").unwrap_or(rest);
        let version = rest.strip_suffix(FLAVOUR)?.strip_suffix('-')?;
        let (before, after) = self.abi.split_once("{}")?;
        let number = version.strip_prefix(before)?.strip_suffix(after)?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        number.parse().ok()
    }
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Boot this conn-tracer binary instead of building one
    /// (`cargo build --release -p tracer-user`).
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// Boot only this kernel series (5.10, 6.1, 6.12, 6.18); repeatable.
    #[arg(long = "kernel", value_name = "SERIES")]
    pub kernels: Vec<String>,
    /// Boot only the cached images: no apt-get, no network.
    #[arg(long)]
    pub offline: bool,
    /// Exit 0 even when a kernel fails (for iterating on one).
    #[arg(long)]
    pub allow_fail: bool,
}

/// A boot's limit on the host: every step's own limit in the guest plus
/// the boot itself, generously (TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(
    initramfs::CHECK_SECS + initramfs::SELFTEST_SECS + initramfs::TRACE_SECS + 180,
);

pub fn kernels(args: &Args) -> Result<()> {
    let started = Instant::now();
    ensure!(
        cfg!(target_arch = "x86_64"),
        "the kernel matrix boots amd64 kernels with this host's conn-tracer and busybox: \
         run it on an x86_64 machine"
    );
    let series = select(&args.kernels)?;
    apt::require("qemu-system-x86_64", "qemu-system-x86")?;
    apt::require("dpkg-deb", "dpkg")?;
    let dir = target_dir()?.join("kernels");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    println!("== kernels: images");
    let (images, downloaded) = if args.offline {
        (cached_images(&dir, &series)?, 0)
    } else {
        fetch_images(&dir, &series)?
    };
    for (series, image) in &images {
        let config = fs::read_to_string(&image.config)?;
        let missing = apt::missing_config(&config);
        ensure!(
            missing.is_empty(),
            "{} ({}) lacks {}: the matrix cannot run on it",
            image.package,
            series.name,
            missing.join(", ")
        );
    }

    let bin = if let Some(bin) = &args.bin {
        bin.clone()
    } else {
        println!("== kernels: build");
        // nightly with rust-src and bpf-linker build the kernel programs.
        crate::setup::ensure_toolchain()?;
        run(cargo().args(["build", "--release", "-p", "tracer-user"]))?;
        target_dir()?.join("release").join("conn-tracer")
    };
    ensure!(bin.is_file(), "{} is not a file", bin.display());
    println!("== kernels: initramfs");
    let staged = initramfs::stage(&bin, &dir)?;
    let initrd = dir.join("initramfs.cpio");
    let size = initramfs::build(&staged, &initrd)?;
    println!("initramfs: {} ({:.1} MB)", initrd.display(), mb(size));

    let mut outcomes = Vec::new();
    for (series, image) in images {
        let outcome = boot_one(series, image, &dir, &initrd)?;
        println!(
            "{}: {} in {:.1} s",
            outcome.image.release,
            outcome.verdict(),
            outcome.boot.took.as_secs_f64()
        );
        outcomes.push(outcome);
    }

    let text = matrix::render(
        &outcomes,
        &matrix::Run {
            bin: &bin,
            cmdline: boot::CMDLINE,
            downloaded,
            total: started.elapsed(),
        },
    );
    let path = dir.join("matrix.txt");
    fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    println!();
    print!("{text}");
    println!("(written to {})", path.display());

    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| o.series.name)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else if args.allow_fail {
        println!("kernels: failed on {} (--allow-fail)", failed.join(", "));
        Ok(())
    } else {
        bail!("conn-tracer fails on kernel {}", failed.join(", "))
    }
}

/// Boots `image` with `initrd` and reads its console log back.
fn boot_one(series: &'static Series, image: Image, dir: &Path, initrd: &Path) -> Result<Outcome> {
    println!("== kernels: boot {} ({})", image.release, series.name);
    let log = dir.join(format!("{}.log", image.release));
    let boot = boot::boot(&image.vmlinuz, initrd, &log, BOOT_TIMEOUT)?;
    let text = fs::read(&log).with_context(|| format!("cannot read {}", log.display()))?;
    Ok(Outcome {
        series,
        image,
        boot,
        console: console::parse(&String::from_utf8_lossy(&text)),
        log,
    })
}

/// The series `--kernel` names, in matrix order; all without it.
fn select(names: &[String]) -> Result<Vec<&'static Series>> {
    for name in names {
        if !SERIES.iter().any(|s| s.name == name) {
            let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
            bail!(
                "no kernel series {name}: the matrix has {}",
                known.join(", ")
            );
        }
    }
    Ok(SERIES
        .iter()
        .filter(|s| names.is_empty() || names.iter().any(|n| n == s.name))
        .collect())
}

fn mb(bytes: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "sizes far below 2^52")]
    let bytes = bytes as f64;
    bytes / 1e6
}

/// Resolves the newest package of each series through the private apt
/// configuration and downloads the ones not cached. Returns the images and
/// the bytes downloaded.
fn fetch_images(
    dir: &Path,
    series: &[&'static Series],
) -> Result<(Vec<(&'static Series, Image)>, u64)> {
    let mirrors = Mirrors::from_system();
    println!(
        "mirrors (from the machine's apt sources): {} and {}",
        mirrors.debian.as_deref().unwrap_or("-"),
        mirrors.security.as_deref().unwrap_or("-")
    );
    let apt = PrivateApt::new(dir);
    apt.write(&mirrors, series)?;
    apt.update()?;
    let mut images = Vec::new();
    let mut downloaded = 0;
    for &s in series {
        let regex = s.package_regex();
        let names = apt.search(&regex)?;
        let suites: Vec<&str> = s.suites.iter().map(|(_, suite)| *suite).collect();
        let package = apt::newest(s, names.iter().map(String::as_str)).with_context(|| {
            format!(
                "no package matches {regex} in {}: has Debian renamed the series?",
                suites.join(", ")
            )
        })?;
        let (version, size) = apt.candidate(package)?;
        let image_dir = dir.join("images").join(format!("{package}_{version}"));
        let image = if let Some(image) = Image::cached(&image_dir) {
            println!("{}: {package} {version}, cached", s.name);
            image
        } else {
            println!(
                "{}: {package} {version}, downloading {:.1} MB",
                s.name,
                mb(size)
            );
            let debs = dir.join("debs");
            let deb = apt.download(package, &version, &debs)?;
            downloaded += fs::metadata(&deb)?.len();
            let image = Image::extract(&deb, &image_dir)?;
            // Only vmlinuz and config are kept: the modules are not booted.
            fs::remove_file(&deb)?;
            image
        };
        images.push((s, image));
    }
    Ok((images, downloaded))
}

/// The newest cached image of each series.
fn cached_images(dir: &Path, series: &[&'static Series]) -> Result<Vec<(&'static Series, Image)>> {
    let cached: Vec<Image> = fs::read_dir(dir.join("images"))
        .map(|entries| {
            entries
                .filter_map(|e| Image::cached(&e.ok()?.path()))
                .collect()
        })
        .unwrap_or_default();
    series
        .iter()
        .map(|&s| {
            let newest = apt::newest(s, cached.iter().map(|i| i.package.as_str()))
                .and_then(|package| {
                    cached
                        .iter()
                        .filter(|i| i.package == package)
                        .max_by(|a, b| a.version.cmp(&b.version))
                })
                .with_context(|| {
                    format!(
                        "no cached image of {} under {}: run once without --offline",
                        s.name,
                        dir.join("images").display()
                    )
                })?;
            println!("{}: {} {}, cached", s.name, newest.package, newest.version);
            Ok((s, newest.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_regex_matches_the_flavour_of_the_series() {
        assert_eq!(
            SERIES[2].package_regex(),
            r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64(-unsigned)?$"
        );
        assert_eq!(
            SERIES[1].package_regex(),
            r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64(-unsigned)?$"
        );
        let s61 = &SERIES[1];
        assert_eq!(s61.abi_of("linux-image-6.1.0-57-cloud-amd64"), Some(57));
        assert_eq!(
            s61.abi_of("linux-image-6.1.0-57-cloud-amd64-unsigned"),
            Some(57)
        );
        assert_eq!(s61.abi_of("linux-image-6.1.0-57-amd64"), None);
        assert_eq!(s61.abi_of("linux-image-6.1.0-57-cloud-amd64-dbg"), None);
        assert_eq!(s61.abi_of("linux-image-6.1.0-0.deb11.60-cloud-amd64"), None);
        assert_eq!(
            SERIES[2].abi_of("linux-image-6.12.117+deb12-cloud-amd64"),
            Some(117)
        );
    }

    #[test]
    fn select_keeps_matrix_order_and_refuses_unknown_series() {
        let names = |v: &[&str]| {
            let args: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
            select(&args).map(|s| s.iter().map(|s| s.name).collect::<Vec<_>>())
        };
        assert_eq!(names(&[]).unwrap(), ["5.10", "6.1", "6.12", "6.18"]);
        assert_eq!(names(&["6.18", "5.10"]).unwrap(), ["5.10", "6.18"]);
        assert!(names(&["5.15"]).unwrap_err().to_string().contains("5.15"));
    }
}
