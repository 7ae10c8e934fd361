//! Helpers shared by the examples.

use std::path::PathBuf;

/// target/<profile> of the running example.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>")
        .to_owned()
}

/// `cargo build` with the running example's profile and `what` (`--bin x`, `--example y`).
fn cargo_build(what: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet"]).args(what);
    if profile_dir().ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build {} failed", what.join(" "));
}

/// The lease-exec binary next to this example, built with the same profile; or the one
/// `LEASE_EXEC_BENCH_BINARY` names, to measure another build (an older commit) on the same bench.
pub fn lease_exec_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LEASE_EXEC_BENCH_BINARY") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "LEASE_EXEC_BENCH_BINARY={} is not a file",
            path.display()
        );
        return path;
    }
    cargo_build(&["--bin", "lease-exec"]);
    profile_dir().join("lease-exec")
}

/// Another example's binary, built with the same profile.
#[allow(dead_code)] // not every example uses it
pub fn example_binary(name: &str) -> PathBuf {
    cargo_build(&["--example", name]);
    profile_dir().join("examples").join(name)
}
