//! Exclusion under chaos: several contenders run journaling workers while a driver SIGKILLs,
//! SIGTERMs, SIGSTOPs and SIGCONTs them (restarting those that exit, as a kubelet would), switches
//! API faults on and off, and changes the Lease's hands without expiry. Every kind of event is
//! counted and the counts printed at the end.
//!
//! - Contenders: plain, `--recampaign`, `--no-watch` (polling), workers that start a lease-exec of
//!   their own on the same Lease, and leaders whose stderr pipe nobody reads for a while.
//! - API faults: refused connections, hangs, 500/503/429 answers, slow answers, answers to updates
//!   lost after the commit, compaction (watches then get 410 Gone).
//! - Per-client API faults: each contender talks to the server through a door of its own
//!   (`apiserver::Door`, shared with the lease-exec its worker may start), and one door at a time
//!   refuses connections, black-holes them, cuts the open ones (half-open), answers slowly,
//!   answers 503/500/429 or loses the answers to its writes, while the others are served.
//! - Hand-changes: the Lease deleted while held, overwritten by an operator, handovers requested
//!   by writing `spec.preferredHolder` and by `lease-exec --handover` (to a live contender, to any,
//!   to one that is gone).
//! - Operator edits (on; `CHAOS_OPERATOR_EDITS=0` turns them off): the held Lease's
//!   `leaseDurationSeconds` shrunk to 1 s with holder and renewTime kept, its `leaseTransitions`
//!   lowered by hand, and an overwrite of a deleted Lease that starts its token again at 1.
//!   Without them, an overwrite writes a token above any the Lease ever had.
//! - The frozen shrink (on; `CHAOS_FROZEN_SHRINK=0` turns it off): half the shrinks freeze the
//!   holder right after the edit, so it neither restores its record nor learns of the edit; a
//!   follower started after the edit counts the duration the holder stated in its last write
//!   (`lease-exec/holder-duration`), not the 1 s it sees. See docs/timing.md, "The other ways the
//!   Lease changes hands".
//!   Leaders whose stderr is stuck get the same overwrites and shrinks as any other: their log
//!   lines never block their runtime.
//!
//! The verdict comes from the kernel, not from the workers: each worker's span runs from the exec
//! of the worker binary to its exit, both stamped by the proc connector (`support::kernel`), with
//! the Lease and `LEASE_EXEC_TRANSITIONS` its exec was given. Per Lease (per slot with
//! `--holders`): no two spans overlap, and the fencing token rises strictly from one worker to
//! the next. The smallest gap between one worker's exit and the next one's exec is printed.
//!
//! Two workers in a row of one `--recampaign` process with the same token (a resume of its own
//! record that kept the token) fail the run; `CHAOS_STRICT_RESUME=0` only counts them.
//!
//! The short runs are part of the suite; the long one is run by hand (`CHAOS_MINUTES`, default 5;
//! `CHAOS_SEED` replays a run):
//!
//!     cargo test --release --test chaos -- --ignored --nocapture chaos_long

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use support::apiserver::{Door, Fault};
use support::*;
use tokio::time::Instant;

