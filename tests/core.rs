//! Behaviour of the real binary against the in-memory API server: acquiring, waiting, taking over,
//! renewing, releasing, losing, and the documented exit codes.

mod support;

use std::time::Duration;

use lease_exec::exit;
use nix::sys::signal::Signal;
use serde_json::json;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

fn started(world: &World) -> Vec<Entry> {
    world
        .journal_entries()
        .into_iter()
        .filter(|e| e.what == "start")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_an_absent_lease_runs_the_command_and_releases_it() {
    let world = World::start().await;
    let (code, log) = world.contender("job", "me", 0.2, 3).run(LIMIT).await;
    assert_eq!(code, 3, "exit code passes through; log:\n{log}");

    let starts = started(&world);
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert_eq!(starts[0].identity, "me");
    assert_eq!(starts[0].transitions, "0");

    let lease = world.server.lease(NS, "job").expect("lease created");
    assert_eq!(
        lease["spec"]["holderIdentity"],
        serde_json::Value::Null,
        "released: {lease}"
    );
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 1);
    let created = &world.server.writes()[0];
    assert_eq!(created.verb, "create");
    assert_eq!(created.object["spec"]["leaseDurationSeconds"], 2);
    let renew = created.object["spec"]["renewTime"].as_str().unwrap();
    assert!(
        renew.ends_with('Z') && renew.split('.').nth(1).map(|f| f.len()) == Some(7),
        "MicroTime with microseconds: {renew}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_while_a_live_holder_renews_and_takes_over_when_it_stops() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 2);
    let mut running = world.contender("job", "me", -1.0, 0).spawn();

    // Renew as "other" for 3 s: longer than the lease duration, so only renewals explain waiting.
    let renewing_until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < renewing_until {
        world.server.steal(NS, "job", "other", 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            started(&world).is_empty(),
            "started while another holder renewed"
        );
    }
    let stopped_renewing = tokio::time::Instant::now();
    wait_for(
        Duration::from_secs(6),
        "takeover after the holder stops renewing",
        || !started(&world).is_empty(),
    )
    .await;
    let waited = stopped_renewing.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "took over too early: {waited:?}"
    );
    assert_eq!(world.server.holder(NS, "job").as_deref(), Some("me"));
    let transitions = world.server.lease(NS, "job").unwrap()["spec"]["leaseTransitions"].clone();
    assert!(transitions.as_i64().unwrap() >= 2, "{transitions}");
    assert!(
        running.stderr().contains("held by another identity"),
        "{}",
        running.stderr()
    );
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_at_once_when_the_lease_names_this_identity() {
    let world = World::start().await;
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"holderIdentity": "me", "leaseDurationSeconds": 60, "leaseTransitions": 7,
                        "acquireTime": apiserver::micro_now(), "renewTime": apiserver::micro_now()}}),
    );
    let t0 = tokio::time::Instant::now();
    let (code, log) = world.contender("job", "me", 0.0, 0).run(LIMIT).await;
    assert_eq!(code, 0, "{log}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "resumed without waiting out the lease"
    );
    assert_eq!(started(&world)[0].transitions, "7", "no change of holder");
    assert!(log.contains("resumed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_over_a_released_lease_at_once() {
    let world = World::start().await;
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 1, "leaseTransitions": 4}}),
    );
    let (code, log) = world.contender("job", "me", 0.0, 0).run(LIMIT).await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(started(&world)[0].transitions, "5");
    assert!(log.contains("took over the released lease"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_and_the_lease_released() {
    let world = World::start().await;
    let mut running = world.contender("job", "me", -1.0, 0).spawn();
    wait_for(LIMIT, "the worker to start", || !started(&world).is_empty()).await;
    running.signal(Signal::SIGTERM);
    let code = running.wait(LIMIT).await;
    assert_eq!(
        code,
        128 + 15,
        "the child's status: killed by SIGTERM; log:\n{}",
        running.stderr()
    );
    let entries = world.journal_entries();
    assert!(
        entries.iter().any(|e| e.what == "stop"),
        "worker saw SIGTERM: {entries:?}"
    );
    assert_eq!(world.server.holder(NS, "job"), None, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_lease_stops_the_command_and_exits_75() {
    let world = World::start().await;
    let mut running = world.contender("job", "me", -1.0, 0).spawn();
    wait_for(LIMIT, "the worker to start", || !started(&world).is_empty()).await;
    world.server.steal(NS, "job", "thief", 30);
    let code = running.wait(LIMIT).await;
    assert_eq!(code, i32::from(exit::LOST), "log:\n{}", running.stderr());
    let pid = started(&world)[0].pid;
    assert!(!alive(pid), "worker still running");
    assert_eq!(
        world.server.holder(NS, "job").as_deref(),
        Some("thief"),
        "not released over the thief"
    );
    assert!(running.stderr().contains("thief"), "{}", running.stderr());
}

/// The API refuses connections while leading: the command must be dead before lease-duration has
/// passed since the last successful renewal, in the server's eyes.
async fn unreachable_api_stops_the_command_in_time(ignore_term: bool) {
    let world = World::start().await;
    // A long grace period: only the safety deadline can explain a kill in time.
    let mut args: Vec<String> = FAST[..6].iter().map(|s| s.to_string()).collect();
    args.extend(["--grace-period".into(), "10s".into()]);
    args.extend(["--identity".into(), "me".into(), "job".into(), "--".into()]);
    args.extend(["python3".into(), world.worker().display().to_string()]);
    args.extend([
        world.journal().display().to_string(),
        "-1".into(),
        "0".into(),
    ]);
    if ignore_term {
        args.push("ignore-term".into());
    }
    let mut running = world.lease_exec(args).spawn();
    wait_for(LIMIT, "the worker to start", || !started(&world).is_empty()).await;
    let pid = started(&world)[0].pid;
    // Let a renewal or two succeed first.
    tokio::time::sleep(Duration::from_millis(600)).await;
    world.server.set_mode(Mode::Refuse);
    let mut died_ns = 0;
    wait_for(Duration::from_secs(5), "the worker to die", || {
        if alive(pid) {
            false
        } else {
            died_ns = mono_ns();
            true
        }
    })
    .await;
    let code = running.wait(LIMIT).await;
    assert_eq!(code, i32::from(exit::LOST), "log:\n{}", running.stderr());
    let last = world
        .server
        .last_write_by("me")
        .expect("renewed at least once");
    let expiry = last.at_ns + 2_000_000_000;
    assert!(
        died_ns < expiry,
        "worker died {} ms after the lease could expire for others; log:\n{}",
        (died_ns - expiry) / 1_000_000,
        running.stderr()
    );
    world.server.set_mode(Mode::Normal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_stops_the_command_before_the_lease_expires() {
    unreachable_api_stops_the_command_in_time(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_ignoring_sigterm_is_killed_before_the_lease_expires() {
    unreachable_api_stops_the_command_in_time(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_exits_125_naming_the_verb_and_the_rule() {
    let world = World::start().await;
    world.server.deny("get", 403);
    let (code, log) = world.contender("job", "me", 0.0, 0).run(LIMIT).await;
    assert_eq!(code, i32::from(exit::FAILED), "{log}");
    assert!(
        log.contains("get leases.coordination.k8s.io \"job\" in namespace \"default\""),
        "{log}"
    );
    assert!(log.contains("verbs: [get, create, update, watch]"), "{log}");
    assert!(started(&world).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_command_exits_127_and_leaves_the_lease_untouched() {
    let world = World::start().await;
    let since = std::time::Instant::now();
    let (code, log) = world
        .lease_exec(["job", "--", "no-such-command-anywhere"])
        .run(LIMIT)
        .await;
    assert_eq!(code, i32::from(exit::NOT_FOUND), "{log}");
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    assert!(log.contains("command not found"), "{log}");
    assert_eq!(world.server.count_all(since), 0, "the API was touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_executable_command_exits_126() {
    let world = World::start().await;
    let since = std::time::Instant::now();
    let (code, log) = world
        .lease_exec(["job", "--", world.worker().to_str().unwrap()])
        .run(LIMIT)
        .await;
    assert_eq!(code, i32::from(exit::NOT_EXECUTABLE), "{log}");
    assert!(log.contains("not executable"), "{log}");
    assert_eq!(world.server.count_all(since), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_durations_exit_2_before_touching_the_api() {
    let world = World::start().await;
    let since = std::time::Instant::now();
    let cases: &[&[&str]] = &[
        &["--renew-deadline", "20s"],
        &["--retry-period", "0s"],
        &["--lease-duration", "soon"],
        &[
            "--lease-duration",
            "1500ms",
            "--renew-deadline",
            "1s",
            "--retry-period",
            "100ms",
        ],
    ];
    for extra in cases {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["job", "--", "true"]);
        let (code, log) = world.lease_exec(args).run(LIMIT).await;
        assert_eq!(code, i32::from(exit::USAGE), "{extra:?}: {log}");
        assert_eq!(log.trim().lines().count(), 1, "{extra:?}: one line: {log}");
        assert!(log.contains("--"), "names the option: {log}");
    }
    assert_eq!(world.server.count_all(since), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_contenders_never_overlap() {
    for n in [2, 3] {
        let world = World::start().await;
        let mut all: Vec<Running> = (0..n)
            .map(|i| world.contender("job", &format!("c{i}"), 0.3, 0).spawn())
            .collect();
        for running in &mut all {
            assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
        }
        let entries = world.journal_entries();
        assert_eq!(started(&world).len(), n, "each ran once: {entries:?}");
        assert_no_overlap(&entries, mono_ns());
        // Transitions grow with every change of holder: a usable fencing token.
        let tokens: Vec<i64> = started(&world)
            .iter()
            .map(|e| e.transitions.parse().unwrap())
            .collect();
        assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
    }
}
