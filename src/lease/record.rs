//! The Lease record as decisions read it, what a process remembers of one Lease across its terms,
//! and the values lease-exec writes into a record (the handover strategy, [`ANY_OTHER`], the Pod
//! owner). Plain data and the rules of reading it: nothing of the rest of the crate is used here,
//! so the configuration and every decision can depend on it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;

use crate::timing::MAX_DURATION;

/// The parts of a Lease's spec that decisions read, compared to detect a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// `spec.holderIdentity`; `None` when absent or empty (released).
    pub holder: Option<String>,
    /// `spec.leaseDurationSeconds` as written.
    pub duration_secs: Option<i32>,
    /// `spec.leaseTransitions` (0 when absent).
    pub transitions: i32,
    /// `spec.renewTime` as written; only compared, never used as a clock.
    pub renew_time: Option<Timestamp>,
    /// `spec.acquireTime` as written.
    pub acquire_time: Option<Timestamp>,
    /// `spec.preferredHolder`; `None` when absent or empty. A handover is requested (see
    /// [`Record::defers`]).
    pub preferred: Option<String>,
    /// The lease duration, in seconds, the holder stated for itself in
    /// [`HOLDER_DURATION_ANNOTATION`]; `None` unless that statement names this record's holder and
    /// is positive (see [`Record::counting_stated`]).
    pub stated_secs: Option<i32>,
}

/// The `metadata.annotations` key in which every write of a lease-exec holder (create, claim,
/// renewal) states its own `--lease-duration`, as JSON naming the holder:
/// `{"holderIdentity":"pod-a","leaseDurationSeconds":15}`. An operator's edit of
/// `spec.leaseDurationSeconds` leaves it in place, so a lease-exec candidate that first sees a
/// shrunk record still learns what its holder counts (see [`Record::counting_stated`]). The
/// identity is in it because client-go keeps the annotations of a record it claims: a statement
/// naming another identity is a former holder's, and says nothing of the current one.
pub const HOLDER_DURATION_ANNOTATION: &str = "lease-exec/holder-duration";

/// The value of [`HOLDER_DURATION_ANNOTATION`] for `holder` counting `secs`.
pub fn statement(holder: &str, secs: i32) -> String {
    serde_json::json!({"holderIdentity": holder, "leaseDurationSeconds": secs}).to_string()
}

/// The duration a statement gives `holder`: `None` when it cannot be read, names someone else, is
/// not positive, or is longer than any lease-exec accepts (`--lease-duration` is at most
/// [`MAX_DURATION`]): no lease-exec holder wrote such a statement, and an edited one would keep
/// candidates waiting for as long as it says, and be remembered as the longest term.
fn stated_for(value: &str, holder: Option<&str>) -> Option<i32> {
    let value: serde_json::Value = serde_json::from_str(value).ok()?;
    let named = value.get("holderIdentity")?.as_str()?;
    let secs = value.get("leaseDurationSeconds")?.as_i64()?;
    let longest = i64::try_from(MAX_DURATION.as_secs()).unwrap_or(i64::MAX);
    (holder == Some(named) && secs > 0 && secs <= longest)
        .then(|| i32::try_from(secs).unwrap_or(i32::MAX))
}

/// Whether resourceVersion `version` is known to come after `than`. Within one etcd (every API
/// server of a cluster), resourceVersions are its revisions, integers that only rise; Kubernetes
/// calls them opaque, so when either does not read as one the order is unknown and this says no.
/// Never decided by arrival: a lagging watch, a re-opened one, a slow read can deliver an older
/// record after a newer one.
pub fn newer_version(version: Option<&str>, than: Option<&str>) -> bool {
    match (
        version.and_then(|v| v.parse::<u64>().ok()),
        than.and_then(|v| v.parse::<u64>().ok()),
    ) {
        (Some(version), Some(than)) => version > than,
        _ => false,
    }
}

/// `spec.strategy` lease-exec writes for a handover requested with `--handover` when the Lease has
/// no strategy of its own: a qualified name, as the API requires of strategies it does not define.
pub const HANDOVER_STRATEGY: &str = "lease-exec/handover";