/// xorshift64*: a seeded generator so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// From the high bits: the low bits of consecutive xorshift64* outputs are correlated (a
    /// choice of 11 in 12 followed by a coin toss always came up the same way).
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 32) % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// How many times each kind of event happened.
#[derive(Debug, Default)]
struct Tally(BTreeMap<&'static str, usize>);

impl Tally {
    fn add(&mut self, kind: &'static str) {
        *self.0.entry(kind).or_default() += 1;
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (kind, n)) in self.0.iter().enumerate() {
            write!(f, "{}{kind}: {n}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

/// Whether two workers of one `--recampaign` process with the same token fail the run (see the
/// top).
fn strict_resume() -> bool {
    std::env::var("CHAOS_STRICT_RESUME").map_or(true, |v| v != "0")
}

/// Whether the operator edits lease-exec does not survive yet are in the mix (see the top).
fn operator_edits() -> bool {
    std::env::var("CHAOS_OPERATOR_EDITS").map_or(true, |v| v != "0")
}

/// Whether the holder is frozen right after a shrink of its duration (see the top).
fn frozen_shrink() -> bool {
    std::env::var("CHAOS_FROZEN_SHRINK").map_or(true, |v| v != "0")
}

/// A SIGSTOP of a lease-exec that holds a Lease (or still runs a worker) ends this long after its
/// last write at the latest: it wakes up past its kill deadline (`R + 1.76 s`) and its watchdog
/// kills at once, while nobody can take over before `R + 2 s`. Frozen longer, its worker would run
/// on with nobody alive to stop it: no supervisor can help that, so it is not part of the test.
const FREEZE_HOLDER_UNTIL_NS: u64 = 1_800_000_000;

struct Driver {
    world: World,
    rng: Rng,
    tally: Tally,
    /// The Lease names: `job`, or the slots `job-0`… with `--holders`.
    slots: Vec<String>,
    /// FAST and `--holders N`.
    options: Vec<String>,
    generation: usize,
    /// The identity of each contender's current process.
    identities: Vec<String>,
    running: Vec<Running>,
    /// `lease-exec --handover` runs.
    handovers: Vec<Running>,
    /// Set at the end: held stderr pipes are drained at once.
    ending: Arc<AtomicBool>,
    /// Identities of contenders whose stderr is held.
    stuck: Vec<String>,
    /// `(Lease, when)` of each deletion (CLOCK_MONOTONIC ns).
    deletions: Vec<(String, u64)>,
    /// The token of the operator's last overwrite, per Lease.
    operator_tokens: std::collections::HashMap<String, i64>,
    /// `(Lease, when)` of each edit lowering `leaseTransitions` (CLOCK_MONOTONIC ns).
    lowerings: Vec<(String, u64)>,
    /// When each identity's lease-exec was started (CLOCK_MONOTONIC ns).
    started: std::collections::HashMap<String, u64>,
    /// Each contender's own door and its kubeconfig: a fault there hits that contender only.
    doors: Vec<(Door, std::path::PathBuf)>,
    /// Until when a door's fault lasts, and which door.
    door_fault: Option<(usize, Instant)>,
}

impl Driver {
    fn random_slot(&mut self) -> String {
        self.slots[self.rng.below(self.slots.len() as u64) as usize].clone()
    }

    /// Starts contender `i` under a new identity: a plain one, or (by chance) one whose worker
    /// starts a lease-exec of its own, or one whose stderr nobody reads for a while; each maybe
    /// with `--recampaign` and/or `--no-watch`.
    fn spawn(&mut self, i: usize) -> Running {
        self.generation += 1;
        let identity = format!("c{i}-{}", self.generation);
        if self.identities.len() <= i {
            self.identities.resize(i + 1, String::new());
        }
        self.identities[i].clone_from(&identity);
        self.started.insert(identity.clone(), mono_ns());
        let run_for = 0.3 + self.rng.below(2500) as f64 / 1000.0;
        let mut options = self.options.clone();
        if self.rng.one_in(4) {
            options.push("--recampaign".into());
            self.tally.add("contender --recampaign");
        }
        if self.rng.one_in(4) {
            options.push("--no-watch".into());
            self.tally.add("contender --no-watch");
        }
        let lease = "job".to_string();
        let worker = format!(
            "{} {} {run_for} 0",
            self.world.worker().display(),
            self.world.journal().display()
        );
        let mut args = options.clone();
        args.extend(["--identity".into(), identity.clone(), lease.clone()]);
        if self.rng.one_in(4) {
            // The worker starts a lease-exec of its own on the same Lease beside its own work: an
            // ordinary new candidate, killed with its parent's group. (If its parent lease-exec is
            // SIGKILLed, the parent-death signal reaches only the worker and this candidate is
            // orphaned: the driver stops such ones at the end.)
            self.tally.add("contender with a nested lease-exec");
            let script = format!(
                "{BIN} --wait-timeout 60s {} {lease} -- {worker} & exec {worker}",
                self.options.join(" ")
            );
            args.extend(["--", "sh", "-c", &script].map(String::from));
            return self.contender_command(i, args).spawn();
        }
        if self.rng.one_in(10) {
            // Its command fills the stderr pipe it shares with lease-exec, which nobody reads
            // until 1 to 6 s after its worker started: lease-exec's log lines wait (or are
            // dropped) meanwhile, and nothing else may wait on them.
            self.tally.add("contender with a stuck stderr");
            self.stuck.push(identity.clone());
            let script = format!("head -c 200000 /dev/zero >&2 & exec {worker}");
            args.extend(["--", "sh", "-c", &script].map(String::from));
            let stuck_for = self.rng.millis(1000, 6000);
            let release = stderr_release(
                self.world.journal(),
                identity,
                stuck_for,
                self.ending.clone(),
            );
            return self
                .contender_command(i, args)
                .spawn_with_stderr_held(release);
        }
        args.extend([
            "--".into(),
            self.world.worker().display().to_string(),
            self.world.journal().display().to_string(),
            run_for.to_string(),
            "0".into(),
        ]);
        self.contender_command(i, args).spawn()
    }

    /// `lease-exec ARGS`, logging watch expiries (410) too.
    fn command(&self, args: Vec<String>) -> TestCommand {
        self.world
            .lease_exec(args)
            .env("RUST_LOG", "info,lease_exec::lease::acquire=debug")
    }

    /// `lease-exec ARGS` of contender `i`, through its own door.
    fn contender_command(&self, i: usize, args: Vec<String>) -> TestCommand {
        self.command(args).kubeconfig(&self.doors[i].1)
    }

    /// A fault on one contender's door (its connections only), for a while; the others are
    /// served meanwhile.
    fn door_fault(&mut self) {
        let i = self.rng.below(self.doors.len() as u64) as usize;
        let (name, fault) = match self.rng.below(8) {
            0 => ("one client refused", Fault::Refuse),
            1 => ("one client black-holed", Fault::Blackhole),
            2 => ("one client's connections cut (half-open)", Fault::HalfOpen),
            3 => (
                "one client answered slowly",
                Fault::Delay(self.rng.millis(50, 1500)),
            ),
            4 => ("one client answered 503", Fault::Status(503, None)),
            5 => ("one client answered 429", Fault::Status(429, Some(1))),
            6 => ("one client answered 500", Fault::Status(500, None)),
            _ => ("one client's write answers lost", Fault::LoseAnswers),
        };
        self.doors[i].0.set_fault(fault);
        self.tally.add(name);
        self.door_fault = Some((i, Instant::now() + self.rng.millis(200, 3000)));
    }

    /// Ends a door's fault once its time is up (`all`: now).
    fn heal_door(&mut self, all: bool) {
        if let Some((i, until)) = self.door_fault
            && (all || Instant::now() >= until)
        {
            self.doors[i].0.set_fault(Fault::Normal);
            self.door_fault = None;
        }
    }

    /// One random action.
    async fn step(&mut self, fault_until: &mut Instant) {
        let contenders = self.running.len() as u64;
        let no_fault = Instant::now() >= *fault_until;
        let server = self.world.server.clone();
        match self.rng.below(15) {
            0 => {
                let i = self.rng.below(contenders) as usize;
                self.running[i].signal(Signal::SIGKILL);
                self.tally.add("SIGKILL");
            }
            1 | 2 => {
                let i = self.rng.below(contenders) as usize;
                if !self.running[i].exited() {
                    self.running[i].signal(Signal::SIGTERM);
                    self.tally.add("SIGTERM");
                }
            }
            3 if no_fault => {
                // Sometimes shorter than the renew deadline (a blip), sometimes longer (a loss).
                let (name, mode) = match self.rng.below(5) {
                    0 => ("API refuses connections", Mode::Refuse),
                    1 => ("API hangs", Mode::Hang),
                    2 => ("API answers 503", Mode::Status(503, None)),
                    3 => ("API answers 429", Mode::Status(429, Some(1))),
                    _ => ("API answers 500", Mode::Status(500, None)),
                };
                server.set_mode(mode);
                self.tally.add(name);
                *fault_until = Instant::now() + self.rng.millis(200, 2500);
            }
            4 if no_fault => {
                server.set_delay(self.rng.millis(50, 400));
                self.tally.add("API slow");
                *fault_until = Instant::now() + self.rng.millis(500, 2000);
            }
            5 => {
                // A user or the garbage collector deletes the Lease, held or not.
                let slot = self.random_slot();
                if server.delete_lease(NS, &slot) {
                    self.deletions.push((slot, mono_ns()));
                    self.tally.add("Lease deleted");
                }
            }
            6 => {
                // An operator writes another holder over whoever holds it, for 1 or 2 s.
                let slot = self.random_slot();
                let stuck = server
                    .holder(NS, &slot)
                    .is_some_and(|h| self.stuck.contains(&h));
                let seconds = 1 + self.rng.below(2) as i64;
                if operator_edits() {
                    // On an absent Lease (deleted), this starts the token again at 1.
                    server.steal(NS, &slot, "operator", seconds);
                } else {
                    let now = apiserver::micro_now();
                    let token = self.highest_token(&slot) + 1;
                    server.put_lease(
                        NS,
                        &slot,
                        serde_json::json!({"spec": {
                            "holderIdentity": "operator",
                            "leaseDurationSeconds": seconds,
                            "acquireTime": now,
                            "renewTime": now,
                            "leaseTransitions": token,
                        }}),
                    );
                    self.operator_tokens.insert(slot.clone(), token);
                }
                self.tally.add(if stuck {
                    "Lease overwritten (a stuck leader's)"
                } else {
                    "Lease overwritten"
                });
            }
            7 => self.handover(),
            8 => {
                server.compact();
                self.tally.add("compaction");
            }
            9 if no_fault => {
                // Renewals, claims and releases are carried out, their answers never come.
                let slot = self.random_slot();
                server.lose_answers("update", &slot);
                self.tally.add("answers lost after commit");
                *fault_until = Instant::now() + self.rng.millis(300, 3000);
            }
            10 => {
                let i = self.rng.below(contenders) as usize;
                self.freeze(i).await;
            }
            11 if operator_edits() => self.operator_edit().await,
            12 | 13 if self.door_fault.is_none() => self.door_fault(),
            _ => {}
        }
    }

    /// The highest `leaseTransitions` the Lease `slot` ever had: in a client's write, in the
    /// operator's, or now.
    fn highest_token(&self, slot: &str) -> i64 {
        let token = |lease: &serde_json::Value| lease["spec"]["leaseTransitions"].as_i64();
        let written = self
            .world
            .server
            .writes()
            .iter()
            .filter(|w| w.object["metadata"]["name"] == slot)
            .filter_map(|w| token(&w.object))
            .max();
        let now = self.world.server.lease(NS, slot).as_ref().and_then(token);
        [written, now, self.operator_tokens.get(slot).copied()]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0)
    }

    /// Asks a contender holding a Lease to hand it over: by writing the request as `lease-exec
    /// --handover` does, or by running it (to a live contender, to any other, to one that is gone).
    fn handover(&mut self) {
        let slot = self.random_slot();
        let server = self.world.server.clone();
        // Only on a contender's term: the operator's never steps down.
        let Some(mut lease) = server.lease(NS, &slot).filter(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .is_some_and(|h| h.starts_with('c'))
        }) else {
            return;
        };
        let to = match self.rng.below(4) {
            0 => None,
            1 => Some("gone".to_string()),
            _ => {
                let n = self.identities.len() as u64;
                Some(self.identities[self.rng.below(n) as usize].clone())
            }
        };
        if self.rng.one_in(2) {
            lease["spec"]["preferredHolder"] = serde_json::json!(to.as_deref().unwrap_or("*"));
            lease["spec"]["strategy"] = serde_json::json!("lease-exec/handover");
            server.put_lease(NS, &slot, lease);
            self.tally.add("handover request written");
        } else {
            // The slot's own name, without --holders.
            let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
            args.extend(["--handover", "--wait-timeout", "5s"].map(String::from));
            if let Some(to) = to {
                args.extend(["--to".to_string(), to]);
            }
            args.push(slot);
            self.handovers.push(self.world.lease_exec(args).spawn());
            self.tally.add("lease-exec --handover run");
        }
    }

    /// SIGSTOP of a contender's lease-exec (not its worker), SIGCONT shorter or longer than the
    /// renew deadline later. One that holds a Lease or still runs a worker is woken by
    /// [`FREEZE_HOLDER_UNTIL_NS`] after its last write at the latest.
    async fn freeze(&mut self, i: usize) {
        if self.running[i].exited() {
            return;
        }
        let pid = self.running[i].pid();
        self.running[i].signal(Signal::SIGSTOP);
        // Once every thread is stopped it can write nothing more: what the server and the kernel
        // say now holds until SIGCONT.
        wait_for_or(Duration::from_secs(1), || stopped(pid)).await;
        let identity = self.identities[i].clone();
        let holds = self
            .slots
            .iter()
            .any(|s| self.world.server.holder(NS, s).as_deref() == Some(identity.as_str()))
            || kernel().spans().iter().any(|s| {
                s.exit_ns.is_none() && s.env("LEASE_EXEC_HELD_IDENTITY") == Some(identity.as_str())
            });
        let mut length = if self.rng.one_in(2) {
            self.rng.millis(100, 900)
        } else {
            self.rng.millis(1100, 4000)
        };
        if holds {
            let last_ns = self
                .world
                .server
                .last_write_by(&identity)
                .map_or_else(mono_ns, |w| w.at_ns);
            let left = (last_ns + FREEZE_HOLDER_UNTIL_NS).saturating_sub(mono_ns());
            length = length.min(Duration::from_nanos(left));
        }
        tokio::time::sleep(length).await;
        self.running[i].signal(Signal::SIGCONT);
        self.tally
            .add(match (length < Duration::from_secs(1), holds) {
                (true, true) => "SIGSTOP of a holder < renew deadline",
                (false, true) => "SIGSTOP of a holder > renew deadline",
                (true, false) => "SIGSTOP of a follower < renew deadline",
                (false, false) => "SIGSTOP of a follower > renew deadline",
            });
    }

    /// An operator edits the held Lease keeping its holder: shrinks `leaseDurationSeconds` to 1
    /// (holder and renewTime kept), or lowers `leaseTransitions`. A shrink only matters if the
    /// holder then stops renewing (its next renewal restores its duration): half the time, the
    /// holder is frozen right after it.
    async fn operator_edit(&mut self) {
        let slot = self.random_slot();
        let server = self.world.server.clone();
        let Some(mut lease) = server.lease(NS, &slot).filter(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .is_some_and(|h| h.starts_with('c'))
        }) else {
            return;
        };
        if self.rng.one_in(2) {
            let holder = lease["spec"]["holderIdentity"].as_str().map(str::to_string);
            lease["spec"]["leaseDurationSeconds"] = serde_json::json!(1);
            server.put_lease(NS, &slot, lease);
            self.tally.add("operator shrank leaseDurationSeconds");
            let frozen = self
                .identities
                .iter()
                .position(|id| Some(id) == holder.as_ref());
            if let Some(i) = frozen.filter(|_| frozen_shrink() && self.rng.one_in(2)) {
                self.freeze(i).await;
            }
        } else {
            let transitions = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
            if transitions > 0 {
                let lower = self.rng.below(transitions as u64) as i64;
                lease["spec"]["leaseTransitions"] = serde_json::json!(lower);
                server.put_lease(NS, &slot, lease);
                self.lowerings.push((slot.clone(), mono_ns()));
                self.tally.add("operator lowered leaseTransitions");
            }
        }
    }
}

/// Completes once the worker of `identity` has journaled its start and `stuck_for` has passed
/// (or 10 s after the call, if it never leads, or at once once `ending`).
async fn stderr_release(
    journal: std::path::PathBuf,
    identity: String,
    stuck_for: Duration,
    ending: Arc<AtomicBool>,
) {
    let latest = Instant::now() + Duration::from_secs(10);
    let mut until = None;
    while !ending.load(Ordering::Relaxed) && Instant::now() < until.unwrap_or(latest) {
        if until.is_none()
            && read_journal(&journal)
                .iter()
                .any(|e| e.what == "start" && e.identity == identity)
        {
            until = Some(Instant::now() + stuck_for);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether every thread of `pid` is stopped (or it is gone).
fn stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| matches!(state, 'T' | 't' | 'Z' | 'X'))
        })
    })
}

