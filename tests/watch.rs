//! Watch-based followers. The followers here use a 30 s retry period, so only the watch can
//! explain a takeover within a few seconds.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);
/// Well under the 30 s poll interval.
const QUICK: Duration = Duration::from_secs(5);

/// A follower whose polls would come only every 30 s.
fn slow_poller(world: &World) -> Running {
    let options = [
        "--lease-duration",
        "60s",
        "--renew-deadline",
        "45s",
        "--retry-period",
        "30s",
        "--identity",
        "follower",
        "job",
    ];
    world.worker_command(&options, -1.0, 0, &[]).spawn()
}

fn started(world: &World) -> bool {
    !world.starts().is_empty()
}

async fn following(world: &World, running: &Running) {
    wait_for(LIMIT, "the follower to wait", || {
        running.stderr().contains("held by another identity")
    })
    .await;
    // Let the watch be established.
    wait_for(LIMIT, "the watch", || world.server.total("watch") > 0).await;
}

fn release(world: &World) {
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 1, "leaseTransitions": 1, "renewTime": apiserver::micro_now()}}),
    );
}

async fn stop(mut running: Running) {
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_acquires_a_released_lease_without_waiting_for_a_poll() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let running = slow_poller(&world);
    following(&world, &running).await;
    release(&world);
    wait_for(QUICK, "the takeover", || started(&world)).await;
    assert_eq!(world.server.holder(NS, "job").as_deref(), Some("follower"));
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_creates_a_deleted_released_lease_at_once() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let running = slow_poller(&world);
    following(&world, &running).await;
    release(&world);
    // Released and deleted at once (as garbage collection does after the holder's Pod is gone).
    world.server.delete_lease(NS, "job");
    wait_for(QUICK, "the lease to be created", || started(&world)).await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_while_held_is_created_when_that_holder_would_have_expired() {
    let world = World::start().await;
    let stolen = Instant::now();
    world.server.steal(NS, "job", "other", 4);
    let running = slow_poller(&world);
    following(&world, &running).await;
    world.server.delete_lease(NS, "job");
    wait_for(Duration::from_secs(10), "the lease to be created", || {
        started(&world)
    })
    .await;
    // The follower saw the holder's record no earlier than it was written, so it must not create
    // the lease before that record's 4 s had passed: the deleted holder might still be running.
    let created = world
        .server
        .writes()
        .iter()
        .find(|w| w.verb == "create")
        .expect("a create")
        .at;
    assert!(
        created.duration_since(stolen) >= Duration::from_secs(4),
        "created {:?} after the holder's last write",
        created.duration_since(stolen)
    );
    assert!(
        running.stderr().contains("deleted while held"),
        "{}",
        running.stderr()
    );
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_watch_is_reopened() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let running = slow_poller(&world);
    following(&world, &running).await;
    let watches = world.server.total("watch");
    world.server.close_watches();
    wait_for(QUICK, "a new watch", || {
        world.server.total("watch") > watches
    })
    .await;
    release(&world);
    wait_for(QUICK, "the takeover", || started(&world)).await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_answered_410_gone_recovers_with_a_fresh_read() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let running = slow_poller(&world);
    following(&world, &running).await;
    let reads = world.server.total("get");
    // Other objects move the store's revision on; then compaction makes the follower's position
    // (and the Lease's own resourceVersion, unchanged since) too old: its next watch gets 410, and
    // a watch from the Lease's resourceVersion after a re-read would too.
    world.server.put_lease(NS, "unrelated", json!({"spec": {}}));
    world.server.compact();
    wait_for(QUICK, "a fresh read after 410", || {
        world.server.total("get") > reads
    })
    .await;
    let watches = world.server.total("watch");
    wait_for(QUICK, "a new watch after the read", || {
        world.server.total("watch") > watches
    })
    .await;
    release(&world);
    wait_for(QUICK, "the takeover", || started(&world)).await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_watch_falls_back_to_polling() {
    let world = World::start().await;
    world.server.deny("watch", 403);
    world.server.steal(NS, "job", "other", 60);
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--identity", "follower", "job", "--", "true"].map(String::from));
    let mut running = world.lease_exec(args).spawn();
    wait_for(LIMIT, "the fallback", || {
        running.stderr().contains("polling every retry period")
    })
    .await;
    release(&world);
    assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
    assert_eq!(
        running
            .stderr()
            .matches("polling every retry period")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watch_polls_and_still_works() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--no-watch", "--identity", "follower", "job", "--", "true"].map(String::from));
    let mut running = world.lease_exec(args).spawn();
    wait_for(LIMIT, "waiting", || {
        running.stderr().contains("held by another identity")
    })
    .await;
    let since = Instant::now();
    // Polls every 250 ms: three within 1.5 s.
    wait_for(Duration::from_millis(1500), "three polls", || {
        world.server.count("get", since) >= 3
    })
    .await;
    assert_eq!(world.server.total("watch"), 0, "never watches");
    release(&world);
    assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_follower_makes_almost_no_requests() {
    let world = World::start().await;
    // A live leader renewing every 500 ms, as another lease-exec would.
    world.server.steal(NS, "job", "other", 2);
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--identity", "follower", "job", "--", "true"].map(String::from));
    let running = world.lease_exec(args).spawn();
    following(&world, &running).await;
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(10) {
        world.server.steal(NS, "job", "other", 2);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let requests = world.server.count_all(since);
    assert!(
        requests <= 1,
        "{requests} requests in 10 s from an idle follower"
    );
    assert!(!started(&world));
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_race_and_exactly_one_wins() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let followers: Vec<Running> = (0..3)
        .map(|i| world.contender("job", &format!("f{i}"), -1.0, 0).spawn())
        .collect();
    for f in &followers {
        following(&world, f).await;
    }
    wait_for(LIMIT, "three watches", || world.server.total("watch") >= 3).await;
    let since = Instant::now();
    release(&world);
    wait_for(QUICK, "a takeover", || started(&world)).await;
    // The two losers' claims were refused (409): updates seen minus updates committed.
    let refused = || {
        let committed = world
            .server
            .writes()
            .iter()
            .filter(|w| w.verb == "update" && w.at >= since)
            .count();
        world.server.count("update", since) - committed
    };
    wait_for(QUICK, "both losers to be refused", || refused() >= 2).await;
    assert_eq!(world.starts().len(), 1, "exactly one follower won");
    for f in followers {
        stop(f).await;
    }
}

/// The requests a follower makes while every Lease request fails (503), from the failure of its
/// watch on: `retry_period` and `lease_duration` are its timing, `expected` the gaps between its
/// attempts that `backoff()` gives. Checks each gap from both sides: never shorter than the
/// schedule (no timer fires early, and a request's latency only adds to it), and longer by at most
/// half the step or 400 ms, whichever is less: always short of the next step of the schedule.
/// Returns with the API answering again and the follower still waiting.
async fn assert_backoff_while_watching(
    timing: [&str; 6],
    expected: &[Duration],
) -> (World, Running) {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 600);
    let mut options: Vec<&str> = timing.to_vec();
    options.extend(["--identity", "follower", "job"]);
    let mut running = world.worker_command(&options, 0.0, 0, &[]).spawn();
    following(&world, &running).await;
    wait_for(LIMIT, "the watch to be open", || {
        world.server.open_watches() == 1
    })
    .await;
    let since = Instant::now();
    world.server.set_mode(Mode::Status(503, None));
    let failing = || -> Vec<apiserver::Seen> {
        world
            .server
            .seen()
            .into_iter()
            .filter(|s| s.at >= since)
            .collect()
    };
    let total: Duration = expected.iter().sum();
    wait_for(
        total + Duration::from_secs(10),
        "the attempts of the schedule",
        || failing().len() > expected.len(),
    )
    .await;
    world.server.set_mode(Mode::Normal);
    let seen = failing();
    let log = running.stderr();
    let verbs: Vec<&str> = seen.iter().map(|s| s.verb).collect();
    assert_eq!(verbs[0], "watch", "the watch fails first: {verbs:?}");
    assert!(
        verbs[1..=expected.len()].iter().all(|v| *v == "get"),
        "then reads: {verbs:?}"
    );
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (i, (gap, want)) in gaps.iter().zip(expected).enumerate() {
        let slack = (*want / 2).min(Duration::from_millis(400));
        assert!(
            *gap >= *want && *gap <= *want + slack,
            "attempt {}: {gap:?} after the previous one, expected {want:?} (+{slack:?}); gaps {gaps:?}; log:\n{log}",
            i + 2
        );
    }
    assert!(!running.exited(), "{log}");
    (world, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_while_watching_is_retried_doubling_from_the_retry_period_up_to_the_lease_duration()
 {
    let ms = Duration::from_millis;
    // Retry 250 ms, lease 3 s: 250 ms, 500 ms, 1 s, 2 s, then 3 s (not 4 s), and 3 s again.
    let (world, mut running) = assert_backoff_while_watching(
        [
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "250ms",
        ],
        &[ms(250), ms(500), ms(1000), ms(2000), ms(3000), ms(3000)],
    )
    .await;
    // Reachable again: the next attempt (within 3 s) reads the Lease, and the follower takes it
    // over once released.
    release(&world);
    assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
    assert_eq!(world.starts().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_while_watching_is_retried_at_most_every_30_s_with_a_longer_lease() {
    let s = Duration::from_secs;
    // Retry 16 s, lease 40 s: 16 s, then 30 s (not 32 s, nor the lease's 40 s).
    let (_world, running) = assert_backoff_while_watching(
        [
            "--lease-duration",
            "40s",
            "--renew-deadline",
            "20s",
            "--retry-period",
            "16s",
        ],
        &[s(16), s(30)],
    )
    .await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ended_by_the_server_resumes_from_the_last_bookmark() {
    let world = World::start().await;
    world.server.set_bookmark_interval(Duration::ZERO);
    let held = world.server.steal(NS, "job", "other", 60);
    let running = slow_poller(&world);
    following(&world, &running).await;
    wait_for(LIMIT, "the watch to be open", || {
        world.server.open_watches() == 1
    })
    .await;
    let watches = || -> Vec<apiserver::Seen> {
        world
            .server
            .seen()
            .into_iter()
            .filter(|s| s.verb == "watch")
            .collect()
    };
    let first = watches().pop().unwrap();
    assert_eq!(first.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(first.param("resourceVersion"), Some(held.to_string()));
    // Another Lease moves the store on; this watch (of "job" only) sees it only as a bookmark.
    let elsewhere = world.server.put_lease(NS, "unrelated", json!({"spec": {}}));
    world.server.bookmark_now();
    wait_for(LIMIT, "the bookmark to be sent", || {
        world.server.bookmarks_sent().contains(&elsewhere)
    })
    .await;
    let before = watches().len();
    world.server.close_watches();
    wait_for(QUICK, "the watch to be re-opened", || {
        watches().len() > before
    })
    .await;
    let reopened = watches().pop().unwrap();
    assert_eq!(
        reopened.param("resourceVersion"),
        Some(elsewhere.to_string()),
        "re-opened from the bookmark's resourceVersion, not the Lease's {held}: {}",
        reopened.query
    );
    release(&world);
    wait_for(QUICK, "the takeover", || started(&world)).await;
    stop(running).await;
}
