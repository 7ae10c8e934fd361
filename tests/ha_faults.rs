//! The ways a Lease changes hands without expiry, each under a fault that hits one client (its own
//! Toxiproxy proxy) or one API server's way to etcd, on the HA control plane (`testenv/cluster up
//! DIR --ha`, see `support/ha.rs`):
//!
//! - a watch cache lagging behind etcd on the followers' API server, the leader on the other;
//! - a deletion while the leader is partitioned from the API;
//! - an overwrite the leader sees late (latency on its proxy);
//! - a handover to a candidate that is partitioned;
//! - a shrink of `leaseDurationSeconds` while the leader's connection is half-open.
//!
//! Exclusion is checked on the kernel's stamps (`support::kernel`): the old worker's exit strictly
//! before the new one's exec; deadlines against the Lease's own `renewTime`/`acquireTime` as a
//! watch on an API server the fault leaves alone saw them. Without Go the tests print `SKIPPED
//! (real tier)` and return; `LEASE_EXEC_REAL_TIER=required` makes that a failure.
//!
//!     LEASE_EXEC_REAL_TIER=required cargo test --test ha_faults

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/ha.rs"]
mod ha;
mod support;

use std::time::Duration;

use cluster::report;
use ha::{Clocks, FAULT, FAULT_ARGS, HaTest, LeaseLog, Toxic, ms};
use nix::sys::signal::Signal;
use support::{KILL_LATE_NS, Run, Running, Timing, alive, assert_no_overlap, holds_for, mono_ns};

const LIMIT: Duration = Duration::from_secs(30);

/// Lease 8 s, renew deadline 6 s: a request's timeout (3 s) fits a second of latency on the way
/// and a new TLS connection through it.
const LAG_ARGS: [&str; 10] = [
    "--lease-duration",
    "8s",
    "--renew-deadline",
    "6s",
    "--renew-interval",
    "1s",
    "--retry-period",
    "500ms",
    "--grace-period",
    "1s",
];
const LAG: Timing = Timing {
    lease: Duration::from_secs(8),
    renew_deadline: Duration::from_secs(6),
    grace: Duration::from_secs(1),
};

/// MicroTime (CLOCK_REALTIME) against CLOCK_MONOTONIC over a test: NTP slews at most 500 ppm.
const CLOCK_TOLERANCE_NS: u64 = 3_000_000;
/// How long after it could first claim a follower's claim may come: its timer, the watch's
/// delivery and the claim request.
const TAKEOVER_SLACK_NS: u64 = 1_000_000_000;

/// Waits until `needle` shows in the log of `running`.
async fn wait_log(running: &Running, what: &str, needle: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !running.stderr().contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} ({needle:?} in the log):\n{}",
            running.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn logs(named: &[(&str, &Running)]) -> String {
    named
        .iter()
        .map(|(name, running)| format!("--- {name}\n{}", running.stderr()))
        .collect()
}

fn runs_of<'r>(runs: &'r [Run], identity: &str) -> Vec<&'r Run> {
    runs.iter()
        .filter(|r| r.identity.as_deref() == Some(identity))
        .collect()
}

/// A leader on API server 0 through its own proxy, and followers on API server `followers_on`
/// through theirs, all waiting for it.
struct Cast {
    leader: Running,
    leader_proxy: ha::Proxy,
    worker_pid: i32,
    followers: Vec<Running>,
    follower_proxies: Vec<ha::Proxy>,
    names: Vec<&'static str>,
}

