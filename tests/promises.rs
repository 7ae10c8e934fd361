//! Promises the docs make that no other test holds the binary to: the leadership-loss counter by
//! reason, the 100 ms retry after a refused connection, a renewal's 409 rewritten from the record
//! read back, the log queue's cap and its notice, `--handover -o json`, an unreadable token file,
//! and a leader whose watch is forbidden noticing an overwrite at its next renewal.
//!
//! Each runs the binary against the in-memory API server (`support::apiserver`), the faults on
//! the door of the client they are meant for. Workers' starts and exits are the kernel's stamps.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::apiserver::Fault;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

/// The value of the Prometheus sample `name` (with its labels, as printed), if present.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `lease_exec_leadership_losses_total{reason="REASON"}`.
fn losses(body: &str, reason: &str) -> Option<f64> {
    sample(
        body,
        &format!("lease_exec_leadership_losses_total{{reason=\"{reason}\"}}"),
    )
}

/// Polls `/metrics` on `port` until `check` holds; returns the body.
async fn metrics_until(port: u16, what: &str, check: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some((200, body)) = http_get(port, "/metrics").await {
            if check(&body) {
                return body;
            }
            last = body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last /metrics:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The kernel's spans of `world`'s workers so far (running ones without an exit).
fn spans(world: &World) -> Vec<kernel::Span> {
    let journal = world.journal().display().to_string();
    kernel()
        .spans()
        .into_iter()
        .filter(|s| s.args.get(1) == Some(&journal))
        .collect()
}

/// Waits for the kernel's exec of the `n`th worker (counting from 1); returns every span.
async fn wait_workers(world: &World, n: usize, what: &str) -> Vec<kernel::Span> {
    wait_for(LIMIT, what, || spans(world).len() >= n).await;
    spans(world)
}

/// docs/observability.md: `lease_exec_leadership_losses_total{reason}`; docs/handover.md: a
/// handover is counted as `reason="handover"`. Each reason a test can bring about, one after the
/// other in one `--recampaign` process: an overwrite (`taken`), renewals refused on its door
/// until the renew deadline (`renew_deadline`), a handover request (`handover`). Each loss adds
/// one to its own reason and nothing to the others. (`suspended` needs the machine suspended
/// between two renewals, and `late` a claim whose spawn misses the renew deadline: neither can be
/// brought about from here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_loss_is_counted_under_its_reason() {
    kernel();
    let world = World::start().await;
    let (door, kubeconfig) = world.door();
    let port = free_port();
    let mut options: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    options.extend(
        [
            "--recampaign",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--identity",
            "one",
            "job",
        ]
        .map(String::from),
    );
    let mut running = world
        .worker_command(&options, -1.0, 0, &[])
        .kubeconfig(&kubeconfig)
        .spawn();
    let counts = |body: &str| {
        ["taken", "renew_deadline", "handover"].map(|r| losses(body, r).unwrap_or(0.0))
    };
    let body = metrics_until(port, "the first term", |b| {
        sample(b, "lease_exec_is_leader") == Some(1.0)
    })
    .await;
    assert_eq!(counts(&body), [0.0; 3], "{body}");
    wait_workers(&world, 1, "the first worker").await;

    // An overwrite.
    world.server.steal(NS, "job", "operator", 1);
    let body = metrics_until(port, "the overwrite counted", |b| {
        losses(b, "taken").is_some()
    })
    .await;
    assert_eq!(counts(&body), [1.0, 0.0, 0.0], "{body}");

    // Back in the saddle once the operator's second is over, then refused until the deadline.
    wait_workers(&world, 2, "the second worker").await;
    metrics_until(port, "the second term", |b| {
        sample(b, "lease_exec_is_leader") == Some(1.0)
    })
    .await;
    door.set_fault(Fault::Status(503, None));
    let body = metrics_until(port, "the renew deadline counted", |b| {
        losses(b, "renew_deadline").is_some()
    })
    .await;
    assert_eq!(counts(&body), [1.0, 1.0, 0.0], "{body}");
    door.set_fault(Fault::Normal);

    // A handover to any other candidate; with nobody else, it claims again after a term.
    wait_workers(&world, 3, "the third worker").await;
    metrics_until(port, "the third term", |b| {
        sample(b, "lease_exec_is_leader") == Some(1.0)
    })
    .await;
    let mut lease = world.server.lease(NS, "job").expect("the lease");
    lease["spec"]["preferredHolder"] = json!("*");
    lease["spec"]["strategy"] = json!("lease-exec/handover");
    world.server.put_lease(NS, "job", lease);
    let body = metrics_until(port, "the handover counted", |b| {
        losses(b, "handover").is_some()
    })
    .await;
    assert_eq!(counts(&body), [1.0, 1.0, 1.0], "{body}");
    running.signal(nix::sys::signal::Signal::SIGTERM);
    running.wait(LIMIT).await;
}

/// Text log lines' timestamps (CLOCK_REALTIME, µs) of the lines containing `needle`.
fn stamps(log: &str, needle: &str) -> Vec<i64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_microsecond())
        .collect()
}

