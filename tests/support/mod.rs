//! Test support: the in-memory API server, a `TestCommand`-style helper that runs the real
//! `lease-exec` binary against it, a worker that records when it runs, and condition polling.
#![allow(dead_code)]

pub mod apiserver;
pub mod kernel;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

#[allow(unused_imports)]
pub use apiserver::{ApiServer, Door, Fault, Mode, mono_ns};
use tokio::time::Instant;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lease-exec");

/// Namespace the tests use.
pub const NS: &str = "default";

/// Short timings for tests: lease 2 s, renew deadline 1 s, retry 250 ms, grace 1 s.
pub const FAST: [&str; 8] = [
    "--lease-duration",
    "2s",
    "--renew-deadline",
    "1s",
    "--retry-period",
    "250ms",
    "--grace-period",
    "1s",
];

/// A server, a scratch directory and a kubeconfig pointing at the server.
pub struct World {
    pub server: ApiServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl World {
    pub async fn start() -> World {
        let server = ApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig(NS)).unwrap();
        let world = World {
            server,
            dir,
            kubeconfig,
        };
        journal_worker();
        world
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Opens a door of the server for one client (see `apiserver::Door`) and writes a kubeconfig
    /// pointing at it; pass that to [`TestCommand::kubeconfig`].
    pub fn door(&self) -> (Door, PathBuf) {
        let door = self.server.door();
        let kubeconfig = self.path(&format!("kubeconfig-door-{}", door.index()));
        std::fs::write(&kubeconfig, door.kubeconfig(NS)).unwrap();
        (door, kubeconfig)
    }

    /// The journaling worker.
    pub fn worker(&self) -> PathBuf {
        journal_worker().to_owned()
    }

    /// The file the workers append start/stop lines to.
    pub fn journal(&self) -> PathBuf {
        self.path("journal")
    }

    /// `lease-exec` with the kubeconfig set and `args`.
    pub fn lease_exec<I, S>(&self, args: I) -> TestCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_UID")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        TestCommand {
            command,
            dir: self.dir.path().to_owned(),
        }
    }

    /// `lease-exec FAST... --identity ID LEASE -- journal_worker JOURNAL RUN_FOR EXIT`.
    pub fn contender(&self, lease: &str, identity: &str, run_for: f64, exit: i32) -> TestCommand {
        let mut options: Vec<&str> = FAST.to_vec();
        options.extend(["--identity", identity, lease]);
        self.worker_command(&options, run_for, exit, &[])
    }

    /// `lease-exec OPTIONS... -- journal_worker JOURNAL RUN_FOR EXIT FLAGS...`: `options` ends
    /// with the lease name; `run_for` < 0 runs forever; `flags` go to the worker (`ignore-term`).
    pub fn worker_command<S: AsRef<str>>(
        &self,
        options: &[S],
        run_for: f64,
        exit: i32,
        flags: &[&str],
    ) -> TestCommand {
        let mut args: Vec<String> = options.iter().map(|o| o.as_ref().to_string()).collect();
        args.extend([
            "--".into(),
            self.worker().display().to_string(),
            self.journal().display().to_string(),
            run_for.to_string(),
            exit.to_string(),
        ]);
        args.extend(flags.iter().map(|f| f.to_string()));
        self.lease_exec(args)
    }

    /// Workers started so far, from the journal.
    pub fn starts(&self) -> Vec<Entry> {
        self.journal_entries()
            .into_iter()
            .filter(|e| e.what == "start")
            .collect()
    }

    /// Waits until the worker has started and its lease-exec has renewed at least once since;
    /// returns the worker's pid.
    pub async fn wait_leading(&self) -> i32 {
        let limit = Duration::from_secs(20);
        wait_for(limit, "the worker to start", || !self.starts().is_empty()).await;
        let renewed = self.server.writes().len();
        wait_for(limit, "a renewal", || self.server.writes().len() > renewed).await;
        self.starts()[0].pid
    }

    /// Waits for the worker `pid` to die and `running` to exit 75, and checks that the worker was
    /// gone, by the kernel's exit stamp, by `R + kill_by` (see [`Timing`]), `R` being the arrival
    /// of the last successful write by identity `me` ([`World::last_renewal`]): for a term that
    /// ends at once (taken, released by someone else) as much as for one that runs out. Returns
    /// lease-exec's log.
    pub async fn assert_stopped_in_time(
        &self,
        running: Running,
        pid: i32,
        timing: &Timing,
    ) -> String {
        let (stop, log) = self.stop_of(running, pid, "me").await;
        let kill_by = stop.renewal_ns + timing.kill_by_ns();
        assert!(
            stop.exit_ns <= kill_by + KILL_LATE_NS,
            "worker exited {} ms after R + kill_by (R + {} ms; margin {} ms); {stop:?}; log:\n{log}",
            (stop.exit_ns as i64 - kill_by as i64) / 1_000_000,
            timing.kill_by_ns() / 1_000_000,
            timing.margin_ns() / 1_000_000,
        );
        log
    }

    /// Like [`World::assert_stopped_in_time`], for a leader whose renewals fail until the renew
    /// deadline, and pins both sides of each promise (README, "lease semantics and timing rules"),
    /// from `R` as in [`World::last_renewal`]:
    /// - SIGTERM (the worker's `ignored` or `stop` line) at `R + renew-deadline`: not before (less
    ///   [`REQUEST_LEAD_NS`]), and at most [`TERM_LATE_NS`] after;
    /// - the kernel's exit stamp at [`Timing::kill_after_loss_ns`]: the grace period from the
    ///   SIGTERM, cut short at `R + kill_by`; not before (less [`REQUEST_LEAD_NS`]), at most
    ///   [`KILL_LATE_NS`] after. A worker that stops at SIGTERM is only checked for SIGTERM.
    ///
    /// So a kill deadline without its margin (at `R + lease-duration`) fails, and so does a
    /// SIGTERM that ignores the renew deadline. Returns lease-exec's log.
    pub async fn assert_lost_on_schedule(
        &self,
        running: Running,
        pid: i32,
        timing: &Timing,
    ) -> String {
        let (stop, log) = self.stop_of(running, pid, "me").await;
        let ms = |ns: i64| ns as f64 / 1e6;
        let term_at = stop.renewal_ns + timing.renew_deadline_ns();
        let term_ns = stop
            .term_ns
            .unwrap_or_else(|| panic!("the worker noted no SIGTERM; {stop:?}; log:\n{log}"));
        let late = term_ns as i64 - term_at as i64;
        assert!(
            -(REQUEST_LEAD_NS as i64) <= late && late <= TERM_LATE_NS as i64,
            "SIGTERM {:+.1} ms from R + renew deadline (allowed {:+.1}..{:+.1}); {stop:?}; log:\n{log}",
            ms(late),
            -ms(REQUEST_LEAD_NS as i64),
            ms(TERM_LATE_NS as i64),
        );
        eprintln!(
            "SIGTERM at R + renew deadline {:+.1} ms; exit at R + {} ms {:+.1} ms",
            ms(late),
            timing.kill_after_loss_ns() / 1_000_000,
            ms(stop.exit_ns as i64 - (stop.renewal_ns + timing.kill_after_loss_ns()) as i64)
        );
        if stop.ignored {
            let kill_at = stop.renewal_ns + timing.kill_after_loss_ns();
            let late = stop.exit_ns as i64 - kill_at as i64;
            assert!(
                -(REQUEST_LEAD_NS as i64) <= late && late <= KILL_LATE_NS as i64,
                "worker exited {:+.1} ms from R + {} ms (allowed {:+.1}..{:+.1}; kill_by is R + {} ms, \
                 the lease expires at R + {} ms); {stop:?}; log:\n{log}",
                ms(late),
                timing.kill_after_loss_ns() / 1_000_000,
                -ms(REQUEST_LEAD_NS as i64),
                ms(KILL_LATE_NS as i64),
                timing.kill_by_ns() / 1_000_000,
                timing.lease.as_millis(),
            );
        } else {
            // A worker that stops at SIGTERM: its exit, by the kernel's stamp, still comes before
            // the kill deadline (so before the Lease can expire for anyone else), not only its
            // `stop` line.
            let kill_by = stop.renewal_ns + timing.kill_by_ns();
            assert!(
                stop.exit_ns <= kill_by + KILL_LATE_NS,
                "worker exited {:+.1} ms from R + kill_by (R + {} ms; the lease expires at R + {} \
                 ms); {stop:?}; log:\n{log}",
                ms(stop.exit_ns as i64 - kill_by as i64),
                timing.kill_by_ns() / 1_000_000,
                timing.lease.as_millis(),
            );
        }
        log
    }

    /// Waits for the worker `pid` to die and `running` to exit 75; what the server, the worker's
    /// journal and the kernel saw of the end of `holder`'s term.
    pub async fn stop_of(&self, mut running: Running, pid: i32, holder: &str) -> (Stop, String) {
        let kernel = kernel();
        let started_ns = self
            .starts()
            .iter()
            .find(|e| e.pid == pid)
            .map(|e| e.at_ns)
            .expect("the worker journaled its start");
        let mut exit_ns = None;
        let exited = wait_for_or(Duration::from_secs(10), || {
            exit_ns = kernel.exit_of(pid as u32, started_ns);
            exit_ns.is_some()
        })
        .await;
        assert!(
            exited,
            "no exit of worker {pid} from the kernel within 10 s (alive: {}; the proc connector \
             must be started, with support::kernel(), before the worker exits)",
            alive(pid)
        );
        let code = running.wait(Duration::from_secs(20)).await;
        let log = running.stderr();
        assert_eq!(code, i32::from(lease_exec::exit::LOST), "log:\n{log}");
        let entries = self.journal_entries();
        let noted = |what: &str| {
            entries
                .iter()
                .find(|e| e.pid == pid && e.what == what)
                .map(|e| e.at_ns)
        };
        let ignored = noted("ignored");
        let stop = Stop {
            renewal_ns: self.last_renewal(holder).1,
            term_ns: ignored.or(noted("stop")),
            ignored: ignored.is_some(),
            exit_ns: exit_ns.unwrap(),
        };
        (stop, log)
    }

    /// The last successful write whose stored holder is `holder`, and when its request arrived
    /// (CLOCK_MONOTONIC ns): an upper bound of lease-exec's `R`, the start of that request on
    /// its own clock, and a tighter one than the commit (a slow server answers between the two).
    pub fn last_renewal(&self, holder: &str) -> (apiserver::Write, u64) {
        let write = self
            .server
            .last_write_by(holder)
            .unwrap_or_else(|| panic!("no write by {holder}"));
        let arrived_ns = self.arrival_ns(&write);
        (write, arrived_ns)
    }

    /// When the request of a committed write arrived at the server (CLOCK_MONOTONIC ns): no later
    /// than the commit, and after whatever its sender did before sending it.
    pub fn arrival_ns(&self, write: &apiserver::Write) -> u64 {
        let name = write.object["metadata"]["name"]
            .as_str()
            .unwrap_or_default();
        let path_ok = |path: &str| match write.verb {
            "create" => path.ends_with("/leases"),
            _ => path.ends_with(&format!("/leases/{name}")),
        };
        let seen = self
            .server
            .seen()
            .into_iter()
            .rev()
            .find(|s| s.verb == write.verb && s.at <= write.at && path_ok(&s.path))
            .expect("the request of a committed write");
        instant_ns(write, seen.at)
    }

    /// Every journaling worker of this World as the kernel saw it: [`kernel_runs_in`] its
    /// journal.
    pub async fn kernel_runs(&self) -> Vec<Run> {
        kernel_runs_in(&self.journal()).await
    }

    /// Parsed journal lines.
    pub fn journal_entries(&self) -> Vec<Entry> {
        read_journal(&self.journal())
    }
}

