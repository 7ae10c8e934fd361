//! The Lease API calls, each bounded by a timeout, with errors classified by what the caller must do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::client::DynBody;
use kube::{Client, Config};

use crate::config::Access;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the server keeps one watch open (kube's watcher uses 290 s too): an idle follower
/// makes about one request per this period.
pub const WATCH_SECONDS: u32 = 290;

/// How long a watch may stay silent before its connection is taken for dead: the server ends
/// every watch after [`WATCH_SECONDS`], so silence past that (and a margin) means the connection
/// is half-open.
pub const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS as u64 + 30);

/// The shortest wait for an HTTP/2 PING's answer, and the shortest silence before one is sent.
pub const PING_FLOOR: Duration = Duration::from_secs(1);

/// Verbs lease-exec uses on `coordination.k8s.io` leases (`deploy/rbac.yaml` grants exactly these).
pub const LEASE_VERBS: [&str; 4] = ["get", "create", "update", "watch"];

/// Verbs lease-exec uses on `events.k8s.io` events: the event recorder creates an event, and
/// patches it into a series when the same event repeats.
pub const EVENT_VERBS: [&str; 2] = ["create", "patch"];

/// The RBAC rule lease-exec needs, quoted in authorization errors.
pub const RBAC_RULE: &str =
    "apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, create, update, watch]";

/// What to do about a refusal: 401 is the credentials, 403 the Role.
fn denied_advice(code: u16) -> String {
    if code == 401 {
        "the credentials were not accepted (a token expired or revoked, or the wrong kubeconfig user): renew them".into()
    } else {
        format!("the service account needs a Role with {RBAC_RULE} bound to it (see deploy/)")
    }
}

/// What went wrong with one API call, classified by what the caller must do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: the Lease does not exist.
    #[error("the Lease does not exist")]
    NotFound,
    /// 409 AlreadyExists on create: someone else created it first.
    #[error("the Lease was created by someone else first")]
    AlreadyExists,
    /// 409 Conflict on update: the resourceVersion we wrote against is stale.
    #[error("the Lease changed since it was read (409 Conflict)")]
    Conflict,
    /// 401 or 403: not retried while waiting.
    #[error(
        "{verb} leases.coordination.k8s.io {name:?} in namespace {namespace:?} was refused ({code}): {message}; {}",
        denied_advice(*code)
    )]
    Denied {
        /// HTTP status.
        code: u16,
        /// The verb refused.
        verb: &'static str,
        /// Lease name.
        name: String,
        /// Namespace.
        namespace: String,
        /// The server's message.
        message: String,
    },
    /// 404 on create: the namespace does not exist. Not retried.
    #[error(
        "namespace {0:?} does not exist: create it, or pass -n with the namespace the Lease belongs in"
    )]
    NoNamespace(String),
    /// No answer in time.
    #[error("no answer from the API server within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// 5xx and 429 (the server answered, and failed): worth retrying.
    #[error("{0}")]
    Transient(String),
    /// No answer at all: connection refused or reset, TLS or DNS failures. Worth retrying, and
    /// retrying costs the server nothing.
    #[error("{0}")]
    Unreachable(String),
    /// 429 or 5xx with a Retry-After: the server asked not to be asked again before then.
    #[error("{message} (Retry-After: {}s)", .retry_after.as_secs())]
    Busy {
        /// What the server said.
        message: String,
        /// How long it asked us to wait.
        retry_after: Duration,
    },
    /// The server answered with something we cannot use (another 4xx, an unparsable body).
    #[error("{0}")]
    Rejected(String),
}

/// One Lease, addressed by name, with every call bounded by a timeout.
#[derive(Clone)]
pub struct LeaseApi {
    api: Api<Lease>,
    client: Client,
    /// The generation of the client's connections (see [`Generation`]).
    connections: Generation,
    name: String,
    namespace: String,
    /// Warnings about the last Lease read, so each is logged once rather than on every read.
    warned: Arc<Mutex<Vec<String>>>,
}

impl LeaseApi {
    /// Addresses `name` in `namespace` through `client`, whose connections `connections` counts.
    pub fn new(
        (client, connections): (Client, Generation),
        namespace: &str,
        name: &str,
    ) -> LeaseApi {
        LeaseApi {
            api: Api::namespaced(client.clone(), namespace),
            client,
            connections,
            name: name.to_string(),
            namespace: namespace.to_string(),
            warned: Arc::default(),
        }
    }

    /// No new request goes on a connection opened so far, and an HTTP/2 connection is closed with
    /// every stream on it (see [`Generation`]): for a renewal with no answer in time.
    pub fn abandon_connections(&self) {
        self.connections.abandon_all();
    }

