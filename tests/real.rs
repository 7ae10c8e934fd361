//! The real tier: the real `lease-exec` binary against a real control plane (embedded etcd,
//! kube-apiserver v1.37.2 and the garbage collector, built from `testenv/`), driven and checked
//! with the real kubectl and compared with client-go's leader election (`testenv/bin/contender`).
//!
//! Without Go the tests say `SKIPPED (real tier): <reason>` and return;
//! `LEASE_EXEC_REAL_TIER=required` (set by `.ci/run`) makes that a failure. See
//! `tests/support/cluster.rs` for `LEASE_EXEC_TESTENV`, which points the tests at a running
//! control plane. Figures (handoff times) are printed past the output capture.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/relay.rs"]
mod relay;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use cluster::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use support::{
    Entry, Run, Running, alive, assert_one_at_a_time, holds_for, kernel, kernel_runs_in, mono_ns,
    most_at_once, wait_for,
};

const LIMIT: Duration = Duration::from_secs(30);

/// Lease JSON fields lease-exec writes while holding a Lease.
const HELD_FIELDS: [&str; 5] = [
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
];

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn starts(entries: &[Entry]) -> Vec<Entry> {
    entries
        .iter()
        .filter(|e| e.what == "start")
        .cloned()
        .collect()
}

/// Lines of a lease-exec log at WARN or ERROR.
fn complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// Waits until a worker started by `identity` shows in the journal; returns its entry.
async fn wait_started(space: &Space<'_>, identity: &str, limit: Duration) -> Entry {
    let mut found = None;
    wait_for(limit, &format!("{identity}'s worker to start"), || {
        found = space
            .entries()
            .into_iter()
            .find(|e| e.what == "start" && e.identity == identity);
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// The exit of `pid` after `after_ns` (CLOCK_MONOTONIC ns) as the kernel stamped it, waiting up
/// to `limit` for it (the proc connector's reader may also lag the exit by a few ms); [`kernel`]
/// must have been opened before the process exited.
async fn kernel_exit(pid: i32, after_ns: u64, limit: Duration) -> u64 {
    let mut exit_ns = None;
    wait_for(
        limit,
        &format!("the kernel's stamp of the exit of {pid}"),
        || {
            exit_ns = kernel().exit_of(pid as u32, after_ns);
            exit_ns.is_some()
        },
    )
    .await;
    exit_ns.unwrap()
}

/// A wall-clock time in seconds since the epoch (a `MicroTime` the server stored, say) on
/// CLOCK_MONOTONIC ns, as the kernel's stamps are.
fn mono_ns_of_wall(secs: f64) -> i64 {
    let offset_ns = now_secs() * 1e9 - mono_ns() as f64;
    (secs * 1e9 - offset_ns) as i64
}

/// The workers of `space` as the kernel stamped them (see [`kernel_runs_in`]); call once every
/// worker has exited.
async fn kernel_runs(space: &Space<'_>) -> Vec<Run> {
    kernel_runs_in(&space.journal()).await
}

async fn wait_log(running: &Running, limit: Duration, what: &str, needle: &str) {
    let deadline = tokio::time::Instant::now() + limit;
    while !running.stderr().contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what} ({needle:?} in the log):\n{}",
            running.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------------------------------------
// 1. Acquire, renew, release

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_renew_release_as_kubectl_sees_it() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "acquire").await;
    let watch = space.watch_lease("job").await;
    let mut alpha = space.spawn(space.contender("job", "alpha", -1.0));

    // A Lease name never used before is created after one lease duration of absence.
    let held = space
        .wait_lease("job", LIMIT, "alpha to hold the lease", |l| {
            holder(l) == "alpha"
        })
        .await;
    let spec = &held["spec"];
    assert_eq!(spec["leaseDurationSeconds"], 4, "{held}");
    assert_eq!(spec["leaseTransitions"], 0, "{held}");
    for field in ["acquireTime", "renewTime"] {
        let value = spec_str(&held, field);
        assert!(is_micro_time(&value), "{field} is not a MicroTime: {held}");
    }
    assert!(held["metadata"]["ownerReferences"].is_null(), "{held}");
    wait_started(&space, "alpha", LIMIT).await;

    // Renewals: renewTime moves on, the holder and acquireTime stay.
    let first = spec_str(&held, "renewTime");
    let renewed = space
        .wait_lease("job", LIMIT, "a renewal", |l| {
            spec_str(l, "renewTime") > first && holder(l) == "alpha"
        })
        .await;
    assert_eq!(
        spec_str(&renewed, "acquireTime"),
        spec_str(&held, "acquireTime")
    );
    assert_eq!(renewed["spec"]["leaseTransitions"], 0);

    // --status reads it through the same client.
    let status = space
        .lease_exec(None, &["--status", "job", "-o", "json"])
        .output()
        .await
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["state"], "held", "{status}");
    assert_eq!(status["holder"], "alpha", "{status}");
    assert_eq!(status["isThisIdentity"], false, "{status}");

    // Release: SIGTERM stops the worker (143), then the Lease is handed over.
    alpha.signal(Signal::SIGTERM);
    assert_eq!(alpha.wait(LIMIT).await, 143, "{}", alpha.stderr());
    let released = space.lease("job").await.expect("the lease still exists");
    let spec = &released["spec"];
    assert!(
        spec["holderIdentity"].is_null() || spec["holderIdentity"] == "",
        "{released}"
    );
    assert_eq!(spec["leaseDurationSeconds"], 1, "{released}");
    assert_eq!(spec["leaseTransitions"], 0, "{released}");
    assert!(
        is_micro_time(&spec_str(&released, "renewTime")),
        "{released}"
    );

    // Every version written while held carried every field, as the server stored it.
    watch
        .wait(LIMIT, "the release in the watch", |_, l| {
            l["spec"]["leaseDurationSeconds"] == 1
        })
        .await;
    let versions: Vec<Value> = watch.events().into_iter().map(|(_, l)| l).collect();
    let by_alpha: Vec<&Value> = versions.iter().filter(|l| holder(l) == "alpha").collect();
    assert!(by_alpha.len() >= 2, "create and renewals: {versions:?}");
    for lease in by_alpha {
        for field in HELD_FIELDS {
            assert!(!lease["spec"][field].is_null(), "{field} missing: {lease}");
        }
    }

    // A second contender takes the released Lease over at once: leaseTransitions 1.
    let mut bravo = space.spawn(space.contender("job", "bravo", 0.2));
    assert_eq!(bravo.wait(LIMIT).await, 0, "{}", bravo.stderr());
    let entry = wait_started(&space, "bravo", LIMIT).await;
    assert_eq!(entry.transitions, "1", "LEASE_EXEC_TRANSITIONS");
    assert!(
        bravo.stderr().contains("took over the released lease"),
        "{}",
        bravo.stderr()
    );
    let after = space.lease("job").await.unwrap();
    assert_eq!(after["spec"]["leaseTransitions"], 1, "{after}");

    for log in [alpha.stderr(), bravo.stderr()] {
        assert!(complaints(&log).is_empty(), "warnings:\n{log}");
    }
}

