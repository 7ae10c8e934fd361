//! Behaviour of the real binary against the in-memory API server: acquiring, waiting, taking over,
//! renewing, releasing, losing, and the documented exit codes.

mod support;

use std::time::Duration;

use lease_exec::exit;
use nix::sys::signal::Signal;
use serde_json::json;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_an_absent_lease_runs_the_command_and_releases_it() {
    let world = World::start().await;
    let (code, log) = world.contender("job", "me", 0.2, 3).run(LIMIT).await;
    assert_eq!(code, 3, "exit code passes through; log:\n{log}");

    let starts = world.starts();
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
    let mut last_renewal = std::time::Instant::now();
    while tokio::time::Instant::now() < renewing_until {
        last_renewal = std::time::Instant::now();
        world.server.steal(NS, "job", "other", 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            world.starts().is_empty(),
            "started while another holder renewed"
        );
    }
    wait_for(
        Duration::from_secs(6),
        "takeover after the holder stops renewing",
        || !world.starts().is_empty(),
    )
    .await;
    // The rule: the record unchanged for its 2 s since the follower saw it, which was no earlier
    // than the write. Bounded from both sides with the rule's own number.
    let claim = world
        .server
        .first_write_by("me")
        .expect("the takeover write");
    let after = claim.at.duration_since(last_renewal);
    assert!(
        after >= Duration::from_secs(2),
        "took over {after:?} after the last renewal, before its 2 s had passed"
    );
    assert!(
        after < Duration::from_millis(2800),
        "took over {after:?} after the last renewal: later than the rule explains"
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

/// A create that loses the race (409 AlreadyExists) is followed by a read at once, so the winner's
/// record is seen when it was written, not a retry period later: if the winner dies at once, the
/// takeover comes one lease duration after its write, as for any record seen on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_sees_the_winner_at_once() {
    let world = World::start().await;
    // The record that wins is never renewed: its holder died right after creating it.
    world.server.beat_next_create("job", "winner", 2, false);
    // A retry period of 1 s against a 2 s lease: seen a retry period late, the takeover would
    // come 3 s after the winner's write.
    let options = [
        "--lease-duration",
        "2s",
        "--renew-deadline",
        "1500ms",
        "--retry-period",
        "1s",
        "--identity",
        "me",
        "job",
    ];
    let mut running = world.worker_command(&options, -1.0, 0, &[]).spawn();
    wait_for(LIMIT, "the takeover", || !world.starts().is_empty()).await;
    let beaten = world.server.beaten_at().expect("the create was beaten");
    let claim = world
        .server
        .first_write_by("me")
        .expect("the takeover write");
    assert_eq!(claim.verb, "update", "a claim of the winner's record");
    let after = claim.at.duration_since(beaten);
    assert!(
        after >= Duration::from_secs(2),
        "took over {after:?} after the winner's write, before its 2 s had passed"
    );
    assert!(
        after < Duration::from_millis(2600),
        "took over {after:?} after the winner's write: it was seen late"
    );
    let log = running.stderr();
    assert!(log.contains("took over the expired lease"), "{log}");
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}

/// A create that loses the race proves a holder this process never saw a record of. If its Lease is
/// then gone (deleted under it), that holder may still run: the absence is a new one, and the
/// Lease is created only one lease duration after it was found, not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_create_then_a_deletion_waits_a_lease_duration_again() {
    let world = World::start().await;
    // No bookmarks: the watch re-opened after the 404 must not replay the deleted record (which
    // would hold the create off by the deletion rule instead), so that only the absence rule can.
    world.server.set_bookmark_interval(Duration::ZERO);
    world.server.beat_next_create("job", "winner", 2, true);
    let mut running = world.contender("job", "me", -1.0, 0).spawn();
    wait_for(LIMIT, "the command", || !world.starts().is_empty()).await;
    let deleted = world.server.beaten_at().expect("the create was beaten");
    let created = world.server.first_write_by("me").expect("our create");
    assert_eq!(created.verb, "create");
    let after = created.at.duration_since(deleted);
    assert!(
        after >= Duration::from_secs(2),
        "created {after:?} after the winner's Lease was deleted, within its holder's 2 s"
    );
    assert!(
        after < Duration::from_millis(2800),
        "created {after:?} after the deletion: later than the rule explains"
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
    // At once: well under the 60 s the record says, which a takeover would have waited.
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "resumed only after {:?}",
        t0.elapsed()
    );
    // No change of holder, but a new command: a new fencing token, so the command never shares
    // one with the command of the term it resumes.
    assert_eq!(world.starts()[0].transitions, "8");
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
    assert_eq!(world.starts()[0].transitions, "5");
    assert!(log.contains("took over the released lease"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_and_the_lease_released() {
    let world = World::start().await;
    let mut running = world.contender("job", "me", -1.0, 0).spawn();
    wait_for(LIMIT, "the worker to start", || !world.starts().is_empty()).await;
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
    wait_for(LIMIT, "the worker to start", || !world.starts().is_empty()).await;
    world.server.steal(NS, "job", "thief", 30);
    let code = running.wait(LIMIT).await;
    assert_eq!(code, i32::from(exit::LOST), "log:\n{}", running.stderr());
    let pid = world.starts()[0].pid;
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
/// Pinned on both sides (`World::assert_lost_on_schedule`): SIGTERM at the renew deadline, and a
/// command ignoring it SIGKILLed at `R + kill_by`, neither early nor late.
async fn unreachable_api_stops_the_command_in_time(flags: &[&str]) {
    let world = World::start().await;
    kernel();
    // A long grace period: only the safety deadline can explain a kill in time.
    let mut options: Vec<&str> = FAST[..6].to_vec();
    options.extend(["--grace-period", "10s", "--identity", "me", "job"]);
    let running = world.worker_command(&options, -1.0, 0, flags).spawn();
    let pid = world.wait_leading().await;
    world.server.set_mode(Mode::Refuse);
    let timing = Timing {
        grace: Duration::from_secs(10),
        ..FAST_TIMING
    };
    world.assert_lost_on_schedule(running, pid, &timing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_stops_the_command_before_the_lease_expires() {
    unreachable_api_stops_the_command_in_time(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_ignoring_sigterm_is_killed_before_the_lease_expires() {
    unreachable_api_stops_the_command_in_time(&["ignore-term"]).await;
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
    assert!(world.starts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_contenders_never_overlap() {
    kernel();
    for n in [2, 3] {
        let world = World::start().await;
        let mut all: Vec<Running> = (0..n)
            .map(|i| world.contender("job", &format!("c{i}"), 0.3, 0).spawn())
            .collect();
        for running in &mut all {
            assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
        }
        // Exec and exit as the kernel stamped them: a worker's own journal writes its start after
        // the exec and its stop before the exit, so a short overlap would not show in it.
        let runs = world.kernel_runs().await;
        assert_eq!(runs.len(), n, "each ran once: {runs:?}");
        assert_one_at_a_time(&runs, &format!("{runs:?}"));
        // Transitions grow with every change of holder: a usable fencing token.
        let tokens: Vec<i64> = runs.iter().map(|r| r.transitions.unwrap()).collect();
        assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
    }
}

/// The check every overlap test uses ([`assert_one_at_a_time`]), on hand-made kernel stamps: a
/// 2 ms overlap that the workers' own journals would hide (the second wrote its start after the
/// first wrote its stop) is caught; back to back is not an overlap; runs of other Leases (slots)
/// may overlap; a run nested in a longer one is caught. [`most_at_once`] counts the same way.
#[test]
fn the_kernel_overlap_check_catches_what_the_journal_hides() {
    let ms = 1_000_000;
    let run = |pid: i32, lease: &str, exec: u64, exit: u64, journaled: u64| Run {
        pid,
        exec_ns: exec * ms,
        exit_ns: exit * ms,
        lease: Some(lease.into()),
        identity: None,
        transitions: None,
        journaled_ns: Some(journaled * ms),
    };
    // Journals: 1 ran 101..199, 2 ran 201..: no overlap there. The kernel: 1 exited at 200, 2 was
    // exec'd at 198.
    let hidden = [run(1, "a", 100, 200, 101), run(2, "a", 198, 300, 201)];
    let entries: Vec<Entry> = [("start", 1, 101), ("stop", 1, 199), ("start", 2, 201)]
        .iter()
        .map(|&(what, pid, at)| Entry {
            what: what.into(),
            pid,
            at_ns: at * ms,
            identity: "-".into(),
            transitions: "-".into(),
            lease: "a".into(),
        })
        .collect();
    assert_eq!(
        first_overlap(&closed_spans(&entries, |_| None, 400 * ms)),
        None
    );
    let found = overlaps(&hidden);
    assert_eq!(
        found
            .iter()
            .map(|[a, b]| (a.pid, b.pid))
            .collect::<Vec<_>>(),
        [(1, 2)]
    );
    let caught = std::panic::catch_unwind(|| assert_one_at_a_time(&hidden, &"hand-made"));
    assert!(
        caught.is_err(),
        "assert_one_at_a_time let a 2 ms overlap pass"
    );
    assert_eq!(most_at_once(&hidden), (2, 198 * ms));
    // Back to back, and another Lease at the same time.
    let clean = [
        run(1, "a", 100, 200, 101),
        run(2, "a", 200, 300, 201),
        run(3, "b", 150, 250, 151),
    ];
    assert!(overlaps(&clean).is_empty());
    assert_one_at_a_time(&clean, &"hand-made");
    assert_eq!(most_at_once(&clean).0, 2);
    // Nested: 2 inside 1, and 3 starting inside 1 after 2 ended.
    let nested = [
        run(1, "a", 100, 500, 101),
        run(2, "a", 200, 300, 201),
        run(3, "a", 400, 600, 401),
    ];
    assert_eq!(
        overlaps(&nested)
            .iter()
            .map(|[a, b]| (a.pid, b.pid))
            .collect::<Vec<_>>(),
        [(1, 2), (1, 3)]
    );
    assert_eq!(most_at_once(&nested).0, 2);
}

/// The same check end to end: two journaling workers started by hand, the second (50 ms) while
/// the first (300 ms) runs, are caught from the kernel's exec and exit stamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_forced_together_fail_the_overlap_check() {
    kernel();
    let world = World::start().await;
    let run = |seconds: &str| {
        std::process::Command::new(world.worker())
            .args([world.journal().to_str().unwrap(), seconds, "0"])
            .env("LEASE_EXEC_HELD_LEASE", "job")
            .spawn()
            .unwrap()
    };
    let mut first = run("0.3");
    wait_for(LIMIT, "the first worker", || !world.starts().is_empty()).await;
    let mut second = run("0.05");
    second.wait().unwrap();
    first.wait().unwrap();
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    let found = overlaps(&runs);
    assert_eq!(found.len(), 1, "{runs:?}");
    assert_eq!(found[0][0].pid, runs[0].pid);
    let caught = std::panic::catch_unwind(|| assert_one_at_a_time(&runs, &"forced"));
    assert!(caught.is_err(), "the forced overlap passed: {runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_owner_is_written_only_with_owner_pod() {
    let world = World::start().await;
    let pod = |command: TestCommand| {
        command
            .env("POD_NAME", "pod-a")
            .env("POD_UID", "uid-a")
            .env("POD_NAMESPACE", NS)
    };
    let (code, log) = pod(world.lease_exec(["--no-release", "job", "--", "true"]))
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
    let lease = world.server.lease(NS, "job").unwrap();
    assert!(lease["metadata"]["ownerReferences"].is_null(), "{lease}");
    world.server.delete_lease(NS, "job");
    let (code, log) = pod(world.lease_exec(["--owner-pod", "--no-release", "job", "--", "true"]))
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
    let lease = world.server.lease(NS, "job").unwrap();
    assert_eq!(
        lease["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "pod-a", "uid": "uid-a"}]),
        "{lease}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_renews_every_renew_interval_not_every_retry_period() {
    let world = World::start().await;
    // FAST: retry 250 ms; renew interval by default min(2 s / 3, 1 s / 2) = 500 ms.
    let mut running = world.contender("job", "me", -1.0, 0).spawn();
    world.wait_leading().await;
    let first = world.server.writes().len();
    let since = std::time::Instant::now();
    wait_for(LIMIT, "3 s of leading", || {
        since.elapsed() >= Duration::from_secs(3)
    })
    .await;
    let renewals = world.server.writes().len() - first;
    // 6 at 500 ms; 12 at the retry period.
    assert!(
        (4..=8).contains(&renewals),
        "{renewals} renewals in 3 s; log:\n{}",
        running.stderr()
    );
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_namespace_exits_125_naming_it() {
    let world = World::start().await;
    // The real API server answers a create in a namespace that does not exist with 404.
    world.server.deny("create", 404);
    let (code, log) = world
        .lease_exec([&FAST[..], &["-n", "nowhere", "job", "--", "true"]].concat())
        .run(LIMIT)
        .await;
    assert_eq!(code, i32::from(exit::FAILED), "{log}");
    assert!(
        log.contains("namespace \"nowhere\" does not exist"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_release_keeps_the_lease_claimed_at_exit() {
    let world = World::start().await;
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(["--no-release", "--identity", "me", "job"]);
    let (code, log) = world.worker_command(&options, 0.0, 0, &[]).run(LIMIT).await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        world.server.holder(NS, "job").as_deref(),
        Some("me"),
        "{log}"
    );
    assert!(log.contains("--no-release"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_while_waiting_exit_125_naming_the_verb() {
    for (verb, code) in [("get", 401), ("create", 403), ("update", 403)] {
        let world = World::start().await;
        if verb == "update" {
            // A released Lease: taking it over is an update.
            world
                .server
                .put_lease(NS, "job", json!({"spec": {"leaseDurationSeconds": 1}}));
        }
        world.server.deny(verb, code);
        let (got, log) = world.contender("job", "me", 0.0, 0).run(LIMIT).await;
        assert_eq!(got, i32::from(exit::FAILED), "{verb} {code}: {log}");
        assert!(
            log.contains(&format!("{verb} leases.coordination.k8s.io")),
            "{log}"
        );
        assert!(log.contains(&format!("({code})")), "{log}");
        assert!(world.starts().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_port_in_use_exits_125_before_the_lease_is_touched() {
    let world = World::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let since = std::time::Instant::now();
    let (code, log) = world
        .lease_exec([&FAST[..], &["--metrics-addr", &addr, "job", "--", "true"]].concat())
        .run(LIMIT)
        .await;
    assert_eq!(code, i32::from(exit::FAILED), "{log}");
    assert!(log.contains("--metrics-addr"), "{log}");
    assert_eq!(world.server.count("create", since), 0, "{log}");
    assert_eq!(world.server.count("update", since), 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recampaign_runs_the_command_again_after_a_loss_and_its_own_exit_still_ends_it() {
    kernel();
    let world = World::start().await;
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(["--recampaign", "--identity", "me", "job"]);
    let mut running = world.worker_command(&options, -1.0, 0, &[]).spawn();
    let first = world.wait_leading().await;
    // Taken by an operator for 1 s: the command dies at once, lease-exec stays and campaigns.
    let stolen_ns = mono_ns();
    world.server.steal(NS, "job", "operator", 1);
    wait_for(LIMIT, "the command to run again", || {
        world.starts().len() == 2
    })
    .await;
    assert!(!alive(first), "the first term's command is gone");
    assert!(!running.exited(), "{}", running.stderr());
    let log = running.stderr();
    assert!(log.contains("campaigning again"), "{log}");
    assert!(log.contains("term=2"), "{log}");
    running.signal(Signal::SIGTERM);
    assert_eq!(running.wait(LIMIT).await, 143, "{}", running.stderr());
    // By the kernel's stamps: the second command was exec'd only after the operator's 1 s term,
    // and the first term's command was dead by then.
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_one_at_a_time(&runs, &format!("{runs:?}"));
    assert!(
        runs[1].exec_ns >= stolen_ns + 1_000_000_000,
        "ran again {:.1} ms after the operator's 1 s term began: {runs:?}",
        (runs[1].exec_ns - stolen_ns) as f64 / 1e6
    );

    // The command's own exit ends lease-exec with its code.
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(["--recampaign", "--identity", "me", "job"]);
    let (code, log) = world.worker_command(&options, 0.1, 3, &[]).run(LIMIT).await;
    assert_eq!(code, 3, "{log}");
}

/// Where the namespace of the Lease can come from, highest precedence first.
#[derive(Clone, Copy, Default)]
struct NamespaceSources {
    flag: Option<&'static str>,
    option_env: Option<&'static str>,
    pod_namespace: Option<&'static str>,
    service_account: Option<&'static str>,
    /// `None`: the kubeconfig's context names no namespace.
    context: Option<&'static str>,
}

/// Runs `lease-exec job -- true` configured by `sources` and returns the namespace of every Lease
/// it wrote (released Leases wait in each candidate namespace, so it claims one at once).
///
/// The service-account namespace file is read from a fixed path, so lease-exec runs in a mount
/// namespace of its own with an empty tmpfs on `/var/run` (where that file lives, under
/// `secrets/kubernetes.io/serviceaccount/`), holding the file only when `service_account` is set:
/// a file of the machine running the tests never counts.
async fn namespaces_written(world: &World, sources: &NamespaceSources) -> Vec<String> {
    for ns in [
        "from-flag",
        "from-env",
        "from-pod",
        "from-sa",
        "from-context",
        "default",
    ] {
        world
            .server
            .put_lease(ns, "job", json!({"spec": {"leaseDurationSeconds": 1}}));
    }
    let kubeconfig = world.path("namespaced-kubeconfig");
    let text = world.server.kubeconfig("NAMESPACE");
    let text = match sources.context {
        Some(ns) => text.replace("namespace: NAMESPACE", &format!("namespace: {ns}")),
        None => text.replace("    namespace: NAMESPACE\n", ""),
    };
    assert!(!text.contains("NAMESPACE"), "{text}");
    std::fs::write(&kubeconfig, text).unwrap();
    let script = "mount -t tmpfs lease-exec-test /var/run || exit 99; \
         if [ -n \"$SA_NAMESPACE\" ]; then \
           mkdir -p /var/run/secrets/kubernetes.io/serviceaccount && \
           echo \"$SA_NAMESPACE\" > /var/run/secrets/kubernetes.io/serviceaccount/namespace || exit 99; \
         fi; unset SA_NAMESPACE; exec \"$@\"";
    let mut args: Vec<String> = ["--mount", "sh", "-c", script, "sh", BIN]
        .map(String::from)
        .to_vec();
    args.extend(FAST.iter().map(|s| s.to_string()));
    if let Some(ns) = sources.flag {
        args.extend(["-n".to_string(), ns.to_string()]);
    }
    args.extend(["--identity", "me", "job", "--", "true"].map(String::from));
    let mut command = tokio::process::Command::new("unshare");
    command
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env("SA_NAMESPACE", sources.service_account.unwrap_or(""))
        .env_remove("POD_NAME")
        .env_remove("POD_UID")
        .env_remove("POD_NAMESPACE")
        .env_remove("LEASE_EXEC_NAMESPACE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(ns) = sources.option_env {
        command.env("LEASE_EXEC_NAMESPACE", ns);
    }
    if let Some(ns) = sources.pod_namespace {
        command.env("POD_NAMESPACE", ns);
    }
    let since = world.server.writes().len();
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("lease-exec exits")
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(99), "cannot mount: {log}");
    assert_eq!(output.status.code(), Some(0), "{log}");
    let namespaces: Vec<String> = world.server.writes()[since..]
        .iter()
        .map(|w| {
            w.object["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!namespaces.is_empty(), "no write; log:\n{log}");
    namespaces
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespace_comes_from_the_flag_the_option_variable_pod_namespace_the_service_account_the_context_then_default()
 {
    let world = World::start().await;
    let all = NamespaceSources {
        flag: Some("from-flag"),
        option_env: Some("from-env"),
        pod_namespace: Some("from-pod"),
        service_account: Some("from-sa"),
        context: Some("from-context"),
    };
    // Each source wins over every one after it: remove them one at a time.
    let without_flag = NamespaceSources { flag: None, ..all };
    let without_env = NamespaceSources {
        option_env: None,
        ..without_flag
    };
    let without_pod = NamespaceSources {
        pod_namespace: None,
        ..without_env
    };
    let without_sa = NamespaceSources {
        service_account: None,
        ..without_pod
    };
    let without_context = NamespaceSources {
        context: None,
        ..without_sa
    };
    for (expected, sources) in [
        ("from-flag", all),
        ("from-env", without_flag),
        ("from-pod", without_env),
        ("from-sa", without_pod),
        ("from-context", without_sa),
        ("default", without_context),
    ] {
        let written = namespaces_written(&world, &sources).await;
        assert!(
            written.iter().all(|ns| ns == expected),
            "expected every write in {expected:?}, got {written:?}"
        );
    }
    // An empty POD_NAMESPACE (a downward-API variable left blank) is no namespace at all.
    let blank = NamespaceSources {
        pod_namespace: Some(""),
        service_account: Some("from-sa"),
        ..NamespaceSources::default()
    };
    let written = namespaces_written(&world, &blank).await;
    assert!(written.iter().all(|ns| ns == "from-sa"), "{written:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_lease_not_taken_at_once_is_explained_with_until_when() {
    let world = World::start().await;
    // Absent at first sight: a holder it may have had is honoured for one lease duration (3 s).
    let options = [
        "--lease-duration",
        "3s",
        "--renew-deadline",
        "2s",
        "--retry-period",
        "500ms",
        "--identity",
        "me",
        "job",
    ];
    // Its first sight of the absence comes after this: no claim before this + 3 s.
    let spawned = std::time::SystemTime::now();
    let mut running = world.worker_command(&options, -1.0, 0, &[]).spawn();
    wait_for(LIMIT, "the absence to be noted", || {
        running.stderr().contains("the lease is absent")
    })
    .await;
    // Another candidate creates it and releases it at once: free, but not yet taken.
    world.server.steal(NS, "job", "other", 3);
    wait_for(LIMIT, "the holder to be noted", || {
        running.stderr().contains("held by another identity")
    })
    .await;
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 3, "leaseTransitions": 1}}),
    );
    let released_at = std::time::Instant::now();
    wait_for(LIMIT, "the reason to be logged", || {
        running
            .stderr()
            .contains("the lease is free, but it was absent")
    })
    .await;
    assert!(
        world.starts().is_empty(),
        "started within the hold-back:\n{}",
        running.stderr()
    );
    let line = running
        .stderr()
        .lines()
        .find(|l| l.contains("the lease is free, but it was absent"))
        .unwrap()
        .to_string();
    assert!(line.contains("in_="), "says until when: {line}");
    wait_for(LIMIT, "the takeover", || !world.starts().is_empty()).await;
    assert!(
        released_at.elapsed() < Duration::from_secs(4),
        "taken over later than the hold-back explains"
    );
    let lease = world.server.lease(NS, "job").unwrap();
    let acquired: k8s_openapi::jiff::Timestamp = lease["spec"]["acquireTime"]
        .as_str()
        .expect("acquireTime")
        .parse()
        .unwrap();
    let earliest =
        k8s_openapi::jiff::Timestamp::try_from(spawned + Duration::from_secs(3)).unwrap();
    assert!(
        acquired >= earliest,
        "claimed at {acquired}, within the hold-back (not before {earliest}):\n{}",
        running.stderr()
    );
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}
