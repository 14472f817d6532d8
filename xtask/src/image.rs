//! `cargo xtask image`: the container image users deploy, built here
//! offline with podman `FROM scratch`, and saved as an archive under
//! `target/image/` that `docker load`, `podman load` and `ctr import` accept.
//!
//! The image is the final stage of `deploy/Dockerfile` (labels, user,
//! entrypoint: one text for both builds) over a root filesystem assembled
//! here: the release binary, exactly the shared libraries `ldd` names, and
//! the licences and sources of all of it. The Dockerfile's build stage
//! assembles the same tree with `cargo xtask image --rootfs DIR`.

mod archive;
mod licences;
mod rootfs;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    cmd::{cargo, probe, run, workspace_root},
    setup,
};

/// Where the image's files come from in `deploy/Dockerfile`'s final stage;
/// the podman build copies the same tree from its context instead.
const DOCKERFILE_COPY: &str = "COPY --from=build /out/rootfs/ /";
const CONTEXT_COPY: &str = "COPY rootfs/ /";

/// The image size this project promises (deploy/README.md).
pub const SIZE_LIMIT: u64 = 30 * 1000 * 1000;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Package this conn-tracer binary instead of building the release one
    /// (`cargo build --release --locked -p tracer-user`).
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// Only assemble the image's root filesystem into DIR (empty or absent),
    /// as deploy/Dockerfile's build stage does; no podman.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// The source revision for the labels and notices (default: git HEAD,
    /// `-dirty` if tracked files differ from it).
    #[arg(long)]
    pub revision: Option<String>,
}

/// What the image says about itself: from the workspace's Cargo.toml and git.
#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
    pub target: PathBuf,
    pub version: String,
    /// tracer-user's licence (SPDX), the binary's own.
    pub license: String,
    pub repository: String,
    pub revision: String,
    /// Seconds since the epoch for every timestamp in the image: the
    /// commit's time (`SOURCE_DATE_EPOCH` if set), so rebuilds are equal.
    pub epoch: u64,
}

impl Project {
    pub fn read(revision: Option<&str>) -> Result<Self> {
        let out = cargo()
            .args(["metadata", "--format-version", "1", "--no-deps", "--locked"])
            .output()
            .context("cannot run `cargo metadata`")?;
        ensure!(
            out.status.success(),
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("`cargo metadata` output")?;
        let user = meta["packages"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "tracer-user"))
            .context("no tracer-user package in `cargo metadata`")?;
        let field = |key: &str| {
            user[key]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("tracer-user has no `{key}` in Cargo.toml"))
        };
        let root = workspace_root().to_path_buf();
        let revision = match revision {
            Some(r) => r.to_owned(),
            None => git_revision(&root).unwrap_or_else(|| "unknown".into()),
        };
        let epoch = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| {
                probe(
                    Command::new("git")
                        .arg("-C")
                        .arg(&root)
                        .args(["log", "-1", "--format=%ct"]),
                )
                .and_then(|s| s.trim().parse().ok())
            })
            .unwrap_or(0);
        Ok(Self {
            target: meta["target_directory"]
                .as_str()
                .map(PathBuf::from)
                .context("no target_directory in `cargo metadata`")?,
            version: field("version")?,
            license: field("license")?,
            repository: match field("repository") {
                Ok(r) => r,
                Err(_) => workspace_repository(&root)?,
            },
            revision,
            epoch,
            root,
        })
    }

    /// `docker.io/library/conn-tracer:VERSION`: what `image: conn-tracer:VERSION`
    /// of the DaemonSet means to a container runtime.
    pub fn reference(&self) -> String {
        format!("docker.io/library/conn-tracer:{}", self.version)
    }

    /// `target/image/conn-tracer-VERSION.tar`.
    pub fn archive_path(&self) -> PathBuf {
        self.target
            .join("image")
            .join(format!("conn-tracer-{}.tar", self.version))
    }
}

/// `[workspace.package] repository` of the root Cargo.toml.
fn workspace_repository(root: &Path) -> Result<String> {
    let text = fs::read_to_string(root.join("Cargo.toml")).context("cannot read Cargo.toml")?;
    let manifest: toml::Value = toml::from_str(&text).context("Cargo.toml")?;
    manifest["workspace"]["package"]
        .get("repository")
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .context("Cargo.toml has no [workspace.package] repository")
}