// ------------------------------------------------------------------------------------------------
// 2. Handoff among three contenders

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_contenders_hand_over_without_overlap() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    kernel();
    let space = Space::new(cluster, "handoff").await;
    const HANDOFFS: usize = 10;
    let mut generation = 0;
    let mut spawn = |space: &Space| {
        generation += 1;
        let identity = format!("h{generation}");
        // Each worker runs 1 s and exits 0: its lease-exec releases and exits; a new contender
        // takes its place, as a restarted Pod would.
        space.spawn(space.contender("handoff", &identity, 1.0))
    };
    let mut pool: Vec<Running> = (0..3).map(|_| spawn(&space)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while space.entries().iter().filter(|e| e.what == "stop").count() < HANDOFFS + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} workers ran in 120 s",
            starts(&space.entries()).len()
        );
        for slot in pool.iter_mut() {
            if slot.exited() {
                let code = slot.wait(LIMIT).await;
                assert_eq!(code, 0, "{}", slot.stderr());
                *slot = spawn(&space);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for slot in &pool {
        slot.signal(Signal::SIGTERM);
    }
    for slot in pool.iter_mut() {
        slot.wait(LIMIT).await;
    }

    // By the kernel's exec and exit stamps, which a short overlap cannot hide from.
    let runs = kernel_runs(&space).await;
    assert_one_at_a_time(&runs, &"three lease-exec contenders");
    let mut gaps: Vec<f64> = runs
        .windows(2)
        .map(|w| ms(w[1].exec_ns - w[0].exit_ns))
        .take(HANDOFFS)
        .collect();
    assert!(gaps.len() >= HANDOFFS, "{runs:?}");
    let max = gaps.iter().cloned().fold(0.0, f64::max);
    // The same handoffs as lease-exec logged them: the release, and the next command's spawn.
    let started = space.log_times("command started");
    let mut protocol: Vec<f64> = space
        .log_times("released the lease")
        .iter()
        .filter_map(|r| started.iter().find(|s| *s > r).map(|s| (s - r) * 1000.0))
        .take(HANDOFFS)
        .collect();
    report(&format!(
        "real tier: graceful handoff among 3 lease-exec, {} handoffs: old worker's exit -> next worker's start p50 {:.1} ms, max {:.1} ms; lease-exec's release -> next lease-exec's spawn p50 {:.1} ms, max {:.1} ms",
        gaps.len(),
        percentile(&mut gaps, 50.0),
        max,
        percentile(&mut protocol, 50.0),
        protocol.last().copied().unwrap_or(f64::NAN),
    ));
    // Followers watch: a handoff takes milliseconds. The bound is generous (a poll would take up
    // to the 500 ms retry period; an expiry 4 s).
    assert!(max < 1000.0, "a handoff took {max:.1} ms: {gaps:?}");
    // Each takeover continued the fencing token.
    let tokens: Vec<i64> = runs
        .iter()
        .map(|r| r.transitions.expect("LEASE_EXEC_TRANSITIONS"))
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[1] == w[0] + 1),
        "LEASE_EXEC_TRANSITIONS: {tokens:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// 3. RBAC for real: deploy/rbac.yaml, and each rule taken away

const RBAC: &str = include_str!("../deploy/rbac.yaml");
const LEASE_VERBS: &str = r#"verbs: ["get", "create", "update", "watch"]"#;
const EVENTS_RULE: &str = "- apiGroups: [\"events.k8s.io\"]\n  resources: [\"events\"]\n  verbs: [\"create\", \"patch\"]\n";

/// deploy/rbac.yaml with `from` replaced by `to` (which must be there).
fn rbac_without(from: &str, to: &str) -> String {
    assert!(
        RBAC.contains(from),
        "deploy/rbac.yaml no longer has {from:?}"
    );
    RBAC.replacen(from, to, 1)
}

/// A Lease as another client leaves it: no holder (released), or held by `holder` for `seconds`.
async fn put_lease(space: &Space<'_>, name: &str, holder: Option<&str>, seconds: u32) {
    // As the API serves a MicroTime: quoted, six fractional digits.
    let now = serde_json::to_string(&k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    let holder = holder
        .map(|h| format!("  holderIdentity: {h}\n  acquireTime: {now}\n  renewTime: {now}\n"))
        .unwrap_or_default();
    let manifest = format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\nspec:\n{holder}  leaseDurationSeconds: {seconds}\n"
    );
    space
        .kubectl(&["create", "-f", "-"], Some(&manifest))
        .await
        .expect("create lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_exactly_the_deployed_role_is_enough() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    kernel();
    let space = Space::new(cluster, "rbac-full").await;
    let sa = space
        .service_account(RBAC, &["get", "create", "update", "watch"], true)
        .await;
    let command = |identity: &str, run_for: f64| {
        let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--identity".into(),
            identity.into(),
            "job".into(),
            "--".into(),
        ]);
        args.extend(space.worker_args(run_for));
        space.lease_exec(Some(&sa), &args)
    };
    // The leader creates the Lease; the follower watches it and takes it over at its release.
    let mut leader = space.spawn(command("leader", 2.0));
    wait_started(&space, "leader", LIMIT).await;
    let mut follower = space.spawn(command("follower", 0.2));
    wait_log(
        &follower,
        LIMIT,
        "the follower to wait",
        "held by another identity",
    )
    .await;
    assert_eq!(leader.wait(LIMIT).await, 0, "{}", leader.stderr());
    assert_eq!(follower.wait(LIMIT).await, 0, "{}", follower.stderr());
    let runs = kernel_runs(&space).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_one_at_a_time(&runs, &"leader and follower");
    let gap = ms(runs[1].exec_ns - runs[0].exit_ns);
    report(&format!(
        "real tier: service account with deploy/rbac.yaml's Role: release -> follower's start {gap:.1} ms"
    ));
    assert!(
        gap < 1000.0,
        "the follower did not take the release at once: {gap} ms"
    );
    for log in [leader.stderr(), follower.stderr()] {
        assert!(complaints(&log).is_empty(), "warnings:\n{log}");
        assert!(!log.contains("polling"), "{log}");
    }
    // The events it recorded as the service account are there.
    let events = space
        .kubectl(&["get", "events", "-o", "json"], None)
        .await
        .json("get events");
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"LeaderElection"), "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_without_update_exits_125_naming_the_verb() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "rbac-noupdate").await;
    let role = rbac_without(LEASE_VERBS, r#"verbs: ["get", "create", "watch"]"#);
    let sa = space
        .service_account(&role, &["get", "create", "watch"], true)
        .await;
    // A released Lease: taking it over is an update.
    put_lease(&space, "job", None, 1).await;
    let before = space.lease("job").await.unwrap();
    let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
    args.extend(["job".into(), "--".into()]);
    args.extend(space.worker_args(-1.0));
    let mut running = space.spawn(space.lease_exec(Some(&sa), &args));
    let code = running.wait(LIMIT).await;
    let log = running.stderr();
    assert_eq!(code, 125, "{log}");
    assert!(log.contains("update"), "the verb is not named:\n{log}");
    assert!(log.contains("403"), "{log}");
    assert!(space.entries().is_empty(), "the worker ran");
    let after = space.lease("job").await.unwrap();
    assert_eq!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_verb_the_role_lacks() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "check").await;
    put_lease(&space, "job", Some("someone-else"), 30).await;
    let before = space.lease("job").await.unwrap();
    // Each lease verb missing in turn, then the events rule: the line names it, and only what
    // lease-exec cannot do without fails the check.
    let cases: [(&str, &[&str], bool, &str, bool); 5] = [
        ("get", &["create", "update", "watch"], true, "may get", true),
        (
            "create",
            &["get", "update", "watch"],
            true,
            "may create",
            true,
        ),
        (
            "update",
            &["get", "create", "watch"],
            true,
            "may update",
            true,
        ),
        (
            "watch",
            &["get", "create", "update"],
            true,
            "may watch",
            false,
        ),
        (
            "events",
            &["get", "create", "update", "watch"],
            false,
            "may create events",
            false,
        ),
    ];
    for (missing, verbs, events, line_name, fails) in cases {
        let quoted: Vec<String> = verbs.iter().map(|v| format!("{v:?}")).collect();
        let mut role = rbac_without(LEASE_VERBS, &format!("verbs: [{}]", quoted.join(", ")));
        if !events {
            role = role.replacen(EVENTS_RULE, "", 1);
        }
        let sa = space.service_account(&role, verbs, events).await;
        let (code, out, err) = {
            let out = tokio::time::timeout(
                LIMIT,
                space
                    .lease_exec(Some(&sa), &["--check", "--identity", "me", "job"])
                    .output(),
            )
            .await
            .expect("--check ran too long")
            .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let line = out
            .lines()
            .find(|l| l.contains(&format!("  {line_name}  ")))
            .unwrap_or_else(|| panic!("without {missing}: no {line_name:?} line:\n{out}{err}"));
        assert!(line.contains("not allowed"), "without {missing}: {out}");
        if fails {
            assert!(
                line.trim_start().starts_with("FAIL"),
                "without {missing}: {out}"
            );
            assert_eq!(code, 125, "without {missing}: {out}{err}");
        } else {
            assert!(
                line.trim_start().starts_with("warn"),
                "without {missing}: {out}"
            );
            assert_eq!(code, 0, "without {missing}: {out}{err}");
        }
        // Every other permission line is ok.
        let others_ok = out
            .lines()
            .filter(|l| l.contains("  may ") && !l.contains(&format!("  {line_name}  ")))
            .filter(|l| !(missing == "events" && l.contains("events")))
            .all(|l| l.trim_start().starts_with("ok"));
        assert!(others_ok, "without {missing}: {out}");
    }
    // It touched nothing.
    let after = space.lease("job").await.unwrap();
    assert_eq!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    report(
        "real tier: --check named each missing verb of the Role (get, create, update fail; watch, events warn)",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_without_watch_polls_and_still_acquires() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "rbac-nowatch").await;
    let role = rbac_without(LEASE_VERBS, r#"verbs: ["get", "create", "update"]"#);
    let sa = space
        .service_account(&role, &["get", "create", "update"], true)
        .await;
    // Held by someone else for 3 s: lease-exec has to wait, and cannot watch.
    put_lease(&space, "job", Some("someone-else"), 3).await;
    let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--identity".into(),
        "poller".into(),
        "job".into(),
        "--".into(),
    ]);
    args.extend(space.worker_args(0.5));
    let mut running = space.spawn(space.lease_exec(Some(&sa), &args));
    let code = running.wait(LIMIT).await;
    let log = running.stderr();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("polling every retry period"), "{log}");
    assert!(log.contains("took over the expired lease"), "{log}");
    assert_eq!(starts(&space.entries()).len(), 1);
    let lease = space.lease("job").await.unwrap();
    assert_eq!(
        lease["spec"]["leaseDurationSeconds"], 1,
        "released: {lease}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_without_events_warns_once_and_leads() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "rbac-noevents").await;
    let role = rbac_without(EVENTS_RULE, "");
    let sa = space
        .service_account(&role, &["get", "create", "update", "watch"], false)
        .await;
    put_lease(&space, "job", None, 1).await;
    let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
    args.extend(["job".into(), "--".into()]);
    args.extend(space.worker_args(1.0));
    let mut running = space.spawn(space.lease_exec(Some(&sa), &args));
    let code = running.wait(LIMIT).await;
    let log = running.stderr();
    assert_eq!(code, 0, "{log}");
    assert_eq!(starts(&space.entries()).len(), 1);
    // Two events (became leader, released) were refused; one warning.
    let warnings = complaints(&log);
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("Events") && warnings[0].contains("403"),
        "{log}"
    );
}