/// docs/timing.md: "After a renewal that failed, the next is tried […] after 100 ms if the
/// connection was refused, after `--retry-period` if the server answered with an error". The
/// leader's door refuses; its failed attempts (one log line each) come 100 ms apart: never
/// sooner (a refusing server is not asked in a busy loop), and not a retry period (2 s) apart.
/// Once the door listens again, the next attempt renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_renewal_is_retried_after_100_ms() {
    kernel();
    let world = World::start().await;
    let (door, kubeconfig) = world.door();
    let options = [
        "--lease-duration",
        "8s",
        "--renew-deadline",
        "6s",
        "--retry-period",
        "2s",
        "--renew-interval",
        "2s",
        "--identity",
        "one",
        "job",
    ];
    let mut running = world
        .worker_command(&options, -1.0, 0, &[])
        .kubeconfig(&kubeconfig)
        .env("RUST_LOG", "info,lease_exec::lease::renew=debug")
        .spawn();
    world.wait_leading().await;
    door.set_fault(Fault::Refuse);
    wait_for(LIMIT, "eight failed attempts", || {
        stamps(&running.stderr(), "renewal still failing").len() >= 8
    })
    .await;
    let writes = world.server.writes().len();
    door.set_fault(Fault::Normal);
    wait_for(LIMIT, "a renewal once the door listens", || {
        world.server.writes().len() > writes
    })
    .await;
    let log = running.stderr();
    assert!(log.contains("renewal succeeded again"), "{log}");
    // From the first failure (its warning) on, each further attempt's line.
    let mut at = stamps(&log, "renewal failing; leadership is lost");
    at.extend(stamps(&log, "renewal still failing"));
    at.sort();
    let mut gaps: Vec<i64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    // The lines are stamped from the wall clock after the attempt failed: 1 ms of leeway below.
    assert!(
        gaps[0] >= 99_000,
        "attempts {} µs apart (a busy loop); gaps {gaps:?}",
        gaps[0]
    );
    assert!(
        median < 400_000,
        "attempts {median} µs apart (median), not 100 ms: retried after the retry period? gaps {gaps:?}"
    );
    assert_eq!(spans(&world).len(), 1, "the term went on");
    running.signal(nix::sys::signal::Signal::SIGTERM);
    running.wait(LIMIT).await;
}

/// docs/timing.md: "if the first had landed the second gets a 409 and the renewal is written
/// again against the record read back". An operator adds a label to the held Lease while the
/// leader cannot watch it (its watch is forbidden): the next renewal meets a 409, reads the
/// Lease, and renews at once against what it read, keeping the label. Nothing is lost: the
/// worker runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_409_is_written_again_from_the_record_read_back() {
    kernel();
    let world = World::start().await;
    world.server.deny("watch", 403);
    let (door, kubeconfig) = world.door();
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(["--identity", "one", "job"]);
    let mut running = world
        .worker_command(&options, -1.0, 0, &[])
        .kubeconfig(&kubeconfig)
        .spawn();
    world.wait_leading().await;
    let mut lease = world.server.lease(NS, "job").expect("the lease");
    lease["metadata"]["labels"] = json!({"edited": "by-hand"});
    let edit = world.server.put_lease(NS, "job", lease);
    let edited_at = std::time::Instant::now();
    wait_for(LIMIT, "a renewal after the edit", || {
        world
            .server
            .writes()
            .iter()
            .any(|w| w.at > edited_at && w.holder.as_deref() == Some("one"))
    })
    .await;
    let write = world
        .server
        .writes()
        .into_iter()
        .find(|w| w.at > edited_at)
        .unwrap();
    assert_eq!(write.door, door.index());
    assert_eq!(
        write.object["metadata"]["labels"]["edited"], "by-hand",
        "the renewal was not written from the record read back: {}",
        write.object
    );
    let rv: u64 = write.object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(rv, edit + 1, "the write came right after the edit");
    // What the leader sent from the edit to that write: the renewal refused with a 409, the
    // read, the renewal again.
    let verbs: Vec<&str> = door
        .seen()
        .into_iter()
        .filter(|s| s.at > edited_at && s.at <= write.at && s.path.contains("/leases/job"))
        .map(|s| s.verb)
        .collect();
    assert_eq!(verbs, ["update", "get", "update"], "{}", running.stderr());
    assert!(spans(&world).iter().all(|s| s.exit_ns.is_none()));
    assert_eq!(spans(&world).len(), 1);
    assert!(!running.exited(), "{}", running.stderr());
    running.signal(nix::sys::signal::Signal::SIGTERM);
    running.wait(LIMIT).await;
}

