//! The real tier's control plane: `testenv/cluster` (embedded etcd, kube-apiserver v1.37.2 and a
//! garbage collector), `testenv/bin/kubectl` and `testenv/bin/contender`, and a per-test
//! namespace with its own scratch directory.
//!
//! - `LEASE_EXEC_TESTENV=DIR`: use the control plane already running in DIR (`.ci/run` starts
//!   one). Otherwise the first test starts one in `target/tmp/real-tier/` and a watchdog process
//!   stops it when the test binary exits, whatever way it exits.
//! - `LEASE_EXEC_REAL_TIER=required`: a control plane that cannot be built or started fails the
//!   tests. Unset, the tests print `SKIPPED (real tier): <reason>` (past the output capture) and
//!   return. `LEASE_EXEC_REAL_TIER=off` skips them on purpose, just as loudly.
//!
//! Tests that stop the API server or compact etcd take a [`Cluster::dedicated`] one.
//!
//! Included by `tests/real.rs` beside `mod support` (`#[path = "support/cluster.rs"] mod cluster`),
//! so that the other test binaries, which never start a control plane, do not compile it.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::support::{BIN, Entry, Running, journal_worker, read_journal, wait_for};

/// Directory of an already running control plane.
pub const ENV_DIR: &str = "LEASE_EXEC_TESTENV";
/// `required`: a missing control plane is a failure; `off`: skip the real tier.
pub const ENV_TIER: &str = "LEASE_EXEC_REAL_TIER";

/// Timings of the real tier: lease 4 s, renew deadline 3 s, retry 500 ms, grace 1 s. Looser than
/// the in-memory tier's, for a real API server on a loaded 2-core machine.
pub const TIMING: [&str; 8] = [
    "--lease-duration",
    "4s",
    "--renew-deadline",
    "3s",
    "--retry-period",
    "500ms",
    "--grace-period",
    "1s",
];
pub const LEASE_SECONDS: u64 = 4;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn script() -> PathBuf {
    repo().join("testenv/cluster")
}

pub fn kubectl_bin() -> PathBuf {
    repo().join("testenv/bin/kubectl")
}

pub fn contender_bin() -> PathBuf {
    repo().join("testenv/bin/contender")
}

/// Where this binary's own clusters live.
pub fn clusters_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("real-tier")
}

/// Writes a line to the process's stderr directly, past libtest's output capture, so that it
/// shows in a plain `cargo test` run.
pub fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("real tier")
        .to_string()
}

fn required() -> bool {
    std::env::var(ENV_TIER).is_ok_and(|v| v == "required")
}

/// What every test calls first: `None` when the real tier is skipped (said loudly), a panic when
/// it is required but unavailable.
pub fn available<T>(found: Result<T, String>) -> Option<T> {
    match found {
        Ok(t) => Some(t),
        Err(reason) if required() => {
            panic!("{ENV_TIER}=required, but the control plane is unavailable: {reason}")
        }
        Err(reason) => {
            report(&format!(
                "SKIPPED (real tier): {}: {reason} (set {ENV_TIER}=required to make this a failure)",
                test_name()
            ));
            None
        }
    }
}

pub fn deliberately_off() -> Option<String> {
    std::env::var(ENV_TIER)
        .is_ok_and(|v| v == "off")
        .then(|| format!("{ENV_TIER}=off"))
}

/// A running control plane.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// Ours to stop: the dir to `down` on drop (dedicated clusters), and the watchdog's stdin,
    /// whose closing (at our exit, even a SIGKILL) makes it run `cluster down`.
    down_on_drop: bool,
    _watchdog: Option<std::process::ChildStdin>,
}

/// Output of a kubectl run.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Panics with the output unless kubectl succeeded; returns stdout.
    pub fn expect(self, what: &str) -> String {
        assert!(
            self.ok,
            "kubectl {what} failed:\n{}{}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    pub fn json(self, what: &str) -> serde_json::Value {
        let text = self.expect(what);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("kubectl {what}: {e}: {text}"))
    }
}

