//! When to try again: the backoff of a polling follower (and of repeated 410s), the fast, jittered
//! schedule of a watch being re-established, and the jitter's random sequence. Shared by the
//! campaign ([`super::campaign`]) and the one Lease watch ([`super::watch`]).

use std::time::Duration;

use crate::timing::Timing;

/// The next number in [0, 1) of the xorshift64 sequence `state` (never 0), for jitter.
pub fn jitter(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// Failed requests in a row a watching follower retries fast even when the server answers them
/// (with 5xx, 429 or too late), before it backs off.
pub const FAST_TRIES: u32 = 3;
/// The shortest delay between attempts, whatever the retry period.
pub const RESYNC_FLOOR: Duration = Duration::from_millis(50);
/// The first delay before re-establishing a broken watch (before jitter).
pub const RESYNC_FIRST: Duration = Duration::from_millis(200);
/// The longest delay between attempts to re-establish a watch (before jitter): a follower sees the
/// API server again within about this long after it comes back, whatever the retry period.
pub const RESYNC_CAP: Duration = Duration::from_secs(1);

/// Delay before the next attempt to re-establish a watch after `failures` consecutive transient
/// errors: doubling from [`RESYNC_FIRST`], capped at [`RESYNC_CAP`] and at the retry period, with
/// "equal jitter" (between half and all of it, drawn from `jitter` in [0, 1)) so that followers cut
/// off together do not come back in step. A follower blind to the Lease misses a release, so it
/// looks again soon; a server that cannot bear it says so with Retry-After, which is honoured on
/// top of this (see [`super::campaign::Campaign::step`]).
pub fn resync_delay(timing: &Timing, failures: u32, jitter: f64) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    let full = RESYNC_FIRST
        .saturating_mul(factor)
        .min(RESYNC_CAP)
        .min(timing.retry_period);
    (full / 2 + (full / 2).mul_f64(jitter.clamp(0.0, 1.0))).max(RESYNC_FLOOR)
}

/// Delay before the next attempt after `failures` consecutive transient errors while polling (and
/// after repeated 410s): doubling from the retry period, capped at the lease duration (a handoff
/// cannot be noticed faster than that anyway) and at 30 s.
pub fn backoff(timing: &Timing, failures: u32) -> Duration {
    let cap = timing
        .lease_duration
        .min(Duration::from_secs(30))
        .max(timing.retry_period);
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    timing.retry_period.saturating_mul(factor).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_lease_duration() {
        let t = Timing::default();
        let delays: Vec<_> = (1..=6).map(|n| backoff(&t, n).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 15, 15, 15]);
        assert_eq!(backoff(&t, 1000), Duration::from_secs(15));
    }

    #[test]
    fn the_fast_schedule_has_a_floor() {
        let tiny = Timing {
            retry_period: Duration::from_millis(1),
            ..Timing::default()
        };
        assert_eq!(resync_delay(&tiny, 1, 0.0), RESYNC_FLOOR);
    }

    #[test]
    fn the_jitter_stays_in_zero_to_one() {
        let mut state = 1u64;
        for _ in 0..1000 {
            let j = jitter(&mut state);
            assert!((0.0..1.0).contains(&j), "{j}");
            assert_ne!(state, 0);
        }
    }
}