/// Writes another holder into the Lease as an operator would (a conditional replace, retried on
/// a conflict with a renewal).
async fn overwrite_holder(space: &Space<'_>, name: &str, to: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let mut lease = space.lease(name).await.expect("the lease exists");
        lease["spec"]["holderIdentity"] = to.into();
        let out = space
            .kubectl(&["replace", "-f", "-"], Some(&lease.to_string()))
            .await;
        if out.ok {
            return;
        }
        assert!(
            out.stderr.contains("modified") && tokio::time::Instant::now() < deadline,
            "overwrite: {out:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 4. Events through the real events.k8s.io validation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_pass_real_validation_and_kubectl_shows_them() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "events").await;
    put_lease(&space, "job", None, 1).await;

    // Becomes leader, then releases.
    let mut first = space.spawn(space.contender("job", "first", 0.5));
    assert_eq!(first.wait(LIMIT).await, 0, "{}", first.stderr());
    // Becomes leader, then loses the Lease to an operator's overwrite.
    let mut second = space.spawn(space.contender("job", "second", -1.0));
    wait_started(&space, "second", LIMIT).await;
    overwrite_holder(&space, "job", "operator").await;
    assert_eq!(second.wait(LIMIT).await, 75, "{}", second.stderr());

    let wanted = [
        ("first", "LeaderElection", "Normal"),
        ("first", "LeaseReleased", "Normal"),
        ("second", "LeaderElection", "Normal"),
        ("second", "LeadershipLost", "Warning"),
    ];
    let selector = "involvedObject.name=job";
    let deadline = tokio::time::Instant::now() + LIMIT;
    let events = loop {
        let events = space
            .kubectl(
                &["get", "events", "--field-selector", selector, "-o", "json"],
                None,
            )
            .await
            .json("get events");
        let items = events["items"].as_array().unwrap().clone();
        let has = |(who, reason, kind): &(&str, &str, &str)| {
            items.iter().any(|e| {
                e["reason"] == *reason
                    && e["type"] == *kind
                    && e["message"].as_str().unwrap_or("").contains(who)
            })
        };
        if wanted.iter().all(has) {
            break items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events missing: {:?}",
            items
                .iter()
                .map(|e| (e["reason"].clone(), e["message"].clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for event in &events {
        assert_eq!(event["involvedObject"]["kind"], "Lease", "{event}");
        assert_eq!(
            event["involvedObject"]["apiVersion"], "coordination.k8s.io/v1",
            "{event}"
        );
        assert_eq!(event["involvedObject"]["namespace"], space.ns.as_str());
    }
    // The events.k8s.io view: what lease-exec wrote (regarding, reportingController, action).
    let native = space
        .kubectl(&["get", "events.v1.events.k8s.io", "-o", "json"], None)
        .await
        .json("get events.k8s.io events");
    for event in native["items"].as_array().unwrap() {
        assert_eq!(event["regarding"]["name"], "job", "{event}");
        assert!(event["reportingController"].as_str().is_some(), "{event}");
        assert!(event["reportingInstance"].as_str().is_some(), "{event}");
        assert!(event["action"].as_str().is_some(), "{event}");
    }
    // And the table kubectl prints.
    let table = space
        .kubectl(&["get", "events", "--field-selector", selector], None)
        .await
        .expect("get events");
    for (_, reason, _) in wanted {
        assert!(table.contains(reason), "{table}");
    }
    assert!(table.contains("lease/job"), "{table}");
    for log in [first.stderr(), second.stderr()] {
        assert!(
            !log.contains("cannot record Events"),
            "an event was refused:\n{log}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 5. --owner-pod with real Pods and the real garbage collector

async fn create_pod(space: &Space<'_>, name: &str) -> String {
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: worker\n    image: registry.invalid/worker:1\n"
    );
    space
        .kubectl(&["create", "-f", "-"], Some(&manifest))
        .await
        .expect("create pod");
    space
        .kubectl(
            &["get", "pod", name, "-o", "jsonpath={.metadata.uid}"],
            None,
        )
        .await
        .expect("pod uid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_pod_deletion_collects_the_lease_and_followers_honour_the_term() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    kernel();
    let space = Space::new(cluster, "owner").await;
    let uid_a = create_pod(&space, "pod-a").await;
    let uid_b = create_pod(&space, "pod-b").await;
    // A longer lease than elsewhere, so that the collector's deletion comes well inside the term.
    let timing = [
        "--lease-duration",
        "8s",
        "--renew-deadline",
        "6s",
        "--retry-period",
        "500ms",
        "--owner-pod",
    ];
    let in_pod = |pod: &str, uid: &str, identity: &str| {
        let mut args: Vec<String> = timing.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--identity".into(),
            identity.into(),
            "job".into(),
            "--".into(),
        ]);
        args.extend(space.worker_args(-1.0));
        let mut command = space.lease_exec(None, &args);
        command
            .env("POD_NAME", pod)
            .env("POD_UID", uid)
            .env("POD_NAMESPACE", &space.ns);
        command
    };
    let watch = space.watch_lease("job").await;
    let mut a = space.spawn(in_pod("pod-a", &uid_a, "a"));
    let held = space
        .wait_lease("job", LIMIT, "a to hold", |l| holder(l) == "a")
        .await;
    let owners = held["metadata"]["ownerReferences"].as_array().cloned();
    let owner = &owners.expect("ownerReferences")[0];
    assert_eq!(owner["apiVersion"], "v1", "{held}");
    assert_eq!(owner["kind"], "Pod", "{held}");
    assert_eq!(owner["name"], "pod-a", "{held}");
    assert_eq!(owner["uid"], uid_a.as_str(), "{held}");
    let worker_a = wait_started(&space, "a", LIMIT).await;

    let mut b = space.spawn(in_pod("pod-b", &uid_b, "b"));
    wait_log(&b, LIMIT, "b to wait", "held by another identity").await;

    // Pod a's node dies: lease-exec and its worker with it (no release).
    a.signal(Signal::SIGKILL);
    a.wait(LIMIT).await;
    wait_for(LIMIT, "a's worker to die", || !alive(worker_a.pid)).await;
    let last = space.lease("job").await.unwrap();
    assert_eq!(holder(&last), "a", "{last}");
    let last_renew = micro_time_secs(&spec_str(&last, "renewTime"));
    let old_uid = last["metadata"]["uid"].clone();

    // The Pod is deleted; the garbage collector deletes its Lease.
    space
        .kubectl(&["delete", "pod", "pod-a", "--wait=false"], None)
        .await
        .expect("delete pod");
    let deleted_at = now_secs();
    watch
        .wait(LIMIT, "the collector to delete the lease", |kind, l| {
            kind == "DELETED" && l["metadata"]["uid"] == old_uid
        })
        .await;
    let collected_after = now_secs() - deleted_at;

    // b saw it held: it creates the Lease only once a's term is over.
    let recreated = space
        .wait_lease("job", LIMIT, "b to hold", |l| holder(l) == "b")
        .await;
    assert_ne!(recreated["metadata"]["uid"], old_uid, "not re-created");
    let created = micro_time_secs(&spec_str(&recreated, "acquireTime"));
    report(&format!(
        "real tier: --owner-pod: the collector deleted the Lease {collected_after:.1} s after the Pod; b created it {:.2} s after a's last renewal (term 8 s)",
        created - last_renew
    ));
    assert!(
        created >= last_renew + 8.0,
        "b created the Lease {:.3} s after a's last renewal, inside a's 8 s term:\n{}",
        created - last_renew,
        b.stderr()
    );
    assert!(
        b.stderr().contains("deleted while held")
            || b.stderr()
                .contains("deleted while another identity held it"),
        "{}",
        b.stderr()
    );
    let owner = &recreated["metadata"]["ownerReferences"][0];
    assert_eq!(owner["name"], "pod-b", "{recreated}");
    assert_eq!(owner["uid"], uid_b.as_str(), "{recreated}");
    // The fencing token does not go backwards.
    assert!(
        recreated["spec"]["leaseTransitions"].as_i64() >= last["spec"]["leaseTransitions"].as_i64(),
        "{last} -> {recreated}"
    );
    wait_started(&space, "b", LIMIT).await;
    b.signal(Signal::SIGTERM);
    b.wait(LIMIT).await;
    // a's worker exited before b's was exec'd, by the kernel's stamps.
    let runs = kernel_runs(&space).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0].pid, worker_a.pid, "{runs:?}");
    assert_one_at_a_time(&runs, &"a's worker and b's across the collector's deletion");
}

// ------------------------------------------------------------------------------------------------
// 6. API server restarts and etcd compaction

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restart_compaction_and_a_long_outage() {
    // Its own control plane (it stops the API server), with the watch cache off so that a watch
    // from a compacted resourceVersion gets 410 Gone from etcd.
    let Some(cluster) = Cluster::dedicated("restart", &["--watch-cache=false"]).await else {
        return;
    };
    kernel();
    let space = Space::new(&cluster, "restart").await;
    const LEASE: f64 = 20.0;
    let timing = [
        "--lease-duration",
        "20s",
        "--renew-deadline",
        "14s",
        "--renew-interval",
        "500ms",
        "--retry-period",
        "250ms",
        "--grace-period",
        "2s",
    ];
    let command = |identity: &str| {
        let mut args: Vec<String> = timing.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--identity".into(),
            identity.into(),
            "job".into(),
            "--".into(),
        ]);
        args.extend(space.worker_args(-1.0));
        let mut command = space.lease_exec(None, &args);
        command.env("RUST_LOG", "info,lease_exec=debug");
        command
    };
    put_lease(&space, "job", None, 1).await;
    let mut leader = space.spawn(command("leader"));
    let worker = wait_started(&space, "leader", LIMIT).await;
    let follower = space.spawn(command("follower"));
    wait_log(
        &follower,
        LIMIT,
        "the follower to wait",
        "held by another identity",
    )
    .await;

    // (a) A restart shorter than the renew deadline: the command keeps running.
    let started = std::time::Instant::now();
    cluster.control("stop-apiserver", &[]).await;
    cluster.control("start-apiserver", &[]).await;
    let outage = started.elapsed().as_secs_f64();
    let back = now_secs();
    space
        .wait_lease("job", LIMIT, "a renewal after the restart", |l| {
            holder(l) == "leader" && micro_time_secs(&spec_str(l, "renewTime")) > back
        })
        .await;
    assert!(alive(worker.pid), "{}", leader.stderr());
    assert!(!leader.exited(), "{}", leader.stderr());
    assert_eq!(starts(&space.entries()).len(), 1, "the follower started");
    report(&format!(
        "real tier: API server restart ({outage:.1} s, renew deadline 14 s): the command kept running"
    ));

    // (b) The follower's watch broken across a restart during which etcd was compacted past its
    // resourceVersion: the leader is frozen, so the Lease stays at that version while other
    // objects move etcd on; the follower's next watch gets 410 Gone.
    let frozen = std::time::Instant::now();
    leader.signal(Signal::SIGSTOP);
    space
        .kubectl(&["create", "configmap", "move-etcd-on"], None)
        .await
        .expect("create configmap");
    cluster.control("stop-apiserver", &[]).await;
    let compacted = cluster.control("compact", &[]).await;
    cluster.control("start-apiserver", &[]).await;
    wait_log(
        &follower,
        Duration::from_secs(30),
        "the follower's watch to get 410 Gone",
        "410 Gone",
    )
    .await;
    leader.signal(Signal::SIGCONT);
    let thawed = now_secs();
    space
        .wait_lease("job", LIMIT, "a renewal after the thaw", |l| {
            holder(l) == "leader" && micro_time_secs(&spec_str(l, "renewTime")) > thawed
        })
        .await;
    let freeze = frozen.elapsed().as_secs_f64();
    assert!(alive(worker.pid), "{}", leader.stderr());
    assert_eq!(starts(&space.entries()).len(), 1, "the follower started");
    report(&format!(
        "real tier: {} while the follower's watch was down; it got 410 Gone and re-read (leader frozen {freeze:.1} s)",
        compacted.trim()
    ));

    // (c) The release after all that is taken at once: the follower's new watch works.
    leader.signal(Signal::SIGTERM);
    assert_eq!(leader.wait(LIMIT).await, 143, "{}", leader.stderr());
    let taken = wait_started(&space, "follower", LIMIT).await;
    // From the leader's worker's exit to the follower's worker's exec, as the kernel stamped them
    // (no overlap: checked over both runs at the end).
    let leader_exit = kernel_exit(worker.pid, worker.at_ns, LIMIT).await;
    let follower_exec = kernel()
        .span_at(taken.pid as u32, taken.at_ns)
        .expect("the kernel's span of the follower's worker")
        .exec_ns;
    let gap = (follower_exec as i64 - leader_exit as i64) as f64 / 1e6;
    report(&format!(
        "real tier: after the restarts and the 410, release -> follower's start {gap:.1} ms"
    ));
    assert!(gap < 1000.0, "the follower missed the release: {gap} ms");

    // (d) An outage longer than the renew deadline: stopped in time, exit 75.
    let mut follower = follower;
    let renewed = space
        .wait_lease("job", LIMIT, "the follower's renewal", |l| {
            holder(l) == "follower"
        })
        .await;
    drop(renewed);
    let stopped = now_secs();
    cluster.control("stop-apiserver", &[]).await;
    let died_ns = kernel_exit(taken.pid, taken.at_ns, Duration::from_secs(30)).await as i64;
    assert_eq!(follower.wait(LIMIT).await, 75, "{}", follower.stderr());
    cluster.control("start-apiserver", &[]).await;
    let last = space.lease("job").await.unwrap();
    assert_eq!(
        holder(&last),
        "follower",
        "not released while unreachable: {last}"
    );
    // `R`: the start of the last renewal that succeeded; the renewTime it wrote was read from the
    // wall clock right after. The worker stops at its SIGTERM at R + renew deadline (14 s), so it
    // is gone on that schedule, both sides, and well before the kill deadline R + 20 s − 600 ms.
    let last_renewal = micro_time_secs(&spec_str(&last, "renewTime"));
    let renewed_ns = mono_ns_of_wall(last_renewal);
    let after_ms = (died_ns - renewed_ns) as f64 / 1e6;
    let died = stopped + (died_ns - mono_ns_of_wall(stopped)) as f64 / 1e9;
    let expiry = last_renewal + LEASE;
    report(&format!(
        "real tier: API server down for good: the command stopped {:.1} s after the stop began, {:.3} s after the last renewal, {:.1} s before the lease could expire for others",
        died - stopped,
        after_ms / 1000.0,
        expiry - died
    ));
    let (early, late) = (
        support::REQUEST_LEAD_NS as f64 / 1e6,
        support::TERM_LATE_NS as f64 / 1e6,
    );
    assert!(
        (14_000.0 - early..=14_000.0 + late).contains(&after_ms),
        "the worker exited {after_ms:.1} ms after the last renewal (SIGTERM at the 14 s renew \
         deadline, allowed -{early}..+{late} ms; kill deadline 19 400 ms, expiry {} ms):\n{}",
        LEASE * 1000.0,
        follower.stderr()
    );
    // Never two workers at once, over the whole run.
    let runs = kernel_runs(&space).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_one_at_a_time(&runs, &"leader and follower across restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_a_release_soon_after_the_api_server_comes_back() {
    // Its own control plane: it stops the API server.
    let Some(cluster) = Cluster::dedicated("rewatch", &[]).await else {
        return;
    };
    let space = Space::new(&cluster, "rewatch").await;
    put_lease(&space, "job", Some("other"), 600).await;
    // A 10 s retry period: a follower that retried its broken watch only every retry period would
    // notice the release up to 10 s late.
    let mut args: Vec<String> = [
        "--lease-duration",
        "20s",
        "--renew-deadline",
        "14s",
        "--retry-period",
        "10s",
        "--identity",
        "follower",
        "job",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(space.worker_args(-1.0));
    let mut follower = space.spawn(space.lease_exec(None, &args));
    wait_log(
        &follower,
        LIMIT,
        "the follower to wait",
        "held by another identity",
    )
    .await;
    cluster.control("stop-apiserver", &[]).await;
    wait_log(
        &follower,
        LIMIT,
        "the follower to notice the outage",
        "cannot ",
    )
    .await;
    cluster.control("start-apiserver", &[]).await;
    let released = now_secs();
    space
        .kubectl(
            &[
                "patch",
                "lease",
                "job",
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"holderIdentity":null,"leaseDurationSeconds":1}}"#,
            ],
            None,
        )
        .await
        .expect("release");
    wait_started(&space, "follower", LIMIT).await;
    let delay = now_secs() - released;
    report(&format!(
        "real tier: API server restarted under a watching follower (retry period 10 s): the release after it was taken within {delay:.2} s"
    ));
    assert!(
        delay < 5.0,
        "the follower took {delay:.1} s to see the release: its watch was not re-established within about a second:\n{}",
        follower.stderr()
    );
    follower.signal(Signal::SIGTERM);
    follower.wait(LIMIT).await;
}

// ------------------------------------------------------------------------------------------------
// 7. Planned handover: spec.strategy and spec.preferredHolder

/// `lease-exec ARGS` run to completion: exit code, stdout, stderr.
async fn run_to_end(space: &Space<'_>, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(LIMIT, space.lease_exec(None, args).output())
        .await
        .expect("lease-exec ran too long")
        .expect("run lease-exec");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_handover_goes_to_the_preferred_candidate() {
    // The fields are kept only with the CoordinatedLeaderElection feature (and its API) on.
    let Some(cluster) = Cluster::dedicated(
        "strategy",
        &[
            "--feature-gates=CoordinatedLeaderElection=true",
            "--runtime-config=coordination.k8s.io/v1beta1=true",
        ],
    )
    .await
    else {
        return;
    };
    kernel();
    let space = Space::new(&cluster, "strategy").await;
    // The real validation: preferredHolder requires strategy.
    let invalid = space
        .kubectl(
            &["create", "-f", "-"],
            Some("apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: invalid\nspec:\n  preferredHolder: someone\n"),
        )
        .await;
    assert!(
        !invalid.ok && invalid.stderr.contains("strategy"),
        "{invalid:?}"
    );
    // A strategy of the API's own, released: lease-exec keeps it through its terms.
    space
        .kubectl(
            &["create", "-f", "-"],
            Some("apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: job\nspec:\n  strategy: OldestEmulationVersion\n  leaseDurationSeconds: 1\n"),
        )
        .await
        .expect("create lease");
    let watch = space.watch_lease("job").await;
    let mut a = space.spawn(space.contender("job", "a", -1.0));
    wait_started(&space, "a", LIMIT).await;
    let b = space.spawn(space.contender("job", "b", -1.0));
    let c = space.spawn(space.contender("job", "c", -1.0));
    for (running, what) in [(&b, "b to wait"), (&c, "c to wait")] {
        wait_log(running, LIMIT, what, "held by another identity").await;
    }
    let (code, out, err) = run_to_end(&space, &["--handover", "--to", "b", "job"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("a -> b"), "{out}");
    assert_eq!(a.wait(LIMIT).await, 75, "{}", a.stderr());
    wait_started(&space, "b", LIMIT).await;
    let versions: Vec<Value> = watch.events().into_iter().map(|(_, l)| l).collect();
    assert!(
        versions.iter().all(|l| holder(l) != "c"),
        "c claimed during the handover: {versions:?}"
    );
    assert!(
        versions
            .iter()
            .any(|l| holder(l) == "a" && spec_str(l, "preferredHolder") == "b"),
        "the request was never seen: {versions:?}"
    );
    assert!(
        versions
            .iter()
            .all(|l| spec_str(l, "strategy") == "OldestEmulationVersion"),
        "the API's strategy was lost: {versions:?}"
    );
    let now = space.lease("job").await.unwrap();
    assert_eq!(holder(&now), "b");
    assert_eq!(spec_str(&now, "preferredHolder"), "", "{now}");
    let (_, status, _) = run_to_end(&space, &["--status", "job"]).await;
    assert!(!status.contains("handover:"), "{status}");
    for mut running in [b, c] {
        running.signal(Signal::SIGTERM);
        running.wait(LIMIT).await;
    }
    // (c may take the Lease over when b stops.)
    let runs = kernel_runs(&space).await;
    assert_one_at_a_time(&runs, &"handover a -> b on kube-apiserver");
    let identities: Vec<_> = runs.iter().map(|r| r.identity.as_deref()).collect();
    assert_eq!(identities[..2], [Some("a"), Some("b")], "{runs:?}");
    let gap = ms(runs[1].exec_ns - runs[0].exit_ns);
    report(&format!(
        "real tier: planned handover a -> b (3 contenders, c deferred): {gap:.1} ms from a's worker gone to b's started; {}",
        out.trim()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_is_refused_naming_the_gate_when_the_api_server_drops_it() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "nogate").await;
    put_lease(&space, "job", Some("holder"), 60).await;
    let (code, out, err) = run_to_end(&space, &["--handover", "--to", "other", "job"]).await;
    assert_eq!(code, 125, "{out}{err}");
    assert!(err.contains("CoordinatedLeaderElection"), "{err}");
    let lease = space.lease("job").await.unwrap();
    assert_eq!(spec_str(&lease, "preferredHolder"), "", "{lease}");
}

// ------------------------------------------------------------------------------------------------
// 7b. A semaphore: --holders 2 with three contenders

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_of_two_slots_among_three_contenders() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    kernel();
    let space = Space::new(cluster, "semaphore").await;
    let spawn = |identity: &str, run_for: f64| {
        let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
        args.extend(["--holders", "2", "--identity", identity, "sem", "--"].map(String::from));
        args.extend(space.worker_args(run_for));
        space.spawn(space.lease_exec(None, &args))
    };
    // Two run for good, the third waits; then a fourth round: one of the two finishes (2 s) and
    // the waiting one takes its slot.
    let mut a = spawn("a", -1.0);
    let mut b = spawn("b", 2.0);
    wait_started(&space, "a", LIMIT).await;
    wait_started(&space, "b", LIMIT).await;
    let mut c = spawn("c", -1.0);
    let out = space
        .kubectl(&["get", "leases", "-o", "json"], None)
        .await
        .json("leases");
    let mut names: Vec<String> = out["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["sem-0", "sem-1"], "as kubectl sees them");
    assert_eq!(b.wait(LIMIT).await, 0, "{}", b.stderr());
    let c_started = wait_started(&space, "c", LIMIT).await;
    let b_entry = starts(&space.entries())
        .into_iter()
        .find(|e| e.identity == "b")
        .unwrap();
    assert_eq!(c_started.lease, b_entry.lease, "c took b's slot");
    for r in [&mut a, &mut c] {
        r.signal(Signal::SIGTERM);
        r.wait(LIMIT).await;
    }
    // By the kernel's stamps: one worker per slot at a time, two at most at once.
    let runs = kernel_runs(&space).await;
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_one_at_a_time(&runs, &"a, b and c on two slots");
    let (most, at) = most_at_once(&runs);
    assert!(most <= 2, "{most} workers ran at {at} ns: {runs:?}");
    let of = |identity: &str| {
        runs.iter()
            .find(|r| r.identity.as_deref() == Some(identity))
            .unwrap_or_else(|| panic!("{identity}'s worker: {runs:?}"))
    };
    assert_eq!(of("c").lease, of("b").lease, "{runs:?}");
    let gap = ms(of("c").exec_ns - of("b").exit_ns);
    report(&format!(
        "real tier: semaphore of 2 slots, 3 contenders: a freed slot ({}) taken by the waiting contender {gap:.1} ms after its worker exited",
        b_entry.lease
    ));
    assert!(gap < 1000.0, "{gap} ms");
}

// ------------------------------------------------------------------------------------------------
// 8. A mixed pool with client-go's leader election

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
enum Kind {
    LeaseExec,
    ClientGo,
}

impl Kind {
    fn of(identity: &str) -> Kind {
        if identity.starts_with("le-") {
            Kind::LeaseExec
        } else {
            Kind::ClientGo
        }
    }
    fn other(self) -> Kind {
        match self {
            Kind::LeaseExec => Kind::ClientGo,
            Kind::ClientGo => Kind::LeaseExec,
        }
    }
}

struct Member {
    identity: String,
    running: Running,
}

const MIXED_TIMING: [&str; 4] = ["4s", "3s", "1s", "1s"]; // lease, renew deadline, retry, grace

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_pool_with_client_go_contenders() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "mixed").await;
    let watch = space.watch_lease("job").await;
    let [lease, renew, retry, grace] = MIXED_TIMING;
    let mut generation = 0;
    let mut spawn = |space: &Space, kind: Kind| -> Member {
        generation += 1;
        match kind {
            Kind::LeaseExec => {
                let identity = format!("le-{generation}");
                let mut args: Vec<String> = [
                    "--lease-duration",
                    lease,
                    "--renew-deadline",
                    renew,
                    "--retry-period",
                    retry,
                    "--grace-period",
                    grace,
                    "--identity",
                    &identity,
                    "job",
                    "--",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(space.worker_args(-1.0));
                let running = space.spawn(space.lease_exec(None, &args));
                Member { identity, running }
            }
            Kind::ClientGo => {
                let identity = format!("cg-{generation}");
                let mut command = tokio::process::Command::new(contender_bin());
                command
                    .args([
                        "--lease-name",
                        "job",
                        "--namespace",
                        &space.ns,
                        "--identity",
                        &identity,
                        "--lease-duration",
                        lease,
                        "--renew-deadline",
                        renew,
                        "--retry-period",
                        retry,
                        "--grace-period",
                        grace,
                        "--kubeconfig",
                    ])
                    .arg(&space.kubeconfig)
                    .arg("--")
                    .args(space.worker_args(-1.0))
                    // The journaling worker records this as its holder.
                    .env("LEASE_EXEC_HELD_IDENTITY", &identity)
                    .stdin(std::process::Stdio::null());
                let running = space.spawn(command);
                Member { identity, running }
            }
        }
    };
    /// Waits until a member has seen the Lease held by someone else.
    async fn waiting(member: &Member) {
        let needle = match Kind::of(&member.identity) {
            Kind::LeaseExec => "held by another identity",
            Kind::ClientGo => "leader is ",
        };
        wait_log(&member.running, LIMIT, "a member to wait", needle).await;
    }

    // A released Lease to start from. Were it absent, a lease-exec that saw it so would treat it as
    // possibly deleted under a holder it never saw, and wait one lease duration from then before
    // taking it, even after client-go (which creates at once) created and released it: the rule
    // for absent Leases, not a handoff. Whether lease-exec saw the absence would depend on which
    // process reached the API server first.
    let seconds = humantime::parse_duration(lease).unwrap().as_secs() as u32;
    put_lease(&space, "job", None, seconds).await;
    kernel();
    let mut pool: Vec<Member> = vec![
        spawn(&space, Kind::LeaseExec),
        spawn(&space, Kind::ClientGo),
        spawn(&space, Kind::LeaseExec),
        spawn(&space, Kind::ClientGo),
    ];
    let began = std::time::Instant::now();
    let mut deaths: HashMap<i32, u64> = HashMap::new();
    // (from, to, signal, old worker's end -> new worker's start in ms, and for a graceful stop
    // the release -> the new holder's spawn of its worker, from their logs)
    let mut handoffs: Vec<(Kind, Kind, &str, f64, Option<f64>)> = Vec::new();
    let methods = ["TERM", "TERM", "KILL", "KILL"];
    let mut round = 0;
    // Eight rounds: each kind stopped by each signal twice (the kinds alternate, the signals go
    // TERM, TERM, KILL, KILL), which is what the assertions below need.
    while round < 8 {
        // The current leader: the one running worker.
        let mut current = None;
        wait_for(Duration::from_secs(20), "one worker running", || {
            let spans = support::intervals(&space.entries());
            let open: Vec<_> = spans
                .iter()
                .filter(|s| s.2.is_none() && alive(s.0) && !deaths.contains_key(&s.0))
                .collect();
            if open.len() == 1 {
                current = Some(open[0].0);
                true
            } else {
                false
            }
        })
        .await;
        let worker_pid = current.unwrap();
        let entry = space
            .entries()
            .into_iter()
            .rfind(|e| e.what == "start" && e.pid == worker_pid)
            .unwrap();
        let leader_at = pool
            .iter()
            .position(|m| m.identity == entry.identity)
            .expect("the leader is in the pool");
        let kind = Kind::of(&entry.identity);
        for (i, member) in pool.iter().enumerate() {
            if i != leader_at {
                waiting(member).await;
            }
        }
        // The leader's own kind steps aside, so that the other kind takes over.
        let peer_at = pool
            .iter()
            .position(|m| Kind::of(&m.identity) == kind && m.identity != entry.identity)
            .unwrap();
        pool[peer_at].running.signal(Signal::SIGTERM);
        pool[peer_at].running.wait(LIMIT).await;

        let method = methods[round % methods.len()];
        let leader = &mut pool[leader_at];
        let end_ns = match method {
            "TERM" => {
                leader.running.signal(Signal::SIGTERM);
                let code = leader.running.wait(LIMIT).await;
                assert_eq!(
                    code,
                    143,
                    "{}: {}",
                    leader.identity,
                    leader.running.stderr()
                );
                kernel_exit(worker_pid, entry.at_ns, LIMIT).await
            }
            _ => {
                // The whole Pod dies at once: lease-exec (its command follows by the
                // parent-death signal), or the client-go process and its worker's group.
                leader.running.signal(Signal::SIGKILL);
                if kind == Kind::ClientGo {
                    let _ = killpg(Pid::from_raw(worker_pid), Signal::SIGKILL);
                }
                leader.running.wait(LIMIT).await;
                let died = kernel_exit(worker_pid, entry.at_ns, LIMIT).await;
                deaths.insert(worker_pid, died);
                died
            }
        };
        let mut next = None;
        wait_for(Duration::from_secs(20), "the next worker to start", || {
            next = space
                .entries()
                .into_iter()
                .find(|e| e.what == "start" && e.at_ns > entry.at_ns && e.pid != worker_pid);
            next.is_some()
        })
        .await;
        let next = next.unwrap();
        let to = Kind::of(&next.identity);
        assert_eq!(
            to,
            kind.other(),
            "{} took over from {}",
            next.identity,
            entry.identity
        );
        let protocol = (method == "TERM").then(|| {
            let released = match kind {
                Kind::LeaseExec => "released the lease",
                // client-go releases, then calls OnStoppedLeading.
                Kind::ClientGo => "stopped leading",
            };
            let started = match to {
                Kind::LeaseExec => "command started",
                Kind::ClientGo => "worker started",
            };
            let successor = pool.iter().find(|m| m.identity == next.identity).unwrap();
            let released = *log_times(&pool[leader_at].running.log, released)
                .last()
                .expect("the release is logged");
            // The successor's worker has journaled its start: the line that says so comes soon.
            let deadline = std::time::Instant::now() + LIMIT;
            let started = loop {
                if let Some(t) = log_times(&successor.running.log, started).first() {
                    break *t;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no {started:?} line from {} within {LIMIT:?}:\n{}",
                    successor.identity,
                    successor.running.stderr()
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            (started - released) * 1000.0
        });
        handoffs.push((
            kind,
            to,
            method,
            (next.at_ns as f64 - end_ns as f64) / 1e6,
            protocol,
        ));
        pool[peer_at] = spawn(&space, kind);
        pool[leader_at] = spawn(&space, kind);
        round += 1;
    }
    let elapsed = began.elapsed();
    for member in &pool {
        member.running.signal(Signal::SIGTERM);
    }
    for member in pool.iter_mut() {
        member.running.wait(LIMIT).await;
    }

    // Never two workers at once, by the kernel's exec and exit stamps.
    let runs = kernel_runs(&space).await;
    assert_one_at_a_time(&runs, &format!("mixed pool, handoffs {handoffs:?}"));

    let summary = |from: Kind, method: &str| -> Vec<f64> {
        handoffs
            .iter()
            .filter(|h| h.0 == from && h.2 == method)
            .map(|h| h.3)
            .collect()
    };
    for (from, method) in [
        (Kind::ClientGo, "TERM"),
        (Kind::LeaseExec, "TERM"),
        (Kind::ClientGo, "KILL"),
        (Kind::LeaseExec, "KILL"),
    ] {
        let mut gaps = summary(from, method);
        assert!(
            !gaps.is_empty(),
            "no {from:?} {method} handoff: {handoffs:?}"
        );
        let max = gaps.iter().cloned().fold(0.0, f64::max);
        let mut protocol: Vec<f64> = handoffs
            .iter()
            .filter(|h| h.0 == from && h.2 == method)
            .filter_map(|h| h.4)
            .collect();
        let logged = if protocol.is_empty() {
            String::new()
        } else {
            format!(
                "; release -> successor's spawn (logs) p50 {:.1} ms, max {:.1} ms",
                percentile(&mut protocol, 50.0),
                protocol.last().unwrap()
            )
        };
        report(&format!(
            "real tier: mixed pool {from:?} -> {:?} after SIG{method} ({} handoffs): old worker's end -> new worker's start p50 {:.1} ms, max {:.1} ms{logged}",
            from.other(),
            gaps.len(),
            percentile(&mut gaps, 50.0),
            max
        ));
        match (from, method) {
            // lease-exec watches: client-go's release is taken at once.
            (Kind::ClientGo, "TERM") => assert!(max < 1000.0, "{gaps:?}"),
            // client-go polls every retry period (1 s, jittered up to 1.2 s): well before expiry.
            (Kind::LeaseExec, "TERM") => assert!(max < 3000.0, "{gaps:?}"),
            // After a crash, the Lease expires: one lease duration after the last renewal.
            _ => assert!(max < 12_000.0, "{gaps:?}"),
        }
    }
    report(&format!(
        "real tier: mixed pool ran {:.0} s, {} handoffs, no overlap",
        elapsed.as_secs_f64(),
        handoffs.len()
    ));

    // The releases as the server stored them: client-go's (holderIdentity "", 1 s) taken over by
    // lease-exec, and lease-exec's (no holder, 1 s) by client-go; leaseTransitions never goes back.
    let versions: Vec<Value> = watch.events().into_iter().map(|(_, l)| l).collect();
    let mut seen = (false, false);
    for w in versions.windows(3) {
        let (before, release, after) = (&w[0], &w[1], &w[2]);
        if holder(release).is_empty() && !holder(before).is_empty() && !holder(after).is_empty() {
            assert_eq!(release["spec"]["leaseDurationSeconds"], 1, "{release}");
            match (Kind::of(&holder(before)), Kind::of(&holder(after))) {
                (Kind::ClientGo, Kind::LeaseExec) => seen.0 = true,
                (Kind::LeaseExec, Kind::ClientGo) => seen.1 = true,
                _ => {}
            }
        }
    }
    assert!(
        seen.0,
        "no client-go release taken over by lease-exec in the watch"
    );
    assert!(
        seen.1,
        "no lease-exec release taken over by client-go in the watch"
    );
    let transitions: Vec<i64> = versions
        .iter()
        .filter_map(|l| l["spec"]["leaseTransitions"].as_i64())
        .collect();
    assert!(
        transitions.windows(2).all(|w| w[1] >= w[0]),
        "leaseTransitions went back: {transitions:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// 9. A half-open connection between the leader and the API server

/// The relay itself, against an echo server: a half-open cut freezes the connection open then
/// while a new one works, a partition refuses and resets, healing lets connections through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_freezes_refuses_and_heals() {
    use relay::{Fault, Relay};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut from, mut to) = stream.split();
                let _ = tokio::io::copy(&mut from, &mut to).await;
            });
        }
    });
    let relay = Relay::start(target);
    /// Whether "ping" comes back within `limit`.
    async fn echoes(stream: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0; 4];
        stream.write_all(b"ping").await.is_ok()
            && tokio::time::timeout(limit, stream.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok())
    }
    /// Connects, retrying while refused (the relay reacts to a fault in its own task).
    async fn connect(relay: &Relay, refused: bool) -> Option<TcpStream> {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let stream = TcpStream::connect(relay.addr()).await;
            if stream.is_err() == refused {
                return stream.ok();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still {} after {LIMIT:?}",
                if refused { "accepted" } else { "refused" }
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut old = connect(&relay, false).await.unwrap();
    assert!(echoes(&mut old, LIMIT).await);
    relay.apply(Fault::HalfOpen);
    let mut new = connect(&relay, false).await.unwrap();
    assert!(echoes(&mut new, LIMIT).await, "a new connection works");
    assert!(
        !echoes(&mut old, Duration::from_millis(300)).await,
        "the connection open at the cut passes nothing"
    );
    assert_eq!(relay.accepted(), 2);

    relay.apply(Fault::Partition);
    connect(&relay, true).await;
    let mut buf = [0; 1];
    let read = tokio::time::timeout(LIMIT, new.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "an open connection is cut: {read:?}"
    );

    relay.apply(Fault::Heal);
    let mut healed = connect(&relay, false).await.unwrap();
    assert!(echoes(&mut healed, LIMIT).await, "healed");
    let read = tokio::time::timeout(LIMIT, old.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "healing resets the frozen connection: {read:?}"
    );
    assert_eq!(relay.accepted(), 3);
}

/// The half-open test's timings. A renewal is due 2 s after the last one (the default renew
/// interval for these: a third of the lease, at most half the renew deadline) and each attempt
/// gets (renew deadline − renew interval) / 2 = 1 s, so an attempt stuck on a dead connection
/// leaves 1 s for a retry on a fresh one. A client whose request timeout is half the renew
/// deadline instead (2 s) spends all that is left on the stuck attempt: the test catches that. (At
/// a 1 s renew interval such a client still has 1 s for a retry, and would pass.)
const HALF_OPEN_TIMING: [&str; 10] = [
    "--lease-duration",
    "6s",
    "--renew-deadline",
    "4s",
    "--retry-period",
    "250ms",
    "--renew-interval",
    "2s",
    "--grace-period",
    "1s",
];
const HALF_OPEN_LEASE: f64 = 6.0;
const HALF_OPEN_RENEW_DEADLINE: f64 = 4.0;

/// The leader reaches the real API server through a relay, which freezes the connections open at
/// the fault (they stay up and pass nothing) while new ones work: a load balancer or conntrack
/// table that dropped them, or a frozen proxy. The leader must notice its renewal hanging, retry
/// on a fresh connection and keep its worker and the Lease for three lease durations, while a
/// follower with a direct connection waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_leader_keeps_its_worker_running_through_a_relay() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "half-open").await;
    let relay = relay::Relay::start(([127, 0, 0, 1], cluster.port).into());
    // The serving certificate is for 127.0.0.1, whatever the port: only the port changes.
    let direct = std::fs::read_to_string(&space.kubeconfig).unwrap();
    let relayed = direct.replace(&cluster.server(), &format!("https://{}", relay.addr()));
    assert_ne!(relayed, direct, "the kubeconfig names {}", cluster.server());
    let relayed_kubeconfig = space.path("relayed.kubeconfig");
    std::fs::write(&relayed_kubeconfig, relayed).unwrap();
    let command = |identity: &str, kubeconfig: Option<&std::path::Path>| {
        let mut args: Vec<String> = HALF_OPEN_TIMING.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--identity".into(),
            identity.into(),
            "job".into(),
            "--".into(),
        ]);
        args.extend(space.worker_args(-1.0));
        space.lease_exec(kubeconfig, &args)
    };
    let watch = space.watch_lease("job").await;
    put_lease(&space, "job", None, HALF_OPEN_LEASE as u32).await;
    let mut leader = space.spawn(command("leader", Some(&relayed_kubeconfig)));
    let worker = wait_started(&space, "leader", LIMIT).await;
    let mut follower = space.spawn(command("follower", None));
    wait_log(
        &follower,
        LIMIT,
        "the follower to wait",
        "held by another identity",
    )
    .await;
    let held = space.lease("job").await.expect("the lease");
    space
        .wait_lease("job", LIMIT, "a renewal through the relay", |l| {
            holder(l) == "leader" && spec_str(l, "renewTime") > spec_str(&held, "renewTime")
        })
        .await;

    let accepted = relay.accepted();
    assert!(accepted > 0, "the leader connects through the relay");
    let cut = now_secs();
    relay.apply(relay::Fault::HalfOpen);

    // Three lease durations: the worker runs, the follower waits, and the Lease, as the test's
    // own client reads it, names the leader and was renewed within the renew deadline before each
    // read began.
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(3.0 * HALF_OPEN_LEASE);
    let mut reads = 0;
    while tokio::time::Instant::now() < until {
        let exited = (leader.exited(), follower.exited());
        let logs = || {
            format!(
                "--- leader\n{}--- follower\n{}",
                leader.stderr(),
                follower.stderr()
            )
        };
        let after = now_secs() - cut;
        assert!(
            alive(worker.pid),
            "the leader's worker died {after:.1} s after the fault\n{}",
            logs()
        );
        assert!(
            !exited.0,
            "the leader exited {after:.1} s after the fault\n{}",
            logs()
        );
        assert!(!exited.1, "the follower exited\n{}", logs());
        assert_eq!(
            starts(&space.entries()).len(),
            1,
            "another worker started\n{}",
            logs()
        );
        let asked = now_secs();
        let lease = space.lease("job").await.expect("the lease");
        assert_eq!(holder(&lease), "leader", "{lease}\n{}", logs());
        let stale = asked - micro_time_secs(&spec_str(&lease, "renewTime"));
        assert!(
            stale < HALF_OPEN_RENEW_DEADLINE,
            "{:.1} s after the fault the Lease had not been renewed for {stale:.1} s: {lease}\n{}",
            asked - cut,
            logs()
        );
        reads += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every renewal, as the watch saw it: from the last one before the fault on, no gap as long as
    // the renew deadline.
    let renewals: Vec<f64> = {
        let mut times: Vec<f64> = watch
            .events()
            .iter()
            .filter(|(_, l)| holder(l) == "leader")
            .map(|(_, l)| micro_time_secs(&spec_str(l, "renewTime")))
            .collect();
        times.dedup();
        times
    };
    let from = renewals
        .iter()
        .rposition(|t| *t <= cut)
        .expect("a renewal before the fault");
    let during = &renewals[from..];
    let longest = during.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    let first_after = during.get(1).map(|t| t - cut);
    let new_connections = relay.accepted() - accepted;
    leader.signal(Signal::SIGTERM);
    assert_eq!(leader.wait(LIMIT).await, 143, "{}", leader.stderr());
    follower.signal(Signal::SIGTERM);
    follower.wait(LIMIT).await;
    let (leader_log, follower_log) = (leader.stderr(), follower.stderr());
    report(&format!(
        "real tier: half-open relay under the leader (renew interval 2 s, renew deadline 4 s): \
         {} renewals in the {:.0} s after the fault, the first {:.2} s after it, longest gap \
         {longest:.2} s; {new_connections} new connection(s) through the relay ({accepted} \
         before); {reads} reads by the test",
        during.len() - 1,
        3.0 * HALF_OPEN_LEASE,
        first_after.unwrap_or(f64::NAN),
    ));
    assert!(
        new_connections > 0,
        "the leader opened no new connection after the fault\n{leader_log}"
    );
    assert!(during.len() > 1, "no renewal after the fault\n{leader_log}");
    assert!(
        longest < HALF_OPEN_RENEW_DEADLINE,
        "renewals {longest:.2} s apart: {during:?}\n{leader_log}"
    );
    for (who, log) in [("leader", &leader_log), ("follower", &follower_log)] {
        assert!(
            !log.contains("leadership lost"),
            "the {who} lost leadership:\n{log}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 10. An operator shortens the held Lease under a client-go follower

/// `contender` (client-go's leader election) for `lease` as `identity`, with `timing` (lease,
/// renew deadline, retry, grace) and the journaling worker, which records `identity` as its holder.
fn client_go(
    space: &Space<'_>,
    lease: &str,
    identity: &str,
    [duration, renew, retry, grace]: [&str; 4],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(contender_bin());
    command
        .args([
            "--lease-name",
            lease,
            "--namespace",
            &space.ns,
            "--identity",
            identity,
            "--lease-duration",
            duration,
            "--renew-deadline",
            renew,
            "--retry-period",
            retry,
            "--grace-period",
            grace,
            "--kubeconfig",
        ])
        .arg(&space.kubeconfig)
        .arg("--")
        .args(space.worker_args(-1.0))
        .env("LEASE_EXEC_HELD_IDENTITY", identity)
        .stdin(std::process::Stdio::null());
    command
}

/// Kills the process groups of the workers `identity` started (the contender's worker outlives a
/// contender killed with the test).
fn kill_workers(space: &Space<'_>, identity: &str) {
    for entry in starts(&space.entries()) {
        if entry.identity == identity {
            let _ = killpg(Pid::from_raw(entry.pid), Signal::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortened_lease_is_restored_before_a_client_go_follower_claims() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    kernel();
    let space = Space::new(cluster, "shortened").await;
    const EDITS: usize = 5;
    const LEADER: &str = "le-holder";
    const FOLLOWER: &str = "cg-follower";
    // A released Lease, so that the leader takes it at once.
    put_lease(&space, "job", None, 1).await;
    let watch = space.watch_lease("job").await;
    // Renewing only every 2 s: an edit right after a renewal stands for most of 2 s unless the
    // leader answers it.
    let mut args: Vec<String> = [
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "4s",
        "--renew-interval",
        "2s",
        "--retry-period",
        "500ms",
        "--grace-period",
        "1s",
        "--identity",
        LEADER,
        "job",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(space.worker_args(-1.0));
    let mut leader = space.spawn(space.lease_exec(None, &args));
    let worker = wait_started(&space, LEADER, LIMIT).await;
    let worker_death = support::death_watch(worker.pid);
    // client-go polls every 500 ms (jittered up to 1.1 s) and restarts its clock at any change of
    // the record, counting the duration it then shows.
    let mut follower = space.spawn(client_go(
        &space,
        "job",
        FOLLOWER,
        ["6s", "4s", "500ms", "1s"],
    ));
    wait_log(
        &follower,
        LIMIT,
        "client-go to see the leader",
        &format!("leader is {LEADER}"),
    )
    .await;

    // A version naming another holder: who, and when after `edit_at`.
    let claim = |watch: &LeaseWatch, edit_at: Option<std::time::Instant>| -> Option<String> {
        let arrivals = watch.arrivals();
        let claim = arrivals
            .iter()
            .find(|a| !holder(&a.lease).is_empty() && holder(&a.lease) != LEADER)?;
        let when = edit_at.map_or(String::new(), |at| {
            format!(
                " {:.2} s after the edit",
                claim.at.saturating_duration_since(at).as_secs_f64()
            )
        });
        Some(format!(
            "{} claimed the Lease{when}: {}",
            holder(&claim.lease),
            claim.lease["spec"]
        ))
    };
    // Per edit: its commit -> the leader's restored record, and the renewal before -> its commit
    // (both as the test's watch delivered them).
    let mut latencies: Vec<f64> = Vec::new();
    let mut landed: Vec<f64> = Vec::new();
    let mut baseline = spec_str(&space.lease("job").await.unwrap(), "renewTime");
    for n in 1..=EDITS {
        // Right after a renewal, so the edit lands early in the renew interval.
        let mut renewal = None;
        wait_for(LIMIT, &format!("a renewal before edit {n}"), || {
            renewal = watch
                .arrivals()
                .into_iter()
                .find(|a| holder(&a.lease) == LEADER && spec_str(&a.lease, "renewTime") > baseline)
                .map(|a| (a.at, a.lease));
            renewal.is_some()
        })
        .await;
        let (renewed_at, renewal) = renewal.unwrap();
        // What `kubectl patch` sends: a merge patch of the one field.
        let edited = space
            .kubectl(
                &[
                    "patch",
                    "lease",
                    "job",
                    "--type",
                    "merge",
                    "-p",
                    r#"{"spec":{"leaseDurationSeconds":1}}"#,
                    "-o",
                    "json",
                ],
                None,
            )
            .await
            .json("patch lease");
        assert_eq!(edited["spec"]["leaseDurationSeconds"], 1, "{edited}");
        assert_eq!(holder(&edited), LEADER, "{edited}");
        let rv = edited["metadata"]["resourceVersion"].clone();
        // The version after the edit's, as the watch delivered both.
        let mut seen = None;
        wait_for(
            Duration::from_secs(5),
            &format!("the version after edit {n}"),
            || {
                let arrivals = watch.arrivals();
                seen = arrivals
                    .iter()
                    .position(|a| a.lease["metadata"]["resourceVersion"] == rv)
                    .and_then(|i| Some((arrivals[i].clone(), arrivals.get(i + 1)?.clone())));
                seen.is_some()
            },
        )
        .await;
        let (edit, next) = seen.unwrap();
        if holder(&next.lease) != LEADER {
            // Let the claim's consequences show: the follower's worker starting, the leader's
            // worker killed.
            let _ = holds_for(Duration::from_secs(2), || {
                if worker_death.is_finished() {
                    Err(String::new())
                } else {
                    Ok(())
                }
            })
            .await;
            let started = space
                .entries()
                .into_iter()
                .find(|e| e.what == "start" && e.identity == FOLLOWER);
            let workers = match (started, worker_death.is_finished()) {
                // The journal's start comes once the worker runs its main, after its exec.
                (Some(start), true) => match worker_death.join().unwrap() {
                    died if died > start.at_ns => format!(
                        "{FOLLOWER}'s worker ran {:.1} ms before {LEADER}'s died",
                        (died - start.at_ns) as f64 / 1e6
                    ),
                    died => format!(
                        "{LEADER}'s worker died {:.1} ms before {FOLLOWER}'s noted its start",
                        (start.at_ns - died) as f64 / 1e6
                    ),
                },
                (Some(_), false) => format!("{FOLLOWER}'s worker runs beside {LEADER}'s"),
                (None, dead) => format!(
                    "{FOLLOWER}'s worker did not start; {LEADER}'s {}",
                    if dead { "died" } else { "still runs" }
                ),
            };
            kill_workers(&space, FOLLOWER);
            panic!(
                "edit {n}: {}; {workers}; restorations before: {latencies:.1?} ms\nclient-go:\n{}\nlease-exec:\n{}",
                claim(&watch, Some(edit.at)).unwrap_or_else(|| next.lease["spec"].to_string()),
                follower.stderr(),
                leader.stderr()
            );
        }
        let latency = next.at.saturating_duration_since(edit.at).as_secs_f64() * 1000.0;
        // The leader's own record again, renewed, with its token.
        let spec = &next.lease["spec"];
        assert_eq!(spec["leaseDurationSeconds"], 6, "edit {n}: {}", next.lease);
        assert!(
            spec_str(&next.lease, "renewTime") > spec_str(&edited, "renewTime"),
            "edit {n}: not renewed: {}",
            next.lease
        );
        for field in ["acquireTime", "leaseTransitions"] {
            assert_eq!(
                spec[field], renewal["spec"][field],
                "edit {n}: {field} changed: {}",
                next.lease
            );
        }
        latencies.push(latency);
        landed.push(edit.at.saturating_duration_since(renewed_at).as_secs_f64() * 1000.0);
        baseline = spec_str(&next.lease, "renewTime");
    }
    // After the last edit: longer than the edited duration plus two of client-go's retries.
    let held = holds_for(Duration::from_secs(3), || {
        if let Some(claim) = claim(&watch, None) {
            return Err(claim);
        }
        if worker_death.is_finished() {
            return Err("the leader's worker died".into());
        }
        Ok(())
    })
    .await;
    if held.is_err() {
        kill_workers(&space, FOLLOWER);
    }
    assert!(held.is_ok(), "{held:?}\nclient-go:\n{}", follower.stderr());

    let per_edit: Vec<String> = latencies.iter().map(|l| format!("{l:.1}")).collect();
    let max = latencies.iter().cloned().fold(0.0, f64::max);
    report(&format!(
        "real tier: an operator set leaseDurationSeconds 6 -> 1 on the held Lease {EDITS} times, p50 {:.0} ms after one of its renewals (renew interval 2 s): edit -> the leader's restored record [{}] ms, p50 {:.1} ms, max {max:.1} ms; the client-go follower (retry 500 ms) never claimed",
        percentile(&mut landed, 50.0),
        per_edit.join(", "),
        percentile(&mut latencies.clone(), 50.0),
    ));
    assert!(
        max < 1000.0,
        "a restoration took {max:.1} ms, long enough for client-go to count the edited 1 s: {per_edit:?}"
    );
    let log = follower.stderr();
    assert!(
        !log.contains("started leading") && !log.contains("worker started"),
        "{log}"
    );
    assert!(
        space.entries().iter().all(|e| e.identity == LEADER),
        "{:?}",
        space.entries()
    );
    assert!(!worker_death.is_finished(), "{}", leader.stderr());
    assert!(!leader.exited(), "{}", leader.stderr());
    for running in [&mut follower, &mut leader] {
        running.signal(Signal::SIGTERM);
    }
    assert_eq!(follower.wait(LIMIT).await, 0, "{}", follower.stderr());
    assert_eq!(leader.wait(LIMIT).await, 143, "{}", leader.stderr());
    // By the kernel's stamps, not only the journal: the leader's one worker was all that ran (a
    // follower's worker killed before it journaled anything would show here).
    let runs = kernel_runs(&space).await;
    assert!(
        runs.len() == 1 && runs[0].identity.as_deref() == Some(LEADER),
        "{runs:?}"
    );
}

// ------------------------------------------------------------------------------------------------
// 11. One connection per process

/// The established TCP connections of process `pid` to `port` (any address): its socket fds
/// matched by inode against the kernel's TCP tables of its network namespace.
fn established_to(pid: i32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port) && *state == "01" && inodes.contains(*inode) {
                count += 1;
            }
        }
    }
    count
}

/// Over HTTP/2 one connection carries a process's watch, renewals, claim, events and release: a
/// follower waiting, a leader renewing, and the follower that takes over on its release hold
/// exactly one established connection to the API server each, negotiated as h2, and the follower
/// claims on the connection its watch already holds (no second connection is ever opened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_per_process_while_waiting_and_leading() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "one-connection").await;
    put_lease(&space, "job", None, LEASE_SECONDS as u32).await;
    let command = |identity: &str| {
        let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--identity".into(),
            identity.into(),
            "job".into(),
            "--".into(),
        ]);
        args.extend(space.worker_args(-1.0));
        let mut command = space.lease_exec(None, &args);
        command.env("RUST_LOG", "lease_exec=debug");
        command
    };
    let mut first = space.spawn(command("first"));
    wait_started(&space, "first", LIMIT).await;
    let mut second = space.spawn(command("second"));
    wait_log(&second, LIMIT, "the second to wait", "watch opened").await;
    // Two renewals by the first, so that its requests (renewals, the guard's watch, events) and
    // the second's (its watch) have all gone out.
    for _ in 0..2 {
        let held = space.lease("job").await.expect("the lease");
        space
            .wait_lease("job", LIMIT, "a renewal", |l| {
                holder(l) == "first" && spec_str(l, "renewTime") > spec_str(&held, "renewTime")
            })
            .await;
    }
    let counts = |running: &Running| established_to(running.pid(), cluster.port);
    let (leading, waiting) = (counts(&first), counts(&second));
    let logs = || {
        format!(
            "--- first\n{}--- second\n{}",
            first.stderr(),
            second.stderr()
        )
    };
    assert_eq!(leading, 1, "the leader's connections\n{}", logs());
    assert_eq!(waiting, 1, "the waiting follower's connections\n{}", logs());

    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait(LIMIT).await, 143, "{}", first.stderr());
    wait_started(&space, "second", LIMIT).await;
    let held = space.lease("job").await.expect("the lease");
    space
        .wait_lease("job", LIMIT, "a renewal by the new leader", |l| {
            holder(l) == "second" && spec_str(l, "renewTime") > spec_str(&held, "renewTime")
        })
        .await;
    let taken_over = counts(&second);
    second.signal(Signal::SIGTERM);
    assert_eq!(second.wait(LIMIT).await, 143, "{}", second.stderr());
    let (first_log, second_log) = (first.stderr(), second.stderr());
    report(&format!(
        "real tier: established connections to the API server: leader {leading}, waiting \
         follower {waiting}, the follower after taking over {taken_over}"
    ));
    assert_eq!(taken_over, 1, "the new leader's connections\n{second_log}");
    for (who, log) in [("first", &first_log), ("second", &second_log)] {
        let opened: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connection opened"))
            .collect();
        assert_eq!(
            opened.len(),
            1,
            "the {who} opened one connection in all:\n{log}"
        );
        assert!(
            opened[0].contains("protocol=\"h2\""),
            "the {who}'s connection is HTTP/2: {}",
            opened[0]
        );
    }
}

