//! A fake Kubernetes API server for root-free tests of the pod, Service and
//! EndpointSlice watchers: the real client library reads it as it would an
//! apiserver.
//!
//! It serves `GET /api/v1/pods`, `/api/v1/services` and
//! `/apis/discovery.k8s.io/v1/endpointslices` (and their
//! `.../namespaces/NS/...` forms) as the apiserver does for a list
//! (`PodList`, `ServiceList`, `EndpointSliceList` with `metadata.resourceVersion`,
//! `limit`/`continue` pagination, `fieldSelector=spec.nodeName=...`) and for
//! a watch (`watch=true&resourceVersion=N`: chunked newline-delimited
//! `WatchEvent`s from after N, kept open until `timeoutSeconds`, with
//! `BOOKMARK`s when `allowWatchBookmarks=true`, and a 410 `ERROR` event for a
//! resourceVersion older than the history it keeps). Tests change the objects
//! with [`FakeKube::set_pods`], [`FakeKube::set_services`] and
//! [`FakeKube::set_endpoint_slices`] and inject faults with [`FakeKube::fail_next`],
//! [`FakeKube::drop_watches`] and [`FakeKube::expire_history`].
//!
//! Plain threads and std sockets: it runs beside any async runtime.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// How long a watch sleeps between looks at the event history.
const WATCH_POLL: Duration = Duration::from_millis(50);

/// A fake apiserver on 127.0.0.1 serving the pods given to
/// [`set_pods`](Self::set_pods). Dropping it closes every connection.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    node: String,
    acceptor: Option<thread::JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The resources the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Pods,
    Services,
    EndpointSlices,
}

impl Resource {
    /// `(apiVersion, kind)` of its objects.
    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Self::Pods => ("v1", "Pod"),
            Self::Services => ("v1", "Service"),
            Self::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSlice"),
        }
    }

    /// The resource and namespace ("" for all) a request path names.
    fn route(path: &str) -> Option<(Self, String)> {
        let (prefix, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
            ("core", rest)
        } else {
            (
                "discovery",
                path.strip_prefix("/apis/discovery.k8s.io/v1/")?,
            )
        };
        let (ns, plural) = match rest.strip_prefix("namespaces/") {
            Some(r) => r.split_once('/')?,
            None => ("", rest),
        };
        let resource = match (prefix, plural) {
            ("core", "pods") => Self::Pods,
            ("core", "services") => Self::Services,
            ("discovery", "endpointslices") => Self::EndpointSlices,
            _ => return None,
        };
        Some((resource, ns.to_owned()))
    }
}

#[derive(Default)]
struct State {
    /// Current objects by (resource, namespace, name), each with its
    /// resourceVersion.
    objects: BTreeMap<(Resource, String, String), Value>,
    /// Last resourceVersion handed out.
    rv: u64,
    /// Every change since `oldest_rv`, in order.
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_rv: u64,
    fail_next: u32,
    requests: Vec<String>,
    /// Open connections, so that drop and `drop_watches` can cut them.
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    /// Bumped by `drop_watches`: watches opened before end abruptly.
    drop_epoch: u64,
    stopping: bool,
    /// Remaining items of paginated lists, by continue token.
    continues: HashMap<String, (u64, Vec<Value>)>,
    /// Continue tokens handed out: each token names one list's remainder
    /// (two lists paged at once, Services and EndpointSlices, must never
    /// share one, or one client reads the other's objects).
    next_continue: u64,
}

struct Conn {
    stream: TcpStream,
    watching: bool,
}

