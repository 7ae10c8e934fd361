//! Generated artefacts stay fresh, and the manifests in deploy/ match what the code does.
//!
//! Regenerate the man page and completions with:
//!
//!     for w in man bash zsh fish; do ...; done   (see docs/CONTRIBUTING.md, "Generated files")

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn generated(what: &str) -> String {
    let out = std::process::Command::new(BIN)
        .args(["--generate", what])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn man_page_and_completions_are_fresh() {
    for (what, file) in [
        ("man", "man/lease-exec.1"),
        ("bash", "man/completions/lease-exec.bash"),
        ("zsh", "man/completions/_lease-exec"),
        ("fish", "man/completions/lease-exec.fish"),
    ] {
        let committed = std::fs::read_to_string(Path::new(ROOT).join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            committed == generated(what),
            "{file} is stale: run `cargo run -- --generate {what} > {file}`"
        );
    }
    let man = generated("man");
    for needle in [
        ".SH EXAMPLES",
        ".SH \"EXIT STATUS\"",
        ".SH SIGNALS",
        ".SH ENVIRONMENT",
        "\\-\\-renew\\-deadline",
        "LEASE_EXEC_LEASE_DURATION",
    ] {
        assert!(man.contains(needle), "man page lacks {needle}");
    }
}

/// `verbs: [...]` of the Role rule whose resources are `resource`.
fn role_verbs(rbac: &str, resource: &str) -> BTreeSet<String> {
    let mut lines = rbac
        .lines()
        .skip_while(|l| !l.contains(&format!("resources: [\"{resource}\"]")));
    lines
        .next()
        .unwrap_or_else(|| panic!("no rule for {resource}"));
    let verbs = lines.next().unwrap();
    let list = verbs.split_once('[').unwrap().1.trim_end_matches(']');
    list.split(',')
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect()
}

#[test]
fn the_role_grants_exactly_the_verbs_the_code_declares() {
    let rbac = std::fs::read_to_string(Path::new(ROOT).join("deploy/rbac.yaml")).unwrap();
    let declared: BTreeSet<String> = lease_exec::lease::api::LEASE_VERBS
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(role_verbs(&rbac, "leases"), declared);
    let declared: BTreeSet<String> = lease_exec::lease::api::EVENT_VERBS
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(role_verbs(&rbac, "events"), declared);
}

/// The verbs declared are the verbs used: run a leader and a follower through acquire, renew,
/// watch, release and events against the server, and compare what it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_uses_only_the_declared_verbs() {
    let world = World::start().await;
    let mut leader = world.contender("job", "one", 1.0, 0).spawn();
    wait_for(Duration::from_secs(20), "a leader", || {
        world.server.holder(NS, "job").is_some()
    })
    .await;
    let mut follower = world.contender("job", "two", 0.2, 0).spawn();
    assert_eq!(leader.wait(Duration::from_secs(20)).await, 0);
    assert_eq!(follower.wait(Duration::from_secs(20)).await, 0);
    let seen: BTreeSet<String> = world
        .server
        .seen()
        .iter()
        .map(|s| s.verb.to_string())
        .collect();
    for verb in &seen {
        let allowed = match verb.strip_suffix("-event") {
            Some(event_verb) => lease_exec::lease::api::EVENT_VERBS.contains(&event_verb),
            None => {
                lease_exec::lease::api::LEASE_VERBS.contains(&verb.as_str()) || verb == "discovery"
            }
        };
        assert!(
            allowed,
            "the code used {verb}, which the Role does not grant"
        );
    }
    for verb in ["get", "create", "update", "watch", "create-event"] {
        assert!(seen.contains(verb), "{verb} not exercised: {seen:?}");
    }
}

#[test]
fn the_example_lease_is_released_and_named_as_the_deployment_names_it() {
    let read = |f: &str| std::fs::read_to_string(Path::new(ROOT).join(f)).unwrap();
    let (lease, deployment) = (read("deploy/lease.yaml"), read("deploy/deployment.yaml"));
    assert!(lease.contains("kind: Lease\n"), "{lease}");
    assert!(!lease.contains("holderIdentity"), "released: {lease}");
    let name = lease
        .lines()
        .find_map(|l| l.strip_prefix("  name: "))
        .expect("metadata.name");
    assert!(
        deployment.contains(&format!("[\"/lease-exec\", \"{name}\", \"--\"")),
        "the Deployment's LEASE is not {name}"
    );
    assert!(deployment.contains("kubectl apply -f deploy/lease.yaml"));
}

#[test]
fn the_example_deployment_passes_the_env_the_code_reads() {
    let deployment =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/deployment.yaml")).unwrap();
    let passed: BTreeSet<&str> = deployment
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|n| n.starts_with("POD_"))
        .collect();
    let read: BTreeSet<&str> = lease_exec::config::POD_ENV.into_iter().collect();
    assert_eq!(passed, read);
    for field in ["metadata.name", "metadata.namespace", "metadata.uid"] {
        assert!(
            deployment.contains(&format!("fieldPath: {field}")),
            "{field}"
        );
    }
    // Every LEASE_EXEC_ variable in the example is a real option.
    let help = String::from_utf8(
        std::process::Command::new(BIN)
            .arg("--help")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for name in deployment
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|n| n.starts_with("LEASE_EXEC_"))
    {
        assert!(
            help.contains(&format!("[env: {name}=")),
            "{name} is not an option"
        );
    }
    // The pod's grace period covers lease-exec's, with time to release.
    let grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .unwrap()
        .parse()
        .unwrap();
    let ours = deployment
        .lines()
        .skip_while(|l| !l.contains("LEASE_EXEC_GRACE_PERIOD"))
        .nth(1)
        .and_then(|l| l.split('"').nth(1))
        .map(|v| humantime::parse_duration(v).unwrap())
        .unwrap();
    assert!(
        Duration::from_secs(grace) >= ours + Duration::from_secs(2),
        "{grace}s vs {ours:?}"
    );
    for probe in ["path: /healthz", "path: /leader", "replicas: 3"] {
        assert!(deployment.contains(probe), "{probe}");
    }
}

/// `major.minor[.patch]` as a comparable tuple.
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[test]
fn the_declared_rust_version_is_not_below_any_dependencys() {
    // The packages built here (platform-specific ones for other systems are never downloaded).
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("host triple");
    let output = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages = metadata["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "lease-exec")
        .and_then(|p| p["rust_version"].as_str())
        .expect("lease-exec declares rust-version");
    let above: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            (version(needs) > version(ours))
                .then(|| format!("{} {} needs {needs}", p["name"], p["version"]))
        })
        .collect();
    assert!(above.is_empty(), "rust-version = {ours}, but: {above:?}");
}
