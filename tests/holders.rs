//! `--holders N`: a semaphore of N slot Leases `LEASE-0 … LEASE-(N-1)`. (Exclusion under chaos with
//! N = 3 and 6 contenders is in `tests/chaos.rs`.)

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

/// Slow timings: a slot freed by expiry would take 10 s, so only a release explains a fast takeover.
const SLOW: [&str; 6] = [
    "--lease-duration",
    "10s",
    "--renew-deadline",
    "6s",
    "--retry-period",
    "500ms",
];

fn contender(world: &World, holders: &str, identity: &str) -> Running {
    let mut options: Vec<&str> = SLOW.to_vec();
    options.extend(["--holders", holders, "--identity", identity, "job"]);
    world.worker_command(&options, -1.0, 0, &[]).spawn()
}

fn holders_of(world: &World, slots: &[&str]) -> Vec<Option<String>> {
    slots.iter().map(|s| world.server.holder(NS, s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_contenders_take_the_n_slots_and_a_freed_slot_is_taken_at_once() {
    kernel();
    let world = World::start().await;
    let slots = ["job-0", "job-1", "job-2"];
    let mut running = Vec::new();
    for i in 0..3 {
        running.push(contender(&world, "3", &format!("h{i}")));
        wait_for(LIMIT, "the worker to start", || {
            world.starts().len() == i + 1
        })
        .await;
    }
    // Each on its own slot; a fourth waits.
    let mut held: Vec<Option<String>> = holders_of(&world, &slots);
    held.sort();
    assert_eq!(
        held,
        [Some("h0".into()), Some("h1".into()), Some("h2".into())]
    );
    let starts = world.starts();
    let mut leases: Vec<&str> = starts.iter().map(|e| e.lease.as_str()).collect();
    leases.sort();
    assert_eq!(leases, slots);
    let waiting = contender(&world, "3", "h3");
    wait_for(LIMIT, "h3 to wait", || {
        waiting.stderr().contains("held by another identity")
    })
    .await;
    assert!(world.server.lease(NS, "job").is_none(), "no plain Lease");
    // h1 stops: its slot is released and h3 takes exactly that one, at once.
    let freed = starts
        .iter()
        .find(|e| e.identity == "h1")
        .unwrap()
        .lease
        .clone();
    running[1].signal(Signal::SIGTERM);
    assert_eq!(running[1].wait(LIMIT).await, 143);
    let released = world
        .server
        .writes()
        .into_iter()
        .rfind(|w| w.holder.is_none())
        .expect("h1 released");
    wait_for(LIMIT, "h3's worker", || world.starts().len() == 4).await;
    let took = world.server.last_write_by("h3").expect("h3 claimed");
    assert_eq!(world.starts()[3].lease, freed);
    assert_eq!(world.server.holder(NS, &freed).as_deref(), Some("h3"));
    assert!(
        took.at - released.at < Duration::from_secs(2),
        "a released slot was taken {:?} later (its expiry is 10 s)",
        took.at - released.at
    );
    for mut r in running.into_iter().chain([waiting]) {
        if !r.exited() {
            r.signal(Signal::SIGTERM);
        }
        r.wait(LIMIT).await;
    }
    // By the kernel's exec and exit stamps: never two workers on one slot, never more than three
    // at once (h3's worker exec'd only after h1's exited).
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 4, "{runs:?}");
    assert_one_at_a_time(&runs, &format!("{runs:?}"));
    let (most, at) = most_at_once(&runs);
    assert!(most <= 3, "{most} workers ran at {at} ns: {runs:?}");
    assert_eq!(runs[3].lease.as_deref(), Some(freed.as_str()), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_never_holds_two_slots_when_both_free_at_once() {
    for round in 0..5 {
        let world = World::start().await;
        world.server.steal(NS, "job-0", "other", 600);
        world.server.steal(NS, "job-1", "other", 600);
        let mut waiting = contender(&world, "2", "me");
        wait_for(LIMIT, "both slots watched", || {
            world.server.open_watches() == 2
        })
        .await;
        // Both released in the same instant: both watches deliver, both campaigns want to claim.
        for slot in ["job-0", "job-1"] {
            world.server.put_lease(
                NS,
                slot,
                json!({"spec": {"leaseDurationSeconds": 1, "leaseTransitions": 1}}),
            );
        }
        wait_for(LIMIT, "the worker", || world.starts().len() == 1).await;
        // Give a second claim every chance to land: until a renewal of the first.
        let renewals = world.server.writes().len();
        wait_for(LIMIT, "a renewal", || {
            world.server.writes().len() > renewals
        })
        .await;
        let mine = holders_of(&world, &["job-0", "job-1"])
            .into_iter()
            .filter(|h| h.as_deref() == Some("me"))
            .count();
        assert_eq!(mine, 1, "round {round}: {}", waiting.stderr());
        assert!(
            world
                .server
                .writes()
                .iter()
                .filter(|w| w.holder.as_deref() == Some("me"))
                .map(|w| w.object["metadata"]["name"].as_str().unwrap().to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 1,
            "round {round}: claimed both"
        );
        waiting.signal(Signal::SIGTERM);
        waiting.wait(LIMIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_gets_its_slot_and_status_shows_every_slot() {
    let world = World::start().await;
    world.server.steal(NS, "job-0", "other", 600);
    let out = world.path("env");
    let script = format!(
        "echo \"$LEASE_EXEC_SLOT $LEASE_EXEC_HELD_LEASE\" > {}",
        out.display()
    );
    let (code, log) = world
        .lease_exec(
            [
                SLOW.as_slice(),
                &["--holders", "2", "job", "--", "sh", "-c", &script],
            ]
            .concat(),
        )
        .env("LEASE_EXEC_SLOT", "7")
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "1 job-1");
    // Without --holders, no slot (not even an outer one's).
    let (code, log) = world
        .lease_exec([SLOW.as_slice(), &["solo", "--", "sh", "-c", &script]].concat())
        .env("LEASE_EXEC_SLOT", "7")
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "solo");

    let mut status = world
        .lease_exec(["--status", "--holders", "3", "job"])
        .command;
    let text = String::from_utf8(status.output().await.unwrap().stdout).unwrap();
    assert!(
        text.starts_with("Semaphore default/job: 1 of 3 slots held"),
        "{text}"
    );
    assert!(text.contains("Lease default/job-0: held"), "{text}");
    assert!(text.contains("Lease default/job-1: released"), "{text}");
    assert!(text.contains("Lease default/job-2: absent"), "{text}");
    let mut status = world
        .lease_exec(["--status", "--holders", "3", "-o", "json", "job"])
        .command;
    let json: serde_json::Value =
        serde_json::from_slice(&status.output().await.unwrap().stdout).unwrap();
    let states: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["held", "released", "absent"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_holders_exit_2_before_anything_is_touched() {
    let world = World::start().await;
    let long = "x".repeat(62);
    for (holders, lease, needle) in [
        ("0", "job", "--holders 0"),
        ("101", "job", "--holders 101"),
        ("three", "job", "--holders"),
        ("10", long.as_str(), "not a valid name"),
    ] {
        let (code, log) = world
            .lease_exec(["--holders", holders, lease, "--", "true"])
            .run(LIMIT)
            .await;
        assert_eq!(code, 2, "{holders} {lease}: {log}");
        assert!(log.contains(needle), "{log}");
        assert_eq!(log.lines().count(), 1, "{log}");
    }
    assert!(world.server.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_claimed_without_an_answer_is_released_when_another_is_won() {
    let world = World::start().await;
    world.server.steal(NS, "job-0", "other", 600);
    world.server.steal(NS, "job-1", "other", 600);
    // Claims of job-0 are committed but never answered (a connection lost after the commit).
    world.server.lose_answers("update", "job-0");
    let mut waiting = contender(&world, "2", "me");
    wait_for(LIMIT, "both slots watched", || {
        world.server.open_watches() == 2
    })
    .await;
    let release = |slot: &str| {
        world.server.put_lease(
            NS,
            slot,
            json!({"spec": {"leaseDurationSeconds": 1, "leaseTransitions": 1}}),
        );
    };
    release("job-0");
    wait_for(LIMIT, "the unanswered claim to land", || {
        world.server.holder(NS, "job-0").as_deref() == Some("me")
    })
    .await;
    release("job-1");
    wait_for(LIMIT, "the worker", || world.starts().len() == 1).await;
    assert_eq!(world.starts()[0].lease, "job-1");
    // job-0 names a process that runs nothing for it: released long before its 10 s expiry.
    let won = tokio::time::Instant::now();
    wait_for(Duration::from_secs(8), "job-0 to be released", || {
        world.server.holder(NS, "job-0").is_none()
    })
    .await;
    eprintln!("job-0 released {:?} after job-1 was won", won.elapsed());
    waiting.signal(Signal::SIGTERM);
    waiting.wait(LIMIT).await;
}