struct Change {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

impl FakeKube {
    /// Starts the server on a free port of 127.0.0.1. `node` is the node the
    /// tests' daemon runs on (see [`node`](Self::node)); the server itself
    /// answers any `spec.nodeName` selector.
    pub fn start(node: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                oldest_rv: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fake-kube-accept".into())
                .spawn(move || accept_loop(&shared, &listener))
                .expect("spawn fake-kube acceptor")
        };
        Self {
            shared,
            addr,
            node: node.to_owned(),
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, for `--kube-api`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Makes `pods` the cluster's pods (pod JSON as from [`pod_json`]; any
    /// node). Open watches get ADDED for new pods, MODIFIED for changed ones
    /// and DELETED for those left out; a pod re-created under the same name
    /// with a new uid is a DELETED then an ADDED.
    pub fn set_pods(&self, pods: Vec<Value>) {
        self.set_objects(Resource::Pods, pods);
    }

    /// Makes `services` the cluster's Services (JSON as from
    /// [`service_json`]), as [`set_pods`](Self::set_pods) does for pods.
    pub fn set_services(&self, services: Vec<Value>) {
        self.set_objects(Resource::Services, services);
    }

    /// Makes `slices` the cluster's EndpointSlices (JSON as from
    /// [`endpoint_slice_json`]).
    pub fn set_endpoint_slices(&self, slices: Vec<Value>) {
        self.set_objects(Resource::EndpointSlices, slices);
    }

    /// Makes `objects` all the objects of `resource`.
    pub fn set_objects(&self, resource: Resource, objects: Vec<Value>) {
        let mut st = self.lock();
        let mut wanted = BTreeMap::new();
        for mut pod in objects {
            let meta = pod["metadata"]
                .as_object_mut()
                .expect("object without metadata");
            let ns = meta
                .entry("namespace")
                .or_insert_with(|| json!("default"))
                .as_str()
                .expect("string namespace")
                .to_owned();
            let name = meta["name"]
                .as_str()
                .expect("object without name")
                .to_owned();
            wanted.insert((resource, ns, name), pod);
        }
        let gone: Vec<_> = st
            .objects
            .keys()
            .filter(|k| k.0 == resource && !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let old = st.objects.remove(&key).expect("listed key");
            st.record(resource, "DELETED", old);
        }
        for (key, pod) in wanted {
            match st.objects.get(&key) {
                None => {
                    let pod = st.record(resource, "ADDED", pod);
                    st.objects.insert(key, pod);
                }
                Some(old) if old["metadata"]["uid"] != pod["metadata"]["uid"] => {
                    let old = old.clone();
                    st.record(resource, "DELETED", old);
                    let pod = st.record(resource, "ADDED", pod);
                    st.objects.insert(key, pod);
                }
                Some(old) if without_rv(old) != without_rv(&pod) => {
                    let pod = st.record(resource, "MODIFIED", pod);
                    st.objects.insert(key, pod);
                }
                Some(_) => {}
            }
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// The current pods, with the resourceVersions the server gave them.
    pub fn pods(&self) -> Vec<Value> {
        let st = self.lock();
        st.objects
            .iter()
            .filter(|(k, _)| k.0 == Resource::Pods)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Answers the next `n` requests, whatever they are, with 500 and a
    /// `Status` body, as an apiserver with a failing etcd does.
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }

    /// Requests still to be failed.
    pub fn failures_pending(&self) -> u32 {
        self.lock().fail_next
    }

    /// Cuts every open watch connection without ending the chunked body, as
    /// an apiserver restart or a broken network path does.
    pub fn drop_watches(&self) {
        let mut st = self.lock();
        st.drop_epoch += 1;
        for conn in st.conns.values().filter(|c| c.watching) {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Forgets the event history, as etcd compaction does: a watch resuming
    /// from any resourceVersion handed out so far gets `410 Gone` and the
    /// client must list again.
    pub fn expire_history(&self) {
        let mut st = self.lock();
        st.rv += 1;
        st.oldest_rv = st.rv;
        st.history.clear();
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.lock().conns.values().filter(|c| c.watching).count()
    }

    /// Every request so far as `METHOD /path?query`, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.stopping = true;
        for conn in st.conns.values() {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        drop(st);
        self.shared.changed.notify_all();
        // Wakes the acceptor, which then sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Stamps `object` with the next resourceVersion, adds the change to the
    /// history and returns the stamped object.
    fn record(&mut self, resource: Resource, kind: &'static str, mut object: Value) -> Value {
        self.rv += 1;
        let (api_version, object_kind) = resource.type_meta();
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(object_kind);
        self.history.push(Change {
            rv: self.rv,
            resource,
            kind,
            object: object.clone(),
        });
        object
    }
}

fn without_rv(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(meta) = pod["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
    }
    pod
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.lock().stopping {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = {
            let mut st = shared.lock();
            st.next_conn += 1;
            let id = st.next_conn;
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            st.conns.insert(
                id,
                Conn {
                    stream: clone,
                    watching: false,
                },
            );
            id
        };
        let worker = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("fake-kube-conn-{id}"))
            .spawn(move || {
                serve_connection(&worker, id, stream);
                worker.lock().conns.remove(&id);
            });
        // Out of threads: the connection is dropped, as an overloaded
        // apiserver would.
        if spawned.is_err() {
            shared.lock().conns.remove(&id);
        }
    }
}

/// One keep-alive HTTP/1.1 connection: requests one after another until the
/// client closes it or a watch is cut.
fn serve_connection(shared: &Shared, id: u64, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    while let Some(target) = read_request(&mut reader) {
        let (method, path_query) = target;
        let mut st = shared.lock();
        st.requests.push(format!("{method} {path_query}"));
        if st.fail_next > 0 {
            st.fail_next -= 1;
            drop(st);
            let body = status_json(
                500,
                "InternalError",
                "injected failure (FakeKube::fail_next)",
            );
            if respond(&mut out, 500, &body).is_err() {
                return;
            }
            continue;
        }
        drop(st);
        let (path, query) = path_query.split_once('?').unwrap_or((&path_query, ""));
        let params = parse_query(query);
        let result = match (method.as_str(), Resource::route(path)) {
            ("GET", Some((resource, ns))) => {
                let selector = params.get("fieldSelector").map(String::as_str);
                let filter = Filter::new(resource, &ns, selector);
                match filter {
                    Err(msg) => respond(&mut out, 400, &status_json(400, "BadRequest", &msg)),
                    Ok(filter) if params.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                        match watch(shared, id, &mut out, &filter, &params) {
                            WatchEnd::Clean => Ok(()),
                            WatchEnd::Cut => return,
                        }
                    }
                    Ok(filter) => list(shared, &mut out, &filter, &params),
                }
            }
            ("GET", None) => respond(
                &mut out,
                404,
                &status_json(
                    404,
                    "NotFound",
                    &format!("the fake serves only pods, services and endpointslices, not {path}"),
                ),
            ),
            _ => respond(
                &mut out,
                405,
                &status_json(405, "MethodNotAllowed", "the fake serves only GET"),
            ),
        };
        if result.is_err() {
            return;
        }
    }
}

/// Reads one request head (and skips any body); `(method, target)`, or
/// `None` once the client has closed the connection.
fn read_request(reader: &mut impl BufRead) -> Option<(String, String)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut body_len = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            body_len = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; body_len];
    reader.read_exact(&mut body).ok()?;
    Some((method, target))
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which objects a request asks for.
struct Filter {
    resource: Resource,
    namespace: String,
    node: Option<String>,
}

impl Filter {
    fn new(
        resource: Resource,
        namespace: &str,
        field_selector: Option<&str>,
    ) -> Result<Self, String> {
        let mut node = None;
        for term in field_selector
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            match term.split_once('=') {
                Some(("spec.nodeName", value)) if resource == Resource::Pods => {
                    node = Some(value.trim_start_matches('=').to_owned());
                }
                _ => {
                    return Err(format!(
                        "the fake supports only fieldSelector spec.nodeName=NODE on pods, not {term:?}"
                    ));
                }
            }
        }
        Ok(Self {
            resource,
            namespace: namespace.to_owned(),
            node,
        })
    }

    fn matches(&self, pod: &Value) -> bool {
        (self.namespace.is_empty() || pod["metadata"]["namespace"] == self.namespace.as_str())
            && self
                .node
                .as_ref()
                .is_none_or(|n| pod["spec"]["nodeName"].as_str().unwrap_or("") == n)
    }
}

fn list(
    shared: &Shared,
    out: &mut TcpStream,
    filter: &Filter,
    params: &HashMap<String, String>,
) -> std::io::Result<()> {
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let mut st = shared.lock();
    let token = params.get("continue").filter(|c| !c.is_empty());
    let (rv, mut items) = if let Some(token) = token {
        let Some(rest) = st.continues.remove(token) else {
            drop(st);
            let body = status_json(410, "Expired", "the provided continue parameter is too old");
            return respond(out, 410, &body);
        };
        rest
    } else {
        let items = st
            .objects
            .iter()
            .filter(|(k, p)| k.0 == filter.resource && filter.matches(p))
            .map(|(_, p)| {
                // Items of a list carry no apiVersion/kind, as from an apiserver.
                let mut p = p.clone();
                if let Some(obj) = p.as_object_mut() {
                    obj.remove("apiVersion");
                    obj.remove("kind");
                }
                p
            })
            .collect();
        (st.rv, items)
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let rest = items.split_off(limit);
        st.next_continue += 1;
        let token = format!("fake-continue-{rv}-{}", st.next_continue);
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        st.continues.insert(token, (rv, rest));
    }
    drop(st);
    let (api_version, kind) = filter.resource.type_meta();
    let body = json!({
        "apiVersion": api_version,
        "kind": format!("{kind}List"),
        "metadata": metadata,
        "items": items,
    });
    respond(out, 200, &body)
}

enum WatchEnd {
    /// Ended with the last chunk (timeoutSeconds or 410): the connection
    /// can carry another request.
    Clean,
    /// Cut mid-stream, or the client went away.
    Cut,
}

fn watch(
    shared: &Shared,
    id: u64,
    out: &mut TcpStream,
    filter: &Filter,
    params: &HashMap<String, String>,
) -> WatchEnd {
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_mins(30), Duration::from_secs);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if out
        .write_all(head.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return WatchEnd::Cut;
    }

    let mut st = shared.lock();
    let from = params.get("resourceVersion").map_or("", String::as_str);
    let (cursor, initial) = match from {
        // "Any version": the current pods as ADDED, then changes.
        "" | "0" => (
            st.rv,
            st.objects
                .iter()
                .filter(|(k, p)| k.0 == filter.resource && filter.matches(p))
                .map(|(_, p)| watch_event("ADDED", p))
                .collect(),
        ),
        rv => match rv.parse::<u64>() {
            Ok(rv) if rv >= st.oldest_rv => (rv, Vec::new()),
            _ => {
                let msg = format!("too old resource version: {from} ({})", st.oldest_rv);
                drop(st);
                let gone = json!({"type": "ERROR", "object": status_json(410, "Expired", &msg)});
                let sent = write_chunk(out, &gone).and_then(|()| end_chunks(out));
                return if sent.is_ok() {
                    WatchEnd::Clean
                } else {
                    WatchEnd::Cut
                };
            }
        },
    };
    if let Some(conn) = st.conns.get_mut(&id) {
        conn.watching = true;
    }
    let mut stream = WatchStream {
        filter,
        cursor,
        pending: initial,
        bookmarks: params
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true"),
        deadline: Instant::now() + timeout,
        epoch: st.drop_epoch,
    };
    drop(st);
    let end = stream.run(shared, out);
    if let Some(conn) = shared.lock().conns.get_mut(&id) {
        conn.watching = false;
    }
    if matches!(end, WatchEnd::Cut) {
        let _ = out.shutdown(Shutdown::Both);
    }
    end
}

/// One open watch: what it has sent and what ends it.
struct WatchStream<'a> {
    filter: &'a Filter,
    /// The resourceVersion sent last.
    cursor: u64,
    /// Events to send before any change (the ADDED of a watch from "0").
    pending: Vec<Value>,
    bookmarks: bool,
    /// timeoutSeconds: the server ends the watch cleanly then.
    deadline: Instant,
    /// `drop_epoch` at the start: a change cuts this watch.
    epoch: u64,
}

impl WatchStream<'_> {
    fn run(&mut self, shared: &Shared, out: &mut TcpStream) -> WatchEnd {
        let mut st = shared.lock();
        loop {
            if st.stopping || st.drop_epoch != self.epoch {
                return WatchEnd::Cut;
            }
            let mut batch = std::mem::take(&mut self.pending);
            batch.extend(
                st.history
                    .iter()
                    .filter(|c| {
                        c.rv > self.cursor
                            && c.resource == self.filter.resource
                            && self.filter.matches(&c.object)
                    })
                    .map(|c| watch_event(c.kind, &c.object)),
            );
            let newest = st.history.last().map_or(0, |c| c.rv);
            if !batch.is_empty() || newest > self.cursor {
                // Changes to pods this watch does not select still move
                // its resourceVersion on, through the bookmark.
                self.cursor = self.cursor.max(newest);
                let current = st.rv;
                drop(st);
                if self.bookmarks {
                    let (api_version, kind) = self.filter.resource.type_meta();
                    batch.push(json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": kind,
                            "apiVersion": api_version,
                            "metadata": {"resourceVersion": current.to_string(), "creationTimestamp": null},
                        },
                    }));
                }
                if batch
                    .iter()
                    .try_for_each(|ev| write_chunk(out, ev))
                    .is_err()
                {
                    return WatchEnd::Cut;
                }
                st = shared.lock();
                continue;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                return if end_chunks(out).is_ok() {
                    WatchEnd::Clean
                } else {
                    WatchEnd::Cut
                };
            }
            st = shared
                .changed
                .wait_timeout(st, left.min(WATCH_POLL))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn watch_event(kind: &str, object: &Value) -> Value {
    json!({"type": kind, "object": object})
}

