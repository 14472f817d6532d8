use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::{
    watch::{SERVICE_NAME_LABEL, Watched as _},
    *,
};
use crate::owner::kube::tests::{apply, nsname, pod};

/// A Service as `kubectl get svc -o json` shows it, managedFields and the
/// last-applied annotation included.
pub(crate) fn service(ns: &str, name: &str, ips: &[&str], ports: &[(&str, u16, Value)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-svc-{name}"),
            "resourceVersion": "100", "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app": name},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\":true}"},
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update",
                "apiVersion": "v1", "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:ports": {}}},
            }],
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips.first().copied().unwrap_or("None"),
            "clusterIPs": ips,
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": ports.iter().map(|(n, p, target)| json!({
                "name": n, "port": p, "protocol": "TCP", "targetPort": target,
            })).collect::<Vec<_>>(),
        },
        "status": {"loadBalancer": {}},
    })
}

/// An endpoint of a slice: address, pod, node, and whether it is ready
/// and terminating (serving follows ready unless terminating).
pub(crate) fn endpoint(ip: &str, pod: &str, ready: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating},
        "nodeName": "node-b",
        "targetRef": {"kind": "Pod", "namespace": "ignored-ns", "name": pod, "uid": format!("uid-{pod}")},
        "zone": "zone-a",
    })
}

/// An EndpointSlice as the EndpointSlice controller writes it.
pub(crate) fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    ports: &[(&str, u16)],
    eps: &[Value],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-slice-{name}"),
            "resourceVersion": "200", "generateName": format!("{svc}-"),
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc, "uid": "u", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {}}],
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
    })
}

fn svc_obj(v: &Value) -> ServiceObj {
    serde_json::from_value(v.clone()).expect("Service JSON")
}

fn svc_event(v: &Value) -> Event<ServiceObj> {
    Event::Apply(svc_obj(v))
}

fn slice_obj(v: &Value) -> SliceObj {
    serde_json::from_value(v.clone()).expect("EndpointSlice JSON")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `shop/cart`: ClusterIP 10.96.0.10, port 80 ("http") -> targetPort
/// "web" (8080 on the pods), port 9000 ("grpc") -> 9090.
fn cart(index: &ServiceIndex, eps: &[Value]) {
    let ports = [("http", 80, json!("web")), ("grpc", 9000, json!(9090))];
    index.apply(
        svc_event(&service("shop", "cart", &["10.96.0.10"], &ports)),
        Instant::now(),
    );
    let s = slice(
        "shop",
        "cart-abc12",
        "cart",
        &[("http", 8080), ("grpc", 9090)],
        eps,
    );
    index.apply(Event::Apply(slice_obj(&s)), Instant::now());
}

#[test]
fn cluster_ip_ports_name_their_service_port() {
    let index = ServiceIndex::default();
    cart(&index, &[]);
    let http = index
        .service_at(ip("10.96.0.10"), 80)
        .expect("a Service port");
    assert_eq!(
        (http.namespace(), http.name(), http.port()),
        ("shop", "cart", 80)
    );
    assert_eq!(http.port_name(), "http");
    assert_eq!(http.label(), "shop/cart");
    assert_eq!(
        index
            .service_at(ip("10.96.0.10"), 9000)
            .unwrap()
            .port_name(),
        "grpc"
    );
    assert_eq!(
        index.service_at(ip("10.96.0.10"), 8080),
        None,
        "a target port is not a Service port"
    );
    assert_eq!(index.service_at(ip("10.96.0.11"), 80), None);
    let mapped = IpAddr::V6(std::net::Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped());
    assert_eq!(index.service_at(mapped, 80), Some(http));
}

#[test]
fn headless_external_name_and_udp_make_no_entry_and_dual_stack_makes_two() {
    let index = ServiceIndex::default();
    let mut headless = service("db", "mysql", &[], &[("mysql", 3306, json!(3306))]);
    headless["spec"]["clusterIP"] = json!("None");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    index.apply(svc_event(&headless), Instant::now());
    let mut external = service("db", "ext", &[], &[]);
    external["spec"] = json!({"type": "ExternalName", "externalName": "db.example.com"});
    index.apply(svc_event(&external), Instant::now());
    let mut dns = service(
        "kube-system",
        "kube-dns",
        &["10.96.0.53", "fd00::53"],
        &[("dns-tcp", 53, json!(53))],
    );
    dns["spec"]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}));
    index.apply(svc_event(&dns), Instant::now());
    assert_eq!(
        index.size().service_ports,
        2,
        "{:?}",
        index.read().by_cluster_ip
    );
    assert_eq!(
        index.service_at(ip("fd00::53"), 53).unwrap().port_name(),
        "dns-tcp"
    );
    assert_eq!(
        index.service_at(ip("10.96.0.53"), 53).unwrap().name(),
        "kube-dns"
    );
}