/// lease-exec processes still running with this World's journal in their arguments: nested
/// candidates whose parent was SIGKILLed (see [`Driver::spawn`]).
fn leftover_lease_execs(journal: &Path) -> Vec<i32> {
    let bin = Path::new(BIN).canonicalize().unwrap();
    let journal = journal.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == bin)
                && alive(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&journal))
        })
        .collect()
}

/// What the kernel's spans say, per Lease: overlapping pairs, fencing tokens that did not rise,
/// and the smallest gap between one worker's exit and the next one's exec.
#[derive(Debug, Default)]
struct Verdict {
    overlaps: Vec<[Run; 2]>,
    regressions: Vec<[Run; 2]>,
    /// `(gap ns, the worker before, the one after)`.
    smallest_gap: Option<(i64, Run, Run)>,
    /// Runs whose token is unknown (not checked).
    unknown_tokens: usize,
    /// Tokens that did not rise across a deletion of the Lease.
    resets: usize,
    /// Two workers of one lease-exec process (one identity) in a row with the same token: it
    /// resumed its own record for a new term (`tests/known_issues.rs`).
    resumed: Vec<[Run; 2]>,
}

/// `deletions`: `(Lease, when)` it was deleted (CLOCK_MONOTONIC ns). A deletion takes the token
/// with it: a process that never saw the deleted record (started since, or blind meanwhile) can
/// only count from the record it finds, or from 0 when it creates the Lease. So the token must rise
/// from one worker to the next unless the Lease was deleted between their execs; such resets are
/// counted.
fn judge(runs: &[Run], deletions: &[(String, u64)]) -> Verdict {
    judge_with(runs, deletions, &[], &Default::default())
}

