//! The promise at its edges: an operator's edit of a held Lease (a shrunk duration, a lowered
//! token), the token carried across terms, `--no-watch` without watches, a stderr nobody reads,
//! stopping a wait over many slots, and a handover that meets a deletion or a loss. Each test fails if a second worker could start while the first
//! still runs, or if a fencing token could repeat or go down.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use support::*;

const LIMIT: Duration = Duration::from_secs(30);
const SEC: u64 = 1_000_000_000;

/// A leader "me" (lease 6 s, renew deadline 4 s, renews every 2 s) running a worker forever.
fn leader(world: &World, extra: &[&str]) -> Running {
    leader_worker(world, extra, &[])
}

/// [`leader`], its worker given `flags` (`ignore-term`).
fn leader_worker(world: &World, extra: &[&str], flags: &[&str]) -> Running {
    let mut options = vec![
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "4s",
        "--retry-period",
        "250ms",
        "--renew-interval",
        "2s",
        "--identity",
        "me",
    ];
    options.extend(extra);
    options.push("job");
    world.worker_command(&options, -1.0, 0, flags).spawn()
}

/// A follower with FAST timings (its own lease duration 2 s), running a worker forever.
fn follower(world: &World, identity: &str, extra: &[&str]) -> Running {
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(extra);
    options.extend(["--identity", identity, "job"]);
    world.worker_command(&options, -1.0, 0, &[]).spawn()
}

/// The stored Lease with `edit` applied, holder and `renewTime` kept: an operator's edit.
fn edit(world: &World, edit: impl FnOnce(&mut serde_json::Value)) -> u64 {
    let mut lease = world.server.lease(NS, "job").expect("the lease");
    edit(&mut lease["spec"]);
    let at = mono_ns();
    world.server.put_lease(NS, "job", lease);
    at
}

/// Shrinking `leaseDurationSeconds` of a held Lease to 1 s, keeping holder and `renewTime`, makes
/// no follower count a 1 s term from the edit: the leader (with `--no-watch`, so that it cannot
/// restore its record before its next renewal) keeps its worker, and no follower claims, watching
/// or polling. Edited right after each renewal, five times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrunk_duration_never_lets_a_follower_claim_while_the_leader_runs() {
    let world = World::start().await;
    let mut me = leader(&world, &["--no-watch"]);
    let pid = world.wait_leading().await;
    let mut watching = follower(&world, "watching", &[]);
    let mut polling = follower(&world, "polling", &["--no-watch"]);
    for running in [&watching, &polling] {
        wait_for(LIMIT, "the follower to wait", || {
            running.stderr().contains("held by another identity")
        })
        .await;
    }
    for _ in 0..5 {
        let writes = world.server.writes().len();
        wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
        edit(&world, |spec| spec["leaseDurationSeconds"] = json!(1));
        // Past the 1 s the edit claims, and the next renewal (2 s after the last), checked all
        // along: a follower's claim, even undone at once, fails.
        let held = holds_for(Duration::from_millis(1500), || {
            if !alive(pid) {
                return Err("the leader's worker died".into());
            }
            match world.server.holder(NS, "job") {
                Some(holder) if holder == "me" => Ok(()),
                other => Err(format!("the Lease is held by {other:?}")),
            }
        })
        .await;
        if let Err(why) = held {
            panic!(
                "after an edit of its duration: {why}; leader:\n{}\nwatching:\n{}\npolling:\n{}",
                me.stderr(),
                watching.stderr(),
                polling.stderr()
            );
        }
    }
    assert_eq!(world.starts().len(), 1, "{:?}", world.journal_entries());
    for running in [&mut me, &mut watching, &mut polling] {
        running.signal(Signal::SIGTERM);
        running.wait(LIMIT).await;
    }
}