#[test]
fn backends_are_endpoints_with_the_target_port_of_that_service_port() {
    let index = ServiceIndex::default();
    cart(
        &index,
        &[
            endpoint("10.244.2.5", "cart-7d9f-a", true, false),
            endpoint("10.244.3.6", "cart-7d9f-b", false, false),
        ],
    );
    let http = index.service_at(ip("10.96.0.10"), 80).unwrap();
    let grpc = index.service_at(ip("10.96.0.10"), 9000).unwrap();
    assert!(index.is_backend(&http, ip("10.244.2.5"), 8080));
    assert!(
        index.is_backend(&http, ip("10.244.3.6"), 8080),
        "not ready is still a backend"
    );
    assert!(
        !index.is_backend(&http, ip("10.244.2.5"), 9090),
        "grpc's target port"
    );
    assert!(index.is_backend(&grpc, ip("10.244.2.5"), 9090));
    assert!(!index.is_backend(&http, ip("10.244.9.9"), 8080));
    let other = ServiceRef::new("shop", "checkout", 80, "http");
    assert!(!index.is_backend(&other, ip("10.244.2.5"), 8080));
    assert_eq!(index.size().endpoints, 2);
}

#[test]
fn backend_sets_and_their_ready_backends_over_every_slice() {
    let index = ServiceIndex::default();
    // Ready; not ready; terminating.
    let states = [("2.5", "a", true, false), ("3.6", "b", false, false)];
    let eps: Vec<Value> = states
        .iter()
        .chain(&[("4.7", "c", false, true)])
        .map(|(ip, pod, ready, terminating)| {
            endpoint(
                &format!("10.244.{ip}"),
                &format!("cart-7d9f-{pod}"),
                *ready,
                *terminating,
            )
        })
        .collect();
    cart(&index, &eps);
    // A second slice of the same Service.
    let d = [endpoint("10.244.5.8", "cart-7d9f-d", true, false)];
    let more = slice("shop", "cart-def34", "cart", &[("http", 8080)], &d);
    index.apply(Event::Apply(slice_obj(&more)), Instant::now());
    let http = BackendSet {
        namespace: "shop".into(),
        service: "cart".into(),
        port_name: "http".into(),
    };
    assert_eq!(
        index.backend_sets_of(ip("10.244.3.6"), 8080),
        std::slice::from_ref(&http)
    );
    assert_eq!(
        index.backend_sets_of(ip("10.244.3.6"), 9090)[0].port_name,
        "grpc"
    );
    assert!(index.backend_sets_of(ip("10.244.3.6"), 80).is_empty());
    let ready: Vec<(IpAddr, u16, Option<String>)> = index
        .ready_backends(&http)
        .into_iter()
        .map(|b| (b.ip, b.port, b.pod))
        .collect();
    let mut ready = ready;
    ready.sort();
    // Not ready and terminating endpoints are left out.
    assert_eq!(
        ready,
        [
            (ip("10.244.2.5"), 8080, Some("cart-7d9f-a".into())),
            (ip("10.244.5.8"), 8080, Some("cart-7d9f-d".into())),
        ]
    );
    // An endpoint whose readiness is unknown counts as ready.
    let mut unknown = endpoint("10.244.6.9", "cart-7d9f-e", true, false);
    unknown["conditions"]
        .as_object_mut()
        .unwrap()
        .remove("ready");
    let s = slice("shop", "cart-ghi56", "cart", &[("http", 8080)], &[unknown]);
    index.apply(Event::Apply(slice_obj(&s)), Instant::now());
    assert_eq!(index.ready_backends(&http).len(), 3);
}

#[test]
fn pods_of_other_nodes_are_named_from_target_refs_and_this_nodes_pods_first() {
    let pods = PodIndex::new();
    apply(&pods, &pod("shop", "local-1", "uid-l", "10.244.1.5", &[]));
    let index = ServiceIndex::new(Some(pods), DEFAULT_DELETE_GRACE);
    cart(
        &index,
        &[
            endpoint("10.244.2.5", "cart-7d9f-a", true, false),
            endpoint("10.244.1.5", "stale-name", true, false),
        ],
    );
    // The slice's namespace (a targetRef always points into it).
    assert_eq!(
        index.pod_at(ip("10.244.2.5")),
        nsname("shop", "cart-7d9f-a")
    );
    assert_eq!(index.pod_at(ip("10.244.1.5")), nsname("shop", "local-1"));
    assert_eq!(index.pod_at(ip("10.244.7.7")), None);
    assert!(!index.ip_deleted(ip("10.244.2.5")));
}

