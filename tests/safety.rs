//! The Lease changing hands *without* expiring: deletion while held (on every path a follower can
//! learn of it; the plain watch path is in `watch.rs`), an overwrite or a release by someone else, a lease-exec started by the worker, an
//! API server that comes back after a loss. Each test fails if a second worker could start while
//! the first still runs.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);
const SEC: u64 = 1_000_000_000;

/// The follower's first write that names it, as the server committed it.
fn first_claim_by(world: &World, identity: &str) -> apiserver::Write {
    world
        .server
        .first_write_by(identity)
        .expect("a write naming the follower")
}

async fn following(running: &Running) {
    wait_for(LIMIT, "the follower to wait", || {
        running.stderr().contains("held by another identity")
    })
    .await;
}

/// A holder "other" with a `duration`-second lease, and a follower (FAST timings) that has seen
/// it; returns the follower and the instant (CLOCK_MONOTONIC ns) just before the holder's write.
async fn held_by_other(world: &World, duration: i64, extra: &[&str]) -> (Running, u64) {
    let before = mono_ns();
    world.server.steal(NS, "job", "other", duration);
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(extra);
    options.extend(["--identity", "follower", "job"]);
    let running = world.worker_command(&options, -1.0, 0, &[]).spawn();
    following(&running).await;
    (running, before)
}

