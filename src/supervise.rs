//! The supervisor: waiting → leading → stopping → exited, with one `select!` per phase.
//!
//! Waiting is [`crate::lease::acquire`]. While leading, every way the term can end (the command
//! exiting, a stop signal, a missed renew deadline, a suspend, a takeover) and the two deadlines
//! that follow (lose, kill) are decided in [`crate::term`]; this module only sleeps until them and
//! acts. Stopping: the command's group and every leftover descendant are killed and gone before
//! the Lease is released, so the next worker can never overlap anything of this one.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::child::{self, Child, Reaper, Signals, Watchdog};
use crate::clock;
use crate::config::{Command, Config};
use crate::error::{Error, Outcome};
use crate::exit::ChildStatus;
use crate::lease::acquire::{Feed, Held, Remembered, WriteGate, acquire_any, remember};
use crate::lease::api::{self, LeaseApi};
use crate::lease::release::{abandon, release};
use crate::lease::renew::{LeaseState, Nudge, guard, renew};
use crate::lease::{Claimant, Record};
use crate::logging;
use crate::telemetry::{self, Events, LeaseEvent, Metrics, Statsd};
use crate::term::{self, Finish, Reason, Term};

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
    let watchdog = Watchdog::start()
        .map_err(|e| Error::Fatal(format!("cannot start the watchdog thread: {e}")))?;
    child::become_subreaper();

    let (client, slots) = api::connect_slots(config).await.map_err(Error::Access)?;
    let namespace = slots[0].namespace().to_string();
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
    let mut term = 1u64;
    let mut carry = Carry {
        memory: slots.iter().map(|_| Remembered::default()).collect(),
        ..Carry::default()
    };
    let result = loop {
        carry.clean = true;
        carry.asked = false;
        let result = hold(
            config,
            command,
            (&namespace, &slots),
            &outside,
            &mut signals,
            (&mut reaper, &watchdog),
            &mut carry,
        )
        .instrument(span.clone())
        .await;
        match result {
            // Campaign again only once everything of the last term is gone: `hold` returns after
            // the command's group and leftovers were killed and seen gone (`clean`), and not
            // when a stop signal asked lease-exec to end.
            Err(Error::Lost(reason)) if config.recampaign && carry.clean && !carry.asked => {
                term += 1;
                span.in_scope(|| {
                    tracing::warn!(%reason, term, "leadership lost; campaigning again (--recampaign)")
                });
            }
            result => break result,
        }
    };
    outside.events.flush(Duration::from_secs(1)).await;
    result
}

/// Everything that reports to the outside world.
struct Outside {
    metrics: Arc<Metrics>,
    events: Events,
    statsd: Option<Arc<Statsd>>,
}

/// What one term tells the next, with `--recampaign`.
#[derive(Debug, Default)]
struct Carry {
    /// Everything the command started was seen gone.
    clean: bool,
    /// A stop signal asked lease-exec to end: no new campaign.
    asked: bool,
    /// The term ended in a handover: the slot and the `leaseTransitions` of the term handed over,
    /// so the next campaign leaves that record to the others as the request asks (and only that
    /// record, of that slot).
    handed_over: Option<(usize, i32)>,
    /// What this process has seen of each slot's Lease, in every term (the fencing token and
    /// the longest term: see [`crate::lease::record::Memory`]).
    memory: Vec<Remembered>,
}

/// Waits for the lease, runs the command while holding it, and stops: one term, phase by phase
/// (see [`Supervisor`]). Fills `carry` for the next term, and reads the last one's handover from
/// it.
async fn hold(
    config: &Config,
    command: &Command,
    (namespace, slots): (&str, &[LeaseApi]),
    outside: &Outside,
    signals: &mut Signals,
    (reaper, watchdog): (&mut Reaper, &Watchdog),
    carry: &mut Carry,
) -> Result<Outcome, Error> {
    let term = Supervisor {
        config,
        command,
        namespace,
        slots,
        outside,
        claimant: Claimant {
            identity: config.identity.clone(),
            timing: config.timing,
            owner: config.owner.clone(),
        },
    };
    let (slot, held, gate) = match term.wait(signals, carry).await {
        Ok(won) => won,
        Err(end) => return end,
    };
    let mut started = match term.start((slot, held, &gate), watchdog, carry).await {
        Ok(started) => started,
        Err(end) => return end,
    };
    let (status, ended) = lead(
        config,
        started.child,
        (reaper, watchdog),
        signals,
        &mut started.state,
        &mut started.leading,
    )
    .await;
    term.finish(slot, (status, ended), &mut started, watchdog, carry)
        .await
}

