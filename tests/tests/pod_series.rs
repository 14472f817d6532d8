//! Series of deleted pods do not stay forever: a node whose pods come and go
//! (deployments, CronJobs) would otherwise grow its series without bound.
//! A deleted pod keeps its labels for `deleted_pod_grace` (connections still
//! closing as it goes are named), then its counter and histogram series stay
//! one more grace period (so Prometheus scrapes their last counts) and are
//! removed, counted in `conntracer_forgotten_pods_total`.

use std::{process::Command, time::Duration};

use integration_tests::{
    Peer,
    daemon::{Daemon, Metrics},
    fake_kube::{FakeKube, pod_json},
    mesh::{PodCgroups, hex_id},
    serial_unless_skipped,
};

const NODE: &str = "node-forget";
/// A pod UID of this test only (the pod's cgroup directories are fixed).
const POD_UID: &str = "5a1c9e0d-2b3f-4d6a-8e7f-9a0b1c2d3e4f";
const POD: &str = "batch-job-29a7x";

#[test]
fn root_a_deleted_pods_series_are_removed_after_two_grace_periods() {
    let _serial = serial_unless_skipped!();
    let kube = FakeKube::start(NODE);
    let id = hex_id(0xd1);
    let cgroups = PodCgroups::new(POD_UID, &[("job", &id)]);
    kube.set_pods(vec![pod_json(
        "batch",
        POD,
        POD_UID,
        NODE,
        "10.250.0.9",
        &[("job", &format!("containerd://{id}"))],
    )]);
    let config = "deleted_pod_grace = \"1s\"\nresync_interval = \"1s\"\n";
    let daemon = Daemon::start_on("1s", &kube, config);
    let pods = |m: &Metrics| m.sum("conntracer_kube_pods", &[]);
    let m = daemon.wait_metrics(Duration::from_secs(20), |m| pods(m) >= 1.0);
    assert!(pods(&m) >= 1.0, "the pod watch never listed the pod");

    // The job's process sets a keepalive option: a series with its pod.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "echo $$ > {}/cgroup.procs && exec python3 -c \"import socket, time; \
             s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1); \
             print('set', flush=True); time.sleep(3)\"",
            cgroups.dir("job").display()
        ),
    ]);
    let mut job = Peer::spawn("job", cmd);
    job.expect_line("set");
    let ours = [("namespace", "batch"), ("pod", POD)];
    let m = daemon.wait_metrics(Duration::from_secs(10), |m| {
        m.sum("conntracer_keepalive_sockopts_total", &ours) >= 1.0
    });
    assert!(
        m.sum("conntracer_keepalive_sockopts_total", &ours) >= 1.0,
        "{}",
        m.dump("conntracer_keepalive_sockopts_total")
    );
    job.wait_success();
    let forgotten = |m: &Metrics| m.sum("conntracer_forgotten_pods_total", &[]);
    let before = forgotten(&m);

    // The pod is deleted: 1 s with labels, 1 s more with series, then gone
    // at the next resync (1 s).
    kube.set_pods(vec![]);
    let m = daemon.wait_metrics(Duration::from_secs(15), |m| forgotten(m) > before);
    assert!(
        forgotten(&m) > before,
        "the deleted pod was never forgotten"
    );
    let body = daemon.metrics_text();
    assert!(
        !body.contains(POD),
        "series of the deleted pod are still there:\n{}",
        body.lines()
            .filter(|l| l.contains(POD))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(daemon.stop(), "daemon did not exit 0");
}
