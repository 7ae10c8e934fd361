//! Process control: spawning the command in its own process group with a parent-death signal,
//! signalling the group, and reaping. All `unsafe` code and all raw process control live here.
//!
//! Theory of operation:
//! - **Spawning** happens on one dedicated thread that lives as long as the process.
//!   `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process; a
//!   runtime's short-lived blocking thread would kill the child when it retires. Between `fork` and
//!   `prctl` lease-exec could already have died, so the child re-checks its parent pid afterwards.
//! - **Process group**: the child calls `setpgid(0, 0)`, so the command and everything it starts
//!   (unless it creates its own session) can be signalled at once with `killpg`.
//! - **Reaping** has one owner, [`Reaper`]: on every SIGCHLD it reaps each exited child of ours
//!   whose process group differs from our own, i.e. the command, its group, and orphans re-parented
//!   to us (we are PID 1 or a child subreaper). Processes in our own group (such as a kubeconfig
//!   credential plugin that the API client runs and waits for itself) are left to their owner, so
//!   their exit status is never stolen.

use std::collections::HashSet;
use std::io;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Mutex, OnceLock};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::exit::ChildStatus;

/// The signals lease-exec forwards to the command's process group.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Held while spawning and while reaping: see the module documentation.
static REAP_LOCK: Mutex<()> = Mutex::new(());

/// Commands spawned so far; read and written under [`REAP_LOCK`].
static SPAWNS: AtomicU64 = AtomicU64::new(0);

/// The pid of the command spawned last while it is unreaped, else 0; written under [`REAP_LOCK`].
/// On SIGCHLD the reaper tries this pid first, so the command's exit reaches the supervisor (and
/// the Lease's release) before the scan of `/proc` for other children. Cleared when reaped, so a
/// reused pid (a credential plugin of ours, in our own group) is never waited for by mistake: until
/// the command is reaped its pid cannot be reused.
static COMMAND: AtomicI32 = AtomicI32::new(0);

fn reap_lock() -> std::sync::MutexGuard<'static, ()> {
    // A panic while holding the lock leaves nothing half-done that reaping depends on.
    REAP_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running command: its pid, which is also its process group id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    /// Pid of the command, and id of its process group.
    pub pid: Pid,
    /// The command's group was made the terminal's foreground group.
    pub has_terminal: bool,
    /// The value of [`SPAWNS`] after this command was spawned: statuses reaped before carry a
    /// smaller one.
    spawned: u64,
}

impl Child {
    /// Sends `signal` to the command's whole process group. A group that is already gone is not an
    /// error.
    pub fn signal_group(&self, signal: Signal) {
        match killpg(self.pid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(%e, ?signal, pgid = self.pid.as_raw(), "cannot signal the command's process group")
            }
        }
    }

    /// Takes the terminal back after the command exits, if it was handed over.
    pub fn reclaim_terminal(&self) {
        if self.has_terminal {
            // SIGTTOU is ignored in lease-exec (see `spawn`), so this works from the background.
            let _ = nix::unistd::tcsetpgrp(std::io::stdin(), nix::unistd::getpgrp());
        }
    }

    /// Whether any process is left in the command's process group (zombies included, until
    /// reaped).
    pub fn group_alive(&self) -> bool {
        !matches!(killpg(self.pid, None), Err(Errno::ESRCH))
    }
}

