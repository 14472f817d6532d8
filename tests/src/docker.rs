//! A private Docker engine for the image tests: Debian's docker.io (Docker
//! 20.10, whose `docker load` reads only an archive's `manifest.json`) with
//! the containerd it starts itself, state under a temporary directory.
//! It changes nothing on the host's network (no iptables, no bridge) and
//! is stopped, its containers with it, on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    container::{CAPABILITIES, ContainerSpec},
    image::TempDir,
};

pub struct Dockerd {
    child: Child,
    dir: TempDir,
}

/// The docker.io CLI (`/usr/bin/docker`), else the one on PATH.
fn cli() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.is_file() {
        debian.to_owned()
    } else {
        PathBuf::from("docker")
    }
}

impl Dockerd {
    pub fn start() -> Self {
        let dir = TempDir::new("dockerd");
        let p = dir.path();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(p.join("root"))
            .arg("--exec-root")
            .arg(p.join("exec"))
            .arg("--pidfile")
            .arg(p.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", p.join("docker.sock").display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(p.join("dockerd.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .expect("spawn dockerd");
        let mut engine = Self { child, dir };
        let deadline = Instant::now() + Duration::from_mins(1);
        while !engine
            .docker()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                matches!(engine.child.try_wait(), Ok(None)) && Instant::now() < deadline,
                "dockerd did not come up:\n{}",
                engine.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
        engine
    }

    /// `docker` talking to this engine.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new(cli());
        cmd.arg("--host").arg(format!(
            "unix://{}",
            self.dir.path().join("docker.sock").display()
        ));
        cmd
    }

    /// Runs `docker ARGS`; its stdout, or a panic with its stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        crate::checked_output(self.docker().args(args), "")
    }

    /// The socket of the containerd dockerd started.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.path().join("exec/containerd/containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(out) = self.docker().args(["ps", "--all", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.docker().args(["rm", "--force", id]).output();
            }
        }
        let (grace, poll) = (Duration::from_secs(20), Duration::from_millis(100));
        crate::terminate(&mut self.child, grace, poll);
    }
}

/// `docker run` arguments that give container `name` what `spec` says
/// (the same spec `ct-container` carries out), with Docker's default
/// seccomp profile (containerd's `RuntimeDefault` is the same profile) and
/// its own cgroup namespace, as containerd gives a pod's container.
/// Docker's `readonly` bind mounts are not recursive, as Kubernetes'.
pub fn run_args(spec: &ContainerSpec, image: &str, name: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--detach",
        "--name",
        name,
        "--cgroupns",
        "private",
        "--cap-drop",
        "ALL",
    ]
    .map(str::to_owned)
    .to_vec();
    args.push(format!("--user={}:{}", spec.uid, spec.gid));
    for cap in &spec.caps {
        args.push(format!("--cap-add={}", CAPABILITIES[*cap as usize]));
    }
    if spec.no_new_privs {
        args.push("--security-opt=no-new-privileges".into());
    }
    if spec.read_only_root {
        args.push("--read-only".into());
    }
    if spec.host_pid {
        args.push("--pid=host".into());
    }
    // A network namespace of its own with only `lo`, like the test's pod.
    args.push(if spec.netns.is_some() {
        "--network=none".into()
    } else {
        "--network=host".into()
    });
    for m in &spec.mounts {
        args.push(format!(
            "--mount=type=bind,source={},target={}{}",
            m.source.display(),
            m.target,
            if m.read_only { ",readonly" } else { "" }
        ));
    }
    for kv in &spec.env {
        args.push(format!("--env={kv}"));
    }
    args.push(format!("--workdir={}", spec.cwd));
    args.push(format!("--hostname={}", spec.hostname));
    let (program, rest) = spec.argv.split_first().expect("argv");
    args.push(format!("--entrypoint={program}"));
    args.push(image.to_owned());
    args.extend(rest.iter().cloned());
    args
}
