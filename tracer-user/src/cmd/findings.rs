//! `conn-tracer findings`: a running daemon's findings (what is wrong on
//! this node and what to change), as a table or as JSON.

use std::io::Write as _;

use super::connections::{align, fetch};
use crate::findings::Finding;

/// The table: one line per finding, its fix below it.
pub(crate) fn render_table(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "no findings\n".into();
    }
    let mut out = String::new();
    for f in findings {
        let s = &f.subject;
        let dash = |v: &str| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.to_string()
            }
        };
        let pod = if s.pod.is_empty() {
            dash("")
        } else {
            format!("{}/{}", s.namespace, s.pod)
        };
        let rows = [
            [
                "PATTERN",
                "POD",
                "ROLE",
                "PEER",
                "COUNT",
                "TIMEOUT_S",
                "LIKELY_KILLER",
                "LAST_SEEN",
            ]
            .map(String::from),
            [
                f.pattern.as_str().to_string(),
                pod,
                dash(&s.role),
                dash(&s.peer),
                f.count.to_string(),
                timeout_column(f),
                f.likely_killer.clone().unwrap_or_else(|| "-".into()),
                f.last_seen.clone(),
            ],
        ];
        out.push_str(&align(&rows));
        out.push_str("  fix: ");
        out.push_str(&f.fix);
        out.push_str("\n\n");
    }
    out
}

/// The inferred timeout, or `<=B` for a bound on it (`path_expiry`).
fn timeout_column(f: &Finding) -> String {
    let bound = f.evidence["expiry_at_most_s"].as_f64();
    match (f.inferred_timeout_s, bound) {
        (Some(t), _) => format!("{t:.1}"),
        (None, Some(b)) => format!("<={b:.1}"),
        (None, None) => "-".into(),
    }
}

pub fn run(from: &str, json: bool) -> anyhow::Result<()> {
    let findings: Vec<Finding> = fetch(from, "/findings")?;
    let text = if json {
        serde_json::to_string_pretty(&findings)? + "\n"
    } else {
        render_table(&findings)
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::{Pattern, Subject};

    #[test]
    fn table_names_pattern_timeout_killer_and_fix() {
        let f = Finding {
            pattern: Pattern::KeepaliveRace,
            subject: Subject {
                namespace: "shop".into(),
                pod: "cart-1".into(),
                peer: "api/node-0".into(),
                role: "app".into(),
                direction: "outbound".into(),
            },
            count: 4,
            first_seen: "2026-12-02T00:00:00Z".into(),
            last_seen: "2026-12-02T00:01:00Z".into(),
            inferred_timeout_s: Some(6.01),
            likely_killer: Some("Node.js".into()),
            evidence: serde_json::json!({"idle_s": [6.0, 6.01, 6.02]}),
            fix: "Set the client's idle timeout below 6.0 s.".into(),
        };
        let t = render_table(std::slice::from_ref(&f));
        let mut lines = t.lines();
        assert!(lines.next().unwrap().starts_with("PATTERN"));
        let row = lines.next().unwrap();
        for want in [
            "keepalive_race",
            "shop/cart-1",
            "api/node-0",
            "6.0",
            "Node.js",
        ] {
            assert!(row.contains(want), "{want} missing in {row}");
        }
        assert!(lines.next().unwrap().starts_with("  fix: Set the client"));
        assert_eq!(render_table(&[]), "no findings\n");
        // A path expiry's bound.
        let mut path = f;
        path.pattern = Pattern::PathExpiry;
        path.inferred_timeout_s = None;
        path.evidence = serde_json::json!({"idle_s": [6.25, 7.0], "expiry_at_most_s": 6.25});
        assert!(render_table(&[path]).contains(" <=6.2 "), "the bound");
    }
}
