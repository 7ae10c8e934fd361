//! How a term of leadership ends: every reason, and the two deadlines that follow from it, in one
//! pure function ([`deadlines`]) without processes or I/O.
//!
//! While leading, two instants are derived from the start of the last successful renewal
//! (`renewed_at`, monotonic clock):
//! - `lose_at = renewed_at + renew_deadline`: leadership counts as lost; renewing stops and the
//!   command gets SIGTERM (and SIGCONT, so a stopped command can act on it).
//! - `kill_at ≤ renewed_at + lease_duration − safety_margin`: the command's group gets SIGKILL,
//!   whatever else happened. Nobody else can take an *expired* Lease over before
//!   `renewed_at + lease_duration` (see [`crate::timing::Timing`]), so the command is dead first.
//!
//! A takeover without expiry (another holder written over ours, or ours cleared by someone else)
//! gives no such head start: the other worker may already run, so `kill_at` is the moment it was
//! seen. A second SIGTERM/SIGINT also kills at once. A requested stop (the first SIGTERM/SIGINT)
//! and a lost leadership give the command `--grace-period`, cut short by the safety deadline.
//!
//! Suspend: CLOCK_MONOTONIC stops while the machine sleeps, other nodes' clocks do not. The
//! supervisor measures how much longer CLOCK_BOOTTIME says it has been since the renewal, and moves
//! `renewed_at` back by that much ([`Term::effective_renewal`]); the same rules then apply.

use std::time::Duration;

use tokio::time::Instant;

use crate::timing::Timing;

/// Why a term is ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A stop signal (SIGTERM, SIGINT) was received and forwarded: grace period, then SIGKILL.
    Asked,
    /// Another stop signal while stopping: SIGKILL now.
    Insisted,
    /// No successful renewal for `--renew-deadline` (its value).
    RenewDeadline(Duration),
    /// The machine was suspended long enough for the renew deadline to pass.
    Suspended,
    /// Another identity holds the Lease, or it was cleared by someone else: SIGKILL now.
    Taken(String),
    /// A handover was requested (`spec.preferredHolder` names another identity, or any other):
    /// the command is stopped as for a stop signal (grace period, renewals go on), then the Lease
    /// is released for the preferred candidate.
    Handover(String),
    /// The command never started: the term's renew deadline passed before the spawn (see the
    /// spawn rule in [`crate::supervise`]). Nothing runs, so nothing is stopped.
    Late,
}

impl Reason {
    /// Whether leadership is over (as opposed to a stop the command was asked for while leading).
    pub fn loses(&self) -> bool {
        matches!(
            self,
            Reason::RenewDeadline(_) | Reason::Suspended | Reason::Taken(_) | Reason::Late
        )
    }

    /// The label counted in metrics and written in logs.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Asked => "signal",
            Reason::Insisted => "second_signal",
            Reason::RenewDeadline(_) => "renew_deadline",
            Reason::Suspended => "suspended",
            Reason::Taken(_) => "taken",
            Reason::Handover(_) => "handover",
            Reason::Late => "late",
        }
    }
}

/// Why leadership was lost, for the last log line, the error lease-exec exits with and the Event.
impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Asked | Reason::Insisted => f.write_str("stopped by a signal"),
            Reason::RenewDeadline(deadline) => write!(
                f,
                "no successful renewal for {} (--renew-deadline)",
                humantime::format_duration(*deadline)
            ),
            Reason::Suspended => f.write_str(
                "the machine was suspended past --renew-deadline since the last renewal",
            ),
            Reason::Taken(why) => f.write_str(why),
            Reason::Handover(to) if to == crate::lease::record::ANY_OTHER => {
                f.write_str("handed over on request (spec.preferredHolder) to any other candidate")
            }
            Reason::Handover(to) => {
                write!(f, "handed over on request (spec.preferredHolder) to {to}")
            }
            Reason::Late => write!(f, "{}", crate::child::Late),
        }
    }
}

/// How much longer CLOCK_BOOTTIME must run ahead of CLOCK_MONOTONIC since the renewal before it
/// counts as a suspend: the two clocks are read a few microseconds apart, and only a suspend makes
/// them differ by more.
pub const SUSPEND_THRESHOLD: Duration = Duration::from_millis(50);