/// What the spawner thread is asked to do.
struct SpawnRequest {
    command: std::process::Command,
    has_terminal: bool,
    /// The spawn rule's deadline (CLOCK_BOOTTIME), for the wait before the fork.
    not_after: std::time::Duration,
    /// Told the command's pid by the spawner thread itself, the moment the exec has happened.
    watchdog: Option<Watchdog>,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Forks and execs `command` under [`REAP_LOCK`], so the reaper cannot reap a child whose exec
/// failed before std's spawn has waited for it. Returns the child, whose `spawned` is the new
/// [`SPAWNS`].
fn spawn_now(command: &mut std::process::Command, has_terminal: bool) -> io::Result<Child> {
    let _lock = reap_lock();
    command.spawn().map(|child| {
        let pid = Pid::from_raw(child.id() as i32);
        // Dropping std's handle neither waits nor kills: the Reaper owns waitpid.
        drop(child);
        COMMAND.store(pid.as_raw(), Ordering::SeqCst);
        Child {
            pid,
            has_terminal,
            spawned: SPAWNS.fetch_add(1, Ordering::SeqCst) + 1,
        }
    })
}

/// The long-lived spawner thread's inbox. Started by [`Reaper::start`], before the campaign, so
/// that starting a thread is not part of the command's start after a claim (0.6–1.2 ms measured).
///
/// Not the runtime's own thread, although that one also lives as long as the process: std's
/// spawn blocks until the exec has happened, and an exec that stalls (a binary on a hung network
/// mount) would then stop the renewals and the guard with it, while the watchdog has no pid yet.
fn spawner() -> &'static std_mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<std_mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("lease-exec-spawner".into())
            .spawn(move || {
                // This thread never returns while the process lives (the sender is in a static),
                // so a parent-death signal set by children it forks fires only when lease-exec
                // itself dies.
                for request in rx {
                    let SpawnRequest {
                        mut command,
                        has_terminal,
                        not_after,
                        watchdog,
                        reply,
                    } = request;
                    if let Some(watchdog) = &watchdog {
                        watchdog.settle(not_after);
                    }
                    let spawned = spawn_now(&mut command, has_terminal);
                    // From this thread, before the reply: the runtime's thread, which reads the
                    // reply, may be stuck from now on (see Watchdog::expect).
                    if let (Ok(child), Some(watchdog)) = (&spawned, &watchdog) {
                        watchdog.attach(*child);
                    }
                    let _ = reply.send(spawned);
                }
            })
            .expect("cannot start the spawner thread");
        tx
    })
}

/// Whether stdin is a terminal whose foreground process group is ours (run by hand in a shell).
fn in_terminal_foreground() -> bool {
    let stdin = std::io::stdin();
    nix::unistd::isatty(&stdin).unwrap_or(false)
        && nix::unistd::tcgetpgrp(&stdin).is_ok_and(|group| group == nix::unistd::getpgrp())
}

/// Spawns the command: own process group, SIGKILL when lease-exec dies, inherited stdio.
///
/// When lease-exec runs in a terminal's foreground, the command's group becomes the foreground
/// group (as a shell does for a job, and tini does for its child), so an interactive command can
/// read the terminal, and Ctrl-C reaches the command directly.
///
/// `watchdog`, [`Watchdog::expect`]ing the command, learns its pid from the thread that spawns it,
/// as soon as the exec has happened, whatever this task's thread is doing by then.
pub async fn spawn(
    mut command: std::process::Command,
    not_after: std::time::Duration,
    watchdog: Option<&Watchdog>,
) -> io::Result<Child> {
    let parent = nix::unistd::getpid();
    let has_terminal = in_terminal_foreground();
    if has_terminal {
        // SAFETY: setting a signal to SIG_IGN installs no handler code. lease-exec must ignore
        // SIGTTOU to take the terminal back from the background after the command exits.
        unsafe {
            nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigIgn)?;
        }
    }
    // SAFETY: the closure runs in the forked child before exec. It only makes raw system calls
    // (clock_gettime, setpgid, prctl, getppid, kill) that are async-signal-safe, allocates nothing
    // and takes no locks.
    unsafe {
        command.pre_exec(move || {
            // The last check before the command runs: never past the term's renew deadline
            // (`not_after` on CLOCK_BOOTTIME, which counts a suspend too). Whatever delayed the
            // spawn (a slow API call, a frozen process), the command must not start with less than
            // the margin between the renew deadline and the kill deadline left.
            if let Ok(now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
                && std::time::Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32) >= not_after
            {
                return Err(io::Error::from_raw_os_error(nix::libc::ETIMEDOUT));
            }
            nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // lease-exec may have died between fork and prctl: then the signal will never come, and
            // the child must not run without a parent that holds the lease.
            if nix::unistd::getppid() != parent {
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGKILL);
            }
            // An ignored signal stays ignored across exec: give the command the default back.
            nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigDfl)?;
            if has_terminal {
                // tcsetpgrp from a background group raises SIGTTOU; ignore it for this one call.
                nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigIgn)?;
                // Sound: fd 0 is open (it is a terminal, checked before the fork) for the
                // duration of this call. std::io::stdin() is not used: it takes a lock.
                let stdin = std::os::fd::BorrowedFd::borrow_raw(0);
                let _ = nix::unistd::tcsetpgrp(stdin, nix::unistd::getpid());
                nix::sys::signal::signal(Signal::SIGTTOU, nix::sys::signal::SigHandler::SigDfl)?;
            }
            Ok(())
        });
    }
    let (reply, answer) = oneshot::channel();
    spawner()
        .send(SpawnRequest {
            command,
            has_terminal,
            not_after,
            watchdog: watchdog.cloned(),
            reply,
        })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .await
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ETIMEDOUT)
                && crate::clock::boot_time() >= not_after
            {
                io::Error::new(io::ErrorKind::TimedOut, Late)
            } else {
                e
            }
        })
}