/// docs/timing.md, "an overwrite", with the watch forbidden (docs/failures.md: renewals alone
/// detect takeovers then): the leader learns of an overwrite at its next renewal (a 409, then
/// the read that shows the other holder) and SIGKILLs its worker at once. By the kernel's stamps,
/// the worker dies after that renewal was sent (nothing else could have told it) and within
/// [`KILL_LATE_NS`] of the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_watch_notices_an_overwrite_at_its_next_renewal() {
    kernel();
    let world = World::start().await;
    world.server.deny("watch", 403);
    let (door, kubeconfig) = world.door();
    let mut options: Vec<&str> = FAST.to_vec();
    options.extend(["--identity", "one", "job"]);
    let mut running = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .kubeconfig(&kubeconfig)
        .spawn();
    world.wait_leading().await;
    wait_for(LIMIT, "the fallback to renewals alone", || {
        door.total("watch") > 0
    })
    .await;
    let renewed = world.server.last_write_by("one").unwrap();
    world.server.steal(NS, "job", "operator", 60);
    let stolen = std::time::Instant::now();
    assert_eq!(running.wait(LIMIT).await, 75, "{}", running.stderr());
    let log = running.stderr();
    assert!(log.contains("the lease was taken"), "{log}");
    let seen: Vec<_> = door
        .seen()
        .into_iter()
        .filter(|s| s.at > stolen && s.path.contains("/leases/job"))
        .collect();
    let verbs: Vec<&str> = seen.iter().map(|s| s.verb).take(2).collect();
    assert_eq!(verbs, ["update", "get"], "{log}");
    let (renewal_ns, read_ns) = (
        instant_ns(&renewed, seen[0].at),
        instant_ns(&renewed, seen[1].at),
    );
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let exit_ns = runs[0].exit_ns;
    assert!(
        exit_ns > renewal_ns,
        "the worker died {:.1} ms before the renewal that could tell",
        (renewal_ns - exit_ns) as f64 / 1e6
    );
    assert!(
        exit_ns <= read_ns + KILL_LATE_NS,
        "the worker died {:.1} ms after the read that showed the overwrite",
        (exit_ns - read_ns) as f64 / 1e6
    );
    // Its next renewal: one renew interval (a third of 2 s) after the last.
    assert!(
        seen[0].at <= renewed.at + Duration::from_millis(667 + 300),
        "the next renewal came {:?} after the last",
        seen[0].at - renewed.at
    );
}

/// docs/observability.md: "up to 256 KiB of lines wait for it, later ones are dropped, and once
/// stderr drains a line says how many (`N log lines dropped: nobody read stderr for a while`)".
/// A leader logging every request (`RUST_LOG=trace`, a renewal every 100 ms) on a stderr pipe
/// nobody reads: once the pipe drains, the notice comes with N > 0, after at least 256 KiB of
/// lines (the queue was allowed to fill) and at most what the pipe, one batch in the writer's
/// hands and a full queue hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stderr_drops_lines_past_256_kib_and_says_how_many() {
    const QUEUE: usize = 256 * 1024;
    kernel();
    let world = World::start().await;
    let options = [
        "--lease-duration",
        "2s",
        "--renew-deadline",
        "1s",
        "--retry-period",
        "100ms",
        "--renew-interval",
        "100ms",
        "--identity",
        "one",
        "job",
    ];
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let running = world
        .worker_command(&options, -1.0, 0, &[])
        .env("RUST_LOG", "trace")
        .spawn_with_stderr_held(async move {
            let _ = release_rx.await;
        });
    wait_workers(&world, 1, "the worker").await;
    // Renewals go on whatever stderr does; at several KiB of trace lines each, 300 of them log
    // far more than the pipe and the queue hold.
    wait_for(Duration::from_secs(60), "300 renewals", || {
        world.server.total("update") >= 300
    })
    .await;
    release_tx.send(()).unwrap();
    let mut log = String::new();
    wait_for(LIMIT, "the notice of dropped lines", || {
        log = running.stderr();
        log.contains("log lines dropped: nobody read stderr for a while")
    })
    .await;
    let at = log.find("log lines dropped").unwrap();
    let line_start = log[..at].rfind('\n').map_or(0, |i| i + 1);
    let notice = &log[line_start..];
    let dropped: u64 = notice
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", notice.lines().next()));
    assert!(dropped > 0, "{:?}", notice.lines().next());
    let before = line_start;
    let longest = log[..line_start]
        .lines()
        .map(|l| l.len() + 1)
        .max()
        .unwrap_or(0);
    let pipe = 64 * 1024;
    assert!(
        before + longest >= QUEUE,
        "only {before} bytes of lines before the notice: the queue holds 256 KiB"
    );
    assert!(
        before <= pipe + 2 * QUEUE + longest,
        "{before} bytes of lines before the notice: more than the pipe, one batch and the queue"
    );
    assert_eq!(spans(&world).len(), 1, "the term went on");
    running.signal(nix::sys::signal::Signal::SIGTERM);
}

