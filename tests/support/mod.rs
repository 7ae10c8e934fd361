//! Test support: the in-memory API server, a `TestCommand`-style helper that runs the real
//! `lease-exec` binary against it, a worker that records when it runs, and condition polling.
#![allow(dead_code)]

pub mod apiserver;

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

    /// Waits for the worker `pid` to die and `running` to exit 75, and checks that the worker died
    /// before the lease could expire for anyone else: `lease_ns` after the server committed the
    /// last renewal by identity `me`. Returns lease-exec's log.
    pub async fn assert_stopped_in_time(
        &self,
        mut running: Running,
        pid: i32,
        lease_ns: u64,
    ) -> String {
        let mut died_ns = 0;
        wait_for(Duration::from_secs(5), "the worker to die", || {
            if alive(pid) {
                false
            } else {
                died_ns = mono_ns();
                true
            }
        })
        .await;
        let code = running.wait(Duration::from_secs(20)).await;
        let log = running.stderr();
        assert_eq!(code, i32::from(lease_exec::exit::LOST), "log:\n{log}");
        let last = self
            .server
            .last_write_by("me")
            .expect("renewed at least once");
        let expiry = last.at_ns + lease_ns;
        assert!(
            died_ns < expiry,
            "worker died {} ms after the lease could expire for others; log:\n{log}",
            (died_ns - expiry) / 1_000_000
        );
        log
    }

    /// Parsed journal lines.
    pub fn journal_entries(&self) -> Vec<Entry> {
        read_journal(&self.journal())
    }
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

    /// Starts it; stderr goes to a log file.
    pub fn spawn(mut self) -> Running {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.dir.join(format!("lease-exec-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        self.command.stdout(Stdio::null()).stderr(file);
        let child = self.command.spawn().expect("spawn lease-exec");
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
