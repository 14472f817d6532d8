//! What `deploy/` ships, checked without a cluster and without root: the
//! Kubernetes manifests against the Kubernetes API schemas
//! (`kubernetes-validate --strict`), the prometheus-operator resources and
//! the Grafana dashboard against their published types (`tsc --strict`),
//! the alerts with `promtool`, and the pieces against each other and against
//! the daemon (ports, labels, config, metric names of the README's contract).
//! The end-to-end run against a real Prometheus is `deploy_e2e.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use integration_tests::{
    daemon::DAEMONSET_CAPS,
    deploy::{dashboard, deploy_dir, panel_queries, panels, read, rules, yaml, yaml_docs},
    require_program_or_skip, test_name, unique_suffix,
};
use serde_yaml::Value as Yaml;

/// The Kubernetes versions the manifests must be valid for: the oldest still
/// commonly run and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];

/// The manifests of the base, one resource each.
const BASE: [&str; 6] = [
    "kubernetes/namespace.yaml",
    "kubernetes/serviceaccount.yaml",
    "kubernetes/clusterrole.yaml",
    "kubernetes/clusterrolebinding.yaml",
    "kubernetes/service.yaml",
    "kubernetes/daemonset.yaml",
];

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kubernetes-validate --strict` of `files`, for every version; each file
/// must pass for each of its `resources` documents.
fn kubernetes_validate(bin: &Path, files: &[(&Path, usize)]) {
    for version in KUBERNETES_VERSIONS {
        let mut cmd = Command::new(bin);
        cmd.args(["--strict", "--kubernetes-version", version]);
        for (file, _) in files {
            cmd.arg(file);
        }
        let (ok, out) = run(&mut cmd);
        assert!(ok, "kubernetes-validate {version}:\n{out}");
        assert!(
            !out.contains("WARN") && !out.contains("ERROR"),
            "kubernetes-validate {version}:\n{out}"
        );
        let want: usize = files.iter().map(|(_, n)| n).sum();
        assert_eq!(
            out.matches(" passed for resource ").count(),
            want,
            "kubernetes-validate {version} passes each resource:\n{out}"
        );
    }
}

#[test]
fn manifests_are_valid_kubernetes_objects() {
    let name = test_name!();
    let Some(bin) = kubernetes_validate_bin(name) else {
        return;
    };
    let dir = deploy_dir();
    let paths: Vec<_> = BASE.iter().map(|f| dir.join(f)).collect();
    let files: Vec<(&Path, usize)> = paths.iter().map(|p| (p.as_path(), 1)).collect();
    kubernetes_validate(&bin, &files);
}

/// `kubectl kustomize deploy/<overlay>`, parsed.
fn kustomize(overlay: &str) -> Vec<Yaml> {
    let (ok, out) = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join(overlay)));
    assert!(ok, "kubectl kustomize deploy/{overlay}:\n{out}");
    serde_yaml::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .collect()
}

/// `Kind/namespace/name` (or `Kind/name`) of each object, sorted; the
/// config's name without kustomize's content hash.
fn object_ids(docs: &[Yaml]) -> Vec<String> {
    let mut ids: Vec<String> = docs
        .iter()
        .map(|d| {
            let kind = d["kind"].as_str().unwrap_or_default();
            let meta = &d["metadata"];
            let name = meta["name"].as_str().unwrap_or_default();
            let name = name
                .strip_prefix("conn-tracer-config-")
                .map_or(name, |_| "conn-tracer-config");
            match meta["namespace"].as_str() {
                Some(ns) => format!("{kind}/{ns}/{name}"),
                None => format!("{kind}/{name}"),
            }
        })
        .collect();
    ids.sort();
    ids
}

/// The base and the operator overlay as kustomize renders them (kubectl's
/// built-in kustomize): every object in place, in the namespace, and the
/// non-CRD ones valid.
#[test]
fn kustomizations_render_the_whole_install() {
    let name = test_name!();
    let Some(validate) = kubernetes_validate_bin(name) else {
        return;
    };
    // kubectl is not a Debian package setup could install; without it the
    // rendering is checked by whoever has it (every operator applying -k).
    if !Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipping {name}: no kubectl (its kustomize renders the kustomizations)");
        return;
    }
    let tmp = std::env::temp_dir().join(format!("ct-kustomize-{}", unique_suffix()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    for (overlay, want) in [
        (
            "kubernetes",
            &[
                "ClusterRole/conn-tracer",
                "ClusterRoleBinding/conn-tracer",
                "ConfigMap/conn-tracer/conn-tracer-config",
                "DaemonSet/conn-tracer/conn-tracer",
                "Namespace/conn-tracer",
                "Service/conn-tracer/conn-tracer",
                "ServiceAccount/conn-tracer/conn-tracer",
            ][..],
        ),
        (
            "prometheus-operator",
            &[
                "ClusterRole/conn-tracer",
                "ClusterRoleBinding/conn-tracer",
                "ConfigMap/conn-tracer/conn-tracer-config",
                "ConfigMap/conn-tracer/conn-tracer-dashboard",
                "DaemonSet/conn-tracer/conn-tracer",
                "Namespace/conn-tracer",
                "PrometheusRule/conn-tracer/conn-tracer",
                "Service/conn-tracer/conn-tracer",
                "ServiceAccount/conn-tracer/conn-tracer",
                "ServiceMonitor/conn-tracer/conn-tracer",
            ][..],
        ),
    ] {
        let docs = kustomize(overlay);
        let got = object_ids(&docs);
        assert_eq!(got, want, "objects of deploy/{overlay}");
        // The DaemonSet mounts the generated (hashed) ConfigMap.
        let config = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["data"]["config.toml"].is_string())
            .expect("the config ConfigMap");
        let ds = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet")
            .expect("DaemonSet");
        let mounted = ds["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .expect("a ConfigMap volume");
        assert_eq!(Some(mounted), config["metadata"]["name"].as_str());
        let core: Vec<&Yaml> = docs
            .iter()
            .filter(|d| {
                !d["apiVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("monitoring.coreos.com/")
            })
            .collect();
        let file = tmp.join(format!("{}.yaml", overlay.replace('/', "-")));
        let text = core.iter().fold(String::new(), |text, d| {
            text + "---\n" + &serde_yaml::to_string(d).expect("YAML")
        });
        std::fs::write(&file, text).expect("write the rendered objects");
        kubernetes_validate(&validate, &[(&file, core.len())]);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The ServiceMonitor and PrometheusRule against the prometheus-operator
/// schemas and types, the dashboard against @grafana/schema: `tsc --strict`
/// over typed literals of each (deploy/typecheck/check.mjs).
#[test]
fn operator_resources_and_dashboard_type_check() {
    let name = "operator_resources_and_dashboard_type_check";
    if require_program_or_skip(name, "node", "Node.js 20+ and npm").is_none() {
        return;
    }
    let dir = deploy_dir().join("typecheck");
    if !dir.join("node_modules").is_dir() {
        assert!(
            !integration_tests::in_ci(),
            "{name}: deploy/typecheck/node_modules is missing: run `cargo xtask setup` (npm ci)"
        );
        eprintln!(
            "skipping {name}: no deploy/typecheck/node_modules (`cargo xtask setup` runs npm ci)"
        );
        return;
    }
    let (ok, out) = run(Command::new("node").arg("check.mjs").current_dir(&dir));
    assert!(ok, "deploy/typecheck/check.mjs:\n{out}");
    for line in [
        "PrometheusRule/conn-tracer: schema ok",
        "ServiceMonitor/conn-tracer: schema ok",
        "tsc --strict: 1 dashboards and 2 prometheus-operator resources type-check",
    ] {
        assert!(out.contains(line), "no `{line}` in:\n{out}");
    }
}

#[test]
fn alert_rules_pass_promtool_and_equal_the_prometheus_rule() {
    let name = "alert_rules_pass_promtool_and_equal_the_prometheus_rule";
    let Some(promtool) = require_program_or_skip(name, "promtool", "apt-get install prometheus")
    else {
        return;
    };
    let dir = deploy_dir();
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(dir.join("prometheus/conn-tracer.rules.yml")));
    assert!(ok, "promtool check rules:\n{out}");
    let file = yaml("prometheus/conn-tracer.rules.yml");
    let n = rules(&file).len();
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");

    let pr = yaml("prometheus-operator/prometheusrule.yaml");
    assert_eq!(pr["kind"], "PrometheusRule");
    assert_eq!(
        pr["spec"], file,
        "the PrometheusRule's spec must be deploy/prometheus/conn-tracer.rules.yml"
    );

    // The example configs. Debian's Prometheus is built without Kubernetes
    // service discovery: there, the pod discovery is swapped for a static
    // target so that the rest (relabelling, rule file) is still checked.
    for example in ["prometheus-static.yml", "prometheus-kubernetes.yml"] {
        let path = dir.join("prometheus").join(example);
        let (ok, out) = run(Command::new(&promtool).args(["check", "config"]).arg(&path));
        if ok {
            continue;
        }
        assert!(
            out.contains("field kubernetes_sd_configs not found"),
            "promtool check config {example}:\n{out}"
        );
        let mut config = yaml(&format!("prometheus/{example}"));
        for job in config["scrape_configs"].as_sequence_mut().expect("jobs") {
            let job = job.as_mapping_mut().expect("job");
            if job.remove("kubernetes_sd_configs").is_some() {
                job.insert(
                    "static_configs".into(),
                    serde_yaml::from_str("[{targets: ['127.0.0.1:9090']}]").expect("YAML"),
                );
            }
        }
        let tmp = std::env::temp_dir().join(format!("ct-promtool-{}", unique_suffix()));
        std::fs::create_dir_all(&tmp).expect("temp dir");
        let copy = tmp.join(example);
        std::fs::write(&copy, serde_yaml::to_string(&config).expect("YAML")).expect("write");
        std::fs::copy(
            dir.join("prometheus/conn-tracer.rules.yml"),
            tmp.join("conn-tracer.rules.yml"),
        )
        .expect("copy the rules");
        let (ok, out) = run(Command::new(&promtool).args(["check", "config"]).arg(&copy));
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(
            ok,
            "promtool check config {example} (static discovery):\n{out}"
        );
    }
}

/// `promtool test rules` on the shipped rules: the sidecar upstream kill
/// alert fires for a chain killed idle, not for a busy connection the
/// server closed (`idle="false"`: a rollout, `Connection: close`).
#[test]
fn sidecar_upstream_idle_kill_alert_fires_only_for_idle_chains() {
    let name = test_name!();
    let Some(promtool) = require_program_or_skip(name, "promtool", "apt-get install prometheus")
    else {
        return;
    };
    let tmp = std::env::temp_dir().join(format!("ct-promtool-test-{}", unique_suffix()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    // The expressions as shipped; the annotations (checked elsewhere) left
    // out, so that the expected alert is its labels.
    let mut file = yaml("prometheus/conn-tracer.rules.yml");
    for g in file["groups"].as_sequence_mut().expect("groups") {
        for r in g["rules"].as_sequence_mut().expect("rules") {
            r.as_mapping_mut().expect("rule").remove("annotations");
        }
    }
    std::fs::write(
        tmp.join("rules.yml"),
        serde_yaml::to_string(&file).expect("YAML"),
    )
    .expect("write the rules");
    let series = |pod: &str, idle: &str| {
        format!(
            "      - series: 'conntracer_sidecar_chain_kills_total{{job=\"conn-tracer\", \
             instance=\"n1\", namespace=\"shop\", pod=\"{pod}\", peer=\"db/redis-0\", \
             origin=\"upstream\", upstream_keepalive=\"off\", idle=\"{idle}\"}}'\n        \
             values: '0x20 1x20'\n"
        )
    };
    let test = format!(
        "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    \
         input_series:\n      - series: 'up{{job=\"conn-tracer\", instance=\"n1\"}}'\n        \
         values: '1x40'\n{}{}    alert_rule_test:\n      - eval_time: 25m\n        \
         alertname: ConnTracerSidecarUpstreamIdleKills\n        exp_alerts:\n          \
         - exp_labels: {{severity: warning, namespace: shop, pod: cart-idle, peer: db/redis-0}}\n",
        series("cart-idle", "true"),
        series("cart-busy", "false"),
    );
    std::fs::write(tmp.join("test.yml"), test).expect("write the test");
    let (ok, out) = run(Command::new(&promtool)
        .args(["test", "rules", "test.yml"])
        .current_dir(&tmp));
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(ok, "promtool test rules:\n{out}");
}

/// Metric names of the README's contract ("Metrics" table), with the
/// histogram's series.
fn contract_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(deploy_dir().join("../README.md")).expect("README.md");
    let mut names = BTreeSet::new();
    let mut histograms = Vec::new();
    for line in readme.lines().filter(|l| l.starts_with("| `conntracer_")) {
        let first_cell = line.split('|').nth(1).unwrap_or_default();
        let histogram = line
            .split('|')
            .nth(2)
            .is_some_and(|t| t.trim() == "histogram");
        for name in first_cell
            .split('`')
            .filter(|s| s.starts_with("conntracer_"))
        {
            // `conntracer_label_overflow_total{label}`: the name only.
            let name = name.split('{').next().unwrap_or(name).to_string();
            if histogram {
                histograms.push(name.clone());
            }
            names.insert(name);
        }
    }
    for hist in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{hist}{suffix}"));
        }
    }
    assert!(names.len() > 15, "the README's metrics table: {names:?}");
    names
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("conntracer_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn alerts_and_panels_use_only_contract_metrics() {
    let contract = contract_metrics();
    let file = yaml("prometheus/conn-tracer.rules.yml");
    let rules = rules(&file);
    let queries = panel_queries(&dashboard());
    for (what, expr) in rules
        .iter()
        .map(|r| (format!("alert {}", r.name), &r.expr))
        .chain(
            queries
                .iter()
                .map(|q| (format!("panel {:?} {}", q.panel, q.ref_id), &q.expr)),
        )
    {
        let unknown: Vec<String> = metric_names(expr)
            .into_iter()
            .filter(|m| !contract.contains(m))
            .collect();
        assert!(
            unknown.is_empty(),
            "{what} uses {unknown:?}, not in the README's metrics"
        );
    }
}

