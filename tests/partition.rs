//! One client cut off: the leader's own way to the API server fails (refused, black-holed,
//! answering 503, too slow, answers lost) while its two followers still reach the server through
//! doors of their own and take the Lease over. This is the race the timing argument exists for:
//! the leader's worker must be dead strictly before the new holder's claim is committed. A
//! half-open connection (the leader's connections stay up and pass nothing, new ones work) must
//! cost nothing: the renewal on it is abandoned and retried on a fresh connection in time.
//!
//! Each client talks to the in-memory server through its own door (`apiserver::Door`), so a fault
//! hits the leader only. The leader's worker is watched through a pidfd, so its death is stamped
//! on CLOCK_MONOTONIC the moment it happens, and compared with the server's commit time of the
//! claim (`Write::at_ns`, the same clock).

mod support;

use std::time::Duration;

use lease_exec::exit;
use nix::sys::signal::Signal;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);
/// `--lease-duration` in FAST.
const LEASE: Duration = Duration::from_secs(2);
/// The request timeout FAST gives: half the 1 s renew deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
const FOLLOWERS: [&str; 2] = ["follower-1", "follower-2"];

/// Milliseconds from `earlier` to `later` (CLOCK_MONOTONIC ns), negative if `later` is earlier.
fn ms(earlier: u64, later: u64) -> f64 {
    (i128::from(later) - i128::from(earlier)) as f64 / 1e6
}

/// A leader running a worker forever, and two followers waiting for the Lease, each client on a
/// door of its own.
struct Cluster {
    world: World,
    leader: Running,
    leader_door: Door,
    /// The leader's worker.
    pid: i32,
    followers: Vec<(Running, Door)>,
}

/// Starts the cluster with `options` (timings) for every lease-exec, and waits until the leader
/// runs its worker and has renewed through its door, and both followers wait.
async fn cluster(options: &[&str]) -> Cluster {
    let world = World::start().await;
    let contender = |identity: &str, kubeconfig: &std::path::Path| {
        let mut args: Vec<&str> = options.to_vec();
        args.extend(["--identity", identity, "job"]);
        world
            .worker_command(&args, -1.0, 0, &[])
            .kubeconfig(kubeconfig)
            .spawn()
    };
    let (leader_door, kubeconfig) = world.door();
    let leader = contender("leader", &kubeconfig);
    let pid = world.wait_leading().await;
    let mut followers = Vec::new();
    for identity in FOLLOWERS {
        let (door, kubeconfig) = world.door();
        followers.push((contender(identity, &kubeconfig), door));
    }
    for (running, _) in &followers {
        wait_for(LIMIT, "a follower to wait", || {
            running.stderr().contains("held by another identity")
        })
        .await;
    }
    assert!(
        leader_door
            .writes()
            .iter()
            .any(|w| w.holder.as_deref() == Some("leader")),
        "the leader writes through its own door"
    );
    Cluster {
        world,
        leader,
        leader_door,
        pid,
        followers,
    }
}

impl Cluster {
    /// Every lease-exec's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = format!("--- leader\n{}", self.leader.stderr());
        for (running, door) in &self.followers {
            out.push_str(&format!("--- door {}\n{}", door.index(), running.stderr()));
        }
        out
    }

    /// Stops the followers.
    async fn stop(mut self) {
        for (running, _) in &mut self.followers {
            if !running.exited() {
                running.signal(Signal::SIGTERM);
                running.wait(LIMIT).await;
            }
        }
    }
}