impl Cast {
    async fn start(t: &HaTest, args: &[&str], followers_on: usize, names: &[&'static str]) -> Cast {
        t.put_released_lease("job").await;
        let leader_proxy = t.proxy("leader", 0).await;
        let leader = t.spawn(t.contender(&leader_proxy.kubeconfig, args, "leader", "job", "info"));
        let worker = t.wait_exec("leader", LIMIT).await;
        let mut followers = Vec::new();
        let mut follower_proxies = Vec::new();
        for id in names {
            let proxy = t.proxy(id, followers_on).await;
            followers.push(t.spawn(t.contender(&proxy.kubeconfig, args, id, "job", "info")));
            follower_proxies.push(proxy);
        }
        for follower in &followers {
            wait_log(follower, "a follower to wait", "held by another identity").await;
        }
        Cast {
            leader,
            leader_proxy,
            worker_pid: worker.pid as i32,
            followers,
            follower_proxies,
            names: names.to_vec(),
        }
    }

    fn logs(&self) -> String {
        let mut named = vec![("leader", &self.leader)];
        named.extend(self.names.iter().copied().zip(self.followers.iter()));
        logs(&named)
    }

    /// Stops the followers (SIGTERM) and waits for them.
    async fn stop_followers(&mut self) {
        for follower in &self.followers {
            follower.signal(Signal::SIGTERM);
        }
        for follower in &mut self.followers {
            follower.wait(LIMIT).await;
        }
    }
}

/// What a change of hands looked like, all on CLOCK_MONOTONIC.
struct Handoff {
    /// `renewTime` of the old leader's last version.
    renewed_ns: u64,
    old_exit_ns: u64,
    /// `acquireTime` of the first version naming a follower.
    claim_ns: u64,
    new_exec_ns: u64,
    new_holder: String,
}

impl Handoff {
    /// Asserts what holds for every change of hands: the old worker's exit strictly before the
    /// new one's exec (no overlap among all workers), and the new holder's fencing token above
    /// the old one's.
    fn of(log: &LeaseLog, runs: &[Run], followers: &[&str], context: &str) -> Handoff {
        let spans: Vec<_> = runs.iter().map(Run::span).collect();
        assert_no_overlap(&spans, &context);
        let clocks = Clocks::sample();
        let last = log
            .last_by("leader")
            .unwrap_or_else(|| panic!("no version naming the leader; {context}"));
        let claim = log
            .versions()
            .into_iter()
            .find(|v| followers.contains(&v.holder().as_str()))
            .unwrap_or_else(|| panic!("no version naming a follower; {context}"));
        let new_holder = claim.holder();
        let olds = runs_of(runs, "leader");
        assert_eq!(olds.len(), 1, "the leader's workers: {runs:?}; {context}");
        let news = runs_of(runs, &new_holder);
        assert!(
            !news.is_empty(),
            "{new_holder} ran no worker: {runs:?}; {context}"
        );
        let (old, new) = (olds[0], news[0]);
        assert!(
            old.exit_ns < new.exec_ns,
            "the leader's worker exited {:.3} ms after {new_holder}'s exec; {context}",
            ms(new.exec_ns, old.exit_ns)
        );
        assert!(
            new.transitions > old.transitions,
            "fencing tokens {:?} then {:?}; {context}",
            old.transitions,
            new.transitions
        );
        Handoff {
            renewed_ns: last.renew_ns(&clocks).expect("renewTime"),
            old_exit_ns: old.exit_ns,
            claim_ns: claim.acquire_ns(&clocks).expect("acquireTime"),
            new_exec_ns: new.exec_ns,
            new_holder,
        }
    }

    /// The old worker dead by its lease-exec's kill deadline (last renewal + lease − margin).
    fn assert_killed_in_time(&self, timing: &Timing, context: &str) {
        let kill_by = self.renewed_ns + timing.kill_by_ns();
        assert!(
            self.old_exit_ns <= kill_by + KILL_LATE_NS,
            "the leader's worker exited {:.1} ms after its kill deadline; {context}",
            ms(kill_by, self.old_exit_ns)
        );
    }

    /// The claim no earlier than `earliest_ns` (a MicroTime compared with a monotonic stamp).
    fn assert_claim_not_before(&self, earliest_ns: u64, what: &str, context: &str) {
        assert!(
            self.claim_ns + CLOCK_TOLERANCE_NS >= earliest_ns,
            "{} claimed {:.1} ms before {what}; {context}",
            self.new_holder,
            ms(self.claim_ns, earliest_ns)
        );
    }

    fn summary(&self) -> String {
        format!(
            "last renewal -> old worker's exit {:.2} s, -> {}'s claim {:.2} s, -> its exec {:.2} s; old exit -> new exec {:.1} ms",
            ms(self.renewed_ns, self.old_exit_ns) / 1e3,
            self.new_holder,
            ms(self.renewed_ns, self.claim_ns) / 1e3,
            ms(self.renewed_ns, self.new_exec_ns) / 1e3,
            ms(self.old_exit_ns, self.new_exec_ns),
        )
    }
}

// ------------------------------------------------------------------------------------------------
// A watch cache lagging behind etcd

const CACHE_LAG_MS: u64 = 1000;

/// The followers' API server (1) reaches etcd through a second of latency (a toxic between it and
/// every etcd member), so its watch cache, and every watch the followers hold on it, lags a
/// second behind etcd; the leader renews through API server 0, whose cache is current. While
/// the leader renews, for two lease durations, nobody claims. Then the leader's lease-exec and
/// worker are SIGKILLed: a follower may claim no earlier than a lease duration after it could
/// have seen the last renewal (its `renewTime` plus the lag), and does within the lag and a
/// second more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cache_lagging_behind_etcd_under_the_followers() {
    let Some(t) = HaTest::begin("cache-lag").await else {
        return;
    };
    let log = t.observe(0, "job").await;
    let mut cast = Cast::start(&t, &LAG_ARGS, 1, &["f1", "f2"]).await;
    let lagging = t.observe(1, "job").await;
    t.etcd_toxic(1, Toxic::Latency(CACHE_LAG_MS)).await;
    let lag_ns = mono_ns();

