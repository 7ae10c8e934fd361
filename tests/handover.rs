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

/// Three contenders: `a` leads, `b` and `c` wait.
async fn three(world: &World, extra: &[&str]) -> (Running, Running, Running) {
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

fn assert_one_at_a_time(world: &World, context: &str) {
    let spans = closed_spans(&world.journal_entries(), |_| None, mono_ns());
    assert_no_overlap(&spans, &context);
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
    assert_one_at_a_time(&world, "handover a -> b");
    // The gap: from a's worker gone to b's worker started.
    let spans = closed_spans(&world.journal_entries(), |_| None, mono_ns());
    let gap_ms = (spans[1].1 - spans[0].2) as f64 / 1e6;
    eprintln!("handover a -> b: {gap_ms:.1} ms without a worker; {out}");
    for mut running in [b, c] {
        running.signal(nix::sys::signal::Signal::SIGTERM);
        running.wait(LIMIT).await;
    }
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
    // Not before one lease duration (2 s) after the release, nor much later.
    let waited = claim.at - released.at;
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(4),
        "claimed {waited:?} after the release"
    );
    assert!(out.contains("not gone, which did not take it"), "{out}");
    assert!(spec(&world, "preferredHolder").is_null());
    assert_one_at_a_time(&world, "handover to a missing candidate");
    for mut running in [b, c] {
        running.signal(nix::sys::signal::Signal::SIGTERM);
        running.wait(LIMIT).await;
    }
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
    assert_one_at_a_time(&world, "handover to any other");
    for mut running in [a, b, c] {
        running.signal(nix::sys::signal::Signal::SIGTERM);
        running.wait(LIMIT).await;
    }
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
    assert_one_at_a_time(&world, "operator handover a -> c");
    for mut running in [b, c] {
        running.signal(nix::sys::signal::Signal::SIGTERM);
        running.wait(LIMIT).await;
    }
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
    let (code, _, err) = run(&world, &["--handover", "--wait-timeout", "1s", "job"]).await;
    assert_eq!(code, 124, "{err}");
    assert!(
        err.contains("stubborn still holds the lease; the request was withdrawn"),
        "{err}"
    );
    assert!(spec(&world, "preferredHolder").is_null());
    assert!(spec(&world, "strategy").is_null());
    let (code, _, err) = run(&world, &["--handover", "--to", "stubborn", "job"]).await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("already holds"), "{err}");
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