impl Cluster {
    /// The cluster shared by every test of this binary.
    pub async fn shared() -> Option<&'static Cluster> {
        static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
        let found = tokio::task::spawn_blocking(|| SHARED.get_or_init(init_shared).as_ref())
            .await
            .expect("cluster start-up panicked");
        available(found.map_err(|e| e.clone()))
    }

    /// A cluster of the calling test's own, for tests that stop its API server or compact its
    /// etcd; `flags` go to kube-apiserver. Stopped when dropped.
    pub async fn dedicated(name: &str, flags: &[&str]) -> Option<Cluster> {
        let name = format!("{name}-{}", std::process::id());
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let found = tokio::task::spawn_blocking(move || {
            deliberately_off().map_or(Ok(()), Err)?;
            start(&clusters_root().join(name), &flags, true)
        })
        .await
        .expect("cluster start-up panicked");
        available(found)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig for `token` with `namespace` as its context's namespace.
    pub fn kubeconfig_text(&self, namespace: &str, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: testenv\n  cluster:\n    server: {}\n    certificate-authority: {}\ncontexts:\n- name: testenv\n  context:\n    cluster: testenv\n    namespace: {namespace}\n    user: u\ncurrent-context: testenv\nusers:\n- name: u\n  user:\n    token: {token}\n",
            self.server(),
            self.ca().display()
        )
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin-token"))
            .expect("admin-token")
            .trim()
            .to_string()
    }

    /// `kubectl --kubeconfig ADMIN ARGS` with `stdin`, bounded by 60 s.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Out {
        kubectl(&self.kubeconfig(), args, stdin).await
    }

    /// `testenv/cluster COMMAND DIR ARGS`; panics on failure. Returns stdout.
    pub async fn control(&self, command: &str, args: &[&str]) -> String {
        let out = tokio::process::Command::new(script())
            .arg(command)
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run testenv/cluster");
        assert!(
            out.status.success(),
            "cluster {command} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.down_on_drop {
            let _ = std::process::Command::new(script())
                .arg("down")
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status();
        }
    }
}

fn init_shared() -> Result<Cluster, String> {
    deliberately_off().map_or(Ok(()), Err)?;
    if let Some(dir) = std::env::var_os(ENV_DIR) {
        let dir = PathBuf::from(dir);
        let port = std::fs::read_to_string(dir.join("apiserver.port"))
            .map_err(|e| format!("{ENV_DIR}={}: no apiserver.port: {e}", dir.display()))?;
        let port = port
            .trim()
            .parse()
            .map_err(|e| format!("{ENV_DIR}={}: apiserver.port: {e}", dir.display()))?;
        let cluster = Cluster {
            dir,
            port,
            down_on_drop: false,
            _watchdog: None,
        };
        let ready = std::process::Command::new(kubectl_bin())
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .args(["get", "--raw", "/readyz"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", kubectl_bin().display()))?;
        if !ready.status.success() {
            return Err(format!(
                "{ENV_DIR}={}: the API server is not ready: {}",
                cluster.dir.display(),
                String::from_utf8_lossy(&ready.stderr).trim()
            ));
        }
        return Ok(cluster);
    }
    down_stale();
    start(
        &clusters_root().join(format!("shared-{}", std::process::id())),
        &[],
        false,
    )
}

/// Stops clusters left by test binaries that died with their watchdog (dirs `*-PID` whose PID is
/// gone).
pub fn down_stale() {
    let Ok(entries) = std::fs::read_dir(clusters_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::process::Command::new(script())
                .arg("down")
                .arg(entry.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `testenv/cluster up DIR -- FLAGS` (building testenv/bin if needed) with a watchdog.
fn start(dir: &Path, flags: &[String], down_on_drop: bool) -> Result<Cluster, String> {
    let go = std::process::Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !go.is_ok_and(|s| s.success()) {
        return Err("`go` is not on PATH: testenv/bin cannot be built (install Go 1.26, or set LEASE_EXEC_TESTENV to a running testenv/cluster directory)".into());
    }
    std::fs::create_dir_all(clusters_root()).map_err(|e| e.to_string())?;
    let _ = std::process::Command::new(script())
        .arg("down")
        .arg(dir)
        .stderr(Stdio::null())
        .status();
    // The watchdog first: if we die during `up`, what was started is stopped all the same. It
    // runs in its own process group, so a Ctrl-C that kills the tests does not kill it.
    let watchdog = {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"read _; exec "$0" down "$1" >/dev/null 2>&1"#)
            .arg(script())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the watchdog: {e}"))?;
        child.stdin.take()
    };
    let started = std::time::Instant::now();
    let mut up = std::process::Command::new(script());
    up.arg("up").arg(dir);
    if !flags.is_empty() {
        up.arg("--").args(flags);
    }
    let out = up
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!("`testenv/cluster up` failed: {last}"));
    }
    let port = std::fs::read_to_string(dir.join("apiserver.port"))
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|e| format!("apiserver.port: {e}"))?;
    report(&format!(
        "real tier: control plane {} up in {:.1}s (port {port})",
        dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Cluster {
        dir: dir.to_owned(),
        port,
        down_on_drop,
        _watchdog: watchdog,
    })
}

/// `kubectl --kubeconfig K ARGS`, bounded by 60 s.
pub async fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run testenv/bin/kubectl");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} still running after 60s"))
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Times (seconds since the epoch) of the lines of a log that contain `needle`; lease-exec's and
/// the contender's lines start with an RFC 3339 timestamp.
pub fn log_times(log: &Path, needle: &str) -> Vec<f64> {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    text.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .parse::<k8s_openapi::jiff::Timestamp>()
                .ok()
        })
        .map(|t| t.as_microsecond() as f64 / 1e6)
        .collect()
}

