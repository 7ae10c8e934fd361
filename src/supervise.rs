//! The supervisor: waiting → leading → stopping → exited, with one `select!` per phase.
//!
//! While leading, two deadlines are derived from the start of the last successful renewal
//! (`renewed_at`, monotonic clock):
//! - `renewed_at + renew_deadline`: leadership counts as lost; the command gets SIGTERM.
//! - `renewed_at + lease_duration - safety_margin`: the command's group gets SIGKILL, whatever
//!   the grace period says. Nobody else can take the Lease over before
//!   `renewed_at + lease_duration` (see [`crate::config::Timing`]), so the command is dead before
//!   another can start.

use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::child::{self, Child, Reaper, Signals};
use std::sync::Arc;

use tracing::Instrument;

use crate::clock;
use crate::config::{Command, Config};
use crate::error::{Error, Outcome};
use crate::exit::ChildStatus;
use crate::lease::acquire::{Held, acquire};
use crate::lease::api::{self, ApiError, LeaseApi};
use crate::lease::follow::acquire_watching;
use crate::lease::renew::{LeaseState, Owned, renew};
use crate::lease::{Claimant, Record};
use crate::logging;
use crate::telemetry::{self, Events, LeaseEvent, Metrics, Statsd};

/// How long leftover members of the command's process group may take to die after SIGKILL before
/// the Lease is left to expire instead of being released.
const GROUP_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs lease-exec to completion.
pub async fn run(config: &Config, command: &Command) -> Result<Outcome, Error> {
    // Handlers first: a SIGTERM from here on is ours to handle, and no SIGCHLD is missed.
    let mut signals = Signals::install()
        .map_err(|e| Error::Fatal(format!("cannot install signal handlers: {e}")))?;
    let mut reaper =
        Reaper::start().map_err(|e| Error::Fatal(format!("cannot watch for child exits: {e}")))?;
    child::become_subreaper();

    let (client, lease_api) = api::connect(config).await.map_err(Error::Access)?;
    let namespace = lease_api.namespace().to_string();
    logging::set_context(&config.lease, &namespace, &config.identity);
    let metrics = Metrics::new(&config.lease, &namespace, &config.identity);
    if let Some(addr) = config.observability.metrics_addr {
        telemetry::serve(addr, metrics.clone()).await.map_err(|e| {
            Error::Fatal(format!(
                "cannot listen on --metrics-addr {addr}: {e}; choose a free address"
            ))
        })?;
    }
    let outside = Outside {
        events: Events::new(
            client.clone(),
            &config.identity,
            config.observability.events,
        ),
        statsd: config
            .observability
            .statsd
            .as_ref()
            .map(|(addr, prefix)| Arc::new(Statsd::new(addr, prefix))),
        metrics,
    };
    let span = tracing::info_span!("lease", name = %config.lease, namespace = %namespace, identity = %config.identity);
    let result = hold(
        config,
        command,
        &namespace,
        &lease_api,
        &outside,
        &mut signals,
        &mut reaper,
    )
    .instrument(span)
    .await;
    outside.events.flush(Duration::from_secs(1)).await;
    result
}

/// Everything that reports to the outside world.
struct Outside {
    metrics: Arc<Metrics>,
    events: Events,
    statsd: Option<Arc<Statsd>>,
}