/// The alerts an SRE needs, each with a severity, a summary, a description
/// and a runbook section in deploy/README.md.
#[test]
fn alerts_cover_the_issue_with_runbooks() {
    let file = yaml("prometheus/conn-tracer.rules.yml");
    let rules = rules(&file);
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for want in [
        "ConnTracerIdleKillsKeepaliveOff",
        "ConnTracerSidecarKeepaliveMismatch",
        "ConnTracerSidecarUpstreamIdleKills",
        "ConnTracerStaleReuse",
        "ConnTracerEventsLost",
        "ConnTracerDown",
        "ConnTracerMissing",
        "ConnTracerNotReady",
        "ConnTracerNoKernelEvents",
    ] {
        assert!(names.contains(want), "no alert {want}: {names:?}");
    }
    let readme = read("README.md");
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    for g in file["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let alert = r["alert"].as_str().expect("alert");
            let severity = r["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["info", "warning", "critical"].contains(&severity),
                "{alert}: severity {severity:?}"
            );
            for key in ["summary", "description", "runbook_url"] {
                assert!(
                    r["annotations"][key].is_string(),
                    "{alert}: no {key} annotation"
                );
            }
            let url = r["annotations"]["runbook_url"]
                .as_str()
                .expect("runbook_url");
            let anchor = url.rsplit_once('#').map(|(_, a)| a).unwrap_or_default();
            assert!(
                url.contains("/deploy/README.md#") && anchors.contains(anchor),
                "{alert}: runbook {url} has no section in deploy/README.md"
            );
        }
    }
}

