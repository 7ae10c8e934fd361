//! The acquisition state machine: every rule for *when* to create, claim, read or wait, in one
//! place, without I/O. The loops in [`super::acquire`] only feed it what the API said (a read, a
//! watch event, the result of a write, a timer) and carry out what it asks.
//!
//! ```text
//!   Read(lease or 404) ─┐                                       ┌─▶ Create { transitions }
//!   Changed(lease) ─────┤   view of the Lease                   ├─▶ Claim { current }
//!   Deleted(lease) ─────┤   last record + when first seen       ├─▶ Read { at }
//!   Bookmark(rv) ───────┼──▶ term end of a deleted holder ──────┤
//!   Expired (410) ──────┤   resourceVersion to watch from       └─▶ Wait { until }
//!   Lost / Failed ──────┤   failures, resyncs, lost claims
//!   Tick ───────────────┘
//! ```
//!
//! The rules, each tied to a way the Lease changes hands:
//! - **Expiry**: a record held by someone else is taken over once it has been seen unchanged for
//!   its `leaseDurationSeconds`, on the local monotonic clock, from when *this process* first saw
//!   it (never from `renewTime`: clocks of different nodes disagree). The claim is conditioned on
//!   that record's resourceVersion, so exactly one candidate wins.
//! - **Release** (holder cleared): claimed at once, conditioned on the resourceVersion.
//! - **Deletion while held** (a user, the garbage collector): the deleted record is honoured as if
//!   it were still there. Nobody is created or claimed before its term ends (observed time + its
//!   duration), whichever way the deletion is learnt: a DELETED event, a 404 on a poll, a 404 on the
//!   re-read after a broken watch. That holder's own lease-exec kills its command by then, so a
//!   new worker cannot overlap it.
//! - **Absence is proven only by an unbroken watch.** A DELETED event on a watch that saw every
//!   change carries the Lease's last state: if that was released, it is created at once. A 404 on a
//!   read says nothing of what happened since the last observation (or ever, for a Lease never
//!   seen): it may have been claimed and then deleted while its holder still runs. So after a 404
//!   the Lease is created only once it has been absent for one `--lease-duration` (since the first
//!   404 of this absence), long enough for any holder to re-create it (it does so at once) or to
//!   be past its own kill deadline. lease-exec never deletes Leases, so this wait happens when a
//!   Lease name is used for the first time and after someone deletes it.
//! - **Server restart, compaction, 410**: a re-read replaces the observation only when the record
//!   differs; an unchanged record keeps the time it was first seen. A 404 after a record was
//!   observed is a deletion (above), never a plain absence.
//! - **An edit that keeps the holder** (holder and `renewTime` unchanged: a shrunk or removed
//!   `leaseDurationSeconds`, a lowered `leaseTransitions`, a handover request): no new term. It
//!   runs from the first sight of that `renewTime`, with the longest duration seen for it, and
//!   never shorter than the duration its holder stated in its last write (see
//!   [`Record::counting_stated`]), so a candidate that first sees a shrink its holder could not
//!   see still counts the holder's term. A missing duration with no statement is 0 s, as
//!   client-go reads it.
//! - **Fencing**: every claim and create writes one more than the highest `leaseTransitions`
//!   this process has seen of the Lease, in this campaign or an earlier term's (see
//!   [`Memory`]), so the token never repeats nor goes backwards for a candidate that saw it:
//!   not after a deletion, not after a value lowered by hand.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use tokio::time::Instant;

use super::api::ApiError;
use super::backoff::{FAST_TRIES, backoff, jitter, resync_delay};
use super::decide::{Decision, decide};
use super::record::{Memory, Record};
use crate::timing::Timing;

/// What the API told us, or that a timer fired.
#[derive(Debug, Clone)]
pub enum Input {
    /// A GET answered: the Lease, or `None` for 404.
    Read(Option<Lease>),
    /// A watch event: the Lease was added or modified.
    Changed(Lease),
    /// A watch event: the Lease was deleted; its last state.
    Deleted(Lease),
    /// A watch bookmark: the resourceVersion reached.
    Bookmark(String),
    /// The watch's resourceVersion is too old (410 Gone): the view may be stale.
    Expired,
    /// Our claim lost to another writer (409 Conflict, or 404 on the claim); also what a read or
    /// watch answered 404/409 gives.
    Lost,
    /// Our create lost to another writer's (409 AlreadyExists).
    LostCreate,
    /// A request failed in a way worth retrying; the server may have said when to ask again.
    Failed {
        /// The server's Retry-After, if it sent one.
        retry_after: Option<Duration>,
        /// The server answered (5xx, 429, or too late): it is up and struggling. Else there was no
        /// answer at all (refused, reset).
        answered: bool,
    },
    /// A deadline the machine asked for passed.
    Tick,
}

/// A request the campaign asked for, as named in the log when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// [`Action::Create`].
    Create,
    /// [`Action::Claim`].
    Claim,
    /// [`Action::Read`], or a poll.
    Read,
    /// The watch of a waiting campaign.
    Watch,
}

impl Request {
    /// The verb, for "cannot … the lease".
    pub fn verb(self) -> &'static str {
        match self {
            Request::Create => "create",
            Request::Claim => "claim",
            Request::Read => "read",
            Request::Watch => "watch",
        }
    }
}

impl Input {
    /// What a failed request tells the campaign; `None` for a refusal that ends the wait (401,
    /// 403, a missing namespace: retrying cannot help).
    pub fn from_error(error: &ApiError, request: Request) -> Option<Input> {
        match error {
            ApiError::Denied { .. } | ApiError::NoNamespace(_) => None,
            ApiError::AlreadyExists if request == Request::Create => Some(Input::LostCreate),
            ApiError::Conflict | ApiError::AlreadyExists | ApiError::NotFound => Some(Input::Lost),
            e => Some(Input::Failed {
                retry_after: e.retry_after(),
                answered: e.answered(),
            }),
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create the Lease naming us, with this `leaseTransitions`.
    Create {
        /// The fencing token to write (see [`Memory::claim_token`]).
        transitions: i32,
    },
    /// Write our claim on `current`, conditioned on its resourceVersion.
    Claim {
        /// The Lease as observed.
        current: Box<Lease>,
        /// Why it may be claimed.
        decision: Decision,
        /// The fencing token to write (see [`Memory::claim_token`]).
        transitions: i32,
    },
    /// Read the Lease (GET) at this time; a watch, if any, is re-established from the read.
    Read {
        /// Not before.
        at: Instant,
    },
    /// Nothing to do until this time (then [`Input::Tick`]) or the next event. A watching feeder
    /// watches from [`Campaign::resource_version`]; a polling feeder reads again within a retry
    /// period.
    Wait {
        /// `None`: until something changes.
        until: Option<Instant>,
    },
}

/// Why a Lease nobody holds is not taken yet (see [`Campaign::holding_back`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldBack {
    /// It is absent (never seen, or deleted): a holder it may have had could still run.
    Absent,
    /// It is free now, but it was absent (or deleted while held) earlier in this wait: a holder
    /// it may have had then could still run.
    AbsentBefore,
}

impl HoldBack {
    /// For the log.
    pub fn why(self) -> &'static str {
        match self {
            HoldBack::Absent => {
                "the lease is absent (never seen, or deleted); creating it once any holder it may have had is gone"
            }
            HoldBack::AbsentBefore => {
                "the lease is free, but it was absent or deleted earlier; taking it once any holder it may have had then is gone"
            }
        }
    }
}

