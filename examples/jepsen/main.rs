//! Jepsen-style runs on a highly available control plane, lease-exec side by side with client-go.
//!
//!     cargo run --release --example jepsen -- --minutes M --seed S [--pool lease-exec|client-go|mixed]
//!         [--contenders N] [--timings LEASE,DEADLINE,RETRY] [--faults NAME,...] [--cluster DIR]
//!         [--keep]
//!
//! Starts `testenv/cluster up DIR --ha` (three etcd members with fsync, two kube-apiservers with
//! their watch caches, Toxiproxy), unless `--cluster DIR` names one already running. N contenders
//! (default 5) compete for one Lease, spread over both API servers, each through its own Toxiproxy
//! proxy: in pool `lease-exec` all are lease-exec, in `client-go` all are testenv's client-go
//! `leaderelection` contender, in `mixed` they alternate. Each runs `examples/stamp_worker` for
//! 10 to 40 s; when a contender exits, its slot is torn down as a container would be (every process
//! left is killed) and started again a second later, as a kubelet would, with the same identity.
//!
//! A nemesis drawn from the seed alone (so every pool gets the same schedule) applies one fault at
//! a time, holds it 2 to 12 s and heals it: partition / half-open / reset one contender, partition
//! the leader, freeze or kill an API server, kill the etcd leader, latency on one contender,
//! compaction, SIGKILL or SIGTERM one contender, and slow-then-cut the leader (its answers delayed
//! 1.2 to 3 s, then its connection cut right after a renewal's answer arrived, held 12 s or more).
//!
//! The judge is the kernel: every worker's exec and exit as stamped by the proc connector
//! (`tests/support/kernel.rs`, CLOCK_MONOTONIC). Two workers whose spans intersect are an overlap.
//! Availability is the fraction of time from the first worker's start to the end of the run that
//! some worker ran; a handoff is the time from one worker's exit to the next one's exec, and its
//! cause is how the previous worker ended: by itself (`worker-exit`), else the last fault applied
//! before its exit.
//!
//! The last line printed is one JSON object: seed, minutes, pool, contenders (by kind), faults (by
//! kind), handoffs, overlaps (who, when, how long), availability, handoff latency p50/p99 by cause,
//! and the contenders' exit codes by kind. Each overlap is blamed from the Lease's history (two
//! watches, one per API server): on the earlier worker if the later one's claim came after the
//! term it replaced had ended (`acquireTime` ≥ the replaced `renewTime` + its duration, or a
//! release), else on the claimant. Exit status 1 if any overlap is blamed on a lease-exec
//! contender, 0 otherwise (client-go's are reported, not failed on: in a mixed pool a client-go
//! leader that runs past its term overlaps a lease-exec successor that claimed by the rules),
//! or if a lease-exec worker's `LEASE_EXEC_TRANSITIONS` is not above every earlier one's, or if
//! the verdict is `invalid`: blind (the kernel dropped events, a worker journaled its start but
//! the kernel has no exec for it, no lease-exec worker ran), or the run is not the one its
//! minutes promise (the nemesis or a slot's task panicked, a fault was not applied or not healed,
//! fewer faults than any schedule of that length plans, fewer handoffs than a run of that length
//! has). The judge is a function of what the run recorded (`Record`) and of the kernel's stamps,
//! tested on hand-made runs below. Needs root (the proc connector).

#[path = "../common/mod.rs"]
mod common;
mod ha;
mod history;
#[path = "../../tests/support/kernel.rs"]
mod kernel;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use ha::Ha;
use kernel::Kernel;

const NS: &str = "default";
const LEASE: &str = "jepsen";
/// What a kubelet waits before starting a container again (its first back-off step is 10 s; a
/// shorter one gives more terms per minute and changes nothing in what is judged).
const RESTART: Duration = Duration::from_secs(1);

fn mono_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

// ------------------------------------------------------------------ options

#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum Kind {
    LeaseExec,
    ClientGo,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::LeaseExec => "lease-exec",
            Kind::ClientGo => "client-go",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Kind::LeaseExec => "le",
            Kind::ClientGo => "cg",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pool {
    LeaseExec,
    ClientGo,
    Mixed,
}

impl Pool {
    fn name(self) -> &'static str {
        match self {
            Pool::LeaseExec => "lease-exec",
            Pool::ClientGo => "client-go",
            Pool::Mixed => "mixed",
        }
    }

    fn kind(self, slot: usize) -> Kind {
        match self {
            Pool::LeaseExec => Kind::LeaseExec,
            Pool::ClientGo => Kind::ClientGo,
            Pool::Mixed if slot.is_multiple_of(2) => Kind::LeaseExec,
            Pool::Mixed => Kind::ClientGo,
        }
    }
}

struct Options {
    minutes: f64,
    seed: u64,
    pool: Pool,
    contenders: usize,
    /// Lease duration, renew deadline, retry period, seconds; the same for both tools.
    timings: [f64; 3],
    cluster: Option<PathBuf>,
    keep: bool,
    /// The faults the nemesis draws from (all by default).
    faults: Vec<Fault>,
}

fn usage(problem: &str) -> ! {
    eprintln!("jepsen: {problem}");
    eprintln!(
        "usage: jepsen --minutes M [--seed S] [--pool lease-exec|client-go|mixed] [--contenders N] [--timings LEASE,DEADLINE,RETRY] [--faults NAME,...] [--cluster DIR] [--keep]"
    );
    std::process::exit(2);
}

fn options() -> Options {
    let mut o = Options {
        minutes: 0.0,
        seed: mono_ns() ^ u64::from(std::process::id()),
        pool: Pool::Mixed,
        contenders: 5,
        timings: [6.0, 4.0, 1.0],
        cluster: None,
        keep: false,
        faults: Fault::ALL.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--minutes" => {
                o.minutes = value()
                    .parse()
                    .ok()
                    .filter(|m: &f64| *m > 0.0)
                    .unwrap_or_else(|| usage("--minutes needs a positive number"))
            }
            "--seed" => {
                o.seed = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--seed needs a whole number"))
            }
            "--pool" => {
                o.pool = match value().as_str() {
                    "lease-exec" => Pool::LeaseExec,
                    "client-go" => Pool::ClientGo,
                    "mixed" => Pool::Mixed,
                    other => usage(&format!(
                        "--pool {other}: use lease-exec, client-go or mixed"
                    )),
                }
            }
            "--contenders" => {
                o.contenders = value()
                    .parse()
                    .ok()
                    .filter(|n| (2..=20).contains(n))
                    .unwrap_or_else(|| usage("--contenders needs a number from 2 to 20"))
            }
            "--timings" => {
                let v: Vec<f64> = value().split(',').filter_map(|s| s.parse().ok()).collect();
                match v[..] {
                    [l, d, r] if l > d && d > r && r > 0.0 => o.timings = [l, d, r],
                    _ => usage(
                        "--timings needs LEASE,DEADLINE,RETRY in seconds with LEASE > DEADLINE > RETRY > 0",
                    ),
                }
            }
            "--cluster" => o.cluster = Some(PathBuf::from(value())),
            "--keep" => o.keep = true,
            "--faults" => {
                let names = value();
                o.faults = names
                    .split(',')
                    .map(|n| {
                        Fault::ALL
                            .into_iter()
                            .find(|f| f.name() == n)
                            .unwrap_or_else(|| {
                                let all: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                                usage(&format!("unknown fault {n:?}: use {}", all.join(", ")))
                            })
                    })
                    .collect();
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if o.minutes == 0.0 {
        usage("--minutes is required");
    }
    o
}

fn main() {
    let options = options();
    let code = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(options));
    std::process::exit(code);
}