    /// The Lease name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// GET; `Ok(None)` when it does not exist.
    ///
    /// Read leniently: a field that another writer left unparsable (`renewTime: "yesterday"`) is
    /// dropped with a warning naming it, so one bad writer cannot wedge every candidate; the
    /// decision is then made on what is left (see [`super::decide`]).
    pub async fn get(&self, timeout: Duration) -> Result<Option<Lease>, ApiError> {
        let url = <Lease as kube::Resource>::url_path(&(), Some(&self.namespace));
        let request = || {
            kube::core::Request::new(url.clone()).get(&self.name, &kube::api::GetParams::default())
        };
        request().map_err(|e| ApiError::Rejected(format!("cannot build the request: {e}")))?;
        let text = match self
            .call("get", timeout, || async {
                let request = request().map_err(kube::Error::BuildRequest)?;
                self.client.request_text(request).await
            })
            .await
        {
            Ok(text) => text,
            Err(ApiError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ApiError::Rejected(format!("the Lease is not JSON: {e}")))?;
        let (lease, warnings) = parse_lenient(value)?;
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if *warned != warnings {
            for warning in &warnings {
                tracing::warn!("the lease is malformed: {warning}");
            }
            *warned = warnings;
        }
        Ok(Some(lease))
    }

    /// POST.
    pub async fn create(&self, lease: &Lease, timeout: Duration) -> Result<Lease, ApiError> {
        let params = PostParams::default();
        self.call("create", timeout, || self.api.create(&params, lease))
            .await
    }

    /// PUT, conditioned on the resourceVersion inside `lease`.
    pub async fn replace(&self, lease: &Lease, timeout: Duration) -> Result<Lease, ApiError> {
        debug_assert!(lease.metadata.resource_version.is_some());
        let params = PostParams::default();
        self.call("update", timeout, || {
            self.api.replace(&self.name, &params, lease)
        })
        .await
    }

    /// Starts a watch of this one Lease (field selector on its name) from `resource_version`.
    /// Establishing the stream is bounded by `timeout`; the server ends it after
    /// [`WATCH_SECONDS`].
    pub async fn watch(
        &self,
        resource_version: &str,
        timeout: Duration,
    ) -> Result<
        futures_util::stream::BoxStream<'static, Result<WatchEvent<Lease>, ApiError>>,
        ApiError,
    > {
        use futures_util::StreamExt;
        let params = WatchParams::default()
            .fields(&format!("metadata.name={}", self.name))
            .timeout(WATCH_SECONDS);
        let stream = self
            .call("watch", timeout, || {
                self.api.watch(&params, resource_version)
            })
            .await?;
        let this = self.clone();
        Ok(stream
            .map(move |item| item.map_err(|e| this.classify("watch", e)))
            .boxed())
    }

    /// One request (`request` makes it), bounded by `timeout`. A request refused by an abandoned
    /// connection (see [`Generation`]) was never sent: it is sent again at once, on another
    /// connection, as hyper does for a pooled connection found closed.
    async fn call<T, F>(
        &self,
        verb: &'static str,
        timeout: Duration,
        request: impl Fn() -> F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = kube::Result<T>>,
    {
        let attempts = async {
            loop {
                match request().await {
                    Err(e) if never_sent(&e) => {
                        tracing::debug!(
                            "a connection abandoned earlier refused the request; sending it on another"
                        );
                    }
                    result => return result,
                }
            }
        };
        match tokio::time::timeout(timeout, attempts).await {
            Err(_) => {
                // No answer in time: the connection may be half-open (a load balancer or
                // conntrack dropped it, a proxy froze), and so may every other connection opened
                // before. No HTTP/1.1 one is used again: the retry dials afresh. An HTTP/2
                // connection also carries the renewals, which must not fail because a watch or
                // a read was slow to answer: it is left to its PINGs (a dead one is closed within
                // two renew timeouts of its last frame) and to the renewer, which closes it when a
                // renewal has no answer in time (`LeaseApi::abandon_connections`).
                self.connections.abandon();
                Err(ApiError::Timeout(timeout))
            }
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.classify(verb, e)),
        }
    }

    /// Classifies a failed call by what the caller must do about it.
    pub fn classify(&self, verb: &'static str, error: kube::Error) -> ApiError {
        match error {
            kube::Error::Api(status) => match status.code {
                404 => ApiError::NotFound,
                409 if status.is_already_exists() => ApiError::AlreadyExists,
                409 => ApiError::Conflict,
                401 | 403 => ApiError::Denied {
                    code: status.code,
                    verb,
                    name: self.name.clone(),
                    namespace: self.namespace.clone(),
                    message: status.message,
                },
                429 | 500..=599 => {
                    let message =
                        format!("API server answered {}: {}", status.code, status.message);
                    match status.details.as_ref().map(|d| d.retry_after_seconds) {
                        Some(secs @ 1..) => ApiError::Busy {
                            message,
                            retry_after: Duration::from_secs(secs.into()),
                        },
                        _ => ApiError::Transient(message),
                    }
                }
                code => {
                    ApiError::Rejected(format!("API server answered {code}: {}", status.message))
                }
            },
            kube::Error::SerdeError(e) => {
                ApiError::Rejected(format!("the Lease could not be parsed: {e}"))
            }
            other => {
                ApiError::Unreachable(format!("cannot reach the API server: {}", chain(&other)))
            }
        }
    }
}

impl ApiError {
    /// Whether the server answered (and failed), as opposed to no answer at all: a struggling
    /// server is asked less often than one that is simply not there.
    pub fn answered(&self) -> bool {
        !matches!(self, ApiError::Unreachable(_))
    }

