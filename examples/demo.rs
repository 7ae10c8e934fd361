//! A demo on this machine with no cluster: starts the in-memory Lease API server, three
//! `lease-exec` contenders running a shell loop, shows who leads, stops the leader a few times and
//! prints each handoff with its measured latency.
//!
//!     cargo run --example demo            # default timings, polling followers
//!     cargo run --example demo -- 5       # five handoffs

#[path = "../tests/support/apiserver.rs"]
mod apiserver;
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const NS: &str = "default";
const LEASE: &str = "demo";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let handoffs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let binary = common::lease_exec_binary();
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig(NS)).unwrap();
    println!("in-memory API server on {}", server.url());
    println!(
        "kubectl --kubeconfig {} get lease {LEASE} -w   # to watch it",
        kubeconfig.display()
    );

    let spawn = |name: &str| {
        tokio::process::Command::new(&binary)
            .args(["--identity", name, LEASE, "--", "sh", "-c"])
            .arg("while true; do echo \"    [$LEASE_EXEC_HELD_IDENTITY] working (leaseTransitions=$LEASE_EXEC_TRANSITIONS)\"; sleep 1; done")
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn lease-exec")
    };
    let names = ["alpha", "bravo", "charlie"];
    let mut contenders: Vec<(String, tokio::process::Child)> =
        names.iter().map(|n| (n.to_string(), spawn(n))).collect();
    println!("started 3 contenders: {}", names.join(", "));

    let mut latencies = Vec::new();
    for round in 0..=handoffs {
        let holder = wait_holder(&server, Duration::from_secs(60)).await;
        println!("leader: {holder}");
        if round == handoffs {
            break;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let index = contenders
            .iter()
            .position(|(n, _)| *n == holder)
            .expect("leader is a contender");
        let (name, mut child) = contenders.remove(index);
        println!("stopping the leader {name} (SIGTERM)");
        let before = server.writes().len();
        kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
        let _ = child.wait().await;
        let next = wait_next_holder(&server, before, Duration::from_secs(60)).await;
        let latency = next.1.duration_since(next.0);
        latencies.push(latency);
        println!(
            "handoff {name} -> {}: {:.1} ms from release to the new holder's claim",
            next.2,
            latency.as_secs_f64() * 1000.0
        );
        // The stopped contender comes back as a candidate, as the kubelet would restart it.
        contenders.push((name.clone(), spawn(&name)));
    }
    latencies.sort();
    if !latencies.is_empty() {
        let p50 = latencies[latencies.len() / 2];
        println!(
            "{} handoffs, median {:.1} ms, max {:.1} ms",
            latencies.len(),
            p50.as_secs_f64() * 1000.0,
            latencies.last().unwrap().as_secs_f64() * 1000.0
        );
    }
    for (_, mut child) in contenders {
        let _ = kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM);
        let _ = child.wait().await;
    }
}

async fn wait_holder(server: &ApiServer, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(holder) = server.holder(NS, LEASE) {
            return holder;
        }
        assert!(Instant::now() < deadline, "nobody acquired the lease");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// After write number `before`: the release, then the next claim. Returns (release time, claim
/// time, new holder).
async fn wait_next_holder(
    server: &ApiServer,
    before: usize,
    limit: Duration,
) -> (Instant, Instant, String) {
    let deadline = Instant::now() + limit;
    loop {
        let writes = server.writes();
        let new = &writes[before.min(writes.len())..];
        if let Some(release) = new.iter().position(|w| w.holder.is_none())
            && let Some(claim) = new[release..].iter().find(|w| w.holder.is_some())
        {
            return (new[release].at, claim.at, claim.holder.clone().unwrap());
        }
        assert!(Instant::now() < deadline, "no handoff");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