/// The holder's guard restores its record at once after an edit that keeps it as holder (a shrunk
/// duration, a lowered token), long before its next renewal: client-go followers restart their
/// clock on any change and count the duration they see, so they see the holder's term again
/// within milliseconds. The token is restored to the holder's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_restores_an_edited_duration_and_token_at_once() {
    let world = World::start().await;
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 1, "leaseTransitions": 5}}),
    );
    let mut me = leader(&world, &[]);
    world.wait_leading().await;
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    let token = world.server.lease(NS, "job").unwrap()["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap();
    assert_eq!(token, 6);
    for change in [
        json!({"leaseDurationSeconds": 1}),
        json!({"leaseTransitions": 0}),
    ] {
        let writes = world.server.writes().len();
        wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
        let renewals = world.server.writes().len();
        let at = edit(&world, |spec| {
            for (k, v) in change.as_object().unwrap() {
                spec[k] = v.clone();
            }
        });
        wait_for(LIMIT, "the leader's next write", || {
            world.server.writes().len() > renewals
        })
        .await;
        let restored = world.server.writes()[renewals].clone();
        let spec = &restored.object["spec"];
        assert_eq!(spec["holderIdentity"], "me");
        assert_eq!(spec["leaseDurationSeconds"], 6, "{change}");
        assert_eq!(spec["leaseTransitions"], token, "{change}");
        // Well before the next renewal (2 s after the last one): the guard, not the schedule.
        assert!(
            restored.at_ns - at < SEC,
            "restored {} ms after the edit ({change}); log:\n{}",
            (restored.at_ns - at) / 1_000_000,
            me.stderr()
        );
    }
    me.signal(Signal::SIGTERM);
    me.wait(LIMIT).await;
}

/// A token lowered by hand while held does not lower the next holder's: the next claim writes one
/// more than the highest value its candidate saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lowered_by_hand_never_lowers_the_next_holders() {
    let world = World::start().await;
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"holderIdentity": "other", "leaseDurationSeconds": 30, "leaseTransitions": 7,
                        "acquireTime": apiserver::micro_now(), "renewTime": apiserver::micro_now()}}),
    );
    let mut next = follower(&world, "next", &[]);
    wait_for(LIMIT, "the follower to wait", || {
        next.stderr().contains("held by another identity")
    })
    .await;
    edit(&world, |spec| spec["leaseTransitions"] = json!(1));
    edit(&world, |spec| spec["holderIdentity"] = json!(null));
    wait_for(LIMIT, "the next worker", || !world.starts().is_empty()).await;
    assert_eq!(world.starts()[0].transitions, "8", "{}", next.stderr());
    next.signal(Signal::SIGTERM);
    next.wait(LIMIT).await;
}

/// With `--recampaign`, a term that ends in a takeover followed at once by a deletion campaigns
/// again knowing what the last term saw: it honours the taker's longer term (4 s, not its own 2 s)
/// and creates the Lease with a token above the taker's, never 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_campaign_remembers_the_last_terms_token_and_longest_term() {
    let world = World::start().await;
    let mut me = follower(&world, "me", &["--recampaign"]);
    world.wait_leading().await;
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    world.server.steal(NS, "job", "taker", 4);
    let taker_token = world.server.lease(NS, "job").unwrap()["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap();
    let deleted = mono_ns();
    assert!(world.server.delete_lease(NS, "job"));
    wait_for(LIMIT, "the second term", || world.starts().len() >= 2).await;
    let create = world
        .server
        .writes()
        .into_iter()
        .rfind(|w| w.verb == "create")
        .expect("the create");
    let log = me.stderr();
    assert!(
        create.object["spec"]["leaseTransitions"].as_i64().unwrap() > taker_token,
        "token {} after the taker's {taker_token}; log:\n{log}",
        create.object["spec"]["leaseTransitions"]
    );
    assert!(
        create.at_ns >= deleted + 4 * SEC,
        "created {} ms after the deletion, before the taker's 4 s term ended; log:\n{log}",
        (create.at_ns - deleted) / 1_000_000
    );
    me.signal(Signal::SIGTERM);
    me.wait(LIMIT).await;
}

