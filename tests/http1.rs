//! The real tier over HTTP/1.1: lease-exec reaches the real API server through `kubectl proxy`,
//! which serves plain HTTP/1.1 (as TLS-terminating proxies and plain-http servers do), so every
//! request of lease-exec's holds a connection of its own, and a renewal stuck on a dead one is
//! not failed by anything but its own timeout. Between lease-exec and the proxy, a relay
//! (`tests/support/relay.rs`) acts the network's faults on lease-exec's connections alone.
//!
//! See `tests/real.rs` for the control plane (`LEASE_EXEC_TESTENV`, `LEASE_EXEC_REAL_TIER`).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/relay.rs"]
mod relay;
mod support;

use std::time::Duration;

use cluster::*;
use nix::sys::signal::Signal;
use support::{Running, alive, death_watch, mono_ns, wait_for};

const LIMIT: Duration = Duration::from_secs(30);

/// A renewal is due 2 s after the last one (the default renew interval for these: a third of the
/// lease, at most half the renew deadline); its first attempt may take the request timeout, half
/// the renew deadline (2 s: all that is left before the deadline), and is hedged after
/// (renew deadline − renew interval) / 2 = 1 s on a fresh connection.
const TIMING: [&str; 10] = [
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
const LEASE: f64 = 6.0;
const RENEW_DEADLINE: f64 = 4.0;

/// The line lease-exec logs (at debug) when a renewal has had no answer for the hedge delay.
const HEDGED: &str = "no answer to the renewal yet; trying again on a new connection";

/// `kubectl proxy` on a free port of 127.0.0.1, as the admin of `space`; its address.
async fn kubectl_proxy(space: &Space<'_>) -> (tokio::process::Child, std::net::SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(&space.kubeconfig)
        .args(["proxy", "--address=127.0.0.1", "--port=0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl proxy");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(LIMIT, lines.next_line())
        .await
        .expect("kubectl proxy says where it serves")
        .unwrap()
        .expect("a line from kubectl proxy");
    // "Starting to serve on 127.0.0.1:PORT"
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("kubectl proxy said {line:?}"));
    // Its later lines, if any, are not needed; keep the pipe drained.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// A kubeconfig for `http://ADDR` with no credentials (the proxy adds the admin's), namespace
/// `ns`.
fn plain_kubeconfig(addr: std::net::SocketAddr, ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: proxy\n  context:\n    cluster: proxy\n    namespace: {ns}\n    user: anonymous\n\
         current-context: proxy\nusers:\n- name: anonymous\n  user: {{}}\n"
    )
}

/// A Lease with no holder (so the first candidate claims it at once), `seconds` long.
async fn put_released_lease(space: &Space<'_>, name: &str, seconds: u32) {
    let manifest = format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\nspec:\n  leaseDurationSeconds: {seconds}\n"
    );
    space
        .kubectl(&["create", "-f", "-"], Some(&manifest))
        .await
        .expect("create lease");
}

/// The relay's answer-losing fault, against a server that records what it reads: what the client
/// sends still arrives, nothing comes back, a new connection works, healing resets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_loses_answers_and_passes_requests() {
    use relay::{Fault, Relay};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let relay = Relay::start(target);
    async fn echoes(stream: &mut TcpStream, what: &[u8; 4], limit: Duration) -> bool {
        let mut buf = [0; 4];
        stream.write_all(what).await.is_ok()
            && tokio::time::timeout(limit, stream.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok())
    }
    let mut old = TcpStream::connect(relay.addr()).await.unwrap();
    assert!(echoes(&mut old, b"ping", LIMIT).await);
    relay.apply(Fault::LoseAnswers);
    let mut new = TcpStream::connect(relay.addr()).await.unwrap();
    assert!(
        echoes(&mut new, b"new!", LIMIT).await,
        "a new connection works"
    );
    assert!(
        !echoes(&mut old, b"lost", Duration::from_millis(300)).await,
        "the connection open at the fault answers nothing"
    );
    wait_for(LIMIT, "the request on it to arrive", || {
        received.lock().unwrap().ends_with(b"lost")
    })
    .await;
    relay.apply(Fault::Heal);
    let mut buf = [0; 1];
    let read = tokio::time::timeout(LIMIT, old.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "healing resets the silenced connection: {read:?}"
    );
    assert!(
        echoes(&mut new, b"more", LIMIT).await,
        "the new one goes on"
    );
}

