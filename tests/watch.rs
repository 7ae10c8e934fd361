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

/// The requests a follower makes while every Lease request fails (503), from the first failure
/// on: `options` are its timing (and `--no-watch` for a polling follower), `expected` the bounds of
/// each gap between its attempts, `first` the verb that fails first. Each gap is checked from both
/// sides; the upper bound has 100 ms added for the request's own latency on a busy machine.
/// Returns with the API answering again and the follower still waiting.
async fn assert_retries(
    options: &[&str],
    first: &str,
    expected: &[(Duration, Duration)],
) -> (World, Running) {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 600);
    let mut options: Vec<&str> = options.to_vec();
    options.extend(["--identity", "follower", "job"]);
    let mut running = world.worker_command(&options, 0.0, 0, &[]).spawn();
    wait_for(LIMIT, "the follower to wait", || {
        running.stderr().contains("held by another identity")
    })
    .await;
    if first == "watch" {
        wait_for(LIMIT, "the watch to be open", || {
            world.server.open_watches() == 1
        })
        .await;
    }
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
    let total: Duration = expected.iter().map(|(_, most)| *most).sum();
    // A polling follower's first failure comes at its next poll, up to a retry period later.
    wait_for(
        total + Duration::from_secs(30),
        "the attempts of the schedule",
        || failing().len() > expected.len(),
    )
    .await;
    world.server.set_mode(Mode::Normal);
    let seen = failing();
    let log = running.stderr();
    let verbs: Vec<&str> = seen.iter().map(|s| s.verb).collect();
    assert_eq!(verbs[0], first, "what fails first: {verbs:?}");
    assert!(
        verbs[1..=expected.len()].iter().all(|v| *v == "get"),
        "then reads: {verbs:?}"
    );
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (i, (gap, (least, most))) in gaps.iter().zip(expected).enumerate() {
        let most = *most + Duration::from_millis(100);
        assert!(
            gap >= least && *gap <= most,
            "attempt {}: {gap:?} after the previous one, expected {least:?}..{most:?}; gaps {gaps:?}; log:\n{log}",
            i + 2
        );
    }
    assert!(!running.exited(), "{log}");
    (world, running)
}