/// The dashboard: the variables and the views the issue asks for, every
/// query on the `$datasource` variable.
#[test]
fn dashboard_has_the_variables_and_views_of_the_issue() {
    let dash = dashboard();
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "namespace", "pod", "peer"] {
        assert!(vars.contains(&v), "no ${v} variable: {vars:?}");
    }
    let all = panels(&dash);
    let titles: Vec<&str> = all.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Idle kills by pod",
        "Idle kills by peer",
        "Sidecar chain kills by origin",
        "Idle before close",
        "Sidecar keepalive mismatch",
        "Stale reuse by pod and peer",
        "Sidecar vs app connections per pod",
        "Open connections by peer pod (imbalance)",
        "Kernel events",
        "Lost kernel events",
        "Tracked connections",
    ] {
        assert!(titles.contains(&want), "no panel {want:?}: {titles:?}");
    }
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64()),
            "duplicate panel id in {title:?}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
        let mut refs = BTreeSet::new();
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title:?}");
            assert!(
                refs.insert(t["refId"].as_str()),
                "panel {title:?}: duplicate refId"
            );
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "panel {title:?}"
            );
        }
    }
}

fn port_of(yaml: &Yaml, name: &str) -> u64 {
    yaml.as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64().or(p["port"].as_u64()))
        .unwrap_or_else(|| panic!("no port {name}"))
}