// ------------------------------------------------------------------ the schedule

/// splitmix64: the schedule depends on the seed and nothing else.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In [0, 1), from the high bits.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum Fault {
    PartitionOne,
    HalfOpenOne,
    ResetOne,
    PartitionLeader,
    FreezeApiserver,
    KillApiserver,
    KillEtcdLeader,
    Latency,
    Compaction,
    SigkillContender,
    SigtermContender,
    SlowThenCutLeader,
}

impl Fault {
    const ALL: [Fault; 12] = [
        Fault::PartitionOne,
        Fault::HalfOpenOne,
        Fault::ResetOne,
        Fault::PartitionLeader,
        Fault::FreezeApiserver,
        Fault::KillApiserver,
        Fault::KillEtcdLeader,
        Fault::Latency,
        Fault::Compaction,
        Fault::SigkillContender,
        Fault::SigtermContender,
        Fault::SlowThenCutLeader,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::PartitionOne => "partition-one",
            Fault::HalfOpenOne => "half-open-one",
            Fault::ResetOne => "reset-one",
            Fault::PartitionLeader => "partition-leader",
            Fault::FreezeApiserver => "freeze-apiserver",
            Fault::KillApiserver => "kill-apiserver",
            Fault::KillEtcdLeader => "kill-etcd-leader",
            Fault::Latency => "latency",
            Fault::Compaction => "compaction",
            Fault::SigkillContender => "sigkill-contender",
            Fault::SigtermContender => "sigterm-contender",
            Fault::SlowThenCutLeader => "slow-then-cut-leader",
        }
    }

    /// Whether it lasts (and is healed after its hold) rather than happening once.
    fn holds(self) -> bool {
        !matches!(
            self,
            Fault::Compaction | Fault::SigkillContender | Fault::SigtermContender
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Planned {
    /// Seconds from the start of the run.
    at: f64,
    fault: Fault,
    /// A contender's slot, or an API server's index.
    target: usize,
    /// Seconds the fault holds before it is healed.
    hold: f64,
    /// Latency, ms.
    ms: u64,
}

/// One fault at a time: the first after 8 s (a leader settles), each held 2 to 12 s, then 3 to
/// 10 s of quiet; none starts in the last 10 s.
fn schedule(seed: u64, seconds: f64, contenders: usize, faults: &[Fault]) -> Vec<Planned> {
    let mut rng = Rng(seed);
    let mut plan = Vec::new();
    let mut at = 8.0;
    while at < seconds - 10.0 {
        let fault = faults[rng.below(faults.len())];
        let target = match fault {
            Fault::FreezeApiserver | Fault::KillApiserver => rng.below(2),
            _ => rng.below(contenders),
        };
        let hold = if fault.holds() {
            2.0 + 10.0 * rng.unit()
        } else {
            0.0
        };
        // Long enough for a takeover: the point of this one is what happens then.
        let hold = if fault == Fault::SlowThenCutLeader {
            hold.max(12.0)
        } else {
            hold
        };
        let ms = 200 + rng.below(2800) as u64;
        plan.push(Planned {
            at,
            fault,
            target,
            hold: hold.min(seconds - at),
            ms,
        });
        at += hold + 3.0 + 7.0 * rng.unit();
    }
    plan
}

/// The fewest faults [`schedule`] plans in `seconds`, whatever the seed: the first at 8 s, each
/// next one less than 22 s after it (a hold of at most 12 s, at most 10 s of quiet), while 10 s
/// remain. The nemesis may run late by the time its commands take, which the last 10 s absorb.
fn min_faults(seconds: f64) -> usize {
    let mut n = 0;
    while 8.0 + 22.0 * (n as f64) < seconds - 10.0 {
        n += 1;
    }
    n
}

/// The fewest handoffs a run of `seconds` with lease duration `lease_s` has: the first worker
/// starts within a lease duration and 3 s, each worker runs at most 40 s before it exits by
/// itself, and the next one starts within two lease durations and 3 s of an exit (a release, or
/// a term left to expire; at most one fault holds at a time, and every fault leaves a contender
/// that can reach an API server).
fn min_handoffs(seconds: f64, lease_s: f64) -> usize {
    let first = lease_s + 3.0;
    let term = 40.0 + 2.0 * lease_s + 3.0;
    ((seconds - first) / term).floor().max(0.0) as usize
}

// ------------------------------------------------------------------ the run

struct Run {
    ha: Ha,
    lease_exec: PathBuf,
    contender: PathBuf,
    worker: PathBuf,
    journals: PathBuf,
    logs: PathBuf,
    kubeconfigs: Vec<PathBuf>,
    kinds: Vec<Kind>,
    timings: [f64; 3],
    seed: u64,
    t0: Instant,
    /// Each slot's contender process now.
    pids: Mutex<Vec<Option<u32>>>,
    /// (slot, exit code or 128+signal) of every contender that ended.
    exits: Mutex<Vec<(usize, i32)>>,
    /// (CLOCK_MONOTONIC ns, fault, what it hit) of every fault applied.
    applied: Mutex<Vec<(u64, Fault, String)>>,
    /// What went wrong with the run itself (a fault not applied or not healed): each makes the
    /// verdict invalid.
    broken: Mutex<Vec<String>>,
    stopping: AtomicBool,
}

fn slot_name(slot: usize) -> String {
    format!("slot-{slot:02}")
}

/// A slot's contender identity: its kind's short name and the slot.
fn identity(kinds: &[Kind], slot: usize) -> String {
    format!("{}-{}", kinds[slot].short(), slot_name(slot))
}

impl Run {
    fn identity(&self, slot: usize) -> String {
        identity(&self.kinds, slot)
    }

    fn journal(&self, slot: usize) -> PathBuf {
        self.journals.join(slot_name(slot))
    }

    fn spawn(&self, slot: usize, seconds: f64) -> Child {
        let name = slot_name(slot);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.logs.join(format!("{name}.log")))
            .expect("open a log file");
        let [lease, deadline, retry] = self.timings.map(|s| format!("{}ms", (s * 1000.0) as u64));
        let identity = self.identity(slot);
        let mut command = match self.kinds[slot] {
            Kind::LeaseExec => {
                let mut c = Command::new(&self.lease_exec);
                c.args([
                    "--identity",
                    &identity,
                    "--lease-duration",
                    &lease,
                    "--renew-deadline",
                    &deadline,
                    "--retry-period",
                    &retry,
                    "--grace-period",
                    "2s",
                    LEASE,
                    "--",
                ]);
                c
            }
            Kind::ClientGo => {
                let mut c = Command::new(&self.contender);
                c.args([
                    "--lease-name",
                    LEASE,
                    "--identity",
                    &identity,
                    "--lease-duration",
                    &lease,
                    "--renew-deadline",
                    &deadline,
                    "--retry-period",
                    &retry,
                    "--grace-period",
                    "2s",
                    "--kubeconfig",
                ])
                .arg(&self.kubeconfigs[slot])
                .arg("--");
                c
            }
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("LEASE_EXEC_") {
                command.env_remove(key);
            }
        }
        command
            .arg(&self.worker)
            .arg(self.journal(slot))
            .arg(format!("{seconds:.3}"))
            .env("KUBECONFIG", &self.kubeconfigs[slot])
            .env("JEPSEN_SLOT", &name)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn a contender")
    }

    fn signal(&self, slot: usize, signal: Signal) -> Option<u32> {
        let pid = self.pids.lock().unwrap()[slot]?;
        kill(Pid::from_raw(pid as i32), signal).ok()?;
        Some(pid)
    }

    fn slot_of(&self, identity: &str) -> Option<usize> {
        (0..self.kinds.len()).find(|&s| self.identity(s) == identity)
    }

    fn note(&self, fault: Fault, what: String) {
        eprintln!(
            "{:7.1}s {} {what}",
            self.t0.elapsed().as_secs_f64(),
            fault.name()
        );
        self.applied.lock().unwrap().push((mono_ns(), fault, what));
    }
}

/// SIGKILLs every process whose command line contains `pattern` until none is left: a slot's
/// contender and worker carry its journal's path.
fn kill_matching(pattern: &str) {
    let me = std::process::id();
    for _ in 0..100 {
        let mut found = false;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(pattern) {
                found = true;
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One contender's slot: started, reaped, torn down and started again until the run stops.
async fn slot_loop(run: Arc<Run>, slot: usize, mut stop: watch::Receiver<bool>) {
    let mut rng = Rng(run.seed ^ (slot as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    while !run.stopping.load(Ordering::SeqCst) {
        let mut child = run.spawn(slot, 10.0 + 30.0 * rng.unit());
        run.pids.lock().unwrap()[slot] = child.id();
        let status = tokio::select! {
            status = child.wait() => status.ok(),
            _ = stop.changed() => {
                // The end of the run: a graceful stop, as a kubelet's SIGTERM.
                let _ = run.signal(slot, Signal::SIGTERM);
                tokio::time::timeout(Duration::from_secs(15), child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        run.pids.lock().unwrap()[slot] = None;
        if let Some(status) = status {
            use std::os::unix::process::ExitStatusExt;
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            run.exits.lock().unwrap().push((slot, code));
        }
        // The container is gone with its main process: whatever it left is killed.
        let pattern = run.journal(slot).to_string_lossy().into_owned();
        let _ = tokio::task::spawn_blocking(move || kill_matching(&pattern)).await;
        if run.stopping.load(Ordering::SeqCst) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(RESTART) => {}
            _ = stop.changed() => break,
        }
    }
}

/// Why a fault was not applied.
#[derive(Debug)]
enum NotApplied {
    /// Its target is missing for the moment (no holder during a handoff, a contender between
    /// two runs): nothing was done, and it is tried again.
    NotYet(String),
    /// A command that applies it failed.
    Failed(String),
}

impl From<String> for NotApplied {
    fn from(e: String) -> NotApplied {
        NotApplied::Failed(e)
    }
}

/// How long the nemesis tries again a fault whose target is missing for the moment before the
/// run counts as broken: a handoff ends within a lease duration or two, a slot restarts in
/// [`RESTART`].
const APPLY_WITHIN: Duration = Duration::from_secs(8);

/// What undoes a fault that holds.
enum Heal {
    Proxy(String),
    Apiserver(usize),
    Etcd(usize),
}

async fn apply(run: &Run, p: &Planned) -> Result<Option<Heal>, NotApplied> {
    let proxy = |slot: usize| slot_name(slot);
    match p.fault {
        Fault::PartitionOne | Fault::HalfOpenOne | Fault::ResetOne => {
            let kind = match p.fault {
                Fault::PartitionOne => "partition",
                Fault::HalfOpenOne => "half-open",
                _ => "reset",
            };
            run.ha.toxic(&proxy(p.target), &[kind]).await?;
            run.note(
                p.fault,
                format!("{} for {:.1}s", run.identity(p.target), p.hold),
            );
            Ok(Some(Heal::Proxy(proxy(p.target))))
        }
        Fault::PartitionLeader => {
            let holder = run.ha.holder(NS, LEASE).await;
            let Some(slot) = holder.as_deref().and_then(|h| run.slot_of(h)) else {
                return Err(NotApplied::NotYet(format!(
                    "no leader to partition (holder {holder:?})"
                )));
            };
            run.ha.toxic(&proxy(slot), &["partition"]).await?;
            run.note(
                p.fault,
                format!("{} for {:.1}s", run.identity(slot), p.hold),
            );
            Ok(Some(Heal::Proxy(proxy(slot))))
        }
        Fault::FreezeApiserver | Fault::KillApiserver => {
            let how = if p.fault == Fault::FreezeApiserver {
                "--freeze"
            } else {
                "--kill"
            };
            run.ha
                .run("stop-apiserver", &[&p.target.to_string(), how])
                .await?;
            run.note(
                p.fault,
                format!("apiserver-{} for {:.1}s", p.target, p.hold),
            );
            Ok(Some(Heal::Apiserver(p.target)))
        }
        Fault::KillEtcdLeader => {
            let leader = run.ha.etcd_leader().await.map_err(NotApplied::NotYet)?;
            run.ha
                .run("stop-etcd", &[&leader.to_string(), "--kill"])
                .await?;
            run.note(p.fault, format!("etcd-{leader} for {:.1}s", p.hold));
            Ok(Some(Heal::Etcd(leader)))
        }
        Fault::Latency => {
            run.ha
                .toxic(&proxy(p.target), &["latency", &p.ms.to_string()])
                .await?;
            run.note(
                p.fault,
                format!("{} +{} ms for {:.1}s", run.identity(p.target), p.ms, p.hold),
            );
            Ok(Some(Heal::Proxy(proxy(p.target))))
        }
        Fault::Compaction => {
            let out = run.ha.run("compact", &[]).await?;
            run.note(p.fault, out);
            Ok(None)
        }
        Fault::SlowThenCutLeader => {
            // The leader's answers slowed by 1.2 to 3 s, then its connection cut right after a
            // renewal's answer came back: a leader that counts its term from the answer (client-go
            // takes its renew deadline from the end of the last successful renewal) runs on past
            // a term that others count from the write, which came the latency earlier.
            let holder = run.ha.holder(NS, LEASE).await;
            let Some(slot) = holder.as_deref().and_then(|h| run.slot_of(h)) else {
                return Err(NotApplied::NotYet(format!(
                    "no leader to slow down (holder {holder:?})"
                )));
            };
            let ms = p.ms.max(1200);
            run.ha
                .toxic(&proxy(slot), &["latency", &ms.to_string()])
                .await?;
            let renewed = |l: Option<k8s_openapi::api::coordination::v1::Lease>| {
                l.and_then(|l| l.spec)
                    .and_then(|s| s.renew_time.map(|t| (s.holder_identity, t.0)))
            };
            let before = renewed(run.ha.lease(NS, LEASE).await);
            let give_up = Instant::now() + Duration::from_secs_f64(3.0 * run.timings[0]);
            // A renewal written under the latency: its answer is on its way back.
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let now = renewed(run.ha.lease(NS, LEASE).await);
                if (now.is_some() && now != before) || Instant::now() > give_up {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(ms + 100)).await;
            run.ha.toxic(&proxy(slot), &["partition"]).await?;
            run.note(
                p.fault,
                format!(
                    "{} +{ms} ms, then cut {ms} ms after a renewal was written, for {:.1}s",
                    run.identity(slot),
                    p.hold
                ),
            );
            Ok(Some(Heal::Proxy(proxy(slot))))
        }
        Fault::SigkillContender | Fault::SigtermContender => {
            let signal = if p.fault == Fault::SigkillContender {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            let pid = run.signal(p.target, signal).ok_or_else(|| {
                NotApplied::NotYet(format!("{} is between runs", run.identity(p.target)))
            })?;
            run.note(p.fault, format!("{} (pid {pid})", run.identity(p.target)));
            Ok(None)
        }
    }
}

async fn heal(run: &Run, heal: Heal) {
    let result = match &heal {
        Heal::Proxy(name) => run.ha.toxic(name, &["heal"]).await,
        Heal::Apiserver(n) => run
            .ha
            .run("start-apiserver", &[&n.to_string()])
            .await
            .map(drop),
        Heal::Etcd(m) => run.ha.run("start-etcd", &[&m.to_string()]).await.map(drop),
    };
    if let Err(e) = result {
        eprintln!("jepsen: healing failed: {e}");
        run.broken
            .lock()
            .unwrap()
            .push(format!("a fault was not healed: {e}"));
    }
}

/// `apply` tried again every 200 ms while its target is missing for the moment, for up to
/// `within` or until the run stops; anything else that keeps a planned fault from being applied
/// breaks the run (it would pass with fewer faults than planned).
async fn retried<T, F, Fut>(
    within: Duration,
    stop: &watch::Receiver<bool>,
    mut apply: F,
) -> Result<T, NotApplied>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, NotApplied>>,
{
    let give_up = tokio::time::Instant::now() + within;
    loop {
        match apply().await {
            Err(NotApplied::NotYet(_))
                if tokio::time::Instant::now() < give_up && !*stop.borrow() =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

async fn nemesis(run: Arc<Run>, plan: Vec<Planned>, mut stop: watch::Receiver<bool>) {
    for p in plan {
        let at = run.t0 + Duration::from_secs_f64(p.at);
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.changed() => return,
        }
        let applied = retried(APPLY_WITHIN, &stop, || apply(&run, &p)).await;
        match applied {
            Ok(Some(undo)) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(p.hold)) => {}
                    _ = stop.changed() => {}
                }
                heal(&run, undo).await;
                if *stop.borrow() {
                    return;
                }
            }
            Ok(None) => {}
            Err(NotApplied::NotYet(_)) if *stop.borrow() => return,
            Err(NotApplied::NotYet(e) | NotApplied::Failed(e)) => {
                eprintln!(
                    "{:7.1}s {} not applied: {e}",
                    run.t0.elapsed().as_secs_f64(),
                    p.fault.name()
                );
                run.broken.lock().unwrap().push(format!(
                    "{} planned at {:.1}s was not applied: {e}",
                    p.fault.name(),
                    p.at
                ));
            }
        }
    }
}

async fn run(options: Options) -> i32 {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lease_exec = common::lease_exec_binary();
    let worker = common::example_binary("stamp_worker");
    let run_dir = tempfile::Builder::new()
        .prefix("jepsen-")
        .tempdir()
        .expect("temporary directory")
        .keep();
    let journals = run_dir.join("journals");
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&journals).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    let kernel = match Kernel::start(&worker) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("jepsen: the proc connector is unavailable ({e}): run as root");
            return 2;
        }
    };

    let (cluster_dir, reuse) = match &options.cluster {
        Some(dir) => (dir.clone(), true),
        None => (run_dir.join("cluster"), false),
    };
    eprintln!(
        "jepsen: seed {} pool {} contenders {} for {} min; control plane in {}",
        options.seed,
        options.pool.name(),
        options.contenders,
        options.minutes,
        cluster_dir.display()
    );
    let started = Instant::now();
    let ha = Ha::start(&root, &cluster_dir, reuse).await;
    install_cleanup(&root, &cluster_dir, !reuse, &journals);
    eprintln!(
        "jepsen: control plane ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let kinds: Vec<Kind> = (0..options.contenders)
        .map(|s| options.pool.kind(s))
        .collect();
    let mut kubeconfigs = Vec::new();
    for slot in 0..options.contenders {
        let name = slot_name(slot);
        kubeconfigs.push(ha.proxy(&name, slot % 2).await);
        // A proxy left over from an earlier run on the same control plane starts healed.
        ha.toxic(&name, &["heal"]).await.expect("heal a proxy");
    }
    ha.create_released(NS, LEASE).await;
    let history = history::History::start(ha.clients(), NS, LEASE);

    let seconds = options.minutes * 60.0;
    let plan = schedule(options.seed, seconds, options.contenders, &options.faults);
    let run = Arc::new(Run {
        ha,
        lease_exec,
        contender: root.join("testenv/bin/contender"),
        worker,
        journals: journals.clone(),
        logs,
        kubeconfigs,
        kinds: kinds.clone(),
        timings: options.timings,
        seed: options.seed,
        t0: Instant::now(),
        pids: Mutex::new(vec![None; options.contenders]),
        exits: Mutex::default(),
        applied: Mutex::default(),
        broken: Mutex::default(),
        stopping: AtomicBool::new(false),
    });
    let t0_mono = mono_ns();
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots: Vec<_> = (0..options.contenders)
        .map(|s| tokio::spawn(slot_loop(run.clone(), s, stop_rx.clone())))
        .collect();
    let plan_len = plan.len();
    let nemesis = tokio::spawn(nemesis(run.clone(), plan, stop_rx.clone()));

    tokio::time::sleep_until((run.t0 + Duration::from_secs_f64(seconds)).into()).await;
    let end_mono = mono_ns();
    run.stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    // A task that panicked stopped applying faults or restarting its slot: the run is broken.
    let mut broken = ended(nemesis, slots).await;
    kill_matching(&journals.to_string_lossy());
    broken.extend(run.broken.lock().unwrap().drain(..));

    let (versions, links) = history.snapshot();
    drop(history);
    let record = Record {
        kinds: kinds.clone(),
        journals: (0..options.contenders)
            .map(|slot| std::fs::read_to_string(run.journal(slot)).unwrap_or_default())
            .collect(),
        versions,
        links,
        planned: plan_len,
        applied: run.applied.lock().unwrap().clone(),
        broken,
        exits: run.exits.lock().unwrap().clone(),
        t0: t0_mono,
        end: end_mono,
        offset: clock_offset_ns(),
    };
    let verdict = judge(&record, &kernel, &options);
    run.ha.down().await;
    if options.keep {
        eprintln!("jepsen: journals and logs kept in {}", run_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    println!("{verdict}");
    i32::from(failed(&verdict))
}

/// Whether the run fails (exit 1): an overlap blamed on a lease-exec contender, a lease-exec
/// worker's token not above every earlier one's, or a verdict that is not valid.
fn failed(verdict: &Value) -> bool {
    let listed = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty());
    let lease_exec_overlaps = verdict["overlaps"].as_array().is_some_and(|o| {
        o.iter().any(|o| {
            o["blamed"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == Kind::LeaseExec.name()))
        })
    });
    // Missing or malformed fields fail too: nothing passes by default.
    lease_exec_overlaps
        || !verdict["invalid"].is_array()
        || listed(&verdict["invalid"])
        || !verdict["tokens"]["not_rising"].is_array()
        || listed(&verdict["tokens"]["not_rising"])
}

/// Waits for the nemesis and the slots' tasks: one line for each that did not return (a panic).
async fn ended(
    nemesis: tokio::task::JoinHandle<()>,
    slots: Vec<tokio::task::JoinHandle<()>>,
) -> Vec<String> {
    let mut ended = Vec::new();
    if let Err(e) = nemesis.await {
        ended.push(format!("the nemesis task ended: {e}"));
    }
    for (slot, task) in slots.into_iter().enumerate() {
        if let Err(e) = task.await {
            ended.push(format!("{}'s task ended: {e}", slot_name(slot)));
        }
    }
    ended
}

/// On a panic or Ctrl-C: kill every contender and worker, stop the control plane if ours.
fn install_cleanup(root: &Path, dir: &Path, owned: bool, journals: &Path) {
    let (script, dir, journals) = (
        root.join("testenv/cluster"),
        dir.to_owned(),
        journals.to_owned(),
    );
    let cleanup = move || {
        kill_matching(&journals.to_string_lossy());
        if owned {
            let _ = std::process::Command::new(&script)
                .arg("down")
                .arg(&dir)
                .status();
        }
    };
    let on_signal = cleanup.clone();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        cleanup();
    }));
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("jepsen: interrupted: stopping the contenders and the control plane");
            on_signal();
            std::process::exit(130);
        }
    });
}