/// The watching follower's schedule: 200 ms doubling up to 1 s, capped by the retry period, each
/// drawn between half and all of it.
fn resync(steps: &[u64], retry_ms: u64) -> Vec<(Duration, Duration)> {
    steps
        .iter()
        .map(|ms| {
            let full = Duration::from_millis((*ms).min(1000).min(retry_ms));
            (full / 2, full)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_errors_while_watched_is_retried_fast_three_times_then_backed_off() {
    // Retry 2 s: 200 ms, 400 ms, 800 ms (jittered), then as a polling follower, 2 s and 4 s: a
    // struggling server is not asked every second for the length of its trouble. (A server that
    // does not answer at all is asked again within a second for good: see
    // `a_broken_watch_is_re_established_within_a_second_of_the_api_coming_back`.)
    let slow = |ms: u64| (Duration::from_millis(ms), Duration::from_millis(ms + 300));
    let mut expected = resync(&[200, 400, 800], 2000);
    expected.extend([slow(2000), slow(4000)]);
    let (world, mut running) = assert_retries(
        &[
            "--lease-duration",
            "15s",
            "--renew-deadline",
            "10s",
            "--retry-period",
            "2s",
        ],
        "watch",
        &expected,
    )
    .await;
    release(&world);
    assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
    assert_eq!(world.starts().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_while_watching_is_retried_no_faster_than_a_short_retry_period() {
    let slow = |ms: u64| (Duration::from_millis(ms), Duration::from_millis(ms + 150));
    let mut expected = resync(&[200, 400, 800], 250);
    expected.extend([slow(250), slow(500)]);
    let (world, mut running) = assert_retries(
        &[
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "250ms",
        ],
        "watch",
        &expected,
    )
    .await;
    release(&world);
    assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_while_polling_is_retried_doubling_from_the_retry_period_up_to_the_lease_duration()
 {
    let ms = |n: u64| (Duration::from_millis(n), Duration::from_millis(n + n / 2));
    // Retry 250 ms, lease 3 s: 250 ms, 500 ms, 1 s, 2 s, then 3 s (not 4 s), and 3 s again.
    let (world, mut running) = assert_retries(
        &[
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "250ms",
            "--no-watch",
        ],
        "get",
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
async fn a_failing_api_while_polling_is_retried_at_most_every_30_s_with_a_longer_lease() {
    let s = |n: u64| {
        (
            Duration::from_secs(n),
            Duration::from_secs(n) + Duration::from_millis(400),
        )
    };
    // Retry 16 s, lease 40 s: 16 s, then 30 s (not 32 s, nor the lease's 40 s).
    let (_world, running) = assert_retries(
        &[
            "--lease-duration",
            "40s",
            "--renew-deadline",
            "20s",
            "--retry-period",
            "16s",
            "--no-watch",
        ],
        "get",
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

/// The follower's requests (every verb) from `since`, as the server saw them.
fn requests_since(world: &World, since: Instant) -> Vec<Instant> {
    world
        .server
        .seen()
        .into_iter()
        .filter(|s| s.at >= since && s.path.contains("/leases"))
        .map(|s| s.at)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_watch_is_re_established_within_a_second_of_the_api_coming_back() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let running = slow_poller(&world);
    following(&world, &running).await;
    // A 3 s outage: every connection refused, the watch cut.
    world.server.set_mode(Mode::Refuse);
    wait_for(LIMIT, "the follower to notice the outage", || {
        running.stderr().contains("cannot ")
    })
    .await;
    let outage = Instant::now();
    wait_for(LIMIT, "3 s of outage", || {
        outage.elapsed() >= Duration::from_secs(3)
    })
    .await;
    let back = Instant::now();
    world.server.set_mode(Mode::Normal);
    // Re-established within about a second (1 s cap, jittered; not the 30 s retry period).
    wait_for(QUICK, "the watch to be re-established", || {
        world
            .server
            .seen()
            .iter()
            .any(|s| s.at >= back && s.verb == "watch")
    })
    .await;
    let first = requests_since(&world, back)[0];
    assert!(
        first - back <= Duration::from_millis(1500),
        "first request {:?} after the API came back; log:\n{}",
        first - back,
        running.stderr()
    );
    // And a release is seen at once, long before a retry period.
    release(&world);
    wait_for(QUICK, "the takeover", || started(&world)).await;
    stop(running).await;
}

/// Retries while waiting, each answered 429 with `Retry-After: 3`: the gaps between them.
async fn gaps_under(mode: Mode) -> Vec<Duration> {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let running = slow_poller(&world);
    following(&world, &running).await;
    let from = Instant::now();
    world.server.set_mode(mode);
    wait_for(LIMIT, "three answered retries", || {
        requests_since(&world, from).len() >= 4
    })
    .await;
    let seen = requests_since(&world, from);
    world.server.set_mode(Mode::Normal);
    let log = running.stderr();
    assert!(log.contains("Retry-After: 3s"), "{log}");
    stop(running).await;
    // The first request is the re-opened watch (the server closed the old one).
    seen.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_honours_retry_after_from_priority_and_fairness_and_from_a_status() {
    // The priority-and-fairness filter answers 429 in plain text, with only the header; the
    // server's own errors carry the delay in the Status too.
    for mode in [Mode::Status(429, Some(3)), Mode::Status(503, Some(3))] {
        let gaps = gaps_under(mode.clone()).await;
        for gap in &gaps {
            assert!(
                *gap >= Duration::from_millis(2900) && *gap <= Duration::from_millis(4500),
                "{mode:?}: retries {gaps:?} apart, not 3 s as the server asked"
            );
        }
    }
}
