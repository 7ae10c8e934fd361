//! Keeping the Lease: renew every retry period with a conditional update, publish each success on a
//! `watch` channel, and report when another holder shows up.
//!
//! The renewer does not decide when renewals have failed for too long: the supervisor derives both
//! the renew deadline and the kill deadline from the published `renewed_at`, so a renewer stuck in
//! a request can never delay the decision.

use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::time::Instant;

use super::acquire::Held;
use super::api::{ApiError, LeaseApi};
use super::decide::{Claimant, Record};
use crate::config::Timing;

/// What the renewer publishes.
#[derive(Debug, Clone)]
pub enum LeaseState {
    /// We hold it; the last successful write started at `held.renewed_at`.
    Held(Held),
    /// The API shows another holder.
    Lost {
        /// Who or what took it.
        reason: String,
        /// The last state we held.
        last: Held,
    },
}

impl LeaseState {
    /// The last successful write.
    pub fn held(&self) -> &Held {
        match self {
            LeaseState::Held(held) | LeaseState::Lost { last: held, .. } => held,
        }
    }
}

/// Owned parts of a [`Claimant`], so the renewer can run as its own task.
#[derive(Debug, Clone)]
pub struct Owned {
    /// Identity.
    pub identity: String,
    /// Timing.
    pub timing: Timing,
    /// Owner Pod.
    pub owner: Option<crate::config::PodOwner>,
}

impl Owned {
    /// Borrowed view.
    pub fn claimant(&self) -> Claimant<'_> {
        Claimant {
            identity: &self.identity,
            timing: &self.timing,
            owner: self.owner.as_ref(),
        }
    }
}

/// Renews until another holder shows up (then publishes [`LeaseState::Lost`] and returns) or until
/// the task is dropped.
pub async fn renew(
    api: LeaseApi,
    me: Owned,
    held: Held,
    state: watch::Sender<LeaseState>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
) {
    let claimant = me.claimant();
    let timing = me.timing;
    let mut held = held;
    let mut next = held.renewed_at + timing.retry_period;
    let mut failing = 0u32;
    loop {
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        let started_boot = crate::clock::boot_time();
        let deadline = held.renewed_at + timing.renew_deadline;
        // Never let one request run past the renew deadline.
        let timeout = timing
            .request_timeout()
            .min(deadline.saturating_duration_since(started))
            .max(
                timing
                    .retry_period
                    .min(std::time::Duration::from_millis(100)),
            );
        let result = write(&api, &claimant, &held, timeout).await;
        metrics.renewal(
            matches!(result, Ok(_) | Err(Failure::Refreshed(_))),
            started.elapsed(),
        );
        match result {
            Ok(lease) => {
                if failing > 0 {
                    tracing::info!(failures = failing, "renewal succeeded again");
                }
                failing = 0;
                held = Held {
                    lease,
                    renewed_at: started,
                    renewed_at_boot: started_boot,
                };
                let _ = state.send(LeaseState::Held(held.clone()));
                next = started + timing.retry_period;
            }
            Err(Failure::Taken(reason)) => {
                tracing::warn!(%reason, "leadership lost");
                crate::logging::set_holder(None);
                let _ = state.send(LeaseState::Lost { reason, last: held });
                return;
            }
            Err(Failure::Retry(error)) => {
                failing += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                if failing == 1 {
                    tracing::warn!(
                        %error,
                        lost_in = %humantime::format_duration(round_ms(left)),
                        "renewal failing; leadership is lost if it keeps failing until the renew deadline"
                    );
                } else {
                    tracing::debug!(%error, failures = failing, "renewal still failing");
                }
                next = started + timing.retry_period;
            }
            Err(Failure::Refreshed(lease)) => {
                // Someone changed the Lease without taking it (a label, our own earlier write that
                // timed out but landed): renew again at once against the fresh resourceVersion.
                held.lease = *lease;
                next = Instant::now();
            }
        }
    }
}

fn round_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis() as u64)
}

enum Failure {
    /// The API shows another holder.
    Taken(String),
    /// Transient: try again next period.
    Retry(ApiError),
    /// Still ours, with a newer resourceVersion.
    Refreshed(Box<k8s_openapi::api::coordination::v1::Lease>),
}

async fn write(
    api: &LeaseApi,
    me: &Claimant<'_>,
    held: &Held,
    timeout: std::time::Duration,
) -> Result<k8s_openapi::api::coordination::v1::Lease, Failure> {
    match api
        .replace(&me.renew(&held.lease, Timestamp::now()), timeout)
        .await
    {
        Ok(lease) => Ok(lease),
        Err(ApiError::Conflict) => match api.get(timeout).await {
            Ok(Some(current)) => match Record::of(&current).holder {
                Some(holder) if holder == me.identity => Err(Failure::Refreshed(Box::new(current))),
                Some(holder) => Err(Failure::Taken(format!("the lease is now held by {holder}"))),
                None => Err(Failure::Taken(
                    "the lease was released by someone else".into(),
                )),
            },
            Ok(None) => recreate(api, me, timeout).await,
            Err(e) => Err(Failure::Retry(e)),
        },
        Err(ApiError::NotFound) => recreate(api, me, timeout).await,
        Err(e) => Err(Failure::Retry(e)),
    }
}

/// The Lease was deleted while we held it: re-create it if it is still free.
async fn recreate(
    api: &LeaseApi,
    me: &Claimant<'_>,
    timeout: std::time::Duration,
) -> Result<k8s_openapi::api::coordination::v1::Lease, Failure> {
    match api
        .create(
            &me.create(api.name(), api.namespace(), Timestamp::now()),
            timeout,
        )
        .await
    {
        Ok(lease) => {
            tracing::warn!(
                "the lease was deleted while held; re-created it (leaseTransitions restarts at 0)"
            );
            Ok(lease)
        }
        Err(ApiError::AlreadyExists) => match api.get(timeout).await {
            Ok(Some(current)) => {
                let holder = Record::of(&current).holder.unwrap_or_default();
                if holder == me.identity {
                    Err(Failure::Refreshed(Box::new(current)))
                } else {
                    Err(Failure::Taken(format!(
                        "the lease was deleted and re-created by {holder:?}"
                    )))
                }
            }
            Ok(None) => Err(Failure::Retry(ApiError::NotFound)),
            Err(e) => Err(Failure::Retry(e)),
        },
        Err(e) => Err(Failure::Retry(e)),
    }
}