/// Why [`spawn`] did not start the command: its deadline had passed.
#[derive(Debug, thiserror::Error)]
#[error("the term's renew deadline passed before the command could start")]
pub struct Late;

/// Whether `error` is [`spawn`] refusing to start the command past its deadline.
pub fn is_late(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|e| e.is::<Late>())
}

/// Makes this process a child subreaper, so orphaned grandchildren are re-parented to it and can be
/// reaped and stopped. PID 1 is one already.
pub fn become_subreaper() {
    if nix::unistd::getpid().as_raw() != 1
        && let Err(e) = nix::sys::prctl::set_child_subreaper(true)
    {
        tracing::debug!(%e, "cannot become a child subreaper");
    }
}

/// The one owner of `waitpid`. Reports every reaped process as `(pid, status)`.
pub struct Reaper {
    exits: mpsc::UnboundedReceiver<Reaped>,
}

/// One reaped process, and [`SPAWNS`] when it was reaped.
type Reaped = (Pid, ChildStatus, u64);

impl Reaper {
    /// Starts reaping, and the spawner thread. Call before spawning anything, so no SIGCHLD is
    /// missed.
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let (tx, exits) = mpsc::unbounded_channel();
        spawner();
        tokio::spawn(async move {
            loop {
                // The command first: its exit is reported before the scan of /proc below, which
                // then runs while the supervisor already kills the group's leftovers and releases.
                if reap_command(&tx) {
                    tokio::task::yield_now().await;
                }
                reap_all(&tx);
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(Reaper { exits })
    }

    /// Waits until `child` has exited and returns its status. Other processes reaped meanwhile are
    /// only logged.
    pub async fn wait(&mut self, child: Child) -> ChildStatus {
        loop {
            match self.exits.recv().await {
                Some((pid, status, spawns)) if pid == child.pid && spawns >= child.spawned => {
                    return status;
                }
                Some((pid, status, _)) => {
                    tracing::debug!(pid = pid.as_raw(), %status, "reaped a descendant")
                }
                None => std::future::pending().await,
            }
        }
    }
}

/// Reaps the command spawned last if it has exited ([`COMMAND`]); returns whether it did.
fn reap_command(tx: &mpsc::UnboundedSender<Reaped>) -> bool {
    let _lock = reap_lock();
    let pid = COMMAND.load(Ordering::SeqCst);
    if pid == 0 {
        return false;
    }
    let reaped = match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(pid, code)) => Some((pid, ChildStatus::Exited(code))),
        Ok(WaitStatus::Signaled(pid, signal, _)) => {
            Some((pid, ChildStatus::Signaled(signal as i32)))
        }
        Ok(_) => None,
        // Reaped already (the scan below got it first, or it was never ours to wait for).
        Err(_) => {
            COMMAND.store(0, Ordering::SeqCst);
            None
        }
    };
    let Some((pid, status)) = reaped else {
        return false;
    };
    COMMAND.store(0, Ordering::SeqCst);
    let _ = tx.send((pid, status, SPAWNS.load(Ordering::SeqCst)));
    true
}

