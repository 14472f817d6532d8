//! The image archive `cargo xtask image` writes: found, opened, checked
//! the way the loaders read it, and unpacked into a root filesystem.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{container::ImageConfig, in_ci, unique_suffix};

/// [`archive_or_skip`] for a test that also needs root (it says why it
/// skips without either, except in CI).
pub fn root_archive_or_skip(test: &str) -> Option<PathBuf> {
    if !crate::require_root_or_skip(test) {
        return None;
    }
    archive_or_skip(test)
}

/// The archive: `$CONN_TRACER_IMAGE`, else
/// `<workspace>/target/image/conn-tracer-VERSION.tar` if it is there.
/// Without one the test cannot run: it says why and gets `None`, except in
/// CI, where `cargo xtask test` builds it first.
pub fn archive_or_skip(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("CONN_TRACER_IMAGE").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
                "../target/image/conn-tracer-{}.tar",
                env!("CARGO_PKG_VERSION")
            ))
        },
        PathBuf::from,
    );
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !in_ci(),
        "{test} needs the image archive {} and CI is set: `cargo xtask test` builds it \
         (`cargo xtask image`)",
        path.display()
    );
    let _ = writeln!(
        std::io::stderr(),
        "skipping {test}: no image archive at {} (`cargo xtask image` writes it)",
        path.display()
    );
    None
}

/// A directory under the temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(kind: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ct-{kind}-{}", unique_suffix()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: rm -r {}: {e}", self.0.display());
        }
    }
}

fn run(cmd: &mut Command) -> String {
    crate::checked_output(cmd, "")
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

/// The sha256 of what `gzip -dc` makes of `path` (a layer's diff id).
fn sha256_gunzipped(path: &Path) -> String {
    run(Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$0\" | sha256sum")
        .arg(path))
    .split_whitespace()
    .next()
    .expect("sha256sum output")
    .to_owned()
}

fn read_json(path: &Path) -> Value {
    let text = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The archive, unpacked.
pub struct Archive {
    dir: TempDir,
    /// Every member of the tar, as listed.
    pub members: BTreeSet<String>,
    pub index: Value,
    /// The OCI manifest the index names.
    pub manifest: Value,
    /// The Docker `manifest.json`.
    pub docker: Value,
    /// The image config blob.
    pub config: Value,
}

impl Archive {
    pub fn open(path: &Path) -> Self {
        let dir = TempDir::new("image");
        let members = run(Command::new("tar").arg("-tf").arg(path))
            .lines()
            .map(|l| l.trim_end_matches('/').to_owned())
            .collect();
        run(Command::new("tar")
            .arg("-xf")
            .arg(path)
            .arg("-C")
            .arg(dir.path()));
        let index = read_json(&dir.path().join("index.json"));
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .expect("index.json names a manifest")
            .to_owned();
        let blob = |d: &str| dir.path().join(blob_path(d));
        let manifest = read_json(&blob(&digest));
        let config = read_json(&blob(
            manifest["config"]["digest"]
                .as_str()
                .expect("config digest"),
        ));
        let docker = read_json(&dir.path().join("manifest.json"));
        Self {
            dir,
            members,
            index,
            manifest,
            docker,
            config,
        }
    }

    pub fn path_of(&self, member: &str) -> PathBuf {
        self.dir.path().join(member)
    }

    /// The blob of `digest`, checked against it.
    pub fn blob(&self, digest: &str) -> PathBuf {
        let path = self.path_of(&blob_path(digest));
        assert!(path.is_file(), "no blob {digest} in the archive");
        assert_eq!(
            format!("sha256:{}", sha256(&path)),
            digest,
            "blob {} holds what its name says",
            path.display()
        );
        path
    }

    /// The layers' digests, in order.
    pub fn layers(&self) -> Vec<String> {
        self.manifest["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["digest"].as_str().expect("layer digest").to_owned())
            .collect()
    }

    /// The sha256 of each layer uncompressed: what the config's
    /// `rootfs.diff_ids` must say.
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers()
            .iter()
            .map(|d| format!("sha256:{}", sha256_gunzipped(&self.blob(d))))
            .collect()
    }

    pub fn image_config(&self) -> ImageConfig {
        ImageConfig::from_oci(&self.config)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.config["config"]["Labels"][key].as_str()
    }

    /// Unpacks the layers, in order, into `to` (as a runtime's snapshotter
    /// does; this image has no whiteouts).
    pub fn unpack(&self, to: &Path) {
        for digest in self.layers() {
            let blob = self.blob(&digest);
            let list = run(Command::new("tar").arg("-tzf").arg(&blob));
            assert!(
                !list
                    .lines()
                    .any(|l| l.rsplit('/').next().is_some_and(|n| n.starts_with(".wh."))),
                "layer {digest} has whiteouts"
            );
            run(Command::new("tar")
                .args(["-xzf"])
                .arg(&blob)
                .arg("-C")
                .arg(to)
                .args(["--same-owner", "--same-permissions", "--numeric-owner"]));
        }
    }
}

/// `blobs/sha256/HEX` of `sha256:HEX`.
pub fn blob_path(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a sha256 digest: {digest}"
    );
    format!("blobs/sha256/{hex}")
}

/// Regular files under `dir` and their total size.
pub fn du(dir: &Path) -> (usize, u64) {
    let mut files = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let entry = entry.expect("dir entry");
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            let (f, b) = du(&entry.path());
            files += f;
            bytes += b;
        } else {
            files += 1;
            bytes += meta.len();
        }
    }
    (files, bytes)
}