/// HEAD's commit, with `-dirty` when tracked files differ from it.
fn git_revision(root: &Path) -> Option<String> {
    let git = || {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(root);
        cmd
    };
    let head = probe(git().args(["rev-parse", "HEAD"]))?;
    let dirty = probe(git().args(["status", "--porcelain", "--untracked-files=no"]))
        .is_some_and(|s| !s.trim().is_empty());
    Some(format!(
        "{}{}",
        head.trim(),
        if dirty { "-dirty" } else { "" }
    ))
}

/// The image that was built.
#[derive(Debug)]
pub struct Built {
    pub archive: PathBuf,
    pub reference: String,
    /// Bytes of the files in the image (what it takes unpacked).
    pub rootfs_bytes: u64,
    pub archive_bytes: u64,
}

/// `cargo xtask image`.
pub fn image(args: &Args) -> Result<()> {
    println!("== image");
    setup::ensure_toolchain()?;
    setup::ensure_cargo_tool(&setup::CARGO_ABOUT)?;
    if args.rootfs.is_none() {
        setup::ensure_packages(&[setup::PODMAN])?;
    }
    let project = Project::read(args.revision.as_deref())?;
    let bin = match &args.bin {
        Some(bin) => bin.clone(),
        None => build_release(&project)?,
    };
    if let Some(dir) = &args.rootfs {
        let tree = rootfs::assemble(&bin, dir, &project)?;
        println!(
            "image: root filesystem in {}: {} files, {:.1} MB",
            dir.display(),
            tree.files,
            mb(tree.bytes)
        );
        return Ok(());
    }
    let built = build(&bin, &project)?;
    println!(
        "image: {} ({:.1} MB unpacked, limit {:.0} MB) in {} ({:.1} MB)",
        built.reference,
        mb(built.rootfs_bytes),
        mb(SIZE_LIMIT),
        built.archive.display(),
        mb(built.archive_bytes)
    );
    println!(
        "image: load it with `docker load -i {0}`, `podman load -i {0}` or \
         `ctr -n k8s.io images import {0}`",
        built.archive.display()
    );
    Ok(())
}

/// Bytes as megabytes (10^6), for messages.
#[expect(clippy::cast_precision_loss, reason = "image sizes are far below 2^52")]
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// `cargo build --release --locked -p tracer-user`; the binary's path.
pub fn build_release(project: &Project) -> Result<PathBuf> {
    println!("== image: release build");
    run(cargo().args(["build", "--release", "--locked", "-p", "tracer-user"]))?;
    Ok(project.target.join("release").join("conn-tracer"))
}

/// Assembles the root filesystem of `bin`, builds the image with podman
/// and writes the archive.
pub fn build(bin: &Path, project: &Project) -> Result<Built> {
    let dir = project.target.join("image");
    let context = dir.join("context");
    if context.exists() {
        fs::remove_dir_all(&context)
            .with_context(|| format!("cannot remove {}", context.display()))?;
    }
    fs::create_dir_all(&context).with_context(|| format!("cannot create {}", context.display()))?;
    let tree = rootfs::assemble(bin, &context.join("rootfs"), project)?;
    let dockerfile = project.root.join("deploy/Dockerfile");
    let text = fs::read_to_string(&dockerfile)
        .with_context(|| format!("cannot read {}", dockerfile.display()))?;
    let containerfile = context.join("Containerfile");
    fs::write(&containerfile, final_stage(&text)?)
        .with_context(|| format!("cannot write {}", containerfile.display()))?;

    println!("== image: podman build");
    let local = format!("localhost/conn-tracer:{}", project.version);
    let previous = image_id(&local);
    run(Command::new("podman")
        .args(["build", "--quiet", "--pull=never", "--timestamp"])
        .arg(project.epoch.to_string())
        .args(["--build-arg", &format!("VERSION={}", project.version)])
        .args(["--build-arg", &format!("REVISION={}", project.revision)])
        .args(["--tag", &local, "--file"])
        .arg(&containerfile)
        .arg(&context))?;
    // The tag moved: the old image would only take space.
    if let Some(old) = previous.filter(|old| image_id(&local).as_ref() != Some(old)) {
        let _ = probe(Command::new("podman").args(["rmi", &old]));
    }

    println!("== image: archive");
    let work = dir.join("save");
    let saved = dir.join("podman-oci.tar");
    let _ = fs::remove_file(&saved);
    run(Command::new("podman")
        .args(["save", "--quiet", "--format", "oci-archive", "--output"])
        .arg(&saved)
        .arg(&local))?;
    let archive = project.archive_path();
    archive::write(&saved, &work, &archive, project)?;
    let _ = fs::remove_file(&saved);
    let archive_bytes = fs::metadata(&archive)
        .with_context(|| format!("cannot stat {}", archive.display()))?
        .len();
    Ok(Built {
        archive,
        reference: project.reference(),
        rootfs_bytes: tree.bytes,
        archive_bytes,
    })
}

