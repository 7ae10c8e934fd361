//! An in-memory Kubernetes API server for coordination.k8s.io/v1 Leases, on 127.0.0.1.
//!
//! It answers and fails the way kube-apiserver (etcd behind it, the watch cache in front of
//! watches) does wherever lease-exec's behaviour depends on it. Each rule names the code it
//! models (k8s.io/apiserver `registry/generic/registry/store.go` is "the store",
//! `storage/etcd3/store.go` is "etcd3", `storage/cacher` is "the watch cache"):
//!
//! - Bodies are decoded as typed Leases: malformed JSON, a wrong kind or a field of the wrong type
//!   is 400 BadRequest; unknown fields are dropped, omitted fields are omitted, `spec` is always
//!   there and MicroTimes are written with microseconds, as the typed Go object serializes.
//! - Create (POST): 400 if the body's namespace differs from the URL's; 422 Invalid for a missing
//!   or malformed name or an invalid spec; 500 for a `resourceVersion` in the body ("resourceVersion
//!   should not be set on objects to be created", an error etcd3 returns untyped); 409
//!   AlreadyExists. The server sets uid and creationTimestamp.
//! - Update (PUT): 400 unless the body's name equals the URL's. A `metadata.uid` in the body is a
//!   precondition (the handler's `DefaultUpdatedObjectInfo`): it must be the stored object's uid,
//!   else 409 Conflict "Precondition failed: UID in precondition: …" — also when the Lease no longer
//!   exists. Leases allow create-on-update (`AllowCreateOnUpdate` is true in
//!   pkg/registry/coordination/lease/strategy.go), so a PUT to a missing Lease without a uid
//!   creates it (201), whatever resourceVersion it carries: the store only compares the
//!   resourceVersion against an existing object, and etcd3 clears it (`PrepareObjectForStorage`)
//!   before the create. On an existing Lease: no resourceVersion is 422 Invalid
//!   ("metadata.resourceVersion: Invalid value: 0x0: must be specified for an update", because the
//!   lease strategy's `AllowUnconditionalUpdate` is false); another resourceVersion is 409 Conflict.
//! - Patch: merge and strategic-merge (the same thing for a Lease), 404 on a missing Lease, 409 on
//!   a resourceVersion in the patch that is not the stored one, 422 on an invalid result.
//! - Events (events.k8s.io/v1, and core/v1): created as sent; a PATCH (merge or strategic merge,
//!   415 otherwise) finds the Event in the URL's namespace (404 otherwise) and, through
//!   events.k8s.io, is validated as `ValidateEventUpdate` does (422 Invalid): `regarding`, `reason`,
//!   `note`, `type`, `action`, `related`, the reporting controller and instance, and `eventTime`
//!   (to the microsecond) are immutable, and a changed `series` needs `count` >= 2 and a
//!   `lastObservedTime`. This is the update kube's `Recorder` sends when an Event repeats.
//! - Validation is `ValidateLease`/`ValidateLeaseUpdate` of pkg/apis/coordination/validation:
//!   `metadata.name` a DNS-1123 subdomain (on create), `spec.leaseDurationSeconds` > 0,
//!   `spec.leaseTransitions` >= 0, `spec.strategy` a known strategy or a qualified name,
//!   `spec.preferredHolder` only with a strategy. `spec.holderIdentity` has no rule there (only
//!   the 3 MiB request body limit, 413, bounds it).
//! - A write that changes nothing keeps the resourceVersion and sends no watch event (etcd3's
//!   `GuaranteedUpdate` skips writing identical bytes), and is not a [`Write`].
//! - DELETED events carry the object's last state under the deletion's resourceVersion.
//! - Watches (the watch cache): from "" or "0", ADDED events for the current state first; from a
//!   resourceVersion, the events after it, or — when it is older than the kept history — a 200
//!   stream with one ERROR event (410 Expired, "too old resource version"); from a resourceVersion
//!   not reached yet, nothing until the server passes it. `sendInitialEvents=true` (a watch-list
//!   request) sends the current state whatever the resourceVersion, then, with
//!   `allowWatchBookmarks=true`, the `k8s.io/initial-events-end` bookmark; it waits up to 3 s for
//!   a resourceVersion not reached, then sends an ERROR event (504, ResourceVersionTooLarge).
//!   History is trimmed by count and age ([`ApiServer::set_history_limit`],
//!   [`ApiServer::set_history_window`]). A watcher more than 1024 events (of any Lease) behind is
//!   closed without an error, as the watch cache closes watchers that cannot keep up.
//!   `allowWatchBookmarks=true` brings BOOKMARK events at the latest resourceVersion every
//!   [`ApiServer::set_bookmark_interval`] and on [`ApiServer::bookmark_now`], never at or below
//!   the one the watch started from; `timeoutSeconds` ends the stream.
//! - Faults: refuse connections (the port stays reserved), hang (open watches pause and deliver
//!   what happened once the hang ends), answer a chosen status with the body the real server
//!   sends for it, delay answers, deny chosen verbs, carry out a request and lose its answer.
//!   These ([`ApiServer::set_mode`], [`ApiServer::set_delay`], [`ApiServer::deny`],
//!   [`ApiServer::lose_answers`]) hit every client at once.
//! - Doors, for faults that hit one client only: [`ApiServer::door`] opens another port on
//!   127.0.0.1 served by the same store and watch history; give each client its own door
//!   ([`Door::kubeconfig`]) and set that door's [`Fault`] with [`Door::set_fault`]: refuse its
//!   connections, black-hole them, cut the connections open now while new ones work (a half-open
//!   connection), delay its answers, answer it with a status, lose the answers to its writes.
//!   The server's own port is door 0 ([`ApiServer::own_door`]); the global faults above apply to
//!   every door as well. Every [`Seen`] request and [`Write`] names the door it came through.
//!
//! Not modelled: managedFields, generation, dryRun, label selectors, JSON patch and apply patch
//! (415), protobuf, finalizers and graceful deletion.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};

const GROUP: &str = "coordination.k8s.io";
const API_VERSION: &str = "coordination.k8s.io/v1";
/// kube-apiserver's limit on a request body (`MaxRequestBodyBytes`, 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How many events a watcher may fall behind before it is closed.
const WATCHER_BUFFER: usize = 1024;
/// How long a watch-list request from a resourceVersion the server has not reached waits for it
/// (the watch cache's `blockTimeout`).
const FUTURE_RV_WAIT: Duration = Duration::from_secs(3);
/// Default history: at most this many events…
pub const DEFAULT_HISTORY_LIMIT: usize = 1000;
/// …and, beyond [`HISTORY_KEPT_ANYWAY`] events, none older than this (the watch cache's
/// `eventFreshDuration`: it grows to keep 75 s of events, and drops older ones when full).
pub const DEFAULT_HISTORY_WINDOW: Duration = Duration::from_secs(75);
/// The watch cache's smallest capacity: this many events are kept however old they are.
const HISTORY_KEPT_ANYWAY: usize = 100;
/// Default time between BOOKMARK events. The real server sends one about every minute (and one
/// 2 s before the watch's timeout); a second makes every test that watches long enough, while
/// something writes, also exercise bookmark handling.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// What the server does with each request.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Mode {
    /// Serve normally.
    #[default]
    Normal,
    /// Stop listening and reset every open connection, on every door: new connections are
    /// refused. The ports stay reserved, so nothing else can take them meanwhile.
    Refuse,
    /// Accept requests and never answer them. Open watches pause; when the hang ends they deliver
    /// what happened meanwhile (or close, if they fell too far behind).
    Hang,
    /// Answer every Lease request with this status code and the body kube-apiserver sends with it,
    /// and an optional `Retry-After` in seconds. Open watches are closed.
    Status(u16, Option<u64>),
}

/// What one door does to the connections and requests that come through it (see [`Door`]). The
/// global faults ([`ApiServer::set_mode`] and the others) apply on top.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Fault {
    /// Serve normally.
    #[default]
    Normal,
    /// Stop listening on this door's port and reset its open connections: new connections are
    /// refused. The port stays reserved.
    Refuse,
    /// Accept connections and pass nothing on any of them, open or new, either way: requests are
    /// never read (so never seen or carried out), nothing is written, open watches go silent.
    /// Healing lets everything through again, as after a routing black hole that ended in time.
    Blackhole,
    /// The connections accepted so far stay up and pass nothing either way (requests on them hang,
    /// their watches go silent), while new connections work normally: what a load balancer or a
    /// conntrack table dropping a long-lived connection, or a frozen proxy, does to a client's
    /// pooled connections. Setting it again cuts the connections open then as well; leaving it
    /// (for any other fault) resets the connections it cut, as a connection whose packets were
    /// dropped cannot resume.
    HalfOpen,
    /// Delay every answer of this door (on top of [`ApiServer::set_delay`]). The delay comes
    /// before the request is carried out, so a client that hangs up meanwhile cancels it (as a
    /// request queued in front of a slow server is dropped); a write carried out but never
    /// answered is [`Fault::LoseAnswers`].
    Delay(Duration),
    /// Answer every API request of this door with this status code and the body kube-apiserver
    /// sends with it, with an optional `Retry-After` in seconds, as [`Mode::Status`] does; this
    /// door's open watches are closed.
    Status(u16, Option<u64>),
    /// Carry out every Lease write (create, update, patch, delete) of this door and never answer
    /// it: the write is committed, the client learns nothing.
    LoseAnswers,
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The door it came through (0: the server's own port).
    pub door: usize,
    /// Verb in Kubernetes terms: get, list, watch, create, update, patch, delete.
    pub verb: &'static str,
    /// Path.
    pub path: String,
    /// The query string as sent (empty without one), e.g. `watch=true&resourceVersion=7`.
    pub query: String,
    /// When it arrived.
    pub at: Instant,
}

impl Seen {
    /// The value of `key` in the query, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }
}

/// A successful write, for timing assertions.
#[derive(Debug, Clone)]
pub struct Write {
    /// Verb of the request (a PUT that created the Lease is an `update`).
    pub verb: &'static str,
    /// The door the request came through (0: the server's own port).
    pub door: usize,
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
    at: Instant,
}