/// Waits for the lease, runs the command while holding it, and stops.
async fn hold(
    config: &Config,
    command: &Command,
    namespace: &str,
    lease_api: &LeaseApi,
    outside: &Outside,
    signals: &mut Signals,
    reaper: &mut Reaper,
) -> Result<Outcome, Error> {
    let owned = Owned {
        identity: config.identity.clone(),
        timing: config.timing,
        owner: config.owner.clone(),
    };
    let claimant = owned.claimant();

    // Waiting.
    let wait_deadline = config.timing.wait_timeout.map(|t| Instant::now() + t);
    tracing::info!(
        lease_duration = %humantime::format_duration(config.timing.lease_duration),
        "waiting for the lease"
    );
    let held = tokio::select! {
        held = async {
            if config.watch {
                acquire_watching(lease_api, &claimant, &config.timing).await
            } else {
                acquire(lease_api, &claimant, &config.timing).await
            }
        } => held.map_err(Error::Api)?,
        () = sleep_until_opt(wait_deadline) => {
            return Err(Error::WaitTimeout(config.timing.wait_timeout.unwrap_or_default()));
        }
        sig = wait_for_stop(signals) => {
            tracing::info!(signal = sig.as_str(), "stopping before the lease was acquired");
            return Ok(Outcome::Interrupted(sig as i32));
        }
    };
    logging::set_holder(Some(&config.identity));
    outside.metrics.acquired();
    outside.events.regarding(&held.lease);
    outside.events.publish(LeaseEvent::Acquired, "");
    let heartbeat = outside
        .statsd
        .as_ref()
        .and_then(|s| s.heartbeat(config.timing.retry_period));

    // Leading: renew in the background, run the command.
    let (state_tx, mut state) = watch::channel(LeaseState::Held(held.clone()));
    let renewer = tokio::spawn(
        renew(
            lease_api.clone(),
            owned.clone(),
            held.clone(),
            state_tx,
            outside.metrics.clone(),
        )
        .in_current_span(),
    );
    let process = build_command(config, command, namespace, held.transitions());
    let child = match child::spawn(process).await {
        Ok(child) => child,
        Err(e) => {
            let last = stand_down(renewer, heartbeat, &state, &outside.metrics);
            hand_over(lease_api, &claimant, config, outside, last).await;
            return Err(Error::Spawn {
                program: command.program.display().to_string(),
                error: e,
            });
        }
    };
    outside.metrics.child(true);
    tracing::info!(pid = child.pid.as_raw(), command = ?command.name, transitions = held.transitions(), "acquired the lease; command started");

    let (status, lost) = lead(config, child, reaper, signals, &mut state).await;
    tracing::info!(%status, "command exited");

    // The command is gone; stop anything left in its group before the lease is handed over.
    child.reclaim_terminal();
    child.signal_group(Signal::SIGKILL);
    let group_gone = wait_group_gone(child, Instant::now() + GROUP_EXIT_TIMEOUT).await;
    outside.metrics.child(false);
    let last = stand_down(renewer, heartbeat, &state, &outside.metrics);

    if let Some(reason) = lost {
        outside.events.publish(LeaseEvent::Lost, &reason);
        return Err(Error::Lost(reason));
    }
    if !group_gone {
        tracing::error!(
            pgid = child.pid.as_raw(),
            "processes of the command's group survived SIGKILL; not releasing the lease, it will expire"
        );
    } else {
        hand_over(lease_api, &claimant, config, outside, last).await;
    }
    Ok(Outcome::Child(status))
}

/// Stops renewing and the statsd heartbeat; returns the Lease as last held.
fn stand_down(
    renewer: JoinHandle<()>,
    heartbeat: Option<JoinHandle<()>>,
    state: &watch::Receiver<LeaseState>,
    metrics: &Metrics,
) -> Held {
    renewer.abort();
    if let Some(heartbeat) = heartbeat {
        heartbeat.abort();
    }
    metrics.left();
    state.borrow().held().clone()
}

/// Releases the Lease for the next candidate (unless `--no-release`) and records that it did.
async fn hand_over(
    api: &LeaseApi,
    me: &Claimant<'_>,
    config: &Config,
    outside: &Outside,
    last: Held,
) {
    if !config.release {
        tracing::info!("keeping the lease claimed (--no-release); it expires unless renewed");
    } else if release(api, me, config, last).await {
        logging::set_holder(None);
        outside.events.publish(LeaseEvent::Released, "");
    }
}

