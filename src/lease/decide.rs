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

    /// Whether `other` is the same record but for a handover request (`preferredHolder`): no
    /// renewal, no change of holder.
    pub fn same_renewal(&self, other: &Record) -> bool {
        Record {
            preferred: None,
            ..self.clone()
        } == Record {
            preferred: None,
            ..other.clone()
        }
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

    /// `current` changed to name us, keeping its resourceVersion so the update is conditional.
    /// Resuming (it already names us) keeps `acquireTime` and `leaseTransitions`; any change of
    /// holder, including from a released Lease, increments `leaseTransitions` as client-go does.
    /// `take_over`: released or expired (not a resume), which ends any handover request.
    pub fn claim(&self, current: &Lease, now: Timestamp, take_over: bool) -> Lease {
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
        if record.holder.as_deref() != Some(self.identity) {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(record.transitions.saturating_add(1));
        } else if spec.acquire_time.is_none() {
            spec.acquire_time = Some(MicroTime(now));
        }
        spec.holder_identity = Some(self.identity.to_string());
        spec.lease_duration_seconds = Some(self.duration_secs());
        spec.renew_time = Some(MicroTime(now));
        self.set_owner(&mut lease.metadata);
        lease
    }

    /// `current` (which names us) with a fresh `renewTime`.
    pub fn renew(&self, current: &Lease, now: Timestamp) -> Lease {
        let mut lease = current.clone();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.identity.to_string());
        spec.lease_duration_seconds = Some(self.duration_secs());
        spec.renew_time = Some(MicroTime(now));
        lease
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
        let new = me.claim(&old, now, true);
        let spec = new.spec.as_ref().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(5));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.acquire_time, Some(MicroTime(now)));
        assert_eq!(new.metadata.resource_version.as_deref(), Some("7"));
        let refs = new.metadata.owner_references.clone().unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].uid, "uid-b");

        // Resuming keeps the transitions and the acquire time.
        let resumed = me.claim(&new, Timestamp::from_second(2000).unwrap(), false);
        let spec = resumed.spec.as_ref().unwrap();
        assert_eq!(spec.lease_transitions, Some(5));
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
            .claim(&with(None, HANDOVER_STRATEGY), now, true)
            .spec
            .unwrap();
        assert_eq!((spec.strategy, spec.preferred_holder), (None, None));
        let spec = me
            .claim(&with(None, "OldestEmulationVersion"), now, true)
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
        for kept in [other.renew(&held, now), other.release(&held, now)] {
            let spec = kept.spec.unwrap();
            assert_eq!(spec.preferred_holder.as_deref(), Some("me"));
            assert_eq!(spec.strategy.as_deref(), Some(HANDOVER_STRATEGY));
        }
    }
}
