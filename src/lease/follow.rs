//! Waiting by watching: followers read the Lease once, then watch it (field selector on its name,
//! from the resourceVersion read) instead of polling, and act the moment something changes.
//!
//! - Every event updates the observed record and the local time it was first observed.
//! - Released (holder cleared) → claim at once; the conditional write lets exactly one candidate
//!   win, and the others go back to watching without another request.
//! - Held → a timer for exactly when the observed record will be expired
//!   (observed time + leaseDurationSeconds), then a conditional claim.
//! - Deleted → created at once if the last record was released; if it still named a holder, that
//!   holder may be alive (a Pod force-deleted, its Lease garbage-collected while its container still
//!   runs), so the deleted record is honoured: create when it would have expired.
//! - A stream that ends is re-opened from the last resourceVersion (no read); `410 Gone` and other
//!   errors lead to a fresh read and a new watch, with backoff. If watching is refused (403) or not
//!   served, fall back to polling ([`super::acquire::acquire`]) and say so once.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::WatchEvent;
use tokio::time::{Instant, sleep_until};

use super::acquire::{Held, Narrator, acquire, backoff, try_claim, try_create};
use super::api::{ApiError, LeaseApi};
use super::decide::{Claimant, Decision, Observer, Record};
use crate::config::Timing;

/// What we know of the Lease.
enum View {
    /// It exists, as last read or seen in an event.
    Present(Box<Lease>),
    /// It does not exist; create it at this time.
    Absent { create_at: Instant },
}

/// Why the inner loop left.
enum Resync {
    /// Read the Lease again, after this delay.
    After(Duration),
    /// Watching is not possible here: poll instead.
    Poll(String),
}

/// Blocks until the Lease is held, watching it between attempts.
pub async fn acquire_watching(
    api: &LeaseApi,
    me: &Claimant<'_>,
    timing: &Timing,
) -> Result<Held, ApiError> {
    let mut observer = Observer::default();
    let mut narrator = Narrator::default();
    let mut failures = 0u32;
    loop {
        match follow(api, me, timing, &mut observer, &mut narrator, &mut failures).await {
            Ok(held) => return Ok(held),
            Err(FollowEnd::Fatal(e)) => return Err(e),
            Err(FollowEnd::Resync(Resync::After(delay))) => tokio::time::sleep(delay).await,
            Err(FollowEnd::Resync(Resync::Poll(why))) => {
                tracing::warn!(reason = %why, "cannot watch the lease; polling every retry period instead");
                return acquire(api, me, timing).await;
            }
        }
    }
}

enum FollowEnd {
    Fatal(ApiError),
    Resync(Resync),
}

/// Transient errors lead to a resync with backoff; authorization errors end the wait.
fn failed(e: ApiError, timing: &Timing, failures: &mut u32, what: &str) -> FollowEnd {
    if matches!(e, ApiError::Denied { .. }) {
        return FollowEnd::Fatal(e);
    }
    *failures += 1;
    let delay = backoff(timing, *failures);
    tracing::warn!(
        error = %e,
        attempt = *failures,
        retry_in = %humantime::format_duration(delay),
        "cannot {what} the lease; retrying"
    );
    FollowEnd::Resync(Resync::After(delay))
}

