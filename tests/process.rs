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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_the_group_are_killed_before_the_lease_is_released() {
    let world = World::start().await;
    // The subshell exits at once, orphaning the sleep, which stays in the command's group.
    let (code, log) = sh(&world, "(sleep 1000 & echo $! > $DIR/orphan); exit 5")
        .run(LIMIT)
        .await;
    assert_eq!(code, 5, "{log}");
    let orphan = read_pid(&world.path("orphan")).expect("orphan pid");
    assert!(
        !alive(orphan),
        "the orphaned grandchild survived lease-exec"
    );
    assert_eq!(world.server.holder(NS, "job"), None, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_a_signal_exits_128_plus_n() {
    let world = World::start().await;
    let (code, log) = sh(&world, "kill -USR1 $$").run(LIMIT).await;
    assert_eq!(code, 128 + 10, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_usr1_are_forwarded_to_the_command() {
    let world = World::start().await;
    let mut running =
        sh(&world, "trap 'echo hup >> $DIR/got' HUP; trap 'echo usr1 >> $DIR/got' USR1; echo $$ > $DIR/fg; while :; do sleep 0.05; done")
            .spawn();
    wait_for(LIMIT, "the command", || {
        read_pid(&world.path("fg")).is_some()
    })
    .await;
    running.signal(Signal::SIGHUP);
    running.signal(Signal::SIGUSR1);
    let got = world.path("got");
    wait_for(LIMIT, "both signals to arrive", || {
        let text = std::fs::read_to_string(&got).unwrap_or_default();
        text.contains("hup") && text.contains("usr1")
    })
    .await;
    assert!(!running.exited(), "HUP and USR1 do not stop lease-exec");
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