/// `--no-watch` means no watch request at all, also while leading: renewals notice a takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watch_sends_no_watch_request_while_waiting_or_leading() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 1);
    let mut me = follower(&world, "me", &["--no-watch"]);
    let pid = world.wait_leading().await;
    // A few renewals.
    let writes = world.server.writes().len();
    wait_for(LIMIT, "three renewals", || {
        world.server.writes().len() >= writes + 3
    })
    .await;
    assert_eq!(world.server.total("watch"), 0, "{}", me.stderr());
    // A takeover is noticed by a renewal.
    world.server.steal(NS, "job", "operator", 30);
    wait_for(LIMIT, "the worker to die", || !alive(pid)).await;
    assert_eq!(me.wait(LIMIT).await, i32::from(lease_exec::exit::LOST));
    assert_eq!(world.server.total("watch"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_wait_over_many_slots_with_the_api_hung_ends_at_once() {
    let world = World::start().await;
    for slot in 0..10 {
        world.server.steal(NS, &format!("job-{slot}"), "other", 60);
    }
    // A request timeout of 2 s: reading ten slots one after another would take 20 s.
    let options = [
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "4s",
        "--retry-period",
        "250ms",
        "--holders",
        "10",
        "--identity",
        "me",
        "job",
    ];
    let mut running = world.worker_command(&options, -1.0, 0, &[]).spawn();
    wait_for(LIMIT, "the watches", || world.server.open_watches() >= 10).await;
    world.server.set_mode(Mode::Hang);
    let asked = std::time::Instant::now();
    running.signal(Signal::SIGTERM);
    let code = running.wait(LIMIT).await;
    let took = asked.elapsed();
    assert_eq!(code, 128 + Signal::SIGTERM as i32, "{}", running.stderr());
    assert!(
        took < Duration::from_secs(4),
        "stopping took {took:?}; log:\n{}",
        running.stderr()
    );
    world.server.set_mode(Mode::Normal);
}

/// A Lease deleted while its holder hands it over is re-created with the handover request, so the
/// preferred candidate still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_during_a_handover_is_recreated_with_the_request() {
    let world = World::start().await;
    let options = [
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "4s",
        "--retry-period",
        "250ms",
        "--renew-interval",
        "1s",
        "--grace-period",
        "5s",
        "--identity",
        "me",
        "job",
    ];
    let mut me = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .spawn();
    world.wait_leading().await;
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    edit(&world, |spec| {
        spec["preferredHolder"] = json!("b");
        spec["strategy"] = json!("lease-exec/handover");
    });
    wait_for(LIMIT, "the handover to start", || {
        me.stderr().contains("handing the lease over")
    })
    .await;
    assert!(world.server.delete_lease(NS, "job"));
    wait_for(LIMIT, "the re-created lease", || {
        world.server.holder(NS, "job").as_deref() == Some("me")
    })
    .await;
    let lease = world.server.lease(NS, "job").unwrap();
    assert_eq!(lease["spec"]["preferredHolder"], "b", "{}", me.stderr());
    assert_eq!(lease["spec"]["strategy"], "lease-exec/handover");
    me.signal(Signal::SIGKILL);
    me.wait(LIMIT).await;
}

/// A handover to any other candidate whose renewals fail during the grace period still leaves the
/// Lease to the others: with `--recampaign`, the process that stepped down does not take its own
/// record back (no write naming it) for a term and the deferral.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_to_any_other_that_loses_its_renewals_does_not_come_back() {
    let world = World::start().await;
    let options = [
        "--lease-duration",
        "4s",
        "--renew-deadline",
        "2s",
        "--retry-period",
        "250ms",
        "--renew-interval",
        "500ms",
        "--grace-period",
        "3s",
        "--recampaign",
        "--identity",
        "me",
        "job",
    ];
    let mut me = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .spawn();
    let pid = world.wait_leading().await;
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    edit(&world, |spec| {
        spec["preferredHolder"] = json!("*");
        spec["strategy"] = json!("lease-exec/handover");
    });
    wait_for(LIMIT, "the handover to start", || {
        me.stderr().contains("handing the lease over")
    })
    .await;
    // Renewals fail from now on: the term is lost during the grace period.
    world.server.deny("update", 503);
    wait_for(LIMIT, "the loss", || {
        me.stderr().contains("leadership lost")
    })
    .await;
    wait_for(LIMIT, "the worker to die", || !alive(pid)).await;
    wait_for(LIMIT, "the next campaign", || {
        me.stderr().contains("campaigning again")
    })
    .await;
    let writes = world.server.writes().len();
    world.server.allow("update");
    // Its own record (never released: updates were refused) expires 4 s after its last renewal,
    // then is left to the others for 4 s more. Nothing of ours is written for 3 s at least.
    let kept_off = holds_for(Duration::from_secs(3), || {
        match world.server.writes()[writes..]
            .iter()
            .find(|w| w.holder.as_deref() == Some("me"))
        {
            Some(ours) => Err(format!("took its own handed-over record back: {ours:?}")),
            None => Ok(()),
        }
    })
    .await;
    if let Err(why) = kept_off {
        panic!("{why}; log:\n{}", me.stderr());
    }
    assert_eq!(world.starts().len(), 1);
    me.signal(Signal::SIGTERM);
    me.wait(LIMIT).await;
}

