//! Failover, load and footprint benchmark against the in-memory API server on loopback, with the
//! default durations (lease 15 s, renew deadline 10 s, retry 2 s). Run by hand:
//!
//!     cargo run --release --example bench -- all
//!     cargo run --release --example bench -- handoff|crash|load|footprint
//!
//! Workers are this same binary re-executed as `bench worker JOURNAL SECONDS`: it writes `start`
//! and `stop` lines stamped with CLOCK_MONOTONIC, so latencies are measured from the old worker's
//! exit to the new worker's start.

#[path = "../tests/support/apiserver.rs"]
mod apiserver;
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, mono_ns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

const NS: &str = "default";
const LEASE: &str = "bench";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        worker(Path::new(&args[2]), args[3].parse().unwrap());
        return;
    }
    let what = args.get(1).cloned().unwrap_or_else(|| "all".into());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(&what));
}

/// The worker: journal start, run, journal stop, exit 0. SIGTERM ends it with a stop line too.
fn worker(journal: &Path, seconds: f64) {
    use std::io::Write;
    let record = |what: &str| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(journal)
            .unwrap();
        writeln!(f, "{what} {} {}", std::process::id(), mono_ns()).unwrap();
    };
    record("start");
    if seconds < 0.0 {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::thread::sleep(Duration::from_secs_f64(seconds));
    record("stop");
}

struct Bench {
    binary: PathBuf,
    me: PathBuf,
    server: ApiServer,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Bench {
    async fn new(binary: &Path) -> Bench {
        let server = ApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig(NS)).unwrap();
        Bench {
            binary: binary.to_owned(),
            me: std::env::current_exe().unwrap(),
            server,
            dir,
            kubeconfig,
        }
    }

    fn journal(&self) -> PathBuf {
        self.dir.path().join("journal")
    }

    fn contender(&self, name: &str, seconds: f64, extra: &[&str]) -> Child {
        Command::new(&self.binary)
            .args(extra)
            .args(["--identity", name, LEASE, "--"])
            .arg(&self.me)
            .arg("worker")
            .arg(self.journal())
            .arg(seconds.to_string())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn lease-exec")
    }

    /// (what, pid, ns) lines of the journal.
    fn entries(&self) -> Vec<(String, u32, u64)> {
        std::fs::read_to_string(self.journal())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((
                    f.first()?.to_string(),
                    f.get(1)?.parse().ok()?,
                    f.get(2)?.parse().ok()?,
                ))
            })
            .collect()
    }

    fn starts(&self) -> Vec<(u32, u64)> {
        self.entries()
            .into_iter()
            .filter(|e| e.0 == "start")
            .map(|e| (e.1, e.2))
            .collect()
    }
}

async fn run(what: &str) {
    let binary = common::lease_exec_binary();
    println!(
        "lease-exec binary: {} ({} KiB)",
        binary.display(),
        std::fs::metadata(&binary).unwrap().len() / 1024
    );
    if matches!(what, "all" | "handoff") {
        handoff(&binary).await;
    }
    if matches!(what, "all" | "crash") {
        crash(&binary).await;
    }
    if matches!(what, "all" | "load") {
        load(&binary).await;
    }
    if matches!(what, "all" | "footprint") {
        footprint(&binary).await;
    }
}

