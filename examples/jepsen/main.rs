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
//! the verdict is blind (the kernel dropped events, or no lease-exec worker ran). Needs root (the
//! proc connector).

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
    stopping: AtomicBool,
}

fn slot_name(slot: usize) -> String {
    format!("slot-{slot:02}")
}

impl Run {
    fn identity(&self, slot: usize) -> String {
        format!("{}-{}", self.kinds[slot].short(), slot_name(slot))
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

/// What undoes a fault that holds.
enum Heal {
    Proxy(String),
    Apiserver(usize),
    Etcd(usize),
}

async fn apply(run: &Run, p: &Planned) -> Result<Option<Heal>, String> {
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
                return Err(format!("no leader to partition (holder {holder:?})"));
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
            let leader = run.ha.etcd_leader().await?;
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
                return Err(format!("no leader to slow down (holder {holder:?})"));
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
            let pid = run
                .signal(p.target, signal)
                .ok_or_else(|| format!("{} is between runs", run.identity(p.target)))?;
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
    }
}

async fn nemesis(run: Arc<Run>, plan: Vec<Planned>, mut stop: watch::Receiver<bool>) {
    for p in plan {
        let at = run.t0 + Duration::from_secs_f64(p.at);
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = stop.changed() => return,
        }
        match apply(&run, &p).await {
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
            Err(e) => eprintln!(
                "{:7.1}s {} not applied: {e}",
                run.t0.elapsed().as_secs_f64(),
                p.fault.name()
            ),
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
        stopping: AtomicBool::new(false),
    });
    let t0_mono = mono_ns();
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots: Vec<_> = (0..options.contenders)
        .map(|s| tokio::spawn(slot_loop(run.clone(), s, stop_rx.clone())))
        .collect();
    let nemesis = tokio::spawn(nemesis(run.clone(), plan, stop_rx.clone()));

    tokio::time::sleep_until((run.t0 + Duration::from_secs_f64(seconds)).into()).await;
    let end_mono = mono_ns();
    run.stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let _ = nemesis.await;
    for slot in slots {
        let _ = slot.await;
    }
    kill_matching(&journals.to_string_lossy());

    let verdict = judge(&run, &kernel, &history, t0_mono, end_mono, &options);
    drop(history);
    let lease_exec_overlaps = verdict["overlaps"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter(|o| {
                    o["blamed"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == Kind::LeaseExec.name()))
                })
                .count()
        })
        .unwrap_or(0);
    run.ha.down().await;
    if options.keep {
        eprintln!("jepsen: journals and logs kept in {}", run_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    println!("{verdict}");
    let broken = |key: &str| verdict[key].as_array().is_some_and(|a| !a.is_empty());
    i32::from(
        lease_exec_overlaps > 0
            || broken("invalid")
            || !verdict["tokens"]["not_rising"]
                .as_array()
                .is_none_or(|a| a.is_empty()),
    )
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

/// Every worker from the kernel's exec and exit stamps; the journals name the pids of workers
/// gone before their exec could be read, and say which workers exited by themselves.
fn workers(run: &Run, kernel: &Kernel, end: u64) -> Vec<Worker> {
    let mut workers = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for slot in 0..run.kinds.len() {
        let text = std::fs::read_to_string(run.journal(slot)).unwrap_or_default();
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
                eprintln!(
                    "jepsen: no kernel exec for worker {pid} of {}",
                    slot_name(slot)
                );
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
            .and_then(|s| (0..run.kinds.len()).find(|&i| slot_name(i) == s))
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
    workers
}

fn judge(
    run: &Run,
    kernel: &Kernel,
    history: &history::History,
    t0: u64,
    end: u64,
    options: &Options,
) -> Value {
    let workers = workers(run, kernel, end);
    let (versions, links) = history.snapshot();
    let offset = clock_offset_ns();
    let realtime_us = |mono: u64| ((mono as i128 + offset) / 1000) as i64;
    let secs = |ns: u64| ns.saturating_sub(t0) as f64 / 1e9;
    let who = |w: &Worker| run.identity(w.slot);

    let mut overlaps = Vec::new();
    for (i, a) in workers.iter().enumerate() {
        for b in &workers[i + 1..] {
            if b.exec < a.exit {
                let ms = (a.exit.min(b.exit) - b.exec) as f64 / 1e6;
                let (ka, kb) = (run.kinds[a.slot].name(), run.kinds[b.slot].name());
                // Who broke the rules, from the Lease's history: the one that ran on past its
                // term, or the one that claimed before that term had ended. Unknown blames both.
                let (blamed, why) =
                    match history::blame(&versions, &links, &who(b), realtime_us(b.exec)) {
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
    let applied = run.applied.lock().unwrap().clone();
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
    for w in workers
        .iter()
        .filter(|w| run.kinds[w.slot] == Kind::LeaseExec)
    {
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
    // What would make the verdict blind.
    let mut invalid = Vec::new();
    if kernel.lost() > 0 {
        invalid.push(format!(
            "the kernel dropped {} events: some workers may be missing",
            kernel.lost()
        ));
    }
    if run.kinds.contains(&Kind::LeaseExec) && checked + unread == 0 {
        invalid.push("no lease-exec worker ran".to_string());
    }
    for reason in &invalid {
        eprintln!("jepsen: INVALID {reason}");
    }

    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, f, _) in &applied {
        *faults.entry(f.name()).or_default() += 1;
    }
    let mut contenders: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &run.kinds {
        *contenders.entry(k.name()).or_default() += 1;
    }
    let mut exits: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for (slot, code) in run.exits.lock().unwrap().iter() {
        *exits
            .entry(run.kinds[*slot].name())
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
