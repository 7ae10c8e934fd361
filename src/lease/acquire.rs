//! Waiting for the Lease: one loop that carries out what the acquisition state machine
//! ([`super::campaign`]) asks, fed either by a watch (the default) or by polling (`--no-watch`, or
//! when watching is refused). The feeders hold no rules of their own: they turn API answers into
//! [`Input`]s, so every path (poll, watch, fallback from one to the other, resyncs) shares the same
//! observed record and the same rules.
//!
//! Watching: followers read the Lease once, then watch it (field selector on its name, with
//! bookmarks) from the last resourceVersion seen and act the moment something changes. A stream
//! the server ends is re-opened from where it was; a stream silent for longer than the server's own
//! watch timeout is taken as a dead connection and re-opened; a 410 leads to a fresh read. If
//! watching is refused (403) or not served, the same machine continues with polling.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use tokio::time::{Instant, sleep_until};

use super::api::{ApiError, LeaseApi};
use super::campaign::{Action, Campaign, HoldBack, Input, Request};
use super::decide::{Claimant, Decision};
use super::record::{ANY_OTHER, Memory, Record};
use super::watch::{Failure as WatchFailure, LeaseWatch, Seen};
use crate::timing::Timing;

/// The Lease as we hold it.
#[derive(Debug, Clone)]
pub struct Held {
    /// The Lease as last written by us (its resourceVersion conditions the next write).
    pub lease: Lease,
    /// Start of the request that last wrote it successfully, on the monotonic clock. Nobody else
    /// can take the Lease over before `renewed_at + lease_duration`.
    pub renewed_at: Instant,
    /// The same moment on CLOCK_BOOTTIME, which also counts time the machine spent suspended.
    pub renewed_at_boot: std::time::Duration,
    /// Set while the stored record is someone else's edit of ours with a shorter
    /// `leaseDurationSeconds`: see [`Shortened`].
    pub shortened: Option<Shortened>,
}

/// Someone else's edit left our record with a shorter `leaseDurationSeconds` than ours. A candidate
/// that first sees that record counts the shorter duration from that sight, which came after the
/// start of our last successful write (the edit came after it). The shortest such duration, and
/// the resourceVersion of the edited record now stored: a write of ours conditioned on it replaces
/// it, and ends this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortened {
    /// The shortest duration an edit gave our record since it was last ours as we wrote it.
    pub duration: Duration,
    /// The edited record's resourceVersion.
    pub resource_version: Option<String>,
}

impl Held {
    /// `spec.leaseTransitions` of the held Lease.
    pub fn transitions(&self) -> i32 {
        Record::of(&self.lease).transitions
    }

    /// A write that started at `started` (and `started_boot` on CLOCK_BOOTTIME) succeeded.
    pub fn written(lease: Lease, started: Instant, started_boot: Duration) -> Held {
        Held {
            lease,
            renewed_at: started,
            renewed_at_boot: started_boot,
            shortened: None,
        }
    }

    /// The lease duration others may count from `renewed_at`: ours, or shorter after an edit.
    pub fn counted(&self, timing: &Timing) -> Duration {
        self.shortened.as_ref().map_or(timing.lease_duration, |s| {
            s.duration.min(timing.lease_duration)
        })
    }
}

/// How the waiting loop learns about the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Watch it between reads.
    Watch,
    /// Read it every retry period.
    Poll,
}

/// What one process remembers of one Lease, shared by the campaigns, the renewer and the guard of
/// every term (see [`Memory`]).
pub type Remembered = std::sync::Arc<std::sync::Mutex<Memory>>;

/// Notes `record` in `memory`.
pub fn remember(memory: &Remembered, record: &Record) {
    memory
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .note(record);
}

/// Lets one write (create or claim) at a time through, among the campaigns for several slots, and
/// none after one of them won: a process never holds two slots. A campaign reaching a write after
/// the win waits for good (it is dropped by then). It also notes every write whose outcome is
/// unknown: it failed without an answer (a timeout, a dropped connection), or it was still in
/// flight when its campaign was dropped (a stop signal, `--wait-timeout`, another slot's win or
/// error). Such a write may land all the same, naming us.
#[derive(Debug, Default)]
pub struct WriteGate {
    won: tokio::sync::Mutex<bool>,
    /// `(slot, when the write started)` of writes whose outcome is unknown.
    uncertain: std::sync::Mutex<Vec<(usize, Instant)>>,
}

impl WriteGate {
    /// The slots other than `except` that a write of ours may have landed on unanswered, each
    /// once, in slot order, with when the latest such write started.
    pub fn uncertain(&self, except: Option<usize>) -> Vec<(usize, Instant)> {
        let mut all = self
            .uncertain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        all.retain(|(slot, _)| Some(*slot) != except);
        // Latest write per slot first, then one entry per slot.
        all.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        all.dedup_by_key(|(slot, _)| *slot);
        all
    }
}

