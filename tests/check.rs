//! `lease-exec --check`: the preflight against the in-memory API server. It touches nothing, says
//! what is wrong with one line per check, and exits 125 when lease-exec would not work.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const LIMIT: Duration = Duration::from_secs(30);

async fn check(world: &World, extra: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["--check", "--identity", "me"])
        .args(extra)
        .arg("job")
        .env("KUBECONFIG", &world.kubeconfig)
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .env_remove("LEASE_EXEC_NAMESPACE");
    let out = tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("--check ran too long")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line of check `name`: (verdict, detail).
fn line<'a>(out: &'a str, name: &str) -> (&'a str, &'a str) {
    out.lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            let verdict = parts.next()?;
            let rest = l.trim_start().strip_prefix(verdict)?.trim_start();
            let detail = rest.strip_prefix(name)?;
            detail
                .starts_with("  ")
                .then(|| (verdict, detail.trim_start()))
        })
        .unwrap_or_else(|| panic!("no {name:?} line in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_is_well_and_nothing_is_touched() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 15);
    let writes = world.server.writes().len();
    let (code, out, err) = check(&world, &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    for name in [
        "cluster",
        "identity",
        "namespace",
        "clock",
        "may get",
        "may create",
        "may update",
        "may watch",
        "may create events",
        "may patch events",
        "lease job",
        "watch",
        "timing",
    ] {
        assert_eq!(line(&out, name).0, "ok", "{name}:\n{out}");
    }
    assert!(
        line(&out, "cluster")
            .1
            .contains(&world.kubeconfig.display().to_string()),
        "{out}"
    );
    assert!(
        line(&out, "identity").1.starts_with("me (--identity"),
        "{out}"
    );
    assert!(
        line(&out, "namespace")
            .1
            .starts_with("default (the kubeconfig context's)"),
        "{out}"
    );
    assert!(
        line(&out, "lease job").1.contains("held by other")
            && line(&out, "lease job")
                .1
                .contains("competes for it in 15.0s"),
        "{out}"
    );
    assert!(line(&out, "watch").1.contains("came through"), "{out}");
    assert!(out.ends_with("all checks passed\n"), "{out}");
    // Read only: no write, no Event.
    assert_eq!(world.server.writes().len(), writes, "--check wrote");
    assert!(
        world.server.events().is_empty(),
        "--check recorded an Event"
    );
    for verb in ["create", "update", "patch", "delete", "create-event"] {
        assert_eq!(world.server.total(verb), 0, "--check sent {verb}");
    }

    let (code, out, _) = check(&world, &["-o", "json"]).await;
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["ok"], true);
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["verdict"] == "ok"),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_missing_verb_is_named_failing_only_when_lease_exec_needs_it() {
    let world = World::start().await;
    for (verb, line_name, needed) in [
        ("get", "may get", true),
        ("create", "may create", true),
        ("update", "may update", true),
        ("watch", "may watch", false),
        ("create-event", "may create events", false),
        ("patch-event", "may patch events", false),
    ] {
        world.server.deny(verb, 403);
        let (code, out, err) = check(&world, &[]).await;
        world.server.allow(verb);
        let (verdict, detail) = line(&out, line_name);
        assert!(detail.contains("not allowed"), "{verb}: {out}");
        assert!(detail.contains("deploy/rbac.yaml"), "{verb}: {out}");
        if needed {
            assert_eq!(verdict, "FAIL", "{verb}: {out}");
            assert_eq!(code, 125, "{verb}: {out}{err}");
            assert!(out.contains("check(s) failed"), "{verb}: {out}");
        } else {
            assert_eq!(verdict, "warn", "{verb}: {out}");
            assert_eq!(code, 0, "{verb}: {out}{err}");
        }
    }
    // Without Events they are not needed at all.
    world.server.deny("create-event", 403);
    let (code, out, _) = check(&world, &["--no-events"]).await;
    assert_eq!(code, 0);
    assert_eq!(line(&out, "may create events").0, "ok", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_holders_every_slot_name_is_asked_for() {
    let world = World::start().await;
    // A Role whose resourceNames lists the first slot only.
    world.server.deny_lease("job-1");
    let (code, out, err) = check(&world, &["--holders", "2"]).await;
    assert_eq!(code, 125, "{out}{err}");
    for verb in ["may get", "may update"] {
        let (verdict, detail) = line(&out, verb);
        assert_eq!(verdict, "FAIL", "{verb}: {out}");
        assert!(detail.contains("\"job-1\" not allowed"), "{verb}: {out}");
    }
    assert_eq!(line(&out, "may create").0, "ok", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_wait_and_a_wrong_clock_are_said() {
    let world = World::start().await;
    world.server.set_clock_skew(-40);
    let (code, out, _) = check(&world, &[]).await;
    assert_eq!(code, 0, "{out}");
    let (verdict, detail) = line(&out, "clock");
    assert_eq!(verdict, "warn", "{out}");
    assert!(detail.contains("ahead of the API server"), "{out}");
    assert!(detail.contains("NTP"), "{out}");
    // Absent: the first candidate waits, and how to avoid it is said.
    let (_, detail) = line(&out, "lease job");
    assert!(detail.starts_with("absent"), "{out}");
    assert!(detail.contains("creates it in 15.0s"), "{out}");
    assert!(detail.contains("deploy/lease.yaml"), "{out}");
    world.server.set_clock_skew(0);
    world
        .server
        .put_lease(NS, "job", json!({"spec": {"leaseDurationSeconds": 15}}));
    let (_, out, _) = check(&world, &[]).await;
    assert_eq!(line(&out, "clock").0, "ok", "{out}");
    assert!(
        line(&out, "lease job").1.contains("claims it at once"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_fails_in_one_line() {
    let world = World::start().await;
    // A kubeconfig naming a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let kubeconfig = std::fs::read_to_string(&world.kubeconfig)
        .unwrap()
        .replace(&world.server.addr().port().to_string(), &port.to_string());
    let path = world.dir.path().join("dead-kubeconfig");
    std::fs::write(&path, kubeconfig).unwrap();
    let (code, out, err) = check(&world, &["--kubeconfig", path.to_str().unwrap()]).await;
    assert_eq!(code, 125, "{out}{err}");
    let (verdict, detail) = line(&out, "api server");
    assert_eq!(verdict, "FAIL", "{out}");
    assert!(detail.contains("cannot reach"), "{out}");
    assert_eq!(line(&out, "timing").0, "ok", "{out}");
}
