//! An in-memory Kubernetes API server for coordination.k8s.io/v1 Leases, on 127.0.0.1.
//!
//! Real HTTP, real `resourceVersion` semantics (409 AlreadyExists on create, 409 Conflict on a stale
//! update, 404, 422 for an update without a resourceVersion), merge and strategic-merge patch,
//! `Status` error bodies, watch streams, discovery documents good enough for `kubectl`, request
//! counting, and fault switches: refuse connections, hang, answer a chosen status, delay answers,
//! deny chosen verbs.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast};

/// What the server does with each request.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Mode {
    /// Serve normally.
    #[default]
    Normal,
    /// Close the listening socket and every open connection: connections are refused.
    Refuse,
    /// Accept requests and never answer them (open watches stop sending events too).
    Hang,
    /// Answer every Lease request with this status code, and an optional `Retry-After` in seconds.
    Status(u16, Option<u64>),
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Verb in Kubernetes terms: get, list, watch, create, update, patch, delete.
    pub verb: &'static str,
    /// Path.
    pub path: String,
    /// When it arrived.
    pub at: Instant,
}

/// A successful write, for timing assertions.
#[derive(Debug, Clone)]
pub struct Write {
    /// Verb.
    pub verb: &'static str,
    /// Holder identity after the write.
    pub holder: Option<String>,
    /// When it was committed.
    pub at: Instant,
    /// The same moment on CLOCK_MONOTONIC, in nanoseconds.
    pub at_ns: u64,
    /// The stored object after the write.
    pub object: Value,
}

#[derive(Debug, Clone)]
struct WatchEvent {
    kind: &'static str,
    namespace: String,
    name: String,
    rv: u64,
    object: Value,
}

struct Inner {
    leases: BTreeMap<(String, String), Value>,
    events: Vec<Value>,
    rv: u64,
    mode: Mode,
    delay: Duration,
    deny: HashMap<&'static str, u16>,
    seen: Vec<Seen>,
    writes: Vec<Write>,
    history: Vec<WatchEvent>,
    /// Watches asking for a resourceVersion at or below this get 410 Gone.
    compacted_below: u64,
}

/// Handle to a running server. Dropping it stops nothing; the test's runtime ends it.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    mode_changed: Arc<Notify>,
    watch_tx: broadcast::Sender<WatchEvent>,
    close_watches: broadcast::Sender<()>,
}

