//! The real tier: the HTTP/2 PINGs of docs/connection.md at the default timings. A follower's (or a
//! leader's) only connection goes through a relay (`tests/support/relay.rs`) that freezes it open;
//! the relay's own accounting shows when it is given up and dialed afresh: within two PING intervals
//! ((renew-deadline − renew-interval) / 2 = 2.5 s by default) of the last bytes it passed, and not
//! before one. See `tests/real.rs` for the tier itself (`LEASE_EXEC_TESTENV`,
//! `LEASE_EXEC_REAL_TIER`).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/relay.rs"]
mod relay;
mod support;

use std::time::{Duration, Instant};

use cluster::*;
use nix::sys::signal::Signal;

const LIMIT: Duration = Duration::from_secs(30);

/// The PING interval at the default timings: (renew deadline 10 s − renew interval 5 s) / 2.
const PING: Duration = Duration::from_millis(2500);

/// Scheduling slack on top of the promised bound, for a loaded machine.
const SLACK: Duration = Duration::from_millis(700);

/// A follower at the default timings waits on a Lease held by another identity (written by the
/// test with an hour's duration, so it never expires during the test), through a relay that then
/// freezes its connection half-open. Nothing but the PINGs can notice: the follower has no
/// renewal to time out. It must dial a new connection no earlier than one PING interval after the
/// last bytes the frozen connection passed (the PING is sent after that much silence) and no later
/// than two (the PING's answer is waited for that long again), plus a small slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_follower_finds_a_half_open_connection_within_two_ping_intervals() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "pings").await;
    let relay = relay::Relay::start(([127, 0, 0, 1], cluster.port).into());
    // The serving certificate is for 127.0.0.1, whatever the port: only the port changes.
    let direct = std::fs::read_to_string(&space.kubeconfig).unwrap();
    let relayed = direct.replace(&cluster.server(), &format!("https://{}", relay.addr()));
    assert_ne!(relayed, direct, "the kubeconfig names {}", cluster.server());
    let relayed_kubeconfig = space.path("relayed.kubeconfig");
    std::fs::write(&relayed_kubeconfig, relayed).unwrap();

    put_lease(&space, "job", "other", 3600).await;
    let mut args: Vec<String> = ["--identity", "follower", "job", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(space.worker_args(-1.0));
    let mut follower = space.spawn(space.lease_exec(Some(&relayed_kubeconfig), &args));
    wait_log(&follower, "held by another identity").await;
    assert_eq!(
        relay.accepted(),
        1,
        "the follower's one connection goes through the relay\n{}",
        follower.stderr()
    );
    // Let the watch settle on the connection: the freeze then comes at some point of a silence.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(relay.accepted(), 1, "{}", follower.stderr());

    let frozen = relay.accepted();
    let cut = Instant::now();
    relay.apply(relay::Fault::HalfOpen);
    // Poll for the new connection, well past the bound so a late one is measured, not missed.
    let deadline = cut + 6 * PING;
    while relay.accepted() == frozen && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let passages = relay.passages();
    let last_frame = passages[..frozen as usize]
        .iter()
        .map(|p| p.last_passed)
        .max()
        .expect("a connection before the freeze");
    let redial = passages.get(frozen as usize).map(|p| p.accepted_at);
    follower.signal(Signal::SIGTERM);
    follower.wait(LIMIT).await;
    let log = follower.stderr();
    let redial = redial.unwrap_or_else(|| {
        panic!(
            "no new connection through the relay within {:?} of the freeze ({:?} after the last \
             frame)\n{log}",
            6 * PING,
            cut - last_frame
        )
    });
    let found = redial - last_frame;
    report(&format!(
        "real tier: half-open relay under a waiting follower at the default timings: last frame \
         {:.3} s before the freeze, new connection {:.3} s after the last frame (bounds {:.1} s .. \
         {:.1} s + {:.1} s slack)",
        (cut - last_frame).as_secs_f64(),
        found.as_secs_f64(),
        PING.as_secs_f64(),
        (2 * PING).as_secs_f64(),
        SLACK.as_secs_f64(),
    ));
    assert!(
        found >= PING,
        "the follower dialed afresh {found:?} after the last frame, before a PING could be due \
         ({PING:?})\n{log}"
    );
    assert!(
        found <= 2 * PING + SLACK,
        "the follower dialed afresh {found:?} after the last frame, later than two PING \
         intervals ({:?}) + {SLACK:?}\n{log}",
        2 * PING
    );
    assert!(!log.contains(" ERROR "), "{log}");
}

