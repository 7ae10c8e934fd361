//! Keeping the Lease: renew every retry period with a conditional update, publish each success on a
//! `watch` channel, and report at once when another holder shows up.
//!
//! The renewer does not decide when renewals have failed for too long: the supervisor derives both
//! the renew deadline and the kill deadline from the published `renewed_at`, so a renewer stuck in
//! a request can never delay the decision.
//!
//! Besides renewing, the leader watches its own Lease ([`guard`]). A takeover without expiry (an
//! operator or another client overwriting the holder, or clearing it) means another worker may
//! already run: it is published as [`LeaseState::Taken`] within milliseconds, not at the next
//! renewal, and the supervisor kills the command's group at once. A deletion makes the renewer
//! write at once, which re-creates the Lease if nothing else exists (candidates that saw the
//! deleted record honour it until its term ends, see [`super::campaign`]).

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::WatchEvent;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};

use super::acquire::Held;
use super::api::{ApiError, LeaseApi};
use super::decide::{Claimant, Record};
use crate::config::Timing;

/// What the renewer publishes.
#[derive(Debug, Clone)]
pub enum LeaseState {
    /// We hold it; the last successful write started at `held.renewed_at`.
    Held(Held),
    /// The API shows another holder, or the holder cleared by someone else: another worker may
    /// already run.
    Taken {
        /// Who or what took it.
        reason: String,
        /// The last state we held.
        last: Held,
    },
}

impl LeaseState {
    /// The last successful write.
    pub fn held(&self) -> &Held {
        match self {
            LeaseState::Held(held) | LeaseState::Taken { last: held, .. } => held,
        }
    }
}

/// Owned parts of a [`Claimant`], so the renewer can run as its own task.
#[derive(Debug, Clone)]
pub struct Owned {
    /// Identity.
    pub identity: String,
    /// Timing.
    pub timing: Timing,
    /// Owner Pod.
    pub owner: Option<crate::config::PodOwner>,
}

impl Owned {
    /// Borrowed view.
    pub fn claimant(&self) -> Claimant<'_> {
        Claimant {
            identity: &self.identity,
            timing: &self.timing,
            owner: self.owner.as_ref(),
        }
    }
}

/// Renews until another holder shows up (then publishes [`LeaseState::Taken`] and returns) or until
/// the task is dropped. `write_now` (from [`guard`], on a deletion) makes it write at once.
pub async fn renew(
    api: LeaseApi,
    me: Owned,
    held: Held,
    state: Arc<watch::Sender<LeaseState>>,
    write_now: Arc<Notify>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
) {
    let claimant = me.claimant();
    let timing = me.timing;
    let mut held = held;
    // While renewals succeed, every --renew-interval; after a failure, every --retry-period. The
    // renew and kill deadlines are the supervisor's, from the last success: they do not move.
    let mut next = held.renewed_at + timing.renew_interval;
    let mut failing = 0u32;
    loop {
        tokio::select! {
            () = sleep_until(next) => {}
            // A deletion: the update finds nothing and re-creates the Lease.
            () = write_now.notified() => {}
        }
        if matches!(*state.borrow(), LeaseState::Taken { .. }) {
            return;
        }
        let started = Instant::now();
        let started_boot = crate::clock::boot_time();
        let deadline = held.renewed_at + timing.renew_deadline;
        // Never let one request run past the renew deadline.
        let timeout = timing
            .request_timeout()
            .min(deadline.saturating_duration_since(started))
            .max(timing.retry_period.min(Duration::from_millis(100)));
        let result = write(&api, &claimant, &held, timeout).await;
        metrics.renewal(
            matches!(result, Ok(_) | Err(Failure::Refreshed(_))),
            started.elapsed(),
        );
        match result {
            Ok(lease) => {
                if failing > 0 {
                    tracing::info!(failures = failing, "renewal succeeded again");
                }
                failing = 0;
                held = Held {
                    lease,
                    renewed_at: started,
                    renewed_at_boot: started_boot,
                };
                // Never over a takeover the guard already reported.
                let still_ours = state.send_if_modified(|s| match s {
                    LeaseState::Held(_) => {
                        *s = LeaseState::Held(held.clone());
                        true
                    }
                    LeaseState::Taken { .. } => false,
                });
                if !still_ours {
                    return;
                }
                next = started + timing.renew_interval;
            }
            Err(Failure::Taken(reason)) => {
                taken(&state, reason, held);
                return;
            }
            Err(Failure::Retry(error)) => {
                failing += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                if failing == 1 {
                    tracing::warn!(
                        %error,
                        lost_in = %humantime::format_duration(round_ms(left)),
                        "renewal failing; leadership is lost if it keeps failing until the renew deadline"
                    );
                } else {
                    tracing::debug!(%error, failures = failing, "renewal still failing");
                }
                next = started + timing.retry_period;
            }
            Err(Failure::Refreshed(lease)) => {
                // Someone changed the Lease without taking it (a label, our own earlier write that
                // timed out but landed): renew again at once against the fresh resourceVersion.
                held.lease = *lease;
                next = Instant::now();
            }
        }
    }
}