/// Reaps every exited child that is not in our own process group.
fn reap_all(tx: &mpsc::UnboundedSender<Reaped>) {
    let _lock = reap_lock();
    let spawns = SPAWNS.load(Ordering::SeqCst);
    let own_group = nix::unistd::getpgrp();
    // Peek first (`WNOWAIT` leaves the child waitable): one system call when nothing is left to
    // reap, the usual case, instead of a scan of /proc that would run while the supervisor
    // releases the Lease. An exited child in our own group is its owner's to wait for: the scan
    // below then finds the others.
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match nix::sys::wait::waitid(nix::sys::wait::Id::All, flags) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return,
            },
        };
        match nix::unistd::getpgid(Some(pid)) {
            Ok(group) if group == own_group => break,
            // Gone meanwhile (reaped by its owner): peek again.
            Err(Errno::ESRCH) => continue,
            _ => {
                if !reap(pid, spawns, tx) {
                    break;
                }
            }
        }
    }
    let Some(children) = own_children() else {
        // A /proc of another PID namespace cannot tell our children: reap anything.
        reap(Pid::from_raw(-1), spawns, tx);
        return;
    };
    for pid in children {
        match nix::unistd::getpgid(Some(pid)) {
            Ok(group) if group == own_group => continue,
            _ => {
                reap(pid, spawns, tx);
            }
        }
    }
}

/// Reaps `which` (-1: any child) until nothing is left to reap; returns whether it reaped one.
fn reap(which: Pid, spawns: u64, tx: &mpsc::UnboundedSender<Reaped>) -> bool {
    let mut reaped = false;
    loop {
        match waitpid(which, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                forget_command(pid);
                let _ = tx.send((pid, ChildStatus::Exited(code), spawns));
                reaped = true;
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                forget_command(pid);
                let _ = tx.send((pid, ChildStatus::Signaled(signal as i32), spawns));
                reaped = true;
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
            Ok(_) => {}
        }
        if which.as_raw() > 0 {
            return reaped;
        }
    }
}

/// The command `pid` was reaped by the scan: [`reap_command`] must not wait for its pid again.
fn forget_command(pid: Pid) {
    let _ = COMMAND.compare_exchange(pid.as_raw(), 0, Ordering::SeqCst, Ordering::SeqCst);
}

/// SIGKILL to everything the command may have left running, at once, without waiting or logging
/// (it runs on the [`Watchdog`] thread too): the command's process group, every child of ours
/// outside our own process group (descendants that left the group are re-parented to us, PID 1 or
/// child subreaper), and as PID 1 of a PID namespace every process in it (`kill(-1)`). Returns the
/// children of ours outside our own group that were signalled, each with whether it left the
/// command's group, or `None` when they cannot be seen.
pub fn kill_all(child: Child) -> Option<Vec<Leftover>> {
    let _ = killpg(child.pid, Signal::SIGKILL);
    if nix::unistd::getpid().as_raw() == 1 {
        // Every process of the namespace but ourselves.
        let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
    }
    let own_group = nix::unistd::getpgrp();
    let leftovers: Vec<Leftover> = own_children()?
        .into_iter()
        .filter_map(|pid| {
            let group = nix::unistd::getpgid(Some(pid)).ok()?;
            (group != own_group).then_some(Leftover {
                pid,
                escaped: group != child.pid,
            })
        })
        .collect();
    for leftover in &leftovers {
        let _ = nix::sys::signal::kill(leftover.pid, Signal::SIGKILL);
    }
    Some(leftovers)
}

