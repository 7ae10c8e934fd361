//! The HA tier: the real `lease-exec` binary against a highly available control plane
//! (`testenv/cluster up DIR --ha`: three etcd members, two kube-apiservers with their watch caches,
//! a Toxiproxy server), with every contender behind a proxy of its own so that a fault hits one
//! client, one API server or one etcd member at a time.
//!
//! Each test checks exclusion with the kernel's stamps (`support::kernel`): a worker's span runs
//! from the exec of the worker binary to its exit, and the previous worker's exit comes strictly
//! before the next one's exec. The Lease is followed by a watch of the test's own on an API server
//! the fault leaves alone (`support/ha.rs`, `LeaseLog`); its `renewTime` and `acquireTime`, written
//! by lease-exec on this machine, are compared with the kernel's stamps on one clock.
//!
//! Like the real tier, the tests print `SKIPPED (real tier): <reason>` and return without Go, and
//! fail with `LEASE_EXEC_REAL_TIER=required`; `LEASE_EXEC_TESTENV_HA=DIR` points them at a running
//! `up --ha` control plane instead of starting one. Figures are printed past the output capture.
//!
//!     LEASE_EXEC_REAL_TIER=required cargo test --test ha

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/ha.rs"]
mod ha;
mod support;

use std::time::Duration;

use cluster::report;
use ha::{Clocks, FAULT, FAULT_ARGS, HaTest, LeaseLog, Toxic, Version, ms};
use nix::sys::signal::Signal;
use support::{KILL_LATE_NS, Run, Running, Timing, alive, assert_no_overlap, holds_for, mono_ns};

const LIMIT: Duration = Duration::from_secs(30);

/// How far a Lease's MicroTime (CLOCK_REALTIME) may stray from CLOCK_MONOTONIC over a lease
/// duration in a test: NTP slews at most 500 ppm (2.5 ms over 5 s). Comparisons of a MicroTime with
/// a kernel stamp, or of two MicroTimes with a bound that must hold exactly, allow this much.
const CLOCK_TOLERANCE_NS: u64 = 3_000_000;

/// How long after the new holder could first claim (the leader's last renewal plus the lease
/// duration) its claim may come: its watch's delivery, its timer and the claim request.
const TAKEOVER_SLACK_NS: u64 = 1_000_000_000;

/// Waits until `needle` shows in the log of `running`.
async fn wait_log(running: &Running, limit: Duration, what: &str, needle: &str) {
    let deadline = tokio::time::Instant::now() + limit;
    while !running.stderr().contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what} ({needle:?} in the log):\n{}",
            running.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `condition` every 100 ms until it holds; panics naming `what` after `limit`.
async fn until<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every lease-exec log of the test, for a failure message.
fn logs(named: &[(&str, &Running)]) -> String {
    named
        .iter()
        .map(|(name, running)| format!("--- {name}\n{}", running.stderr()))
        .collect()
}

/// The runs of `identity`.
fn runs_of<'r>(runs: &'r [Run], identity: &str) -> Vec<&'r Run> {
    runs.iter()
        .filter(|r| r.identity.as_deref() == Some(identity))
        .collect()
}

/// What a takeover after the old leader was cut off looked like, all on CLOCK_MONOTONIC.
struct Takeover {
    /// `renewTime` of the old leader's last committed write.
    renewed_ns: u64,
    /// The kernel's exit stamp of the old leader's worker.
    old_exit_ns: u64,
    /// `acquireTime` of the new holder's claim, as it wrote it.
    claim_ns: u64,
    /// The claim's arrival at the test's watch.
    claim_seen_ns: u64,
    /// The kernel's exec stamp of the new holder's worker.
    new_exec_ns: u64,
    new_holder: String,
}