/// Every journaling worker that wrote to `journal` as the kernel saw it (see [`kernel`]), by exec
/// time; call once all have exited. Fails, saying why, when a worker that journaled its start has
/// no kernel span around that stamp, when an exit has not arrived within a few seconds, or when the
/// kernel's socket overflowed.
pub async fn kernel_runs_in(journal: &Path) -> Vec<Run> {
    let kernel = kernel();
    let journal_arg = journal.display().to_string();
    let ours = || -> Vec<kernel::Span> {
        kernel
            .spans()
            .into_iter()
            .filter(|s| s.args.get(1) == Some(&journal_arg))
            .collect()
    };
    let mut open = Vec::new();
    wait_for_or(Duration::from_secs(5), || {
        open = ours().into_iter().filter(|s| s.exit_ns.is_none()).collect();
        open.is_empty()
    })
    .await;
    assert!(
        open.is_empty(),
        "no exit from the kernel for workers {:?} (alive: {:?}); datagrams lost: {}",
        open.iter().map(|s| s.pid).collect::<Vec<_>>(),
        open.iter().map(|s| alive(s.pid as i32)).collect::<Vec<_>>(),
        kernel.lost()
    );
    assert_eq!(
        kernel.lost(),
        0,
        "the proc connector's socket overflowed: some exec or exit is missing"
    );
    let mut spans = ours();
    let starts: Vec<Entry> = read_journal(journal)
        .into_iter()
        .filter(|e| e.what == "start")
        .collect();
    for start in &starts {
        if spans
            .iter()
            .any(|s| s.pid == start.pid as u32 && s.contains(start.at_ns))
        {
            continue;
        }
        // Gone before /proc could be read at its exec: the journal says it was a worker.
        match kernel.span_at(start.pid as u32, start.at_ns) {
            Some(span) if span.exit_ns.is_some() => spans.push(span),
            other => panic!(
                "worker pid {} journaled its start at {} ns, but the kernel reported no exec \
                 and exit of it around then ({other:?})",
                start.pid, start.at_ns
            ),
        }
    }
    spans.sort_by_key(|s| s.exec_ns);
    spans
        .into_iter()
        .map(|span| {
            let entry = starts
                .iter()
                .find(|e| e.pid == span.pid as i32 && span.contains(e.at_ns));
            let pick = |key: &str, journaled: Option<&String>| {
                span.env(key)
                    .map(str::to_string)
                    .or_else(|| journaled.cloned())
                    .filter(|v| v != "-")
            };
            Run {
                pid: span.pid as i32,
                exec_ns: span.exec_ns,
                exit_ns: span.exit_ns.expect("checked above"),
                lease: pick("LEASE_EXEC_HELD_LEASE", entry.map(|e| &e.lease)),
                identity: pick("LEASE_EXEC_HELD_IDENTITY", entry.map(|e| &e.identity)),
                transitions: pick("LEASE_EXEC_TRANSITIONS", entry.map(|e| &e.transitions))
                    .and_then(|t| t.parse().ok()),
                journaled_ns: entry.map(|e| e.at_ns),
            }
        })
        .collect()
}