    /// How long the server asked us to wait before asking again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Keeps a `Retry-After` that kube would drop. kube turns an error answer into a `Status` from its
/// body alone; kube-apiserver's own errors carry the delay there (`details.retryAfterSeconds`, the
/// header is written from it), but its priority-and-fairness and max-in-flight filters answer 429
/// in plain text with only the header. Such an answer is given the `Status` kube-apiserver would
/// have written for it, so [`LeaseApi::classify`] sees the delay either way, as client-go's
/// `SuggestsClientDelay` does. Only the delta-seconds form is read (what kube-apiserver sends).
fn carry_retry_after(
    response: hyper::http::Response<Box<DynBody>>,
) -> hyper::http::Response<Box<DynBody>> {
    let code = response.status();
    if !(code == hyper::http::StatusCode::TOO_MANY_REQUESTS || code.is_server_error()) {
        return response;
    }
    let headers = response.headers();
    let Some(secs) = headers
        .get(hyper::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|secs| *secs > 0)
    else {
        return response;
    };
    let json = headers
        .get(hyper::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code.as_u16(),
        "reason": if code == hyper::http::StatusCode::TOO_MANY_REQUESTS { "TooManyRequests" } else { "ServiceUnavailable" },
        "message": code.canonical_reason().unwrap_or("server error"),
        "details": {"retryAfterSeconds": secs},
    });
    parts.headers.insert(
        hyper::http::header::CONTENT_TYPE,
        hyper::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(hyper::http::header::CONTENT_LENGTH);
    let body = http_body_util::Full::new(bytes::Bytes::from(status.to_string()));
    let body: Box<DynBody> = Box::new(http_body_util::BodyExt::map_err(
        body,
        |never: std::convert::Infallible| match never {},
    ));
    hyper::http::Response::from_parts(parts, body)
}

type FieldCheck = fn(&serde_json::Value) -> bool;

/// Parses a Lease, dropping spec fields that do not parse, and naming each in a warning.
pub fn parse_lenient(mut value: serde_json::Value) -> Result<(Lease, Vec<String>), ApiError> {
    let mut warnings = Vec::new();
    match value.get_mut("spec") {
        None | Some(serde_json::Value::Null) => {
            warnings.push("spec is missing; treating the lease as released".to_string());
        }
        Some(serde_json::Value::Object(spec)) => {
            let checks: [(&str, FieldCheck); 6] = [
                ("holderIdentity", |v| v.is_string()),
                ("leaseDurationSeconds", |v| {
                    v.as_i64().is_some_and(|n| i32::try_from(n).is_ok())
                }),
                ("leaseTransitions", |v| {
                    v.as_i64().is_some_and(|n| i32::try_from(n).is_ok())
                }),
                ("acquireTime", is_micro_time),
                ("renewTime", is_micro_time),
                ("preferredHolder", |v| v.is_string()),
            ];
            for (field, valid) in checks {
                if let Some(v) = spec.get(field)
                    && !v.is_null()
                    && !valid(v)
                {
                    warnings.push(format!("spec.{field} is unparsable ({v}); ignoring it"));
                    spec.remove(field);
                }
            }
        }
        Some(other) => {
            warnings.push(format!(
                "spec is not an object ({other}); treating the lease as released"
            ));
            value["spec"] = serde_json::Value::Null;
        }
    }
    let lease = serde_json::from_value::<Lease>(value)
        .map_err(|e| ApiError::Rejected(format!("the Lease could not be parsed: {e}")))?;
    Ok((lease, warnings))
}

fn is_micro_time(value: &serde_json::Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.parse::<k8s_openapi::jiff::Timestamp>().is_ok())
}

/// An error and its sources on one line (only the first line of each: some, like YAML errors,
/// draw a picture of the input below).
pub fn chain(error: &dyn std::error::Error) -> String {
    let first_line = |e: &dyn std::error::Error| {
        e.to_string()
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let mut text = first_line(error);
    let mut source = error.source();
    while let Some(e) = source {
        let s = first_line(e);
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// The kubeconfig could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AccessError(pub String);

/// Connects to the Lease `config` names: builds the client, and resolves the namespace (the one
/// decided by the configuration, else the kubeconfig context's, else `default`).
pub async fn connect(config: &crate::config::Config) -> Result<(Client, LeaseApi), AccessError> {
    let (client, kube_namespace, connections) =
        self::client(&config.access, &config.timing).await?;
    let namespace = config.namespace.clone().unwrap_or(kube_namespace);
    let api = LeaseApi::new((client.clone(), connections), &namespace, &config.lease);
    Ok((client, api))
}

/// Connects to every slot's Lease (one for a single holder, see [`crate::config::Config::slot_names`]),
/// in slot order, sharing one client.
pub async fn connect_slots(
    config: &crate::config::Config,
) -> Result<(Client, Vec<LeaseApi>), AccessError> {
    let (client, api) = connect(config).await?;
    let apis = config
        .slot_names()
        .iter()
        .map(|name| {
            LeaseApi::new(
                (client.clone(), api.connections.clone()),
                api.namespace(),
                name,
            )
        })
        .collect();
    Ok((client, apis))
}

/// Builds the client from `--kubeconfig`/`--context`, `KUBECONFIG`, `~/.kube/config` or the
/// in-cluster config. Returns the client and the namespace the kubeconfig context names.
///
/// kube's own retry of 429/503/504 (`Config::default_retry`) is turned off: it backs off without
/// regard to our renew deadline. lease-exec retries on its own schedule, inside the deadline, and
/// bounds every call with [`crate::timing::Timing::request_timeout`].
pub async fn client(
    access: &Access,
    timing: &crate::timing::Timing,
) -> Result<(Client, String, Generation), AccessError> {
    // kube parses HTTPS_PROXY while reading the kubeconfig, and blames the kubeconfig when it
    // cannot: name the variable instead.
    if let Some((name, value)) = ["HTTPS_PROXY", "https_proxy"].into_iter().find_map(|name| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v))
    }) && value.parse::<hyper::http::Uri>().is_err()
    {
        let source = super::proxy::Source::Env(name);
        return Err(AccessError(
            super::proxy::usable(source, &value)
                .err()
                .unwrap_or_else(|| format!("{name} is not a proxy URL: use http://HOST:PORT")),
        ));
    }
    let options = kube::config::KubeConfigOptions {
        context: access.context.clone(),
        ..Default::default()
    };
    let mut config = if let Some(path) = &access.kubeconfig {
        if !path.exists() {
            return Err(AccessError(format!(
                "kubeconfig {} does not exist: pass an existing file with --kubeconfig",
                path.display()
            )));
        }
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
            AccessError(format!(
                "kubeconfig {} is unusable: {}",
                path.display(),
                chain(&e)
            ))
        })?;
        Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| AccessError(format!("kubeconfig {}: {}", path.display(), chain(&e))))?
    } else if access.context.is_some() {
        Config::from_kubeconfig(&options)
            .await
            .map_err(|e| AccessError(format!("kubeconfig: {}", chain(&e))))?
    } else {
        if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
            let all_missing = std::env::split_paths(&path).all(|p| !p.exists());
            if all_missing {
                return Err(AccessError(format!(
                    "KUBECONFIG names {:?}, which does not exist: point it at a kubeconfig file",
                    path
                )));
            }
        }
        Config::infer().await.map_err(|e| {
            AccessError(format!(
                "no usable cluster configuration ({}): set KUBECONFIG or --kubeconfig, or run in a pod with a service account",
                chain(&e)
            ))
        })?
    };
    config.default_retry = false;
    config.connect_timeout = Some(timing.request_timeout());
    let namespace = config.default_namespace.clone();
    let connections = Generation::default();
    let environment = |name: &str| std::env::var(name).ok();
    let client = stack(
        config,
        connections.clone(),
        // Not below a second: an API server busy for a moment (a GC pause) must not cost every
        // stream of the process.
        timing.renew_timeout().max(PING_FLOOR),
        &environment,
    )
    .map_err(|e| AccessError(format!("cannot build the API client: {e}")))?;
    Ok((client, namespace, connections))
}