/// `spec.preferredHolder` of a handover to any other candidate (`--handover` without `--to`):
/// no identity is preferred, the holder steps down and defers to the others for one term.
/// `--identity` refuses it.
pub const ANY_OTHER: &str = "*";

/// A preferred holder as people read it: the identity, or "any other candidate" for
/// [`ANY_OTHER`].
pub fn describe_preferred(preferred: &str) -> &str {
    if preferred == ANY_OTHER {
        "any other candidate"
    } else {
        preferred
    }
}

impl Record {
    /// Reads the record from a Lease.
    pub fn of(lease: &Lease) -> Record {
        let Some(spec) = &lease.spec else {
            return Record::default();
        };
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let stated_secs = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HOLDER_DURATION_ANNOTATION))
            .and_then(|value| stated_for(value, holder.as_deref()));
        Record {
            holder,
            duration_secs: spec.lease_duration_seconds,
            transitions: spec.lease_transitions.unwrap_or(0),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            preferred: spec.preferred_holder.clone().filter(|p| !p.is_empty()),
            stated_secs,
        }
    }

    /// The record as a lease-exec candidate counts it: with the longer of `leaseDurationSeconds`
    /// and the duration its holder stated for itself ([`HOLDER_DURATION_ANNOTATION`]). An edit
    /// that shrank (or removed) `leaseDurationSeconds` while its holder could not see it (cut off,
    /// frozen) leaves the statement of the holder's last write, so a candidate that first sees the
    /// edited record counts what the holder counts, from a sight that came after that write. A
    /// record without a statement (a client-go holder's) counts `leaseDurationSeconds` alone.
    pub fn counting_stated(mut self) -> Record {
        if let Some(stated) = self.stated_secs
            && self.duration_secs.is_none_or(|secs| secs < stated)
        {
            self.duration_secs = Some(stated);
        }
        self
    }

    /// Whether `other` is the same term as `self`: the same holder and the same `renewTime`. An
    /// edit that keeps both (an operator shrinking `leaseDurationSeconds` to "make failover
    /// faster", lowering `leaseTransitions`, a handover request, a label) is no renewal: the
    /// holder's liveness shows in `renewTime` alone, and the holder counts its own term from its
    /// own last write, whatever was edited since. See [`Record::same_term_as`].
    pub fn same_term(&self, other: &Record) -> bool {
        self.holder == other.holder && self.renew_time == other.renew_time
    }

    /// `self`, seen after `earlier` of the same holder (in the same term, see
    /// [`Record::same_term`], or a renewal), with the longer of their durations: the holder may
    /// still be counting on the longer one.
    pub fn same_term_as(mut self, earlier: &Record) -> Record {
        let longest = self
            .effective_duration()
            .0
            .max(earlier.effective_duration().0);
        if !longest.is_zero() {
            self.duration_secs = Some(i32::try_from(longest.as_secs()).unwrap_or(i32::MAX));
        }
        self
    }

    /// Whether a handover asks `identity` to leave the Lease to someone else: a preferred holder
    /// that is another identity, or any other candidate when `identity` is the holder that stepped
    /// down (`stepped_down`).
    pub fn defers(&self, identity: &str, stepped_down: bool) -> bool {
        match self.preferred.as_deref() {
            None => false,
            Some(ANY_OTHER) => stepped_down,
            Some(preferred) => preferred != identity,
        }
    }

    /// The identity a holder named `identity` is asked to hand the Lease over to, if any: it names
    /// us and prefers someone else (or anyone else).
    pub fn handover_from(&self, identity: &str) -> Option<&str> {
        match (&self.holder, &self.preferred) {
            (Some(holder), Some(preferred)) if holder == identity && preferred != identity => {
                Some(preferred)
            }
            _ => None,
        }
    }

    /// The duration others count, and a warning naming the field when it is unusable.
    ///
    /// A missing `leaseDurationSeconds` (the API server accepts a Lease without one, and refuses
    /// values below 1) is the shortest term there is, 0 s, in every role: client-go reads it so,
    /// and its candidates claim such a record at their next retry. Counting anything longer
    /// would let a holder believe in a term others do not grant it.
    pub fn effective_duration(&self) -> (Duration, Option<String>) {
        match self.duration_secs {
            Some(secs) if secs > 0 => (Duration::from_secs(secs as u64), None),
            Some(secs) => (
                Duration::ZERO,
                Some(format!(
                    "spec.leaseDurationSeconds is {secs}, not positive; counting 0 s, as client-go does"
                )),
            ),
            None => (
                Duration::ZERO,
                Some(
                    "spec.leaseDurationSeconds is missing; counting 0 s, as client-go does"
                        .to_string(),
                ),
            ),
        }
    }
}

