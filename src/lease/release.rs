//! Giving a Lease back: the release at the end of a term (holder cleared, conditioned on the
//! resourceVersion), and the check of slots a write of ours may have landed on unanswered. A
//! released Lease may be claimed by the next candidate at once, so the supervisor releases only
//! once nothing the command started is left (see [`crate::term::finish`]), and abandons only slots
//! it runs no command for.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use tokio::time::{Instant, sleep_until};

use super::acquire::Held;
use super::api::{ApiError, LeaseApi};
use super::decide::Claimant;
use super::record::Record;
use crate::clock;

/// Releases the Lease if it is still ours: holder cleared, conditioned on the resourceVersion.
/// Returns whether it was released.
pub async fn release(api: &LeaseApi, me: &Claimant, last: Held) -> bool {
    let timeout = me.timing.request_timeout();
    // The term's fencing token. An edit that lowered it while renewals could not restore it is
    // undone by the release too: the next claim is then one above this term's, never equal.
    let token = last.transitions();
    let mut lease = last.lease;
    for _ in 0..3 {
        let mut released = me.release(&lease, Timestamp::now());
        if let Some(spec) = released.spec.as_mut() {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).max(token));
        }
        match api.replace(&released, timeout).await {
            Ok(_) => {
                tracing::info!("released the lease");
                return true;
            }
            Err(ApiError::Conflict) => match api.get(timeout).await {
                Ok(Some(current))
                    if Record::of(&current).holder.as_deref() == Some(me.identity.as_str()) =>
                {
                    lease = current;
                }
                Ok(_) => {
                    tracing::info!("the lease is no longer ours; nothing to release");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot release the lease; it will expire");
                    return false;
                }
            },
            Err(ApiError::NotFound) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the lease; it will expire");
                return false;
            }
        }
    }
    false
}

/// Checks the slots a create or claim of ours may have landed on unanswered (`check`: the slot, and
/// when that write started if it may still be on its way): a Lease naming a process that runs
/// nothing for it is released. Every slot concurrently: each is read at once and, while its write
/// may still land, once more a request timeout after that write started. The reads take at most
/// two request timeouts, however many slots; a release found needed is then carried out in full
/// (unless `release_found` is false: `--no-release`).
pub async fn abandon(
    slots: &[LeaseApi],
    check: &[(usize, Option<Instant>)],
    me: &Claimant,
    release_found: bool,
) {
    let timeout = me.timing.request_timeout();
    let reads = check.iter().map(|&(slot, started)| {
        let api = &slots[slot];
        async move {
            if let Some(lease) = ours(api, me).await {
                return Some((api, lease));
            }
            let again = started.map(|s| s + timeout)?;
            if Instant::now() < again {
                sleep_until(again).await;
                return ours(api, me).await.map(|lease| (api, lease));
            }
            None
        }
    });
    let found = match tokio::time::timeout(timeout * 2, futures_util::future::join_all(reads)).await
    {
        Ok(found) => found,
        Err(_) => {
            tracing::warn!(
                "cannot check in time whether a claim of ours landed; if one did, the lease expires"
            );
            return;
        }
    };
    if !release_found {
        return;
    }
    let releases = found.into_iter().flatten().map(|(api, lease)| {
        let last = Held::written(lease, Instant::now(), clock::boot_time());
        release(api, me, last)
    });
    futures_util::future::join_all(releases).await;
}

/// Reads the Lease; returns it if it names us.
async fn ours(api: &LeaseApi, me: &Claimant) -> Option<Lease> {
    match api.get(me.timing.request_timeout()).await {
        Ok(Some(lease)) if Record::of(&lease).holder.as_deref() == Some(me.identity.as_str()) => {
            Some(lease)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(
                lease = %api.name(),
                error = %e,
                "cannot check whether a claim of ours landed; if it did, the lease expires"
            );
            None
        }
    }
}