/// docs/handover.md: "With `--output json` it prints one object (`from`, `to`, `requested`,
/// `leaseTransitions`, `freeMilliseconds`, `afterRequestMilliseconds`)", and nothing else on
/// stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_output_json_is_one_object_with_the_documented_fields() {
    kernel();
    let world = World::start().await;
    let with = |identity: &str| {
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(["--identity", identity, "job"]);
        world.worker_command(&options, -1.0, 0, &[]).spawn()
    };
    let mut a = with("a");
    world.wait_leading().await;
    let mut b = with("b");
    wait_for(LIMIT, "b to wait", || {
        b.stderr().contains("held by another identity")
    })
    .await;
    let mut command = world
        .lease_exec(["--handover", "--to", "b", "-o", "json", "job"])
        .command;
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("--handover ran too long")
        .expect("run --handover");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
    let done: Value = serde_json::from_str(&stdout).expect("a JSON object");
    let transitions = world.server.lease(NS, "job").unwrap()["spec"]["leaseTransitions"].clone();
    assert_eq!(done["from"], "a", "{done}");
    assert_eq!(done["to"], "b", "{done}");
    assert_eq!(done["requested"], "b", "{done}");
    assert_eq!(done["leaseTransitions"], transitions, "{done}");
    for field in ["freeMilliseconds", "afterRequestMilliseconds"] {
        let ms = done[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field}: {done}"));
        assert!((0.0..20_000.0).contains(&ms), "{field}: {done}");
    }
    assert!(
        done["freeMilliseconds"].as_f64() <= done["afterRequestMilliseconds"].as_f64(),
        "{done}"
    );
    assert_eq!(a.wait(LIMIT).await, 75, "{}", a.stderr());
    b.signal(nix::sys::signal::Signal::SIGTERM);
    b.wait(LIMIT).await;
}

/// A kubeconfig for `server` whose user has `tokenFile: PATH`.
fn token_file_kubeconfig(url: &str, path: &std::path::Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: {NS}\n\
         current-context: c\nusers:\n- name: u\n  user:\n    tokenFile: {}\n",
        path.display()
    )
}

/// README, exit codes: 125 "lease-exec failed before starting the command (… unusable
/// kubeconfig …)"; docs/failures.md: the token file is read at every request, so one that
/// cannot be read at start is a kubeconfig that cannot be used. Missing, or a directory: exit
/// 125 with one line naming the file, no request sent, the command never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_token_file_fails_at_once_naming_it() {
    kernel();
    let world = World::start().await;
    let missing = world.path("no-such-token");
    let directory = world.path("token-dir");
    std::fs::create_dir(&directory).unwrap();
    for path in [missing, directory] {
        let kubeconfig = world.path("kubeconfig-token-file");
        std::fs::write(
            &kubeconfig,
            token_file_kubeconfig(&world.server.url(), &path),
        )
        .unwrap();
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(["--identity", "one", "job"]);
        let (code, log) = world
            .worker_command(&options, -1.0, 0, &[])
            .kubeconfig(&kubeconfig)
            .run(LIMIT)
            .await;
        assert_eq!(code, 125, "{}: {log}", path.display());
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {log}");
        assert!(
            lines[0].contains(&path.display().to_string()),
            "the line names the file: {log}"
        );
    }
    assert!(world.server.seen().is_empty(), "{:?}", world.server.seen());
    assert!(spans(&world).is_empty(), "the command never ran");
}
