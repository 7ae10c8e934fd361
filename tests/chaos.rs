//! Exclusion under chaos: several contenders whose workers journal `start`/`stop` with
//! CLOCK_MONOTONIC, while a driver SIGKILLs and SIGTERMs contenders (restarting them, as a kubelet
//! would), switches API faults on and off, and changes the Lease's hands without expiry: deletes
//! it while held, overwrites its holder as an operator would, asks the holder to hand it over
//! (`spec.preferredHolder`: to a live contender, to any other, to one that is gone), and runs workers
//! that start a lease-exec of their own on the same Lease. No two workers' running intervals may overlap.
//!
//! The short run is part of the suite; the long one is run by hand:
//!
//!     cargo test --release --test chaos -- --ignored --nocapture chaos

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
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
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

#[derive(Debug, Default)]
struct Tally {
    sigkills: usize,
    sigterms: usize,
    restarts: usize,
    faults: HashMap<&'static str, usize>,
    deletions: usize,
    overwrites: usize,
    handovers: usize,
    nested: usize,
}

/// `holders` > 1: the contenders share a semaphore of that many slots (`--holders`); the hand-changes
/// hit a random slot, and the check is per slot, plus never more than `holders` workers at once.
async fn chaos(contenders: usize, holders: u32, length: Duration, seed: u64) {
    // First, so that a failure anywhere below can be replayed.
    println!("chaos seed {seed} (replay with CHAOS_SEED={seed})");
    let slots: Vec<String> = if holders == 1 {
        vec!["job".to_string()]
    } else {
        (0..holders).map(|i| format!("job-{i}")).collect()
    };
    let holders_arg = holders.to_string();
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(["--holders", &holders_arg]);
    let world = World::start().await;
    let mut rng = Rng(seed | 1);
    let mut tally = Tally::default();
    let run_for = |rng: &mut Rng| 0.3 + rng.below(2500) as f64 / 1000.0;
    let mut generation = 0usize;
    let mut nested = 0usize;
    let identities: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut spawn = |rng: &mut Rng, slot: usize| {
        generation += 1;
        let identity = format!("c{slot}-{generation}");
        {
            let mut ids = identities.lock().unwrap();
            if ids.len() <= slot {
                ids.resize(slot + 1, String::new());
            }
            ids[slot].clone_from(&identity);
        }
        if rng.below(4) == 0 {
            // The worker starts a lease-exec of its own on the same Lease beside its own work:
            // an ordinary new candidate, killed with its parent's group.
            nested += 1;
            let run = run_for(rng);
            let worker = format!(
                "{} {} {run} 0",
                world.worker().display(),
                world.journal().display()
            );
            // (Bounded: if its parent lease-exec is SIGKILLed, the parent-death signal reaches only
            // the worker, and this candidate is orphaned; it must not outlive the test.)
            let script = format!(
                "{BIN} --wait-timeout 60s {} job -- {worker} & exec {worker}",
                options.join(" ")
            );
            let mut args: Vec<String> = options.iter().map(|s| s.to_string()).collect();
            args.extend(
                ["--identity", &identity, "job", "--", "sh", "-c", &script].map(String::from),
            );
            return world.lease_exec(args).spawn();
        }
        let mut with: Vec<&str> = options.clone();
        with.extend(["--identity", &identity, "job"]);
        world.worker_command(&with, run_for(rng), 0, &[]).spawn()
    };
    let mut running: Vec<Running> = (0..contenders).map(|i| spawn(&mut rng, i)).collect();

    // Watches workers that never write a `stop` line (SIGKILLed with their lease-exec, or killed
    // at the safety deadline) and notes when each was first seen gone: later than the real death,
    // so it can only over-report overlaps, never hide one.
    let deaths: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
    let watcher = {
        let deaths = deaths.clone();
        let journal = world.journal();
        tokio::spawn(async move {
            loop {
                for (pid, _, stop) in intervals(&read_journal(&journal)) {
                    if stop.is_none() && !alive(pid) {
                        deaths.lock().unwrap().entry(pid).or_insert_with(mono_ns);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let began_ns = mono_ns();
    let end = Instant::now() + length;
    let mut fault_until = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(rng.millis(100, 700)).await;
        // Restart contenders that exited (their worker finished, or they lost the lease).
        for (slot, r) in running.iter_mut().enumerate() {
            if r.exited() {
                *r = spawn(&mut rng, slot);
                tally.restarts += 1;
            }
        }
        if Instant::now() >= fault_until {
            world.server.set_mode(Mode::Normal);
            world.server.set_delay(Duration::ZERO);
        }
        match rng.below(10) {
            0 => {
                let slot = rng.below(contenders as u64) as usize;
                running[slot].signal(Signal::SIGKILL);
                tally.sigkills += 1;
            }
            1 | 2 => {
                let slot = rng.below(contenders as u64) as usize;
                if !running[slot].exited() {
                    running[slot].signal(Signal::SIGTERM);
                    tally.sigterms += 1;
                }
            }
            3 if Instant::now() >= fault_until => {
                // Sometimes shorter than the renew deadline (a blip), sometimes longer (a loss).
                let (name, mode) = match rng.below(5) {
                    0 => ("refuse", Mode::Refuse),
                    1 => ("hang", Mode::Hang),
                    2 => ("503", Mode::Status(503, None)),
                    3 => ("429", Mode::Status(429, Some(1))),
                    _ => ("500", Mode::Status(500, None)),
                };
                world.server.set_mode(mode);
                *tally.faults.entry(name).or_default() += 1;
                fault_until = Instant::now() + rng.millis(200, 2500);
            }
            4 if Instant::now() >= fault_until => {
                world.server.set_delay(rng.millis(50, 400));
                *tally.faults.entry("slow").or_default() += 1;
                fault_until = Instant::now() + rng.millis(500, 2000);
            }
            // A user or the garbage collector deletes the Lease, held or not.
            5 if world
                .server
                .delete_lease(NS, &slots[rng.below(slots.len() as u64) as usize]) =>
            {
                tally.deletions += 1
            }
            6 => {
                // An operator writes another holder over whoever holds it.
                let slot = &slots[rng.below(slots.len() as u64) as usize];
                world
                    .server
                    .steal(NS, slot, "operator", 1 + rng.below(2) as i64);
                tally.overwrites += 1;
            }
            7 => {
                let slot = &slots[rng.below(slots.len() as u64) as usize];
                // A handover request on the held Lease, as `lease-exec --handover` writes it.
                // (Only on a contender's term: one of the operator's never steps down.)
                if let Some(mut lease) = world.server.lease(NS, slot)
                    && lease["spec"]["holderIdentity"]
                        .as_str()
                        .is_some_and(|h| h.starts_with('c'))
                {
                    let to = match rng.below(4) {
                        0 => "*".to_string(),
                        1 => "gone".to_string(),
                        _ => {
                            let ids = identities.lock().unwrap();
                            ids[rng.below(ids.len() as u64) as usize].clone()
                        }
                    };
                    lease["spec"]["preferredHolder"] = serde_json::json!(to);
                    lease["spec"]["strategy"] = serde_json::json!("lease-exec/handover");
                    world.server.put_lease(NS, slot, lease);
                    tally.handovers += 1;
                }
            }
            _ => {}
        }
    }
    world.server.set_mode(Mode::Normal);
    world.server.set_delay(Duration::ZERO);
    for r in &mut running {
        if !r.exited() {
            r.signal(Signal::SIGTERM);
        }
    }
    for r in &mut running {
        r.wait(Duration::from_secs(20)).await;
    }
    // Every worker is dead now (its lease-exec waited for the group): any interval the watcher
    // did not close ends no later than this.
    watcher.abort();
    let ended_ns = mono_ns();
    tally.nested = nested;

    let entries = world.journal_entries();
    let deaths = deaths.lock().unwrap().clone();
    let all = closed_spans(&entries, |pid| deaths.get(&pid).copied(), ended_ns);
    let lease_of: HashMap<i32, String> = entries
        .iter()
        .filter(|e| e.what == "start")
        .map(|e| (e.pid, e.lease.clone()))
        .collect();
    for slot in &slots {
        let spans: Vec<_> = all
            .iter()
            .copied()
            .filter(|s| lease_of.get(&s.0) == Some(slot))
            .collect();
        if let Some([a, b]) = first_overlap(&spans) {
            println!("{}", logs_mentioning(world.dir.path(), &[a.0, b.0]));
        }
        assert_no_overlap(&spans, &format!("{slot}, seed {seed}, {tally:?}"));
    }
    assert!(
        all.iter().all(|s| slots.contains(&lease_of[&s.0])),
        "a worker ran without one of {slots:?}: {lease_of:?}"
    );
    let most = max_concurrent(&all);
    assert!(
        most <= holders as usize,
        "seed {seed}: {most} workers ran at once with {holders} slots; {tally:?}"
    );
    let spans = all;
    assert!(
        spans.len() >= 2,
        "seed {seed}: too few handoffs to mean anything: {spans:?}"
    );
    // Time with no worker at all (with several slots: with none of them taken).
    let mut down_ns = 0;
    let mut covered_until = began_ns;
    for span in &spans {
        down_ns += span.1.saturating_sub(covered_until);
        covered_until = covered_until.max(span.2);
    }
    let total_ns = covered_until - began_ns;
    println!(
        "chaos seed {seed}: {contenders} contenders, {holders} slot(s), at most {most} at once, {:.0} s: {} worker runs, {} handoffs, \
         {} SIGKILL, {} SIGTERM, {} restarts, faults {:?}, {} deletions, {} overwrites, \
         {} handover requests, {} nested lease-execs; no overlap; worker down {:.1} s of {:.1} s ({:.1}%)",
        length.as_secs_f64(),
        spans.len(),
        spans.len() - 1,
        tally.sigkills,
        tally.sigterms,
        tally.restarts,
        tally.faults,
        tally.deletions,
        tally.overwrites,
        tally.handovers,
        tally.nested,
        down_ns as f64 / 1e9,
        total_ns as f64 / 1e9,
        100.0 * down_ns as f64 / total_ns as f64,
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

#[test]
fn the_overlap_check_flags_a_2_ms_overlap() {
    let ms = 1_000_000;
    let entry = |what: &str, pid: i32, at_ns: u64| Entry {
        what: what.into(),
        pid,
        at_ns,
        identity: "-".into(),
        transitions: "-".into(),
        lease: "-".into(),
    };
    let journal = [
        entry("start", 1, 100 * ms),
        entry("stop", 1, 200 * ms),
        entry("start", 2, 198 * ms),
        entry("stop", 2, 300 * ms),
    ];
    let spans = closed_spans(&journal, |_| None, 400 * ms);
    assert_eq!(first_overlap(&spans).map(|[a, b]| (a.0, b.0)), Some((1, 2)));
    // Back to back is no overlap.
    let journal = [
        entry("start", 1, 100 * ms),
        entry("stop", 1, 200 * ms),
        entry("start", 2, 200 * ms),
    ];
    assert_eq!(
        first_overlap(&closed_spans(&journal, |_| None, 400 * ms)),
        None
    );
    // A worker that never wrote `stop` is open until its observed death.
    let journal = [entry("start", 1, 100 * ms), entry("start", 2, 150 * ms)];
    let spans = closed_spans(&journal, |pid| (pid == 1).then_some(152 * ms), 400 * ms);
    assert!(first_overlap(&spans).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_forced_together_are_caught() {
    let world = World::start().await;
    // No lease-exec: two journaling workers run at once, the second (50 ms) inside the first (1 s).
    let run = |seconds: &str| {
        std::process::Command::new(world.worker())
            .args([world.journal().to_str().unwrap(), seconds, "0"])
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
    let spans = closed_spans(&world.journal_entries(), |_| None, mono_ns());
    let [a, b] = first_overlap(&spans).expect("the overlap is caught");
    // The stamps are exact to a few milliseconds: the overlap is the second worker's 50 ms.
    let overlap_ms = (a.2.min(b.2) - b.1) / 1_000_000;
    assert!(
        (45..=75).contains(&overlap_ms),
        "{overlap_ms} ms: {spans:?}"
    );
}