/// Per identity, until when (CLOCK_MONOTONIC ns) its lease-exec can be sure to have seen nothing of
/// the Lease: the later of its start (`started`) and its first successful read, which its log
/// shows by the first line that follows one ("waiting: ...", "took over", "created the lease"),
/// less a request timeout (FAST: 500 ms), since the read was answered no earlier than that before
/// the line. A process kept from reading (429s, a hung API server) for seconds after its start
/// sees only what the Lease is by then.
fn unseen_until(
    started: &std::collections::HashMap<String, u64>,
    logs: &Path,
) -> std::collections::HashMap<String, u64> {
    const REQUEST_TIMEOUT_NS: u64 = 500_000_000;
    let real = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).unwrap();
    let real_ns = real.tv_sec() as i128 * 1_000_000_000 + real.tv_nsec() as i128;
    let real_minus_mono = real_ns - mono_ns() as i128;
    // Each identity logs to one file, in order: the first such line is its first read.
    let mut first_read: std::collections::HashMap<String, u64> = Default::default();
    for entry in std::fs::read_dir(logs).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let Some((stamp, rest)) = line.split_once(' ') else {
                continue;
            };
            let Some((identity, message)) = rest
                .split_once("identity=")
                .and_then(|(_, r)| r.split_once("}: "))
            else {
                continue;
            };
            if !(message.starts_with("waiting: ")
                || message.starts_with("took over")
                || message.starts_with("created the lease"))
            {
                continue;
            }
            let Ok(at) = stamp.parse::<k8s_openapi::jiff::Timestamp>() else {
                continue;
            };
            let mono = (at.as_nanosecond() - real_minus_mono).max(0) as u64;
            first_read.entry(identity.to_string()).or_insert(mono);
        }
    }
    started
        .iter()
        .map(|(identity, &start)| {
            let read = first_read
                .get(identity)
                .map_or(0, |&r| r.saturating_sub(REQUEST_TIMEOUT_NS));
            (identity.clone(), start.max(read))
        })
        .collect()
}