struct Inner {
    leases: BTreeMap<(String, String), Value>,
    events: Vec<Value>,
    rv: u64,
    mode: Mode,
    delay: Duration,
    deny: HashMap<&'static str, u16>,
    /// Lease names no verb may name (see [`ApiServer::deny_lease`]).
    deny_leases: std::collections::HashSet<String>,
    /// Seconds added to the clock the `Date` header shows.
    clock_skew: i64,
    seen: Vec<Seen>,
    writes: Vec<Write>,
    history: VecDeque<WatchEvent>,
    /// A watch from a resourceVersion below this gets 410 Gone: some event after it is no longer
    /// kept.
    oldest_watchable: u64,
    history_limit: usize,
    history_window: Duration,
    bookmark_interval: Duration,
    /// Bumped by `bookmark_now`.
    bookmark_requests: u64,
    /// Bumped whenever every open watch must end.
    watch_closures: u64,
    /// The resourceVersion of every BOOKMARK sent on a watch stream, in order.
    bookmarks_sent: Vec<u64>,
    open_watches: usize,
    /// The CoordinatedLeaderElection feature gate: when off, `spec.strategy` and
    /// `spec.preferredHolder` are dropped (pkg/registry/coordination/lease/strategy.go).
    coordinated: bool,
    /// `(verb, Lease name)` whose requests are carried out but never answered.
    lost_answers: Vec<(&'static str, String)>,
    /// See [`ApiServer::lose_next_answer`].
    lost_once: Vec<(&'static str, String)>,
    /// See [`ApiServer::slow_answers`].
    slow_answers: Vec<(&'static str, String, Duration)>,
    /// `(Lease name, holder, duration, deleted)`: the next create of that Lease loses to a record
    /// of that holder, stored just before it (and deleted right after it, if `deleted`); and when
    /// that record was stored.
    beaten_create: Option<(String, String, i64, bool)>,
    beaten_at: Option<Instant>,
    /// See [`ApiServer::lag_watch_cache`].
    watch_lag: Option<u64>,
    /// Door 0 is the server's own port.
    doors: Vec<DoorState>,
}

/// One door's fault and connections.
struct DoorState {
    addr: SocketAddr,
    fault: Fault,
    /// Connections are numbered as they are accepted; those below this number were open when
    /// [`Fault::HalfOpen`] was set, and pass nothing.
    cut_below: u64,
    /// The number the next accepted connection gets.
    next_connection: u64,
    /// Connections open now.
    open: usize,
    /// Bumped whenever this door's open watches must end.
    watch_closures: u64,
    /// Connections waiting for the door to pass data again.
    blocked: Vec<Waker>,
}

impl DoorState {
    fn new(addr: SocketAddr) -> DoorState {
        DoorState {
            addr,
            fault: Fault::Normal,
            cut_below: 0,
            next_connection: 0,
            open: 0,
            watch_closures: 0,
            blocked: Vec::new(),
        }
    }
}

/// Handle to a running server. Dropping it stops nothing; the test's runtime ends it.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    /// Watch events, one buffer per open watch.
    watch_tx: broadcast::Sender<WatchEvent>,
    /// Pinged on every change open watches and the accept loop react to.
    changes: watch::Sender<()>,
}

/// Binds a door's port: `SO_REUSEPORT`, so it can share the port with the reservation. The
/// relay (`relay.rs`) binds its port so too.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A new port on 127.0.0.1: the socket that reserves it, and a listener on it.
///
/// A bound socket that never listens keeps the port reserved for the server's whole life: while
/// refusing, the listener is closed (connections are refused) and later bound again, and no other
/// socket can take the port in between (only another SO_REUSEPORT socket of this user could, and
/// none asks for this port).
pub fn reserve_port() -> (TcpSocket, SocketAddr, TcpListener) {
    let reserve = TcpSocket::new_v4().expect("socket");
    reserve.set_reuseport(true).expect("SO_REUSEPORT");
    reserve
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind 127.0.0.1:0");
    let addr = reserve.local_addr().unwrap();
    let listener = listen(addr).expect("listen on the reserved port");
    (reserve, addr, listener)
}

/// A kubeconfig pointing at `url`, with `namespace` as the context's namespace.
fn kubeconfig(url: &str, namespace: &str) -> String {
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
    )
}

impl ApiServer {
    /// Starts on 127.0.0.1 with an ephemeral port, on the current tokio runtime.
    pub async fn start() -> ApiServer {
        let (reserve, addr, listener) = reserve_port();
        let (watch_tx, _) = broadcast::channel(WATCHER_BUFFER);
        let (changes, _) = watch::channel(());
        let server = ApiServer {
            inner: Arc::new(Mutex::new(Inner {
                leases: BTreeMap::new(),
                events: Vec::new(),
                rv: 100,
                mode: Mode::Normal,
                delay: Duration::ZERO,
                deny: HashMap::new(),
                deny_leases: Default::default(),
                clock_skew: 0,
                seen: Vec::new(),
                writes: Vec::new(),
                history: VecDeque::new(),
                oldest_watchable: 100,
                history_limit: DEFAULT_HISTORY_LIMIT,
                history_window: DEFAULT_HISTORY_WINDOW,
                bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
                bookmark_requests: 0,
                watch_closures: 0,
                bookmarks_sent: Vec::new(),
                open_watches: 0,
                coordinated: true,
                lost_answers: Vec::new(),
                lost_once: Vec::new(),
                slow_answers: Vec::new(),
                beaten_create: None,
                beaten_at: None,
                watch_lag: None,
                doors: vec![DoorState::new(addr)],
            })),
            addr,
            watch_tx,
            changes,
        };
        tokio::spawn(server.clone().accept_loop(0, reserve, listener));
        server
    }

    /// Opens another door: a new port on 127.0.0.1 served by this server (the same Leases, watch
    /// history and global faults), with a fault of its own. Call it on the server's runtime.
    pub fn door(&self) -> Door {
        let (reserve, addr, listener) = reserve_port();
        let index = {
            let mut inner = self.inner.lock().unwrap();
            inner.doors.push(DoorState::new(addr));
            inner.doors.len() - 1
        };
        tokio::spawn(self.clone().accept_loop(index, reserve, listener));
        Door {
            server: self.clone(),
            index,
            addr,
        }
    }

    /// The server's own port as a door (door 0), to give it a fault of its own.
    pub fn own_door(&self) -> Door {
        Door {
            server: self.clone(),
            index: 0,
            addr: self.addr,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig pointing at this server, with `namespace` as the context's namespace.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        kubeconfig(&self.url(), namespace)
    }

    fn notify(&self) {
        self.changes.send_replace(());
    }

    /// Switches the fault mode. Entering `Hang` pauses open watches (leaving it for `Normal`
    /// resumes them); entering `Status` closes them; `Refuse` resets every connection.
    pub fn set_mode(&self, mode: Mode) {
        let mut inner = self.inner.lock().unwrap();
        if inner.mode == mode {
            return;
        }
        if matches!(mode, Mode::Status(..)) {
            inner.watch_closures += 1;
        }
        inner.mode = mode;
        drop(inner);
        self.notify();
    }

    /// Turns the CoordinatedLeaderElection feature gate on (the default) or off.
    pub fn set_coordinated_leader_election(&self, on: bool) {
        self.inner.lock().unwrap().coordinated = on;
    }

    /// Carries out every `verb` request of the Lease `name` and never answers it: the write is
    /// committed, the client learns nothing (a connection lost after the commit).
    pub fn lose_answers(&self, verb: &'static str, name: &str) {
        self.inner
            .lock()
            .unwrap()
            .lost_answers
            .push((verb, name.to_string()));
    }

    /// Carries out the next `verb` request of the Lease `name` and never answers it, as
    /// [`ApiServer::lose_answers`] does for every one: a connection that died right after the
    /// request went out (over HTTP/1.1 the request holds its connection, which stays up, silent).
    /// The requests after it are answered.
    pub fn lose_next_answer(&self, verb: &'static str, name: &str) {
        self.inner
            .lock()
            .unwrap()
            .lost_once
            .push((verb, name.to_string()));
    }

    /// Carries out every `verb` request of the Lease `name` at once and answers it `delay` later: a
    /// write committed while its answer is still on its way (a slow network back to the client).
    pub fn slow_answers(&self, verb: &'static str, name: &str, delay: Duration) {
        self.inner
            .lock()
            .unwrap()
            .slow_answers
            .push((verb, name.to_string(), delay));
    }

    /// The next create of the Lease `name` loses the race to another writer: a Lease held by
    /// `holder` for `duration` seconds is stored just before it is carried out (with its ADDED
    /// event), so it is answered 409 AlreadyExists. With `deleted`, that Lease is deleted right
    /// after the answer is made (someone deleted it under its new holder). See
    /// [`ApiServer::beaten_at`].
    pub fn beat_next_create(&self, name: &str, holder: &str, duration: i64, deleted: bool) {
        self.inner.lock().unwrap().beaten_create =
            Some((name.to_string(), holder.to_string(), duration, deleted));
    }

    /// When the record that beat a create (see [`ApiServer::beat_next_create`]) was stored.
    pub fn beaten_at(&self) -> Option<Instant> {
        self.inner.lock().unwrap().beaten_at
    }

    /// Delays every answer. The delay comes before the request is carried out: a client that
    /// hangs up meanwhile cancels it.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().unwrap().delay = delay;
    }

    /// Answers `verb` (get, list, watch, create, update, patch, delete, create-event, patch-event)
    /// with `code`, and the body kube-apiserver sends with it (for 401 and 403, the authorizer's).
    /// Denying `create` also denies a PUT that would create the Lease, as the real server checks
    /// both verbs for create-on-update.
    pub fn deny(&self, verb: &'static str, code: u16) {
        self.inner.lock().unwrap().deny.insert(verb, code);
    }

    /// Refuses (403) every request naming the Lease `name` (get, update, patch, delete, a watch
    /// or list selecting it by name) and answers access reviews naming it as not allowed, as a
    /// Role whose `resourceNames` leaves it out would. Create is not refused: RBAC cannot
    /// restrict create by name.
    pub fn deny_lease(&self, name: &str) {
        self.inner
            .lock()
            .unwrap()
            .deny_leases
            .insert(name.to_string());
    }

    /// Makes the `Date` header of every answer run `seconds` ahead of this machine's clock.
    pub fn set_clock_skew(&self, seconds: i64) {
        self.inner.lock().unwrap().clock_skew = seconds;
    }

    /// Stops denying `verb`.
    pub fn allow(&self, verb: &'static str) {
        self.inner.lock().unwrap().deny.remove(verb);
    }

    /// Closes every open watch stream (a hung server closes them when the hang ends).
    pub fn close_watches(&self) {
        self.inner.lock().unwrap().watch_closures += 1;
        self.notify();
    }

