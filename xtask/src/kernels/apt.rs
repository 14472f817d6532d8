//! Debian kernel images through a private apt configuration: the mirrors
//! come from the machine's own apt sources, everything else (sources list,
//! lists, cache, config parts) lives under `target/kernels/apt/`, so the
//! system's apt configuration and state are never touched.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use super::{Archive, Series};
use crate::cmd::{display, is_root, probe, run};

/// The keyring every Debian suite of the matrix is checked against; its
/// bookworm version (2023.3+deb12u1 and later) has the bullseye and trixie
/// keys too.
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Where the machine's apt sources are (one-line and deb822 formats).
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// The machine's Debian mirrors: the `.../debian` and `.../debian-security`
/// URIs of its apt sources.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mirrors {
    pub debian: Option<String>,
    pub security: Option<String>,
}

impl Mirrors {
    /// Reads the machine's apt sources.
    pub fn from_system() -> Self {
        let mut files = Vec::new();
        if let Ok(text) = fs::read_to_string(SOURCES_LIST) {
            files.push((PathBuf::from(SOURCES_LIST), text));
        }
        if let Ok(dir) = fs::read_dir(SOURCES_DIR) {
            let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths {
                let is_source = path
                    .extension()
                    .is_some_and(|ext| ext == "list" || ext == "sources");
                if is_source && let Ok(text) = fs::read_to_string(&path) {
                    files.push((path, text));
                }
            }
        }
        let mut mirrors = Self::default();
        for (path, text) in &files {
            let uris = if path.extension().is_some_and(|ext| ext == "sources") {
                deb822_uris(text)
            } else {
                one_line_uris(text)
            };
            for uri in uris {
                mirrors.add(&uri);
            }
        }
        mirrors.complete();
        mirrors
    }

    /// Takes `uri` if it is the first debian or debian-security mirror seen.
    fn add(&mut self, uri: &str) {
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return;
        }
        let uri = uri.trim_end_matches('/');
        let slot = match uri.rsplit('/').next() {
            Some("debian") => &mut self.debian,
            Some("debian-security") => &mut self.security,
            _ => return,
        };
        if slot.is_none() {
            *slot = Some(uri.to_owned());
        }
    }

    /// A machine with only the main archive configured still has the
    /// security archive next to it on every Debian mirror.
    fn complete(&mut self) {
        if self.security.is_none()
            && let Some(debian) = &self.debian
        {
            self.security = Some(format!("{debian}-security"));
        }
    }

    fn get(&self, archive: Archive) -> Result<&str> {
        let (uri, name) = match archive {
            Archive::Debian => (&self.debian, "debian"),
            Archive::Security => (&self.security, "debian-security"),
        };
        uri.as_deref().with_context(|| {
            format!(
                "no Debian mirror in the machine's apt sources ({SOURCES_LIST}, \
                 {SOURCES_DIR}/*.sources, *.list): the kernel images are fetched from the \
                 `.../{name}` URI found there (e.g. http://deb.debian.org/{name}); add a \
                 Debian source, or run with --offline on cached images"
            )
        })
    }
}