fn taken(state: &watch::Sender<LeaseState>, reason: String, last: Held) {
    let already = state.send_if_modified(|s| match s {
        LeaseState::Taken { .. } => false,
        LeaseState::Held(_) => {
            *s = LeaseState::Taken {
                reason: reason.clone(),
                last,
            };
            true
        }
    });
    if already {
        tracing::warn!(%reason, "leadership lost: the lease was taken");
        crate::logging::set_holder(None);
    }
}

/// Watches the held Lease until it is taken (then publishes [`LeaseState::Taken`]) or the task is
/// dropped; asks the renewer to write at once when it is deleted. It runs on its own, so it keeps
/// watching after renewing stopped (a loss whose grace period still runs) and a slow watch request
/// never delays a renewal.
pub async fn guard(
    api: LeaseApi,
    identity: String,
    timing: crate::config::Timing,
    state: Arc<watch::Sender<LeaseState>>,
    write_now: Arc<Notify>,
) {
    let mut guard = Guard::default();
    loop {
        // Re-opened from our latest write's resourceVersion: every later event is someone's
        // write after ours, so one naming another holder is a real takeover.
        let held = state.borrow().held().clone();
        match guard.next(&api, &held, &timing, &identity).await {
            Seen::Taken(reason) => {
                taken(&state, reason, held);
                return;
            }
            Seen::Deleted => write_now.notify_one(),
            Seen::Handover(lease) => {
                // Still ours, with a handover requested: published for the supervisor, with the
                // renewal time unchanged (this is someone else's write, not a renewal).
                state.send_if_modified(|s| match s {
                    LeaseState::Held(held)
                        if Record::of(&held.lease).handover_from(&identity).is_none() =>
                    {
                        held.lease = *lease;
                        true
                    }
                    _ => false,
                });
            }
            Seen::Nothing => {}
        }
    }
}

/// What the leader's watch of its own Lease saw.
enum Seen {
    /// Another holder, or the holder cleared by someone else.
    Taken(String),
    /// The Lease was deleted.
    Deleted,
    /// Still ours, but a handover to another identity is requested (`spec.preferredHolder`).
    Handover(Box<Lease>),
    /// Nothing that matters (our own renewals, bookmarks, a re-opened stream).
    Nothing,
}

type EventStream = BoxStream<'static, Result<WatchEvent<Lease>, ApiError>>;

/// The leader's watch of its own Lease. It only speeds up detection: the renew and kill deadlines
/// never depend on it, so a watch that fails or is refused changes nothing but latency.
#[derive(Default)]
struct Guard {
    stream: Option<EventStream>,
    /// When the current stream was opened.
    opened: Option<Instant>,
    /// Do not re-open before this (after a failure).
    reopen_at: Option<Instant>,
    failures: u32,
    /// Watching is refused here: renewals alone detect takeovers.
    refused: bool,
}