fn labels(map: &Yaml) -> BTreeMap<String, String> {
    map.as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.as_str().unwrap_or_default().to_string(),
                v.as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn is_subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
}

/// The DaemonSet's container and pod spec.
fn daemonset() -> (Yaml, Yaml, Yaml) {
    let ds = yaml("kubernetes/daemonset.yaml");
    let pod = ds["spec"]["template"].clone();
    let c = pod["spec"]["containers"][0].clone();
    assert_eq!(c["name"], "conn-tracer");
    (ds, pod, c)
}

fn mount<'a>(c: &'a Yaml, path: &str) -> &'a Yaml {
    c["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("no mount at {path}"))
}

fn volume<'a>(spec: &'a Yaml, name: &Yaml) -> &'a Yaml {
    spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == *name)
        .unwrap_or_else(|| panic!("no volume {name:?}"))
}

/// The shipped config is one the daemon accepts, and its listen port is the
/// one the container, the probes, the annotations and the Service use.
#[test]
fn daemonset_config_ports_and_probes_agree_with_the_daemon() {
    let (_, pod, c) = daemonset();
    let spec = &pod["spec"];

    // The shipped config is one the daemon accepts, and its listen port is
    // the one everything else points at.
    let kustomization = yaml("kubernetes/kustomization.yaml");
    assert_eq!(
        kustomization["configMapGenerator"][0]["files"][0], "config.toml",
        "the config ConfigMap is generated from deploy/kubernetes/config.toml"
    );
    let cfg = conn_tracer::Config::from_toml(&read("kubernetes/config.toml"), "config.toml")
        .expect("deploy/kubernetes/config.toml parses");
    cfg.validate()
        .expect("deploy/kubernetes/config.toml is valid");
    assert!(
        cfg.listen.ip().is_unspecified(),
        "listen on the pod IP: {}",
        cfg.listen
    );
    let port = u64::from(cfg.listen.port());
    assert_eq!(port_of(&c["ports"], "metrics"), port);
    let annotations = labels(&pod["metadata"]["annotations"]);
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(args[0], "run");
    assert!(args.contains(&"--node-name=$(NODE_NAME)"), "{args:?}");
    let config_arg = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("--config=");
    let config_dir = Path::new(config_arg).parent().expect("config dir");
    let config_mount = mount(&c, config_dir.to_str().expect("UTF-8"));
    assert_eq!(
        volume(spec, &config_mount["name"])["configMap"]["name"],
        kustomization["configMapGenerator"][0]["name"]
    );
    let env_node = c["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        env_node["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let svc = yaml("kubernetes/service.yaml");
    assert_eq!(port_of(&svc["spec"]["ports"], "metrics"), port);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
}

/// Least privilege, as deploy/README.md documents it.
#[test]
fn daemonset_has_the_documented_privileges_and_mounts() {
    let (ds, pod, c) = daemonset();
    let spec = &pod["spec"];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    let caps: Vec<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    // Exactly the set tests/tests/least_privilege.rs runs the daemon with.
    let tested: Vec<String> = DAEMONSET_CAPS
        .iter()
        .map(|c| c.to_ascii_uppercase())
        .collect();
    assert_eq!(
        caps, tested,
        "the DaemonSet grants what least_privilege.rs tests"
    );
    let docs = read("README.md");
    let top = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("README.md");
    for cap in &caps {
        assert!(
            docs.contains(&format!("| `CAP_{cap}` |")),
            "deploy/README.md's privileges table explains CAP_{cap}"
        );
        assert!(
            top.contains(&format!("`CAP_{cap}`")),
            "README.md's kernel requirements name CAP_{cap}"
        );
    }
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["hostNetwork"], false);
    assert_eq!(spec["tolerations"][0]["operator"], "Exists");
    for (path, host) in [
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        ("/sys/kernel/btf", "/sys/kernel/btf"),
        // The accept programs' syscall tracepoints are found through it.
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
    ] {
        let m = mount(&c, path);
        assert_eq!(m["readOnly"], true, "{path}");
        assert_eq!(volume(spec, &m["name"])["hostPath"]["path"], host);
    }
    let requests = &c["resources"]["requests"];
    let limits = &c["resources"]["limits"];
    assert!(requests["cpu"].is_string() && requests["memory"].is_string());
    assert!(limits["memory"].is_string());
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
}