fn write_chunk(out: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = event.to_string();
    line.push('\n');
    write!(out, "{:x}\r\n{line}\r\n", line.len())?;
    out.flush()
}

fn end_chunks(out: &mut TcpStream) -> std::io::Result<()> {
    out.write_all(b"0\r\n\r\n")?;
    out.flush()
}

fn respond(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Internal Server Error",
    };
    let body = body.to_string();
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// A `metav1.Status` failure, as the apiserver sends with an error code.
fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// A pod as the apiserver returns it for a running pod: metadata, spec and
/// status with one running container per `(name, container_id)`, where
/// `container_id` carries the runtime prefix (`containerd://<hex>`,
/// `cri-o://<hex>`, `docker://<hex>`). Tests adjust the JSON for other cases
/// (`spec.hostNetwork`, init containers, phases).
pub fn pod_json(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    pod_ip: &str,
    containers: &[(&str, &str)],
) -> Value {
    const STARTED: &str = "2025-01-01T00:00:00Z";
    let specs: Vec<Value> = containers
        .iter()
        .map(|(cname, _)| {
            json!({
                "name": cname,
                "image": format!("registry.example/{cname}:1.0"),
                "imagePullPolicy": "IfNotPresent",
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            })
        })
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(cname, id)| {
            json!({
                "name": cname,
                "containerID": id,
                "image": format!("registry.example/{cname}:1.0"),
                "imageID": format!("registry.example/{cname}@sha256:{}", "0".repeat(64)),
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": STARTED}},
                "lastState": {},
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "creationTimestamp": STARTED,
            "labels": {"app": name},
        },
        "spec": {
            "nodeName": node,
            "containers": specs,
            "restartPolicy": "Always",
            "serviceAccountName": "default",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": STARTED},
            ],
            "hostIP": "192.0.2.10",
            "hostIPs": [{"ip": "192.0.2.10"}],
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "qosClass": "BestEffort",
            "startTime": STARTED,
            "containerStatuses": statuses,
        },
    })
}

