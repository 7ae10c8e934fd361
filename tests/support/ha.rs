//! The HA control plane of `testenv/cluster up DIR --ha` for `tests/ha.rs`: three etcd members,
//! two kube-apiservers on them (watch cache on), the garbage collector and a Toxiproxy server in
//! front of which each lease-exec gets a proxy of its own, so that faults hit one client, one API
//! server or one etcd member at a time.
//!
//! - One HA control plane per test binary, started by the first test (in
//!   `target/tmp/real-tier/ha-PID`) and stopped by a watchdog when the binary exits, however it
//!   exits; `LEASE_EXEC_TESTENV_HA=DIR` uses one already running in DIR instead.
//! - The tests run one at a time ([`HaTest::begin`] holds a lock for the whole test): stopping an
//!   API server or an etcd member, or compacting etcd, would disturb any test running beside it,
//!   and timings are tighter on a quiet machine. Whatever a test broke (a toxic, a stopped API
//!   server or etcd member, a worker left running) is undone when its [`HaTest`] is dropped, on
//!   success and on panic alike.
//! - Availability as in the real tier ([`crate::cluster::available`]): without Go the tests print
//!   `SKIPPED (real tier)` and return; `LEASE_EXEC_REAL_TIER=required` makes that a failure.
//!
//! The Lease is observed by [`LeaseLog`], a watch of the test's own (kube-rs) on an API server the
//! test does not disturb, re-opened from the last resourceVersion whenever it ends, so that every
//! version the API server committed is seen, with when it arrived. Worker exec and exit come from
//! the kernel ([`crate::support::kernel`]).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use serde_json::Value;

use crate::cluster::{self, Out, clusters_root, kubectl, report, script};
use crate::support::{self, BIN, Run, Running, alive, journal_worker, mono_ns};

/// Directory of an already running HA control plane (`testenv/cluster up DIR --ha`).
/// The fault tests' timings: lease 5 s, renew deadline 3 s, a renewal every second, retry period
/// 500 ms, grace 1 s. Kill deadline: 5 s − (200 ms + 2% of 5 s) = 4.7 s after a renewal.
pub const FAULT_ARGS: [&str; 10] = [
    "--lease-duration",
    "5s",
    "--renew-deadline",
    "3s",
    "--renew-interval",
    "1s",
    "--retry-period",
    "500ms",
    "--grace-period",
    "1s",
];
pub const FAULT: support::Timing = support::Timing {
    lease: Duration::from_secs(5),
    renew_deadline: Duration::from_secs(3),
    grace: Duration::from_secs(1),
};

pub const ENV_HA_DIR: &str = "LEASE_EXEC_TESTENV_HA";

/// API servers and etcd members of `up --ha`.
pub const APISERVERS: usize = 2;
pub const ETCD_MEMBERS: usize = 3;

/// A running HA control plane.
pub struct Ha {
    pub dir: PathBuf,
    /// The watchdog's stdin: its closing (at our exit, even a SIGKILL) makes it run `cluster
    /// down`. `None` for a control plane that is not ours.
    _watchdog: Option<std::process::ChildStdin>,
}

/// One test at a time (see the module documentation).
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Ha {
    /// The HA control plane of this test binary, started on first use.
    pub async fn shared() -> Option<&'static Ha> {
        static SHARED: OnceLock<Result<Ha, String>> = OnceLock::new();
        let found = tokio::task::spawn_blocking(|| SHARED.get_or_init(init).as_ref())
            .await
            .expect("HA control plane start-up panicked");
        cluster::available(found.map_err(|e| e.clone()))
    }

    /// The admin kubeconfig of API server `n`.
    pub fn kubeconfig(&self, n: usize) -> PathBuf {
        self.dir.join(format!("apiserver-{n}/kubeconfig"))
    }
}

fn init() -> Result<Ha, String> {
    if let Some(off) = cluster::deliberately_off() {
        return Err(off);
    }
    if let Some(dir) = std::env::var_os(ENV_HA_DIR) {
        let ha = Ha {
            dir: PathBuf::from(dir),
            _watchdog: None,
        };
        for n in 0..APISERVERS {
            ready(&ha.kubeconfig(n))
                .map_err(|e| format!("{ENV_HA_DIR}={}: {e}", ha.dir.display()))?;
        }
        return Ok(ha);
    }
    cluster::down_stale();
    start(&clusters_root().join(format!("ha-{}", std::process::id())))
}