#[test]
fn only_the_service_name_label_is_kept_of_the_metadata() {
    let s = slice_obj(&slice("shop", "cart-x", "cart", &[], &[]));
    let labels = s.metadata.labels.as_ref().unwrap();
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[SERVICE_NAME_LABEL], "cart");
    assert!(s.metadata.managed_fields.is_none() && s.metadata.annotations.is_none());
    // null lists, as the API writes a slice without endpoints or ports
    let mut empty = slice("shop", "cart-y", "cart", &[], &[]);
    empty["endpoints"] = Value::Null;
    empty["ports"] = Value::Null;
    let (_, entry) = slice_obj(&empty).entry();
    assert!(entry.endpoints.is_empty() && entry.ports.is_empty());
    // FQDN slices name no IP
    let mut fqdn = slice(
        "shop",
        "cart-z",
        "cart",
        &[],
        &[endpoint("db.example.com", "p", true, false)],
    );
    fqdn["addressType"] = json!("FQDN");
    assert!(slice_obj(&fqdn).entry().1.endpoints.is_empty());
}

#[test]
fn a_terminating_or_vanished_terminating_endpoint_is_a_deleted_pod_for_the_grace() {
    let grace = Duration::from_mins(1);
    let index = ServiceIndex::new(None, grace);
    let t0 = Instant::now();
    let ports = [("http", 8080)];
    let put = |eps: &[Value], at: Instant| {
        let s = slice("shop", "cart-abc12", "cart", &ports, eps);
        index.apply(Event::Apply(slice_obj(&s)), at);
    };
    put(
        &[
            endpoint("10.244.2.5", "cart-a", true, false),
            endpoint("10.244.2.6", "cart-b", true, false),
        ],
        t0,
    );
    // cart-a is deleted: terminating, then gone from the slice.
    put(
        &[
            endpoint("10.244.2.5", "cart-a", false, true),
            endpoint("10.244.2.6", "cart-b", true, false),
        ],
        t0,
    );
    assert!(index.ip_deleted(ip("10.244.2.5")));
    let gone_at = t0 + Duration::from_secs(30);
    put(&[endpoint("10.244.2.6", "cart-b", true, false)], gone_at);
    assert!(index.ip_deleted(ip("10.244.2.5")));
    assert_eq!(
        index.pod_at(ip("10.244.2.5")),
        nsname("shop", "cart-a"),
        "still named"
    );
    // A ready endpoint that leaves (a selector change) is not a deletion.
    put(&[], gone_at);
    assert!(!index.ip_deleted(ip("10.244.2.6")));
    // The grace counts from the last sight of the deletion (the removal).
    index.purge(gone_at + grace / 2);
    assert!(index.ip_deleted(ip("10.244.2.5")));
    index.purge(gone_at + grace);
    assert!(!index.ip_deleted(ip("10.244.2.5")));
    assert_eq!(index.pod_at(ip("10.244.2.5")), None);
}

#[test]
fn an_ip_given_to_a_new_pod_is_live_again() {
    let index = ServiceIndex::default();
    let now = Instant::now();
    let holds = |svc: &str, pod: &str, terminating| {
        let eps = [endpoint("10.244.2.5", pod, false, terminating)];
        let s = slice("shop", &format!("{svc}-1"), svc, &[], &eps);
        index.apply(Event::Apply(slice_obj(&s)), now);
        slice_obj(&s)
    };
    let a = holds("cart", "old", true);
    assert!(index.ip_deleted(ip("10.244.2.5")));
    holds("other", "new", false);
    assert!(!index.ip_deleted(ip("10.244.2.5")));
    assert_eq!(index.pod_at(ip("10.244.2.5")), nsname("shop", "new"));
    // Deleting the slice of the old pod leaves the new one.
    index.apply(Event::Delete(a), now);
    assert_eq!(index.pod_at(ip("10.244.2.5")), nsname("shop", "new"));
    assert!(!index.ip_deleted(ip("10.244.2.5")));
}