/// The URIs of the enabled `deb` stanzas of a deb822 `.sources` file.
fn deb822_uris(text: &str) -> Vec<String> {
    let mut uris = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    // A blank line ends a stanza; the end of the text too.
    for line in text.lines().chain([""]) {
        if line.trim().is_empty() {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.as_str())
            };
            let is_deb = field("types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
            let enabled = field("enabled").is_none_or(|e| !e.eq_ignore_ascii_case("no"));
            if is_deb && enabled {
                let found = field("uris").unwrap_or_default().split_whitespace();
                uris.extend(found.map(str::to_owned));
            }
            fields.clear();
        } else if line.starts_with([' ', '\t']) {
            // A continuation line (multi-line values).
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if !line.starts_with('#')
            && let Some((key, value)) = line.split_once(':')
        {
            fields.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    uris
}

/// The URIs of the `deb` lines of a one-line-style `.list` file.
fn one_line_uris(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or_default().trim();
            let rest = line.strip_prefix("deb")?;
            if !rest.starts_with([' ', '\t']) {
                return None; // deb-src
            }
            let rest = rest.trim_start();
            // Options: `deb [arch=amd64 signed-by=...] URI suite ...`.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            rest.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}

/// The apt configuration under `target/kernels/apt/`.
pub struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    pub fn new(kernels_dir: &Path) -> Self {
        Self {
            dir: kernels_dir.join("apt"),
        }
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("apt.conf")
    }

    /// Writes the configuration: one deb822 source per archive with the
    /// suites of `series`.
    pub fn write(&self, mirrors: &Mirrors, series: &[&Series]) -> Result<()> {
        ensure!(
            Path::new(KEYRING).exists(),
            "{KEYRING} is missing: install debian-archive-keyring (the kernel images' \
             signatures are checked against it)"
        );
        for sub in [
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/sources.list.d",
            "etc/trusted.gpg.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            fs::create_dir_all(self.dir.join(sub))
                .with_context(|| format!("cannot create {}", self.dir.join(sub).display()))?;
        }
        let status = self.dir.join("state/status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let mut sources = String::from(
            "# Written by `cargo xtask kernels`: the suites of the kernel matrix at the\n\
             # machine's own Debian mirrors.\n",
        );
        for archive in [Archive::Debian, Archive::Security] {
            let mut suites: Vec<&str> = series
                .iter()
                .flat_map(|s| s.suites.iter())
                .filter(|(a, _)| *a == archive)
                .map(|(_, suite)| *suite)
                .collect();
            suites.sort_unstable();
            suites.dedup();
            if suites.is_empty() {
                continue;
            }
            write!(
                sources,
                "\nTypes: deb\nURIs: {}\nSuites: {}\nComponents: main\nSigned-By: {KEYRING}\n",
                mirrors.get(archive)?,
                suites.join(" ")
            )?;
        }
        // The directory is ours: no other source may linger in it.
        let stale = self.dir.join("etc/sources.list");
        if stale.exists() {
            fs::remove_file(&stale)?;
        }
        fs::write(self.dir.join("etc/sources.list.d/kernels.sources"), sources)?;
        fs::write(self.config_file(), apt_conf(&self.dir, is_root()))?;
        Ok(())
    }

    /// `apt-get`/`apt-cache` reading only the private configuration:
    /// APT_CONFIG is read before /etc/apt/apt.conf.d, and its Dir::Etc
    /// moves the parts directory too, so none of the system's settings or
    /// hooks (APT::Update::Post-Invoke, ...) apply.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.config_file());
        cmd
    }

    /// `apt-get update`; any warning (a suite whose key the keyring lacks,
    /// a missing suite) fails it.
    pub fn update(&self) -> Result<()> {
        run(self
            .command("apt-get")
            .args(["update", "--error-on=any", "-q"]))
        .with_context(|| {
            format!(
                "apt-get update of the private configuration under {} failed: NO_PUBKEY or \
                 \"not signed\" means {KEYRING} lacks the suite's key (upgrade \
                 debian-archive-keyring); no network: run with --offline on cached images",
                self.dir.display()
            )
        })
    }

    /// The names of the packages that match `regex`.
    pub fn search(&self, regex: &str) -> Result<Vec<String>> {
        let mut cmd = self.command("apt-cache");
        cmd.args(["search", "--names-only", regex]);
        let out = probe(&mut cmd).with_context(|| format!("`{}` failed", display(&cmd)))?;
        Ok(out
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    /// The candidate version and the .deb size of `package`.
    pub fn candidate(&self, package: &str) -> Result<(String, u64)> {
        let mut cmd = self.command("apt-cache");
        cmd.args(["show", "--no-all-versions", package]);
        let out = probe(&mut cmd).with_context(|| format!("`{}` failed", display(&cmd)))?;
        let field = |name: &str| {
            out.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let version = field("Version").with_context(|| format!("{package} has no Version"))?;
        let size = field("Size").and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((version.to_owned(), size))
    }

    /// `apt-get download package=version` into `dir`; returns the .deb.
    pub fn download(&self, package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir)?;
        run(self
            .command("apt-get")
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(dir))?;
        // apt-get names it package_version_arch.deb, with the epoch's colon
        // escaped; find it rather than rebuilding the name.
        let prefix = format!("{package}_");
        fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                let name = p.file_name().and_then(|n| n.to_str());
                name.is_some_and(|n| n.starts_with(&prefix))
                    && p.extension().is_some_and(|ext| ext == "deb")
            })
            .with_context(|| {
                format!(
                    "apt-get download left no {prefix}*.deb in {}",
                    dir.display()
                )
            })
    }
}

/// The private apt.conf: every directory apt reads or writes under `dir`.
fn apt_conf(dir: &Path, root: bool) -> String {
    let dir = dir.display();
    let mut conf = format!(
        "// Written by `cargo xtask kernels`; used through APT_CONFIG only.\n\
         Dir::Etc \"{dir}/etc/\";\n\
         Dir::State \"{dir}/state/\";\n\
         Dir::State::status \"{dir}/state/status\";\n\
         Dir::Cache \"{dir}/cache/\";\n\
         APT::Architecture \"amd64\";\n\
         APT::Architectures {{ \"amd64\"; }};\n\
         Acquire::Languages \"none\";\n\
         // Lists stay compressed (bookworm's is 50 MB unpacked); no source\n\
         // package cache: only binary packages are looked up.\n\
         Acquire::GzipIndexes \"true\";\n\
         Dir::Cache::srcpkgcache \"\";\n"
    );
    if root {
        // As root apt drops to _apt for downloads, and _apt cannot write
        // into the root-owned target directory.
        conf.push_str("APT::Sandbox::User \"root\";\n");
    }
    conf
}

/// The kernel image of one package, extracted: `vmlinuz-RELEASE` and
/// `config-RELEASE` in `images/PACKAGE_VERSION/`.
#[derive(Debug, Clone)]
pub struct Image {
    pub package: String,
    pub version: String,
    /// `uname -r`, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub config: PathBuf,
}

impl Image {
    /// The cached image in `dir` (named `PACKAGE_VERSION`), if complete:
    /// the vmlinuz is written last.
    pub fn cached(dir: &Path) -> Option<Self> {
        let (package, version) = dir.file_name()?.to_str()?.split_once('_')?;
        let entries: Vec<String> = fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let release = entries.iter().find_map(|n| n.strip_prefix("vmlinuz-"))?;
        let config = dir.join(format!("config-{release}"));
        config.exists().then(|| Self {
            package: package.to_owned(),
            version: version.to_owned(),
            release: release.to_owned(),
            vmlinuz: dir.join(format!("vmlinuz-{release}")),
            config,
        })
    }

    /// Extracts /boot/vmlinuz-* and /boot/config-* of `deb` into `dir`.
    pub fn extract(deb: &Path, dir: &Path) -> Result<Self> {
        let staging = dir.with_extension("partial");
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir_all(&staging)?;
        let mut dpkg = Command::new("dpkg-deb");
        dpkg.arg("--fsys-tarfile").arg(deb).stdout(Stdio::piped());
        let mut tar = Command::new("tar");
        tar.arg("-x").arg("-C").arg(&staging).args([
            "--wildcards",
            "./boot/vmlinuz-*",
            "./boot/config-*",
        ]);
        println!("$ {} | {}", display(&dpkg), display(&tar));
        let mut dpkg_child = dpkg
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&dpkg)))?;
        let tar_status = tar
            .stdin(dpkg_child.stdout.take().expect("piped"))
            .status()
            .with_context(|| format!("cannot start `{}`", display(&tar)))?;
        let dpkg_status = dpkg_child.wait()?;
        ensure!(
            dpkg_status.success() && tar_status.success(),
            "extracting the kernel from {} failed (dpkg-deb: {dpkg_status}, tar: {tar_status})",
            deb.display()
        );
        let boot = staging.join("boot");
        let vmlinuz = fs::read_dir(&boot)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.starts_with("vmlinuz-"))
            .with_context(|| format!("{} has no /boot/vmlinuz-*", deb.display()))?;
        let release = vmlinuz["vmlinuz-".len()..].to_owned();
        let config = format!("config-{release}");
        ensure!(
            boot.join(&config).exists(),
            "{} has no /boot/{config}",
            deb.display()
        );
        fs::create_dir_all(dir)?;
        fs::rename(boot.join(&config), dir.join(&config))?;
        fs::rename(boot.join(&vmlinuz), dir.join(&vmlinuz))?;
        fs::remove_dir_all(&staging)?;
        Self::cached(dir).with_context(|| format!("{} is incomplete", dir.display()))
    }
}