/// A `--recampaign` leader loses its Lease to the renew deadline (the API answers 503), stops its
/// worker, cannot release (503 again) and campaigns again. When the API is back, after its record
/// has expired, it finds its own identity in it and resumes it: a resume is a claim like any other,
/// so the second worker's LEASE_EXEC_TRANSITIONS is higher than the first's, never the same.
/// (Chaos seed 2790231253524 found the resume keeping the token, with a 429.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recampaign_after_a_loss_takes_a_new_token_even_from_its_own_record() {
    kernel();
    let world = World::start().await;
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(["--recampaign", "--identity", "me", "job"]);
    let mut running = world.worker_command(&options, -1.0, 0, &[]).spawn();
    world.wait_leading().await;
    world.server.set_mode(Mode::Status(503, None));
    wait_for(LIMIT, "the loss and the failed release", || {
        running.stderr().contains("campaigning again")
    })
    .await;
    // Back once the record has expired for everyone (its last renewal + 2 s, and some).
    let (_, renewed_ns) = world.last_renewal("me");
    wait_for(LIMIT, "the record to expire", || {
        mono_ns() > renewed_ns + 2_500_000_000
    })
    .await;
    world.server.set_mode(Mode::Normal);
    wait_for(LIMIT, "the second worker", || world.starts().len() >= 2).await;
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
    let tokens: Vec<Option<i64>> = world
        .kernel_runs()
        .await
        .iter()
        .map(|r| r.transitions)
        .collect();
    assert!(
        tokens[1] > tokens[0],
        "tokens {tokens:?}; log:\n{}",
        running.stderr()
    );
}

/// A leader whose stderr pipe is full (nobody reads it: a stuck log driver, `| less`) while an
/// operator writes another holder over its Lease with a 1 s lease duration. The overwrite rule is
/// "the old holder's command dies at once: the new holder may already run". Its log lines are
/// queued for a thread of their own, so the runtime never blocks on one: the guard sees the
/// overwrite and the command dies at once, long before the follower's claim 1 s later. (With
/// lines written on the runtime's thread, the line right after the spawn blocked it, only the
/// watchdog's kill deadline acted, and the two workers overlapped by up to 0.7 s: chaos seed
/// 1758248203278.) The overlap is measured by the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwrite_kills_at_once_even_when_the_leaders_stderr_is_stuck() {
    kernel();
    let world = World::start().await;
    let script = format!(
        "head -c 200000 /dev/zero >&2 & exec {} {} -1 0",
        world.worker().display(),
        world.journal().display()
    );
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--identity", "stuck", "job", "--", "sh", "-c", &script].map(String::from));
    // Never drained: killed with the test. Debug lines (every request's) make sure the leader logs
    // something between the pipe filling up and the overwrite.
    let _stuck = world
        .lease_exec(args)
        .env("RUST_LOG", "debug")
        .spawn_with_stderr_held(std::future::pending());
    wait_for(LIMIT, "the stuck leader's worker", || {
        !world.starts().is_empty()
    })
    .await;
    let worker = world.starts()[0].pid;
    wait_for(LIMIT, "the shared stderr pipe to be full", || {
        children(worker).iter().any(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                .is_ok_and(|w| w.contains("pipe_write"))
        })
    })
    .await;
    // Renewals go on (each one logging lines nobody reads) before the overwrite.
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal after the pipe filled up", || {
        world.server.writes().len() > writes
    })
    .await;
    world.server.steal(NS, "job", "operator", 1);
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
}

