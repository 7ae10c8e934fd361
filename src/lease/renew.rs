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

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};

use super::acquire::{Held, Remembered, Shortened};
use super::api::{ApiError, LeaseApi};
use super::decide::Claimant;
use super::record::{Record, newer_version};
use super::watch::{Failure as WatchFailure, LeaseWatch, Seen as Sighting};
use crate::timing::Timing;

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

/// A request to the renewer, from [`guard`], to write at once: after a deletion (the update finds
/// nothing and re-creates the Lease), or after an edit of our record that a renewal must undo
/// (then with the edited Lease, so the write is conditioned on its resourceVersion).
#[derive(Debug, Default)]
pub struct Nudge {
    notify: Notify,
    fresh: std::sync::Mutex<Option<Lease>>,
}

impl Nudge {
    /// Asks for a write at once, against `fresh` if given.
    pub fn write_now(&self, fresh: Option<Lease>) {
        if let Some(lease) = fresh {
            *self.fresh.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Option<Lease> {
        self.fresh.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The shortest wait before retrying a renewal that got no answer at all (connection refused or
/// reset): a fresh connection is tried at once, but a refusing server is not asked in a busy loop.
const UNREACHABLE_RETRY: Duration = Duration::from_millis(100);

/// Renews until another holder shows up (then publishes [`LeaseState::Taken`] and returns) or until
/// the task is dropped. `nudge` (from [`guard`]) makes it write at once. `own` is the term's
/// fencing token, which every renewal keeps (see [`crate::lease::decide::renewal_token`]).
pub async fn renew(
    api: LeaseApi,
    me: Claimant,
    (held, own): (Held, i32),
    state: Arc<watch::Sender<LeaseState>>,
    (nudge, memory, kill): (Arc<Nudge>, Remembered, Kill),
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
) {
    let timing = me.timing;
    let mut held = held;
    // While renewals succeed, every --renew-interval. Each renewal is hedged (see `hedged`): at
    // least two attempts, the second on a fresh connection, fit before the renew deadline. A
    // failed renewal is retried as `retry_at` says. The renew and kill deadlines are the
    // supervisor's, from the last success: they do not move.
    let mut next = held.renewed_at + timing.renew_interval;
    let mut failing = 0u32;
    loop {
        tokio::select! {
            () = sleep_until(next) => {}
            () = nudge.notify.notified() => {
                if let Some(fresh) = nudge.take() {
                    held.lease = fresh;
                }
            }
        }
        if matches!(*state.borrow(), LeaseState::Taken { .. }) {
            return;
        }
        let deadline = held.renewed_at + timing.renew_deadline;
        // The record this write is conditioned on (see below, on success).
        let base = held.lease.metadata.resource_version.clone();
        let (result, started, started_boot) =
            hedged(&api, &me, (&held, own), &timing, deadline).await;
        match &result {
            Ok(lease) => remember(&memory, &Record::of(lease), &me.identity),
            Err(Failure::Refreshed(lease)) => remember(&memory, &Record::of(lease), &me.identity),
            _ => {}
        }
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
                held = Held::written(lease, started, started_boot);
                // Never over a takeover the guard already reported.
                let still_ours = state.send_if_modified(|s| match s {
                    LeaseState::Held(current) => {
                        // A shrink seen meanwhile (see `observed`) stays in force unless this write
                        // came after the shrunk record: it replaced that record itself (it was
                        // conditioned on it), or the server ordered it after that record. Else it
                        // landed before the shrink (conditioned on a record the shrink replaced,
                        // it would have met a 409): its answer was merely slower than the guard's
                        // event. The shrink then came after this write started, and counts from
                        // it.
                        let written = held.lease.metadata.resource_version.as_deref();
                        held.shortened = current.shortened.take().filter(|s| {
                            s.resource_version != base
                                && !newer_version(written, s.resource_version.as_deref())
                        });
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
                taken(&state, reason, held, &kill);
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
                if matches!(error, ApiError::Timeout(_)) {
                    // No answer in time on the last attempt either: over HTTP/2 that connection
                    // is closed too, so the retry at once dials afresh.
                    api.abandon_connections();
                }
                next = retry_at(&error, started, &timing);
            }
            Err(Failure::Refreshed(lease)) => {
                // Someone changed the Lease without taking it (a label, our own earlier write that
                // timed out but landed): renew again at once against the fresh resourceVersion.
                // A shrunk duration in it shortens the term until that write lands.
                observed(&state, &lease, &timing, &kill);
                held.lease = *lease;
                next = Instant::now();
            }
        }
    }
}

/// What to do the moment a takeover or a shortened record is seen, before anything that may block
/// (this thread may be held up: a frozen or starved process): the command's group is killed
/// from another thread (the watchdog's), now or by a CLOCK_BOOTTIME deadline.
#[derive(Clone)]
pub struct Kill {
    now: Arc<dyn Fn() + Send + Sync>,
    by: Arc<dyn Fn(Duration) + Send + Sync>,
}

impl Kill {
    /// `now` kills at once; `by(deadline)` brings the kill deadline forward to `deadline` (a
    /// CLOCK_BOOTTIME instant), never back.
    pub fn new(
        now: impl Fn() + Send + Sync + 'static,
        by: impl Fn(Duration) + Send + Sync + 'static,
    ) -> Kill {
        Kill {
            now: Arc::new(now),
            by: Arc::new(by),
        }
    }

    fn now(&self) {
        (self.now)();
    }

    fn by(&self, deadline: Duration) {
        (self.by)(deadline);
    }
}

/// When a renewal whose attempt started at `started` and failed with `error` is tried again: at
/// once after no answer in time (on a new connection: the timed-out one is never reused, see
/// `LeaseApi::call`), after 100 ms if no connection could be made, after --retry-period if the
/// server answered with an error (5xx, 429).
fn retry_at(error: &ApiError, started: Instant, timing: &Timing) -> Instant {
    match error {
        ApiError::Timeout(_) => Instant::now(),
        ApiError::Unreachable(_) => Instant::now() + UNREACHABLE_RETRY.min(timing.retry_period),
        _ => started + timing.retry_period,
    }
}

/// One renewal, hedged. The first attempt may take the whole request timeout (a slow server is
/// still a working one), never past the renew deadline. If it has no answer after
/// [`Timing::renew_timeout`], its connection may be half-open (a load balancer or conntrack dropped
/// it, a proxy froze): every connection opened so far is abandoned for new requests, and a second
/// attempt runs on a fresh connection, the first still allowed to answer. The first success wins,
/// with the start of the attempt that made it (the term counts from there). So at least two
/// attempts fit between the renewal that is due and the renew deadline, whatever the timing.
///
/// Over HTTP/2 the first attempt shares the abandoned connection, which is closed at once: it
/// fails, and the second alone can answer. Over HTTP/1.1 the first keeps a connection of its own,
/// which nothing closes while it waits (a half-open one, or one whose answer was lost after the
/// request landed), so the second's answer decides as it would over HTTP/2: a success or a
/// takeover at once; a 409 whose fresh read shows the Lease still ours (the first landed, or an
/// edit kept us) ends the renewal, and the caller writes again at once against the record read
/// back, inside the renew deadline; a failure leaves the first its chance until the retry is due
/// ([`retry_at`]), no longer.
async fn hedged(
    api: &LeaseApi,
    me: &Claimant,
    (held, own): (&Held, i32),
    timing: &Timing,
    deadline: Instant,
) -> (Result<Lease, Failure>, Instant, Duration) {
    let floor = timing.retry_period.min(Duration::from_millis(100));
    let started = Instant::now();
    let started_boot = crate::clock::boot_time();
    let timeout = timing
        .request_timeout()
        .min(deadline.saturating_duration_since(started))
        .max(floor);
    let first = write(api, me, held, own, timeout);
    tokio::pin!(first);
    let hedge_at = started + timing.renew_timeout();
    tokio::select! {
        result = &mut first => (result, started, started_boot),
        () = sleep_until(hedge_at), if hedge_at + floor < deadline => {
            tracing::debug!("no answer to the renewal yet; trying again on a new connection");
            api.abandon_connections();
            let again = Instant::now();
            let again_boot = crate::clock::boot_time();
            let timeout = timing
                .renew_timeout()
                .min(deadline.saturating_duration_since(again))
                .max(floor);
            let second = write(api, me, held, own, timeout);
            tokio::pin!(second);
            tokio::select! {
                result = &mut first => match result {
                    Err(Failure::Retry(_)) => (second.await, again, again_boot),
                    result => (result, started, started_boot),
                },
                result = &mut second => match result {
                    // Failed (no answer in time, refused, 5xx): the first may still answer (a
                    // slow server) until the renewal is due to be tried again.
                    Err(Failure::Retry(error)) => {
                        let retry = retry_at(&error, again, timing);
                        tokio::select! {
                            result = &mut first => (result, started, started_boot),
                            () = sleep_until(retry) => {
                                (Err(Failure::Retry(error)), again, again_boot)
                            }
                        }
                    }
                    // A success counts from the second's start. A takeover ends the term. A
                    // newer record of ours (the 409's read: the first landed, its answer lost or
                    // slow, or someone edited the Lease without taking it) is written over at
                    // once: the first, conditioned on the same older record, can only meet a 409
                    // now, or is the write that landed; its answer adds nothing, and waiting for
                    // it may take up to the renew deadline.
                    result => {
                        if matches!(result, Err(Failure::Refreshed(_))) {
                            tracing::debug!(
                                "the renewal met a newer record of ours; writing again against it"
                            );
                        }
                        (result, again, again_boot)
                    }
                },
            }
        }
    }
}

fn taken(state: &watch::Sender<LeaseState>, reason: String, last: Held, kill: &Kill) {
    if matches!(*state.borrow(), LeaseState::Held(_)) {
        kill.now();
    }
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
    (me, own, watching): (Claimant, i32, bool),
    state: Arc<watch::Sender<LeaseState>>,
    (nudge, memory, kill): (Arc<Nudge>, Remembered, Kill),
) {
    let identity = me.identity.clone();
    let mut guard = Guard {
        polling: !watching,
        ..Guard::default()
    };
    // An edit is undone at most once per retry period: a server (an admission webhook, a
    // reconciling controller) that keeps changing what we write must not make a fast loop; the
    // regular renewals go on meanwhile.
    let mut restored: Option<Instant> = None;
    let mut restore = |lease: Lease| {
        let now = Instant::now();
        if restored.is_none_or(|at| now >= at + me.timing.retry_period) {
            restored = Some(now);
            tracing::warn!(
                "the lease was edited while held (leaseDurationSeconds or leaseTransitions); renewing at once to restore it"
            );
            nudge.write_now(Some(lease));
        }
    };
    loop {
        // Re-opened from our latest write's resourceVersion: every later event is someone's
        // write after ours, so one naming another holder is a real takeover.
        let held = state.borrow().held().clone();
        match guard.next(&api, &held, (&me, own), &memory).await {
            Seen::Taken(reason) => {
                taken(&state, reason, held, &kill);
                return;
            }
            // The last state (a handover request in it included) is what is re-created.
            Seen::Deleted(last) => nudge.write_now(Some(*last)),
            // Still ours, but with another duration or a lower token: client-go followers restart
            // their clock on any change and count the duration they see, so this record must be
            // replaced by a renewal within milliseconds, not at the next renew interval.
            // lease-exec followers never count such an edit as a new term.
            Seen::Edited(lease) => {
                observed(&state, &lease, &me.timing, &kill);
                restore(*lease);
            }
            // Our own record again, as we write it: a shrink seen before is no longer stored.
            Seen::Ours(lease) => observed(&state, &lease, &me.timing, &kill),
            Seen::Handover(lease) => {
                // An edit that comes with the request is undone all the same: the term goes on
                // through the grace period, and the preferred candidate must not see it shorter.
                observed(&state, &lease, &me.timing, &kill);
                if me.must_restore(&Record::of(&lease), own) {
                    restore((*lease).clone());
                }
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

/// Our record as someone else's write left it (seen by the guard, or read by the renewer after a
/// 409). When that write shortened `leaseDurationSeconds`, or removed it (the shortest term
/// there is, see [`Record::effective_duration`]), the term as others may count it is shorter too:
/// a candidate that first sees the edited record (one started after the edit, or any client-go
/// candidate, which restarts its clock on any change) counts the shorter duration from that
/// sight; the edit, and so that sight, came after our last successful write started
/// (`renewed_at`: a write of ours conditioned on an earlier record would have met a 409). So
/// until a write of ours replaces that record (the restore asked for right after), the command
/// must be dead by `renewed_at + kill_within(shorter)` on our clock, and leadership is lost by the
/// scaled renew deadline (see [`Timing::kill_within`]). An edit seen later than that kills at
/// once (a removed duration always does): such a candidate may already have claimed. Only
/// `leaseDurationSeconds` counts here, not the duration our writes state beside it: client-go
/// candidates read the field alone.
///
/// The watchdog is told first, before anything that may block this thread; the supervisor then
/// derives the same deadlines from the published [`Held::shortened`]. The shrink ends only with a
/// record of ours at our duration that the server ordered after the shrunk record (a higher
/// resourceVersion, see [`newer_version`]): that record is no longer stored, so a claim
/// conditioned on it fails. Never by arrival: a lagging or re-opened watch, or a slow read, may
/// deliver an older record of ours after the shrink, and that one ends nothing. When the order
/// cannot be told, nothing seen ends it; a write of ours conditioned on the shrunk record does
/// (see [`renew`]).
fn observed(state: &watch::Sender<LeaseState>, current: &Lease, timing: &Timing, kill: &Kill) {
    let counted = Record::of(current).effective_duration().0;
    let version = current.metadata.resource_version.as_deref();
    state.send_if_modified(|s| match s {
        // Older than our last successful write (the server's order, see `newer_version`): that
        // write replaced it, so it is no longer stored and nobody can claim against it (a claim
        // conditioned on it meets a 409). A re-opened watch or a slow read replaying a shrink we
        // already undid neither starts nor ends a shrink.
        LeaseState::Held(held)
            if newer_version(held.lease.metadata.resource_version.as_deref(), version) =>
        {
            false
        }
        LeaseState::Held(held) if counted < timing.lease_duration => {
            kill.by(held.renewed_at_boot + timing.kill_within(counted));
            // The shortest duration since the shrink began; the newest shrunk record (by the
            // server's order, else the latest seen) is the one a write must replace.
            let shortened = Some(match &held.shortened {
                None => Shortened {
                    duration: counted,
                    resource_version: version.map(str::to_string),
                },
                Some(earlier) => Shortened {
                    duration: earlier.duration.min(counted),
                    resource_version: if newer_version(earlier.resource_version.as_deref(), version)
                    {
                        earlier.resource_version.clone()
                    } else {
                        version.map(str::to_string)
                    },
                },
            });
            let changed = held.shortened != shortened;
            held.shortened = shortened;
            changed
        }
        LeaseState::Held(held)
            if held
                .shortened
                .as_ref()
                .is_some_and(|s| newer_version(version, s.resource_version.as_deref())) =>
        {
            held.shortened = None;
            true
        }
        _ => false,
    });
}

/// Notes in `memory` a record of the Lease held by `identity`, as its holder saw it (see
/// [`super::record::Memory::note_held`]).
fn remember(memory: &Remembered, record: &Record, identity: &str) {
    memory
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .note_held(record, identity);
}

/// What the leader's watch of its own Lease saw.
enum Seen {
    /// Another holder, or the holder cleared by someone else.
    Taken(String),
    /// The Lease was deleted; its last state.
    Deleted(Box<Lease>),
    /// Still ours, but a handover to another identity is requested (`spec.preferredHolder`).
    Handover(Box<Lease>),
    /// Still ours, but edited in a way a renewal must undo at once (see
    /// [`Claimant::must_restore`]).
    Edited(Box<Lease>),
    /// Ours, as we write it (our own renewals, or a record restored by someone).
    Ours(Box<Lease>),
    /// Nothing that matters (bookmarks, a re-opened stream).
    Nothing,
}

/// The leader's watch of its own Lease. It only speeds up detection: the renew and kill deadlines
/// never depend on it, so a watch that fails or is refused changes nothing but latency.
#[derive(Default)]
struct Guard {
    watch: LeaseWatch,
    /// `--no-watch`: read the Lease every retry period instead of watching it.
    polling: bool,
    /// A 410 said the position is too old: watch from the current state until an event comes.
    expired: bool,
    /// Watching is refused here: renewals alone detect takeovers.
    refused: bool,
}

impl Guard {
    /// The next thing seen.
    async fn next(
        &mut self,
        api: &LeaseApi,
        held: &Held,
        (me, own): (&Claimant, i32),
        memory: &Remembered,
    ) -> Seen {
        let identity = me.identity.as_str();
        if self.refused {
            return std::future::pending().await;
        }
        // From our latest write: every later event is someone's write after ours. After a 410,
        // from the current state, which comes first as an event of its own.
        let from = match &held.lease.metadata.resource_version {
            Some(rv) if !self.expired => rv.as_str(),
            _ => "",
        };
        let seen = if self.polling {
            // --no-watch: no watch request; a read every retry period (a takeover is seen within
            // one, not only at the next renewal).
            tokio::time::sleep(me.timing.retry_period).await;
            match api.get(me.timing.request_timeout()).await {
                Ok(Some(lease))
                    if lease.metadata.resource_version == held.lease.metadata.resource_version =>
                {
                    return Seen::Nothing;
                }
                Ok(Some(lease)) => Ok(Sighting::Changed(lease)),
                // Gone: the renewal re-creates it, or learns who did.
                Ok(None) => Ok(Sighting::Deleted(held.lease.clone())),
                Err(e) => Err(WatchFailure::Failed(e)),
            }
        } else {
            self.watch.next(api, from, &me.timing).await
        };
        match seen {
            Ok(Sighting::Changed(lease)) => {
                self.expired = false;
                let record = Record::of(&lease);
                remember(memory, &record, identity);
                match record.holder {
                    Some(_) if record.handover_from(identity).is_some() => {
                        Seen::Handover(Box::new(lease))
                    }
                    Some(_) if me.must_restore(&record, own) => Seen::Edited(Box::new(lease)),
                    Some(holder) if holder == identity => Seen::Ours(Box::new(lease)),
                    Some(holder) => Seen::Taken(format!("the lease is now held by {holder}")),
                    None => Seen::Taken("the lease was released by someone else".into()),
                }
            }
            Ok(Sighting::Deleted(lease)) => {
                self.expired = false;
                remember(memory, &Record::of(&lease), identity);
                tracing::warn!("the lease was deleted while held; re-creating it");
                Seen::Deleted(Box::new(lease))
            }
            Ok(Sighting::Bookmark(_)) => {
                self.expired = false;
                Seen::Nothing
            }
            Ok(Sighting::Expired) => {
                self.expired = true;
                Seen::Nothing
            }
            Ok(Sighting::Ended) => Seen::Nothing,
            Err(WatchFailure::Unwatchable(e)) => {
                tracing::debug!(error = %e, "cannot watch the held lease; takeovers are noticed at the next renewal");
                self.refused = true;
                Seen::Nothing
            }
            Err(WatchFailure::Failed(e)) => {
                tracing::debug!(error = %e, "the held lease's watch failed; re-opening it");
                Seen::Nothing
            }
        }
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
    me: &Claimant,
    held: &Held,
    own: i32,
    timeout: Duration,
) -> Result<Lease, Failure> {
    match api
        .replace(&me.renew(&held.lease, Timestamp::now(), own), timeout)
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
            Ok(None) => recreate(api, me, held, own, timeout).await,
            Err(e) => Err(Failure::Retry(e)),
        },
        Err(ApiError::NotFound) => recreate(api, me, held, own, timeout).await,
        Err(e) => Err(Failure::Retry(e)),
    }
}

/// The Lease was deleted while we held it: re-create it if nothing else exists, keeping our
/// term's `leaseTransitions` (the same command runs on) and any handover request pending in it (a
/// deletion must not cancel a handover). If someone else created it first, it is theirs: the
/// command dies.
async fn recreate(
    api: &LeaseApi,
    me: &Claimant,
    held: &Held,
    own: i32,
    timeout: Duration,
) -> Result<Lease, Failure> {
    let transitions = crate::lease::decide::renewal_token(held.transitions(), own);
    let mut lease = me.create(api.name(), api.namespace(), transitions, Timestamp::now());
    if let (Some(spec), Some(last)) = (lease.spec.as_mut(), held.lease.spec.as_ref()) {
        spec.preferred_holder.clone_from(&last.preferred_holder);
        spec.strategy.clone_from(&last.strategy);
    }
    match api.create(&lease, timeout).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const S: Duration = Duration::from_secs(1);

    fn ours(duration: Option<i32>, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("me".into()),
                lease_duration_seconds: duration,
                ..LeaseSpec::default()
            }),
        }
    }

    /// The deadlines a [`Kill`] was given (`None`: at once).
    type Kills = Arc<std::sync::Mutex<Vec<Option<Duration>>>>;

    /// A state held since a write (resourceVersion 10) at 100 s on CLOCK_BOOTTIME, and a [`Kill`]
    /// that notes the deadlines it is given.
    fn holding() -> (watch::Sender<LeaseState>, Kill, Kills) {
        let held = Held::written(ours(Some(15), "10"), Instant::now(), 100 * S);
        let (state, _) = watch::channel(LeaseState::Held(held));
        let kills = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (now, by) = (kills.clone(), kills.clone());
        let kill = Kill::new(
            move || now.lock().unwrap().push(None),
            move |at| by.lock().unwrap().push(Some(at)),
        );
        (state, kill, kills)
    }

    fn shrunk_to(state: &watch::Sender<LeaseState>) -> Option<Duration> {
        state.borrow().held().shortened.as_ref().map(|s| s.duration)
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_record_of_ours_newer_than_a_shrink_ends_it() {
        let timing = Timing::default();
        let (state, kill, kills) = holding();
        observed(&state, &ours(Some(2), "12"), &timing, &kill);
        assert_eq!(shrunk_to(&state), Some(2 * S));
        assert_eq!(
            kills.lock().unwrap().as_slice(),
            [Some(100 * S + timing.kill_within(2 * S))]
        );
        // Older than the shrink, at our duration (a lagging watch, a late event or read): the
        // server ordered it before the shrink, which still stands.
        observed(&state, &ours(Some(15), "11"), &timing, &kill);
        assert_eq!(shrunk_to(&state), Some(2 * S));
        // A resourceVersion that cannot be compared never ends it.
        observed(&state, &ours(Some(15), "x-13"), &timing, &kill);
        assert_eq!(shrunk_to(&state), Some(2 * S));
        // The shrunk record itself, seen again: still shrunk.
        observed(&state, &ours(Some(2), "12"), &timing, &kill);
        assert_eq!(shrunk_to(&state), Some(2 * S));
        // Newer: the shrunk record is no longer stored.
        observed(&state, &ours(Some(15), "13"), &timing, &kill);
        assert_eq!(shrunk_to(&state), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_duration_is_a_shrink_to_nothing() {
        let timing = Timing::default();
        let (state, kill, kills) = holding();
        observed(&state, &ours(None, "11"), &timing, &kill);
        assert_eq!(shrunk_to(&state), Some(Duration::ZERO));
        // Killed by the last write's start: already past, so at once.
        assert_eq!(kills.lock().unwrap().as_slice(), [Some(100 * S)]);
        // It does not end an earlier shrink either.
        let (state, kill, _) = holding();
        observed(&state, &ours(Some(5), "11"), &timing, &kill);
        observed(&state, &ours(None, "12"), &timing, &kill);
        assert_eq!(shrunk_to(&state), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replayed_shrink_older_than_our_last_write_starts_nothing() {
        // Our write at resourceVersion 12 restored a shrink stored at 11; a re-opened watch (or a
        // slow read) then delivers that shrink again. It is no longer stored: no shrink, no kill.
        let timing = Timing::default();
        let (state, kill, kills) = holding();
        state.send_modify(|s| {
            *s = LeaseState::Held(Held::written(ours(Some(15), "12"), Instant::now(), 100 * S));
        });
        observed(&state, &ours(Some(1), "11"), &timing, &kill);
        assert_eq!(shrunk_to(&state), None);
        assert!(
            kills.lock().unwrap().is_empty(),
            "{:?}",
            kills.lock().unwrap()
        );
        // A shrink newer than our write still counts at once.
        observed(&state, &ours(Some(1), "13"), &timing, &kill);
        assert_eq!(shrunk_to(&state), Some(S));
        assert_eq!(
            *kills.lock().unwrap(),
            vec![Some(100 * S + timing.kill_within(S))]
        );
    }
}