/// A bearer token read from its file at every request; the last one read is kept for when the
/// file cannot be read (being replaced), so a request never goes out without one.
#[derive(Clone)]
struct TokenFile {
    path: std::path::PathBuf,
    last: std::sync::Arc<std::sync::Mutex<Option<hyper::http::HeaderValue>>>,
}

impl TokenFile {
    fn new(path: impl Into<std::path::PathBuf>) -> TokenFile {
        TokenFile {
            path: path.into(),
            last: Default::default(),
        }
    }

    /// The header from the file as it is now, else the last one read.
    fn header(&self) -> Option<hyper::http::HeaderValue> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = std::fs::read_to_string(&self.path)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .and_then(|t| hyper::http::HeaderValue::from_str(&format!("Bearer {t}")).ok());
        if let Some(mut value) = fresh {
            value.set_sensitive(true);
            *last = Some(value);
        }
        last.clone()
    }

    fn authorize<B>(&self, mut request: hyper::http::Request<B>) -> hyper::http::Request<B> {
        if let Some(value) = self.header() {
            request
                .headers_mut()
                .insert(hyper::http::header::AUTHORIZATION, value);
        }
        request
    }
}

/// Counts the client's connections in generations.
///
/// [`Generation::abandon`] ends the current HTTP/1.1 generation: a connection of an earlier one
/// fails its next write, so no new request is ever sent on it (a pooled connection that a load
/// balancer dropped would hang that request too); a response already streaming on it (a watch)
/// goes on, and is re-opened only when it ends or falls silent.
///
/// An HTTP/2 connection carries every request of the process at once, so it cannot be kept for
/// the streams already on it and refused to new ones. [`Generation::abandon_all`] also ends the
/// current HTTP/2 generation: such a connection is closed at once (woken, its next read and write
/// fail), every stream on it fails and is retried by its caller, and the next request dials
/// afresh. Connections opened afterwards are unaffected.
#[derive(Debug, Clone, Default)]
pub struct Generation(Arc<Generations>);

#[derive(Debug, Default)]
struct Generations {
    http1: std::sync::atomic::AtomicU64,
    h2: std::sync::atomic::AtomicU64,
    /// The HTTP/2 connections to wake when they are abandoned.
    wakers: Mutex<Vec<std::sync::Weak<futures_util::task::AtomicWaker>>>,
}

impl Generation {
    /// No new request goes on an HTTP/1.1 connection opened so far.
    pub fn abandon(&self) {
        self.0
            .http1
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every connection opened so far is abandoned, HTTP/2 ones closed.
    pub fn abandon_all(&self) {
        self.abandon();
        self.0.h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.0.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in wakers.iter().filter_map(std::sync::Weak::upgrade) {
            waker.wake();
        }
    }

    /// The current generation of connections speaking HTTP/2 (`h2`) or HTTP/1.1.
    fn current(&self, h2: bool) -> u64 {
        let counter = if h2 { &self.0.h2 } else { &self.0.http1 };
        counter.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `waker` is woken when the current HTTP/2 generation is abandoned.
    fn wake_on_abandon(&self, waker: &Arc<futures_util::task::AtomicWaker>) {
        let mut wakers = self.0.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(waker));
    }
}

/// A connector whose connections belong to the [`Generation`] current when they were opened. It
/// wraps the TLS connector, so it knows which protocol each connection speaks (ALPN).
#[derive(Clone)]
struct Generational<C> {
    inner: C,
    generation: Generation,
}

impl<C> tower::Service<hyper::http::Uri> for Generational<C>
where
    C: tower::Service<hyper::http::Uri>,
    C::Future: Send + 'static,
    C::Response: hyper_util::client::legacy::connect::Connection,
{
    type Response = Counted<C::Response>;
    type Error = C::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Counted<C::Response>, C::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: hyper::http::Uri) -> Self::Future {
        let generation = self.generation.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            use hyper_util::client::legacy::connect::Connection;
            let h2 = io.connected().is_negotiated_h2();
            // Born once connected (TLS included): a connection dialled while an abandonment
            // happened is a fresh one, and sent nothing before it.
            let born = generation.current(h2);
            let woken = h2.then(|| {
                let waker = Arc::new(futures_util::task::AtomicWaker::new());
                generation.wake_on_abandon(&waker);
                waker
            });
            tracing::debug!(
                protocol = if h2 { "h2" } else { "http/1.1" },
                "connection opened"
            );
            Ok(Counted {
                io,
                born,
                generation,
                woken,
            })
        })
    }
}