/// How a phase ended the term early: the run's result.
type End = Result<Outcome, Error>;

/// One term's phases, in order: [`Supervisor::wait`] for the Lease, [`Supervisor::start`] the
/// term (the renewer, the guard and the command, under the spawn rule), [`lead`] until the command
/// exits, and [`Supervisor::finish`]: everything the command started killed and gone, then the
/// end-of-term choice of [`term::finish`].
struct Supervisor<'a> {
    config: &'a Config,
    command: &'a Command,
    namespace: &'a str,
    slots: &'a [LeaseApi],
    outside: &'a Outside,
    claimant: Claimant,
}

/// A term whose command runs.
struct Started {
    child: Child,
    leading: Leading,
    state: watch::Receiver<LeaseState>,
    /// Aborted when this term ends: a later term may hold one of these slots for real.
    _strays: Option<AbortOnDrop>,
}

impl Supervisor<'_> {
    /// Waiting: campaigns for every slot until one is won (the slot, its claim, and the gate that
    /// knows which other writes of ours are unanswered), or the wait ends (`--wait-timeout`, a stop
    /// signal, a refusal).
    async fn wait(
        &self,
        signals: &mut Signals,
        carry: &mut Carry,
    ) -> Result<(usize, Held, WriteGate), End> {
        // Waiting.
        let wait_deadline = self.config.timing.wait_timeout.map(|t| Instant::now() + t);
        tracing::info!(
            lease_duration = %humantime::format_duration(self.config.timing.lease_duration),
            "waiting for the lease"
        );
        let feed = if self.config.watch {
            Feed::Watch
        } else {
            Feed::Poll
        };
        let stepped_down = carry.handed_over.take();
        let gate = WriteGate::default();
        let acquiring = acquire_any(
            self.slots,
            &self.claimant,
            &self.config.timing,
            feed,
            stepped_down,
            (&carry.memory, &gate),
        );
        let stopped = tokio::select! {
            won = acquiring => match won {
                Ok(won) => Ok(won),
                Err(e) => Err((Err(Error::Api(e)), None)),
            },
            () = sleep_until_opt(wait_deadline) => {
                Err((Err(Error::WaitTimeout(self.config.timing.wait_timeout.unwrap_or_default())), None))
            }
            sig = wait_for_stop(signals) => {
                tracing::info!(signal = sig.as_str(), "stopping before the lease was acquired");
                Err((Ok(Outcome::Interrupted(sig as i32)), Some(())))
            }
        };
        match stopped {
            Ok((slot, held)) => Ok((slot, held, gate)),
            Err((result, by_signal)) => {
                // The campaigns are dropped: a write of ours in flight or unanswered may still land.
                // Only such slots are read: a write whose answer came is known, and an extra read
                // of a slot we never wrote to would hold the exit up by a request timeout against
                // a hung server (past `--wait-timeout`), to release at most a Lease an earlier
                // process of our identity left, which expires on its own.
                let check: Vec<_> = gate
                    .uncertain(None)
                    .into_iter()
                    .map(|(slot, started)| (slot, Some(started)))
                    .collect();
                let checking = abandon(self.slots, &check, &self.claimant, self.config.release);
                if by_signal.is_some() {
                    tokio::select! {
                        () = checking => {}
                        sig = wait_for_stop(signals) => tracing::warn!(
                            signal = sig.as_str(),
                            "second stop signal; not checking whether a claim of ours landed (if it did, the lease expires)"
                        ),
                    }
                } else {
                    checking.await;
                }
                Err(result)
            }
        }
    }

    /// Starting the term: the renewer and the guard, then the command, only under the spawn rule.
    /// Nothing between the claim and the spawn waits on the API server.
    async fn start(
        &self,
        (slot, held, gate): (usize, Held, &WriteGate),
        watchdog: &Watchdog,
        carry: &mut Carry,
    ) -> Result<Started, End> {
        let lease_api = &self.slots[slot];
        remember(&carry.memory[slot], &Record::of(&held.lease));
        if self.slots.len() > 1 {
            tracing::info!(lease = %lease_api.name(), slot, "won a slot");
        }
        // Aborted when this term ends: a later term may hold one of these slots for real. In the
        // background, so that checking never delays the command's start (see the spawn rule below).
        let mut _strays = None;
        let uncertain: Vec<_> = gate
            .uncertain(Some(slot))
            .into_iter()
            .map(|(slot, started)| (slot, Some(started)))
            .collect();
        if !uncertain.is_empty() {
            // A write of ours to another slot went unanswered and may have landed: that slot must not
            // stay claimed by a process that runs nothing for it.
            let (slots, claimant, release) = (
                self.slots.to_vec(),
                self.claimant.clone(),
                self.config.release,
            );
            _strays = Some(AbortOnDrop(tokio::spawn(
                async move { abandon(&slots, &uncertain, &claimant, release).await }
                    .in_current_span(),
            )));
        }
        if let Some(to) = Record::of(&held.lease).handover_from(&self.config.identity) {
            // Resumed (the Lease already named this identity) with a handover pending: hand it over
            // at once, without starting the command.
            let why = Reason::Handover(to.to_string());
            tracing::info!(reason = %why, "a handover is pending; releasing the lease without starting the command");
            carry.handed_over = Some((slot, held.transitions()));
            hand_over(lease_api, &self.claimant, self.config, self.outside, held).await;
            return Err(Err(Error::Lost(why)));
        }
        // The event's object, for whatever this term reports; the Acquired event itself, the metrics
        // and the log's holder come after the spawn, so that the command's start waits for nothing
        // but the claim.
        self.outside.events.regarding(&held.lease);

        // Leading: renew in the background, run the command. The term's fencing token is the one
        // the claim wrote; renewals keep it (and restore it if lowered by hand).
        let token = held.transitions();
        let memory = carry.memory[slot].clone();
        let (state_tx, state) = watch::channel(LeaseState::Held(held.clone()));
        let state_tx = Arc::new(state_tx);
        let nudge = Arc::new(Nudge::default());
        // A takeover kills the command's group from the watchdog's thread at once, whatever this
        // thread does after (see child::Watchdog): also one seen while the command is spawned, as
        // the watchdog expects the command from before the spawn on.
        let kill = {
            let (now, by) = (watchdog.clone(), watchdog.clone());
            crate::lease::renew::Kill::new(move || now.fire_now(), move |at| by.tighten(at))
        };
        let mut leading = Leading {
            renewer: Some(tokio::spawn(
                renew(
                    lease_api.clone(),
                    self.claimant.clone(),
                    (held.clone(), token),
                    state_tx.clone(),
                    (nudge.clone(), memory.clone(), kill.clone()),
                    self.outside.metrics.clone(),
                )
                .in_current_span(),
            )),
            // With --no-watch, no watch request at all: the guard reads the Lease every retry
            // period instead.
            guard: Some(tokio::spawn(
                guard(
                    lease_api.clone(),
                    (self.claimant.clone(), token, self.config.watch),
                    state_tx,
                    (nudge, memory, kill),
                )
                .in_current_span(),
            )),
            heartbeat: self
                .outside
                .statsd
                .as_ref()
                .and_then(|s| s.heartbeat(self.config.timing.retry_period)),
            metrics: self.outside.metrics.clone(),
        };
        let process = build_command(
            self.config,
            self.command,
            (lease_api.name(), self.namespace),
            (self.slots.len() > 1).then_some(slot),
            token,
        );
        // The spawn rule: the command starts only while `now < renewed_at + renew-deadline` for the
        // term's last successful write (the claim, or a renewal since), checked in the forked child
        // right before exec (child::spawn). Nothing between the claim and here waits on the API
        // server, but a slow claim, a frozen or starved process or a suspend may have used the term up: then the
        // command never starts, so it can never run past what the followers count.
        let latest = state.borrow().clone();
        if let LeaseState::Taken { reason, .. } = &latest {
            leading.end();
            return Err(Err(Error::Lost(Reason::Taken(reason.clone()))));
        }
        let latest = latest.held().clone();
        // Both from the duration others may count: ours, or shorter after an edit (see
        // renew::observed).
        let timing = &self.config.timing;
        let counted = latest.counted(timing);
        let not_after = latest.renewed_at_boot + timing.renew_deadline_within(counted);
        // Armed before the spawn, with the kill deadline of the term's last write: the spawner's
        // thread hands the command's pid to the watchdog right after the exec, so the command dies
        // by that deadline at the latest even if this thread is stuck from the spawn on; a
        // takeover or a shrink the guard sees meanwhile reaches the watchdog as it happens
        // (`kill` above). Nothing between the check of the state above and here awaits, so no
        // takeover can fall in between: the guard runs on this thread.
        watchdog.expect(latest.renewed_at_boot + timing.kill_within(counted));
        let child = match child::spawn(process, not_after, Some(watchdog)).await {
            Ok(child) => {
                // From the state as it is now: a renewal during the spawn moves the deadline
                // (later: the term is longer), a shrink it tightened already stays in it. After a
                // takeover the watchdog has fired already (fire_now sticks until disarmed); told
                // again all the same.
                let now = state.borrow().clone();
                let held = now.held();
                watchdog.arm(
                    child,
                    held.renewed_at_boot + timing.kill_within(held.counted(timing)),
                );
                if let LeaseState::Taken { .. } = now {
                    watchdog.fire_now();
                }
                child
            }
            Err(e) if child::is_late(&e) => {
                watchdog.disarm();
                // Nothing ran: release at once so the next candidate need not wait for expiry. The
                // claim did land: it is counted and reported before its release.
                self.outside.metrics.acquired();
                self.outside.events.publish(LeaseEvent::Acquired, "");
                leading.end();
                let last = state.borrow().held().clone();
                hand_over(lease_api, &self.claimant, self.config, self.outside, last).await;
                return Err(Err(Error::Lost(Reason::Late)));
            }
            Err(e) => {
                watchdog.disarm();
                // Nothing ran: release at once so the next candidate need not wait for expiry.
                self.outside.metrics.acquired();
                self.outside.events.publish(LeaseEvent::Acquired, "");
                leading.end();
                let last = state.borrow().held().clone();
                hand_over(lease_api, &self.claimant, self.config, self.outside, last).await;
                return Err(Err(Error::Spawn {
                    program: self.command.program.display().to_string(),
                    error: e,
                }));
            }
        };
        self.outside.metrics.acquired();
        self.outside.metrics.child(true);
        self.outside.events.publish(LeaseEvent::Acquired, "");
        // Not over a takeover the guard already reported (it cleared the holder).
        if matches!(*state.borrow(), LeaseState::Held(_)) {
            logging::set_holder(Some(&self.config.identity));
        }
        tracing::info!(pid = child.pid.as_raw(), command = ?self.command.name, transitions = held.transitions(), "acquired the lease; command started");
        Ok(Started {
            child,
            leading,
            state,
            _strays,
        })
    }

    /// Finishing: the command has exited; nothing it started may remain before the Lease is handed
    /// over.
    async fn finish(
        &self,
        slot: usize,
        (status, ended): (ChildStatus, Term),
        started: &mut Started,
        watchdog: &Watchdog,
        carry: &mut Carry,
    ) -> End {
        let Started {
            child,
            leading,
            state,
            ..
        } = started;
        let child = *child;
        let lease_api = &self.slots[slot];
        let asked = ended.was_asked();
        tracing::info!(%status, "command exited");

        // The command is gone. Before the Lease can be handed over, nothing it started may remain:
        // its process group, and whatever left the group (a daemon in its own session) that is still
        // our descendant. As PID 1, every other process of the namespace.
        child.reclaim_terminal();
        child.signal_group(Signal::SIGKILL);
        let all_gone = child::kill_leftovers(child, Instant::now() + GROUP_EXIT_TIMEOUT).await;
        watchdog.disarm();
        carry.clean = all_gone;
        carry.asked = asked;
        self.outside.metrics.child(false);
        leading.end();
        let last = state.borrow().held().clone();

        // Release only once the group is gone (`all_gone`): see term::finish.
        match term::finish(&ended, all_gone) {
            Finish::Lost {
                reason,
                release,
                stepped_down,
            } => {
                if stepped_down {
                    carry.handed_over = Some((slot, last.transitions()));
                }
                self.outside
                    .events
                    .publish(LeaseEvent::Lost, &reason.to_string());
                if release {
                    hand_over(lease_api, &self.claimant, self.config, self.outside, last).await;
                }
                Err(Error::Lost(reason))
            }
            Finish::Keep => {
                tracing::error!(
                    pgid = child.pid.as_raw(),
                    "processes the command started survived SIGKILL; not releasing the lease, it will expire"
                );
                Ok(Outcome::Child(status))
            }
            Finish::Release => {
                hand_over(lease_api, &self.claimant, self.config, self.outside, last).await;
                Ok(Outcome::Child(status))
            }
        }
    }
}