/// The pod, Service and EndpointSlice watches are all the tracer may do
/// with the API; the Service selects
/// the tracer pods and the ServiceMonitor the Service.
#[test]
fn rbac_service_and_service_monitor_fit_together() {
    let (ds, pod, _) = daemonset();
    let spec = &pod["spec"];
    let role = yaml("kubernetes/clusterrole.yaml");
    let rules: Vec<String> = role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .map(|r| serde_yaml::to_string(r).expect("YAML").replace('\n', " "))
        .collect();
    assert_eq!(
        rules,
        [
            "apiGroups: - '' resources: - pods - services verbs: - list - watch ",
            "apiGroups: - discovery.k8s.io resources: - endpointslices verbs: - list - watch ",
        ],
        "the ClusterRole grants list and watch on pods, services and endpointslices, nothing else"
    );
    let binding = yaml("kubernetes/clusterrolebinding.yaml");
    assert_eq!(binding["subjects"][0]["name"], spec["serviceAccountName"]);
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);

    // Service -> pods, ServiceMonitor -> Service.
    let pod_labels = labels(&pod["metadata"]["labels"]);
    assert!(is_subset(
        &labels(&ds["spec"]["selector"]["matchLabels"]),
        &pod_labels
    ));
    let svc = yaml("kubernetes/service.yaml");
    assert_eq!(svc["spec"]["clusterIP"], "None", "headless");
    assert!(is_subset(&labels(&svc["spec"]["selector"]), &pod_labels));
    let sm = yaml("prometheus-operator/servicemonitor.yaml");
    assert!(is_subset(
        &labels(&sm["spec"]["selector"]["matchLabels"]),
        &labels(&svc["metadata"]["labels"])
    ));
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(
        endpoint["honorLabels"], true,
        "the tracer's namespace/pod/container labels must win over the target's"
    );
    // job="conn-tracer" comes from the Service's name.
    assert_eq!(svc["metadata"]["name"], "conn-tracer");
    for doc in yaml_docs("prometheus-operator/prometheusrule.yaml") {
        assert_eq!(doc["metadata"]["namespace"], "conn-tracer");
    }
}