/// A connection of the generation `born`.
struct Counted<T> {
    io: T,
    born: u64,
    generation: Generation,
    /// Set for an HTTP/2 connection, which is closed as soon as it is abandoned.
    woken: Option<Arc<futures_util::task::AtomicWaker>>,
}

/// The error a connection abandoned earlier gives a new request (which it never sent).
const ABANDONED: &str = "connection abandoned after a request on this client got no answer in time";

/// The error every stream of an abandoned HTTP/2 connection ends with. The requests on it may have
/// been sent: they are not sent again blindly, their callers decide.
const ABANDONED_H2: &str =
    "HTTP/2 connection closed after a request on this client got no answer in time";

/// The cause inside the I/O error of an abandoned connection; `never_sent` for an HTTP/1.1
/// connection refusing a new request.
#[derive(Debug)]
struct Abandoned {
    never_sent: bool,
}

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.never_sent {
            ABANDONED
        } else {
            ABANDONED_H2
        })
    }
}

impl std::error::Error for Abandoned {}

/// Whether `error` is an HTTP/1.1 connection abandoned earlier refusing the request, which it
/// therefore never sent: found by type in the error's chain, never by its text. (Over HTTP/2
/// the cause does not survive as a type, h2 shares one error among the streams, so an HTTP/2
/// abandonment is never taken for "never sent".)
fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<Abandoned>().is_some_and(|a| a.never_sent)
            || e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Abandoned>())
                .is_some_and(|a| a.never_sent)
    })
}

impl<T> Counted<T> {
    fn abandoned(&self) -> Option<std::io::Error> {
        let h2 = self.woken.is_some();
        (self.generation.current(h2) != self.born).then(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                Abandoned { never_sent: !h2 },
            )
        })
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // HTTP/2 only: an HTTP/1.1 response already streaming goes on (see `Generation`). The
        // waker is registered before the check, so an abandonment in between still wakes it.
        if let Some(waker) = &self.woken {
            waker.register(cx.waker());
            if let Some(e) = self.abandoned() {
                return std::task::Poll::Ready(Err(e));
            }
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.abandoned() {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    // Not checked here: hyper flushes on every turn of a connection's loop, even with nothing to
    // write, so a check would break a response already streaming (a watch).
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for Counted<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}

/// The TCP connector under TLS: kube's (`enforce_http(false)`, so that https URLs pass to the TLS
/// layer) with `TCP_NODELAY` on, as Go's net package sets it on every connection. Without it a
/// request written right after the TLS handshake on a new connection waits for the API server's
/// delayed ACK of the handshake's last flight, about 40 ms (Nagle's algorithm).
fn tcp_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http
}

/// kube's TLS connector (`ConfigExt::rustls_https_connector_with_connector`: the kubeconfig's CA,
/// client certificate, `tls-server-name`, in-cluster CA reloading), offering HTTP/2 by ALPN with
/// HTTP/1.1 as the fallback (kube offers HTTP/1.1 only). Over HTTP/2 one connection carries the
/// process's watch, renewals, claims, release and events at once, so a claim after a release
/// goes out on the connection the watch already holds, with no new TLS handshake.
fn tls_connector<C>(config: &Config, inner: C) -> Result<hyper_rustls::HttpsConnector<C>, String> {
    use kube::client::ConfigExt;
    let tls = config.rustls_client_config().map_err(|e| chain(&e))?;
    let mut builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| format!("tls-server-name {name:?} is not a server name: {e}"))?;
        builder =
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    Ok(builder.enable_all_versions().wrap_connector(inner))
}

