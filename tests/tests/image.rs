//! The image users deploy (`cargo xtask image`, target/image/): an archive
//! that every loader reads, with the labels and licences it promises, and
//! run the way deploy/kubernetes/daemonset.yaml runs it: its root
//! filesystem unpacked, its entrypoint started with exactly the user,
//! capabilities, no_new_privs, read-only root, host PID namespace, pod
//! network namespace and host mounts the manifest declares (read from the
//! manifest, `container::from_pod`). Inside: `conn-tracer check` exits 0,
//! the readiness probe's /healthz answers, and a Redis idle kill is counted
//! with the right labels. The same again under a real runtime (Docker 20.10
//! and runc, with the default seccomp profile), after `docker load` and
//! `ctr import` of the archive.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    Cgroup, NetNs, Peer, checked_output,
    container::{Container, ContainerSpec, ImageConfig, PodContext, capability_number, from_pod},
    daemon::{Metrics, capabilities_of, http_get, serial},
    deploy::{read, yaml},
    docker::{Dockerd, run_args},
    image::{Archive, TempDir, archive_or_skip, du, root_archive_or_skip},
    require_program_or_skip,
    servers::Redis,
};
use serde_yaml::Value as Yaml;

const HELPER: &str = env!("CARGO_BIN_EXE_ct-container");
const CLIENT: &str = env!("CARGO_BIN_EXE_ct-client");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The size deploy/README.md promises.
const SIZE_LIMIT: u64 = 30 * 1000 * 1000;
const KILLS: &str = "conntracer_idle_kills_total";
/// The Redis of the idle-kill scenario (unique among the tests' servers).
const REDIS_PORT: u16 = 16_389;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `org.opencontainers.image.<key>` of deploy/Dockerfile's final stage.
fn dockerfile_label(key: &str) -> String {
    let text = read("Dockerfile").replace("\\\n", " ");
    let needle = format!("org.opencontainers.image.{key}=\"");
    let at = text.rfind(&needle).expect("label in deploy/Dockerfile") + needle.len();
    text[at..].split('"').next().expect("quoted").to_owned()
}

