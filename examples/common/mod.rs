//! Helpers shared by the examples.

use std::path::PathBuf;

/// The lease-exec binary next to this example, built with the same profile.
pub fn lease_exec_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>");
    let binary = profile_dir.join("lease-exec");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = profile_dir.ends_with("release");
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "--bin", "lease-exec"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build --bin lease-exec failed");
    binary
}
