//! Planned handover: `spec.preferredHolder` asks the holder to step down for one candidate (or any
//! other), and `lease-exec --handover` asks for it by hand.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

/// Runs `lease-exec ARGS` to completion: exit code, stdout, stderr.
async fn run(world: &World, args: &[&str]) -> (i32, String, String) {
    let mut command = world.lease_exec(args).command;
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("lease-exec ran too long")
        .expect("run lease-exec");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn following(running: &Running) {
    wait_for(LIMIT, "the candidate to wait", || {
        running.stderr().contains("held by another identity")
    })
    .await;
}

fn spec(world: &World, field: &str) -> serde_json::Value {
    world.server.lease(NS, "job").expect("the lease")["spec"][field].clone()
}

/// Three contenders: `a` leads, `b` and `c` wait. The proc connector is open before any worker
/// starts, so every worker's exec and exit is stamped by the kernel.
async fn three(world: &World, extra: &[&str]) -> (Running, Running, Running) {
    kernel();
    let with = |identity: &str| {
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(extra);
        options.extend(["--identity", identity, "job"]);
        world.worker_command(&options, -1.0, 0, &[]).spawn()
    };
    let a = with("a");
    world.wait_leading().await;
    let b = with("b");
    let c = with("c");
    following(&b).await;
    following(&c).await;
    (a, b, c)
}

/// Stops every lease-exec of `all` still running (SIGTERM) and waits for each; then checks that no
/// two workers ever ran at once by the kernel's exec and exit stamps ([`assert_one_at_a_time`]),
/// which, unlike the workers' journals, cannot hide a short overlap. Returns the runs by exec time.
async fn stop_all_and_check_one_at_a_time(
    world: &World,
    all: Vec<Running>,
    context: &str,
) -> Vec<Run> {
    for mut running in all {
        if !running.exited() {
            running.signal(nix::sys::signal::Signal::SIGTERM);
        }
        running.wait(LIMIT).await;
    }
    let runs = world.kernel_runs().await;
    assert_one_at_a_time(&runs, &format!("{context}: {runs:?}"));
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_goes_to_the_preferred_candidate_never_two_at_once() {
    let world = World::start().await;
    let (mut a, b, c) = three(&world, &[]).await;
    let (code, out, err) = run(&world, &["--handover", "--to", "b", "job"]).await;
    assert_eq!(code, 0, "{out}{err}");
    // The old holder stopped its command with grace and exited 75 (no --recampaign).
    assert_eq!(a.wait(LIMIT).await, 75, "{}", a.stderr());
    assert!(
        a.stderr().contains("handed over on request"),
        "{}",
        a.stderr()
    );
    wait_for(LIMIT, "b's worker", || world.starts().len() == 2).await;
    let starts = world.starts();
    assert_eq!(starts[1].identity, "b", "{out}\n{}", c.stderr());
    assert!(out.contains("a -> b"), "{out}");
    assert!(out.contains("free for"), "{out}");
    // b cleared the request (and lease-exec's own strategy) when it took the Lease.
    assert!(spec(&world, "preferredHolder").is_null());
    assert!(spec(&world, "strategy").is_null());
    assert_eq!(world.server.holder(NS, "job").as_deref(), Some("b"));
    // c left it to b: it never claimed.
    assert!(
        world
            .server
            .writes()
            .iter()
            .all(|w| w.holder.as_deref() != Some("c")),
        "{}",
        c.stderr()
    );
    assert!(c.stderr().contains("being handed over"), "{}", c.stderr());
    let runs = stop_all_and_check_one_at_a_time(&world, vec![a, b, c], "handover a -> b").await;
    // The gap: from a's worker gone to b's worker exec'd, as the kernel stamped them.
    let gap_ms = (runs[1].exec_ns - runs[0].exit_ns) as f64 / 1e6;
    eprintln!("handover a -> b: {gap_ms:.1} ms without a worker; {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_others_compete_after_a_lease_duration_if_the_preferred_one_never_comes() {
    let world = World::start().await;
    let (mut a, b, c) = three(&world, &[]).await;
    let (code, out, err) = run(&world, &["--handover", "--to", "gone", "job"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(a.wait(LIMIT).await, 75, "{}", a.stderr());
    let released = world
        .server
        .writes()
        .into_iter()
        .rfind(|w| w.holder.is_none())
        .expect("a released the lease");
    wait_for(LIMIT, "the next worker", || world.starts().len() == 2).await;
    let claim = world
        .server
        .writes()
        .into_iter()
        .find(|w| w.at > released.at && w.holder.is_some())
        .expect("a claim");
    // The others leave it to the preferred one for one lease duration (2 s) from their sight of
    // the release, which their watches deliver within milliseconds: not before, and not later
    // than that plus a retry period (250 ms) and the claim's trip.
    let waited = claim.at - released.at;
    eprintln!("claimed {waited:?} after the release");
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_millis(2500),
        "claimed {waited:?} after the release (allowed 2 s ..= 2.5 s)"
    );
    assert!(out.contains("not gone, which did not take it"), "{out}");
    assert!(spec(&world, "preferredHolder").is_null());
    stop_all_and_check_one_at_a_time(&world, vec![a, b, c], "handover to a missing candidate")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_to_any_other_with_recampaign_leaves_the_old_holder_waiting() {
    let world = World::start().await;
    let (mut a, b, c) = three(&world, &["--recampaign"]).await;
    let (code, out, err) = run(&world, &["--handover", "job"]).await;
    assert_eq!(code, 0, "{out}{err}");
    wait_for(LIMIT, "the next worker", || world.starts().len() == 2).await;
    let next = world.starts()[1].identity.clone();
    assert!(next == "b" || next == "c", "{next}");
    // a campaigns again (--recampaign) and waits: it never took the Lease back.
    wait_for(LIMIT, "a to campaign again", || {
        a.stderr().contains("campaigning again")
    })
    .await;
    assert!(!a.exited());
    assert!(
        world
            .server
            .writes()
            .iter()
            .skip_while(|w| w.holder.is_some())
            .all(|w| w.holder.as_deref() != Some("a")),
        "{}",
        a.stderr()
    );
    assert!(spec(&world, "preferredHolder").is_null());
    stop_all_and_check_one_at_a_time(&world, vec![a, b, c], "handover to any other").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preferred_holder_set_by_an_operator_is_honoured_and_status_shows_it() {
    let world = World::start().await;
    let (mut a, b, c) = three(&world, &[]).await;
    // As an operator (or the API's coordinated election) would: a plain update of the spec.
    let mut lease = world.server.lease(NS, "job").unwrap();
    lease["spec"]["strategy"] = json!("example.com/drain");
    lease["spec"]["preferredHolder"] = json!("c");
    world.server.put_lease(NS, "job", lease);
    let (_, status, _) = run(&world, &["--status", "job"]).await;
    assert!(
        status.contains("handover:     to c") || status.contains("holder:       c"),
        "{status}"
    );
    assert_eq!(a.wait(LIMIT).await, 75, "{}", a.stderr());
    wait_for(LIMIT, "c's worker", || world.starts().len() == 2).await;
    assert_eq!(world.starts()[1].identity, "c");
    // Someone else's strategy stays; the request is done.
    assert_eq!(spec(&world, "strategy"), "example.com/drain");
    assert!(spec(&world, "preferredHolder").is_null());
    stop_all_and_check_one_at_a_time(&world, vec![a, b, c], "operator handover a -> c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_refusals_and_timeouts_have_their_codes() {
    let world = World::start().await;
    // Nothing to hand over.
    let (code, _, err) = run(&world, &["--handover", "job"]).await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 1, "leaseTransitions": 1}}),
    );
    let (code, _, err) = run(&world, &["--handover", "job"]).await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("is not held"), "{err}");
    // A holder that is not a lease-exec and never steps down: 124, the request withdrawn.
    world.server.steal(NS, "job", "stubborn", 60);
    let t0 = std::time::Instant::now();
    let (code, _, err) = run(&world, &["--handover", "--wait-timeout", "1s", "job"]).await;
    let took = t0.elapsed();
    assert_eq!(code, 124, "{err}");
    // Not before the 1 s, and not much after: withdrawing the request is one write.
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_millis(1500),
        "exited {took:?} after the spawn (--wait-timeout 1s): {err}"
    );
    assert!(
        err.contains("stubborn still holds the lease; the request was withdrawn"),
        "{err}"
    );
    assert!(spec(&world, "preferredHolder").is_null());
    assert!(spec(&world, "strategy").is_null());
    let (code, _, err) = run(&world, &["--handover", "--to", "stubborn", "job"]).await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("already holds"), "{err}");
    // Another request pending: not overwritten.
    let mut pending = world.server.lease(NS, "job").unwrap();
    pending["spec"]["preferredHolder"] = json!("x");
    pending["spec"]["strategy"] = json!("lease-exec/handover");
    world.server.put_lease(NS, "job", pending);
    let (code, _, err) = run(&world, &["--handover", "--to", "y", "job"]).await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("to x is pending already"), "{err}");
    assert_eq!(spec(&world, "preferredHolder"), "x");
    world.server.steal(NS, "job", "stubborn", 60);
    // The API server without the CoordinatedLeaderElection feature drops the request silently.
    world.server.set_coordinated_leader_election(false);
    let (code, _, err) = run(&world, &["--handover", "job"]).await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("CoordinatedLeaderElection"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Refused verbs: 125 naming the rule.
    world.server.set_coordinated_leader_election(true);
    world.server.deny("update", 403);
    let (code, _, err) = run(&world, &["--handover", "job"]).await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("update"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_drops_the_request_is_reported() {
    let world = World::start().await;
    world.server.steal(NS, "job", "old-client", 60);
    let mut handover = world.lease_exec(["--handover", "job"]).spawn();
    wait_for(LIMIT, "the request", || {
        !spec(&world, "preferredHolder").is_null()
    })
    .await;
    // A renewal by a client that rebuilds the spec from its own record (client-go without
    // Coordinated) wipes the request.
    world.server.steal(NS, "job", "old-client", 60);
    assert_eq!(handover.wait(LIMIT).await, 125, "{}", handover.stderr());
    assert!(
        handover.stderr().contains("dropped the handover request"),
        "{}",
        handover.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handover_arguments_exit_2_before_anything_is_touched() {
    let world = World::start().await;
    for (args, needle) in [
        (vec!["--to", "b", "job"], "--handover"),
        (vec!["--handover", "--to", "*", "job"], "leave --to out"),
        (vec!["--handover", "--to", "", "job"], "--to"),
        (vec!["--handover", "--status", "job"], "--status"),
        (vec!["--handover", "job", "--", "true"], "runs nothing"),
        (
            vec!["--identity", "*", "job", "--", "true"],
            "any other candidate",
        ),
        (
            vec!["--handover", "--holders", "3", "job"],
            "lease-exec --handover job-0",
        ),
    ] {
        let (code, out, err) = run(&world, &args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    assert!(world.server.seen().is_empty(), "the API was touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_release_neither_spins_nor_renews_after_a_handover() {
    kernel();
    let world = World::start().await;
    let a = {
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(["--no-release", "--recampaign", "--identity", "a", "job"]);
        world.worker_command(&options, -1.0, 0, &[]).spawn()
    };
    world.wait_leading().await;
    let b = {
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(["--identity", "b", "job"]);
        world.worker_command(&options, -1.0, 0, &[]).spawn()
    };
    following(&b).await;
    let since = std::time::Instant::now();
    let (code, out, err) = run(&world, &["--handover", "--to", "b", "job"]).await;
    assert_eq!(code, 0, "{out}{err}");
    // a stopped its command and kept the Lease claimed (--no-release): it expired for b (2 s),
    // who took it. a never renewed it after stepping down, nor spun.
    wait_for(LIMIT, "b's worker", || world.starts().len() == 2).await;
    assert_eq!(world.starts()[1].identity, "b");
    let writes = world.server.writes();
    let stepped = writes
        .iter()
        .position(|w| w.object["spec"]["preferredHolder"] == "b")
        .expect("the request");
    let after: Vec<_> = writes[stepped + 1..]
        .iter()
        .filter(|w| w.holder.as_deref() == Some("a"))
        .collect();
    assert!(
        after.len() <= 2,
        "a kept writing after stepping down: {} writes; log:\n{}",
        after.len(),
        a.stderr()
    );
    let gets = world.server.count("get", since);
    assert!(gets < 50, "{gets} reads since the request: a spun");
    stop_all_and_check_one_at_a_time(&world, vec![a, b], "handover from a --no-release holder")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_handover_keeps_the_grace_period_and_ends_the_run() {
    kernel();
    let world = World::start().await;
    let options = [
        "--lease-duration",
        "10s",
        "--renew-deadline",
        "5s",
        "--retry-period",
        "250ms",
        "--grace-period",
        "4s",
        "--recampaign",
        "--identity",
        "a",
        "job",
    ];
    let mut a = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .spawn();
    let worker = world.wait_leading().await;
    let b = {
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(["--identity", "b", "job"]);
        world.worker_command(&options, -1.0, 0, &[]).spawn()
    };
    following(&b).await;
    let _handover = world.lease_exec(["--handover", "--to", "b", "job"]).spawn();
    wait_for(LIMIT, "a to hand over", || {
        a.stderr().contains("handing the lease over")
    })
    .await;
    a.signal(nix::sys::signal::Signal::SIGTERM);
    // The worker ignores SIGTERM: it is killed when the 4 s grace period that began with the
    // handover's SIGTERM ends, neither at once nor later, and lease-exec then exits (no new
    // campaign despite --recampaign), releasing for b.
    let code = a.wait(LIMIT).await;
    assert!(!a.stderr().contains("second stop signal"), "{}", a.stderr());
    assert_eq!(code, 137, "the command's status (SIGKILL): {}", a.stderr());
    assert!(!a.stderr().contains("campaigning again"), "{}", a.stderr());
    // The grace period, both sides: from the worker's first note of SIGTERM (a few ms at most
    // after lease-exec sent it, at the handover) to its exit as the kernel stamped it.
    let termed_ns = world
        .journal_entries()
        .iter()
        .find(|e| e.pid == worker && e.what == "ignored")
        .map(|e| e.at_ns)
        .expect("the worker noted the handover's SIGTERM");
    let exit_ns = kernel()
        .exit_of(worker as u32, termed_ns)
        .expect("the kernel's stamp of the worker's exit");
    let grace_ms = (exit_ns as i64 - termed_ns as i64) as f64 / 1e6;
    let (early, late) = (REQUEST_LEAD_NS as f64 / 1e6, KILL_LATE_NS as f64 / 1e6);
    assert!(
        (4000.0 - early..=4000.0 + late).contains(&grace_ms),
        "the worker died {grace_ms:.1} ms after its SIGTERM (grace period 4 s, allowed \
         -{early}..+{late} ms): {}",
        a.stderr()
    );
    wait_for(LIMIT, "b's worker", || world.starts().len() == 2).await;
    stop_all_and_check_one_at_a_time(&world, vec![a, b], "SIGTERM during a handover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_handover_to_any_other_is_not_deferred_by_an_old_step_down() {
    kernel();
    let world = World::start().await;
    let with = |identity: &str| {
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(["--recampaign", "--identity", identity, "job"]);
        world.worker_command(&options, -1.0, 0, &[]).spawn()
    };
    let a = with("a");
    world.wait_leading().await;
    let b = with("b");
    following(&b).await;
    let (code, out, err) = run(&world, &["--handover", "job"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("a -> b"), "{out}");
    // Now b hands over to any other: a, which stepped down from an older term, takes it at once.
    let (code, out, err) = run(&world, &["--handover", "job"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("b -> a"), "{out}");
    let released = world
        .server
        .writes()
        .into_iter()
        .rfind(|w| w.holder.is_none())
        .unwrap();
    let taken = world.server.last_write_by("a").unwrap();
    assert!(
        taken.at - released.at < Duration::from_secs(1),
        "a waited {:?} (a lease duration is 2 s)",
        taken.at - released.at
    );
    stop_all_and_check_one_at_a_time(&world, vec![a, b], "two handovers to any other").await;
}

/// `--handover` follows the Lease with the one Lease watch: after a 410 it watches from the
/// current state, never again from the Lease's own (too old) resourceVersion, so a compacted
/// history costs one re-open, not a loop of reads and watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_follower_after_a_410_does_not_loop() {
    let world = World::start().await;
    world.server.steal(NS, "job", "stubborn", 60);
    let mut handover = world
        .lease_exec(["--handover", "--wait-timeout", "4s", "job"])
        .spawn();
    wait_for(LIMIT, "the request and its watch", || {
        !spec(&world, "preferredHolder").is_null() && world.server.open_watches() > 0
    })
    .await;
    // Another Lease moves the revision on; compaction then makes the Lease's own resourceVersion
    // too old to watch from, and closes the watch.
    world.server.steal(NS, "unrelated", "x", 60);
    world.server.compact();
    let since = std::time::Instant::now();
    let settled = tokio::time::Instant::now() + Duration::from_millis(2500);
    wait_for(LIMIT, "2.5 s", || tokio::time::Instant::now() >= settled).await;
    let (watches, gets) = (
        world.server.count("watch", since),
        world.server.count("get", since),
    );
    assert!(
        watches <= 3 && gets <= 1,
        "{watches} watches and {gets} reads in 2.5 s after a 410; log:\n{}",
        handover.stderr()
    );
    assert_eq!(handover.wait(LIMIT).await, 124, "{}", handover.stderr());
}