/// [`judge`], where an operator's edit that lowered `leaseTransitions` (`lowerings`: `(Lease,
/// when)`) also lets the token fall, for a process that had seen nothing of the Lease until after
/// it (`started`: identity → until when, see [`unseen_until`]): it never saw the earlier value,
/// only the lowered record. A process that saw the earlier value must not fall, edit or not.
fn judge_with(
    runs: &[Run],
    deletions: &[(String, u64)],
    lowerings: &[(String, u64)],
    started: &std::collections::HashMap<String, u64>,
) -> Verdict {
    let mut verdict = Verdict::default();
    let mut by_lease: BTreeMap<Option<&str>, Vec<&Run>> = BTreeMap::new();
    for run in runs {
        by_lease.entry(run.lease.as_deref()).or_default().push(run);
    }
    for runs in by_lease.values_mut() {
        runs.sort_by_key(|r| r.exec_ns);
        // The run that ends last so far, and the last one with a known token.
        let mut latest: Option<&Run> = None;
        let mut token: Option<&Run> = None;
        for &run in runs.iter() {
            if let Some(before) = latest {
                if run.exec_ns < before.exit_ns {
                    verdict.overlaps.push([before.clone(), run.clone()]);
                } else {
                    let gap = (run.exec_ns - before.exit_ns) as i64;
                    if verdict.smallest_gap.as_ref().is_none_or(|g| gap < g.0) {
                        verdict.smallest_gap = Some((gap, before.clone(), run.clone()));
                    }
                }
            }
            if latest.is_none_or(|l| run.exit_ns > l.exit_ns) {
                latest = Some(run);
            }
            let deleted_since = |before: &Run| {
                deletions.iter().any(|(lease, at)| {
                    Some(lease.as_str()) == run.lease.as_deref()
                        && before.exec_ns < *at
                        && *at < run.exec_ns
                })
            };
            match (token, run.transitions) {
                (_, None) => verdict.unknown_tokens += 1,
                (Some(before), Some(now)) if Some(now) <= before.transitions => {
                    let run_started = run.identity.as_ref().and_then(|i| started.get(i));
                    let lowered_before_it = lowerings.iter().any(|(lease, at)| {
                        Some(lease.as_str()) == run.lease.as_deref()
                            && before.exec_ns < *at
                            && *at < run.exec_ns
                            && run_started.is_some_and(|s| s > at)
                    });
                    if deleted_since(before) || lowered_before_it {
                        verdict.resets += 1;
                        token = Some(run);
                        continue;
                    }
                    if Some(now) == before.transitions
                        && run.identity.is_some()
                        && run.identity == before.identity
                    {
                        verdict.resumed.push([before.clone(), run.clone()]);
                        token = Some(run);
                        continue;
                    }
                    verdict.regressions.push([before.clone(), run.clone()]);
                    token = Some(run);
                }
                _ => token = Some(run),
            }
        }
    }
    verdict
}

