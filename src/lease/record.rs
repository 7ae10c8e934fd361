//! The Lease record as decisions read it, what a process remembers of one Lease across its terms,
//! and the values lease-exec writes into a record (the handover strategy, [`ANY_OTHER`], the Pod
//! owner). Plain data and the rules of reading it: nothing of the rest of the crate is used here,
//! so the configuration and every decision can depend on it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;

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
        Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            duration_secs: spec.lease_duration_seconds,
            transitions: spec.lease_transitions.unwrap_or(0),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            preferred: spec.preferred_holder.clone().filter(|p| !p.is_empty()),
        }
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
    pub fn same_term_as(mut self, earlier: &Record, fallback: Duration) -> Record {
        let longest = self
            .effective_duration(fallback)
            .0
            .max(earlier.effective_duration(fallback).0);
        self.duration_secs = Some(i32::try_from(longest.as_secs()).unwrap_or(i32::MAX));
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

    /// The duration others must wait, and a warning naming the field when it is unusable.
    ///
    /// A holder with a missing or non-positive `leaseDurationSeconds` is treated as holding for our
    /// own `--lease-duration`: taking over at once would be unsafe if that holder is alive.
    pub fn effective_duration(&self, fallback: Duration) -> (Duration, Option<String>) {
        match self.duration_secs {
            Some(secs) if secs > 0 => (Duration::from_secs(secs as u64), None),
            Some(secs) => (
                fallback,
                Some(format!(
                    "spec.leaseDurationSeconds is {secs}, not positive; assuming {} (--lease-duration)",
                    humantime::format_duration(fallback)
                )),
            ),
            None => (
                fallback,
                Some(format!(
                    "spec.leaseDurationSeconds is missing; assuming {} (--lease-duration)",
                    humantime::format_duration(fallback)
                )),
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
    /// The longest positive `leaseDurationSeconds` observed.
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