impl ApiServer {
    /// Starts on 127.0.0.1 with an ephemeral port, on the current tokio runtime.
    pub async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (watch_tx, _) = broadcast::channel(1024);
        let (close_watches, _) = broadcast::channel(16);
        let server = ApiServer {
            inner: Arc::new(Mutex::new(Inner {
                leases: BTreeMap::new(),
                events: Vec::new(),
                rv: 100,
                mode: Mode::Normal,
                delay: Duration::ZERO,
                deny: HashMap::new(),
                seen: Vec::new(),
                writes: Vec::new(),
                history: Vec::new(),
                compacted_below: 0,
            })),
            addr,
            mode_changed: Arc::new(Notify::new()),
            watch_tx,
            close_watches,
        };
        tokio::spawn(server.clone().accept_loop(listener));
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server, with `namespace` as the context's namespace.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: memory
  cluster:
    server: {url}
users:
- name: tester
  user:
    token: test-token
contexts:
- name: memory
  context:
    cluster: memory
    user: tester
    namespace: {namespace}
current-context: memory
",
            url = self.url()
        )
    }

    /// Switches the fault mode.
    pub fn set_mode(&self, mode: Mode) {
        self.inner.lock().unwrap().mode = mode;
        self.mode_changed.notify_waiters();
        let _ = self.close_watches.send(());
    }

    /// Delays every answer by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().unwrap().delay = delay;
    }

    /// Answers `verb` (get, list, watch, create, update, patch, delete, create-event) with `code`.
    pub fn deny(&self, verb: &'static str, code: u16) {
        self.inner.lock().unwrap().deny.insert(verb, code);
    }

    /// Stops denying `verb`.
    pub fn allow(&self, verb: &'static str) {
        self.inner.lock().unwrap().deny.remove(verb);
    }

    /// Closes every open watch stream.
    pub fn close_watches(&self) {
        let _ = self.close_watches.send(());
    }

    /// Makes every resourceVersion older than the current one too old for a watch (410 Gone), as
    /// etcd compaction at the current revision does: a watch from the current revision still works.
    pub fn compact(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.compacted_below = inner.rv;
        inner.history.clear();
        drop(inner);
        self.close_watches();
    }

    /// The stored Lease, as JSON.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .leases
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// `spec.holderIdentity` of the stored Lease.
    pub fn holder(&self, namespace: &str, name: &str) -> Option<String> {
        self.lease(namespace, name).and_then(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
    }

    /// Stores `object` as the Lease, bypassing all checks (as another writer would), with a new
    /// resourceVersion. Returns that resourceVersion.
    pub fn put_lease(&self, namespace: &str, name: &str, object: Value) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        self.store(&mut inner, namespace, name, object, None);
        inner.rv
    }

    /// Stores `object` as the Lease `namespace/name` under a new resourceVersion, keeping the
    /// stored uid and creation time, records it as a client write when `verb` is given, and
    /// publishes the watch event. Returns what was stored.
    fn store(
        &self,
        inner: &mut Inner,
        ns: &str,
        name: &str,
        mut object: Value,
        verb: Option<&'static str>,
    ) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        let key = (ns.to_string(), name.to_string());
        let previous = inner.leases.get(&key).cloned();
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        object["metadata"]["name"] = json!(name);
        if let Some(previous) = &previous {
            object["metadata"]["uid"] = previous["metadata"]["uid"].clone();
            object["metadata"]["creationTimestamp"] =
                previous["metadata"]["creationTimestamp"].clone();
        }
        stamp(&mut object, ns, rv, previous.is_none());
        inner.leases.insert(key, object.clone());
        if let Some(verb) = verb {
            self.record_write(inner, verb, &object);
        }
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.publish(inner, kind, ns, name, rv, object.clone());
        object
    }

    /// Writes a Lease held by `holder`, as another candidate would.
    pub fn steal(&self, namespace: &str, name: &str, holder: &str, duration: i64) -> u64 {
        let now = micro_now();
        let transitions = self
            .lease(namespace, name)
            .and_then(|l| l["spec"]["leaseTransitions"].as_i64())
            .unwrap_or(0);
        self.put_lease(
            namespace,
            name,
            json!({
                "spec": {
                    "holderIdentity": holder,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": transitions + 1,
                }
            }),
        )
    }

    /// Deletes the Lease, as garbage collection or a person would.
    pub fn delete_lease(&self, namespace: &str, name: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        let removed = inner
            .leases
            .remove(&(namespace.to_string(), name.to_string()));
        if let Some(object) = removed {
            inner.rv += 1;
            let rv = inner.rv;
            self.publish(&mut inner, "DELETED", namespace, name, rv, object);
            true
        } else {
            false
        }
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }

    /// Number of requests with `verb` seen since `since`.
    pub fn count(&self, verb: &str, since: Instant) -> usize {
        self.inner
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.verb == verb && s.at >= since)
            .count()
    }

    /// Number of requests with `verb` seen since the server started.
    pub fn total(&self, verb: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.verb == verb)
            .count()
    }

    /// Number of Lease requests of any verb seen since `since`.
    pub fn count_all(&self, since: Instant) -> usize {
        self.inner
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.at >= since && s.path.contains("/leases"))
            .count()
    }

    /// Every successful write to a Lease.
    pub fn writes(&self) -> Vec<Write> {
        self.inner.lock().unwrap().writes.clone()
    }

    /// The last successful write by `holder` (a create, update or patch leaving it as holder).
    pub fn last_write_by(&self, holder: &str) -> Option<Write> {
        self.writes()
            .into_iter()
            .rev()
            .find(|w| w.holder.as_deref() == Some(holder))
    }

    /// Events (core/v1) created so far.
    pub fn events(&self) -> Vec<Value> {
        self.inner.lock().unwrap().events.clone()
    }

    fn publish(
        &self,
        inner: &mut Inner,
        kind: &'static str,
        ns: &str,
        name: &str,
        rv: u64,
        object: Value,
    ) {
        let event = WatchEvent {
            kind,
            namespace: ns.to_string(),
            name: name.to_string(),
            rv,
            object,
        };
        inner.history.push(event.clone());
        let _ = self.watch_tx.send(event);
    }

    async fn accept_loop(self, mut listener: TcpListener) {
        let mut connections: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        loop {
            let refusing = self.inner.lock().unwrap().mode == Mode::Refuse;
            if refusing {
                drop(listener);
                for c in connections.drain(..) {
                    c.abort();
                }
                loop {
                    let notified = self.mode_changed.notified();
                    if self.inner.lock().unwrap().mode != Mode::Refuse {
                        break;
                    }
                    notified.await;
                }
                listener = loop {
                    match TcpListener::bind(self.addr).await {
                        Ok(l) => break l,
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                };
                continue;
            }
            let notified = self.mode_changed.notified();
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let server = self.clone();
                    connections.retain(|c| !c.is_finished());
                    connections.push(tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let server = server.clone();
                            async move { Ok::<_, Infallible>(server.handle(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }));
                }
                () = notified => {}
            }
        }
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let route = Route::parse(&parts.method, &parts.uri);
        let verb = route.verb();
        let (mode, delay, denied) = {
            let mut inner = self.inner.lock().unwrap();
            inner.seen.push(Seen {
                verb,
                path: parts.uri.path().to_string(),
                at: Instant::now(),
            });
            let denied = inner.deny.get(verb).copied();
            (inner.mode.clone(), inner.delay, denied)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let is_api = !matches!(route, Route::Discovery(_) | Route::NotFound);
        match mode {
            Mode::Hang if is_api => std::future::pending::<()>().await,
            Mode::Status(code, retry_after) if is_api => {
                let mut response = status_response(code, "ServiceUnavailable", "injected fault");
                if let Some(secs) = retry_after {
                    response.headers_mut().insert(
                        "retry-after",
                        HeaderValue::from_str(&secs.to_string()).unwrap(),
                    );
                }
                return response;
            }
            _ => {}
        }
        if let Some(code) = denied {
            let (reason, message) = if code == 401 {
                ("Unauthorized", "Unauthorized".to_string())
            } else {
                (
                    "Forbidden",
                    format!(
                        "leases.coordination.k8s.io is forbidden: User \"system:serviceaccount:default:test\" cannot {verb} resource \"leases\" in API group \"coordination.k8s.io\""
                    ),
                )
            };
            return status_response(code, reason, &message);
        }
        // Every route that takes a body takes JSON: parse it once, here.
        let body = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(value) => value,
                Err(_) => return status_response(400, "BadRequest", "body is not JSON"),
            }
        };
        self.route(route, &parts.headers, &parts.uri, body).await
    }

    async fn route(
        &self,
        route: Route,
        headers: &HeaderMap,
        uri: &Uri,
        body: Value,
    ) -> Response<Body> {
        match route {
            Route::Discovery(doc) => json_response(200, doc),
            Route::NotFound => status_response(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
            Route::Get { ns, name } => match self.lease(&ns, &name) {
                Some(obj) => json_response(200, obj),
                None => not_found(&name),
            },
            Route::List { ns, watch: false } => {
                let inner = self.inner.lock().unwrap();
                let selector = field_selector_name(uri);
                let items: Vec<Value> = inner
                    .leases
                    .iter()
                    .filter(|((n, name), _)| {
                        ns.as_deref().is_none_or(|ns| ns == n)
                            && selector.as_deref().is_none_or(|s| s == name)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                json_response(
                    200,
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
                )
            }
            Route::List { ns, watch: true } => self.watch(ns, uri),
            Route::Create { ns } => {
                let object = body;
                let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                    return status_response(422, "Invalid", "metadata.name: Required value");
                };
                let mut inner = self.inner.lock().unwrap();
                let key = (ns.clone(), name.clone());
                if inner.leases.contains_key(&key) {
                    return status_response(
                        409,
                        "AlreadyExists",
                        &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                    );
                }
                json_response(
                    201,
                    self.store(&mut inner, &ns, &name, object, Some("create")),
                )
            }
            Route::Update { ns, name } => {
                let object = body;
                let mut inner = self.inner.lock().unwrap();
                let key = (ns.clone(), name.clone());
                let Some(current) = inner.leases.get(&key).cloned() else {
                    return not_found(&name);
                };
                let Some(sent_rv) = object["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string)
                else {
                    return status_response(
                        422,
                        "Invalid",
                        "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                    );
                };
                if current["metadata"]["resourceVersion"].as_str() != Some(sent_rv.as_str()) {
                    return conflict(&name);
                }
                json_response(
                    200,
                    self.store(&mut inner, &ns, &name, object, Some("update")),
                )
            }
            Route::Patch { ns, name } => {
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !(content_type.starts_with("application/merge-patch+json")
                    || content_type.starts_with("application/strategic-merge-patch+json"))
                {
                    return status_response(
                        415,
                        "UnsupportedMediaType",
                        "only merge and strategic-merge patches are served",
                    );
                }
                let patch = body;
                let mut inner = self.inner.lock().unwrap();
                let key = (ns.clone(), name.clone());
                let Some(mut object) = inner.leases.get(&key).cloned() else {
                    return not_found(&name);
                };
                if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                    && object["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return conflict(&name);
                }
                // A Lease has no list fields with a patch merge key that matters here; strategic
                // merge behaves as a JSON merge patch for it.
                merge_patch(&mut object, &patch);
                json_response(
                    200,
                    self.store(&mut inner, &ns, &name, object, Some("patch")),
                )
            }
            Route::Delete { ns, name } => {
                if self.delete_lease(&ns, &name) {
                    json_response(
                        200,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": "coordination.k8s.io", "kind": "leases"}}),
                    )
                } else {
                    not_found(&name)
                }
            }
            Route::CreateEvent { ns } => {
                let mut object = body;
                let mut inner = self.inner.lock().unwrap();
                inner.rv += 1;
                let rv = inner.rv;
                stamp(&mut object, &ns, rv, true);
                inner.events.push(object.clone());
                json_response(201, object)
            }
            Route::PatchEvent { name } => {
                let patch = body;
                let mut inner = self.inner.lock().unwrap();
                let Some(event) = inner
                    .events
                    .iter_mut()
                    .find(|e| e["metadata"]["name"].as_str() == Some(name.as_str()))
                else {
                    return status_response(
                        404,
                        "NotFound",
                        &format!("events.events.k8s.io \"{name}\" not found"),
                    );
                };
                merge_patch(event, &patch);
                json_response(200, event.clone())
            }
        }
    }

    fn record_write(&self, inner: &mut Inner, verb: &'static str, object: &Value) {
        inner.writes.push(Write {
            verb,
            holder: object["spec"]["holderIdentity"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            at: Instant::now(),
            at_ns: mono_ns(),
            object: object.clone(),
        });
    }

    fn watch(&self, ns: Option<String>, uri: &Uri) -> Response<Body> {
        let selector = field_selector_name(uri);
        let from: u64 = query(uri, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query(uri, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        let matches = {
            let ns = ns.clone();
            let selector = selector.clone();
            move |e: &WatchEvent| {
                ns.as_deref().is_none_or(|n| n == e.namespace)
                    && selector.as_deref().is_none_or(|s| s == e.name)
            }
        };
        let mut rx = self.watch_tx.subscribe();
        let mut close = self.close_watches.subscribe();
        let (backlog, gone) = {
            let inner = self.inner.lock().unwrap();
            if from != 0 && from < inner.compacted_below {
                (Vec::new(), true)
            } else {
                let backlog: Vec<WatchEvent> = inner
                    .history
                    .iter()
                    .filter(|e| e.rv > from && matches(e))
                    .cloned()
                    .collect();
                (backlog, false)
            }
        };
        let server = self.clone();
        let stream = async_stream(move |tx| async move {
            if gone {
                let _ = tx.send(line(json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}}))).await;
                return;
            }
            let mut last = from;
            for e in backlog {
                last = e.rv;
                if tx
                    .send(line(json!({"type": e.kind, "object": e.object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            loop {
                let sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    event = rx.recv() => match event {
                        Ok(e) if e.rv > last && matches(&e) => {
                            last = e.rv;
                            if server.inner.lock().unwrap().mode == Mode::Hang {
                                continue;
                            }
                            if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = close.recv() => {
                        if server.inner.lock().unwrap().mode == Mode::Hang {
                            // A hung server keeps the stream open and silent.
                            std::future::pending::<()>().await;
                        }
                        return;
                    }
                    () = sleep => return,
                }
            }
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(stream)
            .unwrap()
    }
}

/// A streaming body fed by a task through a channel.
fn async_stream<F, Fut>(producer: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(producer(tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Body::from_stream(stream)
}

fn line(value: Value) -> Bytes {
    let mut text = serde_json::to_vec(&value).unwrap();
    text.push(b'\n');
    Bytes::from(text)
}

fn stamp(object: &mut Value, ns: &str, rv: u64, new: bool) {
    if object.get("apiVersion").and_then(Value::as_str).is_none() {
        object["apiVersion"] = json!("coordination.k8s.io/v1");
    }
    if object.get("kind").and_then(Value::as_str).is_none() {
        object["kind"] = json!("Lease");
    }
    let meta = &mut object["metadata"];
    if !meta.is_object() {
        *meta = json!({});
    }
    meta["namespace"] = json!(ns);
    meta["resourceVersion"] = json!(rv.to_string());
    if new {
        meta["uid"] = json!(format!("00000000-0000-0000-0000-{rv:012}"));
        meta["creationTimestamp"] = json!(second_now());
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn query(uri: &Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn field_selector_name(uri: &Uri) -> Option<String> {
    let selector = query(uri, "fieldSelector")?;
    selector
        .split(',')
        .find_map(|s| s.strip_prefix("metadata.name=").map(str::to_string))
}

fn json_response(code: u16, value: Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap()
}

/// A Kubernetes `Status` error body.
pub fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

fn not_found(name: &str) -> Response<Body> {
    status_response(
        404,
        "NotFound",
        &format!("leases.coordination.k8s.io \"{name}\" not found"),
    )
}

fn conflict(name: &str) -> Response<Body> {
    status_response(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
        ),
    )
}

/// CLOCK_MONOTONIC in nanoseconds: the clock test workers stamp their journal lines with.
pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Now as a MicroTime string.
pub fn micro_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format_time(now.as_secs(), Some(now.subsec_micros()))
}

fn second_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format_time(now.as_secs(), None)
}

/// Seconds since the epoch as an RFC 3339 UTC time (with microseconds when given).
pub fn format_time(secs: u64, micros: Option<u32>) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    match micros {
        Some(us) => format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z"),
        None => format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
    }
}

enum Route {
    Discovery(Value),
    NotFound,
    Get { ns: String, name: String },
    List { ns: Option<String>, watch: bool },
    Create { ns: String },
    Update { ns: String, name: String },
    Patch { ns: String, name: String },
    Delete { ns: String, name: String },
    CreateEvent { ns: String },
    PatchEvent { name: String },
}

impl Route {
    fn verb(&self) -> &'static str {
        match self {
            Route::Discovery(_) | Route::NotFound => "discovery",
            Route::Get { .. } => "get",
            Route::List { watch: false, .. } => "list",
            Route::List { watch: true, .. } => "watch",
            Route::Create { .. } => "create",
            Route::Update { .. } => "update",
            Route::Patch { .. } => "patch",
            Route::Delete { .. } => "delete",
            Route::CreateEvent { .. } => "create-event",
            Route::PatchEvent { .. } => "patch-event",
        }
    }

    fn parse(method: &Method, uri: &Uri) -> Route {
        let path = uri.path().trim_end_matches('/');
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let watch = matches!(query(uri, "watch").as_deref(), Some("true" | "1"));
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["api"]) => Route::Discovery(
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            ),
            ("GET", ["apis"]) => Route::Discovery(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "coordination.k8s.io", "versions": [{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}], "preferredVersion": {"groupVersion": "coordination.k8s.io/v1", "version": "v1"}}]}),
            ),
            ("GET", ["api", "v1"]) => Route::Discovery(
                json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                    {"name": "events", "singularName": "event", "namespaced": true, "kind": "Event", "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["ev"]}
                ]}),
            ),
            ("GET", ["apis", "coordination.k8s.io", "v1"]) => Route::Discovery(
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "coordination.k8s.io/v1", "resources": [
                    {"name": "leases", "singularName": "lease", "namespaced": true, "kind": "Lease", "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]}
                ]}),
            ),
            ("GET", ["version"]) => Route::Discovery(
                json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-memory", "platform": "linux/amd64"}),
            ),
            ("GET", ["apis", "coordination.k8s.io", "v1", "leases"]) => {
                Route::List { ns: None, watch }
            }
            (
                "GET",
                [
                    "apis",
                    "coordination.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "leases",
                ],
            ) => Route::List {
                ns: Some(ns.to_string()),
                watch,
            },
            (
                "GET",
                [
                    "apis",
                    "coordination.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "leases",
                    name,
                ],
            ) => Route::Get {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            (
                "POST",
                [
                    "apis",
                    "coordination.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "leases",
                ],
            ) => Route::Create { ns: ns.to_string() },
            (
                "PUT",
                [
                    "apis",
                    "coordination.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "leases",
                    name,
                ],
            ) => Route::Update {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            (
                "PATCH",
                [
                    "apis",
                    "coordination.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "leases",
                    name,
                ],
            ) => Route::Patch {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            (
                "DELETE",
                [
                    "apis",
                    "coordination.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "leases",
                    name,
                ],
            ) => Route::Delete {
                ns: ns.to_string(),
                name: name.to_string(),
            },
            ("POST", ["api", "v1", "namespaces", ns, "events"])
            | ("POST", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
                Route::CreateEvent { ns: ns.to_string() }
            }
            ("PATCH", ["api", "v1", "namespaces", _, "events", name])
            | (
                "PATCH",
                [
                    "apis",
                    "events.k8s.io",
                    "v1",
                    "namespaces",
                    _,
                    "events",
                    name,
                ],
            ) => Route::PatchEvent {
                name: name.to_string(),
            },
            _ => Route::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_like_kubernetes() {
        assert_eq!(format_time(0, Some(5)), "1970-01-01T00:00:00.000005Z");
        assert_eq!(format_time(951_782_400, None), "2000-02-29T00:00:00Z");
    }
}