/// The leader talks HTTP/1.1 to `kubectl proxy` through a relay. Right after a renewal, the relay
/// stops passing answers back on the connections open then: the next renewal goes out on the
/// pooled connection, lands, and its answer never comes. The hedge's second attempt, on a fresh
/// connection, meets a 409, reads the Lease back, finds it still the leader's and writes again
/// against that record, inside the renew deadline. The leader keeps the Lease and its worker (its
/// exit, as the kernel stamps it, comes only after the SIGTERM that ends the test), and nothing
/// else runs; the Lease, as the test's own watch sees it, is never left unrenewed for the renew
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_renewal_answer_over_http1_keeps_the_leader() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let kernel = support::kernel();
    let space = Space::new(cluster, "http1-lost").await;
    let (_proxy, proxy_addr) = kubectl_proxy(&space).await;
    let relay = relay::Relay::start(proxy_addr);
    let kubeconfig = space.path("proxied.kubeconfig");
    std::fs::write(&kubeconfig, plain_kubeconfig(relay.addr(), &space.ns)).unwrap();

    let watch = space.watch_lease("job").await;
    put_released_lease(&space, "job", LEASE as u32).await;
    let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--identity".into(),
        "leader".into(),
        "job".into(),
        "--".into(),
    ]);
    args.extend(space.worker_args(-1.0));
    let mut command = space.lease_exec(Some(&kubeconfig), &args);
    command.env("RUST_LOG", "info,lease_exec=debug");
    let mut leader: Running = space.spawn(command);

    let mut start = None;
    wait_for(LIMIT, "the leader's worker to start", || {
        start = space.entries().into_iter().find(|e| e.what == "start");
        start.is_some()
    })
    .await;
    let start = start.unwrap();
    let death = death_watch(start.pid);
    let mut span = None;
    wait_for(LIMIT, "the kernel's stamp of the worker's exec", || {
        span = kernel.span_at(start.pid as u32, start.at_ns);
        span.is_some()
    })
    .await;
    let span = span.unwrap();
    let connections: Vec<String> = leader
        .stderr()
        .lines()
        .filter(|l| l.contains("connection opened"))
        .map(str::to_string)
        .collect();
    assert!(
        !connections.is_empty() && connections.iter().all(|l| l.contains("http/1.1")),
        "the leader speaks HTTP/1.1 to kubectl proxy: {connections:#?}\n{}",
        leader.stderr()
    );

    // Right after a renewal that came through the relay, with two seconds to the next.
    watch
        .wait(LIMIT, "the leader's claim", |_, l| holder(l) == "leader")
        .await;
    let seen = watch.events().len();
    wait_for(LIMIT, "a renewal through the relay", || {
        watch.events().len() > seen
    })
    .await;
    let accepted = relay.accepted();
    let cut = now_secs();
    relay.apply(relay::Fault::LoseAnswers);

    // Two lease durations: the worker runs, the leader holds the Lease, and the Lease, as the
    // test's own client reads it, was renewed within the renew deadline before each read began.
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(2.0 * LEASE);
    let mut reads = 0;
    while tokio::time::Instant::now() < until {
        let after = now_secs() - cut;
        assert!(
            !death.is_finished(),
            "the leader's worker died {after:.1} s after the fault\n{}",
            leader.stderr()
        );
        assert!(
            !leader.exited(),
            "the leader exited {after:.1} s after the fault\n{}",
            leader.stderr()
        );
        let asked = now_secs();
        let lease = space.lease("job").await.expect("the lease");
        assert_eq!(holder(&lease), "leader", "{lease}\n{}", leader.stderr());
        let stale = asked - micro_time_secs(&spec_str(&lease, "renewTime"));
        assert!(
            stale < RENEW_DEADLINE,
            "{:.1} s after the fault the Lease had not been renewed for {stale:.1} s: {lease}\n{}",
            asked - cut,
            leader.stderr()
        );
        reads += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held_until_ns = mono_ns();
    let log = leader.stderr();

    // The fault did what the test is about: a renewal hung on a connection open at the fault
    // (hedged), and the leader went on through a new one.
    let hedged_after_fault = log_times(&leader.log, HEDGED)
        .into_iter()
        .filter(|t| *t > cut)
        .count();
    assert!(
        hedged_after_fault > 0,
        "no renewal hung after the fault\n{log}"
    );
    let new_connections = relay.accepted() - accepted;
    assert!(
        new_connections > 0,
        "no new connection after the fault\n{log}"
    );
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
    assert!(
        during.len() > 2,
        "renewals after the fault: {during:?}\n{log}"
    );
    assert!(
        longest < RENEW_DEADLINE,
        "renewals {longest:.2} s apart: {during:?}\n{log}"
    );
    assert!(!log.contains("leadership lost"), "{log}");
    assert!(alive(start.pid), "the worker runs\n{log}");

    leader.signal(Signal::SIGTERM);
    assert_eq!(leader.wait(LIMIT).await, 143, "{}", leader.stderr());
    wait_for(LIMIT, "the worker's exit", || death.is_finished()).await;
    let died_ns = death.join().unwrap();
    let mut exit_ns = None;
    wait_for(LIMIT, "the kernel's stamp of the worker's exit", || {
        exit_ns = kernel.exit_of(start.pid as u32, span.exec_ns);
        exit_ns.is_some()
    })
    .await;
    let exit_ns = exit_ns.unwrap();
    assert!(
        exit_ns > held_until_ns && died_ns > held_until_ns,
        "the worker exited {:.1} ms before the hold ended",
        (held_until_ns as f64 - exit_ns.min(died_ns) as f64) / 1e6
    );
    let journal_arg = space.journal().display().to_string();
    let workers: Vec<_> = kernel
        .spans()
        .into_iter()
        .filter(|s| s.args.get(1) == Some(&journal_arg))
        .collect();
    assert_eq!(workers.len(), 1, "one worker exec'd: {workers:?}");
    report(&format!(
        "real tier, HTTP/1.1 through kubectl proxy: a renewal's answer lost {:.2} s after the \
         renewal before it; {} renewals in the {:.0} s after the fault, longest gap {longest:.2} s; \
         {new_connections} new connection(s) through the relay; {reads} reads by the test",
        cut - renewals[from],
        during.len() - 1,
        2.0 * LEASE,
    ));
}