/// A shrink the holder cannot undo shortens its term: when `leaseDurationSeconds` of the held
/// Lease is edited down to 1 s and no renewal of the holder's lands after it (every update
/// refused), a candidate that first sees the edited record may claim 1 s after that sight. The
/// holder's worker must be dead by then, counted from the edit (which is no later than that
/// sight): it dies by the last renewal + 1 s − its margin, not by the holder's own 6 s term, and
/// the holder exits 75. The edit comes 300 ms into the renew interval, so the holder's own renew
/// deadline (4 s) or kill deadline (5.68 s) would end the worker seconds too late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_the_holder_cannot_undo_ends_its_worker_before_anyone_may_count_it() {
    let world = World::start().await;
    let mut me = leader(&world, &[]);
    let pid = world.wait_leading().await;
    let death = death_watch(pid);
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
    let renewal = world.server.writes().last().unwrap().at_ns;
    world.server.deny("update", 500);
    // 300 ms into the renew interval; the next renewal (due 2 s after the last) is refused.
    wait_for(LIMIT, "300 ms past the renewal", || {
        mono_ns() > renewal + 300_000_000
    })
    .await;
    let edited = edit(&world, |spec| spec["leaseDurationSeconds"] = json!(1));
    wait_for(LIMIT, "the leader's worker to die", || death.is_finished()).await;
    let died = death.join().unwrap();
    world.server.allow("update");
    let code = me.wait(LIMIT).await;
    let log = me.stderr();
    assert!(
        edited > renewal && died < edited + SEC,
        "the worker died {} ms after the edit (the renewal {} ms before it); log:\n{log}",
        (died as i128 - edited as i128) / 1_000_000,
        (edited - renewal) / 1_000_000
    );
    assert_eq!(code, i32::from(lease_exec::exit::LOST), "{log}");
    assert_eq!(world.starts().len(), 1, "{:?}", world.journal_entries());
}

/// The children of `pid`, from `/proc/<pid>/task/*/children`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// A token lowered by hand that the holder has not restored yet (it reads its own Lease only every
/// 1.5 s with `--no-watch`) is undone by its release: the release, conditioned on the holder's
/// last write, meets a 409, re-reads the lowered record and writes at least its term's token. So a
/// candidate that never saw the term's token (started after the release) claims one above it,
/// never the same token again. (Chaos seed 45577035728178: the released Lease carried the lowered
/// token and the next claim repeated the term's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_an_unrestored_lowering_keeps_the_terms_token() {
    kernel();
    let world = World::start().await;
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 1, "leaseTransitions": 5}}),
    );
    let options = [
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "4s",
        "--retry-period",
        "1500ms",
        "--renew-interval",
        "2s",
        "--no-watch",
        "--identity",
        "me",
        "job",
    ];
    let mut me = world.worker_command(&options, -1.0, 0, &[]).spawn();
    world.wait_leading().await;
    let token = |w: &apiserver::Write| w.object["spec"]["leaseTransitions"].as_i64();
    assert_eq!(token(world.server.writes().last().unwrap()), Some(6));
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
    // Right after a renewal: the holder's next read of its Lease is up to 1.5 s away, its next
    // renewal 2 s.
    edit(&world, |spec| spec["leaseTransitions"] = json!(0));
    me.signal(Signal::SIGTERM);
    assert_eq!(me.wait(LIMIT).await, 143, "{}", me.stderr());
    let release = world.server.writes().last().unwrap().clone();
    assert_eq!(release.holder, None, "{}", me.stderr());
    assert_eq!(token(&release), Some(6), "{}", me.stderr());
    let mut next = follower(&world, "next", &[]);
    wait_for(LIMIT, "the next worker", || world.starts().len() >= 2).await;
    next.signal(Signal::SIGTERM);
    next.wait(LIMIT).await;
    let tokens: Vec<Option<i64>> = world
        .kernel_runs()
        .await
        .iter()
        .map(|r| r.transitions)
        .collect();
    assert_eq!(tokens, [Some(6), Some(7)], "{}", next.stderr());
}

