//! The pod index read by kube-rs from a fake apiserver (no root needed):
//! listing, watching, deletion grace, and labels kept through API failures;
//! the cluster-wide Service and EndpointSlice index the same way.

use std::{net::IpAddr, time::Duration};

use conn_tracer::{KubeSource, PodIndex, PodRef, ServiceIndex, watch_pods as run, watch_services};
use integration_tests::fake_kube::{
    FakeKube, SliceEndpoint, endpoint_slice_json, pod_json, service_json,
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(30);

fn id(n: u64) -> String {
    format!("{n:064x}")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("IP literal")
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "compared with what lookups return"
)]
fn nsname(ns: &str, pod: &str) -> Option<(String, String)> {
    Some((ns.to_owned(), pod.to_owned()))
}

/// `shop/cart-1` on this node, an app container under containerd and a
/// sidecar under CRI-O.
fn cart() -> Value {
    pod_json(
        "shop",
        "cart-1",
        "uid-cart-1",
        NODE,
        "10.244.1.5",
        &[
            ("cart", &format!("containerd://{}", id(1))),
            ("istio-proxy", &format!("cri-o://{}", id(2))),
        ],
    )
}

/// A pod of another node: the field selector must keep it out.
fn elsewhere() -> Value {
    pod_json(
        "shop",
        "cart-2",
        "uid-cart-2",
        "node-b",
        "10.244.2.5",
        &[("cart", &format!("containerd://{}", id(3)))],
    )
}

/// A hostNetwork pod: its IP is the node's and must not name it.
fn host_pod() -> Value {
    let mut pod = pod_json(
        "kube-system",
        "kube-proxy-a",
        "uid-kp",
        NODE,
        "192.0.2.10",
        &[("kube-proxy", &format!("docker://{}", id(4)))],
    );
    pod["spec"]["hostNetwork"] = json!(true);
    pod
}

fn db() -> Value {
    let mut pod = pod_json(
        "db",
        "mysql-0",
        "uid-mysql-0",
        NODE,
        "10.244.1.9",
        &[("mysql", &format!("containerd://{}", id(5)))],
    );
    pod["spec"]["initContainers"] = json!([{"name": "init-perms", "image": "busybox"}]);
    pod["status"]["initContainerStatuses"] = json!([{
        "name": "init-perms", "containerID": format!("containerd://{}", id(6)),
        "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
    }]);
    pod
}

fn redis() -> Value {
    pod_json(
        "cache",
        "redis-0",
        "uid-redis-0",
        NODE,
        "10.244.1.11",
        &[("redis", &format!("containerd://{}", id(7)))],
    )
}

fn start(fake: &FakeKube, grace: Duration) -> (PodIndex, JoinHandle<()>) {
    let index = PodIndex::with_grace(grace);
    let task = tokio::spawn(run(
        KubeSource::Url(fake.url()),
        NODE.to_owned(),
        index.clone(),
    ));
    let task = tokio::spawn(async move {
        task.await.expect("watcher task").expect("watcher started");
    });
    (index, task)
}

/// Polls `check` every 50 ms until it holds; panics after [`WAIT`] with
/// what the fake saw.
async fn wait_until(fake: &FakeKube, what: &str, mut check: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(
        waited.await.is_ok(),
        "timed out after {WAIT:?} waiting for {what}; requests:\n{}",
        fake.requests().join("\n")
    );
}

