//! Waiting for the Lease: read it, decide, write a conditional claim, or wait and try again.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::api::{ApiError, LeaseApi};
use super::decide::{Claimant, Decision, Observer, Record, decide};
use crate::config::Timing;

/// The Lease as we hold it.
#[derive(Debug, Clone)]
pub struct Held {
    /// The Lease as last written by us (its resourceVersion conditions the next write).
    pub lease: Lease,
    /// Start of the request that last wrote it successfully, on the monotonic clock. Nobody else
    /// can take the Lease over before `renewed_at + lease_duration`.
    pub renewed_at: Instant,
}

impl Held {
    /// `spec.leaseTransitions` of the held Lease.
    pub fn transitions(&self) -> i32 {
        Record::of(&self.lease).transitions
    }
}

/// Delay before the next attempt after `failures` consecutive transient errors while waiting:
/// doubling from the retry period, capped at the lease duration (a handoff cannot be noticed faster
/// than that anyway) and at 30 s.
pub fn backoff(timing: &Timing, failures: u32) -> Duration {
    let cap = timing
        .lease_duration
        .min(Duration::from_secs(30))
        .max(timing.retry_period);
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    timing.retry_period.saturating_mul(factor).min(cap)
}

/// What one attempt ended with.
enum Step {
    Acquired(Box<Held>),
    /// Read again at once (another candidate won a race).
    Again,
    /// Wait until this instant at most.
    WaitUntil(Instant),
}

/// Blocks until the Lease is held. Returns only [`ApiError::Denied`] or other non-retryable errors;
/// transient failures are logged and retried with backoff.
pub async fn acquire(api: &LeaseApi, me: &Claimant<'_>, timing: &Timing) -> Result<Held, ApiError> {
    let mut observer = Observer::default();
    let mut shown_holder: Option<String> = None;
    let mut warned_record: Option<Record> = None;
    let mut failures = 0u32;
    let mut races = 0u32;
    loop {
        let started = Instant::now();
        let step = attempt(
            api,
            me,
            timing,
            &mut observer,
            &mut shown_holder,
            &mut warned_record,
        )
        .await;
        match step {
            Ok(Step::Acquired(held)) => return Ok(*held),
            Ok(Step::Again) => {
                failures = 0;
                races += 1;
                // A lost race is re-read at once; repeated ones (a misbehaving proxy) are paced.
                if races > 2 {
                    tokio::time::sleep(timing.retry_period).await;
                }
                continue;
            }
            Ok(Step::WaitUntil(at)) => {
                races = 0;
                if failures > 0 {
                    tracing::info!("API server reachable again");
                }
                failures = 0;
                tokio::time::sleep_until(at.min(started + timing.retry_period)).await;
            }
            Err(e @ ApiError::Denied { .. }) => return Err(e),
            Err(e) => {
                failures += 1;
                let delay = backoff(timing, failures);
                tracing::warn!(
                    error = %e,
                    attempt = failures,
                    retry_in = %humantime::format_duration(delay),
                    "cannot read or claim the lease; retrying"
                );
                tokio::time::sleep_until(started + delay).await;
            }
        }
    }
}

async fn attempt(
    api: &LeaseApi,
    me: &Claimant<'_>,
    timing: &Timing,
    observer: &mut Observer,
    shown_holder: &mut Option<String>,
    warned_record: &mut Option<Record>,
) -> Result<Step, ApiError> {
    let timeout = timing.request_timeout();
    let Some(current) = api.get(timeout).await? else {
        observer.reset();
        let started = Instant::now();
        return match api
            .create(
                &me.create(api.name(), api.namespace(), Timestamp::now()),
                timeout,
            )
            .await
        {
            Ok(lease) => {
                tracing::info!(transitions = 0, "created the lease");
                Ok(Step::Acquired(Box::new(Held {
                    lease,
                    renewed_at: started,
                })))
            }
            Err(ApiError::AlreadyExists) => Ok(Step::Again),
            Err(e) => Err(e),
        };
    };
    let now = Instant::now();
    let record = Record::of(&current);
    if record.holder.is_some() && warned_record.as_ref() != Some(&record) {
        if let (_, Some(warning)) = record.effective_duration(timing.lease_duration) {
            tracing::warn!(holder = record.holder.as_deref(), "{warning}");
        }
    }
    *warned_record = Some(record.clone());
    let observed_at = observer.observe(record.clone(), now);
    match decide(
        &record,
        observed_at,
        now,
        me.identity,
        timing.lease_duration,
    ) {
        Decision::Wait { holder, expires_at } => {
            if shown_holder.as_deref() != Some(holder.as_str()) {
                tracing::info!(holder = %holder, "waiting: the lease is held by another identity");
                *shown_holder = Some(holder);
            }
            Ok(Step::WaitUntil(
                expires_at.unwrap_or(now + timing.retry_period),
            ))
        }
        decision => {
            let started = Instant::now();
            match api
                .replace(&me.claim(&current, Timestamp::now()), timeout)
                .await
            {
                Ok(lease) => {
                    let transitions = Record::of(&lease).transitions;
                    match decision {
                        Decision::Resume => tracing::info!(
                            transitions,
                            "resumed the lease, which already named this identity"
                        ),
                        Decision::TakeOver {
                            expired_holder: Some(previous),
                        } => {
                            tracing::info!(previous = %previous, transitions, "took over the expired lease")
                        }
                        _ => tracing::info!(transitions, "took over the released lease"),
                    }
                    Ok(Step::Acquired(Box::new(Held {
                        lease,
                        renewed_at: started,
                    })))
                }
                // Another candidate wrote first: read again and go back to waiting.
                Err(ApiError::Conflict | ApiError::NotFound) => Ok(Step::Again),
                Err(e) => Err(e),
            }
        }
    }
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
}
