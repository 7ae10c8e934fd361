//! lease-exec side by side with client-go's `leaderelection` against a real kube-apiserver
//! (`testenv/`: embedded etcd and kube-apiserver v1.37.2 on loopback), default timings (lease
//! 15 s, renew deadline 10 s, retry 2 s). Run by hand; about 16 minutes of measuring:
//!
//!     cargo run --release --example bench_real
//!     cargo run --release --example bench_real -- [handoff] [crash] [load] [--handoffs 60]
//!         [--samples 5] [--window 120] [--only lease-exec|client-go] [--ha] [--audit] [--keep]
//!
//! `--ha` runs it all on `testenv/cluster up DIR --ha`: three etcd members with fsync on and two
//! API servers (every contender on the first), the figures for a real etcd; without it, one
//! member without fsync. `--audit` has the API server log every Lease request (metadata only,
//! written off the request path): each graceful handoff is then also split by the API server's
//! own stamps, so the time in lease-exec, on the wire and in the API server and etcd are told
//! apart.
//!
//! The client-go side is `testenv/bin/contender` (client-go `LeaseLock`, `ReleaseOnCancel`), built
//! by `testenv/cluster up` along with the control plane (needs Go the first time). Every contender
//! runs the worker `examples/stamp_worker.rs`, which journals its start on CLOCK_MONOTONIC (and
//! CLOCK_REALTIME) first thing. A worker's stop is its exit as stamped by the kernel (the proc
//! connector's exit event, CLOCK_MONOTONIC); without CAP_NET_ADMIN the worker's own last stamp just
//! before `exit` is used instead, and the output says so.
//!
//! - **handoff**: 3, then 10 contenders per tool; each worker runs 50 ms to 1.05 s and exits, its
//!   contender releases the Lease and exits, and is started again (as a kubelet would) once the
//!   next worker runs. Handoff = next worker's start − previous worker's exit.
//! - **crash**: 3 contenders per tool (both tools at once, on two Leases); the leader's process
//!   (lease-exec, or the contender) is SIGKILLed at a random point of its renew cycle. lease-exec's
//!   worker dies by its parent-death signal; client-go's would run on, so the bench SIGKILLs its
//!   process group right after. Failover = next worker's start − the dead leader's last renewal as
//!   stored by the API server (the Lease's `renewTime`, read after the kill; same machine clock).
//! - **load**: the API server's `apiserver_request_total{resource="leases"}` by verb over windows
//!   of `--window` seconds: no contender (baseline), then per tool one leader alone and one idle
//!   follower alone (waiting on a Lease held for an hour by an identity that never renews, so no
//!   leader's requests are counted with it). The API server's own identity Lease (kube-system,
//!   renewed every ~10 s) is watched and its writes removed from each window one by one; what
//!   else the baseline window saw is subtracted as a rate. Peak RSS (VmHWM) and CPU time of the
//!   same processes are read at the end of their windows.
//!
//! Everything runs on this machine, the API server included: figures are noisy (p99 of 60 samples
//! is the second-worst), and the printed load averages say how busy the machine was.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
#[path = "../../tests/support/kernel.rs"]
mod kernel;
mod scale;
mod startup;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use cluster::{Cluster, SystemWrites};
use kernel::Kernel;

const NS: &str = "default";

pub fn mono_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn real_minus_mono() -> i128 {
    let real = clock_gettime(ClockId::CLOCK_REALTIME).unwrap();
    let real = real.tv_sec() as i128 * 1_000_000_000 + real.tv_nsec() as i128;
    real - mono_ns() as i128
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    LeaseExec,
    ClientGo,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::LeaseExec => "lease-exec",
            Tool::ClientGo => "client-go",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Tool::LeaseExec => "le",
            Tool::ClientGo => "cg",
        }
    }
}

struct Options {
    /// Parts to run: handoff, crash, load (all when none is named).
    what: Vec<String>,
    handoffs: usize,
    samples: usize,
    window: Duration,
    keep: bool,
    /// On the highly available control plane (three etcd members, fsync on).
    ha: bool,
    /// The API server writes an audit log of Lease requests: each handoff is also split by the
    /// API server's own stamps.
    audit: bool,
    tools: Vec<Tool>,
    /// `scale`: the numbers of elections, and each point's window.
    points: Vec<usize>,
    scale_window: Duration,
}

fn options() -> Options {
    let mut o = Options {
        what: Vec::new(),
        handoffs: 60,
        samples: 5,
        window: Duration::from_secs(120),
        keep: false,
        ha: false,
        audit: false,
        tools: vec![Tool::LeaseExec, Tool::ClientGo],
        points: vec![1, 10, 50, 150],
        scale_window: Duration::from_secs(180),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "all" => o.what.clear(),
            "handoff" | "crash" | "load" | "startup" | "scale" => o.what.push(arg),
            "--points" => {
                o.points = args
                    .next()
                    .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
                    .filter(|p: &Vec<usize>| !p.is_empty())
                    .expect("--points needs numbers, e.g. 1,10,50,150")
            }
            "--scale-window" => o.scale_window = Duration::from_secs(number("--scale-window")),
            "--handoffs" => o.handoffs = number("--handoffs") as usize,
            "--samples" => o.samples = number("--samples") as usize,
            "--window" => o.window = Duration::from_secs(number("--window")),
            "--keep" => o.keep = true,
            "--ha" => o.ha = true,
            "--audit" => o.audit = true,
            "--only" => match args.next().as_deref() {
                Some("lease-exec") => o.tools = vec![Tool::LeaseExec],
                Some("client-go") => o.tools = vec![Tool::ClientGo],
                _ => panic!("--only needs lease-exec or client-go"),
            },
            _ => {
                eprintln!(
                    "usage: bench_real [all | handoff crash load startup scale] [--handoffs N] [--samples N] [--window SECONDS] [--only lease-exec|client-go] [--points 1,10,50,150] [--scale-window SECONDS] [--ha] [--audit] [--keep]"
                );
                std::process::exit(2);
            }
        }
    }
    o
}