/// Waits for the first of several Leases (the slots of `--holders`; one for a single holder) to
/// be held: one campaign per slot, each with its own watch, all sharing `gate`. Returns the slot
/// and the Lease held. When a campaign wins, the others are dropped with no write in flight (the
/// gate); writes of ours that may have landed elsewhere are in [`WriteGate::uncertain`].
pub async fn acquire_any(
    apis: &[LeaseApi],
    me: &Claimant,
    timing: &Timing,
    feed: Feed,
    stepped_down: Option<(usize, i32)>,
    (memory, gate): (&[Remembered], &WriteGate),
) -> Result<(usize, Held), ApiError> {
    use tracing::Instrument;
    if let ([api], [memory]) = (apis, memory) {
        let stepped_down = stepped_down.filter(|(slot, _)| *slot == 0).map(|(_, t)| t);
        return acquire(api, me, timing, feed, stepped_down, memory, (gate, 0))
            .await
            .map(|held| (0, held));
    }
    let campaigns = apis
        .iter()
        .zip(memory)
        .enumerate()
        .map(|(slot, (api, memory))| {
            Box::pin(
                async move {
                    // A handover applies to the slot handed over only.
                    let stepped_down = stepped_down.filter(|(s, _)| *s == slot).map(|(_, t)| t);
                    acquire(api, me, timing, feed, stepped_down, memory, (gate, slot))
                        .await
                        .map(|held| (slot, held))
                }
                .instrument(tracing::info_span!("slot", lease = %api.name())),
            )
        });
    let (result, _, _) = futures_util::future::select_all(campaigns).await;
    result
}

/// Blocks until the Lease is held (`stepped_down`: this candidate has just handed over the term
/// with these `leaseTransitions`). Returns only [`ApiError::Denied`] or other non-retryable
/// errors; transient failures are logged and retried with backoff.
pub async fn acquire(
    api: &LeaseApi,
    me: &Claimant,
    timing: &Timing,
    feed: Feed,
    stepped_down: Option<i32>,
    memory: &Remembered,
    gate: (&WriteGate, usize),
) -> Result<Held, ApiError> {
    let remembered = *memory.lock().unwrap_or_else(|e| e.into_inner());
    let mut campaign = Campaign::new(&me.identity, *timing).remembering(remembered);
    if let Some(transitions) = stepped_down {
        campaign.after_handover(transitions);
    }
    if feed == Feed::Poll {
        campaign.polling();
    }
    let mut narrator = Narrator::default();
    let mut watch = (feed == Feed::Watch).then(Watcher::default);
    let mut last_read = Instant::now();
    let mut action = campaign.step(Input::Tick, Instant::now());
    loop {
        let input = match action {
            Action::Create { transitions } => {
                let mut won = enter(gate).await;
                match create(api, me, timing, transitions).await {
                    Ok(held) => return Ok(won.win(held)),
                    Err(e) => narrator.failed(won.failed(e), Request::Create)?,
                }
            }
            Action::Claim {
                current,
                decision,
                transitions,
            } => {
                let mut won = enter(gate).await;
                match claim(api, me, timing, &current, &decision, transitions).await {
                    Ok(held) => return Ok(won.win(held)),
                    Err(e) => narrator.failed(won.failed(e), Request::Claim)?,
                }
            }
            Action::Read { at } => {
                if let Some(w) = &mut watch {
                    w.watch.close();
                }
                sleep_until(at).await;
                read(api, timing, &campaign, &mut narrator, &mut last_read).await?
            }
            Action::Wait { until } => {
                narrator.waiting(&campaign);
                match &mut watch {
                    Some(w) => match w.next(api, &campaign, timing, until).await {
                        Ok(input) => input,
                        Err(WatchEnd::Unavailable(why)) => {
                            tracing::warn!(reason = %why, "cannot watch the lease; polling every retry period instead");
                            watch = None;
                            campaign.polling();
                            Input::Tick
                        }
                        Err(WatchEnd::Failed(e)) => narrator.failed(e, Request::Watch)?,
                    },
                    None => {
                        // Polling: wake at the deadline asked for, and read at least every retry
                        // period to learn of changes.
                        let poll_at = last_read + timing.retry_period;
                        match until {
                            Some(at) if at < poll_at => {
                                sleep_until(at).await;
                                Input::Tick
                            }
                            _ => {
                                sleep_until(poll_at).await;
                                read(api, timing, &campaign, &mut narrator, &mut last_read).await?
                            }
                        }
                    }
                }
            }
        };
        let now = Instant::now();
        action = campaign.step(input, now);
        memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(&campaign.memory());
        narrator.retrying(&action, &campaign, now);
    }
}