/// Through an HTTP `CONNECT` proxy named by the kubeconfig's `proxy-url`, to the real API server:
/// TLS end to end through the tunnel (the server's certificate verified as usual), HTTP/2 inside
/// it, one tunnel for the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_http_proxy_with_http2_inside_the_tunnel() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "proxied").await;
    put_lease(&space, "job", None, LEASE_SECONDS as u32).await;
    let proxy = proxy::Proxy::start(([127, 0, 0, 1], cluster.port).into()).await;
    let direct = std::fs::read_to_string(&space.kubeconfig).unwrap();
    let line = format!("server: {}\n", cluster.server());
    let proxied = direct.replace(
        &line,
        &format!("{line}    proxy-url: http://{}\n", proxy.addr()),
    );
    assert_ne!(proxied, direct, "the kubeconfig names {}", cluster.server());
    let kubeconfig = space.path("proxied.kubeconfig");
    std::fs::write(&kubeconfig, proxied).unwrap();
    let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
    args.extend(["--identity".into(), "me".into(), "job".into(), "--".into()]);
    args.extend(space.worker_args(1.0));
    let mut command = space.lease_exec(Some(&kubeconfig), &args);
    command.env("RUST_LOG", "lease_exec=debug");
    let out = tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("lease-exec ran too long")
        .expect("run lease-exec");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(starts(&space.entries()).len(), 1, "the worker ran\n{log}");
    let lease = space.lease("job").await.expect("the lease");
    assert_eq!(holder(&lease), "", "released: {lease}");
    let tunnels = proxy.tunnels();
    report(&format!(
        "real tier: through an HTTP CONNECT proxy: {} tunnel(s) for acquire, renewals and release",
        tunnels.len()
    ));
    assert_eq!(
        tunnels.len(),
        1,
        "one tunnel for the whole run: {tunnels:?}\n{log}"
    );
    assert_eq!(tunnels[0].target, format!("127.0.0.1:{}", cluster.port));
    let opened: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection opened"))
        .collect();
    assert_eq!(opened.len(), 1, "{log}");
    assert!(opened[0].contains("protocol=\"h2\""), "{}", opened[0]);
}