/// `holders` > 1: the contenders share a semaphore of that many slots (`--holders`); the
/// hand-changes hit a random slot, the checks are per slot, plus never more than `holders`
/// workers at once.
async fn chaos(contenders: usize, holders: u32, length: Duration, seed: u64) {
    // First, so that a failure anywhere below can be replayed.
    println!(
        "chaos seed {seed} (replay with CHAOS_SEED={seed}); operator edits {}",
        if operator_edits() {
            "on"
        } else {
            "off (CHAOS_OPERATOR_EDITS=0)"
        }
    );
    kernel();
    let world = World::start().await;
    let slots: Vec<String> = if holders == 1 {
        vec!["job".to_string()]
    } else {
        (0..holders).map(|i| format!("job-{i}")).collect()
    };
    let mut options: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    options.extend(["--holders".to_string(), holders.to_string()]);
    let mut driver = Driver {
        world,
        rng: Rng(seed | 1),
        tally: Tally::default(),
        slots: slots.clone(),
        options,
        generation: 0,
        identities: Vec::new(),
        running: Vec::new(),
        handovers: Vec::new(),
        ending: Arc::default(),
        stuck: Vec::new(),
        operator_tokens: Default::default(),
        lowerings: Vec::new(),
        started: Default::default(),
        deletions: Vec::new(),
        doors: Vec::new(),
        door_fault: None,
    };
    for _ in 0..contenders {
        let door = driver.world.door();
        driver.doors.push(door);
    }
    for i in 0..contenders {
        let running = driver.spawn(i);
        driver.running.push(running);
    }

    let began_ns = mono_ns();
    let end = Instant::now() + length;
    let mut fault_until = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(driver.rng.millis(100, 700)).await;
        // Restart contenders that exited (their worker finished, or they lost the lease).
        for i in 0..contenders {
            if driver.running[i].exited() {
                driver.running[i] = driver.spawn(i);
                driver.tally.add("restart");
            }
        }
        if Instant::now() >= fault_until {
            driver.world.server.set_mode(Mode::Normal);
            driver.world.server.set_delay(Duration::ZERO);
            driver.world.server.keep_answers();
        }
        driver.heal_door(false);
        driver.step(&mut fault_until).await;
    }

    // The end: API back, held pipes drained, everyone stopped; then every worker is gone.
    let world = &driver.world;
    world.server.set_mode(Mode::Normal);
    world.server.set_delay(Duration::ZERO);
    world.server.keep_answers();
    driver.heal_door(true);
    let world = &driver.world;
    driver.ending.store(true, Ordering::Relaxed);
    for r in &mut driver.running {
        if !r.exited() {
            r.signal(Signal::SIGTERM);
        }
    }
    for r in &mut driver.running {
        r.wait(Duration::from_secs(20)).await;
    }
    for h in &mut driver.handovers {
        let code = h.wait(Duration::from_secs(20)).await;
        driver.tally.add(match code {
            0 => "--handover: handed over",
            124 => "--handover: timed out (124)",
            125 => "--handover: refused (125)",
            _ => "--handover: other exit",
        });
        if code != 0 {
            let log = h.stderr();
            println!(
                "--handover exited {code}: {}",
                log.lines().last().unwrap_or("")
            );
        }
    }
    let leftovers = leftover_lease_execs(&world.journal());
    for &pid in &leftovers {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
        driver
            .tally
            .add("orphaned nested lease-exec stopped at the end");
    }
    wait_for(
        Duration::from_secs(20),
        "orphaned nested lease-execs",
        || leftovers.iter().all(|&pid| !alive(pid)),
    )
    .await;
    let runs = world.kernel_runs().await;
    let expiries: usize = std::fs::read_dir(world.dir.path())
        .unwrap()
        .flatten()
        .map(|f| {
            let text =
                String::from_utf8_lossy(&std::fs::read(f.path()).unwrap_or_default()).into_owned();
            text.matches("watch expired (410 Gone)").count()
        })
        .sum();
    driver.tally.0.insert("410 Gone seen by a watch", expiries);
    let tally = &driver.tally;

    let unseen_until = unseen_until(&driver.started, world.dir.path());
    let verdict = judge_with(&runs, &driver.deletions, &driver.lowerings, &unseen_until);
    let spans: Vec<(i32, u64, u64)> = runs.iter().map(Run::span).collect();
    let most = max_concurrent(&spans);
    // Time with no worker at all (with several slots: with none of them taken).
    let mut down_ns = 0;
    let mut covered_until = began_ns;
    for span in &spans {
        down_ns += span.1.saturating_sub(covered_until);
        covered_until = covered_until.max(span.2);
    }
    let total_ns = covered_until.saturating_sub(began_ns).max(1);
    let gap = verdict
        .smallest_gap
        .as_ref()
        .map_or("none".into(), |(ns, a, b)| {
            format!(
                "{:.3} ms (pid {} exit -> pid {} exec, {:?})",
                *ns as f64 / 1e6,
                a.pid,
                b.pid,
                b.lease
            )
        });
    println!(
        "chaos seed {seed}: {contenders} contenders, {holders} slot(s), {:.0} s: {} worker runs \
         ({} killed before their first stamp), at most {most} at once; {} overlaps, {} fencing \
         tokens not rising ({} unknown, {} reset by a deletion, {} kept into a new term by one \
         --recampaign process{}); smallest exit-to-exec gap {gap}; worker down {:.1} s of \
         {:.1} s ({:.1}%)\nchaos tally: {tally}",
        length.as_secs_f64(),
        runs.len(),
        runs.iter().filter(|r| r.journaled_ns.is_none()).count(),
        verdict.overlaps.len(),
        verdict.regressions.len(),
        verdict.unknown_tokens,
        verdict.resets,
        verdict.resumed.len(),
        if strict_resume() {
            ""
        } else {
            ": tolerated with CHAOS_STRICT_RESUME=0"
        },
        down_ns as f64 / 1e9,
        total_ns as f64 / 1e9,
        100.0 * down_ns as f64 / total_ns as f64,
    );

    let failed = !(verdict.overlaps.is_empty()
        && verdict.regressions.is_empty()
        && (verdict.resumed.is_empty() || !strict_resume()));
    let kept = std::env::temp_dir().join(format!("chaos-{seed}"));
    if failed {
        // The logs and the journal outlive the test's scratch directory.
        let _ = std::fs::create_dir_all(&kept);
        for file in std::fs::read_dir(world.dir.path()).unwrap().flatten() {
            let _ = std::fs::copy(file.path(), kept.join(file.file_name()));
        }
    }
    let context = format!("seed {seed}; logs kept in {}; {tally}", kept.display());
    if let Some([a, b]) = verdict.overlaps.first() {
        println!("{}", logs_mentioning(world.dir.path(), &[a.pid, b.pid]));
        panic!(
            "{} overlaps; the first: {a:?} still ran when {b:?} started ({:.3} ms); {context}",
            verdict.overlaps.len(),
            (a.exit_ns - b.exec_ns) as f64 / 1e6
        );
    }
    if let Some([a, b]) = verdict.resumed.first().filter(|_| strict_resume()) {
        println!("{}", logs_mentioning(world.dir.path(), &[a.pid, b.pid]));
        panic!(
            "{} workers kept their lease-exec's token into a new term; the first: {a:?} then {b:?}; {context}",
            verdict.resumed.len()
        );
    }
    if let Some([a, b]) = verdict.regressions.first() {
        println!("{}", logs_mentioning(world.dir.path(), &[a.pid, b.pid]));
        panic!(
            "{} fencing tokens did not rise; the first: {a:?} then {b:?}; {context}",
            verdict.regressions.len()
        );
    }
    assert!(
        runs.iter()
            .all(|r| r.lease.as_ref().is_some_and(|l| slots.contains(l))),
        "a worker ran without one of {slots:?}: {runs:?}"
    );
    assert!(
        most <= holders as usize,
        "{most} workers ran at once with {holders} slots; {context}"
    );
    // More than two workers: at least two handoffs, or the checks above held vacuously.
    assert!(
        runs.len() > 2,
        "too few workers ({}) to mean anything: {runs:?}; {context}",
        runs.len()
    );
}