/// One line of the worker journal.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub what: String,
    pub pid: i32,
    pub at_ns: u64,
    pub identity: String,
    pub transitions: String,
    /// The Lease its lease-exec held (`LEASE_EXEC_HELD_LEASE`): the slot, with `--holders`.
    pub lease: String,
}

pub fn read_journal(path: &Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Entry {
                what: f.first()?.to_string(),
                pid: f.get(1)?.parse().ok()?,
                at_ns: f.get(2)?.parse().ok()?,
                identity: f.get(3).unwrap_or(&"").to_string(),
                transitions: f.get(4).unwrap_or(&"").to_string(),
                lease: f.get(5).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The journaling worker (`examples/journal_worker.rs`): stamps `start` with CLOCK_MONOTONIC first
/// thing after exec, and `stop` immediately before it exits. Built once per test binary, so that a
/// `cargo test --test X` that did not build the examples still finds it fresh.
pub fn journal_worker() -> &'static Path {
    static WORKER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    WORKER.get_or_init(|| {
        let path = Path::new(BIN)
            .parent()
            .expect("the binary's directory")
            .join("examples/journal_worker");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/journal_worker.rs");
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        // `cargo test` builds the examples first; a `cargo test --test X` may not have.
        if modified(&path).is_none() || modified(&path) < modified(&source) {
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--example", "journal_worker"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo build --example journal_worker");
            assert!(status.success(), "cannot build the journaling worker");
        }
        assert!(path.exists(), "{} missing", path.display());
        path
    })
}