impl Guard {
    /// The next thing seen.
    async fn next(
        &mut self,
        api: &LeaseApi,
        held: &Held,
        timing: &crate::config::Timing,
        identity: &str,
    ) -> Seen {
        if self.refused {
            return std::future::pending().await;
        }
        if self.stream.is_none() {
            if let Some(at) = self.reopen_at {
                sleep_until(at).await;
            }
            let rv = held
                .lease
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            match api.watch(&rv, timing.request_timeout()).await {
                Ok(stream) => {
                    self.stream = Some(stream);
                    self.opened = Some(Instant::now());
                    self.reopen_at = None;
                }
                Err(e @ (ApiError::Denied { .. } | ApiError::NotFound)) => {
                    tracing::debug!(error = %e, "cannot watch the held lease; takeovers are noticed at the next renewal");
                    self.refused = true;
                    return Seen::Nothing;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch the held lease; retrying");
                    self.failed(timing);
                    return Seen::Nothing;
                }
            }
        }
        let event = self.stream.as_mut().expect("opened above").next().await;
        match event {
            Some(Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease))) => {
                self.failures = 0;
                let record = Record::of(&lease);
                match record.holder {
                    Some(_) if record.handover_from(identity).is_some() => {
                        Seen::Handover(Box::new(lease))
                    }
                    Some(holder) if holder == identity => Seen::Nothing,
                    Some(holder) => Seen::Taken(format!("the lease is now held by {holder}")),
                    None => Seen::Taken("the lease was released by someone else".into()),
                }
            }
            Some(Ok(WatchEvent::Deleted(_))) => {
                tracing::warn!("the lease was deleted while held; re-creating it");
                Seen::Deleted
            }
            Some(Ok(WatchEvent::Bookmark(_))) => Seen::Nothing,
            Some(Ok(WatchEvent::Error(status))) => {
                // 410 included: re-open from our last write's resourceVersion, which is newer.
                tracing::debug!(code = status.code, message = %status.message, "the held lease's watch ended");
                self.failed(timing);
                Seen::Nothing
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "the held lease's watch failed");
                self.failed(timing);
                Seen::Nothing
            }
            None => {
                // The server ended the watch; one that ends at once must not become a busy loop.
                self.stream = None;
                self.reopen_at = self.opened.map(|at| at + Duration::from_secs(1));
                Seen::Nothing
            }
        }
    }

    fn failed(&mut self, timing: &crate::config::Timing) {
        self.stream = None;
        self.failures += 1;
        self.reopen_at = Some(Instant::now() + super::campaign::backoff(timing, self.failures));
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

enum Failure {
    /// The API shows another holder.
    Taken(String),
    /// Transient: try again next period.
    Retry(ApiError),
    /// Still ours, with a newer resourceVersion.
    Refreshed(Box<Lease>),
}

async fn write(
    api: &LeaseApi,
    me: &Claimant<'_>,
    held: &Held,
    timeout: Duration,
) -> Result<Lease, Failure> {
    match api
        .replace(&me.renew(&held.lease, Timestamp::now()), timeout)
        .await
    {
        Ok(lease) => Ok(lease),
        Err(ApiError::Conflict) => match api.get(timeout).await {
            Ok(Some(current)) => match Record::of(&current).holder {
                Some(holder) if holder == me.identity => Err(Failure::Refreshed(Box::new(current))),
                Some(holder) => Err(Failure::Taken(format!("the lease is now held by {holder}"))),
                None => Err(Failure::Taken(
                    "the lease was released by someone else".into(),
                )),
            },
            Ok(None) => recreate(api, me, held, timeout).await,
            Err(e) => Err(Failure::Retry(e)),
        },
        Err(ApiError::NotFound) => recreate(api, me, held, timeout).await,
        Err(e) => Err(Failure::Retry(e)),
    }
}

/// The Lease was deleted while we held it: re-create it if nothing else exists, keeping our
/// term's `leaseTransitions`. If someone else created it first, it is theirs: the command dies.
async fn recreate(
    api: &LeaseApi,
    me: &Claimant<'_>,
    held: &Held,
    timeout: Duration,
) -> Result<Lease, Failure> {
    let transitions = held.transitions();
    match api
        .create(
            &me.create(api.name(), api.namespace(), transitions, Timestamp::now()),
            timeout,
        )
        .await
    {
        Ok(lease) => {
            tracing::warn!(
                transitions,
                "the lease was deleted while held; re-created it"
            );
            Ok(lease)
        }
        Err(ApiError::AlreadyExists) => match api.get(timeout).await {
            Ok(Some(current)) => {
                let holder = Record::of(&current).holder.unwrap_or_default();
                if holder == me.identity {
                    Err(Failure::Refreshed(Box::new(current)))
                } else {
                    Err(Failure::Taken(format!(
                        "the lease was deleted and re-created by {holder:?}"
                    )))
                }
            }
            Ok(None) => Err(Failure::Retry(ApiError::NotFound)),
            Err(e) => Err(Failure::Retry(e)),
        },
        Err(e) => Err(Failure::Retry(e)),
    }
}
