//! The timing options and the rules that tie them together: the one place the exclusion
//! argument is written down, and every duration derived from it (the safety margin, the kill
//! deadline, request and renewal timeouts).

use std::time::Duration;

/// Longest duration accepted for any timing option; anything longer is a typo.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The timing options, and the rules that tie them together.
///
/// The exclusion argument, in one place: another candidate can only take the Lease over after it has
/// seen the same record unchanged for `lease_duration`, measured on its own monotonic clock from the
/// moment it observed our last renewal. That observation happens after our renew request started,
/// so in real time nobody can take over before `renew start + lease_duration`. We kill the command
/// by `renew start + lease_duration - safety_margin`, measured on our monotonic clock; the margin
/// absorbs the rate difference of two clocks and the time a SIGKILL takes to end a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `leaseDurationSeconds` written to the Lease.
    pub lease_duration: Duration,
    /// How long renewals may fail before leadership counts as lost.
    pub renew_deadline: Duration,
    /// Retry interval: between renewals after one failed, and while waiting.
    pub retry_period: Duration,
    /// Interval between renewals while they succeed.
    pub renew_interval: Duration,
    /// SIGTERM → SIGKILL grace.
    pub grace_period: Duration,
    /// Give up waiting after this long.
    pub wait_timeout: Option<Duration>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            renew_interval: Duration::from_secs(5),
            grace_period: Duration::from_secs(5),
            wait_timeout: None,
        }
    }
}

impl Timing {
    /// Fixed part of the safety margin: covers the latency between our kill timer firing and the
    /// command being gone (timer slack, SIGKILL delivery, scheduling on a loaded node).
    pub const KILL_LATENCY: Duration = Duration::from_millis(200);

    /// Proportional part of the safety margin, in parts per thousand of the lease duration: covers
    /// the rate difference between our monotonic clock and another node's. NTP may slew a clock by at
    /// most 500 ppm, so two clocks disagree by at most 0.1% over any interval; 2% is twenty times that,
    /// and also covers unsynchronised hardware clocks.
    pub const DRIFT_PER_MILLE: u32 = 20;

    /// How long before the Lease could expire in anyone else's eyes the command must be dead.
    /// 500 ms for the default 15 s lease.
    pub fn safety_margin(&self) -> Duration {
        Self::KILL_LATENCY + self.lease_duration * Self::DRIFT_PER_MILLE / 1000
    }

    /// Time after the start of the last successful renewal by which the command must be dead:
    /// `lease_duration - safety_margin`.
    pub fn kill_by(&self) -> Duration {
        self.lease_duration.saturating_sub(self.safety_margin())
    }

    /// The kill window when others may count `counted` instead of our `lease_duration` from our
    /// last renewal: an edit shortened `leaseDurationSeconds` of the record we hold, and a candidate
    /// that first saw the edited record counts the shorter duration from that first sight, which
    /// came after our renewal started. The margin is the one `counted` has as a lease duration.
    /// Never longer than [`Timing::kill_by`].
    pub fn kill_within(&self, counted: Duration) -> Duration {
        let counted = counted.min(self.lease_duration);
        let margin = Self::KILL_LATENCY + counted * Self::DRIFT_PER_MILLE / 1000;
        counted.saturating_sub(margin)
    }

    /// The renew deadline when others may count `counted` (see [`Timing::kill_within`]):
    /// `renew_deadline` scaled down with the kill window, so leadership is lost (and the grace
    /// period starts) no later than the command must be dead, as with our own duration.
    pub fn renew_deadline_within(&self, counted: Duration) -> Duration {
        let own = self.kill_by();
        let within = self.kill_within(counted);
        if within >= own || own.is_zero() {
            return self.renew_deadline;
        }
        self.renew_deadline
            .mul_f64(within.as_secs_f64() / own.as_secs_f64())
            .min(within)
    }