    // The lag is there: a renewal reaches API server 1's watchers at least the latency after API
    // server 0's (a fault that failed to apply would make the rest vacuous).
    let renewal = log
        .wait_renewal("leader", lag_ns + 1_000_000_000, LIMIT)
        .await;
    let late = lagging
        .wait(LIMIT, "the renewal on the lagging API server", |v| {
            v.rv() == renewal.rv()
        })
        .await;
    let behind_ms = ms(renewal.at_ns, late.at_ns);
    assert!(
        behind_ms >= CACHE_LAG_MS as f64 * 0.9,
        "API server 1's watch cache is only {behind_ms:.0} ms behind API server 0's"
    );

    let held = holds_for(2 * LAG.lease, || {
        if let Some(v) = log.first_other("leader") {
            return Err(format!("{} claimed: {}", v.holder(), v.lease["spec"]));
        }
        if !alive(cast.worker_pid) {
            return Err("the leader's worker died".into());
        }
        match t.spans().len() {
            1 => Ok(()),
            n => Err(format!("{n} workers")),
        }
    })
    .await;
    assert!(held.is_ok(), "{held:?}\n{}", cast.logs());
    let renewals = log.renewals("leader", &Clocks::sample());
    let during = renewals.iter().filter(|&&r| r > lag_ns).count();
    assert!(during >= 10, "the leader renewed only {during} times");

    cast.leader.child.start_kill().unwrap();
    ha::kill_worker(cast.worker_pid, &t.journal());
    cast.leader.wait(LIMIT).await;
    let claim = log
        .wait(LIMIT, "a follower's claim", |v| {
            ["f1", "f2"].contains(&v.holder().as_str())
        })
        .await;
    t.wait_exec(&claim.holder(), LIMIT).await;
    cast.stop_followers().await;
    t.heal_etcd(1).await;
    let runs = t.runs().await;
    let context = format!("runs {runs:?}\n{}", cast.logs());
    let handoff = Handoff::of(&log, &runs, &["f1", "f2"], &context);
    let earliest = handoff.renewed_ns + LAG.lease.as_nanos() as u64 + CACHE_LAG_MS * 1_000_000;
    handoff.assert_claim_not_before(
        earliest,
        "a lease duration after it could have seen the last renewal",
        &context,
    );
    assert!(
        handoff.claim_ns <= earliest + TAKEOVER_SLACK_NS,
        "the claim came {:.2} s after the last renewal; {context}",
        ms(handoff.renewed_ns, handoff.claim_ns) / 1e3
    );
    report(&format!(
        "ha faults: watch cache of the followers' API server {behind_ms:.0} ms behind etcd: nobody claimed in 16 s of renewals ({during}); after the leader's SIGKILL: {}",
        handoff.summary()
    ));
}

// ------------------------------------------------------------------------------------------------
// Deletion, overwrite, handover, shrink, each with a fault on one client

/// The Lease is deleted while its leader is partitioned (its proxy refuses and cuts): the leader
/// cannot re-create it and loses at its renew deadline; the followers, which saw the deleted
/// record, honour its term: nobody creates the Lease before a lease duration after the leader's
/// last renewal, and the leader's worker is dead by its kill deadline, before the new one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_while_the_leader_is_partitioned() {
    let Some(t) = HaTest::begin("delete-cut").await else {
        return;
    };
    let log = t.observe(1, "job").await;
    let mut cast = Cast::start(&t, &FAULT_ARGS, 1, &["f1", "f2"]).await;
    log.wait_renewal("leader", mono_ns(), LIMIT).await;
    t.toxic(&cast.leader_proxy, Toxic::Partition).await;
    t.kubectl(1, &["delete", "lease", "job"], None)
        .await
        .expect("delete lease");
    let code = cast.leader.wait(LIMIT).await;
    assert_eq!(code, 75, "{}", cast.logs());
    let claim = log
        .wait(LIMIT, "a follower's create", |v| {
            ["f1", "f2"].contains(&v.holder().as_str())
        })
        .await;
    assert_eq!(claim.kind, "ADDED", "a create after the deletion");
    t.wait_exec(&claim.holder(), LIMIT).await;
    cast.stop_followers().await;
    t.heal(&cast.leader_proxy).await;
    let runs = t.runs().await;
    let context = format!("runs {runs:?}\n{}", cast.logs());
    let handoff = Handoff::of(&log, &runs, &["f1", "f2"], &context);
    handoff.assert_killed_in_time(&FAULT, &context);
    handoff.assert_claim_not_before(
        handoff.renewed_ns + FAULT.lease.as_nanos() as u64,
        "the deleted record's term ended",
        &context,
    );
    report(&format!(
        "ha faults: deleted while the leader was partitioned: {}",
        handoff.summary()
    ));
}

