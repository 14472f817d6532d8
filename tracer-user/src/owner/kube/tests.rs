use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use super::*;
pub(crate) use crate::testing::mesh::{pod, status};

fn typed(v: &Value) -> Pod {
    serde_json::from_value(v.clone()).expect("valid Pod JSON")
}

pub(crate) fn apply(index: &PodIndex, v: &Value) {
    index.apply(Event::Apply(typed(v)), Instant::now());
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "compared with what lookups return"
)]
pub(crate) fn nsname(ns: &str, pod: &str) -> Option<(String, String)> {
    Some((ns.to_owned(), pod.to_owned()))
}

const CONTAINERD: &str = "4f3c2b1a0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a";
const CRIO: &str = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b";
const DOCKER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn container_ids_of_every_runtime_resolve_bare_and_prefixed() {
    let index = PodIndex::new();
    apply(
        &index,
        &pod(
            "shop",
            "cart-1",
            "uid-1",
            "10.244.1.5",
            &[
                ("app", &format!("containerd://{CONTAINERD}")),
                ("istio-proxy", &format!("cri-o://{CRIO}")),
                ("legacy", &format!("docker://{DOCKER}")),
            ],
        ),
    );
    let want = |container: &str| {
        Some(PodRef {
            namespace: "shop".into(),
            pod: "cart-1".into(),
            container: container.into(),
            pod_uid: "uid-1".into(),
        })
    };
    assert_eq!(index.lookup_container(CONTAINERD), want("app"));
    assert_eq!(index.lookup_container(CRIO), want("istio-proxy"));
    assert_eq!(index.lookup_container(DOCKER), want("legacy"));
    assert_eq!(
        index.lookup_container(&format!("cri-o://{CRIO}")),
        want("istio-proxy")
    );
    assert_eq!(index.lookup_container("feedface"), None);
    assert_eq!(index.pods(), 1);
    assert_eq!(bare_container_id("containerd://abc"), "abc");
    assert_eq!(bare_container_id("abc"), "abc");
}

#[test]
fn containers_not_started_yet_have_no_id() {
    let index = PodIndex::new();
    let mut p = pod("ns", "p", "uid-1", "10.244.1.5", &[("app", "")]);
    p["status"]["containerStatuses"][0]
        .as_object_mut()
        .unwrap()
        .remove("containerID");
    apply(&index, &p);
    assert!(index.read().by_container.is_empty());
    assert_eq!(index.container_names_of("uid-1"), ["app"]);
}

#[test]
fn pod_ips_index_both_families_and_skip_host_network() {
    let index = PodIndex::new();
    let mut dual = pod("web", "front-1", "uid-1", "10.244.1.7", &[]);
    dual["status"]["podIPs"] = json!([{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}]);
    apply(&index, &dual);
    let mut host = pod("kube-system", "kube-proxy-x", "uid-2", "192.0.2.10", &[]);
    host["spec"]["hostNetwork"] = json!(true);
    apply(&index, &host);

    let v4 = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7));
    assert_eq!(index.lookup_ip(v4), nsname("web", "front-1"));
    let v6: IpAddr = "fd00:10:244:1::7".parse().unwrap();
    assert_eq!(index.lookup_ip(v6), nsname("web", "front-1"));
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 244, 1, 7).to_ipv6_mapped());
    assert_eq!(index.lookup_ip(mapped), nsname("web", "front-1"));
    assert_eq!(index.lookup_ip("192.0.2.10".parse().unwrap()), None);
    assert_eq!(index.lookup_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)), None);
    assert_eq!(
        index.lookup_pod_uid("uid-2"),
        nsname("kube-system", "kube-proxy-x")
    );
}