impl Takeover {
    /// Finds the takeover of `old` in the test's view of the Lease and the kernel's runs, and
    /// asserts what must hold for any takeover by expiry: no overlap (the old worker's exit
    /// strictly before the new one's exec, and no later than the new holder's claim), the old
    /// worker dead by its lease-exec's kill deadline, and the claim no earlier than a lease
    /// duration after the old leader's last renewal.
    fn of(old: &str, log: &LeaseLog, runs: &[Run], timing: &Timing, context: &str) -> Takeover {
        let spans: Vec<_> = runs.iter().map(Run::span).collect();
        assert_no_overlap(&spans, &context);
        let last: Version = log
            .last_by(old)
            .unwrap_or_else(|| panic!("no version naming {old}; {context}"));
        let claim = log
            .first_other(old)
            .unwrap_or_else(|| panic!("no version naming another holder; {context}"));
        let clocks = Clocks::sample();
        let renewed_ns = last.renew_ns(&clocks).expect("renewTime");
        let claim_ns = claim.acquire_ns(&clocks).expect("acquireTime");
        let new_holder = claim.holder();
        let olds = runs_of(runs, old);
        assert_eq!(olds.len(), 1, "{old}'s workers: {runs:?}; {context}");
        let news = runs_of(runs, &new_holder);
        assert!(
            !news.is_empty(),
            "{new_holder} ran no worker: {runs:?}; {context}"
        );
        let (old_run, new_run) = (olds[0], news[0]);
        assert!(
            old_run.exit_ns < new_run.exec_ns,
            "{old}'s worker exited {:.3} ms after {new_holder}'s exec; {context}",
            ms(new_run.exec_ns, old_run.exit_ns)
        );
        assert!(
            old_run.exit_ns <= claim_ns,
            "{old}'s worker exited {:.3} ms after {new_holder} claimed the Lease (acquireTime); {context}",
            ms(claim_ns, old_run.exit_ns)
        );
        let kill_by = renewed_ns + timing.kill_by_ns();
        assert!(
            old_run.exit_ns <= kill_by + KILL_LATE_NS,
            "{old}'s worker exited {:.1} ms after its kill deadline (last renewal + {} ms); {context}",
            ms(kill_by, old_run.exit_ns),
            timing.kill_by_ns() / 1_000_000
        );
        let lease_ns = timing.lease.as_nanos() as u64;
        assert!(
            claim_ns + CLOCK_TOLERANCE_NS >= renewed_ns + lease_ns,
            "{new_holder} claimed {:.1} ms before {old}'s Lease expired (last renewal + {} ms); {context}",
            ms(claim_ns, renewed_ns + lease_ns),
            lease_ns / 1_000_000
        );
        let token = old_run
            .transitions
            .unwrap_or_else(|| panic!("{old}'s worker's LEASE_EXEC_TRANSITIONS unread; {context}"));
        assert_eq!(
            new_run.transitions,
            Some(token + 1),
            "LEASE_EXEC_TRANSITIONS; {context}"
        );
        Takeover {
            renewed_ns,
            old_exit_ns: old_run.exit_ns,
            claim_ns,
            claim_seen_ns: claim.at_ns,
            new_exec_ns: new_run.exec_ns,
            new_holder,
        }
    }

    /// The old worker's exit -> the new one's exec, ms.
    fn margin_ms(&self) -> f64 {
        ms(self.old_exit_ns, self.new_exec_ns)
    }

    /// The old leader's last renewal -> the new holder's claim, s.
    fn takeover_s(&self) -> f64 {
        ms(self.renewed_ns, self.claim_ns) / 1e3
    }

    fn summary(&self) -> String {
        format!(
            "last renewal -> old worker's exit {:.2} s, -> {}'s claim {:.2} s (seen by the test {:.2} s), -> its worker's exec {:.2} s; old exit -> new exec {:.1} ms, old exit -> claim {:.1} ms",
            ms(self.renewed_ns, self.old_exit_ns) / 1e3,
            self.new_holder,
            self.takeover_s(),
            ms(self.renewed_ns, self.claim_seen_ns) / 1e3,
            ms(self.renewed_ns, self.new_exec_ns) / 1e3,
            self.margin_ms(),
            ms(self.old_exit_ns, self.claim_ns),
        )
    }
}

// ------------------------------------------------------------------------------------------------
// 1, 2. The leader cut off: its proxy, or its API server

/// What cuts the leader off.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// A toxic on the leader's own proxy (API server 0 stays up for everyone else).
    Proxy(Toxic),
    /// API server 0, the leader's, stopped (`--freeze`: SIGSTOP; `--kill`: SIGKILL).
    Apiserver(&'static str),
}