/// Builder for a `lease-exec` run.
pub struct TestCommand {
    pub command: tokio::process::Command,
    dir: PathBuf,
}

impl TestCommand {
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Points it at another kubeconfig (a door's, see [`World::door`]).
    pub fn kubeconfig(self, path: &Path) -> Self {
        self.env("KUBECONFIG", path)
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.command.env_remove(key);
        self
    }

    /// A new log file name.
    fn next_log(&self) -> PathBuf {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!("lease-exec-{n}.log"))
    }

    /// Starts it; stderr goes to a log file.
    pub fn spawn(mut self) -> Running {
        let log = self.next_log();
        let file = std::fs::File::create(&log).unwrap();
        self.command.stdout(Stdio::null()).stderr(file);
        let child = self.command.spawn().expect("spawn lease-exec");
        Running { child, log }
    }

    /// Starts it with stderr on a pipe that nobody reads until `release` completes (a stuck log
    /// driver, `lease-exec ... 2>&1 | less`): once the pipe is full, lease-exec's next log line
    /// blocks. Then the pipe is drained into the log file. Runs on the test's runtime.
    pub fn spawn_with_stderr_held(
        mut self,
        release: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Running {
        let log = self.next_log();
        std::fs::File::create(&log).unwrap();
        self.command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = self.command.spawn().expect("spawn lease-exec");
        let mut pipe = child.stderr.take().expect("piped stderr");
        let file = log.clone();
        tokio::spawn(async move {
            release.await;
            if let Ok(mut out) = tokio::fs::File::create(&file).await {
                let _ = tokio::io::copy(&mut pipe, &mut out).await;
            }
        });
        Running { child, log }
    }

    /// Runs it to completion with a deadline; returns the exit code and stderr.
    pub async fn run(self, limit: Duration) -> (i32, String) {
        let mut running = self.spawn();
        let code = running.wait(limit).await;
        (code, running.stderr())
    }
}

/// A running `lease-exec`.
pub struct Running {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id().expect("still running") as i32
    }

