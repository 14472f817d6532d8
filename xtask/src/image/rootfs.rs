//! The image's root filesystem: the binary, exactly the shared libraries
//! it loads (at the paths `ldd` names, where the dynamic loader looks), and
//! under /usr/share/doc the licences and sources of all of it. Each shared
//! library comes with its Debian package's copyright file and a dpkg status
//! entry (`/var/lib/dpkg/status.d/PACKAGE`, as distroless images have), so
//! that image scanners know its version.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use super::{Project, licences};
use crate::cmd::{display, find_program, ldd, probe, run};

/// Where the binary is in the image (deploy/Dockerfile's ENTRYPOINT).
pub const BINARY: &str = "usr/local/bin/conn-tracer";
/// The directory of the image's notices, licences and sources.
pub const DOC: &str = "usr/share/doc/conn-tracer";

/// The licence (SPDX) of each Debian package whose libraries the binary
/// loads, read from its /usr/share/doc/PACKAGE/copyright. A package not here
/// stops the build: read its copyright file, then add it.
const DEBIAN_LICENSES: &[(&str, &str)] = &[
    // The GNU C Library: libc.so.6, libm.so.6 and the dynamic loader.
    ("libc6", "LGPL-2.1-or-later"),
    // libgcc_s.so.1 (stack unwinding): GCC's runtime library exception.
    ("libgcc-s1", "GPL-3.0-or-later WITH GCC-exception-3.1"),
];

/// A Debian package the image takes files from.
#[derive(Debug, Clone)]
pub struct DebianPackage {
    pub name: String,
    pub version: String,
    pub source: String,
    pub source_version: String,
    pub license: &'static str,
    pub files: Vec<PathBuf>,
}

/// The assembled tree.
#[derive(Debug)]
pub struct Rootfs {
    pub files: usize,
    pub bytes: u64,
}

