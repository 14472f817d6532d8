//! The shipped dashboard and alerts against a real Prometheus scraping the
//! daemon while the field report happens: an app with keepalive on talks to
//! Redis through its Envoy sidecar, whose upstream leg has keepalive off; the
//! path's conntrack forgets the idle flow and resets the app's next query
//! (case C of sidecar_chains.rs).
//!
//! Prometheus runs the example static config of deploy/prometheus with the
//! operator's target labels added (namespace, pod, container of the tracer's
//! own pod, which `honor_labels` must keep from hiding the tracer's labels),
//! and the shipped rules with time scaled down: every window and offset
//! [`WINDOW`], every `for` zero. Every panel query and every alert
//! expression must be accepted by Prometheus as shipped; the panels must
//! show the scenario; the alerts for the kill must fire.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    deploy::{PanelQuery, dashboard, grafana_expr, panel_queries, rules, scaled_rules, yaml},
    mesh::{NAMESPACE, NODE, PEER, POD, keepalive_app_args, mesh, setup},
    netlab::InvalidAction,
    prometheus::{Prometheus, unix_now},
    require_program_or_skip, require_root_or_skip,
};
use serde_json::Value;

const CLIENT: &str = env!("CARGO_BIN_EXE_ct-client");
/// Every range and offset of the alerts and of the panels in this test.
const WINDOW: &str = "10s";
const WINDOW_SECS: f64 = 10.0;
/// The target labels prometheus-operator gives a tracer pod's series.
const TRACER_POD: &str = "conn-tracer-e2e";
const KEEPALIVE_OFF_ALERT: &str = "ConnTracerIdleKillsKeepaliveOff";

/// deploy/prometheus/prometheus-static.yml, scraping `target` every second
/// with the operator's target labels, rules evaluated every second.
fn prometheus_config(target: SocketAddr) -> String {
    let mut config = yaml("prometheus/prometheus-static.yml");
    let global = config["global"].as_mapping_mut().expect("global");
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        global.insert(key.into(), "1s".into());
    }
    let job = &mut config["scrape_configs"][0];
    assert_eq!(job["job_name"], "conn-tracer");
    assert_eq!(job["honor_labels"], true);
    job["static_configs"] = serde_yaml::from_str(&format!(
        "[{{targets: ['{target}'], labels: {{node: {NODE}, namespace: conn-tracer, \
         pod: {TRACER_POD}, container: conn-tracer}}}}]"
    ))
    .expect("static_configs");
    serde_yaml::to_string(&config).expect("YAML")
}

/// Runs `expr` at `time` (Unix seconds); panics on a query error.
fn query(prom: &Prometheus, what: &str, expr: &str, time: f64) -> Vec<Value> {
    prom.query(expr, Some(time))
        .unwrap_or_else(|e| panic!("{what}: Prometheus rejects `{expr}`: {e}"))
}

fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn has_labels(sample: &Value, labels: &[(&str, &str)]) -> bool {
    labels.iter().all(|(k, v)| sample["metric"][*k] == *v)
}

/// The largest value of the series of `result` that carry `labels`.
fn max_with(result: &[Value], labels: &[(&str, &str)]) -> f64 {
    result
        .iter()
        .filter(|s| has_labels(s, labels))
        .map(value)
        .fold(f64::NEG_INFINITY, f64::max)
}

/// Polls `f` until it returns `Some`, at most `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the dashboard query `q` (its Grafana variables set, at now) until
/// the largest value of the series with `labels` satisfies `ok`, at most
/// `timeout`; returns when (Unix seconds).
fn wait_panel(
    prom: &Prometheus,
    q: &PanelQuery,
    labels: &[(&str, &str)],
    timeout: Duration,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    wait_for(
        &format!("panel {:?} ({}) in Prometheus", q.panel, q.ref_id),
        timeout,
        || {
            let t = unix_now();
            let r = query(prom, &q.panel, &grafana_expr(&q.expr, WINDOW), t);
            ok(max_with(&r, labels)).then_some(t)
        },
    )
}

fn panel<'a>(queries: &'a [PanelQuery], title: &str, ref_id: &str) -> &'a PanelQuery {
    queries
        .iter()
        .find(|q| q.panel == title && q.ref_id == ref_id)
        .unwrap_or_else(|| panic!("no query {ref_id} in panel {title:?}"))
}

fn firing(prom: &Prometheus, alert: &str, labels: &[(&str, &str)]) -> Option<Value> {
    prom.alerts().into_iter().find(|a| {
        a["labels"]["alertname"] == alert
            && a["state"] == "firing"
            && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
    })
}