/// The most spans running at one instant (a span's end and the next one's start at the same
/// nanosecond do not count as both running).
fn max_concurrent(spans: &[(i32, u64, u64)]) -> usize {
    let mut edges: Vec<(u64, i32)> = spans.iter().flat_map(|s| [(s.1, 1), (s.2, -1)]).collect();
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    most as usize
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(mono_ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    chaos(3, 1, Duration::from_secs(20), seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_semaphore_of_three_with_six_contenders() {
    chaos(6, 3, Duration::from_secs(20), seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by hand with --ignored"]
async fn chaos_long() {
    let minutes = std::env::var("CHAOS_MINUTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    chaos(5, 1, Duration::from_secs(60 * minutes), seed()).await;
}

#[test]
fn the_concurrency_check_counts_what_runs_at_one_instant() {
    assert_eq!(max_concurrent(&[(1, 0, 10), (2, 10, 20), (3, 20, 30)]), 1);
    assert_eq!(max_concurrent(&[(1, 0, 10), (2, 5, 20), (3, 9, 30)]), 3);
    assert_eq!(max_concurrent(&[(1, 0, 10), (2, 5, 8), (3, 9, 30)]), 2);
}

fn run(pid: i32, lease: &str, exec_ms: u64, exit_ms: u64, transitions: Option<i64>) -> Run {
    Run {
        pid,
        exec_ns: exec_ms * 1_000_000,
        exit_ns: exit_ms * 1_000_000,
        lease: Some(lease.into()),
        identity: None,
        transitions,
        journaled_ns: None,
    }
}

#[test]
fn the_judge_flags_overlaps_and_tokens_that_do_not_rise_per_lease() {
    // Back to back, rising: nothing; the gap is the smallest exit-to-exec.
    let clean = [
        run(1, "a", 100, 200, Some(1)),
        run(2, "a", 203, 300, Some(2)),
        run(3, "a", 310, 400, Some(4)),
        // Another Lease runs at the same time, with its own tokens.
        run(4, "b", 150, 350, Some(1)),
    ];
    let v = judge(&clean, &[]);
    assert!(v.overlaps.is_empty() && v.regressions.is_empty(), "{v:?}");
    assert_eq!(v.smallest_gap.as_ref().map(|g| g.0), Some(3_000_000));
    // A 2 ms overlap; a token that stays; one that falls (after an unknown one).
    let bad = [
        run(1, "a", 100, 200, Some(1)),
        run(2, "a", 198, 300, Some(2)),
        run(3, "a", 300, 400, Some(2)),
        run(4, "a", 400, 500, None),
        run(5, "a", 500, 600, Some(1)),
    ];
    let v = judge(&bad, &[]);
    assert_eq!(
        v.overlaps
            .iter()
            .map(|[a, b]| (a.pid, b.pid))
            .collect::<Vec<_>>(),
        [(1, 2)]
    );
    assert_eq!(
        v.regressions
            .iter()
            .map(|[a, b]| (a.pid, b.pid))
            .collect::<Vec<_>>(),
        [(2, 3), (3, 5)]
    );
    assert_eq!(v.unknown_tokens, 1);
    // A span inside a longer one overlaps it, and so does the next one that starts inside it.
    let nested = [
        run(1, "a", 100, 500, Some(1)),
        run(2, "a", 200, 300, Some(2)),
        run(3, "a", 400, 600, Some(3)),
    ];
    assert_eq!(judge(&nested, &[]).overlaps.len(), 2);
    // A token may start again after a deletion of its own Lease, not of another one.
    let deleted = [
        run(1, "a", 100, 200, Some(5)),
        run(2, "a", 300, 400, Some(0)),
        run(3, "b", 100, 200, Some(5)),
        run(4, "b", 300, 400, Some(0)),
    ];
    // One process's two workers with one token are told apart from a regression.
    let mut again = [
        run(1, "a", 100, 200, Some(3)),
        run(2, "a", 300, 400, Some(3)),
    ];
    for r in &mut again {
        r.identity = Some("c1-1".into());
    }
    let v = judge(&again, &[]);
    assert_eq!((v.resumed.len(), v.regressions.len()), (1, 0));
    // After an operator lowered the token: a process started since may fall, one started before
    // (which saw the higher token) may not.
    let mut lowered = [
        run(1, "a", 100, 200, Some(41)),
        run(2, "a", 300, 400, Some(20)),
    ];
    lowered[1].identity = Some("c2-46".into());
    let lowerings = [("a".to_string(), 250_000_000)];
    let after: std::collections::HashMap<String, u64> = [("c2-46".to_string(), 260_000_000)].into();
    let v = judge_with(&lowered, &[], &lowerings, &after);
    assert_eq!((v.resets, v.regressions.len()), (1, 0), "{v:?}");
    let before: std::collections::HashMap<String, u64> = [("c2-46".to_string(), 50_000_000)].into();
    let v = judge_with(&lowered, &[], &lowerings, &before);
    assert_eq!(v.regressions.len(), 1, "{v:?}");
    let v = judge(&deleted, &[("a".into(), 250_000_000)]);
    assert_eq!(v.resets, 1);
    assert_eq!(
        v.regressions
            .iter()
            .map(|[a, b]| (a.pid, b.pid))
            .collect::<Vec<_>>(),
        [(3, 4)]
    );
}

/// The check a chaos run ends with is [`judge`] on the kernel's stamps: a 2 ms overlap is flagged
/// where the workers' own journals (a start written after the exec, a stop before the exit) show
/// none; back to back is no overlap; a worker SIGKILLed before it journaled anything still counts.
#[test]
fn the_overlap_check_flags_a_2_ms_overlap() {
    let ms = 1_000_000;
    let journaled = |mut run: Run, at_ms: u64| {
        run.journaled_ns = Some(at_ms * ms);
        run
    };
    // The kernel: 1 ran 100..200 ms, 2 was exec'd at 198 ms. Their journals: 1 from 101 to 199,
    // 2 from 201.
    let runs = [
        journaled(run(1, "a", 100, 200, Some(1)), 101),
        journaled(run(2, "a", 198, 300, Some(2)), 201),
    ];
    let entry = |what: &str, pid: i32, at_ms: u64| Entry {
        what: what.into(),
        pid,
        at_ns: at_ms * ms,
        identity: "-".into(),
        transitions: "-".into(),
        lease: "a".into(),
    };
    let journal = [
        entry("start", 1, 101),
        entry("stop", 1, 199),
        entry("start", 2, 201),
    ];
    assert_eq!(
        first_overlap(&closed_spans(&journal, |_| None, 400 * ms)),
        None,
        "the journals hide it"
    );
    let v = judge(&runs, &[]);
    assert_eq!(
        v.overlaps
            .iter()
            .map(|[a, b]| (a.pid, b.pid))
            .collect::<Vec<_>>(),
        [(1, 2)]
    );
    // Back to back is no overlap: a gap of 0.
    let v = judge(
        &[
            run(1, "a", 100, 200, Some(1)),
            run(2, "a", 200, 300, Some(2)),
        ],
        &[],
    );
    assert!(v.overlaps.is_empty(), "{v:?}");
    assert_eq!(v.smallest_gap.map(|g| g.0), Some(0));
    // A worker killed 2 ms after its exec, before its first journal line, inside another's run.
    let v = judge(
        &[
            journaled(run(1, "a", 100, 200, Some(1)), 101),
            run(2, "a", 150, 152, Some(2)),
        ],
        &[],
    );
    assert_eq!(v.overlaps.len(), 1, "{v:?}");
}

/// The kernel's stamps, end to end: two workers forced together, the second (50 ms) inside the
/// first (1 s), are caught, the overlap measured to a few milliseconds; one SIGKILLed before it
/// could write anything still has its span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_forced_together_are_caught_by_the_kernel() {
    kernel();
    let world = World::start().await;
    let run = |seconds: &str| {
        std::process::Command::new(world.worker())
            .args([world.journal().to_str().unwrap(), seconds, "0"])
            .env("LEASE_EXEC_HELD_LEASE", "job")
            .env("LEASE_EXEC_TRANSITIONS", "7")
            .spawn()
            .unwrap()
    };
    let mut first = run("1");
    wait_for(Duration::from_secs(5), "the first worker", || {
        !world.starts().is_empty()
    })
    .await;
    let mut second = run("0.05");
    second.wait().unwrap();
    first.wait().unwrap();
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.iter().all(|r| {
        r.lease.as_deref() == Some("job")
            && r.transitions == Some(7)
            && r.journaled_ns
                .is_some_and(|j| r.exec_ns <= j && j < r.exit_ns)
    }));
    let verdict = judge(&runs, &[]);
    let [a, b] = verdict.overlaps.first().expect("the overlap is caught");
    let overlap_ms = (a.exit_ns.min(b.exit_ns) - b.exec_ns) / 1_000_000;
    assert!((49..=75).contains(&overlap_ms), "{overlap_ms} ms: {runs:?}");
    assert_eq!(verdict.regressions.len(), 1, "the same token twice");
}

/// A process counts as having seen nothing of the Lease until its first read, as its log shows it
/// (less a request timeout), when that comes later than its start; lines before any read (waiting
/// to start, failed reads) and other identities' lines do not count.
#[test]
fn a_process_kept_from_reading_has_seen_nothing_until_its_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let real = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).unwrap();
    let real_ns = real.tv_sec() as i128 * 1_000_000_000 + real.tv_nsec() as i128;
    let mono = mono_ns();
    let stamp =
        |after_ns: i128| k8s_openapi::jiff::Timestamp::from_nanosecond(real_ns + after_ns).unwrap();
    let line = |after_ns: i128, identity: &str, message: &str| {
        format!(
            "{}  INFO lease{{name=job namespace=default identity={identity}}}: {message}\n",
            stamp(after_ns)
        )
    };
    let log = [
        line(0, "c1-1", "waiting for the lease lease_duration=2s"),
        line(
            1_000_000_000,
            "c1-1",
            "cannot read the lease; retrying error=\"429\"",
        ),
        line(
            3_000_000_000,
            "c1-1",
            "waiting: the lease is held by another identity holder=\"c0-1\"",
        ),
        line(
            4_000_000_000,
            "c1-1",
            "took over the expired lease previous=c0-1 transitions=9",
        ),
        line(
            2_000_000_000,
            "c2-2",
            "waiting: the lease is held by another identity holder=\"c0-1\"",
        ),
    ]
    .concat();
    std::fs::write(dir.path().join("lease-exec-0.log"), log).unwrap();
    let started: std::collections::HashMap<String, u64> = [
        ("c1-1".to_string(), mono),
        ("c2-2".to_string(), mono + 2_900_000_000),
        ("c3-3".to_string(), mono + 10),
    ]
    .into();
    let bounds = unseen_until(&started, dir.path());
    let near = |got: u64, want: u64| got.abs_diff(want) < 50_000_000;
    // c1-1: its first read answered at most 500 ms before its line 3 s in.
    assert!(near(bounds["c1-1"], mono + 2_500_000_000), "{bounds:?}");
    // c2-2: started after its line minus the timeout: its start.
    assert_eq!(bounds["c2-2"], mono + 2_900_000_000);
    // c3-3: no line at all: its start.
    assert_eq!(bounds["c3-3"], mono + 10);
}
