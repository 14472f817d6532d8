//! A real Prometheus (Debian's `prometheus` package) as a child process: its
//! own config, rule files and TSDB in a temporary directory, its web API on
//! a free loopback port. Killed by pid and cleaned up on drop.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::unique_suffix;

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Writes `config` (prometheus.yml) and `files` (name, text: rule files
    /// the config names relative to itself) into a fresh directory, starts
    /// `prometheus` on them and waits (bounded) until it is ready.
    pub fn start(config: &str, files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("ct-prometheus-{}", unique_suffix()));
        fs::create_dir_all(dir.join("data")).expect("create the Prometheus directory");
        fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = fs::File::create(dir.join("prometheus.log")).expect("create prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start prometheus ({e}): apt-get install prometheus")
            });
        let prom = Self { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(addr, "/-/ready") {
                return prom;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready within 30 s; its log:\n{}",
                prom.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Prometheus's own log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` (already URL-encoded) of the API; the parsed JSON body,
    /// whatever the status (errors come as `{"status":"error",...}`).
    pub fn api(&self, path: &str) -> Value {
        let (status, body) =
            http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path} from Prometheus: {e}"));
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: status {status}, not JSON ({e}): {body}"))
    }

    /// Evaluates the instant query `expr` now (or at `time`, Unix seconds):
    /// `Ok(result)` (the `data.result` array), or `Err(error)` for a query
    /// Prometheus rejects (parse errors among them).
    pub fn query(&self, expr: &str, time: Option<f64>) -> Result<Vec<Value>, String> {
        let path = match time {
            Some(t) => format!("/api/v1/query?query={}&time={t:.3}", url_encode(expr)),
            None => format!("/api/v1/query?query={}", url_encode(expr)),
        };
        let v = self.api(&path);
        if v["status"] == "success" {
            Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    /// The active targets (`/api/v1/targets`).
    pub fn targets(&self) -> Vec<Value> {
        self.api("/api/v1/targets")["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (bounded) until every target of `job` is healthy; Prometheus
    /// takes a few seconds to pick up a target.
    pub fn wait_job_up(&self, job: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let targets = self.targets();
            let of_job: Vec<&Value> = targets
                .iter()
                .filter(|t| t["labels"]["job"] == job)
                .collect();
            if !of_job.is_empty() && of_job.iter().all(|t| t["health"] == "up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "targets of job {job} not up within {timeout:?}: {targets:#?}\nPrometheus log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The alerts, pending and firing (`/api/v1/alerts`).
    pub fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Every loaded rule (`/api/v1/rules`), flattened over the groups.
    pub fn rules(&self) -> Vec<Value> {
        self.api("/api/v1/rules")["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let (grace, poll) = (Duration::from_secs(10), Duration::from_millis(50));
            crate::terminate(&mut self.child, grace, poll);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn url_encode(s: &str) -> String {
    use std::fmt::Write as _;
    s.bytes()
        .fold(String::with_capacity(s.len() * 3), |mut out, b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
            out
        })
}

/// GET over HTTP/1.0: Go's server then answers without chunking and closes
/// the connection, so the body is everything up to EOF.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            url_encode(r#"sum by (a) (x{b=~".*"}[5m])"#),
            "sum%20by%20%28a%29%20%28x%7Bb%3D~%22.%2A%22%7D%5B5m%5D%29"
        );
        assert_eq!(url_encode("a-b_c.d~e"), "a-b_c.d~e");
    }
}