/// Fills `dir` (absent or empty) with the image's files for `bin`.
pub fn assemble(bin: &Path, dir: &Path, project: &Project) -> Result<Rootfs> {
    println!("== image: root filesystem in {}", dir.display());
    if dir.exists() {
        let empty = fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        ensure!(
            empty,
            "{} is not empty: the root filesystem goes into an empty directory",
            dir.display()
        );
    }
    ensure!(
        bin.is_file(),
        "{} is not a file: build it first",
        bin.display()
    );
    let binary = dir.join(BINARY);
    create_parent(&binary)?;
    if let Some(strip) = find_program("strip") {
        // Debug info only: symbols stay, for readable backtraces.
        run(Command::new(strip)
            .arg("--strip-debug")
            .arg("-o")
            .arg(&binary)
            .arg(bin))?;
    } else {
        copy(bin, &binary)?;
    }
    set_mode(&binary, 0o755)?;

    let libs = ldd(bin)?;
    let packages = debian_packages(&libs)?;
    for lib in &libs {
        let to = dir.join(lib.strip_prefix("/").unwrap_or(lib));
        create_parent(&to)?;
        // The file itself (fs::copy follows symlinks: /lib64's loader is one).
        copy(lib, &to)?;
        set_mode(&to, 0o755)?;
    }
    for pkg in &packages {
        let copyright = format!("usr/share/doc/{}/copyright", pkg.name);
        let to = dir.join(&copyright);
        create_parent(&to)?;
        copy(&Path::new("/").join(&copyright), &to)?;
        let status = dir.join("var/lib/dpkg/status.d").join(&pkg.name);
        create_parent(&status)?;
        write(&status, &dpkg_status(&pkg.name)?)?;
    }

    let doc = dir.join(DOC);
    let sources = doc.join("source");
    fs::create_dir_all(&sources).with_context(|| format!("cannot create {}", sources.display()))?;
    let crates = licences::third_party(project)?;
    write(
        &doc.join("THIRD-PARTY-LICENSES.txt"),
        &crates.render(project),
    )?;
    for krate in &crates.copyleft {
        copy(&krate.archive, &sources.join(krate.archive_name()))?;
    }
    let tarball = format!("conn-tracer-{}.tar.gz", project.version);
    source_tarball(project, &sources.join(&tarball))?;
    write(
        &doc.join("README"),
        &notice(project, &libs, &packages, &crates, &tarball),
    )?;
    licences::check_label(project, &crates, &packages)?;

    let (files, bytes) = du(dir)?;
    ensure!(
        bytes <= super::SIZE_LIMIT,
        "the image's files take {:.1} MB, over the {:.0} MB this project promises",
        super::mb(bytes),
        super::mb(super::SIZE_LIMIT)
    );
    Ok(Rootfs { files, bytes })
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().expect("a path inside the root filesystem");
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// Regular files under `dir` and their total size.
fn du(dir: &Path) -> Result<(usize, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (f, b) = du(&entry.path())?;
            files += f;
            bytes += b;
        } else {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

/// The Debian package of each library (`dpkg-query -S`), with its version
/// and source package; fails for a file no package owns or a package
/// without a known licence.
fn debian_packages(libs: &[PathBuf]) -> Result<Vec<DebianPackage>> {
    let mut by_name: BTreeMap<String, DebianPackage> = BTreeMap::new();
    for lib in libs {
        let name = dpkg_owner(lib)?;
        if let Some(pkg) = by_name.get_mut(&name) {
            pkg.files.push(lib.clone());
            continue;
        }
        let license = DEBIAN_LICENSES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| *l)
            .with_context(|| {
                format!(
                    "{} comes from Debian package {name}, whose licence this image does not \
                     know yet: read /usr/share/doc/{name}/copyright and add it to \
                     DEBIAN_LICENSES in xtask/src/image/rootfs.rs",
                    lib.display()
                )
            })?;
        let query = |field: &str| {
            probe(Command::new("dpkg-query").args(["-W", "-f", field, &name]))
                .map(|s| s.trim().to_owned())
                .with_context(|| format!("`dpkg-query -W -f '{field}' {name}` failed"))
        };
        let version = query("${Version}")?;
        let source = query("${source:Package}")?;
        let source_version = query("${source:Version}")?;
        by_name.insert(
            name.clone(),
            DebianPackage {
                name,
                version,
                source,
                source_version,
                license,
                files: vec![lib.clone()],
            },
        );
    }
    Ok(by_name.into_values().collect())
}

/// `libc6` from `dpkg-query -S`; merged-/usr systems list a file under
/// /lib or /usr/lib, so both spellings are asked.
fn dpkg_owner(lib: &Path) -> Result<String> {
    let text = lib.to_string_lossy();
    let mut candidates = vec![text.to_string()];
    if let Some(rest) = text.strip_prefix("/usr") {
        candidates.push(rest.to_owned());
    } else {
        candidates.push(format!("/usr{text}"));
    }
    if let Ok(real) = fs::canonicalize(lib) {
        candidates.push(real.to_string_lossy().into_owned());
    }
    for path in &candidates {
        if let Some(out) = probe(Command::new("dpkg-query").args(["-S", path])) {
            // `libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6`
            if let Some((pkg, _)) = out.lines().next().and_then(|l| l.split_once(": ")) {
                return Ok(pkg.split(':').next().unwrap_or(pkg).to_owned());
            }
        }
    }
    bail!(
        "no Debian package owns {} (`dpkg-query -S`): the image ships each shared library \
         with its package's licence, so build on Debian or Ubuntu",
        lib.display()
    )
}

/// A dpkg status entry for `package` (the fields image scanners read).
fn dpkg_status(package: &str) -> Result<String> {
    let format = "Package: ${Package}\\nStatus: ${Status}\\nPriority: ${Priority}\\n\
                  Section: ${Section}\\nMaintainer: ${Maintainer}\\nArchitecture: ${Architecture}\\n\
                  Multi-Arch: ${Multi-Arch}\\nSource: ${source:Package} (${source:Version})\\n\
                  Version: ${Version}\\n";
    probe(Command::new("dpkg-query").args(["-W", "-f", format, package]))
        .with_context(|| format!("`dpkg-query -W {package}` failed"))
}

/// The files of conn-tracer's source: what git tracks or would (the work
/// tree's content, so a dirty build ships what it was built from), else every
/// file but what deploy/Dockerfile.dockerignore leaves out of a build
/// context (a Docker build has no .git).
fn source_files(root: &Path, target: &Path) -> Result<Vec<PathBuf>> {
    if let Some(out) = probe(Command::new("git").arg("-C").arg(root).args([
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ])) {
        let files: Vec<PathBuf> = out
            .split('\0')
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
            .filter(|f| root.join(f).is_file())
            .collect();
        if !files.is_empty() {
            return Ok(files);
        }
    }
    let ignore = fs::read_to_string(root.join("deploy/Dockerfile.dockerignore"))
        .context("cannot read deploy/Dockerfile.dockerignore")?;
    // Cargo's target directory is the build's own output (`target` in a
    // Docker build, or wherever CARGO_TARGET_DIR points inside the tree).
    let own = target
        .strip_prefix(root)
        .ok()
        .map(|rel| rel.to_string_lossy().into_owned());
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .chain(["target"])
        .chain(own.as_deref())
        .collect();
    let mut files = Vec::new();
    walk(root, Path::new(""), &patterns, &mut files)?;
    files.sort();
    Ok(files)
}

/// Whether dockerignore `pattern` (`dir/sub`, or `**/name`) leaves `rel` out.
fn ignored(rel: &Path, pattern: &str) -> bool {
    match pattern.strip_prefix("**/") {
        Some(name) => rel.components().any(|c| c.as_os_str() == name),
        None => rel.starts_with(pattern),
    }
}

fn walk(root: &Path, rel: &Path, patterns: &[&str], out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let path = rel.join(entry.file_name());
        if patterns.iter().any(|p| ignored(&path, p)) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &path, patterns, out)?;
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// conn-tracer's complete source as `conn-tracer-VERSION/...` in a
/// reproducible tar.gz (sorted, root-owned, the commit's time).
fn source_tarball(project: &Project, out: &Path) -> Result<()> {
    let files = source_files(&project.root, &project.target)?;
    let mut cmd = Command::new("tar");
    cmd.args(["--create", "--gzip", "--file"])
        .arg(out)
        .arg("--directory")
        .arg(&project.root)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        ])
        .arg(format!("--mtime=@{}", project.epoch))
        .arg(format!("--transform=s,^,conn-tracer-{}/,", project.version))
        .args(["--no-recursion", "--null", "--files-from=-"])
        .stdin(Stdio::piped());
    println!("$ {} <<< ({} files)", display(&cmd), files.len());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for f in &files {
            stdin.write_all(f.as_os_str().as_encoded_bytes())?;
            stdin.write_all(b"\0")?;
        }
    }
    let status = child.wait()?;
    ensure!(status.success(), "`{}` failed ({status})", display(&cmd));
    Ok(())
}