/// `label_values(METRIC{...}, LABEL)`, as a query whose result lists the
/// values.
fn label_values_query(q: &str) -> (String, String) {
    let inner = q
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not label_values(...): {q}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .expect("label_values(selector, label)");
    let label = label.trim().to_string();
    (format!("count by ({label}) ({selector})"), label)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, checked step by step")]
fn root_prometheus_runs_every_panel_and_alert_and_fires_on_the_keepalive_off_kill() {
    let name = "root_prometheus_runs_every_panel_and_alert_and_fires_on_the_keepalive_off_kill";
    if !require_root_or_skip(name)
        || require_program_or_skip(name, "prometheus", "apt-get install prometheus").is_none()
    {
        return;
    }
    let _serial = integration_tests::daemon::serial();
    let started = Instant::now();
    // The app waits for its go while Prometheus starts and scrapes a window.
    let app_args = [&["--timeout-secs", "40"][..], &keepalive_app_args()].concat();
    let mut m = mesh(
        CLIENT,
        &setup(60, false, 0, 2, InvalidAction::Reject, &app_args),
    );
    let app_connected = Instant::now();
    // A CLOSE_WAIT leak (the peer closed, the owner holds on, past the
    // daemon's 1 s threshold) and a refused connect, on the host, for the
    // panels of those metrics.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let leaked =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    drop(listener.accept().expect("accept"));
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    assert!(
        std::net::TcpStream::connect(closed_port).is_err(),
        "nothing listens there"
    );
    let rules_file = yaml("prometheus/conn-tracer.rules.yml");
    let shipped_rules = rules(&rules_file);
    let prom = Prometheus::start(
        &prometheus_config(m.daemon.addr),
        &[("conn-tracer.rules.yml", &scaled_rules(&rules_file, WINDOW))],
    );
    prom.wait_job_up("conn-tracer", Duration::from_secs(30));
    let scraping_since = unix_now();

    // Every expression as shipped parses and evaluates: the alerts, and the
    // panels with Grafana's variables on "All" and its windows at 5m.
    let dash = dashboard();
    let queries = panel_queries(&dash);
    assert!(queries.len() > 20, "{} panel queries", queries.len());
    for r in &shipped_rules {
        query(&prom, &format!("alert {}", r.name), &r.expr, unix_now());
    }
    for q in &queries {
        let what = format!("panel {:?} query {}", q.panel, q.ref_id);
        query(&prom, &what, &grafana_expr(&q.expr, "5m"), unix_now());
    }
    let loaded = prom.rules();
    assert_eq!(loaded.len(), shipped_rules.len(), "{loaded:#?}");

    // While the app idles with its chain open: the mismatch shows, and its
    // alert fires.
    let mismatch = panel(&queries, "Sidecar keepalive mismatch", "A");
    let chain = [("namespace", NAMESPACE), ("pod", POD), ("peer", PEER)];
    #[expect(clippy::float_cmp, reason = "a count of one")]
    let open_at = wait_panel(&prom, mismatch, &chain, Duration::from_secs(10), |v| {
        v == 1.0
    });
    wait_for(
        "ConnTracerSidecarKeepaliveMismatch firing",
        Duration::from_secs(10),
        || firing(&prom, "ConnTracerSidecarKeepaliveMismatch", &chain),
    );

    // The kill must come when Prometheus has scraped for a window (the
    // alerts count a counter born within the window only if its tracer was
    // scraped at the window's start) and the router's conntrack (2 s) has
    // forgotten the idle flow.
    let ready = (scraping_since + WINDOW_SECS + 1.0 - unix_now()).max(0.0);
    thread::sleep(Duration::from_secs_f64(ready));
    thread::sleep(Duration::from_secs(4).saturating_sub(app_connected.elapsed()));
    m.expect_next_query_fails();

    // The kill of the sidecar's upstream leg (keepalive off) on the panel...
    let by_pod = panel(&queries, "Idle kills by pod", "A");
    let sidecar_kill = [
        ("namespace", NAMESPACE),
        ("pod", POD),
        ("role", "sidecar"),
        ("keepalive", "off"),
    ];
    let killed_at = wait_panel(&prom, by_pod, &sidecar_kill, Duration::from_secs(15), |v| {
        v >= 1.0
    });
    // ... and its alert, firing from the scaled rules of that Prometheus.
    let alert_labels = [
        ("namespace", NAMESPACE),
        ("pod", POD),
        ("role", "sidecar"),
        ("peer", PEER),
        ("severity", "warning"),
    ];
    let alert = wait_for(
        &format!("{KEEPALIVE_OFF_ALERT} firing"),
        Duration::from_secs(8),
        || firing(&prom, KEEPALIVE_OFF_ALERT, &alert_labels),
    );
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains(POD) && s.contains(PEER)),
        "{alert:#}"
    );
    for (other, labels) in [
        (
            "ConnTracerStaleReuse",
            &[
                ("pod", POD),
                ("role", "sidecar"),
                ("peer", PEER),
                ("outcome", "rst"),
            ][..],
        ),
        ("ConnTracerSidecarUpstreamIdleKills", &chain[..]),
    ] {
        wait_for(&format!("{other} firing"), Duration::from_secs(8), || {
            firing(&prom, other, labels)
        });
    }
    // Not ConnTracerEventsLost: other workloads of the host may fill the
    // ring buffer meanwhile.
    for quiet in ["ConnTracerDown", "ConnTracerMissing"] {
        assert!(
            firing(&prom, quiet, &[]).is_none(),
            "{quiet} fires: {:#?}",
            prom.alerts()
        );
    }
    for r in prom.rules() {
        assert_eq!(r["health"], "ok", "rule evaluation failed: {r:#}");
    }

    // Every panel has data for the scenario: the open chain's panels while
    // it was open, the kill's right after it.
    let kill_panels: BTreeMap<&str, &[(&str, &str)]> = [
        ("Idle kills by pod", &sidecar_kill[..]),
        (
            "Idle kills by peer",
            &[("peer", PEER), ("closed_by", "peer"), ("close_kind", "rst")][..],
        ),
        (
            "Sidecar chain kills by origin",
            &[
                ("pod", POD),
                ("peer", PEER),
                ("origin", "upstream"),
                ("upstream_keepalive", "off"),
            ][..],
        ),
        (
            "Idle kills with keepalive off (time range)",
            &[("pod", POD), ("role", "sidecar"), ("peer", PEER)][..],
        ),
        (
            "Stale reuse by pod and peer",
            &[
                ("pod", POD),
                ("role", "sidecar"),
                ("peer", PEER),
                ("outcome", "rst"),
            ][..],
        ),
    ]
    .into_iter()
    .collect();
    // Label overflow has no series until a cap is reached.
    let no_data_expected = [("Bounds and pod metadata", "B")];
    let mut empty = Vec::new();
    for q in &queries {
        if no_data_expected.contains(&(q.panel.as_str(), q.ref_id.as_str())) {
            continue;
        }
        let expr = grafana_expr(&q.expr, WINDOW);
        let what = format!("panel {:?} query {}", q.panel, q.ref_id);
        let at_open = query(&prom, &what, &expr, open_at);
        let at_kill = query(&prom, &what, &expr, killed_at);
        if at_open.is_empty() && at_kill.is_empty() {
            empty.push(what.clone());
        }
        if let Some(labels) = kill_panels.get(q.panel.as_str()) {
            assert!(
                max_with(&at_kill, labels) >= 1.0,
                "{what} shows no kill with {labels:?}: {at_kill:#?}"
            );
        }
    }
    assert!(empty.is_empty(), "panels without data: {empty:#?}");
    let at_open = |title: &str, ref_id: &str| {
        let q = panel(&queries, title, ref_id);
        query(&prom, title, &grafana_expr(&q.expr, WINDOW), open_at)
    };
    let per_pod = at_open("Sidecar vs app connections per pod", "A");
    #[expect(clippy::float_cmp, reason = "small counts")]
    {
        assert_eq!(
            max_with(&per_pod, &[("pod", POD), ("role", "app")]),
            1.0,
            "{per_pod:#?}"
        );
        assert_eq!(
            max_with(&per_pod, &[("pod", POD), ("role", "sidecar")]),
            2.0,
            "{per_pod:#?}"
        );
    }
    let peers = at_open("Open connections by peer pod (imbalance)", "A");
    assert!(max_with(&peers, &[("peer", PEER)]) >= 1.0, "{peers:#?}");

    // The variables list the scenario's node, namespace, pod and peer.
    for var in dash["templating"]["list"].as_array().expect("variables") {
        if var["type"] != "query" {
            continue;
        }
        let (q, label) =
            label_values_query(&grafana_expr(var["query"].as_str().expect("query"), WINDOW));
        let values: Vec<String> = query(&prom, &q, &q, open_at)
            .iter()
            .filter_map(|s| s["metric"][&label].as_str().map(str::to_string))
            .collect();
        let want = match label.as_str() {
            "node" => NODE,
            "namespace" => NAMESPACE,
            "pod" => POD,
            "peer" => PEER,
            other => panic!("unexpected variable {other}"),
        };
        assert!(values.iter().any(|v| v == want), "${label}: {values:?}");
    }

    // honor_labels: the tracer's labels win over the target's, and series
    // without them (the tracer's own) get the target's.
    let t = unix_now();
    assert!(
        query(
            &prom,
            "exported labels",
            r#"{__name__=~"conntracer_.+", exported_pod=~".+"}"#,
            t
        )
        .is_empty(),
        "labels renamed to exported_*: is honor_labels off?"
    );
    let host = query(
        &prom,
        "host",
        r#"conntracer_connections_open{role="host"}"#,
        open_at,
    );
    assert!(!host.is_empty(), "host connections");
    assert!(
        host.iter().all(|s| s["metric"]["pod"].is_null()),
        "host connections keep an empty pod: {host:#?}"
    );
    let own = query(&prom, "events", "conntracer_events_total", t);
    assert!(
        !own.is_empty() && own.iter().all(|s| s["metric"]["pod"] == TRACER_POD),
        "{own:#?}"
    );
    drop(leaked);
    eprintln!(
        "{name}: {:.1} s (Prometheus scraping for {:.1} s)",
        started.elapsed().as_secs_f64(),
        unix_now() - scraping_since
    );
}
