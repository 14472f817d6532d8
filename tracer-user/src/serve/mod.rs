//! Stage 7, serve: HTTP. Takes the daemon's [`State`] and [`Kernel`]
//! (shared with the event loop) and gives `/metrics` (the families
//! gathered under the state lock, encoded outside it), `/healthz` and
//! `/connections` ([`views`]: the tracked connections merged with a live
//! snapshot; the `connections` client reads the same types back) and
//! `/findings` (the active findings, which the `findings` client reads).

pub(crate) mod views;

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{
    event::{ConnEvent, EventData, clock::WallClock},
    kernel::{Kernel, KernelError},
    metrics::State,
};

/// Shared between the event loop and the HTTP server.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub kernel: Mutex<Kernel>,
    pub healthy: AtomicBool,
    pub clock: WallClock,
    /// Asks the event loop to apply every pending event now.
    pub catch_up: mpsc::Sender<oneshot::Sender<()>>,
}

impl Shared {
    /// Waits (bounded) until the event loop has applied every event the
    /// kernel sent so far.
    async fn catch_up(&self) {
        let (done, wait) = oneshot::channel();
        if self.catch_up.send(done).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }

    /// A fresh kernel snapshot; its undecodable records count as decode errors.
    pub(crate) fn snapshot(&self) -> Result<Vec<ConnEvent>, KernelError> {
        let (snap, bad) = {
            let mut kernel = self.kernel.lock().expect("kernel lock");
            let snap = kernel.snapshot();
            (snap, kernel.take_decode_errors())
        };
        if bad > 0 {
            self.state
                .lock()
                .expect("state lock")
                .metrics
                .decode_errors
                .inc_by(bad);
        }
        snap
    }
}

/// Serves HTTP on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = Arc::clone(&shared);
                async move {
                    if matches!(req.uri().path(), "/metrics" | "/connections" | "/findings")
                        && refuse(req.method(), req.uri().path()).is_none()
                    {
                        shared.catch_up().await;
                    }
                    Ok::<_, Infallible>(route(&req, &shared))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                log::debug!("http connection: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// The paths the daemon serves; everything else is 404 whatever the method.
const PATHS: [&str; 5] = ["/", "/metrics", "/healthz", "/connections", "/findings"];

/// 404 for a path that is not ours (any method: a POST to an unknown path
/// names no resource, RFC 9110 15.5.5), 405 with `Allow` for a method other
/// than GET or HEAD on one of ours; `None` for a request to serve. The body
/// of a refused request is never read: hyper then closes the connection.
fn refuse(method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
    if !PATHS.contains(&path) {
        return Some(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".into(),
        ));
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Some(r);
    }
    None
}

/// 200 with `value` as pretty JSON.
fn json_reply(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body + "\n"),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

/// Events the kernel could not deliver so far (the loss counter).
fn lost_total(shared: &Shared) -> u64 {
    shared
        .kernel
        .lock()
        .expect("kernel lock")
        .lost_total()
        .unwrap_or(0)
}

fn route(req: &Request<hyper::body::Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if let Some(refused) = refuse(req.method(), req.uri().path()) {
        return refused;
    }
    match req.uri().path() {
        "/metrics" => {
            let lost = lost_total(shared);
            let families = shared
                .state
                .lock()
                .expect("state lock")
                .gather_metrics(lost);
            let text = crate::metrics::encode(&families);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/healthz" => {
            if shared.healthy.load(Ordering::SeqCst) {
                reply(
                    StatusCode::OK,
                    "text/plain",
                    "ok: kernel programs attached\n".into(),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "stopping\n".into(),
                )
            }
        }
        "/connections" => {
            let snap = shared.snapshot();
            let mut st = shared.state.lock().expect("state lock");
            let snap = match snap {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("live snapshot failed: {e}");
                    Vec::new()
                }
            };
            for ev in &snap {
                if let EventData::Snapshot(s) = ev.data {
                    st.tracker.hz.observe(s.jiffies, ev.info.ts_ns);
                }
            }
            let hz = st.tracker.hz.get();
            let views = views::connections(&mut st.tracker, &snap, hz, &shared.clock);
            json_reply(&views)
        }
        "/findings" => {
            let lost = lost_total(shared);
            json_reply(&shared.state.lock().expect("state lock").findings(lost))
        }
        "/" => reply(
            StatusCode::OK,
            "text/html",
            "<html><body><h1>conn-tracer</h1><ul><li><a href=\"/metrics\">/metrics</a>\
             <li><a href=\"/healthz\">/healthz</a><li><a href=\"/connections\">/connections</a>\
             <li><a href=\"/findings\">/findings</a></ul></body></html>\n"
                .into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_not_ours_are_404_whatever_the_method_and_ours_take_only_get_and_head() {
        for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
            for path in ["/nope", "/metrics/../x", "/metricsx", "/metrics/", ""] {
                let r = refuse(&method, path).expect("refused");
                assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {path}");
            }
        }
        for path in PATHS {
            for method in [Method::GET, Method::HEAD] {
                assert!(refuse(&method, path).is_none(), "{method} {path}");
            }
            for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
                let r = refuse(&method, path).expect("refused");
                assert_eq!(
                    r.status(),
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
                assert_eq!(r.headers()[hyper::header::ALLOW], "GET, HEAD");
            }
        }
    }
}
