//! Waiting for the Lease: read it, decide, write a conditional claim, or wait and try again.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::api::{ApiError, LeaseApi};
use super::decide::{Claimant, Decision, Observer, Record};
use crate::config::Timing;

/// The Lease as we hold it.
#[derive(Debug, Clone)]
pub struct Held {
    /// The Lease as last written by us (its resourceVersion conditions the next write).
    pub lease: Lease,
    /// Start of the request that last wrote it successfully, on the monotonic clock. Nobody else
    /// can take the Lease over before `renewed_at + lease_duration`.
    pub renewed_at: Instant,
    /// The same moment on CLOCK_BOOTTIME, which also counts time the machine spent suspended.
    pub renewed_at_boot: std::time::Duration,
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

/// Blocks until the Lease is held, polling every retry period (`--no-watch`). Returns only [`ApiError::Denied`] or other non-retryable errors;
/// transient failures are logged and retried with backoff.
pub async fn acquire(api: &LeaseApi, me: &Claimant<'_>, timing: &Timing) -> Result<Held, ApiError> {
    let mut observer = Observer::default();
    let mut narrator = Narrator::default();
    let mut failures = 0u32;
    let mut races = 0u32;
    loop {
        let started = Instant::now();
        let step = attempt(api, me, timing, &mut observer, &mut narrator).await;
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

/// Remembers what was logged about the Lease, so each fact is logged once.
#[derive(Default)]
pub(crate) struct Narrator {
    shown_holder: Option<String>,
    warned_record: Option<Record>,
}

impl Narrator {
    /// Logs the holder when it changes, and a record's unusable duration once.
    pub(crate) fn waiting(&mut self, record: &Record, holder: &str, timing: &Timing) {
        if self.warned_record.as_ref() != Some(record) {
            if let (_, Some(warning)) = record.effective_duration(timing.lease_duration) {
                tracing::warn!(holder, "{warning}");
            }
            self.warned_record = Some(record.clone());
        }
        if self.shown_holder.as_deref() != Some(holder) {
            crate::logging::set_holder(Some(holder));
            tracing::info!(holder, "waiting: the lease is held by another identity");
            self.shown_holder = Some(holder.to_string());
        }
    }
}

/// Creates the Lease naming us. `Ok(None)`: someone else created it first.
pub(crate) async fn try_create(
    api: &LeaseApi,
    me: &Claimant<'_>,
    timing: &Timing,
) -> Result<Option<Held>, ApiError> {
    let started = Instant::now();
    let started_boot = crate::clock::boot_time();
    let lease = me.create(api.name(), api.namespace(), Timestamp::now());
    match api.create(&lease, timing.request_timeout()).await {
        Ok(lease) => {
            tracing::info!(transitions = 0, "created the lease");
            Ok(Some(Held {
                lease,
                renewed_at: started,
                renewed_at_boot: started_boot,
            }))
        }
        Err(ApiError::AlreadyExists) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes our claim on `current`, conditioned on its resourceVersion. `Ok(None)`: another
/// candidate wrote first (409) or the Lease is gone.
pub(crate) async fn try_claim(
    api: &LeaseApi,
    me: &Claimant<'_>,
    timing: &Timing,
    current: &Lease,
    decision: &Decision,
) -> Result<Option<Held>, ApiError> {
    let started = Instant::now();
    let started_boot = crate::clock::boot_time();
    match api
        .replace(
            &me.claim(current, Timestamp::now()),
            timing.request_timeout(),
        )
        .await
    {
        Ok(lease) => {
            let transitions = Record::of(&lease).transitions;
            match decision {
                Decision::Resume => {
                    tracing::info!(
                        transitions,
                        "resumed the lease, which already named this identity"
                    )
                }
                Decision::TakeOver {
                    expired_holder: Some(previous),
                } => {
                    tracing::info!(previous = %previous, transitions, "took over the expired lease")
                }
                _ => tracing::info!(transitions, "took over the released lease"),
            }
            Ok(Some(Held {
                lease,
                renewed_at: started,
                renewed_at_boot: started_boot,
            }))
        }
        Err(ApiError::Conflict | ApiError::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn attempt(
    api: &LeaseApi,
    me: &Claimant<'_>,
    timing: &Timing,
    observer: &mut Observer,
    narrator: &mut Narrator,
) -> Result<Step, ApiError> {
    let Some(current) = api.get(timing.request_timeout()).await? else {
        observer.reset();
        return Ok(match try_create(api, me, timing).await? {
            Some(held) => Step::Acquired(Box::new(held)),
            None => Step::Again,
        });
    };
    let now = Instant::now();
    let (record, decision) = observer.judge(&current, now, me.identity, timing.lease_duration);
    match decision {
        Decision::Wait { holder, expires_at } => {
            narrator.waiting(&record, &holder, timing);
            Ok(Step::WaitUntil(
                expires_at.unwrap_or(now + timing.retry_period),
            ))
        }
        decision => Ok(
            match try_claim(api, me, timing, &current, &decision).await? {
                Some(held) => Step::Acquired(Box::new(held)),
                // Another candidate wrote first: read again and go back to waiting.
                None => Step::Again,
            },
        ),
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