/// The leader reaches API server 0 through its proxy, two followers API server 1 through theirs,
/// the test watches on API server 1. The cut must end the leader (worker dead before the new
/// holder's claim and by its kill deadline, exit 75), and one follower takes over within a lease
/// duration and a second of the leader's last renewal.
async fn leader_cut_off(name: &str, cut: Cut) {
    let Some(t) = HaTest::begin(name).await else {
        return;
    };
    t.put_released_lease("job").await;
    let log = t.observe(1, "job").await;
    let leader_proxy = t.proxy("leader", 0).await;
    let mut leader = t.spawn(t.contender(
        &leader_proxy.kubeconfig,
        &FAULT_ARGS,
        "leader",
        "job",
        "info",
    ));
    let worker = t.wait_exec("leader", LIMIT).await;
    let mut followers = Vec::new();
    for id in ["f1", "f2"] {
        let proxy = t.proxy(id, 1).await;
        followers.push(t.spawn(t.contender(&proxy.kubeconfig, &FAULT_ARGS, id, "job", "info")));
    }
    for follower in &followers {
        wait_log(
            follower,
            LIMIT,
            "a follower to wait",
            "held by another identity",
        )
        .await;
    }
    log.wait_renewal("leader", mono_ns(), LIMIT).await;

    let cut_ns = mono_ns();
    match cut {
        Cut::Proxy(toxic) => t.toxic(&leader_proxy, toxic).await,
        Cut::Apiserver(flag) => t.stop_apiserver(0, Some(flag)).await,
    }
    let code = leader.wait(LIMIT).await;
    let all = |leader: &Running, followers: &[Running]| {
        logs(&[
            ("leader", leader),
            ("f1", &followers[0]),
            ("f2", &followers[1]),
        ])
    };
    assert_eq!(
        code,
        75,
        "the leader's exit after {cut:?}\n{}",
        all(&leader, &followers)
    );
    assert!(!alive(worker.pid as i32), "{}", all(&leader, &followers));
    let claim = log
        .wait(LIMIT, "a follower's claim", |v| {
            ["f1", "f2"].contains(&v.holder().as_str())
        })
        .await;
    let new_holder = claim.holder();
    t.wait_exec(&new_holder, LIMIT).await;
    for follower in &followers {
        follower.signal(Signal::SIGTERM);
    }
    for follower in &mut followers {
        follower.wait(LIMIT).await;
    }
    match cut {
        Cut::Proxy(_) => t.heal(&leader_proxy).await,
        Cut::Apiserver(_) => t.start_apiserver(0).await,
    }
    let runs = t.runs().await;
    let context = format!("{cut:?}; runs {runs:?}\n{}", all(&leader, &followers));
    let takeover = Takeover::of("leader", &log, &runs, &FAULT, &context);
    let what = match cut {
        Cut::Proxy(toxic) => format!("{toxic} on the leader's proxy"),
        Cut::Apiserver(flag) => format!("the leader's API server stopped ({flag})"),
    };
    report(&format!(
        "ha tier: {what} ({:.2} s after its last renewal; lease 5 s, renew deadline 3 s): {}",
        ms(takeover.renewed_ns, cut_ns) / 1e3,
        takeover.summary()
    ));
    let late = takeover.claim_ns as i128
        - (takeover.renewed_ns + FAULT.lease.as_nanos() as u64 + TAKEOVER_SLACK_NS) as i128;
    assert!(
        late <= 0,
        "the takeover came {:.2} s after the last renewal, {:.1} ms later than the lease duration + 1 s; {context}",
        takeover.takeover_s(),
        late as f64 / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_partitioned_through_its_proxy() {
    leader_cut_off("partition", Cut::Proxy(Toxic::Partition)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_half_open_through_its_proxy() {
    leader_cut_off("half-open", Cut::Proxy(Toxic::HalfOpen)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_reset_through_its_proxy() {
    leader_cut_off("reset", Cut::Proxy(Toxic::Reset)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_api_server_frozen() {
    leader_cut_off("frozen", Cut::Apiserver("--freeze")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_api_server_killed() {
    leader_cut_off("killed", Cut::Apiserver("--kill")).await;
}

// ------------------------------------------------------------------------------------------------
// 3. The etcd leader killed under a leading lease-exec

/// Lease 6 s, renew deadline 4 s: an etcd election (1–2 s) must fit in the renew deadline.
const ETCD_ARGS: [&str; 10] = [
    "--lease-duration",
    "6s",
    "--renew-deadline",
    "4s",
    "--renew-interval",
    "1s",
    "--retry-period",
    "500ms",
    "--grace-period",
    "1s",
];
const ETCD_RENEW_DEADLINE_NS: u64 = 4_000_000_000;
const ETCD_LEASE: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_killed_while_leading() {
    let Some(t) = HaTest::begin("etcd-leader").await else {
        return;
    };
    t.put_released_lease("job").await;
    let log = t.observe(1, "job").await;
    let leader_proxy = t.proxy("leader", 0).await;
    let mut leader = t.spawn(t.contender(
        &leader_proxy.kubeconfig,
        &ETCD_ARGS,
        "leader",
        "job",
        "info",
    ));
    let worker = t.wait_exec("leader", LIMIT).await;
    let follower_proxy = t.proxy("follower", 1).await;
    let mut follower = t.spawn(t.contender(
        &follower_proxy.kubeconfig,
        &ETCD_ARGS,
        "follower",
        "job",
        "info",
    ));
    wait_log(
        &follower,
        LIMIT,
        "the follower to wait",
        "held by another identity",
    )
    .await;
    log.wait_renewal("leader", mono_ns(), LIMIT).await;

    let member = t.etcd_leader().await.expect("cluster etcd-leader");
    let killed_ns = mono_ns();
    t.stop_etcd(member, Some("--kill")).await;
    // A new etcd leader among the other two.
    let mut elected = None;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while elected.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new etcd leader within {LIMIT:?} of killing member {member}"
        );
        if let Some(m) = t.etcd_leader().await.filter(|&m| m != member) {
            elected = Some((m, mono_ns()));
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (new_member, elected_ns) = elected.unwrap();
    // The premise: etcd elects a leader within the renew deadline. Past it, losing leadership
    // would be right.
    assert!(
        elected_ns - killed_ns < ETCD_RENEW_DEADLINE_NS,
        "etcd took {:.2} s to elect a new leader, longer than the renew deadline: the test cannot judge lease-exec here",
        ms(killed_ns, elected_ns) / 1e3
    );
    // A lease duration from the election on: the same worker, the leader running, nobody else.
    let check = |leader: &mut Running, follower: &mut Running| -> Result<(), String> {
        if !alive(worker.pid as i32) {
            return Err(format!("the leader's worker {} died", worker.pid));
        }
        if leader.exited() {
            return Err("the leader exited".into());
        }
        if follower.exited() {
            return Err("the follower exited".into());
        }
        let spans = t.spans();
        if spans.len() != 1 {
            return Err(format!("workers: {spans:?}"));
        }
        Ok(())
    };
    let held = holds_for(ETCD_LEASE, || check(&mut leader, &mut follower)).await;
    let all =
        |leader: &Running, follower: &Running| logs(&[("leader", leader), ("follower", follower)]);
    assert!(
        held.is_ok(),
        "after etcd member {member} (the leader) was killed: {}\n{}",
        held.unwrap_err(),
        all(&leader, &follower)
    );
    t.start_etcd(member).await;
    let back_ns = mono_ns();
    log.wait_renewal("leader", back_ns, LIMIT).await;
    check(&mut leader, &mut follower)
        .unwrap_or_else(|e| panic!("after member {member} came back: {e}"));

    // Every renewal from the last one before the kill on, as the watch saw them.
    let renewals = log.renewals("leader", &Clocks::sample());
    let from = renewals
        .iter()
        .rposition(|&r| r <= killed_ns)
        .expect("a renewal before the kill");
    let during = &renewals[from..];
    let (longest, at) = during
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max()
        .unwrap_or((0, 0));
    let resyncs = log.resyncs();
    follower.signal(Signal::SIGTERM);
    follower.wait(LIMIT).await;
    leader.signal(Signal::SIGTERM);
    let code = leader.wait(LIMIT).await;
    assert_eq!(code, 143, "{}", all(&leader, &follower));
    let runs = t.runs().await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    report(&format!(
        "ha tier: etcd leader (member {member}) killed while leading (lease 6 s, renew deadline 4 s): member {new_member} leader {:.2} s later; the worker kept running; {} renewals from the last before the kill to member {member}'s return, longest gap {:.2} s (starting {:.2} s after the kill){}",
        ms(killed_ns, elected_ns) / 1e3,
        during.len() - 1,
        longest as f64 / 1e9,
        ms(killed_ns, at) / 1e3,
        if resyncs.is_empty() {
            String::new()
        } else {
            format!("; the test's watch re-opened {} time(s)", resyncs.len())
        }
    ));
    assert!(
        longest < ETCD_RENEW_DEADLINE_NS,
        "renewals {:.2} s apart: {during:?}",
        longest as f64 / 1e9
    );
}

// ------------------------------------------------------------------------------------------------
// 4. Followers behind a lagging proxy

/// Lease 8 s, renew deadline 6 s: a follower's request timeout (half the renew deadline, 3 s)
/// must fit a new TLS connection and a request through the proxies' latency.
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
const LAG_LEASE: Duration = Duration::from_secs(8);
const LATENCY_MS: u64 = 1000;

/// Two followers reach API server 1 through proxies that delay everything the API server sends
/// them by a second (Toxiproxy's latency toxic, downstream), so they see every version of the
/// Lease a second late. While the leader renews, for two lease durations, neither claims. Then the
/// leader's lease-exec and worker are SIGKILLed (a Pod gone at once: nothing released), and the
/// claim must come no earlier than a lease duration after the followers could first have seen the
/// leader's last renewal (its `renewTime` plus the latency), and within a second and a latency
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_followers_never_claim_early() {
    let Some(t) = HaTest::begin("lagging").await else {
        return;
    };
    t.put_released_lease("job").await;
    let log = t.observe(1, "job").await;
    let leader_proxy = t.proxy("leader", 0).await;
    let mut leader =
        t.spawn(t.contender(&leader_proxy.kubeconfig, &LAG_ARGS, "leader", "job", "info"));
    let worker = t.wait_exec("leader", LIMIT).await;
    let mut followers = Vec::new();
    let mut proxies = Vec::new();
    for id in ["f1", "f2"] {
        let proxy = t.proxy(id, 1).await;
        followers.push(t.spawn(t.contender(&proxy.kubeconfig, &LAG_ARGS, id, "job", "info")));
        proxies.push(proxy);
    }
    for follower in &followers {
        wait_log(
            follower,
            LIMIT,
            "a follower to wait",
            "held by another identity",
        )
        .await;
    }
    for proxy in &proxies {
        t.toxic(proxy, Toxic::Latency(LATENCY_MS)).await;
    }
    let lagging_ns = mono_ns();
    let all = |leader: &Running, followers: &[Running]| {
        logs(&[
            ("leader", leader),
            ("f1", &followers[0]),
            ("f2", &followers[1]),
        ])
    };

    // While the leader renews: nobody else claims or runs, for two lease durations.
    let held = holds_for(2 * LAG_LEASE, || {
        if let Some(v) = log.first_other("leader") {
            return Err(format!(
                "{} claimed the Lease: {}",
                v.holder(),
                v.lease["spec"]
            ));
        }
        if !alive(worker.pid as i32) {
            return Err("the leader's worker died".into());
        }
        let spans = t.spans();
        if spans.len() != 1 {
            return Err(format!("workers: {spans:?}"));
        }
        Ok(())
    })
    .await;
    assert!(held.is_ok(), "{held:?}\n{}", all(&leader, &followers));
    let renewals = log.renewals("leader", &Clocks::sample());
    let during = renewals.iter().filter(|&&r| r > lagging_ns).count();
    assert!(
        during >= 8,
        "the leader renewed only {during} times: {renewals:?}"
    );

    // The leader's Pod dies: lease-exec and its worker SIGKILLed, so nothing is released.
    leader.child.start_kill().unwrap();
    ha::kill_worker(worker.pid as i32, &t.journal());
    let killed_ns = mono_ns();
    leader.wait(LIMIT).await;
    let claim = log
        .wait(LIMIT, "a follower's claim", |v| {
            ["f1", "f2"].contains(&v.holder().as_str())
        })
        .await;
    t.wait_exec(&claim.holder(), LIMIT).await;
    for follower in &followers {
        follower.signal(Signal::SIGTERM);
    }
    for follower in &mut followers {
        follower.wait(LIMIT).await;
    }
    let runs = t.runs().await;
    let context = format!("runs {runs:?}\n{}", all(&leader, &followers));
    let lag = Timing {
        lease: LAG_LEASE,
        renew_deadline: Duration::from_secs(6),
        grace: Duration::from_secs(1),
    };
    let takeover = Takeover::of("leader", &log, &runs, &lag, &context);
    // The followers saw the last renewal no sooner than LATENCY_MS after it was written, and
    // count the lease duration from that sight on their own clock.
    let earliest = takeover.renewed_ns + (LAG_LEASE.as_millis() as u64 + LATENCY_MS) * 1_000_000;
    report(&format!(
        "ha tier: followers behind {LATENCY_MS} ms of latency (lease 8 s): nobody claimed in {:.0} s of renewals ({during} of them); after the leader's SIGKILL ({:.2} s after its last renewal) {} claimed {:.2} s after that renewal, {:.1} ms after the lease duration + latency; {}",
        2.0 * LAG_LEASE.as_secs_f64(),
        ms(takeover.renewed_ns, killed_ns) / 1e3,
        takeover.new_holder,
        takeover.takeover_s(),
        ms(earliest, takeover.claim_ns),
        takeover.summary()
    ));
    assert!(
        takeover.claim_ns + CLOCK_TOLERANCE_NS >= earliest,
        "{} claimed {:.1} ms before a lease duration had passed since it could have seen the last renewal (renewal + {LATENCY_MS} ms latency + 8 s); {context}",
        takeover.new_holder,
        ms(takeover.claim_ns, earliest)
    );
    assert!(
        takeover.claim_ns <= earliest + LATENCY_MS * 1_000_000 + TAKEOVER_SLACK_NS,
        "the takeover came {:.2} s after the last renewal; {context}",
        takeover.takeover_s()
    );
}

// ------------------------------------------------------------------------------------------------
// 5. The service account token rotated, and the old one revoked, while leading

const RBAC: &str = include_str!("../deploy/rbac.yaml");

/// `path`, written as the kubelet writes a projected volume: a new file renamed over the old.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A kubeconfig for the server of `through` (a proxy's kubeconfig) whose user is the bearer token
/// read from `token_file` (`tokenFile`, re-read by clients as it rotates), namespace `ns`.
fn token_file_kubeconfig(
    through: &std::path::Path,
    token_file: &std::path::Path,
    ns: &str,
) -> String {
    let config = kube::config::Kubeconfig::read_from(through).expect("the proxy's kubeconfig");
    let cluster = config
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .expect("a cluster in the proxy's kubeconfig");
    let mut entry = serde_json::json!({ "server": cluster.server.expect("server") });
    if let Some(data) = cluster.certificate_authority_data {
        entry["certificate-authority-data"] = data.into();
    }
    if let Some(file) = cluster.certificate_authority {
        entry["certificate-authority"] = file.into();
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "ha", "cluster": entry }],
        "users": [{ "name": "sa", "user": { "tokenFile": token_file } }],
        "contexts": [{ "name": "ha", "context": { "cluster": "ha", "user": "sa", "namespace": ns } }],
        "current-context": "ha",
    })
    .to_string()
}

/// `kubectl create token lease-exec` bound to the Secret `secret`.
async fn bound_token(t: &HaTest, secret: &str) -> String {
    t.kubectl(
        0,
        &[
            "create",
            "token",
            "lease-exec",
            "--bound-object-kind",
            "Secret",
            "--bound-object-name",
            secret,
            "--duration",
            "1h",
        ],
        None,
    )
    .await
    .expect("create token")
    .trim()
    .to_string()
}

/// The testenv client-go contender (`testenv/bin/contender`) for `lease` as `identity` through
/// `kubeconfig`, with FAULT's timings and the journaling worker writing to `journal`.
fn client_go(
    t: &HaTest,
    kubeconfig: &std::path::Path,
    lease: &str,
    identity: &str,
    journal: &std::path::Path,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(cluster::contender_bin());
    command
        .args([
            "--lease-name",
            lease,
            "--namespace",
            &t.ns,
            "--identity",
            identity,
            "--lease-duration",
            "5s",
            "--renew-deadline",
            "3s",
            "--retry-period",
            "500ms",
            "--grace-period",
            "1s",
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .arg("--")
        .arg(support::journal_worker())
        .arg(journal)
        .args(["-1", "0"])
        .env("LEASE_EXEC_HELD_IDENTITY", identity)
        .stdin(std::process::Stdio::null());
    command
}

/// A leader whose credentials are a ServiceAccount token file (`tokenFile` in its kubeconfig, as
/// a projected token volume gives them, re-read as it rotates): the file is rewritten with a token
/// bound to another Secret, then after `revoke_after` the old token is revoked (its Secret
/// deleted, until the leader's API server refuses it). Leadership must be kept: the worker runs
/// on and renewals go on after the revocation, for a lease duration and a second. The testenv
/// client-go contender runs the same scenario beside it, on a Lease of its own, as the reference:
/// its outcome is reported, not asserted.
///
/// The old token revoked right after the rotation (a Pod-bound token whose Pod is deleted, an
/// operator revoking a leaked token). lease-exec reads the token file at every request, so its
/// next renewal carries the new token. client-go's `BearerTokenFile` keeps its copy for 50 s and
/// does not read the file again on a 401: its leader loses (exit 75), as kube-rs' own `TokenFile`
/// would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_right_after_its_rotation_keeps_leadership() {
    token_rotation("token-now", Duration::ZERO).await;
}

async fn token_rotation(name: &str, revoke_after: Duration) {
    let Some(t) = HaTest::begin(name).await else {
        return;
    };
    t.kubectl(0, &["apply", "-f", "-"], Some(RBAC))
        .await
        .expect("apply rbac");
    for secret in ["token-a", "token-b"] {
        t.kubectl(0, &["create", "secret", "generic", secret], None)
            .await
            .expect("create secret");
    }
    let sa = format!("system:serviceaccount:{}:lease-exec", t.ns);
    for n in 0..ha::APISERVERS {
        until(LIMIT, "the Role to be served", || async {
            let out = t
                .kubectl(
                    n,
                    &[
                        "auth",
                        "can-i",
                        "update",
                        "leases.coordination.k8s.io",
                        "--as",
                        &sa,
                    ],
                    None,
                )
                .await;
            out.stdout.trim() == "yes"
        })
        .await;
    }
    let old_token = bound_token(&t, "token-a").await;
    let token_file = t.path("token");
    write_atomically(&token_file, &old_token);
    let proxy = t.proxy("leader", 0).await;
    let kubeconfig = t.path("sa.kubeconfig");
    std::fs::write(
        &kubeconfig,
        token_file_kubeconfig(&proxy.kubeconfig, &token_file, &t.ns),
    )
    .unwrap();
    let cg_proxy = t.proxy("client-go", 0).await;
    let cg_kubeconfig = t.path("cg.kubeconfig");
    std::fs::write(
        &cg_kubeconfig,
        token_file_kubeconfig(&cg_proxy.kubeconfig, &token_file, &t.ns),
    )
    .unwrap();

    t.put_released_lease("job").await;
    let log = t.observe(1, "job").await;
    let mut leader = t.spawn(t.contender(&kubeconfig, &FAULT_ARGS, "leader", "job", "info"));
    let worker = t.wait_exec("leader", LIMIT).await;
    let follower_proxy = t.proxy("follower", 1).await;
    let mut follower = t.spawn(t.contender(
        &follower_proxy.kubeconfig,
        &FAULT_ARGS,
        "follower",
        "job",
        "info",
    ));
    wait_log(
        &follower,
        LIMIT,
        "the follower to wait",
        "held by another identity",
    )
    .await;
    let cg_journal = t.path("client-go-journal");
    let mut reference = t.spawn(client_go(
        &t,
        &cg_kubeconfig,
        "cg",
        "cg-leader",
        &cg_journal,
    ));
    wait_log(&reference, LIMIT, "client-go to lead", "worker started").await;
    let cg_log = t.observe(1, "cg").await;
    log.wait_renewal("leader", mono_ns(), LIMIT).await;
    cg_log.wait_renewal("cg-leader", mono_ns(), LIMIT).await;

    // Rotation, then revocation: the Secret the old token is bound to is deleted, and the old token
    // is refused by the leader's API server (each API server caches a token's authentication for
    // up to 10 s).
    let new_token = bound_token(&t, "token-b").await;
    write_atomically(&token_file, &new_token);
    let rotated_ns = mono_ns();
    let cg_worker = support::read_journal(&cg_journal)
        .into_iter()
        .find(|e| e.what == "start")
        .expect("client-go's worker journaled its start");
    let leading = holds_for(revoke_after, || {
        if !alive(worker.pid as i32) {
            return Err("lease-exec's worker died".into());
        }
        if !alive(cg_worker.pid) {
            return Err("client-go's worker died".into());
        }
        Ok(())
    })
    .await;
    assert!(
        leading.is_ok(),
        "before the revocation: {leading:?}\n{}",
        logs(&[("leader", &leader), ("client-go", &reference)])
    );
    t.kubectl(0, &["delete", "secret", "token-a"], None)
        .await
        .expect("delete secret");
    until(LIMIT, "the old token to be refused", || async {
        let out = cluster::kubectl(
            &t.ha.kubeconfig(0),
            &["auth", "whoami", "--token", &old_token],
            None,
        )
        .await;
        !out.ok && out.stderr.contains("Unauthorized")
    })
    .await;
    let revoked_ns = mono_ns();
    let new_ok = cluster::kubectl(
        &t.ha.kubeconfig(0),
        &["auth", "whoami", "--token", &new_token],
        None,
    )
    .await;
    assert!(new_ok.ok, "the new token is refused: {new_ok:?}");

    // A lease duration and a second after the revocation: both leaders still lead.
    let mut lost = Vec::new();
    let _ = holds_for(FAULT.lease + Duration::from_secs(1), || {
        let after = ms(revoked_ns, mono_ns()) / 1e3;
        if (!alive(worker.pid as i32) || leader.exited())
            && !lost.iter().any(|l: &String| l.starts_with("lease-exec"))
        {
            lost.push(format!(
                "lease-exec lost leadership {after:.2} s after the revocation"
            ));
        }
        if !alive(cg_worker.pid) && !lost.iter().any(|l| l.starts_with("client-go")) {
            lost.push(format!(
                "client-go lost leadership {after:.2} s after the revocation"
            ));
        }
        Ok(())
    })
    .await;
    let renewed_after = |log: &LeaseLog, holder: &str| {
        log.renewals(holder, &Clocks::sample())
            .into_iter()
            .filter(|&r| r > revoked_ns)
            .count()
    };
    let (ours, theirs) = (
        renewed_after(&log, "leader"),
        renewed_after(&cg_log, "cg-leader"),
    );
    let leader_log = leader.stderr();
    let refused = leader_log.lines().filter(|l| l.contains("(401)")).count();
    report(&format!(
        "ha tier: token file rotated, the old token revoked {:.2} s later (refused by the leader's API server): lease-exec {} ({ours} renewals after the revocation, {refused} log lines with 401); client-go {} ({theirs} renewals after)",
        ms(rotated_ns, revoked_ns) / 1e3,
        if lost.iter().any(|l| l.starts_with("lease-exec")) {
            "LOST leadership"
        } else {
            "kept leadership"
        },
        if lost.iter().any(|l| l.starts_with("client-go")) {
            "LOST leadership"
        } else {
            "kept leadership"
        },
    ));
    follower.signal(Signal::SIGTERM);
    follower.wait(LIMIT).await;
    reference.signal(Signal::SIGTERM);
    reference.wait(LIMIT).await;
    ha::kill_worker(cg_worker.pid, &cg_journal);
    assert!(
        !lost.iter().any(|l| l.starts_with("lease-exec")) && ours > 0 && refused == 0,
        "{lost:?}; renewals after the revocation: lease-exec {ours}, client-go {theirs}; lease-exec's 401s: {refused}\n{}",
        logs(&[("leader", &leader), ("client-go", &reference)])
    );
    leader.signal(Signal::SIGTERM);
    assert_eq!(leader.wait(LIMIT).await, 143, "{leader_log}");
    let runs = t.runs().await;
    assert_eq!(runs.len(), 1, "{runs:?}");
}

// ------------------------------------------------------------------------------------------------
// 6. 410 Gone from a watch cache

/// Lease 20 s, renew deadline 14 s: the leader rides out its partition while API server 1 restarts.
const GONE_ARGS: [&str; 10] = [
    "--lease-duration",
    "20s",
    "--renew-deadline",
    "14s",
    "--renew-interval",
    "1s",
    "--retry-period",
    "500ms",
    "--grace-period",
    "1s",
];
/// The leader's partition must end this long after it began, well before its renew deadline.
const GONE_PARTITION_LIMIT: Duration = Duration::from_secs(11);

/// The follower watches through API server 1. The leader's proxy is partitioned, so the Lease stays
/// at one version while another object moves etcd on, and API server 1 is killed, etcd compacted
/// and API server 1 started again: its watch cache starts at the current revision, so the
/// follower's watch from the Lease's version (read again after the outage) gets 410 Gone from the
/// cache. The follower must read
/// the Lease again, watch from the current state, see the leader's renewals once its partition
/// heals, and take the leader's release at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reads_again_after_410_from_the_watch_cache() {
    let Some(t) = HaTest::begin("gone").await else {
        return;
    };
    t.put_released_lease("job").await;
    let log = t.observe(0, "job").await;
    let leader_proxy = t.proxy("leader", 0).await;
    let mut leader = t.spawn(t.contender(
        &leader_proxy.kubeconfig,
        &GONE_ARGS,
        "leader",
        "job",
        "info",
    ));
    let worker = t.wait_exec("leader", LIMIT).await;
    let follower_proxy = t.proxy("follower", 1).await;
    let mut follower = t.spawn(t.contender(
        &follower_proxy.kubeconfig,
        &GONE_ARGS,
        "follower",
        "job",
        "info,lease_exec=debug",
    ));
    wait_log(
        &follower,
        LIMIT,
        "the follower to wait",
        "held by another identity",
    )
    .await;
    log.wait_renewal("leader", mono_ns(), LIMIT).await;

    let partitioned = tokio::time::Instant::now();
    t.toxic(&leader_proxy, Toxic::Partition).await;
    let frozen_rv = log.versions().last().unwrap().rv();
    // Another object moves etcd's revision past the Lease's, so that a watch cache started now
    // begins after it.
    t.kubectl(0, &["create", "configmap", "move-etcd-on"], None)
        .await
        .expect("create configmap");
    let stopped_ns = mono_ns();
    t.stop_apiserver(1, Some("--kill")).await;
    let compacted = t.control("compact", &[]).await;
    t.start_apiserver(1).await;
    let back_ns = mono_ns();
    let all =
        |leader: &Running, follower: &Running| logs(&[("leader", leader), ("follower", follower)]);
    wait_log(
        &follower,
        LIMIT,
        "the follower's watch to get 410 Gone",
        "410 Gone",
    )
    .await;
    let gone_ns = mono_ns();
    let partition = partitioned.elapsed();
    assert!(
        partition < GONE_PARTITION_LIMIT,
        "the restart took too long for this test: the leader was partitioned for {partition:?}\n{}",
        all(&leader, &follower)
    );
    t.heal(&leader_proxy).await;
    let renewed = log.wait_renewal("leader", gone_ns, LIMIT).await;
    assert!(
        log.versions()
            .iter()
            .filter(|v| v.at_ns > stopped_ns && v.at_ns < gone_ns)
            .all(|v| v.rv() == frozen_rv),
        "the Lease changed during the partition: {:?}",
        log.versions()
    );
    // The follower's new watch: a renewal later still only the leader's worker, then the release.
    log.wait_renewal("leader", renewed.at_ns, LIMIT).await;
    assert!(alive(worker.pid as i32), "{}", all(&leader, &follower));
    assert_eq!(t.spans().len(), 1, "{}", all(&leader, &follower));
    leader.signal(Signal::SIGTERM);
    assert_eq!(leader.wait(LIMIT).await, 143, "{}", all(&leader, &follower));
    let taken = t.wait_exec("follower", LIMIT).await;
    follower.signal(Signal::SIGTERM);
    follower.wait(LIMIT).await;
    let runs = t.runs().await;
    let context = format!("runs {runs:?}\n{}", all(&leader, &follower));
    let spans: Vec<_> = runs.iter().map(Run::span).collect();
    assert_no_overlap(&spans, &context);
    assert_eq!(runs.len(), 2, "{context}");
    assert!(runs[0].exit_ns < taken.exec_ns, "{context}");
    let gap = ms(runs[0].exit_ns, taken.exec_ns);
    report(&format!(
        "ha tier: API server 1 killed and started again ({:.1} s; {}) under a watching follower, the Lease unchanged meanwhile: the follower's watch got 410 Gone from the new watch cache (logged {:.2} s after the API server was ready); the release after it: old worker's exit -> the follower's exec {gap:.1} ms",
        ms(stopped_ns, back_ns) / 1e3,
        compacted.trim(),
        ms(back_ns, gone_ns) / 1e3,
    ));
    assert!(
        gap < 1000.0,
        "the follower took {gap:.1} ms to take the release: its watch was not re-established after the 410; {context}"
    );
    // Its watch, not a read at the retry period, took the release: a watch was opened after
    // the 410 and before the lease was acquired.
    let text = follower.stderr();
    let after_gone = &text[text.find("410 Gone").expect("logged above")..];
    let opened = after_gone.find("watch opened");
    let acquired = after_gone.find("acquired the lease");
    assert!(
        matches!((opened, acquired), (Some(o), Some(a)) if o < a),
        "no watch opened between the 410 and the claim; {context}"
    );
}
