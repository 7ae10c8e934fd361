//! `lease-exec --handover LEASE [--to IDENTITY]`: a planned handover, by hand.
//!
//! It writes `spec.preferredHolder` (the identity given, or [`ANY_OTHER`]) and, unless the Lease
//! has one, `spec.strategy` [`HANDOVER_STRATEGY`] (the API accepts a preferred holder only with a
//! strategy), conditioned on the resourceVersion read. Then it watches the Lease until another
//! identity holds it and prints who, and how long the Lease was free (from the release to the
//! claim, both as seen by this process's watch).
//!
//! The holder does the rest: a lease-exec holder stops its command as for a stop signal (grace
//! period, renewals go on), releases the Lease keeping the request, and the preferred candidate
//! claims it at once; the others leave it to that candidate for one lease duration (see
//! [`crate::lease::campaign`]). Nothing here can put a second worker anywhere: this process only
//! ever writes the two request fields, never the holder.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::time::{Instant, sleep, sleep_until};

use crate::cli::OutputFormat;
use crate::config::Config;
use crate::error::{Error, HandoverError, Outcome};
use crate::exit::ChildStatus;
use crate::lease::Record;
use crate::lease::api::{self, ApiError, LeaseApi};
use crate::lease::record::{ANY_OTHER, HANDOVER_STRATEGY, describe_preferred};
use crate::lease::watch::{Failure as WatchFailure, LeaseWatch, Seen as Sighting};

/// How a handover ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// The holder asked to step down.
    pub from: String,
    /// The new holder.
    pub to: String,
    /// `spec.leaseTransitions` of the new term.
    pub transitions: i32,
    /// From the release to the claim, as seen here; `None` if no release was seen (the Lease
    /// expired, or was overwritten).
    pub free_for: Option<Duration>,
    /// From the request to the claim.
    pub after_request: Duration,
}

/// Requests the handover, waits for it, prints the outcome.
pub async fn run(
    config: &Config,
    to: Option<&str>,
    format: OutputFormat,
) -> Result<Outcome, Error> {
    let (_, lease_api) = api::connect(config).await.map_err(Error::Access)?;
    let timeout = config.timing.request_timeout();
    let preferred = to.unwrap_or(ANY_OTHER);
    let wait_deadline = config.timing.wait_timeout.map(|t| Instant::now() + t);
    let (requested, from) = request(&lease_api, preferred, timeout).await?;
    let requested_at = Instant::now();
    tracing::info!(from = %from, to = %describe_preferred(preferred), "handover requested; waiting for the new holder");
    let done = tokio::select! {
        done = follow(&lease_api, &requested, &from, preferred, config) => done?,
        () = sleep_until_opt(wait_deadline) => {
            let withdrawn = withdraw(&lease_api, &from, preferred, timeout).await;
            return Err(Error::HandoverTimeout {
                waited: config.timing.wait_timeout.unwrap_or_default(),
                holder: from,
                withdrawn,
            });
        }
    };
    let done = Done {
        after_request: done.after_request.min(requested_at.elapsed()),
        ..done
    };
    let lease = format!("{}/{}", lease_api.namespace(), lease_api.name());
    match format {
        OutputFormat::Text => println!("{}", text(&lease, preferred, &done)),
        OutputFormat::Json => println!(
            "{}",
            json!({
                "lease": lease_api.name(),
                "namespace": lease_api.namespace(),
                "from": done.from,
                "to": done.to,
                "requested": to,
                "leaseTransitions": done.transitions,
                "freeMilliseconds": done.free_for.map(|d| d.as_secs_f64() * 1000.0),
                "afterRequestMilliseconds": done.after_request.as_secs_f64() * 1000.0,
            })
        ),
    }
    Ok(Outcome::Child(ChildStatus::Exited(0)))
}

/// The line printed for people.
pub fn text(lease: &str, preferred: &str, done: &Done) -> String {
    let mut line = format!(
        "lease {lease} handed over: {} -> {} (leaseTransitions {})",
        done.from, done.to, done.transitions
    );
    match done.free_for {
        Some(free) => line.push_str(&format!(
            "; free for {:.1} ms between the release and the claim",
            free.as_secs_f64() * 1000.0
        )),
        None => line.push_str("; no release was seen (it expired or was overwritten)"),
    }
    line.push_str(&format!(
        ", {:.1} ms after the request",
        done.after_request.as_secs_f64() * 1000.0
    ));
    if preferred != ANY_OTHER && preferred != done.to {
        line.push_str(&format!(
            "; not {preferred}, which did not take it within a lease duration"
        ));
    }
    line
}

