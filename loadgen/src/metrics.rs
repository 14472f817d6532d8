//! A minimal HTTP/1.1 client for the daemon's `/metrics`, on one kept-alive
//! connection (so that polling does not itself churn connections), and the
//! sums of metric samples the bench needs.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub struct Scraper {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Scraper {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `/metrics` text.
    pub fn get(&mut self) -> Result<String> {
        self.fetch("/metrics")
    }

    /// The body of a `GET path` that answered 200.
    pub fn fetch(&mut self, path: &str) -> Result<String> {
        // A kept-alive connection the server closed in between: retry once.
        if let Ok(body) = self.try_fetch(path) {
            Ok(body)
        } else {
            self.conn = None;
            self.try_fetch(path)
        }
    }

    fn try_fetch(&mut self, path: &str) -> Result<String> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
                .with_context(|| format!("cannot connect to {}", self.addr))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("connected above");
        conn.get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: conn-tracer\r\n\r\n").as_bytes())?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("{path} answered {:?}", line.trim_end());
        }
        let mut length = None;
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = Some(value.trim().parse::<usize>()?);
            }
        }
        let length = length.with_context(|| format!("{path}: reply without Content-Length"))?;
        let mut body = vec![0; length];
        conn.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The sum of every sample of `name` whose labels contain all of `labels`
/// (each as `key="value"`).
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let matches = (rest.is_empty() || rest.starts_with('{'))
                && labels.iter().all(|want| rest.contains(want));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_only_the_named_metric_with_the_labels() {
        let text = "# HELP conntracer_idle_kills_total x\n\
                    conntracer_idle_kills_total{peer=\"127.0.0.1:80\",role=\"host\"} 2\n\
                    conntracer_idle_kills_total{peer=\"127.0.0.1:81\",role=\"host\"} 5\n\
                    conntracer_idle_kills_total_other{peer=\"127.0.0.1:80\"} 7\n\
                    conntracer_events_lost_total 3\n";
        assert!(
            (sum(
                text,
                "conntracer_idle_kills_total",
                &["peer=\"127.0.0.1:80\""]
            ) - 2.0)
                .abs()
                < 1e-9
        );
        assert!((sum(text, "conntracer_idle_kills_total", &[]) - 7.0).abs() < 1e-9);
        assert!((sum(text, "conntracer_events_lost_total", &[]) - 3.0).abs() < 1e-9);
        assert!(sum(text, "conntracer_absent", &[]).abs() < 1e-9);
    }
}