/// The deleted holder's term is honoured: the follower's create comes no earlier than the holder's
/// write + its duration (the follower observed the record after that write), and not much later.
async fn assert_term_honoured(world: &World, mut running: Running, written_ns: u64, duration: u64) {
    wait_for(LIMIT, "the follower to start", || {
        !world.starts().is_empty()
    })
    .await;
    let create = first_claim_by(world, "follower");
    let log = running.stderr();
    assert_eq!(create.verb, "create", "{log}");
    assert!(
        create.at_ns >= written_ns + duration * SEC,
        "created {} ms after the deleted holder's last write, before its {duration} s term ended; log:\n{log}",
        (create.at_ns - written_ns) / 1_000_000
    );
    assert!(
        create.at_ns < written_ns + (duration + 3) * SEC,
        "created {} ms after the holder's write: far later than its term; log:\n{log}",
        (create.at_ns - written_ns) / 1_000_000
    );
    // The token continues from the deleted record (1) instead of restarting at 0.
    assert_eq!(create.object["spec"]["leaseTransitions"], 2, "{log}");
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_while_held_is_honoured_when_polling() {
    let world = World::start().await;
    let (running, written) = held_by_other(&world, 4, &["--no-watch"]).await;
    assert!(world.server.delete_lease(NS, "job"));
    assert_term_honoured(&world, running, written, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_while_held_is_honoured_when_watching_is_refused() {
    let world = World::start().await;
    world.server.deny("watch", 403);
    let (running, written) = held_by_other(&world, 4, &[]).await;
    wait_for(LIMIT, "the fallback to polling", || {
        running.stderr().contains("polling every retry period")
    })
    .await;
    assert!(world.server.delete_lease(NS, "job"));
    assert_term_honoured(&world, running, written, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_during_a_watch_outage_is_honoured_after_the_resync() {
    let world = World::start().await;
    let (running, written) = held_by_other(&world, 5, &[]).await;
    wait_for(LIMIT, "the watch", || world.server.total("watch") > 0).await;
    // The watch breaks and cannot be re-opened; the deletion happens unseen.
    world.server.set_mode(Mode::Status(503, None));
    world.server.close_watches();
    wait_for(LIMIT, "the follower to notice the outage", || {
        running.stderr().contains("cannot ")
    })
    .await;
    assert!(world.server.delete_lease(NS, "job"));
    let reads = world.server.total("get");
    world.server.set_mode(Mode::Normal);
    // The resync reads 404: a deletion of the record it saw, not an absence.
    wait_for(LIMIT, "the re-read", || world.server.total("get") > reads).await;
    assert_term_honoured(&world, running, written, 5).await;
}

/// A leader with a 2 s retry period and a 5 s grace period, running a worker that ignores SIGTERM:
/// only an immediate SIGKILL on a takeover stops it within a fraction of a retry period.
async fn slow_leader(world: &World) -> (Running, i32) {
    kernel();
    let options = [
        "--lease-duration",
        "10s",
        "--renew-deadline",
        "6s",
        "--retry-period",
        "2s",
        "--grace-period",
        "5s",
        "--identity",
        "me",
        "job",
    ];
    let running = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .spawn();
    wait_for(LIMIT, "the worker to start", || !world.starts().is_empty()).await;
    wait_for(LIMIT, "the leader's watch", || {
        world.server.total("watch") > 0
    })
    .await;
    let pid = world.starts()[0].pid;
    (running, pid)
}

/// How soon after the Lease was taken (just before the test's write) the kernel must see the worker
/// exit for a kill "at once": the leader's watch delivering the event, the SIGKILL and the
/// teardown, on a loaded 2-core machine. A grace period (5 s here) or a retry period (2 s) is far
/// beyond it.
const AT_ONCE_NS: u64 = 100_000_000;

/// The worker `pid`'s exit, by the kernel's stamp, came within [`AT_ONCE_NS`] of `from_ns`.
async fn assert_exit_within_at_once(pid: i32, from_ns: u64, log: impl Fn() -> String) {
    let mut exit_ns = None;
    wait_for(LIMIT, "the kernel's stamp of the worker's exit", || {
        exit_ns = kernel().exit_of(pid as u32, 0);
        exit_ns.is_some()
    })
    .await;
    let after = exit_ns.unwrap() as i64 - from_ns as i64;
    assert!(
        (0..=AT_ONCE_NS as i64).contains(&after),
        "the worker exited {:.1} ms after the takeover (at once: at most {} ms); log:\n{}",
        after as f64 / 1e6,
        AT_ONCE_NS / 1_000_000,
        log()
    );
}

async fn assert_killed_at_once(world: &World, mut running: Running, pid: i32, taken_ns: u64) {
    assert_exit_within_at_once(pid, taken_ns, || running.stderr()).await;
    let code = running.wait(LIMIT).await;
    let log = running.stderr();
    assert_eq!(code, i32::from(lease_exec::exit::LOST), "{log}");
    assert!(log.contains("the lease was taken"), "{log}");
    assert!(
        !world.journal_entries().iter().any(|e| e.what == "ignored"),
        "the worker got SIGTERM and a grace period instead of SIGKILL; log:\n{log}"
    );
    // Not ours: nothing released, the new holder keeps it.
    assert!(!log.contains("released the lease"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_holder_kills_the_command_at_once() {
    let world = World::start().await;
    let (running, pid) = slow_leader(&world).await;
    let taken = mono_ns();
    world.server.steal(NS, "job", "operator", 30);
    assert_killed_at_once(&world, running, pid, taken).await;
    assert_eq!(world.server.holder(NS, "job").as_deref(), Some("operator"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cleared_by_someone_else_kills_the_command_at_once() {
    let world = World::start().await;
    let (running, pid) = slow_leader(&world).await;
    let taken = mono_ns();
    let mut lease = world.server.lease(NS, "job").unwrap();
    lease["spec"]["holderIdentity"] = json!(null);
    world.server.put_lease(NS, "job", lease);
    assert_killed_at_once(&world, running, pid, taken).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_under_its_leader_is_recreated_and_the_command_keeps_running() {
    let world = World::start().await;
    let (mut running, pid) = slow_leader(&world).await;
    let transitions = world.server.lease(NS, "job").unwrap()["spec"]["leaseTransitions"].clone();
    assert!(world.server.delete_lease(NS, "job"));
    wait_for(LIMIT, "the leader to re-create it", || {
        world.server.holder(NS, "job").as_deref() == Some("me")
    })
    .await;
    assert!(alive(pid), "{}", running.stderr());
    // The same term: the fencing token does not change.
    assert_eq!(
        world.server.lease(NS, "job").unwrap()["spec"]["leaseTransitions"],
        transitions
    );
    running.signal(Signal::SIGTERM);
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_and_created_by_another_kills_the_command_at_once() {
    let world = World::start().await;
    let (running, pid) = slow_leader(&world).await;
    let taken = mono_ns();
    // Someone who never saw the deleted record creates it between the deletion and our re-create.
    assert!(world.server.delete_lease(NS, "job"));
    world.server.steal(NS, "job", "newcomer", 15);
    assert_killed_at_once(&world, running, pid, taken).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_exec_started_by_the_command_is_an_ordinary_new_candidate() {
    let world = World::start().await;
    // Options given as variables, as in a pod spec.
    let script = format!(
        "env > $DIR/env; \
         {bin} --wait-timeout 1s -- true 2>$DIR/nested_noname.log; echo $? > $DIR/nested_noname; \
         {bin} --wait-timeout 1s job -- true 2>$DIR/nested_same.log; echo $? > $DIR/nested_same",
        bin = BIN
    );
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--", "sh", "-c", &script].map(String::from));
    let (code, log) = world
        .lease_exec(args)
        .env("DIR", world.dir.path())
        .env("LEASE_EXEC_LEASE", "job")
        .env("LEASE_EXEC_IDENTITY", "stable")
        .env("LEASE_EXEC_NAMESPACE", NS)
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
    let env = std::fs::read_to_string(world.path("env")).unwrap();
    for option in [
        "LEASE_EXEC_LEASE=",
        "LEASE_EXEC_IDENTITY=",
        "LEASE_EXEC_NAMESPACE=",
    ] {
        assert!(
            !env.lines().any(|l| l.starts_with(option)),
            "{option} given to the command:\n{env}"
        );
    }
    for given in [
        "LEASE_EXEC_HELD_LEASE=job",
        "LEASE_EXEC_HELD_IDENTITY=stable",
        "LEASE_EXEC_HELD_NAMESPACE=default",
        "LEASE_EXEC_TRANSITIONS=0",
    ] {
        assert!(env.lines().any(|l| l == given), "{given} missing:\n{env}");
    }
    let read = |name: &str| std::fs::read_to_string(world.path(name)).unwrap();
    // Without a name it has no Lease to take...
    assert_eq!(
        read("nested_noname").trim(),
        "2",
        "{}",
        read("nested_noname.log")
    );
    // ...and with the same name it is a new identity that waits, never one that resumes.
    assert_eq!(
        read("nested_same").trim(),
        "124",
        "{}",
        read("nested_same.log")
    );
    assert!(read("nested_same.log").contains("held by another identity"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_loss_renewing_stops_and_the_lease_is_released_once_the_command_is_gone() {
    kernel();
    let world = World::start().await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let options = [
        "--lease-duration",
        "4s",
        "--renew-deadline",
        "2s",
        "--retry-period",
        "250ms",
        "--grace-period",
        "1500ms",
        "--metrics-addr",
        &addr,
        "--identity",
        "me",
        "job",
    ];
    let running = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .spawn();
    let pid = world.wait_leading().await;
    world.server.set_mode(Mode::Status(503, None));
    wait_for(LIMIT, "the loss", || {
        running.stderr().contains("leadership lost")
    })
    .await;
    // The API comes back while the command has its grace period.
    let recovered = std::time::Instant::now();
    world.server.set_mode(Mode::Normal);
    assert!(alive(pid), "the grace period runs");
    let (status, body) = http_get(port, "/leader").await.expect("metrics served");
    assert_eq!(status, 503, "not leader at once after the loss: {body}");
    // On schedule, both sides: SIGTERM at R + renew deadline, and the worker (which ignores it)
    // SIGKILLed when the grace period ends, at R + 2 s + 1.5 s, before the kill deadline
    // (R + 3.72 s) would cut it short.
    let timing = Timing {
        lease: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(2),
        grace: Duration::from_millis(1500),
    };
    assert!(timing.renew_deadline_ns() + 1_500_000_000 < timing.kill_by_ns());
    let log = world.assert_lost_on_schedule(running, pid, &timing).await;
    assert!(!alive(pid));
    let renewed_after: Vec<_> = world
        .server
        .writes()
        .into_iter()
        .filter(|w| w.at > recovered && w.holder.as_deref() == Some("me"))
        .collect();
    assert!(
        renewed_after.is_empty(),
        "renewed after the loss: {renewed_after:?}\n{log}"
    );
    assert_eq!(
        world.server.holder(NS, "job"),
        None,
        "released; log:\n{log}"
    );
    // Released once the command is gone: the release request reached the server after the
    // kernel saw the worker exit.
    let release = world
        .server
        .writes()
        .into_iter()
        .rfind(|w| w.holder.is_none())
        .unwrap_or_else(|| panic!("no release; log:\n{log}"));
    let release_ns = world.arrival_ns(&release);
    let exit_ns = kernel()
        .exit_of(pid as u32, 0)
        .expect("the kernel's stamp of the worker's exit");
    assert!(
        exit_ns < release_ns,
        "the release reached the server {:.3} ms before the worker exited; log:\n{log}",
        (exit_ns - release_ns) as f64 / 1e6
    );
    assert!(log.contains("--renew-deadline"), "{log}");
    assert!(
        !log.contains("suspended"),
        "the API went away, no suspend:\n{log}"
    );
}

/// The watchdog: a leader whose runtime thread is held up (a page fault on a hung disk, a starved
/// CPU; its log lines never block it) stops renewing, and its timers stop with it, while the
/// Lease expires for everyone else on time. Only that thread is frozen here (ptrace-stopped, the
/// other threads run on): the watchdog's thread must kill the command before the next candidate's
/// worker starts, as the kernel stamps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_runtime_is_stuck_still_kills_its_command_in_time() {
    kernel();
    let world = World::start().await;
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--identity", "stuck", "job"].map(String::from));
    let stuck = world.worker_command(&args, -1.0, 0, &[]).spawn();
    wait_for(LIMIT, "the stuck leader's worker", || {
        !world.starts().is_empty()
    })
    .await;
    // The runtime runs on the main thread, whose thread id is the process id: ptrace stops that
    // thread alone. The tracer thread stays until the test ends (a tracer's exit would resume it).
    let main_thread = nix::unistd::Pid::from_raw(stuck.pid());
    let (frozen_tx, frozen) = std::sync::mpsc::channel();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let tracer = std::thread::spawn(move || {
        use nix::sys::ptrace;
        let result = ptrace::seize(main_thread, ptrace::Options::empty())
            .and_then(|()| ptrace::interrupt(main_thread))
            .and_then(|()| {
                nix::sys::wait::waitpid(main_thread, Some(nix::sys::wait::WaitPidFlag::__WALL))
            });
        frozen_tx.send(result.map(|_| ())).unwrap();
        let _ = done_rx.recv();
    });
    frozen.recv().unwrap().expect("the runtime's thread frozen");
    let mut next = world.contender("job", "next", -1.0, 0).spawn();
    wait_for(LIMIT, "the next worker", || world.starts().len() >= 2).await;
    let first = world.starts()[0].pid as u32;
    wait_for(LIMIT, "the stuck leader's worker to die", || {
        kernel().exit_of(first, 0).is_some()
    })
    .await;
    next.signal(Signal::SIGTERM);
    next.wait(LIMIT).await;
    let spans: Vec<_> = world.kernel_runs().await.iter().map(Run::span).collect();
    assert_no_overlap(&spans, &format!("log of the follower:\n{}", next.stderr()));
    // SIGKILL ends a ptrace-stopped process too (dropped with `stuck`).
    drop(stuck);
    drop(done);
    tracer.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_during_the_grace_period_after_a_loss_still_kills_at_once() {
    kernel();
    let world = World::start().await;
    let options = [
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "2s",
        "--retry-period",
        "250ms",
        "--grace-period",
        "3s",
        "--identity",
        "me",
        "job",
    ];
    let mut running = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .spawn();
    let pid = world.wait_leading().await;
    // Renewals fail, watches still work.
    world.server.deny("update", 503);
    wait_for(LIMIT, "the loss", || {
        running.stderr().contains("leadership lost")
    })
    .await;
    assert!(alive(pid), "the grace period runs");
    let taken = mono_ns();
    world.server.steal(NS, "job", "operator", 30);
    assert_exit_within_at_once(pid, taken, || running.stderr()).await;
    assert_eq!(running.wait(LIMIT).await, i32::from(lease_exec::exit::LOST));
}