/// A ClusterIP Service as the apiserver returns it: one TCP port per
/// `(name, port, target_port)`, the last-applied annotation and
/// managedFields included (the watcher must not keep them).
pub fn service_json(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, u16)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(pname, port, target)| {
            json!({"name": pname, "protocol": "TCP", "port": port, "targetPort": target})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("svc-{namespace}-{name}"),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app.kubernetes.io/name": name},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration":
                    format!("{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{name}\"}}}}"),
            },
            "managedFields": [{
                "manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:ports": {}, "f:selector": {}}},
            }],
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": [if cluster_ip.contains(':') { "IPv6" } else { "IPv4" }],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app.kubernetes.io/name": name},
            "ports": ports,
        },
        "status": {"loadBalancer": {}},
    })
}

/// One endpoint of an EndpointSlice: a pod's address on a node.
#[derive(Clone, Debug)]
pub struct SliceEndpoint<'a> {
    pub ip: &'a str,
    pub pod: &'a str,
    pub node: &'a str,
    pub ready: bool,
    /// The pod is being deleted (its deletionTimestamp is set).
    pub terminating: bool,
}

/// An EndpointSlice as the EndpointSlice controller writes it for
/// `service` in `namespace`: ports `(name, port)` are the target ports.
pub fn endpoint_slice_json(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[SliceEndpoint<'_>],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.ip],
                "conditions": {
                    "ready": e.ready,
                    "serving": e.ready || e.terminating,
                    "terminating": e.terminating,
                },
                "nodeName": e.node,
                "targetRef": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": e.pod,
                    "uid": format!("uid-{namespace}-{}", e.pod),
                },
                "zone": "zone-a",
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(pname, port)| json!({"name": pname, "port": port, "protocol": "TCP"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("eps-{namespace}-{name}"),
            "generateName": format!("{service}-"),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-01-01T00:00:00Z"},
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": service,
                "uid": format!("svc-{namespace}-{service}"),
                "controller": true, "blockOwnerDeletion": true,
            }],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "discovery.k8s.io/v1", "time": "2025-01-01T00:00:00Z",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:addressType": {}, "f:endpoints": {}},
            }],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_percent_encoding_are_read() {
        let q = parse_query("fieldSelector=spec.nodeName%3Dnode-a&watch=true&limit=500");
        assert_eq!(q["fieldSelector"], "spec.nodeName=node-a");
        assert_eq!(q["watch"], "true");
        let filter = Filter::new(Resource::Pods, "", Some("spec.nodeName=node-a")).unwrap();
        assert!(filter.matches(&pod_json("ns", "p", "u", "node-a", "10.0.0.1", &[])));
        assert!(!filter.matches(&pod_json("ns", "p", "u", "node-b", "10.0.0.1", &[])));
        assert!(Filter::new(Resource::Pods, "", Some("status.phase=Running")).is_err());
        assert!(Filter::new(Resource::Services, "", Some("spec.nodeName=node-a")).is_err());
        let routes = [
            ("/api/v1/pods", Some((Resource::Pods, ""))),
            (
                "/api/v1/namespaces/shop/services",
                Some((Resource::Services, "shop")),
            ),
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                Some((Resource::EndpointSlices, "")),
            ),
            ("/api/v1/endpointslices", None),
            ("/api/v1/nodes", None),
        ];
        for (path, want) in routes {
            let got = Resource::route(path);
            assert_eq!(got, want.map(|(r, ns)| (r, ns.to_owned())), "{path}");
        }
    }
}