    /// The default `--renew-interval`: a third of the lease duration (5 s by default), so a leader
    /// costs the API server 12 requests a minute instead of 30, but never longer than half the
    /// renew deadline (two tries before it) nor shorter than the retry period.
    pub fn default_renew_interval(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Duration {
        (lease_duration / 3)
            .min(renew_deadline / 2)
            .max(retry_period)
    }

    /// Timeout of one API request while waiting, and of a claim: long enough to tolerate a slow
    /// API server. (A claim's term counts from the start of its request, so a slow claim only
    /// shortens the term; the command never starts past its renew deadline.)
    pub fn request_timeout(&self) -> Duration {
        (self.renew_deadline / 2).max(self.retry_period)
    }

    /// When a renewal with no answer yet is tried again on a fresh connection, and the timeout of
    /// that second attempt: half the time between the renewal that is due (`renew-interval` after
    /// the last success) and the renew deadline. So at least two attempts fit before the deadline,
    /// whatever the timing: one that hangs on a dead connection (a half-open one a load balancer or
    /// conntrack dropped) is followed by one on a fresh connection in time, while a merely slow
    /// answer to the first still counts. 2.5 s at the defaults.
    pub fn renew_timeout(&self) -> Duration {
        self.renew_deadline.saturating_sub(self.renew_interval) / 2
    }

    /// The shortest `--retry-period` and `--renew-interval`, and the shortest renewal attempt
    /// ([`Timing::renew_timeout`]): below it an idle follower or a leader would flood the API
    /// server with requests, and no API server answers a write reliably faster.
    pub const FLOOR: Duration = Duration::from_millis(100);

    /// Checks each duration and the rules between them.
    pub fn validate(&self) -> Result<(), TimingError> {
        let named = [
            ("--lease-duration", self.lease_duration),
            ("--renew-deadline", self.renew_deadline),
            ("--retry-period", self.retry_period),
        ];
        for (option, value) in named {
            if value.is_zero() {
                return Err(TimingError(format!("{option} must be positive, got 0")));
            }
        }
        let all = named
            .into_iter()
            .chain([("--grace-period", self.grace_period)])
            .chain(self.wait_timeout.map(|w| ("--wait-timeout", w)));
        for (option, value) in all {
            if value > MAX_DURATION {
                return Err(TimingError(format!(
                    "{option} {} is longer than the maximum of 24h",
                    humantime::format_duration(value)
                )));
            }
        }
        if self.wait_timeout == Some(Duration::ZERO) {
            return Err(TimingError(
                "--wait-timeout must be positive; leave it unset to wait forever".into(),
            ));
        }
        if self.lease_duration.subsec_nanos() != 0 {
            return Err(TimingError(format!(
                "--lease-duration {} must be a whole number of seconds (leaseDurationSeconds is an integer)",
                humantime::format_duration(self.lease_duration)
            )));
        }
        if self.retry_period < Self::FLOOR {
            return Err(TimingError(format!(
                "--retry-period {} is shorter than the minimum of {}: a follower would ask the API server {} times a second",
                humantime::format_duration(self.retry_period),
                humantime::format_duration(Self::FLOOR),
                Duration::from_secs(1).as_nanos() / self.retry_period.as_nanos().max(1)
            )));
        }
        if self.renew_interval < Self::FLOOR {
            return Err(TimingError(format!(
                "--renew-interval {} is shorter than the minimum of {}",
                humantime::format_duration(self.renew_interval),
                humantime::format_duration(Self::FLOOR),
            )));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(TimingError(format!(
                "--retry-period ({}) must be shorter than --renew-deadline ({}): the rule is retry-period < renew-deadline < lease-duration",
                humantime::format_duration(self.retry_period),
                humantime::format_duration(self.renew_deadline)
            )));
        }
        if self.renew_interval < self.retry_period || self.renew_interval >= self.renew_deadline {
            return Err(TimingError(format!(
                "--renew-interval ({}) must be at least --retry-period ({}) and shorter than --renew-deadline ({})",
                humantime::format_duration(self.renew_interval),
                humantime::format_duration(self.retry_period),
                humantime::format_duration(self.renew_deadline)
            )));
        }
        if self.renew_timeout() < Self::FLOOR {
            return Err(TimingError(format!(
                "--renew-interval ({}) leaves too little of --renew-deadline ({}): two renewal attempts of at least {} each must fit between them; shorten --renew-interval or lengthen --renew-deadline",
                humantime::format_duration(self.renew_interval),
                humantime::format_duration(self.renew_deadline),
                humantime::format_duration(Self::FLOOR),
            )));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(TimingError(format!(
                "--renew-deadline ({}) must be shorter than --lease-duration ({}): the rule is retry-period < renew-deadline < lease-duration",
                humantime::format_duration(self.renew_deadline),
                humantime::format_duration(self.lease_duration)
            )));
        }
        if self.renew_deadline > self.kill_by() {
            return Err(TimingError(format!(
                "--renew-deadline ({}) leaves no time to stop the command: it must be at most --lease-duration minus the safety margin ({} - {} = {}), so the command is dead before the lease can expire for others",
                humantime::format_duration(self.renew_deadline),
                humantime::format_duration(self.lease_duration),
                humantime::format_duration(self.safety_margin()),
                humantime::format_duration(self.kill_by()),
            )));
        }
        Ok(())
    }
}

/// Durations that break a rule: one line naming the option and the rule (exit code 2, as every
/// configuration error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimingError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(lease: u64, deadline_ms: u64) -> Timing {
        Timing {
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_millis(deadline_ms),
            retry_period: Duration::from_millis(100),
            renew_interval: Duration::from_millis(deadline_ms / 3),
            ..Timing::default()
        }
    }

    #[test]
    fn a_shortened_record_shortens_the_kill_window_with_its_own_margin() {
        let t = Timing::default();
        // 1 s counted by others: 1 s − (200 ms + 2% of 1 s).
        assert_eq!(
            t.kill_within(Duration::from_secs(1)),
            Duration::from_millis(780)
        );
        // Our own duration, or a longer one, changes nothing.
        assert_eq!(t.kill_within(t.lease_duration), t.kill_by());
        assert_eq!(t.kill_within(Duration::from_secs(60)), t.kill_by());
        assert_eq!(t.renew_deadline_within(t.lease_duration), t.renew_deadline);
        // 10 s of a 14.5 s window, scaled to the 780 ms one.
        let scaled = t.renew_deadline_within(Duration::from_secs(1));
        assert_eq!(scaled.as_millis(), 537);
    }

    #[test]
    fn leadership_is_lost_no_later_than_the_shortened_kill_window_at_any_valid_timing() {
        for lease in [1, 2, 6, 15, 60, 3600] {
            for pct in [30, 50, 70, 90, 97] {
                let t = timing(lease, lease * 10 * pct);
                if t.validate().is_err() {
                    continue;
                }
                for counted in [1, 2, 3, 5, 10, 30, 3600] {
                    let counted = Duration::from_secs(counted);
                    let (lose, kill) = (t.renew_deadline_within(counted), t.kill_within(counted));
                    assert!(
                        lose <= kill,
                        "{t:?} counted {counted:?}: {lose:?} > {kill:?}"
                    );
                    assert!(
                        lose <= t.renew_deadline && kill <= t.kill_by(),
                        "{t:?} {counted:?}"
                    );
                    // The margin a duration of `counted` would have, never less.
                    let margin = Timing::KILL_LATENCY + counted.min(t.lease_duration) / 50;
                    assert!(kill + margin <= counted.max(margin), "{t:?} {counted:?}");
                }
            }
        }
    }
}