/// The image builds with the toolchain `cargo xtask setup` pins.
#[test]
fn dockerfile_uses_the_toolchain_of_setup() {
    let docker = read("Dockerfile");
    let setup =
        std::fs::read_to_string(deploy_dir().join("../xtask/src/setup.rs")).expect("setup.rs");
    let linker = line_value(&setup, "const BPF_LINKER_VERSION: &str = \"", "\";")
        .expect("BPF_LINKER_VERSION in setup.rs");
    assert!(
        docker.contains(&format!("bpf-linker@{linker} --locked")),
        "Dockerfile installs bpf-linker {linker}"
    );
    let manifest = std::fs::read_to_string(deploy_dir().join("../Cargo.toml")).expect("Cargo.toml");
    let rust = line_value(&manifest, "rust-version = \"", "\"").expect("rust-version");
    assert!(
        docker.contains(&format!("ARG RUST_VERSION={rust}")),
        "Dockerfile builds with Rust {rust}"
    );
    for needed in [
        "rust-src",
        "cargo build --release --locked -p tracer-user",
        "ENTRYPOINT [\"/usr/local/bin/conn-tracer\"]",
        "USER ",
    ] {
        assert!(docker.contains(needed), "Dockerfile lacks `{needed}`");
    }
    let stages = docker.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    assert!(
        deploy_dir().join("Dockerfile.dockerignore").is_file(),
        "the build context leaves target/ out"
    );
}

/// The part between `prefix` and `suffix` of the first line of `text` that
/// starts with `prefix`.
fn line_value<'a>(text: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|l| l.strip_suffix(suffix))
}

/// The `kubernetes-validate` program, if installed (see
/// [`require_program_or_skip`]).
fn kubernetes_validate_bin(test: &str) -> Option<std::path::PathBuf> {
    require_program_or_skip(
        test,
        "kubernetes-validate",
        "pip install kubernetes-validate",
    )
}
