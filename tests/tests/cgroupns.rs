//! A daemon in its own cgroup namespace, as in a container with cgroup v2:
//! it joins the host's (pid 1's) at start, so the cgroup paths it reads in
//! /proc are host paths and pod owners resolve without walking the cgroup
//! hierarchy.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{fs, net::TcpListener, process::Command, thread, time::Duration};

use integration_tests::{
    Cgroup, NetNs, Peer,
    daemon::Daemon,
    mesh::{PodCgroups, hex_id},
    serial_unless_skipped,
};

/// A pod UID of this test only (the pod's cgroup directories are fixed).
const POD_UID: &str = "7c3e0a52-1f0b-4c8e-9d55-0c9a1b2d3e4f";
const PORT: u16 = 16396;

fn cgroup_ns(pid: &str) -> std::path::PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/cgroup"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/cgroup: {e}"))
}

#[test]
fn root_a_daemon_in_its_own_cgroup_namespace_joins_the_hosts_and_names_pods_directly() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    // The daemon's cgroup becomes the root of its own cgroup namespace.
    let own = Cgroup::new();
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec unshare --cgroup \"$0\" \"$@\"",
        own.path().display()
    );
    // The namespace to join: this test's, the host's here. (On a node it is
    // pid 1's, the default; a sandbox may hide pid 1.)
    let host_pid = std::process::id().to_string();
    let daemon = Daemon::start_wrapped(
        &["sh", "-c", &script],
        "1s",
        &["--no-kube", "--cgroupns-pid", &host_pid],
    );
    let pid = daemon.pid().to_string();
    // A process of a pod connects; its cgroup id resolves through
    // /proc/<pid>/cgroup, with no walk of the hierarchy.
    let listener = ns
        .spawn_in(|| TcpListener::bind(("127.0.0.1", PORT)).expect("bind"))
        .join()
        .expect("listener thread");
    let id = hex_id(0xc7);
    let pod = PodCgroups::new(POD_UID, &[("app", &id)]);
    let before = daemon.scrape();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} bash -c \
             'exec 3<>/dev/tcp/127.0.0.1/{PORT} && echo connected && read -t 20 _'",
            pod.dir("app").display(),
            ns.name()
        ),
    ]);
    let mut app = Peer::spawn("app", cmd);
    app.expect_line("connected");
    let (_server_end, _) = listener.accept().expect("accept");
    let list = daemon.connections();
    let mine = list
        .as_array()
        .expect("array")
        .iter()
        .find(|c| {
            c["remote"] == format!("127.0.0.1:{PORT}")
                && c["pid"].as_u64() == Some(u64::from(app.pid()))
        })
        .unwrap_or_else(|| panic!("the app's connection is not in {list:#}"))
        .clone();
    assert_eq!(mine["container"], id[..12], "{mine}");
    assert_eq!(mine["role"], "app", "{mine}");
    let after = daemon.scrape();
    assert_eq!(
        after.sum("conntracer_cgroup_rescans_total", &[])
            - before.sum("conntracer_cgroup_rescans_total", &[]),
        0.0,
        "the pod's cgroup needed a walk of the hierarchy"
    );
    // Every thread of the daemon is in that cgroup namespace.
    let host = cgroup_ns("self");
    let tasks: Vec<_> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() > 1, "daemon threads: {tasks:?}");
    for t in &tasks {
        assert_eq!(
            cgroup_ns(&format!("{pid}/task/{t}")),
            host,
            "thread {t} of the daemon is not in the host's cgroup namespace"
        );
    }

    drop(app);
    thread::sleep(Duration::from_millis(100));
    assert!(daemon.stop(), "daemon did not exit 0");
}