/// kube's default client stack (`ClientBuilder::try_from(Config)` with the features lease-exec
/// builds kube with: TLS by rustls, no compression), built here to reach the connectors kube
/// builds privately: TCP ([`tcp_connector`]) and TLS ([`tls_connector`]). The same layers from
/// kube's [`ConfigExt`]: the base URI, authentication (bearer tokens re-read as they rotate, exec
/// plugins), impersonation headers; kube's connect and write timeouts. [`carry_retry_after`] is
/// outermost, as before. Not kept: kube's per-request debug spans (its `kube_client::client` logs
/// are off by default anyway) and `Client::valid_until` (the expiry of an exec plugin's client
/// certificate, which nothing here reads).
///
/// HTTP/2 brings its own trap: a dead connection (a load balancer dropped it, a NAT forgot it)
/// carries every request, and renewals can fail on it for minutes (client-go kubernetes#87615).
/// So the client PINGs a connection that has streams open (the watch, a request) and has been
/// silent for `ping` (half the time between a renewal that is due and the renew deadline, at
/// least [`PING_FLOOR`]), and
/// closes it when no answer comes within `ping` again: a half-open connection is found within
/// two `ping`s of its last frame (5 s at the defaults), and a request that times out closes it
/// at once (see [`Generation`]). An idle connection (no stream open) is not pinged.
///
/// This mirrors `make_generic_builder` of kube-client 5.0.0: re-check it on every kube upgrade.
fn stack(
    mut config: Config,
    connections: Generation,
    ping: Duration,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Client, String> {
    // A token file (a kubeconfig's `tokenFile`; in a Pod, the projected service-account token the
    // kubelet rotates) is read at every request rather than kube's copy, refreshed only once a
    // minute: a token revoked right after its rotation would otherwise be sent until the renew
    // deadline passes. The file is small and lease-exec sends a few requests a minute.
    //
    // Only where kube would use the file: an auth provider, basic auth and an inline token come
    // before it (kube's `Auth::try_from`), an exec plugin after it (so it is dropped with the
    // file taken over, as kube would never run it). Read once now, so that a missing file fails
    // here, naming it, as kube's own `TokenFile::new` does.
    let auth = &config.auth_info;
    let before_file = auth.auth_provider.is_some()
        || (auth.username.is_some() && auth.password.is_some())
        || auth.token.is_some();
    let token_file = match config.auth_info.token_file.take() {
        Some(path) if !before_file => {
            std::fs::read_to_string(&path).map_err(|e| {
                chain(&kube::Error::Auth(kube::client::AuthError::ReadTokenFile(
                    e,
                    path.clone().into(),
                )))
            })?;
            config.auth_info.exec = None;
            Some(TokenFile::new(path))
        }
        path => {
            config.auth_info.token_file = path;
            None
        }
    };
    let proxy = super::proxy::route(&config.cluster_url, config.proxy_url.as_ref(), env)?;
    let layers = Layers {
        token_file,
        connections,
        ping,
    };
    let Some(proxy) = proxy else {
        let tls = tls_connector(&config, tcp_connector())?;
        return layers.over(config, tls);
    };
    tracing::debug!(proxy = %proxy.intercept.uri(), from = %proxy.source, "connecting through a proxy");
    let uri = proxy.intercept.uri().clone();
    let tunnel = |inner| tunnel(&proxy.intercept, inner);
    let tunnel_tls = |inner| self::tunnel(&proxy.intercept, inner);
    match proxy.scheme() {
        "http" => {
            let tls = tls_connector(&config, tunnel(tcp_connector()))?;
            layers.over(config, tls)
        }
        "https" => {
            // TLS to the proxy with the cluster's TLS settings, as kube and client-go do;
            // HTTP/1.1 only there (the CONNECT), whatever the server speaks through it.
            use kube::client::ConfigExt;
            let to_proxy = config
                .rustls_https_connector_with_connector(tcp_connector())
                .map_err(|e| chain(&e))?;
            let tls = tls_connector(&config, tunnel_tls(to_proxy))?;
            layers.over(config, tls)
        }
        _ => {
            // socks5 (and socks5h): the server's name goes to the proxy, which resolves it.
            let mut socks =
                hyper_util::client::legacy::connect::proxy::SocksV5::new(uri, tcp_connector())
                    .local_dns(false);
            if let Some((user, password)) = proxy.intercept.raw_auth() {
                socks = socks.with_auth(user.to_string(), password.to_string());
            }
            let tls = tls_connector(&config, socks)?;
            layers.over(config, tls)
        }
    }
}

/// A `CONNECT` tunnel through the http(s) proxy `intercept` names, with its credentials.
fn tunnel<C>(
    intercept: &hyper_util::client::proxy::matcher::Intercept,
    inner: C,
) -> hyper_util::client::legacy::connect::proxy::Tunnel<C> {
    let tunnel =
        hyper_util::client::legacy::connect::proxy::Tunnel::new(intercept.uri().clone(), inner);
    match intercept.basic_auth() {
        Some(auth) => tunnel.with_auth(auth.clone()),
        None => tunnel,
    }
}

/// What [`stack`] puts around the connector, whichever way it reaches the API server.
struct Layers {
    token_file: Option<TokenFile>,
    connections: Generation,
    ping: Duration,
}

impl Layers {
    /// The client over `tls`, the TLS connector on top of the way to the server (direct, a
    /// tunnel through a proxy, SOCKS5).
    fn over<C>(self, config: Config, tls: hyper_rustls::HttpsConnector<C>) -> Result<Client, String>
    where
        C: tower::Service<hyper::http::Uri> + Clone + Send + Sync + 'static,
        C::Response: hyper::rt::Read
            + hyper::rt::Write
            + hyper_util::client::legacy::connect::Connection
            + Send
            + Unpin
            + 'static,
        C::Future: Send + Unpin + 'static,
        C::Error: Into<BoxError>,
    {
        let mut connector = hyper_timeout::TimeoutConnector::new(Generational {
            inner: tls,
            generation: self.connections,
        });
        connector.set_connect_timeout(config.connect_timeout);
        connector.set_read_timeout(config.read_timeout);
        connector.set_write_timeout(config.write_timeout);
        connector.set_reset_reader_on_write(config.reset_reader_on_write);
        let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .http2_keep_alive_interval(self.ping)
                .http2_keep_alive_timeout(self.ping)
                .http2_keep_alive_while_idle(false)
                .build(connector);
        use kube::client::ConfigExt;
        let token_file = self.token_file;
        let service = tower::ServiceBuilder::new()
            .map_response(|response: hyper::http::Response<hyper::body::Incoming>| {
                carry_retry_after(response.map(|body| {
                    Box::new(http_body_util::BodyExt::map_err(body, BoxError::from)) as Box<DynBody>
                }))
            })
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer().map_err(|e| chain(&e))?)
            .option_layer(
                token_file
                    .map(|file| tower::util::MapRequestLayer::new(move |r| file.authorize(r))),
            )
            .layer(config.extra_headers_layer().map_err(|e| chain(&e))?)
            .map_err(BoxError::from)
            .service(http);
        Ok(Client::new(service, config.default_namespace))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_token_file_is_read_at_every_request_and_the_last_token_kept_while_it_is_missing() {
        let dir = std::env::temp_dir().join(format!("lease-exec-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let file = TokenFile::new(&path);
        let header = |file: &TokenFile| {
            let r = file.authorize(hyper::http::Request::new(()));
            r.headers()
                .get(hyper::http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(header(&file), None, "no file yet, nothing read before");
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(header(&file).as_deref(), Some("Bearer first"));
        std::fs::write(&path, "second").unwrap();
        assert_eq!(
            header(&file).as_deref(),
            Some("Bearer second"),
            "read again at once"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            header(&file).as_deref(),
            Some("Bearer second"),
            "the last one kept"
        );
        let r = file.authorize(hyper::http::Request::new(()));
        assert!(r.headers()[hyper::http::header::AUTHORIZATION].is_sensitive());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;
    use serde_json::json;

    /// The `Authorization` header one request of a client built from `config` carries.
    async fn authorization_sent(config: Config) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 8192];
            let n = socket.read(&mut request).await.unwrap();
            let body = r#"{"major":"1","minor":"37","gitVersion":"v1.37.2","gitCommit":"","gitTreeState":"","buildDate":"","goVersion":"","compiler":"","platform":""}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&request[..n])
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("authorization:")
                        .then(|| l["authorization:".len()..].trim().to_string())
                })
        });
        let mut config = config;
        config.cluster_url = url.parse().unwrap();
        let client = stack(
            config,
            Generation::default(),
            Duration::from_secs(5),
            &|_| None,
        )
        .unwrap();
        client.apiserver_version().await.unwrap();
        server.await.unwrap()
    }

    /// The token file is read by lease-exec only where kube would use it: basic auth and an inline
    /// token come first; alone, it is sent; missing, the client is not built and the error names it.
    #[tokio::test]
    async fn a_token_file_takes_the_place_kube_gives_it() {
        let dir = std::env::temp_dir().join(format!("lease-exec-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let base = || {
            let mut c = Config::new("http://127.0.0.1:1".parse().unwrap());
            c.auth_info.token_file = Some(path.to_string_lossy().into_owned());
            c
        };
        assert_eq!(
            authorization_sent(base()).await.as_deref(),
            Some("Bearer from-file")
        );
        let mut basic = base();
        basic.auth_info.username = Some("u".into());
        basic.auth_info.password = Some("p".to_string().into());
        assert_eq!(
            authorization_sent(basic).await.as_deref(),
            Some("Basic dTpw"),
            "basic auth comes before the file"
        );
        let mut inline = base();
        inline.auth_info.token = Some("inline".to_string().into());
        assert_eq!(
            authorization_sent(inline).await.as_deref(),
            Some("Bearer inline"),
            "an inline token comes before the file"
        );
        let mut missing = base();
        missing.auth_info.token_file = Some(dir.join("absent").to_string_lossy().into_owned());
        let e = stack(
            missing,
            Generation::default(),
            Duration::from_secs(5),
            &|_| None,
        )
        .err()
        .expect("a missing file fails");
        assert!(e.contains("absent"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The connection the client opens to the API server has `TCP_NODELAY` on. The client is built
    /// as lease-exec builds it, the server is a bare socket, and the option is read back from the
    /// client's own socket in this process (the fd whose local address is the peer the server saw).
    #[tokio::test]
    #[allow(unsafe_code)] // borrows the client's socket fd to read its options back
    async fn the_api_connection_has_tcp_nodelay_on() {
        use nix::sys::socket::{SockaddrStorage, getsockname, getsockopt, sockopt};
        use std::os::fd::AsRawFd;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, peer) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            let body = r#"{"major":"1","minor":"37","gitVersion":"v1.37.2","gitCommit":"","gitTreeState":"","buildDate":"","goVersion":"","compiler":"","platform":""}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.unwrap();
            (socket, peer)
        });
        let client = stack(
            Config::new(url.parse().unwrap()),
            Generation::default(),
            Duration::from_secs(5),
            &|_| None,
        )
        .unwrap();
        client.apiserver_version().await.unwrap();
        let (_socket, peer) = server.await.unwrap();

        let mut found = None;
        for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
            let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // Only getsockname and getsockopt on the borrowed fd (never closed here). An fd that
            // another test closes meanwhile answers EBADF or is not the client's socket, which
            // stays open while `client` lives.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let Ok(local) = getsockname::<SockaddrStorage>(fd.as_raw_fd()) else {
                continue;
            };
            let local = local
                .as_sockaddr_in()
                .map(|a| std::net::SocketAddr::from((a.ip(), a.port())));
            if local == Some(peer) {
                found = getsockopt(&fd, sockopt::TcpNoDelay).ok();
            }
        }
        assert_eq!(
            found,
            Some(true),
            "the client's socket to {peer} (None: not found)"
        );
    }

    /// A request that gets no answer in time leaves no connection of that time in use: with two
    /// pooled connections that both went half-open (a load balancer dropped them: they stay up and
    /// pass nothing), the request after a timed-out one runs on a new connection instead of hanging
    /// on the other dead one. (At most one attempt may fail fast on the abandoned connection.)
    #[tokio::test]
    async fn a_timed_out_request_abandons_the_connections_opened_before_it() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        // Connections up to this number pass nothing once `frozen` is set.
        let frozen = Arc::new(AtomicBool::new(false));
        let frozen_up_to = Arc::new(AtomicUsize::new(usize::MAX));
        {
            let (accepted, frozen, frozen_up_to) =
                (accepted.clone(), frozen.clone(), frozen_up_to.clone());
            tokio::spawn(async move {
                loop {
                    let (mut socket, _) = listener.accept().await.unwrap();
                    let n = accepted.fetch_add(1, Ordering::SeqCst) + 1;
                    let (frozen, frozen_up_to) = (frozen.clone(), frozen_up_to.clone());
                    tokio::spawn(async move {
                        let mut request = Vec::new();
                        let mut buf = [0u8; 4096];
                        loop {
                            let Ok(read) = socket.read(&mut buf).await else {
                                return;
                            };
                            if read == 0 {
                                return;
                            }
                            request.extend_from_slice(&buf[..read]);
                            while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n")
                            {
                                request.drain(..end + 4);
                                if frozen.load(Ordering::SeqCst)
                                    && n <= frozen_up_to.load(Ordering::SeqCst)
                                {
                                    // Half-open: up, silent.
                                    std::future::pending::<()>().await;
                                }
                                let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
                                let answer = format!(
                                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                if socket.write_all(answer.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                }
            });
        }
        let generation = Generation::default();
        let client = stack(
            Config::new(url.parse().unwrap()),
            generation.clone(),
            Duration::from_secs(5),
            &|_| None,
        )
        .unwrap();
        let api = LeaseApi::new((client, generation), "ns", "l");
        let second = Duration::from_secs(1);
        // Two connections in the pool.
        let (a, b) = tokio::join!(api.get(second), api.get(second));
        assert!(matches!((a, b), (Ok(None), Ok(None))));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Both go half-open.
        frozen_up_to.store(2, Ordering::SeqCst);
        frozen.store(true, Ordering::SeqCst);
        let timeout = Duration::from_millis(200);
        assert!(matches!(api.get(timeout).await, Err(ApiError::Timeout(_))));
        // The next request does not hang on the other dead connection.
        let started = tokio::time::Instant::now();
        let mut answered = false;
        for _ in 0..2 {
            match api.get(timeout).await {
                Ok(None) => {
                    answered = true;
                    break;
                }
                Err(ApiError::Timeout(_)) => panic!("a request hung on an abandoned connection"),
                _ => {}
            }
        }
        assert!(answered, "no answer on a new connection");
        assert!(started.elapsed() < timeout * 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "one new connection");
    }

    /// Reads from a [`Counted`] connection over an in-memory pipe.
    async fn read_counted(
        counted: &mut Counted<hyper_util::rt::TokioIo<tokio::io::DuplexStream>>,
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = [0u8; 16];
        let mut read = hyper::rt::ReadBuf::new(&mut buf);
        std::future::poll_fn(|cx| {
            hyper::rt::Read::poll_read(std::pin::Pin::new(&mut *counted), cx, read.unfilled())
        })
        .await?;
        Ok(read.filled().to_vec())
    }

    /// An HTTP/2 connection is closed the moment it is abandoned: a read waiting on it (the
    /// connection's task, with the watch and every request's stream on it) is woken and fails, not
    /// left hanging on a peer that passes nothing. An HTTP/1.1 connection keeps reading (a watch
    /// already streaming goes on) and only refuses the next write.
    #[tokio::test]
    async fn an_abandoned_h2_connection_fails_at_once_and_http1_keeps_reading() {
        use tokio::io::AsyncWriteExt;
        let generation = Generation::default();
        let counted = |h2: bool| {
            let (ours, theirs) = tokio::io::duplex(64);
            let woken = h2.then(|| {
                let waker = Arc::new(futures_util::task::AtomicWaker::new());
                generation.wake_on_abandon(&waker);
                waker
            });
            let counted = Counted {
                io: hyper_util::rt::TokioIo::new(ours),
                born: generation.current(h2),
                generation: generation.clone(),
                woken,
            };
            (counted, theirs)
        };
        let (mut h2, _h2_peer) = counted(true);
        let (mut http1, mut http1_peer) = counted(false);
        let waiting = tokio::spawn(async move {
            let result = read_counted(&mut h2).await;
            (result, h2)
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the peer sent nothing");
        generation.abandon();
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "a timed-out read or watch leaves the HTTP/2 connection to its PINGs"
        );
        generation.abandon_all();
        let (result, mut h2) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting read is woken")
            .unwrap();
        let e = result.expect_err("an abandoned HTTP/2 connection fails its read");
        assert!(e.to_string().contains(ABANDONED_H2), "{e}");
        assert!(!never_sent(&e), "a stream on it may have been sent");
        let written = std::future::poll_fn(|cx| {
            hyper::rt::Write::poll_write(std::pin::Pin::new(&mut h2), cx, b"x")
        })
        .await;
        assert!(written.is_err(), "and its writes");

        http1_peer.write_all(b"streaming").await.unwrap();
        assert_eq!(read_counted(&mut http1).await.unwrap(), b"streaming");
        let written = std::future::poll_fn(|cx| {
            hyper::rt::Write::poll_write(std::pin::Pin::new(&mut http1), cx, b"x")
        })
        .await;
        let refused = written.expect_err("an abandoned HTTP/1.1 connection refuses a new request");
        assert!(never_sent(&refused), "{refused}");
    }

    #[test]
    fn the_quoted_rule_lists_the_lease_verbs() {
        assert!(RBAC_RULE.ends_with(&format!("verbs: [{}]", LEASE_VERBS.join(", "))));
    }

    #[test]
    fn unparsable_fields_are_dropped_and_named() {
        let (lease, warnings) = parse_lenient(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "resourceVersion": "3"},
            "spec": {"holderIdentity": "other", "renewTime": "yesterday", "leaseDurationSeconds": "ten"}
        }))
        .unwrap();
        let spec = lease.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("other"));
        assert!(spec.renew_time.is_none());
        assert!(spec.lease_duration_seconds.is_none());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("spec.leaseDurationSeconds"));
        assert!(warnings[1].contains("spec.renewTime"));
    }

    #[test]
    fn missing_spec_is_named() {
        let (lease, warnings) = parse_lenient(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l"}
        }))
        .unwrap();
        assert!(lease.spec.is_none());
        assert!(warnings[0].contains("spec is missing"));
    }

    #[test]
    fn valid_leases_have_no_warnings() {
        let (_, warnings) = parse_lenient(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l"},
            "spec": {"holderIdentity": "a", "renewTime": "2026-11-24T10:00:00.000001Z", "leaseDurationSeconds": 15}
        }))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}
