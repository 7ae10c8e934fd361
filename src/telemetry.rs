//! What lease-exec tells the outside world about itself: Prometheus metrics and probes over HTTP
//! (`--metrics-addr`), a statsd heartbeat while leading (`--statsd-addr`), and Kubernetes Events
//! on the Lease. None of them can affect the election: every send is fire-and-forget, and a
//! failing sink is logged once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The metrics, and the state the probes report.
pub struct Metrics {
    registry: Registry,
    is_leader: Gauge,
    transitions: Counter,
    renewals: Counter,
    renewal_failures: Counter,
    renewal_duration: Histogram,
    child_running: Gauge,
    losses: Family<Vec<(String, String)>, Counter>,
    /// Renewals are failing right now (since the last success).
    failing: AtomicBool,
}

impl Metrics {
    /// Registers every metric; `lease_exec_lease_info{lease,namespace,identity}` is set to 1.
    pub fn new(lease: &str, namespace: &str, identity: &str) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("lease_exec");
        let is_leader = Gauge::default();
        let transitions = Counter::default();
        let renewals = Counter::default();
        let renewal_failures = Counter::default();
        let renewal_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let child_running = Gauge::default();
        let losses = Family::<Vec<(String, String)>, Counter>::default();
        let info = Family::<Vec<(String, String)>, Gauge>::default();
        info.get_or_create(&vec![
            ("lease".into(), lease.into()),
            ("namespace".into(), namespace.into()),
            ("identity".into(), identity.into()),
        ])
        .set(1);
        registry.register(
            "is_leader",
            "1 while this process holds the lease",
            is_leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Times this process acquired the lease",
            transitions.clone(),
        );
        registry.register("renewals", "Successful renewals", renewals.clone());
        registry.register(
            "leadership_losses",
            "Terms that ended with leadership lost, by reason (renew_deadline, suspended, taken)",
            losses.clone(),
        );
        registry.register(
            "renewal_failures",
            "Failed renewal attempts",
            renewal_failures.clone(),
        );
        registry.register(
            "renewal_duration_seconds",
            "Duration of renewal requests, successful or not",
            renewal_duration.clone(),
        );
        registry.register(
            "child_running",
            "1 while the command runs",
            child_running.clone(),
        );
        registry.register(
            "lease_info",
            "The lease, namespace and identity of this process",
            info,
        );
        Arc::new(Metrics {
            registry,
            is_leader,
            losses,
            transitions,
            renewals,
            renewal_failures,
            renewal_duration,
            child_running,
            failing: AtomicBool::new(false),
        })
    }

    /// This process acquired the lease.
    pub fn acquired(&self) {
        self.is_leader.set(1);
        self.transitions.inc();
        self.failing.store(false, Ordering::Relaxed);
    }

    /// This process no longer holds the lease.
    pub fn left(&self) {
        self.is_leader.set(0);
    }

    /// Leadership was lost for `reason` (see [`crate::term::Reason::label`]).
    pub fn lost(&self, reason: &str) {
        self.losses
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// The command started (`true`) or ended.
    pub fn child(&self, running: bool) {
        self.child_running.set(i64::from(running));
    }

    /// One renewal attempt ended.
    pub fn renewal(&self, ok: bool, took: Duration) {
        self.renewal_duration.observe(took.as_secs_f64());
        if ok {
            self.renewals.inc();
        } else {
            self.renewal_failures.inc();
        }
        self.failing.store(!ok, Ordering::Relaxed);
    }

    /// `/leader`: holding the lease.
    pub fn is_leader(&self) -> bool {
        self.is_leader.get() == 1
    }

    /// `/healthz`: waiting, or leading with healthy renewals.
    pub fn healthy(&self) -> bool {
        !(self.is_leader() && self.failing.load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Pause after a failed `accept` on the metrics port.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Binds `addr` (before anything else is touched, so a taken port is a start-up error) and serves
/// `/metrics`, `/healthz` and `/leader`.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors (EMFILE/ENFILE) or memory: the error repeats until
                    // something is freed, so pause instead of spinning on it and starving the
                    // supervisor on this single-threaded runtime.
                    tracing::debug!(error = %e, "cannot accept a metrics connection");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, Infallible>(answer(&metrics, req.uri().path())) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

fn answer(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" if metrics.healthy() => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "renewals are failing\n".into(),
        ),
        "/leader" if metrics.is_leader() => (StatusCode::OK, "text/plain", "leader\n".into()),
        "/leader" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not leader\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Sends `<prefix>.leader_running:1|c` every period while leading.
pub struct Statsd {
    client: Option<cadence::StatsdClient>,
}

impl Statsd {
    /// A client for `addr` (HOST:PORT); on failure, logs and stays silent: statsd never affects
    /// the election.
    pub fn new(addr: &str, prefix: &str) -> Statsd {
        let client = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| {
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .map_err(|e| e.to_string())
            .and_then(|socket| {
                cadence::UdpMetricSink::from(addr, socket).map_err(|e| e.to_string())
            })
            .map(|sink| cadence::StatsdClient::from_sink(prefix, sink));
        match client {
            Ok(client) => Statsd {
                client: Some(client),
            },
            Err(e) => {
                tracing::warn!(addr, error = %e, "statsd disabled: cannot use --statsd-addr");
                Statsd { client: None }
            }
        }
    }

    /// Starts the heartbeat; abort the handle when leadership ends.
    pub fn heartbeat(self: &Arc<Self>, period: Duration) -> Option<JoinHandle<()>> {
        self.client.as_ref()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            use cadence::Counted;
            let warned = AtomicBool::new(false);
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if let Some(client) = &this.client
                    && let Err(e) = client.count("leader_running", 1)
                    && !warned.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, "cannot send to statsd; continuing without it");
                }
            }
        }))
    }
}

