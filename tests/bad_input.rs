//! Bad input: each class gets one line naming the problem and the fix, and the documented exit
//! code, before the API is touched.

mod support;

use std::time::Duration;

use lease_exec::exit;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

/// Runs lease-exec with `args`; asserts the exit code, a single line on stderr that contains
/// `needle`, and no request to the API server.
async fn rejected(world: &World, command: TestCommand, code: u8, needle: &str) {
    let since = std::time::Instant::now();
    let (got, log) = command.run(LIMIT).await;
    assert_eq!(got, i32::from(code), "{log}");
    assert_eq!(log.trim_end().lines().count(), 1, "one line: {log}");
    assert!(log.starts_with("lease-exec: "), "{log}");
    assert!(log.contains(needle), "expected {needle:?} in: {log}");
    assert_eq!(world.server.count_all(since), 0, "the API was touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_names_must_be_dns_subdomains() {
    let world = World::start().await;
    for name in ["My_Lease", ".lease", "lease-", "a..b", &"x".repeat(254)] {
        rejected(
            &world,
            world.lease_exec([name, "--", "true"]),
            exit::USAGE,
            "DNS subdomain",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_must_be_dns_labels() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["-n", "Bad.NS", "job", "--", "true"]),
        exit::USAGE,
        "DNS label",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_identity_is_rejected() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["--identity", "", "job", "--", "true"]),
        exit::USAGE,
        "--identity",
    )
    .await;
    rejected(
        &world,
        world
            .lease_exec(["job", "--", "true"])
            .env("LEASE_EXEC_IDENTITY", " "),
        exit::USAGE,
        "--identity",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_absurd_durations_are_rejected() {
    let world = World::start().await;
    let cases: &[(&[&str], &str)] = &[
        (&["--lease-duration", "0s"], "--lease-duration"),
        (&["--retry-period", "0ms"], "--retry-period"),
        (
            &["--lease-duration", "100y", "--renew-deadline", "10s"],
            "maximum",
        ),
        (&["--grace-period", "1000h"], "--grace-period"),
        (&["--wait-timeout", "0s"], "--wait-timeout"),
        (&["--retry-period=-1s"], "--retry-period"),
        (&["--lease-duration", "soon"], "--lease-duration"),
        (
            &[
                "--lease-duration",
                "1500ms",
                "--renew-deadline",
                "1s",
                "--retry-period",
                "100ms",
            ],
            "whole number of seconds",
        ),
        (
            &["--renew-deadline", "15s"],
            "retry-period < renew-deadline < lease-duration",
        ),
        (&["--renew-deadline", "14900ms"], "safety margin"),
    ];
    for (extra, needle) in cases {
        let mut args = extra.to_vec();
        args.extend(["job", "--", "true"]);
        rejected(&world, world.lease_exec(args), exit::USAGE, needle).await;
    }
    rejected(
        &world,
        world
            .lease_exec(["job", "--", "true"])
            .env("LEASE_EXEC_RETRY_PERIOD", "never"),
        exit::USAGE,
        "--retry-period",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_required_after_the_separator() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["job", "--"]),
        exit::USAGE,
        "after `--`",
    )
    .await;
    rejected(&world, world.lease_exec(["job"]), exit::USAGE, "after `--`").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_exits_127() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["job", "--", "no-such-command-anywhere"]),
        exit::NOT_FOUND,
        "command not found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_executable_command_exits_126() {
    let world = World::start().await;
    // A script without the executable bit.
    let script = world.path("not-executable");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    rejected(
        &world,
        world.lease_exec(["job", "--", script.to_str().unwrap()]),
        exit::NOT_EXECUTABLE,
        "not executable",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_are_rejected() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["--frobnicate", "job", "--", "true"]),
        exit::USAGE,
        "--frobnicate",
    )
    .await;
    rejected(
        &world,
        world.lease_exec(Vec::<&str>::new()),
        exit::USAGE,
        "LEASE",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_kubeconfig_is_reported() {
    let world = World::start().await;
    let missing = world.path("nope");
    rejected(
        &world,
        world.lease_exec([
            "--kubeconfig",
            missing.to_str().unwrap(),
            "job",
            "--",
            "true",
        ]),
        exit::FAILED,
        "does not exist",
    )
    .await;
    rejected(
        &world,
        world
            .lease_exec(["job", "--", "true"])
            .env("KUBECONFIG", &missing),
        exit::FAILED,
        "KUBECONFIG",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_kubeconfig_is_reported() {
    let world = World::start().await;
    let broken = world.path("broken");
    std::fs::write(&broken, "clusters: [this is: not yaml").unwrap();
    rejected(
        &world,
        world.lease_exec([
            "--kubeconfig",
            broken.to_str().unwrap(),
            "job",
            "--",
            "true",
        ]),
        exit::FAILED,
        "unusable",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_that_does_not_exist_is_reported() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["--context", "nowhere", "job", "--", "true"]),
        exit::FAILED,
        "nowhere",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observability_addresses_are_checked() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["--statsd-addr", "statsd", "job", "--", "true"]),
        exit::USAGE,
        "--statsd-addr",
    )
    .await;
    rejected(
        &world,
        world.lease_exec(["--metrics-addr", "9090", "job", "--", "true"]),
        exit::USAGE,
        "--metrics-addr",
    )
    .await;
    rejected(
        &world,
        world.lease_exec(["--log-format", "xml", "job", "--", "true"]),
        exit::USAGE,
        "--log-format",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_owner_needs_the_downward_api_and_the_pods_namespace() {
    let world = World::start().await;
    rejected(
        &world,
        world.lease_exec(["--owner-pod", "job", "--", "true"]),
        exit::USAGE,
        "POD_NAME and POD_UID",
    )
    .await;
    rejected(
        &world,
        world
            .lease_exec(["--owner-pod", "-n", "other", "job", "--", "true"])
            .env("POD_NAME", "pod-a")
            .env("POD_UID", "uid-a")
            .env("POD_NAMESPACE", NS),
        exit::USAGE,
        "cannot cross namespaces",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_for_another_architecture_is_refused_up_front() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::start().await;
    let mut elf = vec![0u8; 64];
    elf[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    elf[18] = if cfg!(target_arch = "x86_64") {
        0xb7
    } else {
        0x3e
    };
    let path = world.path("foreign");
    std::fs::write(&path, elf).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    rejected(
        &world,
        world.lease_exec(["job".into(), "--".into(), path.display().to_string()]),
        exit::NOT_EXECUTABLE,
        "another processor architecture",
    )
    .await;
}
