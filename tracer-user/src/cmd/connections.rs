//! `conn-tracer connections`: a running daemon's connections, as a table
//! (like `ss -tieo`, with owners, roles and keepalive) or JSON.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::serve::views::ConnView;

/// Splits `http://host:port[/prefix]` into (host:port, path prefix).
pub(crate) fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}` is not an http:// URL (e.g. http://127.0.0.1:9090)"))?;
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    if host.is_empty() {
        bail!("`{url}` has no host");
    }
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, format!("/{}", path.trim_end_matches('/'))))
}

/// GETs `path` from a daemon (plain HTTP/1.0, which needs no client library).
pub(crate) fn get(url: &str, path: &str) -> anyhow::Result<String> {
    let (host, prefix) = parse_url(url)?;
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
        format!("cannot connect to conn-tracer at {url}: is `conn-tracer run` up?")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let full = format!("{}{path}", prefix.trim_end_matches('/'));
    write!(
        s,
        "GET {full} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "{url}{path} answered {}",
            head.lines().next().unwrap_or(head)
        );
    }
    Ok(body.to_string())
}

fn opt_secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{s:.1}"))
}

fn opt_u64(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |b| b.to_string())
}

/// The other legs of a chained socket: `app:<local>`, `sidecar:<local>`
/// (facing the app), `upstream:<local>` (the sidecar's upstream leg); for a
/// pooled one `pool(N:M)`.
fn chain_cell(c: &ConnView) -> String {
    let others: Vec<String> = c
        .chain
        .iter()
        .filter(|l| l.cookie != c.cookie)
        .map(|l| {
            let name = match l.leg.as_str() {
                "sidecar-app-side" => "sidecar",
                "sidecar-upstream" => "upstream",
                other => other,
            };
            let inferred = if l.inferred { "(inferred)" } else { "" };
            format!("{name}:{}{inferred}", l.local)
        })
        .collect();
    // N app connections over M upstream ones.
    let pool = c
        .pool
        .as_ref()
        .map(|p| format!("pool({}:{})", p.app_connections, p.upstream_connections));
    let cells: Vec<String> = others.into_iter().chain(pool).collect();
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(",")
    }
}

/// The table, one line per connection.
pub(crate) fn render_table(conns: &[ConnView]) -> String {
    let mut rows = vec![
        [
            "STATE",
            "DIR",
            "ROLE",
            "POD",
            "LOCAL",
            "REMOTE",
            "PROCESS",
            "KEEPALIVE",
            "IDLE_S",
            "RX",
            "TX",
            "CHAIN",
        ]
        .map(String::from),
    ];
    for c in conns {
        let pod = if c.pod.is_empty() {
            "-".to_string()
        } else {
            format!("{}/{}/{}", c.namespace, c.pod, c.container)
        };
        let process = if c.owner == "unknown" {
            "?".into()
        } else {
            format!("{}/{}", c.pid, c.comm)
        };
        let mut ka = c.keepalive.short();
        if c.keepalive.user_timeout_ms > 0 {
            let _ = write!(ka, " user_timeout={}ms", c.keepalive.user_timeout_ms);
        }
        rows.push([
            c.state.clone(),
            c.direction.clone(),
            c.role.clone(),
            pod,
            c.local.clone(),
            c.remote.clone(),
            process,
            ka,
            opt_secs(c.idle_s),
            opt_u64(c.bytes_received),
            opt_u64(c.bytes_acked),
            chain_cell(c),
        ]);
    }
    align(&rows)
}

/// Rows as left-aligned columns two spaces apart, one line each.
pub(crate) fn align<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// GETs `path` from a daemon and reads its JSON array.
pub(crate) fn fetch<T: serde::de::DeserializeOwned>(
    url: &str,
    path: &str,
) -> anyhow::Result<Vec<T>> {
    let body = get(url, path)?;
    serde_json::from_str(&body)
        .with_context(|| format!("the daemon's {path} is not the expected JSON"))
}

pub fn run(from: &str, json: bool) -> anyhow::Result<()> {
    let conns: Vec<ConnView> = fetch(from, "/connections")?;
    let mut out = std::io::stdout().lock();
    if json {
        for c in &conns {
            writeln!(out, "{}", serde_json::to_string(c)?)?;
        }
    } else {
        out.write_all(render_table(&conns).as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        serve::views::{ChainLegView, PoolView},
        track::classify::KeepaliveView,
    };

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:9090").unwrap(),
            ("127.0.0.1:9090".into(), "/".into())
        );
        assert_eq!(
            parse_url("http://node:9102/ct/").unwrap(),
            ("node:9102".into(), "/ct".into())
        );
        assert_eq!(parse_url("http://node").unwrap().0, "node:80");
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn table_shows_keepalive_and_idle() {
        let c = ConnView {
            cookie: 1,
            state: "ESTABLISHED".into(),
            direction: "outbound".into(),
            role: "host".into(),
            namespace: String::new(),
            pod: String::new(),
            container: String::new(),
            local: "127.0.0.1:40000".into(),
            remote: "127.0.0.1:3306".into(),
            netns: 1,
            owner: "known".into(),
            pid: 42,
            comm: "app".into(),
            uid: 0,
            cgroup_id: 1,
            keepalive: KeepaliveView {
                enabled: true,
                idle_s: 30.0,
                interval_s: 5.0,
                probes: 3,
                user_timeout_ms: 0,
                own_idle: true,
                own_interval: true,
                own_probes: true,
            },
            idle_s: Some(12.25),
            bytes_received: Some(10),
            bytes_acked: None,
            tracked: true,
            chain: vec![
                ChainLegView {
                    cookie: 1,
                    leg: "app".into(),
                    local: "127.0.0.1:40000".into(),
                    remote: "127.0.0.1:3306".into(),
                    inferred: false,
                },
                ChainLegView {
                    cookie: 2,
                    leg: "sidecar-app-side".into(),
                    local: "127.0.0.1:15001".into(),
                    remote: "127.0.0.1:40000".into(),
                    inferred: false,
                },
                ChainLegView {
                    cookie: 3,
                    leg: "sidecar-upstream".into(),
                    local: "10.0.0.2:41000".into(),
                    remote: "127.0.0.1:3306".into(),
                    inferred: true,
                },
            ],
            pool: None,
            opened_at: None,
            age_s: None,
            close_wait_s: None,
        };
        let t = render_table(std::slice::from_ref(&c));
        let line = t.lines().nth(1).unwrap();
        for want in [
            "ESTABLISHED",
            "42/app",
            "keepalive(30/5/3)",
            "12.2",
            "127.0.0.1:3306",
            "sidecar:127.0.0.1:15001,upstream:10.0.0.2:41000(inferred)",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
        assert!(t.lines().next().unwrap().starts_with("STATE"));
        let mut pooled = c.clone();
        pooled.chain.truncate(2);
        pooled.pool = Some(PoolView {
            leg: "app".into(),
            dialled: "10.96.0.10:80".into(),
            app_connections: 8,
            upstream_connections: 2,
        });
        assert_eq!(chain_cell(&pooled), "sidecar:127.0.0.1:15001,pool(8:2)");
    }
}