impl Options {
    /// `scale` (about 40 minutes) runs only when named.
    fn runs(&self, part: &str) -> bool {
        (self.what.is_empty() && part != "scale") || self.what.iter().any(|w| w == part)
    }
}

fn main() {
    let options = options();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(options));
}

// ------------------------------------------------------------------ processes and journals

#[derive(Clone, Copy, Debug)]
struct Start {
    pid: u32,
    mono: u64,
    real: u64,
}

struct Journal(PathBuf);

impl Journal {
    /// Starts in time order, and stops as (pid, CLOCK_MONOTONIC ns).
    fn read(&self) -> (Vec<Start>, Vec<(u32, u64)>) {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let (mut starts, mut stops) = (Vec::new(), Vec::new());
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match (f.first().copied(), num(1), num(2)) {
                (Some("start"), Some(pid), Some(mono)) => starts.push(Start {
                    pid: pid as u32,
                    mono,
                    real: num(3).unwrap_or(0),
                }),
                (Some("stop"), Some(pid), Some(mono)) => stops.push((pid as u32, mono)),
                _ => {}
            }
        }
        starts.sort_by_key(|s| s.mono);
        (starts, stops)
    }

    fn starts(&self) -> Vec<Start> {
        self.read().0
    }

    /// Waits until the journal holds more than `seen` starts.
    async fn more_than(&self, seen: usize, timeout: Duration) -> Vec<Start> {
        let deadline = Instant::now() + timeout;
        loop {
            let starts = self.starts();
            if starts.len() > seen {
                return starts;
            }
            assert!(
                Instant::now() < deadline,
                "no worker started within {timeout:?} ({})",
                self.0.display()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn parent_of(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// SIGKILLs every process whose command line contains `pattern` (contenders and workers carry
/// their journal's path), until none is left.
fn kill_matching(pattern: &str) {
    let me = std::process::id();
    for _ in 0..50 {
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

/// (VmHWM KiB, VmRSS KiB, user+sys CPU ms) of a process.
fn footprint(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some((kib("VmHWM:")?, kib("VmRSS:")?, ticks * 10))
}

// ------------------------------------------------------------------ the bench

struct Bench {
    lease_exec: PathBuf,
    contender: PathBuf,
    worker: PathBuf,
    kubeconfig: PathBuf,
    cluster_dir: PathBuf,
    journals: PathBuf,
    logs: PathBuf,
    client: kube::Client,
    kernel: Option<Kernel>,
    rng: Mutex<u64>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, ns, to put log timestamps on the monotonic clock.
    real_minus_mono: i128,
    /// The API server's audit log of Lease requests (`--audit`).
    audit_log: Option<PathBuf>,
}

impl Bench {
    fn journal(&self, lease: &str) -> Journal {
        Journal(self.journals.join(lease))
    }

    /// A number in [0, 1) (splitmix64).
    fn random(&self) -> f64 {
        let mut s = self.rng.lock().unwrap();
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    }

    /// Each handoff worker runs 50 ms to 1.05 s: releases land at random points of client-go's
    /// poll cycle (2 s plus up to 120% jitter) rather than in step with it.
    fn run_time(&self) -> f64 {
        0.05 + self.random()
    }

    fn spawn(
        &self,
        tool: Tool,
        lease: &str,
        identity: &str,
        journal: &Journal,
        seconds: f64,
    ) -> Child {
        let log = std::fs::File::create(self.logs.join(format!("{lease}.{identity}.log")))
            .expect("create a log file");
        let mut command = match tool {
            Tool::LeaseExec => {
                let mut c = Command::new(&self.lease_exec);
                c.args(["--identity", identity, lease, "--"]);
                c
            }
            Tool::ClientGo => {
                let mut c = Command::new(&self.contender);
                c.args([
                    "--lease-name",
                    lease,
                    "--identity",
                    identity,
                    "--kubeconfig",
                ])
                .arg(&self.kubeconfig)
                .arg("--");
                c
            }
        };
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("LEASE_EXEC_") {
                command.env_remove(name);
            }
        }
        command
            .arg(&self.worker)
            .arg(&journal.0)
            .arg(format!("{seconds:.3}"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn a contender")
    }

    fn stop_all(&self, journal: &Journal) {
        kill_matching(&journal.0.to_string_lossy());
    }

    /// The stop of a worker that started at `start`: the kernel's exit stamp, else its own.
    fn stop_of(&self, start: &Start, stops: &[(u32, u64)]) -> (Option<u64>, Option<u64>) {
        let own = stops
            .iter()
            .find(|(pid, at)| *pid == start.pid && *at > start.mono)
            .map(|s| s.1);
        let kernel = self
            .kernel
            .as_ref()
            .and_then(|e| e.exit_of(start.pid, start.mono));
        (kernel, own)
    }
}

async fn run(options: Options) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lease_exec = common::lease_exec_binary();
    let worker = common::example_binary("stamp_worker");
    let run_dir = tempfile::Builder::new()
        .prefix("bench-real-")
        .tempdir()
        .expect("temporary directory")
        .keep();
    let cluster_dir = run_dir.join("cluster");
    let journals = run_dir.join("journals");
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&journals).unwrap();
    std::fs::create_dir_all(&logs).unwrap();

    eprintln!("starting the control plane in {}", cluster_dir.display());
    let apiserver_flags = if options.audit {
        cluster::audit_flags(&run_dir, NS)
    } else {
        Vec::new()
    };
    let cluster = Cluster::up(&root, &cluster_dir, options.ha, &apiserver_flags);
    install_cleanup(cluster.script(), &cluster.dir, &journals);
    let client = cluster.client().await;
    let kernel = match Kernel::start(&worker) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!(
                "proc connector unavailable ({e}): worker stops are the workers' own last stamps"
            );
            None
        }
    };
    let bench = Bench {
        lease_exec,
        contender: root.join("testenv/bin/contender"),
        worker,
        kubeconfig: cluster.kubeconfig.clone(),
        cluster_dir: cluster.dir.clone(),
        journals: journals.clone(),
        logs: logs.clone(),
        client,
        kernel,
        rng: Mutex::new(mono_ns() ^ std::process::id() as u64),
        real_minus_mono: real_minus_mono(),
        audit_log: options.audit.then(|| run_dir.join("audit.log")),
    };
    // Run time: from here (binaries built, control plane up) to the report.
    let began = Instant::now();
    let load_before = loadavg();

    let mut report = Report::default();
    if options.runs("handoff") {
        for contenders in [3, 10] {
            for &tool in &options.tools {
                let h = handoff(&bench, tool, contenders, options.handoffs).await;
                eprintln!("{}", h.row());
                report.handoffs.push(h);
            }
        }
    }
    if options.runs("crash") {
        // Both tools at once, on two Leases: a failover is 15 s of waiting either way.
        let runs = options
            .tools
            .iter()
            .map(|&t| crash(&bench, t, options.samples));
        report.crashes = futures::future::join_all(runs).await;
    }
    if options.runs("load") {
        report.load = Some(load(&bench, options.window, &options.tools).await);
    }
    if options.runs("scale") {
        report.scale = scale::scale(
            &bench,
            &options.tools,
            &options.points,
            options.scale_window,
        )
        .await;
        let svg = root.join("docs/scale.svg");
        std::fs::create_dir_all(root.join("docs")).unwrap();
        match scale::plot(&report.scale, &svg) {
            Ok(()) => eprintln!("scale: drawn in {}", svg.display()),
            Err(e) => eprintln!("scale: cannot draw {}: {e}", svg.display()),
        }
    }
    if options.runs("startup") {
        let port = cluster.port();
        report.startups = startup::startup(&bench, port, 20).await;
    }

    report.lost_exits = bench.kernel.as_ref().map(|e| e.lost());
    report.kernel_stops = bench.kernel.is_some();
    report.loads = (load_before, loadavg());
    report.elapsed = began.elapsed();
    report.binary = std::fs::metadata(&bench.lease_exec).map_or(0, |m| m.len());
    report.contender_binary = std::fs::metadata(&bench.contender).map_or(0, |m| m.len());
    report.commit = git_commit(&root);
    println!("{}", report.markdown(&options));

    Cluster::down(cluster.script(), &cluster.dir);
    if options.keep {
        eprintln!("journals and logs kept in {}", run_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
}

/// On a panic (release builds abort) or Ctrl-C: kill every contender and worker, stop the
/// control plane.
fn install_cleanup(script: &Path, dir: &Path, journals: &Path) {
    let (script, dir, journals) = (script.to_owned(), dir.to_owned(), journals.to_owned());
    let cleanup = move || {
        kill_matching(&journals.to_string_lossy());
        Cluster::down(&script, &dir);
    };
    let on_signal = cleanup.clone();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        cleanup();
    }));
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping the contenders and the control plane");
            on_signal();
            std::process::exit(130);
        }
    });
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn git_commit(root: &Path) -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = out(&["rev-parse", "--short", "HEAD"]);
    let dirty = !out(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ])
    .is_empty();
    if dirty {
        format!("{commit} + uncommitted changes in src/")
    } else {
        commit
    }
}

