//! Property tests of the cgroup path parser (`cargo xtask fuzz podid` runs
//! them long): any path is a pod or `None`, never a panic; kubelet paths of
//! every driver, runtime and QoS class, with random ids, parse to their pod
//! UID and container ID.

use proptest::{array, prelude::*, sample::select};

use super::{tests::assert_well_formed, *};

fn hex(bytes: &[u8], upper: bool) -> String {
    bytes
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

/// A pod UID as the API writes it (UUID, or a static pod's hash), maybe
/// uppercased, and its canonical form.
fn arb_uid() -> impl Strategy<Value = (String, String)> {
    (array::uniform16(any::<u8>()), any::<bool>(), any::<bool>()).prop_map(
        |(b, upper, is_static)| {
            let h = hex(&b, upper);
            let raw = if is_static {
                h
            } else {
                format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                )
            };
            (raw.clone(), raw.to_ascii_lowercase())
        },
    )
}

fn arb_cid() -> impl Strategy<Value = (String, String)> {
    (array::uniform32(any::<u8>()), any::<bool>()).prop_map(|(b, upper)| {
        let raw = hex(&b, upper);
        (raw.clone(), raw.to_ascii_lowercase())
    })
}

#[derive(Debug, Clone, Copy)]
enum Driver {
    Systemd,
    Cgroupfs,
    /// containerd's literal `slice:prefix:id` directory.
    Literal,
}

/// What sits under the pod's cgroup.
#[derive(Debug, Clone, Copy)]
enum Leaf {
    PodLevel,
    Containerd,
    CriO,
    Docker,
    Conmon,
    Bare,
    Unnamed,
}

/// A kubelet-made path with random ids, and what it must parse to.
#[expect(
    clippy::too_many_lines,
    reason = "one table: every driver by every leaf"
)]
fn arb_kubelet_path() -> impl Strategy<Value = (String, PodContainer)> {
    (
        arb_uid(),
        arb_cid(),
        select(&[Qos::Guaranteed, Qos::Burstable, Qos::BestEffort][..]),
        select(&[Driver::Systemd, Driver::Cgroupfs, Driver::Literal][..]),
        select(
            &[
                Leaf::PodLevel,
                Leaf::Containerd,
                Leaf::CriO,
                Leaf::Docker,
                Leaf::Conmon,
                Leaf::Bare,
                Leaf::Unnamed,
            ][..],
        ),
        any::<bool>(),
        select(
            &[
                "",
                "/sys/fs/cgroup/unified",
                "/system.slice/docker-0123456789abcdef.scope",
            ][..],
        ),
        select(&["", "/", "/container", "/a/b"][..]),
    )
        .prop_map(
            |((uid, want_uid), (cid, want_cid), qos, driver, leaf, kubelet_root, prefix, child)| {
                let q = match qos {
                    Qos::Guaranteed => "",
                    Qos::Burstable => "burstable",
                    Qos::BestEffort => "besteffort",
                };
                let (runtime, container_id) = match (driver, leaf) {
                    (_, Leaf::PodLevel | Leaf::Unnamed)
                    | (Driver::Literal, Leaf::Conmon | Leaf::Bare) => (None, None),
                    (_, Leaf::Containerd) => (Some(Runtime::Containerd), Some(want_cid.clone())),
                    (_, Leaf::CriO) => (Some(Runtime::CriO), Some(want_cid.clone())),
                    (_, Leaf::Docker) => (Some(Runtime::Docker), Some(want_cid.clone())),
                    (_, Leaf::Conmon) => (Some(Runtime::CriO), None),
                    (_, Leaf::Bare) => (None, Some(want_cid.clone())),
                };
                let path = match driver {
                    Driver::Systemd | Driver::Literal => {
                        let kp = if kubelet_root {
                            "kubelet-kubepods"
                        } else {
                            "kubepods"
                        };
                        let class = if q.is_empty() {
                            kp.to_string()
                        } else {
                            format!("{kp}-{q}")
                        };
                        let pod = format!("{class}-pod{}.slice", uid.replace('-', "_"));
                        if let Driver::Literal = driver {
                            let leaf = match leaf {
                                Leaf::Containerd => format!(":cri-containerd:{cid}"),
                                Leaf::CriO => format!(":crio:{cid}"),
                                Leaf::Docker => format!(":docker:{cid}"),
                                Leaf::Conmon => format!(":runc:{cid}"),
                                Leaf::Bare => format!(":{cid}"),
                                Leaf::PodLevel | Leaf::Unnamed => ":".to_string(),
                            };
                            format!("{prefix}/system.slice/containerd.service/{pod}{leaf}{child}")
                        } else {
                            let root = if kubelet_root { "/kubelet.slice" } else { "" };
                            let parents = if q.is_empty() {
                                format!("{root}/{kp}.slice")
                            } else {
                                format!("{root}/{kp}.slice/{class}.slice")
                            };
                            let leaf = match leaf {
                                Leaf::PodLevel => String::new(),
                                Leaf::Containerd => format!("/cri-containerd-{cid}.scope"),
                                Leaf::CriO => format!("/crio-{cid}.scope"),
                                Leaf::Docker => format!("/docker-{cid}.scope"),
                                Leaf::Conmon => format!("/crio-conmon-{cid}.scope"),
                                Leaf::Bare => format!("/{cid}"),
                                Leaf::Unnamed => "/var-lib-x.mount".to_string(),
                            };
                            let child = if leaf.is_empty() { "" } else { child };
                            format!("{prefix}{parents}/{pod}{leaf}{child}")
                        }
                    }
                    Driver::Cgroupfs => {
                        let root = if kubelet_root { "/kubelet" } else { "" };
                        let class = if q.is_empty() {
                            String::new()
                        } else {
                            format!("/{q}")
                        };
                        let leaf = match leaf {
                            Leaf::PodLevel => String::new(),
                            Leaf::Containerd => format!("/cri-containerd-{cid}.scope"),
                            Leaf::CriO => format!("/crio-{cid}"),
                            Leaf::Docker => format!("/docker-{cid}.scope"),
                            Leaf::Conmon => format!("/crio-conmon-{cid}"),
                            Leaf::Bare => format!("/{cid}"),
                            Leaf::Unnamed => "/kube-proxy".to_string(),
                        };
                        let child = if leaf.is_empty() { "" } else { child };
                        format!("{prefix}{root}/kubepods{class}/pod{uid}{leaf}{child}")
                    }
                };
                let want = PodContainer {
                    pod_uid: want_uid,
                    container_id,
                    runtime,
                    qos,
                };
                (path, want)
            },
        )
}