/// The right to write, held for the length of one create or claim. Dropped before the write's
/// outcome is known (its campaign dropped mid-write), it notes the slot as uncertain.
struct Entered<'a> {
    won: tokio::sync::MutexGuard<'a, bool>,
    gate: &'a WriteGate,
    slot: usize,
    started: Instant,
    resolved: bool,
}

impl Entered<'_> {
    /// The write won: no other campaign of this gate writes after it.
    fn win(&mut self, held: Held) -> Held {
        *self.won = true;
        self.resolved = true;
        held
    }

    /// The write failed; without an answer, it may have landed: the slot is noted.
    fn failed(&mut self, e: ApiError) -> ApiError {
        // `Rejected` too: a 2xx answer that could not be parsed is a write that landed.
        self.resolved = !matches!(
            e,
            ApiError::Timeout(_)
                | ApiError::Transient(_)
                | ApiError::Unreachable(_)
                | ApiError::Busy { .. }
                | ApiError::Rejected(_)
        );
        e
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if !self.resolved {
            self.gate
                .uncertain
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((self.slot, self.started));
        }
    }
}

/// Waits for the gate; never returns once another campaign won.
async fn enter((gate, slot): (&WriteGate, usize)) -> Entered<'_> {
    let won = gate.won.lock().await;
    if *won {
        drop(won);
        return std::future::pending().await;
    }
    Entered {
        won,
        gate,
        slot,
        started: Instant::now(),
        resolved: false,
    }
}

/// One GET, as the campaign's input.
async fn read(
    api: &LeaseApi,
    timing: &Timing,
    campaign: &Campaign,
    narrator: &mut Narrator,
    last_read: &mut Instant,
) -> Result<Input, ApiError> {
    *last_read = Instant::now();
    match api.get(timing.request_timeout()).await {
        Ok(lease) => {
            narrator.reachable(campaign);
            Ok(Input::Read(lease))
        }
        Err(e) => narrator.failed(e, Request::Read),
    }
}

/// Why the watch could not deliver an input.
enum WatchEnd {
    /// Watching is refused or not served here: poll instead.
    Unavailable(String),
    /// A transient failure.
    Failed(ApiError),
}

/// The watch feeder: one [`LeaseWatch`], re-opened from the campaign's resourceVersion.
#[derive(Default)]
struct Watcher {
    watch: LeaseWatch,
}

impl Watcher {
    /// The next input: a watch event, or a tick at `until`.
    async fn next(
        &mut self,
        api: &LeaseApi,
        campaign: &Campaign,
        timing: &Timing,
        until: Option<Instant>,
    ) -> Result<Input, WatchEnd> {
        let from = campaign.resource_version().unwrap_or("");
        tokio::select! {
            seen = self.watch.next(api, from, timing) => match seen {
                Ok(Seen::Changed(lease)) => Ok(Input::Changed(lease)),
                Ok(Seen::Deleted(lease)) => {
                    if let Some(holder) = Record::of(&lease).holder {
                        tracing::info!(holder = %holder, "the lease was deleted while held; it is not created before that holder's term would have ended");
                    }
                    Ok(Input::Deleted(lease))
                }
                Ok(Seen::Bookmark(rv)) => Ok(Input::Bookmark(rv)),
                Ok(Seen::Expired) => Ok(Input::Expired),
                // Re-opened from where the campaign is at the next call.
                Ok(Seen::Ended) => Ok(Input::Tick),
                Err(WatchFailure::Unwatchable(why)) => Err(WatchEnd::Unavailable(why.to_string())),
                Err(WatchFailure::Failed(e)) => Err(WatchEnd::Failed(e)),
            },
            () = sleep_opt(until) => Ok(Input::Tick),
        }
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How often a hold-back that has not changed is logged again while it lasts.
const HOLD_BACK_LOG_EVERY: Duration = Duration::from_secs(30);

/// Remembers what was logged about the Lease, so each fact is logged once.
#[derive(Default)]
struct Narrator {
    shown_holder: Option<String>,
    warned_record: Option<Record>,
    /// The last hold-back logged: why, until when, and when it was logged.
    shown_hold: Option<(HoldBack, Instant, Instant)>,
    shown_deferral: Option<Instant>,
    failing: bool,
    /// A failure to log once the campaign has said when it retries: what failed, and why.
    failure: Option<(Request, String)>,
}

impl Narrator {
    /// Logs the holder when it changes, a record's unusable duration once, and a deleted holder's
    /// term being honoured.
    fn waiting(&mut self, campaign: &Campaign) {
        // A free Lease not taken at once: why and until when, each time that changes, and again
        // at a low rate while it lasts, so a long wait never reads as a hang.
        let now = Instant::now();
        if let Some((why, end)) = campaign.holding_back(now)
            && self.shown_hold.is_none_or(|(shown, until, at)| {
                shown != why || until != end || now.duration_since(at) >= HOLD_BACK_LOG_EVERY
            })
        {
            tracing::info!(
                in_ = %humantime::format_duration(round_ms(end.saturating_duration_since(now))),
                "waiting: {}", why.why()
            );
            self.shown_hold = Some((why, end, now));
        }
        if let Some((to, until)) = campaign.deferring(Instant::now())
            && self.shown_deferral != Some(until)
        {
            let to = if to == ANY_OTHER {
                "any other candidate".to_string()
            } else {
                to
            };
            tracing::info!(
                to = %to,
                compete_in = %humantime::format_duration(round_ms(until.saturating_duration_since(Instant::now()))),
                "waiting: the lease is being handed over; leaving it to them before competing"
            );
            self.shown_deferral = Some(until);
        }
        let Some(record) = campaign.waiting_on() else {
            return;
        };
        let holder = record.holder.as_deref().unwrap_or_default();
        if self.warned_record.as_ref() != Some(record) {
            if let (_, Some(warning)) = record.effective_duration() {
                tracing::warn!(holder, "{warning}");
            }
            self.warned_record = Some(record.clone());
        }
        if self.shown_holder.as_deref() != Some(holder) {
            crate::logging::set_holder(Some(holder));
            tracing::info!(holder, "waiting: the lease is held by another identity");
            self.shown_holder = Some(holder.to_string());
        }
    }

    fn reachable(&mut self, _campaign: &Campaign) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("API server reachable again");
        }
    }