/// A record as this candidate counts it: with the longer of `spec.leaseDurationSeconds` and the
/// duration its holder stated for itself in every write ([`Record::counting_stated`]). An
/// operator's edit that shrinks the duration of a held Lease whose holder cannot see it (cut off,
/// frozen) leaves that statement, so a candidate that first sees the edited record still counts
/// the holder's own term, from a sight that came after the holder's last write: the holder's
/// command is dead by then. Nothing else is read from the statement: the holder, `renewTime` and
/// the token are the record's. (A client-go candidate counts `leaseDurationSeconds` alone.) A
/// missing `leaseDurationSeconds` without a statement is 0 s, as client-go reads it.
fn counted(lease: &Lease) -> Record {
    Record::of(lease).counting_stated()
}

/// What we know of the Lease.
#[derive(Debug, Clone)]
enum View {
    /// Nothing trustworthy: read it.
    Unknown,
    /// It does not exist.
    Absent,
    /// As last read or seen in an event.
    Present(Box<Lease>),
}

/// The acquisition state machine. See the module documentation for the rules.
#[derive(Debug, Clone)]
pub struct Campaign {
    identity: String,
    timing: Timing,
    view: View,
    /// The last record observed and when this version of it was first observed. Kept across
    /// deletions, 404s and re-reads.
    observed: Option<(Record, Instant)>,
    /// No create or claim before this: the term of a holder whose Lease was deleted.
    deleted_term_end: Option<Instant>,
    /// When the Lease was first found absent, in the current absence (reset when it is seen).
    absent_since: Option<Instant>,
    /// `metadata.uid` of the Lease last seen, to notice one deleted and re-created unseen.
    uid: Option<String>,
    /// Where a watch resumes: the newest resourceVersion seen (object, deletion or bookmark).
    resource_version: Option<String>,
    /// A claim on this resourceVersion lost: wait for a newer one, or re-read at this time.
    lost: Option<(String, Instant)>,
    /// When the next read may happen (backoff after failures).
    read_at: Option<Instant>,
    /// Consecutive failed requests.
    failures: u32,
    /// Consecutive 410s without a watch event in between.
    expirations: u32,
    /// A 410 said our position is too old: a read's resourceVersion (the object's last change,
    /// which can be older than the server's watch window) is no place to resume; watch from the
    /// current state until an event or bookmark gives a position again.
    position_expired: bool,
    /// Whether a watch tells us of changes (else we poll every retry period).
    watching: bool,
    /// We handed this Lease over ourselves, in the term with this `leaseTransitions`: while the
    /// record is still that term's, the handover's request applies to us too (to any other
    /// candidate, or from our own record).
    stepped_down: Option<i32>,
    /// The highest token and longest term seen, carried from one campaign to the next.
    memory: Memory,
    /// `leaseDurationSeconds` of the observed record as first seen in its term (before any edit).
    term_duration: Option<i32>,
    /// State of the jitter's random sequence (xorshift64; never 0).
    rng: u64,
}

impl Campaign {
    /// A campaign for `identity`, which knows nothing of the Lease yet.
    pub fn new(identity: &str, timing: Timing) -> Campaign {
        Campaign {
            identity: identity.to_string(),
            timing,
            view: View::Unknown,
            observed: None,
            deleted_term_end: None,
            absent_since: None,
            uid: None,
            resource_version: None,
            lost: None,
            read_at: None,
            failures: 0,
            expirations: 0,
            position_expired: false,
            watching: true,
            stepped_down: None,
            memory: Memory::default(),
            term_duration: None,
            rng: rand::random::<u64>() | 1,
        }
    }

    /// Starts from what earlier terms of this process saw of the Lease (see [`Memory`]): a
    /// claim never writes a token below what was seen then, and an absence is honoured for the
    /// longest term seen then.
    pub fn remembering(mut self, memory: Memory) -> Campaign {
        self.memory = memory;
        self
    }

    /// What this campaign (and the terms before it) saw of the Lease.
    pub fn memory(&self) -> Memory {
        self.memory
    }

    /// From now on changes are learnt by polling, not watching: failures back off from the retry
    /// period instead of re-establishing the watch fast.
    pub fn polling(&mut self) {
        self.watching = false;
    }

    /// This candidate has just handed the Lease over (a planned handover) at the end of the term
    /// with `transitions`: it leaves that record to the others as the handover asks, "any other
    /// candidate" included. A later term (another holder) is an ordinary one.
    pub fn after_handover(&mut self, transitions: i32) {
        self.stepped_down = Some(transitions);
    }

    fn stepped_down_from(&self, record: &Record) -> bool {
        self.stepped_down == Some(record.transitions)
    }

    /// A handover we are leaving the Lease to: the preferred holder, and until when.
    pub fn deferring(&self, now: Instant) -> Option<(String, Instant)> {
        let (record, observed_at) = self.observed.as_ref()?;
        if !matches!(self.view, View::Present(_)) {
            return None;
        }
        match decide(
            record,
            *observed_at,
            now,
            &self.identity,
            self.timing.lease_duration,
            self.stepped_down_from(record),
        ) {
            Decision::Defer { to, until } => Some((to, until)),
            _ => None,
        }
    }

    /// A number in [0, 1) for jitter.
    fn jitter(&mut self) -> f64 {
        jitter(&mut self.rng)
    }

    /// The resourceVersion to watch from (`None`: nothing seen yet; watch from the current state).
    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// The record we are waiting on, if another identity holds it.
    pub fn waiting_on(&self) -> Option<&Record> {
        match &self.view {
            View::Present(_) => self
                .observed
                .as_ref()
                .map(|(r, _)| r)
                .filter(|r| r.holder.as_deref().is_some_and(|h| h != self.identity)),
            _ => None,
        }
    }

    /// Consecutive failures so far (for logging).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When a deleted holder's term ends, if one is being honoured.
    pub fn deleted_term_end(&self) -> Option<Instant> {
        self.deleted_term_end
    }

    /// Why the Lease is not created or claimed at `now` although nobody holds it, and until when:
    /// the term of a holder it may have had while it was absent (see the module's rules). `None`
    /// when it is held, being handed over, or free to take now.
    pub fn holding_back(&self, now: Instant) -> Option<(HoldBack, Instant)> {
        let end = self.deleted_term_end.filter(|end| *end > now)?;
        match &self.view {
            View::Absent => Some((HoldBack::Absent, end)),
            View::Present(_) => {
                let (record, observed_at) = self.observed.as_ref()?;
                match decide(
                    record,
                    *observed_at,
                    now,
                    &self.identity,
                    self.timing.lease_duration,
                    self.stepped_down_from(record),
                ) {
                    Decision::Wait { .. } | Decision::Defer { .. } => None,
                    _ => Some((HoldBack::AbsentBefore, end)),
                }
            }
            View::Unknown => None,
        }
    }

    /// Feeds one input observed at `now` and returns what to do next.
    pub fn step(&mut self, input: Input, now: Instant) -> Action {
        match input {
            Input::Read(lease) => self.on_read(lease, now),
            Input::Changed(lease) => self.on_changed(lease, now),
            Input::Deleted(lease) => self.on_deleted(lease, now),
            Input::Bookmark(rv) => self.on_bookmark(rv),
            Input::Expired => self.on_expired(now),
            Input::Lost => self.on_lost(now),
            Input::LostCreate => self.on_lost_create(now),
            Input::Failed {
                retry_after,
                answered,
            } => self.on_failed(retry_after, answered, now),
            Input::Tick => {}
        }
        self.next(now)
    }