    /// Waits for exit; panics with the log after `limit`. Returns the exit code (128+N for a
    /// signal death).
    pub async fn wait(&mut self, limit: Duration) -> i32 {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => {
                use std::os::unix::process::ExitStatusExt;
                status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
            }
            Ok(Err(e)) => panic!("wait: {e}"),
            Err(_) => panic!(
                "lease-exec still running after {limit:?}; log:\n{}",
                self.stderr()
            ),
        }
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    pub fn stderr(&self) -> String {
        // Lossy: a command may write bytes that are not UTF-8 to the shared stderr.
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

/// Polls `condition` every 10 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks `condition` every 10 ms for `duration`, for "this keeps holding" where [`wait_for`] is
/// for "this comes to hold". `condition` says what is wrong when it does not hold; the first such
/// answer ends the check, as `Err` with how long it held.
pub async fn holds_for(
    duration: Duration,
    mut condition: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let start = Instant::now();
    let end = start + duration;
    loop {
        if let Err(why) = condition() {
            return Err(format!(
                "{why}, {:?} into the {duration:?} it had to hold",
                start.elapsed()
            ));
        }
        if Instant::now() >= end {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a process with this pid is running: it exists and is not a zombie (a zombie has
/// stopped running; whoever inherited it may reap it late).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some(Some('Z' | 'X')) | None)
        }
        Err(_) => false,
    }
}

/// Watches `pid` (any process, not only a child) through a pidfd, from a thread that wakes the
/// moment the process is gone; the thread returns that moment on CLOCK_MONOTONIC. The pidfd is
/// open before this returns, so the death cannot be missed.
pub fn death_watch(pid: i32) -> std::thread::JoinHandle<u64> {
    use nix::libc;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is
    // passed.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        raw >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a descriptor just returned to us and owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    std::thread::spawn(move || {
        // Best effort: a real-time thread is woken ahead of lease-exec and the test server, so the
        // moment it notes comes as early as the machine allows (a late note could only make a
        // right order look wrong, never the reverse).
        let param = libc::sched_param { sched_priority: 10 };
        // SAFETY: `param` is a valid sched_param for the duration of the call.
        let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `poll` points to one valid pollfd, and its descriptor stays open meanwhile.
        while unsafe { libc::poll(&mut poll, 1, -1) } != 1 {}
        mono_ns()
    })
}

/// Running intervals `(start_ns, stop_ns)` by pid; `None` stop when the worker never wrote one.
pub fn intervals(entries: &[Entry]) -> Vec<(i32, u64, Option<u64>)> {
    let mut out: Vec<(i32, u64, Option<u64>)> = Vec::new();
    for e in entries {
        match e.what.as_str() {
            "start" => out.push((e.pid, e.at_ns, None)),
            "stop" => {
                if let Some(i) = out.iter_mut().rev().find(|i| i.0 == e.pid && i.2.is_none()) {
                    i.2 = Some(e.at_ns);
                }
            }
            _ => {}
        }
    }
    out
}

/// Running intervals `(pid, start_ns, stop_ns)` sorted by start. A worker that wrote no `stop`
/// line is closed at `death(pid)` if known, else at `fallback` (a time known to be after every
/// worker died): later than the real death, so overlaps can be over-reported, never hidden.
pub fn closed_spans(
    entries: &[Entry],
    death: impl Fn(i32) -> Option<u64>,
    fallback: u64,
) -> Vec<(i32, u64, u64)> {
    let mut spans: Vec<(i32, u64, u64)> = intervals(entries)
        .into_iter()
        .map(|(pid, start, stop)| (pid, start, stop.or_else(|| death(pid)).unwrap_or(fallback)))
        .collect();
    spans.sort_by_key(|s| s.1);
    spans
}

/// The first two spans that overlap, if any.
pub fn first_overlap(spans: &[(i32, u64, u64)]) -> Option<[(i32, u64, u64); 2]> {
    spans
        .windows(2)
        .find(|pair| pair[1].1 < pair[0].2)
        .map(|pair| [pair[0], pair[1]])
}

/// The lease-exec logs in `dir` that mention any of `pids`, for a failure message.
pub fn logs_mentioning(dir: &Path, pids: &[i32]) -> String {
    let mut out = String::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !(name.starts_with("lease-exec-") && name.ends_with(".log")) {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap_or_default()).into_owned();
        if pids.iter().any(|p| text.contains(&format!("pid={p} "))) {
            out.push_str(&format!("--- {name}\n{text}"));
        }
    }
    out
}

