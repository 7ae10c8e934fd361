//! Every exit is bounded when stderr is a pipe that is full and that nobody reads (a stuck log
//! driver, `lease-exec ... 2>&1 | less` left in the background): lease-exec's last words and the
//! log lines before them wait for stderr [`FLUSH_TIMEOUT`] at most, then lease-exec exits with
//! its code all the same.

mod support;

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lease_exec::logging::FLUSH_TIMEOUT;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use support::*;

/// What the exit may take beyond the flush: starting the process, connecting, tearing down, on a
/// loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A pipe that is full: a write to `write` blocks until someone reads `read`, which nobody does.
fn full_pipe() -> (OwnedFd, OwnedFd) {
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
    let chunk = [b'x'; 4096];
    loop {
        match nix::unistd::write(&write, &chunk) {
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    // Whatever room a partial page left: one byte at a time.
    while nix::unistd::write(&write, b"x").is_ok() {}
    // lease-exec gets a blocking pipe, as a shell would give it.
    fcntl(&write, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    (read, write)
}

/// Runs lease-exec with `args` and stderr a full pipe; returns its exit code, how long it ran, and
/// when its exit was seen. Panics if it runs for `limit`.
async fn run_with_stuck_stderr(
    world: &World,
    args: &[&str],
    limit: Duration,
) -> (i32, Duration, Instant) {
    let (read, write) = full_pipe();
    let mut command = world.lease_exec(args).command;
    command.stdout(Stdio::null()).stderr(Stdio::from(write));
    let started = Instant::now();
    let mut child = command.spawn().expect("spawn lease-exec");
    let status = tokio::time::timeout(limit, child.wait()).await;
    let exited = Instant::now();
    let ran = exited - started;
    // Kept open (unread) until lease-exec is gone, so its writes block instead of failing.
    drop(read);
    let status = status
        .unwrap_or_else(|_| {
            panic!("lease-exec {args:?} still running after {limit:?} with stderr a full pipe")
        })
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    (code, ran, exited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_timeout_exits_124_on_schedule_with_stderr_a_full_pipe() {
    let world = World::start().await;
    world.server.steal(NS, "job", "other", 60);
    let worker = world.worker().display().to_string();
    let journal = world.journal().display().to_string();
    let mut args: Vec<&str> = FAST.to_vec();
    args.extend(["--wait-timeout", "2s", "--identity", "me", "job", "--"]);
    args.extend([worker.as_str(), journal.as_str(), "-1", "0"]);
    let wait = Duration::from_secs(2);
    let (code, ran, _) = run_with_stuck_stderr(&world, &args, Duration::from_secs(15)).await;
    assert_eq!(code, i32::from(lease_exec::exit::WAIT_TIMEOUT));
    assert!(
        ran >= wait,
        "exited after {ran:?}, before --wait-timeout {wait:?}"
    );
    assert!(
        ran <= wait + FLUSH_TIMEOUT + SLACK,
        "exited after {ran:?}: more than --wait-timeout {wait:?} + the flush {FLUSH_TIMEOUT:?} + \
         {SLACK:?}"
    );
    assert!(world.starts().is_empty(), "the worker ran");
}

/// The exits before the Lease is touched: a usage error (before the log starts), an invalid
/// configuration and a command that is not there (after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_configuration_errors_exit_in_time_with_stderr_a_full_pipe() {
    let world = World::start().await;
    let cases: [(&[&str], u8); 3] = [
        (
            &["--no-such-option", "job", "--", "true"],
            lease_exec::exit::USAGE,
        ),
        (
            &[
                "--lease-duration",
                "1s",
                "--renew-deadline",
                "5s",
                "job",
                "--",
                "true",
            ],
            lease_exec::exit::USAGE,
        ),
        (
            &["job", "--", "/nonexistent/lease-exec-test-command"],
            lease_exec::exit::NOT_FOUND,
        ),
    ];
    for (args, expected) in cases {
        let (code, ran, _) = run_with_stuck_stderr(&world, args, Duration::from_secs(10)).await;
        assert_eq!(code, i32::from(expected), "{args:?}");
        assert!(
            ran <= FLUSH_TIMEOUT + SLACK,
            "{args:?} exited after {ran:?}: more than the flush {FLUSH_TIMEOUT:?} + {SLACK:?}"
        );
    }
}

/// A command that fails at exec, after the claim (its `#!` interpreter is missing): 127 within the
/// flush of the release, while the log thread is stuck on a line it began. (Without Events, whose
/// sending is waited for a second at most too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_fails_at_exec_exits_127_in_time_with_stderr_a_full_pipe() {
    let world = World::start().await;
    let script = world.path("no-interpreter");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = script.display().to_string();
    let mut args: Vec<&str> = FAST.to_vec();
    args.extend([
        "--no-events",
        "--identity",
        "me",
        "job",
        "--",
        script.as_str(),
    ]);
    let (code, _, exited) = run_with_stuck_stderr(&world, &args, Duration::from_secs(10)).await;
    assert_eq!(code, i32::from(lease_exec::exit::NOT_FOUND));
    assert_eq!(world.server.holder(NS, "job"), None, "not released");
    let release = world.server.writes().pop().expect("the release");
    let after = exited - release.at;
    assert!(
        after <= FLUSH_TIMEOUT + SLACK,
        "exited {after:?} after the release: more than the flush {FLUSH_TIMEOUT:?} + {SLACK:?}"
    );
}