/// Writes the request on the held Lease. Returns the Lease as written and its holder.
async fn request(
    api: &LeaseApi,
    preferred: &str,
    timeout: Duration,
) -> Result<(Lease, String), Error> {
    let name = format!("{}/{}", api.namespace(), api.name());
    for _ in 0..5 {
        let Some(current) = api.get(timeout).await.map_err(Error::Api)? else {
            return Err(HandoverError::Missing { lease: name }.into());
        };
        let record = Record::of(&current);
        let Some(holder) = record.holder else {
            return Err(HandoverError::NotHeld { lease: name }.into());
        };
        if holder == preferred {
            return Err(HandoverError::AlreadyHeld {
                preferred: preferred.to_string(),
                lease: name,
            }
            .into());
        }
        match record.preferred.as_deref() {
            // The same request is pending already: wait for it.
            Some(pending) if pending == preferred => return Ok((current, holder)),
            Some(pending) => {
                return Err(HandoverError::Pending {
                    lease: name,
                    pending: pending.to_string(),
                }
                .into());
            }
            None => {}
        }
        let mut asked = current.clone();
        let spec = asked.spec.get_or_insert_with(LeaseSpec::default);
        spec.preferred_holder = Some(preferred.to_string());
        if spec.strategy.as_deref().is_none_or(str::is_empty) {
            spec.strategy = Some(HANDOVER_STRATEGY.to_string());
        }
        match api.replace(&asked, timeout).await {
            Ok(written) => {
                if Record::of(&written).preferred.as_deref() != Some(preferred) {
                    return Err(HandoverError::GateOff.into());
                }
                return Ok((written, holder));
            }
            Err(ApiError::Conflict) => continue,
            Err(ApiError::NotFound) => {
                return Err(HandoverError::Deleted { lease: name }.into());
            }
            Err(e) => return Err(Error::Api(e)),
        }
    }
    Err(HandoverError::KeptChanging { lease: name }.into())
}

/// What one observation of the Lease means for the handover.
enum Step {
    /// Nothing new.
    Waiting,
    /// Released (holder cleared), at this `renewTime` (the releasing holder's clock).
    Released(Option<Timestamp>),
    /// Another holder: done. Its `leaseTransitions` and `acquireTime` (its own clock).
    Taken(String, i32, Option<Timestamp>),
}

/// Follows the Lease (watch, else polls) until another identity holds it.
async fn follow(
    api: &LeaseApi,
    requested: &Lease,
    from: &str,
    preferred: &str,
    config: &Config,
) -> Result<Done, Error> {
    let started = Instant::now();
    let timeout = config.timing.request_timeout();
    let mut released: Option<Released> = None;
    let mut rv = requested
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let mut watching = true;
    let observe = |lease: &Lease| -> Result<Step, Error> {
        let record = Record::of(lease);
        match record.holder {
            None => Ok(Step::Released(record.renew_time)),
            Some(holder) if holder != from => {
                Ok(Step::Taken(holder, record.transitions, record.acquire_time))
            }
            Some(_) => match record.preferred.as_deref() {
                Some(p) if p == preferred => Ok(Step::Waiting),
                Some(other) => Err(HandoverError::Superseded {
                    to: other.to_string(),
                }
                .into()),
                None => Err(HandoverError::Dropped {
                    holder: from.to_string(),
                }
                .into()),
            },
        }
    };
    let mut watch = LeaseWatch::default();
    loop {
        let mut seen = None;
        if watching {
            // The one Lease watch (see crate::lease::watch): a 410 makes it watch from the
            // current state, which arrives as an event of its own; re-opens are floored and
            // backed off there.
            match watch.next(api, &rv, &config.timing).await {
                Ok(Sighting::Changed(lease)) => {
                    if let Some(v) = &lease.metadata.resource_version {
                        rv.clone_from(v);
                    }
                    seen = Some(lease);
                }
                Ok(Sighting::Bookmark(at)) => rv = at,
                // A deletion: a re-creation shows up as ADDED.
                Ok(Sighting::Deleted(_)) | Ok(Sighting::Ended) => {}
                Ok(Sighting::Expired) => rv.clear(),
                Err(WatchFailure::Unwatchable(why)) => {
                    tracing::info!(reason = %why, "cannot watch the lease; polling every retry period");
                    watching = false;
                }
                Err(WatchFailure::Failed(e)) => {
                    tracing::debug!(error = %e, "cannot watch the lease; retrying");
                }
            }
        } else {
            sleep(config.timing.retry_period).await;
            match api.get(timeout).await {
                Ok(lease) => seen = lease,
                Err(e @ ApiError::Denied { .. }) => return Err(Error::Api(e)),
                Err(e) => tracing::debug!(error = %e, "cannot read the lease; retrying"),
            }
        }
        if let Some(lease) = seen {
            match observe(&lease)? {
                Step::Waiting => {}
                Step::Released(at) => {
                    released.get_or_insert((Instant::now(), at));
                }
                Step::Taken(to, transitions, acquired) => {
                    return Ok(done(from, (to, transitions, acquired), released, started));
                }
            }
        }
    }
}