#[test]
fn a_relist_drops_what_is_gone_and_keeps_answering_until_it_is_done() {
    let index = ServiceIndex::default();
    cart(&index, &[endpoint("10.244.2.5", "cart-a", true, false)]);
    let gone = service("shop", "gone", &["10.96.0.99"], &[("http", 80, json!(80))]);
    index.apply(svc_event(&gone), Instant::now());
    let now = Instant::now();
    index.apply(Event::<ServiceObj>::Init, now);
    index.apply(Event::<SliceObj>::Init, now);
    let ports = [("http", 80, json!("web"))];
    let fresh = service("shop", "cart", &["10.96.0.10"], &ports);
    index.apply(Event::InitApply(svc_obj(&fresh)), now);
    let s = slice(
        "shop",
        "cart-abc12",
        "cart",
        &[("http", 8080)],
        &[endpoint("10.244.2.7", "cart-c", true, false)],
    );
    index.apply(Event::InitApply(slice_obj(&s)), now);
    assert!(
        index.service_at(ip("10.96.0.99"), 80).is_some(),
        "old answers until done"
    );
    assert!(!index.synced());
    index.apply(Event::<ServiceObj>::InitDone, now);
    index.apply(Event::<SliceObj>::InitDone, now);
    assert!(index.synced());
    assert!(index.service_at(ip("10.96.0.99"), 80).is_none());
    assert!(
        index.service_at(ip("10.96.0.10"), 9000).is_none(),
        "grpc port removed"
    );
    let http = index.service_at(ip("10.96.0.10"), 80).unwrap();
    assert!(index.is_backend(&http, ip("10.244.2.7"), 8080));
    assert!(!index.is_backend(&http, ip("10.244.2.5"), 8080));
    assert_eq!(index.pod_at(ip("10.244.2.5")), None);
    assert_eq!(
        index.size(),
        IndexSize {
            service_ports: 1,
            endpoints: 1,
            deleted: 0,
            refused: 0,
        }
    );
}

#[test]
fn a_full_index_leaves_slices_out_and_counts_them_until_there_is_room() {
    let index = ServiceIndex::with_max_endpoints(None, DEFAULT_DELETE_GRACE, 3);
    let now = Instant::now();
    let put = |name: &str, ips: &[&str]| {
        let eps: Vec<Value> = ips
            .iter()
            .map(|ip| endpoint(ip, &format!("p-{ip}"), true, false))
            .collect();
        let s = slice("shop", name, "cart", &[("http", 8080)], &eps);
        index.apply(Event::Apply(slice_obj(&s)), now);
    };
    put("a", &["10.0.0.1", "10.0.0.2"]);
    put("b", &["10.0.0.3", "10.0.0.4"]);
    assert_eq!((index.size().endpoints, index.size().refused), (2, 2));
    assert_eq!(index.pod_at(ip("10.0.0.3")), None, "left out");
    // Growing a slice past the bound drops its stale version too.
    put("a", &["10.0.0.1", "10.0.0.2", "10.0.0.5", "10.0.0.6"]);
    assert_eq!((index.size().endpoints, index.size().refused), (0, 6));
    assert_eq!(index.pod_at(ip("10.0.0.1")), None);
    // Room again: the next change of a slice gets it in.
    index.apply(
        Event::Delete(slice_obj(&slice("shop", "a", "cart", &[], &[]))),
        now,
    );
    put("b", &["10.0.0.3", "10.0.0.4"]);
    assert_eq!((index.size().endpoints, index.size().refused), (2, 0));
    assert_eq!(index.pod_at(ip("10.0.0.3")), nsname("shop", "p-10.0.0.3"));
    // A relist without a refused slice forgets it.
    put("c", &["10.0.0.7", "10.0.0.8"]);
    assert_eq!(index.size().refused, 2);
    index.apply(Event::<SliceObj>::Init, now);
    let keep = [endpoint("10.0.0.3", "p", true, false)];
    let keep = slice_obj(&slice("shop", "b", "cart", &[], &keep));
    index.apply(Event::InitApply(keep), now);
    index.apply(Event::<SliceObj>::InitDone, now);
    assert_eq!((index.size().endpoints, index.size().refused), (1, 0));
}

#[test]
fn an_ip_two_live_pods_share_names_neither() {
    // Two hostNetwork pods of one node back Services: their IP is the node's.
    let index = ServiceIndex::default();
    let now = Instant::now();
    for (svc, pod) in [
        ("node-exporter", "node-exporter-x"),
        ("ingress", "ingress-y"),
    ] {
        let eps = [endpoint("192.0.2.20", pod, true, false)];
        let s = slice("kube-system", &format!("{svc}-1"), svc, &[], &eps);
        index.apply(Event::Apply(slice_obj(&s)), now);
    }
    assert_eq!(index.pod_at(ip("192.0.2.20")), None);
    // One pod in two Services is still that pod.
    let eps = [endpoint("10.244.2.5", "cart-a", true, false)];
    for svc in ["cart", "cart-canary"] {
        let s = slice("shop", &format!("{svc}-1"), svc, &[], &eps);
        index.apply(Event::Apply(slice_obj(&s)), now);
    }
    assert_eq!(index.pod_at(ip("10.244.2.5")), nsname("shop", "cart-a"));
}
