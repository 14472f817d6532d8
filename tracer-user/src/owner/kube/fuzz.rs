//! Property tests of what turns a Kubernetes API object into labels
//! (`cargo xtask fuzz kube` runs them long): pods with missing, empty or
//! odd fields, and arbitrary JSON, never panic the index, and every
//! container id a pod reports finds that pod.

use proptest::{prelude::*, sample::select};
use serde_json::{Map, Value, json};

use super::*;

/// A string field: absent, empty, ordinary or odd.
fn text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,12}",
        any::<String>(),
    ])
}

fn container_id() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        "(containerd|cri-o|docker)://[0-9a-f]{64}",
        "[0-9a-f]{1,64}",
        Just("containerd://".to_string()),
        Just("://".to_string()),
        Just(String::new()),
        any::<String>(),
    ])
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| std::net::Ipv4Addr::from(b).to_string()),
        any::<[u8; 16]>().prop_map(|b| std::net::Ipv6Addr::from(b).to_string()),
        Just("10.244.1.5".to_string()),
        Just("not-an-ip".to_string()),
        Just(String::new()),
    ]
}

fn put(obj: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        obj.insert(key.to_string(), v);
    }
}

prop_compose! {
    fn arb_status()(
        name in "[a-z]{1,6}",
        id in container_id(),
        previous in container_id(),
    ) -> Value {
        let mut s = json!({
            "name": name, "image": "i", "imageID": "", "ready": true, "restartCount": 0,
        });
        let obj = s.as_object_mut().expect("object");
        put(obj, "containerID", id.map(Value::String));
        if let Some(p) = previous {
            obj.insert("lastState".into(), json!({"terminated": {"exitCode": 1, "containerID": p}}));
        }
        s
    }
}

prop_compose! {
    /// A well-typed Pod in which any field may be missing, empty or odd.
    fn arb_pod()(
        ns in text(), name in text(), uid in text(),
        containers in prop::collection::vec("[a-z]{0,6}", 0..3),
        has_spec in any::<bool>(), has_status in any::<bool>(),
        host_network in prop::option::of(any::<bool>()),
        phase in prop::option::of(select(&["Pending", "Running", "Succeeded", "Failed", "", "Weird"][..])),
        pod_ip in prop::option::of(ip()),
        pod_ips in prop::option::of(prop::collection::vec(ip(), 0..3)),
        statuses in prop::collection::vec(arb_status(), 0..3),
        init in prop::collection::vec(arb_status(), 0..2),
    ) -> Value {
        let mut meta = Map::new();
        put(&mut meta, "namespace", ns.map(Value::String));
        put(&mut meta, "name", name.map(Value::String));
        put(&mut meta, "uid", uid.map(Value::String));
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta});
        if has_spec {
            let mut spec = json!({
                "containers": containers.iter().map(|n| json!({"name": n})).collect::<Vec<_>>(),
            });
            put(spec.as_object_mut().expect("object"), "hostNetwork", host_network.map(Value::Bool));
            pod["spec"] = spec;
        }
        if has_status {
            let mut status = Map::new();
            put(&mut status, "phase", phase.map(|p| Value::String(p.into())));
            put(&mut status, "podIP", pod_ip.map(Value::String));
            put(&mut status, "podIPs", pod_ips.map(|v| v.into_iter().map(|ip| json!({"ip": ip})).collect()));
            status.insert("containerStatuses".into(), Value::Array(statuses));
            status.insert("initContainerStatuses".into(), Value::Array(init));
            pod["status"] = Value::Object(status);
        }
        pod
    }
}

/// Arbitrary JSON, shaped a little like a Pod now and then.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    select(
                        &[
                            "metadata",
                            "spec",
                            "status",
                            "uid",
                            "name",
                            "namespace",
                            "containers",
                            "containerStatuses",
                            "containerID",
                            "podIP",
                            "podIPs",
                            "ip",
                            "hostNetwork",
                            "phase"
                        ][..]
                    )
                    .prop_map(str::to_string),
                    "[a-zA-Z]{1,8}",
                ],
                inner,
                0..4,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Applies `pod` as each kind of watch event and checks the lookups.
fn exercise(pod: &Pod) -> Result<(), TestCaseError> {
    let index = PodIndex::with_grace(Duration::ZERO);
    let t0 = Instant::now();
    index.apply(Event::Init, t0);
    index.apply(Event::InitApply(pod.clone()), t0);
    index.apply(Event::InitDone, t0);
    index.apply(Event::Apply(pod.clone()), t0);
    let (uid, entry) = PodEntry::from_pod(pod);
    prop_assert!(!uid.is_empty(), "a pod is always keyed");
    for (id, _) in &entry.container_ids {
        let found = index.lookup_container(id).expect("an indexed container id");
        let names: Vec<&String> = entry
            .container_ids
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, n)| n)
            .collect();
        prop_assert!(names.contains(&&found.container));
        prop_assert_eq!(&found.pod_uid, &uid);
    }
    for ip in &entry.ips {
        prop_assert!(index.lookup_ip(*ip).is_some());
    }
    if !uid.contains('_') {
        // (`_` is read as the systemd spelling of `-`.)
        prop_assert_eq!(
            index.lookup_pod_uid(&uid),
            Some((entry.namespace.clone(), entry.name.clone()))
        );
    }
    let _ = index.container_names_of(&uid);
    index.apply(Event::Delete(pod.clone()), t0);
    index.purge(t0 + Duration::from_secs(1));
    prop_assert_eq!(index.pods(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(crate::fuzzing::config(256))]

    #[test]
    fn pods_with_missing_or_odd_fields_never_panic(v in arb_pod()) {
        let pod: Pod = serde_json::from_value(v.clone())
            .map_err(|e| TestCaseError::fail(format!("{e}: {v}")))?;
        exercise(&pod)?;
    }

    /// Arbitrary JSON is a Pod (then as above) or a deserialisation
    /// error, which the watcher counts and retries, never a panic.
    #[test]
    fn arbitrary_json_never_panics(v in any_json()) {
        if let Ok(pod) = serde_json::from_value::<Pod>(v) {
            exercise(&pod)?;
        }
    }

    #[test]
    fn container_ids_never_panic(id in any::<String>()) {
        let bare = bare_container_id(&id);
        prop_assert!(id.ends_with(bare));
        prop_assert_eq!(PodIndex::new().lookup_container(&id), None);
    }
}
