//! What the tests need from `deploy/`: its files, the dashboard's queries as
//! Prometheus would receive them from Grafana, and the alert rules, also
//! with their time windows scaled down for a test that cannot wait minutes.

use std::path::{Path, PathBuf};

use serde_json::Value;
use serde_yaml::Value as Yaml;

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
}

/// The text of `deploy/<rel>`.
pub fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every YAML document of `deploy/<rel>`.
pub fn yaml_docs(rel: &str) -> Vec<Yaml> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|doc: &Yaml| !doc.is_null())
        .collect()
}

/// The single YAML document of `deploy/<rel>`.
pub fn yaml(rel: &str) -> Yaml {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one YAML document expected");
    docs.remove(0)
}

/// The Grafana dashboard.
pub fn dashboard() -> Value {
    serde_json::from_str(&read("grafana/conn-tracer.json")).expect("the dashboard is JSON")
}

/// One query of one dashboard panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

/// Every panel of the dashboard, rows' nested panels included.
pub fn panels(dashboard: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every query of every panel.
pub fn panel_queries(dashboard: &Value) -> Vec<PanelQuery> {
    panels(dashboard)
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| PanelQuery {
                    panel: title.clone(),
                    ref_id: t["refId"].as_str().unwrap_or_default().to_string(),
                    expr: t["expr"].as_str().unwrap_or_default().to_string(),
                })
        })
        .collect()
}

/// `expr` as Grafana sends it with every template variable on "All" (`.*`)
/// and `window` for Grafana's range variables (`$__rate_interval`,
/// `$__range`, `$__interval`).
pub fn grafana_expr(expr: &str, window: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("closed ${...}");
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        out.push_str(match name {
            "__rate_interval" | "__range" | "__interval" => window,
            _ => ".*",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// One rule of a Prometheus rules file.
#[derive(Debug, Clone)]
pub struct Rule {
    pub group: String,
    /// The alert's name, or the recorded series' name.
    pub name: String,
    pub alert: bool,
    pub expr: String,
    pub for_: Option<String>,
}

/// The rules of a rules file's `groups`.
pub fn rules(file: &Yaml) -> Vec<Rule> {
    let mut out = Vec::new();
    for g in file["groups"].as_sequence().expect("groups") {
        let group = g["name"].as_str().expect("group name").to_string();
        for r in g["rules"].as_sequence().expect("rules") {
            let (name, alert) = match (r["alert"].as_str(), r["record"].as_str()) {
                (Some(a), None) => (a, true),
                (None, Some(rec)) => (rec, false),
                _ => panic!("rule of group {group} is neither one alert nor one record: {r:?}"),
            };
            out.push(Rule {
                group: group.clone(),
                name: name.to_string(),
                alert,
                expr: r["expr"].as_str().expect("expr").to_string(),
                for_: r["for"].as_str().map(str::to_string),
            });
        }
    }
    out
}

/// `expr` with every range (`[15m]`) and offset (`offset 15m`) set to
/// `window`: time scaled down for a test.
pub fn scale_windows(expr: &str, window: &str) -> String {
    let is_duration = |s: &str| {
        !s.is_empty()
            && s.chars().next().is_some_and(|c| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_digit() || "smhdwy".contains(c))
    };
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    loop {
        let range = rest.find('[');
        let offset = rest.find("offset ");
        let (at, is_range) = match (range, offset) {
            (Some(r), Some(o)) if o < r => (o, false),
            (Some(r), _) => (r, true),
            (None, Some(o)) => (o, false),
            (None, None) => break,
        };
        let (open, close) = if is_range {
            ("[", "]")
        } else {
            ("offset ", "")
        };
        out.push_str(&rest[..at]);
        let after = &rest[at + open.len()..];
        let end = if is_range {
            after.find(']').expect("closed range")
        } else {
            after
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(after.len())
        };
        let original = &after[..end];
        out.push_str(open);
        out.push_str(if is_duration(original) {
            window
        } else {
            original
        });
        out.push_str(close);
        rest = &after[end + close.len()..];
    }
    out.push_str(rest);
    out
}

/// The rules file `file` for a test: every range and offset `window`, every
/// `for` zero. The expressions are otherwise those shipped.
pub fn scaled_rules(file: &Yaml, window: &str) -> String {
    let mut file = file.clone();
    for g in file["groups"].as_sequence_mut().expect("groups") {
        for r in g["rules"].as_sequence_mut().expect("rules") {
            let rule = r.as_mapping_mut().expect("rule is a mapping");
            let expr = rule
                .get("expr")
                .and_then(Yaml::as_str)
                .expect("expr")
                .to_string();
            rule.insert("expr".into(), scale_windows(&expr, window).into());
            if rule.contains_key("for") {
                rule.insert("for".into(), "0s".into());
            }
        }
    }
    serde_yaml::to_string(&file).expect("rules serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafana_variables_become_all_and_windows() {
        assert_eq!(
            grafana_expr(
                r#"sum(increase(x{pod=~"$pod", node=~"${node}"}[$__rate_interval])) / $__range"#,
                "10s"
            ),
            r#"sum(increase(x{pod=~".*", node=~".*"}[10s])) / 10s"#
        );
    }

    #[test]
    fn windows_and_offsets_are_scaled_but_nothing_else() {
        assert_eq!(
            scale_windows(
                r#"(x unless x offset 15m) or increase(x{a="[b]"}[1h]) or y[5m:1m] offset 1d"#,
                "10s"
            ),
            r#"(x unless x offset 10s) or increase(x{a="[b]"}[10s]) or y[5m:1m] offset 10s"#
        );
    }

    #[test]
    fn scaled_rules_keep_names_and_zero_their_for() {
        let file: Yaml = serde_yaml::from_str(
            "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: increase(x[15m]) > 0\n    for: 5m\n  - record: r\n    expr: sum(x)\n",
        )
        .unwrap();
        let scaled: Yaml = serde_yaml::from_str(&scaled_rules(&file, "10s")).unwrap();
        let r = rules(&scaled);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].name.as_str(), r[0].expr.as_str(), r[0].for_.as_deref()),
            ("A", "increase(x[10s]) > 0", Some("0s"))
        );
        assert!(!r[1].alert && r[1].for_.is_none());
    }
}