    /// A GET answered: the Lease, or `None` for 404.
    fn on_read(&mut self, lease: Option<Lease>, now: Instant) {
        self.failures = 0;
        self.read_at = None;
        let Some(lease) = lease else {
            self.absent(None, now);
            return;
        };
        if self.replaced(&lease) {
            // Deleted and created again since we last looked: whoever held the old one
            // may still run, exactly as after a 404.
            self.absent(None, now);
        }
        let position_expired = self.position_expired;
        self.present(lease, now);
        if position_expired {
            self.resource_version = None;
        }
    }

    /// A watch event: the Lease was added or modified.
    fn on_changed(&mut self, lease: Lease, now: Instant) {
        self.expirations = 0;
        self.position_expired = false;
        self.present(lease, now);
    }

    /// A watch event: the Lease was deleted; its last state.
    fn on_deleted(&mut self, lease: Lease, now: Instant) {
        self.expirations = 0;
        self.position_expired = false;
        self.absent(Some(lease), now);
    }

    /// A watch bookmark: the resourceVersion reached.
    fn on_bookmark(&mut self, rv: String) {
        self.expirations = 0;
        self.position_expired = false;
        self.resource_version = Some(rv);
    }

    /// The watch's position is too old (410 Gone).
    fn on_expired(&mut self, now: Instant) {
        self.expirations += 1;
        // The first 410 is normal (compaction): read at once. Repeated ones without an
        // event in between (a server that cannot serve this watch) back off.
        let delay = match self.expirations {
            1 => Duration::ZERO,
            n => backoff(&self.timing, n - 1),
        };
        self.resource_version = None;
        self.position_expired = true;
        self.unknown(now + delay);
    }

    /// Our claim lost to another writer.
    fn on_lost(&mut self, now: Instant) {
        let rv = match &self.view {
            View::Present(lease) => lease.metadata.resource_version.clone(),
            _ => None,
        };
        // The winner's write shows up as an event or on the next read; if nothing shows
        // up by a retry period, our view is stale: read again then.
        let recheck = now + self.timing.retry_period;
        match rv {
            Some(rv) => self.lost = Some((rv, recheck)),
            None => self.unknown(recheck),
        }
    }

    /// Our create lost to another writer's.
    fn on_lost_create(&mut self, now: Instant) {
        // A record exists now. Read it at once rather than wait for it on the watch (which
        // a read drops): its expiry is counted from when it is seen, so seeing it a retry
        // period late would delay a takeover after its holder dies by as much. Reading
        // sooner only observes sooner: the record's write began before this read, so its
        // duration still runs from after it. One GET per lost create, and a create comes
        // only after a lease duration of absence, so this cannot loop fast.
        //
        // Its holder is one we never saw a record of: if the read finds the Lease gone
        // again, that holder may still run, so the absence starts over from then (one
        // more lease duration before a create), as for any unexplained 404.
        self.absent_since = None;
        self.unknown(now);
    }

    /// A request failed in a way worth retrying.
    fn on_failed(&mut self, retry_after: Option<Duration>, answered: bool, now: Instant) {
        self.failures += 1;
        // A watching follower looks again within a second while the server does not
        // answer at all (it is restarting, the connection broke): that costs the server
        // nothing, and a release is missed meanwhile. A server that answers with errors
        // is struggling: after a few fast tries, back off as a polling follower does.
        let delay = if self.watching && (!answered || self.failures <= FAST_TRIES) {
            let jitter = self.jitter();
            resync_delay(&self.timing, self.failures, jitter)
        } else if self.watching {
            backoff(&self.timing, self.failures - FAST_TRIES)
        } else {
            backoff(&self.timing, self.failures)
        };
        // The server said how much it can bear: never ask sooner than it asked. But never
        // stay blind to the Lease for more than a lease duration on its word (a
        // `--wait-timeout` ends the wait anyway when it comes first).
        let delay = retry_after.map_or(delay, |asked| {
            delay.max(asked.min(self.timing.lease_duration))
        });
        self.unknown(now + delay);
    }

    fn present(&mut self, lease: Lease, now: Instant) {
        let record = counted(&lease);
        self.observe(record, now);
        if let Some(rv) = &lease.metadata.resource_version {
            self.resource_version = Some(rv.clone());
        }
        self.absent_since = None;
        self.uid.clone_from(&lease.metadata.uid);
        self.view = View::Present(Box::new(lease));
    }

    fn absent(&mut self, deleted: Option<Lease>, now: Instant) {
        let absent_since = *self.absent_since.get_or_insert(now);
        self.uid = None;
        if deleted.is_none() {
            // A 404 on a read: nothing tells what the Lease was before it was deleted, nor when;
            // its holder may have renewed since we last saw it. Any holder's last renewal came
            // before this absence began, so one lease duration from then covers its term: ours,
            // or the longest this process has seen, in this campaign or an earlier one, if longer
            // (holders of one Lease should share --lease-duration).
            let longest = self.memory.longest_term(self.timing.lease_duration);
            self.hold_off_until(absent_since + longest, now);
        }
        if let Some(lease) = deleted {
            let record = counted(&lease);
            self.observe(record, now);
            if let Some(rv) = &lease.metadata.resource_version {
                self.resource_version = Some(rv.clone());
            }
        }
        // Honour the last observed holder as if its Lease were still there.
        if let Some((record, observed_at)) = &self.observed
            && record.holder.as_deref().is_some_and(|h| h != self.identity)
        {
            let (duration, _) = record.effective_duration();
            let end = observed_at
                .checked_add(duration)
                .unwrap_or(now + crate::timing::MAX_DURATION);
            self.hold_off_until(end, now);
        }
        self.view = View::Absent;
    }

    /// Notes `record`. A record of the same term as the last one (same holder, same `renewTime`:
    /// an operator's edit, a handover request) is no renewal: the term keeps running from when it
    /// was first seen, with the longest duration seen for it. So shrinking `leaseDurationSeconds`
    /// of a held Lease never makes it expire sooner here than its holder counts (from its own last
    /// write, with its own duration), and a request never pushes an expiry back.
    ///
    /// Beyond that, a renewal by the same holder is honoured for at least the duration its last
    /// term was first seen with: a follower polling every retry period may first see a renewal
    /// only after an edit shrank it, and the holder still counts its own. (A holder that really
    /// shortens its duration, restarted with another `--lease-duration`, is honoured for the
    /// longer one for one term more: a slower failover, never an early one.)
    fn observe(&mut self, record: Record, now: Instant) {
        let (observed, first) = match self.observed.take() {
            Some((last, at)) if last.same_term(&record) => {
                // An edit: its token counts, its duration only for this term.
                self.memory.note_token(&record);
                ((record.same_term_as(&last), at), self.term_duration)
            }
            Some((last, _)) if last.holder.is_some() && last.holder == record.holder => {
                // A renewal: at least the duration the last term was first seen with, so an edit
                // that shrank it cannot shorten the next term either; an edit that lengthened it
                // lasts no longer than that.
                self.memory.note(&record);
                let previous = Record {
                    duration_secs: self.term_duration,
                    ..last
                };
                let first = record.duration_secs;
                ((record.same_term_as(&previous), now), first)
            }
            _ => {
                self.memory.note(&record);
                let first = record.duration_secs;
                ((record, now), first)
            }
        };
        self.observed = Some(observed);
        self.term_duration = first;
    }

