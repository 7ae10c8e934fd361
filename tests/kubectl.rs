//! Keeps the in-memory API server faithful: `kubectl` pointed at it through the generated
//! kubeconfig can create, get and patch a Lease, and sees what lease-exec writes.

mod support;

use std::time::Duration;

use support::*;

async fn kubectl(world: &World, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new("kubectl");
    command
        .arg("--kubeconfig")
        .arg(&world.kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command
        .spawn()
        .expect("kubectl is installed (.ci/run installs it)");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("kubectl answered")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_can_create_get_and_patch_a_lease() {
    let world = World::start().await;
    let manifest = r#"
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: by-kubectl
spec:
  holderIdentity: someone
  leaseDurationSeconds: 15
"#;
    let (ok, out, err) = kubectl(
        &world,
        &["create", "--validate=false", "-f", "-"],
        Some(manifest),
    )
    .await;
    assert!(ok, "create: {out}{err}");
    assert_eq!(
        world.server.holder(NS, "by-kubectl").as_deref(),
        Some("someone")
    );

    let (ok, out, err) = kubectl(
        &world,
        &["create", "--validate=false", "-f", "-"],
        Some(manifest),
    )
    .await;
    assert!(!ok, "second create must fail");
    assert!(
        err.contains("AlreadyExists") || err.contains("already exists"),
        "{out}{err}"
    );

    let (ok, out, err) = kubectl(&world, &["get", "lease", "by-kubectl", "-o", "json"], None).await;
    assert!(ok, "get: {err}");
    let lease: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(lease["kind"], "Lease");

    let (ok, out, err) = kubectl(
        &world,
        &[
            "patch",
            "lease",
            "by-kubectl",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"holderIdentity":"patched"}}"#,
        ],
        None,
    )
    .await;
    assert!(ok, "merge patch: {out}{err}");
    assert_eq!(
        world.server.holder(NS, "by-kubectl").as_deref(),
        Some("patched")
    );

    let (ok, out, err) = kubectl(
        &world,
        &[
            "patch",
            "lease",
            "by-kubectl",
            "-p",
            r#"{"spec":{"leaseTransitions":3}}"#,
        ],
        None,
    )
    .await;
    assert!(ok, "strategic merge patch: {out}{err}");
    assert_eq!(
        world.server.lease(NS, "by-kubectl").unwrap()["spec"]["leaseTransitions"],
        3
    );

    let (ok, _, err) = kubectl(&world, &["get", "lease", "absent"], None).await;
    assert!(!ok);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_the_holder_lease_exec_writes() {
    let world = World::start().await;
    let mut running = world.contender("job", "me", -1.0, 0).spawn();
    wait_for(Duration::from_secs(20), "the lease to be held", || {
        world.server.holder(NS, "job").is_some()
    })
    .await;
    let (ok, out, err) = kubectl(
        &world,
        &[
            "get",
            "lease",
            "job",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "me");
    running.signal(nix::sys::signal::Signal::SIGTERM);
    running.wait(Duration::from_secs(20)).await;
}
