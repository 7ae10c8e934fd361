//! The watchdog: the kill deadline holds when lease-exec's runtime thread is stuck (a page fault on
//! a hung disk, a starved CPU). Threads of lease-exec are frozen here one by one with ptrace, the
//! others running on; worker start and end times come from the kernel.

mod support;

use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use support::*;

const LIMIT: Duration = Duration::from_secs(20);

/// Freezes threads of another process (ptrace-stops them, one thread at a time: the others run
/// on) and thaws them. All ptrace requests come from one tracer thread, as ptrace requires; it
/// stays until the `Freezer` is dropped (a tracer's exit would resume its tracees).
struct Freezer {
    orders: mpsc::Sender<(Order, mpsc::Sender<nix::Result<()>>)>,
    tracer: Option<std::thread::JoinHandle<()>>,
}

enum Order {
    Freeze(Pid),
    Thaw(Pid),
}

impl Freezer {
    fn new() -> Freezer {
        let (orders, inbox) = mpsc::channel::<(Order, mpsc::Sender<nix::Result<()>>)>();
        let tracer = std::thread::spawn(move || {
            use nix::sys::ptrace;
            use nix::sys::wait::{WaitPidFlag, waitpid};
            for (order, done) in inbox {
                let result = match order {
                    Order::Freeze(tid) => ptrace::seize(tid, ptrace::Options::empty())
                        .and_then(|()| ptrace::interrupt(tid))
                        .and_then(|()| waitpid(tid, Some(WaitPidFlag::__WALL)).map(|_| ())),
                    Order::Thaw(tid) => ptrace::detach(tid, None),
                };
                let _ = done.send(result);
            }
        });
        Freezer {
            orders,
            tracer: Some(tracer),
        }
    }

    fn order(&self, order: Order) {
        let (done, result) = mpsc::channel();
        self.orders.send((order, done)).unwrap();
        result.recv().unwrap().expect("ptrace");
    }

    /// Returns once `tid` is stopped.
    fn freeze(&self, tid: Pid) {
        self.order(Order::Freeze(tid));
    }

    fn thaw(&self, tid: Pid) {
        self.order(Order::Thaw(tid));
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        let (orders, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.orders, orders));
        if let Some(tracer) = self.tracer.take() {
            let _ = tracer.join();
        }
    }
}

/// The thread of `pid` named `name` (as the kernel keeps it: cut to 15 bytes).
fn thread_named(pid: i32, name: &str) -> Option<Pid> {
    let name = &name[..name.len().min(15)];
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end_matches('\n') == name)
        })
        .and_then(|task| task.file_name().to_str()?.parse().ok())
        .map(Pid::from_raw)
}

/// The children of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// The runtime runs on the main thread, whose thread id is the process id.
fn runtime_thread(running: &Running) -> Pid {
    Pid::from_raw(running.pid())
}

/// A command that leaves a daemon behind the way a double fork does: a shell in a session of its
/// own (`setsid`, so out of the command's process group) runs a journaling worker (journal
/// `daemon`) as its child, while the command itself becomes the journaling worker (journal
/// `journal`). The daemon's worker becomes lease-exec's child (a child subreaper) only once the
/// command and then the session's shell have died: one round of killing cannot reach it.
fn leaving_a_daemon(world: &World, daemon: &std::path::Path) -> String {
    let worker = world.worker().display().to_string();
    format!(
        "setsid sh -c '{worker} {daemon} -1 0 & wait' & exec {worker} {journal} -1 0",
        daemon = daemon.display(),
        journal = world.journal().display(),
    )
}