#[tokio::test]
async fn kube_index_lists_and_watches_the_pods_of_its_node() {
    let fake = FakeKube::start(NODE);
    fake.set_pods(vec![cart(), elsewhere(), host_pod()]);
    let (index, task) = start(&fake, Duration::from_mins(2));
    wait_until(&fake, "the first list", || index.synced()).await;

    assert_eq!(
        index.lookup_container(&id(1)),
        Some(PodRef {
            namespace: "shop".into(),
            pod: "cart-1".into(),
            container: "cart".into(),
            pod_uid: "uid-cart-1".into(),
        })
    );
    assert_eq!(
        index.lookup_container(&id(2)).map(|r| r.container),
        Some("istio-proxy".into())
    );
    assert_eq!(index.lookup_ip(ip("10.244.1.5")), nsname("shop", "cart-1"));
    assert_eq!(index.lookup_container(&id(3)), None, "pod of another node");
    assert_eq!(
        index.lookup_ip(ip("10.244.2.5")),
        None,
        "pod of another node"
    );
    assert_eq!(
        index.lookup_container(&id(4)).map(|r| r.pod),
        Some("kube-proxy-a".into())
    );
    assert_eq!(index.lookup_ip(ip("192.0.2.10")), None, "hostNetwork IP");
    assert_eq!(index.pods(), 2);
    assert_eq!(
        index.container_names_of("uid-cart-1"),
        ["cart", "istio-proxy"]
    );

    // A pod scheduled later arrives through the watch.
    wait_until(&fake, "the watch", || fake.open_watches() == 1).await;
    fake.set_pods(vec![cart(), elsewhere(), host_pod(), db()]);
    wait_until(&fake, "mysql-0 from the watch", || {
        index.lookup_ip(ip("10.244.1.9")).is_some()
    })
    .await;
    assert_eq!(index.lookup_pod_uid("uid-mysql-0"), nsname("db", "mysql-0"));
    assert_eq!(
        index.lookup_container(&id(6)).map(|r| r.container),
        Some("init-perms".into())
    );
    assert_eq!(
        index.container_names_of("uid-mysql-0"),
        ["init-perms", "mysql"]
    );
    assert_eq!(index.errors(), 0, "the fake's format reads without error");

    let requests = fake.requests();
    eprintln!("requests kube-rs sent:\n{}", requests.join("\n"));
    assert_eq!(
        requests
            .iter()
            .filter(|r| !r.contains("watch=true"))
            .count(),
        1,
        "one list, then watching: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:#?}"
    );
    task.abort();
}

#[tokio::test]
async fn kube_index_keeps_deleted_pods_for_the_grace_period() {
    let fake = FakeKube::start(NODE);
    fake.set_pods(vec![cart(), db()]);
    let grace = Duration::from_secs(1);
    let (index, task) = start(&fake, grace);
    wait_until(&fake, "the first list", || index.pods() == 2).await;
    wait_until(&fake, "the watch", || fake.open_watches() == 1).await;

    fake.set_pods(vec![cart()]);
    wait_until(&fake, "the deletion", || index.pods() == 1).await;
    let deleted_at = tokio::time::Instant::now();
    // Connections closing right after the deletion still get labels.
    assert_eq!(index.lookup_ip(ip("10.244.1.9")), nsname("db", "mysql-0"));
    assert_eq!(
        index.lookup_container(&id(5)).map(|r| r.pod),
        Some("mysql-0".into())
    );

    wait_until(&fake, "the end of the grace period", || {
        index.lookup_container(&id(5)).is_none()
    })
    .await;
    assert!(
        deleted_at.elapsed() >= grace / 2,
        "dropped before its grace"
    );
    assert_eq!(index.lookup_ip(ip("10.244.1.9")), None);
    assert_eq!(index.lookup_pod_uid("uid-mysql-0"), None);
    assert!(index.container_names_of("uid-mysql-0").is_empty());
    assert_eq!(index.lookup_ip(ip("10.244.1.5")), nsname("shop", "cart-1"));
    task.abort();
}

#[tokio::test]
async fn kube_index_keeps_labels_through_api_failures_and_recovers() {
    let fake = FakeKube::start(NODE);
    fake.set_pods(vec![cart(), db()]);
    let (index, task) = start(&fake, Duration::from_secs(1));
    wait_until(&fake, "the first list", || index.synced()).await;
    wait_until(&fake, "the watch", || fake.open_watches() == 1).await;

    // The watch breaks and the apiserver fails the next three requests;
    // meanwhile mysql-0 goes and redis-0 comes.
    let errors_before = index.errors();
    fake.fail_next(3);
    fake.drop_watches();
    fake.set_pods(vec![cart(), redis()]);
    wait_until(&fake, "three failed requests", || {
        fake.failures_pending() == 0
    })
    .await;
    wait_until(&fake, "three errors counted", || {
        index.errors() >= errors_before + 3
    })
    .await;
    assert_eq!(index.lookup_ip(ip("10.244.1.5")), nsname("shop", "cart-1"));
    assert_eq!(
        index.lookup_container(&id(1)).map(|r| r.pod),
        Some("cart-1".into())
    );

    // The watch resumes from its resourceVersion and catches up.
    wait_until(&fake, "redis-0 after the outage", || {
        index.lookup_ip(ip("10.244.1.11")).is_some()
    })
    .await;
    wait_until(&fake, "mysql-0's grace to end", || {
        index.lookup_ip(ip("10.244.1.9")).is_none()
    })
    .await;
    assert_eq!(index.pods(), 2);

    // History compacted while the watch is down: 410 Gone, then a relist,
    // during which the labels stay.
    wait_until(&fake, "the watch again", || fake.open_watches() == 1).await;
    let lists_before = lists(&fake);
    fake.expire_history();
    fake.drop_watches();
    fake.set_pods(vec![cart(), redis(), db()]);
    wait_until(&fake, "a relist", || lists(&fake) > lists_before).await;
    assert_eq!(
        index.lookup_ip(ip("10.244.1.11")),
        nsname("cache", "redis-0")
    );
    wait_until(&fake, "mysql-0 back after the relist", || {
        index.lookup_ip(ip("10.244.1.9")).is_some()
    })
    .await;
    assert_eq!(index.pods(), 3);
    assert_eq!(index.lookup_ip(ip("10.244.1.5")), nsname("shop", "cart-1"));
    assert!(!task.is_finished(), "the watcher runs on");
    eprintln!("requests kube-rs sent:\n{}", fake.requests().join("\n"));
    task.abort();
}