#[test]
fn init_ephemeral_and_restarted_containers_are_indexed() {
    let index = PodIndex::new();
    let mut p = pod(
        "db",
        "mysql-0",
        "1234-5678",
        "10.244.1.9",
        &[("mysql", "containerd://aaa")],
    );
    p["spec"]["initContainers"] = json!([{"name": "init-perms", "image": "busybox"}]);
    p["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox"}]);
    p["status"]["initContainerStatuses"] = json!([status("init-perms", "containerd://iii")]);
    p["status"]["ephemeralContainerStatuses"] = json!([status("debugger", "containerd://eee")]);
    p["status"]["containerStatuses"][0]["restartCount"] = json!(1);
    p["status"]["containerStatuses"][0]["lastState"] =
        json!({"terminated": {"exitCode": 137, "containerID": "containerd://old"}});
    apply(&index, &p);

    let container = |id: &str| index.lookup_container(id).map(|r| r.container);
    assert_eq!(container("iii").as_deref(), Some("init-perms"));
    assert_eq!(container("aaa").as_deref(), Some("mysql"));
    assert_eq!(container("old").as_deref(), Some("mysql"));
    assert_eq!(container("eee").as_deref(), Some("debugger"));
    assert_eq!(
        index.container_names_of("1234-5678"),
        ["init-perms", "mysql", "debugger"]
    );
    assert_eq!(index.lookup_pod_uid("1234_5678"), nsname("db", "mysql-0"));
    assert!(index.container_names_of("nope").is_empty());
}

#[test]
fn deleted_pods_are_forgotten_once_a_grace_period_after_their_purge() {
    let grace = Duration::from_mins(2);
    let index = PodIndex::with_grace(grace);
    let gone = pod(
        "ns",
        "gone",
        "uid-1",
        "10.244.1.5",
        &[("app", "containerd://a")],
    );
    let back = pod(
        "ns",
        "web-0",
        "uid-2",
        "10.244.1.6",
        &[("app", "containerd://b")],
    );
    apply(&index, &gone);
    apply(&index, &back);
    let t0 = Instant::now();
    index.apply(Event::Delete(typed(&gone)), t0);
    index.apply(Event::Delete(typed(&back)), t0);
    // A StatefulSet's pod comes back under the same name, new uid.
    let again = pod(
        "ns",
        "web-0",
        "uid-3",
        "10.244.1.7",
        &[("app", "containerd://c")],
    );
    apply(&index, &again);

    index.purge(t0 + grace);
    assert!(index.take_forgotten(t0 + grace).is_empty(), "too early");
    assert!(
        index
            .take_forgotten(t0 + grace + grace.mul_f64(0.99))
            .is_empty(),
        "too early"
    );
    assert_eq!(
        index.take_forgotten(t0 + grace + grace),
        vec![("ns".to_string(), "gone".to_string())],
        "web-0 exists again: its series stay"
    );
    assert!(index.take_forgotten(t0 + grace * 3).is_empty(), "only once");
}

#[test]
fn deleted_pods_keep_labels_for_the_grace_period() {
    let grace = Duration::from_mins(2);
    let index = PodIndex::with_grace(grace);
    let p = pod(
        "ns",
        "gone",
        "uid-1",
        "10.244.1.5",
        &[("app", "containerd://abc")],
    );
    apply(&index, &p);
    let t0 = Instant::now();
    index.apply(Event::Delete(typed(&p)), t0);

    assert_eq!(index.pods(), 0);
    index.purge(t0 + grace.mul_f64(0.99));
    assert_eq!(index.lookup_container("abc").unwrap().pod, "gone");
    assert_eq!(
        index.lookup_ip("10.244.1.5".parse().unwrap()),
        nsname("ns", "gone")
    );

    index.purge(t0 + grace);
    assert_eq!(index.lookup_container("abc"), None);
    assert_eq!(index.lookup_ip("10.244.1.5".parse().unwrap()), None);
    assert_eq!(index.lookup_pod_uid("uid-1"), None);
    assert!(index.read().pods.is_empty(), "memory is released");
}

#[test]
fn a_new_pod_takes_over_the_ip_of_a_deleted_or_finished_one() {
    let index = PodIndex::new();
    let old = pod("ns", "old", "uid-1", "10.244.1.5", &[]);
    apply(&index, &old);
    index.apply(Event::Delete(typed(&old)), Instant::now());
    let mut done = pod("ns", "job", "uid-0", "10.244.1.5", &[]);
    done["status"]["phase"] = json!("Succeeded");
    apply(&index, &done);
    let ip = "10.244.1.5".parse().unwrap();
    assert_eq!(
        index.lookup_ip(ip),
        nsname("ns", "old"),
        "deleted beats finished"
    );

    apply(&index, &pod("ns", "new", "uid-2", "10.244.1.5", &[]));
    assert_eq!(index.lookup_ip(ip), nsname("ns", "new"));
}