/// The state of the current term: what has happened that ends it.
#[derive(Debug, Clone, Default)]
pub struct Term {
    /// When the grace period started (first stop signal, or leadership lost).
    pub grace_from: Option<Instant>,
    /// When an immediate kill was called for (taken, second signal).
    pub kill_from: Option<Instant>,
    /// Why leadership was lost, if it was.
    pub lost: Option<Reason>,
    /// The identity a handover was requested to, if one was.
    pub handover: Option<String>,
    /// When a stop signal first asked for the end (a later one insists).
    pub asked: Option<Instant>,
}

/// The two instants the supervisor sleeps until.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Leadership counts as lost at this time, unless it already is.
    pub lose_at: Option<Instant>,
    /// The command's group gets SIGKILL at this time.
    pub kill_at: Instant,
}

/// What the supervisor must do at once when a reason applies. SIGKILL is not here: it follows
/// from [`deadlines`] (`kill_at` is now for a takeover or a second signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Act {
    /// Stop renewing and report not-leader (metrics, probes, statsd).
    pub lose: bool,
    /// SIGTERM (and SIGCONT) to the command's group: its grace period starts.
    pub terminate: bool,
}

impl Term {
    /// Records that `reason` applies from `now`, and says what to do about it at once.
    pub fn end(&mut self, reason: Reason, now: Instant) -> Act {
        let mut act = Act::default();
        match reason {
            // A grace period may already run (a loss, a handover): the command keeps it; the
            // signal itself was forwarded to the group.
            Reason::Asked => {
                self.asked.get_or_insert(now);
                act.terminate = self.grace_from.is_none();
                self.grace_from.get_or_insert(now);
            }
            Reason::Insisted => {
                self.kill_from.get_or_insert(now);
            }
            Reason::RenewDeadline(_) | Reason::Suspended => {
                if self.lost.is_none() {
                    self.lost = Some(reason);
                    act.lose = true;
                    act.terminate = self.grace_from.is_none();
                    self.grace_from.get_or_insert(now);
                }
            }
            Reason::Taken(_) => {
                self.kill_from.get_or_insert(now);
                if self.lost.is_none() {
                    self.lost = Some(reason);
                    act.lose = true;
                }
            }
            // Leadership is not lost: renewals go on through the grace period (the deadlines
            // stay those of a leader), and the Lease is released once the command is gone.
            Reason::Handover(to) => {
                // Already stopping (a signal, a loss): that is how this term ends.
                if self.grace_from.is_none() && self.kill_from.is_none() {
                    self.handover = Some(to);
                    act.terminate = true;
                    self.grace_from = Some(now);
                }
            }
            // Reported when the spawn refused to start the command: there is nothing to stop.
            Reason::Late => {}
        }
        act
    }

    /// Why the term ended other than by the command's own exit or a signal: a loss, else a
    /// handover that no stop signal superseded.
    pub fn ended_by(&self) -> Option<Reason> {
        self.lost.clone().or_else(|| {
            self.handover
                .clone()
                .filter(|_| self.asked.is_none())
                .map(Reason::Handover)
        })
    }

    /// Whether a stop signal asked for the end: lease-exec then exits, `--recampaign` or not.
    pub fn was_asked(&self) -> bool {
        self.asked.is_some()
    }

    /// `renewed_at` moved back by the time the machine spent suspended since then: the renewal as
    /// other nodes' clocks see it, and whether there was a suspend. `boot_since` and `mono_since`
    /// are the time since the renewal on CLOCK_BOOTTIME and on CLOCK_MONOTONIC.
    pub fn effective_renewal(
        renewed_at: Instant,
        boot_since: Duration,
        mono_since: Duration,
    ) -> (Instant, bool) {
        let suspended = boot_since.saturating_sub(mono_since);
        if suspended < SUSPEND_THRESHOLD {
            return (renewed_at, false);
        }
        (
            renewed_at.checked_sub(suspended).unwrap_or(renewed_at),
            true,
        )
    }
}

