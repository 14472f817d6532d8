//! Sidecar detection in a user-namespaced pod: a process of the pod's
//! container `app` whose uid is 1337 only inside its user namespace (the
//! host sees uid 0, as with Kubernetes' `hostUsers: false`) is the sidecar;
//! the same client without the user namespace is the app.

use std::{process::Command, time::Duration};

use integration_tests::{
    NetNs, Peer,
    daemon::{Daemon, Metrics},
    fake_kube::{FakeKube, pod_json},
    mesh::{PodCgroups, hex_id},
    serial_unless_skipped,
};

const PEER: &str = env!("CARGO_BIN_EXE_ct-peer");
const NODE: &str = "node-userns";
const POD_UID: &str = "7c2e4b1a-9d3f-4e6a-8b7c-1d2e3f4a5b6c";
const POD: &str = "userns-7f9c4";

/// A `ct-peer` client in the pod's `app` container that holds its
/// connection open until told; `userns` runs it as uid 1337 of a new user
/// namespace.
fn client(cgroups: &PodCgroups, ns: &NetNs, port: u16, userns: bool) -> Peer {
    let prefix = if userns {
        "unshare --user --map-user=1337 --map-group=1337 "
    } else {
        ""
    };
    // Into the cgroup first: `ip netns exec` remounts /sys.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} {prefix}{PEER} client \
         --addr 127.0.0.1 --port {port} --pause-before-close",
        cgroups.dir("app").display(),
        ns.name()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let mut peer = Peer::spawn(if userns { "userns client" } else { "client" }, cmd);
    peer.expect_line("connected");
    peer
}

fn server(ns: &NetNs) -> (Peer, u16) {
    let mut cmd = ns.command(PEER);
    cmd.args(["server", "--addr", "127.0.0.1"]);
    let mut server = Peer::spawn("server", cmd);
    let port = server.expect_port("listening");
    (server, port)
}

#[test]
fn root_uid_1337_inside_a_pods_user_namespace_is_the_sidecar() {
    let _serial = serial_unless_skipped!();
    let id = hex_id(0x7e);
    let cgroups = PodCgroups::new(POD_UID, &[("app", &id)]);
    let kube = FakeKube::start(NODE);
    let app = [("app", format!("containerd://{id}"))];
    let app: Vec<(&str, &str)> = app.iter().map(|(n, i)| (*n, i.as_str())).collect();
    kube.set_pods(vec![pod_json(
        "mesh",
        POD,
        POD_UID,
        NODE,
        "10.250.7.9",
        &app,
    )]);
    let daemon = Daemon::start_on("60s", &kube, "");
    let pods = |m: &Metrics| m.sum("conntracer_kube_pods", &[]);
    let m = daemon.wait_metrics(Duration::from_secs(20), |m| pods(m) >= 1.0);
    assert!(pods(&m) >= 1.0, "the pod watch never listed the pod");
    let ns = NetNs::new();
    let open = |role: &'static str| {
        let labels = [
            ("namespace", "mesh"),
            ("pod", POD),
            ("container", "app"),
            ("role", role),
            ("direction", "outbound"),
        ];
        move |m: &Metrics| m.sum("conntracer_connections_open", &labels)
    };

    for (userns, role) in [(true, "sidecar"), (false, "app")] {
        let (mut srv, port) = server(&ns);
        let mut c = client(&cgroups, &ns, port, userns);
        let count = open(role);
        let m = daemon.wait_metrics(Duration::from_secs(10), |m| count(m) >= 1.0);
        assert!(
            count(&m) >= 1.0 && count(&m) < 1.5,
            "userns {userns}: want one {role} connection: {}",
            m.dump("conntracer_connections_open")
        );
        let other = open(if role == "app" { "sidecar" } else { "app" });
        assert!(other(&m) < 0.5, "{}", m.dump("conntracer_connections_open"));
        c.go();
        c.expect_line("closed");
        for line in ["accepted", "eof", "done"] {
            srv.expect_line(line);
        }
    }
    assert!(daemon.stop(), "daemon did not exit 0");
}