// ------------------------------------------------------------------ the judge

/// One worker, as the kernel saw it.
#[derive(Debug, Clone)]
struct Worker {
    slot: usize,
    pid: u32,
    exec: u64,
    /// Its exit, or the end of the run if it still ran then.
    exit: u64,
    /// Whether it exited by itself (its own `stop` line in the journal).
    by_itself: bool,
    /// `LEASE_EXEC_TRANSITIONS` as its exec was given it (lease-exec's workers; `None` if the
    /// kernel's exec event could not be read in time).
    token: Option<u64>,
}

fn token_of(span: &kernel::Span) -> Option<u64> {
    span.env("LEASE_EXEC_TRANSITIONS")?.parse().ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC (ns), the tightest of a few samples: Lease times are
/// realtime, kernel stamps monotonic, and every process here runs on this one machine.
fn clock_offset_ns() -> i128 {
    let mut best: Option<(u64, i128)> = None;
    for _ in 0..5 {
        let before = mono_ns();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let after = mono_ns();
        let offset = wall - (before as i128 + (after - before) as i128 / 2);
        if best.is_none_or(|(w, _)| after - before < w) {
            best = Some((after - before, offset));
        }
    }
    best.unwrap().1
}

fn round(v: f64, digits: i32) -> Value {
    if v.is_finite() {
        let f = 10f64.powi(digits);
        json!((v * f).round() / f)
    } else {
        Value::Null
    }
}

/// What the judge reads of the kernel's stamps: [`Kernel`] in a run, hand-made in the tests.
trait Stamps {
    /// Every span of the worker binary, by exec time.
    fn spans(&self) -> Vec<kernel::Span>;
    /// The span of `pid` running at `at_ns`, read or not (see [`Kernel::span_at`]).
    fn span_at(&self, pid: u32, at_ns: u64) -> Option<kernel::Span>;
    /// Events the kernel dropped.
    fn lost(&self) -> u64;
}

impl Stamps for Kernel {
    fn spans(&self) -> Vec<kernel::Span> {
        Kernel::spans(self)
    }
    fn span_at(&self, pid: u32, at_ns: u64) -> Option<kernel::Span> {
        Kernel::span_at(self, pid, at_ns)
    }
    fn lost(&self) -> u64 {
        Kernel::lost(self)
    }
}

/// Everything the judge reads, gathered once the run has stopped; the judge is a function of it
/// and of the kernel's stamps alone, so that its tests give it hand-made runs.
struct Record {
    kinds: Vec<Kind>,
    /// Each slot's journal as its workers wrote it.
    journals: Vec<String>,
    /// The Lease's history ([`history::History::snapshot`]).
    versions: Vec<(u64, history::Version)>,
    links: history::Links,
    /// Faults the seed's schedule planned, and (CLOCK_MONOTONIC ns, fault, what it hit) of every
    /// fault applied.
    planned: usize,
    applied: Vec<(u64, Fault, String)>,
    /// What went wrong with the run itself: a task that panicked, a fault not applied or not
    /// healed.
    broken: Vec<String>,
    /// (slot, exit code or 128+signal) of every contender that ended.
    exits: Vec<(usize, i32)>,
    /// CLOCK_MONOTONIC ns of the run's start and end.
    t0: u64,
    end: u64,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, ns ([`clock_offset_ns`]).
    offset: i128,
}

/// Every worker from the kernel's exec and exit stamps; the journals name the pids of workers
/// gone before their exec could be read, and say which workers exited by themselves. Also each
/// journaled start the kernel has no exec for: a worker the judge cannot see is one whose overlap
/// it cannot find.
fn workers(record: &Record, kernel: &impl Stamps) -> (Vec<Worker>, Vec<String>) {
    let (kinds, end) = (&record.kinds, record.end);
    let mut workers = Vec::new();
    let mut unstamped = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (slot, text) in record.journals.iter().enumerate() {
        let mut starts = Vec::new();
        let mut stops = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match (f.first().copied(), num(1), num(2)) {
                (Some("start"), Some(pid), Some(mono)) => starts.push((pid as u32, mono)),
                (Some("stop"), Some(pid), Some(mono)) => stops.push((pid as u32, mono)),
                _ => {}
            }
        }
        for (pid, at) in starts {
            let Some(span) = kernel.span_at(pid, at) else {
                unstamped.push(format!(
                    "worker {pid} of {} journaled its start, but the kernel has no exec for it",
                    slot_name(slot)
                ));
                continue;
            };
            seen.insert((span.pid, span.exec_ns));
            workers.push(Worker {
                slot,
                pid,
                exec: span.exec_ns,
                exit: span.exit_ns.unwrap_or(end),
                by_itself: stops.iter().any(|&(p, t)| p == pid && t > at),
                token: token_of(&span),
            });
        }
    }
    // Workers killed before they wrote their start line ran all the same.
    for span in kernel.spans() {
        if seen.contains(&(span.pid, span.exec_ns)) {
            continue;
        }
        let Some(slot) = span
            .env("JEPSEN_SLOT")
            .and_then(|s| (0..kinds.len()).find(|&i| slot_name(i) == s))
        else {
            continue;
        };
        workers.push(Worker {
            slot,
            pid: span.pid,
            exec: span.exec_ns,
            exit: span.exit_ns.unwrap_or(end),
            by_itself: false,
            token: token_of(&span),
        });
    }
    workers.sort_by_key(|w| w.exec);
    (workers, unstamped)
}