/// A leader at the default timings (renew interval 5 s, renew deadline 10 s), its only connection
/// through the relay, which freezes it half-open right after a renewal. Its next renewal is due
/// about one renew interval (two PING intervals) after that renewal's frames; without the PINGs it
/// would go out on the frozen connection and only its timeout (another 2.5 s) would close it. The
/// leader must dial a new connection within two PING intervals (+ slack) of the last frame, not
/// before one, and keep the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_finds_a_half_open_connection_within_two_ping_intervals() {
    let Some(cluster) = Cluster::shared().await else {
        return;
    };
    let space = Space::new(cluster, "pings-leader").await;
    let relay = relay::Relay::start(([127, 0, 0, 1], cluster.port).into());
    let direct = std::fs::read_to_string(&space.kubeconfig).unwrap();
    let relayed = direct.replace(&cluster.server(), &format!("https://{}", relay.addr()));
    assert_ne!(relayed, direct, "the kubeconfig names {}", cluster.server());
    let relayed_kubeconfig = space.path("relayed.kubeconfig");
    std::fs::write(&relayed_kubeconfig, relayed).unwrap();

    let mut args: Vec<String> = ["--identity", "leader", "job", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(space.worker_args(-1.0));
    let mut leader = space.spawn(space.lease_exec(Some(&relayed_kubeconfig), &args));
    let held = space
        .wait_lease("job", LIMIT, "the leader to acquire", |l| {
            holder(l) == "leader"
        })
        .await;
    space
        .wait_lease("job", LIMIT, "a renewal through the relay", |l| {
            holder(l) == "leader" && spec_str(l, "renewTime") > spec_str(&held, "renewTime")
        })
        .await;
    assert_eq!(
        relay.accepted(),
        1,
        "the leader's one connection goes through the relay\n{}",
        leader.stderr()
    );

    let frozen = relay.accepted();
    let cut = Instant::now();
    relay.apply(relay::Fault::HalfOpen);
    let deadline = cut + 6 * PING;
    while relay.accepted() == frozen && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let passages = relay.passages();
    let last_frame = passages[..frozen as usize]
        .iter()
        .map(|p| p.last_passed)
        .max()
        .expect("a connection before the freeze");
    let redial = passages.get(frozen as usize).map(|p| p.accepted_at);
    // The Lease is still the leader's once it has renewed on the new connection.
    let lease = space.lease("job").await.expect("the lease");
    leader.signal(Signal::SIGTERM);
    leader.wait(LIMIT).await;
    let log = leader.stderr();
    let redial = redial.unwrap_or_else(|| {
        panic!(
            "no new connection through the relay within {:?} of the freeze ({:?} after the last \
             frame)\n{log}",
            6 * PING,
            cut - last_frame
        )
    });
    let found = redial - last_frame;
    report(&format!(
        "real tier: half-open relay under a leader at the default timings: last frame {:.3} s \
         before the freeze, new connection {:.3} s after the last frame (bounds {:.1} s .. {:.1} \
         s + {:.1} s slack)",
        (cut - last_frame).as_secs_f64(),
        found.as_secs_f64(),
        PING.as_secs_f64(),
        (2 * PING).as_secs_f64(),
        SLACK.as_secs_f64(),
    ));
    assert!(
        found >= PING,
        "the leader dialed afresh {found:?} after the last frame, before a PING could be due \
         ({PING:?})\n{log}"
    );
    assert!(
        found <= 2 * PING + SLACK,
        "the leader dialed afresh {found:?} after the last frame, later than two PING intervals \
         ({:?}) + {SLACK:?}\n{log}",
        2 * PING
    );
    assert_eq!(holder(&lease), "leader", "{lease}\n{log}");
    assert!(!log.contains("leadership lost"), "{log}");
}

/// Writes Lease `name` held by `holder` for `seconds`, renewed now.
async fn put_lease(space: &Space<'_>, name: &str, holder: &str, seconds: u32) {
    // As the API serves a MicroTime: quoted, six fractional digits.
    let now = serde_json::to_string(&k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    let manifest = format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\nspec:\n  \
         holderIdentity: {holder}\n  acquireTime: {now}\n  renewTime: {now}\n  \
         leaseDurationSeconds: {seconds}\n"
    );
    space
        .kubectl(&["create", "-f", "-"], Some(&manifest))
        .await
        .expect("create the lease");
}

/// Waits until `needle` shows in a lease-exec log.
async fn wait_log(running: &support::Running, needle: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !running.stderr().contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {needle:?} in the log:\n{}",
            running.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