/// What one process remembers of one Lease across its terms (with `--recampaign`, one campaign
/// after another): the highest `leaseTransitions` and the longest `leaseDurationSeconds` it has
/// observed, by any path (a read, a watch event, a write's answer, the leader's guard).
///
/// The fencing token rule: `leaseTransitions` (`LEASE_EXEC_TRANSITIONS` for the command) never
/// repeats nor decreases for a process that saw the earlier value. A claim or a create writes
/// [`Memory::claim_token`], one more than the highest value either the record or this process has
/// seen (a Lease deleted and re-created, or a value lowered by hand, cannot take it back); a
/// renewal writes [`super::decide::renewal_token`], never below the holder's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// The highest `leaseTransitions` observed.
    pub highest: Option<i32>,
    /// The longest positive `leaseDurationSeconds` observed (as a candidate counts it, with its
    /// holder's stated duration; never from a holder's own record, see [`Memory::note_held`]).
    pub longest: Option<Duration>,
}

impl Memory {
    /// Notes a record observed.
    pub fn note(&mut self, record: &Record) {
        self.highest = Some(
            self.highest
                .map_or(record.transitions, |h| h.max(record.transitions)),
        );
        if let Some(secs) = record.duration_secs.filter(|s| *s > 0) {
            let duration = Duration::from_secs(secs as u64);
            self.longest = Some(self.longest.map_or(duration, |l| l.max(duration)));
        }
    }

    /// Notes a record of the Lease held by `identity`, seen by that holder (its renewer or its
    /// guard): a record naming the holder is its own write or someone's edit of it, whose duration
    /// is the holder's own or an operator's passing value (3600 s, undone at once), nobody's term:
    /// only its token counts. Another holder's record is a term like any other.
    pub fn note_held(&mut self, record: &Record, identity: &str) {
        if record.holder.as_deref() == Some(identity) {
            self.note_token(record);
        } else {
            self.note(record);
        }
    }

    /// Notes the token of a record, not its duration (an edit within a term: see
    /// [`Record::same_term`]; an operator's passing 3600 must not slow every later failover).
    pub fn note_token(&mut self, record: &Record) {
        self.highest = Some(
            self.highest
                .map_or(record.transitions, |h| h.max(record.transitions)),
        );
    }

    /// Takes in what another memory of the same Lease holds.
    pub fn merge(&mut self, other: &Memory) {
        self.highest = self.highest.max(other.highest);
        self.longest = self.longest.max(other.longest);
    }

    /// The token a claim or create writes: one more than the highest `leaseTransitions` seen (the
    /// record's included, when there is one), 0 for a Lease never seen in any state.
    pub fn claim_token(&self, record: Option<&Record>) -> i32 {
        match self.highest.max(record.map(|r| r.transitions)) {
            Some(highest) => highest.saturating_add(1),
            None => 0,
        }
    }

    /// The longest term to honour for a holder not seen: `ours`, or the longest duration seen if
    /// longer (holders of one Lease should share `--lease-duration`, but may not).
    pub fn longest_term(&self, ours: Duration) -> Duration {
        self.longest.map_or(ours, |l| l.max(ours))
    }
}

/// The Pod named in `metadata.ownerReferences`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOwner {
    /// `POD_NAME`.
    pub name: String,
    /// `POD_UID`.
    pub uid: String,
}
