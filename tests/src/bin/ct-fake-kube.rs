//! `ct-fake-kube`: the fake apiserver (`integration_tests::fake_kube`)
//! serving a simulated cluster, for the scale benchmark (`cargo xtask bench`,
//! section "cluster"): `--pods` pods spread over `--nodes` nodes and
//! `--services` ClusterIP Services, each with one real-format EndpointSlice
//! per 100 of its pods, and the pods of `--node` as Pod objects.
//!
//! Lines on stdout: `url URL`, `objects SERVICES SLICES ENDPOINTS NODE_PODS`,
//! `bytes SERVICE_LIST SLICE_LIST` (JSON sizes of all Services and all
//! EndpointSlices, as the watch's list reads them), then `ready`. A line
//! `relist` on stdin forgets the watch history and cuts the watches (as
//! etcd compaction and an apiserver restart do: every client lists
//! again), answered by `relisted`; any other line, or EOF, ends it.

use std::{io::BufRead as _, net::Ipv4Addr};

use clap::Parser;
use integration_tests::{
    fake_kube::{FakeKube, SliceEndpoint, endpoint_slice_json, pod_json, service_json},
    helper::say,
};
use serde_json::Value;

#[derive(Parser)]
#[command(about = "A fake Kubernetes API serving a simulated cluster")]
struct Cli {
    #[arg(long, default_value_t = 150_000)]
    pods: usize,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 5_000)]
    nodes: usize,
    /// The node the daemon under test runs on (its pods are served as Pods).
    #[arg(long, default_value = "node-00000")]
    node: String,
}

/// Endpoints per EndpointSlice (the controller's default maximum).
const PER_SLICE: usize = 100;

fn node_name(n: usize) -> String {
    format!("node-{n:05}")
}

/// The i-th pod IP: 10.128.0.1 onwards.
fn pod_ip(i: usize) -> String {
    let n = u32::try_from(i).expect("pod index") + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n).to_string()
}

/// The s-th ClusterIP: 10.96.0.1 onwards.
fn cluster_ip(s: usize) -> String {
    let n = u32::try_from(s).expect("service index") + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n).to_string()
}

/// A Deployment-style pod name: `<service>-<replicaset hash>-<suffix>`.
fn pod_name(service: &str, i: usize) -> String {
    format!(
        "{service}-{:09x}-{:05x}",
        (i / 7) * 2_654_435_761 % 0xf_ffff_ffff,
        i % 0xf_ffff
    )
}

fn main() {
    let cli = Cli::parse();
    let fake = FakeKube::start(&cli.node);
    say(&format!("url {}", fake.url()));
    let (mut services, mut slices, mut node_pods) = (Vec::new(), Vec::new(), Vec::new());
    let mut endpoints = 0;
    let per_service = cli.pods.div_ceil(cli.services.max(1));
    for s in 0..cli.services {
        let namespace = format!("team-{:03}", s % 100);
        let name = format!("svc-{s:05}");
        services.push(service_json(
            &namespace,
            &name,
            &cluster_ip(s),
            &[("http", 80, 8080)],
        ));
        let first = s * per_service;
        let pods: Vec<(String, String, String)> = (first..(first + per_service).min(cli.pods))
            .map(|i| {
                (
                    pod_ip(i),
                    pod_name(&name, i),
                    node_name(i % cli.nodes.max(1)),
                )
            })
            .collect();
        for (k, chunk) in pods.chunks(PER_SLICE).enumerate() {
            let eps: Vec<SliceEndpoint<'_>> = chunk
                .iter()
                .map(|(ip, pod, node)| SliceEndpoint {
                    ip,
                    pod,
                    node,
                    ready: true,
                    terminating: false,
                })
                .collect();
            endpoints += eps.len();
            let slice = endpoint_slice_json(
                &namespace,
                &format!("{name}-{k:05x}"),
                &name,
                &[("http", 8080)],
                &eps,
            );
            slices.push(slice);
        }
        for (ip, pod, node) in pods.iter().filter(|(_, _, node)| *node == cli.node) {
            let uid = format!("uid-{pod}");
            let id = format!("containerd://{:064x}", node_pods.len() + 1);
            node_pods.push(pod_json(&namespace, pod, &uid, node, ip, &[("app", &id)]));
        }
    }
    let size = |v: &[Value]| v.iter().map(|o| o.to_string().len() + 1).sum::<usize>();
    say(&format!(
        "objects {} {} {endpoints} {}",
        services.len(),
        slices.len(),
        node_pods.len()
    ));
    say(&format!("bytes {} {}", size(&services), size(&slices)));
    fake.set_services(services);
    fake.set_endpoint_slices(slices);
    fake.set_pods(node_pods);
    say("ready");
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if line.trim() != "relist" {
            break;
        }
        fake.expire_history();
        fake.drop_watches();
        say("relisted");
    }
}
