use super::*;

// Made-up ids in the real shapes.
macro_rules! uid {
    () => {
        "24850f06-820e-40dc-a2dd-9c841ee51216"
    };
}
macro_rules! uid_ {
    () => {
        "24850f06_820e_40dc_a2dd_9c841ee51216"
    };
}
macro_rules! cid {
    () => {
        "5a2ba19129284e1d4a35fb1b60f170c505b01f5adb9c47e7f3c7ad4c67bb001b"
    };
}
macro_rules! node {
    () => {
        "65540938c4f65cacdd206a2d9fe8f9e151d9e5168376555d9a2afc3b69dbc68c"
    };
}
macro_rules! static_uid {
    () => {
        "77a32fa00f9b81fcc7ca003f2e6a1a36"
    };
}
pub(crate) const UID: &str = uid!();
pub(crate) const CID: &str = cid!();
use Qos::{BestEffort, Burstable, Guaranteed};
use Runtime::{Containerd, CriO, Docker};
pub(crate) use uid_;

pub(crate) type Expected = (&'static str, Option<&'static str>, Option<Runtime>, Qos);

/// (path, (pod uid, container id, runtime, qos)); sources in the module doc
/// and the report: kubelet cgroup_manager_linux.go / qos naming, coroot
/// node-agent and Datadog agent test fixtures, kind node layouts.
pub(super) const LAYOUTS: &[(&str, Expected)] = &[
    // systemd driver
    (
        concat!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
            uid_!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Containerd), Burstable),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod",
            uid_!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Containerd), BestEffort),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-pod",
            uid_!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Containerd), Guaranteed),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
            uid_!(),
            ".slice/crio-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(CriO), Burstable),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
            uid_!(),
            ".slice/crio-",
            cid!(),
            ".scope/container"
        ),
        (UID, Some(CID), Some(CriO), Burstable),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-pod",
            uid_!(),
            ".slice/crio-conmon-",
            cid!(),
            ".scope"
        ),
        (UID, None, Some(CriO), Guaranteed),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod",
            uid_!(),
            ".slice/docker-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Docker), BestEffort),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
            uid_!(),
            ".slice"
        ),
        (UID, None, None, Burstable),
    ),
    (
        concat!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod",
            static_uid!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope"
        ),
        (static_uid!(), Some(CID), Some(Containerd), Burstable),
    ),
    // hybrid host: path under /sys/fs/cgroup/unified
    (
        concat!(
            "/sys/fs/cgroup/unified/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod",
            uid_!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Containerd), BestEffort),
    ),
    // kind: kubelet --cgroup-root=/kubelet, inside the node and from the host
    (
        concat!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod",
            uid_!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Containerd), Burstable),
    ),
    (
        concat!(
            "/system.slice/docker-",
            node!(),
            ".scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod",
            uid_!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Containerd), Guaranteed),
    ),
    // containerd's literal "slice:prefix:id" under containerd.service
    (
        concat!(
            "/system.slice/containerd.service/kubepods-burstable-pod",
            uid_!(),
            ".slice:cri-containerd:",
            cid!()
        ),
        (UID, Some(CID), Some(Containerd), Burstable),
    ),
    // cgroupfs driver
    (
        concat!("/kubepods/burstable/pod", uid!(), "/", cid!()),
        (UID, Some(CID), None, Burstable),
    ),
    (
        concat!("/kubepods/pod", uid!(), "/", cid!()),
        (UID, Some(CID), None, Guaranteed),
    ),
    (
        concat!(
            "/kubepods/besteffort/pod",
            uid!(),
            "/",
            cid!(),
            "/kube-proxy"
        ),
        (UID, Some(CID), None, BestEffort),
    ),
    (
        concat!("/kubepods/burstable/pod", uid!(), "/crio-", cid!()),
        (UID, Some(CID), Some(CriO), Burstable),
    ),
    (
        concat!("/kubepods/pod", uid!(), "/crio-conmon-", cid!()),
        (UID, None, Some(CriO), Guaranteed),
    ),
    (
        concat!("/kubepods/besteffort/pod", uid!()),
        (UID, None, None, BestEffort),
    ),
    (
        concat!("/kubepods/burstable/pod", static_uid!(), "/", cid!()),
        (static_uid!(), Some(CID), None, Burstable),
    ),
    // cgroupfs with a kubelet cgroup root (kind), and k3s in Docker from the host
    (
        concat!("/kubelet/kubepods/burstable/pod", uid!(), "/", cid!()),
        (UID, Some(CID), None, Burstable),
    ),
    (
        concat!(
            "/system.slice/docker-",
            node!(),
            ".scope/kubepods/besteffort/pod",
            uid!(),
            "/",
            cid!()
        ),
        (UID, Some(CID), None, BestEffort),
    ),
    // no leading slash, trailing slash
    (
        concat!("kubepods/pod", uid!(), "/", cid!(), "/"),
        (UID, Some(CID), None, Guaranteed),
    ),
    // a pod child the runtime did not name is the pod, not a container
    (
        concat!(
            "/kubepods.slice/kubepods-pod",
            uid_!(),
            ".slice/var-lib-x.mount"
        ),
        (UID, None, None, Guaranteed),
    ),
    // nested clusters: the outer pod is the one this node knows
    (
        concat!(
            "/kubepods.slice/kubepods-pod",
            uid_!(),
            ".slice/cri-containerd-",
            cid!(),
            ".scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod2daf1958_b3e7_44c5_b37e_460795c1095e.slice/cri-containerd-",
            node!(),
            ".scope"
        ),
        (UID, Some(CID), Some(Containerd), Guaranteed),
    ),
];