/// What runs only while this process leads: the renewer, the guard watching for takeovers, and
/// the statsd heartbeat.
struct Leading {
    renewer: Option<JoinHandle<()>>,
    guard: Option<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl Leading {
    /// Stops renewing and the heartbeat, and reports not-leader; the guard keeps watching, so a
    /// takeover during the grace period still kills at once. Idempotent.
    fn stand_down(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
            self.metrics.left();
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
    }

    /// Everything stops: the command is gone.
    fn end(&mut self) {
        self.stand_down();
        if let Some(guard) = self.guard.take() {
            guard.abort();
        }
    }
}

/// Releases the Lease for the next candidate (unless `--no-release`) and records that it did.
async fn hand_over(api: &LeaseApi, me: &Claimant, config: &Config, outside: &Outside, last: Held) {
    if !config.release {
        tracing::info!("keeping the lease claimed (--no-release); it expires unless renewed");
    } else if release(api, me, last).await {
        logging::set_holder(None);
        outside.events.publish(LeaseEvent::Released, "");
    }
}

/// Runs until the command exits. Returns its status, and how the term ended (see
/// [`Term::ended_by`]). Every way the term can end goes through [`Term::end`], and the only timers
/// are the two [`term::deadlines`].
async fn lead(
    config: &Config,
    child: Child,
    (reaper, watchdog): (&mut Reaper, &Watchdog),
    signals: &mut Signals,
    state: &mut watch::Receiver<LeaseState>,
    leading: &mut Leading,
) -> (ChildStatus, Term) {
    let timing = &config.timing;
    let mut term = Term::default();
    let mut killed = false;
    let mut renewer_done = false;
    let exit = reaper.wait(child);
    tokio::pin!(exit);
    // Re-evaluates the deadlines against CLOCK_BOOTTIME, which keeps counting while the machine is
    // suspended (see crate::clock).
    let mut suspend_check = tokio::time::interval(timing.retry_period);
    suspend_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (renewed_at, renewed_at_boot, counted) = {
            let state = state.borrow();
            let held = state.held();
            (held.renewed_at, held.renewed_at_boot, held.counted(timing))
        };
        let (renewal, suspended) = Term::effective_renewal(
            renewed_at,
            clock::boot_time().saturating_sub(renewed_at_boot),
            renewed_at.elapsed(),
        );
        let due = term::deadlines(&term, (renewal, counted), timing);
        // The same kill deadline, enforced from another thread on CLOCK_BOOTTIME: it holds even
        // if this thread is stuck (a blocked stderr) or the machine slept past it.
        watchdog.arm(
            child,
            clock::boot_time() + due.kill_at.saturating_duration_since(Instant::now()),
        );
        let act = tokio::select! {
            biased;
            status = &mut exit => return (status, term),
            () = sleep_until_opt(due.lose_at) => {
                // The renew deadline as it applied: shortened with a shrunk record's duration.
                let reason = if suspended { Reason::Suspended } else { Reason::RenewDeadline(timing.renew_deadline_within(counted)) };
                tracing::warn!(reason = %reason, "leadership lost; stopping the command");
                term.end(reason, Instant::now())
            }
            changed = state.changed(), if !renewer_done => {
                if changed.is_err() {
                    // The renewer ended (stood down, or after reporting a takeover); the deadlines
                    // still apply.
                    renewer_done = true;
                    continue;
                }
                let reason = match &*state.borrow() {
                    LeaseState::Taken { reason, .. } => Some(Reason::Taken(reason.clone())),
                    LeaseState::Held(held) => Record::of(&held.lease)
                        .handover_from(&config.identity)
                        .map(|to| Reason::Handover(to.to_string())),
                };
                match reason {
                    Some(reason @ Reason::Handover(_)) => {
                        let act = term.end(reason.clone(), Instant::now());
                        if act.terminate {
                            tracing::info!(reason = %reason, "handing the lease over; stopping the command");
                            leading.metrics.lost(reason.label());
                        }
                        act
                    }
                    Some(reason) => term.end(reason, Instant::now()),
                    None => continue,
                }
            }
            () = sleep_until(due.kill_at), if !killed => {
                // Kill first, log after: the log may block.
                child::kill_all(child);
                killed = true;
                tracing::warn!(pid = child.pid.as_raw(), "killed the command's process group and leftovers (SIGKILL)");
                continue;
            }
            _ = suspend_check.tick() => continue,
            sig = signals.recv() => {
                tracing::info!(signal = sig.as_str(), "forwarding signal to the command's process group");
                child.signal_group(sig);
                if !matches!(sig, Signal::SIGTERM | Signal::SIGINT) {
                    continue;
                }
                if term.was_asked() {
                    tracing::warn!("second stop signal; killing the command now");
                    term.end(Reason::Insisted, Instant::now())
                } else {
                    // The signal itself was the SIGTERM; only wake a stopped command.
                    let mut act = term.end(Reason::Asked, Instant::now());
                    if act.terminate {
                        child.signal_group(Signal::SIGCONT);
                        act.terminate = false;
                    }
                    act
                }
            }
        };
        if act.lose {
            // Stop renewing at the loss: a renewal landing now would make others wait a whole
            // lease duration, and /leader, is_leader and statsd must say "not leader" at once.
            leading.stand_down();
            logging::set_holder(None);
            if let Some(reason) = &term.lost {
                leading.metrics.lost(reason.label());
            }
        }
        if act.terminate {
            child.signal_group(Signal::SIGTERM);
            child.signal_group(Signal::SIGCONT);
        }
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn build_command(
    config: &Config,
    command: &Command,
    (lease, namespace): (&str, &str),
    slot: Option<usize>,
    transitions: i32,
) -> std::process::Command {
    let mut process = std::process::Command::new(&command.program);
    // No variable the command sees may be read as an option by a lease-exec it starts: such a
    // nested lease-exec must be an ordinary new candidate, never one that resumes our identity.
    for name in crate::cli::option_variables() {
        process.env_remove(name);
    }
    process
        .arg0(&command.name)
        .args(&command.args)
        .env(crate::cli::HELD_LEASE, lease)
        .env(crate::cli::HELD_NAMESPACE, namespace)
        .env(crate::cli::HELD_IDENTITY, &config.identity)
        .env(crate::cli::HELD_TRANSITIONS, transitions.to_string())
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    match slot {
        Some(slot) => process.env(crate::cli::HELD_SLOT, slot.to_string()),
        // Not one of ours: an outer lease-exec's slot would mislead.
        None => process.env_remove(crate::cli::HELD_SLOT),
    };
    process
}

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