/// A shrink (6 s to 5 s) that comes right after a renewal was committed but before its answer
/// arrived: the guard sees the shrink first, then the renewal's answer comes. That renewal landed
/// before the shrink (it was conditioned on the record before), so the shrink still stands and
/// counts from that renewal's start; the answer must not end it. With every later update refused,
/// the worker (which ignores SIGTERM) is dead before 5 s after the edit, what a candidate that
/// first saw it counts, and the leader exits 75. (Had the answer ended the shrink, the worker would
/// run until the leader's own kill deadline, 5.68 s after that renewal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_answered_after_a_shrink_it_preceded_keeps_the_shrink() {
    let world = World::start().await;
    // A worker that ignores SIGTERM: only the kill deadline ends it.
    let mut me = leader_worker(&world, &[], &["ignore-term"]);
    let pid = world.wait_leading().await;
    let death = death_watch(pid);
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
    // The next renewal is committed at once and answered 300 ms later.
    world
        .server
        .slow_answers("update", "job", Duration::from_millis(300));
    let writes = world.server.writes().len();
    wait_for(LIMIT, "the next renewal", || {
        world.server.writes().len() > writes
    })
    .await;
    let renewal = world.server.writes().last().unwrap().at_ns;
    world.server.deny("update", 500);
    let edited = edit(&world, |spec| spec["leaseDurationSeconds"] = json!(5));
    wait_for(LIMIT, "the leader's worker to die", || death.is_finished()).await;
    let died = death.join().unwrap();
    world.server.allow("update");
    world.server.keep_answers();
    let code = me.wait(LIMIT).await;
    let log = me.stderr();
    assert!(
        edited - renewal < 200_000_000 && died < edited + 5 * SEC,
        "the worker died {} ms after the edit ({} ms after the renewal); log:\n{log}",
        (died as i128 - edited as i128) / 1_000_000,
        (edited - renewal) / 1_000_000
    );
    assert_eq!(code, i32::from(lease_exec::exit::LOST), "{log}");
}

/// A record of ours at our own duration that is older than a shrink the holder saw never ends
/// that shrink, however late it arrives: here the holder's watch is re-opened (from its last
/// write) on a server whose watch cache lags, caught up to a label edit made between the holder's
/// renewal and the shrink but not to the shrink, so that older record comes after the shrink. The
/// server orders records by resourceVersion, not by when they arrive: with every update refused
/// (no restore lands), the worker (which ignores SIGTERM) is dead before 2 s after the edit, what
/// a candidate that first saw the shrunk record counts, and the holder exits 75. (Had the late
/// record ended the shrink, the worker would run until the holder's own kill deadline, 5.68 s
/// after its renewal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_record_of_ours_seen_after_a_shrink_never_ends_it() {
    let world = World::start().await;
    let mut me = leader_worker(&world, &[], &["ignore-term"]);
    let pid = world.wait_leading().await;
    let death = death_watch(pid);
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
    world.server.deny("update", 500);
    // Still ours, at our duration: a label.
    let mut labelled = world.server.lease(NS, "job").expect("the lease");
    labelled["metadata"]["labels"] = json!({"team": "a"});
    let labelled = world.server.put_lease(NS, "job", labelled);
    let edited = edit(&world, |spec| spec["leaseDurationSeconds"] = json!(2));
    wait_for(LIMIT, "the leader to see the shrink", || {
        me.stderr().contains("the lease was edited while held")
    })
    .await;
    world.server.lag_watch_cache(Some(labelled));
    world.server.close_watches();
    let gone = wait_for_or(LIMIT, || death.is_finished()).await;
    let log = me.stderr();
    assert!(gone, "the worker still runs; log:\n{log}");
    let died = death.join().unwrap();
    world.server.lag_watch_cache(None);
    world.server.allow("update");
    let code = me.wait(LIMIT).await;
    let log = me.stderr();
    assert!(
        died < edited + 2 * SEC,
        "the worker died {} ms after the shrink to 2 s; log:\n{log}",
        (died as i128 - edited as i128) / 1_000_000
    );
    assert_eq!(code, i32::from(lease_exec::exit::LOST), "{log}");
}

/// A `leaseDurationSeconds` removed from the held Lease (the API server accepts a Lease without
/// one) is the shortest term there is: client-go reads it as 0 s, so a client-go candidate that
/// sees the edited record claims it at its next retry, conditioned on that record, and its claim
/// may land before the holder's restore. The holder stops as for a shrink to 0 s: its worker
/// (which ignores SIGTERM) is killed at once, long before the holder's next renewal, and the
/// holder exits 75. (Read as the holder's own duration, the edit would leave the worker running.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_duration_stops_the_holders_worker_at_once() {
    let world = World::start().await;
    let mut me = leader_worker(&world, &[], &["ignore-term"]);
    let pid = world.wait_leading().await;
    let death = death_watch(pid);
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
    world.server.deny("update", 500);
    let edited = edit(&world, |spec| {
        spec.as_object_mut().unwrap().remove("leaseDurationSeconds");
    });
    let gone = wait_for_or(Duration::from_secs(3), || death.is_finished()).await;
    assert!(
        gone,
        "the worker still runs 3 s after the lease's duration was removed; log:\n{}",
        me.stderr()
    );
    let died = death.join().unwrap();
    world.server.allow("update");
    let code = me.wait(LIMIT).await;
    let log = me.stderr();
    assert!(
        died < edited + SEC / 2,
        "the worker died {} ms after the duration was removed; log:\n{log}",
        (died as i128 - edited as i128) / 1_000_000
    );
    assert_eq!(code, i32::from(lease_exec::exit::LOST), "{log}");
}