/// Kernel options the matrix needs built in (no modules are loaded: the
/// initramfs has none), and why.
const REQUIRED_CONFIG: &[(&str, &str)] = &[
    ("CONFIG_DEBUG_INFO_BTF", "BTF at /sys/kernel/btf/vmlinux"),
    ("CONFIG_BPF_SYSCALL", "the bpf() system call"),
    ("CONFIG_CGROUP_BPF", "cgroup and sock_ops programs"),
    ("CONFIG_NET_NS", "selftest's network namespace"),
    ("CONFIG_SERIAL_8250_CONSOLE", "the console on ttyS0"),
    ("CONFIG_BLK_DEV_INITRD", "the initramfs"),
    ("CONFIG_DEVTMPFS", "/dev"),
];

/// The required options a kernel config lacks (not `=y`), with why each
/// is needed.
pub fn missing_config(config: &str) -> Vec<String> {
    REQUIRED_CONFIG
        .iter()
        .filter(|(option, _)| {
            !config
                .lines()
                .any(|line| line.strip_prefix(option) == Some("=y"))
        })
        .map(|(option, why)| format!("{option}=y ({why})"))
        .collect()
}

/// The newest package of `series` among `names`: the highest ABI number in
/// the series' name pattern; the signed package (the one users install)
/// before the `-unsigned` one of the same kernel.
pub fn newest<'a>(series: &Series, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter_map(|name| Some((series.abi_of(name)?, !name.ends_with("-unsigned"), name)))
        .max()
        .map(|(_, _, name)| name)
}