fn repository() -> String {
    let manifest = fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml");
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("repository = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("repository in Cargo.toml")
        .to_owned()
}

#[test]
fn image_archive_is_an_oci_layout_and_a_docker_archive() {
    let Some(path) = archive_or_skip("image_archive_is_an_oci_layout_and_a_docker_archive") else {
        return;
    };
    let a = Archive::open(&path);
    for member in ["oci-layout", "index.json", "manifest.json", "blobs/sha256"] {
        assert!(a.members.contains(member), "{member} in {:?}", a.members);
    }
    let layout: serde_json::Value =
        serde_json::from_slice(&fs::read(a.path_of("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");

    // The OCI side: one manifest, named for containerd and the OCI spec.
    let entry = &a.index["manifests"][0];
    assert_eq!(a.index["manifests"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        entry["annotations"]["io.containerd.image.name"],
        format!("docker.io/library/conn-tracer:{VERSION}"),
        "ctr import and podman load name the image by it"
    );
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        VERSION
    );
    let manifest_blob = a.blob(entry["digest"].as_str().unwrap());
    assert_eq!(
        fs::metadata(&manifest_blob).unwrap().len(),
        entry["size"].as_u64().unwrap()
    );
    let config_digest = a.manifest["config"]["digest"].as_str().unwrap().to_owned();
    a.blob(&config_digest);
    for layer in &a.manifest["layers"].as_array().unwrap()[..] {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let blob = a.blob(layer["digest"].as_str().unwrap());
        assert_eq!(
            fs::metadata(&blob).unwrap().len(),
            layer["size"].as_u64().unwrap()
        );
    }
    assert_eq!(
        a.config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        a.diff_ids(),
        "the config's diff_ids are the uncompressed layers' digests (docker load checks them)"
    );
    assert_eq!(
        (&a.config["os"], &a.config["architecture"]),
        (&"linux".into(), &"amd64".into())
    );

    // The Docker side: the same config and layers, tagged.
    let docker = &a.docker[0];
    assert_eq!(a.docker.as_array().map(Vec::len), Some(1));
    assert_eq!(
        docker["Config"],
        integration_tests::image::blob_path(&config_digest)
    );
    let layers: Vec<String> = a
        .layers()
        .iter()
        .map(|d| integration_tests::image::blob_path(d))
        .collect();
    assert_eq!(docker["Layers"], serde_json::json!(layers));
    assert_eq!(
        docker["RepoTags"],
        serde_json::json!([format!("conn-tracer:{VERSION}")])
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one promise after another")]
fn image_has_the_labels_files_and_licences_it_promises() {
    let Some(path) = archive_or_skip("image_has_the_labels_files_and_licences_it_promises") else {
        return;
    };
    let a = Archive::open(&path);
    // What the Dockerfile's final stage says, and what the DaemonSet uses.
    let cfg = a.image_config();
    assert_eq!(cfg.entrypoint, ["/usr/local/bin/conn-tracer"]);
    assert_eq!(cfg.cmd.first().map(String::as_str), Some("run"));
    assert_eq!(cfg.user, "65532:65532", "not root by default");
    assert_eq!(a.label("org.opencontainers.image.version"), Some(VERSION));
    assert_eq!(
        a.label("org.opencontainers.image.source"),
        Some(repository().as_str())
    );
    assert_eq!(
        a.label("org.opencontainers.image.licenses"),
        Some(dockerfile_label("licenses").as_str())
    );
    let revision = a
        .label("org.opencontainers.image.revision")
        .unwrap_or_default();
    if let Ok(out) = Command::new("git")
        .arg("-C")
        .arg(workspace())
        .args(["rev-parse", "HEAD"])
        .output()
        && out.status.success()
    {
        let head = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            revision.starts_with(&head),
            "revision label {revision} is HEAD {head}: rebuild the image (`cargo xtask image`)"
        );
    }
    let ds = yaml("kubernetes/daemonset.yaml");
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert_eq!(
        image,
        format!("conn-tracer:{VERSION}"),
        "the DaemonSet runs this image's tag"
    );

    // What is in it: the binary, the libraries it loads, licences, sources.
    let root = TempDir::new("image-rootfs");
    a.unpack(root.path());
    let (files, bytes) = du(root.path());
    assert!(
        bytes <= SIZE_LIMIT,
        "the image's {files} files take {bytes} bytes, over {SIZE_LIMIT}"
    );
    let doc = root.path().join("usr/share/doc/conn-tracer");
    for f in [
        "usr/local/bin/conn-tracer",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "usr/share/doc/libc6/copyright",
        "var/lib/dpkg/status.d/libc6",
    ] {
        assert!(root.path().join(f).is_file(), "{f} in the image");
    }
    let licences = fs::read_to_string(doc.join("THIRD-PARTY-LICENSES.txt")).unwrap();
    for needle in [
        "btf-rs 2.0.0",
        "GNU LESSER GENERAL PUBLIC LICENSE",
        "aya 0.14.0",
        "aya-ebpf 0.2.1",
        "tokio ",
    ] {
        assert!(
            licences.contains(needle),
            "THIRD-PARTY-LICENSES.txt names {needle}"
        );
    }
    let notice = fs::read_to_string(doc.join("README")).unwrap();
    assert!(
        notice.contains("btf-rs 2.0.0 (LGPL-2.1-or-later)"),
        "{notice}"
    );
    for source in [
        "btf-rs-2.0.0.crate".to_owned(),
        format!("conn-tracer-{VERSION}.tar.gz"),
    ] {
        assert!(
            doc.join("source").join(&source).is_file(),
            "source/{source}"
        );
    }
    let listed = String::from_utf8(
        Command::new("tar")
            .arg("-tzf")
            .arg(doc.join(format!("source/conn-tracer-{VERSION}.tar.gz")))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for f in [
        "Cargo.lock",
        "deny.toml",
        "tracer-user/Cargo.toml",
        "deploy/Dockerfile",
    ] {
        assert!(
            listed.contains(&format!("conn-tracer-{VERSION}/{f}\n")),
            "the source tarball has {f}"
        );
    }
}

/// The Dockerfile installs the cargo-about that `cargo xtask setup` pins.
#[test]
fn dockerfile_builds_the_rootfs_as_cargo_xtask_image() {
    let docker = read("Dockerfile");
    let setup = fs::read_to_string(workspace().join("xtask/src/setup.rs")).unwrap();
    let about = setup
        .lines()
        .find_map(|l| l.strip_prefix("const CARGO_ABOUT_VERSION: &str = \""))
        .and_then(|l| l.strip_suffix("\";"))
        .expect("CARGO_ABOUT_VERSION in setup.rs");
    assert!(
        docker.contains(&format!(
            "cargo install cargo-about@{about} --locked --features cli"
        )),
        "deploy/Dockerfile installs cargo-about {about}"
    );
    assert!(
        docker.contains("cargo xtask image --bin target/release/conn-tracer --rootfs /out/rootfs")
    );
    assert!(
        docker.contains("\nFROM scratch\n"),
        "the final stage is FROM scratch"
    );
    assert!(docker.contains("COPY --from=build /out/rootfs/ /"));
}

#[test]
fn root_podman_loads_the_archive_in_both_formats() {
    let Some(path) = root_archive_or_skip("root_podman_loads_the_archive_in_both_formats") else {
        return;
    };
    let Some(podman) = require_program_or_skip(
        "root_podman_loads_the_archive_in_both_formats",
        "podman",
        "Debian package podman",
    ) else {
        return;
    };
    let config = Archive::open(&path).manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    // A private store: the machine's images are neither used nor changed.
    let store = TempDir::new("podman-store");
    let podman = |args: &[&str]| {
        checked_output(
            Command::new(&podman)
                .arg("--root")
                .arg(store.path().join("root"))
                .arg("--runroot")
                .arg(store.path().join("run"))
                .args(["--storage-driver", "vfs"])
                .args(args),
            "",
        )
    };
    let file = path.to_str().unwrap();
    let loaded = podman(&["load", "--input", file]);
    let name = format!("docker.io/library/conn-tracer:{VERSION}");
    assert!(
        loaded.contains(&format!("Loaded image: {name}")),
        "{loaded}"
    );
    let id = |reference: &str| podman(&["image", "inspect", "--format", "{{.Id}}", reference]);
    assert_eq!(id(&name).trim(), config, "podman load: the archive's image");
    // Each side alone, as loaders that know only one of them read it.
    let docker_side = podman(&["pull", &format!("docker-archive:{file}")]);
    assert_eq!(docker_side.trim(), config, "manifest.json (docker load)");
    let oci_side = podman(&["pull", &format!("oci-archive:{file}")]);
    assert_eq!(oci_side.trim(), config, "index.json (OCI)");
    let size: u64 = podman(&["image", "inspect", "--format", "{{.Size}}", &name])
        .trim()
        .parse()
        .unwrap();
    assert!(size <= SIZE_LIMIT, "podman says the image is {size} bytes");
}

/// The port number of the container's port named `name`.
fn container_port(container: &Yaml, name: &Yaml) -> u16 {
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| &p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("no container port {name:?}"))
}

/// GET `path` on `port` from inside network namespace `netns` (a
/// /run/netns or /proc/PID/ns/net path), where the kubelet's probes and
/// Prometheus reach the pod IP.
fn get_in(netns: &Path, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let ns = fs::File::open(netns)?;
    let path = path.to_owned();
    thread::spawn(move || {
        // SAFETY: setns on a namespace fd we own; affects this thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        http_get(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port), &path)
    })
    .join()
    .expect("probe thread")
}

/// The ConfigMaps of deploy/kubernetes/kustomization.yaml's
/// configMapGenerator, each as a directory of its files, with the shipped
/// config's idle threshold lowered to 1 s (so that the test waits 2 s for
/// an idle kill, not a minute); nothing else is changed.
fn config_maps(dir: &Path) -> BTreeMap<String, PathBuf> {
    let k = yaml("kubernetes/kustomization.yaml");
    let mut out = BTreeMap::new();
    for generator in k["configMapGenerator"].as_sequence().unwrap() {
        let name = generator["name"].as_str().unwrap();
        let to = dir.join(name);
        fs::create_dir_all(&to).unwrap();
        for file in generator["files"].as_sequence().unwrap() {
            let file = file.as_str().unwrap();
            let mut text = read(&format!("kubernetes/{file}"));
            if file == "config.toml" {
                let line = text
                    .lines()
                    .find(|l| l.starts_with("idle_threshold = "))
                    .expect("config.toml sets idle_threshold")
                    .to_owned();
                text = text.replace(&line, "idle_threshold = \"1s\"");
            }
            fs::write(to.join(file), text).unwrap();
        }
        out.insert(name.to_owned(), to);
    }
    out
}

/// The DaemonSet's pod and its container, and what a runtime makes of it.
struct Pod {
    ds: Yaml,
    spec: ContainerSpec,
    /// The readiness probe's port and path.
    port: u16,
    probe: String,
    _work: TempDir,
}

impl Pod {
    fn container(&self) -> &Yaml {
        &self.ds["spec"]["template"]["spec"]["containers"][0]
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        )
    }

    /// deploy/kubernetes/daemonset.yaml for `archive`'s image, unpacked in a
    /// directory of its own when `unpack`.
    fn new(archive: &Archive, unpack: bool, netns: &Path, cgroup: &Path) -> Self {
        let work = TempDir::new("image-run");
        let rootfs = work.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        if unpack {
            archive.unpack(&rootfs);
        }
        let ds = yaml("kubernetes/daemonset.yaml");
        let pod = &ds["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let maps = config_maps(work.path());
        let spec = from_pod(
            pod,
            container["name"].as_str().unwrap(),
            &ImageConfig::from_oci(&archive.config),
            &rootfs,
            &PodContext {
                node_name: "image-test-node",
                pod_netns: netns,
                cgroup,
                config_maps: &maps,
            },
        );
        eprintln!("container spec: {spec:#?}");
        let targets: Vec<&str> = spec.mounts.iter().map(|m| m.target.as_str()).collect();
        for needed in ["/sys/fs/cgroup", "/sys/kernel/btf", "/etc/conn-tracer"] {
            assert!(
                targets.contains(&needed),
                "the manifest mounts {needed}: {targets:?}"
            );
        }
        let probe = &container["readinessProbe"]["httpGet"];
        let port = container_port(container, &probe["port"]);
        let probe = probe["path"].as_str().unwrap().to_owned();
        Self {
            ds: ds.clone(),
            spec,
            port,
            probe,
            _work: work,
        }
    }

    /// Waits (bounded) until the readiness probe's GET answers 200 in
    /// `netns`; `alive` says why not when the container died.
    fn wait_ready(&self, netns: &Path, mut alive: impl FnMut() -> Result<(), String>) {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Ok((200, _)) = get_in(netns, self.port, &self.probe) {
                return;
            }
            if let Err(why) = alive() {
                panic!("the daemon exited before it was ready:\n{why}");
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer 200 in 60 s",
                self.probe
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

fn delta(before: &Metrics, after: &Metrics, labels: &[(&str, &str)]) -> f64 {
    after.sum(KILLS, labels) - before.sum(KILLS, labels)
}

fn status_field(pid: u32, name: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

fn ns_of(pid: &str, ns: &str) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap()
}

/// The container's process has what `spec` (from the manifest's
/// `container`) says: capabilities, no_new_privs, uid, the host's PID
/// namespace, a network namespace of its own (`netns`, if known), and
/// read-only mounts.
fn assert_runs_as_declared(pid: u32, pod: &Pod, netns: Option<u64>) {
    let spec = &pod.spec;
    let want: u64 = spec.caps.iter().fold(0, |m, c| m | (1 << c));
    let sc = &pod.container()["securityContext"];
    let named: u64 = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .fold(0, |m, c| m | (1 << capability_number(c.as_str().unwrap())));
    assert_eq!(want, named, "exactly the added capabilities (drop: ALL)");
    assert_eq!(
        capabilities_of(pid),
        (want, want, want, 0),
        "CapPrm, CapEff, CapBnd, CapAmb"
    );
    assert_eq!(status_field(pid, "CapInh:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    let uid = sc["runAsUser"].as_u64().unwrap().to_string();
    assert_eq!(
        status_field(pid, "Uid:").split_whitespace().next(),
        Some(uid.as_str())
    );
    let me = std::process::id().to_string();
    let pid_s = pid.to_string();
    assert_eq!(ns_of(&pid_s, "pid"), ns_of(&me, "pid"), "hostPID");
    assert_ne!(
        ns_of(&pid_s, "net"),
        ns_of(&me, "net"),
        "hostNetwork: false"
    );
    if let Some(inode) = netns {
        assert_eq!(
            ns_of(&pid_s, "net"),
            PathBuf::from(format!("net:[{inode}]")),
            "the pod's network namespace"
        );
    }
    assert_ne!(ns_of(&pid_s, "mnt"), ns_of(&me, "mnt"));
    assert_ne!(ns_of(&pid_s, "cgroup"), ns_of(&me, "cgroup"));
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    // The top one of the mounts at `target` (mountinfo lists them in order).
    let options_of = |target: &str| {
        mountinfo
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some(target))
            .and_then(|l| l.split(' ').nth(5))
            .unwrap_or_else(|| panic!("no mount at {target} in:\n{mountinfo}"))
            .to_owned()
    };
    assert!(
        options_of("/").split(',').any(|o| o == "ro"),
        "readOnlyRootFilesystem: {}",
        options_of("/")
    );
    for m in &spec.mounts {
        assert_eq!(
            options_of(&m.target).split(',').any(|o| o == "ro"),
            m.read_only,
            "{}",
            m.target
        );
    }
}

/// A Redis `timeout` kill of an idle client in another namespace of the
/// node is counted once by the daemon serving on `port` in `netns`, with
/// the labels the contract gives it.
fn assert_redis_idle_kill_is_counted(netns: &Path, port: u16) {
    let node = NetNs::new();
    let redis = Redis::start(
        &node,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), REDIS_PORT),
        2,
    );
    let scrape = || {
        let (status, body) = get_in(netns, port, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        Metrics::parse(&body)
    };
    let before = scrape();
    let mut cmd = node.command(CLIENT);
    cmd.args(["redis", "--addr", "127.0.0.1", "--port"])
        .arg(REDIS_PORT.to_string())
        .args(["--then", "wait-close"]);
    let mut idle = Peer::spawn("ct-client redis", cmd);
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    idle.expect_line("peer-closed");
    idle.expect_line("closed");
    idle.wait_success();
    let peer = format!("127.0.0.1:{REDIS_PORT}");
    let kill = [
        ("peer", peer.as_str()),
        ("direction", "outbound"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
        ("keepalive", "off"),
        ("role", "host"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while delta(&before, &scrape(), &kill) < 1.0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(500));
    let m = scrape();
    assert_eq!(delta(&before, &m, &kill), 1.0, "{}", m.dump(KILLS));
    assert_eq!(
        delta(&before, &m, &[("peer", peer.as_str())]),
        1.0,
        "exactly one kill: {}",
        m.dump(KILLS)
    );
    assert!(redis.idle_closes() >= 1, "Redis closed the idle client");
    assert_eq!(m.sum("conntracer_events_lost_total", &[]), 0.0);
}

/// The run test: the image's files, unpacked, run by `ct-container`
/// exactly as the manifest says.
#[test]
fn root_image_runs_as_the_daemonset_runs_it() {
    const TEST: &str = "root_image_runs_as_the_daemonset_runs_it";
    let Some(path) = root_archive_or_skip(TEST) else {
        return;
    };
    if require_program_or_skip(TEST, "redis-server", "Debian package redis-server").is_none() {
        return;
    }
    let _serial = serial();
    let archive = Archive::open(&path);
    let pod_ns = NetNs::new();
    let netns = PathBuf::from(format!("/run/netns/{}", pod_ns.name()));
    let cgroup = Cgroup::new();
    let pod = Pod::new(&archive, true, &netns, cgroup.path());
    let mut daemon = Container::start(Path::new(HELPER), &pod.spec);
    pod.wait_ready(&netns, || {
        if daemon.is_running() {
            Ok(())
        } else {
            Err(daemon.stderr())
        }
    });
    let pid = daemon.pid();
    assert_runs_as_declared(pid, &pod, Some(pod_ns.inode()));

    // `kubectl exec ... -- conn-tracer check` (deploy/README.md, "Check").
    let (code, out) = Container::run(
        Path::new(HELPER),
        &pod.spec.exec_in(pid, &["conn-tracer", "check"]),
        Duration::from_mins(1),
    );
    assert_eq!(code, Some(0), "conn-tracer check in the container:\n{out}");
    // The accepting threads are known from the cgroup getsockopt observer
    // (the manifest's tracefs mount serves the syscall fallback of 5.10).
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("accepting threads")),
        "conn-tracer check in the container:\n{out}"
    );

    assert_redis_idle_kill_is_counted(&netns, pod.port);

    // SIGTERM, as the kubelet stops it, within the grace period.
    let stderr = daemon.stderr();
    assert_eq!(
        daemon.stop(pod.grace()),
        Some(0),
        "exits 0 on SIGTERM:\n{stderr}"
    );
}

/// The archive loaded by the real loaders (Docker 20.10's reads only its
/// `manifest.json`; containerd's `ctr import` its OCI index), and the image
/// run by a real runtime (runc, with Docker's default seccomp profile) with
/// the manifest's privileges and mounts.
#[test]
fn root_image_loads_and_runs_under_docker_and_containerd() {
    const TEST: &str = "root_image_loads_and_runs_under_docker_and_containerd";
    let Some(path) = root_archive_or_skip(TEST) else {
        return;
    };
    for (program, package) in [
        ("dockerd", "docker.io"),
        ("ctr", "containerd"),
        ("redis-server", "redis-server"),
    ] {
        if require_program_or_skip(TEST, program, &format!("Debian package {package}")).is_none() {
            return;
        }
    }
    let _serial = serial();
    let archive = Archive::open(&path);
    let config = archive.manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let engine = Dockerd::start();

    let loaded = engine.ok(&["load", "--input", path.to_str().unwrap()]);
    let tag = format!("conn-tracer:{VERSION}");
    assert!(loaded.contains(&format!("Loaded image: {tag}")), "{loaded}");
    assert_eq!(
        engine
            .ok(&["image", "inspect", "--format", "{{.Id}}", &tag])
            .trim(),
        config,
        "docker load: the archive's image"
    );
    let ctr = |args: &[&str]| {
        checked_output(
            Command::new("ctr")
                .arg("--address")
                .arg(engine.containerd_socket())
                .args(["--namespace", "k8s.io"])
                .args(args),
            "",
        )
    };
    ctr(&["images", "import", path.to_str().unwrap()]);
    let name = format!("docker.io/library/conn-tracer:{VERSION}");
    assert!(
        ctr(&["images", "list", "--quiet"])
            .lines()
            .any(|l| l == name),
        "ctr import names it {name}, the DaemonSet's image: conn-tracer:{VERSION}"
    );

    let cgroup = Cgroup::new();
    let pod = Pod::new(&archive, false, Path::new("/nonexistent"), cgroup.path());
    let args = run_args(&pod.spec, &tag, "conn-tracer-image-test");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!("docker {}", args.join(" "));
    let id = engine.ok(&args).trim().to_owned();
    let pid: u32 = engine
        .ok(&["inspect", "--format", "{{.State.Pid}}", &id])
        .trim()
        .parse()
        .unwrap();
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    pod.wait_ready(&netns, || {
        let running = engine.ok(&["inspect", "--format", "{{.State.Running}}", &id]);
        if running.trim() == "true" {
            Ok(())
        } else {
            Err(engine.ok(&["logs", &id]))
        }
    });
    assert_runs_as_declared(pid, &pod, None);
    assert_eq!(
        status_field(pid, "Seccomp:"),
        "2",
        "a seccomp filter (the runtime's default profile)"
    );

    let out = engine
        .docker()
        .args(["exec", &id, "conn-tracer", "check"])
        .output()
        .expect("docker exec");
    assert!(
        out.status.success(),
        "conn-tracer check under runc and the default seccomp profile:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_redis_idle_kill_is_counted(&netns, pod.port);

    let grace = pod.grace().as_secs().to_string();
    engine.ok(&["stop", "--time", &grace, &id]);
    assert_eq!(
        engine
            .ok(&["inspect", "--format", "{{.State.ExitCode}}", &id])
            .trim(),
        "0",
        "exits 0 on SIGTERM:\n{}",
        engine.ok(&["logs", &id])
    );
}