/// Asserts no two spans overlap; `context` goes into the failure message.
pub fn assert_no_overlap(spans: &[(i32, u64, u64)], context: &dyn std::fmt::Display) {
    for pair in spans.windows(2) {
        assert!(
            pair[1].1 >= pair[0].2,
            "workers overlap: pid {} ran {}..{}, pid {} started at {} ({} µs overlap); {context}",
            pair[0].0,
            pair[0].1,
            pair[0].2,
            pair[1].0,
            pair[1].1,
            (pair[0].2 - pair[1].1) / 1000
        );
    }
}

/// A port nobody else takes before lease-exec binds it (see `apiserver::free_port`).
pub fn free_port() -> u16 {
    apiserver::free_port()
}

/// `GET path` over HTTP/1.0; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The proc connector, following the journaling worker (see [`kernel::Kernel`]): opened once per
/// test binary, on first use. Call it before starting the workers whose exec it must see (exits
/// of processes that started earlier are seen too). Panics, saying why, if it cannot be opened:
/// these tests take worker start and end times from the kernel, with no fallback.
pub fn kernel() -> &'static kernel::Kernel {
    static KERNEL: std::sync::OnceLock<kernel::Kernel> = std::sync::OnceLock::new();
    KERNEL.get_or_init(|| match kernel::Kernel::start(journal_worker()) {
        Ok(kernel) => kernel,
        Err(e) => panic!(
            "cannot subscribe to the proc connector (netlink NETLINK_CONNECTOR, CN_IDX_PROC): {e}. \
             Worker exec and exit times come from the kernel's process events, which need root \
             (CAP_NET_ADMIN) in the initial network namespace: run these tests as root, as CI does"
        ),
    })
}