/// The verdict on a run, as the JSON object the run prints last.
fn judge(record: &Record, kernel: &impl Stamps, options: &Options) -> Value {
    let (kinds, t0, end) = (&record.kinds, record.t0, record.end);
    let (versions, links) = (&record.versions, &record.links);
    let (workers, unstamped) = workers(record, kernel);
    let realtime_us = |mono: u64| ((mono as i128 + record.offset) / 1000) as i64;
    let secs = |ns: u64| ns.saturating_sub(t0) as f64 / 1e9;
    let who = |w: &Worker| identity(kinds, w.slot);

    let mut overlaps = Vec::new();
    for (i, a) in workers.iter().enumerate() {
        for b in &workers[i + 1..] {
            if b.exec < a.exit {
                let ms = (a.exit.min(b.exit) - b.exec) as f64 / 1e6;
                let (ka, kb) = (kinds[a.slot].name(), kinds[b.slot].name());
                // Who broke the rules, from the Lease's history: the one that ran on past its
                // term, or the one that claimed before that term had ended. Unknown blames both.
                let (blamed, why) =
                    match history::blame(versions, links, &who(b), realtime_us(b.exec)) {
                        history::Blame::RanPastItsTerm => {
                            (vec![ka], format!("{} ran past its term", who(a)))
                        }
                        history::Blame::ClaimedEarly { early_ms } => (
                            vec![kb],
                            format!("{} claimed {early_ms:.1} ms before the term ended", who(b)),
                        ),
                        history::Blame::Unknown => (
                            vec![ka, kb],
                            format!("no claim by {} in the Lease's history", who(b)),
                        ),
                    };
                eprintln!(
                    "jepsen: OVERLAP {} (pid {}) still ran when {} (pid {}) started at {:.3}s, for {ms:.1} ms: {why}",
                    who(a),
                    a.pid,
                    who(b),
                    b.pid,
                    secs(b.exec)
                );
                overlaps.push(json!({
                    "who": [who(a), who(b)],
                    "kinds": [ka, kb],
                    "at_s": round(secs(b.exec), 3),
                    "ms": round(ms, 1),
                    "blamed": blamed,
                    "why": why,
                }));
            }
        }
    }

    // Availability: the union of the spans from the first exec to the end of the run.
    let first = workers.first().map_or(end, |w| w.exec);
    let mut covered = 0u64;
    let mut reach = first;
    for w in &workers {
        let (from, to) = (w.exec.max(reach), w.exit.min(end));
        if to > from {
            covered += to - from;
        }
        reach = reach.max(w.exit.min(end));
    }
    let availability = if end > first {
        covered as f64 / (end - first) as f64
    } else {
        0.0
    };

    // Handoffs: consecutive workers that did not overlap; the cause is how the first ended.
    let applied = &record.applied;
    let window = ((options.timings[0] + options.timings[1]) * 1e9) as u64 + 2_000_000_000;
    let mut by_cause: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut handoffs = 0;
    for pair in workers.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.exec < a.exit || a.exit >= end {
            continue;
        }
        handoffs += 1;
        let cause = if a.by_itself {
            "worker-exit".to_string()
        } else {
            applied
                .iter()
                .rev()
                .find(|(at, _, _)| *at <= a.exit && a.exit - *at <= window)
                .map_or("other".to_string(), |(_, f, _)| f.name().to_string())
        };
        by_cause
            .entry(cause)
            .or_default()
            .push((b.exec - a.exit) as f64 / 1e6);
    }
    let mut all: Vec<f64> = by_cause.values().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let mut latency = serde_json::Map::new();
    latency.insert(
        "all".into(),
        json!({"n": all.len(), "p50_ms": round(percentile(&all, 50.0), 1), "p99_ms": round(percentile(&all, 99.0), 1)}),
    );
    for (cause, mut v) in by_cause {
        v.sort_by(f64::total_cmp);
        latency.insert(
            cause,
            json!({"n": v.len(), "p50_ms": round(percentile(&v, 50.0), 1), "p99_ms": round(percentile(&v, 99.0), 1)}),
        );
    }

    // The fencing token: each lease-exec worker's LEASE_EXEC_TRANSITIONS above every earlier
    // one's (nothing here deletes the Lease; client-go's takeovers raise leaseTransitions too).
    let mut highest: Option<(u64, String)> = None;
    let (mut checked, mut unread) = (0, 0);
    let mut not_rising = Vec::new();
    for w in workers.iter().filter(|w| kinds[w.slot] == Kind::LeaseExec) {
        let Some(token) = w.token else {
            unread += 1;
            continue;
        };
        checked += 1;
        if let Some((top, by)) = &highest
            && token <= *top
        {
            eprintln!(
                "jepsen: TOKEN {} (pid {}) got {token} at {:.3}s, not above {top} of {by}",
                who(w),
                w.pid,
                secs(w.exec)
            );
            not_rising.push(json!({"who": who(w), "at_s": round(secs(w.exec), 3), "token": token, "after": top}));
        }
        if highest.as_ref().is_none_or(|(top, _)| token > *top) {
            highest = Some((token, who(w)));
        }
    }
    // What would make the verdict blind, or the run not the one its minutes promise: a task that
    // panicked, a fault not applied or not healed, a worker the kernel did not stamp, fewer
    // faults or handoffs than any run of this length has.
    let mut invalid = record.broken.clone();
    invalid.extend(unstamped);
    let seconds = end.saturating_sub(t0) as f64 / 1e9;
    if applied.len() < min_faults(seconds) {
        invalid.push(format!(
            "{} faults applied in {seconds:.0} s, fewer than any schedule of that length plans ({})",
            applied.len(),
            min_faults(seconds)
        ));
    }
    if handoffs < min_handoffs(seconds, options.timings[0]) {
        invalid.push(format!(
            "{handoffs} handoffs in {seconds:.0} s, fewer than a run of that length has ({})",
            min_handoffs(seconds, options.timings[0])
        ));
    }
    if kernel.lost() > 0 {
        invalid.push(format!(
            "the kernel dropped {} events: some workers may be missing",
            kernel.lost()
        ));
    }
    if kinds.contains(&Kind::LeaseExec) && checked + unread == 0 {
        invalid.push("no lease-exec worker ran".to_string());
    }
    for reason in &invalid {
        eprintln!("jepsen: INVALID {reason}");
    }

    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, f, _) in applied {
        *faults.entry(f.name()).or_default() += 1;
    }
    let mut contenders: BTreeMap<&str, usize> = BTreeMap::new();
    for k in kinds {
        *contenders.entry(k.name()).or_default() += 1;
    }
    let mut exits: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for (slot, code) in &record.exits {
        *exits
            .entry(kinds[*slot].name())
            .or_default()
            .entry(code.to_string())
            .or_default() += 1;
    }
    eprintln!(
        "jepsen: {} workers, {handoffs} handoffs, {} overlaps, availability {:.4}, faults {faults:?}",
        workers.len(),
        overlaps.len(),
        availability
    );
    json!({
        "seed": options.seed,
        "minutes": options.minutes,
        "pool": options.pool.name(),
        "timings_s": options.timings,
        "contenders": contenders,
        "faults": faults,
        "faults_planned": record.planned,
        "workers": workers.len(),
        "handoffs": handoffs,
        "overlaps": overlaps,
        "availability": round(availability, 4),
        "handoff_ms": latency,
        "exits": exits,
        "kernel_events_lost": kernel.lost(),
        "tokens": {"checked": checked, "unread": unread, "not_rising": not_rising},
        "invalid": invalid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    const S: u64 = 1_000_000_000;
    /// The run's start on the hand-made monotonic clock.
    const T0: u64 = 1_000 * S;

    /// The kernel's stamps, hand-made.
    struct Fake {
        spans: Vec<kernel::Span>,
        lost: u64,
    }

    impl Stamps for Fake {
        fn spans(&self) -> Vec<kernel::Span> {
            let mut spans = self.spans.clone();
            spans.sort_by_key(|s| s.exec_ns);
            spans
        }
        fn span_at(&self, pid: u32, at_ns: u64) -> Option<kernel::Span> {
            self.spans
                .iter()
                .rev()
                .find(|s| s.pid == pid && s.contains(at_ns))
                .cloned()
        }
        fn lost(&self) -> u64 {
            self.lost
        }
    }

    fn options() -> Options {
        Options {
            minutes: 2.0,
            seed: 1,
            pool: Pool::Mixed,
            contenders: 2,
            timings: [6.0, 4.0, 1.0],
            cluster: None,
            keep: false,
            faults: Fault::ALL.to_vec(),
        }
    }

    fn at(seconds: f64) -> u64 {
        T0 + (seconds * 1e9) as u64
    }

    /// CLOCK_REALTIME µs of a monotonic instant (the record's offset is 0).
    fn us(mono: u64) -> i64 {
        (mono / 1000) as i64
    }

    fn version(holder: &str, at_s: f64) -> history::Version {
        history::Version {
            holder: holder.into(),
            acquire_us: Some(us(at(at_s))),
            renew_us: Some(us(at(at_s))),
            duration_s: 6,
            deleted: false,
        }
    }

    /// A term in a hand-made run: the slot's claim half a second before its worker's exec, the
    /// worker's kernel span, and a release when it exits (by itself).
    struct Term {
        slot: usize,
        pid: u32,
        exec_s: f64,
        exit_s: f64,
    }

    /// Adds a term: the claim to the history, the span to the kernel, the worker's lines to its
    /// slot's journal, and a release after its exit.
    fn add(record: &mut Record, kernel: &mut Fake, term: &Term) {
        let (exec, exit) = (at(term.exec_s), at(term.exit_s));
        let token = record.versions.len() as u64;
        let rv = record.versions.last().map_or(1, |(rv, _)| rv + 1);
        let who = identity(&record.kinds, term.slot);
        record.versions.push((rv, version(&who, term.exec_s - 0.5)));
        record
            .versions
            .push((rv + 1, version("", term.exit_s + 0.01)));
        let mut env = HashMap::from([("JEPSEN_SLOT".to_string(), slot_name(term.slot))]);
        if record.kinds[term.slot] == Kind::LeaseExec {
            env.insert("LEASE_EXEC_TRANSITIONS".into(), token.to_string());
        }
        kernel.spans.push(kernel::Span {
            pid: term.pid,
            exec_ns: exec,
            exit_ns: Some(exit),
            args: Vec::new(),
            env,
            read: true,
        });
        let journal = &mut record.journals[term.slot];
        journal.push_str(&format!("start {} {} {}\n", term.pid, exec + 1_000_000, 0));
        journal.push_str(&format!("stop {} {}\n", term.pid, exit - 1_000_000));
        record.exits.push((term.slot, 0));
    }

    fn linked(record: &mut Record) {
        record.links = record
            .versions
            .windows(2)
            .map(|w| (w[0].0, w[1].0))
            .collect::<BTreeSet<_>>();
    }

    /// A healthy two-minute run: lease-exec in slot 0 and client-go in slot 1 take turns, each
    /// worker exiting by itself and its contender releasing; a fault every 17 s.
    fn healthy() -> (Record, Fake) {
        let mut record = Record {
            kinds: vec![Kind::LeaseExec, Kind::ClientGo],
            journals: vec![String::new(); 2],
            versions: vec![(1, version("", 0.0))],
            links: BTreeSet::new(),
            planned: 6,
            applied: (0..6)
                .map(|i| {
                    (
                        at(10.0 + 17.0 * i as f64),
                        Fault::Latency,
                        "le-slot-00".into(),
                    )
                })
                .collect(),
            broken: Vec::new(),
            exits: Vec::new(),
            t0: T0,
            end: at(120.0),
            offset: 0,
        };
        let mut kernel = Fake {
            spans: Vec::new(),
            lost: 0,
        };
        for (i, (exec_s, exit_s)) in [(2.0, 30.0), (31.0, 60.0), (61.0, 90.0), (91.0, 118.0)]
            .into_iter()
            .enumerate()
        {
            let term = Term {
                slot: i % 2,
                pid: 100 + i as u32,
                exec_s,
                exit_s,
            };
            add(&mut record, &mut kernel, &term);
        }
        linked(&mut record);
        (record, kernel)
    }

    fn invalid(verdict: &Value) -> Vec<String> {
        verdict["invalid"]
            .as_array()
            .expect("an invalid list")
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_healthy_run_is_valid_and_passes() {
        let (record, kernel) = healthy();
        let verdict = judge(&record, &kernel, &options());
        assert_eq!(invalid(&verdict), Vec::<String>::new(), "{verdict}");
        assert_eq!(verdict["workers"], 4, "{verdict}");
        assert_eq!(verdict["handoffs"], 3, "{verdict}");
        assert_eq!(verdict["overlaps"], json!([]), "{verdict}");
        assert_eq!(verdict["tokens"]["checked"], 2, "{verdict}");
        assert_eq!(verdict["faults"]["latency"], 6, "{verdict}");
        assert!(!failed(&verdict), "{verdict}");
    }

    #[test]
    fn a_forced_overlap_is_flagged_and_blamed_on_the_claim_inside_the_term() {
        let (mut record, mut kernel) = healthy();
        // A second lease-exec contender (slot 2) claims at 45 s although client-go renewed at
        // 44.5 s (its term runs to 50.5 s), and its worker runs from 45.5 s to 47 s, beside
        // client-go's (31 s to 60 s).
        record.kinds.push(Kind::LeaseExec);
        record.journals.push(String::new());
        let claimed = record
            .versions
            .iter()
            .position(|(_, v)| v.holder == "cg-slot-01")
            .unwrap();
        let mut renewed = record.versions[claimed].1.clone();
        renewed.renew_us = Some(us(at(44.5)));
        record.versions.insert(claimed + 1, (0, renewed));
        record
            .versions
            .insert(claimed + 2, (0, version("le-slot-02", 45.0)));
        for (i, (rv, _)) in record.versions.iter_mut().enumerate() {
            *rv = i as u64 + 1;
        }
        linked(&mut record);
        kernel.spans.push(kernel::Span {
            pid: 900,
            exec_ns: at(45.5),
            exit_ns: Some(at(47.0)),
            args: Vec::new(),
            env: HashMap::from([
                ("JEPSEN_SLOT".to_string(), slot_name(2)),
                ("LEASE_EXEC_TRANSITIONS".to_string(), "2".to_string()),
            ]),
            read: true,
        });
        record.journals[2] = format!("start 900 {} 0\n", at(45.5) + 1_000_000);
        let mut opts = options();
        opts.contenders = 3;
        let verdict = judge(&record, &kernel, &opts);
        let overlaps = verdict["overlaps"].as_array().expect("overlaps");
        assert_eq!(overlaps.len(), 1, "{verdict}");
        assert_eq!(overlaps[0]["who"], json!(["cg-slot-01", "le-slot-02"]));
        assert_eq!(overlaps[0]["ms"], json!(1500.0), "{verdict}");
        assert_eq!(overlaps[0]["blamed"], json!(["lease-exec"]), "{verdict}");
        assert!(failed(&verdict), "{verdict}");
    }

    #[test]
    fn an_overlap_blamed_on_client_go_is_reported_not_failed_on() {
        let (mut record, mut kernel) = healthy();
        // Client-go's worker of the second term runs on 2 s past lease-exec's claim at 60.5 s,
        // which came after client-go's last renewal (30.5 s) + 6 s.
        let span = kernel.spans.iter_mut().find(|s| s.pid == 101).unwrap();
        span.exit_ns = Some(at(63.0));
        let release = record
            .versions
            .iter()
            .position(|(_, v)| v.holder.is_empty() && v.renew_us == Some(us(at(60.01))))
            .unwrap();
        record.versions.remove(release);
        linked(&mut record);
        let verdict = judge(&record, &kernel, &options());
        let overlaps = verdict["overlaps"].as_array().expect("overlaps");
        assert_eq!(overlaps.len(), 1, "{verdict}");
        assert_eq!(overlaps[0]["blamed"], json!(["client-go"]), "{verdict}");
        assert!(!failed(&verdict), "{verdict}");
    }

    #[test]
    fn a_journaled_worker_the_kernel_never_saw_exec_makes_the_verdict_invalid() {
        let (mut record, kernel) = healthy();
        record.journals[0].push_str(&format!("start 555 {} 0\n", at(100.0)));
        let verdict = judge(&record, &kernel, &options());
        let invalid = invalid(&verdict);
        assert!(
            invalid.iter().any(|r| r.contains("555")),
            "{invalid:?}: {verdict}"
        );
        assert!(failed(&verdict), "{verdict}");
    }

    #[test]
    fn a_broken_run_makes_the_verdict_invalid() {
        for broken in [
            "the nemesis task ended: task 7 panicked",
            "slot-01's task ended: task 9 panicked",
            "kill-apiserver planned at 30.0s was not applied: no such process",
            "a fault was not healed: start-apiserver failed",
        ] {
            let (mut record, kernel) = healthy();
            record.broken.push(broken.to_string());
            let verdict = judge(&record, &kernel, &options());
            assert!(
                invalid(&verdict).iter().any(|r| r == broken),
                "{broken}: {verdict}"
            );
            assert!(failed(&verdict), "{broken}: {verdict}");
        }
    }

    #[test]
    fn fewer_faults_than_the_minutes_imply_make_the_verdict_invalid() {
        let (mut record, kernel) = healthy();
        record.applied.truncate(min_faults(120.0));
        let verdict = judge(&record, &kernel, &options());
        assert_eq!(invalid(&verdict), Vec::<String>::new(), "{verdict}");
        record.applied.pop();
        let verdict = judge(&record, &kernel, &options());
        assert!(
            invalid(&verdict).iter().any(|r| r.contains("faults")),
            "{verdict}"
        );
        assert!(failed(&verdict), "{verdict}");
    }

    #[test]
    fn fewer_handoffs_than_the_minutes_imply_make_the_verdict_invalid() {
        // One worker for the whole run: no handoff in two minutes.
        let (mut record, mut kernel) = healthy();
        kernel.spans.retain(|s| s.pid == 100);
        kernel.spans[0].exit_ns = None;
        record.journals = vec![
            format!("start 100 {} 0\n", at(2.0) + 1_000_000),
            String::new(),
        ];
        let verdict = judge(&record, &kernel, &options());
        assert_eq!(verdict["handoffs"], 0, "{verdict}");
        assert!(
            invalid(&verdict).iter().any(|r| r.contains("handoffs")),
            "{verdict}"
        );
        assert!(failed(&verdict), "{verdict}");
    }

    #[test]
    fn the_fault_floor_is_below_every_schedule() {
        for minutes in [0.5, 1.0, 2.0, 5.0] {
            let seconds = minutes * 60.0;
            for seed in 0..2000 {
                let plan = schedule(seed, seconds, 5, &Fault::ALL);
                assert!(
                    plan.len() >= min_faults(seconds),
                    "seed {seed}, {minutes} min: {} planned, floor {}",
                    plan.len(),
                    min_faults(seconds)
                );
            }
        }
    }

    #[tokio::test]
    async fn a_task_that_panicked_is_reported() {
        let nemesis = tokio::spawn(async {});
        let slots = vec![
            tokio::spawn(async {}),
            tokio::spawn(async { panic!("a slot's task panics") }),
        ];
        let ended = ended(nemesis, slots).await;
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert!(
            ended[0].starts_with("slot-01's task ended") && ended[0].contains("panicked"),
            "{ended:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fault_whose_target_is_missing_is_tried_again_then_counts_as_not_applied() {
        let (_tx, stop) = watch::channel(false);
        let started = tokio::time::Instant::now();
        let mut tries = 0;
        // The target shows up after a second: applied.
        let applied = retried(APPLY_WITHIN, &stop, || {
            tries += 1;
            let now = started.elapsed();
            async move {
                if now < Duration::from_secs(1) {
                    Err(NotApplied::NotYet("between runs".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(applied.is_ok(), "{applied:?}");
        assert_eq!(tries, 6, "tried every 200 ms");
        // It never does: given up after APPLY_WITHIN, and not applied.
        let started = tokio::time::Instant::now();
        let never = retried(APPLY_WITHIN, &stop, || async {
            Err::<(), _>(NotApplied::NotYet("no leader".into()))
        })
        .await;
        assert!(matches!(never, Err(NotApplied::NotYet(_))), "{never:?}");
        assert!(started.elapsed() >= APPLY_WITHIN, "{:?}", started.elapsed());
        // A command that failed is not tried again.
        let mut tries = 0;
        let failed = retried(APPLY_WITHIN, &stop, || {
            tries += 1;
            async { Err::<(), _>(NotApplied::Failed("toxiproxy refused".into())) }
        })
        .await;
        assert!(matches!(failed, Err(NotApplied::Failed(_))), "{failed:?}");
        assert_eq!(tries, 1);
    }

    #[test]
    fn lost_kernel_events_and_tokens_that_do_not_rise_fail_the_run() {
        let (record, mut kernel) = healthy();
        kernel.lost = 3;
        assert!(failed(&judge(&record, &kernel, &options())));
        let (record, mut kernel) = healthy();
        let second = kernel.spans.iter_mut().find(|s| s.pid == 102).unwrap();
        second
            .env
            .insert("LEASE_EXEC_TRANSITIONS".into(), "0".into());
        assert!(failed(&judge(&record, &kernel, &options())));
    }
}
