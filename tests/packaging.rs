//! Generated artefacts stay fresh, and the manifests in deploy/ match what the code does.
//!
//! Regenerate the man page and completions with:
//!
//!     for w in man bash zsh fish; do ...; done   (see README: "Man page and completions")

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
        "Examples:",
        "Exit codes:",
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

/// Words only: no backticks, no case, one space between words.
fn words(text: &str) -> String {
    text.replace('`', "")
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_readme_exit_code_table_is_the_codes_table() {
    // exit::TABLE: "  CODE  meaning", continuation lines indented further.
    let mut from_code: Vec<(String, String)> = Vec::new();
    for line in lease_exec::exit::TABLE.lines().skip(1) {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() > 2 {
            from_code
                .last_mut()
                .unwrap()
                .1
                .push_str(&format!(" {trimmed}"));
        } else {
            let (code, meaning) = trimmed.split_once(' ').unwrap();
            from_code.push((code.to_string(), meaning.to_string()));
        }
    }
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme
        .split("\n## Exit codes\n")
        .nth(1)
        .expect("a section ## Exit codes")
        .split("\n## ")
        .next()
        .unwrap();
    let from_readme: Vec<(String, String)> = section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| code") && !l.starts_with("|---"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            (cells[0].trim().to_string(), cells[1].trim().to_string())
        })
        .collect();
    assert_eq!(from_readme.len(), from_code.len(), "{from_readme:?}");
    for ((code, meaning), (readme_code, readme_meaning)) in from_code.iter().zip(&from_readme) {
        let code = if code == "<child's>" {
            "the command's"
        } else {
            code
        };
        assert_eq!(readme_code, code);
        assert_eq!(words(readme_meaning), words(meaning), "exit code {code}");
    }
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut pages = vec![Path::new(ROOT).join("README.md")];
    for dir in ["docs", "testenv"] {
        if let Ok(entries) = std::fs::read_dir(Path::new(ROOT).join(dir)) {
            pages.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "md")),
            );
        }
    }
    let mut checked = 0;
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        let anchors: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .map(|l| anchor(l.trim_start_matches('#')))
            .collect();
        for (i, _) in text.match_indices("](") {
            let target = &text[i + 2..];
            let target = &target[..target.find(')').unwrap()];
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            checked += 1;
            let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
            if path.is_empty() {
                assert!(
                    anchors.contains(fragment),
                    "{}: no heading for #{fragment}",
                    page.display()
                );
            } else {
                let file = page.parent().unwrap().join(path);
                assert!(file.exists(), "{}: {path} does not exist", page.display());
            }
        }
    }
    assert!(
        checked > 0,
        "no relative link found: the test reads nothing"
    );
}