/// A journaling worker's run as the kernel stamped it, with what lease-exec gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub pid: i32,
    /// The exec of the worker binary (CLOCK_MONOTONIC ns).
    pub exec_ns: u64,
    /// Its exit (CLOCK_MONOTONIC ns).
    pub exit_ns: u64,
    /// `LEASE_EXEC_HELD_LEASE` as the exec gave it (else as journaled).
    pub lease: Option<String>,
    /// `LEASE_EXEC_HELD_IDENTITY`, likewise.
    pub identity: Option<String>,
    /// `LEASE_EXEC_TRANSITIONS`, likewise: the fencing token.
    pub transitions: Option<i64>,
    /// Its own `start` stamp, if it lived to write one.
    pub journaled_ns: Option<u64>,
}

impl Run {
    /// `(pid, start, end)`, as [`first_overlap`] and [`assert_no_overlap`] take spans.
    pub fn span(&self) -> (i32, u64, u64) {
        (self.pid, self.exec_ns, self.exit_ns)
    }
}

/// Every pair of runs of one Lease that overlap by the kernel's stamps: the later one's exec came
/// before the earlier one's exit (back to back, exit == exec, is no overlap). Runs are grouped by
/// `LEASE_EXEC_HELD_LEASE` (the slot, with `--holders`), so runs of different slots may overlap.
/// A run starting inside an earlier one is paired with the one of that Lease that ends last so far.
pub fn overlaps(runs: &[Run]) -> Vec<[Run; 2]> {
    let mut by_lease: std::collections::BTreeMap<Option<&str>, Vec<&Run>> = Default::default();
    for run in runs {
        by_lease.entry(run.lease.as_deref()).or_default().push(run);
    }
    let mut found = Vec::new();
    for runs in by_lease.values_mut() {
        runs.sort_by_key(|r| r.exec_ns);
        let mut latest: Option<&Run> = None;
        for &run in runs.iter() {
            if let Some(before) = latest.filter(|before| run.exec_ns < before.exit_ns) {
                found.push([before.clone(), run.clone()]);
            }
            if latest.is_none_or(|l| run.exit_ns > l.exit_ns) {
                latest = Some(run);
            }
        }
    }
    found
}

/// Asserts that no two runs of one Lease overlap by the kernel's stamps ([`overlaps`]); `context`
/// goes into the failure message.
pub fn assert_one_at_a_time(runs: &[Run], context: &dyn std::fmt::Display) {
    if let Some([a, b]) = overlaps(runs).first() {
        panic!(
            "workers overlap by the kernel's stamps: pid {} ran {}..{} ns, pid {} exec'd at {} ns \
             ({:.3} ms overlap; lease {:?}); {context}",
            a.pid,
            a.exec_ns,
            a.exit_ns,
            b.pid,
            b.exec_ns,
            (a.exit_ns.min(b.exit_ns) - b.exec_ns) as f64 / 1e6,
            b.lease,
        );
    }
}

/// The most runs running at one moment by the kernel's stamps, of any Lease (a run that exits at
/// the nanosecond another execs does not count with it), and a moment when that many ran.
pub fn most_at_once(runs: &[Run]) -> (usize, u64) {
    // Exits sort before execs at the same instant.
    let mut edges: Vec<(u64, bool)> = runs
        .iter()
        .flat_map(|r| [(r.exec_ns, true), (r.exit_ns, false)])
        .collect();
    edges.sort();
    let (mut now, mut most, mut at) = (0usize, 0usize, 0u64);
    for (t, exec) in edges {
        if exec {
            now += 1;
            if now > most {
                (most, at) = (now, t);
            }
        } else {
            now -= 1;
        }
    }
    (most, at)
}