/// /usr/share/doc/conn-tracer/README: what the image holds, under which
/// licences, where each source is, and how to relink the LGPL parts.
fn notice(
    project: &Project,
    libs: &[PathBuf],
    packages: &[DebianPackage],
    crates: &licences::Crates,
    tarball: &str,
) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let v = &project.version;
    let _ = writeln!(
        s,
        "conn-tracer {v} container image (revision {})\n{}\n",
        project.revision, project.repository
    );
    let _ = writeln!(s, "What is here, and under which licence:\n");
    let _ = writeln!(
        s,
        "/{BINARY}\n    conn-tracer {v}: {}.\n    \
         Built from source/{tarball} (the complete source; its Cargo.lock pins\n    \
         every crate). The {} crates compiled into it (the daemon and its embedded\n    \
         kernel programs) and their licence texts: THIRD-PARTY-LICENSES.txt.",
        project.license, crates.count
    );
    for lib in libs {
        let pkg = packages
            .iter()
            .find(|p| p.files.contains(lib))
            .expect("every library has its package");
        let _ = writeln!(
            s,
            "{}\n    From Debian package {} {} (source package {}), unmodified.\n    \
             {}; licence and copyright: /usr/share/doc/{}/copyright.",
            lib.display(),
            pkg.name,
            pkg.version,
            pkg.source,
            pkg.license,
            pkg.name
        );
    }
    let _ = writeln!(s);
    if !crates.copyleft.is_empty() {
        let names: Vec<String> = crates
            .copyleft
            .iter()
            .map(|c| format!("{} {} ({})", c.name, c.version, c.license))
            .collect();
        let _ = writeln!(
            s,
            "Copyleft libraries in the binary: {}.\n\n\
             conn-tracer uses these libraries, and their use is covered by their licence\n\
             (the GNU Lesser General Public License: its text is in\n\
             THIRD-PARTY-LICENSES.txt). They are linked statically, as Rust links every\n\
             crate. To let you modify them and relink, this image carries:\n\
             - their exact source as published on crates.io: source/*.crate (the\n  \
               checksums are those in Cargo.lock);\n\
             - the complete source of conn-tracer: source/{tarball}.\n\
             To build conn-tracer with a modified copy, unpack both side by side, add to\n\
             conn-tracer's Cargo.toml, for example,\n\n    \
                 [patch.crates-io]\n    \
                 btf-rs = {{ path = \"../btf-rs-VERSION\" }}\n\n\
             and build it as its README says (`cargo build --release -p tracer-user`;\n\
             `cargo xtask image` makes this image). conn-tracer's own licence permits\n\
             modification and reverse engineering for debugging such modifications.\n",
            names.join(", ")
        );
    }
    let sources: Vec<String> = packages
        .iter()
        .map(|p| format!("apt-get source {}={}", p.source, p.source_version))
        .collect();
    let _ = writeln!(
        s,
        "The shared libraries are Debian's, as its packages above ship them; their\n\
         source is Debian's source package of the same version:\n    {}\n\
         deploy/README.md (\"Licences\") says what redistributing this image asks of you.",
        sources.join("\n    ")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_patterns_match_components_or_prefixes() {
        assert!(ignored(Path::new("target/release/x"), "target"));
        assert!(ignored(Path::new(".git"), ".git"));
        assert!(ignored(
            Path::new("deploy/typecheck/node_modules/a.js"),
            "**/node_modules"
        ));
        assert!(ignored(
            Path::new("deploy/typecheck/gen/x.ts"),
            "deploy/typecheck/gen"
        ));
        assert!(!ignored(
            Path::new("deploy/typecheck/src.ts"),
            "deploy/typecheck/gen"
        ));
        assert!(!ignored(Path::new("xtask/src/targets.rs"), "target"));
    }
}