/// Applies `fault` to the leader's door only and checks the takeover: a follower claims the Lease
/// through its own door, the leader's worker is dead strictly before that claim was committed (and
/// before a lease duration had passed since the leader's last committed renewal), no two workers
/// ever overlap, and the leader exits 75. Prints the margin (claim commit − worker
/// death).
async fn taken_over_safely(name: &str, fault: Fault) {
    let mut cluster = cluster(&FAST).await;
    let world = &cluster.world;
    let death = death_watch(cluster.pid);
    let open = cluster.leader_door.open_connections();
    let cut_ns = mono_ns();
    cluster.leader_door.set_fault(fault);

    wait_for(LIMIT, "a follower's worker", || {
        world.starts().iter().any(|e| e.identity != "leader")
    })
    .await;
    let claim = world
        .server
        .writes()
        .into_iter()
        .find(|w| w.holder.as_deref().is_some_and(|h| FOLLOWERS.contains(&h)))
        .expect("the claim that started a follower's worker");
    let claimant = claim.holder.clone().unwrap();
    let door = &cluster.followers[FOLLOWERS.iter().position(|f| *f == claimant).unwrap()].1;
    assert_eq!(claim.door, door.index(), "claimed through its own door");

    wait_for(LIMIT, "the leader's worker to die", || death.is_finished()).await;
    let died_ns = death.join().unwrap();
    let code = cluster.leader.wait(LIMIT).await;
    let logs = cluster.logs();
    assert_eq!(code, i32::from(exit::LOST), "{logs}");
    assert!(
        died_ns < claim.at_ns,
        "{name}: the leader's worker died {:.1} ms after {claimant}'s claim was committed; {} \
         connection(s) open at the cut; journal {:?}\n{logs}",
        ms(claim.at_ns, died_ns),
        open,
        world.journal_entries(),
    );
    // The bound that does not depend on how fast the followers are: dead before the Lease could
    // expire after the leader's last renewal the server committed.
    let renewed = world.server.last_write_by("leader").expect("renewals");
    assert!(
        died_ns < renewed.at_ns + LEASE.as_nanos() as u64,
        "{name}: the leader's worker died {:.1} ms after its last committed renewal, past the \
         {LEASE:?} lease\n{logs}",
        ms(renewed.at_ns, died_ns),
    );
    let spans = closed_spans(
        &world.journal_entries(),
        |pid| (pid == cluster.pid).then_some(died_ns),
        mono_ns(),
    );
    assert_no_overlap(&spans, &logs);

    let margin = ms(died_ns, claim.at_ns);
    let late: Vec<String> = cluster
        .leader_door
        .writes()
        .iter()
        .filter(|w| w.at_ns > cut_ns)
        .map(|w| {
            let what = if w.holder.is_some() {
                "renewal"
            } else {
                "release"
            };
            format!("{what} at +{:.0} ms", ms(cut_ns, w.at_ns))
        })
        .collect();
    println!(
        "{name}: {claimant} claimed ({}) {margin:.1} ms after the leader's worker died; the worker \
         died {:.0} ms after the fault; the leader's writes committed after the fault: {late:?}",
        claim.verb,
        ms(cut_ns, died_ns),
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_leader_is_taken_over_after_its_worker_died() {
    taken_over_safely("refuse", Fault::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_leader_is_taken_over_after_its_worker_died() {
    taken_over_safely("blackhole", Fault::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_answered_503_is_taken_over_after_its_worker_died() {
    taken_over_safely("status 503", Fault::Status(503, None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_slower_than_its_request_timeout_is_taken_over_after_its_worker_died() {
    taken_over_safely("delay", Fault::Delay(REQUEST_TIMEOUT * 3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_whose_write_answers_are_lost_is_taken_over_after_its_worker_died() {
    // Its renewals are committed but it never learns so: the Lease stays fresh for the followers
    // while the leader counts its renewals as failed.
    taken_over_safely("lose answers", Fault::LoseAnswers).await;
}

/// Cuts the leader's connections open now (half-open), leaving new ones working, and checks that
/// the leader keeps its worker and the Lease for three lease durations: a renewal stuck on a dead
/// pooled connection must be abandoned and retried on a fresh one within the renew deadline.
async fn half_open_changes_nothing(options: &[&str], lease: Duration) {
    let mut cluster = cluster(options).await;
    let world = &cluster.world;
    assert!(
        cluster.leader_door.open_connections() > 0,
        "the leader has a connection to cut"
    );
    let cut = std::time::Instant::now();
    cluster.leader_door.set_fault(Fault::HalfOpen);
    let (pid, leader) = (cluster.pid, &mut cluster.leader);
    let held = holds_for(lease * 3, || {
        if !alive(pid) {
            return Err("the leader's worker died".into());
        }
        if leader.exited() {
            return Err("the leader exited".into());
        }
        match world.server.holder(NS, "job") {
            Some(holder) if holder == "leader" => Ok(()),
            other => Err(format!("the Lease is held by {other:?}")),
        }
    })
    .await;
    if let Err(why) = held {
        panic!("{why}\n{}", cluster.logs());
    }
    let logs = cluster.logs();
    assert_eq!(world.starts().len(), 1, "no other worker started\n{logs}");
    assert!(
        cluster
            .leader_door
            .writes()
            .iter()
            .any(|w| w.at > cut && w.holder.as_deref() == Some("leader")),
        "renewed on a fresh connection\n{logs}"
    );
    cluster.leader.signal(Signal::SIGTERM);
    cluster.leader.wait(LIMIT).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_leader_keeps_its_worker_running_at_fast_timings() {
    half_open_changes_nothing(&FAST, LEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_leader_keeps_its_worker_running_at_default_timings() {
    half_open_changes_nothing(&[], Duration::from_secs(15)).await;
}

/// One renewal of the leader's is carried out but its answer never comes back: the connection it
/// went out on died right after the request was sent. The in-memory server speaks HTTP/1.1 only
/// (hyper's http1 server over plain http, so there is no ALPN to offer HTTP/2 by), so the stuck
/// renewal holds a connection of its own, up and silent, and nothing closes it. The hedge's
/// second attempt, on a fresh connection, meets a 409 (the first one landed), reads the Lease
/// back, finds it still the leader's and writes again against that record, inside the renew
/// deadline: the leader keeps its worker and the Lease for a lease duration past the lost answer.
/// The worker's death, watched through a pidfd, comes only at the SIGTERM that ends the test.
async fn lost_renewal_answer_changes_nothing(options: &[&str], lease: Duration) {
    let mut cluster = cluster(options).await;
    let world = &cluster.world;
    let death = death_watch(cluster.pid);
    let door = cluster.leader_door.clone();
    let armed = std::time::Instant::now();
    world.server.lose_next_answer("update", "job");
    let leader_writes = |since: std::time::Instant| -> Vec<support::apiserver::Write> {
        door.writes()
            .into_iter()
            .filter(|w| w.at > since && w.holder.as_deref() == Some("leader"))
            .collect()
    };
    wait_for(LIMIT, "the renewal whose answer is lost", || {
        !leader_writes(armed).is_empty()
    })
    .await;
    let lost = leader_writes(armed).remove(0);

    let (pid, leader) = (cluster.pid, &mut cluster.leader);
    let held = holds_for(lease, || {
        if death.is_finished() {
            return Err("the leader's worker died".into());
        }
        if leader.exited() {
            return Err("the leader exited".into());
        }
        match world.server.holder(NS, "job") {
            Some(holder) if holder == "leader" => Ok(()),
            other => Err(format!("the Lease is held by {other:?}")),
        }
    })
    .await;
    let held_until_ns = mono_ns();
    if let Err(why) = held {
        panic!(
            "{why} (the lost renewal was committed {:.0} ms after the fault was armed)\n{}",
            lost.at.duration_since(armed).as_secs_f64() * 1e3,
            cluster.logs()
        );
    }
    let logs = cluster.logs();
    // The path this test is about was taken: after the lost one, an update met a 409 (seen by the
    // server, not committed), and a later one was committed.
    let updates = door.count("update", lost.at);
    let committed = leader_writes(lost.at).len();
    assert!(
        updates > committed && committed > 0,
        "{updates} update(s) after the lost renewal, {committed} committed\n{logs}"
    );
    assert_eq!(world.starts().len(), 1, "no other worker started\n{logs}");
    assert!(
        !logs.contains("leadership lost"),
        "the leader lost leadership\n{logs}"
    );
    assert!(alive(pid), "the leader's worker runs\n{logs}");
    cluster.leader.signal(Signal::SIGTERM);
    cluster.leader.wait(LIMIT).await;
    wait_for(LIMIT, "the leader's worker to die", || death.is_finished()).await;
    let died_ns = death.join().unwrap();
    assert!(
        died_ns > held_until_ns,
        "the leader's worker died {:.1} ms before the end of the hold\n{logs}",
        ms(died_ns, held_until_ns)
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_renewal_answer_over_http1_keeps_the_worker_at_fast_timings() {
    lost_renewal_answer_changes_nothing(&FAST, LEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_renewal_answer_over_http1_keeps_the_worker_at_default_timings() {
    lost_renewal_answer_changes_nothing(&[], Duration::from_secs(15)).await;
}