    /// Makes the watch cache lag behind the store at `rv` (`None`: caught up again), as one API
    /// server of an HA control plane whose cache fell behind etcd: watch streams deliver every
    /// event up to `rv` and hold back the later ones (bookmarks included) until the lag ends. A
    /// watch re-opened from an older resourceVersion meanwhile gets the events up to `rv` only.
    /// Reads and writes are not affected, nor what a watch from the current state (`""`) starts
    /// with.
    pub fn lag_watch_cache(&self, rv: Option<u64>) {
        self.inner.lock().unwrap().watch_lag = rv;
        self.notify();
    }

    /// Makes every resourceVersion older than the current one too old for a watch (410 Gone) and
    /// closes open watches, as etcd compaction at the current revision does: a watch from the
    /// current resourceVersion still works.
    pub fn compact(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.oldest_watchable = inner.rv;
        inner.history.clear();
        inner.watch_closures += 1;
        drop(inner);
        self.notify();
    }

    /// Keeps at most `events` watch events: a watch from a resourceVersion before the oldest
    /// kept event gets 410 Gone. Default [`DEFAULT_HISTORY_LIMIT`].
    pub fn set_history_limit(&self, events: usize) {
        let mut inner = self.inner.lock().unwrap();
        inner.history_limit = events;
        trim_history(&mut inner);
    }

    /// Drops watch events older than `window` once more than 100 are kept (the watch cache's
    /// policy; `Duration::ZERO` with a small [`ApiServer::set_history_limit`] keeps just that many).
    /// Default [`DEFAULT_HISTORY_WINDOW`].
    pub fn set_history_window(&self, window: Duration) {
        let mut inner = self.inner.lock().unwrap();
        inner.history_window = window;
        trim_history(&mut inner);
    }

    /// Time between BOOKMARK events on watches that allow them; `Duration::ZERO` sends none but
    /// those of [`ApiServer::bookmark_now`]. Default [`DEFAULT_BOOKMARK_INTERVAL`].
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.inner.lock().unwrap().bookmark_interval = interval;
        self.notify();
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch that allows them, after
    /// the events before it.
    pub fn bookmark_now(&self) {
        self.inner.lock().unwrap().bookmark_requests += 1;
        self.notify();
    }

    /// The latest resourceVersion (etcd's revision: writes to Events count too).
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().unwrap().rv
    }

    /// The resourceVersion of every periodic or [`ApiServer::bookmark_now`] BOOKMARK handed to a
    /// watch stream so far, in order (the client reads it before the stream's end).
    pub fn bookmarks_sent(&self) -> Vec<u64> {
        self.inner.lock().unwrap().bookmarks_sent.clone()
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.inner.lock().unwrap().open_watches
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

    /// Stores `object` as the Lease, bypassing all checks and validation (as another writer
    /// would, or to plant a Lease the real server would refuse), with a new resourceVersion.
    /// Returns that resourceVersion.
    pub fn put_lease(&self, namespace: &str, name: &str, object: Value) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        self.store(&mut inner, namespace, name, object, None);
        inner.rv
    }