/// The timings a test gave lease-exec, and the deadlines the README promises from them, computed
/// here from the README's formulas rather than taken from lease-exec's code.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub grace: Duration,
}

/// The timing of [`FAST`].
pub const FAST_TIMING: Timing = Timing {
    lease: Duration::from_secs(2),
    renew_deadline: Duration::from_secs(1),
    grace: Duration::from_secs(1),
};

impl Timing {
    /// The safety margin: 200 ms + 2% of the lease duration.
    pub fn margin_ns(&self) -> u64 {
        200_000_000 + self.lease.as_nanos() as u64 / 50
    }

    /// The command is SIGKILLed by `R +` this: lease duration − margin.
    pub fn kill_by_ns(&self) -> u64 {
        self.lease.as_nanos() as u64 - self.margin_ns()
    }

    pub fn renew_deadline_ns(&self) -> u64 {
        self.renew_deadline.as_nanos() as u64
    }

    /// When, after `R`, a leader whose renewals failed SIGKILLs a command that ignores SIGTERM:
    /// the grace period from the SIGTERM at the renew deadline, cut short at `kill_by`.
    pub fn kill_after_loss_ns(&self) -> u64 {
        (self.renew_deadline_ns() + self.grace.as_nanos() as u64).min(self.kill_by_ns())
    }
}

/// How much earlier than the server saw it lease-exec may have started a request (its `R`): the
/// clock read, building the request and the trip over loopback on a busy 2-core machine. The
/// early side of every timing check.
pub const REQUEST_LEAD_NS: u64 = 50_000_000;
/// How late SIGTERM may reach the worker after the renew deadline: timer slack, signal delivery,
/// the worker's 1 ms poll and journal write.
pub const TERM_LATE_NS: u64 = 300_000_000;
/// How late after its deadline the kernel may see a SIGKILLed worker exit (the watchdog's wake-up
/// and the worker's teardown on a loaded 2-core machine; a few ms when idle). Well below the
/// margin (240 ms with FAST), so a kill at `R + lease-duration` fails.
pub const KILL_LATE_NS: u64 = 100_000_000;

/// What the end of a term looked like from outside (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    /// `R`'s upper bound: when the server saw the request of the holder's last successful write.
    pub renewal_ns: u64,
    /// When the worker noted SIGTERM: its `ignored` line, else its `stop` line.
    pub term_ns: Option<u64>,
    /// Whether it ignored SIGTERM (so its exit is the SIGKILL).
    pub ignored: bool,
    /// The kernel's exit stamp.
    pub exit_ns: u64,
}

/// Polls `condition` every 10 ms until it holds or `limit` passes; whether it held.
pub async fn wait_for_or(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The time stamp a text log line of lease-exec starts with (wall clock, µs, truncated) on
/// CLOCK_MONOTONIC ns: no later than the moment lease-exec read its clock for that line.
pub fn mono_ns_of_log_line(line: &str) -> u64 {
    use nix::time::{ClockId, clock_gettime};
    let stamp = line
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .unwrap_or_else(|| panic!("no time stamp: {line}"));
    let real = clock_gettime(ClockId::CLOCK_REALTIME).unwrap();
    let mono = mono_ns() as i128;
    let real_ns = real.tv_sec() as i128 * 1_000_000_000 + real.tv_nsec() as i128;
    (stamp.as_nanosecond() - (real_ns - mono)) as u64
}

/// A server-side `Instant` (a request's arrival, say) on CLOCK_MONOTONIC ns, through a write that
/// carries both stamps of one moment.
pub fn instant_ns(reference: &apiserver::Write, at: std::time::Instant) -> u64 {
    if at >= reference.at {
        reference.at_ns + at.duration_since(reference.at).as_nanos() as u64
    } else {
        reference.at_ns - reference.at.duration_since(at).as_nanos() as u64
    }
}