const OVERWRITE_LATENCY_MS: u64 = 500;

/// An operator overwrites the Lease (another holder, a lease duration of 8 s) while everything the
/// leader's API server sends it comes half a second late (latency on its proxy): the leader
/// learns of it no sooner than the latency after the write and SIGKILLs its worker at once (within
/// the latency and a second); the followers wait out the operator's term before claiming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwrite_seen_late_by_the_leader() {
    let Some(t) = HaTest::begin("overwrite-lag").await else {
        return;
    };
    let log = t.observe(1, "job").await;
    let mut cast = Cast::start(&t, &LAG_ARGS, 1, &["f1", "f2"]).await;
    t.toxic(&cast.leader_proxy, Toxic::Latency(OVERWRITE_LATENCY_MS))
        .await;
    // A renewal through the latency, so it is in force.
    log.wait_renewal(
        "leader",
        mono_ns() + OVERWRITE_LATENCY_MS * 1_000_000,
        LIMIT,
    )
    .await;
    let lease = t.lease(1, "job").await.expect("the lease");
    let token = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0) + 10;
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let patch = serde_json::json!({"spec": {
        "holderIdentity": "operator",
        "leaseDurationSeconds": 8,
        "acquireTime": now,
        "renewTime": now,
        "leaseTransitions": token,
    }})
    .to_string();
    let before_ns = mono_ns();
    t.kubectl(
        1,
        &["patch", "lease", "job", "--type", "merge", "-p", &patch],
        None,
    )
    .await
    .expect("overwrite");
    let after_ns = mono_ns();
    assert_eq!(cast.leader.wait(LIMIT).await, 75, "{}", cast.logs());
    assert!(
        cast.leader.stderr().contains("the lease was taken"),
        "{}",
        cast.logs()
    );
    let overwrite = log
        .wait(LIMIT, "the overwrite", |v| v.holder() == "operator")
        .await;
    let claim = log
        .wait(Duration::from_secs(40), "a follower's claim", |v| {
            ["f1", "f2"].contains(&v.holder().as_str())
        })
        .await;
    t.wait_exec(&claim.holder(), LIMIT).await;
    cast.stop_followers().await;
    t.heal(&cast.leader_proxy).await;
    let runs = t.runs().await;
    let context = format!("runs {runs:?}\n{}", cast.logs());
    let handoff = Handoff::of(&log, &runs, &["f1", "f2"], &context);
    let exit_ns = handoff.old_exit_ns;
    let latency_ns = OVERWRITE_LATENCY_MS * 1_000_000;
    assert!(
        exit_ns >= before_ns + latency_ns,
        "the leader's worker died {:.1} ms after the overwrite was sent: sooner than its latency; {context}",
        ms(before_ns, exit_ns)
    );
    assert!(
        exit_ns <= after_ns + latency_ns + 1_000_000_000,
        "the leader's worker died {:.1} ms after the overwrite; {context}",
        ms(after_ns, exit_ns)
    );
    let clocks = Clocks::sample();
    let operator_ns = overwrite.renew_ns(&clocks).expect("renewTime");
    handoff.assert_claim_not_before(
        operator_ns + LAG.lease.as_nanos() as u64,
        "the operator's term ended",
        &context,
    );
    report(&format!(
        "ha faults: overwrite seen through {OVERWRITE_LATENCY_MS} ms of latency: the leader's worker dead {:.1} ms after it; {} claimed {:.2} s after the operator's write",
        ms(after_ns, exit_ns),
        handoff.new_holder,
        ms(operator_ns, handoff.claim_ns) / 1e3
    ));
}