/// One test's namespace on a cluster, with a scratch directory, an admin kubeconfig whose context
/// namespace it is, and the journal the workers write to.
pub struct Space<'c> {
    pub cluster: &'c Cluster,
    pub ns: String,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl<'c> Space<'c> {
    /// Creates namespace `NAME-PID` (unique per run, so a long-lived `LEASE_EXEC_TESTENV` cluster
    /// can be reused; without a namespace controller, namespaces cannot be deleted).
    pub async fn new(cluster: &'c Cluster, name: &str) -> Space<'c> {
        let ns = format!("{name}-{}", std::process::id());
        cluster
            .kubectl(&["create", "namespace", &ns], None)
            .await
            .expect("create namespace");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            cluster.kubeconfig_text(&ns, &cluster.admin_token()),
        )
        .unwrap();
        Space {
            cluster,
            ns,
            dir,
            kubeconfig,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn journal(&self) -> PathBuf {
        self.path("journal")
    }

    pub fn entries(&self) -> Vec<Entry> {
        read_journal(&self.journal())
    }

    /// `journal_worker JOURNAL RUN_FOR 0`: the tests' journaling worker (`run_for` < 0: forever).
    pub fn worker_args(&self, run_for: f64) -> Vec<String> {
        vec![
            journal_worker().display().to_string(),
            self.journal().display().to_string(),
            run_for.to_string(),
            "0".into(),
        ]
    }

    /// `kubectl -n NS ARGS` as admin.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Out {
        kubectl(&self.kubeconfig, args, stdin).await
    }

    /// The Lease as JSON, or `None` when it does not exist.
    pub async fn lease(&self, name: &str) -> Option<serde_json::Value> {
        let out = self
            .kubectl(&["get", "lease", name, "-o", "json"], None)
            .await;
        if !out.ok && out.stderr.contains("NotFound") {
            return None;
        }
        Some(out.json("get lease"))
    }

    /// Waits until the Lease satisfies `check`; returns it.
    pub async fn wait_lease(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let lease = self.lease(name).await;
            if let Some(lease) = lease.filter(|l| check(l)) {
                return lease;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}; lease: {}",
                    self.lease(name)
                        .await
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "absent".into())
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A `lease-exec ARGS` command with `kubeconfig` (the admin one unless given), `RUST_LOG=info`
    /// and no Pod variables.
    pub fn lease_exec<S: AsRef<std::ffi::OsStr>>(
        &self,
        kubeconfig: Option<&Path>,
        args: &[S],
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(args)
            .env("KUBECONFIG", kubeconfig.unwrap_or(&self.kubeconfig))
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_UID")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        command
    }

    /// `lease-exec TIMING --identity ID LEASE -- journal_worker JOURNAL RUN_FOR 0`.
    pub fn contender(&self, lease: &str, identity: &str, run_for: f64) -> tokio::process::Command {
        let mut args: Vec<String> = TIMING.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--identity".into(),
            identity.into(),
            lease.into(),
            "--".into(),
        ]);
        args.extend(self.worker_args(run_for));
        self.lease_exec(None, &args)
    }

    /// Every lease-exec (and contender) log of this space.
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("lease-exec-") && n.ends_with(".log"))
            })
            .collect();
        logs.sort();
        logs
    }

    /// Times of the lines containing `needle` in every log of this space, sorted.
    pub fn log_times(&self, needle: &str) -> Vec<f64> {
        let mut times: Vec<f64> = self
            .logs()
            .iter()
            .flat_map(|l| log_times(l, needle))
            .collect();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        times
    }

    /// Starts `command` with stdout discarded and stderr in a log file of the scratch directory.
    pub fn spawn(&self, mut command: tokio::process::Command) -> Running {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.path(&format!("lease-exec-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        command
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        let child = command.spawn().expect("spawn");
        Running { child, log }
    }

    /// Applies `manifest` (a deploy/rbac.yaml variant) in the namespace, waits until the
    /// ServiceAccount `lease-exec` has exactly the lease verbs `lease_verbs` and (or not) the
    /// events rule, and returns a kubeconfig with a token from `kubectl create token`.
    pub async fn service_account(
        &self,
        manifest: &str,
        lease_verbs: &[&str],
        events: bool,
    ) -> PathBuf {
        self.kubectl(&["apply", "-f", "-"], Some(manifest))
            .await
            .expect("apply rbac");
        let sa = format!("system:serviceaccount:{}:lease-exec", self.ns);
        // RBAC is served from an informer: wait until the answers match the Role.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let checks: Vec<(String, String, bool)> = [
            "get", "list", "create", "update", "patch", "watch", "delete",
        ]
        .iter()
        .map(|v| {
            (
                v.to_string(),
                "leases.coordination.k8s.io".to_string(),
                lease_verbs.contains(v),
            )
        })
        .chain(
            ["create", "patch"]
                .iter()
                .map(|v| (v.to_string(), "events.events.k8s.io".to_string(), events)),
        )
        .collect();
        for (verb, resource, expected) in checks {
            loop {
                let out = self
                    .kubectl(&["auth", "can-i", &verb, &resource, "--as", &sa], None)
                    .await;
                let yes = out.stdout.trim() == "yes";
                if yes == expected {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{sa}: can-i {verb} {resource} = {yes}, expected {expected}: {}",
                    out.stderr
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let token = self
            .kubectl(&["create", "token", "lease-exec", "--duration", "1h"], None)
            .await
            .expect("create token");
        let path = self.path(&format!("sa-{}.kubeconfig", lease_verbs.join("-")));
        std::fs::write(&path, self.cluster.kubeconfig_text(&self.ns, token.trim())).unwrap();
        path
    }

    /// Starts `kubectl get leases --watch` on `lease`; every version is kept with the moment it
    /// arrived.
    /// Starts `kubectl get leases --watch` on `lease` and returns once the API server has
    /// answered its watch request (kubectl's own request log says so), so that no change made
    /// after this returns can be missed, however slowly kubectl started.
    pub async fn watch_lease(&self, lease: &str) -> LeaseWatch {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let selector = format!("metadata.name={lease}");
        let mut child = tokio::process::Command::new(kubectl_bin())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "get",
                "leases",
                "--field-selector",
                &selector,
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
                // Logs each request with its answer: the watch's "200 OK" is the signal it is open.
                "-v=6",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl watch");
        let mut stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let sink = arrived.clone();
        // kubectl writes each event as it comes; parsing as the bytes arrive stamps each one
        // within a read of its arrival.
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = stdout.read(&mut chunk).await {
                let at = std::time::Instant::now();
                buf.extend_from_slice(&chunk[..n]);
                let mut stream =
                    serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
                let mut events = Vec::new();
                while let Some(Ok(e)) = stream.next() {
                    events.push(Arrived {
                        at,
                        kind: e["type"].as_str().unwrap_or("").to_string(),
                        lease: e["object"].clone(),
                    });
                }
                let used = stream.byte_offset();
                buf.drain(..used);
                sink.lock().unwrap().extend(events);
            }
        });
        let log = Arc::new(Mutex::new(String::new()));
        let (open_tx, open_rx) = tokio::sync::oneshot::channel();
        let lines = log.clone();
        tokio::spawn(async move {
            let mut open = Some(open_tx);
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if line.contains("watch=true")
                    && line.contains("200 OK")
                    && let Some(open) = open.take()
                {
                    let _ = open.send(());
                }
                let mut log = lines.lock().unwrap();
                // Enough to explain a failure; the request log of a long watch is not kept.
                if log.len() < 64 * 1024 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        const OPEN: Duration = Duration::from_secs(30);
        if !matches!(tokio::time::timeout(OPEN, open_rx).await, Ok(Ok(()))) {
            panic!(
                "kubectl's watch on {lease} did not open within {OPEN:?}: {}",
                log.lock().unwrap()
            );
        }
        LeaseWatch {
            _child: child,
            arrived,
        }
    }
}

/// One version seen by a [`LeaseWatch`].
#[derive(Debug, Clone)]
pub struct Arrived {
    /// When the test read it.
    pub at: std::time::Instant,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: String,
    pub lease: serde_json::Value,
}

/// A `kubectl get leases --watch` running in the background.
pub struct LeaseWatch {
    _child: tokio::process::Child,
    arrived: Arc<Mutex<Vec<Arrived>>>,
}

impl LeaseWatch {
    /// Every event so far, with its arrival.
    pub fn arrivals(&self) -> Vec<Arrived> {
        self.arrived.lock().unwrap().clone()
    }

    /// Every event so far: (`ADDED`/`MODIFIED`/`DELETED`, the Lease).
    pub fn events(&self) -> Vec<(String, serde_json::Value)> {
        self.arrivals()
            .into_iter()
            .map(|a| (a.kind, a.lease))
            .collect()
    }

    /// Waits until some event satisfies `check`.
    pub async fn wait(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&str, &serde_json::Value) -> bool,
    ) {
        wait_for(limit, what, || {
            self.events().iter().any(|(kind, lease)| check(kind, lease))
        })
        .await;
    }
}

/// The spec field `name` of a Lease JSON as a string (`""` when absent).
pub fn spec_str(lease: &serde_json::Value, name: &str) -> String {
    lease["spec"][name].as_str().unwrap_or("").to_string()
}

pub fn holder(lease: &serde_json::Value) -> String {
    spec_str(lease, "holderIdentity")
}

/// RFC 3339 with exactly six fractional digits and `Z`: a MicroTime as the API serves it.
pub fn is_micro_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[26] == b'Z'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 26].contains(&i) || c.is_ascii_digit())
}

/// Seconds since the epoch of a MicroTime.
pub fn micro_time_secs(s: &str) -> f64 {
    let t: k8s_openapi::jiff::Timestamp = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
    t.as_microsecond() as f64 / 1e6
}

/// Seconds since the epoch now.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Percentile `p` (0..=100) of `values`, sorted in place.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if values.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[i]
}