/// Kubernetes Events on the Lease, like client-go's "became leader".
pub struct Events {
    recorder: Option<Recorder>,
    reference: Mutex<Option<ObjectReference>>,
    identity: String,
    forbidden_logged: Arc<AtomicBool>,
    pending: Mutex<Vec<JoinHandle<()>>>,
}

/// What happened to the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// This process became leader.
    Acquired,
    /// This process lost leadership.
    Lost,
    /// This process released the lease.
    Released,
}

impl Events {
    /// `enabled: false` (`--no-events`) records nothing.
    pub fn new(client: kube::Client, identity: &str, enabled: bool) -> Events {
        let recorder = enabled.then(|| {
            Recorder::new(
                client,
                Reporter {
                    controller: "lease-exec".into(),
                    instance: Some(identity.to_string()),
                },
            )
        });
        Events {
            recorder,
            reference: Mutex::new(None),
            identity: identity.to_string(),
            forbidden_logged: Arc::default(),
            pending: Mutex::default(),
        }
    }

    /// The Lease the events are about (its uid comes from a read or write).
    pub fn regarding(&self, lease: &k8s_openapi::api::coordination::v1::Lease) {
        let reference = ObjectReference {
            api_version: Some("coordination.k8s.io/v1".into()),
            kind: Some("Lease".into()),
            name: lease.metadata.name.clone(),
            namespace: lease.metadata.namespace.clone(),
            uid: lease.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        *self.reference.lock().unwrap_or_else(|e| e.into_inner()) = Some(reference);
    }

    /// Records an event in the background.
    pub fn publish(&self, what: LeaseEvent, detail: &str) {
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        let Some(reference) = self
            .reference
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let (type_, reason, action, note) = match what {
            LeaseEvent::Acquired => (
                EventType::Normal,
                "LeaderElection",
                "Acquire",
                format!("{} became leader", self.identity),
            ),
            LeaseEvent::Lost => (
                EventType::Warning,
                "LeadershipLost",
                "Lose",
                format!("{} stopped leading: {detail}", self.identity),
            ),
            LeaseEvent::Released => (
                EventType::Normal,
                "LeaseReleased",
                "Release",
                format!("{} released the lease", self.identity),
            ),
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let forbidden_logged = self.forbidden_logged.clone();
        let task = tokio::spawn(async move {
            match recorder.publish(&event, &reference).await {
                Ok(()) => {}
                Err(kube::Error::Api(status)) if status.code == 403 => {
                    if !forbidden_logged.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "cannot record Events (403): grant create and patch on events.k8s.io events, or pass --no-events"
                        );
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot record an Event"),
            }
        });
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Only the tasks still sending are kept for `flush`: with --recampaign every term
        // publishes, and a process may run for months.
        pending.retain(|task| !task.is_finished());
        pending.push(task);
    }

    /// Waits (briefly) for events still being sent, before exiting.
    pub async fn flush(&self, limit: Duration) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::time::timeout(limit, async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API server that answers every request at once (with a 500: the Event is not recorded,
    /// its task ends all the same).
    fn client() -> kube::Client {
        let service = tower::service_fn(|_: Request<kube::client::Body>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        });
        kube::Client::new(service, "default")
    }

    /// Each term of `--recampaign` publishes its events: the tasks that sent them are not kept once
    /// they have ended, so a process that runs for months holds only the ones still sending.
    #[tokio::test]
    async fn finished_event_tasks_are_not_kept() {
        let events = Events::new(client(), "me", true);
        let mut lease = k8s_openapi::api::coordination::v1::Lease::default();
        lease.metadata.name = Some("job".into());
        lease.metadata.namespace = Some("default".into());
        events.regarding(&lease);
        let pending = || {
            let tasks = events.pending.lock().unwrap();
            (
                tasks.len(),
                tasks.iter().filter(|t| !t.is_finished()).count(),
            )
        };
        for _ in 0..100 {
            events.publish(LeaseEvent::Acquired, "");
            events.publish(LeaseEvent::Lost, "the lease was taken");
            events.publish(LeaseEvent::Released, "");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while pending().1 > 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "events still sending"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let (kept, running) = pending();
        assert_eq!(running, 0);
        // At most the last term's three, whose ending nothing has looked at yet.
        assert!(kept <= 3, "{kept} tasks kept after 100 terms");
        events.flush(Duration::from_secs(1)).await;
    }
}
