//! Pure lease decisions: (record read, when we observed it, our identity and timing) → action.
//! No I/O here; the loops in [`super::acquire`] and [`super::renew`] act on these decisions.
//!
//! Expiry is judged as client-go does: a record is expired once it has not changed for its
//! `leaseDurationSeconds` since *this process* first observed that version, measured on the local
//! monotonic clock ([`tokio::time::Instant`], CLOCK_MONOTONIC). `renewTime` is never compared with
//! the local wall clock: clocks of different nodes disagree, and a fast clock here would let us take
//! a lease that its holder still uses.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use crate::config::{PodOwner, Timing};

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
/// renewal writes [`renewal_token`], never below the holder's own.
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

/// The token a renewal writes: the holder's own (`own`, what its command was given), or the
/// record's if someone raised it since; never lower than `own`, so a value lowered by hand is
/// restored at once.
pub fn renewal_token(record: i32, own: i32) -> i32 {
    record.max(own)
}

/// What to do with a Lease that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It names us: resume without a change of holder.
    Resume,
    /// Released or expired: take it over with an update conditioned on its resourceVersion.
    TakeOver {
        /// The previous holder, when the Lease expired rather than being released.
        expired_holder: Option<String>,
    },
    /// Released or expired, but being handed over to someone else: leave it to them until
    /// `until` (one `--lease-duration` after it became free in our eyes; they may be gone).
    Defer {
        /// The preferred holder (or [`ANY_OTHER`]).
        to: String,
        /// When we may compete for it.
        until: Instant,
    },
    /// Someone else holds it.
    Wait {
        /// The holder.
        holder: String,
        /// When it will be expired if nothing changes; `None` if never (a duration too large for
        /// the clock).
        expires_at: Option<Instant>,
    },
}

/// Decides what to do with a Lease record first observed (in this version) at `observed_at`.
/// `stepped_down`: we handed this Lease over ourselves (see [`Record::defers`]).
///
/// A handover never lets anyone claim a held Lease early: the preferred holder waits for the
/// release (or the expiry) like everyone; the others wait one `--lease-duration` (`fallback`)
/// longer, so the preferred one gets it if it is alive.
pub fn decide(
    record: &Record,
    observed_at: Instant,
    now: Instant,
    identity: &str,
    fallback: Duration,
    stepped_down: bool,
) -> Decision {
    // Our own record is resumed, unless we stepped down from it for a handover and could not
    // release it (`--no-release`, a failed release): then it is left to expire like another's, and
    // to the preferred candidate for one term more, never renewed by a resume.
    let leaving = stepped_down && record.handover_from(identity).is_some();
    let free_since = match &record.holder {
        None => Some(observed_at),
        Some(holder) if holder == identity && !leaving => return Decision::Resume,
        Some(holder) => {
            let (duration, _) = record.effective_duration(fallback);
            let expires_at = observed_at.checked_add(duration);
            match expires_at {
                Some(at) if now >= at => Some(at),
                _ => {
                    return Decision::Wait {
                        holder: holder.clone(),
                        expires_at,
                    };
                }
            }
        }
    };
    if record.defers(identity, stepped_down)
        && let Some(until) = free_since.and_then(|t| t.checked_add(fallback))
        && now < until
    {
        return Decision::Defer {
            to: record.preferred.clone().unwrap_or_default(),
            until,
        };
    }
    Decision::TakeOver {
        expired_holder: record.holder.clone(),
    }
}

/// Everything needed to write our claim on a Lease.
#[derive(Debug, Clone)]
pub struct Claimant<'a> {
    /// Our holder identity.
    pub identity: &'a str,
    /// Our timing (lease duration).
    pub timing: &'a Timing,
    /// Our Pod, for `ownerReferences`.
    pub owner: Option<&'a PodOwner>,
}