/// A Lease held by another identity without `leaseDurationSeconds` is claimed as client-go does:
/// client-go reads the missing field as 0 s, so its candidates claim it at their next retry. A
/// lease-exec candidate whose own lease duration is 30 s (what it once assumed for such a holder)
/// claims it at once, with the next token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lease_without_a_duration_is_claimed_as_client_go_claims_it() {
    let world = World::start().await;
    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"holderIdentity": "other", "leaseTransitions": 3,
                        "acquireTime": apiserver::micro_now(), "renewTime": apiserver::micro_now()}}),
    );
    let options = [
        "--lease-duration",
        "30s",
        "--renew-deadline",
        "20s",
        "--retry-period",
        "250ms",
        "--identity",
        "next",
        "job",
    ];
    let mut next = world.worker_command(&options, -1.0, 0, &[]).spawn();
    let started = wait_for_or(Duration::from_secs(10), || !world.starts().is_empty()).await;
    let log = next.stderr();
    assert!(
        started,
        "no worker 10 s after a lease without a duration was seen; log:\n{log}"
    );
    assert_eq!(world.starts()[0].transitions, "4", "{log}");
    next.signal(Signal::SIGTERM);
    next.wait(LIMIT).await;
}

/// An operator's one-off edit of the held Lease's duration (3600 s) is undone by the holder at once
/// and is nobody's term: the leader's guard does not remember it as the longest term seen. With
/// `--recampaign`, once the term ends in a takeover (a 1 s record) and the Lease is deleted right
/// after, the next campaign, which reads a 404, creates the Lease once one of its own 2 s of
/// absence has passed, not an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_one_off_duration_is_not_remembered_as_anyones_term() {
    let world = World::start().await;
    let mut me = follower(&world, "me", &["--recampaign"]);
    world.wait_leading().await;
    wait_for(LIMIT, "the leader's watch", || {
        world.server.open_watches() > 0
    })
    .await;
    let writes = world.server.writes().len();
    edit(&world, |spec| spec["leaseDurationSeconds"] = json!(3600));
    wait_for(LIMIT, "the leader to restore its duration", || {
        me.stderr().contains("the lease was edited while held")
            && world.server.writes().len() > writes
    })
    .await;
    world.server.steal(NS, "job", "taker", 1);
    assert!(world.server.delete_lease(NS, "job"));
    let deleted = mono_ns();
    let again = wait_for_or(LIMIT, || world.starts().len() >= 2).await;
    let log = me.stderr();
    assert!(
        again,
        "no second term {} s after the deletion; log:\n{log}",
        (mono_ns() - deleted) / SEC
    );
    me.signal(Signal::SIGTERM);
    me.wait(LIMIT).await;
}