/// A worker run time between 50 ms and 2.05 s, from the clock's low bits.
fn run_time() -> f64 {
    0.05 + (mono_ns() / 1000 % 2000) as f64 / 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Graceful handoff: each worker runs 50 ms to 2 s and exits; lease-exec releases; the next
/// starts. The random run time spreads releases evenly over the followers' 2 s poll cycle, as in
/// real life; with a fixed one, polling followers fall into step with the handoffs.
async fn handoff(binary: &Path) {
    const HANDOFFS: usize = 60;
    println!(
        "\n## Graceful handoff: old worker's exit → next worker's start ({HANDOFFS} handoffs)\n"
    );
    println!("| contenders | mode | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for contenders in [3usize, 10] {
        for (mode, extra) in [("watch", &[][..]), ("--no-watch", &["--no-watch"][..])] {
            let bench = Bench::new(binary).await;
            let mut running: Vec<(Child, Option<usize>)> = (0..contenders)
                .map(|i| (bench.contender(&format!("c{i}"), run_time(), extra), None))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(900);
            while bench.starts().len() <= HANDOFFS {
                assert!(Instant::now() < deadline, "handoffs too slow");
                let starts = bench.starts().len();
                for (i, (child, exited)) in running.iter_mut().enumerate() {
                    // Restart an exited contender (as the kubelet would) only once the next worker
                    // has started: each handoff is made by followers that were already waiting,
                    // not by a fresh process that happens to read the released lease first.
                    match exited {
                        None if matches!(child.try_wait(), Ok(Some(_))) => *exited = Some(starts),
                        Some(at) if starts > *at => {
                            *child =
                                bench.contender(&format!("c{i}-{}", mono_ns()), run_time(), extra);
                            *exited = None;
                        }
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let entries = bench.entries();
            let mut latencies: Vec<f64> = Vec::new();
            let mut last_stop: Option<u64> = None;
            for (what, _, at) in &entries {
                match what.as_str() {
                    "stop" => last_stop = Some(*at),
                    "start" => {
                        if let Some(stop) = last_stop.take() {
                            latencies.push((*at as f64 - stop as f64) / 1e6);
                        }
                    }
                    _ => {}
                }
            }
            latencies.truncate(HANDOFFS);
            latencies.sort_by(f64::total_cmp);
            let p50 = percentile(&latencies, 50.0);
            medians.push((contenders, mode, p50));
            println!(
                "| {contenders} | {mode} | {:.1} | {:.1} | {:.1} | {:.1} |",
                p50,
                percentile(&latencies, 95.0),
                percentile(&latencies, 99.0),
                latencies.last().unwrap()
            );
            for (child, _) in &mut running {
                let _ = child.start_kill();
            }
        }
    }
    for contenders in [3, 10] {
        let watch = medians
            .iter()
            .find(|m| m.0 == contenders && m.1 == "watch")
            .unwrap()
            .2;
        let poll = medians
            .iter()
            .find(|m| m.0 == contenders && m.1 == "--no-watch")
            .unwrap()
            .2;
        println!(
            "\n{contenders} contenders: polling median / watch median = {:.0}x",
            poll / watch
        );
    }
}

/// Crash failover: SIGKILL the leading lease-exec; time until the next worker starts.
async fn crash(binary: &Path) {
    const SAMPLES: usize = 5;
    println!(
        "\n## Crash failover: leader SIGKILLed → next worker starts (lease-duration 15 s, {SAMPLES} samples)\n"
    );
    println!("| sample | kill → start (s) | ÷ lease-duration | last renewal → start (s) |");
    println!("|---|---|---|---|");
    let bench = Bench::new(binary).await;
    let mut running: Vec<(String, Child)> = (0..3)
        .map(|i| {
            (
                format!("c{i}"),
                bench.contender(&format!("c{i}"), -1.0, &[]),
            )
        })
        .collect();
    let mut seen = 0;
    let mut worst = 0f64;
    for sample in 0..SAMPLES {
        while bench.starts().len() <= seen {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen = bench.starts().len();
        let holder = loop {
            if let Some(h) = bench.server.holder(NS, LEASE) {
                break h;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Land the kill at a random phase of the 2 s renew cycle.
        tokio::time::sleep(Duration::from_millis(500 + (mono_ns() % 2000))).await;
        let index = running.iter().position(|(n, _)| *n == holder).unwrap();
        let (_, mut child) = running.remove(index);
        let killed = mono_ns();
        kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGKILL).unwrap();
        let _ = child.wait().await;
        let last_renewal = bench.server.last_write_by(&holder).unwrap().at_ns;
        while bench.starts().len() <= seen {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let started = bench.starts()[seen].1;
        let from_kill = (started - killed) as f64 / 1e9;
        let from_renewal = (started - last_renewal) as f64 / 1e9;
        worst = worst.max(from_renewal);
        println!(
            "| {} | {:.3} | {:.3} | {:.3} |",
            sample + 1,
            from_kill,
            from_kill / 15.0,
            from_renewal
        );
        let name = format!("c{}", 10 + sample);
        running.push((name.clone(), bench.contender(&name, -1.0, &[])));
    }
    println!(
        "\nworst: {worst:.3} s after the last renewal (bound: lease-duration 15 s; target ≤ 15.2 s)"
    );
}

/// API load: requests per minute with 1, 10 and 50 contenders, watch and polling.
async fn load(binary: &Path) {
    const WINDOW: Duration = Duration::from_secs(30);
    println!(
        "\n## API load: requests per minute, counted by the server ({}-s window, defaults)\n",
        WINDOW.as_secs()
    );
    println!("| contenders | mode | total/min | leader/min | per idle follower/min |");
    println!("|---|---|---|---|---|");
    for (mode, extra) in [("watch", &[][..]), ("--no-watch", &["--no-watch"][..])] {
        let mut leader_rate = None;
        for contenders in [1usize, 10, 50] {
            let bench = Bench::new(binary).await;
            let mut running: Vec<Child> = (0..contenders)
                .map(|i| bench.contender(&format!("c{i}"), -1.0, extra))
                .collect();
            // Warm up: a leader, and every follower has read the lease (and opened its watch).
            let warm = Instant::now();
            while bench.starts().is_empty() || warm.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let since = Instant::now();
            tokio::time::sleep(WINDOW).await;
            let total = bench.server.count_all(since) as f64 * 60.0 / WINDOW.as_secs_f64();
            let leader = *leader_rate.get_or_insert(total);
            let per_follower = if contenders > 1 {
                (total - leader) / (contenders - 1) as f64
            } else {
                0.0
            };
            println!("| {contenders} | {mode} | {total:.0} | {leader:.0} | {per_follower:.2} |");
            for child in &mut running {
                let _ = child.start_kill();
            }
        }
    }
}

/// Footprint of lease-exec leading and waiting for 60 s.
async fn footprint(binary: &Path) {
    println!("\n## Footprint over 60 s (release build)\n");
    let bench = Bench::new(binary).await;
    let mut leader = bench.contender("leader", -1.0, &[]);
    while bench.starts().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut follower = bench.contender("follower", -1.0, &[]);
    tokio::time::sleep(Duration::from_secs(60)).await;
    println!("| role | peak RSS (VmHWM) | RSS now | CPU time (user+sys) |");
    println!("|---|---|---|---|");
    for (role, child) in [("leading", &leader), ("waiting", &follower)] {
        let pid = child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
                .unwrap_or_default()
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
        let hz = 100;
        println!(
            "| {role} | {} KiB | {} KiB | {} ms |",
            field("VmHWM:"),
            field("VmRSS:"),
            ticks * 1000 / hz
        );
    }
    let _ = leader.start_kill();
    let _ = follower.start_kill();
    println!(
        "\nbinary size: {} KiB",
        std::fs::metadata(binary).unwrap().len() / 1024
    );
}