/// podman's id of image `reference`, if it has one.
fn image_id(reference: &str) -> Option<String> {
    probe(Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}", reference]))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The last stage of `dockerfile` (a `FROM scratch` one), copying the root
/// filesystem from the build context instead of the build stage.
pub fn final_stage(dockerfile: &str) -> Result<String> {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .context("deploy/Dockerfile has no FROM line")?;
    let first = lines[from].split_whitespace().nth(1).unwrap_or_default();
    ensure!(
        first == "scratch",
        "deploy/Dockerfile's final stage must be `FROM scratch` (it is `{}`): the image \
         holds exactly the files cargo xtask image assembles",
        lines[from].trim()
    );
    let stage = &lines[from..];
    let copies = stage.iter().filter(|l| l.trim() == DOCKERFILE_COPY).count();
    if copies != 1 {
        bail!(
            "deploy/Dockerfile's final stage must have `{DOCKERFILE_COPY}` exactly once \
             (found {copies}): it is where cargo xtask image puts its root filesystem"
        );
    }
    let mut out =
        String::from("# Generated by cargo xtask image from deploy/Dockerfile's final stage.\n");
    for line in stage {
        out.push_str(if line.trim() == DOCKERFILE_COPY {
            CONTEXT_COPY
        } else {
            line
        });
        out.push('\n');
    }
    Ok(out)
}

/// The value of `LABEL KEY="..."` (or `KEY=...`) in `dockerfile`'s final
/// stage, line continuations joined.
pub fn label(dockerfile: &str, key: &str) -> Option<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let stage = joined
        .lines()
        .rev()
        .take_while(|l| !l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("LABEL "))
        .collect::<Vec<_>>();
    let needle = format!("{key}=");
    stage.iter().find_map(|line| {
        let at = line.find(&needle)? + needle.len();
        let rest = &line[at..];
        Some(match rest.strip_prefix('"') {
            Some(quoted) => quoted[..quoted.find('"')?].to_owned(),
            None => rest.split_whitespace().next()?.to_owned(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKERFILE: &str = "FROM rust AS build\nRUN make\n\nFROM scratch\nARG VERSION=1\n\
        COPY --from=build /out/rootfs/ /\nLABEL a.b=\"x y\" \\\n      c.d=plain\n\
        ENTRYPOINT [\"/bin/x\"]\n";

    #[test]
    fn final_stage_copies_from_the_context() {
        let stage = final_stage(DOCKERFILE).unwrap();
        assert!(stage.contains("FROM scratch\nARG VERSION=1\nCOPY rootfs/ /\nLABEL"));
        assert!(!stage.contains("AS build"));
        let err =
            final_stage("FROM rust AS build\nFROM debian\nCOPY --from=build /out/rootfs/ /\n")
                .unwrap_err();
        assert!(err.to_string().contains("FROM scratch"), "{err}");
        assert!(final_stage("FROM scratch\nCOPY x /\n").is_err());
    }

    #[test]
    fn labels_are_read_across_continuations() {
        assert_eq!(label(DOCKERFILE, "a.b").as_deref(), Some("x y"));
        assert_eq!(label(DOCKERFILE, "c.d").as_deref(), Some("plain"));
        assert_eq!(label(DOCKERFILE, "e.f"), None);
    }

    #[test]
    fn the_shipped_dockerfile_has_a_final_stage_for_the_image() {
        let text = fs::read_to_string(workspace_root().join("deploy/Dockerfile")).unwrap();
        let stage = final_stage(&text).unwrap();
        assert!(stage.contains(CONTEXT_COPY));
        for key in ["version", "revision", "source", "licenses"] {
            assert!(
                label(&text, &format!("org.opencontainers.image.{key}")).is_some(),
                "deploy/Dockerfile labels org.opencontainers.image.{key}"
            );
        }
    }
}