/// A shrink its holder never sees (cut off from the API server right after a renewal: a
/// partition, a frozen node) does not shorten the holder's term for a lease-exec candidate that
/// first sees the Lease after the edit: every write of a holder states its own duration in the
/// annotation `lease-exec/holder-duration`, which an edit of `spec.leaseDurationSeconds` leaves in
/// place, and the candidate counts the longer of the two. By the kernel's stamps, the holder's
/// worker (stopped at the holder's renew deadline, 4 s after its last renewal) is gone before the
/// candidate's starts, and that start comes no earlier than the holder's own kill deadline. (Had
/// the candidate counted the 1 s it saw, it would have claimed about 1 s after the edit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_a_cut_off_holder_never_sees_does_not_shorten_its_term_for_lease_exec_candidates()
{
    kernel();
    let world = World::start().await;
    let (door, kubeconfig) = world.door();
    let options = [
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "4s",
        "--retry-period",
        "250ms",
        "--renew-interval",
        "2s",
        "--identity",
        "me",
        "job",
    ];
    let mut me = world
        .worker_command(&options, -1.0, 0, &[])
        .kubeconfig(&kubeconfig)
        .spawn();
    let pid = world.wait_leading().await;
    let death = death_watch(pid);
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
    door.set_fault(Fault::Blackhole);
    let renewal = world.server.writes().last().unwrap().at_ns;
    edit(&world, |spec| spec["leaseDurationSeconds"] = json!(1));
    let mut next = follower(&world, "next", &[]);
    wait_for(LIMIT, "the candidate's worker", || {
        world.starts().len() >= 2
    })
    .await;
    // Cut off until its worker is gone: the holder learns nothing of the takeover meanwhile.
    wait_for(LIMIT, "the holder's worker to stop", || death.is_finished()).await;
    door.set_fault(Fault::Normal);
    let code = me.wait(LIMIT).await;
    next.signal(Signal::SIGTERM);
    next.wait(LIMIT).await;
    let log = format!("holder:\n{}\ncandidate:\n{}", me.stderr(), next.stderr());
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 2, "{runs:?}\n{log}");
    let (holders, candidates) = (&runs[0], &runs[1]);
    assert!(
        holders.exit_ns < candidates.exec_ns,
        "the candidate's worker started {} ms before the holder's was gone ({} ms after the \
         holder's last renewal); {log}",
        (holders.exit_ns - candidates.exec_ns) / 1_000_000,
        (candidates.exec_ns - renewal) / 1_000_000
    );
    assert!(
        candidates.exec_ns >= renewal + 5_680_000_000,
        "the candidate's worker started {} ms after the holder's last renewal, before its kill \
         deadline (5.68 s); {log}",
        (candidates.exec_ns - renewal) / 1_000_000
    );
    assert_eq!(code, i32::from(lease_exec::exit::LOST), "{log}");
}

/// The same shrink with the holder's lease-exec frozen (SIGSTOP) from right after its renewal until
/// just past its own kill deadline (its last renewal + 5.68 s), its worker running on meanwhile:
/// a lease-exec candidate started after the edit counts the duration the holder stated, so by the
/// kernel's stamps its worker starts no earlier than that kill deadline, and after the holder's
/// worker, killed at once when the holder wakes up, is gone. (Had it counted the 1 s it saw, it
/// would have started about 1 s after the edit, beside the frozen holder's worker.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_while_its_holder_is_frozen_does_not_shorten_its_term_for_lease_exec_candidates() {
    kernel();
    let world = World::start().await;
    let mut me = leader(&world, &[]);
    world.wait_leading().await;
    let writes = world.server.writes().len();
    wait_for(LIMIT, "a renewal", || world.server.writes().len() > writes).await;
    me.signal(Signal::SIGSTOP);
    wait_for(LIMIT, "the holder to stop", || stopped(me.pid())).await;
    let renewal = world.server.writes().last().unwrap().at_ns;
    edit(&world, |spec| spec["leaseDurationSeconds"] = json!(1));
    let mut next = follower(&world, "next", &[]);
    // Just past the holder's kill deadline: it kills its worker the moment it wakes up.
    wait_for(LIMIT, "the holder's kill deadline", || {
        mono_ns() > renewal + 5_700_000_000 || world.starts().len() >= 2
    })
    .await;
    me.signal(Signal::SIGCONT);
    wait_for(LIMIT, "the candidate's worker", || {
        world.starts().len() >= 2
    })
    .await;
    let code = me.wait(LIMIT).await;
    next.signal(Signal::SIGTERM);
    next.wait(LIMIT).await;
    let log = format!("holder:\n{}\ncandidate:\n{}", me.stderr(), next.stderr());
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 2, "{runs:?}\n{log}");
    let (holders, candidates) = (&runs[0], &runs[1]);
    assert!(
        candidates.exec_ns >= renewal + 5_680_000_000,
        "the candidate's worker started {} ms after the frozen holder's last renewal, before its \
         kill deadline (5.68 s); {log}",
        (candidates.exec_ns - renewal) / 1_000_000
    );
    assert!(
        holders.exit_ns < candidates.exec_ns,
        "the candidate's worker started {} ms before the holder's was gone; {log}",
        (holders.exit_ns - candidates.exec_ns) / 1_000_000
    );
    assert_eq!(code, i32::from(lease_exec::exit::LOST), "{log}");
}

/// Whether every thread of `pid` is stopped (or it is gone).
fn stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| matches!(state, 'T' | 't' | 'Z' | 'X'))
        })
    })
}