/// The deadlines of a term, from the state of the term, the last renewal (moved back for a
/// suspend, see [`Term::effective_renewal`]) and the lease duration others may count from it
/// (`counted`: ours, or shorter after someone's edit of the record, see
/// [`crate::lease::renew`]'s `observed`).
///
/// `kill_at` is never later than `renewed_at + counted − its safety margin`, whatever the
/// reason; it is the moment of the takeover or of the second signal when there was one; else the
/// end of the grace period, when one runs. `lose_at` is the renew deadline, scaled down with a
/// shorter `counted` so that it never comes after the kill.
pub fn deadlines(
    term: &Term,
    (renewed_at, counted): (Instant, Duration),
    timing: &Timing,
) -> Deadlines {
    let safety = renewed_at + timing.kill_within(counted);
    let mut kill_at = safety;
    if let Some(from) = term.grace_from {
        kill_at = kill_at.min(from + timing.grace_period);
    }
    if let Some(from) = term.kill_from {
        kill_at = kill_at.min(from);
    }
    Deadlines {
        lose_at: term
            .lost
            .is_none()
            .then(|| renewed_at + timing.renew_deadline_within(counted)),
        kill_at,
    }
}

/// What to do with the Lease once the command's group and every leftover were killed; `all_gone`:
/// they were seen gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The command ended the term (it exited, or a stop signal ended it): release the Lease for
    /// the next candidate (unless `--no-release`) and exit with the command's status.
    Release,
    /// Processes the command started survived SIGKILL: keep the Lease claimed, so that it expires
    /// rather than letting a next worker start beside them.
    Keep,
    /// Leadership was lost, or the Lease handed over: lease-exec exits 75 (or, with
    /// `--recampaign`, campaigns again once everything is gone and no stop signal asked to end).
    Lost {
        /// Why.
        reason: Reason,
        /// Release the Lease first: it may still name us.
        release: bool,
        /// The term ended in a handover: the next campaign leaves that record to the others.
        stepped_down: bool,
    },
}