/// A child of ours outside our own process group, found by [`kill_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leftover {
    pub pid: Pid,
    /// It left the command's process group (`setsid`, `setpgid`): the group's SIGKILL does not
    /// reach it. A process still in the group is only re-parented to us after its parent died
    /// (we are a child subreaper): a shell's `sleep` when the shell is stopped, nothing unusual.
    pub escaped: bool,
}

/// Kills what the command left behind ([`kill_all`]) until it is gone, at most until `deadline`.
/// Returns whether everything is known to be gone: when leftovers cannot be seen (no usable
/// `/proc`), only PID 1 can tell (nothing is left to signal in its namespace).
///
/// What escapes when lease-exec is not PID 1: processes that are not its descendants (started by
/// `kubectl exec`, or by a service manager on the worker's request), and descendants re-parented
/// to another subreaper below us.
pub async fn kill_leftovers(child: Child, deadline: tokio::time::Instant) -> bool {
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
    let mut named = HashSet::new();
    loop {
        let gone = match kill_all(child) {
            Some(leftovers) => {
                for leftover in &leftovers {
                    if leftover.escaped && named.insert(leftover.pid) {
                        tracing::warn!(
                            pid = leftover.pid.as_raw(),
                            "killed a process the command left outside its group"
                        );
                    }
                }
                leftovers.is_empty() && !child.group_alive()
            }
            None if pid1 => matches!(
                nix::sys::signal::kill(Pid::from_raw(-1), None),
                Err(Errno::ESRCH)
            ),
            None => false,
        };
        if gone {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tick.tick().await;
    }
}

/// Enforces the kill deadline from a thread of its own, on CLOCK_BOOTTIME.
///
/// The supervisor's timers run on the async runtime's one thread, on CLOCK_MONOTONIC. If that
/// thread is stuck (a page fault on a hung disk, a starved CPU, a slow `/proc`), or the machine was
/// suspended (CLOCK_MONOTONIC stops; others' clocks do not), those timers fire late, while the
/// Lease expires for everyone else on time. The watchdog needs neither: the supervisor arms it with
/// the same deadline on every change, and at that instant of CLOCK_BOOTTIME (checked at least every
/// [`Watchdog::TICK`]) it kills, whatever the runtime is doing.
///
/// It kills until nothing of the command is left, as [`kill_leftovers`] does on the runtime's
/// path: a process that left the command's group (`setsid`) is re-parented to lease-exec only once
/// its parent has died, so a single round of [`kill_all`] misses it, and its own children are
/// re-parented only once it has died in turn. So it runs [`kill_all`] every [`Watchdog::KILL_TICK`]
/// until every child of ours outside our own process group is dead ([`nothing_left`]; a zombie
/// waits for the reaper, on the runtime's thread, and counts as dead).
///
/// It is armed before the command exists ([`Watchdog::expect`], before the spawn), and the
/// spawner's thread hands it the command's pid right after the exec ([`Watchdog::attach`]), so a
/// takeover or a shortened term seen during the spawn ([`Watchdog::fire_now`],
/// [`Watchdog::tighten`]) applies to the command the moment it exists, and the runtime's thread may
/// be stuck from the spawn on.
#[derive(Clone)]
pub struct Watchdog {
    /// The state, and one condvar for both threads that wait on it: the watchdog's (for a change)
    /// and the spawner's (for a round of kills to end), so every change notifies all.
    shared: std::sync::Arc<(Mutex<Armed>, std::sync::Condvar)>,
}

#[derive(Default)]
struct Armed {
    /// The command, once spawned.
    child: Option<Child>,
    /// CLOCK_BOOTTIME instant; `None`: disarmed.
    deadline: Option<std::time::Duration>,
    /// A takeover: kill at once, whatever deadline is armed later, until disarmed.
    now: bool,
    /// The deadline passed: killing until nothing of the command is left.
    fired: bool,
    /// Nothing of the command is left alive.
    done: bool,
    /// A round of kills runs outside the lock (the watchdog's thread). It signals every child of
    /// ours outside our own process group, so the spawner waits for it to end before forking the
    /// next term's command ([`Watchdog::settle`]): a round for an earlier term, still running when
    /// `--recampaign` wins the next one, must not kill the new command.
    killing: bool,
}

impl Armed {
    /// Whether to kill now.
    fn due(&self, now: std::time::Duration) -> bool {
        self.fired || self.now || self.deadline.is_some_and(|deadline| now >= deadline)
    }
}

impl Watchdog {
    /// How often the armed watchdog reads CLOCK_BOOTTIME (condition-variable timeouts run on the
    /// monotonic clock, which stops during suspend).
    pub const TICK: std::time::Duration = std::time::Duration::from_millis(50);

    /// How often it kills again once fired, until nothing of the command is left.
    pub const KILL_TICK: std::time::Duration = std::time::Duration::from_millis(5);

    /// Starts the thread, disarmed.
    pub fn start() -> io::Result<Watchdog> {
        let watchdog = Watchdog {
            shared: std::sync::Arc::default(),
        };
        let shared = watchdog.shared.clone();
        std::thread::Builder::new()
            .name("lease-exec-watchdog".into())
            .spawn(move || {
                let (lock, wake) = &*shared;
                let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let wait = match (armed.child, armed.deadline) {
                        (Some(child), Some(deadline)) if !armed.done => {
                            let now = crate::clock::boot_time();
                            if armed.due(now) {
                                armed.fired = true;
                                armed.killing = true;
                                // Not under the lock: the runtime's thread arms and disarms
                                // without waiting for /proc. No logging here: stderr may be what
                                // is stuck.
                                drop(armed);
                                kill_all(child);
                                let gone = nothing_left() == Some(true);
                                armed = lock.lock().unwrap_or_else(|e| e.into_inner());
                                armed.killing = false;
                                wake.notify_all();
                                if gone && armed.child == Some(child) && armed.fired {
                                    armed.done = true;
                                    continue;
                                }
                                Some(Self::KILL_TICK)
                            } else {
                                Some((deadline - now).min(Self::TICK))
                            }
                        }
                        _ => None,
                    };
                    armed = match wait {
                        Some(wait) => {
                            wake.wait_timeout(armed, wait)
                                .unwrap_or_else(|e| e.into_inner())
                                .0
                        }
                        None => wake.wait(armed).unwrap_or_else(|e| e.into_inner()),
                    };
                }
            })?;
        Ok(watchdog)
    }

    /// A term's command is about to be spawned: kill it at `deadline` (a CLOCK_BOOTTIME instant),
    /// or at once after [`Watchdog::fire_now`], from the moment the spawner's thread hands its pid
    /// over ([`Watchdog::attach`]). Forgets any earlier command.
    pub fn expect(&self, deadline: std::time::Duration) {
        let (lock, wake) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        *armed = Armed {
            deadline: Some(deadline),
            killing: armed.killing,
            ..Armed::default()
        };
        wake.notify_all();
    }

    /// The command [`Watchdog::expect`]ed exists: from the spawner's thread, right after the exec.
    fn attach(&self, child: Child) {
        let (lock, wake) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        if armed.child != Some(child) {
            armed.child = Some(child);
            armed.fired = false;
            armed.done = false;
        }
        wake.notify_all();
    }

    /// Kill `child` (and its leftovers) at `deadline`, a CLOCK_BOOTTIME instant, unless re-armed
    /// or disarmed before. Once it has fired for `child`, or after [`Watchdog::fire_now`], a later
    /// deadline changes nothing: it kills until nothing is left.
    pub fn arm(&self, child: Child, deadline: std::time::Duration) {
        let (lock, wake) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        if armed.child != Some(child) {
            *armed = Armed {
                killing: armed.killing,
                ..Armed::default()
            };
        }
        armed.child = Some(child);
        armed.deadline = Some(deadline);
        wake.notify_all();
    }

    /// Kill the armed command now, from the watchdog's own thread: for a takeover seen on a thread
    /// that may block right after, so the kill never waits for that thread. A command still being
    /// spawned ([`Watchdog::expect`]) is killed the moment it exists. Nothing happens when nothing
    /// is armed.
    pub fn fire_now(&self) {
        let (lock, wake) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        if armed.deadline.is_some() {
            armed.now = true;
            wake.notify_all();
        }
    }

    /// Bring the kill deadline of the armed (or expected) command forward to `deadline` (a
    /// CLOCK_BOOTTIME instant), never back: for a shortened term seen on a thread that may block
    /// right after. Nothing happens when nothing is armed.
    pub fn tighten(&self, deadline: std::time::Duration) {
        let (lock, wake) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(armed_deadline) = armed.deadline {
            armed.deadline = Some(armed_deadline.min(deadline));
            wake.notify_all();
        }
    }

    /// Stop watching (the command is gone, or was never spawned).
    pub fn disarm(&self) {
        let (lock, wake) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        *armed = Armed {
            killing: armed.killing,
            ..Armed::default()
        };
        wake.notify_all();
    }

    /// Waits until no round of kills is running (see `Armed::killing`): from the spawner's thread,
    /// right before it forks a command. A round takes one pass over `/proc`; should it hang, the
    /// wait ends at `not_after` (CLOCK_BOOTTIME, the spawn rule's deadline), and the check before
    /// exec then refuses to start the command, as for any spawn that comes too late.
    fn settle(&self, not_after: std::time::Duration) {
        let (lock, wake) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        while armed.killing {
            let now = crate::clock::boot_time();
            if now >= not_after {
                return;
            }
            armed = wake
                .wait_timeout(armed, (not_after - now).min(Self::TICK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Whether every child of ours outside our own process group, the ones [`kill_all`] signals, is
/// dead (a zombie at most, or reaped); `None` when `/proc` cannot tell. Then nothing of the command
/// is left: a live descendant's parent is alive too, up to a child of ours (a process's children
/// are re-parented to us when it dies, before it becomes a zombie), unless a subreaper below us
/// took it. The children are read twice, around the check: one re-parented meanwhile, when its
/// parent died, is new in the second reading.
fn nothing_left() -> Option<bool> {
    let own_group = nix::unistd::getpgrp();
    let outside = |children: HashSet<Pid>| -> HashSet<Pid> {
        children
            .into_iter()
            .filter(|&pid| nix::unistd::getpgid(Some(pid)).is_ok_and(|group| group != own_group))
            .collect()
    };
    let before = outside(own_children()?);
    if !before.iter().all(|&pid| is_dead(pid)) {
        return Some(false);
    }
    Some(outside(own_children()?).is_subset(&before))
}

/// Whether `pid` is a zombie or gone, from `/proc/<pid>/stat`.
fn is_dead(pid: Pid) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) => return e.kind() == io::ErrorKind::NotFound,
    };
    // The state follows the command name, which may contain spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| matches!(state, "Z" | "X" | "x"))
}

/// Our direct children, from `/proc/self/task/*/children`. `None` when `/proc` cannot tell: a kernel
/// without those files, or a `/proc` mounted for another PID namespace (`unshare --pid --fork`
/// without `--mount-proc`), whose pids mean nothing to `waitpid` here.
fn own_children() -> Option<HashSet<Pid>> {
    let me = nix::unistd::getpid();
    let proc_self = std::fs::read_link("/proc/self").ok()?;
    if proc_self.to_str()?.parse::<i32>().ok()? != me.as_raw() {
        return None;
    }
    from_task_children().or_else(|| children_by_parent(me))
}

/// Every process whose parent is `parent`, from `/proc/<pid>/stat` (slower than the `children`
/// files, which a kernel without CONFIG_PROC_CHILDREN lacks).
fn children_by_parent(parent: Pid) -> Option<HashSet<Pid>> {
    let mut pids = HashSet::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces) are: state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent.as_raw()) {
            pids.insert(Pid::from_raw(pid));
        }
    }
    Some(pids)
}