    /// Stores `object` as the Lease `namespace/name` as it is, but for its name, namespace, uid
    /// and creation time (kept from the stored Lease), under a new resourceVersion.
    fn store(
        &self,
        inner: &mut Inner,
        ns: &str,
        name: &str,
        mut object: Value,
        by: Option<(&'static str, usize)>,
    ) -> Value {
        let previous = inner.leases.get(&(ns.to_string(), name.to_string()));
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        object["metadata"]["name"] = json!(name);
        match previous {
            Some(previous) => {
                object["metadata"]["uid"] = previous["metadata"]["uid"].clone();
                object["metadata"]["creationTimestamp"] =
                    previous["metadata"]["creationTimestamp"].clone();
            }
            None => stamp_new(&mut object, inner.rv + 1),
        }
        self.commit(inner, ns, name, object, by)
    }

    /// Commits `object` (prepared but for its resourceVersion) under a new resourceVersion,
    /// records it as a client write when `by` (its verb and door) is given, and publishes the
    /// watch event.
    fn commit(
        &self,
        inner: &mut Inner,
        ns: &str,
        name: &str,
        mut object: Value,
        by: Option<(&'static str, usize)>,
    ) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        if object.get("apiVersion").and_then(Value::as_str).is_none() {
            object["apiVersion"] = json!(API_VERSION);
        }
        if object.get("kind").and_then(Value::as_str).is_none() {
            object["kind"] = json!("Lease");
        }
        object["metadata"]["namespace"] = json!(ns);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = inner
            .leases
            .insert((ns.to_string(), name.to_string()), object.clone());
        if let Some((verb, door)) = by {
            self.record_write(inner, verb, door, &object);
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

    /// Deletes the Lease, as garbage collection or a person would. The DELETED event carries the
    /// last state under the deletion's resourceVersion.
    pub fn delete_lease(&self, namespace: &str, name: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        self.remove(&mut inner, namespace, name).is_some()
    }

    fn remove(&self, inner: &mut Inner, ns: &str, name: &str) -> Option<Value> {
        let mut object = inner.leases.remove(&(ns.to_string(), name.to_string()))?;
        inner.rv += 1;
        let rv = inner.rv;
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.publish(inner, "DELETED", ns, name, rv, object.clone());
        Some(object)
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

    /// Every successful write to a Lease through the API (a write that changed nothing is none).
    pub fn writes(&self) -> Vec<Write> {
        self.inner.lock().unwrap().writes.clone()
    }

    /// The first write whose stored holder is `holder` (its create, claim or resume).
    pub fn first_write_by(&self, holder: &str) -> Option<Write> {
        self.writes()
            .into_iter()
            .find(|w| w.holder.as_deref() == Some(holder))
    }

    /// The last successful write by `holder` (a create, update or patch leaving it as holder).
    pub fn last_write_by(&self, holder: &str) -> Option<Write> {
        self.writes()
            .into_iter()
            .rev()
            .find(|w| w.holder.as_deref() == Some(holder))
    }

    /// Events created so far, as patched since.
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
            at: Instant::now(),
        };
        inner.history.push_back(event.clone());
        trim_history(inner);
        // Sent under the lock: whoever reads `rv` under the lock then finds every event up to it
        // in its buffer.
        let _ = self.watch_tx.send(event);
        self.notify();
    }

    /// Serves one door's port until the runtime ends: refuses while the server or the door does,
    /// resets the connections a half-open cut left behind once the door leaves
    /// [`Fault::HalfOpen`], and serves each accepted connection through a [`DoorIo`].
    async fn accept_loop(self, door: usize, reserve: TcpSocket, listener: TcpListener) {
        let _reserve = reserve;
        let addr = self.inner.lock().unwrap().doors[door].addr;
        let mut listener = Some(listener);
        let mut changes = self.changes.subscribe();
        // Each connection's number and task.
        let mut connections: Vec<(u64, tokio::task::JoinHandle<()>)> = Vec::new();
        loop {
            let (refused, reset_below) = {
                let inner = self.inner.lock().unwrap();
                let state = &inner.doors[door];
                (
                    inner.mode == Mode::Refuse || state.fault == Fault::Refuse,
                    (state.fault != Fault::HalfOpen).then_some(state.cut_below),
                )
            };
            if let Some(below) = reset_below {
                connections.retain(|(number, task)| {
                    if *number < below {
                        task.abort();
                    }
                    *number >= below
                });
            }
            if refused {
                if listener.take().is_some() {
                    for (_, task) in connections.drain(..) {
                        task.abort();
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let current = match listener.take() {
                Some(l) => l,
                None => match listen(addr) {
                    Ok(l) => l,
                    Err(e) => panic!("cannot listen on {addr} again: {e}"),
                },
            };
            tokio::select! {
                accepted = current.accept() => {
                    if let Ok((stream, _)) = accepted {
                        let number = {
                            let mut inner = self.inner.lock().unwrap();
                            let state = &mut inner.doors[door];
                            state.next_connection += 1;
                            state.open += 1;
                            state.next_connection - 1
                        };
                        let io = DoorIo {
                            stream,
                            inner: self.inner.clone(),
                            door,
                            number,
                        };
                        let server = self.clone();
                        connections.retain(|(_, task)| !task.is_finished());
                        connections.push((number, tokio::spawn(async move {
                            let io = hyper_util::rt::TokioIo::new(io);
                            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                                let server = server.clone();
                                async move { Ok::<_, Infallible>(server.handle(door, req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        })));
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            listener = Some(current);
        }
    }

    async fn handle(&self, door: usize, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let mut response = self.answer(door, req).await;
        let skew = self.inner.lock().unwrap().clock_skew;
        if skew != 0 {
            let at = std::time::SystemTime::now()
                .checked_add(Duration::from_secs(skew.unsigned_abs()))
                .filter(|_| skew > 0)
                .unwrap_or_else(|| {
                    std::time::SystemTime::now() - Duration::from_secs(skew.unsigned_abs())
                });
            let date = k8s_openapi::jiff::Timestamp::try_from(at)
                .unwrap()
                .strftime("%a, %d %b %Y %H:%M:%S GMT")
                .to_string();
            response.headers_mut().insert("date", date.parse().unwrap());
        }
        response
    }

    async fn answer(&self, door: usize, req: Request<hyper::body::Incoming>) -> Response<Body> {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        let (body, too_large) = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => (b.to_bytes(), false),
            Err(e) => (
                Bytes::new(),
                e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some(),
            ),
        };
        let route = Route::parse(&parts.method, &parts.uri);
        let verb = route.verb();
        let (mode, door_fault, delay, denied, denied_create) = {
            let mut inner = self.inner.lock().unwrap();
            inner.seen.push(Seen {
                door,
                verb,
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or("").to_string(),
                at: Instant::now(),
            });
            let named = match &route {
                Route::Get { name, .. }
                | Route::Update { name, .. }
                | Route::Patch { name, .. }
                | Route::Delete { name, .. } => Some(name.clone()),
                Route::List { .. } => parts.uri.query().and_then(|q| {
                    q.split('&')
                        .filter_map(|kv| kv.strip_prefix("fieldSelector="))
                        .find_map(|f| {
                            let f = f.replace("%3D", "=").replace("%3d", "=");
                            f.strip_prefix("metadata.name=").map(str::to_string)
                        })
                }),
                _ => None,
            };
            let denied = inner
                .deny
                .get(verb)
                .copied()
                .or_else(|| named.filter(|n| inner.deny_leases.contains(n)).map(|_| 403));
            let denied_create = inner.deny.get("create").copied();
            let door_fault = inner.doors[door].fault.clone();
            let mut delay = inner.delay;
            if let Fault::Delay(extra) = door_fault {
                delay += extra;
            }
            (inner.mode.clone(), door_fault, delay, denied, denied_create)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let is_api = !matches!(route, Route::Discovery(_) | Route::NotFound);
        match mode {
            Mode::Hang if is_api => std::future::pending::<()>().await,
            Mode::Status(code, retry_after) if is_api => {
                return fault(code, retry_after, &route, verb);
            }
            _ => {}
        }
        if let Fault::Status(code, retry_after) = door_fault
            && is_api
        {
            return fault(code, retry_after, &route, verb);
        }
        if let Some(code) = denied {
            return fault(code, None, &route, verb);
        }
        if too_large {
            return status_response(
                413,
                "RequestEntityTooLarge",
                &format!("Request entity too large: limit is {MAX_BODY}"),
            );
        }
        let (lost, slow) = {
            let mut inner = self.inner.lock().unwrap();
            let name = route.target().2;
            let lease_write = matches!(
                route,
                Route::Create { .. }
                    | Route::Update { .. }
                    | Route::Patch { .. }
                    | Route::Delete { .. }
            );
            let slow = inner
                .slow_answers
                .iter()
                .find(|(v, n, _)| *v == verb && Some(n.as_str()) == name)
                .map(|(_, _, delay)| *delay);
            let once = inner
                .lost_once
                .iter()
                .position(|(v, n)| *v == verb && Some(n.as_str()) == name);
            if let Some(i) = once {
                inner.lost_once.remove(i);
            }
            let lost = (door_fault == Fault::LoseAnswers && lease_write)
                || once.is_some()
                || inner
                    .lost_answers
                    .iter()
                    .any(|(v, n)| *v == verb && Some(n.as_str()) == name);
            (lost, slow)
        };
        let response = self
            .route(
                door,
                route,
                &parts.headers,
                &parts.uri,
                &body,
                denied_create,
            )
            .await;
        if lost {
            return std::future::pending().await;
        }
        if let Some(delay) = slow {
            tokio::time::sleep(delay).await;
        }
        response
    }

    async fn route(
        &self,
        door: usize,
        route: Route,
        headers: &HeaderMap,
        uri: &Uri,
        body: &[u8],
        denied_create: Option<u16>,
    ) -> Response<Body> {
        match route {
            Route::Discovery(doc) => json_response(200, doc),
            Route::NotFound => status_with(
                404,
                "NotFound",
                "the server could not find the requested resource",
                Some(json!({})),
            ),
            Route::Get { ns, name } => match self.lease(&ns, &name) {
                Some(obj) => json_response(200, obj),
                None => not_found(&name),
            },
            Route::List { ns, watch: false } => {
                let selector = match Selector::parse(uri) {
                    Ok(s) => s,
                    Err(response) => return *response,
                };
                let inner = self.inner.lock().unwrap();
                let items: Vec<Value> = inner
                    .leases
                    .iter()
                    .filter(|((n, name), _)| {
                        ns.as_deref().is_none_or(|ns| ns == n) && selector.matches(n, name)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                json_response(
                    200,
                    json!({"apiVersion": API_VERSION, "kind": "LeaseList", "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
                )
            }
            Route::List { ns, watch: true } => self.watch(door, ns, uri),
            Route::Create { ns } => self.create(door, &ns, body),
            Route::Update { ns, name } => self.update(door, &ns, &name, body, denied_create),
            Route::Patch { ns, name } => self.patch(door, &ns, &name, headers, body),
            Route::Delete { ns, name } => self.delete(&ns, &name, body),
            Route::AccessReview => {
                let mut review = match parse_json(body) {
                    Ok(v) => v,
                    Err(response) => return *response,
                };
                let attributes = &review["spec"]["resourceAttributes"];
                let key = match (
                    attributes["group"].as_str().unwrap_or(""),
                    attributes["resource"].as_str().unwrap_or(""),
                    attributes["verb"].as_str().unwrap_or(""),
                ) {
                    (GROUP, "leases", verb) => verb.to_string(),
                    ("events.k8s.io" | "", "events", verb) => format!("{verb}-event"),
                    (_, _, verb) => format!("other:{verb}"),
                };
                let allowed = {
                    let inner = self.inner.lock().unwrap();
                    let by_name = key != "create"
                        && attributes["resource"] == "leases"
                        && attributes["name"]
                            .as_str()
                            .is_some_and(|n| inner.deny_leases.contains(n));
                    !inner.deny.contains_key(key.as_str()) && !by_name
                };
                review["status"] = if allowed {
                    json!({"allowed": true, "reason": "allowed by the in-memory server"})
                } else {
                    json!({"allowed": false})
                };
                review["apiVersion"] = json!("authorization.k8s.io/v1");
                review["kind"] = json!("SelfSubjectAccessReview");
                json_response(201, review)
            }
            Route::CreateEvent { ns } => {
                let mut object = match parse_json(body) {
                    Ok(v) => v,
                    Err(response) => return *response,
                };
                let mut inner = self.inner.lock().unwrap();
                inner.rv += 1;
                let rv = inner.rv;
                if !object["metadata"].is_object() {
                    object["metadata"] = json!({});
                }
                stamp_new(&mut object, rv);
                object["metadata"]["namespace"] = json!(ns);
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                inner.events.push(object.clone());
                json_response(201, object)
            }
            Route::PatchEvent { ns, name, strict } => {
                self.patch_event(&ns, &name, headers, body, strict)
            }
        }
    }

    /// PATCH of an Event: merge or strategic-merge (the same for an Event's fields), then, through
    /// events.k8s.io/v1 (`strict`), `ValidateEventUpdate` of pkg/apis/core/validation/events.go:
    /// the identifying fields are immutable, and a series that changed needs a count of at least 2
    /// and a lastObservedTime. The core/v1 path is not validated further, as there.
    fn patch_event(
        &self,
        ns: &str,
        name: &str,
        headers: &HeaderMap,
        body: &[u8],
        strict: bool,
    ) -> Response<Body> {
        if let Some(refused) = unsupported_patch(headers) {
            return refused;
        }
        let patch = match parse_json(body) {
            Ok(v) => v,
            Err(response) => return *response,
        };
        let mut inner = self.inner.lock().unwrap();
        let Some(index) = inner.events.iter().position(|e| {
            e["metadata"]["namespace"].as_str() == Some(ns)
                && e["metadata"]["name"].as_str() == Some(name)
        }) else {
            return status_with(
                404,
                "NotFound",
                &format!("events.events.k8s.io \"{name}\" not found"),
                Some(json!({"name": name, "group": "events.k8s.io", "kind": "events"})),
            );
        };
        let current = inner.events[index].clone();
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
            && current["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return status_with(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on events.events.k8s.io \"{name}\": {OPTIMISTIC_LOCK}"
                ),
                Some(json!({"name": name, "group": "events.k8s.io", "kind": "events"})),
            );
        }
        let mut patched = current.clone();
        merge_patch(&mut patched, &patch);
        if strict {
            let errors = event_update_errors(&patched, &current);
            if !errors.is_empty() {
                return invalid("events.k8s.io", "Event", name, &errors);
            }
        }
        inner.rv += 1;
        patched["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        inner.events[index] = patched.clone();
        json_response(200, patched)
    }

    /// POST: the store's `create` and etcd3's `Create`.
    fn create(&self, door: usize, ns: &str, body: &[u8]) -> Response<Body> {
        let mut object = match decode_lease(body) {
            Ok(o) => o,
            Err(response) => return *response,
        };
        let meta = &object["metadata"];
        if meta["namespace"]
            .as_str()
            .is_some_and(|n| !n.is_empty() && n != ns)
        {
            return bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
        let mut name = meta["name"].as_str().unwrap_or("").to_string();
        let mut inner = self.inner.lock().unwrap();
        if name.is_empty()
            && let Some(prefix) = meta["generateName"].as_str().filter(|p| !p.is_empty())
        {
            name = format!("{prefix}{}", generated_suffix(inner.rv + 1));
            object["metadata"]["name"] = json!(name);
        }
        if name.is_empty() {
            return invalid(
                GROUP,
                "Lease",
                "",
                &[FieldError::required(
                    "metadata.name",
                    "name or generateName is required",
                )],
            );
        }
        prepare(&inner, &mut object, None);
        let mut errors = name_errors(&name);
        errors.extend(annotation_errors(&object["metadata"]));
        errors.extend(spec_errors(&object["spec"]));
        if !errors.is_empty() {
            return invalid(GROUP, "Lease", &name, &errors);
        }
        // etcd3 refuses a resourceVersion on create with an untyped error: 500, no reason.
        match parse_rv(&object["metadata"]["resourceVersion"]) {
            Ok(0) => {}
            Ok(_) => {
                return status_response(
                    500,
                    "",
                    "resourceVersion should not be set on objects to be created",
                );
            }
            Err(message) => return status_response(500, "", &message),
        }
        if inner
            .beaten_create
            .as_ref()
            .is_some_and(|(n, ..)| *n == name)
        {
            let (_, holder, duration, deleted) = inner.beaten_create.take().unwrap();
            let now = micro_now();
            let winner = json!({"spec": {
                "holderIdentity": holder, "leaseDurationSeconds": duration,
                "acquireTime": now, "renewTime": now, "leaseTransitions": 0,
            }});
            self.store(&mut inner, ns, &name, winner, None);
            inner.beaten_at = Some(Instant::now());
            if deleted {
                // Answered as the create found it; the deletion follows.
                self.remove(&mut inner, ns, &name);
                return already_exists(&name);
            }
        }
        if inner.leases.contains_key(&(ns.to_string(), name.clone())) {
            return already_exists(&name);
        }
        stamp_new(&mut object, inner.rv + 1);
        json_response(
            201,
            self.commit(&mut inner, ns, &name, object, Some(("create", door))),
        )
    }

    /// PUT: the update handler's name check, the store's `Update` (create-on-update included) and
    /// etcd3's `GuaranteedUpdate` (UID precondition, no-op short cut).
    fn update(
        &self,
        door: usize,
        ns: &str,
        name: &str,
        body: &[u8],
        denied_create: Option<u16>,
    ) -> Response<Body> {
        let mut object = match decode_lease(body) {
            Ok(o) => o,
            Err(response) => return *response,
        };
        let meta = &object["metadata"];
        let body_name = meta["name"].as_str().unwrap_or("");
        if body_name.is_empty() {
            return bad_request(&format!(
                "the name of the object ({name} based on URL) was undeterminable: name must be provided"
            ));
        }
        if body_name != name {
            return bad_request(&format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            ));
        }
        if let Some(body_ns) = meta["namespace"].as_str().filter(|n| !n.is_empty())
            && body_ns != ns
        {
            return bad_request(&format!(
                "the namespace of the object ({body_ns}) does not match the namespace on the request ({ns})"
            ));
        }
        let sent_uid = meta["uid"].as_str().unwrap_or("").to_string();
        let mut inner = self.inner.lock().unwrap();
        let current = inner
            .leases
            .get(&(ns.to_string(), name.to_string()))
            .cloned();
        if !sent_uid.is_empty() {
            let stored = current
                .as_ref()
                .and_then(|c| c["metadata"]["uid"].as_str())
                .unwrap_or("");
            if sent_uid != stored {
                return conflict(
                    name,
                    &format!(
                        "StorageError: invalid object, Code: 4, Key: /registry/leases/{ns}/{name}, ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: UID in precondition: {sent_uid}, UID in object meta: {stored}"
                    ),
                );
            }
        }
        let Some(current) = current else {
            // Create-on-update: the resourceVersion in the body does not matter (see the module
            // documentation); creating needs the create verb too.
            if let Some(code) = denied_create {
                return fault(code, None, &Route::Create { ns: ns.to_string() }, "create");
            }
            prepare(&inner, &mut object, None);
            let mut errors = name_errors(name);
            errors.extend(annotation_errors(&object["metadata"]));
            errors.extend(spec_errors(&object["spec"]));
            if !errors.is_empty() {
                return invalid(GROUP, "Lease", name, &errors);
            }
            stamp_new(&mut object, inner.rv + 1);
            return json_response(
                201,
                self.commit(&mut inner, ns, name, object, Some(("update", door))),
            );
        };
        let sent_rv = match parse_rv(&object["metadata"]["resourceVersion"]) {
            Ok(rv) => rv,
            Err(message) => return status_response(500, "", &message),
        };
        if sent_rv == 0 {
            // The store's own error, with the resource (not the kind) as its "kind".
            return invalid(
                GROUP,
                "leases",
                name,
                &[FieldError::invalid(
                    "metadata.resourceVersion",
                    "0x0",
                    "must be specified for an update",
                )],
            );
        }
        if Some(sent_rv) != parse_rv(&current["metadata"]["resourceVersion"]).ok() {
            return conflict(name, OPTIMISTIC_LOCK);
        }
        self.finish_update(&mut inner, ns, name, object, &current, ("update", door))
    }

    /// PATCH: merge or strategic-merge onto the stored Lease, then the store's `Update`.
    fn patch(
        &self,
        door: usize,
        ns: &str,
        name: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response<Body> {
        if let Some(refused) = unsupported_patch(headers) {
            return refused;
        }
        let patch = match parse_json(body) {
            Ok(v) => v,
            Err(response) => return *response,
        };
        let mut inner = self.inner.lock().unwrap();
        let Some(current) = inner
            .leases
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
        else {
            return not_found(name);
        };
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
            && current["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return conflict(name, OPTIMISTIC_LOCK);
        }
        // A Lease has no list fields with a patch merge key: strategic merge behaves as a JSON
        // merge patch for it.
        let mut patched = current.clone();
        merge_patch(&mut patched, &patch);
        let patched_text = patched.to_string();
        let object = match normalize_lease(patched) {
            Ok(o) => o,
            Err(e) => {
                return invalid(
                    "",
                    "",
                    "",
                    &[FieldError::invalid(
                        "patch",
                        &format!("{patched_text:?}"),
                        &e,
                    )],
                );
            }
        };
        let mut errors = Vec::new();
        for field in ["name", "uid"] {
            let new = object["metadata"][field].as_str().unwrap_or("");
            let old = current["metadata"][field].as_str().unwrap_or("");
            if !new.is_empty() && new != old {
                errors.push(FieldError::invalid(
                    &format!("metadata.{field}"),
                    &format!("{new:?}"),
                    "field is immutable",
                ));
            }
        }
        if !errors.is_empty() {
            return invalid(GROUP, "Lease", name, &errors);
        }
        if object["metadata"]["namespace"]
            .as_str()
            .is_some_and(|n| !n.is_empty() && n != ns)
        {
            return bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
        self.finish_update(&mut inner, ns, name, object, &current, ("patch", door))
    }

    /// The common end of an update: the store's `BeforeUpdate` (uid and creation time kept),
    /// `ValidateLeaseUpdate`, etcd3's no-op short cut, the write.
    fn finish_update(
        &self,
        inner: &mut Inner,
        ns: &str,
        name: &str,
        mut object: Value,
        current: &Value,
        by: (&'static str, usize),
    ) -> Response<Body> {
        if object["metadata"]["uid"].as_str().is_none_or(str::is_empty) {
            object["metadata"]["uid"] = current["metadata"]["uid"].clone();
        }
        object["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
        object["metadata"]["namespace"] = json!(ns);
        prepare(inner, &mut object, Some(current));
        let mut errors = annotation_errors(&object["metadata"]);
        errors.extend(spec_errors(&object["spec"]));
        if !errors.is_empty() {
            return invalid(GROUP, "Lease", name, &errors);
        }
        let mut unchanged = current.clone();
        if let Some(meta) = unchanged["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
        }
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
        }
        if object == unchanged {
            return json_response(200, current.clone());
        }
        json_response(200, self.commit(inner, ns, name, object, Some(by)))
    }

    /// DELETE, with the preconditions of a DeleteOptions body.
    fn delete(&self, ns: &str, name: &str, body: &[u8]) -> Response<Body> {
        let options = if body.is_empty() {
            Value::Null
        } else {
            match parse_json(body) {
                Ok(v) => v,
                Err(response) => return *response,
            }
        };
        let mut inner = self.inner.lock().unwrap();
        let Some(current) = inner.leases.get(&(ns.to_string(), name.to_string())) else {
            return not_found(name);
        };
        let preconditions = &options["preconditions"];
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(wanted) = preconditions[field].as_str() {
                let actual = current["metadata"][field].as_str().unwrap_or("");
                if wanted != actual {
                    return conflict(
                        name,
                        &format!(
                            "StorageError: invalid object, Code: 4, Key: /registry/leases/{ns}/{name}, ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}"
                        ),
                    );
                }
            }
        }
        let removed = self.remove(&mut inner, ns, name).expect("present above");
        json_response(
            200,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                   "details": {"name": name, "group": GROUP, "kind": "leases", "uid": removed["metadata"]["uid"]}}),
        )
    }

    fn record_write(&self, inner: &mut Inner, verb: &'static str, door: usize, object: &Value) {
        inner.writes.push(Write {
            verb,
            door,
            holder: object["spec"]["holderIdentity"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            at: Instant::now(),
            at_ns: mono_ns(),
            object: object.clone(),
        });
    }

    fn watch(&self, door: usize, ns: Option<String>, uri: &Uri) -> Response<Body> {
        let selector = match Selector::parse(uri) {
            Ok(s) => s,
            Err(response) => return *response,
        };
        let from = match query(uri, "resourceVersion").as_deref() {
            None | Some("") => 0,
            Some(text) => match text.parse::<u64>() {
                Ok(rv) => rv,
                Err(e) => {
                    return bad_request(&format!("invalid resource version: {e}"));
                }
            },
        };
        let flag = |key: &str| matches!(query(uri, key).as_deref(), Some("true" | "1"));
        let bookmarks = flag("allowWatchBookmarks");
        let initial = query(uri, "sendInitialEvents").map(|v| matches!(v.as_str(), "true" | "1"));
        let rv_match = query(uri, "resourceVersionMatch").unwrap_or_default();
        // apimachinery's validateWatchOptions.
        let mut errors = Vec::new();
        if initial.is_some() && rv_match != "NotOlderThan" {
            errors.push(FieldError::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !rv_match.is_empty() {
            if initial.is_none() {
                errors.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
            if rv_match != "NotOlderThan" {
                errors.push(FieldError::not_supported(
                    "resourceVersionMatch",
                    &format!("{rv_match:?}"),
                    &["NotOlderThan"],
                ));
            }
        }
        if !errors.is_empty() {
            return invalid("meta.k8s.io", "ListOptions", "", &errors);
        }
        let timeout = query(uri, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        let spec = WatchSpec {
            door,
            ns,
            selector,
            from,
            timeout,
            bookmarks,
            initial,
        };
        let server = self.clone();
        let stream = async_stream(move |tx| server.stream_watch(tx, spec));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(stream)
            .unwrap()
    }

    /// Feeds one watch stream until it ends: the watch cache's `Watch` and `cacheWatcher`.
    async fn stream_watch(self, tx: mpsc::Sender<Bytes>, spec: WatchSpec) {
        let _open = OpenWatch::new(&self);
        let mut changes = self.changes.subscribe();
        let started = tokio::time::Instant::now();
        let deadline = spec.timeout.map(|t| started + t);
        let wanted = |namespace: &str, name: &str| {
            spec.ns.as_deref().is_none_or(|n| n == namespace)
                && spec.selector.matches(namespace, name)
        };
        let matches = |e: &WatchEvent| wanted(&e.namespace, &e.name);

        let watch_list = spec.initial == Some(true);
        // Only a watch-list request (sendInitialEvents=true) waits for a resourceVersion the
        // server has not reached, and fails after a while; a plain watch from one starts at once
        // and gets what follows it.
        let wait_until = started + FUTURE_RV_WAIT;
        while watch_list && spec.from > self.resource_version() {
            if tokio::time::Instant::now() >= wait_until {
                let current = self.resource_version();
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("Timeout: Too large resource version: {}, current: {current}", spec.from),
                    "reason": "Timeout", "code": 504,
                    "details": {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}});
                let _ = tx
                    .send(line(json!({"type": "ERROR", "object": status})))
                    .await;
                return;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(wait_until) => {}
                () = tx.closed() => return,
            }
        }

        // The starting point, the events before it, and a buffer for the events after it.
        let start = {
            let mut inner = self.inner.lock().unwrap();
            trim_history(&mut inner);
            // The current state first: from "" or "0" (unless sendInitialEvents=false), and for
            // a watch-list request whatever the resourceVersion (so never 410).
            let from_state = watch_list || (spec.from == 0 && spec.initial != Some(false));
            let from_now = from_state || spec.from == 0;
            if !from_now && spec.from < inner.oldest_watchable {
                Err(
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {} ({})", spec.from, inner.oldest_watchable),
                    "reason": "Expired", "code": 410}),
                )
            } else {
                let mut backlog: Vec<Value> = Vec::new();
                // Events past a lagging cache's position wait (see `lag_watch_cache`).
                let mut lagging: VecDeque<WatchEvent> = VecDeque::new();
                let lag = inner.watch_lag;
                if from_state {
                    for ((n, name), object) in &inner.leases {
                        if wanted(n, name) {
                            backlog.push(json!({"type": "ADDED", "object": object}));
                        }
                    }
                    if watch_list && spec.bookmarks {
                        backlog.push(bookmark(inner.rv, true));
                    }
                } else if !from_now {
                    for e in inner
                        .history
                        .iter()
                        .filter(|e| e.rv > spec.from && matches(e))
                    {
                        if lag.is_some_and(|lag| e.rv > lag) {
                            lagging.push_back(e.clone());
                        } else {
                            backlog.push(json!({"type": e.kind, "object": e.object}));
                        }
                    }
                }
                // The watcher's resourceVersion: it sends nothing at or below it, bookmarks
                // included.
                let start_rv = if from_now { inner.rv } else { spec.from };
                let last = match (lagging.front(), lag) {
                    (Some(_), Some(lag)) => start_rv.max(lag),
                    _ => start_rv.max(inner.history.back().map_or(0, |e| e.rv)),
                };
                Ok((
                    (backlog, lagging),
                    start_rv,
                    last,
                    self.watch_tx.subscribe(),
                    (inner.watch_closures, inner.doors[spec.door].watch_closures),
                    inner.bookmark_requests,
                ))
            }
        };
        let ((backlog, lagging), start_rv, mut last, mut rx, closures, mut bookmark_requests) =
            match start {
                Ok(start) => start,
                Err(status) => {
                    let _ = tx
                        .send(line(json!({"type": "ERROR", "object": status})))
                        .await;
                    return;
                }
            };
        for event in backlog {
            if tx.send(line(event)).await.is_err() {
                return;
            }
        }

        let mut last_bookmark = tokio::time::Instant::now();
        // Events received as a hang began: they go out when it ends. Also those past a lagging
        // cache's position, in order: they go out once it has caught up with them.
        let mut held: VecDeque<WatchEvent> = lagging;
        loop {
            let (hung, closed, requested, interval, lag) = {
                let inner = self.inner.lock().unwrap();
                (
                    inner.mode == Mode::Hang,
                    (inner.watch_closures, inner.doors[spec.door].watch_closures) != closures,
                    inner.bookmark_requests,
                    inner.bookmark_interval,
                    inner.watch_lag,
                )
            };
            let lags = |e: &WatchEvent| lag.is_some_and(|lag| e.rv > lag);
            if hung {
                // Nothing goes out, and nothing is taken from this watcher's buffer: events wait
                // there (and the watcher is closed if it overflows).
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
                continue;
            }
            let now = tokio::time::Instant::now();
            if closed || deadline.is_some_and(|d| now >= d) {
                return;
            }
            while let Some(e) = held.pop_front() {
                if lags(&e) {
                    held.push_front(e);
                    break;
                }
                if !deliver(&tx, &mut last, &e, matches(&e)).await {
                    return;
                }
            }
            let next_bookmark =
                (spec.bookmarks && !interval.is_zero()).then(|| last_bookmark + interval);
            if spec.bookmarks
                && (requested != bookmark_requests || next_bookmark.is_some_and(|b| now >= b))
            {
                bookmark_requests = requested;
                last_bookmark = now;
                // Every event up to `current` is in the buffer already: send those first, so the
                // bookmark's promise (nothing up to it left to see) holds.
                let current = self.inner.lock().unwrap().rv;
                loop {
                    match rx.try_recv() {
                        Ok(e) if !held.is_empty() || lags(&e) => held.push_back(e),
                        Ok(e) => {
                            if !deliver(&tx, &mut last, &e, matches(&e)).await {
                                return;
                            }
                        }
                        Err(broadcast::error::TryRecvError::Empty) => break,
                        Err(_) => return,
                    }
                }
                // A lagging cache promises only what it has delivered.
                let at = if held.is_empty() {
                    current.max(last)
                } else {
                    last
                };
                if at > start_rv {
                    if tx.send(line(bookmark(at, false))).await.is_err() {
                        return;
                    }
                    self.inner.lock().unwrap().bookmarks_sent.push(at);
                }
                continue;
            }
            let wake = match (deadline, next_bookmark) {
                (Some(d), Some(b)) => Some(d.min(b)),
                (d, b) => d.or(b),
            };
            tokio::select! {
                event = rx.recv() => match event {
                    Ok(e) => {
                        if self.inner.lock().unwrap().mode == Mode::Hang || !held.is_empty() || lags(&e) {
                            held.push_back(e);
                        } else if !deliver(&tx, &mut last, &e, matches(&e)).await {
                            return;
                        }
                    }
                    // Too far behind: the watch cache closes such a watcher; the client watches
                    // again from its last resourceVersion.
                    Err(_) => return,
                },
                changed = changes.changed() => if changed.is_err() { return },
                () = sleep_opt(wake) => {}
                () = tx.closed() => return,
            }
        }
    }

    /// Answers again the requests [`ApiServer::lose_answers`] named (those already lost stay
    /// unanswered), and those [`ApiServer::slow_answers`] named at once.
    pub fn keep_answers(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.lost_answers.clear();
        inner.slow_answers.clear();
    }
}

/// 415 for a patch that is neither a JSON merge patch nor a strategic merge patch.
fn unsupported_patch(headers: &HeaderMap) -> Option<Response<Body>> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let served = content_type.starts_with("application/merge-patch+json")
        || content_type.starts_with("application/strategic-merge-patch+json");
    (!served).then(|| {
        status_response(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (this test server serves no others; got {content_type:?})"
            ),
        )
    })
}

/// `ValidateEventUpdate` for events.k8s.io/v1 (the fields that request version can set).
fn event_update_errors(new: &Value, old: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let present = |v: &Value| !v.is_null();
    for field in ["name", "namespace", "uid"] {
        let (n, o) = (&new["metadata"][field], &old["metadata"][field]);
        if present(n) && n != o {
            errors.push(FieldError::invalid(
                &format!("metadata.{field}"),
                &n.to_string(),
                "field is immutable",
            ));
        }
    }
    if new["series"] != old["series"] && present(&new["series"]) {
        if new["series"]["count"].as_i64().unwrap_or(0) < 2 {
            errors.push(FieldError::invalid(
                "series.count",
                "\"\"",
                "should be at least 2",
            ));
        }
        if new["series"]["lastObservedTime"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            errors.push(FieldError::required("series.lastObservedTime", ""));
        }
    }
    // events.k8s.io/v1 names: regarding is involvedObject, note is message.
    for (field, path) in [
        ("regarding", "involvedObject"),
        ("reason", "reason"),
        ("note", "message"),
        ("type", "type"),
        ("action", "action"),
        ("related", "related"),
        ("reportingController", "reportingController"),
        ("reportingInstance", "reportingInstance"),
    ] {
        if new[field] != old[field] {
            errors.push(FieldError::invalid(
                path,
                &new[field].to_string(),
                "field is immutable",
            ));
        }
    }
    // eventTime may differ below a microsecond only.
    let micros = |v: &Value| {
        v.as_str()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .map(|t| t.as_microsecond())
    };
    if micros(&new["eventTime"]) != micros(&old["eventTime"]) {
        errors.push(FieldError::invalid(
            "eventTime",
            &new["eventTime"].to_string(),
            "field is immutable",
        ));
    }
    errors
}

/// Sends `e` on a watch stream unless it was already passed (`last`) or is not `wanted`; false
/// once the client is gone.
async fn deliver(tx: &mpsc::Sender<Bytes>, last: &mut u64, e: &WatchEvent, wanted: bool) -> bool {
    if e.rv <= *last {
        return true;
    }
    *last = e.rv;
    !wanted
        || tx
            .send(line(json!({"type": e.kind, "object": e.object})))
            .await
            .is_ok()
}

/// Drops the oldest watch events beyond the limit, and those older than the window beyond the
/// ones always kept; watches from before a dropped event get 410 Gone.
fn trim_history(inner: &mut Inner) {
    let now = Instant::now();
    while let Some(front) = inner.history.front() {
        let len = inner.history.len();
        let over_limit = len > inner.history_limit;
        let stale = len > HISTORY_KEPT_ANYWAY.min(inner.history_limit)
            && now.duration_since(front.at) > inner.history_window;
        if !(over_limit || stale) {
            break;
        }
        let dropped = front.rv;
        inner.history.pop_front();
        // As the watch cache reckons: a watch may start one before the oldest kept event.
        let floor = inner.history.front().map_or(dropped, |e| e.rv - 1);
        inner.oldest_watchable = inner.oldest_watchable.max(floor);
    }
}

struct WatchSpec {
    /// The door it came through.
    door: usize,
    ns: Option<String>,
    selector: Selector,
    from: u64,
    timeout: Option<Duration>,
    bookmarks: bool,
    /// `sendInitialEvents`, when given.
    initial: Option<bool>,
}

/// Counts an open watch stream while it lives.
struct OpenWatch(Arc<Mutex<Inner>>);

impl OpenWatch {
    fn new(server: &ApiServer) -> OpenWatch {
        server.inner.lock().unwrap().open_watches += 1;
        OpenWatch(server.inner.clone())
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.open_watches -= 1;
        }
    }
}

/// A connection as accepted through a door: it passes nothing either way while its door is a
/// [`Fault::Blackhole`], or for good once a [`Fault::HalfOpen`] cut it. Reads and writes then stay
/// pending (the peer sees a connection that is up and silent) until the door lets them through
/// again, or the connection is reset.
struct DoorIo {
    stream: TcpStream,
    inner: Arc<Mutex<Inner>>,
    door: usize,
    /// Its number among the door's connections, in the order they were accepted.
    number: u64,
}

impl DoorIo {
    /// Whether data may pass now; when not, `cx` is woken when the door's fault changes.
    fn passes(&self, cx: &Context<'_>) -> bool {
        let mut inner = self.inner.lock().unwrap();
        let state = &mut inner.doors[self.door];
        let stopped = state.fault == Fault::Blackhole || self.number < state.cut_below;
        if stopped && !state.blocked.iter().any(|w| w.will_wake(cx.waker())) {
            state.blocked.push(cx.waker().clone());
        }
        !stopped
    }
}

impl Drop for DoorIo {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.doors[self.door].open -= 1;
        }
    }
}

impl AsyncRead for DoorIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.passes(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for DoorIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.passes(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.passes(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.passes(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.passes(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// Another port of the same server, for one client: see the module documentation. Its fault
/// applies to it only; the server's global faults apply to it as well.
#[derive(Clone)]
pub struct Door {
    server: ApiServer,
    index: usize,
    addr: SocketAddr,
}

impl Door {
    /// Its number: [`Seen::door`] and [`Write::door`] name it (0 is the server's own port).
    pub fn index(&self) -> usize {
        self.index
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig pointing at this door, with `namespace` as the context's namespace.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        kubeconfig(&self.url(), namespace)
    }

    /// Sets this door's fault (see [`Fault`]). Entering [`Fault::HalfOpen`] cuts the connections
    /// accepted so far, [`Fault::Status`] closes this door's open watches, [`Fault::Refuse`]
    /// resets its connections; leaving [`Fault::HalfOpen`] resets those it cut.
    pub fn set_fault(&self, fault: Fault) {
        let mut inner = self.server.inner.lock().unwrap();
        let state = &mut inner.doors[self.index];
        match fault {
            Fault::HalfOpen => state.cut_below = state.next_connection,
            Fault::Status(..) => state.watch_closures += 1,
            _ => {}
        }
        state.fault = fault;
        let blocked = std::mem::take(&mut state.blocked);
        drop(inner);
        for waker in blocked {
            waker.wake();
        }
        self.server.notify();
    }

    /// Its fault now.
    pub fn fault(&self) -> Fault {
        self.server.inner.lock().unwrap().doors[self.index]
            .fault
            .clone()
    }

    /// Connections open through it now (cut ones included).
    pub fn open_connections(&self) -> usize {
        self.server.inner.lock().unwrap().doors[self.index].open
    }

    /// Every request read through it so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.server
            .seen()
            .into_iter()
            .filter(|s| s.door == self.index)
            .collect()
    }

    /// Number of its requests with `verb` seen since `since`.
    pub fn count(&self, verb: &str, since: Instant) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.verb == verb && s.at >= since)
            .count()
    }

    /// Number of its requests with `verb` seen since the server started.
    pub fn total(&self, verb: &str) -> usize {
        self.seen().iter().filter(|s| s.verb == verb).count()
    }

    /// Every successful Lease write that came through it.
    pub fn writes(&self) -> Vec<Write> {
        self.server
            .writes()
            .into_iter()
            .filter(|w| w.door == self.index)
            .collect()
    }
}

/// A BOOKMARK event as the watch cache sends it: an empty Lease but for its resourceVersion.
fn bookmark(rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": "Lease", "apiVersion": API_VERSION, "metadata": metadata, "spec": {}}})
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A field selector on Leases: only `metadata.name` and `metadata.namespace` are supported, with
/// `=`, `==` or `!=`.
#[derive(Clone, Default)]
struct Selector {
    terms: Vec<(String, bool, String)>,
}

impl Selector {
    fn parse(uri: &Uri) -> Result<Selector, Reject> {
        let Some(text) = query(uri, "fieldSelector").filter(|s| !s.is_empty()) else {
            return Ok(Selector::default());
        };
        let mut terms = Vec::new();
        for term in text.split(',') {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(Box::new(bad_request(&format!(
                    "invalid field selector: invalid selector: '{text}'; can't understand '{term}'"
                ))));
            };
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(Box::new(bad_request(&format!(
                    "field label not supported: {field}"
                ))));
            }
            terms.push((field.to_string(), equal, value.to_string()));
        }
        Ok(Selector { terms })
    }

    fn matches(&self, namespace: &str, name: &str) -> bool {
        self.terms.iter().all(|(field, equal, value)| {
            let actual = if field == "metadata.name" {
                name
            } else {
                namespace
            };
            (actual == value) == *equal
        })
    }
}

/// A streaming body fed by a task through a channel.
fn async_stream<F, Fut>(producer: F) -> Body
where
    F: FnOnce(mpsc::Sender<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(64);
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

/// Sets what the server sets on a new object (`FillObjectMetaSystemFields`): uid and creation
/// time. `rv` is the resourceVersion it will get, which makes the uid unique.
fn stamp_new(object: &mut Value, rv: u64) {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    object["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{rv:012}"));
    object["metadata"]["creationTimestamp"] = json!(second_now());
}

/// The 5 characters `generateName` gets, from the alphabet the real server uses.
fn generated_suffix(seed: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
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

/// A request body as JSON: 400 BadRequest if it is not.
fn parse_json(body: &[u8]) -> Result<Value, Reject> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(bad_request(&format!(
            "couldn't get version/kind; json parse error: {e}"
        )))
    })
}

/// A Lease request body as the server decodes it: JSON (400 otherwise), of kind Lease in
/// coordination.k8s.io/v1 when it says (400 otherwise), typed (400 on a field of the wrong type).
fn decode_lease(body: &[u8]) -> Result<Value, Reject> {
    let value = parse_json(body)?;
    if let Some(kind) = value.get("kind").and_then(Value::as_str)
        && kind != "Lease"
    {
        return Err(Box::new(bad_request(&format!(
            "the object provided is unrecognized (must be of type Lease): kind {kind:?}"
        ))));
    }
    if let Some(version) = value.get("apiVersion").and_then(Value::as_str)
        && version != API_VERSION
    {
        return Err(Box::new(bad_request(&format!(
            "the API version in the data ({version}) does not match the expected API version ({API_VERSION})"
        ))));
    }
    normalize_lease(value).map_err(|e| {
        Box::new(bad_request(&format!(
            "Lease in version \"v1\" cannot be handled as a Lease: {e}"
        )))
    })
}

/// Decodes `value` as a typed Lease and writes it back as the Go type serializes: unknown and
/// null fields dropped, empty metadata lists and maps omitted, `spec` always present, MicroTimes
/// with microseconds.
fn normalize_lease(mut value: Value) -> Result<Value, String> {
    if let Some(map) = value.as_object_mut() {
        map.entry("apiVersion").or_insert(json!(API_VERSION));
        map.entry("kind").or_insert(json!("Lease"));
    }
    let lease: k8s_openapi::api::coordination::v1::Lease =
        serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut out = serde_json::to_value(&lease).map_err(|e| e.to_string())?;
    if let Some(meta) = out["metadata"].as_object_mut() {
        meta.retain(|_, v| match v {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            Value::String(s) => !s.is_empty(),
            _ => true,
        });
    } else {
        out["metadata"] = json!({});
    }
    if !out["spec"].is_object() {
        out["spec"] = json!({});
    }
    Ok(out)
}

/// A resourceVersion as the versioner reads it: empty is 0, anything but digits an untyped error.
fn parse_rv(value: &Value) -> Result<u64, String> {
    match value.as_str() {
        None | Some("") => Ok(0),
        Some(text) => text
            .parse()
            .map_err(|_| format!("strconv.ParseUint: parsing {text:?}: invalid syntax")),
    }
}

/// One entry of a field.ErrorList.
#[derive(Debug, Clone)]
pub struct FieldError {
    /// The field path.
    pub field: String,
    /// The cause reason (FieldValueInvalid, …).
    pub reason: &'static str,
    /// What `ErrorBody()` prints.
    pub body: String,
}

impl FieldError {
    fn invalid(field: &str, value: &str, detail: &str) -> FieldError {
        FieldError {
            field: field.to_string(),
            reason: "FieldValueInvalid",
            body: format!("Invalid value: {value}: {detail}"),
        }
    }

    fn required(field: &str, detail: &str) -> FieldError {
        FieldError {
            field: field.to_string(),
            reason: "FieldValueRequired",
            body: format!("Required value: {detail}"),
        }
    }

    fn forbidden(field: &str, detail: &str) -> FieldError {
        FieldError {
            field: field.to_string(),
            reason: "FieldValueForbidden",
            body: format!("Forbidden: {detail}"),
        }
    }

    fn not_supported(field: &str, value: &str, supported: &[&str]) -> FieldError {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        FieldError {
            field: field.to_string(),
            reason: "FieldValueNotSupported",
            body: format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body)
    }
}

const DNS1123_SUBDOMAIN_MESSAGE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const QUALIFIED_NAME_MESSAGE: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
/// The one Kubernetes-defined coordinated leader election strategy.
const LEASE_STRATEGIES: [&str; 1] = ["OldestEmulationVersion"];

/// `IsDNS1123Subdomain`.
pub fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 253 {
        errors.push("must be no more than 253 characters".to_string());
    }
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    if !value.split('.').all(label) {
        errors.push(DNS1123_SUBDOMAIN_MESSAGE.to_string());
    }
    errors
}

/// `IsQualifiedName`.
pub fn qualified_name_errors(value: &str) -> Vec<String> {
    let parts: Vec<&str> = value.split('/').collect();
    let mut errors = Vec::new();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_string());
            } else {
                errors.extend(
                    dns1123_subdomain_errors(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            *name
        }
        _ => {
            return vec![format!(
                "a qualified name {QUALIFIED_NAME_MESSAGE} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_string());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 characters".to_string());
    }
    let b = name.as_bytes();
    let valid = !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if !valid {
        errors.push(format!("name part {QUALIFIED_NAME_MESSAGE}"));
    }
    errors
}

/// `ValidateObjectMeta` on a new Lease's name (`NameIsDNSSubdomain`).
fn name_errors(name: &str) -> Vec<FieldError> {
    dns1123_subdomain_errors(name)
        .iter()
        .map(|m| FieldError::invalid("metadata.name", &format!("{name:?}"), m))
        .collect()
}

/// `ValidateAnnotations`: every key a qualified name (case aside), 256 KiB in all.
pub fn annotation_errors(metadata: &Value) -> Vec<FieldError> {
    let Some(annotations) = metadata["annotations"].as_object() else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    let mut size = 0;
    for (key, value) in annotations {
        for message in qualified_name_errors(&key.to_lowercase()) {
            errors.push(FieldError::invalid(
                "metadata.annotations",
                &format!("{key:?}"),
                &message,
            ));
        }
        size += key.len() + value.as_str().map_or(0, str::len);
    }
    if size > 256 * 1024 {
        errors.push(FieldError {
            field: "metadata.annotations".into(),
            reason: "FieldValueTooLong",
            body: "Too long: must have at most 262144 bytes".into(),
        });
    }
    errors
}

/// `ValidateLeaseSpec`.
pub fn spec_errors(spec: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(n) = spec["leaseDurationSeconds"].as_i64()
        && n <= 0
    {
        errors.push(FieldError::invalid(
            "spec.leaseDurationSeconds",
            &n.to_string(),
            "must be greater than 0",
        ));
    }
    if let Some(n) = spec["leaseTransitions"].as_i64()
        && n < 0
    {
        errors.push(FieldError::invalid(
            "spec.leaseTransitions",
            &n.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    let strategy = spec["strategy"].as_str();
    if let Some(strategy) = strategy {
        // The real code appends "strategy" to a path that already ends in it.
        let field = "spec.strategy.strategy";
        if !strategy.contains('/') {
            if !LEASE_STRATEGIES.contains(&strategy) {
                errors.push(FieldError::not_supported(
                    field,
                    &format!("{strategy:?}"),
                    &LEASE_STRATEGIES,
                ));
            }
        } else {
            for message in qualified_name_errors(strategy) {
                errors.push(FieldError::invalid(
                    field,
                    &format!("{strategy:?}"),
                    &message,
                ));
            }
        }
    }
    if spec["preferredHolder"]
        .as_str()
        .is_some_and(|p| !p.is_empty())
        && strategy.is_none_or(str::is_empty)
    {
        errors.push(FieldError::forbidden(
            "spec.preferredHolder",
            "may only be specified if `strategy` is defined",
        ));
    }
    errors
}

fn query(uri: &Uri, key: &str) -> Option<String> {
    query_param(uri.query()?, key)
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
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

/// An error answer, boxed (it is large).
type Reject = Box<Response<Body>>;

fn json_response(code: u16, value: Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap()
}

/// A Kubernetes `Status` error body; an empty `reason` is left out (StatusReasonUnknown).
pub fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    status_with(code, reason, message, None)
}

/// A Kubernetes `Status` error body with `details`.
pub fn status_with(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    let mut status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "code": code});
    if !reason.is_empty() {
        status["reason"] = json!(reason);
    }
    if let Some(details) = details {
        status["details"] = details;
    }
    json_response(code, status)
}

fn lease_details(name: &str) -> Option<Value> {
    Some(json!({"name": name, "group": GROUP, "kind": "leases"}))
}

fn bad_request(message: &str) -> Response<Body> {
    status_response(400, "BadRequest", message)
}

fn not_found(name: &str) -> Response<Body> {
    status_with(
        404,
        "NotFound",
        &format!("leases.coordination.k8s.io \"{name}\" not found"),
        lease_details(name),
    )
}

fn already_exists(name: &str) -> Response<Body> {
    status_with(
        409,
        "AlreadyExists",
        &format!("leases.coordination.k8s.io \"{name}\" already exists"),
        lease_details(name),
    )
}

/// The store's `OptimisticLockErrorMsg`.
const OPTIMISTIC_LOCK: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

fn conflict(name: &str, why: &str) -> Response<Body> {
    status_with(
        409,
        "Conflict",
        &format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": {why}"),
        lease_details(name),
    )
}

/// `NewInvalid`: 422 with one cause per field error.
fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> Response<Body> {
    let qualified = match (kind, group) {
        ("", _) => String::new(),
        (kind, "") => kind.to_string(),
        (kind, group) => format!("{kind}.{group}"),
    };
    let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let list = if list.len() == 1 {
        list[0].clone()
    } else {
        format!("[{}]", list.join(", "))
    };
    let mut details = json!({"causes": errors.iter().map(|e| json!({"reason": e.reason, "message": e.body, "field": e.field})).collect::<Vec<_>>()});
    for (key, value) in [("name", name), ("group", group), ("kind", kind)] {
        if !value.is_empty() {
            details[key] = json!(value);
        }
    }
    status_with(
        422,
        "Invalid",
        &format!("{qualified} {name:?} is invalid: {list}"),
        Some(details),
    )
}

/// The lease strategy's `PrepareForCreate`/`PrepareForUpdate`: without the CoordinatedLeaderElection
/// feature, `spec.strategy` and `spec.preferredHolder` are dropped unless the stored Lease already
/// has them.
fn prepare(inner: &Inner, object: &mut Value, old: Option<&Value>) {
    if inner.coordinated {
        return;
    }
    for field in ["strategy", "preferredHolder"] {
        let kept = old.is_some_and(|o| !o["spec"][field].is_null());
        if !kept && let Some(spec) = object["spec"].as_object_mut() {
            spec.remove(field);
        }
    }
}

/// The answer kube-apiserver gives with `code` to a request on `route`: the reason, message and
/// details its own errors carry, and for 429 the priority-and-fairness filter's plain-text answer.
fn fault(code: u16, retry_after: Option<u64>, route: &Route, verb: &str) -> Response<Body> {
    let (resource, group, name, ns) = route.target();
    let qualified = format!("{resource}.{group}");
    // Errors about a resource (NewForbidden, NewNotFound, NewConflict, …) name it in their
    // details; server errors (NewInternalError, NewServiceUnavailable, NewTimeoutError) do not.
    let details = |about_resource: bool, extra: Value| {
        let mut d = json!({});
        if about_resource {
            d = json!({"group": group, "kind": resource});
            if let Some(name) = name {
                d["name"] = json!(name);
            }
        }
        if let Some(secs) = retry_after {
            d["retryAfterSeconds"] = json!(secs);
        }
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                d[k] = v;
            }
        }
        (d != json!({})).then_some(d)
    };
    let mut response = match code {
        400 => status_response(
            400,
            "BadRequest",
            "the server rejected our request for an unknown reason",
        ),
        401 => status_response(401, "Unauthorized", "Unauthorized"),
        403 => {
            let verb = match verb {
                "create-event" => "create",
                "patch-event" => "patch",
                v => v,
            };
            let subject = match name {
                Some(name) => format!("{qualified} {name:?} is forbidden"),
                None => format!("{qualified} is forbidden"),
            };
            let scope = match ns {
                Some(ns) => format!(" in the namespace {ns:?}"),
                None => " at the cluster scope".to_string(),
            };
            status_with(
                403,
                "Forbidden",
                &format!(
                    "{subject}: User \"system:serviceaccount:default:test\" cannot {verb} resource {resource:?} in API group {group:?}{scope}"
                ),
                details(true, Value::Null),
            )
        }
        404 => status_with(
            404,
            "NotFound",
            &match name {
                Some(name) => format!("{qualified} {name:?} not found"),
                None => "the server could not find the requested resource".to_string(),
            },
            details(true, Value::Null),
        ),
        405 => status_response(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
        409 => status_with(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {qualified} {:?}: {OPTIMISTIC_LOCK}",
                name.unwrap_or("")
            ),
            details(true, Value::Null),
        ),
        410 => status_response(410, "Expired", "too old resource version: 1 (100)"),
        413 => status_response(
            413,
            "RequestEntityTooLarge",
            &format!("Request entity too large: limit is {MAX_BODY}"),
        ),
        422 => status_with(
            422,
            "Invalid",
            &format!("{qualified} {:?} is invalid", name.unwrap_or("")),
            details(true, json!({"causes": []})),
        ),
        // The priority-and-fairness (and max-in-flight) filter answers in plain text, always with
        // a Retry-After.
        429 => {
            let mut response = Response::builder()
                .status(429)
                .header("content-type", "text/plain; charset=utf-8")
                .header("x-content-type-options", "nosniff")
                .body(Body::from("Too many requests, please try again later.\n"))
                .unwrap();
            let secs = retry_after.unwrap_or(1);
            response.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&secs.to_string()).unwrap(),
            );
            return response;
        }
        500 => status_with(
            500,
            "InternalError",
            "Internal error occurred: injected fault",
            details(false, json!({"causes": [{"message": "injected fault"}]})),
        ),
        503 => status_with(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
            details(false, Value::Null),
        ),
        504 => status_with(
            504,
            "Timeout",
            "Timeout: request did not complete within requested timeout - context deadline exceeded",
            details(false, Value::Null),
        ),
        code => status_response(
            code,
            "",
            &format!(
                "the server responded with the status code {code} but did not return more information"
            ),
        ),
    };
    if let Some(secs) = retry_after {
        response.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(&secs.to_string()).unwrap(),
        );
    }
    response
}

/// A TCP and UDP port on 127.0.0.1 that is free now and stays free for whoever binds it next.
///
/// Binding port 0 and closing the socket (the usual trick) races: until the caller binds the port,
/// the kernel may hand it to any other socket, since it lies in the ephemeral range (connections
/// made by the tests, by lease-exec, by another test's server). Ports below
/// `net.ipv4.ip_local_port_range` are never handed out by the kernel: this takes one of those
/// (checked free by binding it), and never the same one twice in this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low <= LOWEST + 100 {
        // No room below the ephemeral range here: fall back to asking the kernel.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = ephemeral_low - LOWEST;
    // Spread test processes over the range; within one, a counter.
    let offset = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let port = (LOWEST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOWEST} and {ephemeral_low}");
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
    Get {
        ns: String,
        name: String,
    },
    List {
        ns: Option<String>,
        watch: bool,
    },
    Create {
        ns: String,
    },
    Update {
        ns: String,
        name: String,
    },
    Patch {
        ns: String,
        name: String,
    },
    Delete {
        ns: String,
        name: String,
    },
    CreateEvent {
        ns: String,
    },
    /// A SelfSubjectAccessReview: answered from what `deny` refuses.
    AccessReview,
    /// `strict`: through events.k8s.io/v1, validated as an update there.
    PatchEvent {
        ns: String,
        name: String,
        strict: bool,
    },
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
            Route::AccessReview => "access-review",
            Route::PatchEvent { .. } => "patch-event",
        }
    }

    /// (resource, group, name, namespace) the request is about, for error messages.
    fn target(&self) -> (&'static str, &'static str, Option<&str>, Option<&str>) {
        match self {
            Route::Get { ns, name }
            | Route::Update { ns, name }
            | Route::Patch { ns, name }
            | Route::Delete { ns, name } => ("leases", GROUP, Some(name), Some(ns)),
            Route::List { ns, .. } => ("leases", GROUP, None, ns.as_deref()),
            Route::Create { ns } => ("leases", GROUP, None, Some(ns)),
            Route::CreateEvent { ns } => ("events", "events.k8s.io", None, Some(ns)),
            Route::AccessReview => (
                "selfsubjectaccessreviews",
                "authorization.k8s.io",
                None,
                None,
            ),
            Route::PatchEvent { ns, name, .. } => ("events", "events.k8s.io", Some(name), Some(ns)),
            Route::Discovery(_) | Route::NotFound => ("leases", GROUP, None, None),
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
            (
                "POST",
                [
                    "apis",
                    "authorization.k8s.io",
                    "v1",
                    "selfsubjectaccessreviews",
                ],
            ) => Route::AccessReview,
            ("POST", ["api", "v1", "namespaces", ns, "events"])
            | ("POST", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
                Route::CreateEvent { ns: ns.to_string() }
            }
            ("PATCH", ["api", "v1", "namespaces", ns, "events", name]) => Route::PatchEvent {
                ns: ns.to_string(),
                name: name.to_string(),
                strict: false,
            },
            (
                "PATCH",
                [
                    "apis",
                    "events.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "events",
                    name,
                ],
            ) => Route::PatchEvent {
                ns: ns.to_string(),
                name: name.to_string(),
                strict: true,
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
