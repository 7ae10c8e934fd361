//! Metrics and probes over real HTTP, statsd packets, Kubernetes Events, JSON logs, `--status`.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

/// Polls `path` until `check` holds for (status, body).
async fn until(port: u16, path: &str, what: &str, check: impl Fn(u16, &str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some((status, body)) = http_get(port, path).await
            && check(status, &body)
        {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} on {path}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A contender for `job` with `extra` options, running its worker forever.
fn with(world: &World, identity: &str, extra: &[String]) -> Running {
    let mut options: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    options.extend(extra.iter().cloned());
    options.extend(["--identity", identity, "job"].map(String::from));
    world.worker_command(&options, -1.0, 0, &[]).spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_follow_leadership() {
    let world = World::start().await;
    let (p1, p2) = (free_port(), free_port());
    let mut leader = with(
        &world,
        "one",
        &["--metrics-addr".into(), format!("127.0.0.1:{p1}")],
    );
    // Leadership comes first, then the command starts.
    let body = until(
        p1,
        "/metrics",
        "leadership and a running command",
        |s, b| {
            s == 200
                && metric(b, "lease_exec_is_leader") == Some(1.0)
                && metric(b, "lease_exec_child_running") == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        metric(&body, "lease_exec_leader_transitions_total"),
        Some(1.0),
        "{body}"
    );
    assert!(
        body.contains(r#"lease_exec_lease_info{lease="job",namespace="default",identity="one"} 1"#),
        "{body}"
    );
    let body = until(p1, "/metrics", "renewals", |_, b| {
        metric(b, "lease_exec_renewals_total").unwrap_or(0.0) >= 2.0
    })
    .await;
    assert!(
        body.contains("lease_exec_renewal_duration_seconds_bucket"),
        "{body}"
    );
    until(p1, "/leader", "the leader probe", |s, _| s == 200).await;
    until(p1, "/healthz", "the liveness probe", |s, _| s == 200).await;

    let follower = with(
        &world,
        "two",
        &["--metrics-addr".into(), format!("127.0.0.1:{p2}")],
    );
    until(p2, "/leader", "the follower not leading", |s, _| s == 503).await;
    assert_eq!(
        http_get(p2, "/healthz").await.unwrap().0,
        200,
        "waiting is healthy"
    );
    let body = http_get(p2, "/metrics").await.unwrap().1;
    assert_eq!(metric(&body, "lease_exec_is_leader"), Some(0.0), "{body}");

    // Renewals failing: the leader's liveness probe says so, then recovers.
    world.server.deny("update", 503);
    until(p1, "/healthz", "unhealthy while renewals fail", |s, _| {
        s == 503
    })
    .await;
    world.server.allow("update");
    until(p1, "/healthz", "healthy again", |s, _| s == 200).await;
    let body = http_get(p1, "/metrics").await.unwrap().1;
    assert!(
        metric(&body, "lease_exec_renewal_failures_total").unwrap() >= 1.0,
        "{body}"
    );

    // Handoff: the follower's probes flip.
    leader.signal(Signal::SIGTERM);
    leader.wait(LIMIT).await;
    until(p2, "/leader", "the follower leading", |s, _| s == 200).await;
    let body = http_get(p2, "/metrics").await.unwrap().1;
    assert_eq!(metric(&body, "lease_exec_is_leader"), Some(1.0));
    follower.signal(Signal::SIGTERM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_heartbeat_while_leading() {
    let world = World::start().await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut running = with(
        &world,
        "one",
        &[
            "--statsd-addr".into(),
            addr.to_string(),
            "--statsd-prefix".into(),
            "test".into(),
        ],
    );
    let mut buf = [0u8; 512];
    let mut arrivals = Vec::new();
    for _ in 0..5 {
        let (n, _) = tokio::time::timeout(LIMIT, socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        arrivals.push(std::time::Instant::now());
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "test.leader_running:1|c"
        );
    }
    // Every retry period (250 ms in FAST): four gaps of about 1 s in all, not a burst.
    let span = arrivals[4] - arrivals[0];
    assert!(
        span >= Duration::from_millis(700) && span < Duration::from_millis(2500),
        "4 heartbeats took {span:?}"
    );
    // Taken by another holder: the heartbeat stops at once.
    world.server.steal(NS, "job", "other", 30);
    assert_eq!(running.wait(LIMIT).await, i32::from(lease_exec::exit::LOST));
    let mut late = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(600), socket.recv_from(&mut buf)).await
    {
        late += 1;
    }
    assert!(late <= 1, "{late} heartbeats after the loss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_statsd_changes_nothing() {
    let world = World::start().await;
    // Nobody listens on this port.
    let port = free_port();
    let (code, log) = world
        .contender("job", "one", 0.6, 0)
        .env("LEASE_EXEC_STATSD_ADDR", format!("127.0.0.1:{port}"))
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_record_acquire_release_and_loss() {
    let world = World::start().await;
    let (code, log) = world.contender("job", "one", 0.2, 0).run(LIMIT).await;
    assert_eq!(code, 0, "{log}");
    let events = world.server.events();
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(reasons, ["LeaderElection", "LeaseReleased"], "{events:#?}");
    assert_eq!(events[0]["note"], "one became leader");
    assert_eq!(events[0]["regarding"]["kind"], "Lease");
    assert_eq!(events[0]["regarding"]["name"], "job");

    let mut running = with(&world, "two", &[]);
    wait_for(LIMIT, "leadership", || {
        world.server.holder(NS, "job").as_deref() == Some("two")
    })
    .await;
    world.server.steal(NS, "job", "thief", 30);
    running.wait(LIMIT).await;
    let events = world.server.events();
    let lost = events
        .iter()
        .find(|e| e["reason"] == "LeadershipLost")
        .expect("a loss event");
    assert_eq!(lost["type"], "Warning");
    assert!(lost["note"].as_str().unwrap().contains("thief"), "{lost}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_event_becomes_a_series_on_one_event_object() {
    let world = World::start().await;
    let mut running = with(&world, "me", &["--recampaign".into()]);
    // Three terms, the first two ended by an operator taking the Lease for 1 s.
    for term in 1..=2 {
        wait_for(LIMIT, "the term's command", || world.starts().len() == term).await;
        world.wait_leading().await;
        world.server.steal(NS, "job", "operator", 1);
    }
    wait_for(LIMIT, "the third term", || world.starts().len() == 3).await;
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
    let log = running.stderr();
    let by_reason = |reason: &str| -> Vec<Value> {
        world
            .server
            .events()
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    };
    // kube's Recorder creates an event the first time and patches a series into it when the same
    // event (same reason, action, type, reporter and Lease) happens again.
    wait_for(LIMIT, "every event to be recorded", || {
        by_reason("LeaseReleased").len() == 1
            && by_reason("LeaderElection")
                .first()
                .is_some_and(|e| e["series"]["count"] == 3)
            && by_reason("LeadershipLost")
                .first()
                .is_some_and(|e| e["series"]["count"] == 2)
    })
    .await;
    let elected = by_reason("LeaderElection");
    assert_eq!(
        elected.len(),
        1,
        "one object for three elections: {elected:#?}"
    );
    assert_eq!(elected[0]["note"], "me became leader");
    assert!(
        elected[0]["series"]["lastObservedTime"].is_string(),
        "{elected:#?}"
    );
    assert_eq!(by_reason("LeadershipLost").len(), 1, "{log}");
    assert!(by_reason("LeaseReleased")[0]["series"].is_null());
    // Three creates and three patches (two re-elections, one repeated loss), each accepted by the
    // server's events.k8s.io update validation.
    assert_eq!(world.server.total("create-event"), 3, "{log}");
    assert_eq!(world.server.total("patch-event"), 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_events_are_logged_once_and_ignored() {
    let world = World::start().await;
    world.server.deny("create-event", 403);
    let (code, log) = world.contender("job", "one", 0.2, 0).run(LIMIT).await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        log.matches("cannot record Events (403)").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_events_records_none() {
    let world = World::start().await;
    let (code, log) = world
        .contender("job", "one", 0.1, 0)
        .env("LEASE_EXEC_NO_EVENTS", "true")
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
    assert!(world.server.events().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_final_error_too() {
    let world = World::start().await;
    world.server.deny("get", 403);
    let (code, log) = world
        .contender("job", "one", 0.1, 0)
        .env("LEASE_EXEC_LOG_FORMAT", "json")
        .run(LIMIT)
        .await;
    assert_eq!(code, 125, "{log}");
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).expect("JSON");
    assert_eq!(last["level"], "error");
    assert_eq!(last["exit_code"], 125);
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("was refused (403)"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 1);
    let (code, log) = world
        .contender("job", "one", 0.1, 0)
        .env("LEASE_EXEC_LOG_FORMAT", "json")
        .run(LIMIT)
        .await;
    assert_eq!(code, 0, "{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 4, "{log}");
    for line in &lines {
        for key in [
            "timestamp",
            "level",
            "message",
            "lease",
            "namespace",
            "identity",
            "holder",
        ] {
            assert!(line.get(key).is_some(), "{key} missing: {line}");
        }
        assert_eq!(line["lease"], "job");
        assert_eq!(line["identity"], "one");
    }
    let waiting = lines
        .iter()
        .find(|l| l["message"] == "waiting: the lease is held by another identity")
        .unwrap();
    assert_eq!(waiting["holder"], "other");
    let started = lines
        .iter()
        .find(|l| l["message"] == "acquired the lease; command started")
        .unwrap();
    assert_eq!(started["holder"], "one");
    assert!(
        started["pid"].as_i64().is_some(),
        "event fields are kept: {started}"
    );
}

async fn status(world: &World, extra: &[&str]) -> (i32, String) {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(extra)
        .args(["--status", "--identity", "me", "job"])
        .env("KUBECONFIG", &world.kubeconfig)
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE");
    let out = tokio::time::timeout(LIMIT, command.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A MicroTime `seconds` in the past.
fn ago(seconds: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    apiserver::format_time(now.as_secs() - seconds, Some(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_held_expired_released_and_absent_leases() {
    let world = World::start().await;
    let (code, out) = status(&world, &[]).await;
    assert_eq!(code, 0);
    assert!(out.contains("absent"), "{out}");
    // A first run on a new name waits: said, with when and how to avoid it.
    assert!(
        out.contains("a new candidate (me) creates it in 15.0s"),
        "{out}"
    );
    assert!(out.contains("deploy/lease.yaml"), "{out}");
    let (_, out) = status(
        &world,
        &[
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "1s",
        ],
    )
    .await;
    assert!(out.contains("creates it in 3.0s"), "{out}");

    world.server.put_lease(
        NS,
        "job",
        json!({
            "metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "pod-a", "uid": "u"}]},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "leaseTransitions": 4,
                     "acquireTime": ago(60), "renewTime": ago(3)}
        }),
    );
    let (code, out) = status(&world, &[]).await;
    assert_eq!(code, 0);
    assert!(out.contains("Lease default/job: held"), "{out}");
    assert!(out.contains("holder:       other\n"), "{out}");
    assert!(out.contains("owner Pod:    pod-a"), "{out}");
    assert!(out.contains("transitions:  4"), "{out}");
    assert!(out.contains("expires:      in 1"), "{out}");
    let (_, out) = status(&world, &["--output", "json"]).await;
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["state"], "held");
    assert_eq!(json["holder"], "other");
    assert_eq!(json["isThisIdentity"], false);
    assert_eq!(json["ownerPod"], "pod-a");
    let left = json["expiresInSeconds"].as_f64().unwrap();
    assert!((10.0..=12.5).contains(&left), "{json}");

    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": ago(100)}}),
    );
    let (_, out) = status(&world, &[]).await;
    assert!(out.contains(": expired"), "{out}");
    assert!(out.contains("me (this identity)"), "{out}");
    assert!(out.contains("expired 8"), "{out}");

    world.server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 1, "renewTime": ago(1)}}),
    );
    let (_, out) = status(&world, &["-o", "json"]).await;
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["state"], "released");
    assert_eq!(json["holder"], Value::Null);
}