/// Fails unless `program` is on PATH, naming the package that has it.
pub fn require(program: &str, package: &str) -> Result<()> {
    if crate::cmd::find_program(program).is_none() {
        bail!("{program} is missing: install {package} (`cargo xtask setup` does)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::SERIES;

    fn series(name: &str) -> &'static Series {
        SERIES.iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn deb822_stanzas_give_their_uris_unless_disabled_or_deb_src() {
        // This machine's /etc/apt/sources.list.d/debian.sources, plus cases.
        let text = "Types: deb\n\
                    # http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                    URIs: http://deb.debian.org/debian\n\
                    Suites: bookworm bookworm-updates\n\
                    Components: main\n\
                    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
                    \n\
                    Types: deb\n\
                    URIs: http://deb.debian.org/debian-security\n\
                    Suites: bookworm-security\n\
                    Components: main\n\
                    \n\
                    Types: deb-src\n\
                    URIs: http://src.example/debian\n\
                    \n\
                    Types: deb\n\
                    Enabled: no\n\
                    URIs: http://disabled.example/debian\n\
                    \n\
                    types: deb deb-src\n\
                    uris:\n  http://a.example/debian\n  http://b.example/debian\n";
        assert_eq!(
            deb822_uris(text),
            [
                "http://deb.debian.org/debian",
                "http://deb.debian.org/debian-security",
                "http://a.example/debian",
                "http://b.example/debian",
            ]
        );
    }

    #[test]
    fn one_line_sources_give_deb_uris_with_or_without_options() {
        let text = "# comment\n\
                    deb http://deb.debian.org/debian bookworm main\n\
                    deb-src http://deb.debian.org/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] https://mirror.example/debian-security/ bookworm-security main # why\n\
                    #deb http://commented.example/debian bookworm main\n\
                    debx http://odd.example/debian bookworm main\n";
        assert_eq!(
            one_line_uris(text),
            [
                "http://deb.debian.org/debian",
                "https://mirror.example/debian-security/"
            ]
        );
    }

    #[test]
    fn mirrors_are_the_first_debian_and_debian_security_uris() {
        let mut m = Mirrors::default();
        for uri in [
            "http://snapshot.debian.org/archive/debian/20250520T000000Z",
            "https://deb.nodesource.com/node_20.x",
            "cdrom:/debian",
            "https://mirror.example/debian-security/",
            "http://deb.debian.org/debian",
            "http://other.example/debian",
        ] {
            m.add(uri);
        }
        m.complete();
        assert_eq!(
            m,
            Mirrors {
                debian: Some("http://deb.debian.org/debian".into()),
                security: Some("https://mirror.example/debian-security".into()),
            }
        );
        let mut only_main = Mirrors::default();
        only_main.add("http://ftp.de.debian.org/debian/");
        only_main.complete();
        assert_eq!(
            only_main.security.as_deref(),
            Some("http://ftp.de.debian.org/debian-security")
        );
        assert!(Mirrors::default().get(Archive::Debian).is_err());
    }

    #[test]
    fn newest_takes_the_highest_abi_of_the_series_and_prefers_signed() {
        // Names as `apt-cache search` lists them (bookworm + bookworm-security
        // + bullseye-security + trixie-backports, 2026-12-01).
        let names = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64-dbg",
            "linux-image-6.1.0-57-amd64",
            // bullseye's 6.1 backport: another series of names.
            "linux-image-6.1.0-0.deb11.60-cloud-amd64",
            "linux-image-6.12.115+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12-cloud-amd64",
            "linux-image-5.10.0-46-cloud-amd64",
            "linux-image-5.10.0-100-rt-amd64",
            "linux-image-6.18.9+deb13-cloud-amd64",
            "linux-image-6.18.15+deb13-cloud-amd64",
        ];
        for (name, want) in [
            ("6.1", "linux-image-6.1.0-57-cloud-amd64"),
            ("6.12", "linux-image-6.12.117+deb12-cloud-amd64-unsigned"),
            ("5.10", "linux-image-5.10.0-46-cloud-amd64"),
            ("6.18", "linux-image-6.18.15+deb13-cloud-amd64"),
        ] {
            assert_eq!(newest(series(name), names), Some(want), "series {name}");
        }
        assert_eq!(newest(series("6.18"), ["linux-image-6.18-amd64"]), None);
    }

    #[test]
    fn missing_config_names_options_not_built_in() {
        let config = "CONFIG_DEBUG_INFO_BTF=y\n\
                      CONFIG_BPF_SYSCALL=y\n\
                      CONFIG_CGROUP_BPF=y\n\
                      # CONFIG_NET_NS is not set\n\
                      CONFIG_SERIAL_8250_CONSOLE=m\n\
                      CONFIG_BLK_DEV_INITRD=y\n\
                      CONFIG_DEVTMPFS=y\n\
                      CONFIG_DEBUG_INFO_BTF_MODULES=y\n";
        assert_eq!(
            missing_config(config),
            [
                "CONFIG_NET_NS=y (selftest's network namespace)",
                "CONFIG_SERIAL_8250_CONSOLE=y (the console on ttyS0)"
            ]
        );
    }

    #[test]
    fn apt_conf_moves_every_directory_and_unsandboxes_only_root() {
        let conf = apt_conf(Path::new("/t/kernels/apt"), false);
        for line in [
            "Dir::Etc \"/t/kernels/apt/etc/\";",
            "Dir::State \"/t/kernels/apt/state/\";",
            "Dir::State::status \"/t/kernels/apt/state/status\";",
            "Dir::Cache \"/t/kernels/apt/cache/\";",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing in\n{conf}");
        }
        assert!(!conf.contains("Sandbox"));
        assert!(apt_conf(Path::new("/t"), true).contains("APT::Sandbox::User \"root\";"));
    }
}