/// Whether the API server of `kubeconfig` answers `/readyz`.
fn ready(kubeconfig: &Path) -> Result<(), String> {
    let out = std::process::Command::new(cluster::kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["get", "--raw", "/readyz", "--request-timeout", "5s"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cluster::kubectl_bin().display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} is not ready: {}",
            kubeconfig.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `testenv/cluster up DIR --ha` (building testenv/bin if needed) with a watchdog.
fn start(dir: &Path) -> Result<Ha, String> {
    let go = std::process::Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !go.is_ok_and(|s| s.success()) {
        return Err("`go` is not on PATH: testenv/bin cannot be built (install Go 1.26, or set LEASE_EXEC_TESTENV_HA to a running `testenv/cluster up DIR --ha` directory)".into());
    }
    std::fs::create_dir_all(clusters_root()).map_err(|e| e.to_string())?;
    let _ = std::process::Command::new(script())
        .arg("down")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // The watchdog first, in its own process group (see cluster.rs).
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
    let out = std::process::Command::new(script())
        .arg("up")
        .arg(dir)
        .arg("--ha")
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
        return Err(format!("`testenv/cluster up --ha` failed: {last}"));
    }
    report(&format!(
        "ha tier: HA control plane {} up in {:.1}s",
        dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Ha {
        dir: dir.to_owned(),
        _watchdog: watchdog,
    })
}

/// `testenv/cluster COMMAND DIR ARGS`, blocking: (success, stdout, stderr).
fn control_blocking(dir: &Path, command: &str, args: &[&str]) -> (bool, String, String) {
    match std::process::Command::new(script())
        .arg(command)
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    }
}

/// A fault of a test's to undo when the test ends.
#[derive(Debug, Clone, PartialEq)]
enum Undo {
    Toxic(String),
    Apiserver(usize),
    Etcd(usize),
    /// A toxic between API server N and etcd.
    EtcdToxic(usize),
}

/// A fault on one proxy (`testenv/cluster toxic DIR NAME ...`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Toxic {
    /// New connections refused, open ones cut.
    Partition,
    /// Connections kept open, nothing passes either way.
    HalfOpen,
    /// Every connection reset.
    Reset,
    /// This many milliseconds of latency.
    Latency(u64),
}

impl Toxic {
    fn args(self) -> Vec<String> {
        match self {
            Toxic::Partition => vec!["partition".into()],
            Toxic::HalfOpen => vec!["half-open".into()],
            Toxic::Reset => vec!["reset".into()],
            Toxic::Latency(ms) => vec!["latency".into(), ms.to_string()],
        }
    }
}

impl std::fmt::Display for Toxic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.args().join(" "))
    }
}

/// A Toxiproxy proxy in front of one API server, for one client.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub name: String,
    /// The API server it leads to.
    pub apiserver: usize,
    /// An admin kubeconfig through it.
    pub kubeconfig: PathBuf,
}