fn lists(fake: &FakeKube) -> usize {
    fake.requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count()
}

/// `shop/cart` (ClusterIP 10.96.0.10, port 80 "http" -> 8080) with two
/// endpoints on another node, one of them terminating when `deleting`.
fn cart_service(deleting: bool) -> (Value, Value) {
    let svc = service_json("shop", "cart", "10.96.0.10", &[("http", 80, 8080)]);
    let eps = [
        SliceEndpoint {
            ip: "10.244.2.5",
            pod: "cart-7d9f-a",
            node: "node-b",
            ready: !deleting,
            terminating: deleting,
        },
        SliceEndpoint {
            ip: "10.244.3.6",
            pod: "cart-7d9f-b",
            node: "node-c",
            ready: true,
            terminating: false,
        },
    ];
    let slice = endpoint_slice_json("shop", "cart-x1y2z", "cart", &[("http", 8080)], &eps);
    (svc, slice)
}

#[tokio::test]
async fn kube_index_names_services_and_pods_of_every_node() {
    let fake = FakeKube::start(NODE);
    let (svc, slice) = cart_service(false);
    fake.set_services(vec![svc]);
    fake.set_endpoint_slices(vec![slice]);
    let index = ServiceIndex::new(None, Duration::from_secs(1));
    let task = tokio::spawn(watch_services(KubeSource::Url(fake.url()), index.clone()));
    wait_until(&fake, "the first lists", || index.synced()).await;

    let http = index.service_at(ip("10.96.0.10"), 80);
    let http = http.expect("ClusterIP:80");
    assert_eq!(format!("{http:?}"), "shop/cart:80(http)");
    assert!(index.is_backend(&http, ip("10.244.2.5"), 8080));
    assert!(!index.is_backend(&http, ip("10.244.2.5"), 80));
    assert_eq!(
        index.pod_at(ip("10.244.3.6")),
        nsname("shop", "cart-7d9f-b")
    );

    // cart-7d9f-a is deleted: terminating, then out of the slice; its IP
    // is a deleted pod's for the grace period, then forgotten.
    wait_until(&fake, "both watches", || fake.open_watches() == 2).await;
    let (_, terminating) = cart_service(true);
    fake.set_endpoint_slices(vec![terminating]);
    wait_until(&fake, "the terminating endpoint", || {
        index.ip_deleted(ip("10.244.2.5"))
    })
    .await;
    let (svc, mut gone) = cart_service(false);
    gone["endpoints"].as_array_mut().unwrap().remove(0);
    fake.set_endpoint_slices(vec![gone]);
    wait_until(&fake, "the removal", || index.size().endpoints == 1).await;
    assert!(index.ip_deleted(ip("10.244.2.5")));
    assert_eq!(
        index.pod_at(ip("10.244.2.5")),
        nsname("shop", "cart-7d9f-a")
    );
    wait_until(&fake, "the grace to pass", || {
        !index.ip_deleted(ip("10.244.2.5"))
    })
    .await;

    // A deleted Service's ClusterIP names nothing any more.
    fake.set_services(vec![]);
    wait_until(&fake, "the Service deletion", || {
        index.service_at(ip("10.96.0.10"), 80).is_none()
    })
    .await;
    fake.set_services(vec![svc]);
    wait_until(&fake, "the Service again", || {
        index.service_at(ip("10.96.0.10"), 80).is_some()
    })
    .await;
    assert_eq!(index.errors(), 0, "the fake's format reads without error");
    let requests = fake.requests();
    for path in [
        "/api/v1/services?",
        "/apis/discovery.k8s.io/v1/endpointslices?",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {path}"))),
            "{path}: {requests:#?}"
        );
    }
    task.abort();
}