/// Runs until the command exits. Returns its status, and the reason leadership was lost, if it was.
async fn lead(
    config: &Config,
    child: Child,
    reaper: &mut Reaper,
    signals: &mut Signals,
    state: &mut watch::Receiver<LeaseState>,
) -> (ChildStatus, Option<String>) {
    let timing = &config.timing;
    let mut lost: Option<String> = None;
    // When the grace period of a requested stop ends.
    let mut grace_ends: Option<Instant> = None;
    let mut killed = false;
    let mut renewer_done = false;
    let exit = reaper.wait(child);
    tokio::pin!(exit);
    // Checks the deadlines on CLOCK_BOOTTIME too, which keeps counting while the machine is
    // suspended (see crate::clock).
    let mut suspend_check = tokio::time::interval(timing.retry_period);
    suspend_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let renewed_at = state.borrow().held().renewed_at;
        let lost_at = renewed_at + timing.renew_deadline;
        // The safety deadline applies whether or not a stop was requested.
        let safety_kill = renewed_at + timing.kill_by();
        let kill_at = grace_ends.map_or(safety_kill, |g| g.min(safety_kill));
        tokio::select! {
            biased;
            status = &mut exit => return (status, lost),
            () = sleep_until(kill_at), if !killed => {
                if kill_at == safety_kill && lost.is_none() {
                    lost = Some("no successful renewal before the safety deadline".into());
                }
                tracing::warn!(pid = child.pid.as_raw(), "killing the command's process group (SIGKILL)");
                child.signal_group(Signal::SIGKILL);
                killed = true;
            }
            changed = state.changed(), if lost.is_none() && !renewer_done => {
                if changed.is_err() {
                    // The renewer ended without a verdict; the deadlines still apply.
                    renewer_done = true;
                    continue;
                }
                let verdict = match &*state.borrow() {
                    LeaseState::Lost { reason, .. } => Some(reason.clone()),
                    LeaseState::Held(_) => None,
                };
                if let Some(reason) = verdict {
                    begin_stop(child, timing.grace_period, &mut grace_ends);
                    lost = Some(reason);
                }
            }
            () = sleep_until(lost_at), if lost.is_none() => {
                let reason = format!(
                    "no successful renewal for {} (--renew-deadline)",
                    humantime::format_duration(timing.renew_deadline)
                );
                tracing::warn!(%reason, "leadership lost; stopping the command");
                begin_stop(child, timing.grace_period, &mut grace_ends);
                lost = Some(reason);
            }
            _ = suspend_check.tick() => {
                let since = clock::boot_time().saturating_sub(state.borrow().held().renewed_at_boot);
                if since >= timing.kill_by() && !killed {
                    tracing::warn!(since_renewal = %humantime::format_duration(since), "the machine was suspended past the safety deadline; killing the command's process group (SIGKILL)");
                    lost.get_or_insert_with(|| "suspended past the safety deadline".into());
                    child.signal_group(Signal::SIGKILL);
                    killed = true;
                } else if since >= timing.renew_deadline && lost.is_none() {
                    let reason = "the machine was suspended past --renew-deadline".to_string();
                    tracing::warn!(%reason, "leadership lost; stopping the command");
                    begin_stop(child, timing.grace_period, &mut grace_ends);
                    lost = Some(reason);
                }
            }
            sig = signals.recv() => {
                let stopping = grace_ends.is_some();
                tracing::info!(signal = sig.as_str(), "forwarding signal to the command's process group");
                child.signal_group(sig);
                if matches!(sig, Signal::SIGTERM | Signal::SIGINT) {
                    if stopping && !killed {
                        // A second Ctrl-C or SIGTERM: stop waiting for the grace period.
                        tracing::warn!("second stop signal; killing the command now");
                        child.signal_group(Signal::SIGKILL);
                        killed = true;
                    }
                    grace_ends.get_or_insert(Instant::now() + timing.grace_period);
                }
            }
        }
    }
}

fn begin_stop(child: Child, grace: Duration, grace_ends: &mut Option<Instant>) {
    child.signal_group(Signal::SIGTERM);
    let ends = Instant::now() + grace;
    *grace_ends = Some(grace_ends.map_or(ends, |g| g.min(ends)));
}

/// Polls until no process is left in the command's group (the reaper collects the zombies).
async fn wait_group_gone(child: Child, deadline: Instant) -> bool {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        if !child.group_alive() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tick.tick().await;
    }
}

/// Releases the Lease if it is still ours: holder cleared, conditioned on the resourceVersion.
/// Returns whether it was released.
async fn release(api: &LeaseApi, me: &Claimant<'_>, config: &Config, last: Held) -> bool {
    let timeout = config.timing.request_timeout();
    let mut lease = last.lease;
    for _ in 0..3 {
        match api
            .replace(&me.release(&lease, Timestamp::now()), timeout)
            .await
        {
            Ok(_) => {
                tracing::info!("released the lease");
                return true;
            }
            Err(ApiError::Conflict) => match api.get(timeout).await {
                Ok(Some(current))
                    if Record::of(&current).holder.as_deref() == Some(me.identity) =>
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

fn build_command(
    config: &Config,
    command: &Command,
    namespace: &str,
    transitions: i32,
) -> std::process::Command {
    let mut process = std::process::Command::new(&command.program);
    process
        .arg0(&command.name)
        .args(&command.args)
        .env("LEASE_EXEC_LEASE", &config.lease)
        .env("LEASE_EXEC_NAMESPACE", namespace)
        .env("LEASE_EXEC_IDENTITY", &config.identity)
        .env("LEASE_EXEC_TRANSITIONS", transitions.to_string())
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    process
}

use std::os::unix::process::CommandExt;

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for a signal that asks lease-exec to stop while it has no command to forward it to.
async fn wait_for_stop(signals: &mut Signals) -> Signal {
    loop {
        let sig = signals.recv().await;
        match sig {
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP | Signal::SIGQUIT => return sig,
            other => tracing::debug!(signal = other.as_str(), "ignored while waiting"),
        }
    }
}