/// The end-of-term choice, from how the term ended ([`Term::ended_by`]) and whether everything
/// the command started was seen gone. Releasing lets the next candidate claim at once, so it
/// happens only with `all_gone`: the next worker can never overlap anything of this one.
pub fn finish(term: &Term, all_gone: bool) -> Finish {
    match term.ended_by() {
        // Not ours any more: nothing to release.
        Some(reason @ Reason::Taken(_)) => Finish::Lost {
            reason,
            release: false,
            stepped_down: false,
        },
        // Renewals stopped at the loss (or, for a handover, with the command). The group is
        // gone: if the Lease still names us (our last write may have landed after all),
        // release it so followers need not wait a whole lease duration. "If": another holder
        // may have taken it since the loss (a takeover after a renew-deadline loss still ends
        // here); the release is then refused, being conditioned on the resourceVersion of our
        // last write and re-checking the holder on a conflict (lease::release). A handover request
        // stays in the released Lease for the preferred candidate to see.
        // A handover started this term's end, whatever ended it at last (renewals that
        // failed during the grace period): the Lease was left to the others, and must not
        // come back to this process with the request still in it.
        Some(reason) => Finish::Lost {
            reason,
            release: all_gone,
            stepped_down: term.handover.is_some(),
        },
        None if !all_gone => Finish::Keep,
        None => Finish::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> Timing {
        Timing::default() // 15 s lease, 10 s deadline, 2 s retry, 5 s grace; kill_by 14.5 s
    }

    #[tokio::test(start_paused = true)]
    async fn while_leading_the_deadlines_come_from_the_last_renewal() {
        let r = Instant::now();
        let d = deadlines(&Term::default(), (r, timing().lease_duration), &timing());
        assert_eq!(d.lose_at, Some(r + Duration::from_secs(10)));
        assert_eq!(d.kill_at, r + 14_500 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_signal_gives_the_grace_period_cut_by_the_safety_deadline() {
        let r = Instant::now();
        let mut term = Term::default();
        let act = term.end(Reason::Asked, r + Duration::from_secs(1));
        assert_eq!(
            act,
            Act {
                lose: false,
                terminate: true
            }
        );
        let d = deadlines(&term, (r, timing().lease_duration), &timing());
        assert_eq!(d.kill_at, r + Duration::from_secs(6));
        // Renewals go on while the command stops: a late stop is cut by the safety deadline.
        assert_eq!(d.lose_at, Some(r + Duration::from_secs(10)));
        let mut term = Term::default();
        term.end(Reason::Asked, r + Duration::from_secs(12));
        assert_eq!(
            deadlines(&term, (r, timing().lease_duration), &timing()).kill_at,
            r + 14_500 * MS
        );
        // A second signal kills at once; so does another stop signal, only once.
        assert_eq!(
            term.end(Reason::Asked, r + Duration::from_secs(13)),
            Act::default()
        );
        term.end(Reason::Insisted, r + Duration::from_secs(13));
        assert_eq!(
            deadlines(&term, (r, timing().lease_duration), &timing()).kill_at,
            r + Duration::from_secs(13)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_renew_deadline_stops_renewing_then_terminates_with_grace() {
        let r = Instant::now();
        let mut term = Term::default();
        let at = r + Duration::from_secs(10);
        assert_eq!(
            term.end(Reason::RenewDeadline(Duration::from_secs(10)), at),
            Act {
                lose: true,
                terminate: true
            }
        );
        let d = deadlines(&term, (r, timing().lease_duration), &timing());
        assert_eq!(d.lose_at, None);
        // Grace 5 s would end at 15 s, past the safety deadline: 14.5 s wins.
        assert_eq!(d.kill_at, r + 14_500 * MS);
        // Lost once only.
        assert_eq!(term.end(Reason::Suspended, at), Act::default());
        assert_eq!(
            term.lost,
            Some(Reason::RenewDeadline(Duration::from_secs(10)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn losing_while_already_stopping_keeps_the_running_grace_period() {
        let r = Instant::now();
        let mut term = Term::default();
        term.end(Reason::Asked, r + Duration::from_secs(1));
        assert_eq!(
            term.end(
                Reason::RenewDeadline(Duration::from_secs(10)),
                r + Duration::from_secs(10)
            ),
            Act {
                lose: true,
                terminate: false
            }
        );
        assert_eq!(
            deadlines(&term, (r, timing().lease_duration), &timing()).kill_at,
            r + Duration::from_secs(6)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_takeover_kills_at_once_without_grace() {
        let r = Instant::now();
        let mut term = Term::default();
        let seen = r + Duration::from_secs(3);
        let act = term.end(Reason::Taken("the lease is now held by x".into()), seen);
        assert_eq!(
            act,
            Act {
                lose: true,
                terminate: false
            }
        );
        let d = deadlines(&term, (r, timing().lease_duration), &timing());
        assert_eq!(d.kill_at, seen);
        assert_eq!(d.lose_at, None);
        // Also while a grace period already runs.
        let mut term = Term::default();
        term.end(
            Reason::RenewDeadline(Duration::from_secs(10)),
            r + Duration::from_secs(10),
        );
        term.end(Reason::Taken("x".into()), r + Duration::from_secs(11));
        assert_eq!(
            deadlines(&term, (r, timing().lease_duration), &timing()).kill_at,
            r + Duration::from_secs(11)
        );
        assert_eq!(
            term.lost,
            Some(Reason::RenewDeadline(Duration::from_secs(10)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn kill_is_never_later_than_the_safety_deadline() {
        let r = Instant::now();
        let t = timing();
        for reason in [
            Reason::Asked,
            Reason::RenewDeadline(Duration::from_secs(10)),
            Reason::Suspended,
            Reason::Insisted,
            Reason::Taken("x".into()),
            Reason::Handover("x".into()),
        ] {
            for at in [0, 5_000, 10_000, 14_000, 20_000] {
                let mut term = Term::default();
                term.end(reason.clone(), r + at * MS);
                assert!(
                    deadlines(&term, (r, t.lease_duration), &t).kill_at <= r + t.kill_by(),
                    "{reason:?} at {at} ms"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_shortened_by_someone_else_shortens_the_term_from_the_last_renewal() {
        let r = Instant::now();
        let t = timing();
        let d = deadlines(&Term::default(), (r, Duration::from_secs(1)), &t);
        // 1 s less its margin (200 ms + 2%), counted from our last renewal, not from the edit.
        assert_eq!(d.kill_at, r + 780 * MS);
        // Leadership is lost first, so the end is a loss (exit 75), with what is left as grace.
        let lose = d.lose_at.unwrap();
        assert!(lose > r && lose <= d.kill_at, "{d:?}");
        // And every way the term ends keeps that bound.
        for reason in [
            Reason::Asked,
            Reason::RenewDeadline(t.renew_deadline),
            Reason::Handover("x".into()),
        ] {
            let mut term = Term::default();
            term.end(reason.clone(), r + 100 * MS);
            let d = deadlines(&term, (r, Duration::from_secs(1)), &t);
            assert!(d.kill_at <= r + 780 * MS, "{reason:?}: {d:?}");
        }
        // A longer duration than ours counts as ours.
        assert_eq!(
            deadlines(&Term::default(), (r, Duration::from_secs(60)), &t),
            deadlines(&Term::default(), (r, t.lease_duration), &t)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspend_moves_the_renewal_back_and_only_a_suspend_does() {
        let r = Instant::now() + Duration::from_secs(100);
        // API down, no suspend: both clocks agree; the renewal stays where it was.
        assert_eq!(
            Term::effective_renewal(r, Duration::from_secs(10), Duration::from_secs(10) - MS),
            (r, false)
        );
        // Suspended for 20 s after 3 s of running: 23 s since the renewal on the boot clock.
        let (moved, suspended) =
            Term::effective_renewal(r, Duration::from_secs(23), Duration::from_secs(3));
        assert!(suspended);
        assert_eq!(moved, r - Duration::from_secs(20));
        let d = deadlines(
            &Term::default(),
            (moved, timing().lease_duration),
            &timing(),
        );
        assert!(
            d.kill_at < r + Duration::from_secs(3),
            "kill at once on resume"
        );
    }

    #[test]
    fn only_losses_lose() {
        assert!(!Reason::Asked.loses());
        assert!(!Reason::Insisted.loses());
        assert!(Reason::RenewDeadline(Duration::from_secs(10)).loses());
        assert!(Reason::Suspended.loses());
        assert!(Reason::Taken(String::new()).loses());
        assert!(!Reason::Handover(String::new()).loses());
        assert!(Reason::Late.loses());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handover_stops_the_command_with_grace_while_renewals_go_on() {
        let r = Instant::now();
        let t = timing();
        let mut term = Term::default();
        let at = r + Duration::from_secs(1);
        let act = term.end(Reason::Handover("b".into()), at);
        assert_eq!(
            act,
            Act {
                lose: false,
                terminate: true
            }
        );
        // Still a leader's deadlines: a renewal moves them, the grace period bounds the kill.
        let d = deadlines(&term, (r + Duration::from_secs(3), t.lease_duration), &t);
        assert_eq!(d.lose_at, Some(r + Duration::from_secs(13)));
        assert_eq!(d.kill_at, at + t.grace_period);
        assert_eq!(term.ended_by(), Some(Reason::Handover("b".into())));
        // A second request changes nothing; a loss meanwhile is the reason given.
        assert_eq!(term.end(Reason::Handover("c".into()), at), Act::default());
        term.end(
            Reason::RenewDeadline(Duration::from_secs(10)),
            r + Duration::from_secs(13),
        );
        assert_eq!(
            term.ended_by(),
            Some(Reason::RenewDeadline(Duration::from_secs(10)))
        );
        // Asked to stop first: the handover is not taken up (the exit is the signal's).
        let mut term = Term::default();
        term.end(Reason::Asked, at);
        assert_eq!(term.end(Reason::Handover("b".into()), at), Act::default());
        assert_eq!(term.ended_by(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_signal_during_a_handover_keeps_the_grace_and_ends_the_run() {
        let r = Instant::now();
        let t = timing();
        let mut term = Term::default();
        let at = r + Duration::from_secs(1);
        term.end(Reason::Handover("b".into()), at);
        // The first signal is a request, not an insistence: the grace period runs on.
        let act = term.end(Reason::Asked, at + Duration::from_millis(300));
        assert_eq!(act, Act::default());
        assert_eq!(
            deadlines(&term, (r, t.lease_duration), &t).kill_at,
            at + t.grace_period
        );
        assert!(term.was_asked());
        assert_eq!(term.ended_by(), None, "a plain stop: the command's status");
        // After a loss, the loss is still the reason.
        let mut term = Term::default();
        term.end(Reason::RenewDeadline(Duration::from_secs(10)), at);
        term.end(Reason::Asked, at);
        assert_eq!(
            term.ended_by(),
            Some(Reason::RenewDeadline(Duration::from_secs(10)))
        );
        assert!(term.was_asked());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_spawn_ends_nothing_that_runs() {
        let r = Instant::now();
        let mut term = Term::default();
        assert_eq!(term.end(Reason::Late, r), Act::default());
        assert_eq!(term.ended_by(), None);
        assert_eq!(
            deadlines(&term, (r, timing().lease_duration), &timing()),
            deadlines(&Term::default(), (r, timing().lease_duration), &timing())
        );
    }

    #[test]
    fn each_reason_says_why_leadership_ended() {
        let cases = [
            (Reason::Asked, "stopped by a signal"),
            (Reason::Insisted, "stopped by a signal"),
            (
                Reason::RenewDeadline(Duration::from_secs(10)),
                "no successful renewal for 10s (--renew-deadline)",
            ),
            (
                Reason::Suspended,
                "the machine was suspended past --renew-deadline since the last renewal",
            ),
            (
                Reason::Taken("the lease is now held by x".into()),
                "the lease is now held by x",
            ),
            (
                Reason::Handover("b".into()),
                "handed over on request (spec.preferredHolder) to b",
            ),
            (
                Reason::Handover(crate::lease::record::ANY_OTHER.into()),
                "handed over on request (spec.preferredHolder) to any other candidate",
            ),
            (
                Reason::Late,
                "the term's renew deadline passed before the command could start",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_released_only_once_everything_is_gone_and_never_after_a_takeover() {
        let r = Instant::now();
        let deadline = Reason::RenewDeadline(Duration::from_secs(10));
        // The command exited, or a stop signal ended it.
        let mut asked = Term::default();
        asked.end(Reason::Asked, r);
        for term in [Term::default(), asked] {
            assert_eq!(finish(&term, true), Finish::Release);
            assert_eq!(finish(&term, false), Finish::Keep);
        }
        // Lost: released only when everything is gone.
        let mut lost = Term::default();
        lost.end(deadline.clone(), r);
        for all_gone in [true, false] {
            assert_eq!(
                finish(&lost, all_gone),
                Finish::Lost {
                    reason: deadline.clone(),
                    release: all_gone,
                    stepped_down: false
                }
            );
        }
        // Taken: never released, whatever else happened.
        let taken = Reason::Taken("the lease is now held by x".into());
        let mut term = Term::default();
        term.end(Reason::Handover("b".into()), r);
        term.end(taken.clone(), r + Duration::from_secs(1));
        assert_eq!(
            finish(&term, true),
            Finish::Lost {
                reason: taken,
                release: false,
                stepped_down: false
            }
        );
        // A handover: released, and left to the others next time, even when renewals failed
        // during its grace period.
        let mut term = Term::default();
        term.end(Reason::Handover("b".into()), r);
        assert_eq!(
            finish(&term, true),
            Finish::Lost {
                reason: Reason::Handover("b".into()),
                release: true,
                stepped_down: true
            }
        );
        term.end(deadline.clone(), r + Duration::from_secs(10));
        assert_eq!(
            finish(&term, true),
            Finish::Lost {
                reason: deadline,
                release: true,
                stepped_down: true
            }
        );
        // A stop signal during a handover's grace period: the command's own end.
        let mut term = Term::default();
        term.end(Reason::Handover("b".into()), r);
        term.end(Reason::Asked, r + Duration::from_secs(1));
        assert_eq!(finish(&term, true), Finish::Release);
    }
}