/// `lease-exec --handover --to b` while b is partitioned: the leader steps down and releases,
/// b never comes, and c defers to b for one lease duration from the release before claiming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_to_a_partitioned_candidate() {
    let Some(t) = HaTest::begin("handover-cut").await else {
        return;
    };
    let log = t.observe(0, "job").await;
    let mut cast = Cast::start(&t, &FAULT_ARGS, 1, &["b", "c"]).await;
    t.toxic(&cast.follower_proxies[0], Toxic::Partition).await;
    let mut handover = tokio::process::Command::new(support::BIN);
    handover
        .args(FAULT_ARGS)
        .args(["--namespace", &t.ns, "--handover", "--to", "b", "job"])
        .env("KUBECONFIG", t.ha.kubeconfig(0))
        .kill_on_drop(true);
    let out = tokio::time::timeout(LIMIT, handover.output())
        .await
        .expect("--handover ran too long")
        .expect("run --handover");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{stderr}\n{}",
        cast.logs()
    );
    assert!(stdout.contains("-> c"), "{stdout}");
    assert_eq!(cast.leader.wait(LIMIT).await, 75, "{}", cast.logs());
    t.wait_exec("c", LIMIT).await;
    assert!(
        log.versions().iter().all(|v| v.holder() != "b"),
        "the partitioned candidate held the Lease"
    );
    let release = log
        .versions()
        .into_iter()
        .find(|v| v.holder().is_empty() && v.lease["spec"]["preferredHolder"] == "b")
        .expect("the release keeping the request");
    cast.stop_followers().await;
    t.heal(&cast.follower_proxies[0]).await;
    let runs = t.runs().await;
    let context = format!(
        "runs {runs:?}\n{}\n--handover: {stdout}{stderr}",
        cast.logs()
    );
    let handoff = Handoff::of(&log, &runs, &["c"], &context);
    let released_ns = release
        .renew_ns(&Clocks::sample())
        .expect("the release's renewTime");
    handoff.assert_claim_not_before(
        released_ns + FAULT.lease.as_nanos() as u64,
        "a lease duration after the release for b",
        &context,
    );
    assert!(
        handoff.claim_ns <= released_ns + FAULT.lease.as_nanos() as u64 + TAKEOVER_SLACK_NS,
        "c claimed {:.2} s after the release; {context}",
        ms(released_ns, handoff.claim_ns) / 1e3
    );
    report(&format!(
        "ha faults: handover to a partitioned candidate: c claimed {:.2} s after the release; {}",
        ms(released_ns, handoff.claim_ns) / 1e3,
        handoff.summary()
    ));
}

/// An operator shrinks `leaseDurationSeconds` to 1 s (holder and `renewTime` kept) while the
/// leader's connection is half-open, so it can neither see nor undo the edit and loses at its renew
/// deadline. The followers had seen the 5 s record with that `renewTime`: they count the longest
/// duration seen for it, so nobody claims before the leader's last renewal + 5 s, and the leader's
/// worker is dead by its kill deadline, before the new one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_while_the_leader_is_half_open() {
    let Some(t) = HaTest::begin("shrink-half-open").await else {
        return;
    };
    let log = t.observe(1, "job").await;
    let mut cast = Cast::start(&t, &FAULT_ARGS, 1, &["f1", "f2"]).await;
    log.wait_renewal("leader", mono_ns(), LIMIT).await;
    t.toxic(&cast.leader_proxy, Toxic::HalfOpen).await;
    t.kubectl(
        1,
        &[
            "patch",
            "lease",
            "job",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"leaseDurationSeconds":1}}"#,
        ],
        None,
    )
    .await
    .expect("shrink");
    log.wait(LIMIT, "the shrink", |v| {
        v.holder() == "leader" && v.lease["spec"]["leaseDurationSeconds"] == 1
    })
    .await;
    assert_eq!(cast.leader.wait(LIMIT).await, 75, "{}", cast.logs());
    let claim = log
        .wait(LIMIT, "a follower's claim", |v| {
            ["f1", "f2"].contains(&v.holder().as_str())
        })
        .await;
    t.wait_exec(&claim.holder(), LIMIT).await;
    cast.stop_followers().await;
    t.heal(&cast.leader_proxy).await;
    let runs = t.runs().await;
    let context = format!("runs {runs:?}\n{}", cast.logs());
    let handoff = Handoff::of(&log, &runs, &["f1", "f2"], &context);
    handoff.assert_killed_in_time(&FAULT, &context);
    handoff.assert_claim_not_before(
        handoff.renewed_ns + FAULT.lease.as_nanos() as u64,
        "the leader's own 5 s term ended",
        &context,
    );
    report(&format!(
        "ha faults: shrunk to 1 s while the leader was half-open: {}",
        handoff.summary()
    ));
}