/// One read, then decisions driven by watch events and timers, until held or a resync is needed.
async fn follow(
    api: &LeaseApi,
    me: &Claimant<'_>,
    timing: &Timing,
    observer: &mut Observer,
    narrator: &mut Narrator,
    failures: &mut u32,
) -> Result<Held, FollowEnd> {
    let mut view = match api.get(timing.request_timeout()).await {
        Ok(Some(lease)) => View::Present(Box::new(lease)),
        Ok(None) => View::Absent {
            create_at: Instant::now(),
        },
        Err(e) => return Err(failed(e, timing, failures, "read")),
    };
    if *failures > 0 {
        tracing::info!("API server reachable again");
        *failures = 0;
    }
    let mut resource_version = String::new();
    let mut stream: Option<BoxStream<'static, Result<WatchEvent<Lease>, ApiError>>> = None;
    let mut watch_started: Option<Instant> = None;
    // The resourceVersion we already tried to claim and lost: wait for the next event instead of
    // trying again.
    let mut tried: Option<String> = None;
    // After a lost race, if no event arrives by then, our view may be stale: read again.
    let mut recheck: Option<Instant> = None;
    loop {
        // Act on what we know.
        let now = Instant::now();
        let mut next_try: Option<Instant> = None;
        match &view {
            View::Absent { create_at } if now >= *create_at => {
                observer.reset();
                match try_create(api, me, timing).await {
                    Ok(Some(held)) => return Ok(held),
                    Ok(None) => return Err(FollowEnd::Resync(Resync::After(Duration::ZERO))),
                    Err(e) => return Err(failed(e, timing, failures, "create")),
                }
            }
            View::Absent { create_at } => next_try = Some(*create_at),
            View::Present(lease) => {
                let rv = lease.metadata.resource_version.clone().unwrap_or_default();
                resource_version.clone_from(&rv);
                let (record, decision) =
                    observer.judge(lease, now, me.identity, timing.lease_duration);
                match decision {
                    Decision::Wait { holder, expires_at } => {
                        narrator.waiting(&record, &holder, timing);
                        next_try = expires_at;
                    }
                    _ if tried.as_deref() == Some(rv.as_str()) => {}
                    decision => match try_claim(api, me, timing, lease, &decision).await {
                        Ok(Some(held)) => return Ok(held),
                        Ok(None) => {
                            tried = Some(rv);
                            recheck = Some(Instant::now() + timing.retry_period);
                        }
                        Err(e) => return Err(failed(e, timing, failures, "claim")),
                    },
                }
            }
        }

        // Watch, if not already.
        if stream.is_none() {
            if resource_version.is_empty() {
                return Err(FollowEnd::Resync(Resync::After(timing.retry_period)));
            }
            // A server that ends every watch at once must not turn this into a busy loop.
            if let Some(last) = watch_started {
                sleep_until(last + timing.retry_period.min(Duration::from_secs(1))).await;
            }
            watch_started = Some(Instant::now());
            match api.watch(&resource_version, timing.request_timeout()).await {
                Ok(s) => stream = Some(s),
                Err(e @ ApiError::Denied { .. }) => {
                    return Err(FollowEnd::Resync(Resync::Poll(e.to_string())));
                }
                Err(ApiError::NotFound) => {
                    return Err(FollowEnd::Resync(Resync::Poll(
                        "the API server does not serve watches".into(),
                    )));
                }
                Err(e) => return Err(failed(e, timing, failures, "watch")),
            }
        }
        let events = stream.as_mut().expect("watch started above");

        tokio::select! {
            event = events.next() => match event {
                Some(Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease))) => {
                    recheck = None;
                    view = View::Present(Box::new(lease));
                }
                Some(Ok(WatchEvent::Deleted(lease))) => {
                    recheck = None;
                    let now = Instant::now();
                    let record = Record::of(&lease);
                    let create_at = match &record.holder {
                        None => now,
                        Some(holder) if holder == me.identity => now,
                        Some(holder) => {
                            let observed_at = observer.observe(record.clone(), now);
                            let (duration, _) = record.effective_duration(timing.lease_duration);
                            tracing::info!(holder = %holder, "the lease was deleted while held; creating it when that holder's lease would have expired");
                            observed_at.checked_add(duration).unwrap_or(now + Duration::from_secs(86_400))
                        }
                    };
                    if let Some(rv) = lease.metadata.resource_version.clone() {
                        resource_version = rv;
                    }
                    view = View::Absent { create_at };
                }
                Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                    resource_version = bookmark.metadata.resource_version;
                }
                Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                    tracing::debug!("watch expired (410 Gone); reading the lease again");
                    return Err(FollowEnd::Resync(Resync::After(Duration::ZERO)));
                }
                Some(Ok(WatchEvent::Error(status))) => {
                    let e = ApiError::Transient(format!("watch error {}: {}", status.code, status.message));
                    return Err(failed(e, timing, failures, "watch"));
                }
                Some(Err(e)) => return Err(failed(e, timing, failures, "watch")),
                None => {
                    // The server ended the watch (its timeout): re-open from where we were.
                    stream = None;
                }
            },
            () = sleep_opt(next_try) => {}
            () = sleep_opt(recheck) => {
                return Err(FollowEnd::Resync(Resync::After(Duration::ZERO)));
            }
        }
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