#[test]
fn a_relist_replaces_the_index_only_once_complete() {
    let index = PodIndex::new();
    let a = pod(
        "ns",
        "a",
        "uid-a",
        "10.244.1.1",
        &[("app", "containerd://aa")],
    );
    let b = pod(
        "ns",
        "b",
        "uid-b",
        "10.244.1.2",
        &[("app", "containerd://bb")],
    );
    let c = pod(
        "ns",
        "c",
        "uid-c",
        "10.244.1.3",
        &[("app", "containerd://cc")],
    );
    let t0 = Instant::now();
    index.apply(Event::Init, t0);
    index.apply(Event::InitApply(typed(&a)), t0);
    index.apply(Event::InitApply(typed(&b)), t0);
    assert!(!index.synced());
    assert_eq!(index.pods(), 0, "nothing before the first list is complete");
    index.apply(Event::InitDone, t0);
    assert!(index.synced());
    assert_eq!(index.pods(), 2);

    // A relist that fails half way leaves the index as it was.
    index.apply(Event::Init, t0);
    index.apply(Event::InitApply(typed(&c)), t0);
    assert_eq!(index.lookup_container("aa").unwrap().pod, "a");
    assert_eq!(index.lookup_container("cc"), None);
    // The retry lists b and c: a was deleted meanwhile and gets its grace.
    index.apply(Event::Init, t0);
    index.apply(Event::InitApply(typed(&b)), t0);
    index.apply(Event::InitApply(typed(&c)), t0);
    index.apply(Event::InitDone, t0);
    assert_eq!(index.pods(), 2);
    assert_eq!(index.lookup_container("aa").unwrap().pod, "a");
    assert_eq!(index.lookup_container("cc").unwrap().pod, "c");
    index.purge(t0 + DEFAULT_DELETE_GRACE);
    assert_eq!(index.lookup_container("aa"), None);
    assert_eq!(index.lookup_container("bb").unwrap().pod, "b");
}

#[test]
fn watcher_selects_this_node_with_list_then_watch() {
    let config = watcher_config("node-a");
    assert_eq!(
        config.field_selector.as_deref(),
        Some("spec.nodeName=node-a")
    );
    assert_eq!(config.initial_list_strategy, InitialListStrategy::ListWatch);
}

#[tokio::test]
async fn sources_that_cannot_work_say_what_to_do() {
    let index = PodIndex::new();
    run(KubeSource::Disabled, String::new(), index.clone())
        .await
        .expect("--no-kube is not an error");
    let err = run(
        KubeSource::Url("http://127.0.0.1:1".into()),
        String::new(),
        index,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--node-name"), "{err}");
    let err = run(
        KubeSource::Url("not a url".into()),
        "n".into(),
        PodIndex::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--kube-api"), "{err}");
}

/// The https path (in-cluster) builds its rustls client and reports a
/// failed handshake as a counted, retried error rather than a panic.
#[tokio::test]
async fn https_sources_use_rustls_and_count_handshake_failures() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and hangs up: no TLS server behind it.
    let server = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });
    let index = PodIndex::new();
    let url = format!("https://127.0.0.1:{port}");
    let watcher = tokio::spawn(run(KubeSource::Url(url), "node-a".into(), index.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while index.errors() == 0 && !watcher.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !watcher.is_finished(),
        "the watcher gave up: {:?}",
        watcher.await
    );
    assert!(index.errors() >= 1, "no error counted in 20 s");
    assert!(!index.synced());
    watcher.abort();
    server.abort();
}

#[tokio::test]
async fn in_cluster_outside_a_cluster_names_the_flags() {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return; // really in a pod: the in-cluster config may well work
    }
    let err = run(KubeSource::InCluster, "n".into(), PodIndex::new())
        .await
        .unwrap_err();
    assert!(matches!(err, KubeError::InCluster(_)), "{err}");
    assert!(err.to_string().contains("--no-kube"), "{err}");
}