// ------------------------------------------------------------------ graceful handoff

struct Handoff {
    tool: Tool,
    contenders: usize,
    /// Next worker's start − previous worker's stop, ms, sorted.
    ms: Vec<f64>,
    /// Kernel exit stamp − the worker's own last stamp, ms (what the self-stamp would miss).
    exit_cost_ms: Vec<f64>,
    /// Handoffs whose previous worker's stop was not found (neither stamp).
    missing: usize,
    /// Next start before the previous stop: two workers at once.
    overlaps: usize,
    elapsed: Duration,
    /// From the contenders' logs, ms, sorted: previous worker's exit → Lease released (the
    /// leader's log line), released → claimed (the next leader's), claimed → next worker's start.
    segments: [Vec<f64>; 3],
    /// With `--audit`, by the API server's stamps, ms, sorted: exit → release received, release
    /// in the API server, release answered → claim received (the watch event or the poll, and
    /// the follower's decision), claim in the API server, claim answered → next worker's start.
    server: [Vec<f64>; 5],
}

impl Handoff {
    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.contenders,
            self.tool.name(),
            ms(percentile(&self.ms, 50.0)),
            ms(percentile(&self.ms, 95.0)),
            ms(percentile(&self.ms, 99.0)),
            ms(self.ms.last().copied().unwrap_or(f64::NAN)),
        )
    }
}

async fn handoff(bench: &Bench, tool: Tool, contenders: usize, handoffs: usize) -> Handoff {
    eprintln!("handoff: {} with {contenders} contenders", tool.name());
    let lease = format!("handoff-{}-{contenders}", tool.short());
    handoff_on(bench, tool, contenders, handoffs, &lease).await
}