/// One random edit: delete, replace or insert a character that matters
/// to the parser.
fn mutate(path: &str, edits: &[(prop::sample::Index, u8, char)]) -> String {
    let mut chars: Vec<char> = path.chars().collect();
    for (at, op, c) in edits {
        let at = at.index(chars.len() + 1);
        match op % 3 {
            0 if at < chars.len() => {
                chars.remove(at);
            }
            1 if at < chars.len() => chars[at] = *c,
            _ => chars.insert(at, *c),
        }
    }
    chars.into_iter().collect()
}

fn arb_edit() -> impl Strategy<Value = (prop::sample::Index, u8, char)> {
    (
        any::<prop::sample::Index>(),
        any::<u8>(),
        prop_oneof![
            select(&['/', '-', '_', ':', '.', 'a', 'F', 'G', '0', '\0', 'é'][..]),
            any::<char>(),
        ],
    )
}

proptest! {
    #![proptest_config(crate::fuzzing::config(512))]

    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        if let Some(pc) = parse_cgroup_path(&s) {
            assert_well_formed(&pc, &s);
        }
    }

    /// Directory names that almost are the kubelet's, glued at random.
    #[test]
    fn component_soup_never_panics(parts in prop::collection::vec(
        prop_oneof![
            select(&[
                "kubepods", "kubepods.slice", "kubepods-burstable.slice", "burstable",
                "besteffort", "kubelet", "kubelet.slice", "pod", ".slice", ".scope", "-", "_",
                ":", "cri-containerd-", "crio-", "crio-conmon-", "docker-", "system.slice",
                "/", "//", "\\x2d", "0",
            ][..]).prop_map(str::to_string),
            "[0-9a-fA-F_-]{0,40}",
            any::<String>(),
        ],
        0..12,
    )) {
        let s: String = parts.concat();
        if let Some(pc) = parse_cgroup_path(&s) {
            assert_well_formed(&pc, &s);
        }
    }

    /// Well-formed paths of every layout parse to the right pod and container.
    #[test]
    fn kubelet_paths_parse_to_their_pod_and_container((path, want) in arb_kubelet_path()) {
        prop_assert_eq!(parse_cgroup_path(&path), Some(want), "{}", path);
    }

    /// Kubelet paths with a few random edits: a pod or `None`, never a
    /// panic, and any pod found is well formed.
    #[test]
    fn mutated_kubelet_paths_never_panic(
        (path, _) in arb_kubelet_path(),
        edits in prop::collection::vec(arb_edit(), 1..5),
    ) {
        let s = mutate(&path, &edits);
        if let Some(pc) = parse_cgroup_path(&s) {
            assert_well_formed(&pc, &s);
        }
    }

    /// The documented layouts, edited.
    #[test]
    fn mutated_documented_layouts_never_panic(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(arb_edit(), 1..5),
    ) {
        let (path, _) = tests::LAYOUTS[which.index(tests::LAYOUTS.len())];
        let s = mutate(path, &edits);
        if let Some(pc) = parse_cgroup_path(&s) {
            assert_well_formed(&pc, &s);
        }
    }
}
