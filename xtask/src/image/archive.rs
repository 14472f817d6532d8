//! The image archive: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) with a Docker `manifest.json` beside it that names
//! the same blobs, in one tar, as `docker save` writes it since Docker 25.
//! `podman load` and `ctr import` read the OCI index (named by its
//! `io.containerd.image.name` annotation); `docker load` of any version
//! reads `manifest.json` (`RepoTags`), Docker 25+ with the containerd
//! store the index.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::Project;
use crate::cmd::run;

/// Rewrites podman's OCI archive `saved` (unpacked in `work`) as the
/// archive `out` for `project`.
pub fn write(saved: &Path, work: &Path, out: &Path, project: &Project) -> Result<()> {
    if work.exists() {
        fs::remove_dir_all(work).with_context(|| format!("cannot remove {}", work.display()))?;
    }
    fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    run(Command::new("tar")
        .arg("--extract")
        .arg("--file")
        .arg(saved)
        .arg("--directory")
        .arg(work))?;
    let index_path = work.join("index.json");
    let mut index = read_json(&index_path)?;
    let manifests = index["manifests"]
        .as_array_mut()
        .context("index.json has no manifests")?;
    ensure!(
        manifests.len() == 1,
        "podman saved {} manifests, one expected",
        manifests.len()
    );
    let reference = project.reference();
    manifests[0]["annotations"] = json!({
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": project.version,
    });
    let digest = manifests[0]["digest"]
        .as_str()
        .context("index.json: manifest without digest")?
        .to_owned();
    fs::write(&index_path, serde_json::to_vec(&index)?)
        .with_context(|| format!("cannot write {}", index_path.display()))?;

    let manifest = read_json(&blob(work, &digest)?)?;
    let config = manifest["config"]["digest"]
        .as_str()
        .context("manifest without config")?;
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .map(blob_name)
                .context("layer without digest")?
        })
        .collect::<Result<_>>()?;
    let docker = json!([{
        "Config": blob_name(config)?,
        "RepoTags": [format!("conn-tracer:{}", project.version)],
        "Layers": layers,
    }]);
    let docker_path = work.join("manifest.json");
    fs::write(&docker_path, serde_json::to_vec(&docker)?)
        .with_context(|| format!("cannot write {}", docker_path.display()))?;

    let _ = fs::remove_file(out);
    // Sorted, root-owned, the commit's time: the same image gives the same bytes.
    run(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(out)
        .arg("--directory")
        .arg(work)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=ustar",
        ])
        .arg(format!("--mtime=@{}", project.epoch))
        .args(["oci-layout", "index.json", "manifest.json", "blobs"]))?;
    fs::remove_dir_all(work).with_context(|| format!("cannot remove {}", work.display()))?;
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// `blobs/sha256/HEX` of digest `sha256:HEX`.
fn blob_name(digest: &str) -> Result<String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("not a sha256 digest: {digest}"))?;
    Ok(format!("blobs/sha256/{hex}"))
}

fn blob(dir: &Path, digest: &str) -> Result<PathBuf> {
    Ok(dir.join(blob_name(digest)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_named_by_their_sha256() {
        let hex = "ab".repeat(32);
        assert_eq!(
            blob_name(&format!("sha256:{hex}")).unwrap(),
            format!("blobs/sha256/{hex}")
        );
        assert!(blob_name("sha512:00").is_err());
        assert!(blob_name("sha256:../../etc").is_err());
    }
}