/// One test on the HA control plane: the lock, a namespace of its own, a scratch directory with
/// the workers' journal and the lease-exec logs, and the faults to undo.
pub struct HaTest {
    pub ha: &'static Ha,
    pub name: String,
    pub ns: String,
    pub dir: tempfile::TempDir,
    undo: Mutex<Vec<Undo>>,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

impl HaTest {
    /// Waits for the other tests, checks that both API servers are ready, and creates namespace
    /// `NAME-PID`. `None` when the real tier is skipped.
    pub async fn begin(name: &str) -> Option<HaTest> {
        let ha = Ha::shared().await?;
        let lock = LOCK.lock().await;
        // The proc connector before any worker starts.
        support::kernel();
        journal_worker();
        for n in 0..APISERVERS {
            let kubeconfig = ha.kubeconfig(n);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let k = kubeconfig.clone();
                let ok = tokio::task::spawn_blocking(move || ready(&k))
                    .await
                    .unwrap();
                match ok {
                    Ok(()) => break,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        panic!("API server {n} of the HA control plane is not ready: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        let ns = format!("{name}-{}", std::process::id());
        kubectl(&ha.kubeconfig(0), &["create", "namespace", &ns], None)
            .await
            .expect("create namespace");
        Some(HaTest {
            ha,
            name: name.to_string(),
            ns,
            dir: tempfile::tempdir().unwrap(),
            undo: Mutex::default(),
            _lock: lock,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn journal(&self) -> PathBuf {
        self.path("journal")
    }

    /// `testenv/cluster COMMAND DIR ARGS`; panics on failure. Returns stdout.
    pub async fn control(&self, command: &str, args: &[&str]) -> String {
        let dir = self.ha.dir.clone();
        let (command, args) = (
            command.to_string(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        let what = format!("cluster {command} {}", args.join(" "));
        let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            control_blocking(&dir, &command, &args)
        })
        .await
        .unwrap();
        assert!(ok, "{what} failed: {stdout}{stderr}");
        stdout
    }

    /// `kubectl --kubeconfig (API server n's admin) -n NS ARGS`.
    pub async fn kubectl(&self, n: usize, args: &[&str], stdin: Option<&str>) -> Out {
        let mut all = vec!["--namespace", &self.ns];
        all.extend_from_slice(args);
        kubectl(&self.ha.kubeconfig(n), &all, stdin).await
    }

    /// The Lease as API server `n` serves it, or `None` when it does not exist.
    pub async fn lease(&self, n: usize, name: &str) -> Option<Value> {
        let out = self
            .kubectl(n, &["get", "lease", name, "-o", "json"], None)
            .await;
        if !out.ok && out.stderr.contains("NotFound") {
            return None;
        }
        Some(out.json("get lease"))
    }

    /// A Lease as another client leaves it: released (no holder) with a 1 s duration, so that the
    /// first contender takes it at once instead of waiting a lease duration for a new name.
    pub async fn put_released_lease(&self, name: &str) {
        let manifest = format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\nspec:\n  leaseDurationSeconds: 1\n"
        );
        self.kubectl(0, &["create", "-f", "-"], Some(&manifest))
            .await
            .expect("create lease");
    }

    /// A proxy in front of API server `n` for the client `role` (`cluster proxy DIR NAME N`).
    pub async fn proxy(&self, role: &str, n: usize) -> Proxy {
        let name = format!("{}-{role}", self.ns);
        let out = self.control("proxy", &[&name, &n.to_string()]).await;
        let printed = out.lines().rev().find(|l| !l.trim().is_empty());
        let kubeconfig = printed
            .map(|l| PathBuf::from(l.trim()))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| self.ha.dir.join(format!("proxy/{name}/kubeconfig")));
        assert!(
            kubeconfig.is_file(),
            "cluster proxy {name} {n}: no kubeconfig at {} (printed: {out:?})",
            kubeconfig.display()
        );
        Proxy {
            name,
            apiserver: n,
            kubeconfig,
        }
    }

    /// Puts `toxic` on `proxy`; healed by [`HaTest::heal`] or at the end of the test.
    pub async fn toxic(&self, proxy: &Proxy, toxic: Toxic) {
        self.note(Undo::Toxic(proxy.name.clone()));
        let args = toxic.args();
        let mut all = vec![proxy.name.as_str()];
        all.extend(args.iter().map(String::as_str));
        self.control("toxic", &all).await;
    }

    /// Removes every toxic of `proxy`.
    pub async fn heal(&self, proxy: &Proxy) {
        self.control("toxic", &[&proxy.name, "heal"]).await;
        self.done(&Undo::Toxic(proxy.name.clone()));
    }

    /// Puts `toxic` between API server `n` and every etcd member (`cluster etcd-toxic DIR N ...`):
    /// a latency makes that API server's watch cache lag behind etcd (its reads and writes wait
    /// as long), the other API server's stays current. Healed by [`HaTest::heal_etcd`] or at the
    /// end of the test.
    pub async fn etcd_toxic(&self, n: usize, toxic: Toxic) {
        self.note(Undo::EtcdToxic(n));
        let n = n.to_string();
        let args = toxic.args();
        let mut all = vec![n.as_str()];
        all.extend(args.iter().map(String::as_str));
        self.control("etcd-toxic", &all).await;
    }

    /// Removes every toxic between API server `n` and etcd.
    pub async fn heal_etcd(&self, n: usize) {
        self.control("etcd-toxic", &[&n.to_string(), "heal"]).await;
        self.done(&Undo::EtcdToxic(n));
    }

    /// `cluster stop-apiserver DIR N [FLAG]` (`--kill`, `--freeze` or none); started again by
    /// [`HaTest::start_apiserver`] or at the end of the test.
    pub async fn stop_apiserver(&self, n: usize, flag: Option<&str>) {
        self.note(Undo::Apiserver(n));
        let n = n.to_string();
        let mut args = vec![n.as_str()];
        args.extend(flag);
        self.control("stop-apiserver", &args).await;
    }

    pub async fn start_apiserver(&self, n: usize) {
        self.control("start-apiserver", &[&n.to_string()]).await;
        self.done(&Undo::Apiserver(n));
    }

    /// The index of etcd's leader member (`cluster etcd-leader DIR`).
    pub async fn etcd_leader(&self) -> Option<usize> {
        let dir = self.ha.dir.clone();
        let (ok, stdout, _) =
            tokio::task::spawn_blocking(move || control_blocking(&dir, "etcd-leader", &[]))
                .await
                .unwrap();
        ok.then(|| stdout.trim().parse().ok()).flatten()
    }

    /// `cluster stop-etcd DIR M [FLAG]`; started again by [`HaTest::start_etcd`] or at the end of
    /// the test.
    pub async fn stop_etcd(&self, m: usize, flag: Option<&str>) {
        self.note(Undo::Etcd(m));
        let m = m.to_string();
        let mut args = vec![m.as_str()];
        args.extend(flag);
        self.control("stop-etcd", &args).await;
    }

    pub async fn start_etcd(&self, m: usize) {
        self.control("start-etcd", &[&m.to_string()]).await;
        self.done(&Undo::Etcd(m));
    }

    fn note(&self, undo: Undo) {
        let mut list = self.undo.lock().unwrap();
        if !list.contains(&undo) {
            list.push(undo);
        }
    }

    fn done(&self, undo: &Undo) {
        self.undo.lock().unwrap().retain(|u| u != undo);
    }

    /// `lease-exec TIMING --namespace NS --identity ID LEASE -- journal_worker JOURNAL -1 0` through
    /// `kubeconfig`, logging at `log` level (`RUST_LOG`).
    pub fn contender(
        &self,
        kubeconfig: &Path,
        timing: &[&str],
        identity: &str,
        lease: &str,
        log: &str,
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(timing)
            .args(["--namespace", &self.ns, "--identity", identity, lease, "--"])
            .arg(journal_worker())
            .arg(self.journal())
            .args(["-1", "0"])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_UID")
            .env("RUST_LOG", log)
            .stdin(Stdio::null());
        command
    }

    /// Starts `command` with stdout discarded and stderr in `lease-exec-N.log` of the scratch
    /// directory; SIGKILLed if still running when dropped.
    pub fn spawn(&self, mut command: tokio::process::Command) -> Running {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.path(&format!("lease-exec-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        command
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        let child = command.spawn().expect("spawn lease-exec");
        Running { child, log }
    }

    /// The kernel's spans of this test's workers so far (running ones with no exit).
    pub fn spans(&self) -> Vec<crate::support::kernel::Span> {
        let journal = self.journal().display().to_string();
        support::kernel()
            .spans()
            .into_iter()
            .filter(|s| s.args.get(1) == Some(&journal))
            .collect()
    }

    /// Waits until the kernel has seen the exec of a worker started by `identity`; returns its
    /// span.
    pub async fn wait_exec(&self, identity: &str, limit: Duration) -> crate::support::kernel::Span {
        let mut found = None;
        support::wait_for(limit, &format!("{identity}'s worker to start"), || {
            found = self
                .spans()
                .into_iter()
                .find(|s| s.env("LEASE_EXEC_HELD_IDENTITY") == Some(identity));
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    /// Every worker of this test as the kernel saw it, by exec; call once all have exited.
    pub async fn runs(&self) -> Vec<Run> {
        support::kernel_runs_in(&self.journal()).await
    }

    /// Starts a [`LeaseLog`] of `lease` on API server `n`; returns once it has read the Lease.
    pub async fn observe(&self, n: usize, lease: &str) -> LeaseLog {
        LeaseLog::start(&self.ha.kubeconfig(n), &self.ns, lease).await
    }
}

impl Drop for HaTest {
    fn drop(&mut self) {
        // Workers still running (their lease-exec was SIGKILLed, or the test failed): the
        // kernel's open spans of this journal, each its own process group.
        for span in self.spans() {
            if span.exit_ns.is_none() {
                kill_worker(span.pid as i32, &self.journal());
            }
        }
        let undo = std::mem::take(&mut *self.undo.lock().unwrap());
        for undo in undo {
            let (command, args) = match &undo {
                Undo::Toxic(name) => ("toxic", vec![name.clone(), "heal".into()]),
                Undo::Apiserver(n) => ("start-apiserver", vec![n.to_string()]),
                Undo::Etcd(m) => ("start-etcd", vec![m.to_string()]),
                Undo::EtcdToxic(n) => ("etcd-toxic", vec![n.to_string(), "heal".into()]),
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, _, stderr) = control_blocking(&self.ha.dir, command, &args);
            if !ok {
                report(&format!(
                    "ha tier: {}: undoing {undo:?} failed: {}",
                    self.name,
                    stderr.trim()
                ));
            }
        }
    }
}

/// SIGKILLs the process group of worker `pid` if it still runs the journaling worker on `journal`
/// (so a pid reused since can never be hit).
pub fn kill_worker(pid: i32, journal: &Path) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let ours = args.get(1) == Some(&journal.as_os_str().as_encoded_bytes());
    if ours && alive(pid) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

// ------------------------------------------------------------------------------------------------
// The test's own view of the Lease

/// One version of the Lease as a [`LeaseLog`] received it.
#[derive(Debug, Clone)]
pub struct Version {
    /// When it arrived (CLOCK_MONOTONIC ns).
    pub at_ns: u64,
    /// `ADDED`, `MODIFIED`, `DELETED`, or `READ` (a GET, at the start and after a 410).
    pub kind: &'static str,
    pub lease: Value,
}

impl Version {
    pub fn holder(&self) -> String {
        cluster::holder(&self.lease)
    }

    pub fn rv(&self) -> String {
        self.lease["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// `spec.renewTime` (CLOCK_MONOTONIC ns, see [`Clocks`]).
    pub fn renew_ns(&self, clocks: &Clocks) -> Option<u64> {
        clocks.micro_time_ns(&cluster::spec_str(&self.lease, "renewTime"))
    }

    /// `spec.acquireTime` (CLOCK_MONOTONIC ns).
    pub fn acquire_ns(&self, clocks: &Clocks) -> Option<u64> {
        clocks.micro_time_ns(&cluster::spec_str(&self.lease, "acquireTime"))
    }
}

/// Every version of one Lease one API server committed, in order, with when each arrived: a
/// watch re-opened from the last resourceVersion whenever it ends. A 410 (the position left the
/// watch cache) makes it read the Lease again; that is noted in [`LeaseLog::resyncs`], as versions
/// may have been missed there.
pub struct LeaseLog {
    versions: Arc<Mutex<Vec<Version>>>,
    resyncs: Arc<Mutex<Vec<(u64, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaseLog {
    pub async fn start(kubeconfig: &Path, ns: &str, name: &str) -> LeaseLog {
        use futures::StreamExt;
        use kube::api::{Api, WatchEvent, WatchParams};
        let config = kube::config::Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            config,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kube config");
        let client = kube::Client::try_from(config).expect("kube client");
        let api: Api<Lease> = Api::namespaced(client, ns);
        let versions: Arc<Mutex<Vec<Version>>> = Arc::default();
        let resyncs: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
        let (read_tx, read_rx) = tokio::sync::oneshot::channel();
        let (sink, notes, name) = (versions.clone(), resyncs.clone(), name.to_string());
        let task = tokio::spawn(async move {
            let mut read_tx = Some(read_tx);
            let mut rv: Option<String> = None;
            let record = |kind: &'static str, lease: &Lease| {
                sink.lock().unwrap().push(Version {
                    at_ns: mono_ns(),
                    kind,
                    lease: serde_json::to_value(lease).unwrap(),
                });
            };
            loop {
                let Some(from) = rv.clone() else {
                    match tokio::time::timeout(Duration::from_secs(5), api.get_opt(&name)).await {
                        Ok(Ok(lease)) => {
                            if let Some(lease) = &lease {
                                record("READ", lease);
                            }
                            // Absent: watch from "0" (any version) is not what we want; watch
                            // from the list's resourceVersion instead.
                            rv = Some(match lease {
                                Some(l) => l.metadata.resource_version.unwrap_or_default(),
                                None => {
                                    let list = api.list_metadata(&Default::default()).await;
                                    list.ok()
                                        .and_then(|l| l.metadata.resource_version)
                                        .unwrap_or_default()
                                }
                            });
                            if let Some(tx) = read_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                    continue;
                };
                let params = WatchParams::default()
                    .fields(&format!("metadata.name={name}"))
                    .timeout(60);
                let stream =
                    match tokio::time::timeout(Duration::from_secs(5), api.watch(&params, &from))
                        .await
                    {
                        Ok(Ok(stream)) => stream,
                        _ => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(WatchEvent::Added(lease)) => {
                            rv = lease.metadata.resource_version.clone();
                            record("ADDED", &lease);
                        }
                        Ok(WatchEvent::Modified(lease)) => {
                            rv = lease.metadata.resource_version.clone();
                            record("MODIFIED", &lease);
                        }
                        Ok(WatchEvent::Deleted(lease)) => {
                            rv = lease.metadata.resource_version.clone();
                            record("DELETED", &lease);
                        }
                        Ok(WatchEvent::Bookmark(b)) => rv = Some(b.metadata.resource_version),
                        Ok(WatchEvent::Error(status)) => {
                            notes
                                .lock()
                                .unwrap()
                                .push((mono_ns(), format!("{}: {}", status.code, status.message)));
                            if status.code == 410 {
                                rv = None;
                            }
                            break;
                        }
                        Err(e) => {
                            notes.lock().unwrap().push((mono_ns(), e.to_string()));
                            break;
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), read_rx)
            .await
            .expect("the test's watch could not read the Lease within 30 s")
            .expect("the test's watch ended");
        LeaseLog {
            versions,
            resyncs,
            task,
        }
    }

    /// Every version so far, in order.
    pub fn versions(&self) -> Vec<Version> {
        self.versions.lock().unwrap().clone()
    }

    /// Every 410 or broken stream so far: (when, what).
    pub fn resyncs(&self) -> Vec<(u64, String)> {
        self.resyncs.lock().unwrap().clone()
    }

    /// Waits until some version satisfies `check`; returns the first that does.
    pub async fn wait(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&Version) -> bool,
    ) -> Version {
        let mut found = None;
        support::wait_for(limit, what, || {
            found = self.versions().into_iter().find(|v| check(v));
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    /// Waits for a renewal by `holder` that arrived after `after_ns`.
    pub async fn wait_renewal(&self, holder: &str, after_ns: u64, limit: Duration) -> Version {
        self.wait(limit, &format!("a renewal by {holder}"), |v| {
            v.at_ns > after_ns && v.holder() == holder
        })
        .await
    }

    /// The last version naming `holder`.
    pub fn last_by(&self, holder: &str) -> Option<Version> {
        self.versions()
            .into_iter()
            .rev()
            .find(|v| v.holder() == holder)
    }

    /// The first version naming a holder other than `holder` (and not empty).
    pub fn first_other(&self, holder: &str) -> Option<Version> {
        self.versions().into_iter().find(|v| {
            let h = v.holder();
            !h.is_empty() && h != holder
        })
    }

    /// `renewTime` of each version naming `holder`, deduplicated, in order (CLOCK_MONOTONIC ns).
    pub fn renewals(&self, holder: &str, clocks: &Clocks) -> Vec<u64> {
        let mut times: Vec<u64> = self
            .versions()
            .iter()
            .filter(|v| v.holder() == holder)
            .filter_map(|v| v.renew_ns(clocks))
            .collect();
        times.dedup();
        times
    }
}

/// CLOCK_REALTIME (what lease-exec writes into `renewTime` and `acquireTime`) against
/// CLOCK_MONOTONIC (what the kernel stamps), sampled once: every process here runs on this one
/// machine, so a Lease's MicroTime and a kernel stamp compare to within the sampling (µs), as
/// long as nobody steps the clock during the test.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    /// Realtime minus monotonic, ns.
    offset_ns: i128,
}

impl Clocks {
    pub fn sample() -> Clocks {
        // The tightest of a few samples.
        let mut best: Option<(u64, i128)> = None;
        for _ in 0..5 {
            let before = mono_ns();
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as i128;
            let after = mono_ns();
            let width = after - before;
            let offset = wall - (before as i128 + width as i128 / 2);
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        Clocks {
            offset_ns: best.unwrap().1,
        }
    }

    /// A MicroTime as CLOCK_MONOTONIC ns; `None` if empty or unparsable.
    pub fn micro_time_ns(&self, micro_time: &str) -> Option<u64> {
        let t: k8s_openapi::jiff::Timestamp = micro_time.parse().ok()?;
        let wall = t.as_microsecond() as i128 * 1000;
        u64::try_from(wall - self.offset_ns).ok()
    }
}

/// Milliseconds between two CLOCK_MONOTONIC stamps, `to - from`, signed.
pub fn ms(from: u64, to: u64) -> f64 {
    (to as i128 - from as i128) as f64 / 1e6
}