    /// No create or claim before `end`.
    fn hold_off_until(&mut self, end: Instant, now: Instant) {
        if end > now {
            self.deleted_term_end = Some(self.deleted_term_end.map_or(end, |e| e.max(end)));
        }
    }

    /// Whether `lease` is another object than the one last seen (a different `metadata.uid`).
    fn replaced(&self, lease: &Lease) -> bool {
        matches!((&self.uid, &lease.metadata.uid), (Some(last), Some(uid)) if last != uid)
    }

    fn unknown(&mut self, read_at: Instant) {
        self.view = View::Unknown;
        self.lost = None;
        self.read_at = Some(read_at);
    }

    /// What to do with what we know, at `now`.
    fn next(&mut self, now: Instant) -> Action {
        if self.deleted_term_end.is_some_and(|end| now >= end) {
            self.deleted_term_end = None;
        }
        let gate = self.deleted_term_end;
        match &self.view {
            View::Unknown => Action::Read {
                at: self.read_at.unwrap_or(now).max(now),
            },
            View::Absent => match gate {
                Some(end) => Action::Wait { until: Some(end) },
                None => Action::Create {
                    transitions: self.memory.claim_token(None),
                },
            },
            View::Present(lease) => {
                let Some((record, observed_at)) = &self.observed else {
                    unreachable!("a present Lease is always observed");
                };
                match decide(
                    record,
                    *observed_at,
                    now,
                    &self.identity,
                    self.timing.lease_duration,
                    self.stepped_down_from(record),
                ) {
                    Decision::Wait { expires_at, .. } => Action::Wait {
                        until: Some(expires_at.unwrap_or(now + self.timing.retry_period)),
                    },
                    // Being handed over to someone else: theirs for now. Their claim shows up
                    // as an event (or at the next poll); if none by `until`, compete.
                    Decision::Defer { until, .. } => Action::Wait { until: Some(until) },
                    decision => {
                        let rv = lease.metadata.resource_version.as_deref();
                        if let Some((lost_rv, recheck)) = &self.lost
                            && Some(lost_rv.as_str()) == rv
                        {
                            if now >= *recheck {
                                self.unknown(now);
                                return Action::Read { at: now };
                            }
                            return Action::Wait {
                                until: Some(*recheck),
                            };
                        }
                        if let Some(end) = gate {
                            return Action::Wait { until: Some(end) };
                        }
                        Action::Claim {
                            current: lease.clone(),
                            decision,
                            transitions: self.memory.claim_token(Some(record)),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::backoff::{RESYNC_CAP, RESYNC_FIRST};
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    use k8s_openapi::jiff::Timestamp;

    const S: Duration = Duration::from_secs(1);

    fn lease(holder: Option<&str>, duration: i32, transitions: i32, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                uid: Some("uid-1".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(duration),
                lease_transitions: Some(transitions),
                renew_time: Some(MicroTime(
                    Timestamp::from_second(i64::from(transitions)).unwrap(),
                )),
                ..LeaseSpec::default()
            }),
        }
    }

    fn campaign() -> Campaign {
        Campaign::new("me", Timing::default())
    }

    fn is_claim(action: &Action, rv: &str) -> bool {
        matches!(action, Action::Claim { current, .. } if current.metadata.resource_version.as_deref() == Some(rv))
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_lease_held_back_by_an_earlier_absence_says_why_and_until_when() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(None), t0);
        assert_eq!(c.holding_back(t0), Some((HoldBack::Absent, t0 + 15 * S)));
        // Created by another candidate: held, nothing held back.
        c.step(Input::Changed(lease(Some("other"), 15, 1, "2")), t0 + S);
        assert_eq!(c.holding_back(t0 + S), None);
        // Released: free, yet the earlier absence still holds it back, and says so.
        let action = c.step(Input::Changed(lease(None, 15, 2, "3")), t0 + 2 * S);
        assert_eq!(
            action,
            Action::Wait {
                until: Some(t0 + 15 * S)
            }
        );
        assert_eq!(
            c.holding_back(t0 + 2 * S),
            Some((HoldBack::AbsentBefore, t0 + 15 * S))
        );
        assert_eq!(c.holding_back(t0 + 15 * S), None);
        assert!(is_claim(&c.step(Input::Tick, t0 + 15 * S), "3"));
    }

    #[tokio::test(start_paused = true)]
    async fn starts_by_reading() {
        let t0 = Instant::now();
        let mut c = campaign();
        assert_eq!(c.step(Input::Tick, t0), Action::Read { at: t0 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_read_as_absent_is_created_after_one_lease_duration_of_absence() {
        let t0 = Instant::now();
        let mut c = campaign();
        let wait = Action::Wait {
            until: Some(t0 + 15 * S),
        };
        assert_eq!(c.step(Input::Read(None), t0), wait);
        // Polls that keep finding nothing do not push it back.
        assert_eq!(c.step(Input::Read(None), t0 + 5 * S), wait);
        assert_eq!(
            c.step(Input::Read(None), t0 + 15 * S),
            Action::Create { transitions: 0 }
        );
        // If a holder re-creates it meanwhile, it is waited on like any holder.
        let mut c = campaign();
        c.step(Input::Read(None), t0);
        assert_eq!(
            c.step(Input::Changed(lease(Some("other"), 10, 3, "9")), t0 + S),
            Action::Wait {
                until: Some(t0 + 11 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_404_after_seeing_it_released_still_waits_but_a_watched_deletion_does_not() {
        let t0 = Instant::now();
        // Polling: between the read that showed it released and the 404, someone may have claimed
        // it and been deleted while running.
        let mut c = campaign();
        c.step(Input::Read(Some(lease(None, 1, 4, "5"))), t0);
        c.step(Input::Lost, t0);
        assert_eq!(
            c.step(Input::Read(None), t0 + 3 * S),
            Action::Wait {
                until: Some(t0 + 18 * S)
            }
        );
        // Watching: the DELETED event carries the last state, released.
        let mut c = campaign();
        c.step(Input::Read(Some(lease(None, 1, 4, "5"))), t0);
        c.step(Input::Lost, t0);
        assert_eq!(
            c.step(Input::Deleted(lease(None, 1, 4, "6")), t0 + 3 * S),
            Action::Create { transitions: 5 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lease_is_claimed_when_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let mut c = campaign();
        let held = lease(Some("other"), 10, 3, "5");
        assert_eq!(
            c.step(Input::Read(Some(held.clone())), t0),
            Action::Wait {
                until: Some(t0 + 10 * S)
            }
        );
        // Seen again unchanged (a re-read after a restart): the first observation counts.
        assert_eq!(
            c.step(Input::Read(Some(held.clone())), t0 + 9 * S),
            Action::Wait {
                until: Some(t0 + 10 * S)
            }
        );
        assert!(is_claim(&c.step(Input::Tick, t0 + 10 * S), "5"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_restarts_the_expiry_clock() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 3, "5"))), t0);
        let mut renewed = lease(Some("other"), 10, 3, "6");
        renewed.spec.as_mut().unwrap().renew_time =
            Some(MicroTime(Timestamp::from_second(99).unwrap()));
        assert_eq!(
            c.step(Input::Changed(renewed), t0 + 8 * S),
            Action::Wait {
                until: Some(t0 + 18 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_claimed_at_once() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 3, "5"))), t0);
        assert!(is_claim(
            &c.step(Input::Changed(lease(None, 1, 3, "6")), t0 + S),
            "6"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_deleted_while_held_is_honoured_on_every_path() {
        let t0 = Instant::now();
        // A holder with a 30 s term: longer than our own 15 s absence rule.
        let held = lease(Some("other"), 30, 7, "5");
        let until = |secs: u32| Action::Wait {
            until: Some(t0 + secs * S),
        };
        // Watch: a DELETED event.
        let mut c = campaign();
        c.step(Input::Read(Some(held.clone())), t0);
        assert_eq!(
            c.step(Input::Deleted(lease(Some("other"), 30, 7, "9")), t0 + 2 * S),
            until(30)
        );
        // Polling: a 404 on the next read. The holder may have renewed unseen since t0, so its
        // full term counts from when the absence was found.
        let mut c = campaign();
        c.step(Input::Read(Some(held.clone())), t0);
        assert_eq!(c.step(Input::Read(None), t0 + 2 * S), until(32));
        // A broken watch (410, then errors) and a re-read that finds nothing.
        let mut c = campaign();
        c.step(Input::Read(Some(held.clone())), t0);
        assert_eq!(c.step(Input::Expired, t0 + S), Action::Read { at: t0 + S });
        assert!(matches!(
            c.step(
                Input::Failed {
                    retry_after: None,
                    answered: false
                },
                t0 + S
            ),
            Action::Read { .. }
        ));
        assert_eq!(c.step(Input::Read(None), t0 + 4 * S), until(34));
        // Further 404s keep the deadline; at its end, the Lease is created continuing the token.
        assert_eq!(c.step(Input::Read(None), t0 + 6 * S), until(34));
        assert_eq!(
            c.step(Input::Tick, t0 + 34 * S),
            Action::Create { transitions: 8 }
        );
        // A holder with a shorter term than ours: a 404 still waits for our absence rule.
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 5, 7, "5"))), t0);
        assert_eq!(c.step(Input::Read(None), t0 + 2 * S), until(17));
    }

    #[tokio::test(start_paused = true)]
    async fn a_404_honours_the_longer_of_our_duration_and_the_last_records() {
        let t0 = Instant::now();
        let mut c = campaign();
        // Seen at t0 with a 40 s term; the holder may have renewed unseen since.
        c.step(Input::Read(Some(lease(Some("other"), 40, 1, "5"))), t0);
        c.step(
            Input::Failed {
                retry_after: None,
                answered: false,
            },
            t0 + 20 * S,
        );
        assert_eq!(
            c.step(Input::Read(None), t0 + 22 * S),
            Action::Wait {
                until: Some(t0 + 62 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_deleted_and_recreated_unseen_is_treated_as_a_deletion() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 1, "5"))), t0);
        c.step(
            Input::Failed {
                retry_after: None,
                answered: false,
            },
            t0 + S,
        );
        // Re-read: another object (new uid), released by a candidate that never saw the old one.
        let mut recreated = lease(None, 1, 0, "9");
        recreated.metadata.uid = Some("uid-2".into());
        assert_eq!(
            c.step(Input::Read(Some(recreated)), t0 + 3 * S),
            Action::Wait {
                until: Some(t0 + 18 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_holder_is_honoured_even_if_someone_else_recreates_and_releases() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 1, "5"))), t0);
        c.step(Input::Deleted(lease(Some("other"), 10, 1, "6")), t0 + S);
        // Someone who never saw the old record created it and released it at once.
        assert_eq!(
            c.step(Input::Changed(lease(None, 1, 0, "8")), t0 + 2 * S),
            Action::Wait {
                until: Some(t0 + 10 * S)
            }
        );
        assert!(is_claim(&c.step(Input::Tick, t0 + 10 * S), "8"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_released_or_expired_lease_is_created_at_once_when_the_watch_saw_it() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(None, 1, 4, "5"))), t0);
        assert_eq!(
            c.step(Input::Deleted(lease(None, 1, 4, "6")), t0 + S),
            Action::Create { transitions: 5 }
        );
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 4, "5"))), t0);
        assert_eq!(
            c.step(
                Input::Deleted(lease(Some("other"), 10, 4, "6")),
                t0 + 11 * S
            ),
            Action::Create { transitions: 5 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn our_own_deleted_record_does_not_hold_us_back() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("me"), 10, 2, "5"))), t0);
        assert_eq!(
            c.step(Input::Deleted(lease(Some("me"), 10, 2, "6")), t0 + S),
            Action::Create { transitions: 3 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_claim_waits_for_news_then_rereads() {
        let t0 = Instant::now();
        let mut c = campaign();
        assert!(is_claim(
            &c.step(Input::Read(Some(lease(None, 1, 3, "5"))), t0),
            "5"
        ));
        let retry = Timing::default().retry_period;
        assert_eq!(
            c.step(Input::Lost, t0),
            Action::Wait {
                until: Some(t0 + retry)
            }
        );
        // No news by then: read again.
        assert_eq!(
            c.step(Input::Tick, t0 + retry),
            Action::Read { at: t0 + retry }
        );
        // Or the winner shows up: wait on it.
        let mut c = campaign();
        c.step(Input::Read(Some(lease(None, 1, 3, "5"))), t0);
        c.step(Input::Lost, t0);
        assert_eq!(
            c.step(
                Input::Changed(lease(Some("winner"), 15, 4, "6")),
                t0 + S / 100
            ),
            Action::Wait {
                until: Some(t0 + S / 100 + 15 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_create_then_a_404_waits_a_lease_duration_from_the_404() {
        let t0 = Instant::now();
        let mut c = campaign();
        let lease_duration = Timing::default().lease_duration;
        assert!(matches!(c.step(Input::Read(None), t0), Action::Wait { .. }));
        let t1 = t0 + lease_duration;
        assert!(matches!(c.step(Input::Tick, t1), Action::Create { .. }));
        assert_eq!(c.step(Input::LostCreate, t1), Action::Read { at: t1 });
        // The winner's Lease is gone by the read: wait a lease duration from this 404.
        let t2 = t1 + S / 100;
        assert_eq!(
            c.step(Input::Read(None), t2),
            Action::Wait {
                until: Some(t2 + lease_duration)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_create_reads_the_winner_at_once() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(None, 1, 0, "1"))), t0);
        c.step(Input::Deleted(lease(None, 1, 0, "2")), t0);
        assert_eq!(c.step(Input::LostCreate, t0), Action::Read { at: t0 });
        // The winner's record, seen then, runs its whole duration from then.
        assert_eq!(
            c.step(Input::Read(Some(lease(Some("winner"), 15, 1, "3"))), t0),
            Action::Wait {
                until: Some(t0 + 15 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_404_or_409_on_a_read_rereads_after_a_retry_period_every_time() {
        let t0 = Instant::now();
        let mut c = campaign();
        let retry = Timing::default().retry_period;
        c.step(Input::Tick, t0);
        // A read answered 409 (a proxy in the way): never a read at once, however often.
        assert_eq!(c.step(Input::Lost, t0), Action::Read { at: t0 + retry });
        assert_eq!(
            c.step(Input::Lost, t0 + retry),
            Action::Read { at: t0 + 2 * retry }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_a_read_resets_them() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.polling();
        assert_eq!(
            c.step(
                Input::Failed {
                    retry_after: None,
                    answered: false
                },
                t0
            ),
            Action::Read { at: t0 + 2 * S }
        );
        assert_eq!(
            c.step(
                Input::Failed {
                    retry_after: None,
                    answered: false
                },
                t0
            ),
            Action::Read { at: t0 + 4 * S }
        );
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "1"))), t0);
        assert_eq!(c.failures(), 0);
        assert_eq!(
            c.step(
                Input::Failed {
                    retry_after: None,
                    answered: false
                },
                t0
            ),
            Action::Read { at: t0 + 2 * S }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_410s_back_off_until_an_event_arrives() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "1"))), t0);
        assert_eq!(c.step(Input::Expired, t0), Action::Read { at: t0 });
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "1"))), t0);
        assert_eq!(c.step(Input::Expired, t0), Action::Read { at: t0 + 2 * S });
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "1"))), t0);
        assert_eq!(c.step(Input::Expired, t0), Action::Read { at: t0 + 4 * S });
        c.step(Input::Bookmark("3".into()), t0);
        assert_eq!(c.step(Input::Expired, t0), Action::Read { at: t0 });
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_410_the_watch_starts_from_the_current_state_not_the_objects_old_version() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "5"))), t0);
        assert_eq!(c.resource_version(), Some("5"));
        c.step(Input::Expired, t0);
        // The re-read shows the same object, last changed at "5": too old to watch from.
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "5"))), t0);
        assert_eq!(c.resource_version(), None);
        // The first event of the new watch gives a position again.
        c.step(Input::Bookmark("90".into()), t0);
        assert_eq!(c.resource_version(), Some("90"));
    }

    #[tokio::test(start_paused = true)]
    async fn bookmarks_move_the_watch_position_and_objects_do_not_move_it_back() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "5"))), t0);
        assert_eq!(c.resource_version(), Some("5"));
        c.step(Input::Bookmark("40".into()), t0 + S);
        assert_eq!(c.resource_version(), Some("40"));
        // A timer firing re-evaluates the same object: the bookmark's position stays.
        c.step(Input::Tick, t0 + 2 * S);
        assert_eq!(c.resource_version(), Some("40"));
        c.step(
            Input::Deleted(lease(Some("other"), 10, 0, "41")),
            t0 + 3 * S,
        );
        assert_eq!(c.resource_version(), Some("41"));
    }

    #[tokio::test(start_paused = true)]
    async fn our_own_record_is_resumed() {
        let t0 = Instant::now();
        let mut c = campaign();
        let action = c.step(Input::Read(Some(lease(Some("me"), 15, 2, "5"))), t0);
        assert!(
            matches!(
                &action,
                Action::Claim {
                    decision: Decision::Resume,
                    ..
                }
            ),
            "{action:?}"
        );
    }

    fn failed() -> Input {
        Input::Failed {
            retry_after: None,
            answered: false,
        }
    }

    fn read_in(action: Action, now: Instant) -> Duration {
        match action {
            Action::Read { at } => at - now,
            other => panic!("expected a read, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_watch_is_re_established_within_a_second_whatever_the_retry_period() {
        let t0 = Instant::now();
        let timing = Timing {
            retry_period: 30 * S,
            lease_duration: 120 * S,
            renew_deadline: 60 * S,
            ..Timing::default()
        };
        let mut c = Campaign::new("me", timing);
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "1"))), t0);
        let mut delays = Vec::new();
        for n in 1..=8u32 {
            let delay = read_in(c.step(failed(), t0), t0);
            let full = (RESYNC_FIRST * 2u32.pow(n - 1)).min(RESYNC_CAP);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {n}: {delay:?} not within [{:?}, {full:?}]",
                full / 2
            );
            delays.push(delay);
        }
        // Jittered: not every follower comes back in step.
        delays.sort();
        delays.dedup();
        assert!(delays.len() > 4, "{delays:?}");
        // A read resets the schedule.
        c.step(Input::Read(Some(lease(Some("other"), 10, 0, "1"))), t0);
        assert!(read_in(c.step(failed(), t0), t0) <= RESYNC_FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_retry_period_caps_the_watch_resync_and_polling_keeps_the_long_backoff() {
        let t0 = Instant::now();
        let timing = Timing {
            retry_period: S / 4,
            ..Timing::default()
        };
        let mut c = Campaign::new("me", timing);
        for _ in 0..6 {
            assert!(read_in(c.step(failed(), t0), t0) <= S / 4);
        }
        let mut c = campaign();
        c.polling();
        let delays: Vec<_> = (0..4).map(|_| read_in(c.step(failed(), t0), t0)).collect();
        assert_eq!(delays, [2 * S, 4 * S, 8 * S, 15 * S]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_up_to_one_lease_duration() {
        let t0 = Instant::now();
        let busy = |secs: u64| Input::Failed {
            retry_after: Some(Duration::from_secs(secs)),
            answered: true,
        };
        let mut c = campaign();
        assert_eq!(read_in(c.step(busy(7), t0), t0), 7 * S);
        // Never blind for longer than a lease duration (15 s) on the server's word.
        assert_eq!(read_in(c.step(busy(600), t0), t0), 15 * S);
        // A Retry-After shorter than our own backoff does not shorten it.
        let mut c = campaign();
        c.polling();
        c.step(failed(), t0);
        c.step(failed(), t0);
        assert_eq!(read_in(c.step(busy(1), t0), t0), 8 * S);
    }

    fn preferring(mut l: Lease, preferred: &str) -> Lease {
        let spec = l.spec.as_mut().unwrap();
        spec.preferred_holder = Some(preferred.into());
        spec.strategy = Some(crate::lease::record::HANDOVER_STRATEGY.into());
        l
    }

    #[tokio::test(start_paused = true)]
    async fn a_handover_goes_to_the_preferred_candidate_and_the_others_defer_one_term() {
        let t0 = Instant::now();
        let held = preferring(lease(Some("old"), 10, 3, "5"), "me");
        let released = preferring(lease(None, 1, 3, "6"), "me");
        // The preferred candidate waits for the release like anyone: never early.
        let mut c = campaign();
        assert_eq!(
            c.step(Input::Read(Some(held.clone())), t0),
            Action::Wait {
                until: Some(t0 + 10 * S)
            }
        );
        // Released: it claims at once.
        assert!(is_claim(
            &c.step(Input::Changed(released.clone()), t0 + S),
            "6"
        ));
        // Another candidate leaves it to the preferred one for one lease duration (15 s)…
        let mut c = Campaign::new("other", Timing::default());
        c.step(Input::Read(Some(held)), t0);
        let defer = Action::Wait {
            until: Some(t0 + 16 * S),
        };
        assert_eq!(c.step(Input::Changed(released.clone()), t0 + S), defer);
        assert_eq!(c.deferring(t0 + 2 * S).map(|(to, _)| to), Some("me".into()));
        assert_eq!(c.step(Input::Tick, t0 + 10 * S), defer);
        // …then competes, if the preferred one never came.
        assert!(is_claim(&c.step(Input::Tick, t0 + 16 * S), "6"));
        // If it comes, its claim is waited on like any holder.
        let mut c = Campaign::new("other", Timing::default());
        c.step(Input::Changed(released), t0);
        assert_eq!(
            c.step(Input::Changed(lease(Some("me"), 15, 4, "7")), t0 + S),
            Action::Wait {
                until: Some(t0 + 16 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_being_handed_over_is_deferred_from_its_expiry() {
        let t0 = Instant::now();
        let mut c = Campaign::new("other", Timing::default());
        c.step(
            Input::Read(Some(preferring(lease(Some("old"), 10, 3, "5"), "me"))),
            t0,
        );
        assert_eq!(
            c.step(Input::Tick, t0 + 10 * S),
            Action::Wait {
                until: Some(t0 + 25 * S)
            }
        );
        assert!(is_claim(&c.step(Input::Tick, t0 + 25 * S), "5"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handover_to_any_other_candidate_defers_only_the_one_who_stepped_down() {
        let t0 = Instant::now();
        let released = preferring(lease(None, 1, 3, "6"), crate::lease::record::ANY_OTHER);
        let mut c = campaign();
        assert!(is_claim(
            &c.step(Input::Read(Some(released.clone())), t0),
            "6"
        ));
        let mut c = campaign();
        c.after_handover(3);
        assert_eq!(
            c.step(Input::Read(Some(released)), t0),
            Action::Wait {
                until: Some(t0 + 15 * S)
            }
        );
        // A handover naming it (a ping-pong) is not deferred.
        let mut c = campaign();
        c.after_handover(3);
        assert!(is_claim(
            &c.step(
                Input::Read(Some(preferring(lease(None, 1, 3, "6"), "me"))),
                t0
            ),
            "6"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handover_request_does_not_push_an_expiry_back() {
        let t0 = Instant::now();
        let mut c = Campaign::new("other", Timing::default());
        c.step(Input::Read(Some(lease(Some("old"), 10, 3, "5"))), t0);
        // The request is written on a record its (dead) holder no longer renews.
        let asked = preferring(lease(Some("old"), 10, 3, "6"), "me");
        assert_eq!(
            c.step(Input::Changed(asked), t0 + 5 * S),
            Action::Wait {
                until: Some(t0 + 10 * S)
            }
        );
        // Expired at t0 + 10 s as first seen; then left to "me" for one lease duration.
        assert_eq!(
            c.step(Input::Tick, t0 + 10 * S),
            Action::Wait {
                until: Some(t0 + 25 * S)
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn our_own_record_left_by_a_handover_is_not_resumed() {
        let t0 = Instant::now();
        // We stepped down from term 3 but could not release it (--no-release): it still names us.
        let ours = preferring(lease(Some("me"), 10, 3, "5"), "b");
        let mut c = campaign();
        c.after_handover(3);
        assert_eq!(
            c.step(Input::Read(Some(ours.clone())), t0),
            Action::Wait {
                until: Some(t0 + 10 * S)
            }
        );
        // Expired, and left to b for one lease duration more; then taken back (the request ends).
        assert_eq!(
            c.step(Input::Tick, t0 + 10 * S),
            Action::Wait {
                until: Some(t0 + 25 * S)
            }
        );
        let action = c.step(Input::Tick, t0 + 25 * S);
        assert!(
            matches!(
                &action,
                Action::Claim {
                    decision: Decision::TakeOver { .. },
                    ..
                }
            ),
            "{action:?}"
        );
        // A fresh process with the same identity resumes it (and then hands it over at once).
        let mut c = campaign();
        let action = c.step(Input::Read(Some(ours)), t0);
        assert!(
            matches!(
                &action,
                Action::Claim {
                    decision: Decision::Resume,
                    ..
                }
            ),
            "{action:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stepping_down_applies_to_the_term_handed_over_only() {
        let t0 = Instant::now();
        let any = crate::lease::record::ANY_OTHER;
        let mut c = campaign();
        c.after_handover(3);
        // A later term (another holder took it, then handed it over to any other): we compete.
        assert!(is_claim(
            &c.step(
                Input::Read(Some(preferring(lease(None, 1, 4, "9"), any))),
                t0
            ),
            "9"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_answering_errors_is_retried_fast_three_times_then_backed_off() {
        let t0 = Instant::now();
        let answered = || Input::Failed {
            retry_after: None,
            answered: true,
        };
        let mut c = campaign();
        for n in 1..=FAST_TRIES {
            let delay = read_in(c.step(answered(), t0), t0);
            assert!(delay <= RESYNC_CAP, "attempt {n}: {delay:?}");
        }
        let later: Vec<_> = (0..3)
            .map(|_| read_in(c.step(answered(), t0), t0))
            .collect();
        assert_eq!(later, [2 * S, 4 * S, 8 * S]);
        // No answer at all stays fast.
        let mut c = campaign();
        for _ in 0..10 {
            assert!(read_in(c.step(failed(), t0), t0) <= RESYNC_CAP);
        }
    }

    fn claim_token(action: &Action) -> Option<i32> {
        match action {
            Action::Claim { transitions, .. } | Action::Create { transitions } => {
                Some(*transitions)
            }
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shrunk_duration_that_keeps_holder_and_renew_time_does_not_start_a_new_term() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 3, "5"))), t0);
        // An operator sets leaseDurationSeconds to 1 at t0 + 2 s ("make failover faster"): the
        // holder, alive, counts its own 10 s from its own last write.
        let shrunk = lease(Some("other"), 1, 3, "6");
        let wait = Action::Wait {
            until: Some(t0 + 10 * S),
        };
        assert_eq!(c.step(Input::Changed(shrunk.clone()), t0 + 2 * S), wait);
        assert_eq!(c.step(Input::Tick, t0 + 3 * S), wait);
        // Seen anew from a re-read, unchanged: still the first sight counts.
        assert_eq!(c.step(Input::Read(Some(shrunk)), t0 + 4 * S), wait);
        assert!(is_claim(&c.step(Input::Tick, t0 + 10 * S), "6"));
        // The same when the edit is learnt by polling.
        let mut c = campaign();
        c.polling();
        c.step(Input::Read(Some(lease(Some("other"), 10, 3, "5"))), t0);
        assert_eq!(
            c.step(
                Input::Read(Some(lease(Some("other"), 1, 3, "6"))),
                t0 + 2 * S
            ),
            wait
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_lowered_by_hand_never_lowers_the_next_claim() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 7, "5"))), t0);
        // Lowered to 1 by hand, then released.
        c.step(Input::Changed(lease(Some("other"), 10, 1, "6")), t0 + S);
        let action = c.step(Input::Changed(lease(None, 1, 1, "7")), t0 + 2 * S);
        assert!(is_claim(&action, "7"), "{action:?}");
        assert_eq!(claim_token(&action), Some(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_campaign_remembers_the_highest_token_and_the_longest_term() {
        let t0 = Instant::now();
        // The term before saw a takeover by a holder with a 30 s term and token 6.
        let mut before = campaign();
        before.step(Input::Read(Some(lease(Some("b"), 30, 6, "9"))), t0);
        // The next campaign starts after a deletion: it honours 30 s of absence, not its own 15,
        // and creates with 7, not 0.
        let mut c = campaign().remembering(before.memory());
        let t1 = t0 + 20 * S;
        assert_eq!(
            c.step(Input::Read(None), t1),
            Action::Wait {
                until: Some(t1 + 30 * S)
            }
        );
        assert_eq!(
            c.step(Input::Tick, t1 + 30 * S),
            Action::Create { transitions: 7 }
        );
        // Without the memory: its own duration, token 0.
        let mut fresh = campaign();
        fresh.step(Input::Read(None), t1);
        assert_eq!(
            fresh.step(Input::Tick, t1 + 15 * S),
            Action::Create { transitions: 0 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_edit_that_lengthened_a_term_lasts_that_term_only() {
        let t0 = Instant::now();
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 3, "5"))), t0);
        // An operator's passing 3600 s, undone by the holder's next renewal.
        assert_eq!(
            c.step(Input::Changed(lease(Some("other"), 3600, 3, "6")), t0 + S),
            Action::Wait {
                until: Some(t0 + 3600 * S)
            }
        );
        let mut renewed = lease(Some("other"), 10, 3, "7");
        renewed.spec.as_mut().unwrap().renew_time =
            Some(MicroTime(Timestamp::from_second(99).unwrap()));
        assert_eq!(
            c.step(Input::Changed(renewed), t0 + 2 * S),
            Action::Wait {
                until: Some(t0 + 12 * S)
            }
        );
        assert_eq!(c.memory().longest, Some(10 * S));
    }

    /// `lease` with the duration its holder stated for itself, as lease-exec writes it.
    fn stating(mut lease: Lease, holder: &str, secs: i64) -> Lease {
        let value = serde_json::json!({"holderIdentity": holder, "leaseDurationSeconds": secs});
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("lease-exec/holder-duration".into(), value.to_string());
        lease
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_first_seen_shrunk_counts_the_duration_its_holder_stated() {
        let t0 = Instant::now();
        // Shrunk to 1 s by an operator while its holder (which counts 10 s) was cut off: a
        // candidate that never saw it before counts the holder's own 10 s from its first sight.
        let shrunk = stating(lease(Some("other"), 1, 3, "5"), "other", 10);
        let mut c = campaign();
        let ten = Action::Wait {
            until: Some(t0 + 10 * S),
        };
        assert_eq!(c.step(Input::Read(Some(shrunk.clone())), t0), ten);
        assert_eq!(c.step(Input::Tick, t0 + S), ten);
        assert!(is_claim(&c.step(Input::Tick, t0 + 10 * S), "5"));
        // The longer of the two: a statement shorter than the record changes nothing.
        let mut c = campaign();
        let longer = stating(lease(Some("other"), 10, 3, "5"), "other", 1);
        assert_eq!(c.step(Input::Read(Some(longer)), t0), ten);
        // Without a duration in the record, the statement alone.
        let mut c = campaign();
        let mut missing = stating(lease(Some("other"), 1, 3, "5"), "other", 10);
        missing.spec.as_mut().unwrap().lease_duration_seconds = None;
        assert_eq!(c.step(Input::Read(Some(missing)), t0), ten);
        // A statement of another holder (client-go keeps the annotations of the record it
        // claimed), one that cannot be read, or one that is not positive: the record alone.
        let one = Action::Wait {
            until: Some(t0 + S),
        };
        for stale in [
            stating(lease(Some("client-go"), 1, 4, "6"), "other", 10),
            stating(lease(Some("other"), 1, 4, "6"), "other", 0),
            stating(lease(Some("other"), 1, 4, "6"), "other", 24 * 3600 + 1),
            {
                let mut l = lease(Some("other"), 1, 4, "6");
                l.metadata.annotations =
                    Some([("lease-exec/holder-duration".to_string(), "10".to_string())].into());
                l
            },
        ] {
            let mut c = campaign();
            assert_eq!(c.step(Input::Read(Some(stale)), t0), one);
        }
        // A term stated, then shrunk while seen: the same term, the longest duration.
        let mut c = campaign();
        c.step(
            Input::Read(Some(stating(lease(Some("other"), 10, 3, "5"), "other", 10))),
            t0,
        );
        let both = {
            let mut l = stating(lease(Some("other"), 1, 3, "6"), "other", 1);
            l.metadata.resource_version = Some("6".into());
            l
        };
        assert_eq!(c.step(Input::Changed(both), t0 + 2 * S), ten);
        // The token is the record's, whatever is stated.
        assert_eq!(claim_token(&c.step(Input::Tick, t0 + 10 * S)), Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_without_a_duration_is_the_shortest_term_as_client_go_reads_it() {
        let t0 = Instant::now();
        // client-go reads a missing leaseDurationSeconds as 0 s: its candidates claim at their next
        // retry. So does a lease-exec candidate, at once, not after its own duration.
        let mut missing = lease(Some("other"), 10, 3, "5");
        missing.spec.as_mut().unwrap().lease_duration_seconds = None;
        let mut c = campaign();
        let action = c.step(Input::Read(Some(missing.clone())), t0);
        assert!(is_claim(&action, "5"), "{action:?}");
        assert_eq!(claim_token(&action), Some(4));
        // Removed from a record seen before in the same term: the longest duration seen for it.
        let mut c = campaign();
        c.step(Input::Read(Some(lease(Some("other"), 10, 3, "4"))), t0);
        assert_eq!(
            c.step(Input::Changed(missing), t0 + S),
            Action::Wait {
                until: Some(t0 + 10 * S)
            }
        );
    }

    #[test]
    fn a_failed_request_becomes_an_input_or_ends_the_wait() {
        let denied = ApiError::Denied {
            code: 403,
            verb: "update",
            name: "l".into(),
            namespace: "ns".into(),
            message: "forbidden".into(),
        };
        let every = [
            Request::Create,
            Request::Claim,
            Request::Read,
            Request::Watch,
        ];
        for request in every {
            // Refusals end the wait, whatever the request.
            assert!(Input::from_error(&denied, request).is_none());
            assert!(Input::from_error(&ApiError::NoNamespace("ns".into()), request).is_none());
            // Someone else's write won.
            for lost in [ApiError::Conflict, ApiError::NotFound] {
                assert!(matches!(
                    Input::from_error(&lost, request),
                    Some(Input::Lost)
                ));
            }
            // Failures worth retrying: whether the server answered, and when it asked us back.
            assert!(matches!(
                Input::from_error(&ApiError::Unreachable("refused".into()), request),
                Some(Input::Failed {
                    retry_after: None,
                    answered: false
                })
            ));
            for answered in [
                ApiError::Timeout(Duration::from_secs(5)),
                ApiError::Transient("503".into()),
                ApiError::Rejected("400".into()),
            ] {
                assert!(matches!(
                    Input::from_error(&answered, request),
                    Some(Input::Failed {
                        retry_after: None,
                        answered: true
                    })
                ));
            }
            let busy = ApiError::Busy {
                message: "429".into(),
                retry_after: Duration::from_secs(3),
            };
            assert!(matches!(
                Input::from_error(&busy, request),
                Some(Input::Failed {
                    retry_after: Some(d),
                    answered: true
                }) if d == Duration::from_secs(3)
            ));
        }
        // Only a create loses to another create; an AlreadyExists on anything else is a lost write.
        assert!(matches!(
            Input::from_error(&ApiError::AlreadyExists, Request::Create),
            Some(Input::LostCreate)
        ));
        for request in [Request::Claim, Request::Read, Request::Watch] {
            assert!(matches!(
                Input::from_error(&ApiError::AlreadyExists, request),
                Some(Input::Lost)
            ));
        }
        assert_eq!(
            every.map(Request::verb),
            ["create", "claim", "read", "watch"]
        );
    }
}