/// `handoffs` graceful handoffs among `contenders` on the Lease `lease` (created released).
async fn handoff_on(
    bench: &Bench,
    tool: Tool,
    contenders: usize,
    handoffs: usize,
    lease: &str,
) -> Handoff {
    let lease = lease.to_string();
    cluster::create_released(&bench.client, NS, &lease).await;
    let journal = bench.journal(&lease);
    let mut running: Vec<(Child, Option<usize>)> = (0..contenders)
        .map(|i| {
            let child = bench.spawn(tool, &lease, &format!("c{i}"), &journal, bench.run_time());
            (child, None)
        })
        .collect();
    let began = Instant::now();
    let mut restarts = 0;
    loop {
        let starts = journal.starts().len();
        if starts > handoffs {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(900),
            "handoffs too slow: {starts} workers in 15 minutes"
        );
        for (child, exited) in &mut running {
            // An exited contender comes back (as the kubelet would restart it) only once the next
            // worker has started: each handoff is made by followers that were already waiting,
            // not by a fresh process that happens to read the released Lease first.
            match exited {
                None if matches!(child.try_wait(), Ok(Some(_))) => *exited = Some(starts),
                Some(at) if starts > *at => {
                    restarts += 1;
                    *child = bench.spawn(
                        tool,
                        &lease,
                        &format!("r{restarts}"),
                        &journal,
                        bench.run_time(),
                    );
                    *exited = None;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = began.elapsed();
    bench.stop_all(&journal);
    drop(running);
    // Let the proc connector's reader catch up with the last exits.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (starts, stops) = journal.read();
    let mut result = Handoff {
        tool,
        contenders,
        ms: Vec::new(),
        exit_cost_ms: Vec::new(),
        missing: 0,
        overlaps: 0,
        elapsed,
        segments: Default::default(),
        server: Default::default(),
    };
    let logs = LogEvents::read(&bench.logs, &lease, bench.real_minus_mono);
    if bench.audit_log.is_some() {
        // Batch mode writes the log off the request path: let it catch up.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let audited = bench
        .audit_log
        .as_deref()
        .map(|log| cluster::audited_updates(log, &lease, bench.real_minus_mono))
        .unwrap_or_default();
    for pair in starts.windows(2).take(handoffs) {
        let (previous, next) = (&pair[0], &pair[1]);
        let (kernel, own) = bench.stop_of(previous, &stops);
        if let (Some(k), Some(o)) = (kernel, own) {
            result.exit_cost_ms.push((k as f64 - o as f64) / 1e6);
        }
        let Some(stop) = kernel.or(own) else {
            result.missing += 1;
            continue;
        };
        if next.mono < stop {
            result.overlaps += 1;
        }
        result.ms.push((next.mono as f64 - stop as f64) / 1e6);
        // The release: the first successful update received after the exit; the claim: the
        // next successful one (the followers that lost the race got 409s).
        let mut ok = audited
            .iter()
            .filter(|w| w.code == 200 && w.received > stop);
        if let (Some(release), Some(claim)) = (ok.next(), ok.next())
            && claim.answered <= next.mono
        {
            let marks = [
                stop,
                release.received,
                release.answered,
                claim.received,
                claim.answered,
                next.mono,
            ];
            for (segment, pair) in result.server.iter_mut().zip(marks.windows(2)) {
                segment.push((pair[1] as f64 - pair[0] as f64) / 1e6);
            }
        }
        if let Some(times) = logs.handoff(previous.pid, stop, next.pid) {
            let mut at = stop as f64;
            for (segment, t) in result
                .segments
                .iter_mut()
                .zip(times.into_iter().chain([next.mono]))
            {
                segment.push((t as f64 - at) / 1e6);
                at = t as f64;
            }
        }
    }
    for segment in result.segments.iter_mut().chain(result.server.iter_mut()) {
        segment.sort_by(f64::total_cmp);
    }
    result.ms.sort_by(f64::total_cmp);
    result.exit_cost_ms.sort_by(f64::total_cmp);
    result
}

/// What the contenders logged about one Lease, on CLOCK_MONOTONIC: per log file, the workers it
/// started, its releases and its claims.
struct LogEvents {
    files: Vec<FileEvents>,
}

#[derive(Default)]
struct FileEvents {
    started: Vec<u32>,
    released: Vec<u64>,
    claimed: Vec<u64>,
}

impl LogEvents {
    fn read(dir: &Path, lease: &str, real_minus_mono: i128) -> LogEvents {
        let mut files = Vec::new();
        let prefix = format!("{lease}.");
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !entry.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let mut f = FileEvents::default();
            for line in std::fs::read_to_string(entry.path())
                .unwrap_or_default()
                .lines()
            {
                // lease-exec: "<RFC 3339>  INFO lease{...}: took over the released lease ...";
                // the contender: "<RFC 3339> contender started leading".
                let Some((stamp, text)) = line.split_once(' ') else {
                    continue;
                };
                let Ok(real) = stamp.parse::<k8s_openapi::jiff::Timestamp>() else {
                    continue;
                };
                let mono = (real.as_nanosecond() - real_minus_mono) as u64;
                if let Some((_, pid)) = text
                    .split_once("command started pid=")
                    .or_else(|| text.split_once("worker started pid="))
                {
                    let pid = pid
                        .split_whitespace()
                        .next()
                        .and_then(|p| p.parse::<u32>().ok());
                    f.started.extend(pid);
                } else if text.ends_with("released the lease") || text.ends_with("stopped leading")
                {
                    f.released.push(mono);
                } else if text.contains("took over the released lease")
                    || text.ends_with("contender started leading")
                {
                    f.claimed.push(mono);
                }
            }
            files.push(f);
        }
        LogEvents { files }
    }

    /// (released, claimed) around a handoff from worker `previous` (gone at `stop`) to `next`.
    fn handoff(&self, previous: u32, stop: u64, next: u32) -> Option<[u64; 2]> {
        let old = self.files.iter().find(|f| f.started.contains(&previous))?;
        let new = self.files.iter().find(|f| f.started.contains(&next))?;
        // The log line comes after the event; allow for the stamp's own lateness.
        let released = *old.released.iter().find(|&&t| t + 1_000_000 > stop)?;
        let claimed = *new.claimed.iter().rev().find(|&&t| t >= released)?;
        Some([released, claimed])
    }
}

// ------------------------------------------------------------------ crash failover

struct CrashSample {
    /// Next worker's start − the dead leader's renewTime, s.
    from_renewal: f64,
    /// Next worker's start − the SIGKILL, s.
    from_kill: f64,
    /// The dead leader's worker's exit − the SIGKILL, ms (lease-exec: parent-death signal).
    worker_gone_ms: Option<f64>,
    holder_matched: bool,
}

struct Crash {
    tool: Tool,
    samples: Vec<CrashSample>,
}

async fn crash(bench: &Bench, tool: Tool, samples: usize) -> Crash {
    eprintln!("crash: {} ({samples} samples)", tool.name());
    let lease = format!("crash-{}", tool.short());
    cluster::create_released(&bench.client, NS, &lease).await;
    let journal = bench.journal(&lease);
    let mut running: Vec<(String, Child)> = (0..3)
        .map(|i| {
            let name = format!("c{i}");
            let child = bench.spawn(tool, &lease, &name, &journal, -1.0);
            (name, child)
        })
        .collect();
    let mut result = Crash {
        tool,
        samples: Vec::new(),
    };
    let mut seen = 0;
    for sample in 0..samples {
        let starts = journal.more_than(seen, Duration::from_secs(120)).await;
        seen = starts.len();
        let worker = *starts.last().unwrap();
        let leader = parent_of(worker.pid).expect("the leader of the running worker");
        // Land the kill at a random point of the renew cycle (2 s for client-go, 5 s for
        // lease-exec, a third of the lease duration).
        let pause = Duration::from_secs_f64(0.5 + 5.0 * bench.random());
        tokio::time::sleep(pause).await;
        let killed = mono_ns();
        kill(Pid::from_raw(leader), Signal::SIGKILL).unwrap();
        if tool == Tool::ClientGo {
            // client-go gives its worker no parent-death signal: it would run on without the
            // Lease. Kill its process group too, as a pod's end would.
            let _ = kill(Pid::from_raw(-(worker.pid as i32)), Signal::SIGKILL);
        }
        let index = running
            .iter()
            .position(|(_, c)| c.id() == Some(leader as u32))
            .expect("the leader is one of ours");
        let (identity, mut child) = running.remove(index);
        let _ = child.wait().await;
        let (holder, renewed) = cluster::renewal(&bench.client, NS, &lease).await;
        let starts = journal.more_than(seen, Duration::from_secs(60)).await;
        let next = starts[seen];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let worker_gone_ms = bench
            .kernel
            .as_ref()
            .and_then(|e| e.exit_of(worker.pid, worker.mono))
            .map(|t| (t as f64 - killed as f64) / 1e6);
        let s = CrashSample {
            from_renewal: (next.real as i128 - renewed) as f64 / 1e9,
            from_kill: (next.mono as f64 - killed as f64) / 1e9,
            worker_gone_ms,
            holder_matched: holder == identity,
        };
        eprintln!(
            "crash: {} sample {}: {:.3} s after the last renewal, {:.3} s after the kill",
            tool.name(),
            sample + 1,
            s.from_renewal,
            s.from_kill
        );
        result.samples.push(s);
        let name = format!("c{}", 3 + sample);
        let child = bench.spawn(tool, &lease, &name, &journal, -1.0);
        running.push((name, child));
    }
    bench.stop_all(&journal);
    result
}

// ------------------------------------------------------------------ API load and footprint

/// lease-exec's watch timeout (`timeoutSeconds`, src/lease/api.rs): each watch it holds open is
/// re-opened, one request, every 290 s.
const LEASE_EXEC_WATCH_SECONDS: f64 = 290.0;

#[derive(Clone, Default)]
struct Window {
    /// Lease requests by verb, WATCH apart: kube-system writes taken out.
    requests: BTreeMap<String, f64>,
    /// WATCH requests that ended in the window, from any client (ours excepted).
    watch_ends: f64,
    /// Watches on Leases open at the end of the window (the baseline's taken out later).
    open_watches: f64,
    seconds: f64,
    /// (VmHWM KiB, VmRSS KiB, CPU ms during the window) of the measured process.
    footprint: Option<(u64, u64, u64)>,
}

impl Window {
    fn counted_per_min(&self) -> f64 {
        self.requests.values().sum::<f64>() * 60.0 / self.seconds
    }

    fn verbs(&self) -> String {
        let verbs: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, n)| n.abs() >= 0.5)
            .map(|(verb, n)| format!("{verb} {:.1}", n * 60.0 / self.seconds))
            .collect();
        if verbs.is_empty() {
            "none".into()
        } else {
            verbs.join(", ")
        }
    }
}

struct Load {
    window: Duration,
    baseline: Window,
    /// kube-system writes per minute during the baseline window.
    system_per_min: f64,
    /// (tool, leader alone, idle follower alone), baseline subtracted.
    tools: Vec<(Tool, Window, Window)>,
}

async fn measure(
    bench: &Bench,
    system: &SystemWrites,
    window: Duration,
    pid: Option<u32>,
) -> (Window, usize) {
    let cpu = |pid: Option<u32>| pid.and_then(footprint).map_or(0, |f| f.2);
    let t0 = mono_ns();
    let (before, _) = cluster::lease_metrics(&bench.client).await;
    let cpu0 = cpu(pid);
    tokio::time::sleep(window).await;
    let (after, open_watches) = cluster::lease_metrics(&bench.client).await;
    let t1 = mono_ns();
    let (writes, reopened) = system.between(t0, t1);
    let mut w = Window {
        open_watches,
        seconds: (t1 - t0) as f64 / 1e9,
        ..Window::default()
    };
    for (verb, n) in &after {
        let d = n - before.get(verb).copied().unwrap_or(0.0);
        if verb == "WATCH" {
            w.watch_ends = d - reopened as f64;
        } else if verb == "PUT" {
            w.requests.insert(verb.clone(), d - writes as f64);
        } else {
            w.requests.insert(verb.clone(), d);
        }
    }
    w.footprint = pid
        .and_then(footprint)
        .map(|(hwm, rss, cpu1)| (hwm, rss, cpu1 - cpu0));
    (w, writes)
}

async fn load(bench: &Bench, window: Duration, tools_to_run: &[Tool]) -> Load {
    Cluster::stop_controller_manager(&bench.cluster_dir);
    let system = SystemWrites::watch(&bench.client).await;
    // Let the watches of processes killed before this phase end and be counted.
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("load: baseline, no contender ({} s)", window.as_secs());
    let (baseline, system_writes) = measure(bench, &system, window, None).await;
    let system_per_min = system_writes as f64 * 60.0 / baseline.seconds;
    // Requests other than WATCH come at steady rates: the baseline's (none expected) is
    // subtracted as a rate. WATCH requests are counted when they end, so a window sees one from
    // the API server's own informers now and then; they are shown, not subtracted, and each
    // tool's watches are counted as the watches it holds open.
    let subtract = |mut w: Window| {
        for (verb, n) in w.requests.iter_mut() {
            let base = baseline.requests.get(verb).copied().unwrap_or(0.0);
            *n -= base * w.seconds / baseline.seconds;
        }
        w.open_watches -= baseline.open_watches;
        w
    };
    let mut tools = Vec::new();
    for &tool in tools_to_run {
        eprintln!(
            "load: {} leader alone ({} s)",
            tool.name(),
            window.as_secs()
        );
        let lease = format!("load-{}", tool.short());
        cluster::create_released(&bench.client, NS, &lease).await;
        let journal = bench.journal(&lease);
        let child = bench.spawn(tool, &lease, "leader", &journal, -1.0);
        journal.more_than(0, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (leader, _) = measure(bench, &system, window, child.id()).await;
        bench.stop_all(&journal);

        eprintln!(
            "load: {} idle follower alone ({} s)",
            tool.name(),
            window.as_secs()
        );
        let lease = format!("idle-{}", tool.short());
        cluster::create_held(&bench.client, NS, &lease, 3600).await;
        let journal = bench.journal(&lease);
        let child = bench.spawn(tool, &lease, "follower", &journal, -1.0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (follower, _) = measure(bench, &system, window, child.id()).await;
        assert!(
            journal.starts().is_empty(),
            "the idle follower ran its worker"
        );
        bench.stop_all(&journal);
        tools.push((tool, subtract(leader), subtract(follower)));
    }
    Load {
        window,
        baseline,
        system_per_min,
        tools,
    }
}

// ------------------------------------------------------------------ the report

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[derive(Default)]
struct Report {
    handoffs: Vec<Handoff>,
    scale: Vec<scale::Point>,
    startups: Vec<startup::Startup>,
    crashes: Vec<Crash>,
    load: Option<Load>,
    kernel_stops: bool,
    lost_exits: Option<u64>,
    loads: (String, String),
    elapsed: Duration,
    binary: u64,
    contender_binary: u64,
    commit: String,
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

impl Report {
    fn markdown(&self, options: &Options) -> String {
        let mut o = String::new();
        let date = k8s_openapi::jiff::Timestamp::now().to_string();
        let _ = writeln!(
            o,
            "\n## lease-exec vs client-go against kube-apiserver v1.37.2 (testenv, {}), lease 15 s, renew deadline 10 s, retry 2 s\n",
            if options.ha {
                "--ha: 3 etcd members, fsync on, 2 API servers"
            } else {
                "1 etcd member, fsync off"
            }
        );
        let _ = writeln!(
            o,
            "{} UTC; {} CPUs; load average {} before, {} after; lease-exec {} ({} KiB), contender {} KiB; run time {}m {:02}s\n",
            &date[..16].replace('T', " "),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.loads.0,
            self.loads.1,
            self.commit,
            self.binary / 1024,
            self.contender_binary / 1024,
            self.elapsed.as_secs() / 60,
            self.elapsed.as_secs() % 60,
        );
        let mut targets: Vec<String> = Vec::new();

        if !self.scale.is_empty() {
            let _ = writeln!(
                o,
                "### Cost as elections grow: E elections × 3 contenders, one pool at a time, {} s windows after settling\n",
                options.scale_window.as_secs()
            );
            let _ = writeln!(o, "{}", scale::HEADER);
            for p in &self.scale {
                let _ = writeln!(o, "{}", p.row());
            }
            let _ = writeln!(o);
            targets.extend(scale::targets(&self.scale));
        }
        if !self.startups.is_empty() {
            let _ = writeln!(
                o,
                "### Start-up: lease-exec's exec (kernel stamp) → its first bytes on the wire (the ClientHello at a relay) and → its worker's start, on a released Lease, ms\n"
            );
            let _ = writeln!(
                o,
                "| kubeconfig | samples | wire p50 | p90 | max | worker p50 | p90 | max |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
            for s in &self.startups {
                let _ = writeln!(o, "{}", s.row());
            }
            if let Some(token) = self.startups.iter().find(|s| s.variant == "token") {
                let (wire, worker) = (
                    percentile(&token.wire, 50.0),
                    percentile(&token.worker, 50.0),
                );
                targets.push(format!(
                    "| start-up with a token: exec → first request on the wire p50 ≤ 10 ms, → worker start p50 ≤ 30 ms | {wire:.1} ms, {worker:.1} ms | {} / {} |",
                    met(wire <= 10.0),
                    met(worker <= 30.0),
                ));
            }
            let _ = writeln!(o);
        }
        if !self.handoffs.is_empty() {
            let _ = writeln!(
                o,
                "### Graceful handoff: previous worker's exit → next worker's start ({} handoffs each)\n",
                options.handoffs
            );
            let _ = writeln!(o, "| contenders | tool | p50 | p95 | p99 | max |");
            let _ = writeln!(o, "|---|---|---|---|---|---|");
            for h in &self.handoffs {
                let _ = writeln!(o, "{}", h.row());
            }
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "Where it goes (medians, from the contenders' log timestamps):\n\n| contenders | tool | exit → Lease released | released → claimed by the next | claimed → next worker's start |\n|---|---|---|---|---|"
            );
            for h in &self.handoffs {
                let [a, b, c] = &h.segments;
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} |",
                    h.contenders,
                    h.tool.name(),
                    ms(percentile(a, 50.0)),
                    ms(percentile(b, 50.0)),
                    ms(percentile(c, 50.0))
                );
            }
            let _ = writeln!(o);
            if self.handoffs.iter().any(|h| !h.server[0].is_empty()) {
                let _ = writeln!(
                    o,
                    "By the API server's own stamps (audit log, medians; handoffs split: n):\n\n| contenders | tool | n | exit → release received | release in the API server | release answered → claim received | claim in the API server | claim answered → next worker's start |\n|---|---|---|---|---|---|---|---|"
                );
                for h in &self.handoffs {
                    let mut row = format!(
                        "| {} | {} | {} |",
                        h.contenders,
                        h.tool.name(),
                        h.server[0].len()
                    );
                    for segment in &h.server {
                        let _ = write!(row, " {} |", ms(percentile(segment, 50.0)));
                    }
                    let _ = writeln!(o, "{row}");
                }
                let _ = writeln!(o);
            }
            let stop = if self.kernel_stops {
                "the kernel's exit event (proc connector, CLOCK_MONOTONIC)"
            } else {
                "the worker's own last stamp just before exit (proc connector unavailable)"
            };
            let _ = writeln!(
                o,
                "Start: the worker's first stamp (CLOCK_MONOTONIC, first thing in main). Stop: {stop}."
            );
            let costs: Vec<f64> = {
                let mut v: Vec<f64> = self
                    .handoffs
                    .iter()
                    .flat_map(|h| h.exit_cost_ms.iter().copied())
                    .collect();
                v.sort_by(f64::total_cmp);
                v
            };
            if !costs.is_empty() {
                let _ = writeln!(
                    o,
                    "The worker's last stamp comes {} (median; max {}) before the kernel's exit stamp.",
                    ms(percentile(&costs, 50.0)),
                    ms(*costs.last().unwrap())
                );
            }
            for h in &self.handoffs {
                if h.missing + h.overlaps > 0 {
                    let _ = writeln!(
                        o,
                        "{} with {} contenders: {} stops missing, {} overlaps (two workers at once).",
                        h.tool.name(),
                        h.contenders,
                        h.missing,
                        h.overlaps
                    );
                }
            }
            for contenders in [3, 10] {
                let find = |tool| {
                    self.handoffs
                        .iter()
                        .find(|h| h.tool == tool && h.contenders == contenders)
                };
                if let (Some(le), Some(cg)) = (find(Tool::LeaseExec), find(Tool::ClientGo)) {
                    let _ = writeln!(
                        o,
                        "{contenders} contenders: client-go / lease-exec = {:.0}x at p50, {:.0}x at p99; {:.0} s and {:.0} s for the {} handoffs.",
                        percentile(&cg.ms, 50.0) / percentile(&le.ms, 50.0),
                        percentile(&cg.ms, 99.0) / percentile(&le.ms, 99.0),
                        le.elapsed.as_secs_f64(),
                        cg.elapsed.as_secs_f64(),
                        options.handoffs
                    );
                }
            }
            for h in self.handoffs.iter().filter(|h| h.tool == Tool::LeaseExec) {
                let (p50, p99) = (percentile(&h.ms, 50.0), percentile(&h.ms, 99.0));
                targets.push(format!(
                    "| lease-exec handoff, {} contenders: p50 ≤ 10 ms, p99 ≤ 50 ms | p50 {}, p99 {} | {} / {} |",
                    h.contenders,
                    ms(p50),
                    ms(p99),
                    met(p50 <= 10.0),
                    met(p99 <= 50.0)
                ));
            }
            let _ = writeln!(o);
        }

        if !self.crashes.is_empty() {
            let _ = writeln!(
                o,
                "### Crash failover: leader SIGKILLed → next worker's start ({} samples each)\n",
                options.samples
            );
            let _ = writeln!(
                o,
                "| tool | from the last renewal (renewTime): min | median | max | from the kill: median | the dead leader's worker |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|");
            for c in &self.crashes {
                let mut r: Vec<f64> = c.samples.iter().map(|s| s.from_renewal).collect();
                let mut k: Vec<f64> = c.samples.iter().map(|s| s.from_kill).collect();
                r.sort_by(f64::total_cmp);
                k.sort_by(f64::total_cmp);
                let gone: Vec<f64> = c.samples.iter().filter_map(|s| s.worker_gone_ms).collect();
                let worker = match c.tool {
                    Tool::LeaseExec if gone.len() == c.samples.len() => format!(
                        "killed by the parent-death signal, {} after the kill at most",
                        ms(gone.iter().copied().fold(0.0, f64::max))
                    ),
                    Tool::LeaseExec => format!(
                        "exit seen for {} of {} (no proc connector, or it survived)",
                        gone.len(),
                        c.samples.len()
                    ),
                    Tool::ClientGo => "keeps running: SIGKILLed by the bench".into(),
                };
                let _ = writeln!(
                    o,
                    "| {} | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {} |",
                    c.tool.name(),
                    r.first().copied().unwrap_or(f64::NAN),
                    percentile(&r, 50.0),
                    r.last().copied().unwrap_or(f64::NAN),
                    percentile(&k, 50.0),
                    worker
                );
                if c.samples.iter().any(|s| !s.holder_matched) {
                    let _ = writeln!(
                        o,
                        "\n{}: the Lease read after a kill did not name the killed leader in some samples.",
                        c.tool.name()
                    );
                }
                if c.tool == Tool::LeaseExec {
                    let worst = r.last().copied().unwrap_or(f64::NAN);
                    targets.push(format!(
                        "| lease-exec crash failover ≤ lease-duration + 250 ms (15.250 s) | max {worst:.3} s | {} |",
                        met(worst <= 15.25)
                    ));
                }
            }
            let _ = writeln!(o);
        }

        if let Some(load) = &self.load {
            let _ = writeln!(
                o,
                "### API load: Lease requests per minute counted by the API server ({}-s windows, baseline subtracted)\n",
                load.window.as_secs()
            );
            let _ = writeln!(
                o,
                "| tool | leader alone | idle follower alone |\n|---|---|---|"
            );
            // Requests counted in the window, plus the re-opening of the watches held open.
            let cell = |tool: Tool, w: &Window| -> (f64, String) {
                let counted = w.counted_per_min();
                let watches = w.open_watches.round();
                let (total, watch) = match (tool, watches as i64) {
                    (_, 0) => (counted, "no watch".to_string()),
                    (Tool::LeaseExec, n) => {
                        let reopen = watches * 60.0 / LEASE_EXEC_WATCH_SECONDS;
                        (
                            counted + reopen,
                            format!("{n} watch open, re-opened every 290 s: {reopen:.1}"),
                        )
                    }
                    (Tool::ClientGo, n) => (counted, format!("{n} watch open")),
                };
                (
                    total,
                    format!(
                        "**{total:.1}**: {counted:.1} counted ({}); {watch}",
                        w.verbs()
                    ),
                )
            };
            for (tool, leader, follower) in &load.tools {
                let (_, l) = cell(*tool, leader);
                let (ft, f) = cell(*tool, follower);
                let _ = writeln!(o, "| {} | {l} | {f} |", tool.name());
                if *tool == Tool::LeaseExec {
                    targets.push(format!(
                        "| lease-exec idle follower ≤ 0.5 requests a minute | {ft:.1} | {} |",
                        met(ft <= 0.5)
                    ));
                }
            }
            let ends: Vec<String> = std::iter::once(("baseline".to_string(), &load.baseline))
                .chain(load.tools.iter().flat_map(|(t, l, f)| {
                    [
                        (format!("{} leader", t.name()), l),
                        (format!("{} follower", t.name()), f),
                    ]
                }))
                .map(|(name, w)| format!("{name} {}", w.watch_ends))
                .collect();
            let _ = writeln!(
                o,
                "\nBaseline (no contender): the API server's own identity Lease, {:.1} writes a minute, seen on a watch and taken out of every window one by one; {:.1} other requests a minute ({}), subtracted as a rate. The controller-manager (only its garbage collector, whose informer re-opens a watch on Leases every 5 to 10 minutes) is stopped for these windows. A WATCH is counted when it ends, so watches are counted as held open (`apiserver_longrunning_requests`, baseline's taken out) and each open lease-exec watch as one request per 290 s; WATCH requests that ended in the windows, from any client: {}.\n",
                load.system_per_min,
                load.baseline.counted_per_min(),
                load.baseline.verbs(),
                ends.join(", ")
            );
            let _ = writeln!(
                o,
                "### Footprint: the contender process after its {}-s window\n",
                load.window.as_secs()
            );
            let _ = writeln!(
                o,
                "| tool | peak RSS (VmHWM) leading | waiting | RSS now leading | waiting | CPU leading | waiting |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|");
            let mut hwm = BTreeMap::new();
            for (tool, leader, follower) in &load.tools {
                let f = |w: &Window| w.footprint.unwrap_or_default();
                let (l, w) = (f(leader), f(follower));
                hwm.insert(tool.name(), (l.0, w.0));
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} ms | {} ms |",
                    tool.name(),
                    mib(l.0),
                    mib(w.0),
                    mib(l.1),
                    mib(w.1),
                    l.2,
                    w.2
                );
            }
            if let (Some(le), Some(cg)) = (hwm.get("lease-exec"), hwm.get("client-go")) {
                targets.push(format!(
                    "| lease-exec peak RSS ≤ half of client-go's | leading {} vs {} ({:.0}%), waiting {} vs {} ({:.0}%) | {} |",
                    mib(le.0),
                    mib(cg.0),
                    100.0 * le.0 as f64 / cg.0 as f64,
                    mib(le.1),
                    mib(cg.1),
                    100.0 * le.1 as f64 / cg.1 as f64,
                    met(le.0 * 2 <= cg.0 && le.1 * 2 <= cg.1)
                ));
            }
            let _ = writeln!(o);
        }

        if !targets.is_empty() {
            let _ = writeln!(o, "### Targets\n");
            let _ = writeln!(o, "| target | measured | |");
            let _ = writeln!(o, "|---|---|---|");
            for t in &targets {
                let _ = writeln!(o, "{t}");
            }
        }
        if let Some(lost) = self.lost_exits.filter(|&n| n > 0) {
            let _ = writeln!(
                o,
                "\n{lost} proc connector datagrams were lost: some stops are the workers' own stamps."
            );
        }
        o
    }
}