pub(crate) fn expected((uid, cid, runtime, qos): Expected) -> PodContainer {
    PodContainer {
        pod_uid: uid.to_owned(),
        container_id: cid.map(str::to_owned),
        runtime,
        qos,
    }
}

#[test]
fn parses_kubelet_cgroup_layouts() {
    assert!(LAYOUTS.len() >= 15);
    for &(path, want) in LAYOUTS {
        assert_eq!(parse_cgroup_path(path), Some(expected(want)), "{path}");
    }
}

#[test]
fn uppercase_ids_come_back_lowercase() {
    let path = format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{}.scope",
        uid_!().to_ascii_uppercase(),
        CID.to_ascii_uppercase()
    );
    let pc = parse_cgroup_path(&path).unwrap();
    assert_eq!(pc.pod_uid, UID);
    assert_eq!(pc.container_id.as_deref(), Some(CID));
}

#[test]
fn labels_spell_classes_and_runtimes() {
    assert_eq!(BestEffort.as_str(), "BestEffort");
    assert_eq!(Guaranteed.as_str(), "Guaranteed");
    assert_eq!(Burstable.as_str(), "Burstable");
    assert_eq!(Containerd.as_str(), "containerd");
    assert_eq!(CriO.as_str(), "cri-o");
    assert_eq!(Docker.as_str(), "docker");
}

#[test]
fn non_pod_paths_are_none() {
    let not_pods = [
        String::new(),
        "/".into(),
        "//".into(),
        "/init.scope".into(),
        "/system.slice/sshd.service".into(),
        "/system.slice/containerd.service".into(),
        "/user.slice/user-1000.slice/session-3.scope".into(),
        "/user.slice/user-1000.slice/user@1000.service/app.slice".into(),
        "/kubepods.slice".into(),
        "/kubepods.slice/kubepods-burstable.slice".into(),
        "/kubepods.slice/kubepods-besteffort.slice".into(),
        "/kubepods".into(),
        "/kubepods/burstable".into(),
        "/kubelet.slice/kubelet-kubepods.slice".into(),
        format!("/system.slice/docker-{CID}.scope"),
        format!("/docker/{CID}"),
        format!("/machine.slice/libpod-{CID}.scope"),
        // a pod-looking name outside kubepods
        format!("/user.slice/user-pod{}.slice", uid_!()),
        format!("/docker/pod{UID}/{CID}"),
        format!("/pod{UID}/{CID}"),
        // unknown QoS classes
        format!("/kubepods/gold/pod{UID}/{CID}"),
        format!(
            "/kubepods.slice/kubepods-gold.slice/kubepods-gold-pod{}.slice",
            uid_!()
        ),
        format!("/kubepods/burstable/extra/pod{UID}/{CID}"),
        // malformed UIDs: not hex, short, wrong separators for the driver
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podNOTAUUID.slice".into(),
        format!("/kubepods.slice/kubepods-pod{}.slice", &uid_!()[..35]),
        format!("/kubepods.slice/kubepods-pod{UID}.slice"),
        format!("/kubepods/pod{}/{CID}", uid_!()),
        "/kubepods/podzzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz".into(),
        format!("/kubepods/pod{UID}x/{CID}"),
        // slice name without the pod part
        "/kubepods.slice/kubepods-pod.slice".into(),
        "/kubepods.slice/kubepods-.slice".into(),
    ];
    for path in &not_pods {
        assert_eq!(parse_cgroup_path(path), None, "{path}");
    }
}

#[test]
fn malformed_container_ids_leave_the_pod() {
    for leaf in [
        format!("cri-containerd-{}.scope", &CID[..63]),
        format!("cri-containerd-{CID}0.scope"),
        "crio-xyz.scope".into(),
        format!("docker-{}g.scope", &CID[..63]),
        "kube-proxy".into(),
        format!("crio-conmon-{}.scope", &CID[..10]),
    ] {
        let path = format!("/kubepods.slice/kubepods-pod{}.slice/{leaf}", uid_!());
        assert_eq!(
            parse_cgroup_path(&path),
            Some(expected((UID, None, None, Guaranteed))),
            "{path}"
        );
    }
    let colon = format!("/kubepods-pod{}.slice:runc:{CID}", uid_!());
    assert_eq!(
        parse_cgroup_path(&colon),
        Some(expected((UID, None, None, Guaranteed)))
    );
}

/// What any `Some` must look like, whatever the input.
pub(crate) fn assert_well_formed(pc: &PodContainer, input: &str) {
    let uid_ok = canonical_uid(&pc.pod_uid).as_deref() == Some(pc.pod_uid.as_str());
    assert!(uid_ok, "uid {:?} from {input:?}", pc.pod_uid);
    if let Some(id) = &pc.container_id {
        let ok = id.len() == 64 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        assert!(ok, "container id {id:?} from {input:?}");
    }
}
