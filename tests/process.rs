//! Process control: process groups, orphans, PID 1 duties, the terminal, signal exit codes.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

fn read_pid(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn sh(world: &World, script: &str) -> TestCommand {
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--identity", "me", "job", "--", "sh", "-c", script].map(String::from));
    world.lease_exec(args).env("DIR", world.dir.path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_signals_the_whole_process_group() {
    let world = World::start().await;
    let mut running = sh(
        &world,
        "sleep 1000 & echo $! > $DIR/bg; echo $$ > $DIR/fg; wait",
    )
    .spawn();
    wait_for(LIMIT, "both processes", || {
        read_pid(&world.path("bg")).is_some() && read_pid(&world.path("fg")).is_some()
    })
    .await;
    let (bg, fg) = (
        read_pid(&world.path("bg")).unwrap(),
        read_pid(&world.path("fg")).unwrap(),
    );
    running.signal(Signal::SIGTERM);
    assert_eq!(running.wait(LIMIT).await, 143, "{}", running.stderr());
    assert!(!alive(fg), "the command survived");
    assert!(!alive(bg), "the grandchild survived");
    assert_eq!(world.server.holder(NS, "job"), None);
}

/// Runs `sh -c "START; wait for $DIR/go; exit 5"` under lease-exec, where START leaves a process
/// behind and writes its pid to `$DIR/leftover`. Once the leftover is watched, lets the command
/// exit, and checks that the leftover died strictly before the server received the release.
async fn assert_leftover_dies_before_the_release(world: &World, start: &str) -> String {
    let script = format!("{start}; until [ -e $DIR/go ]; do sleep 0.01; done; exit 5");
    let mut running = sh(world, &script).spawn();
    wait_for(LIMIT, "the leftover", || {
        read_pid(&world.path("leftover")).is_some()
    })
    .await;
    let leftover = read_pid(&world.path("leftover")).unwrap();
    let death = death_watch(leftover);
    std::fs::write(world.path("go"), "").unwrap();
    let code = running.wait(LIMIT).await;
    let log = running.stderr();
    assert_eq!(code, 5, "{log}");
    assert!(!alive(leftover), "the leftover survived lease-exec: {log}");
    wait_for(LIMIT, "the leftover's death to be noted", || {
        death.is_finished()
    })
    .await;
    let died_ns = death.join().unwrap();
    let release = world
        .server
        .writes()
        .into_iter()
        .rev()
        .find(|w| w.holder.is_none())
        .unwrap_or_else(|| panic!("no release; log:\n{log}"));
    assert!(
        died_ns < release.at_ns,
        "the release reached the server {} µs before the leftover died; log:\n{log}",
        (died_ns - release.at_ns) / 1000
    );
    assert_eq!(world.server.holder(NS, "job"), None, "released");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_the_group_are_killed_before_the_lease_is_released() {
    let world = World::start().await;
    // The subshell exits at once, orphaning the sleep, which stays in the command's group.
    let log =
        assert_leftover_dies_before_the_release(&world, "(sleep 1000 & echo $! > $DIR/leftover)")
            .await;
    // Re-parented to lease-exec but still in the command's group: nothing to warn about.
    assert!(!log.contains("outside its group"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_worker_whose_child_outlives_it_in_the_group_gives_no_leftover_warning() {
    let world = World::start().await;
    // A shell worker stopped by SIGTERM while its child ignores it: the shell dies, the child is
    // re-parented to lease-exec (a child subreaper) and still in the command's group, where the
    // grace period's SIGKILL ends it. A process of the group, not one that left it.
    let mut running = sh(
        &world,
        "sh -c 'trap \"\" TERM; echo $$ > $DIR/child; exec sleep 1000' & wait",
    )
    .spawn();
    wait_for(LIMIT, "the child", || {
        read_pid(&world.path("child")).is_some()
    })
    .await;
    let child = read_pid(&world.path("child")).unwrap();
    running.signal(Signal::SIGTERM);
    let code = running.wait(LIMIT).await;
    let log = running.stderr();
    assert_eq!(code, 128 + 15, "{log}");
    assert!(!alive(child), "the child survived: {log}");
    assert!(!log.contains("outside its group"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_a_signal_exits_128_plus_n() {
    let world = World::start().await;
    let (code, log) = sh(&world, "kill -USR1 $$").run(LIMIT).await;
    assert_eq!(code, 128 + 10, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hup_quit_usr1_and_usr2_reach_every_process_of_the_group() {
    let world = World::start().await;
    // The command and a process it started (same group) each record what they get.
    let traps = |who: &str| {
        ["HUP", "QUIT", "USR1", "USR2"]
            .map(|s| format!("trap 'echo {who}-{s} >> $DIR/got' {s};"))
            .concat()
    };
    let script = format!(
        "sh -c \"{} echo x > $DIR/child_ready; while :; do sleep 0.05; done\" & {} echo $$ > $DIR/fg; while :; do sleep 0.05; done",
        traps("child"),
        traps("parent")
    );
    let mut running = sh(&world, &script).spawn();
    wait_for(LIMIT, "the command and its child", || {
        read_pid(&world.path("fg")).is_some() && world.path("child_ready").exists()
    })
    .await;
    for sig in [
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        running.signal(sig);
    }
    let got = world.path("got");
    // (A shell's background job ignores SIGQUIT and cannot trap it, so QUIT is checked at the
    // command only.)
    wait_for(LIMIT, "every signal at both processes", || {
        let text = std::fs::read_to_string(&got).unwrap_or_default();
        ["HUP", "QUIT", "USR1", "USR2"]
            .iter()
            .all(|s| text.contains(&format!("parent-{s}")))
            && ["HUP", "USR1", "USR2"]
                .iter()
                .all(|s| text.contains(&format!("child-{s}")))
    })
    .await;
    assert!(!running.exited(), "these signals do not stop lease-exec");
    running.signal(Signal::SIGTERM);
    running.wait(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_it_reaps_orphans_and_passes_the_exit_code() {
    let world = World::start().await;
    let mut args: Vec<String> = vec![
        "--pid".into(),
        "--fork".into(),
        "--mount-proc".into(),
        BIN.into(),
    ];
    args.extend(FAST.iter().map(|s| s.to_string()));
    args.extend(["--identity", "me", "job", "--", "sh", "-c"].map(String::from));
    // A process in its own session, orphaned at once: only PID 1 can reap it when it exits.
    args.push(
        "echo $PPID > $DIR/ppid; (setsid sleep 0.2 &); sleep 1; \
         grep -h '^[0-9]* ([^)]*) Z' /proc/[0-9]*/stat | wc -l > $DIR/zombies; exit 7"
            .into(),
    );
    let mut command = tokio::process::Command::new("unshare");
    command
        .args(&args)
        .env("KUBECONFIG", &world.kubeconfig)
        .env("DIR", world.dir.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{log}");
    let ppid = std::fs::read_to_string(world.path("ppid")).unwrap();
    assert_eq!(ppid.trim(), "1", "lease-exec ran as PID 1");
    let zombies = std::fs::read_to_string(world.path("zombies")).unwrap();
    assert_eq!(zombies.trim(), "0", "PID 1 left zombies; log:\n{log}");
    assert_eq!(world.server.holder(NS, "job"), None, "released");
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// PID 1 of a namespace gets no default action for any signal: only a handler makes SIGTERM do
/// anything (from inside the namespace or, as here, from its parent namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_sigterm_stops_the_command_through_its_group_releases_and_exits_143() {
    let world = World::start().await;
    let mut args: Vec<String> = ["--pid", "--fork", "--mount-proc", BIN]
        .map(String::from)
        .to_vec();
    args.extend(FAST.iter().map(|s| s.to_string()));
    args.extend(["--identity", "me", "job", "--", "sh", "-c"].map(String::from));
    // The command and a process it started (same group) each note the SIGTERM they get; the
    // command waits for the other to finish, then dies of SIGTERM itself.
    args.push(
        "echo $PPID > $DIR/ppid; \
         sh -c 'trap \"echo child >> $DIR/got; exit 0\" TERM; echo > $DIR/child-ready; while :; do sleep 0.05; done' & \
         trap 'echo command >> $DIR/got; wait; trap - TERM; kill -TERM $$' TERM; \
         echo > $DIR/ready; wait"
            .into(),
    );
    let mut unshare = tokio::process::Command::new("unshare")
        .args(&args)
        .env("KUBECONFIG", &world.kubeconfig)
        .env("DIR", world.dir.path())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Both traps are set before their marker files are written.
    wait_for(LIMIT, "the command", || {
        world.path("ready").exists()
            && world.path("child-ready").exists()
            && world.server.holder(NS, "job").is_some()
    })
    .await;
    // lease-exec is unshare's child: PID 1 inside, an ordinary pid out here.
    let lease_exec = children_of(unshare.id().unwrap());
    assert_eq!(lease_exec.len(), 1, "{lease_exec:?}");
    let ppid = std::fs::read_to_string(world.path("ppid")).unwrap();
    assert_eq!(ppid.trim(), "1", "lease-exec runs as PID 1");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lease_exec[0]), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(LIMIT, unshare.wait())
        .await
        .expect("lease-exec as PID 1 exits after SIGTERM")
        .unwrap();
    let mut log = String::new();
    use tokio::io::AsyncReadExt;
    unshare
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(143), "{log}");
    let got = std::fs::read_to_string(world.path("got")).unwrap_or_default();
    let mut got: Vec<&str> = got.lines().collect();
    got.sort();
    assert_eq!(
        got,
        ["child", "command"],
        "SIGTERM reached the group; log:\n{log}"
    );
    assert_eq!(
        world.server.holder(NS, "job"),
        None,
        "released; log:\n{log}"
    );
    assert!(
        world
            .server
            .writes()
            .last()
            .is_some_and(|w| w.holder.is_none()),
        "the last write is the release; log:\n{log}"
    );
}

/// Runs lease-exec as a session leader on a new pseudo-terminal, as a person would in a shell.
async fn on_a_terminal(world: &World, script: &str) -> (nix::pty::OpenptyResult, Running) {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = || std::process::Stdio::from(pty.slave.try_clone().unwrap());
    let mut args: Vec<String> = vec!["--ctty".into(), BIN.into()];
    args.extend(FAST.iter().map(|s| s.to_string()));
    args.extend(["--identity", "me", "job", "--", "sh", "-c", script].map(String::from));
    let mut command = tokio::process::Command::new("setsid");
    command
        .args(&args)
        .env("KUBECONFIG", &world.kubeconfig)
        .env("DIR", world.dir.path())
        .stdin(slave())
        .stdout(slave())
        .kill_on_drop(true);
    let log = world.path("tty.log");
    command.stderr(std::fs::File::create(&log).unwrap());
    let child = command.spawn().unwrap();
    (pty, Running { child, log })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_command_can_read_the_terminal() {
    let world = World::start().await;
    let (pty, mut running) =
        on_a_terminal(&world, "read line; echo \"got:$line\" > $DIR/read").await;
    wait_for(LIMIT, "the lease", || {
        world.server.holder(NS, "job").is_some()
    })
    .await;
    nix::unistd::write(&pty.master, b"hello\n").unwrap();
    assert_eq!(running.wait(LIMIT).await, 0, "{}", running.stderr());
    let read = std::fs::read_to_string(world.path("read")).unwrap();
    assert_eq!(read.trim(), "got:hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_the_terminal_stops_the_command_and_exits_130() {
    let world = World::start().await;
    let (pty, mut running) = on_a_terminal(&world, "echo $$ > $DIR/fg; exec sleep 1000").await;
    wait_for(LIMIT, "the command", || {
        read_pid(&world.path("fg")).is_some()
    })
    .await;
    let fg = read_pid(&world.path("fg")).unwrap();
    // Ctrl-C: the terminal sends SIGINT to its foreground group, which is the command's.
    nix::unistd::write(&pty.master, b"\x03").unwrap();
    assert_eq!(running.wait(LIMIT).await, 130, "{}", running.stderr());
    assert!(!alive(fg));
    assert_eq!(world.server.holder(NS, "job"), None, "released");
}

/// Processes whose command line is exactly `argv`, anywhere on the machine.
fn processes_running(argv: &[&str]) -> Vec<i32> {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

/// A unique `sleep` argument, so a leftover of this test is told apart from anything else.
fn unique_sleep() -> String {
    format!("3{}.{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_left_the_group_is_killed_before_the_lease_is_released() {
    let world = World::start().await;
    let daemon = unique_sleep();
    // The daemon starts its own session: SIGKILL to the command's group does not reach it. (Not
    // a group leader, setsid calls setsid(2) and execs sleep in the same process: `$!` is it.)
    let start = format!("setsid sleep {daemon} & echo $! > $DIR/leftover");
    let log = assert_leftover_dies_before_the_release(&world, &start).await;
    let left = processes_running(&["sleep", &daemon]);
    assert!(
        left.is_empty(),
        "the daemon {left:?} outlived lease-exec; log:\n{log}"
    );
    assert!(log.contains("outside its group"), "{log}");
    assert_eq!(world.server.holder(NS, "job"), None, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_a_daemon_left_behind_is_killed_and_lease_exec_exits_after_a_takeover() {
    as_pid_1_after_a_loss(true, |world| {
        world.server.steal(NS, "job", "other", 30);
    })
    .await;
}

/// Without `--mount-proc`, `/proc` shows the outer PID namespace: `/proc/self` is not lease-exec
/// as it sees itself, and its children cannot be found there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_without_its_own_proc_the_command_is_reaped_and_lease_exec_exits() {
    as_pid_1_after_a_loss(false, |world| {
        world.server.steal(NS, "job", "other", 30);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_a_daemon_left_behind_is_killed_and_lease_exec_exits_when_the_api_goes_away() {
    as_pid_1_after_a_loss(true, |world| world.server.set_mode(Mode::Hang)).await;
}

/// As PID 1, the kernel kills every process of the namespace when lease-exec exits, whatever
/// lease-exec did: that the daemon is gone afterwards proves nothing. What lease-exec owes is to
/// kill it itself, before it is done: so the daemon's exit, as the kernel stamped it, must come
/// before lease-exec's last log line (the exit code, logged after the command's group and every
/// leftover were killed and seen gone), which is stamped before lease-exec exits and so before
/// the namespace is torn down.
async fn as_pid_1_after_a_loss(mount_proc: bool, lose: impl Fn(&World)) {
    kernel();
    let world = World::start().await;
    let (daemon, command) = (unique_sleep(), unique_sleep());
    let mut args: Vec<String> = ["--pid", "--fork"].map(String::from).to_vec();
    if mount_proc {
        args.push("--mount-proc".into());
    }
    args.push(BIN.into());
    args.extend(FAST.iter().map(|s| s.to_string()));
    args.extend(["--identity", "me", "job", "--", "sh", "-c"].map(String::from));
    args.push(format!("setsid sleep {daemon} & exec sleep {command}"));
    let mut child = tokio::process::Command::new("unshare")
        .args(&args)
        .env("KUBECONFIG", &world.kubeconfig)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for(LIMIT, "the command and its daemon", || {
        !processes_running(&["sleep", &daemon]).is_empty()
            && !processes_running(&["sleep", &command]).is_empty()
    })
    .await;
    let daemon_pid = processes_running(&["sleep", &daemon])[0];
    let started_ns = mono_ns();
    lose(&world);
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("lease-exec as PID 1 exits after the loss")
        .unwrap();
    let mut log = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(i32::from(lease_exec::exit::LOST)),
        "{log}"
    );
    assert!(
        processes_running(&["sleep", &daemon]).is_empty(),
        "the daemon survived; log:\n{log}"
    );
    assert!(processes_running(&["sleep", &command]).is_empty(), "{log}");
    let mut died_ns = None;
    wait_for(LIMIT, "the kernel's stamp of the daemon's exit", || {
        died_ns = kernel().exit_of(daemon_pid as u32, started_ns);
        died_ns.is_some()
    })
    .await;
    let last = log
        .lines()
        .rfind(|l| l.contains("exit_code="))
        .unwrap_or_else(|| panic!("no last line with the exit code; log:\n{log}"));
    let last_ns = mono_ns_of_log_line(last);
    let died_ns = died_ns.unwrap();
    assert!(
        died_ns < last_ns,
        "the daemon died {:.3} ms after lease-exec's last log line: killed by the namespace's \
         teardown, not by lease-exec; log:\n{log}",
        (died_ns as i64 - last_ns as i64) as f64 / 1e6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_command_is_continued_so_it_can_act_on_sigterm() {
    let world = World::start().await;
    let mut running = world.contender("job", "me", -1.0, 0).spawn();
    let pid = world.wait_leading().await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    running.signal(Signal::SIGTERM);
    // The worker's own SIGTERM handler exits 128+15; a worker left stopped would be SIGKILLed
    // at the end of the grace period (137).
    assert_eq!(running.wait(LIMIT).await, 143, "{}", running.stderr());
    assert!(
        world
            .journal_entries()
            .iter()
            .any(|e| e.what == "stop" && e.pid == pid)
    );
}

/// Files exec cannot run directly: (path, expected exit code). A text file without `#!` is run by
/// `/bin/sh`, as execvp and every shell do, so it exits with its own code; a missing interpreter is
/// found only by exec, after the Lease was acquired, and must leave it released. (A binary for
/// another architecture is refused before the Lease is touched: see `bad_input.rs`.)
fn unrunnable(world: &World) -> Vec<(std::path::PathBuf, u8)> {
    use std::os::unix::fs::PermissionsExt;
    let cases: [(&str, &[u8], u8); 2] = [
        ("no-shebang", b"exit 3\n", 3),
        ("missing-interpreter", b"#!/nonexistent/interpreter\n", 127),
    ];
    cases
        .into_iter()
        .map(|(name, content, code)| {
            let path = world.path(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            (path, code)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_exec_cannot_run_gives_its_exit_code_and_a_released_lease_every_time() {
    let world = World::start().await;
    let cases = unrunnable(&world);
    for round in 0..10 {
        for (path, expected) in &cases {
            let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
            args.extend(["--identity", "me", "job", "--"].map(String::from));
            args.push(path.display().to_string());
            let (code, log) = world.lease_exec(args).run(LIMIT).await;
            assert_eq!(
                code,
                i32::from(*expected),
                "round {round}, {}: {log}",
                path.display()
            );
            assert_eq!(
                world.server.holder(NS, "job"),
                None,
                "round {round}, {}: not released; log:\n{log}",
                path.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_kills_at_once() {
    kernel();
    let world = World::start().await;
    let options = [
        "--lease-duration",
        "2s",
        "--renew-deadline",
        "1s",
        "--retry-period",
        "250ms",
        "--grace-period",
        "20s",
        "--identity",
        "me",
        "job",
    ];
    let mut running = world
        .worker_command(&options, -1.0, 0, &["ignore-term"])
        .spawn();
    let pid = world.wait_leading().await;
    running.signal(Signal::SIGTERM);
    wait_for(LIMIT, "the first SIGTERM to reach the worker", || {
        world.journal_entries().iter().any(|e| e.what == "ignored")
    })
    .await;
    assert!(alive(pid), "the grace period runs");
    let second = mono_ns();
    running.signal(Signal::SIGTERM);
    // At once, by the kernel's stamp of the worker's exit: the signal's delivery, the SIGKILL and
    // the teardown on a loaded 2-core machine; the grace period is 20 s.
    let mut exit_ns = None;
    wait_for(LIMIT, "the worker to die", || {
        exit_ns = kernel().exit_of(pid as u32, second);
        exit_ns.is_some()
    })
    .await;
    let after_ms = (exit_ns.unwrap() - second) as f64 / 1e6;
    assert!(
        after_ms <= 100.0,
        "killed {after_ms:.1} ms after the second SIGTERM, not at once (grace 20 s); log:\n{}",
        running.stderr()
    );
    assert_eq!(running.wait(LIMIT).await, 137, "{}", running.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalled_while_waiting_exits_128_plus_n() {
    let world = World::start().await;
    for (sig, code) in [
        (Signal::SIGTERM, 143),
        (Signal::SIGINT, 130),
        (Signal::SIGHUP, 129),
    ] {
        world.server.steal(NS, "job", "other", 60);
        let mut running = world.contender("job", "me", -1.0, 0).spawn();
        wait_for(LIMIT, "waiting", || {
            running.stderr().contains("held by another identity")
        })
        .await;
        running.signal(sig);
        assert_eq!(
            running.wait(LIMIT).await,
            code,
            "{sig}: {}",
            running.stderr()
        );
        assert!(world.starts().is_empty());
    }
}

/// A kubeconfig credential plugin runs in lease-exec's own process group, started and waited for
/// by the API client. The reaper must leave it to that owner: here the plugin exits while a
/// process it left behind still holds its stdout, so it stays a zombie well past the SIGCHLD its
/// exit sends lease-exec, until the client, done reading, waits for it. Its credential expires at
/// once, so it runs again for each request while the command runs and the reaper is at work.
/// Reaped by lease-exec instead, the client's wait fails and the renewals with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_plugin_is_left_to_the_client_that_runs_it() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::start().await;
    let plugin = world.path("credential-plugin");
    let runs = world.path("plugin-runs");
    std::fs::write(
        &plugin,
        format!(
            r#"#!/bin/sh
echo ran >> {runs}
(sleep 0.05; echo) &
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo '{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"test-token","expirationTimestamp":"'$now'"}}}}'
"#,
            runs = runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = std::fs::read_to_string(&world.kubeconfig).unwrap();
    let with_plugin = text.replace(
        "    token: test-token\n",
        &format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n",
            plugin.display()
        ),
    );
    assert_ne!(
        text, with_plugin,
        "the kubeconfig's user has a token to replace"
    );
    let kubeconfig = world.path("plugin-kubeconfig");
    std::fs::write(&kubeconfig, with_plugin).unwrap();
    let (code, log) = sh(&world, "sleep 2; echo ran > $DIR/ran; exit 4")
        .env("KUBECONFIG", &kubeconfig)
        .run(LIMIT)
        .await;
    assert_eq!(code, 4, "{log}");
    assert!(world.path("ran").exists(), "{log}");
    assert_eq!(world.server.holder(NS, "job"), None, "{log}");
    let ran = std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        ran >= 4,
        "the plugin ran {ran} times: not while the command ran\n{log}"
    );
}