/// Our direct children from `/proc/self/task/*/children`, `None` if the kernel has no such files.
fn from_task_children() -> Option<HashSet<Pid>> {
    let mut pids = HashSet::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        // A thread may exit while we scan: skip it. A kernel without CONFIG_PROC_CHILDREN has no
        // such file at all: the caller then scans /proc/<pid>/stat instead.
        let text = match std::fs::read_to_string(task.path().join("children")) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && pids.is_empty() => {
                if task.path().exists() {
                    return None;
                }
                continue;
            }
            Err(_) => continue,
        };
        pids.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(Pid::from_raw),
        );
    }
    Some(pids)
}

/// The signals lease-exec handles, merged into one stream. Registering them replaces the default
/// actions, which matters as PID 1, where signals without a handler are ignored.
pub struct Signals {
    rx: mpsc::UnboundedReceiver<Signal>,
}

impl Signals {
    /// Installs handlers for [`FORWARDED`].
    pub fn install() -> io::Result<Signals> {
        let (tx, rx) = mpsc::unbounded_channel();
        for sig in FORWARDED {
            let mut stream = signal(SignalKind::from_raw(sig as i32))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Signals { rx })
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> Signal {
        match self.rx.recv().await {
            Some(sig) => sig,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spawner_waits_for_a_round_of_kills_of_an_earlier_term() {
        // A round of kills for the last term is running outside the lock when the next term is
        // expected: `expect` keeps it, and the spawner's `settle` returns only once it ended.
        let watchdog = Watchdog {
            shared: std::sync::Arc::default(),
        };
        watchdog.shared.0.lock().unwrap().killing = true;
        watchdog.expect(std::time::Duration::MAX);
        watchdog.disarm();
        let settled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawner = {
            let (watchdog, settled) = (watchdog.clone(), settled.clone());
            std::thread::spawn(move || {
                watchdog.settle(std::time::Duration::MAX);
                settled.store(true, Ordering::SeqCst);
            })
        };
        // The spawner is still waiting while the round runs (a wait with a deadline: it must not
        // have returned within it).
        let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < until {
            assert!(
                !settled.load(Ordering::SeqCst),
                "settled during a round of kills"
            );
            std::thread::yield_now();
        }
        {
            let (lock, wake) = &*watchdog.shared;
            lock.lock().unwrap().killing = false;
            wake.notify_all();
        }
        spawner.join().unwrap();
        assert!(settled.load(Ordering::SeqCst));
        // A round that never ends holds the spawn up only until the spawn rule's deadline.
        watchdog.shared.0.lock().unwrap().killing = true;
        let started = std::time::Instant::now();
        watchdog.settle(crate::clock::boot_time() + std::time::Duration::from_millis(100));
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
    }

    fn touch(marker: &std::path::Path) -> std::process::Command {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!("echo > '{}'", marker.display()));
        command
    }

    /// The spawn rule, checked in the forked child right before exec: past `not_after` (on
    /// CLOCK_BOOTTIME) the command never runs and the spawn says it was late; before it, it runs.
    /// Whatever held lease-exec up between the claim and the spawn (a suspend, a frozen or starved
    /// process), the check is the last thing before exec.
    #[tokio::test]
    async fn the_command_never_starts_past_the_terms_renew_deadline() {
        let dir = std::env::temp_dir().join(format!("lease-exec-spawn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let late = dir.join("late");
        let passed = crate::clock::boot_time() - std::time::Duration::from_millis(1);
        let Err(error) = spawn(touch(&late), passed, None).await else {
            panic!("started past its deadline");
        };
        assert!(is_late(&error), "{error}");
        // Refused before exec (the child reported it through the exec pipe): nothing ran.
        assert!(!late.exists());
        let on_time = dir.join("on-time");
        let ahead = crate::clock::boot_time() + std::time::Duration::from_secs(60);
        let child = spawn(touch(&on_time), ahead, None).await.expect("started");
        let status = nix::sys::wait::waitpid(child.pid, None).unwrap();
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{status:?}"
        );
        assert!(on_time.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
