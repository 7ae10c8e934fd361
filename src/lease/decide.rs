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

use super::record::{HANDOVER_STRATEGY, HOLDER_DURATION_ANNOTATION, PodOwner, Record, statement};
use crate::timing::Timing;

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
        /// The preferred holder (or [`super::record::ANY_OTHER`]).
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
            let (duration, _) = record.effective_duration();
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

/// Everything needed to write our claim on a Lease: owned, so the renewer and the guard can run as
/// tasks of their own with a clone.
#[derive(Debug, Clone)]
pub struct Claimant {
    /// Our holder identity.
    pub identity: String,
    /// Our timing (lease duration).
    pub timing: Timing,
    /// Our Pod, for `ownerReferences`.
    pub owner: Option<PodOwner>,
}

impl Claimant {
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
        self.state_duration(&mut metadata);
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
    /// with `transitions` as the fencing token (see [`super::record::Memory::claim_token`]): every claim starts a
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
        if record.holder.as_deref() != Some(self.identity.as_str()) || spec.acquire_time.is_none() {
            spec.acquire_time = Some(MicroTime(now));
        }
        spec.lease_transitions = Some(transitions);
        spec.holder_identity = Some(self.identity.to_string());
        spec.lease_duration_seconds = Some(self.duration_secs());
        spec.renew_time = Some(MicroTime(now));
        self.set_owner(&mut lease.metadata);
        self.state_duration(&mut lease.metadata);
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
        self.state_duration(&mut lease.metadata);
        lease
    }

    /// Whether `record`, which names us, was edited by someone else in a way a renewal must undo
    /// at once: a duration other than ours (client-go followers count a term from any change they
    /// see, with the duration they see), or a token below our own `own`.
    pub fn must_restore(&self, record: &Record, own: i32) -> bool {
        record.holder.as_deref() == Some(self.identity.as_str())
            && (record.duration_secs != Some(self.duration_secs()) || record.transitions < own)
    }

    /// `current` released, client-go style: holder cleared, duration 1 s, transitions kept, so the
    /// next candidate can take over at once. `strategy` and `preferredHolder` are kept: after a
    /// handover they tell the candidates who is preferred. Nobody holds it: no duration is stated.
    pub fn release(&self, current: &Lease, now: Timestamp) -> Lease {
        let mut lease = current.clone();
        if let Some(annotations) = lease.metadata.annotations.as_mut() {
            annotations.remove(HOLDER_DURATION_ANNOTATION);
            if annotations.is_empty() {
                lease.metadata.annotations = None;
            }
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(MicroTime(now));
        spec.renew_time = Some(MicroTime(now));
        lease
    }

    /// States our own duration beside `leaseDurationSeconds`, where an edit of that field leaves it
    /// (see [`HOLDER_DURATION_ANNOTATION`]); other annotations are kept.
    fn state_duration(&self, metadata: &mut ObjectMeta) {
        metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                HOLDER_DURATION_ANNOTATION.to_string(),
                statement(&self.identity, self.duration_secs()),
            );
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
        if let Some(owner) = &self.owner {
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
    use crate::lease::record::Memory;

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
    fn a_missing_duration_is_the_shortest_term_with_a_warning() {
        let t0 = Instant::now();
        // client-go reads a missing leaseDurationSeconds as 0 s (the API server refuses values
        // below 1, which would read the same).
        for bad in [None, Some(0), Some(-5)] {
            let r = Record::of(&lease(Some("other"), bad, 0));
            let (d, warning) = r.effective_duration();
            assert_eq!(d, Duration::ZERO);
            assert!(warning.unwrap().contains("spec.leaseDurationSeconds"));
            assert_eq!(
                decide(&r, t0, t0, "me", FALLBACK, false),
                Decision::TakeOver {
                    expired_holder: Some("other".into())
                }
            );
        }
    }

    #[test]
    fn every_write_of_a_holder_states_its_own_duration_and_a_release_drops_it() {
        let me = Claimant {
            identity: "me".into(),
            timing: Timing::default(),
            owner: None,
        };
        let stated = |lease: &Lease| {
            lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("lease-exec/holder-duration"))
                .map(|v| serde_json::from_str::<serde_json::Value>(v).unwrap())
        };
        let ours = Some(serde_json::json!({"holderIdentity": "me", "leaseDurationSeconds": 15}));
        let now = Timestamp::UNIX_EPOCH;
        // An edit that shrank the record and rewrote the statement: a renewal restores both.
        let mut edited = lease(Some("me"), Some(1), 2);
        edited.metadata.annotations = Some(
            [
                ("lease-exec/holder-duration".to_string(), "1".to_string()),
                ("team".to_string(), "a".to_string()),
            ]
            .into(),
        );
        for written in [
            me.create("l", "ns", 0, now),
            me.claim(&lease(Some("other"), Some(30), 2), now, true, 3),
            me.renew(&edited, now, 2),
        ] {
            assert_eq!(stated(&written), ours, "{written:?}");
            assert_eq!(
                Record::of(&written).stated_secs,
                Some(15),
                "read back as stated"
            );
        }
        // Other annotations stay.
        let renewed = me.renew(&edited, now, 2);
        assert_eq!(renewed.metadata.annotations.unwrap()["team"], "a");
        // A released record states nothing: nobody holds it.
        let released = me.release(&me.renew(&edited, now, 2), now);
        assert_eq!(stated(&released), None);
        assert_eq!(released.metadata.annotations.unwrap()["team"], "a");
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
            identity: "me".into(),
            timing,
            owner: Some(owner.clone()),
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
            identity: "me".into(),
            timing,
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
            identity: "me".into(),
            timing,
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
            identity: "me".into(),
            timing,
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
            identity: "other".into(),
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
        assert_eq!(shrunk.clone().same_term_as(&held).duration_secs, Some(15));
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
            identity: "me".into(),
            timing,
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