/// The watchdog kills until nothing of the command is left: a leader whose runtime thread is stuck
/// stops renewing, its Lease expires for the others on time, and the watchdog's thread alone must
/// have killed the command, and the daemon it left in a session of its own, by the kill deadline
/// and before the next candidate's worker starts, as the kernel stamps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_leader_kills_a_daemon_its_command_left_in_another_session_in_time() {
    let kernel = kernel();
    let world = World::start().await;
    let daemon = world.path("daemon");
    let script = leaving_a_daemon(&world, &daemon);
    let mut args: Vec<&str> = FAST.to_vec();
    args.extend(["--identity", "stuck", "job", "--", "sh", "-c", &script]);
    let stuck = world.lease_exec(args).spawn();
    wait_for(LIMIT, "the stuck leader's worker and daemon", || {
        !world.starts().is_empty() && !read_journal(&daemon).is_empty()
    })
    .await;
    let daemon_start = read_journal(&daemon)[0].clone();
    let freezer = Freezer::new();
    freezer.freeze(runtime_thread(&stuck));
    let mut next = world.contender("job", "next", -1.0, 0).spawn();
    wait_for(LIMIT, "the next worker", || world.starts().len() >= 2).await;
    let mut daemon_exit = None;
    let died = wait_for_or(Duration::from_secs(5), || {
        daemon_exit = kernel.exit_of(daemon_start.pid as u32, daemon_start.at_ns);
        daemon_exit.is_some()
    })
    .await;
    if !died {
        // Not ours to leave running: it is in a session of its own, no parent-death signal.
        let _ = nix::sys::signal::kill(Pid::from_raw(daemon_start.pid), Signal::SIGKILL);
        panic!(
            "the daemon (pid {}) the stuck leader's command left in another session was alive \
             5 s after the next worker started; log of the follower:\n{}",
            daemon_start.pid,
            next.stderr()
        );
    }
    next.signal(Signal::SIGTERM);
    next.wait(LIMIT).await;
    let (_, renewed_ns) = world.last_renewal("stuck");
    let kill_by = renewed_ns + FAST_TIMING.kill_by_ns();
    let daemon_runs = kernel_runs_in(&daemon).await;
    assert_eq!(daemon_runs.len(), 1, "{daemon_runs:?}");
    assert!(
        daemon_runs[0].exit_ns <= kill_by + KILL_LATE_NS,
        "the daemon died {} ms after R + kill_by",
        (daemon_runs[0].exit_ns as i64 - kill_by as i64) / 1_000_000
    );
    let runs = world.kernel_runs().await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    // The stuck leader's term: its worker and the daemon, from the first exec to the last exit.
    let (worker, daemon) = (runs[0].span(), daemon_runs[0].span());
    let term = (worker.0, worker.1.min(daemon.1), worker.2.max(daemon.2));
    assert_no_overlap(
        &[term, runs[1].span()],
        &format!(
            "the daemon ran {daemon:?}; log of the follower:\n{}",
            next.stderr()
        ),
    );
    // SIGKILL ends a ptrace-stopped process too (dropped with `stuck`).
    drop(stuck);
    drop(freezer);
}

/// A takeover the guard sees while the command is being spawned reaches the watchdog, so the
/// command dies at once when it starts even if the runtime thread is stuck from then on (it
/// learns of the command's pid only after the spawn). The spawn is held by freezing the thread
/// that forks the command until the takeover is seen; then the runtime's thread is frozen and the
/// spawn let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_seen_during_the_spawn_kills_the_command_at_once_with_the_runtime_stuck() {
    let kernel = kernel();
    let world = World::start().await;
    // Held by another for 2 s: time to freeze the spawner thread before the claim.
    world.server.steal(NS, "job", "other", 2);
    // A long term: the spawn rule lets the command start long after the claim, and the kill
    // deadline is far away (R + 20 s − margin).
    let options = [
        "--lease-duration",
        "20s",
        "--renew-deadline",
        "15s",
        "--retry-period",
        "1s",
        "--identity",
        "me",
        "job",
    ];
    let leader = world.worker_command(&options, -1.0, 0, &[]).spawn();
    let mut spawner = None;
    wait_for(LIMIT, "the spawner thread", || {
        spawner = thread_named(leader.pid(), "lease-exec-spawner");
        spawner.is_some()
    })
    .await;
    let spawner = spawner.unwrap();
    let freezer = Freezer::new();
    freezer.freeze(spawner);
    assert_eq!(
        world.server.holder(NS, "job").as_deref(),
        Some("other"),
        "claimed before the spawner thread was frozen; log:\n{}",
        leader.stderr()
    );
    let claimed = wait_for_or(LIMIT, || {
        world.server.holder(NS, "job").as_deref() == Some("me")
    })
    .await;
    assert!(claimed, "no claim; log:\n{}", leader.stderr());
    world.server.steal(NS, "job", "operator", 30);
    wait_for(LIMIT, "the leader to see the takeover", || {
        leader.stderr().contains("the lease was taken")
    })
    .await;
    assert!(
        world.starts().is_empty(),
        "started before the spawn was let go"
    );
    freezer.freeze(runtime_thread(&leader));
    let thawed_ns = mono_ns();
    freezer.thaw(spawner);
    // The worker may be killed before the kernel's exec event is read (its /proc gone): found as
    // the leader's child, a zombie at most (its reaper is on the frozen thread).
    let mut worker = None;
    wait_for(LIMIT, "the worker", || {
        worker = children_of(leader.pid()).into_iter().next();
        worker.is_some()
    })
    .await;
    let worker = worker.unwrap();
    let mut exit_ns = None;
    let died = wait_for_or(Duration::from_secs(5), || {
        exit_ns = kernel.exit_of(worker as u32, thawed_ns);
        exit_ns.is_some()
    })
    .await;
    assert!(
        died,
        "the worker (pid {worker}) of a term already taken still ran 5 s after the spawn was let \
         go, lease-exec's runtime thread stuck; log:\n{}",
        leader.stderr()
    );
    let exit_ns = exit_ns.unwrap();
    let span = kernel
        .span_at(worker as u32, exit_ns)
        .expect("the worker's exec, from the kernel");
    assert!(span.exec_ns >= thawed_ns, "{span:?}");
    if span.read {
        assert_eq!(
            span.args.get(1),
            Some(&world.journal().display().to_string())
        );
    }
    let lived = exit_ns - span.exec_ns;
    assert!(
        lived < KILL_LATE_NS,
        "the worker of a term already taken lived {} ms after its exec",
        lived / 1_000_000
    );
    drop(leader);
    drop(freezer);
}