impl Claimant<'_> {
    fn duration_secs(&self) -> i32 {
        // Validated at start-up: whole seconds, at most 24 h.
        i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// A new Lease naming us, for a create. `transitions` is the fencing token: 0 for a Lease
    /// never seen, else one more than the last `leaseTransitions` observed (see
    /// [`super::campaign`]), so it never goes backwards when a Lease is deleted and re-created.
    pub fn create(&self, name: &str, namespace: &str, transitions: i32, now: Timestamp) -> Lease {
        let mut metadata = ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        };
        self.set_owner(&mut metadata);
        Lease {
            metadata,
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.to_string()),
                lease_duration_seconds: Some(self.duration_secs()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    /// `current` changed to name us, keeping its resourceVersion so the update is conditional,
    /// with `transitions` as the fencing token (see [`Memory::claim_token`]): every claim starts a
    /// new command, so a resume (it already names us) writes a new token too, keeping only
    /// `acquireTime`. `take_over`: released or expired (not a resume), which ends any handover
    /// request.
    pub fn claim(
        &self,
        current: &Lease,
        now: Timestamp,
        take_over: bool,
        transitions: i32,
    ) -> Lease {
        let record = Record::of(current);
        let mut lease = current.clone();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if take_over {
            // A handover ends with the new holder: the preferred one, or anyone after the
            // preferred one let it pass. A request left in place would make this new term
            // end at once. Another strategy (the API's own) stays. A resume keeps the request:
            // it is carried out at once (see the supervisor).
            spec.preferred_holder = None;
            if spec.strategy.as_deref() == Some(HANDOVER_STRATEGY) {
                spec.strategy = None;
            }
        }
        if record.holder.as_deref() != Some(self.identity) || spec.acquire_time.is_none() {
            spec.acquire_time = Some(MicroTime(now));
        }
        spec.lease_transitions = Some(transitions);
        spec.holder_identity = Some(self.identity.to_string());
        spec.lease_duration_seconds = Some(self.duration_secs());
        spec.renew_time = Some(MicroTime(now));
        self.set_owner(&mut lease.metadata);
        lease
    }

    /// `current` (which names us) with a fresh `renewTime`, our duration, and our token `own`
    /// unless the record's is higher (see [`renewal_token`]): a renewal restores whatever an edit
    /// that kept us as holder changed in the term's promise.
    pub fn renew(&self, current: &Lease, now: Timestamp, own: i32) -> Lease {
        let record = Record::of(current);
        let mut lease = current.clone();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.identity.to_string());
        spec.lease_duration_seconds = Some(self.duration_secs());
        spec.lease_transitions = Some(renewal_token(record.transitions, own));
        spec.renew_time = Some(MicroTime(now));
        lease
    }

    /// Whether `record`, which names us, was edited by someone else in a way a renewal must undo
    /// at once: a duration other than ours (client-go followers count a term from any change they
    /// see, with the duration they see), or a token below our own `own`.
    pub fn must_restore(&self, record: &Record, own: i32) -> bool {
        record.holder.as_deref() == Some(self.identity)
            && (record.duration_secs != Some(self.duration_secs()) || record.transitions < own)
    }

    /// `current` released, client-go style: holder cleared, duration 1 s, transitions kept, so the
    /// next candidate can take over at once. `strategy` and `preferredHolder` are kept: after a
    /// handover they tell the candidates who is preferred.
    pub fn release(&self, current: &Lease, now: Timestamp) -> Lease {
        let mut lease = current.clone();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(MicroTime(now));
        spec.renew_time = Some(MicroTime(now));
        lease
    }

    /// Replaces any Pod owner with ours (or removes it when we have none), so garbage collection
    /// follows the current holder's Pod. Other owners are kept.
    fn set_owner(&self, metadata: &mut ObjectMeta) {
        let mut refs: Vec<OwnerReference> = metadata
            .owner_references
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !(r.kind == "Pod" && r.api_version == "v1"))
            .collect();
        if let Some(owner) = self.owner {
            refs.push(OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: owner.name.clone(),
                uid: owner.uid.clone(),
                controller: None,
                block_owner_deletion: None,
            });
        }
        metadata.owner_references = (!refs.is_empty()).then_some(refs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FALLBACK: Duration = Duration::from_secs(15);

    fn lease(holder: Option<&str>, duration: Option<i32>, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: duration,
                lease_transitions: Some(transitions),
                renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn live_holder_means_wait_until_observed_plus_duration() {
        let t0 = Instant::now();
        let r = Record::of(&lease(Some("other"), Some(10), 3));
        let d = decide(&r, t0, t0 + Duration::from_secs(9), "me", FALLBACK, false);
        assert_eq!(
            d,
            Decision::Wait {
                holder: "other".into(),
                expires_at: Some(t0 + Duration::from_secs(10))
            }
        );
        let d = decide(&r, t0, t0 + Duration::from_secs(10), "me", FALLBACK, false);
        assert_eq!(
            d,
            Decision::TakeOver {
                expired_holder: Some("other".into())
            }
        );
    }

    #[test]
    fn released_and_missing_spec_are_free() {
        let t0 = Instant::now();
        for l in [
            lease(None, Some(1), 4),
            lease(Some(""), Some(15), 4),
            Lease {
                spec: None,
                ..lease(None, None, 0)
            },
        ] {
            let d = decide(&Record::of(&l), t0, t0, "me", FALLBACK, false);
            assert_eq!(
                d,
                Decision::TakeOver {
                    expired_holder: None
                }
            );
        }
    }

    #[test]
    fn own_identity_resumes() {
        let t0 = Instant::now();
        let r = Record::of(&lease(Some("me"), Some(15), 2));
        assert_eq!(decide(&r, t0, t0, "me", FALLBACK, false), Decision::Resume);
    }

    #[test]
    fn unusable_duration_falls_back_to_ours_with_a_warning() {
        let t0 = Instant::now();
        for bad in [None, Some(0), Some(-5)] {
            let r = Record::of(&lease(Some("other"), bad, 0));
            let (d, warning) = r.effective_duration(FALLBACK);
            assert_eq!(d, FALLBACK);
            assert!(warning.unwrap().contains("spec.leaseDurationSeconds"));
            assert!(matches!(
                decide(&r, t0, t0 + Duration::from_secs(14), "me", FALLBACK, false),
                Decision::Wait { .. }
            ));
        }
    }

    #[test]
    fn huge_duration_is_honoured() {
        let t0 = Instant::now();
        let r = Record::of(&lease(Some("other"), Some(i32::MAX), 0));
        let d = decide(
            &r,
            t0,
            t0 + Duration::from_secs(86_400),
            "me",
            FALLBACK,
            false,
        );
        assert!(matches!(d, Decision::Wait { .. }));
    }

    #[test]
    fn takeover_increments_transitions_and_replaces_the_pod_owner() {
        let timing = Timing::default();
        let owner = PodOwner {
            name: "pod-b".into(),
            uid: "uid-b".into(),
        };
        let me = Claimant {
            identity: "me",
            timing: &timing,
            owner: Some(&owner),
        };
        let mut old = lease(Some("other"), Some(15), 4);
        old.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: "pod-a".into(),
            uid: "uid-a".into(),
            ..OwnerReference::default()
        }]);
        let now = Timestamp::from_second(1000).unwrap();
        let new = me.claim(&old, now, true, 5);
        let spec = new.spec.as_ref().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(5));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));
        assert_eq!(new.metadata.resource_version.as_deref(), Some("7"));
        let refs = new.metadata.owner_references.clone().unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].uid, "uid-b");

        // Resuming keeps the acquire time; the token is the one given (a new command starts).
        let resumed = me.claim(&new, Timestamp::from_second(2000).unwrap(), false, 6);
        let spec = resumed.spec.as_ref().unwrap();
        assert_eq!(spec.lease_transitions, Some(6));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));
    }

    #[test]
    fn release_clears_the_holder_like_client_go() {
        let timing = Timing::default();
        let me = Claimant {
            identity: "me",
            timing: &timing,
            owner: None,
        };
        let released = me.release(&lease(Some("me"), Some(15), 2), Timestamp::UNIX_EPOCH);
        let spec = released.spec.unwrap();
        assert_eq!(spec.holder_identity, None);
        assert_eq!(spec.lease_duration_seconds, Some(1));
        assert_eq!(spec.lease_transitions, Some(2));
    }

    #[test]
    fn micro_time_serialises_with_microseconds_and_z() {
        let timing = Timing::default();
        let me = Claimant {
            identity: "me",
            timing: &timing,
            owner: None,
        };
        let ts: Timestamp = "2026-11-24T10:00:00.123456789Z".parse().unwrap();
        let json = serde_json::to_value(me.create("l", "ns", 0, ts)).unwrap();
        assert_eq!(json["spec"]["renewTime"], "2026-11-24T10:00:00.123456Z");
        assert_eq!(json["spec"]["leaseTransitions"], 0);
    }

    #[test]
    fn a_new_holder_ends_the_handover_and_a_resume_or_release_keeps_it() {
        let timing = Timing::default();
        let me = Claimant {
            identity: "me",
            timing: &timing,
            owner: None,
        };
        let with = |holder: Option<&str>, strategy: &str| {
            let mut l = lease(holder, Some(15), 2);
            let spec = l.spec.as_mut().unwrap();
            spec.strategy = Some(strategy.into());
            spec.preferred_holder = Some("me".into());
            l
        };
        let now = Timestamp::UNIX_EPOCH;
        // Taken by the preferred candidate: our own strategy goes, the API's stays.
        let spec = me
            .claim(&with(None, HANDOVER_STRATEGY), now, true, 3)
            .spec
            .unwrap();
        assert_eq!((spec.strategy, spec.preferred_holder), (None, None));
        let spec = me
            .claim(&with(None, "OldestEmulationVersion"), now, true, 3)
            .spec
            .unwrap();
        assert_eq!(spec.strategy.as_deref(), Some("OldestEmulationVersion"));
        assert_eq!(spec.preferred_holder, None);
        // A renewal and a release keep the request for the candidates to see.
        let other = Claimant {
            identity: "other",
            ..me.clone()
        };
        let held = with(Some("other"), HANDOVER_STRATEGY);
        assert_eq!(Record::of(&held).handover_from("other"), Some("me"));
        assert_eq!(Record::of(&held).handover_from("me"), None);
        for kept in [other.renew(&held, now, 2), other.release(&held, now)] {
            let spec = kept.spec.unwrap();
            assert_eq!(spec.preferred_holder.as_deref(), Some("me"));
            assert_eq!(spec.strategy.as_deref(), Some(HANDOVER_STRATEGY));
        }
    }

    #[test]
    fn an_edit_that_keeps_holder_and_renew_time_is_the_same_term_with_the_longest_duration() {
        let held = Record::of(&lease(Some("other"), Some(15), 7));
        let shrunk = Record {
            duration_secs: Some(1),
            transitions: 1,
            ..held.clone()
        };
        assert!(held.same_term(&shrunk));
        assert_eq!(
            shrunk.clone().same_term_as(&held, FALLBACK).duration_secs,
            Some(15)
        );
        // A renewal (a new renewTime) or another holder is a new term.
        let renewed = Record {
            renew_time: Some(Timestamp::from_second(5).unwrap()),
            ..held.clone()
        };
        assert!(!held.same_term(&renewed));
        let other = Record {
            holder: Some("third".into()),
            ..held.clone()
        };
        assert!(!held.same_term(&other));
    }

    #[test]
    fn the_token_only_rises_for_a_process_that_saw_it() {
        let mut memory = Memory::default();
        assert_eq!(memory.claim_token(None), 0, "a Lease never seen");
        memory.note(&Record::of(&lease(Some("a"), Some(30), 7)));
        // Lowered by hand to 1, or deleted: the next claim still writes 8.
        let lowered = Record::of(&lease(Some("a"), Some(15), 1));
        memory.note(&lowered);
        assert_eq!(memory.claim_token(Some(&lowered)), 8);
        assert_eq!(memory.claim_token(None), 8);
        // A record higher than anything seen wins.
        assert_eq!(
            memory.claim_token(Some(&Record::of(&lease(None, Some(1), 40)))),
            41
        );
        // The longest term seen is remembered for an absence.
        assert_eq!(memory.longest_term(FALLBACK), Duration::from_secs(30));
        let mut later = Memory::default();
        later.merge(&memory);
        assert_eq!(later, memory);
        // A renewal keeps the holder's own token, or a higher one raised by someone else.
        assert_eq!(renewal_token(1, 7), 7);
        assert_eq!(renewal_token(9, 7), 9);
    }

    #[test]
    fn a_renewal_restores_an_edited_duration_and_token() {
        let timing = Timing::default();
        let me = Claimant {
            identity: "me",
            timing: &timing,
            owner: None,
        };
        let edited = lease(Some("me"), Some(1), 2);
        assert!(me.must_restore(&Record::of(&edited), 7));
        let spec = me.renew(&edited, Timestamp::UNIX_EPOCH, 7).spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(7));
        // Our own renewal is no edit; another holder's record is not ours to restore.
        assert!(!me.must_restore(&Record::of(&lease(Some("me"), Some(15), 7)), 7));
        assert!(!me.must_restore(&Record::of(&lease(Some("x"), Some(1), 0)), 7));
    }
}