/// When the release was seen here, and its `renewTime`.
type Released = (Instant, Option<Timestamp>);

/// The outcome. How long the Lease was free is read from the Lease itself: from the release's
/// `renewTime` (written once the old command's group was gone) to the new holder's `acquireTime`
/// (written before its command starts), two clocks that a cluster keeps in step. Events can reach
/// this process batched, so its own watch would under-count; it is the fallback when the stamps are
/// missing or disagree (a claim stamped before the release).
fn done(
    from: &str,
    (to, transitions, acquired): (String, i32, Option<Timestamp>),
    released: Option<Released>,
    started: Instant,
) -> Done {
    let free_for = released.map(|(seen, stamp)| match (stamp, acquired) {
        (Some(release), Some(claim)) if claim >= release => {
            Duration::try_from(claim.duration_since(release)).unwrap_or_else(|_| seen.elapsed())
        }
        _ => seen.elapsed(),
    });
    Done {
        from: from.to_string(),
        to,
        transitions,
        free_for,
        after_request: started.elapsed(),
    }
}

/// Takes the request back if it is still pending (the same holder, our preferred holder).
/// Returns whether the Lease no longer carries it.
async fn withdraw(api: &LeaseApi, from: &str, preferred: &str, timeout: Duration) -> bool {
    for _ in 0..3 {
        let Ok(Some(current)) = api.get(timeout).await else {
            return false;
        };
        let record = Record::of(&current);
        if record.holder.as_deref() != Some(from) || record.preferred.as_deref() != Some(preferred)
        {
            return true;
        }
        let mut withdrawn = current.clone();
        let spec = withdrawn.spec.get_or_insert_with(LeaseSpec::default);
        spec.preferred_holder = None;
        if spec.strategy.as_deref() == Some(HANDOVER_STRATEGY) {
            spec.strategy = None;
        }
        match api.replace(&withdrawn, timeout).await {
            Ok(_) => return true,
            Err(ApiError::Conflict) => continue,
            Err(_) => return false,
        }
    }
    false
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_who_took_over_and_how_long_the_lease_was_free() {
        let done = Done {
            from: "a".into(),
            to: "b".into(),
            transitions: 4,
            free_for: Some(Duration::from_micros(8_250)),
            after_request: Duration::from_millis(5_100),
        };
        assert_eq!(
            text("ns/l", "b", &done),
            "lease ns/l handed over: a -> b (leaseTransitions 4); free for 8.2 ms between the release and the claim, 5100.0 ms after the request"
        );
        let other = Done {
            to: "c".into(),
            free_for: None,
            ..done
        };
        let line = text("ns/l", "b", &other);
        assert!(line.contains("no release was seen"), "{line}");
        assert!(
            line.ends_with("not b, which did not take it within a lease duration"),
            "{line}"
        );
        assert!(
            !text("ns/l", ANY_OTHER, &other).contains("not "),
            "any other is fine"
        );
    }
}