    /// Turns a failed request into the campaign's input ([`Input::from_error`]), or ends the wait
    /// on a refusal; a failure worth retrying is logged once the campaign says when.
    fn failed(&mut self, e: ApiError, request: Request) -> Result<Input, ApiError> {
        let Some(input) = Input::from_error(&e, request) else {
            return Err(e);
        };
        if let Input::Failed { .. } = input {
            self.failing = true;
            self.failure = Some((request, e.to_string()));
        }
        Ok(input)
    }

    /// Logs the failure just fed to the campaign, with when it is retried.
    fn retrying(&mut self, action: &Action, campaign: &Campaign, now: Instant) {
        let Some((request, error)) = self.failure.take() else {
            return;
        };
        let at = match action {
            Action::Read { at } => *at,
            Action::Wait { until: Some(at) } => *at,
            _ => now,
        };
        // A watching follower retries every second or so during an outage: log the 1st, 2nd,
        // 4th, 8th… failure in a row, the others at debug level.
        let what = request.verb();
        let attempt = campaign.failures();
        let retry_in = humantime::format_duration(round_ms(at.saturating_duration_since(now)));
        if attempt.is_power_of_two() {
            tracing::warn!(error, attempt, retry_in = %retry_in, "cannot {what} the lease; retrying");
        } else {
            tracing::debug!(error, attempt, retry_in = %retry_in, "cannot {what} the lease; retrying");
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Creates the Lease naming us, with `transitions` as its fencing token.
async fn create(
    api: &LeaseApi,
    me: &Claimant,
    timing: &Timing,
    transitions: i32,
) -> Result<Held, ApiError> {
    let started = Instant::now();
    let started_boot = crate::clock::boot_time();
    let lease = me.create(api.name(), api.namespace(), transitions, Timestamp::now());
    let lease = match api.create(&lease, timing.request_timeout()).await {
        // A create answered 404: the namespace itself is missing. Waiting would never end.
        Err(ApiError::NotFound) => Err(ApiError::NoNamespace(api.namespace().to_string())),
        other => other,
    }?;
    tracing::info!(transitions, "created the lease");
    Ok(Held::written(lease, started, started_boot))
}

/// Writes our claim on `current`, conditioned on its resourceVersion.
async fn claim(
    api: &LeaseApi,
    me: &Claimant,
    timing: &Timing,
    current: &Lease,
    decision: &Decision,
    transitions: i32,
) -> Result<Held, ApiError> {
    let started = Instant::now();
    let started_boot = crate::clock::boot_time();
    let lease = api
        .replace(
            &me.claim(
                current,
                Timestamp::now(),
                matches!(decision, Decision::TakeOver { .. }),
                transitions,
            ),
            timing.request_timeout(),
        )
        .await?;
    let transitions = Record::of(&lease).transitions;
    match decision {
        Decision::Resume => {
            tracing::info!(
                transitions,
                "resumed the lease, which already named this identity"
            )
        }
        Decision::TakeOver {
            expired_holder: Some(previous),
        } => {
            tracing::info!(previous = %previous, transitions, "took over the expired lease")
        }
        _ => tracing::info!(transitions, "took over the released lease"),
    }
    Ok(Held::written(lease, started, started_boot))
}
